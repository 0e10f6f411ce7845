"""The reference model under DeepSpeed ZeRO-3: a whole fp32 copy per process (``runtime.zero3_reference:
full``) against a partitioned ZeRO-3 inference engine (``partitioned``, the default), on 2 processes.

    python evals/zero3_reference.py --target DIR [--method NPO] [--steps 4] [--processes 2]

Each setting is one ``accelerate launch --config_file recipes/accelerate/zero3.yaml -m robust_unlearn
unlearn`` run (gloo on the CPU, NCCL on GPUs) of ``--method`` (one with a reference: NPO, NPO_KLR, RMU,
...) for ``--steps`` steps, batch 4. Every process logs the bytes it holds of the reference (its
partition, or the whole model) and its peak resident memory; the checkpoint's metadata gives the training
time. Prints both rows and the ratios partitioned / full.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"process (\d+) holds ([\d.]+) MiB of the ([\d.]+) MiB reference \(([^)]*\)?)\); "
                  r"peak resident memory (\d+) MiB")


def run(args, kind: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / "zero3.yaml"), "--num_processes", str(args.processes),
           "-m", "robust_unlearn", "-v", "unlearn", *args.overrides, f"runtime.zero3_reference={kind}",
           "unlearn.batch_size=4", f"unlearn.steps={args.steps}", f"unlearn.per_method.{args.method}.steps={args.steps}",
           "unlearn.stop_forget_prob=null", f"unlearn.per_method.{args.method}.stop_forget_prob=null",
           "--target", args.target, "--methods", args.method, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{kind}: the run failed:\n{res.stderr[-4000:]}")
    procs = {int(m.group(1)): {"held_MiB": float(m.group(2)), "whole_MiB": float(m.group(3)), "kind": m.group(4),
                               "peak_rss_MiB": int(m.group(5))} for m in LINE.finditer(res.stderr)}
    if len(procs) != args.processes:
        sys.exit(f"{kind}: expected one reference line per process, found {len(procs)}:\n{res.stderr[-3000:]}")
    (ckpt,) = [p for p in (out / "checkpoints").glob(f"{args.method}-*") if (p / "config.json").is_file()]
    meta = json.loads((ckpt / "robust_unlearn.json").read_text())
    return {"setting": kind, "processes": procs, "train_seconds": meta["train_seconds"], "steps": meta["steps"],
            "reference": meta["reference"], "final_loss": meta["final_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="the target checkpoint")
    ap.add_argument("--method", default="NPO")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="recipe overrides (e.g. the recipe's data keys)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("full", "partitioned"):
            rows.append(run(args, kind, Path(tmp) / kind))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.method}, {args.steps} steps, ZeRO-3 on {args.processes} processes, target {args.target}\n")
    print("| zero3_reference | reference held per process, MiB (of the whole) | peak resident per process, MiB | "
          "train seconds | final loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        p = r["processes"]
        held = ", ".join("%.1f" % p[i]["held_MiB"] for i in sorted(p))
        rss = ", ".join(str(p[i]["peak_rss_MiB"]) for i in sorted(p))
        print(f"| {r['setting']} | {held} (of {p[0]['whole_MiB']:.1f}) | {rss} | {r['train_seconds']} | "
              f"{r['final_loss']:.6f} |")
    full, part = rows
    ratio = max(part["processes"][i]["held_MiB"] for i in part["processes"]) / \
        max(full["processes"][i]["held_MiB"] for i in full["processes"])
    rss = max(part["processes"][i]["peak_rss_MiB"] for i in part["processes"]) / \
        max(full["processes"][i]["peak_rss_MiB"] for i in full["processes"])
    print(f"\npartitioned / full: reference held {ratio:.3f}, peak resident {rss:.3f}, "
          f"time {part['train_seconds'] / full['train_seconds']:.2f}")


if __name__ == "__main__":
    main()
