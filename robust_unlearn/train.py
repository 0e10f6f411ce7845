"""The one training loop (accelerate ``Accelerator``), shared by fine-tuning and every objective.

It runs as one process or under ``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3; configs in
``recipes/accelerate``). The global batch is ``cfg['batch_size']`` whatever the number of processes:
each batch is split across them (accelerate ``split_batches``), and under DeepSpeed the micro batch,
``train_batch_size`` and gradient clipping are filled in from the recipe before ``prepare``.

Precision: ``fp32``; ``mixed`` = bf16 autocast compute with fp32 master weights and optimizer state;
``bf16`` = weights and optimizer state in bf16 (as when a bf16-loaded model is trained directly;
under DeepSpeed: its bf16 mode, whose master weights are fp32).
A non-finite loss stops the run with :class:`TrainingDiverged` before anything is saved.

Each step: the batches of every stream -> ``protocol.forward`` (the loss) -> the finite check ->
``protocol.update`` (backward, optimizer step) -> scheduler -> log -> stop check -> state save. The
protocol is an ``engine.Step``: the plain step by default, or the caller's (``robust.update.SparseUpdate``).

Resume: with ``state_dir`` and ``cfg['checkpoint_every']`` the loop saves its whole state (weights,
optimizer, scheduler, RNG via ``Accelerator.save_state``; step, losses, the caller's ``extra`` state and
the step protocol's) every N steps into ``state_dir/step-NNNNNN``, written in a temporary directory and
renamed, so a kill at any moment leaves the last complete state. Started again it resumes from there
and reproduces the uninterrupted run (same batches: the samplers are replayed to the step).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from .data.collate import IGNORE
from .engine import PLAIN, Engine, Step
from .errors import TrainingDiverged, UserError

log = logging.getLogger(__name__)

MIXED = {"fp32": "no", "mixed": "bf16", "bf16": "no"}


def precision_ran(precision: str, distributed_type) -> str:
    """What a ``precision`` setting actually ran as, for metadata and the ledger: under DeepSpeed
    "bf16" is its bf16 mode, which keeps fp32 master weights and optimizer state (not the pure bf16 of
    one process): recorded as ``bf16+fp32-master``. Every other setting runs as named."""
    if precision == "bf16" and distributed_type == DistributedType.DEEPSPEED:
        return "bf16+fp32-master"
    return precision


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of similar length with random composition and order each epoch: shuffle, cut into
    chunks of ``group`` batches, sort each chunk by length, batch it, shuffle the batches.

    Padding is wasted compute (about 30% on the built-in benchmark with random batches).
    transformers' ``LengthGroupedSampler`` sorts mega-batches of 50 batches, so on a dataset of a few
    hundred rows it would give the same batches in the same order every epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator, group: int = 4,
                 short_last: bool = False):
        self.lengths, self.batch_size, self.gen, self.group = lengths, batch_size, generator, group
        # under several processes accelerate splits each batch and only the last may be short (a short
        # one elsewhere would be dropped): move it to the end
        self.short_last = short_last

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
        out = [batches[i] for i in order]
        if self.short_last:
            out.sort(key=lambda b: len(b) < self.batch_size)  # stable: only the short batch moves
        return iter(out)


def make_accelerator(precision: str) -> Accelerator:
    from accelerate.state import AcceleratorState, PartialState

    # One process may train several stages with different precisions (fine-tune in bf16 autocast,
    # then unlearn in fp32): accelerate keeps one global state, so a single-process state is reset.
    # Under `accelerate launch` with several processes the launcher's settings win.
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    # DeepSpeed (under `accelerate launch`) also runs on the CPU, with the gloo backend
    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    handlers = []
    if use_ds and not torch.cuda.is_available():
        from accelerate.utils import InitProcessGroupKwargs

        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # accelerate finds no backend on a CPU
    return Accelerator(mixed_precision=MIXED[precision], cpu=not torch.cuda.is_available() and not use_ds,
                       dataloader_config=DataLoaderConfiguration(split_batches=True), kwargs_handlers=handlers)


def _configure_deepspeed(acc: Accelerator, cfg: dict) -> None:
    """Fill the DeepSpeed config from the recipe before ``prepare``: accelerate derives the micro batch
    from a dataloader's ``batch_size``, which a batch sampler leaves at None, and DeepSpeed rejects a
    ``train_batch_size`` that is not micro batch x accumulation x processes."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    n = acc.num_processes
    ds["train_micro_batch_size_per_gpu"] = cfg["batch_size"] // n
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = cfg["batch_size"]
    ds["gradient_clipping"] = float(cfg.get("grad_clip") or 0.0)
    ds["zero_allow_untested_optimizer"] = True  # torch AdamW, as in one process
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:  # the saved checkpoint is the whole model (gathered on the main process)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    precision = cfg["precision"]
    ds["bf16"] = {"enabled": precision in ("mixed", "bf16")}
    ds["fp16"] = {"enabled": False}




