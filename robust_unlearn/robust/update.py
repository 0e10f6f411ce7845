"""The robust update, inside the one training loop: SURE's module selection, the retain-protected
sparse mask, the null-space step and the quantization-bin floor.

``plan_update`` runs before training (at the target weights) and returns a :class:`SparseUpdate`,
the step protocol (``engine.Step``) that ``train.train`` calls every step:

- only the masked weights of the salient modules train (frozen parameters get no optimizer state);
- null-space step (``robust_nullspace`` = k > 0): the forget gradient is projected off the span of the
  last k retain gradients (orthonormalised by QR), then the retain gradient is added:
  ``g = (I - Q Q^T) g_forget + g_retain`` — a forget step that, to first order, leaves the recent
  retain losses unchanged (as in gradient-projection continual learning, Saha et al. 2021);
- after each step every weight outside the mask is put back to the target's value exactly (AdamW's
  decoupled weight decay would otherwise move it);
- gradients are masked by tensor hooks (before DDP / DeepSpeed reduce them), and every read or write
  of a whole gradient or weight goes through the training loop's ``Engine`` (plain tensors, or
  DeepSpeed ZeRO's partitioned ones), so the same update runs on one process or many;
- every ``robust_floor_every`` steps (0: only at the end) and at the end, ``finish`` applies the floor (``robust.floor.apply_floor``): every updated weight
  lands in a different quantization bin than the target's under each format named in
  ``robust_floor``, in the dtype the checkpoint is saved in.
"""
from __future__ import annotations

import logging
from collections import deque

import torch

from ..compress import compressible_linears
from ..engine import PLAIN, Step
from ..errors import UserError
from .saliency import build_masks, forget_scores, linear_weights, retain_fisher, salient_modules

log = logging.getLogger(__name__)


