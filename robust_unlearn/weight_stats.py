"""Weight-update statistics against a quantization grid, shared by unlearning (``update_stats`` in a
checkpoint's metadata), the robust planners (``kth_quantile``) and the weight audit
(``metrics.weights``): how far an unlearning update moved each weight, measured in NF4 bins (the
quantity behind "unlearning hides, compression restores": Zhang et al. 2024 report updates 47-828x
below a 4-bit step).

The NF4 bin of a weight w in a block of 64 (bitsandbytes' blocksize, row-major order) with absmax
``a`` is the decision region of its nearest code ``c_i`` (code table from
``bitsandbytes.functional.get_4bit_type("nf4")``): ``a * ((c_{i+1} - c_{i-1}) / 2)``, with the ends
of the table clipped at +-1.
"""
from __future__ import annotations

import torch

from .compress import compressible_linears

BLOCK = 64


def nf4_code() -> torch.Tensor:
    from .compress.quantize import load_bnb  # bitsandbytes with its no-news import notices filtered

    return load_bnb().functional.get_4bit_type("nf4", device="cpu").float()


def nf4_bin_width(w: torch.Tensor, blocksize: int = BLOCK) -> torch.Tensor:
    """Per-element NF4 bin width of ``w`` (same shape), with bitsandbytes' blockwise absmax."""
    code = nf4_code()
    flat = w.detach().float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    x = blocks / absmax
    idx = (x.unsqueeze(-1) - code).abs().argmin(-1)
    mids = torch.cat([torch.tensor([-1.0]), (code[1:] + code[:-1]) / 2, torch.tensor([1.0])])
    width = (mids[idx + 1] - mids[idx]) * absmax
    return width.reshape(-1)[: flat.numel()].view_as(w)


def nf4_codes(w: torch.Tensor, blocksize: int = BLOCK) -> torch.Tensor:
    """NF4 code index of each element under its own block's absmax (bitsandbytes' rounding: nearest)."""
    code = nf4_code()
    flat = w.detach().float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    x = blocks / blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    return (x.unsqueeze(-1) - code).abs().argmin(-1).reshape(-1)[: flat.numel()].view_as(w)


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
        sum_ratio += float((dw / nf4_bin_width(w0)).sum())
        flipped += int((nf4_codes(w0) != nf4_codes(w1)).sum())
    if n == 0:
        return {"modules_changed": 0}
    return {"modules_changed": modules, "mean_abs_dw": sum_dw / n, "mean_dw_over_nf4_bin": sum_ratio / n,
            "frac_changed": changed / n, "frac_nf4_code_changed": flipped / n}


def kth_quantile(x: torch.Tensor, q: float) -> float:
    """The q-quantile of a 1-D tensor by ``kthvalue`` (``torch.quantile`` stops at 2^24 elements)."""
    k = min(max(1, int(round(q * x.numel()))), x.numel())
    return float(x.kthvalue(k).values)
