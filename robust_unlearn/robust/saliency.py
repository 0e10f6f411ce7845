"""Where to put the update: module saliency (SURE), per-weight attribution, retain Fisher, and the
resulting update mask.

- **Module saliency** (SURE, Zhang et al. 2024, "Does your LLM truly unlearn? An embarrassingly simple
  approach to recover unlearned knowledge", sec. 5): ``s_m = || grad_{W_m} L_forget ||_F`` at the
  target weights, the forget loss summed over the whole forget set; the modules at or above the
  ``percentile``-th percentile of ``s`` are salient and the only ones trained.
- **Attribution** (MANSU-style): per weight, ``sum_batches |g_b * w|`` over the forget set, within the
  salient modules (a first-order estimate of how much the forget loss depends on that weight).
- **Retain Fisher**: the diagonal empirical Fisher of the retain loss, ``sum_batches g_b^2`` (batch
  gradients, not per-example ones: one backward pass per batch; a coarser but cheaper estimate).
- **Pruning awareness**: a weight that global magnitude pruning at sparsity ``p`` would zero in the
  target (``|w| <`` the p-quantile of all linear |w|, with a margin) is never updated: pruning would
  zero it in the unlearned model too and the update would be gone.

``build_masks`` combines them: salient modules -> candidates (not prune-vulnerable, not in the top
``fisher_exclude`` by retain Fisher) -> the top ``topk`` fraction of the salient modules' weights by
attribution. Each part is a recipe switch (``robust.*``).
"""
from __future__ import annotations

import logging

import torch
from accelerate.utils import send_to_device

from ..compress import compressible_linears
from ..weight_stats import kth_quantile

log = logging.getLogger(__name__)


def linear_weights(model) -> dict[str, torch.nn.Parameter]:
    """name -> weight of every decoder linear (lm_head excluded), the units saliency ranks."""
    return {f"{n}.weight": m.weight for n, m in compressible_linears(model)}


def _grad_pass(model, loss_fn, loader, names: dict[str, torch.nn.Parameter], reduce) -> None:
    """One backward pass per batch of ``loader``; ``reduce(name, param, grad)`` accumulates."""
    was_training = model.training
    model.eval()  # no dropout: saliency is a property of the target weights
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in names.values():
        p.requires_grad_(True)
    device = next(model.parameters()).device
    try:
        for batch in loader:  # a plain DataLoader's batches are on the CPU; the model may be on a GPU
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, send_to_device(batch, device))
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"saliency: loss is {loss.item()} at the target weights")
            loss.backward()
            for n, p in names.items():
                if p.grad is not None:
                    reduce(n, p, p.grad.detach())
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(req[n])
        model.train(was_training)


def forget_scores(model, forget_loss, loader, attribution: bool = True) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """-> (module saliency: weight name -> ||sum_b g_b||_F, attribution: name -> sum_b |g_b * w|).
    ``forget_loss(model, batch)``: the base method's forget term (e.g. GA's -NLL)."""
    weights = linear_weights(model)
    gsum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in weights.items()}
    attr = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in weights.items()} if attribution else {}

    def reduce(n, p, g):
        gsum[n] += g.float()
        if attribution:
            attr[n] += (g.float() * p.detach().float()).abs()

    _grad_pass(model, forget_loss, loader, weights, reduce)
    return {n: float(g.norm()) for n, g in gsum.items()}, attr


def retain_fisher(model, retain_loss, loader, names: list[str]) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the retain loss (sum of squared batch gradients) for ``names``."""
    weights = {n: p for n, p in linear_weights(model).items() if n in names}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in weights.items()}

    def reduce(n, p, g):
        fisher[n] += g.float() ** 2

    _grad_pass(model, retain_loss, loader, weights, reduce)
    return fisher


def salient_modules(saliency: dict[str, float], percentile: float) -> list[str]:
    """Weight names whose saliency is at or above the ``percentile``-th percentile (0 keeps all)."""
    vals = torch.tensor(list(saliency.values()))
    if percentile <= 0:
        return list(saliency)
    t = float(torch.quantile(vals, percentile / 100.0))
    return [n for n, s in saliency.items() if s >= t]


def prune_threshold(model, sparsity: float) -> float:
    """|w| below which global magnitude pruning at ``sparsity`` zeroes a weight (``compress.prune``)."""
    flat = torch.cat([p.detach().abs().flatten().float() for p in linear_weights(model).values()])
    return kth_quantile(flat, sparsity)


def build_masks(model, salient: list[str], attribution: dict[str, torch.Tensor] | None, topk: float,
                fisher: dict[str, torch.Tensor] | None = None, fisher_exclude: float = 0.0,
                prune_sparsity: float = 0.0, prune_margin: float = 0.1) -> tuple[dict[str, torch.Tensor], dict]:
    """Boolean update masks for the salient weights (see the module docstring) -> (masks, stats)."""
    weights = linear_weights(model)
    cand = {n: torch.ones_like(weights[n], dtype=torch.bool) for n in salient}
    stats: dict = {"salient_modules": len(salient), "salient_params": sum(m.numel() for m in cand.values())}
    if prune_sparsity > 0:
        thr = prune_threshold(model, prune_sparsity) * (1 + prune_margin)
        for n in cand:
            cand[n] &= weights[n].detach().abs() >= thr
        stats["prune_threshold"] = thr
        stats["excluded_prune"] = stats["salient_params"] - sum(int(m.sum()) for m in cand.values())
    if fisher is not None and fisher_exclude > 0:
        allf = torch.cat([fisher[n].flatten() for n in cand])
        t = kth_quantile(allf, 1 - fisher_exclude)
        before = sum(int(m.sum()) for m in cand.values())
        for n in cand:
            cand[n] &= fisher[n] < t
        stats["excluded_fisher"] = before - sum(int(m.sum()) for m in cand.values())
    if attribution is not None and topk < 1.0:
        k = max(1, int(round(topk * stats["salient_params"])))
        scores = torch.cat([torch.where(cand[n], attribution[n], torch.full_like(attribution[n], -1.0)).flatten()
                            for n in cand])
        k = min(k, int((scores >= 0).sum()))
        t = float(scores.topk(k).values.min()) if k > 0 else float("inf")
        for n in cand:
            cand[n] &= attribution[n] >= t
    stats["updated_params"] = sum(int(m.sum()) for m in cand.values())
    return cand, stats
