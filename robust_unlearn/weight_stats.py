"""Weight-update statistics against a quantization grid, shared by unlearning (``update_stats`` in a
checkpoint's metadata), the robust planners (``kth_quantile``) and the weight audit
(``metrics.weights``): how far an unlearning update moved each weight, measured in NF4 bins (the
quantity behind "unlearning hides, compression restores": Zhang et al. 2024 report updates 47-828x
below a 4-bit step). The grid, its codes and bin widths are ``quant``'s (the floor's arithmetic).
"""
from __future__ import annotations

import torch

from .compress import compressible_linears
from .quant import bin_width, codes


@torch.no_grad()
def update_stats(before: dict[str, torch.Tensor], model) -> dict:
    """Statistics of ``model``'s linear weights against ``before`` (name -> tensor of the target),
    over the modules that changed: mean |dw|, mean |dw| / NF4 bin width (of the target weight),
    fraction of weights changed, fraction whose NF4 code changed."""
    n = changed = flipped = 0
    sum_dw = sum_ratio = 0.0
    modules = 0
    for name, mod in compressible_linears(model):
        key = f"{name}.weight"
        if key not in before:
            continue
        w0, w1 = before[key].float(), mod.weight.detach().float().cpu()
        dw = (w1 - w0).abs()
        if not bool((dw > 0).any()):
            continue
        modules += 1
        n += dw.numel()
        changed += int((dw > 0).sum())
        sum_dw += float(dw.sum())
        sum_ratio += float((dw / bin_width(w0, "nf4")).sum())
        flipped += int((codes(w0, "nf4") != codes(w1, "nf4")).sum())
    if n == 0:
        return {"modules_changed": 0}
    return {"modules_changed": modules, "mean_abs_dw": sum_dw / n, "mean_dw_over_nf4_bin": sum_ratio / n,
            "frac_changed": changed / n, "frac_nf4_code_changed": flipped / n}


def kth_quantile(x: torch.Tensor, q: float) -> float:
    """The q-quantile of a 1-D tensor by ``kthvalue`` (``torch.quantile`` stops at 2^24 elements)."""
    k = min(max(1, int(round(q * x.numel()))), x.numel())
    return float(x.kthvalue(k).values)
