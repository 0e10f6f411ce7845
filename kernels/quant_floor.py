"""Triton kernel of the quantization-bin floor, and its launcher. Imported as
``robust_unlearn.kernels.quant_floor`` (pyproject maps the package ``robust_unlearn.kernels`` to this
folder); the grid math, the torch reference and the iteration live in ``robust_unlearn.robust.floor``,
whose module docstring states the formulas this kernel implements.

One pass. A program handles ``BLOCK_SIZE`` consecutive elements of the flattened weight as a tile of
``[BLOCK_SIZE // 64, 64]``: one tile row = one bitsandbytes block, so a 4-bit format loads one scale per
row. It reads the target and current weights (fp32 / bf16 / fp16; bf16 travels as int16 bits and is
converted with integer ops, so rounding is round-to-nearest-even on the GPU and under
``TRITON_INTERPRET=1`` alike, whose own bf16 cast truncates), the update mask (uint8), and per format
the group scales of both tensors from one small fp32 buffer (target multiplier, current multiplier,
current absmax, current absmax over the not-pinned elements). Per format, in fp32: the target's code (4-bit: a
branch-free binary search over the thresholds; int8 / rtn: round half to even built from floor),
whether the current value is still in that bin (4-bit: ``lo < x <= hi`` against the bin's two
thresholds, no second search), the revert condition and the placement; then the strictest placement
over formats, one store in the input dtype, and a post-check of the stored value under the same
scales. Three counters (moved, reverted, still in the target's bin) are added atomically per program,
or (``PARTIAL``) written per program and summed after the pass, which spares every program an atomic
on the same three addresses.

Formats are compile-time tuples: ``KINDS`` (0 bitsandbytes 4-bit table, 1 LLM.int8, 2 rtn),
``GROUPS`` (64 for the flattened 4-bit blocks, G for rtn groups, 0 = whole row), ``TOPS`` / ``BOTS``
(extreme codes), ``UFACS`` (quantization step per unit of scale). A 64-float table per format holds
the 4-bit thresholds (padded with -inf / +inf) and the placements a margin into the neighbouring bin
per target code. Runtime per format: ``desc[f] = (ncols, groups per row, offset, ngroups)``.

Bit-exactness with the torch reference: codes use only multiplications by the same fp32 multipliers
(rtn: the correctly rounded division ``tl.math.div_rn``, as torch's ``w / D``), and the kernel is
launched with ``enable_fp_fusion=False`` so no multiply-add is contracted into an FMA.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

IN_FP32, IN_BF16, IN_FP16 = 0, 1, 2
_IN_KIND = {torch.float32: IN_FP32, torch.bfloat16: IN_BF16, torch.float16: IN_FP16}
BLOCK_SIZE = 1024
NUM_WARPS = 4
PARTIAL = True  # measured on an H200: per-program counters beat the atomics at every size (evals/README.md)


@triton.jit
def _to_f32(raw, IN_KIND: tl.constexpr):
    if IN_KIND == 1:  # bf16 bits (int16) -> fp32: the bits are the top half of the fp32
        x = ((raw.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        x = raw.to(tl.float32)
    return x


@triton.jit
def _from_f32(v, IN_KIND: tl.constexpr):
    if IN_KIND == 0:
        r = v
    elif IN_KIND == 1:  # fp32 -> bf16 bits, round to nearest even (finite values)
        b = v.to(tl.int32, bitcast=True)
        r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.int16)
    else:
        r = v.to(tl.float16)
    return r


@triton.jit
def _ulp(a, MANT: tl.constexpr, MINE: tl.constexpr):
    """ulp of a format with MANT mantissa bits at a >= 0 (fp32), floored at 2^(MINE - 127)."""
    e = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return (tl.maximum(e - MANT, MINE) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _group(offs, ncols, gpr, KIND: tl.constexpr, G: tl.constexpr):
    if KIND == 0:
        g = offs // G
    elif G == 0:
        g = offs // ncols
    else:
        row = offs // ncols
        g = row * gpr + (offs - row * ncols) // G
    return g


@triton.jit
def _domain(w, KIND: tl.constexpr):
    if KIND == 1:  # LLM.int8 quantizes the fp16 weight
        d = w.to(tl.float16).to(tl.float32)
    else:
        d = w
    return d


@triton.jit
def _round_half_even(x):
    r = tl.floor(x)
    fr = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return r.to(tl.int32) + (fr > 0.5).to(tl.int32) + ((fr == 0.5) & odd).to(tl.int32)


@triton.jit
def _ucode(d, mult, KIND: tl.constexpr):
    """Code of a uniform grid: int8 round(w16 * m), rtn round(w / D) (correctly rounded division)."""
    if KIND == 2:
        x = tl.math.div_rn(d, mult)
    else:
        x = d * mult
    return _round_half_even(x)


@triton.jit
def _tcode(x, tb):
    """Code of a 4-bit table: the number of thresholds below x, by a branch-free binary search over the
    padded thresholds ``tb[1..15]`` (``tb[k]`` = lower edge of bin k; 16-entry table, an L1 hit)."""
    k = tl.zeros(x.shape, tl.int32)
    for s in tl.static_range(4):
        k = tl.where(tl.load(tb + k + (8 >> s)) < x, k + (8 >> s), k)
    return k


@triton.jit
def _same_bin(d, mult, kt, lo, hi, KIND: tl.constexpr):
    """Whether d (format domain) has code kt under the multiplier; for a table: lo < d * mult <= hi,
    (lo, hi] being bin kt's thresholds (the same test as counting thresholds, without the count)."""
    if KIND == 0:
        x = d * mult
        s = (x > lo) & (x <= hi)
    else:
        s = _ucode(d, mult, KIND) == kt
    return s


