"""RMU, Representation Misdirection for Unlearning (Li et al. 2024, "The WMDP Benchmark", sec. 5).

On forget data the activations of one layer ``l`` are pushed toward a fixed random direction
``c * u`` (u uniform in [0, 1)^d, normalised; c the steering coefficient); on retain data they are
held to the frozen model's activations at the same layer:

    L = gamma * mean ||h_l(x_f) - c u||^2  +  alpha * mean ||h_l(x_r) - h_l^frozen(x_r)||^2

(mean squared error over hidden units and answer tokens). Plain RMU trains only the parameters named
by a regex: by default the MLP down-projections of layers l-2..l, as open-unlearning's RMU
(``model.layers.(5|6|7).mlp.down_proj.weight``, layer 7); ``SURE_RMU`` / ``Robust_RMU`` choose them by
saliency instead (``robust.update.plan_update``), like every other base method. The forward pass stops
at layer ``l``: nothing after it can change the loss (so saliency is zero there).

The objective has the interface of ``losses.unlearning_objective``: the two terms apart
(``forget_term`` / ``retain_term``, for the null-space step), the forget term on one batch
(``forget_loss``, saliency) and the retain NLL (``retain_nll``, the retain Fisher).
"""
from __future__ import annotations

import re

import torch

from ..data.collate import IGNORE
from ..errors import UserError
from .losses import gdr, token_mean


class _Stop(Exception):
    pass


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers (``model.model.layers`` for Llama-style models)."""
    base = getattr(model, "module", model)
    for name, mod in base.named_modules():
        if name.endswith("layers") and isinstance(mod, torch.nn.ModuleList):
            return mod
    raise UserError("RMU: the model has no '*.layers' ModuleList of decoder layers")


def find_layer(model, index: int) -> torch.nn.Module:
    """Decoder layer ``index`` (``model.model.layers[index]`` for Llama-style models)."""
    layers = decoder_layers(model)
    if not -len(layers) <= index < len(layers):
        raise UserError(f"unlearn.rmu_layer {index} is out of range: the model has {len(layers)} layers")
    return layers[index]


def layer_activations(model, batch: dict, layer: torch.nn.Module) -> torch.Tensor:
    """Output hidden states of ``layer`` ([batch, tokens, hidden]); the rest of the forward is skipped
    (except under DeepSpeed ZeRO-3, whose parameter prefetching expects every forward to complete)."""
    captured = {}
    zero3 = hasattr(next(layer.parameters()), "ds_id")

    def hook(_mod, _inp, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out
        if not zero3:
            raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


def _masked_mse(h: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    mask = labels != IGNORE
    diff = (h.float() - target.float())[mask]
    return (diff ** 2).mean() if diff.numel() else h.sum() * 0.0


def set_trainable(model, pattern: str) -> list[str]:
    """requires_grad only for parameters whose full name matches ``pattern`` (re.fullmatch)."""
    rx = re.compile(pattern)
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(rx.fullmatch(name)))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise UserError(f"unlearn.rmu_params '{pattern}' matches no parameter of the model "
                        f"(e.g. {next(iter(dict(model.named_parameters())))})")
    return names


def rmu_objective(model, ref, layer: int = 7, steering: float = 20.0, gamma: float = 1.0, alpha: float = 1.0,
                  seed: int = 0):
    """-> ``objective(model, batches)`` over the ``forget`` and ``retain`` streams."""
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden, generator=gen)
    control = steering * u / u.norm()
    ref_layer = find_layer(ref, layer)
    find_layer(model, layer)  # range check now, not at the first step

    def steer(m, batch):  # the forget term on one batch (before gamma)
        h_f = layer_activations(m, batch, find_layer(m, layer))
        return token_mean(_masked_mse(h_f, control.to(h_f.device).expand_as(h_f), batch["labels"]), batch)

    def forget_term(m, batches):
        return gamma * steer(m, batches["forget"])

    def retain_term(m, batches):
        r = batches["retain"]
        h_r = layer_activations(m, r, find_layer(m, layer))
        with torch.no_grad():
            now = ref.current() if hasattr(ref, "current") else ref  # methods.unlearn.SharedReference
            h_ref = layer_activations(now, r, ref_layer if now is ref else find_layer(now, layer))
        return alpha * token_mean(_masked_mse(h_r, h_ref, r["labels"]), r)

    def objective(m, batches):
        return forget_term(m, batches) + retain_term(m, batches)

    objective.forget_term = forget_term
    objective.retain_term = retain_term
    objective.forget_loss = steer
    objective.retain_nll = gdr
    objective.needs_ref = True
    objective.streams = ("forget", "retain")
    return objective
