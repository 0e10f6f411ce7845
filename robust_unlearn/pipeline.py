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
from .data import fingerprint, load_benchmark
from .data.collate import QADataset, QAFormatter
from .errors import UserError
from .ledger import Ledger
from .methods import get_objective
from .metrics.tofu import Evaluator, SplitStats
from .models import load_model, read_metadata, resolve_base, save_model
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
    return [t for r in bench["train_target"] for t in (r["question"], r["answer"])]


def formatter_for(tok, cfg: dict) -> QAFormatter:
    m = cfg["model"]
    return QAFormatter(tok, prompt=m["prompt"], system_prompt=m["system_prompt"], max_length=m["max_length"])


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
    ds = QADataset(rows, formatter_for(tok, cfg))
    model, losses = train(model, get_objective("nll"), {"train": ds}, cfg["finetune"], seed=cfg["seed"],
                          desc=f"fine-tune {role}")
    if cfg["finetune"]["precision"] == "bf16":
        model.to(torch.float32)
    meta = {"role": role, "spec": spec, "precision": cfg["finetune"]["precision"], "final_loss": losses[-1],
            "train_seconds": round(time.time() - t0, 1), "rows": len(rows)}
    save_model(model, tok, out, meta)
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


def _load_forget_tr(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    tr = json.loads(path.read_text()).get("forget", {}).get("truth_ratio")
    return np.array(tr) if tr is not None else None


def evaluate_checkpoint(cfg: dict, bench, run_dir: Path, label: str, ckpt: str, ckpt_id: str | None = None,
                        method: str = "none", oracle_stats: Path | None = None,
                        evaluator: Evaluator | None = None) -> tuple[dict, Path]:
    """Evaluate one checkpoint (compression ``none``) into the run's ledger; skip if already there.
    -> (metrics, path of its per-example stats)."""
    ckpt_id = ckpt_id or _ckpt_id(ckpt)
    eval_id = _eval_id(cfg, bench)
    ledger = Ledger(run_dir / "results.jsonl")
    stats_path = run_dir / "stats" / f"{label}-{ckpt_id}-{eval_id}.json"
    done = [r for r in ledger.rows() if (r["model"], r["ckpt"], r["eval"], r["compression"]) == (label, ckpt_id, eval_id, "none")]
    oracle_tr = _load_forget_tr(oracle_stats) if oracle_stats else None
    if done and stats_path.is_file() and (oracle_tr is None or any(r["metric"] == "forget_quality" for r in done)):
        log.info("%s: already evaluated (%d rows in the ledger), skipped", label, len(done))
        return {r["metric"]: r["value"] for r in done}, stats_path
    model, tok = load_model(ckpt, "float32", cfg["model"]["trust_remote_code"])
    ev = evaluator or Evaluator(formatter_for(tok, cfg), cfg["eval"]["batch_size"], cfg["eval"]["max_new_tokens"],
                                cfg["eval"]["rouge"])
    t0 = time.time()
    if label == "oracle" and oracle_tr is None:
        oracle_tr = "self"
    metrics, per = ev.evaluate(model, bench, oracle_forget_tr=oracle_tr)
    _save_stats(stats_path, per)
    meta = read_metadata(ckpt)
    precision = meta.get("precision", "fp32" if Path(ckpt).is_dir() else "n/a")
    rows = [{"model": label, "method": method, "compression": "none", "split": _split_of(m), "metric": m,
             "value": v, "ckpt": ckpt_id, "eval": eval_id, "precision": precision, "checkpoint": str(ckpt)}
            for m, v in metrics.items()]
    ledger.append(rows)
    log.info("%s: evaluated in %.0fs", label, time.time() - t0)
    return metrics, stats_path


def _split_of(metric: str) -> str:
    if metric == "model_utility":
        return "utility"
    return metric.split("_", 1)[0]


def run(cfg: dict, out: str | Path | None = None, command: str | None = None) -> Path:
    t0 = time.time()
    run_dir = Path(out) if out else Path("runs") / cfg["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    bench = load_benchmark(cfg)
    cache = config_mod.cache_dir(cfg)
    base = None
    if cfg["model"]["target"] is None or (cfg["model"]["oracle"] is None and "train_oracle" in bench):
        base = resolve_base(cfg["model"]["base"], cache, _texts(bench), cfg["seed"])
    models: dict[str, tuple[str, str | None]] = {}
    if cfg["model"]["oracle"] is not None:
        models["oracle"] = (cfg["model"]["oracle"], None)
    elif "train_oracle" in bench:
        path, key = finetune_cached(cfg, bench, "oracle", base)
        models["oracle"] = (str(path), key)
    if cfg["model"]["target"] is not None:
        models["target"] = (cfg["model"]["target"], None)
    else:
        path, key = finetune_cached(cfg, bench, "target", base)
        models["target"] = (str(path), key)
    oracle_stats = None
    if "oracle" in models:
        _, oracle_stats = evaluate_checkpoint(cfg, bench, run_dir, "oracle", *models["oracle"])
    else:
        log.warning("no retain oracle (data has no retain split and model.oracle is unset): forget_quality skipped")
    evaluate_checkpoint(cfg, bench, run_dir, "target", *models["target"], oracle_stats=oracle_stats)
    info = {"name": cfg["name"], "benchmark": cfg["data"]["name"] + (f" ({cfg['data']['path']})" if cfg["data"]["path"] else ""),
            "forget_split": cfg["data"]["forget_split"], "base_model": cfg["model"]["base"],
            "models": {k: v[0] for k, v in models.items()}, "wall_time_s": round(time.time() - t0, 1),
            "command": command}
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))
    write_report(run_dir, info)
    return run_dir


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