@triton.jit
def quant_floor_kernel(wt_ptr, wc_ptr, mask_ptr, out_ptr, stats_ptr, tab_ptr, desc_ptr, cnt_ptr, n, margin,
                       KINDS: tl.constexpr, GROUPS: tl.constexpr, TOPS: tl.constexpr,
                       BOTS: tl.constexpr, UFACS: tl.constexpr, IN_KIND: tl.constexpr, MANT: tl.constexpr,
                       MINE: tl.constexpr, ULPS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       PARTIAL: tl.constexpr = False):
    # the tile is [BLOCK_SIZE // 64, 64]: one row = one bitsandbytes block, so a 4-bit format loads one
    # scale per row instead of one per element
    NB: tl.constexpr = BLOCK_SIZE // 64
    pid = tl.program_id(0)
    brow = pid * NB + tl.arange(0, NB)[:, None]  # bitsandbytes block index of each tile row
    offs = brow * 64 + tl.arange(0, 64)[None, :]
    inb = offs < n
    wt_raw = tl.load(wt_ptr + offs, mask=inb, other=0)
    wt = _to_f32(wt_raw, IN_KIND)
    wc = _to_f32(tl.load(wc_ptr + offs, mask=inb, other=0), IN_KIND)
    mk = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
    upd = mk & (wc != wt)
    up = wc > wt
    dn = wc < wt
    fail_any = tl.zeros([NB, 64], tl.int1)
    rev = tl.zeros([NB, 64], tl.int1)
    req_up = tl.full([NB, 64], float("-inf"), tl.float32)
    req_dn = tl.full([NB, 64], float("inf"), tl.float32)
    ktp = tl.zeros([NB, 64], tl.int64)  # target codes of all formats, 10 bits each (for the post-check)
    for f in tl.static_range(len(KINDS)):
        base = stats_ptr + tl.load(desc_ptr + 4 * f + 2)
        ng = tl.load(desc_ptr + 4 * f + 3)
        if KINDS[f] == 0:
            g = brow
            gok = brow < ng
        else:
            g = _group(offs, tl.load(desc_ptr + 4 * f), tl.load(desc_ptr + 4 * f + 1), KINDS[f], GROUPS[f])
            gok = inb
        mt = tl.load(base + g, mask=gok, other=1.0)
        mc = tl.load(base + ng + g, mask=gok, other=1.0)
        dc = _domain(wc, KINDS[f])
        if KINDS[f] == 0:
            tb = tab_ptr + f * 64
            kt = _tcode(wt * mt, tb)
            lo = tl.load(tb + kt, mask=inb, other=0.0)       # bin kt = (lo, hi]
            hi = tl.load(tb + kt + 1, mask=inb, other=0.0)
            fail = upd & _same_bin(dc, mc, kt, lo, hi, KINDS[f])
            e = tl.where(up, hi, lo)
            p = tl.load(tb + tl.where(up, 32, 48) + kt, mask=fail, other=0.0)
        else:
            kt = _ucode(_domain(wt, KINDS[f]), mt, KINDS[f])
            lo = mt
            hi = mt
            fail = upd & (_ucode(dc, mc, KINDS[f]) == kt)
            ktf = kt.to(tl.float32)
            ue = ktf + 0.5
            pu = ue + margin * tl.where(kt + 1 == TOPS[f], 0.5, 1.0)
            de = ktf - 0.5
            pd = de - margin * tl.where(kt - 1 == BOTS[f], 0.5, 1.0)
            e = tl.where(up, ue, de)
            p = tl.where(up, pu, pd)
        ktp = ktp | ((kt + 512).to(tl.int64) << (10 * f))
        ext = (up & (kt == TOPS[f])) | (dn & (kt == BOTS[f]))
        sc = tl.load(base + 2 * ng + g, mask=gok, other=0.0)
        sx = tl.load(base + 3 * ng + g, mask=gok, other=0.0)
        # pinned: from the target's extreme code moving inward, still on the extreme's side of zero
        pin = (dn & (kt == TOPS[f]) & (dc > 0)) | (up & (kt == BOTS[f]) & (dc < 0))
        # the not-pinned absmax of a group whose absmax is pinned becomes the absmax once the pinned
        # elements leave (extreme code, not its target's): it stays put (else the two chase each other)
        fail = fail & (((tl.abs(dc) == sx) & (sx < sc) & ((ext | pin) == 0)) == 0)
        sp = tl.where(pin, sx, sc)  # the scale to place with: pinned -> the block's not-pinned absmax
        rev = rev | (fail & (ext | (pin & (sx == 0.0))))
        unit = sp * UFACS[f]
        ve = e * unit
        vp = p * unit
        du = _ulp(tl.abs(ve), MANT, MINE)
        if KINDS[f] == 1:
            du = tl.maximum(du, _ulp(tl.abs(ve), 10, 103))
        du = du * ULPS
        v = tl.where(up, tl.maximum(vp, ve + du), tl.minimum(vp, ve - du))
        v = tl.minimum(tl.maximum(v, -sp), sp)
        req_up = tl.where(fail, tl.maximum(req_up, v), req_up)
        req_dn = tl.where(fail, tl.minimum(req_dn, v), req_dn)
        fail_any = fail_any | fail
    keep = rev | (upd == 0)
    moved = fail_any & (rev == 0)
    new = tl.where(up, tl.maximum(wc, req_up), tl.minimum(wc, req_dn))
    final = tl.where(keep, wt, tl.where(fail_any, new, wc))
    out_raw = _from_f32(final, IN_KIND)
    tl.store(out_ptr + offs, out_raw, mask=inb)
    # post-check: the stored (rounded) value under the same current scales
    vr = _to_f32(out_raw, IN_KIND)
    kept = upd & (rev == 0)  # updated and not reverted: must be out of the target's bin
    if len(KINDS) == 1:  # one format: reuse its bin from the loop
        still = kept & _same_bin(_domain(vr, KINDS[0]), mc, kt, lo, hi, KINDS[0])
    else:  # several: a move for one format may bring another back to the target's code
        still = tl.zeros([NB, 64], tl.int1)
        for f in tl.static_range(len(KINDS)):
            base = stats_ptr + tl.load(desc_ptr + 4 * f + 2)
            ng = tl.load(desc_ptr + 4 * f + 3)
            kt = ((ktp >> (10 * f)) & 1023).to(tl.int32) - 512
            if KINDS[f] == 0:
                mc = tl.load(base + ng + brow, mask=brow < ng, other=1.0)
                lo = tl.load(tab_ptr + f * 64 + kt, mask=inb, other=0.0)
                hi = tl.load(tab_ptr + f * 64 + kt + 1, mask=inb, other=0.0)
            else:
                g = _group(offs, tl.load(desc_ptr + 4 * f), tl.load(desc_ptr + 4 * f + 1), KINDS[f], GROUPS[f])
                mc = tl.load(base + ng + g, mask=inb, other=1.0)
                lo = mc
                hi = mc
            still = still | (kept & _same_bin(_domain(vr, KINDS[f]), mc, kt, lo, hi, KINDS[f]))
    if PARTIAL:  # one row of three counters per program, summed after the pass (no same-address atomics)
        tl.store(cnt_ptr + 3 * pid + 0, tl.sum(moved.to(tl.int32)))
        tl.store(cnt_ptr + 3 * pid + 1, tl.sum(rev.to(tl.int32)))
        tl.store(cnt_ptr + 3 * pid + 2, tl.sum(still.to(tl.int32)))
    else:
        tl.atomic_add(cnt_ptr + 0, tl.sum(moved.to(tl.int32)))
        tl.atomic_add(cnt_ptr + 1, tl.sum(rev.to(tl.int32)))
        tl.atomic_add(cnt_ptr + 2, tl.sum(still.to(tl.int32)))


