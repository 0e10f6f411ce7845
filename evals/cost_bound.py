"""How fast can the default run be on this machine? A lower bound from measured matmul work, against
issue 11's budgets (cold run <= 300 s, one evaluation cell <= 5 s).

    python evals/cost_bound.py [CKPT_DIR] [--cells 25]

Measured in one run, alone on the machine:
- the peak matmul rate of this CPU (fp32 and bf16; the best of a few GEMM shapes of the model's layers);
- one evaluation cell (``Evaluator.evaluate``, every split, column ``none``) of the checkpoint (default: the
  recipe's cached target, fine-tuned first when the cache is empty): its wall time and the FLOPs of its
  matmuls (``aten::mm`` / ``addmm`` / ``bmm``, counted by the profiler from their shapes);
- one fine-tuning step of the recipe (a batch of ``finetune.batch_size`` rows of ``train_target``, its
  precision, forward and backward): wall time and matmul FLOPs;
- the fine-tuning steps of the target and the oracle from the recipe (epochs x batches per epoch).

Lower bound = matmul FLOPs / peak rate (everything else, attention, norms and Python, counted as free).
The cold run's bound adds the two fine-tunings and ``--cells`` evaluation cells; it leaves out the
unlearning of five methods, which only adds to it.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from robust_unlearn.config import load_recipe
from robust_unlearn.data import load_benchmark
from robust_unlearn.data.collate import QADataset, formatter_for
from robust_unlearn.metrics import suite_for
from robust_unlearn.models import load_model

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def peak_gflops(dtype, shapes=((512, 576, 1536), (2048, 576, 576), (512, 1536, 576)), repeat: int = 8) -> float:
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        for _ in range(repeat):
            a @ b
        best = max(best, 2 * m * k * n * repeat / (time.perf_counter() - t0) / 1e9)
    return best


def matmul_flops(prof) -> float:
    """FLOPs of the profiled matmuls (mm: 2mkn; addmm: 2mkn of its two matrix inputs; bmm: per batch)."""
    out = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in MATMULS or not e.input_shapes:
            continue
        s = e.input_shapes
        if e.key == "aten::addmm":
            s = s[1:3]
        if e.key == "aten::bmm":
            (bt, m, k), (_, _, n) = s[0], s[1]
            f = 2 * bt * m * k * n
        else:
            (m, k), (_, n) = s[0], s[1]
            f = 2 * m * k * n
        out += f * e.count
    return out


def profiled(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    return wall, matmul_flops(prof)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", nargs="?")
    ap.add_argument("--cells", type=int, default=25, help="evaluation cells of the default run (25)")
    args = ap.parse_args()
    cfg = load_recipe(None, [])
    bench = load_benchmark(cfg)
    ckpt = args.ckpt
    if ckpt is None:
        from robust_unlearn.pipeline import target_checkpoint  # evals may drive the pipeline

        ckpt = target_checkpoint(cfg, bench)[0]
    peak32, peak16 = peak_gflops(torch.float32), peak_gflops(torch.bfloat16)
    print(f"torch threads {torch.get_num_threads()}; peak matmul: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s")

    model, tok = load_model(ckpt, "float32", cfg["model"]["trust_remote_code"])
    model.eval()
    suite = suite_for(cfg)
    ev = suite.evaluator(tok)
    splits = suite.splits("none")
    ev.evaluate(model, bench, None, splits)  # warm-up (memoised prompt ids, allocator)
    wall, flops = profiled(lambda: ev.evaluate(model, bench, None, splits))
    cell_f = flops
    cell_bound = cell_f / (peak32 * 1e9)
    print(f"evaluation cell: {wall:.1f} s (under the profiler), matmuls {cell_f / 1e12:.2f} TFLOP "
          f"-> at least {cell_bound:.1f} s at the fp32 peak (budget 5 s)")

    fc = cfg["finetune"]
    fmt = formatter_for(tok, cfg)
    ds = QADataset(bench["train_target"], fmt)
    batch = ds.collate([ds[i] for i in range(min(fc["batch_size"], len(ds)))])
    model.train()
    if fc["freeze_embeddings"]:
        model.get_input_embeddings().weight.requires_grad_(False)
    mixed = fc["precision"] in ("mixed", "bf16")

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    swall, sflops = profiled(step)
    step_f = sflops
    peak_step = peak16 if mixed else peak32
    step_bound = step_f / (peak_step * 1e9)
    steps = {role: fc["epochs"] * math.ceil(len(bench[f"train_{role}"]) / fc["batch_size"]) for role in ("target", "oracle")}
    n_steps = sum(steps.values())
    print(f"fine-tuning step ({fc['precision']}, batch {fc['batch_size']}): {swall:.2f} s, matmuls {step_f / 1e12:.3f} "
          f"TFLOP -> at least {step_bound:.2f} s at the {'bf16' if mixed else 'fp32'} peak; steps: target "
          f"{steps['target']}, oracle {steps['oracle']} (batches vary in length; this is the first batch)")
    ft_bound = n_steps * step_bound
    total = ft_bound + args.cells * cell_bound
    print(f"cold run lower bound, unlearning left out: fine-tuning {ft_bound:.0f} s + {args.cells} cells x "
          f"{cell_bound:.1f} s = {total:.0f} s (budget 300 s; ratio {total / 300:.2f})")


if __name__ == "__main__":
    main()
