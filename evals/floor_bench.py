"""Throughput of one pass of the quantization-bin floor: the Triton kernel against the torch reference
on the same tensors, and on CUDA against a device-to-device copy of the same number of bytes.

    python evals/floor_bench.py [--shape 4096x4096] [--dtype bf16] [--formats nf4[,int8,...]]
                                [--iters 20] [--warmup 3] [--density 1.0]
                                [--block-sizes 1024,2048 --warps 4,8 --partial 0,1]

The last three options time every combination of the kernel's launch settings (each checked bit for
bit against the reference first); without them, the kernel's defaults alone.

Default shape: 4096x4096 on CUDA; 256x1000 on CPU, where the kernel runs under the Triton interpreter
(TRITON_INTERPRET=1, set here before triton is imported), so the CPU figures only show that the
script works, not kernel speed. Bytes of a pass: target + current read, mask read (1 byte), result
written, plus the group scales read; GB/s = bytes / time per pass. The copy moves the same bytes
(``dst.copy_(src)`` of half as many bytes: read + write). Timing: CUDA events on a GPU,
time.perf_counter on the CPU, after warm-up passes (the first compiles the kernel).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from robust_unlearn.kernels import quant_floor as QF  # noqa: E402  (after TRITON_INTERPRET)
from robust_unlearn.robust import floor as F  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn, iters: int, warmup: int) -> float:
    """Seconds per call."""
    for _ in range(warmup):
        fn()
    if CUDA:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096x4096" if CUDA else "256x1000")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--formats", default="nf4")
    ap.add_argument("--iters", type=int, default=20 if CUDA else 3)
    ap.add_argument("--warmup", type=int, default=3 if CUDA else 1)
    ap.add_argument("--density", type=float, default=1.0, help="fraction of elements in the update mask")
    ap.add_argument("--step", type=float, default=1e-4, help="update size (tiny: every updated element is moved)")
    ap.add_argument("--block-sizes", default=str(QF.BLOCK_SIZE), help="comma list: elements per program")
    ap.add_argument("--warps", default=str(QF.NUM_WARPS), help="comma list: warps per program")
    ap.add_argument("--partial", default=str(int(QF.PARTIAL)), help="comma list of 0/1: per-program counters")
    args = ap.parse_args()

    dev = "cuda" if CUDA else "cpu"
    shape = tuple(int(s) for s in args.shape.lower().split("x"))
    dtype = DTYPES[args.dtype]
    formats = args.formats.split(",")
    g = torch.Generator(device=dev).manual_seed(0)
    wt = (torch.randn(shape, generator=g, device=dev) * 0.02).to(dtype)
    wc = (wt.float() + args.step * torch.randn(shape, generator=g, device=dev)).to(dtype)
    mask = torch.rand(shape, generator=g, device=dev) < args.density

    plan, wt, wc, mask = F._prepare(wt, wc, mask, formats, F.DEFAULT_MARGIN, F.MIN_ULPS)
    st_t = plan.stats(wt)
    st_c = plan.current_stats(torch.where(mask, wc, wt), wt, mask, plan.target_codes(wt))
    stats, desc = plan.kernel_args(st_t, st_c)
    ce = plan.constexprs()

    def reference():
        F._pass_torch(plan, wt, wc, mask, st_t, st_c)

    ref, ref_counts = F._pass_torch(plan, wt, wc, mask, st_t, st_c)
    n = wt.numel()
    nbytes = n * (3 * wt.element_size() + 1) + stats.numel() * 4
    where = torch.cuda.get_device_name() if CUDA else "CPU, Triton interpreter (TRITON_INTERPRET=1)"
    print(f"device: {where}")
    print(f"weight {'x'.join(map(str, shape))} {args.dtype}, formats {','.join(f.name for f in plan.formats)}, "
          f"mask density {args.density}, update step {args.step}: {ref_counts[0]} of {n} elements moved; "
          f"{nbytes / 1e6:.2f} MB per pass")
    t_r = timed(reference, max(1, args.iters // 4) if CUDA else args.iters, 1)
    gbs_r = nbytes / t_r / 1e9
    print(f"torch reference : {t_r * 1e3:9.3f} ms/pass  {gbs_r:10.4g} GB/s")
    gbs_c = None
    if CUDA:
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        t_c = timed(lambda: dst.copy_(src), args.iters, args.warmup)
        gbs_c = 2 * src.numel() / t_c / 1e9
        print(f"device copy     : {t_c * 1e3:9.3f} ms/pass  {gbs_c:10.4g} GB/s (copy_ of {src.numel() / 1e6:.2f} MB)")
    out = torch.empty_like(wc)
    for bs in (int(b) for b in args.block_sizes.split(",")):
        for nw in (int(w) for w in args.warps.split(",")):
            for part in (bool(int(p)) for p in args.partial.split(",")):
                buf = torch.zeros(3 * -(-n // bs) if part else 3, dtype=torch.int32, device=dev)

                def kernel(bs=bs, nw=nw, part=part, buf=buf):
                    return QF.launch_floor_pass(wt, wc, mask, stats, plan.tables, desc, margin=plan.margin, out=out,
                                                counts=buf, sync=False, block_size=bs, num_warps=nw, partial=part,
                                                **ce)[1]

                got = kernel()
                same = torch.equal(F._bits(out), F._bits(ref)) and [int(c) for c in got.tolist()] == ref_counts
                t_k = timed(kernel, args.iters, args.warmup)
                gbs_k = nbytes / t_k / 1e9
                line = (f"triton kernel block {bs:5d} warps {nw:2d} partial {int(part)}: {t_k * 1e3:9.3f} ms/pass  "
                        f"{gbs_k:10.4g} GB/s  bit-exact {same}  kernel / reference {gbs_k / gbs_r:.3g}x")
                if gbs_c:
                    line += f"  kernel / copy {gbs_k / gbs_c:.1%} (goal >= 85%)"
                print(line, flush=True)


if __name__ == "__main__":
    main()
