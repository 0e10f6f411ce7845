"""Global magnitude pruning of linear weights (lm_head excluded) as model -> model."""
from __future__ import annotations

import torch

from .linears import compressible_linears


@torch.no_grad()
def magnitude_prune(model, fraction: float):
    """Zero the ``fraction`` of decoder linear weights with the smallest |w|, one global threshold.
    Exactly ``round(fraction * n)`` weights are zeroed (ties broken by position)."""
    lins = [lin for _, lin in compressible_linears(model)]
    sizes = [lin.weight.numel() for lin in lins]
    flat = torch.cat([lin.weight.detach().abs().flatten().float() for lin in lins])
    k = int(round(fraction * flat.numel()))
    if k == 0:
        return model
    # the k-th smallest |w| is the threshold; below it everything goes, at it the first by position
    # (one selection instead of a top-k of 20-30% of all weights: ~5x faster on 135M weights)
    t = torch.kthvalue(flat, k).values
    drop = flat < t
    tie = (flat == t).nonzero().flatten()[: k - int(drop.sum())]
    drop[tie] = True
    for lin, mask in zip(lins, torch.split(drop, sizes)):
        lin.weight.data[mask.view_as(lin.weight)] = 0
    return model