class SparseUpdate(Step):
    def __init__(self, model, masks: dict[str, torch.Tensor], nullspace: int = 0, floor: list[str] | None = None,
                 floor_margin: float = 0.2, floor_every: int = 0, qat: bool = False, prune_view: float = 0.0,
                 relearn_view: float = 0.0):
        named = dict(model.named_parameters())
        self.params = {n: named[n] for n in masks}
        self.masks = {n: m.to(named[n].device) for n, m in masks.items()}
        self.nullspace = int(nullspace)
        self.floor = list(floor or [])
        self.floor_margin = floor_margin
        self.floor_every = int(floor_every)
        self.qat = bool(qat)
        if self.qat and len(self.floor) != 1:
            raise UserError(f"robust_qat needs exactly one floor format, got {self.floor}")
        self._model = model if qat else None  # robust_qat registers its parametrizations at start()
        self.prune_view = float(prune_view)
        if self.prune_view and not self.qat:
            raise UserError("robust_prune_view trains through the pruned model's deployed weights: it needs robust_qat")
        self._view: PrunedView | None = None
        self.relearn_view = float(relearn_view)
        if self.relearn_view and not (self.qat and self.nullspace):
            raise UserError("robust_relearn_view takes the forget term at attacked deployed weights: it needs "
                            "robust_qat and the null-space step (robust_nullspace > 0)")
        self._relearn: RelearnView | None = None
        self._steps = 0
        self.w0: dict[str, torch.Tensor] = {}
        self._retain: deque = deque(maxlen=max(self.nullspace, 1))
        self._gf: torch.Tensor | None = None
        self._hooks: list = []
        self._deployed: dict = {}  # robust_qat: weight name -> (module, attribute, its Deployed parametrization)
        self.engine = None
        self._split = False
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)

    @classmethod
    def robust(cls, model, masks: dict[str, torch.Tensor], settings: dict, retain: bool = True) -> "SparseUpdate":
        """Robust_'s update from a method's settings (the ``robust_*`` keys); without a retain stream, no
        null-space step."""
        return cls(model, masks, nullspace=settings["robust_nullspace"] if retain else 0,
                   floor=settings["robust_floor"], floor_margin=settings["robust_floor_margin"],
                   floor_every=settings["robust_floor_every"], qat=settings["robust_qat"],
                   prune_view=settings["robust_prune_view"], relearn_view=settings["robust_relearn_view"])

    @property
    def split_grads(self) -> bool:
        """Whether the loop must back-propagate the forget and retain terms separately."""
        return self.nullspace > 0

    def start(self) -> None:
        """Record the target values (in the dtype training runs in) and mask the gradients by hooks."""
        self.masks = {n: self.masks[n].to(p.device) for n, p in self.params.items()}  # the model may have moved
        self.w0 = {n: p.detach().clone() for n, p in self.params.items()}
        self.engine = PLAIN
        if not self._hooks:
            self._hooks = [p.register_hook(lambda g, m=self.masks[n]: g * m) for n, p in self.params.items()]
        if self.qat and not self._deployed:
            from accelerate.state import PartialState
            from torch.nn.utils import parametrize

            from ..engine import zero_stage

            if PartialState().num_processes > 1 and zero_stage() == 3:
                # its parametrizations read whole weights, which ZeRO-3 partitions (DDP and ZeRO-2: tested)
                raise UserError("robust_qat runs on one process, under DDP or under DeepSpeed ZeRO-2 "
                                "(recipes/accelerate/zero2.yaml), not ZeRO-3; use one of them or set robust_qat false")

            mods = dict(self._model.named_modules())
            for n in self.params:
                owner, _, attr = n.rpartition(".")
                d = Deployed(self.w0[n], self.masks[n], self.floor[0])
                parametrize.register_parametrization(mods[owner], attr, d, unsafe=True)
                self._deployed[n] = (mods[owner], attr, d)
        if self.prune_view and self._view is None:
            self._view = PrunedView(self._model, self.prune_view, self._deployed)
        if self.relearn_view and self._relearn is None:
            from accelerate.state import PartialState

            if PartialState().num_processes > 1:
                raise UserError("robust_relearn_view runs on one process only (its attack step is each process's "
                                "own); run it without accelerate launch or set robust_relearn_view 0")
            self._relearn = RelearnView(self._model, self.relearn_view, self._deployed)

    def attach(self, engine, model=None) -> None:
        """Read and write through ``engine``; with ``model``, follow its parameters (by name)."""
        self.engine = engine
        if model is not None:
            named = dict(model.named_parameters())
            self.params = {n: named[n] if n in named else named[parametrized_name(n)] for n in self.params}
        device = next(iter(self.params.values())).device if self.params else None
        if device is not None and any(m.device != device for m in self.masks.values()):
            self._to(device)

    def _to(self, device) -> None:
        """Masks, target values and the gradient hooks' masks on ``device``, the weights' own. Under DeepSpeed
        ``start`` runs before the engine places the model (on the CPU), and the engine then moves it to the
        process's GPU; after training ZeRO-3 hands the whole model back on the CPU."""
        self.masks = {n: m.to(device) for n, m in self.masks.items()}
        self.w0 = {n: w.to(device) for n, w in self.w0.items()}
        self._retain = deque((g.to(device) for g in self._retain), maxlen=self._retain.maxlen)
        if self._hooks:
            for h in self._hooks:
                h.remove()
            self._hooks = [p.register_hook(lambda g, m=self.masks[n]: g * m) for n, p in self.params.items()]

    def forward(self, objective, model, batches: dict) -> torch.Tensor:
        """The loss; with the null-space step the forget term's gradients are taken here (its own
        forward and backward) and the retain term is kept for ``update``'s backward."""
        self._split = self.split_grads and getattr(objective, "retain_term", None) is not None
        if self._view is not None or self._relearn is not None:
            return self._forward_views(objective, model, batches)
        if not self._split:
            return super().forward(objective, model, batches)
        with self.engine.acc.autocast():
            f_loss = objective.forget_term(model, batches)
        self.take_forget_grads(self.engine.forget_grads(f_loss, self.trained))
        with self.engine.acc.autocast():
            r_loss = objective.retain_term(model, batches)
        self._backward = r_loss
        return f_loss.detach() + r_loss.detach()

    def _forward_views(self, objective, model, batches: dict) -> torch.Tensor:
        """``robust_prune_view`` / ``robust_relearn_view``: the step's loss is the mean over views of the
        model: itself, its pruned view, and (forget term only) its relearned view. Every forward builds
        one graph (a view's weights are tensors of its own, not swapped weights), so one backward sums the
        views' gradients: under DDP and DeepSpeed ZeRO-2 as on one process. With the null-space step the
        forget gradient is the mean of the views' forget gradients, and the retain term the mean of the
        model's and its pruned view's, back-propagated in ``update``."""
        ac = self.engine.acc.autocast
        views = [model] + ([self._view.of(model)] if self._view is not None else [])
        if not self._split:
            if self._relearn is not None:
                raise UserError("robust_relearn_view needs a method with a retain term and robust_nullspace > 0")
            with ac():
                losses = [objective(v, batches) for v in views]
            self._backward = sum(losses) / len(losses)
            return self._backward.detach()
        forget_views = list(views)
        if self._relearn is not None:
            with ac():
                forget_views.append(self._relearn.of(model, batches["retain"]))
        grads, f_loss = [], []
        for v in forget_views:
            with ac():
                f = objective.forget_term(v, batches)
            grads.append(self.engine.forget_grads(f, self.trained))
            f_loss.append(f.detach())
        self.take_forget_grads([sum(g) / len(grads) for g in zip(*grads)])
        with ac():
            r_loss = [objective.retain_term(v, batches) for v in views]
        self._backward = sum(r_loss) / len(r_loss)
        return sum(f_loss) / len(f_loss) + self._backward.detach()

    def update(self, params: list, clip: float | None) -> None:
        """Backward, (null-space step: projected forget + retain gradient), optimizer step, then every
        weight outside the mask back to the target's value (and the floor every ``floor_every`` steps)."""
        self.engine.backward(self._backward)
        self._backward = None
        if self._split:
            self.combine()
        self.engine.step(params, clip)
        self.after_step()

    @property
    def trained(self) -> list:
        return list(self.params.values())

    def state_dict(self) -> dict:
        return {"steps": self._steps, "retain": list(self._retain)}

    def load_state_dict(self, state: dict) -> None:
        self._steps = state["steps"]
        self._retain.clear()
        device = next(iter(self.masks.values())).device if self.masks else None
        self._retain.extend(g.to(device) if device is not None else g for g in state["retain"])

    def _flat(self, grads) -> torch.Tensor:
        return torch.cat([(g[self.masks[n]] if g is not None
                           else torch.zeros(int(self.masks[n].sum()), device=p.device)).float()
                          for (n, p), g in zip(self.params.items(), grads)])

    def _write_grads(self, flat: torch.Tensor) -> None:
        at = 0
        for n, p in self.params.items():
            m = self.masks[n]
            k = int(m.sum())
            g = torch.zeros(m.shape, dtype=p.dtype, device=m.device)
            g[m] = flat[at: at + k].to(p.dtype)
            self.engine.set_grad(p, g)
            at += k

    def take_forget_grads(self, grads: list) -> None:
        """The forget term's gradients (one per trained tensor, averaged over processes): keep the masked part."""
        self._gf = self._flat(grads)

    def combine(self) -> None:
        """After the retain term's backward: grad = projected forget grad + retain grad."""
        gr = self._flat([self.engine.get_grad(p) for p in self.params.values()])
        self._retain.append(gr)
        basis = torch.stack(list(self._retain), dim=1)  # n x k
        q, _ = torch.linalg.qr(basis)
        gf = self._gf - q @ (q.T @ self._gf)
        self._write_grads(gf + gr)
        self._gf = None

    @torch.no_grad()
    def after_step(self) -> None:
        for n, p in self.params.items():
            cur = self.engine.get_param(p)
            self.engine.set_param(p, torch.where(self.masks[n], cur, self.w0[n].to(cur.dtype)))
        self._steps += 1
        if self.floor and self.floor_every and not self.qat and self._steps % self.floor_every == 0:
            self.finish()  # projected steps: training goes on from the floored weights

    @torch.no_grad()
    def finish(self) -> dict:
        """Apply the floor to the current weights (in their dtype) -> floor statistics."""
        stats = {"updated_params": 0, "floor": self.floor}
        get = self.engine.get_param
        if not self.floor:
            stats["updated_params"] = sum(int((get(p) != self.w0[n].to(get(p).dtype)).sum())
                                          for n, p in self.params.items())
            return stats
        if self.qat:
            return self._finish_deployed(stats)
        from .floor import apply_floor

        moved = reverted = 0
        for n, p in self.params.items():
            cur = get(p)
            w0 = self.w0[n].to(cur.dtype)
            changed = self.masks[n] & (cur != w0)
            res = apply_floor(w0, cur, changed, formats=self.floor, margin=self.floor_margin)
            self.engine.set_param(p, res.weight)
            moved += res.n_moved_by_floor
            reverted += res.n_reverted
            stats["updated_params"] += res.n_updated
        stats.update(moved_by_floor=moved, reverted=reverted)
        return stats

    @torch.no_grad()
    def _finish_deployed(self, stats: dict) -> dict:
        """``robust_qat``: the saved weights are what the forward used: each masked weight whose code left
        its target's at its new code's value, every other weight the target's. The parametrizations come
        off. A code that the new block scales would put back (an absmax that moved) is floored, and the
        result snapped onto the codes again (``floor.snap_to_codes`` checks codes and scales)."""
        from torch.nn.utils import parametrize

        from .floor import apply_floor, snap_to_codes

        left = 0
        for n, p in self.params.items():
            mod, attr, d = self._deployed[n]
            eff = d(p.detach().float())
            parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
            w0 = self.w0[n].float()
            upd = eff != w0
            res = apply_floor(w0, eff, upd, formats=self.floor, margin=self.floor_margin)
            weight, _ = snap_to_codes(w0, res.weight, self.floor[0])
            left += int((self.masks[n] & (p.detach().float() != w0)).sum()) - int((weight != w0).sum())
            p.data = weight.to(p.dtype)
            stats["updated_params"] += int((weight != w0).sum())
        self._deployed.clear()
        self._view = self._relearn = None
        stats.update(moved_by_floor=0, reverted=left, qat=True)
        return stats


