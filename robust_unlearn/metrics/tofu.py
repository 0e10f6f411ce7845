"""TOFU metrics (Maini et al. 2024), with the definitions of open-unlearning's evaluator.

Per QA pair, ``nll`` = mean token NLL of an answer given the question (question tokens masked),
``p = exp(-nll)``.
- ``{split}_Q_A_Prob``: mean over pairs of p(answer).
- ``{split}_Q_A_Prob_normalised`` (real authors, world facts): p(ans) / (p(ans) + sum p(wrong)).
- ``{split}_Q_A_ROUGE``: ROUGE-L recall (rouge_score, stemmer on) of the greedy answer (up to
  ``max_new_tokens``) against the reference answer.
- ``{split}_Q_A_distinct_bigrams``: mean over the same greedy answers of their distinct-bigram share
  (1 - seq-rep-2, ``scoring.distinct_bigram_share``, the quantity the collapse guard reads). Not an
  open-unlearning metric: it shows answers that loop ("French French French ..."), which lower the
  forget probability without answering like the oracle, and which the other metrics do not see.
- truth ratio ``tr = exp(-mean_k nll(wrong_k)) / p(correct)``, where correct = the paraphrased
  answer (forget, retain) or the answer itself (real authors, world facts, which have no paraphrase).
  ``forget_truth_ratio`` = mean(min(tr, 1/tr)); ``{retain,ra,wf}_Truth_Ratio`` = mean(max(0, 1 - tr)).
- ``forget_quality``: KS two-sample p-value between 1/tr of the model and of the retain oracle on
  the forget set (scipy.stats.ks_2samp).
- with ``eval.catalogue`` (on by default for ``evaluate``): open-unlearning's membership attacks
  ``mia_loss``, ``mia_zlib``, ``mia_reference`` (against the retain oracle), ``mia_min_k``,
  ``mia_min_k_plus_plus``, ``mia_gradnorm`` (forget vs holdout AUCs), ``privleak``,
  ``exact_memorization`` and ``extraction_strength`` (``metrics.mia``).
- with ``eval.gibberish_classifier``: open-unlearning's ``forget_Q_A_gibberish``, the mean over the greedy
  forget answers of the classifier's softmax probability of class 0 ("clean"), each answer truncated to
  32 classifier tokens, batches of 32 (locuslab/open-unlearning@d3d7cf9: src/evals/metrics/utility.py,
  ``classifier_prob``; configs/eval/tofu_metrics/forget_Q_A_gibberish.yaml).
- ``model_utility``: harmonic mean of retain_Q_A_Prob, retain_Q_A_ROUGE, retain_Truth_Ratio,
  ra_Q_A_Prob_normalised, ra_Q_A_ROUGE, ra_Truth_Ratio, wf_Q_A_Prob_normalised, wf_Q_A_ROUGE,
  wf_Truth_Ratio; skipped (with a warning) when one of them could not be computed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from ..data.benchmarks import QA_SPLITS
from ..data.collate import QAFormatter, formatter_for
from ..scoring import (distinct_bigram_share, per_item_sharded, qa_gradnorms, qa_mean_nll, qa_pass_sharded,
                       qa_token_details)
from . import mia
from .classifier import GIBBERISH_CLASS, GIBBERISH_MAX_LENGTH, classifier_prob, gibberish_classifier

log = logging.getLogger(__name__)

PREFIX = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf", "holdout": "holdout"}
UTILITY_METRICS = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
                   "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
                   "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")


@dataclass
class SplitStats:
    """Per-example numbers of one split (arrays aligned with the split's rows)."""
    prob: np.ndarray
    truth_ratio: np.ndarray | None = None
    normalised: np.ndarray | None = None
    rouge: np.ndarray | None = None
    distinct_bigrams: np.ndarray | None = None  # per greedy answer (scoring.distinct_bigram_share)
    gibberish: np.ndarray | None = None  # per greedy answer: the classifier's P(clean) (eval.gibberish_classifier)
    generations: list[str] = field(default_factory=list)
    mia: dict | None = None  # attack -> per-example scores (forget and holdout, with eval.catalogue)


@dataclass
class OracleReference:
    """What a cell is compared with, from the retain oracle's uncompressed stats: its forget truth
    ratios (forget_quality) and, with the catalogue, its per-example answer NLLs on forget and holdout
    (mia_reference) and its Min-K AUC (privleak)."""
    truth_ratio: np.ndarray | None
    forget_nll: np.ndarray | None = None
    holdout_nll: np.ndarray | None = None
    min_k_auc: float | None = None


def forget_quality(model_tr: np.ndarray, oracle_tr: np.ndarray) -> float:
    return float(stats.ks_2samp(1.0 / model_tr, 1.0 / oracle_tr).pvalue)


def truth_ratio_aggregate(tr: np.ndarray, split: str) -> float:
    if split == "forget":
        return float(np.mean(np.minimum(tr, 1.0 / tr)))
    return float(np.mean(np.maximum(0.0, 1.0 - tr)))


class Evaluator:
    def __init__(self, formatter: QAFormatter, batch_size: int = 32, max_new_tokens: int = 200, rouge: bool = True,
                 catalogue: bool = False):
        self.fmt = formatter
        self.catalogue = catalogue
        self.shard: tuple[int, int] | None = None  # (process, processes) under accelerate launch: sweep shards
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.rouge = rouge
        self.gibberish = None  # (classifier, tokenizer): forget_Q_A_gibberish (eval.gibberish_classifier)
        self._scorer = None

    # -- batched model passes -------------------------------------------------------------
    def mean_nll(self, model, pairs: list[tuple[str, str]], desc: str = "score") -> np.ndarray:
        """Mean token NLL of each (question, answer) (``scoring.qa_mean_nll``: each question's prompt is
        run once for all its answers)."""
        return qa_mean_nll(model, self.fmt, pairs, self.batch_size, desc)

    def generate(self, model, questions: list[str], desc: str = "generate") -> list[str]:
        """Greedy answers (up to ``max_new_tokens``, stopping at end-of-turn / EOS) with a key/value cache."""
        text = qa_pass_sharded(model, self.fmt, [], questions, self.batch_size, self.max_new_tokens, self.shard)[1]
        return [text[q] for q in questions]

    def rouge_recall(self, references: list[str], generations: list[str]) -> np.ndarray:
        if self._scorer is None:
            from rouge_score import rouge_scorer

            self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return np.array([self._scorer.score(ref, gen)["rougeL"].recall for ref, gen in zip(references, generations)])

    # -- one split --------------------------------------------------------------------------
    @staticmethod
    def _layout(rows: list, split: str) -> tuple[list[tuple[str, str]], dict]:
        """Every answer variant of a split to score, and where each kind starts in that list."""
        qs = [r["question"] for r in rows]
        # holdout (never-trained authors) only needs the answer probability
        has_pert = split != "holdout" and bool(rows) and all(r["perturbed_answer"] for r in rows)
        has_para = bool(rows) and all(r["paraphrased_answer"] for r in rows)
        pairs = [(q, r["answer"]) for q, r in zip(qs, rows)]
        at = {"n": len(rows), "para": None, "pert": None, "n_pert": 0}
        if has_pert and has_para:
            at["para"] = len(pairs)
            pairs += [(q, r["paraphrased_answer"]) for q, r in zip(qs, rows)]
        if has_pert:
            at["pert"] = len(pairs)
            at["n_pert"] = min(len(r["perturbed_answer"]) for r in rows)
            pairs += [(q, p) for q, r in zip(qs, rows) for p in r["perturbed_answer"][: at["n_pert"]]]
        return pairs, at

    def _stats(self, rows: list, split: str, nll: np.ndarray, at: dict, generations: list[str] | None) -> SplitStats:
        n = at["n"]
        ans_nll = nll[:n]
        st = SplitStats(prob=np.exp(-ans_nll))
        if at["pert"] is not None:
            pert_nll = nll[at["pert"]: at["pert"] + n * at["n_pert"]].reshape(n, at["n_pert"])
            correct_nll = nll[at["para"]: at["para"] + n] if at["para"] is not None else ans_nll
            wrong_prob = np.exp(-pert_nll.mean(axis=1))  # geometric mean of the wrong answers' p
            st.truth_ratio = wrong_prob / np.exp(-correct_nll)
            st.normalised = st.prob / (st.prob + np.exp(-pert_nll).sum(axis=1))
        elif split != "holdout":
            log.warning("%s: no perturbed answers in the data, truth ratio skipped", split)
        if generations is not None:
            st.generations = generations
            st.rouge = self.rouge_recall([r["answer"] for r in rows], generations)
            st.distinct_bigrams = np.array([distinct_bigram_share(g) for g in generations])
        return st

    def _wants_rouge(self, split: str, with_rouge: bool | None = None) -> bool:
        return with_rouge if with_rouge is not None else (self.rouge and split != "holdout")

    def split_stats(self, model, rows, split: str, with_rouge: bool | None = None,
                    generations: list[str] | None = None) -> SplitStats:
        """One split's per-example numbers (its prompts run once for scoring and generation)."""
        rows = list(rows)
        pairs, at = self._layout(rows, split)
        gen_qs = [r["question"] for r in rows] if self._wants_rouge(split, with_rouge) and generations is None else []
        nll, text = qa_pass_sharded(model, self.fmt, pairs, gen_qs, self.batch_size, self.max_new_tokens, self.shard)
        if gen_qs:
            generations = [text[q] for q in gen_qs]
        return self._stats(rows, split, nll, at, generations if self._wants_rouge(split, with_rouge) else None)

    # -- the suite --------------------------------------------------------------------------
    def evaluate(self, model, bench, oracle_forget_tr: np.ndarray | str | None = None,
                 splits=QA_SPLITS) -> tuple[dict, dict]:
        """-> (metrics: name -> value, per-split SplitStats). ``oracle_forget_tr``: the retain
        oracle's per-example forget truth ratios, or "self" when ``model`` is the oracle.

        Every split's answers and greedy generations come from one ``scoring.qa_pass``: each prompt
        runs once, for its answer variants and its generation alike, in batches across splits."""
        metrics: dict[str, float] = {}
        per: dict[str, SplitStats] = {}
        present = [s for s in splits if s in bench]
        rows = {s: list(bench[s]) for s in present}
        layouts, pairs, gen_qs = {}, [], []
        for s in present:
            p, at = self._layout(rows[s], s)
            layouts[s] = (len(pairs), at)
            pairs += p
            if self._wants_rouge(s):
                gen_qs += [r["question"] for r in rows[s]]
        t0 = time.time()
        nll, text = qa_pass_sharded(model, self.fmt, pairs, gen_qs, self.batch_size, self.max_new_tokens, self.shard)
        log.info("scored %d answers and generated %d in %.1fs", len(pairs), len(gen_qs), time.time() - t0)
        for split in present:
            start, at = layouts[split]
            gens = [text[r["question"]] for r in rows[split]] if self._wants_rouge(split) else None
            st = per[split] = self._stats(rows[split], split, nll[start:], at, gens)
            pre = PREFIX[split]
            metrics[f"{pre}_Q_A_Prob"] = float(st.prob.mean())
            if st.rouge is not None:
                metrics[f"{pre}_Q_A_ROUGE"] = float(st.rouge.mean())
                metrics[f"{pre}_Q_A_distinct_bigrams"] = float(st.distinct_bigrams.mean())
                if split == "forget" and self.gibberish is not None:
                    st.gibberish = classifier_prob(st.generations, *self.gibberish,
                                                   max_length=GIBBERISH_MAX_LENGTH["tofu"], class_id=GIBBERISH_CLASS)
                    metrics["forget_Q_A_gibberish"] = float(st.gibberish.mean())
            if st.truth_ratio is not None:
                name = "forget_truth_ratio" if split == "forget" else f"{pre}_Truth_Ratio"
                metrics[name] = truth_ratio_aggregate(st.truth_ratio, split)
                if split in ("real_authors", "world_facts"):
                    metrics[f"{pre}_Q_A_Prob_normalised"] = float(st.normalised.mean())
        ref = oracle_forget_tr if isinstance(oracle_forget_tr, OracleReference) else None
        if ref is not None:
            oracle_forget_tr = ref.truth_ratio
        if self.catalogue and "forget" in per and "holdout" in per:
            metrics.update(self.catalogue_metrics(model, rows, per, "self" if isinstance(oracle_forget_tr, str) else ref))
        if "forget" in per and per["forget"].truth_ratio is not None:
            if isinstance(oracle_forget_tr, str) and oracle_forget_tr == "self":  # the oracle itself
                metrics["forget_quality"] = forget_quality(per["forget"].truth_ratio, per["forget"].truth_ratio)
            elif oracle_forget_tr is not None:
                metrics["forget_quality"] = forget_quality(per["forget"].truth_ratio, oracle_forget_tr)
            else:
                log.warning("forget_quality skipped: no retain oracle truth ratios given")
        missing = [m for m in UTILITY_METRICS if m not in metrics]
        if missing:
            log.warning("model_utility skipped: missing %s", ", ".join(missing))
        else:
            metrics["model_utility"] = float(stats.hmean([metrics[m] for m in UTILITY_METRICS]))
        return metrics, per


    def catalogue_metrics(self, model, rows: dict, per: dict, ref) -> dict:
        """The membership attacks (forget = label 0, holdout = label 1), privleak and memorization;
        ``ref``: the retain oracle's ``OracleReference``, "self" for the oracle, or None."""
        import torch

        scores, mem = {}, []
        for split in ("forget", "holdout"):
            pairs = [(r["question"], r["answer"]) for r in rows[split]]
            details = per_item_sharded(lambda ps: qa_token_details(model, self.fmt, ps, self.batch_size), pairs,
                                       self.shard)
            det = [mia.TokenDetail(**d) for d in details]
            with torch.enable_grad():  # one example at a time: each process takes its share
                gn = per_item_sharded(lambda items: qa_gradnorms(model, self.fmt, [p for p, _ in items],
                                                                 [n for _, n in items]),
                                      list(zip(pairs, [d.n_core for d in det])), self.shard)
            ref_nll = None
            if ref == "self":
                ref_nll = [d.mean_nll for d in det]
            elif ref is not None:
                saved = ref.forget_nll if split == "forget" else ref.holdout_nll
                if saved is not None and len(saved) == len(det):
                    ref_nll = list(saved)
            per_ex = [mia.example_scores(d, a, g, None if ref_nll is None else ref_nll[i])
                      for i, (d, (_, a), g) in enumerate(zip(det, pairs, gn))]
            scores[split] = {k: np.array([e[k] for e in per_ex]) for k in per_ex[0]} if per_ex else {}
            per[split].mia = scores[split]
            if split == "forget":
                mem = [mia.memorization(d) for d in det]
        out = {}
        for name in mia.ATTACKS:
            if name in scores["forget"] and name in scores["holdout"]:
                out[name] = mia.auc(scores["forget"][name], scores["holdout"][name])
            elif name == "mia_reference":
                log.warning("mia_reference skipped: no retain-oracle answer NLLs for these rows")
        if ref == "self":
            auc_r = out["mia_min_k"]
        elif ref is not None and ref.min_k_auc is not None:
            auc_r = ref.min_k_auc
        else:
            auc_r = mia.NO_ORACLE_AUC
            log.warning("privleak: no retain oracle Min-K AUC, using %.1f (open-unlearning's ref_value)", auc_r)
        out["privleak"] = mia.privleak(out["mia_min_k"], auc_r)
        for name in mia.MEMORIZATION:
            vals = [m[name] for m in mem if not np.isnan(m[name])]
            out[name] = float(np.mean(vals)) if vals else float("nan")
        return out


SPLITS = QA_SPLITS  # data.benchmarks: the QA benchmarks' evaluation splits


class TofuSuite:
    """What the sweep needs to know about the TOFU metrics (see ``metrics.suite_for``)."""

    reference_metric = "forget_quality"

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def splits(self, compression: str) -> tuple[str, ...]:
        # holdout (authors never trained on) is a property of the training data: uncompressed only, unless
        # the membership attacks need it (forget vs holdout) in every column
        if compression == "none" or self.cfg["eval"]["catalogue"]:
            return SPLITS
        return tuple(x for x in SPLITS if x != "holdout")

    @staticmethod
    def load_reference(path) -> OracleReference | None:
        """The oracle's numbers saved with a cell's per-example stats (None without forget truth ratios)."""
        from .stats import load_stats

        saved = load_stats(path)
        if saved is None:
            return None
        tr = saved.get("forget", {}).get("truth_ratio")
        if tr is None or len(tr) == 0:
            return None

        def nll(split):
            p = saved.get(split, {}).get("prob")
            return -np.log(np.array(p)) if p is not None else None

        f_mia, h_mia = (saved.get(s, {}).get("mia") or {} for s in ("forget", "holdout"))
        k = mia.auc(f_mia["mia_min_k"], h_mia["mia_min_k"]) if "mia_min_k" in f_mia and "mia_min_k" in h_mia else None
        return OracleReference(np.array(tr), nll("forget"), nll("holdout"), k)

    def evaluator(self, tok) -> Evaluator:
        e = self.cfg["eval"]
        ev = Evaluator(formatter_for(tok, self.cfg), e["batch_size"], e["max_new_tokens"], e["rouge"], e["catalogue"])
        ev.gibberish = gibberish_classifier(self.cfg)
        from accelerate.state import PartialState

        state = PartialState()
        if state.num_processes > 1:  # under accelerate launch each process scores a share of the prompts
            ev.shard = (state.process_index, state.num_processes)
        return ev
