"""Every quantization format, one object each: its name and parser, its grid (codes, scales, bin widths
of a weight under its own scales), its ``compress(model)`` and its cross-check against the library
that quantizes it. The sweep's columns (``compress``), the quantization-bin floor (``robust.floor`` and
its Triton kernel's format constants), the weight audit (``metrics.weights``), ``update_stats`` and the
recipe checks all read formats from here.

Names (also the sweep's column names):

- ``nf4``, ``nf4-dq``, ``fp4``: bitsandbytes 4-bit (``quantize_4bit``): the tensor flattened
  row-major, blocks of 64 consecutive elements (the last one partial), ``S = max|w|`` per block,
  ``x = w * (1 / max(S, 1e-38))``, code = number of midpoints of the sorted table values
  (``get_4bit_type``) below ``x``. fp4's table holds +0 and -0 (one level here: 15 levels, a code
  means a distinct value). ``nf4-dq`` has nf4's codes (double quantization only quantizes the block
  scales afterwards).
- ``int8``: LLM.int8() weights (``Int8Params`` casts to fp16, then ``int8_vectorwise_quant``): per
  output row ``S = max|w16|``, code = ``round(w16 * (127 / S))``, half to even.
- ``rtn8``, ``rtn4``, ``rtn{4,8}-g{G}``: round-to-nearest (Zhang et al. 2024, eq. 2):
  ``D = max|w| / 2^(N-1)`` per output row or per group of G consecutive weights of a row, code =
  ``round(w / D)`` in ``[-2^(N-1), 2^(N-1)]``.
- ``gptq4-g{G}``, ``awq4-g{G}``: W4A16 int4 in compressed-tensors' group layout (per output row,
  groups of G consecutive input weights; G must divide every layer's input width), built with
  llm-compressor (``quant.calibrated``). The grid of a weight under its own scales is compressed-
  tensors' min-max one (``calculate_qparams``): symmetric (GPTQ's default) ``s = max|w| / 7.5``,
  code = ``clamp(round(w / s), -8, 7)``; asymmetric (AWQ's default) ``s = (max(w, 0) - min(w, 0)) / 15``,
  ``z = round(clamp(-8 - min / s, -8, 7))``, code = ``clamp(round(w / s + z), -8, 7)``. GPTQ and AWQ
  choose their scales and codes with calibration data (error feedback, activation-aware smoothing),
  so a deployed checkpoint's codes are not a function of its weights alone: the floor cannot place
  weights for them (``floor_supported`` is False); the audit measures their code changes on the
  compressed checkpoints instead.

Rows: dimension 0 of the weight (a 1-d tensor is one row; more dims are flattened after dim 0).
All grid arithmetic is in fp32.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch

from ..errors import UserError

BNB_BLOCK = 64  # bitsandbytes' 4-bit block size (its default; the sweep's nf4/fp4 use it)

KIND_TABLE, KIND_INT8, KIND_RTN, KIND_CT = 0, 1, 2, 3

NAMES = ("nf4", "nf4-dq", "fp4", "int8", "rtn8", "rtn4", "rtn8-g128", "rtn4-g128", "gptq4-g64", "gptq4-g128",
         "awq4-g64", "awq4-g128")
"""The formats by name; rtn, gptq and awq take any group size ``-g<G>``."""
CALIBRATED = ("gptq", "awq")


@dataclass(frozen=True)
class QuantFormat:
    name: str
    kind: int          # KIND_TABLE (bitsandbytes 4-bit), KIND_INT8 (LLM.int8), KIND_RTN, KIND_CT (gptq / awq)
    bits: int
    group: int         # table: 64 consecutive elements of the flattened tensor; others: G, 0 = whole row
    quant_type: str = ""   # table: nf4 / fp4; ct: gptq / awq
    symmetric: bool = True  # ct only
    double_quant: bool = False  # nf4-dq

    @property
    def key(self) -> tuple:
        """Formats with the same key have the same codes (nf4 and nf4-dq)."""
        return self.kind, self.bits, self.group, self.quant_type, self.symmetric

    @property
    def calibrated(self) -> bool:
        return self.kind == KIND_CT

    @property
    def floor_supported(self) -> bool:
        """The floor places weights on this grid (its codes are a function of the weights alone)."""
        return self.kind != KIND_CT

    @property
    def top(self) -> int:
        """Largest code."""
        if self.kind == KIND_TABLE:
            return len(levels(self.quant_type)) - 1
        if self.kind == KIND_CT:
            return 2 ** (self.bits - 1) - 1
        return 127 if self.kind == KIND_INT8 else 2 ** (self.bits - 1)

    @property
    def bottom(self) -> int:
        if self.kind == KIND_TABLE:
            return 0
        return -2 ** (self.bits - 1) if self.kind == KIND_CT else -self.top

    @property
    def unit(self) -> float:
        """Quantization step per unit of scale S, as an fp32 value (the floor's formats)."""
        u = {KIND_TABLE: 1.0, KIND_INT8: 1.0 / 127, KIND_RTN: 2.0 ** -(self.bits - 1)}[self.kind]
        return float(torch.tensor(u, dtype=torch.float32))

    def compress(self, model, context=None):
        """Quantize ``model``'s decoder linears (lm_head kept) and return the model to evaluate
        (in place for bitsandbytes and rtn; gptq / awq need ``context``, a ``calibrated.Calibration``,
        and return the compressed checkpoint loaded back dequantized)."""
        if self.kind == KIND_TABLE:
            from .bnb import bnb_4bit

            return bnb_4bit(model, quant_type=self.quant_type, double_quant=self.double_quant, blocksize=BNB_BLOCK)
        if self.kind == KIND_INT8:
            from .bnb import bnb_int8

            return bnb_int8(model)
        if self.kind == KIND_RTN:
            from .rtn import rtn

            return rtn(model, bits=self.bits, group_size=self.group or None)
        from .calibrated import compress_calibrated

        return compress_calibrated(model, self, context)

    def check_model(self, model) -> None:
        """UserError (one line) when the format cannot quantize ``model``: a gptq / awq group that does
        not divide a layer's input width."""
        if self.kind != KIND_CT:
            return
        from ..compress.linears import compressible_linears

        self.check_widths({n: lin.in_features for n, lin in compressible_linears(model)})

    def check_widths(self, widths: dict[str, int]) -> None:
        """``widths``: layer name -> input features; UserError (one line) when a gptq / awq group does
        not divide one."""
        if self.kind == KIND_CT:
            check_group(self, widths)


def check_group(fmt: QuantFormat, widths: dict[str, int]) -> None:
    """``widths``: layer name -> input features. UserError naming the first layer G does not divide."""
    bad = [(n, w) for n, w in widths.items() if w % fmt.group]
    if not bad:
        return
    g = math.gcd(*widths.values())
    valid = [d for d in (16, 32, 64, 128, 256) if g % d == 0]
    name, width = bad[0]
    raise UserError(f"{fmt.name}: group {fmt.group} does not divide layer {name}'s input width {width} "
                    f"(valid groups for this model: {', '.join(map(str, valid)) or 'none of 16..256'})")


def parse_format(name) -> QuantFormat:
    """``"nf4"``, ``"nf4-dq"``, ``"fp4"``, ``"int8"``, ``"rtn4"``, ``"rtn8-g128"``, ``"gptq4-g64"``,
    ``"awq4-g128"``, ... -> QuantFormat. UserError for anything else."""
    if isinstance(name, QuantFormat):
        return name
    s = str(name).strip().lower()
    if s in ("nf4", "nf4-dq"):
        return QuantFormat(s, KIND_TABLE, 4, BNB_BLOCK, "nf4", double_quant=s == "nf4-dq")
    if s == "fp4":
        return QuantFormat("fp4", KIND_TABLE, 4, BNB_BLOCK, "fp4")
    if s == "int8":
        return QuantFormat("int8", KIND_INT8, 8, 0)
    m = re.fullmatch(r"rtn(4|8)(?:-g(\d+))?", s)
    if m and (m.group(2) is None or int(m.group(2)) > 0):
        group = int(m.group(2)) if m.group(2) else 0
        return QuantFormat(s, KIND_RTN, int(m.group(1)), group)
    m = re.fullmatch(r"(gptq|awq)4-g(\d+)", s)
    if m and int(m.group(2)) > 0:
        return QuantFormat(s, KIND_CT, 4, int(m.group(2)), m.group(1), symmetric=m.group(1) == "gptq")
    raise UserError(f"unknown quantization format {name!r} (expected one of: nf4, nf4-dq, fp4, int8, rtn4, rtn8, "
                    "rtn4-g<G>, rtn8-g<G>, gptq4-g<G>, awq4-g<G>)")


def is_format(name) -> bool:
    try:
        parse_format(name)
    except UserError:
        return False
    return True


# ---- the grids ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def levels(quant_type: str) -> tuple[float, ...]:
    """Sorted distinct values of bitsandbytes' 4-bit table (fp32 values)."""
    from .bnb import load_bnb

    code = load_bnb().functional.get_4bit_type(quant_type, device="cpu").float()
    return tuple(float(v) for v in torch.unique(code))  # sorted; +0 and -0 are one value


@functools.lru_cache(maxsize=None)
def bounds(quant_type: str) -> tuple[float, ...]:
    """Decision thresholds (midpoints of consecutive levels, computed in fp32 as bitsandbytes does)."""
    v = torch.tensor(levels(quant_type), dtype=torch.float32)
    return tuple(float(b) for b in (v[:-1] + v[1:]) / 2)


def rows_cols(shape) -> tuple[int, int]:
    n = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (n // rows if rows else 0)


def domain(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The fp32 values the format quantizes (int8: the fp16 weight, as ``Int8Params``)."""
    if fmt.kind == KIND_INT8:
        return w.to(torch.float16).float()
    return w.float()


def grouped(w: torch.Tensor, fmt: QuantFormat, x: torch.Tensor | None = None) -> torch.Tensor:
    """``domain(w)`` (or ``x``, same shape) as [groups, group size], zero-padded."""
    x = domain(w, fmt) if x is None else x
    if fmt.kind == KIND_TABLE:
        flat = x.reshape(-1)
        return torch.nn.functional.pad(flat, (0, (-flat.numel()) % BNB_BLOCK)).view(-1, BNB_BLOCK)
    rows, ncols = rows_cols(tuple(w.shape))
    g = fmt.group or ncols
    x2 = x.reshape(rows, ncols)
    return torch.nn.functional.pad(x2, (0, (-ncols) % g)).reshape(-1, g)


def multiplier(S: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Per group, from its absmax S: table 1/max(S, 1e-38), int8 127/S (0 if S = 0), rtn the divisor
    D (1 for an all-zero group)."""
    if fmt.kind == KIND_TABLE:
        return 1.0 / S.clamp(min=1e-38)
    if fmt.kind == KIND_INT8:
        return torch.where(S == 0, torch.zeros_like(S), 127.0 / S)
    d = S / 2 ** (fmt.bits - 1)
    return torch.where(d == 0, torch.ones_like(d), d)


def group_index(shape, fmt: QuantFormat, device) -> torch.Tensor:
    """Flat element index -> its scale group."""
    n = math.prod(shape)
    i = torch.arange(n, device=device)
    if fmt.kind == KIND_TABLE:
        return i // BNB_BLOCK
    rows, ncols = rows_cols(shape)
    if not fmt.group:
        return i // ncols
    gpr = -(-ncols // fmt.group)
    row = i // ncols
    return row * gpr + (i - row * ncols) // fmt.group


def normalize(d: torch.Tensor, mult: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    return d / mult if fmt.kind == KIND_RTN else d * mult


def code_of(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Normalised value -> code (the floor's formats)."""
    if fmt.kind == KIND_TABLE:
        b = torch.tensor(bounds(fmt.quant_type), dtype=torch.float32, device=x.device)
        return torch.bucketize(x, b).to(torch.int32)  # = number of thresholds < x
    return torch.round(x).to(torch.int32)  # half to even, as torch.round in bnb / rtn_tensor


def ct_qparams(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' min-max scale and zero point per group ([groups] fp32 each)."""
    x = grouped(w, fmt)
    lo = torch.clamp(x.amin(dim=1), max=0.0)
    hi = torch.clamp(x.amax(dim=1), min=0.0)
    qmin, qmax = float(fmt.bottom), float(fmt.top)
    if fmt.symmetric:
        s = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
        z = torch.zeros_like(s)
    else:
        s = (hi - lo) / (qmax - qmin)
        z = torch.clamp(qmin - lo / s, qmin, qmax)
        z = torch.where(torch.isnan(z), torch.zeros_like(z), z)  # an all-zero group (0 / 0): stored as 0
    s = torch.where(s == 0, torch.full_like(s, torch.finfo(torch.float32).eps), s)
    z = torch.round(torch.clamp(z, -128, 127))  # the zero point is stored as int8
    return s, z


def codes(w: torch.Tensor, fmt) -> torch.Tensor:
    """Code of every element of ``w`` (same shape, int32) under ``w``'s own scales. nf4: bitsandbytes'
    code index; fp4: index into the 15 distinct fp4 values (sorted); int8 / rtn / gptq / awq: the signed
    integer."""
    fmt = parse_format(fmt)
    g = group_index(tuple(w.shape), fmt, w.device)
    if fmt.kind == KIND_CT:
        s, z = ct_qparams(w, fmt)
        x = domain(w, fmt).reshape(-1) / s[g] + z[g]
        return torch.round(torch.clamp(x, fmt.bottom, fmt.top)).to(torch.int32).view(w.shape)
    mult = multiplier(grouped(w, fmt).abs().amax(dim=1), fmt)
    x = normalize(domain(w, fmt).reshape(-1), mult[g], fmt)
    return code_of(x, fmt).view(w.shape)


def dequantized(w: torch.Tensor, fmt) -> torch.Tensor:
    """What the format's quantize-then-dequantize gives back for every element of ``w`` (fp32, same
    shape), under ``w``'s own scales: nf4 / fp4 the table value of the code times the block absmax (one
    fp32 product, as bitsandbytes' dequantize_4bit), rtn the code times the step D. int8 / gptq / awq:
    ValueError (their weights are quantized through fp16 or with calibrated scales)."""
    fmt = parse_format(fmt)
    if fmt.kind not in (KIND_TABLE, KIND_RTN):
        raise ValueError(f"dequantized: {fmt.name} is not an nf4 / fp4 / rtn format")
    g = group_index(tuple(w.shape), fmt, w.device)
    S = grouped(w, fmt).abs().amax(dim=1)
    k = codes(w, fmt).reshape(-1).long()
    if fmt.kind == KIND_TABLE:
        lv = torch.tensor(levels(fmt.quant_type), dtype=torch.float32, device=w.device)
        return (lv[k] * S[g]).view(w.shape)
    return (k.float() * multiplier(S, fmt)[g]).view(w.shape)


def scales(w: torch.Tensor, fmt) -> torch.Tensor:
    """The scale per group as the quantizer stores it: nf4/fp4 block absmax (64 consecutive elements of
    the flattened tensor), int8 row absmax of the fp16 weight, rtn the step D (per row or group),
    gptq / awq compressed-tensors' min-max scale."""
    fmt = parse_format(fmt)
    if fmt.kind == KIND_CT:
        return ct_qparams(w, fmt)[0]
    S = grouped(w, fmt).abs().amax(dim=1)
    return multiplier(S, fmt) if fmt.kind == KIND_RTN else S


def bin_width(w: torch.Tensor, fmt) -> torch.Tensor:
    """Per element (same shape, fp32): the width, in weight units, of the bin ``w`` falls in under its
    own scales. 4-bit tables: the decision region of its code (the table's ends clipped at +-1) times
    the block absmax; int8 / rtn / gptq / awq: one quantization step."""
    fmt = parse_format(fmt)
    g = group_index(tuple(w.shape), fmt, w.device)
    if fmt.kind == KIND_CT:
        return ct_qparams(w, fmt)[0][g].view(w.shape)
    S = grouped(w, fmt).abs().amax(dim=1)
    if fmt.kind == KIND_TABLE:
        b = torch.tensor(bounds(fmt.quant_type), dtype=torch.float32, device=w.device)
        edges = torch.cat([b.new_tensor([-1.0]), b, b.new_tensor([1.0])])
        k = codes(w, fmt).reshape(-1).long()
        return ((edges[k + 1] - edges[k]) * S[g]).view(w.shape)
    step = S / 127 if fmt.kind == KIND_INT8 else multiplier(S, fmt)
    return step[g].view(w.shape)


# ---- cross-checks against the libraries that quantize -----------------------------------------------
def library_codes(w: torch.Tensor, fmt) -> torch.Tensor | None:
    """The codes of ``w`` as the library computes them (flat), comparable with ``codes(w, fmt)``:
    nf4 / fp4 bitsandbytes' ``quantize_4bit`` (as table values: fp4's +0 / -0 compare equal), int8
    bitsandbytes' ``int8_vectorwise_quant``, gptq / awq compressed-tensors' ``calculate_qparams`` and
    quantizer. None for rtn (its formula is the paper's; no library quantizes it)."""
    fmt = parse_format(fmt)
    if fmt.kind == KIND_TABLE:
        from .bnb import bnb_4bit_values

        return bnb_4bit_values(w, fmt.quant_type, BNB_BLOCK)
    if fmt.kind == KIND_INT8:
        from .bnb import bnb_int8_codes

        rows, ncols = rows_cols(tuple(w.shape))
        return bnb_int8_codes(w.reshape(rows, ncols))
    if fmt.kind == KIND_CT:
        from .calibrated import ct_codes

        rows, ncols = rows_cols(tuple(w.shape))
        return ct_codes(w.reshape(rows, ncols), fmt)
    return None


def comparable_codes(w: torch.Tensor, fmt) -> torch.Tensor:
    """``codes(w)`` (flat) in the form ``library_codes`` returns (4-bit tables: the table value)."""
    fmt = parse_format(fmt)
    k = codes(w, fmt).reshape(-1)
    if fmt.kind == KIND_TABLE:
        return torch.tensor(levels(fmt.quant_type), dtype=torch.float32, device=w.device)[k.long()]
    return k