def parametrized_name(name: str) -> str:
    """The name ``torch.nn.utils.parametrize`` gives a parametrized tensor's original (``robust_qat``)."""
    owner, _, attr = name.rpartition(".")
    return f"{owner}.parametrizations.{attr}.original"


class Deployed(torch.nn.Module):
    """``robust_qat``'s parametrization of one weight: the forward sees ``w0`` wherever the latent weight
    still has its target's code (under ``fmt``, with the latent tensor's own scales), and the value its
    new code dequantizes to where it left it; gradients pass straight through to the latent weight."""

    def __init__(self, w0: torch.Tensor, mask: torch.Tensor, fmt: str):
        super().__init__()
        from ..quant import codes

        self.fmt = fmt
        self.register_buffer("w0", w0.detach().float().clone(), persistent=False)
        self.register_buffer("mask", mask.detach().clone(), persistent=False)
        self.register_buffer("kt", codes(self.w0, fmt), persistent=False)
        self.keep: torch.Tensor | None = None  # set inside a PrunedView: the weights that view keeps
        self.shift: torch.Tensor | None = None  # set inside a RelearnView: the attack's step on the deployed weight

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        from ..quant import codes, dequantized

        with torch.no_grad():
            wf = w.detach().float()
            left = self.mask & (codes(wf, self.fmt) != self.kt)
            eff = torch.where(left, dequantized(wf, self.fmt), self.w0)
            if self.keep is not None:
                eff = eff * self.keep
            eff = eff.to(w.dtype)
        out = w + (eff - w).detach()
        return out if self.shift is None else out + self.shift.to(out.dtype)


