"""GPTQ / AWQ columns of a run directory, measured after its sweep (issue 13), from the compressed
checkpoints the sweep cached in RUN_DIR/compressed (nothing is quantized again):

1. Held-out NLL of the target: fp32, RTN at the same group size (``rtn4-g<G>``, computed here), GPTQ and
   AWQ (the compressed-tensors checkpoints loaded back in fp32). Held out = the splits calibration never
   saw (holdout, real_authors, world_facts): mean answer-token NLL per question, averaged.
2. How often the robust update's weights change their GPTQ / AWQ code: for each unlearned checkpoint,
   among the weights that differ from the target's (fp32 checkpoints), the fraction whose stored int4
   code differs between the checkpoint's compressed copy and the target's. The floor cannot guarantee
   these (the scales and codes depend on calibration and error feedback): this is the measurement.

    python evals/calibrated_columns.py RUN_DIR [--group 64] [--calibration-split train_target --held-out holdout]

``--calibration-split``: also quantize the target here with calibration from that split (more text than the
built-in benchmark's 18-row retain split; cached in RUN_DIR/compressed), its NLL measured on ``--held-out``
(splits that calibration never saw; holdout authors are in no training split).
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
from robust_unlearn.models import load_model
from robust_unlearn.quant.calibrated import checkpoint_codes, load_dequantized
from robust_unlearn.scoring import qa_pass

HELD_OUT = ("holdout", "real_authors", "world_facts")


def cached(run: Path, label: str, path: str, fmt: str) -> Path | None:
    """The sweep's compressed checkpoint of a run's model (labels are unique in a run; the newest)."""
    hits = sorted((run / "compressed").glob(f"{label}-{'?' * 16}-{fmt}-*"), key=lambda p: p.stat().st_mtime)
    return hits[-1] if hits else None


def held_out_nll(model, fmt, bench, batch: int, splits=HELD_OUT, extra=None) -> float:
    pairs = extra if extra is not None else [(r["question"], r["answer"]) for s in splits if s in bench for r in bench[s]]
    nll, _ = qa_pass(model, fmt, pairs, [], batch)
    return float(np.mean(nll))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--calibration-split")
    ap.add_argument("--held-out", default=",".join(HELD_OUT))
    ap.add_argument("--tofu", help="also measure NLL on the first 200 QA pairs of TOFU's forget10.json in this "
                    "directory (text this model never saw)")
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
    if a.calibration_split:
        from robust_unlearn.data import calibration_samples
        from robust_unlearn.quant.calibrated import Calibration

        held = tuple(a.held_out.split(","))
        c = cfg["sweep"]["calibration"]
        ccfg = load_recipe(str(run / "recipe.yaml"), [f"sweep.calibration.split={a.calibration_split}", "sweep.calibration.samples=64"])
        samples, source = calibration_samples(ccfg, bench, tok)
        calib = Calibration.of(c, samples, source, cache_dir=run / "compressed", ckpt="target-evals")
        n = sum(len(bench[x]) for x in held)
        print(f"\nwith calibration from {source}, NLL on {n} questions of {', '.join(held)}:")
        print("| model | NLL | vs fp32 |\n|---|---|---|")
        tofu = None
        if a.tofu:
            rows = [json.loads(x) for x in (Path(a.tofu) / "forget10.json").read_text().splitlines() if x.strip()][:200]
            tofu = [(r["question"], r["answer"]) for r in rows]
        bs = cfg["eval"]["batch_size"]
        base = held_out_nll(model, fmt, bench, bs, held)
        tb = held_out_nll(model, fmt, bench, bs, extra=tofu) if tofu else None
        if tofu:
            print(f"(second NLL column: {len(tofu)} TOFU forget10 pairs)")
        print(f"| target fp32 | {base:.4f} | |" + (f" {tb:.4f} | |" if tofu else ""))
        for name in (f"rtn4-g{g}", f"gptq4-g{g}", f"awq4-g{g}"):
            t0 = time.time()
            m = get_compression(name, calib)(copy.deepcopy(model))
            v = held_out_nll(m, fmt, bench, bs, held)
            extra = ""
            if tofu:
                w = held_out_nll(m, fmt, bench, bs, extra=tofu)
                extra = f" {w:.4f} | {w - tb:+.4f} |"
            print(f"| target {name} | {v:.4f} | {v - base:+.4f} |{extra}  <!-- {time.time() - t0:.0f}s -->")
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
