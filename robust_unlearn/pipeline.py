"""Orchestration: data -> target + oracle -> evaluate -> report, with caches and the ledger."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import yaml

from . import config as config_mod
from . import ids
from .data import benchmark_of, dataset_for, fingerprint, load_benchmark, target_texts
from .errors import UserError
from .methods import get_objective
from .metrics.tofu import Evaluator
from .models import load_model, read_metadata, resolve_base, save_model
from .report import STUDY_FILE, write_report, write_study_report
from .sweep import sweep
from .train import precision_ran, train
from .unlearn import backoff_text, unlearn_all

log = logging.getLogger(__name__)
FINETUNE_VERSION = "ft-1"  # bump when fine-tuning code changes what it produces


def finetune_cached(cfg: dict, bench, role: str, base: Path | str) -> tuple[Path, str]:
    """Fine-tune ``base`` on ``bench['train_<role>']`` (TOFU's recipe: small lr, a few epochs), or
    reuse the cached result. -> (checkpoint dir, checkpoint id)."""
    rows = bench[f"train_{role}"]
    spec = {"version": FINETUNE_VERSION, "role": role, "base": ids.base_identity(base), "data": fingerprint(rows),
            "finetune": cfg["finetune"], "seed": cfg["seed"],
            "prompt": ids.prompt_spec(cfg)}
    key = ids.stable_hash(spec)[:16]
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
    meta = {"role": role, "spec": spec, "precision": precision_ran(cfg["finetune"]["precision"], state.distributed_type),
            "precision_setting": cfg["finetune"]["precision"], "final_loss": losses[-1],
            "train_seconds": round(time.time() - t0, 1), "rows": len(rows)}
    save_model(model, tok, out, meta)
    if state.num_processes > 1:
        state.wait_for_everyone()
    log.info("%s: fine-tuned in %.0fs (final loss %.3f)", role, time.time() - t0, losses[-1])
    return out, key


def evaluate_checkpoint(cfg: dict, bench, run_dir: Path, label: str, ckpt: str, ckpt_id: str | None = None,
                        method: str = "none", oracle_stats: Path | None = None,
                        evaluator: Evaluator | None = None) -> tuple[dict, Path]:
    """Evaluate one checkpoint (compression ``none``) into the run's ledger; skip if already there.
    The ``none`` column of ``sweep.sweep`` (one code path). -> (metrics, path of its per-example stats)."""
    cells = sweep(cfg, bench, run_dir, [(label, ckpt, method, ckpt_id)], ["none"], oracle=oracle_stats,
                  evaluator=evaluator)
    return cells[(label, "none")]


def _base(cfg: dict, bench) -> Path | str:
    return resolve_base(cfg["model"]["base"], config_mod.cache_dir(cfg), target_texts(bench), cfg["seed"])


def target_checkpoint(cfg: dict, bench, given: str | None = None) -> tuple[str, str]:
    """The target: ``given``, else the recipe's ``model.target``, else fine-tuned (cached) from the
    base on ``train_target``. -> (checkpoint, checkpoint id)."""
    given = given or cfg["model"]["target"]
    if given is not None:
        return str(given), ids.ckpt_id(str(given))
    path, key = finetune_cached(cfg, bench, "target", _base(cfg, bench))
    return str(path), key


def needs_oracle(cfg: dict, methods: list[str] | None = None) -> bool:
    """Whether a method stops at the retain oracle's level (``stop_forget_prob: oracle``)."""
    from .config import method_settings

    return any(method_settings(cfg, m)["stop_forget_prob"] == "oracle" for m in methods or cfg["unlearn"]["methods"])


def oracle_checkpoint(cfg: dict, bench) -> tuple[str, str] | None:
    """The retain oracle (the recipe's ``model.oracle`` or fine-tuned on ``train_oracle``), or None."""
    if cfg["model"]["oracle"] is not None:
        return cfg["model"]["oracle"], ids.ckpt_id(cfg["model"]["oracle"])
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
    collapsed: dict[str, str] = {}  # methods whose collapse guard tripped with nothing to save
    unlearned = unlearn_all(cfg, bench, *models["target"], run_dir, oracle=models.get("oracle", (None,))[0],
                            collapsed=collapsed) if cfg["unlearn"]["methods"] else {}
    checkpoints = [("target", models["target"][0], "none", models["target"][1])]
    if "oracle" in models and cfg["sweep"]["oracle"]:
        checkpoints.append(("oracle", models["oracle"][0], "none", models["oracle"][1]))
    checkpoints += [(m, str(path), m) for m, path in unlearned.items()]
    models.update({m: (str(path), None) for m, path in unlearned.items()})
    metas = {m: read_metadata(path) for m, path in unlearned.items()}
    last_good = {m: meta["state"] for m, meta in metas.items() if meta.get("state")}
    backed_off = {m: backoff_text(meta) for m, meta in metas.items() if backoff_text(meta)}
    sweep(cfg, bench, run_dir, checkpoints, cfg["sweep"]["compressions"], oracle=oracle_stats)
    info = {"name": cfg["name"], "benchmark": cfg["data"]["name"] + (f" ({cfg['data']['path']})" if cfg["data"]["path"] else ""),
            "forget_split": _forget_name(cfg), "base_model": cfg["model"]["base"],
            "models": {k: v[0] for k, v in models.items()}, "holds_margin": cfg["sweep"]["holds_margin"],
            "collapsed": collapsed, "last_good": last_good, "backed_off": backed_off, "seed": cfg["seed"],
            "wall_time_s": round(time.time() - t0, 1),
            "command": command}
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))
    write_report(run_dir, info)
    return run_dir


