"""Global magnitude pruning of linear weights (lm_head excluded) as model -> model."""
from __future__ import annotations

import torch

from .linears import compressible_linears


@torch.no_grad()
def prune_masks(model, fraction: float) -> dict[str, torch.Tensor]:
    """Linear name -> bool mask of the weights global magnitude pruning at ``fraction`` zeroes: exactly
    ``round(fraction * n)`` of the decoder linear weights with the smallest |w| (ties broken by position)."""
    lins = compressible_linears(model)
    sizes = [lin.weight.numel() for _, lin in lins]
    flat = torch.cat([lin.weight.detach().abs().flatten().float() for _, lin in lins])
    k = int(round(fraction * flat.numel()))
    if k == 0:
        return {n: torch.zeros_like(lin.weight, dtype=torch.bool) for n, lin in lins}
    # the k-th smallest |w| is the threshold; below it everything goes, at it the first by position
    # (one selection instead of a top-k of 20-30% of all weights: ~5x faster on 135M weights)
    t = torch.kthvalue(flat, k).values
    drop = flat < t
    tie = (flat == t).nonzero().flatten()[: k - int(drop.sum())]
    drop[tie] = True
    return {n: mask.view_as(lin.weight) for (n, lin), mask in zip(lins, torch.split(drop, sizes))}


@torch.no_grad()
def magnitude_prune(model, fraction: float):
    """Zero the ``fraction`` of decoder linear weights with the smallest |w|, one global threshold
    (``prune_masks``)."""
    drop = prune_masks(model, fraction)
    for n, lin in compressible_linears(model):
        lin.weight.data[drop[n]] = 0
    return model
