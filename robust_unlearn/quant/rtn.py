"""Round-to-nearest int-N (Zhang et al. 2024, eq. 2) as model -> model. No library implements the
paper's grid (``[-2^(N-1), 2^(N-1)]``, 2^N + 1 levels), so it is written here; ``formats.codes``
computes the same codes."""
from __future__ import annotations

import torch

from ..compress.linears import compressible_linears


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
    for _, lin in compressible_linears(model):
        lin.weight.data = rtn_tensor(lin.weight.data, bits, group_size)
    return model