def _raw(w: torch.Tensor) -> torch.Tensor:
    return w.view(torch.int16) if w.dtype == torch.bfloat16 else w


def launch_floor_pass(w_target: torch.Tensor, w_current: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor,
                      tables: torch.Tensor, desc: torch.Tensor, *, margin: float, KINDS, GROUPS, TOPS, BOTS,
                      UFACS, MANT: int, MINE: int, ULPS: int, block_size: int = BLOCK_SIZE,
                      num_warps: int = NUM_WARPS, partial: bool = PARTIAL, out: torch.Tensor | None = None,
                      counts: torch.Tensor | None = None, sync: bool = True):
    """One pass of the floor kernel -> (new tensor in ``w_current``'s dtype, [moved, reverted, still failing]).

    ``w_target`` and ``w_current``: same shape and dtype (fp32 / bf16 / fp16), contiguous, on one device;
    ``mask``: bool of that shape; ``stats``, ``tables``, ``desc``, and the compile-time format tuples as
    built by ``robust_unlearn.robust.floor._Plan`` (``kernel_args`` / ``constexprs``). ``out`` /
    ``counts`` may be given to reuse buffers (the counters are zeroed here; with ``partial``, a buffer of
    3 per program). ``sync=False`` returns the counters as a device tensor (no host synchronisation, for
    timing)."""
    if w_current.dtype not in _IN_KIND or w_target.dtype != w_current.dtype or w_target.shape != w_current.shape:
        raise ValueError(f"floor kernel: target {w_target.dtype} {tuple(w_target.shape)} vs current "
                         f"{w_current.dtype} {tuple(w_current.shape)}")
    if block_size % 64 or block_size < 64:
        raise ValueError(f"floor kernel: block_size {block_size} must be a multiple of 64")
    n = w_current.numel()
    grid = (triton.cdiv(n, block_size),)
    if out is None:
        out = torch.empty_like(w_current)
    size = 3 * grid[0] if partial else 3
    if counts is None or counts.numel() != size:
        counts = torch.zeros(size, dtype=torch.int32, device=w_current.device)
    else:
        counts.zero_()
    if n:
        quant_floor_kernel[grid](
            _raw(w_target.contiguous()), _raw(w_current.contiguous()), mask.contiguous().view(torch.uint8), _raw(out),
            stats, tables.contiguous(), desc, counts, n, float(margin),
            KINDS=tuple(KINDS), GROUPS=tuple(GROUPS), TOPS=tuple(TOPS),
            BOTS=tuple(BOTS), UFACS=tuple(UFACS), IN_KIND=_IN_KIND[w_current.dtype], MANT=MANT, MINE=MINE,
            ULPS=ULPS, BLOCK_SIZE=block_size, PARTIAL=bool(partial), num_warps=num_warps, enable_fp_fusion=False)
    total = counts.view(-1, 3).sum(0) if partial else counts
    return out, ([int(c) for c in total.tolist()] if sync else total)
