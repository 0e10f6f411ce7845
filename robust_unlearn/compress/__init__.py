"""Compressions: each is a function from an in-memory model to an in-memory model (in place).

Names (the sweep's column names):
- ``none``: full precision.
- ``int8``: bitsandbytes LLM.int8() (Dettmers et al. 2022): each decoder linear is replaced by a
  ``bnb.nn.Linear8bitLt`` (int8 weights, absmax per output row; outlier threshold 6.0), so the
  forward pass runs bitsandbytes' int8 matmul with its fp16 outlier decomposition.
- ``nf4``, ``nf4-dq``, ``fp4``: bitsandbytes 4-bit (blocksize 64; ``-dq`` = double quantization of
  the block scales), weights quantized and dequantized by bitsandbytes' own functions.
- ``rtn8``, ``rtn4``: round-to-nearest int-N per output channel; ``rtn8-g128``, ``rtn4-g128``: per
  group of 128 input weights (Zhang et al. 2024, eq. 2: Q(w) = D * round(w / D), D = max|w| / 2^(N-1)).
- ``prune10``, ``prune20``, ``prune30``: global magnitude pruning of all linear weights except
  lm_head (zero the weights below the p-th percentile of |w|).
Only the weights of ``nn.Linear`` modules inside the decoder are compressed; embeddings, norms and
lm_head stay as they are (as bitsandbytes' ``load_in_4bit`` / ``load_in_8bit`` leave them).

Not here yet (issue 3): GPTQ/AWQ.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from ..errors import UserError
from .linears import compressible_linears  # noqa: F401  (re-exported: the package's public name)
from .prune import magnitude_prune
from .quantize import bnb_4bit, bnb_int8, rtn

CompressFn = Callable[[torch.nn.Module], torch.nn.Module]


def check_compression(name: str, where: str = "compression") -> str:
    try:
        get_compression(name)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return name


def get_compression(name: str) -> CompressFn:
    if name == "none":
        return lambda model: model
    if name == "int8":
        return bnb_int8
    if name in ("nf4", "nf4-dq", "fp4"):
        return lambda model: bnb_4bit(model, quant_type=name[:3], double_quant=name.endswith("-dq"))
    m = re.fullmatch(r"rtn(4|8)(?:-g(\d+))?", name)
    if m:
        bits, group = int(m.group(1)), int(m.group(2)) if m.group(2) else None
        return lambda model: rtn(model, bits=bits, group_size=group)
    m = re.fullmatch(r"prune(\d{1,2})", name)
    if m:
        return lambda model: magnitude_prune(model, int(m.group(1)) / 100)
    raise UserError(f"unknown compression '{name}' (expected one of: none, int8, nf4, nf4-dq, fp4, rtn8, rtn4, "
                    "rtn8-g128, rtn4-g128, prune10, prune20, prune30)")

