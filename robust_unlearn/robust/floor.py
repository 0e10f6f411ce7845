"""The quantization-bin floor: every weight the unlearning updated ends in a different quantization
bin than the target's (original) weight, under each requested format, in the dtype the checkpoint is
saved in; every other weight stays bit-identical to the target.

Why: unlearning updates are far below one 4-bit step (Zhang et al. 2024 measure 47-828x below), so
quantizing the unlearned model gives back the target's codes and the forgotten answers return. The
floor moves each updated weight that is still in the target's bin just past the edge of the
neighbouring bin, in the direction of its update.

Grids: the formats of ``quant`` (``quant.formats``: codes as the quantizers compute them, all
arithmetic in fp32, each tensor quantized with the scales of its own values): nf4 / nf4-dq / fp4
(bitsandbytes 4-bit, blocks of 64), int8 (LLM.int8 weights, per row of the fp16 weight), rtn{4,8}[-gG].
GPTQ and AWQ choose codes with calibration data, so they are not floor formats (``floor_supported``).

Rows: dimension 0 of the weight (a 1-d tensor is one row; more dims are flattened after dim 0).
These codes equal bitsandbytes' on its default (CPU) backend (``tests/test_floor.py``); its CUDA
kernels compute the same formulas, so a difference could only come from a value within an ulp of a
threshold (the floor places values a margin away from every threshold it crosses). NaN / inf weights
are not supported.

One pass (``floor_pass``; the Triton kernel in ``kernels/quant_floor.py`` and the torch reference
here compute the same values bit for bit), per element, with ``t`` = target, ``c`` = current:

- updated = mask and ``c != t``; direction = sign(c - t);
- per format: ``kt`` = code of t under t's scales, ``kc`` = code of c under c's scales. It passes when
  ``kc != kt`` (the guarantee; a code that differs against the update's direction, which only a scale
  change can cause, passes too and is counted in ``FloorResult.n_against_direction``). A failing
  element moves into bin ``kt + 1`` (up) or ``kt - 1`` (down) under the current scale ``S``: to
  ``edge + margin * width(new bin)`` (normalised units, times the step ``S * u``, u = 1, 1/127,
  2^-(N-1)), at least ``min_ulps`` ulps of the dtype past the edge (and of fp16 for int8, whose codes
  are taken on the fp16 weight), clipped to ``[-S, S]`` so that it does not become the group's new
  absmax;
- "pinned" elements (target code the extreme one, update pointing inward, value still on that side
  of zero; e.g. the block absmax moving toward zero) leave the extreme code only by ending below the
  group's new absmax, which is then the largest magnitude ``Sx`` among the group's not-pinned
  elements: they are placed with ``Sx`` as scale, all of a group in one pass. While a pinned element
  holds the absmax, the element of magnitude ``Sx`` stays put (it becomes the absmax, with the extreme
  code, which is not its target's); moving it too would make the two chase each other down;
- an element failing in a direction where no bin exists (``kt`` the extreme code in its direction,
  e.g. nf4 code 15 moving up, or the block absmax moving outward) is reverted to the target value
  (it becomes "not updated"), as is a pinned element of a group whose other elements are all zero;
- several formats: the strictest placement (the farthest in the update's direction); a revert for
  one format reverts the element;
- the value is rounded to the dtype (round to nearest even) and checked again under the same scales.

``apply_floor`` repeats the pass while it moves something and the scales of the result differ from
the ones used (a moved absmax element changes its block's scale and thus every code of the block),
then checks the guarantee on the result (``FloorError`` if it does not hold). ``verify_flips``
re-checks with bitsandbytes' own quantizers.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..quant import (KIND_INT8, KIND_TABLE, NAMES, QuantFormat, bounds, code_of, codes, domain, group_index, grouped,
                     library_codes, multiplier, normalize, parse_format, rows_cols)
from ..quant import dequantized, scales  # scales: also the floor's public name for a format's scales

DEFAULT_MARGIN = 0.2
MIN_ULPS = 2
MAX_ITERS = 32
MAX_FORMATS = 6  # the kernel packs the target codes of all formats into one int64 (10 bits each)

# mantissa bits, biased fp32 exponent of the smallest ulp (fp16: subnormal spacing 2^-24)
_DTYPE_ULP = {torch.float32: (23, 1), torch.bfloat16: (7, 1), torch.float16: (10, 103)}
_FP16_ULP = (10, 103)

FORMATS = tuple(n for n in NAMES if parse_format(n).floor_supported)
"""Format names (as the sweep's compression names); rtn takes any group size ``-g<G>``."""


class FloorError(RuntimeError):
    """The floor could not establish its guarantee (did not converge, or the final check failed)."""


def floor_format(name) -> QuantFormat:
    """A format the floor can place weights on (``quant.parse_format``), else UserError."""
    fmt = parse_format(name)
    if not fmt.floor_supported:
        raise UserError(f"the floor cannot place weights for '{fmt.name}': {fmt.quant_type.upper()} chooses its codes "
                        f"with calibration data (expected a format whose codes follow from the weights: "
                        f"{', '.join(FORMATS)}; rtn4-g{fmt.group} has the same group layout)")
    return fmt


def _parse_formats(formats) -> tuple[QuantFormat, ...]:
    if isinstance(formats, (str, QuantFormat)):
        formats = (formats,)
    out: dict[tuple, QuantFormat] = {}
    for f in formats:
        q = floor_format(f)
        out.setdefault(q.key, q)
    if not out:
        raise UserError("floor: no quantization format given (expected e.g. ['nf4'])")
    if len(out) > MAX_FORMATS:
        raise UserError(f"floor: at most {MAX_FORMATS} distinct formats at once, got {len(out)}")
    return tuple(out.values())


def _place_table(fmt: QuantFormat, margin: float) -> torch.Tensor:
    """[64] fp32 per format (4-bit tables; zeros otherwise): [0:32] the thresholds padded as
    ``-inf, b_0, ..., b_{K-2}, +inf, ...`` so that bin k = (T[k], T[k + 1]]; [32:48] per target code
    k the placement a margin into bin k + 1 (``b_k + margin * width(k + 1)``); [48:64] into bin k - 1
    (``b_{k-1} - margin * width(k - 1)``). Normalised units (times the block absmax)."""
    tab = torch.zeros(64, dtype=torch.float32)
    if fmt.kind != KIND_TABLE:
        return tab
    b = torch.tensor(bounds(fmt.quant_type), dtype=torch.float32)
    one = torch.ones(1, dtype=torch.float32)
    lo = torch.cat([-one, b])  # bin j = (lo[j], hi[j]], clipped at +-1 for its width
    hi = torch.cat([b, one])
    width = hi - lo
    m = torch.tensor(margin, dtype=torch.float32)
    nb = b.numel()
    tab[0] = -math.inf
    tab[1:nb + 1] = b
    tab[nb + 1:32] = math.inf
    tab[32:32 + nb] = b + m * width[1:]
    tab[48 + 1:48 + nb + 1] = b - m * width[:-1]
    return tab


@dataclass
class _Stats:
    S: torch.Tensor      # [ng] fp32 group absmax
    Sx: torch.Tensor | None  # [ng] fp32 largest magnitude of the group's not-pinned elements (current only)
    mult: torch.Tensor   # [ng] fp32: table 1/max(S, 1e-38), int8 127/S (0 if S = 0), rtn D (divisor)


def _stats(w: torch.Tensor, fmt: QuantFormat, pinned=None) -> _Stats:
    """Group scales of ``w``; with ``pinned = (kt, up, dn)`` (flat target codes, update directions) also
    ``Sx``, the absmax over the group's elements that are not pinned: pinned = updated inward from the
    target's extreme code and still on the extreme's side of zero."""
    S = grouped(w, fmt).abs().amax(dim=1)
    mult = multiplier(S, fmt)
    Sx = None
    if pinned is not None:
        kt, up, dn = pinned
        dom = domain(w, fmt).reshape(-1)
        pin = (dn & (kt == fmt.top) & (dom > 0)) | (up & (kt == fmt.bottom) & (dom < 0))
        Sx = grouped(w, fmt, torch.where(pin, 0.0, dom.abs()).view(w.shape)).amax(dim=1).contiguous()
    return _Stats(S.contiguous(), Sx, mult.contiguous())


def _ulp(a: torch.Tensor, mant: int, mine: int) -> torch.Tensor:
    """ulp of a dtype with ``mant`` mantissa bits at |a| (fp32 ``a``, a >= 0), from the fp32 exponent."""
    e = (a.view(torch.int32) >> 23) & 0xFF
    return (torch.clamp(e - mant, min=mine) << 23).view(torch.float32)


class _Plan:
    """Everything about (formats, margin, shape, dtype) that the passes share."""

    def __init__(self, formats, margin: float, min_ulps: int, shape, dtype, device):
        if dtype not in _DTYPE_ULP:
            raise UserError(f"floor: weight dtype {dtype} not supported (expected float32, bfloat16 or float16)")
        if not (0.0 < float(margin) < 0.5):
            raise UserError(f"floor: margin {margin} out of range (expected a fraction of the bin width in (0, 0.5))")
        if int(min_ulps) < 1:
            raise UserError(f"floor: min_ulps {min_ulps} must be >= 1")
        self.formats = _parse_formats(formats)
        self.margin = float(margin)
        self.min_ulps = int(min_ulps)
        self.shape = tuple(shape)
        self.n = math.prod(self.shape)
        self.dtype = dtype
        self.device = device
        self.mant, self.mine = _DTYPE_ULP[dtype]
        self.tables = torch.stack([_place_table(f, self.margin) for f in self.formats]).to(device)
        rows, ncols = rows_cols(self.shape)
        self.layout = []  # (ncols, groups per row)
        for f in self.formats:
            if f.kind == KIND_TABLE:
                self.layout.append((max(self.n, 1), 1))
            else:
                self.layout.append((max(ncols, 1), -(-ncols // (f.group or max(ncols, 1)))))
        self._gidx = None

    def stats(self, w: torch.Tensor) -> list[_Stats]:
        return [_stats(w, f) for f in self.formats]

    def target_codes(self, wt: torch.Tensor) -> list[torch.Tensor]:
        return [codes(wt, f).reshape(-1) for f in self.formats]

    def current_stats(self, w: torch.Tensor, wt: torch.Tensor, mask: torch.Tensor, kts) -> list[_Stats]:
        """Scales of the current weights ``w``, with the pinned elements' reference scale ``Sx``."""
        wf, tf = w.reshape(-1).float(), wt.reshape(-1).float()
        upd = mask.reshape(-1) & (wf != tf)
        up, dn = upd & (wf > tf), upd & (wf < tf)
        return [_stats(w, f, (kt, up, dn)) for f, kt in zip(self.formats, kts)]

    def group_index(self, i: int) -> torch.Tensor:
        if self._gidx is None:
            self._gidx = [group_index(self.shape, f, self.device) for f in self.formats]
        return self._gidx[i]

    # ---- the kernel's view of the plan
    def kernel_args(self, st_t: list[_Stats], st_c: list[_Stats]):
        """(stats buffer fp32, descriptor int32 [F, 4] = (ncols, groups per row, offset, ngroups))."""
        parts, desc, off = [], [], 0
        for f, (a, b) in enumerate(zip(st_t, st_c)):
            ng = a.S.numel()
            parts += [a.mult, b.mult, b.S, b.Sx]
            ncols, gpr = self.layout[f]
            desc.append([ncols, gpr, off, ng])
            off += 4 * ng
        if off >= 2 ** 31:
            raise FloorError("floor: too many scale groups for the kernel's int32 offsets")
        buf = torch.cat([p.float() for p in parts]).contiguous()
        return buf, torch.tensor(desc, dtype=torch.int32, device=buf.device)

    def constexprs(self) -> dict:
        fs = self.formats
        return dict(
            KINDS=tuple(f.kind for f in fs),
            GROUPS=tuple(f.group for f in fs),
            TOPS=tuple(f.top for f in fs),
            BOTS=tuple(f.bottom for f in fs),
            UFACS=tuple(f.unit for f in fs),
            MANT=self.mant, MINE=self.mine, ULPS=self.min_ulps,
        )


def _pass_torch(plan: _Plan, wt_raw, wc_raw, mask, st_t, st_c):
    """One pass of the floor in plain torch (the reference of the Triton kernel, same fp32 operations
    in the same order) -> (new tensor in the dtype, [moved, reverted, still failing])."""
    dev = wt_raw.device
    wt = wt_raw.reshape(-1).float()
    wc = wc_raw.reshape(-1).float()
    mk = mask.reshape(-1)
    upd = mk & (wc != wt)
    up = wc > wt
    dn = wc < wt
    fail_any = torch.zeros_like(upd)
    rev = torch.zeros_like(upd)
    req_up = torch.full_like(wt, -math.inf)
    req_dn = torch.full_like(wt, math.inf)
    margin = torch.tensor(plan.margin, dtype=torch.float32, device=dev)
    kts = []
    for f, fmt in enumerate(plan.formats):
        g = plan.group_index(f)
        dt, dc = domain(wt, fmt), domain(wc, fmt)
        kt = code_of(normalize(dt, st_t[f].mult[g], fmt), fmt)
        kc = code_of(normalize(dc, st_c[f].mult[g], fmt), fmt)
        kts.append(kt)
        fail = upd & (kc == kt)
        ext = (up & (kt == fmt.top)) | (dn & (kt == fmt.bottom))
        # pinned: from the target's extreme code moving inward, still on the extreme's side of zero
        pin = (dn & (kt == fmt.top) & (dc > 0)) | (up & (kt == fmt.bottom) & (dc < 0))
        sc, sx = st_c[f].S[g], st_c[f].Sx[g]
        # the not-pinned absmax of a group whose absmax is pinned becomes the absmax once the pinned
        # elements leave (extreme code, not its target's): it stays put (else the two chase each other)
        fail &= ~((dc.abs() == sx) & (sx < sc) & ~(ext | pin))
        sp = torch.where(pin, sx, sc)  # the scale to place with: pinned -> the not-pinned absmax
        rev |= fail & (ext | (pin & (sx == 0)))
        if fmt.kind == KIND_TABLE:
            ki = kt.clamp(0, 15).long()
            tab = plan.tables[f]
            e = torch.where(up, tab[ki + 1], tab[ki])         # the edge of bin kt to cross
            p = torch.where(up, tab[32 + ki], tab[48 + ki])   # the placement past it
        else:
            ktf = kt.float()
            half = torch.full_like(wt, 0.5)
            one = torch.ones_like(wt)
            ue = ktf + 0.5
            pu = ue + margin * torch.where(kt + 1 == fmt.top, half, one)
            de = ktf - 0.5
            pd = de - margin * torch.where(kt - 1 == fmt.bottom, half, one)
            e = torch.where(up, ue, de)
            p = torch.where(up, pu, pd)
        unit = sp * torch.tensor(fmt.unit, dtype=torch.float32, device=dev)
        ve = e * unit
        vp = p * unit
        du = _ulp(ve.abs(), plan.mant, plan.mine)
        if fmt.kind == KIND_INT8:
            du = torch.maximum(du, _ulp(ve.abs(), *_FP16_ULP))
        du = du * plan.min_ulps
        v = torch.where(up, torch.maximum(vp, ve + du), torch.minimum(vp, ve - du))
        v = torch.minimum(torch.maximum(v, -sp), sp)
        req_up = torch.where(fail, torch.maximum(req_up, v), req_up)
        req_dn = torch.where(fail, torch.minimum(req_dn, v), req_dn)
        fail_any |= fail
    moved = fail_any & ~rev
    new = torch.where(up, torch.maximum(wc, req_up), torch.minimum(wc, req_dn))
    final = torch.where(rev | ~upd, wt, torch.where(fail_any, new, wc))
    out = final.to(plan.dtype)
    vr = out.float()
    upd2 = upd & ~rev
    still = torch.zeros_like(upd)
    for f, fmt in enumerate(plan.formats):
        g = plan.group_index(f)
        kn = code_of(normalize(domain(vr, fmt), st_c[f].mult[g], fmt), fmt)
        still |= upd2 & (kn == kts[f])
    counts = [int(moved.sum()), int(rev.sum()), int(still.sum())]
    return out.view(plan.shape), counts


def _pass_triton(plan: _Plan, wt_raw, wc_raw, mask, st_t, st_c):
    from robust_unlearn.kernels.quant_floor import launch_floor_pass

    stats, desc = plan.kernel_args(st_t, st_c)
    return launch_floor_pass(wt_raw, wc_raw, mask, stats, plan.tables, desc, margin=plan.margin,
                             **plan.constexprs())


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise UserError(f"floor: unknown backend {backend!r} (expected auto, triton or torch)")
    if backend == "torch":
        return "torch"
    usable = device.type == "cuda" or _interpret()
    if usable:
        try:
            import triton  # noqa: F401
        except ImportError:
            usable = False
    if backend == "auto":
        return "triton" if usable else "torch"
    if not usable:
        raise UserError("floor: backend 'triton' needs the weights on a CUDA device or TRITON_INTERPRET=1 "
                        "(set before triton is imported), and triton installed")
    return "triton"


def _prepare(w_target, w_current, mask, formats, margin, min_ulps):
    if not (isinstance(w_target, torch.Tensor) and isinstance(w_current, torch.Tensor)):
        raise UserError("floor: w_target and w_current must be tensors")
    if w_target.shape != w_current.shape:
        raise UserError(f"floor: target shape {tuple(w_target.shape)} != current shape {tuple(w_current.shape)}")
    if w_target.device != w_current.device:
        raise UserError(f"floor: target on {w_target.device}, current on {w_current.device}")
    plan = _Plan(formats, margin, min_ulps, w_current.shape, w_current.dtype, w_current.device)
    if plan.n >= 2 ** 31:
        raise UserError(f"floor: tensor of {plan.n} elements too large (limit 2^31 - 1)")
    wt = w_target.detach().to(w_current.dtype).contiguous()  # the target as saved in the current's dtype
    wc = w_current.detach().contiguous()
    if mask is None:
        mk = torch.ones(plan.shape, dtype=torch.bool, device=wc.device)
    else:
        mk = torch.as_tensor(mask, device=wc.device).to(torch.bool).expand(plan.shape).contiguous()
    return plan, wt, wc, mk


def floor_pass(w_target, w_current, mask, formats=("nf4",), margin: float = DEFAULT_MARGIN,
               backend: str = "torch", min_ulps: int = MIN_ULPS):
    """One pass with the scales of ``w_target`` and of the current weights (unmasked elements taken
    as the target's) -> (new tensor in ``w_current``'s dtype, [moved, reverted, still failing])."""
    plan, wt, wc, mk = _prepare(w_target, w_current, mask, formats, margin, min_ulps)
    st_t = plan.stats(wt)
    st_c = plan.current_stats(torch.where(mk, wc, wt), wt, mk, plan.target_codes(wt))
    fn = _pass_triton if _backend(backend, wc.device) == "triton" else _pass_torch
    return fn(plan, wt, wc, mk, st_t, st_c)


def floor_reference(w_target, w_current, mask, fmt=("nf4",), margin: float = DEFAULT_MARGIN,
                    min_ulps: int = MIN_ULPS) -> torch.Tensor:
    """One pass of the floor in plain torch (the Triton kernel's reference) -> new tensor."""
    return floor_pass(w_target, w_current, mask, fmt, margin, backend="torch", min_ulps=min_ulps)[0]


@dataclass
class FloorResult:
    weight: torch.Tensor      # the floored weight, in w_current's dtype
    n_updated: int            # elements that end different from the target (each flips under every format)
    n_moved_by_floor: int     # ... of which the floor moved (the others already flipped)
    n_reverted: int           # updated elements put back to the target value (no bin in their direction)
    n_zero_update: int        # masked elements equal to the target (not updated)
    n_against_direction: int  # updated elements whose code moved against the update under some format
    iterations: int           # passes run
    backend: str
    formats: tuple[str, ...]

    @property
    def tensor(self) -> torch.Tensor:
        return self.weight


def _bits(w: torch.Tensor) -> torch.Tensor:
    return w.view({4: torch.int32, 2: torch.int16}[w.element_size()])


def _scales_equal(a: list[_Stats], b: list[_Stats]) -> bool:
    return all(torch.equal(x.S, y.S) for x, y in zip(a, b))


@torch.no_grad()
def snap_to_codes(w_target: torch.Tensor, weight: torch.Tensor, fmt) -> tuple[torch.Tensor, int]:
    """The floor's result with every updated element (``weight != w_target``) put on the value its code
    dequantizes to under ``fmt`` (one nf4 / fp4 / rtn format), so that quantizing the result leaves those
    elements exactly where they are. The codes do not change, and neither do the group scales: a value
    moves to ``level x S`` with ``|level| <= 1``, and the element that holds a group's absmax S has the
    extreme level, so it stays at S. Checked: FloorError if a code or a scale changed. -> (weight in
    ``weight``'s dtype, elements snapped)."""
    fmt = floor_format(fmt)
    w = weight.float()
    upd = w != w_target.to(w.dtype)
    out = torch.where(upd, dequantized(w, fmt), w).to(weight.dtype)
    f32 = out.float()
    if not (torch.equal(codes(f32, fmt)[upd], codes(w, fmt)[upd]) and torch.equal(scales(f32, fmt), scales(w, fmt))):
        raise FloorError(f"snap to {fmt.name} codes changed a code or a scale (shape {tuple(weight.shape)}, "
                         f"dtype {weight.dtype}); the weight is left as the floor placed it")
    return out, int((out != weight).sum())


def apply_floor(w_target, w_current, mask=None, formats=("nf4",), margin: float = DEFAULT_MARGIN,
                backend: str = "auto", max_iters: int = MAX_ITERS, min_ulps: int = MIN_ULPS) -> FloorResult:
    """Floor ``w_current`` against ``w_target`` (see the module docstring). ``mask`` (bool, broadcast to
    the weight's shape; None = all) marks the elements the method updated; outside it the result is
    the target, bit for bit. ``formats``: one name or several (all must flip). ``backend``: ``auto``
    (Triton when the weight is on CUDA or TRITON_INTERPRET=1, else torch), ``triton`` or ``torch``."""
    plan, wt, wc, mk = _prepare(w_target, w_current, mask, formats, margin, min_ulps)
    which = _backend(backend, wc.device)
    one_pass = _pass_triton if which == "triton" else _pass_torch
    st_t = plan.stats(wt)
    kts = plan.target_codes(wt)
    st_c = plan.current_stats(torch.where(mk, wc, wt), wt, mk, kts)
    cur, it, counts = wc, 0, None
    while True:
        if it >= max_iters:
            raise FloorError(f"floor did not converge in {max_iters} passes (last pass: {counts[0]} moved, "
                             f"{counts[1]} reverted, {counts[2]} still in the target's bin; formats "
                             f"{[f.name for f in plan.formats]}, shape {plan.shape})")
        out, counts = one_pass(plan, wt, cur, mk, st_t, st_c)
        it += 1
        cur = out
        if counts[0] == 0 and counts[1] == 0:  # nothing changed, the scales are this tensor's own
            if counts[2]:
                raise FloorError(f"floor is stuck: {counts[2]} updated elements keep the target's code and none "
                                 f"can move (formats {[f.name for f in plan.formats]}, shape {plan.shape})")
            break
        st_new = plan.current_stats(out, wt, mk, kts)
        if counts[2] == 0 and _scales_equal(st_new, st_c):
            break  # the moved values passed under scales that are still the tensor's own
        st_c = st_new
    return _finish(plan, wt, wc, mk, cur, it, which)


def _finish(plan: _Plan, wt, wc, mk, out, iterations, backend) -> FloorResult:
    """Counts, and the guarantee checked on the result (raises FloorError if it does not hold)."""
    bt, bo, bc = _bits(wt), _bits(out), _bits(wc)
    if not torch.equal(bo[~mk], bt[~mk]):
        raise FloorError("floor: an element outside the mask differs from the target")
    updated = mk & (out != wt)
    if not torch.equal(bo[mk & ~updated], bt[mk & ~updated]):
        raise FloorError("floor: a not-updated element is not bit-identical to the target")
    against = torch.zeros_like(updated)
    direction = torch.sign(wc.float() - wt.float())
    for fmt in plan.formats:
        ct, co = codes(wt, fmt), codes(out, fmt)
        bad = updated & (ct == co)
        if bad.any():
            raise FloorError(f"floor: {int(bad.sum())} of {int(updated.sum())} updated elements keep the target's "
                             f"{fmt.name} code")
        against |= updated & (torch.sign((co - ct).float()) != direction)
    moved_wrong = updated & (bo != bc) & (torch.sign(out.float() - wc.float()) != direction)
    if moved_wrong.any():
        raise FloorError(f"floor: {int(moved_wrong.sum())} elements moved against their update")
    nz = mk & (wc != wt)
    return FloorResult(
        weight=out,
        n_updated=int(updated.sum()),
        n_moved_by_floor=int((updated & (bo != bc)).sum()),
        n_reverted=int((nz & ~updated).sum()),
        n_zero_update=int((mk & (wc == wt)).sum()),
        n_against_direction=int(against.sum()),
        iterations=iterations,
        backend=backend,
        formats=tuple(f.name for f in plan.formats),
    )


# ---- independent check with the quantizers themselves ---------------------------------------------
@torch.no_grad()
def verify_flips(w_target, w_final, mask=None, formats=("nf4",)) -> dict[str, float]:
    """Fraction of the updated elements (mask and final != target) whose code differs from the
    target's, per format, each tensor quantized with its own scales: nf4/fp4 with bitsandbytes'
    ``quantize_4bit``, int8 with bitsandbytes' ``int8_vectorwise_quant``, rtn with ``codes`` (the
    formula of ``compress.quantize.rtn_tensor``). 1.0 where nothing is updated."""
    wt = w_target.detach().to(w_final.dtype)
    if mask is None:
        mk = torch.ones_like(wt, dtype=torch.bool)
    else:
        mk = torch.as_tensor(mask, device=wt.device).bool().expand(wt.shape)
    upd = (mk & (w_final != wt)).reshape(-1)
    n = int(upd.sum())
    out = {}
    for fmt in _parse_formats(formats):
        a, b = library_codes(wt, fmt), library_codes(w_final, fmt)
        if a is None:  # rtn: no library; its formula (compress.quantize.rtn_tensor) is ``codes``
            a, b = codes(wt, fmt).reshape(-1), codes(w_final, fmt).reshape(-1)
        out[fmt.name] = float((a != b)[upd].float().mean()) if n else 1.0
    return out
