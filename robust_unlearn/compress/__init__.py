"""The sweep's columns: each is a function from an in-memory model to an in-memory model.

Names (the sweep's column names):
- ``none``: full precision.
- every quantization format of ``quant`` (``nf4``, ``nf4-dq``, ``fp4``, ``int8``, ``rtn{4,8}[-gG]``,
  ``gptq4-gG``, ``awq4-gG``): the format's ``compress`` (GPTQ / AWQ need a ``Calibration``);
- ``prune10``, ``prune20``, ``prune30``: global magnitude pruning of all linear weights except
  lm_head (zero the weights below the p-th percentile of |w|);
- ``relearn-retain``, ``relearn-forget``: the relearning attack (``relearn``): a few fine-tuning steps
  on retain data, or on one half of the forget set (the column is evaluated on the other half).
Only the weights of ``nn.Linear`` modules inside the decoder are compressed; embeddings, norms and
lm_head stay as they are (as bitsandbytes' ``load_in_4bit`` / ``load_in_8bit`` leave them).
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from ..errors import UserError
from .linears import compressible_linears  # noqa: F401  (re-exported: the package's public name)
from ..quant import is_format, parse_format
from .prune import magnitude_prune
from .relearn import RELEARN, relearn

CompressFn = Callable[[torch.nn.Module], torch.nn.Module]


def check_compression(name: str, where: str = "compression") -> str:
    try:
        get_compression(name)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return name


def get_compression(name: str, context=None) -> CompressFn:
    """Column name -> model -> model. ``context``: what a column needs beyond the model (GPTQ / AWQ:
    a ``quant.calibrated.Calibration``; relearning: a ``relearn.RelearnData``), bound here."""
    if name == "none":
        return lambda model: model
    if is_format(name):
        fmt = parse_format(name)
        return lambda model: fmt.compress(model, context)
    m = re.fullmatch(r"prune(\d{1,2})", name)
    if m:
        return lambda model: magnitude_prune(model, int(m.group(1)) / 100)
    if name in RELEARN:
        return lambda model: relearn(model, name, context)
    raise UserError(f"unknown compression '{name}' (expected one of: none, int8, nf4, nf4-dq, fp4, rtn8, rtn4, "
                    "rtn4-g<G>, gptq4-g<G>, awq4-g<G>, prune10, prune20, prune30, relearn-retain, relearn-forget)")


def needs_calibration(name: str) -> bool:
    return is_format(name) and parse_format(name).calibrated