def _latest_state(state_dir: Path | None) -> Path | None:
    if state_dir is None or not state_dir.is_dir():
        return None
    done = sorted(d for d in state_dir.glob("step-*") if (d / "trainer_state.json").is_file())
    return done[-1] if done else None


def _save_state(acc: Accelerator, state_dir: Path, step: int, losses: list, extra: dict, protocol: Step) -> None:
    """Everything needed to go on from ``step``, into a temporary directory renamed when complete."""
    final = state_dir / f"step-{step:06d}"
    tmp = state_dir / f".tmp-step-{step:06d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))  # every process writes its part (RNG state; DeepSpeed: its partitions)
    acc.wait_for_everyone()
    if acc.is_main_process:
        proto_state = protocol.state_dict()
        if proto_state is not None:
            torch.save(proto_state, tmp / "constraint.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "losses": losses, "extra": extra}))
        tmp.rename(final)  # the marker of a complete state is trainer_state.json inside a step-* dir
        for old in state_dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


class Backoff:
    """What ``stop`` returns when the caller has put an earlier state of the weights back into the model
    (the collapse guard's ``collapse_backoff``): training goes on from it with fresh optimizer moments
    (the old ones point at the state that collapsed) and at ``lr_factor`` x the lr the schedule would
    give (a factor of the recipe's lr, not of the previous backoff's)."""

    def __init__(self, lr_factor: float):
        self.lr_factor = float(lr_factor)


def _back_off(opt, sched, base_lrs: list[float], factor: float) -> None:
    """Fresh AdamW moments; every param group's lr (now and for the rest of the schedule) at ``factor``
    x the recipe's. Runs on one process without DeepSpeed (the caller's guard allows nothing else)."""
    inner_opt = getattr(opt, "optimizer", opt)  # accelerate's wrappers
    inner_sched = getattr(sched, "scheduler", sched)
    inner_opt.state.clear()  # AdamW starts each parameter's moments (and bias correction) anew
    for group, base, cur in zip(inner_opt.param_groups, base_lrs, list(inner_sched.base_lrs)):
        group["lr"] *= base * factor / cur
        group["initial_lr"] = base * factor
    inner_sched.base_lrs = [b * factor for b in base_lrs]


def train(model, objective: Callable, datasets: dict, cfg: dict, seed: int = 0, desc: str = "train",
          primary: str = "train", accelerator: Accelerator | None = None,
          stop: Callable[[torch.nn.Module, int], bool] | None = None, constraint=None,
          state_dir: str | Path | None = None, extra: dict | None = None):
    """Run ``cfg['epochs']`` passes over ``datasets[primary]``, at least ``cfg['min_steps']`` optimizer
    steps (or ``cfg['steps']`` optimizer steps when set); the other streams are cycled.
    ``stop(model, step)``, called every ``cfg['stop_every']`` steps, may end the run early (True; the
    scheduler still spans the full length) or, having put an earlier state back into the model, return a
    :class:`Backoff` to train on from it at a smaller lr.

    ``datasets``: name -> a dataset with a ``collate`` method (see ``data.collate.QADataset``).
    ``cfg``: lr, batch_size (global), epochs, weight_decay, warmup_ratio, schedule (a transformers
    scheduler name: linear, constant_with_warmup, cosine, ...), precision, grad_clip, checkpoint_every,
    grad_accum (each step's batch as that many micro-batches, gradients accumulated: the same update
    in less activation memory), adam_eps.
    ``constraint``: the step protocol (``engine.Step``), e.g. a ``robust.update.SparseUpdate`` (masked,
    retain-projected updates); None: the plain step.
    ``state_dir``: where resumable states go (with ``cfg['checkpoint_every']`` > 0); ``extra``: the
    caller's JSON-able state saved with them and restored in place on resume.
    Returns the unwrapped model (trained in place; under ZeRO-3 a new, whole model on the main process
    and None elsewhere) and the list of per-step losses.
    """
    set_seed(seed)
    acc = accelerator or make_accelerator(cfg["precision"])
    n_proc = acc.num_processes
    if cfg["batch_size"] % n_proc:
        raise UserError(f"batch_size {cfg['batch_size']} is the global batch and must be a multiple of the "
                        f"{n_proc} processes (each takes an equal share)")
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        _configure_deepspeed(acc, cfg)
    if cfg["precision"] == "bf16" and not deepspeed:
        model.to(torch.bfloat16)
    if not deepspeed:  # on the accelerator before the step protocol records masks and target values there
        model.to(acc.device)
    model.train()
    checkpointing = bool(cfg.get("gradient_checkpointing"))
    if checkpointing:
        set_checkpointing(model, True)
    protocol = constraint if constraint is not None else Step()
    protocol.start()  # e.g. masks and target values, on the whole model before any partitioning
    params = [p for p in model.parameters() if p.requires_grad]  # frozen ones get no optimizer state
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], eps=cfg.get("adam_eps", 1e-8))
    gen = torch.Generator().manual_seed(seed)
    loaders = {name: torch.utils.data.DataLoader(
                   ds, batch_sampler=LengthGroupedBatches(ds.lengths(), cfg["batch_size"], gen, short_last=n_proc > 1),
                   collate_fn=ds.collate)
               for name, ds in datasets.items()}
    steps_per_epoch = len(loaders[primary])
    total = cfg.get("steps") or max(1, math.ceil(cfg["epochs"] * steps_per_epoch), cfg.get("min_steps") or 0)
    sched = get_scheduler(cfg.get("schedule", "linear"), opt, num_warmup_steps=int(cfg["warmup_ratio"] * total),
                          num_training_steps=total)
    base_lrs = list(sched.base_lrs)  # the recipe's; a Backoff scales them
    model, opt, sched, *prepared = acc.prepare(model, opt, sched, *loaders.values())
    engine = Engine(acc, model, opt)
    protocol.attach(engine)
    loaders = dict(zip(loaders, prepared))
    iters = {name: iter(dl) for name, dl in loaders.items()}

    def next_batch(name):
        try:
            return next(iters[name])
        except StopIteration:
            iters[name] = iter(loaders[name])
            return next(iters[name])

    accum = int(cfg.get("grad_accum") or 1)
    if cfg["batch_size"] % (accum * n_proc):
        raise UserError(f"batch_size {cfg['batch_size']} must be a multiple of grad_accum {accum} x {n_proc} "
                        "processes (equal micro-batches)")
    if accum > 1 and (deepspeed or type(protocol) is not Step):
        raise UserError(f"grad_accum {accum}: gradient accumulation runs with the plain step of one process or DDP "
                        "(not under DeepSpeed, not with the SURE_ / Robust_ step rules); set grad_accum 1 there")

    def next_batches() -> list[dict]:
        """The step's batches, as ``accum`` micro-batches (each stream's rows split in order); token means
        are rescaled to the global batch's (methods.losses.token_mean) across micro-batches and processes."""
        batches = {name: next_batch(name) for name in loaders}
        micro = [{name: _rows(b, j, accum) for name, b in batches.items()} for j in range(accum)] if accum > 1 \
            else [batches]
        # a short last batch of an epoch may leave a micro-batch without rows: it is dropped (its per-example
        # means then weigh the remaining micro-batches equally, the one place accumulation differs)
        micro = [m for m in micro if all(len(b["input_ids"]) for b in m.values() if "input_ids" in b)] or micro[:1]
        if n_proc > 1 or accum > 1:
            for name in batches:
                if "labels" not in batches[name]:
                    continue
                counts = [(m[name]["labels"][:, 1:] != IGNORE).sum().float() for m in micro]
                total = sum(counts)
                total = acc.reduce(total.clone(), "sum") if n_proc > 1 else total
                for m, n in zip(micro, counts):
                    m[name]["token_scale"] = n * n_proc * accum / total.clamp(min=1)
        return micro

    losses: list[float] = []
    start = 0
    state_dir = Path(state_dir) if state_dir is not None else None
    every = int(cfg.get("checkpoint_every") or 0)
    resume = _latest_state(state_dir)
    if resume is not None:
        acc.load_state(str(resume))
        st = json.loads((resume / "trainer_state.json").read_text())
        start, losses = st["step"], st["losses"]
        for k, v in st["extra"].items():  # the caller's lists, refilled in place
            if extra is not None and k in extra:
                extra[k][:] = v
        if (resume / "constraint.pt").is_file():
            protocol.load_state_dict(torch.load(resume / "constraint.pt", map_location=acc.device))  # saved from rank 0's device
        for _ in range(start):  # the same batches as an uninterrupted run from here on
            for name in loaders:
                next_batch(name)
        log.info("%s: resumed from %s (step %d/%d)", desc, resume, start, total)

    bar = tqdm(range(start, total), desc=desc, disable=not acc.is_local_main_process, dynamic_ncols=True,
               initial=start, total=total)
    step_objective = objective if accum == 1 else (lambda m, b: objective(m, b) / accum)
    for step in bar:
        loss = 0.0
        parts = next_batches()
        for j, batches in enumerate(parts):
            part = protocol.forward(step_objective, model, batches)
            if not torch.isfinite(part.detach()):
                raise TrainingDiverged(f"{desc}: loss became {part.item()} at step {step + 1}/{total} "
                                       f"(lr {cfg['lr']}); stopped, nothing from this run was saved")
            loss = loss + part.detach()
            if j < len(parts) - 1:
                protocol.backward()
        protocol.update(params, cfg.get("grad_clip"))
        sched.step()
        losses.append(acc.reduce(loss.detach().float(), "mean").item() if n_proc > 1 else loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = False
        if stop is not None and (step + 1) % cfg.get("stop_every", 1) == 0:
            model.eval()
            done = stop(acc.unwrap_model(model), step + 1)
            model.train()
            if isinstance(done, Backoff):
                if n_proc > 1 or deepspeed:
                    raise RuntimeError("a Backoff needs one process without DeepSpeed")  # the guard's to ensure
                _back_off(opt, sched, base_lrs, done.lr_factor)
                done = False
            if n_proc > 1:  # every process takes the main one's decision
                from accelerate.utils import broadcast

                done = bool(broadcast(torch.tensor([int(done)], device=acc.device), from_process=0).item())
        if state_dir is not None and every and (step + 1) % every == 0 and not done and step + 1 < total:
            _save_state(acc, state_dir, step + 1, losses, extra or {}, protocol)
        if done:
            break
    bar.close()
    model = _whole_model(acc, engine, model)
    if model is not None:
        if checkpointing:
            set_checkpointing(model, False)
        model.eval()
        if cfg["precision"] == "mixed" or (deepspeed and cfg["precision"] == "bf16"):
            model.to(torch.float32)
    protocol.attach(PLAIN, model)
    return model, losses


def set_checkpointing(model, on: bool) -> None:
    """Activation (gradient) checkpointing of every decoder layer on / off: transformers'
    ``activation_checkpointing_enable`` (5.2x and later; ``gradient_checkpointing_enable`` before),
    non-reentrant, so frozen inputs (SURE, LoRA) need no input gradients."""
    new = hasattr(model, "activation_checkpointing_enable")
    if on:
        kw = {"use_reentrant": False}
        if new:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    elif new:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def _rows(batch: dict, j: int, parts: int) -> dict:
    """Micro-batch ``j`` of ``parts``: every tensor's rows split in order (nested batches too)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = _rows(v, j, parts)
        elif torch.is_tensor(v) and v.dim() > 0:
            out[k] = torch.tensor_split(v, parts)[j]
        else:
            out[k] = v
    return out


def _whole_model(acc: Accelerator, engine: Engine, model):
    """The trained model as one ordinary module. Under ZeRO-3 the weights are gathered on the main
    process into a new module built from the config (other processes get None)."""
    if engine.zero_stage != 3:
        return acc.unwrap_model(model)
    state = acc.get_state_dict(model)  # collective; the whole state dict on the main process
    if not acc.is_main_process:
        return None
    inner = acc.unwrap_model(model)
    with torch.device("meta"):
        whole = type(inner)(inner.config)
    whole.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    whole.tie_weights()
    missing = [n for n, p in whole.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"ZeRO-3 gather: weights missing from the consolidated state dict: {missing[:5]}")
    whole.generation_config = inner.generation_config
    return whole
