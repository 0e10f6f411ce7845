"""GPTQ / AWQ columns of a run directory, measured after its sweep (issue 13), from the compressed
checkpoints the sweep cached in RUN_DIR/compressed (nothing is quantized again):

1. Held-out NLL of the target: fp32, RTN at the same group size (``rtn4-g<G>``, computed here), GPTQ and
   AWQ (the compressed-tensors checkpoints loaded back in fp32). Held out = the splits calibration never
   saw (holdout, real_authors, world_facts): mean answer-token NLL per question, averaged.
2. How often the robust update's weights change their GPTQ / AWQ code: for each unlearned checkpoint,
   among the weights that differ from the target's (fp32 checkpoints), the fraction whose stored int4
   code differs between the checkpoint's compressed copy and the target's. The floor cannot guarantee
   these (the scales and codes depend on calibration and error feedback): this is the measurement.

    python evals/calibrated_columns.py RUN_DIR [--group 64]
"""
import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from robust_unlearn.compress import compressible_linears, get_compression
from robust_unlearn.config import load_recipe
from robust_unlearn.data import load_benchmark
from robust_unlearn.data.collate import formatter_for
from robust_unlearn.ids import ckpt_id
from robust_unlearn.models import load_model
from robust_unlearn.quant.calibrated import checkpoint_codes, load_dequantized
from robust_unlearn.scoring import qa_pass

HELD_OUT = ("holdout", "real_authors", "world_facts")


def cached(run: Path, label: str, path: str, fmt: str) -> Path | None:
    hits = sorted((run / "compressed").glob(f"{label}-{ckpt_id(path)}-{fmt}-*"))
    return hits[0] if hits else None


def held_out_nll(model, fmt, bench, batch: int) -> float:
    pairs = [(r["question"], r["answer"]) for s in HELD_OUT if s in bench for r in bench[s]]
    nll, _ = qa_pass(model, fmt, pairs, [], batch)
    return float(np.mean(nll))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--group", type=int, default=64)
    a = ap.parse_args()
    run = Path(a.run_dir)
    info = json.loads((run / "run.json").read_text())
    cfg = load_recipe(str(run / "recipe.yaml"), [])
    bench = load_benchmark(cfg)
    models = info["models"]
    g = a.group
    target = models["target"]
    model, tok = load_model(target)
    fmt = formatter_for(tok, cfg)
    n_pairs = sum(len(bench[s]) for s in HELD_OUT if s in bench)
    print(f"held-out NLL of the target ({n_pairs} questions of {', '.join(s for s in HELD_OUT if s in bench)}):")
    print("| model | NLL | vs fp32 |\n|---|---|---|")
    base = held_out_nll(model, fmt, bench, cfg["eval"]["batch_size"])
    print(f"| target fp32 | {base:.4f} | |")
    rows = [(f"rtn4-g{g}", get_compression(f"rtn4-g{g}")(copy.deepcopy(model)))]
    for name in (f"gptq4-g{g}", f"awq4-g{g}"):
        p = cached(run, "target", target, name)
        rows.append((name, load_dequantized(p) if p else None))
    for name, m in rows:
        if m is None:
            print(f"| target {name} | not in {run / 'compressed'} (sweep it first) | |")
            continue
        assert all(lin.weight.dtype == torch.float32 for _, lin in compressible_linears(m))
        v = held_out_nll(m, fmt, bench, cfg["eval"]["batch_size"])
        print(f"| target {name} | {v:.4f} | {v - base:+.4f} |")
    print()
    print("code changes of the unlearning update under GPTQ / AWQ (weights that differ from the target's):")
    print("| checkpoint | weights changed | " + " | ".join(f"{n} code changed" for n in (f"gptq4-g{g}", f"awq4-g{g}"))
          + " |\n|---|---|---|---|")
    w0 = {f"{n}": lin.weight.detach().clone() for n, lin in compressible_linears(model)}
    codes0 = {n: checkpoint_codes(p) if (p := cached(run, "target", target, n)) else None
              for n in (f"gptq4-g{g}", f"awq4-g{g}")}
    for label, path in models.items():
        if label in ("target", "oracle"):
            continue
        t0 = time.time()
        m, _ = load_model(path)
        upd = {n: lin.weight.detach() != w0[n] for n, lin in compressible_linears(m)}
        n_upd = sum(int(u.sum()) for u in upd.values())
        cells = []
        for name, c0 in codes0.items():
            p = cached(run, label, path, name)
            if c0 is None or p is None:
                cells.append("–")
                continue
            c1 = checkpoint_codes(p)
            flips = sum(int((c0[n] != c1[n])[u].sum()) for n, u in upd.items() if n in c1)
            cells.append(f"{flips / max(n_upd, 1):.3f}")
        total = sum(u.numel() for u in upd.values())
        print(f"| {label} | {n_upd:,} ({n_upd / total:.4f}) | " + " | ".join(cells) + f" |  <!-- {time.time() - t0:.0f}s -->")


if __name__ == "__main__":
    main()
