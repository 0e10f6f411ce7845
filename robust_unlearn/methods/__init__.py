"""Training objectives: each is a small function ``loss(model, batches) -> scalar``.

``batches`` maps a data stream name (``train``; later ``forget`` / ``retain``) to a collated batch.
"""
from __future__ import annotations

from ..errors import UserError
from .losses import gdr


def nll(model, batches):
    """Fine-tuning: mean token NLL of the answers of the ``train`` stream (question tokens masked)."""
    return gdr(model, batches["train"])


OBJECTIVES = {"nll": nll}


def get_objective(name: str):
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise UserError(f"unknown method '{name}' (expected one of: {', '.join(sorted(OBJECTIVES))})") from None
