"""Calibrate an unlearning regime on the built-in benchmark: unlearn the cached default target with
one method and recipe overrides, then measure forget / retain answer probability in full precision
and under compression, plus the update size in NF4 bins.

    python evals/baseline_regimes.py GradDiff unlearn.lr=1e-5 unlearn.steps=40 [--utility] [--compress none,nf4,prune20,prune30]

Prints one Markdown table row and appends the full record to evals/baseline_regimes.jsonl
(the table in evals/README.md is built from those records). Uses the run cache
($ROBUST_UNLEARN_CACHE): the target is fine-tuned first if it is not there.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from robust_unlearn import pipeline
from robust_unlearn.compress import get_compression
from robust_unlearn.config import cache_dir, load_recipe, method_settings
from robust_unlearn.data import load_benchmark, target_texts
from robust_unlearn.data.collate import formatter_for
from robust_unlearn.metrics.tofu import Evaluator
from robust_unlearn.models import load_model, read_metadata, resolve_base
from robust_unlearn.unlearn import Reference, unlearn

HERE = Path(__file__).resolve().parent


def table() -> None:
    """The Markdown table of every record in baseline_regimes.jsonl."""
    print("| method | precision | lr | steps | alpha | other | mean abs dw | dw / NF4 bin | weights changed | "
          "forget: none / nf4 / prune20 / prune30 | retain: none / nf4 / prune20 / prune30 | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for line in (HERE / "baseline_regimes.jsonl").read_text().splitlines():
        r = json.loads(line)
        st, u, p = r["settings"], r["update"], r["probs"]
        cols = [c for c in ("none", "nf4", "prune20", "prune30") if c in p]
        other = []
        if r["method"] == "RMU":
            other = [f"c={st['rmu_steering']:g}", "down_proj" if "down_proj" in st["rmu_params"] else
                     ("MLPs 0-7" if "[0-7]" in st["rmu_params"] else "MLPs 5-7")]
        other += [f"stop<={st['stop_forget_prob']:g}/{st['stop_every']}"] if st.get("stop_forget_prob") else []
        print(f"| {r['method']} | {st['precision']} | {st['lr']:g} | {r['steps']} | {st['alpha']:g} | {' '.join(other)} | "
              f"{u.get('mean_abs_dw', 0):.2e} | {u.get('mean_dw_over_nf4_bin', 0):.4f} | {u.get('frac_changed', 0):.3f} | "
              + " / ".join(f"{p[c][0]:.3f}" for c in cols) + " | " + " / ".join(f"{p[c][1]:.3f}" for c in cols)
              + f" | {r['seconds']:.0f} |")


def wide_table(path: Path) -> None:
    """Markdown table of robust-unlearning records: forget probability under every column + utility."""
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    cols = []
    for r in recs:
        cols += [c for c in r["probs"] if c not in cols]
    print("| method | overrides | steps | updated weights | dw / NF4 bin | forget: " + " / ".join(cols)
          + " | retain: none | utility |")
    print("|---|---|---|---|---|---|---|---|")
    for r in recs:
        p, u = r["probs"], r.get("model_utility")
        upd = r.get("plan", {}).get("updated_params", r["update"].get("frac_changed", 0))
        print(f"| {r['method']} | {' '.join(o.replace('unlearn.', '') for o in r['overrides'])} | {r['steps']} | {upd} | "
              f"{r['update'].get('mean_dw_over_nf4_bin', 0):.4f} | "
              + " / ".join(f"{p[c][0]:.3f}" if c in p else "-" for c in cols)
              + f" | {p['none'][1]:.3f} | {'-' if u is None else f'{u:.3f}'} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method", help="an unlearning method, or 'table' to print the table of all records")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--compress", default="none,nf4,prune20,prune30")
    ap.add_argument("--utility", action="store_true", help="also the full TOFU suite in full precision (slow)")
    ap.add_argument("--out", default="/tmp/ru_calibration")
    ap.add_argument("--log", default=str(HERE / "baseline_regimes.jsonl"),
                    help="JSONL file the record is appended to (robust ablations: evals/robust_ablation.jsonl)")
    args = ap.parse_args()
    if args.method == "table":
        return table() if args.log.endswith("baseline_regimes.jsonl") else wide_table(Path(args.log))
    cfg = load_recipe(None, args.overrides)
    bench = load_benchmark(cfg)
    base = resolve_base(cfg["model"]["base"], cache_dir(cfg), target_texts(bench), cfg["seed"])
    target, key = pipeline.finetune_cached(cfg, bench, "target", base)
    t0 = time.time()
    ckpt = unlearn(cfg, bench, str(target), key, args.method, Path(args.out), Reference(str(target)))
    secs = time.time() - t0
    meta = read_metadata(ckpt)
    model, tok = load_model(str(ckpt))
    ev = Evaluator(formatter_for(tok, cfg), cfg["eval"]["batch_size"], cfg["eval"]["max_new_tokens"])
    res = {}
    for comp in args.compress.split(","):
        m = get_compression(comp)(copy.deepcopy(model))
        res[comp] = [float(np.exp(-ev.mean_nll(m, [(r["question"], r["answer"]) for r in bench[s]])).mean())
                     for s in ("forget", "retain")]
    util = None
    if args.utility:
        metrics, _ = ev.evaluate(model, bench)
        util = metrics.get("model_utility")
    rec = {"method": args.method, "overrides": args.overrides, "settings": method_settings(cfg, args.method),
           "steps": meta["steps"], "seconds": round(secs, 1), "update": meta["update"], "probs": res,
           "model_utility": util, "checkpoint": str(ckpt)}
    if meta.get("plan"):
        rec["plan"] = {k: v for k, v in meta["plan"].items() if k not in ("salient", "saliency_top")}
    with open(args.log, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    cols = " | ".join(f"{res[c][0]:.3f} / {res[c][1]:.3f}" for c in res)
    print(f"| {args.method} | {' '.join(args.overrides)} | {meta['steps']} | {secs:.0f}s | "
          f"{meta['update'].get('mean_dw_over_nf4_bin', 0):.4f} | {cols} | {util if util is None else round(util, 3)} |")
    print("columns (forget / retain):", ", ".join(res))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
