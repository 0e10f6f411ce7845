"""Training objectives: each is a small function ``loss(model, batches) -> scalar``.

``batches`` maps a data stream name (``train``; later ``forget`` / ``retain``) to a collated batch.
"""
from __future__ import annotations

from ..errors import UserError
from ..scoring import answer_nll


def nll(model, batches) -> "torch.Tensor":  # noqa: F821
    """Fine-tuning: mean token NLL of the answers (question tokens masked)."""
    total, count = answer_nll(model, batches["train"])
    return total.sum() / count.sum().clamp(min=1)


OBJECTIVES = {"nll": nll}


def get_objective(name: str):
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise UserError(f"unknown method '{name}' (expected one of: {', '.join(sorted(OBJECTIVES))})") from None