def study_cells(cfg: dict, seeds: list[int], splits: list[str]) -> list[tuple[str, int, dict]]:
    """(forget split, seed, that run's recipe) for each cell of a study, forget split first."""
    import copy

    out = []
    for split in splits:
        for seed in seeds:
            sub = copy.deepcopy(cfg)
            sub["seed"], sub["name"] = seed, f"{cfg['name']}-{split}-seed{seed}"
            sub["data"]["forget_split"] = split
            out.append((split, seed, sub))
    return out


def study(cfg: dict, seeds: list[int], splits: list[str], out: str | Path, command: str | None = None) -> Path:
    """One recipe over seeds x forget splits: each cell a whole :func:`run` into
    ``out/<split>/seed<k>`` (a seed changes the built-in benchmark's authors, the fine-tuning order and
    the unlearning batches), then ``out/report.md`` with every run's values and, over seeds, means with
    95% intervals. Cells already done are reused (their caches and ledgers), so a study resumes."""
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = study_cells(cfg, seeds, splits)
    for i, (split, seed, sub) in enumerate(cells, 1):
        log.warning("study: run %d/%d: %s seed %d", i, len(cells), split, seed)
        run(sub, out / split / f"seed{seed}", command=command)
    info = {"name": cfg["name"], "benchmark": cfg["data"]["name"] + (f" ({cfg['data']['path']})" if cfg["data"]["path"] else ""),
            "base_model": cfg["model"]["base"], "seeds": seeds, "forget_splits": splits,
            "methods": cfg["unlearn"]["methods"], "compressions": cfg["sweep"]["compressions"],
            "holds_margin": cfg["sweep"]["holds_margin"], "wall_time_s": round(time.time() - t0, 1), "command": command}
    (out / STUDY_FILE).write_text(json.dumps(info, indent=2))
    write_study_report(out, info)
    return out


def _forget_name(cfg: dict) -> str:
    return benchmark_of(cfg).forget_name(cfg["data"])


def evaluate(cfg: dict, model_dir: str, out: str | Path, label: str | None = None, oracle: str | None = None) -> dict:
    """Evaluate any checkpoint on the recipe's benchmark (``oracle``: for forget_quality). Under
    ``accelerate launch`` the prompts are split across the processes (``sweep``)."""
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
    from accelerate.state import PartialState

    if PartialState().is_main_process:  # under accelerate launch each process scored a share; one writes
        write_report(run_dir)
    return metrics
