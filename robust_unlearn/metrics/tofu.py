"""TOFU metrics (Maini et al. 2024), with the definitions of open-unlearning's evaluator.

Per QA pair, ``nll`` = mean token NLL of an answer given the question (question tokens masked),
``p = exp(-nll)``.
- ``{split}_Q_A_Prob``: mean over pairs of p(answer).
- ``{split}_Q_A_Prob_normalised`` (real authors, world facts): p(ans) / (p(ans) + sum p(wrong)).
- ``{split}_Q_A_ROUGE``: ROUGE-L recall (rouge_score, stemmer on) of the greedy answer (up to
  ``max_new_tokens``) against the reference answer.
- truth ratio ``tr = exp(-mean_k nll(wrong_k)) / p(correct)``, where correct = the paraphrased
  answer (forget, retain) or the answer itself (real authors, world facts, which have no paraphrase).
  ``forget_truth_ratio`` = mean(min(tr, 1/tr)); ``{retain,ra,wf}_Truth_Ratio`` = mean(max(0, 1 - tr)).
- ``forget_quality``: KS two-sample p-value between 1/tr of the model and of the retain oracle on
  the forget set (scipy.stats.ks_2samp).
- ``model_utility``: harmonic mean of retain_Q_A_Prob, retain_Q_A_ROUGE, retain_Truth_Ratio,
  ra_Q_A_Prob_normalised, ra_Q_A_ROUGE, ra_Truth_Ratio, wf_Q_A_Prob_normalised, wf_Q_A_ROUGE,
  wf_Truth_Ratio; skipped (with a warning) when one of them could not be computed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from ..data.benchmarks import QA_SPLITS
from ..data.collate import QAFormatter, collate_prompts, formatter_for
from ..scoring import shared_prompt_nll

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
    generations: list[str] = field(default_factory=list)


def forget_quality(model_tr: np.ndarray, oracle_tr: np.ndarray) -> float:
    return float(stats.ks_2samp(1.0 / model_tr, 1.0 / oracle_tr).pvalue)


def truth_ratio_aggregate(tr: np.ndarray, split: str) -> float:
    if split == "forget":
        return float(np.mean(np.minimum(tr, 1.0 / tr)))
    return float(np.mean(np.maximum(0.0, 1.0 - tr)))


class Evaluator:
    def __init__(self, formatter: QAFormatter, batch_size: int = 32, max_new_tokens: int = 200, rouge: bool = True):
        self.fmt = formatter
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.rouge = rouge
        self._scorer = None

    # -- batched model passes -------------------------------------------------------------
    @torch.no_grad()
    def mean_nll(self, model, pairs: list[tuple[str, str]], desc: str = "score") -> np.ndarray:
        """Mean token NLL of each (question, answer). Pairs with the same question share one pass
        over the prompt (``scoring.shared_prompt_nll``); batches hold about ``batch_size`` answers
        of questions of similar length."""
        groups: dict[str, list[int]] = {}
        for i, (q, _) in enumerate(pairs):
            groups.setdefault(q, []).append(i)
        questions = sorted(groups, key=lambda q: len(self.fmt.prompt_ids(q)))
        out = np.zeros(len(pairs), dtype=np.float64)
        batches, cur, size = [], [], 0
        for q in questions:
            if cur and size + len(groups[q]) > self.batch_size:
                batches.append(cur)
                cur, size = [], 0
            cur.append(q)
            size += len(groups[q])
        if cur:
            batches.append(cur)
        for qs in tqdm(batches, desc=desc, leave=False, disable=len(batches) < 4):
            prompts = [self.fmt.prompt_ids(q) for q in qs]
            room = [max(1, self.fmt.max_length - len(p)) for p in prompts]
            answers = [[self.fmt.answer_ids(pairs[i][1])[:r] for i in groups[q]] for q, r in zip(qs, room)]
            res = shared_prompt_nll(model, prompts, answers, self.fmt.pad_id)
            for q, group in zip(qs, res):
                for i, (total, count) in zip(groups[q], group):
                    out[i] = total / max(count, 1)
        return out

    @torch.no_grad()
    def generate(self, model, questions: list[str], desc: str = "generate", batch_size: int | None = None) -> list[str]:
        """Greedy answers (up to ``max_new_tokens``, stopping at end-of-turn / EOS)."""
        batch_size = batch_size or self.batch_size
        prompts = [self.fmt.prompt_ids(q) for q in questions]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [""] * len(prompts)
        device = next(model.parameters()).device
        starts = range(0, len(order), batch_size)
        for s in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 2):
            idx = order[s: s + batch_size]
            batch = {k: v.to(device) for k, v in collate_prompts([prompts[i] for i in idx], self.fmt.pad_id).items()}
            gen = model.generate(**batch, do_sample=False, max_new_tokens=self.max_new_tokens,
                                 eos_token_id=self.fmt.stop_token_ids, pad_token_id=self.fmt.pad_id,
                                 temperature=None, top_p=None, top_k=None)
            new = gen[:, batch["input_ids"].shape[1]:]
            for j, i in enumerate(idx):
                out[i] = self.fmt.tok.decode(new[j], skip_special_tokens=True).strip()
        return out

    def rouge_recall(self, references: list[str], generations: list[str]) -> np.ndarray:
        if self._scorer is None:
            from rouge_score import rouge_scorer

            self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return np.array([self._scorer.score(ref, gen)["rougeL"].recall for ref, gen in zip(references, generations)])

    # -- one split --------------------------------------------------------------------------
    def split_stats(self, model, rows, split: str, with_rouge: bool | None = None,
                    generations: list[str] | None = None) -> SplitStats:
        rows = list(rows)
        qs = [r["question"] for r in rows]
        # holdout (never-trained authors) only needs the answer probability
        has_pert = split != "holdout" and all(r["perturbed_answer"] for r in rows)
        has_para = all(r["paraphrased_answer"] for r in rows)
        # One scoring pass over every answer variant of the split.
        pairs = [(q, r["answer"]) for q, r in zip(qs, rows)]
        para_at = pert_at = None
        if has_pert and has_para:
            para_at = len(pairs)
            pairs += [(q, r["paraphrased_answer"]) for q, r in zip(qs, rows)]
        if has_pert:
            pert_at = len(pairs)
            n_pert = min(len(r["perturbed_answer"]) for r in rows)
            pairs += [(q, p) for q, r in zip(qs, rows) for p in r["perturbed_answer"][:n_pert]]
        t0 = time.time()
        nll = self.mean_nll(model, pairs, desc=f"score {split}")
        log.info("%s: scored %d answers in %.1fs", split, len(pairs), time.time() - t0)
        n = len(rows)
        ans_nll = nll[:n]
        st = SplitStats(prob=np.exp(-ans_nll))
        if has_pert:
            pert_nll = nll[pert_at: pert_at + n * n_pert].reshape(n, n_pert)
            correct_nll = nll[para_at: para_at + n] if para_at is not None else ans_nll
            wrong_prob = np.exp(-pert_nll.mean(axis=1))  # geometric mean of the wrong answers' p
            st.truth_ratio = wrong_prob / np.exp(-correct_nll)
            st.normalised = st.prob / (st.prob + np.exp(-pert_nll).sum(axis=1))
        elif split != "holdout":
            log.warning("%s: no perturbed answers in the data, truth ratio skipped", split)
        if with_rouge if with_rouge is not None else (self.rouge and split != "holdout"):
            st.generations = generations if generations is not None else self.generate(model, qs, f"generate {split}")
            st.rouge = self.rouge_recall([r["answer"] for r in rows], st.generations)
        return st

    # -- the suite --------------------------------------------------------------------------
    def evaluate(self, model, bench, oracle_forget_tr: np.ndarray | str | None = None,
                 splits=QA_SPLITS) -> tuple[dict, dict]:
        """-> (metrics: name -> value, per-split SplitStats). ``oracle_forget_tr``: the retain
        oracle's per-example forget truth ratios, or "self" when ``model`` is the oracle."""
        metrics: dict[str, float] = {}
        per: dict[str, SplitStats] = {}
        # every split's greedy answers in one batched generation (fewer, fuller decoding steps)
        gen_splits = [s for s in splits if s in bench and self.rouge and s != "holdout"]
        questions = [r["question"] for s in gen_splits for r in bench[s]]
        t0 = time.time()
        generated = self.generate(model, questions, batch_size=2 * self.batch_size) if questions else []
        log.info("generated %d answers in %.1fs", len(questions), time.time() - t0)
        gens, at = {}, 0
        for s in gen_splits:
            gens[s] = generated[at: at + len(bench[s])]
            at += len(bench[s])
        for split in splits:
            if split not in bench:
                continue
            t0 = time.time()
            st = per[split] = self.split_stats(model, bench[split], split, generations=gens.get(split))
            log.info("%s: %d rows evaluated in %.1fs", split, len(bench[split]), time.time() - t0)
            pre = PREFIX[split]
            metrics[f"{pre}_Q_A_Prob"] = float(st.prob.mean())
            if st.rouge is not None:
                metrics[f"{pre}_Q_A_ROUGE"] = float(st.rouge.mean())
            if st.truth_ratio is not None:
                name = "forget_truth_ratio" if split == "forget" else f"{pre}_Truth_Ratio"
                metrics[name] = truth_ratio_aggregate(st.truth_ratio, split)
                if split in ("real_authors", "world_facts"):
                    metrics[f"{pre}_Q_A_Prob_normalised"] = float(st.normalised.mean())
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


SPLITS = QA_SPLITS  # data.benchmarks: the QA benchmarks' evaluation splits


class TofuSuite:
    """What the sweep needs to know about the TOFU metrics (see ``metrics.suite_for``)."""

    reference_metric = "forget_quality"

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def splits(self, compression: str) -> tuple[str, ...]:
        # holdout (authors never trained on) is a property of the training data: uncompressed only
        return SPLITS if compression == "none" else tuple(x for x in SPLITS if x != "holdout")

    @staticmethod
    def load_reference(path) -> np.ndarray | None:
        """The forget truth ratios saved with a cell's per-example stats."""
        from .stats import load_stats

        saved = load_stats(path)
        tr = None if saved is None else saved.get("forget", {}).get("truth_ratio")
        return np.array(tr) if tr is not None else None

    def evaluator(self, tok) -> Evaluator:
        e = self.cfg["eval"]
        return Evaluator(formatter_for(tok, self.cfg), e["batch_size"], e["max_new_tokens"], e["rouge"])
