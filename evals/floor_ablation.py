"""Where does the quantization-bin floor matter? (issue 12) Robust_GradDiff on the cached default target
of the built-in benchmark, over a grid of lr x precision x floor on/off x pruning-awareness on/off,
each checkpoint measured under every column (forget and retain answer probability):

    python evals/floor_ablation.py                                   # the whole grid (24 runs)
    python evals/floor_ablation.py --lrs 2e-4 --precisions bf16      # a slice of it
    python evals/floor_ablation.py table                             # the table of every record
    python evals/floor_ablation.py extend --columns gptq4-g64        # add columns to every record's checkpoint

Everything else is the shipped default (30 epochs over the forget set, stop at the retain oracle's
forget probability, top 3% by |grad x w|, floor every 4 steps). Records go to
evals/floor_ablation.jsonl (one JSON line per grid point; a point already there is not run again).
The target and oracle come from the run cache ($ROBUST_UNLEARN_CACHE), fine-tuned first if absent.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from robust_unlearn import pipeline
from robust_unlearn.compress import get_compression
from robust_unlearn.config import load_recipe
from robust_unlearn.data import load_benchmark
from robust_unlearn.data.collate import formatter_for
from robust_unlearn.models import load_model, read_metadata
from robust_unlearn.scoring import qa_mean_nll
from robust_unlearn.unlearn import Reference, StopLevels, unlearn

HERE = Path(__file__).resolve().parent
METHOD = "Robust_GradDiff"
P = f"unlearn.per_method.{METHOD}"


def point_overrides(lr: str, precision: str, floor: str, prune_aware: str) -> list[str]:
    return [f"{P}.lr={lr}", f"{P}.precision={precision}",
            f"{P}.robust_floor={'[nf4]' if floor == 'on' else '[]'}",
            f"{P}.robust_prune_aware={0.3 if prune_aware == 'on' else 0}"]


def records(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []


def table(log: Path) -> None:
    recs = records(log)
    cols = list(dict.fromkeys(c for r in recs for c in r["probs"]))
    print("| lr | precision | floor | prune-aware | steps | stop at | mask (weights) | dw / NF4 bin | forget: "
          + " / ".join(cols) + " | worst - none | retain: none |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in recs:
        g, p = r["grid"], r["probs"]
        worst = max(p[c][0] for c in cols if c != "none" and c in p)
        print(f"| {g['lr']} | {g['precision']} | {g['floor']} | {g['prune_aware']} | {r['steps']} | "
              f"{r['stop_level']:.3f} | {r['updated']} | {r['dw_over_nf4_bin']:.3f} | "
              + " / ".join(f"{p[c][0]:.3f}" if c in p else "-" for c in cols)
              + f" | {worst - p['none'][0]:+.3f} | {p['none'][1]:.3f} |")


def measure(cfg, bench, model, tok, ckpt: Path, columns: list[str], out: Path) -> dict:
    """Forget and retain answer probability of ``model`` under each column (GPTQ / AWQ calibrated on
    the recipe's ``sweep.calibration``, their checkpoints cached in OUT/compressed)."""
    from robust_unlearn.compress import needs_calibration
    from robust_unlearn.data import calibration_samples
    from robust_unlearn.quant.calibrated import Calibration

    fmt = formatter_for(tok, cfg)
    probs = {}
    for col in columns:
        ctx = None
        if needs_calibration(col):
            samples, source = calibration_samples(cfg, bench, tok)
            c = cfg["sweep"]["calibration"]
            ctx = Calibration.of(c, samples, source, cache_dir=out / "compressed", ckpt=ckpt.name)
        m = get_compression(col, ctx)(copy.deepcopy(model))
        probs[col] = [float(np.exp(-qa_mean_nll(m, fmt, [(r["question"], r["answer"]) for r in bench[s]],
                                                 cfg["eval"]["batch_size"])).mean()) for s in ("forget", "retain")]
        del m
    return probs


def extend(log: Path, cfg, bench, columns: list[str], out: Path) -> None:
    """Measure every record's checkpoint under the columns it lacks; the log is rewritten whole."""
    recs = records(log)
    for r in recs:
        todo = [c for c in columns if c not in r["probs"]]
        if not todo or not Path(r["checkpoint"]).is_dir():
            continue
        model, tok = load_model(r["checkpoint"])
        r["probs"].update(measure(cfg, bench, model, tok, Path(r["checkpoint"]), todo, out))
        tmp = log.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(x) + "\n" for x in recs))
        tmp.replace(log)
        print(json.dumps({"grid": r["grid"], "probs": {c: r["probs"][c] for c in todo}}), flush=True)
    table(log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", default="run", choices=("run", "table", "extend"))
    ap.add_argument("overrides", nargs="*", help="recipe overrides (dotted key=value)")
    ap.add_argument("--lrs", default="2e-4,5e-4,2e-3")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--floor", default="on,off")
    ap.add_argument("--prune-aware", default="on,off")
    ap.add_argument("--columns", default="none,nf4,rtn4,prune30")
    ap.add_argument("--out", default="/tmp/ru_floor_ablation")
    ap.add_argument("--log", default=str(HERE / "floor_ablation.jsonl"))
    args = ap.parse_args()
    log = Path(args.log)
    if args.what == "table":
        return table(log)
    cfg0 = load_recipe(None, args.overrides)
    bench = load_benchmark(cfg0)
    if args.what == "extend":
        return extend(log, cfg0, bench, args.columns.split(","), Path(args.out))
    target, key = pipeline.target_checkpoint(cfg0, bench)
    oracle, _ = pipeline.oracle_checkpoint(cfg0, bench)
    done = {json.dumps(r["grid"], sort_keys=True) for r in records(log)}
    grid = itertools.product(args.lrs.split(","), args.precisions.split(","), args.floor.split(","),
                             args.prune_aware.split(","))
    levels = None
    for lr, precision, floor, prune_aware in grid:
        g = {"lr": lr, "precision": precision, "floor": floor, "prune_aware": prune_aware}
        if json.dumps(g, sort_keys=True) in done:
            continue
        over = point_overrides(lr, precision, floor, prune_aware)
        cfg = load_recipe(None, args.overrides + over)
        levels = levels or StopLevels(cfg, bench, target, oracle)
        t0 = time.time()
        ckpt = unlearn(cfg, bench, target, key, METHOD, Path(args.out), Reference(target), levels)
        meta = read_metadata(ckpt)
        model, tok = load_model(str(ckpt))
        probs = measure(cfg, bench, model, tok, Path(ckpt), args.columns.split(","), Path(args.out))
        rec = {"grid": g, "overrides": over, "steps": meta["steps"], "stop_level": meta["stop_level"]["forget_prob"],
               "updated": meta.get("plan", {}).get("updated_params"),
               "dw_over_nf4_bin": meta["update"].get("mean_dw_over_nf4_bin", 0.0), "update": meta["update"],
               "probs": probs, "seconds": round(time.time() - t0, 1), "checkpoint": str(ckpt)}
        with open(log, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps({"grid": g, "steps": rec["steps"], "probs": probs}), flush=True)
    table(log)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
