"""Global magnitude pruning of linear weights (lm_head excluded) as model -> model."""
from __future__ import annotations

import torch


@torch.no_grad()
def magnitude_prune(model, fraction: float):
    """Zero the ``fraction`` of decoder linear weights with the smallest |w|, one global threshold.
    Exactly ``round(fraction * n)`` weights are zeroed (ties broken by position)."""
    from . import compressible_linears

    lins = [lin for _, lin in compressible_linears(model)]
    sizes = [lin.weight.numel() for lin in lins]
    flat = torch.cat([lin.weight.detach().abs().flatten().float() for lin in lins])
    k = int(round(fraction * flat.numel()))
    if k == 0:
        return model
    drop = torch.zeros(flat.numel(), dtype=torch.bool)
    drop[torch.topk(flat, k, largest=False, sorted=False).indices] = True
    for lin, mask in zip(lins, torch.split(drop, sizes)):
        lin.weight.data[mask.view_as(lin.weight)] = 0
    return model
