"""LoRA unlearning with ``peft`` (``unlearn.lora: {r, alpha, dropout, targets}``, r 0 = off).

Adapters go on the decoder linears whose last name part is in ``targets`` (SURE_: on the salient
modules its saliency chooses instead). Only the adapters train. A method that needs a frozen reference
(NPO, DPO, UNDIAL, KL) gets the base model with the adapters disabled (``AdapterOff``), so there is no
second copy. After training the adapters are merged into the weights (W + (alpha / r) B A,
``merge_and_unload``), so the floor, the saved checkpoint and the sweep see an ordinary model. Robust_
then floors the largest ``robust_topk`` share of each adapted weight's merged delta
(``robust.update.floor_merged_delta``); RMU refuses adapters.
"""
from __future__ import annotations

import torch

from .compress.linears import compressible_linears
from .errors import UserError


def lora_enabled(settings: dict) -> bool:
    return bool((settings.get("lora") or {}).get("r"))


def target_modules(model, settings: dict, salient: list[str] | None = None) -> list[str]:
    """Full names of the linears that get adapters: SURE's salient modules, else those whose last name
    part is in ``lora.targets``."""
    if salient is not None:
        return sorted({n[: -len(".weight")] if n.endswith(".weight") else n for n in salient})
    wanted = set(settings["lora"]["targets"])
    names = [n for n, _ in compressible_linears(model) if n.rsplit(".", 1)[-1] in wanted]
    if not names:
        raise UserError(f"unlearn.lora.targets {sorted(wanted)} match no linear layer of the model "
                        "(expected module names such as q_proj, v_proj, down_proj)")
    return names


def add_adapters(model, settings: dict, targets: list[str]):
    """-> the peft model, only its adapter weights trainable."""
    from peft import LoraConfig, get_peft_model

    lo = settings["lora"]
    config = LoraConfig(r=int(lo["r"]), lora_alpha=float(lo["alpha"]), lora_dropout=float(lo["dropout"]),
                        target_modules=targets, bias="none")
    peft_model = get_peft_model(model, config)
    freeze_all_but_adapters(peft_model)
    return peft_model


def freeze_all_but_adapters(peft_model) -> None:
    for n, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in n)


def merge(peft_model):
    """The adapters merged into their base weights -> the plain model."""
    return peft_model.merge_and_unload()


class AdapterOff(torch.nn.Module):
    """The reference of a LoRA run: the same model with its adapters disabled (no second copy)."""

    def __init__(self, peft_model):
        super().__init__()
        self.__dict__["peft_model"] = peft_model  # not a submodule: its parameters are the trained model's

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter(), torch.no_grad():
            return self.peft_model(*args, **kwargs)
