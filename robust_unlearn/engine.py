"""The interface between the training loop (``train.train``) and an update rule.

- :class:`Engine`: the gradients and weights of whatever accelerate's ``prepare`` returned (plain
  torch, DDP, DeepSpeed ZeRO), read and written through one interface; :data:`PLAIN` is the same
  interface for an ordinary module outside any engine.
- :class:`Step`: the step protocol the loop calls every step: ``forward`` (the loss), then, once the
  loop has checked that the loss is finite, ``update`` (backward and optimizer step). The default is
  the plain step; ``robust.update.SparseUpdate`` is a masked, retain-projected one.

Both ``train`` and ``robust`` import this module (and it imports neither).
"""
from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType


def zero_stage() -> int:
    """The DeepSpeed ZeRO stage this process trains under, from accelerate's state (0 without one). Read
    it once an ``Accelerator`` exists: an ``AcceleratorState`` made before it would lack the plugin."""
    from accelerate.state import AcceleratorState, is_initialized

    if not is_initialized():
        return 0
    plugin = getattr(AcceleratorState(), "deepspeed_plugin", None)
    return int(plugin.zero_stage or 0) if plugin is not None else 0


class _Plain:
    """Whole gradients and weights of a model outside any engine (plain torch, DDP): ``p.grad``, ``p.data``."""

    deepspeed, zero_stage = False, 0

    def get_grad(self, p):
        return p.grad

    def set_grad(self, p, g):
        p.grad = g

    def get_param(self, p):
        return p.data

    @torch.no_grad()
    def set_param(self, p, value):
        p.data = value.to(p.dtype)


class Engine(_Plain):
    """Gradients and weights of whatever ``prepare`` returned, through one interface.

    Plain torch and DDP keep full tensors in ``p.grad`` / ``p.data``; a DeepSpeed ZeRO engine keeps the
    gradients and the fp32 master weights in its optimizer's partitions, read and written with
    ``deepspeed.utils.safe_get_full_grad`` / ``safe_set_full_grad`` / ``safe_get_full_fp32_param`` /
    ``safe_set_full_fp32_param`` (collective: every process calls them in the same order).
    """

    def __init__(self, acc: Accelerator, model, opt):
        self.acc, self.model, self.opt = acc, model, opt
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        self.zero_stage = int(acc.state.deepspeed_plugin.zero_stage) if self.deepspeed else 0

    def backward(self, loss) -> None:
        if self.deepspeed:
            self.model.backward(loss)  # the engine's backward, without accelerate's implied step
        else:
            self.acc.backward(loss)

    def forget_grads(self, loss, params: list) -> list:
        """Gradients of ``loss`` for ``params``, averaged over processes, then cleared from the model."""
        if self.deepspeed:  # through the engine (its hooks own the gradients), read back, cleared
            self.model.backward(loss)
            grads = [self.get_grad(p).detach().clone() for p in params]
            self.model.optimizer.zero_grad(set_to_none=True)
            return grads
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if self.acc.num_processes > 1:
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            flat = self.acc.reduce(flat, "mean")
            out, at = [], 0
            for g in grads:
                out.append(flat[at: at + g.numel()].view_as(g).to(g.dtype))
                at += g.numel()
            grads = out
        return grads

    def step(self, params: list, clip: float | None) -> None:
        if self.deepspeed:
            self.model.step()  # clipping (from the config), optimizer step, zero grad
            return
        if clip:
            self.acc.clip_grad_norm_(params, clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def get_grad(self, p):
        if not self.deepspeed:
            return super().get_grad(p)
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(p)

    def set_grad(self, p, g) -> None:
        if not self.deepspeed:
            return super().set_grad(p, g)
        from deepspeed.utils import safe_set_full_grad

        safe_set_full_grad(p, g.to(torch.float32))

    def get_param(self, p):
        if not self.deepspeed:
            return super().get_param(p)
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p)

    @torch.no_grad()
    def set_param(self, p, value) -> None:
        """Write a whole weight: DeepSpeed's fp32 master and the module's copy (gathered under ZeRO-3)."""
        if not self.deepspeed:
            return super().set_param(p, value)
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value.float())
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value.to(p.dtype))
        else:
            p.data.copy_(value.to(p.dtype))


PLAIN = _Plain()


class Step:
    """The plain training step, and the protocol every step rule follows. ``train`` calls:

    - ``start()`` once, on the whole model before ``prepare`` (no optimizer yet);
    - ``attach(engine)`` after ``prepare`` (and ``attach(PLAIN, model)`` after training, with the
      unwrapped model);
    - per step ``loss = forward(objective, model, batches)``, checks the loss is finite, then
      ``update(params, clip)``;
    - ``state_dict()`` / ``load_state_dict()`` for resumable states (None: nothing to save).
    """

    engine = None

    def start(self) -> None:
        pass

    def attach(self, engine, model=None) -> None:
        self.engine = engine

    def forward(self, objective, model, batches: dict) -> torch.Tensor:
        """The step's loss (what is logged); keeps what ``update`` back-propagates."""
        with self.engine.acc.autocast():
            self._backward = objective(model, batches)
        return self._backward

    def backward(self) -> None:
        """Backward of what ``forward`` kept, gradients accumulating (a micro-batch of ``unlearn.grad_accum``)."""
        self.engine.backward(self._backward)
        self._backward = None

    def update(self, params: list, clip: float | None) -> None:
        """Backward of what ``forward`` kept, then the optimizer step."""
        self.backward()
        self.engine.step(params, clip)

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass
