"""Forget losses and retain regularizers, as open-unlearning defines them.

Forget losses take the model, a forget batch and (where needed) the frozen reference model:
- ``ga``: gradient ascent, minus the mean token NLL of the forget answers.
- ``npo`` (Zhang et al. 2024): -(2/beta) * mean log sigmoid(beta * (NLL_model - NLL_ref)), NLL
  summed over the answer tokens of each example (log-ratio of sequence probabilities).
- ``simnpo`` (Fan et al. 2024): -(2/beta) * mean log sigmoid(beta * (NLL_model / |y| - delta)),
  reference-free, length-normalised.
- ``dpo`` (IdkDPO: Rafailov et al. 2023 with refusals as the preferred answer, as open-unlearning's
  DPO trainer): -(2/beta) * mean log sigmoid(beta * ((logp_w - logp_ref_w) - (logp_l - logp_ref_l))),
  w = a refusal to the same question (``batch["alternate"]``), l = the forget answer, log-probabilities
  summed over answer tokens.
- ``undial`` (Dong et al. 2024, UNDIAL): self-distillation from the frozen target with the true
  token's logit lowered by beta: CE(student, softmax(z_ref - beta * onehot(y))) at every attended
  position (prompt and answer; beta only where there is an answer label), mean over positions.
- ``wga`` (Wang et al. 2025, weighted gradient ascent): -mean over answer tokens of w_t * NLL_t,
  w_t = p_t^beta detached.
- ``satimp`` (Yang et al. 2025, SatImp): -mean over answer tokens of w_t * NLL_t,
  w_t = p_t^beta1 * (1 - p_t)^beta2 detached.
- ``ceu`` (Yang et al. 2025, CE-U, arXiv:2503.01224): at each answer position after the first
  ``ignore_first`` ones, cross-entropy to the model's own (detached) distribution with the true token
  removed (its logit -inf), mean over positions; no reference, no retain term.
Retain regularizers:
- ``gdr``: mean token NLL of the retain answers.
- ``klr``: KL(p_ref || p_model) of the next-token distributions, averaged over retain answer tokens
  or every attended position (``unlearn.kl_positions``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device

from ..scoring import answer_logits, answer_nll, token_nll


def token_mean(value: torch.Tensor, batch: dict) -> torch.Tensor:
    """A mean over this process's answer tokens -> its share of the mean over the global batch's.

    Under N processes each holds part of the batch and the gradients are averaged, so a token mean
    must be rescaled by (local tokens x N / global tokens) (``token_scale``, set by the training loop)
    to give the one-process gradient; per-example means need nothing (the parts are equal in size)."""
    scale = batch.get("token_scale")
    return value if scale is None else value * scale


def _with_ref(ref, fn, batch):
    """``fn(ref, batch)`` without gradients, run where the reference's weights are and returned on the
    batch's device. They differ under a DeepSpeed launch: its unlearning setup (saliency) runs on the CPU,
    where the engine has not yet placed the model, beside a whole reference already on the process's GPU."""
    device = batch["input_ids"].device
    weight = next(iter(ref.parameters()), None) if hasattr(ref, "parameters") else None
    ref_device = device if weight is None else weight.device
    with torch.no_grad():
        if ref_device == device:
            return fn(ref, batch)
        return send_to_device(fn(ref, send_to_device(batch, ref_device)), device)


def _ref_nll(ref, batch):
    return _with_ref(ref, answer_nll, batch)


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


def dpo(model, batch, ref=None, beta: float = 0.1, **_):
    if ref is None:
        raise ValueError("dpo needs the frozen reference model")
    alt = batch["alternate"]
    lose, _ = answer_nll(model, batch)
    win, _ = answer_nll(model, alt)
    ref_lose, _ = _ref_nll(ref, batch)
    ref_win, _ = _ref_nll(ref, alt)
    # log p = -NLL: (logp_w - logp_ref_w) - (logp_l - logp_ref_l)
    margin = (ref_win - win) - (ref_lose - lose)
    return -F.logsigmoid(beta * margin).mean() * 2 / beta