def _decoder_linears(model, deployed: dict) -> list:
    """Every decoder linear (``compress.compressible_linears``) as (name, module, its ``Deployed``
    parametrization if it trains under ``robust_qat``, else None)."""
    trained = {id(mod): d for mod, _, d in deployed.values()}
    return [(n, mod, trained.get(id(mod))) for n, mod in compressible_linears(model)]


class PrunedView:
    """``robust_prune_view``: ``view.of(model)`` is ``model`` with every decoder linear weight that
    magnitude pruning at ``sparsity`` zeroes in the target (``compress.prune.prune_masks``) at zero. The
    frozen linears get a pruned copy made once (their weights never change), passed to
    ``torch.func.functional_call``, so a graph through the view holds its own tensors and one backward
    can follow it and the full model's together; the trained ones (``Deployed`` parametrizations)
    multiply their deployed weight by the kept mask during the view's forward. The masked weights sit
    above the threshold (``robust_prune_aware``), so the view never prunes them."""

    def __init__(self, model, sparsity: float, deployed: dict):
        from ..compress.prune import prune_masks

        drop = prune_masks(model, sparsity)  # at the target: the trained weights' parametrizations give w0
        self._pruned: dict[int, torch.Tensor] = {}  # id(frozen weight) -> its pruned copy
        self._deployed = []
        for n, mod, d in _decoder_linears(model, deployed):
            if d is not None:
                self._deployed.append((d, ~drop[n]))
            else:
                self._pruned[id(mod.weight)] = mod.weight.detach().masked_fill(drop[n], 0.0)
        self._of: dict[int, _Viewed] = {}

    def of(self, model) -> "_Viewed":
        """``model`` (or the DDP / DeepSpeed engine around it) seen through the view, for objectives: its
        parameter names map to the pruned copies, on each weight's device and in its dtype."""
        key = id(model)
        if key not in self._of:
            named = {n: self._pruned[id(p)].to(device=p.device, dtype=p.dtype)
                     for n, p in model.named_parameters() if id(p) in self._pruned}
            keep = [(d, "keep", k.to(d.w0.device)) for d, k in self._deployed]
            self._of[key] = _Viewed(model, named, keep)
        return self._of[key]


