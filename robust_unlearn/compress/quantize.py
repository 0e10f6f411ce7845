"""Weight quantization as model -> model: bitsandbytes 4-bit (NF4/FP4) and round-to-nearest int-N."""
from __future__ import annotations

import torch


@torch.no_grad()
def bnb_4bit(model, quant_type: str = "nf4", double_quant: bool = False, blocksize: int = 64):
    """Quantize every decoder linear weight with bitsandbytes' ``quantize_4bit`` and write back its
    ``dequantize_4bit`` (blocks of 64 along the flattened weight, absmax scale per block)."""
    import bitsandbytes.functional as F

    from . import compressible_linears

    for _, lin in compressible_linears(model):
        w = lin.weight.data
        q, state = F.quantize_4bit(w.float().contiguous(), blocksize=blocksize, quant_type=quant_type,
                                   compress_statistics=double_quant)
        lin.weight.data = F.dequantize_4bit(q, state).to(w.dtype).view_as(w)
    return model


def rtn_tensor(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Zhang et al. 2024, eq. 2: Q(w) = D * round(w / D), D = max|w| / 2^(N-1), per output channel
    (row) or per group of ``group_size`` consecutive input weights of a row."""
    out_f, in_f = w.shape
    x = w.float()
    if group_size:
        pad = (-in_f) % group_size
        x = torch.nn.functional.pad(x, (0, pad)).view(out_f, -1, group_size)
    else:
        x = x.view(out_f, 1, in_f)
    d = x.abs().amax(dim=-1, keepdim=True) / 2 ** (bits - 1)
    d = torch.where(d == 0, torch.ones_like(d), d)
    q = (torch.round(x / d) * d).view(out_f, -1)[:, :in_f]
    return q.to(w.dtype)


@torch.no_grad()
def rtn(model, bits: int, group_size: int | None = None):
    from . import compressible_linears

    for _, lin in compressible_linears(model):
        lin.weight.data = rtn_tensor(lin.weight.data, bits, group_size)
    return model
