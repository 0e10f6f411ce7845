"""Orchestration: data -> target + oracle -> evaluate -> report, with caches and the ledger."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from . import config as config_mod
from .data import TEXT_BENCHMARKS, fingerprint, load_benchmark
from .data.collate import QADataset, QAFormatter, TextDataset
from .errors import UserError
from .methods import get_objective
from .metrics.tofu import Evaluator, SplitStats
from .models import load_model, resolve_base, save_model
from .report import write_report
from .train import train

log = logging.getLogger(__name__)
FINETUNE_VERSION = "ft-1"  # bump when fine-tuning code changes what it produces


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _base_identity(base: Path | str) -> dict:
    p = Path(base)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        return {"path": str(p.resolve()), "weights": [(f.name, f.stat().st_size) for f in files]}
    return {"hub": str(base)}


def _texts(bench) -> list[str]:
    rows = bench["train_target"]
    if "text" in rows.column_names:  # a raw-text benchmark
        return list(rows["text"])
    return [t for r in rows for t in (r["question"], r["answer"])]


def formatter_for(tok, cfg: dict) -> QAFormatter:
    m = cfg["model"]
    return QAFormatter(tok, prompt=m["prompt"], system_prompt=m["system_prompt"], max_length=m["max_length"])


def dataset_for(cfg: dict, rows, tok):
    """Training items of ``rows`` for this recipe's benchmark: QA pairs in the model's prompt format
    (answer tokens trained), or raw text (every token trained; MUSE chunks, WMDP documents), both
    cut to ``model.max_length`` tokens."""
    mode = TEXT_BENCHMARKS.get(cfg["data"]["name"])
    if mode is not None:
        return TextDataset(rows, tok, cfg["model"]["max_length"], mode)
    return QADataset(rows, formatter_for(tok, cfg))


def finetune_cached(cfg: dict, bench, role: str, base: Path | str) -> tuple[Path, str]:
    """Fine-tune ``base`` on ``bench['train_<role>']`` (TOFU's recipe: small lr, a few epochs), or
    reuse the cached result. -> (checkpoint dir, checkpoint id)."""
    rows = bench[f"train_{role}"]
    spec = {"version": FINETUNE_VERSION, "role": role, "base": _base_identity(base), "data": fingerprint(rows),
            "finetune": cfg["finetune"], "seed": cfg["seed"],
            "prompt": {k: cfg["model"][k] for k in ("prompt", "system_prompt", "max_length")}}
    key = _hash(spec)[:16]
    out = config_mod.cache_dir(cfg) / "models" / f"{role}-{key}"
    if (out / "config.json").is_file():
        log.info("%s: reusing cached checkpoint %s", role, out)
        return out, key
    t0 = time.time()
    model, tok = load_model(str(base), "float32", cfg["model"]["trust_remote_code"])
    if cfg["finetune"]["freeze_embeddings"]:
        model.get_input_embeddings().weight.requires_grad_(False)
    ds = dataset_for(cfg, rows, tok)
    model, losses = train(model, get_objective("nll"), {"train": ds}, cfg["finetune"], seed=cfg["seed"],
                          desc=f"fine-tune {role}")
    from accelerate.state import PartialState

    state = PartialState()
    if not state.is_main_process:  # under several processes the main one writes the checkpoint
        state.wait_for_everyone()
        return out, key
    if cfg["finetune"]["precision"] == "bf16":
        model.to(torch.float32)
    meta = {"role": role, "spec": spec, "precision": cfg["finetune"]["precision"], "final_loss": losses[-1],
            "train_seconds": round(time.time() - t0, 1), "rows": len(rows)}
    save_model(model, tok, out, meta)
    if state.num_processes > 1:
        state.wait_for_everyone()
    log.info("%s: fine-tuned in %.0fs (final loss %.3f)", role, time.time() - t0, losses[-1])
    return out, key


def _ckpt_id(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        return _hash([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])[:16]
    return _hash(path)[:16]


def _eval_id(cfg: dict, bench) -> str:
    spec = {"eval": cfg["eval"], "prompt": {k: cfg["model"][k] for k in ("prompt", "system_prompt", "max_length")},
            "data": {s: fingerprint(bench[s]) for s in bench if not s.startswith("train_")}}
    return _hash(spec)[:16]


def _save_stats(path: Path, per: dict[str, SplitStats]) -> None:
    obj = {split: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(st).items()}
           for split, st in per.items()}
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def evaluate_checkpoint(cfg: dict, bench, run_dir: Path, label: str, ckpt: str, ckpt_id: str | None = None,
                        method: str = "none", oracle_stats: Path | None = None,
                        evaluator: Evaluator | None = None) -> tuple[dict, Path]:
    """Evaluate one checkpoint (compression ``none``) into the run's ledger; skip if already there.
    The ``none`` column of ``sweep.sweep`` (one code path). -> (metrics, path of its per-example stats)."""
    from .sweep import sweep  # late: sweep imports this module's helpers

    cells = sweep(cfg, bench, run_dir, [(label, ckpt, method, ckpt_id)], ["none"], oracle=oracle_stats,
                  evaluator=evaluator)
    return cells[(label, "none")]


def _split_of(metric: str) -> str:
    if metric in ("model_utility", "mmlu_acc"):
        return "utility"
    if metric in ("privleak", "mia_min_k") or metric.startswith("wmdp_"):
        return "forget"  # MUSE's attack on the forget set; WMDP's hazardous knowledge
    return metric.split("_", 1)[0]


def _base(cfg: dict, bench) -> Path | str:
    return resolve_base(cfg["model"]["base"], config_mod.cache_dir(cfg), _texts(bench), cfg["seed"])


def target_checkpoint(cfg: dict, bench, given: str | None = None) -> tuple[str, str]:
    """The target: ``given``, else the recipe's ``model.target``, else fine-tuned (cached) from the
    base on ``train_target``. -> (checkpoint, checkpoint id)."""
    given = given or cfg["model"]["target"]
    if given is not None:
        return str(given), _ckpt_id(str(given))
    path, key = finetune_cached(cfg, bench, "target", _base(cfg, bench))
    return str(path), key


def oracle_checkpoint(cfg: dict, bench) -> tuple[str, str] | None:
    """The retain oracle (the recipe's ``model.oracle`` or fine-tuned on ``train_oracle``), or None."""
    if cfg["model"]["oracle"] is not None:
        return cfg["model"]["oracle"], _ckpt_id(cfg["model"]["oracle"])
    if "train_oracle" in bench:
        path, key = finetune_cached(cfg, bench, "oracle", _base(cfg, bench))
        return str(path), key
    return None


def run(cfg: dict, out: str | Path | None = None, command: str | None = None) -> Path:
    t0 = time.time()
    run_dir = Path(out) if out else Path("runs") / cfg["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    bench = load_benchmark(cfg)
    models: dict[str, tuple[str, str | None]] = {}
    oracle = oracle_checkpoint(cfg, bench)
    if oracle is not None:
        models["oracle"] = oracle
    models["target"] = target_checkpoint(cfg, bench)
    oracle_stats = None
    if "oracle" in models:
        _, oracle_stats = evaluate_checkpoint(cfg, bench, run_dir, "oracle", *models["oracle"])
    else:
        from .metrics import suite_for

        ref_metric = suite_for(cfg).reference_metric
        if ref_metric is not None:
            log.warning("no retain oracle (data has no retain split and model.oracle is unset): %s %s", ref_metric,
                        "skipped" if ref_metric == "forget_quality" else "uses its default reference")
    evaluate_checkpoint(cfg, bench, run_dir, "target", *models["target"], oracle_stats=oracle_stats)
    # unlearn -> compress -> evaluate: every method from the one target, then the sweep over
    # target, oracle and every unlearned checkpoint (each loaded once)
    from .sweep import sweep
    from .unlearn import unlearn_all

    unlearned = unlearn_all(cfg, bench, *models["target"], run_dir) if cfg["unlearn"]["methods"] else {}
    checkpoints = [("target", models["target"][0], "none", models["target"][1])]
    if "oracle" in models and cfg["sweep"]["oracle"]:
        checkpoints.append(("oracle", models["oracle"][0], "none", models["oracle"][1]))
    checkpoints += [(m, str(path), m) for m, path in unlearned.items()]
    models.update({m: (str(path), None) for m, path in unlearned.items()})
    sweep(cfg, bench, run_dir, checkpoints, cfg["sweep"]["compressions"], oracle=oracle_stats)
    info = {"name": cfg["name"], "benchmark": cfg["data"]["name"] + (f" ({cfg['data']['path']})" if cfg["data"]["path"] else ""),
            "forget_split": _forget_name(cfg), "base_model": cfg["model"]["base"],
            "models": {k: v[0] for k, v in models.items()}, "wall_time_s": round(time.time() - t0, 1),
            "command": command}
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))
    write_report(run_dir, info)
    return run_dir


def _forget_name(cfg: dict) -> str:
    d = cfg["data"]
    if d["name"] not in TEXT_BENCHMARKS:
        return d["forget_split"]
    default = "forget" if d["name"] == "muse_news" else "cyber-forget-corpus"
    corpus = d["forget_corpus"] or default
    return ",".join(corpus) if isinstance(corpus, list) else corpus


def evaluate(cfg: dict, model_dir: str, out: str | Path, label: str | None = None, oracle: str | None = None) -> dict:
    """Evaluate any checkpoint on the recipe's benchmark (``oracle``: for forget_quality)."""
    bench = load_benchmark(cfg)
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    oracle_stats = None
    if oracle:
        _, oracle_stats = evaluate_checkpoint(cfg, bench, run_dir, "oracle", oracle)
    label = label or Path(model_dir).name
    if label == "oracle" and oracle:
        raise UserError("--label oracle is reserved for the --oracle checkpoint")
    metrics, _ = evaluate_checkpoint(cfg, bench, run_dir, label, model_dir, oracle_stats=oracle_stats)
    write_report(run_dir)
    return metrics
