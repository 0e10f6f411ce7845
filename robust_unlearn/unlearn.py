"""The unlearning stage: target checkpoint + method -> unlearned Hugging Face checkpoint.

One method at a time through the one training loop (``train.train``): the ``forget`` stream is the
forget split (its epochs set the length), the ``retain`` stream is the retain training data
(``train_oracle``: every retain author, as open-unlearning's retain90) cycled alongside. The frozen
reference (NPO, KL, RMU) is, with ``runtime.shared_reference`` (the default), the training model itself
with its trained tensors swapped back to frozen copies (:class:`SharedReference`): it costs only the
trained tensors, not a second model. Otherwise the whole target is loaded once per run by
:class:`Reference` and shared by every method that needs it. A non-finite loss stops the method before
anything is written.

Every ``stop_every`` steps two probes run: the forget answer probability (the early stop, at a number
or at a level the run measures itself: the retain oracle's forget probability or the target's on the
holdout split, :class:`StopLevels`) and the retain answer probability (the collapse guard: below
``collapse_floor`` x the target's, training stops; the last state that passed is saved, labelled in
its metadata, or nothing when none did), with the greedy answers to a few questions of each utility
split (``collapse_answers``: answers that loop trip it too). With ``collapse_backoff`` a trip first puts
the last good state back and trains on from it at a smaller lr, once per listed factor. With ``runtime.checkpoint_every`` the training state is saved every N steps into a
hidden sibling of the checkpoint directory, and a run started again resumes from it.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .compress import compressible_linears
from . import ids
from .config import method_settings
from .data import dataset_for, fingerprint, is_text_benchmark, retain_rows
from .data.collate import formatter_for
from .errors import TrainingCollapsed, UserError
from .ids import stable_hash
from .lora import lora_enabled
from .methods import NEEDS_REF, build_objective, check_method, objective_spec, split_method
from .models import deepspeed_launch, load_model, process_device, read_metadata, save_model
from .scoring import distinct_bigram_share, qa_mean_nll, qa_pass
from .train import Backoff, precision_ran, train
from .weight_stats import update_stats

log = logging.getLogger(__name__)
UNLEARN_VERSION = "ul-1"  # bump when the unlearning code changes what it produces


class Reference:
    """The frozen target, loaded on first use and kept for every method of the run.

    Under DeepSpeed ZeRO-3 it is a partitioned inference engine (``runtime.zero3_reference:
    partitioned``, the default): each process keeps 1/N of its weights, gathered layer by layer in
    forward as the training model's are, instead of a whole copy per process. It is loaded with
    transformers' ZeRO-3 integration (``HfDeepSpeedConfig``: each weight partitioned as it is read, so no
    process ever holds the whole model) and wrapped by ``deepspeed.initialize`` without an optimizer, the
    way TRL prepares its reference models (huggingface/trl@v0.19.0:trl/models/utils.py prepare_deepspeed).
    ``full`` keeps the whole fp32 target on every process."""

    def __init__(self, path: str, trust_remote_code: bool = False, zero3: str = "partitioned"):
        self.path, self.trust, self.zero3, self._model = path, trust_remote_code, zero3, None
        self.kind = "full copy"

    def get(self):
        if self._model is None:
            if self.zero3 == "partitioned" and zero3_active():
                self._model = self._partitioned()
                self.kind = "partitioned (ZeRO-3)"
            else:
                self._model, _ = load_model(self.path, "float32", self.trust)
                self._model.to(process_device())  # beside the model it scores (each GPU holds a full copy)
                self.kind = "full copy (ZeRO-3)" if zero3_active() else "full copy"
            self._model.requires_grad_(False)
            self._model.eval()
            log.info("reference model loaded once from %s: %s", self.path, self.kind)
        return self._model

    def held(self) -> tuple[int, int] | None:
        """(bytes this process holds, bytes of the whole model) once loaded, else None."""
        return None if self._model is None else reference_bytes(self._model)

    def _partitioned(self):
        import copy

        import deepspeed
        from accelerate.state import AcceleratorState
        from transformers.integrations import HfDeepSpeedConfig

        state = AcceleratorState()
        ds = copy.deepcopy(state.deepspeed_plugin.deepspeed_config)
        for k in ("optimizer", "scheduler"):
            ds.pop(k, None)
        ds["zero_optimization"] = {k: v for k, v in ds.get("zero_optimization", {}).items() if v != "auto"}
        ds["zero_optimization"]["stage"] = 3
        # inference only: a batch size DeepSpeed accepts (it is never used to step)
        ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
                  train_batch_size=state.num_processes, gradient_clipping=0.0)
        for k in ("bf16", "fp16"):
            if isinstance(ds.get(k), dict) and ds[k].get("enabled") == "auto":
                ds[k]["enabled"] = False
        keep = HfDeepSpeedConfig(ds)  # noqa: F841  alive while loading: from_pretrained partitions as it reads
        model, _ = load_model(self.path, "float32", self.trust)
        engine = deepspeed.initialize(model=model, config=ds)[0]
        del keep
        return engine


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def zero3_active() -> bool:
    """Whether this process trains under DeepSpeed ZeRO-3."""
    from .engine import zero_stage

    return zero_stage() == 3


def reference_bytes(model) -> tuple[int, int]:
    """-> (bytes this process holds, bytes of the whole model) of a reference: a ZeRO-3 partitioned one
    holds its partitions (``ds_tensor``), any other model all its weights."""
    held = whole = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            held += p.ds_tensor.numel() * p.ds_tensor.element_size()
            whole += p.ds_numel * p.ds_tensor.element_size()
        else:
            held += p.numel() * p.element_size()
            whole += p.numel() * p.element_size()
    return held, whole


class SharedReference:
    """The frozen target without a second copy of it: the training model, called with its trained
    tensors replaced by copies of their values before training (``torch.func.functional_call``).
    Untrained tensors never move, so the outputs are the target's. Until :meth:`freeze` nothing has
    trained and the model is its own reference (the saliency pass at the target weights).

    Under DeepSpeed ZeRO-3 the model's tensors are partitioned and cannot be swapped: the reference
    is then ``fallback`` (:class:`Reference`: partitioned across the processes, or a full copy)."""

    def __init__(self, model, fallback: "Reference"):
        self._model, self._fallback = model, fallback
        self._orig: dict[str, torch.Tensor] = {}
        self.kind = "shared"

    def freeze(self) -> int:
        """Copy the tensors that will train -> how many weights the reference holds."""
        self._orig = {n: p.detach().clone() for n, p in self._model.named_parameters() if p.requires_grad}
        return sum(t.numel() for t in self._orig.values())

    def current(self):
        """What to call for reference outputs now (itself, or the whole target under ZeRO-3)."""
        if self._orig and hasattr(next(self._model.parameters()), "ds_id"):
            model = self._fallback.get()
            self.kind = self._fallback.kind
            return model
        return self

    def __call__(self, *args, **kwargs):
        target = self.current()
        if target is not self:
            return target(*args, **kwargs)
        if not self._orig:
            return self._model(*args, **kwargs)
        from .robust.update import parametrized_name

        params = dict(self._model.named_parameters())
        tensors = {}
        for n, t in self._orig.items():
            # robust_qat parametrizes the trained weights after freeze, which renames each to its
            # original; the parametrization (``robust.update.Deployed``) gives a weight at its target value
            # back unchanged, so the original at the frozen copy still computes the target
            key = n if n in params else parametrized_name(n)
            p = params[key]  # follow the model: a bf16 run casts it, the loop's prepare moves it, after freeze
            if t.dtype != p.dtype or t.device != p.device:
                self._orig[n] = t = t.to(device=p.device, dtype=p.dtype)
            tensors[key] = t
        return torch.func.functional_call(self._model, tensors, args, kwargs, strict=False)

    def __getattr__(self, name):
        return getattr(self._model, name)


# settings that change how a run is computed, not what it computes: a checkpoint keeps its key with them
SPEC_NEUTRAL = ("gradient_checkpointing",)
# settings added after checkpoints were cached: at these values (off) they are left out of the key, so
# every checkpoint trained before them keeps its key
SPEC_OFF = {"stop_under": [], "robust_qat": False, "robust_prune_view": 0.0, "min_steps": 0, "robust_relearn_view": 0.0,
            "collapse_answers": 0, "collapse_backoff": []}
# the splits whose greedy answers the collapse guard reads (``collapse_answers``), where the benchmark has them
GUARD_ANSWER_SPLITS = ("retain", "real_authors", "world_facts")


def answer_prob_probe(cfg: dict, bench, tok, split: str, limit: int | None = None):
    """-> model -> mean answer probability (exp of each item's mean answer-token NLL, averaged) on
    ``bench[split]`` (its first ``limit`` rows), the quantity of ``forget_Q_A_Prob``; raw-text
    benchmarks: on the first ``eval.batch_size`` items of the split. None when the split is absent or
    empty."""
    if not _has_rows(bench, split):
        return None
    rows = _head(bench[split], limit)
    if is_text_benchmark(cfg):
        return _text_forget_prob(dataset_for(cfg, rows, tok), cfg["eval"]["batch_size"])
    fmt = formatter_for(tok, cfg)
    pairs = [(r["question"], r["answer"]) for r in rows]

    def prob(m):
        return float(np.exp(-qa_mean_nll(m, fmt, pairs, cfg["eval"]["batch_size"])).mean())

    return prob


def answer_distinct_probe(cfg: dict, bench, tok, n: int):
    """-> model -> {split: mean distinct-bigram share (``scoring.distinct_bigram_share``) of the greedy
    answers to the first ``n`` questions of each of ``GUARD_ANSWER_SPLITS`` the benchmark has}, generated
    as the evaluation generates them (``eval.max_new_tokens``, one pass). None when ``n`` is 0 or the
    benchmark is raw text (no questions to answer)."""
    if not n or is_text_benchmark(cfg):
        return None
    questions = {s: [r["question"] for r in _head(bench[s], n)] for s in GUARD_ANSWER_SPLITS if _has_rows(bench, s)}
    if not questions:
        return None
    fmt = formatter_for(tok, cfg)
    every = list(dict.fromkeys(q for qs in questions.values() for q in qs))

    def shares(m):
        text = qa_pass(m, fmt, [], every, cfg["eval"]["batch_size"], cfg["eval"]["max_new_tokens"])[1]
        return {s: float(np.mean([distinct_bigram_share(text.get(q, "")) for q in qs])) for s, qs in questions.items()}

    return shares


class StopLevels:
    """The forget probabilities a relative ``stop_forget_prob`` names, measured once per run with the
    early stop's own probe: ``oracle``, the retain oracle's (a model never trained on the forget set);
    ``holdout``, the target's on the holdout split (authors it never saw)."""

    def __init__(self, cfg: dict, bench, target: str, oracle: str | None = None):
        self.cfg, self.bench, self.target, self.oracle = cfg, bench, target, oracle
        self._values: dict[str, float] = {}

    def available(self) -> list[str]:
        out = ["oracle"] if self.oracle is not None else []
        return out + (["holdout"] if _has_rows(self.bench, "holdout") else [])

    def get(self, name: str, where: str) -> tuple[str, float]:
        """-> (the level used, its value); ``oracle`` without an oracle falls back to ``holdout``."""
        have = self.available()
        used = name if name in have else ("holdout" if name == "oracle" and "holdout" in have else None)
        if used is None:
            raise UserError(f"{where} '{name}' needs a retain oracle (model.oracle, or a benchmark with a retain "
                            f"split) or a holdout split, and this run has neither; give a number in [0, 1] instead")
        if used != name:
            log.warning("%s '%s': no retain oracle in this run; stopping at the holdout level instead", where, name)
        if used not in self._values:
            path, split = (self.oracle, "forget") if used == "oracle" else (self.target, "holdout")
            model, tok = load_model(path, "float32", self.cfg["model"]["trust_remote_code"])
            model.to(process_device()).eval()
            self._values[used] = answer_prob_probe(self.cfg, self.bench, tok, split)(model)
            del model
            log.info("stop level %s: forget probability %.3f (%s)", used, self._values[used], path)
        return used, self._values[used]


def _has_rows(bench, split: str) -> bool:
    return split in bench and len(bench[split]) > 0


def _head(rows, n: int | None):
    """The first ``n`` rows of a split (all of them when ``n`` is None or not smaller)."""
    return rows if n is None or len(rows) <= n else rows.select(range(n))


def unlearn(cfg: dict, bench, target: str, target_id: str, method: str, out_dir: Path,
            reference: Reference | None = None, levels: StopLevels | None = None) -> Path:
    """Unlearn ``bench['forget']`` from ``target`` with ``method`` -> checkpoint dir (reused when the
    same spec was already trained into ``out_dir``). ``levels``: what a relative ``stop_forget_prob``
    (oracle, holdout) is measured with. ``TrainingCollapsed`` when the collapse guard trips before any
    state passed it (nothing is saved)."""
    check_method(method)
    settings = method_settings(cfg, method)
    stop_level = None
    if isinstance(settings["stop_forget_prob"], str):  # a level of this run: resolved to its number
        where = f"unlearn.per_method.{method}.stop_forget_prob" if "stop_forget_prob" in \
            cfg["unlearn"]["per_method"].get(method, {}) else "unlearn.stop_forget_prob"
        levels = levels or StopLevels(cfg, bench, target)
        stop_level, settings["stop_forget_prob"] = levels.get(settings["stop_forget_prob"], where)
    spec = {"version": UNLEARN_VERSION, "method": method, "objective": objective_spec(method),
            "settings": {k: v for k, v in settings.items()
                         if k not in SPEC_NEUTRAL and not (k in SPEC_OFF and v == SPEC_OFF[k])},
            "target": target_id,
            "forget": fingerprint(bench["forget"]), "retain": fingerprint(retain_rows(bench)), "seed": cfg["seed"],
            "prompt": ids.prompt_spec(cfg)}
    if stop_level is not None:
        spec["stop_level"] = stop_level
    key = stable_hash(spec)[:12]
    out = Path(out_dir) / f"{method}-{key}"
    if (out / "config.json").is_file() and read_metadata(out).get("spec_key") == key:
        log.info("%s: reusing %s", method, out)
        return out
    t0 = time.time()
    model, tok = load_model(target, "float32", cfg["model"]["trust_remote_code"])
    # the update is measured against the target as the run holds it: rounded to bf16 for a pure-bf16
    # run (that rounding alone moves every weight, by up to half a bf16 ulp)
    cast = torch.bfloat16 if settings["precision"] == "bf16" else torch.float32
    before = {f"{n}.weight": m.weight.detach().to(cast).float().clone() for n, m in compressible_linears(model)}
    if not deepspeed_launch():  # the setup (saliency, the guard's and the stop's probes) where the loop trains
        model.to(process_device())
    shared = None
    wrapper, base_method = split_method(method)
    use_lora = lora_enabled(settings)
    if use_lora and base_method == "RMU":
        raise UserError(f"{method}: unlearn.lora is built for the loss-based methods, SURE_ and Robust_ (not for "
                        f"RMU, which trains chosen weights by name); set unlearn.per_method.{method}.lora.r 0")
    reference = reference or Reference(target, cfg["model"]["trust_remote_code"], cfg["runtime"]["zero3_reference"])
    if use_lora:  # the reference of a LoRA run is the model with its adapters off: at the start, the model itself
        ref = model if method in NEEDS_REF else None
    elif method in NEEDS_REF and cfg["runtime"]["shared_reference"]:
        ref = shared = SharedReference(model, reference)
    else:
        ref = reference.get() if method in NEEDS_REF else None
    objective = build_objective(method, settings, model, ref=ref, seed=cfg["seed"])
    streams = {"forget": dataset_for(cfg, bench["forget"], tok, getattr(objective, "alternate", None))}
    if "retain" in objective.streams:
        streams["retain"] = dataset_for(cfg, retain_rows(bench), tok, retain=True)
    constraint, plan = None, None
    if wrapper is not None:  # SURE / Robust: which weights may move, chosen at the target weights
        from .robust.update import plan_update

        data = dict(streams)
        data.setdefault("retain", dataset_for(cfg, retain_rows(bench), tok, retain=True))
        constraint, plan = plan_update(model, objective, data, settings, robust=wrapper == "Robust", seed=cfg["seed"])
    if use_lora:  # adapters on the chosen modules (SURE's salient ones); only they train
        from .lora import AdapterOff, add_adapters, freeze_all_but_adapters, target_modules

        targets = target_modules(model, settings, plan["salient"] if plan is not None else None)
        model = add_adapters(model, settings, targets)
        ref = AdapterOff(model) if method in NEEDS_REF else None
        objective = build_objective(method, settings, model, ref=ref, seed=cfg["seed"])
        freeze_all_but_adapters(model)  # build_objective makes every parameter trainable
        constraint = None  # the adapters are the sparsity; SURE's mask hooks do not apply to them
        plan = {**(plan or {}), "lora_targets": targets}
    history: list[tuple[int, float]] = []
    forget_prob = answer_prob_probe(cfg, bench, tok, "forget")
    guard = CollapseGuard.for_run(cfg, bench, tok, settings, model, method)
    stop_at = settings["stop_forget_prob"]
    under = StopUnder(settings.get("stop_under") or [], forget_prob, method)
    if under.columns:
        from accelerate.state import PartialState

        if PartialState().num_processes > 1:
            raise UserError(f"{method}: unlearn.stop_under probes compressed copies of the whole model, which a "
                            f"multi-process run does not hold on one process; run it on one process or set stop_under []")

    def probe(m, step):
        p = forget_prob(m)
        history.append((step, p))
        log.info("%s: step %d forget probability %.3f", method, step, p)
        if guard is not None and not guard.passes(m, step):
            factor = guard.back_off(m, method)
            return True if factor is None else Backoff(factor)
        return stop_at is not None and p <= stop_at and under.reached(m, step, stop_at)

    stop = probe if (stop_at is not None or guard is not None) else None

    if shared is not None:
        shared.freeze()
    train_cfg = dict(settings, checkpoint_every=cfg["runtime"]["checkpoint_every"])
    state_dir = out.parent / f".{out.name}.train"  # resumable states of this spec, removed once saved
    model, losses = train(model, objective, streams, train_cfg, seed=cfg["seed"], desc=f"unlearn {method}",
                          primary="forget", stop=stop, constraint=constraint, state_dir=state_dir,
                          extra={"forget_prob_history": history,
                                 **({"collapse_backoffs": guard.backoffs} if guard is not None else {})})
    from accelerate.state import PartialState

    state = PartialState()
    held = reference.held()
    if held is not None:  # every process: what it held of the reference (ZeRO-3: its partition)
        log.info("%s: process %d holds %.1f MiB of the %.1f MiB reference (%s); peak resident memory %.0f MiB",
                 method, state.process_index, held[0] / 2 ** 20, held[1] / 2 ** 20, reference.kind, _peak_rss_mib())
    collapse = None
    if guard is not None and guard.tripped is not None:
        collapse = guard.restore(model)  # the last state above the floor, or TrainingCollapsed
        if collapse is None:
            shutil.rmtree(state_dir, ignore_errors=True)
            raise TrainingCollapsed(guard.line(method, saved=None))
        trip_line = guard.line(method, saved=str(out))  # logged once the checkpoint is written
    if use_lora and model is not None:  # restored (above) on the adapters, then merged
        from .lora import merge

        n_adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        model = merge(model)  # W + (alpha / r) B A: the floor, the checkpoint and the sweep see plain weights
    if not state.is_main_process:  # the main process writes the checkpoint
        state.wait_for_everyone()
        return out
    if use_lora and wrapper == "Robust":  # the floor on the merged delta, its largest robust_topk share
        from .robust.update import floor_merged_delta

        names = [f"{t}.weight" for t in plan["lora_targets"]]
        w0 = {n: before[n] for n in names}
        plan["final"] = floor_merged_delta(model, w0, names, float(settings["robust_topk"]),
                                           list(settings["robust_floor"]), float(settings["robust_floor_margin"]))
    elif constraint is not None:
        plan["final"] = constraint.finish()  # the floor, on the weights as they will be saved
    if plan is not None and "final" in plan and guard is not None and \
            not guard.passes(model, collapse if collapse is not None else len(losses), keep=False):
        shutil.rmtree(state_dir, ignore_errors=True)  # the floor may collapse it too (a restored state as well)
        after = "the final floor" if collapse is None else "the final floor of its last good state"
        raise TrainingCollapsed(guard.line(method, saved=None, after=after))
    saved_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    meta = {"role": "unlearned", "method": method, "spec": spec, "spec_key": key,
            "precision": precision_ran(settings["precision"], state.distributed_type), "precision_setting": settings["precision"],
            "saved_dtype": saved_dtype, "target": str(target), "steps": len(losses), "first_loss": losses[0],
            "final_loss": losses[-1], "forget_prob_history": history,
            "trained_params": n_adapter if use_lora else sum(p.numel() for p in model.parameters() if p.requires_grad),
            "update": update_stats(before, model), "train_seconds": round(time.time() - t0, 1),
            "launch": {"processes": state.num_processes, "distributed_type": str(state.distributed_type)},
            "reference": None if method not in NEEDS_REF else
            ("the model with its LoRA adapters off" if use_lora else shared.kind if shared is not None else reference.kind)}
    if held is not None:  # a loaded reference model: what the main process held of it
        meta["reference_bytes"] = {"this_process": held[0], "whole_model": held[1]}
    if stop_level is not None:
        meta["stop_level"] = {"name": stop_level, "forget_prob": stop_at}
    if under.columns:
        meta["stop_under"] = under.summary()
    if guard is not None:
        meta["collapse_guard"] = guard.summary()
    if collapse is not None:  # labelled: these weights are the last good state, not the end of training
        meta["state"] = f"last good state (step {collapse}); training went on and collapsed"
    if plan is not None:
        meta["plan"] = {k: v for k, v in plan.items() if k != "salient"}
        meta["plan"]["salient"] = plan.get("salient")
    for p in model.parameters():
        p.requires_grad_(True)
    save_model(model, tok, out, meta)
    if collapse is not None:
        log.warning("%s", trip_line)
    shutil.rmtree(state_dir, ignore_errors=True)
    if state.num_processes > 1:
        state.wait_for_everyone()
    log.info("%s: %d steps in %.0fs, update %s", method, len(losses), time.time() - t0, meta["update"])
    return out


class StopUnder:
    """``unlearn.stop_under``: the early stop holds only when the forget level is reached by the current
    weights *and* by each named compression of them (a copy compressed as the sweep compresses it, probed
    with the same forget probe), so that training does not end on an update that compression undoes.
    Probed only once full precision is at the level; every probe is kept for the metadata."""

    def __init__(self, columns: list[str], forget_prob, method: str):
        from .compress import get_compression

        self.columns = [str(c) for c in columns]
        self._fns = [(c, get_compression(c)) for c in self.columns]
        self.forget_prob, self.method = forget_prob, method
        self.history: list[tuple[int, dict[str, float]]] = []

    @torch.no_grad()
    def reached(self, model, step: int, level: float) -> bool:
        if not self._fns:
            return True
        import copy

        got = {}
        for name, fn in self._fns:
            m = fn(copy.deepcopy(model))
            m.eval()
            got[name] = self.forget_prob(m)
            del m
        self.history.append((step, got))
        done = all(v <= level for v in got.values())
        log.info("%s: step %d forget probability under %s (level %.3f)%s", self.method, step,
                 ", ".join(f"{k} {v:.3f}" for k, v in got.items()), level, "" if done else ": training on")
        return done

    def summary(self) -> dict:
        return {"columns": self.columns, "history": self.history}


class CollapseGuard:
    """The retain answer probability, probed with the early stop, against ``collapse_floor`` x the
    target's (measured on the model before its first step); with ``collapse_answers`` also the greedy
    answers to a few questions of each utility split (:func:`answer_distinct_probe`): a split whose
    distinct-bigram share falls below ``collapse_floor`` x the target's is a model that loops instead of
    answering, which the retain probability does not see (TOFU seed 2: "French French author French
    ..." at retain probability 0.963). The trained tensors of the last probe that passed are kept on
    the CPU; when a probe fails, training stops and :meth:`restore` puts that state back (None when no
    probe passed: nothing may be saved). Under ZeRO-3 the tensors are partitioned and nothing is kept:
    a trip saves nothing, and :meth:`for_run` leaves the answer check off (greedy answers of different
    lengths on different processes would desynchronise the gathers)."""

    def __init__(self, probe, floor: float, target_prob: float, answers=None, target_answers: dict | None = None,
                 backoff: list[float] | None = None):
        self.probe, self.fraction, self.target_prob = probe, floor, target_prob
        self.backoff = [float(f) for f in backoff or []]  # lr factors, one per trip it may back off from
        self.backoffs: list[dict] = []  # each backoff taken (JSON-able: saved with a resumable state)
        self.floor = floor * target_prob
        self.answers, self.target_answers = answers, dict(target_answers or {})
        self.answer_floors = {s: floor * v for s, v in self.target_answers.items()}
        self.good: dict[str, torch.Tensor] | None = None
        self.good_step = 0
        self.tripped: tuple[int, float] | None = None
        self.tripped_answers: tuple[str, float] | None = None  # (split, distinct share) when answers tripped it
        self.last: float | None = None
        self.last_answers: dict[str, float] | None = None

    @classmethod
    def for_run(cls, cfg: dict, bench, tok, settings: dict, model, method: str) -> "CollapseGuard | None":
        if settings.get("collapse_floor") is None:
            return None
        probe = answer_prob_probe(cfg, bench, tok, "retain", limit=cfg["eval"]["batch_size"])  # None: no split
        if probe is None:
            log.warning("%s: no retain split to probe: the collapse guard is off", method)
            return None
        n_answers = int(settings.get("collapse_answers") or 0)
        if n_answers and zero3_active():
            log.info("%s: the collapse guard's answer check is skipped under ZeRO-3", method)
            n_answers = 0
        answers = answer_distinct_probe(cfg, bench, tok, n_answers)
        backoff = list(settings.get("collapse_backoff") or [])
        if backoff:
            from accelerate.state import PartialState

            if PartialState().num_processes > 1 or deepspeed_launch():
                log.info("%s: unlearn.collapse_backoff is off in a multi-process or DeepSpeed run (the last good "
                         "state is put back on one process only); a trip stops the run", method)
                backoff = []
        was = model.training
        model.eval()
        guard = cls(probe, settings["collapse_floor"], probe(model), answers, answers(model) if answers else None,
                    backoff)
        model.train(was)
        log.info("%s: collapse guard at retain probability %.3f (%g x the target's %.3f)%s", method, guard.floor,
                 settings["collapse_floor"], guard.target_prob,
                 "" if not guard.target_answers else "; answers' distinct-bigram share " + ", ".join(
                     f"{s} {v:.3f}" for s, v in guard.target_answers.items()) + " (the target's)")
        return guard

    def _answers_trip(self, model) -> tuple[str, float] | None:
        if self.answers is None:
            return None
        got = self.last_answers = self.answers(model)
        return next(((split, v) for split, v in got.items() if v < self.answer_floors[split]), None)

    def passes(self, model, step: int, keep: bool = True) -> bool:
        """Probe ``model``; below the floor -> False (and the trip is recorded); else True, and with
        ``keep`` its trained tensors become the last good state."""
        was = model.training
        model.eval()
        p = self.last = self.probe(model)
        answers = None if p < self.floor else self._answers_trip(model)
        model.train(was)
        if p < self.floor or answers is not None:
            self.tripped, self.tripped_answers = (step, p), answers
            return False
        if not keep:
            return True
        params = [(n, t) for n, t in model.named_parameters() if t.requires_grad]
        if not any(hasattr(t, "ds_id") for _, t in params):
            self.good = {n: t.detach().to("cpu", copy=True) for n, t in params}
            self.good_step = step
        return True

    def back_off(self, model, method: str) -> float | None:
        """After a trip: when a backoff is left and a good state is kept, put that state back into
        ``model``, log one line, clear the trip -> the lr factor to train on at; else None (stop)."""
        if self.tripped is None or self.good is None or len(self.backoffs) >= len(self.backoff):
            return None
        factor = self.backoff[len(self.backoffs)]
        trip = self._trip(method)
        self.restore(model)
        step, p = self.tripped
        record = {"tripped_at_step": step, "tripped_retain_prob": p, "restored_step": self.good_step,
                  "lr_factor": factor}
        if self.tripped_answers is not None:
            record.update(tripped_split=self.tripped_answers[0], tripped_distinct_bigrams=self.tripped_answers[1])
        self.backoffs.append(record)
        self.tripped = self.tripped_answers = None
        log.warning("%s; backed off (%d of %d): put its last good state (step %d) back and trains on at %g x the "
                    "lr, with fresh optimizer moments", trip, len(self.backoffs),
                    len(self.backoff), self.good_step, factor)
        return factor

    def restore(self, model) -> int | None:
        """Put the last passing state back into ``model`` -> its step, or None when there is none."""
        if self.good is None:
            return None
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in self.good.items():
                params[n].copy_(t.to(params[n].dtype))
        return self.good_step

    def _trip(self, method: str, after: str | None = None) -> str:
        """What tripped it, the first part of each line."""
        step, p = self.tripped
        when = f"after {after} (step {step})" if after else f"at step {step}"
        if self.tripped_answers is not None:
            split, v = self.tripped_answers
            return (f"{method}: collapsed {when}: its greedy answers to {split} questions loop (distinct-bigram "
                    f"share {v:.3f} fell below the collapse floor {self.answer_floors[split]:.3f}, {self.fraction:g} x "
                    f"the target's {self.target_answers[split]:.3f}; retain probability {p:.3f})")
        return (f"{method}: collapsed {when}: retain probability {p:.3f} fell below the collapse floor "
                f"{self.floor:.3f} ({self.fraction:g} x the target's {self.target_prob:.3f})")

    def line(self, method: str, saved: str | None, after: str | None = None) -> str:
        what = (f"saved its last good state (step {self.good_step}) as {saved}, labelled as such" if saved
                else "nothing was saved")
        return f"{self._trip(method, after)}; stopped, {what}"

    def summary(self) -> dict:
        out = {"collapse_floor": self.fraction, "target_retain_prob": self.target_prob, "floor": self.floor,
               "last_retain_prob": self.last}
        if self.backoff:
            out.update(backoff=self.backoff, backoffs=self.backoffs)
        if self.target_answers:
            out.update(target_distinct_bigrams=self.target_answers, last_distinct_bigrams=self.last_answers)
        if self.tripped is not None:
            out.update(tripped_at_step=self.tripped[0], tripped_retain_prob=self.tripped[1], kept_step=self.good_step)
            if self.tripped_answers is not None:
                out.update(tripped_split=self.tripped_answers[0], tripped_distinct_bigrams=self.tripped_answers[1])
        return out


def backoff_text(meta: dict) -> str | None:
    """The backoffs an unlearned checkpoint's run took (``collapse_backoff``), one clause each, or None."""
    out = []
    for b in (meta.get("collapse_guard") or {}).get("backoffs") or []:
        why = (f"{b['tripped_split']} answers loop (share {b['tripped_distinct_bigrams']:.3f})"
               if "tripped_split" in b else f"retain probability {b['tripped_retain_prob']:.3f}")
        out.append(f"tripped at step {b['tripped_at_step']} ({why}), step {b['restored_step']} put back, "
                   f"on at {b['lr_factor']:g} x the lr")
    return "; ".join(out) or None


def _text_forget_prob(ds, n: int):
    """Raw-text benchmarks: the early-stop probe is exp(-mean token NLL) of each of the first ``n``
    forget items (MUSE chunks, WMDP documents), averaged."""
    from .scoring import answer_nll

    batch = ds.collate([ds[i] for i in range(min(n, len(ds)))])

    @torch.no_grad()
    def forget_prob(m):
        device = next(m.parameters()).device
        total, count = answer_nll(m, {k: v.to(device) for k, v in batch.items()})
        return float(torch.exp(-total / count.clamp(min=1)).mean())

    return forget_prob


def unlearn_all(cfg: dict, bench, target: str, target_id: str, run_dir: Path,
                methods: list[str] | None = None, oracle: str | None = None,
                collapsed: dict | None = None) -> dict[str, Path]:
    """Every method of ``methods`` (default: the recipe's ``unlearn.methods``) from one target, with
    one shared frozen reference and one set of stop levels (``oracle``: the retain oracle's checkpoint).
    -> method -> checkpoint dir (under ``run_dir/checkpoints``). ``collapsed``: where a method whose
    collapse guard tripped with nothing to save goes (method -> its one line) while the others run on;
    without it the first such method raises ``TrainingCollapsed``."""
    methods = methods or cfg["unlearn"]["methods"]
    for m in methods:
        check_method(m, "--methods")
    reference = Reference(target, cfg["model"]["trust_remote_code"], cfg["runtime"]["zero3_reference"])
    levels = StopLevels(cfg, bench, target, oracle)
    done = {}
    for m in methods:
        try:
            done[m] = unlearn(cfg, bench, target, target_id, m, Path(run_dir) / "checkpoints", reference, levels)
        except TrainingCollapsed as exc:
            if collapsed is None:
                raise
            log.warning("%s", exc)
            collapsed[m] = str(exc)
    return done