class RelearnView:
    """``robust_relearn_view`` = alpha: ``view.of(model, retain_batch)`` is ``model`` at the weights a
    relearning attack reaches in one simulated step: every decoder linear weight (the deployed value
    for the trained ones) moves by ``alpha`` against the sign of its gradient of the retain NLL on that
    batch. Adam's first steps move each weight by about its lr, so ``alpha`` ~ the attack's steps x lr
    (``sweep.relearn``: 10 x 1e-4 = 1e-3). The step's forget term is also taken there, first-order as
    in sharpness-aware minimisation (Foret et al. 2021; for unlearning against relearning, Fan et al.
    2025, arXiv 2502.05374): the attack step itself is not differentiated."""

    def __init__(self, model, alpha: float, deployed: dict):
        self.alpha = float(alpha)
        linears = _decoder_linears(model, deployed)
        self._frozen = {id(mod.weight) for _, mod, d in linears if d is None}
        self._deployed = [d for _, _, d in linears if d is not None]

    def of(self, model, retain_batch: dict) -> "_Viewed":
        from ..methods.losses import gdr

        named = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters() if id(p) in self._frozen}
        shifts = [torch.zeros_like(d.w0, requires_grad=True) for d in self._deployed]
        probe = _Viewed(model, named, [(d, "shift", z) for d, z in zip(self._deployed, shifts)])
        with torch.enable_grad():
            leaves = list(named.values()) + shifts
            grads = torch.autograd.grad(gdr(probe, retain_batch), leaves, allow_unused=True)
        step = [torch.zeros_like(t) if g is None else -self.alpha * torch.sign(g) for t, g in zip(leaves, grads)]
        moved = {n: (t + s).detach() for (n, t), s in zip(named.items(), step)}
        return _Viewed(model, moved, [(d, "shift", s.detach()) for d, s in zip(self._deployed, step[len(named):])])


class _Viewed:
    """A model called with some weights replaced (``torch.func.functional_call``) and some attributes
    set for the call (``(object, name, value)``, back to None after it); every other attribute is the
    model's."""

    def __init__(self, model, tensors: dict, attrs: list):
        self._model, self._tensors, self._attrs = model, tensors, attrs

    def __call__(self, *args, **kwargs):
        for obj, name, value in self._attrs:
            setattr(obj, name, value)
        try:
            return torch.func.functional_call(self._model, self._tensors, args, kwargs, strict=False)
        finally:
            for obj, name, _ in self._attrs:
                setattr(obj, name, None)

    def __getattr__(self, name):
        return getattr(self._model, name)


def floor_merged_delta(model, w0: dict[str, torch.Tensor], names: list[str], topk: float, formats: list[str],
                       margin: float) -> dict:
    """The floor on a merged LoRA delta (``Robust_`` with ``unlearn.lora``). The delta W - W0 of each
    adapted weight is dense and low-rank, so flooring all of it would move every weight of the module by
    a bin. Its ``topk`` share of largest |W - W0| is kept and floored (each of those weights lands in
    another quantization bin than the target's under every format in ``formats``); the rest of the
    weight goes back to the target, bit for bit (``apply_floor`` outside its mask). -> statistics."""
    from .floor import apply_floor

    stats = {"updated_params": 0, "moved_by_floor": 0, "reverted": 0, "floor": list(formats),
             "lora_delta_kept": topk}
    params = dict(model.named_parameters())
    for n in names:
        p = params[n]
        cur = p.detach()
        target = w0[n].to(device=cur.device, dtype=cur.dtype)
        delta = (cur.float() - target.float()).abs()
        k = max(1, int(round(topk * delta.numel())))
        thresh = torch.topk(delta.flatten(), k).values[-1]
        mask = (delta >= thresh) & (delta > 0)
        res = apply_floor(target, cur, mask, formats=formats, margin=margin)
        with torch.no_grad():
            p.copy_(res.weight)
        stats["updated_params"] += res.n_updated
        stats["moved_by_floor"] += res.n_moved_by_floor
        stats["reverted"] += res.n_reverted
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
        update = SparseUpdate.robust(model, masks, settings, retain="retain" in datasets)
    stats["salient"] = salient
    stats["saliency_top"] = sorted(saliency.items(), key=lambda kv: -kv[1])[:10]
    log.info("update plan: %d salient modules, %d weights to update", stats["salient_modules"], stats["updated_params"])
    return update, stats
