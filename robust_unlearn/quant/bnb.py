"""bitsandbytes' quantizers as model -> model (4-bit NF4/FP4, LLM.int8()) and their codes, the
cross-check of ``formats.codes`` (``formats.library_codes``)."""
from __future__ import annotations

import logging

import torch

from ..compress.linears import compressible_linears


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record) -> bool:
        return not any(f in str(record.msg) for f in self.fragments)


# bitsandbytes notices that are no news here: on import, that the optional `kernels` package (a faster
# CPU 4-bit gemm, which we do not use: 4-bit weights are dequantized) is missing; on every int8 matmul
# with fp32 inputs, that they are cast to fp16 (LLM.int8 quantizes activations from fp16 by design).
_BNB_FILTERS = {"bitsandbytes.backends.cpu.ops": _DropMessages("kernels-community"),
                "bitsandbytes.autograd._functions": _DropMessages("inputs will be cast")}


def quiet_bnb() -> None:
    """Filter the notices above out, wherever bitsandbytes is imported from (peft imports it too)."""
    for name, flt in _BNB_FILTERS.items():
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)


def load_bnb():
    """``import bitsandbytes`` with the notices above filtered out."""
    quiet_bnb()
    import bitsandbytes

    return bitsandbytes


@torch.no_grad()
def bnb_4bit(model, quant_type: str = "nf4", double_quant: bool = False, blocksize: int = 64):
    """Quantize every decoder linear weight with bitsandbytes' ``quantize_4bit`` and write back its
    ``dequantize_4bit`` (blocks of 64 along the flattened weight, absmax scale per block)."""
    F = load_bnb().functional

    for _, lin in compressible_linears(model):
        w = lin.weight.data
        q, state = F.quantize_4bit(w.float().contiguous(), blocksize=blocksize, quant_type=quant_type,
                                   compress_statistics=double_quant)
        lin.weight.data = F.dequantize_4bit(q, state).to(w.dtype).view_as(w)
    return model


@torch.no_grad()
def bnb_int8(model, threshold: float = 6.0):
    """LLM.int8() (Dettmers et al. 2022) with bitsandbytes itself: every decoder linear becomes a
    ``bnb.nn.Linear8bitLt`` (``has_fp16_weights=False``) holding the same weights, which bitsandbytes
    quantizes to int8 per output row (absmax) when the module is moved to its device. In the forward
    pass activations are cast to fp16 and quantized per row to int8, except the input columns with an
    |x| >= ``threshold`` outlier, which are multiplied in the activations' precision against the
    dequantized weight columns (the mixed-precision decomposition); outputs keep the input dtype."""
    bnb = load_bnb()

    for name, lin in compressible_linears(model):
        device = lin.weight.device
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False, threshold=threshold, device="meta")
        q.weight = bnb.nn.Int8Params(lin.weight.data.detach().to("cpu", copy=True), requires_grad=False,
                                     has_fp16_weights=False)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data.detach().clone(), requires_grad=False)
        q = q.to(device)  # Int8Params.to quantizes a not-yet-int8 weight (bnb's int8_vectorwise_quant)
        if q.weight.dtype != torch.int8:
            raise RuntimeError(f"bitsandbytes did not quantize {name} (weight dtype {q.weight.dtype})")
        q.train(lin.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model


def bnb_4bit_values(w: torch.Tensor, quant_type: str, blocksize: int) -> torch.Tensor:
    """Per element (flat): the table value of bitsandbytes' own 4-bit code (``quantize_4bit``; two
    codes per byte, the first element in the high nibble). fp4's +0 / -0 codes compare equal."""
    F = load_bnb().functional
    n = w.numel()
    packed, _ = F.quantize_4bit(w.detach().float().contiguous(), blocksize=blocksize, quant_type=quant_type)
    p = packed.reshape(-1).view(torch.uint8)
    nib = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n].long()
    table = F.get_4bit_type(quant_type, device=w.device).float()
    return table[nib]


def bnb_int8_codes(w2d: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' LLM.int8 weight codes (flat): ``int8_vectorwise_quant`` of the fp16 [rows, cols] weight."""
    F = load_bnb().functional
    cb, _, _ = F.int8_vectorwise_quant(w2d.detach().to(torch.float16).contiguous())
    return cb.reshape(-1)
