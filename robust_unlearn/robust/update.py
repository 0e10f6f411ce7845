"""The robust update, inside the one training loop: SURE's module selection, the retain-protected
sparse mask, the null-space step and the quantization-bin floor.

``plan_update`` runs before training (at the target weights) and returns a :class:`SparseUpdate`
that ``train.train`` calls around every optimizer step:

- only the masked weights of the salient modules train (frozen parameters get no optimizer state);
- null-space step (``robust_nullspace`` = k > 0): the forget gradient is projected off the span of the
  last k retain gradients (orthonormalised by QR), then the retain gradient is added:
  ``g = (I - Q Q^T) g_forget + g_retain`` — a forget step that, to first order, leaves the recent
  retain losses unchanged (as in gradient-projection continual learning, Saha et al. 2021);
- after each step every weight outside the mask is put back to the target's value exactly (AdamW's
  decoupled weight decay would otherwise move it);
- every ``robust_floor_every`` steps (0: only at the end) and at the end, ``finish`` applies the floor (``robust.floor.apply_floor``): every updated weight
  lands in a different quantization bin than the target's under each format named in
  ``robust_floor``, in the dtype the checkpoint is saved in.
"""
from __future__ import annotations

import logging
from collections import deque

import torch

from .saliency import build_masks, forget_scores, linear_weights, retain_fisher, salient_modules

log = logging.getLogger(__name__)


class SparseUpdate:
    def __init__(self, model, masks: dict[str, torch.Tensor], nullspace: int = 0, floor: list[str] | None = None,
                 floor_margin: float = 0.2, floor_every: int = 0):
        named = dict(model.named_parameters())
        self.params = {n: named[n] for n in masks}
        self.masks = {n: m.to(named[n].device) for n, m in masks.items()}
        self.nullspace = int(nullspace)
        self.floor = list(floor or [])
        self.floor_margin = floor_margin
        self.floor_every = int(floor_every)
        self._steps = 0
        self.w0: dict[str, torch.Tensor] = {}
        self._retain: deque = deque(maxlen=max(self.nullspace, 1))
        self._gf: torch.Tensor | None = None
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)

    @property
    def split_grads(self) -> bool:
        """Whether the loop must back-propagate the forget and retain terms separately."""
        return self.nullspace > 0

    def start(self) -> None:
        """Record the target values (in the dtype training runs in)."""
        self.w0 = {n: p.detach().clone() for n, p in self.params.items()}

    def _flat_grads(self) -> torch.Tensor:
        return torch.cat([(p.grad[self.masks[n]] if p.grad is not None
                           else torch.zeros(int(self.masks[n].sum()), device=p.device, dtype=p.dtype)).float()
                          for n, p in self.params.items()])

    def _write_grads(self, flat: torch.Tensor) -> None:
        at = 0
        for n, p in self.params.items():
            m = self.masks[n]
            k = int(m.sum())
            g = torch.zeros_like(p)
            g[m] = flat[at: at + k].to(p.dtype)
            p.grad = g
            at += k

    def take_forget_grads(self) -> None:
        """After the forget term's backward: keep its masked gradient, clear the grads."""
        self._gf = self._flat_grads()
        for p in self.params.values():
            p.grad = None

    def combine(self) -> None:
        """After the retain term's backward: grad = projected forget grad + retain grad."""
        gr = self._flat_grads()
        self._retain.append(gr)
        basis = torch.stack(list(self._retain), dim=1)  # n x k
        q, _ = torch.linalg.qr(basis)
        gf = self._gf - q @ (q.T @ self._gf)
        self._write_grads(gf + gr)
        self._gf = None

    def mask_grads(self) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[n])

    @torch.no_grad()
    def after_step(self) -> None:
        for n, p in self.params.items():
            p.data = torch.where(self.masks[n], p.data, self.w0[n])
        self._steps += 1
        if self.floor and self.floor_every and self._steps % self.floor_every == 0:
            self.finish()  # projected steps: training goes on from the floored weights

    @torch.no_grad()
    def finish(self) -> dict:
        """Apply the floor to the current weights (in their dtype) -> floor statistics."""
        stats = {"updated_params": 0, "floor": self.floor}
        if not self.floor:
            stats["updated_params"] = sum(int((p.data != self.w0[n]).sum()) for n, p in self.params.items())
            return stats
        from .floor import apply_floor

        moved = reverted = 0
        for n, p in self.params.items():
            changed = self.masks[n] & (p.data != self.w0[n])
            res = apply_floor(self.w0[n], p.data, changed, formats=self.floor, margin=self.floor_margin)
            p.data = res.weight
            moved += res.n_moved_by_floor
            reverted += res.n_reverted
            stats["updated_params"] += res.n_updated
        stats.update(moved_by_floor=moved, reverted=reverted)
        return stats


def plan_update(model, objective, datasets: dict, settings: dict, robust: bool, seed: int = 0) -> tuple[SparseUpdate, dict]:
    """Saliency (and for ``robust``: attribution, retain Fisher, pruning awareness) at the target
    weights -> the :class:`SparseUpdate` to train with, and its statistics for the checkpoint metadata."""
    def loader(name):
        ds = datasets[name]
        gen = torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(ds, batch_size=settings["batch_size"], shuffle=False,
                                           collate_fn=ds.collate, generator=gen)

    saliency, attribution = forget_scores(model, objective.forget_loss, loader("forget"), attribution=robust)
    salient = salient_modules(saliency, settings["sure_percentile"])
    if not robust:
        masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in linear_weights(model).items() if n in salient}
        stats = {"salient_modules": len(salient), "updated_params": sum(m.numel() for m in masks.values())}
        update = SparseUpdate(model, masks)
    else:
        fisher = None
        if settings["robust_fisher_exclude"] > 0 and "retain" in datasets:
            fisher = retain_fisher(model, objective.retain_nll, loader("retain"), salient)
        masks, stats = build_masks(model, salient, attribution, settings["robust_topk"], fisher,
                                   settings["robust_fisher_exclude"], settings["robust_prune_aware"])
        update = SparseUpdate(model, masks, nullspace=settings["robust_nullspace"] if "retain" in datasets else 0,
                              floor=settings["robust_floor"], floor_margin=settings["robust_floor_margin"],
                              floor_every=settings["robust_floor_every"])
    stats["salient"] = salient
    stats["saliency_top"] = sorted(saliency.items(), key=lambda kv: -kv[1])[:10]
    log.info("update plan: %d salient modules, %d weights to update", stats["salient_modules"], stats["updated_params"])
    return update, stats
