"""Forget losses and retain regularizers, as open-unlearning defines them.

Forget losses take the model, a forget batch and (where needed) the frozen reference model:
- ``ga``: gradient ascent, minus the mean token NLL of the forget answers.
- ``npo`` (Zhang et al. 2024): -(2/beta) * mean log sigmoid(beta * (NLL_model - NLL_ref)), NLL
  summed over the answer tokens of each example (log-ratio of sequence probabilities).
- ``simnpo`` (Fan et al. 2024): -(2/beta) * mean log sigmoid(beta * (NLL_model / |y| - delta)),
  reference-free, length-normalised.
Retain regularizers:
- ``gdr``: mean token NLL of the retain answers.
- ``klr``: KL(p_ref || p_model) of the next-token distributions, averaged over retain answer tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..scoring import answer_logits, answer_nll


def token_mean(value: torch.Tensor, batch: dict) -> torch.Tensor:
    """A mean over this process's answer tokens -> its share of the mean over the global batch's.

    Under N processes each holds part of the batch and the gradients are averaged, so a token mean
    must be rescaled by (local tokens x N / global tokens) (``token_scale``, set by the training loop)
    to give the one-process gradient; per-example means need nothing (the parts are equal in size)."""
    scale = batch.get("token_scale")
    return value if scale is None else value * scale


def _ref_nll(ref, batch):
    with torch.no_grad():
        return answer_nll(ref, batch)


def ga(model, batch, ref=None, **_):
    total, count = answer_nll(model, batch)
    return -token_mean(total.sum() / count.sum().clamp(min=1), batch)


def npo(model, batch, ref=None, beta: float = 0.1, **_):
    if ref is None:
        raise ValueError("npo needs the frozen reference model")
    total, _ = answer_nll(model, batch)
    ref_total, _ = _ref_nll(ref, batch)
    return -F.logsigmoid(beta * (total - ref_total)).mean() * 2 / beta


def simnpo(model, batch, ref=None, beta: float = 4.5, delta: float = 0.0, **_):
    total, count = answer_nll(model, batch)
    return -F.logsigmoid(beta * (total / count.clamp(min=1) - delta)).mean() * 2 / beta


def gdr(model, batch, ref=None, **_):
    total, count = answer_nll(model, batch)
    return token_mean(total.sum() / count.sum().clamp(min=1), batch)


def klr(model, batch, ref=None, **_):
    if ref is None:
        raise ValueError("klr needs the frozen reference model")
    logits, target = answer_logits(model, batch)
    with torch.no_grad():
        ref_logits, _ = answer_logits(ref, batch)
    mask = target != -100
    logp, ref_logp = F.log_softmax(logits[mask], -1), F.log_softmax(ref_logits[mask], -1)
    return token_mean((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean(), batch)


FORGET = {"ga": ga, "npo": npo, "simnpo": simnpo}
RETAIN = {"gdr": gdr, "klr": klr, None: None}
# method name -> (forget loss, retain regularizer); every objective is gamma * forget + alpha * retain
METHODS = {"GA": ("ga", None), "GradDiff": ("ga", "gdr"), "GA_KLR": ("ga", "klr"), "NPO": ("npo", None),
           "NPO_GDR": ("npo", "gdr"), "NPO_KLR": ("npo", "klr"), "SimNPO": ("simnpo", "gdr")}


def unlearning_objective(method: str, gamma: float = 1.0, alpha: float = 1.0, ref=None, **hp):
    """-> ``objective(model, batches)`` over the ``forget`` (and ``retain``) streams."""
    from ..errors import UserError

    if method not in METHODS:
        raise UserError(f"unknown method '{method}' (expected one of: {', '.join(METHODS)})")
    f_name, r_name = METHODS[method]
    f_loss, r_loss = FORGET[f_name], RETAIN[r_name]

    def forget_term(model, batches):
        return gamma * f_loss(model, batches["forget"], ref=ref, **hp)

    def retain_term(model, batches):
        return alpha * r_loss(model, batches["retain"], ref=ref)

    def objective(model, batches):
        f = forget_term(model, batches)
        return f if r_loss is None else f + retain_term(model, batches)

    # the two terms apart, for the null-space step (each with its own forward and backward)
    objective.forget_term = forget_term
    objective.retain_term = retain_term if r_loss is not None else None
    # the forget term on one batch (saliency, attribution) and the retain NLL (retain Fisher)
    objective.forget_loss = lambda model, batch: f_loss(model, batch, ref=ref, **hp)
    objective.retain_nll = gdr

    objective.needs_ref = "npo" in f_name or r_name == "klr"
    objective.streams = ("forget", "retain") if r_loss is not None else ("forget",)
    return objective
