"""Evaluation speed, before and after, measured in one run: one checkpoint under each column, with
the evaluator as it was (each split scored on its own, the old ``scoring.shared_prompt_nll`` per batch of
about ``eval.batch_size`` answers, and every split's greedy answers from ``model.generate``) and as
it is (``metrics.tofu.Evaluator.evaluate``: one ``scoring.qa_pass`` in which each prompt is run once
for its answer variants and its greedy answer, and an answer that teacher forcing shows greedy
decoding would produce is not decoded). Prints seconds per cell, the ratio, and the largest
difference between the two evaluators' metrics.

    python evals/eval_speed.py [CKPT_DIR] [--columns none,nf4] [--repeat 1] [key=value ...]

Without CKPT_DIR it uses the recipe's cached target (fine-tuned first when the cache is empty).
Run it alone: two CPU-bound jobs on 2 cores slow each other down by far more than 2x.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from robust_unlearn.compress import get_compression
from robust_unlearn.config import load_recipe
from robust_unlearn.data import load_benchmark
from robust_unlearn.data.collate import collate_prompts
from robust_unlearn.metrics import suite_for
from robust_unlearn.metrics.tofu import PREFIX, SplitStats, forget_quality, truth_ratio_aggregate
from robust_unlearn.models import load_model
from robust_unlearn.data.collate import IGNORE


@torch.no_grad()
def legacy_shared_prompt_nll(model, prompts, answers, pad_id):
    """``scoring.shared_prompt_nll`` as it was before issue 11: one left-padded pass over the prompts,
    their cache reordered to the answers, one pass over all the answers."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    left = collate_prompts(prompts, pad_id)  # left-padded: every prompt ends at the last position
    ids, mask = left["input_ids"].to(device), left["attention_mask"].to(device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    first_logits = out.logits[:, -1].float()  # predicts each answer's first token
    owner = [i for i, group in enumerate(answers) for _ in group]
    flat = [a for group in answers for a in group]
    idx = torch.tensor(owner, device=device)
    cache = out.past_key_values
    cache.reorder_cache(idx)
    a_width = max(len(a) for a in flat)
    a_ids = torch.full((len(flat), a_width), pad_id, dtype=torch.long, device=device)
    a_mask = torch.zeros((len(flat), a_width), dtype=torch.long, device=device)
    for j, a in enumerate(flat):
        a_ids[j, : len(a)] = torch.tensor(a)
        a_mask[j, : len(a)] = 1
    a_pos = mask[idx].sum(1, keepdim=True) + torch.arange(a_width, device=device)
    logits = model(input_ids=a_ids, attention_mask=torch.cat([mask[idx], a_mask], 1), position_ids=a_pos,
                   past_key_values=cache, use_cache=True).logits.float()
    # position t of the answer predicts token t + 1; the prompt's last position predicts token 0
    logits = torch.cat([first_logits[idx].unsqueeze(1), logits[:, :-1]], 1)
    target = a_ids.masked_fill(a_mask == 0, IGNORE)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view(target.shape)
    sums, counts = (nll * a_mask).sum(1).tolist(), a_mask.sum(1).tolist()
    res, j = [], 0
    for group in answers:
        res.append([(sums[j + k], counts[j + k]) for k in range(len(group))])
        j += len(group)
    return res


class LegacyEvaluator:
    """The evaluator before issue 11 (its algorithm, on today's building blocks): split by split."""

    def __init__(self, ev):
        self.ev, self.fmt = ev, ev.fmt

    @torch.no_grad()
    def mean_nll(self, model, pairs):
        groups: dict[str, list[int]] = {}
        for i, (q, _) in enumerate(pairs):
            groups.setdefault(q, []).append(i)
        questions = sorted(groups, key=lambda q: len(self.fmt.prompt_ids(q)))
        out = np.zeros(len(pairs))
        batches, cur, size = [], [], 0
        for q in questions:
            if cur and size + len(groups[q]) > self.ev.batch_size:
                batches.append(cur)
                cur, size = [], 0
            cur.append(q)
            size += len(groups[q])
        if cur:
            batches.append(cur)
        for qs in batches:
            prompts = [self.fmt.prompt_ids(q) for q in qs]
            room = [max(1, self.fmt.max_length - len(p)) for p in prompts]
            answers = [[self.fmt.answer_ids(pairs[i][1])[:r] for i in groups[q]] for q, r in zip(qs, room)]
            for q, group in zip(qs, legacy_shared_prompt_nll(model, prompts, answers, self.fmt.pad_id)):
                for i, (total, count) in zip(groups[q], group):
                    out[i] = total / max(count, 1)
        return out

    @torch.no_grad()
    def generate(self, model, questions, batch_size):
        prompts = [self.fmt.prompt_ids(q) for q in questions]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [""] * len(prompts)
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            batch = collate_prompts([prompts[i] for i in idx], self.fmt.pad_id)
            gen = model.generate(**batch, do_sample=False, max_new_tokens=self.ev.max_new_tokens,
                                 eos_token_id=self.fmt.stop_token_ids, pad_token_id=self.fmt.pad_id,
                                 temperature=None, top_p=None, top_k=None)
            for j, i in enumerate(idx):
                out[i] = self.fmt.tok.decode(gen[j, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        return out

    def evaluate(self, model, bench, oracle_tr, splits):
        ev = self.ev
        present = [s for s in splits if s in bench]
        gen_splits = [s for s in present if ev._wants_rouge(s)]
        questions = [r["question"] for s in gen_splits for r in bench[s]]
        generated = self.generate(model, questions, 2 * ev.batch_size) if questions else []
        gens, at = {}, 0
        for s in gen_splits:
            gens[s], at = generated[at: at + len(bench[s])], at + len(bench[s])
        metrics = {}
        for s in present:
            rows = list(bench[s])
            pairs, lay = ev._layout(rows, s)
            st: SplitStats = ev._stats(rows, s, self.mean_nll(model, pairs), lay, gens.get(s))
            pre = PREFIX[s]
            metrics[f"{pre}_Q_A_Prob"] = float(st.prob.mean())
            if st.rouge is not None:
                metrics[f"{pre}_Q_A_ROUGE"] = float(st.rouge.mean())
            if st.truth_ratio is not None:
                metrics["forget_truth_ratio" if s == "forget" else f"{pre}_Truth_Ratio"] = truth_ratio_aggregate(st.truth_ratio, s)
                if s == "forget" and oracle_tr is not None:
                    metrics["forget_quality"] = forget_quality(st.truth_ratio, oracle_tr)
        return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", nargs="?")
    ap.add_argument("--columns", default="none,nf4")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.ckpt and "=" in args.ckpt:  # no checkpoint given, only overrides
        args.overrides.insert(0, args.ckpt)
        args.ckpt = None
    cfg = load_recipe(None, args.overrides)
    bench = load_benchmark(cfg)
    ckpt = args.ckpt
    if ckpt is None:
        from robust_unlearn.pipeline import target_checkpoint  # evals may drive the pipeline

        ckpt = target_checkpoint(cfg, bench)[0]
    model, tok = load_model(ckpt, "float32", cfg["model"]["trust_remote_code"])
    suite = suite_for(cfg)
    new = suite.evaluator(tok)
    old = LegacyEvaluator(suite.evaluator(tok))
    print(f"checkpoint {ckpt}; eval.batch_size {cfg['eval']['batch_size']}, max_new_tokens {cfg['eval']['max_new_tokens']}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'column':>10} {'before s':>9} {'after s':>8} {'ratio':>6} {'max |diff|':>11}")
    totals = [0.0, 0.0]
    for col in args.columns.split(","):
        m = model if col == "none" else get_compression(col)(copy.deepcopy(model))
        m.eval()
        splits = suite.splits(col)
        tr = new.evaluate(m, bench, None, splits)[1]["forget"].truth_ratio  # warm-up; a reference for forget_quality
        t_old = t_new = 0.0
        for _ in range(args.repeat):
            t0 = time.time()
            a = old.evaluate(m, bench, tr, splits)
            t_old += time.time() - t0
            t0 = time.time()
            b, _ = new.evaluate(m, bench, tr, splits)
            t_new += time.time() - t0
        t_old, t_new = t_old / args.repeat, t_new / args.repeat
        totals[0] += t_old
        totals[1] += t_new
        diff = max(abs(a[k] - b[k]) for k in a)
        print(f"{col:>10} {t_old:9.1f} {t_new:8.1f} {t_old / t_new:6.2f} {diff:11.2e}")
    print(f"{'all':>10} {totals[0]:9.1f} {totals[1]:8.1f} {totals[0] / totals[1]:6.2f}")


if __name__ == "__main__":
    main()