def _shifted(model, batch):
    """Logits predicting every next token [B, L-1, V] (float32), the next-token labels (-100 off the
    answer) and the mask of attended next positions."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits[:, :-1].float(), batch["labels"][:, 1:], batch["attention_mask"][:, 1:].bool()


def undial(model, batch, ref=None, beta: float = 10.0, **_):
    if ref is None:
        raise ValueError("undial needs the frozen reference model")
    logits, labels, attended = _shifted(model, batch)
    ref_logits, _, _ = _with_ref(ref, _shifted, batch)
    answer = labels != -100
    hot = F.one_hot(labels.clamp(min=0), ref_logits.shape[-1]).float() * answer.unsqueeze(-1)
    target = F.softmax(ref_logits - beta * hot, dim=-1)  # ref_logits carry no gradient
    ce = -(target * F.log_softmax(logits, -1)).sum(-1)
    return token_mean(ce[attended].mean(), batch)


def _weighted_ga(model, batch, weight):
    nll, mask = token_nll(model, batch)
    w = weight(torch.exp(-nll.detach()))
    return -token_mean((w * nll)[mask].sum() / mask.sum().clamp(min=1), batch)


def wga(model, batch, ref=None, beta: float = 1.0, **_):
    return _weighted_ga(model, batch, lambda p: p ** beta)


def satimp(model, batch, ref=None, beta1: float = 5.0, beta2: float = 1.0, **_):
    return _weighted_ga(model, batch, lambda p: p ** beta1 * (1 - p) ** beta2)


def ceu(model, batch, ref=None, ignore_first: int = 1, **_):
    logits, target = answer_logits(model, batch)
    mask = target != -100
    if ignore_first:  # the first answer tokens of each example are not trained
        mask = mask & (mask.long().cumsum(dim=1) > ignore_first)
    z = logits[mask]
    y = target[mask]
    with torch.no_grad():
        others = z.detach().clone()
        others[torch.arange(len(y)), y] = float("-inf")
        q = F.softmax(others, dim=-1)
    if len(y) == 0:
        return logits.sum() * 0.0
    return token_mean(-(q * F.log_softmax(z, -1)).sum(-1).mean(), batch)


def gdr(model, batch, ref=None, **_):
    total, count = answer_nll(model, batch)
    return token_mean(total.sum() / count.sum().clamp(min=1), batch)


def klr(model, batch, ref=None, positions: str = "answer", **_):
    """KL(p_ref || p_model) of the next-token distributions, averaged over the answer tokens
    (``positions="answer"``) or over every attended position, prompt included (``"all"``, as
    open-unlearning's KL retain term, which also counts padding: locuslab/open-unlearning@d3d7cf9:
    src/trainer/utils.py compute_kl_divergence)."""
    if ref is None:
        raise ValueError("klr needs the frozen reference model")
    if positions == "all":
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = model(**kw).logits.float()
        ref_logits = _with_ref(ref, lambda r, b: r(**b).logits.float(), kw)
        mask = batch["attention_mask"].bool()
    else:
        logits, target = answer_logits(model, batch)
        ref_logits, _ = _with_ref(ref, answer_logits, batch)
        mask = target != -100
    logp, ref_logp = F.log_softmax(logits[mask], -1), F.log_softmax(ref_logits[mask], -1)
    return token_mean((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean(), batch)


FORGET = {"ga": ga, "npo": npo, "simnpo": simnpo, "dpo": dpo, "undial": undial, "wga": wga, "satimp": satimp,
          "ceu": ceu}
NEEDS_REFERENCE = ("npo", "dpo", "undial")
RETAIN = {"gdr": gdr, "klr": klr, None: None}
# method name -> (forget loss, retain regularizer); every objective is gamma * forget + alpha * retain
# Names mean what open-unlearning's mean (locuslab/open-unlearning@d3d7cf9:configs/trainer/*.yaml): its NPO
# has an NLL retain term; the retain-free NPO of Zhang et al. is NPO_ForgetOnly here.
METHODS = {"GA": ("ga", None), "GradDiff": ("ga", "gdr"), "GA_KLR": ("ga", "klr"), "NPO": ("npo", "gdr"),
           "NPO_ForgetOnly": ("npo", None), "NPO_KLR": ("npo", "klr"), "SimNPO": ("simnpo", "gdr"),
           # open-unlearning's other methods (its names; retain term NLL, weight alpha; UNDIAL's alpha
           # defaults to 0 there: unlearn.per_method.UNDIAL)
           "IdkDPO": ("dpo", "gdr"), "UNDIAL": ("undial", "gdr"), "WGA": ("wga", "gdr"), "SatImp": ("satimp", "gdr"),
           "CE-U": ("ceu", None)}


# open-unlearning's names and our former ones, accepted in recipes and resolved to the names above
ALIASES = {"GradAscent": "GA", "NPO_GDR": "NPO", "DPO": "IdkDPO", "CEU": "CE-U"}


def unlearning_objective(method: str, gamma: float = 1.0, alpha: float = 1.0, ref=None, kl_positions: str = "answer",
                         **hp):
    """-> ``objective(model, batches)`` over the ``forget`` (and ``retain``) streams."""
    from ..errors import UserError

    if method not in METHODS:
        raise UserError(f"unknown method '{method}' (expected one of: {', '.join(METHODS)})")
    f_name, r_name = METHODS[method]
    if alpha == 0:  # no retain term at all (UNDIAL's default): its stream is not even drawn
        r_name = None
    f_loss, r_loss = FORGET[f_name], RETAIN[r_name]

    def forget_term(model, batches):
        return gamma * f_loss(model, batches["forget"], ref=ref, **hp)

    def retain_term(model, batches):
        return alpha * r_loss(model, batches["retain"], ref=ref, positions=kl_positions)

    def objective(model, batches):
        f = forget_term(model, batches)
        return f if r_loss is None else f + retain_term(model, batches)

    # the two terms apart, for the null-space step (each with its own forward and backward)
    objective.forget_term = forget_term
    objective.retain_term = retain_term if r_loss is not None else None
    # the forget term on one batch (saliency, attribution) and the retain NLL (retain Fisher)
    objective.forget_loss = lambda model, batch: f_loss(model, batch, ref=ref, **hp)
    objective.retain_nll = gdr

    objective.needs_ref = f_name in NEEDS_REFERENCE or r_name == "klr"
    objective.alternate = "idk" if f_name == "dpo" else None  # forget batches carry a refusal per question
    objective.streams = ("forget", "retain") if r_loss is not None else ("forget",)
    return objective
