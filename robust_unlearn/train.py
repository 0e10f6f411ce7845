"""The one training loop (accelerate ``Accelerator``), shared by fine-tuning and every objective.

Precision: ``fp32``; ``mixed`` = bf16 autocast compute with fp32 master weights and optimizer state;
``bf16`` = weights and optimizer state in bf16 (as when a bf16-loaded model is trained directly).
A non-finite loss stops the run with :class:`TrainingDiverged` before anything is saved.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from .errors import TrainingDiverged

MIXED = {"fp32": "no", "mixed": "bf16", "bf16": "no"}


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of similar length with random composition and order each epoch: shuffle, cut into
    chunks of ``group`` batches, sort each chunk by length, batch it, shuffle the batches.

    Padding is wasted compute (about 30% on the built-in benchmark with random batches).
    transformers' ``LengthGroupedSampler`` sorts mega-batches of 50 batches, so on a dataset of a few
    hundred rows it would give the same batches in the same order every epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator, group: int = 4):
        self.lengths, self.batch_size, self.gen, self.group = lengths, batch_size, generator, group

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        perm = torch.randperm(len(self.lengths), generator=self.gen).tolist()
        chunk = self.batch_size * self.group
        batches = []
        for s in range(0, len(perm), chunk):
            part = sorted(perm[s: s + chunk], key=lambda i: self.lengths[i])
            batches += [part[j: j + self.batch_size] for j in range(0, len(part), self.batch_size)]
        order = torch.randperm(len(batches), generator=self.gen).tolist()
        return iter([batches[i] for i in order])


def make_accelerator(precision: str) -> Accelerator:
    from accelerate.state import AcceleratorState, PartialState

    # One process may train several stages with different precisions (fine-tune in bf16 autocast,
    # then unlearn in fp32): accelerate keeps one global state, so a single-process state is reset.
    # Under `accelerate launch` with several processes the launcher's settings win.
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=MIXED[precision], cpu=not torch.cuda.is_available())


def train(model, objective: Callable, datasets: dict, cfg: dict, seed: int = 0, desc: str = "train",
          primary: str = "train", accelerator: Accelerator | None = None,
          stop: Callable[[torch.nn.Module, int], bool] | None = None, constraint=None):
    """Run ``cfg['epochs']`` passes over ``datasets[primary]`` (or ``cfg['steps']`` optimizer steps
    when set); the other streams are cycled. ``stop(model, step)``, called every
    ``cfg['stop_every']`` steps, may end the run early (the scheduler still spans the full length).

    ``datasets``: name -> a dataset with a ``collate`` method (see ``data.collate.QADataset``).
    ``cfg``: lr, batch_size, epochs, weight_decay, warmup_ratio, schedule (a transformers scheduler
    name: linear, constant_with_warmup, cosine, ...), precision, grad_clip.
    ``constraint``: a ``robust.update.SparseUpdate`` (masked, retain-projected updates), or None.
    Returns the unwrapped model (trained in place) and the list of per-step losses.
    """
    set_seed(seed)
    acc = accelerator or make_accelerator(cfg["precision"])
    if cfg["precision"] == "bf16":
        model.to(torch.bfloat16)
    model.train()
    if constraint is not None:
        constraint.start()
    params = [p for p in model.parameters() if p.requires_grad]  # frozen ones get no optimizer state
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    gen = torch.Generator().manual_seed(seed)
    loaders = {name: torch.utils.data.DataLoader(
                   ds, batch_sampler=LengthGroupedBatches(ds.lengths(), cfg["batch_size"], gen), collate_fn=ds.collate)
               for name, ds in datasets.items()}
    steps_per_epoch = len(loaders[primary])
    total = cfg.get("steps") or max(1, math.ceil(cfg["epochs"] * steps_per_epoch))
    sched = get_scheduler(cfg.get("schedule", "linear"), opt, num_warmup_steps=int(cfg["warmup_ratio"] * total),
                          num_training_steps=total)
    model, opt, sched, *prepared = acc.prepare(model, opt, sched, *loaders.values())
    loaders = dict(zip(loaders, prepared))
    iters = {name: iter(dl) for name, dl in loaders.items()}

    def next_batch(name):
        try:
            return next(iters[name])
        except StopIteration:
            iters[name] = iter(loaders[name])
            return next(iters[name])

    losses: list[float] = []
    bar = tqdm(range(total), desc=desc, disable=not acc.is_local_main_process, dynamic_ncols=True)
    for step in bar:
        batches = {name: next_batch(name) for name in loaders}
        split = constraint is not None and constraint.split_grads
        with acc.autocast():
            if split:
                f_loss, r_loss = objective.parts(model, batches)
                loss = f_loss if r_loss is None else f_loss + r_loss
            else:
                loss = objective(model, batches)
        if not torch.isfinite(loss.detach()):
            raise TrainingDiverged(f"{desc}: loss became {loss.item()} at step {step + 1}/{total} "
                                   f"(lr {cfg['lr']}); stopped, nothing from this run was saved")
        if split and r_loss is not None:  # null-space step: the two terms' gradients apart
            acc.backward(f_loss)
            constraint.take_forget_grads()
            acc.backward(r_loss)
            constraint.combine()
        else:
            acc.backward(loss)
            if constraint is not None:
                constraint.mask_grads()
        if cfg.get("grad_clip"):
            acc.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        if constraint is not None:
            constraint.after_step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if stop is not None and (step + 1) % cfg.get("stop_every", 1) == 0:
            model.eval()
            done = stop(acc.unwrap_model(model), step + 1)
            model.train()
            if done:
                break
    bar.close()
    model = acc.unwrap_model(model)
    model.eval()
    if cfg["precision"] == "mixed":
        model.to(torch.float32)
    return model, losses
