"""The unlearning stage: target checkpoint + method -> unlearned Hugging Face checkpoint.

One method at a time through the one training loop (``train.train``): the ``forget`` stream is the
forget split (its epochs set the length), the ``retain`` stream is the retain training data
(``train_oracle``: every retain author, as open-unlearning's retain90) cycled alongside. The frozen
reference (NPO, KL, RMU) is, with ``runtime.shared_reference`` (the default), the training model itself
with its trained tensors swapped back to frozen copies (:class:`SharedReference`): it costs only the
trained tensors, not a second model. Otherwise the whole target is loaded once per run by
:class:`Reference` and shared by every method that needs it. A non-finite loss stops the method before
anything is written. With ``runtime.checkpoint_every`` the training state is saved every N steps into a
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
from .config import method_settings
from .data import dataset_for, fingerprint, is_text_benchmark
from .data.collate import formatter_for
from .ids import stable_hash
from .methods import NEEDS_REF, build_objective, check_method, split_method
from .models import load_model, read_metadata, save_model
from .scoring import qa_mean_nll
from .train import train
from .weight_stats import update_stats

log = logging.getLogger(__name__)
UNLEARN_VERSION = "ul-1"  # bump when the unlearning code changes what it produces


class Reference:
    """The frozen target, loaded on first use and kept for every method of the run."""

    def __init__(self, path: str, trust_remote_code: bool = False):
        self.path, self.trust, self._model = path, trust_remote_code, None

    def get(self):
        if self._model is None:
            self._model, _ = load_model(self.path, "float32", self.trust)
            self._model.requires_grad_(False)
            self._model.eval()
            log.info("reference model loaded once from %s", self.path)
        return self._model


class SharedReference:
    """The frozen target without a second copy of it: the training model, called with its trained
    tensors replaced by copies of their values before training (``torch.func.functional_call``).
    Untrained tensors never move, so the outputs are the target's. Until :meth:`freeze` nothing has
    trained and the model is its own reference (the saliency pass at the target weights).

    Under DeepSpeed ZeRO-3 the model's tensors are partitioned and cannot be swapped: the reference
    is then ``fallback`` (the whole target, loaded once: :class:`Reference`)."""

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
            self.kind = "full copy (ZeRO-3)"
            return self._fallback.get()
        return self

    def __call__(self, *args, **kwargs):
        target = self.current()
        if target is not self:
            return target(*args, **kwargs)
        if not self._orig:
            return self._model(*args, **kwargs)
        params = dict(self._model.named_parameters())
        for n, t in self._orig.items():  # follow the model's dtype (a bf16 run casts it after freeze)
            if t.dtype != params[n].dtype:
                self._orig[n] = t.to(params[n].dtype)
        return torch.func.functional_call(self._model, self._orig, args, kwargs, strict=False)

    def __getattr__(self, name):
        return getattr(self._model, name)


def retain_rows(bench):
    return bench["train_oracle"] if "train_oracle" in bench else bench["retain"]


def unlearn(cfg: dict, bench, target: str, target_id: str, method: str, out_dir: Path,
            reference: Reference | None = None) -> Path:
    """Unlearn ``bench['forget']`` from ``target`` with ``method`` -> checkpoint dir (reused when the
    same spec was already trained into ``out_dir``)."""
    check_method(method)
    settings = method_settings(cfg, method)
    spec = {"version": UNLEARN_VERSION, "method": method, "settings": settings, "target": target_id,
            "forget": fingerprint(bench["forget"]), "retain": fingerprint(retain_rows(bench)), "seed": cfg["seed"],
            "prompt": {k: cfg["model"][k] for k in ("prompt", "system_prompt", "max_length")}}
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
    shared = None
    reference = reference or Reference(target, cfg["model"]["trust_remote_code"])
    if method in NEEDS_REF and cfg["runtime"]["shared_reference"]:
        ref = shared = SharedReference(model, reference)
    else:
        ref = reference.get() if method in NEEDS_REF else None
    objective = build_objective(method, settings, model, ref=ref, seed=cfg["seed"])
    fmt = formatter_for(tok, cfg)
    streams = {"forget": dataset_for(cfg, bench["forget"], tok)}
    if "retain" in objective.streams:
        streams["retain"] = dataset_for(cfg, retain_rows(bench), tok)
    wrapper = split_method(method)[0]
    constraint, plan = None, None
    if wrapper is not None:  # SURE / Robust: which weights may move, chosen at the target weights
        from .robust.update import plan_update

        data = dict(streams)
        data.setdefault("retain", dataset_for(cfg, retain_rows(bench), tok))
        constraint, plan = plan_update(model, objective, data, settings, robust=wrapper == "Robust", seed=cfg["seed"])
    history: list[tuple[int, float]] = []
    if is_text_benchmark(cfg):
        forget_prob = _text_forget_prob(streams["forget"], cfg["eval"]["batch_size"])
    else:
        pairs = [(r["question"], r["answer"]) for r in bench["forget"]]

        def forget_prob(m):
            return float(np.exp(-qa_mean_nll(m, fmt, pairs, cfg["eval"]["batch_size"])).mean())

    def forget_prob_reached(m, step):
        p = forget_prob(m)
        history.append((step, p))
        log.info("%s: step %d forget probability %.3f", method, step, p)
        return p <= settings["stop_forget_prob"]

    stop = forget_prob_reached if settings["stop_forget_prob"] is not None else None

    if shared is not None:
        shared.freeze()
    train_cfg = dict(settings, checkpoint_every=cfg["runtime"]["checkpoint_every"])
    state_dir = out.parent / f".{out.name}.train"  # resumable states of this spec, removed once saved
    model, losses = train(model, objective, streams, train_cfg, seed=cfg["seed"], desc=f"unlearn {method}",
                          primary="forget", stop=stop, constraint=constraint, state_dir=state_dir,
                          extra={"forget_prob_history": history})
    from accelerate.state import PartialState

    state = PartialState()
    if not state.is_main_process:  # the main process writes the checkpoint
        state.wait_for_everyone()
        return out
    if constraint is not None:
        plan["final"] = constraint.finish()  # the floor, on the weights as they will be saved
    saved_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    meta = {"role": "unlearned", "method": method, "spec": spec, "spec_key": key, "precision": settings["precision"],
            "saved_dtype": saved_dtype, "target": str(target), "steps": len(losses), "first_loss": losses[0],
            "final_loss": losses[-1], "forget_prob_history": history,
            "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "update": update_stats(before, model), "train_seconds": round(time.time() - t0, 1),
            "launch": {"processes": state.num_processes, "distributed_type": str(state.distributed_type)},
            "reference": None if method not in NEEDS_REF else (shared.kind if shared is not None else "full copy")}
    if plan is not None:
        meta["plan"] = {k: v for k, v in plan.items() if k != "salient"}
        meta["plan"]["salient"] = plan["salient"]
    for p in model.parameters():
        p.requires_grad_(True)
    save_model(model, tok, out, meta)
    shutil.rmtree(state_dir, ignore_errors=True)
    if state.num_processes > 1:
        state.wait_for_everyone()
    log.info("%s: %d steps in %.0fs, update %s", method, len(losses), time.time() - t0, meta["update"])
    return out


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
                methods: list[str] | None = None) -> dict[str, Path]:
    """Every method of ``methods`` (default: the recipe's ``unlearn.methods``) from one target, with
    one shared frozen reference. -> method -> checkpoint dir (under ``run_dir/checkpoints``)."""
    methods = methods or cfg["unlearn"]["methods"]
    for m in methods:
        check_method(m, "--methods")
    reference = Reference(target, cfg["model"]["trust_remote_code"])
    return {m: unlearn(cfg, bench, target, target_id, m, Path(run_dir) / "checkpoints", reference) for m in methods}
