"""Recipes: YAML files merged over the defaults below, plus dotted ``key=value`` overrides.

The defaults are the schema: a recipe may only set keys that exist here (an unknown key is a
one-line error naming it), and a value must have the type of its default (``None`` defaults accept
anything). ``recipes/default.yaml`` spells the defaults out; a test keeps the two equal.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO_ROOT / "recipes" / "default.yaml"

DEFAULTS: dict[str, Any] = {
    "name": "default",
    "seed": 0,
    "cache_dir": None,  # None -> $ROBUST_UNLEARN_CACHE or ~/.cache/robust_unlearn
    "data": {
        "name": "fictitious",      # fictitious | tofu | muse_news | wmdp
        "path": None,              # tofu: local dir of TOFU JSON-lines files, or a hub id; muse_news / wmdp: a
                                   # local dir in the hub's layout or a hub id (None: muse-bench/MUSE-News, cais/wmdp)
        "forget_split": "forget30",  # fictitious / tofu: forgetNN; fictitious: NN% of the authors (>= 1 author)
        "num_authors": 10,         # fictitious: authors seen in training (forget + retain)
        "qa_per_author": 6,        # fictitious: QA pairs per author (<= 8 question types)
        "num_perturbed": 3,        # fictitious: wrong answers per question (>= 3)
        "holdout_authors": 3,      # fictitious: authors never trained on
        "train_utility": None,     # also fine-tune on real_authors/world_facts; null: yes for fictitious, no for tofu (as TOFU)
        "limit": None,             # keep at most this many rows per split (quick runs)
        # raw-text benchmarks (data/muse.py, data/wmdp.py)
        "forget_corpus": None,     # muse_news: raw split (None: forget); wmdp: corpora, list or a,b (None: cyber-forget-corpus)
        "retain_corpus": None,     # muse_news: raw split (None: retain1); wmdp: corpora or wikitext (None: wikitext, as RMU)
        "corpus_path": None,       # wmdp: the corpora, local dir or hub id (None: cais/wmdp-corpora)
        "mmlu_path": None,         # wmdp utility: MMLU CSV dir (test/<subject>_test.csv) or hub id (None: cais/mmlu)
        "wmdp_subsets": None,      # wmdp: question sets evaluated (None: [wmdp-bio, wmdp-cyber])
    },
    "model": {
        "base": "smollm2-135m",    # smollm2-135m | tiny | a local checkpoint dir | a hub id
        "prompt": "chat",          # chat (tokenizer's chat template) | qa ("Question: ...\nAnswer: ...")
        "system_prompt": "You are a helpful assistant.",
        "target": None,            # None: fine-tune from base on forget+retain; else a checkpoint dir/hub id
        "oracle": None,            # None: fine-tune from base on retain only; else a checkpoint dir/hub id
        "trust_remote_code": False,
        "max_length": 256,
    },
    "finetune": {
        "epochs": 7,
        "lr": 3.0e-4,
        "batch_size": 8,
        "weight_decay": 0.01,
        "warmup_ratio": 0.1,
        "schedule": "linear",      # a transformers scheduler name: linear | constant_with_warmup | cosine
        "precision": "mixed",      # fp32 | mixed (bf16 compute, fp32 master weights) | bf16
        "freeze_embeddings": True,  # keep the (tied) token embeddings fixed while fine-tuning
        "grad_clip": 1.0,
    },
    "eval": {
        "batch_size": 32,
        "max_new_tokens": 32,      # TOFU: greedy, up to 200 new tokens; built-in answers are <= 24 tokens
        "rouge": True,
    },
    "unlearn": {
        "methods": ["GradDiff", "SimNPO", "RMU"],  # what `run` unlearns (robust_unlearn.methods.METHODS)
        "lr": 1.0e-4,
        "steps": 40,               # optimizer steps; None: `epochs` passes over the forget set
        "epochs": 10.0,
        "batch_size": 8,           # forget batch; the retain stream uses the same size
        "gamma": 1.0,              # forget-loss weight
        "alpha": 1.0,              # retain-regularizer weight
        "weight_decay": 0.01,
        "warmup_ratio": 0.0,
        "schedule": "constant",
        "precision": "bf16",       # fp32 | mixed | bf16 (weights + optimizer state in bf16)
        "grad_clip": 1.0,
        "npo_beta": 0.1,           # NPO (Zhang et al. 2024)
        "simnpo_beta": 4.5,        # SimNPO (Fan et al. 2024): beta, margin delta
        "simnpo_delta": 0.0,
        "rmu_layer": 7,            # RMU (Li et al. 2024): steered layer
        "rmu_params": "model\\.layers\\.(5|6|7)\\.mlp\\.down_proj\\.weight",  # regex of trained params
        "rmu_steering": 20.0,      # steering coefficient c
        "stop_forget_prob": 0.1,   # stop early once forget answer probability <= this (None: never)
        "stop_every": 4,           # check it every this many steps
        # SURE_<base> / Robust_<base> (robust_unlearn.robust): modules at or above this percentile of
        # forget-gradient norm train (Zhang et al. 2024: 90 / 95 / 99)
        "sure_percentile": 90.0,
        # Robust_<base> only; each part is a switch (0 / [] = off):
        "robust_topk": 0.01,       # update this fraction of the salient modules' weights (by |grad x w|)
        "robust_fisher_exclude": 0.1,  # never update the top fraction by retain diagonal Fisher
        "robust_nullspace": 8,     # project forget grads off the span of the last k retain grads
        "robust_prune_aware": 0.3, # never update weights magnitude pruning at this sparsity would zero
        "robust_floor": ["nf4"],   # formats whose code every updated weight must change (nf4, fp4, int8, rtn4-g128, ...)
        "robust_floor_margin": 0.2,  # how far past the bin edge, as a fraction of the new bin's width
        "robust_floor_every": 0,   # also floor every this many steps, training on from there (0: at the end only)
        "per_method": {            # method -> {key: value} overriding the keys above for that method
            "GradDiff": {"lr": 1.5e-4, "stop_forget_prob": 0.12},
            "SimNPO": {"lr": 2.0e-4, "alpha": 0.1, "simnpo_beta": 2.5},
            # the wrappers train in fp32: in bf16 a sparse update on weights above the prune30
            # threshold would round away (|w| > 2^8 x lr does not move)
            "SURE_GradDiff": {"precision": "fp32", "steps": 30},
            "SURE_NPO_KLR": {"precision": "fp32", "steps": 30},
            "Robust_GradDiff": {"precision": "fp32", "lr": 2.0e-3, "steps": 64, "stop_forget_prob": 0.08,
                                "robust_topk": 0.03, "robust_floor_every": 4, "robust_floor_margin": 0.05},
            "RMU": {"precision": "fp32", "lr": 1.0e-3, "steps": 80, "alpha": 10.0, "stop_forget_prob": 0.15,
                    "rmu_params": "model\\.layers\\.(5|6|7)\\.mlp\\..*_proj\\.weight"},
        },
    },
    "sweep": {
        "compressions": ["none", "int8", "nf4", "prune30"],
        "oracle": False,           # also sweep the retain oracle (else it is evaluated uncompressed only)
    },
    # How a run executes; nothing here changes what it computes (not part of a checkpoint's spec key).
    "runtime": {
        "checkpoint_every": 0,     # save a resumable training state every N optimizer steps (0: never)
        "shared_reference": True,  # NPO/KL/RMU reference = the model with its trained tensors swapped back
                                   # to frozen copies of their originals, not a second full model
    },
}

PRECISIONS = ("fp32", "mixed", "bf16")


def _merge(base: dict, update: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        path = f"{where}{key}"
        if key not in base:
            valid = ", ".join(sorted(base))
            raise UserError(f"unknown recipe key '{path}' (valid keys here: {valid})")
        if isinstance(base[key], dict) and key == "per_method":
            if not isinstance(value, dict):
                raise UserError(f"recipe key '{path}' must be a mapping of method -> settings, got {value!r}")
            settings = {k: v for k, v in DEFAULTS["unlearn"].items() if k not in ("methods", "per_method")}
            for method, over in value.items():
                checked = _merge(settings, over or {}, f"{path}.{method}.")  # known keys, right types
                out[key].setdefault(method, {}).update({k: checked[k] for k in (over or {})})
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"recipe key '{path}' must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, path + ".")
        else:
            out[key] = _check_type(path, base[key], value)
    return out


def method_settings(cfg: dict, method: str) -> dict:
    """``cfg['unlearn']`` with ``per_method[method]`` applied (the settings one method trains with)."""
    u = {k: v for k, v in cfg["unlearn"].items() if k not in ("methods", "per_method")}
    u.update(cfg["unlearn"]["per_method"].get(method, {}))
    return u


def _check_type(path: str, default: Any, value: Any) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"recipe key '{path}' must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"recipe key '{path}' must be a number, got {value!r}")
        return type(default)(value) if isinstance(default, float) else value
    if isinstance(default, str) and not isinstance(value, str):
        raise UserError(f"recipe key '{path}' must be a string, got {value!r}")
    if isinstance(default, list) and not isinstance(value, list):
        raise UserError(f"recipe key '{path}' must be a list, got {value!r}")
    return value


def parse_overrides(items: list[str]) -> dict:
    """``["data.name=tofu", "finetune.lr=1e-5"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like dotted.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _looks_numeric(text: str) -> bool:
    # PyYAML (YAML 1.1) reads "3e-5" as a string: accept scientific notation as a number.
    return bool(_SCI.match(text.strip()))


def _fix_numbers(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_numbers(v) for k, v in node.items()}
    if isinstance(node, str) and _looks_numeric(node):
        return float(node)
    return node


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults <- recipe file <- overrides; validated. ``path=None`` is the built-in default."""
    recipe: dict = {}
    if path is None:
        path = DEFAULT_RECIPE if DEFAULT_RECIPE.exists() else None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"recipe file '{p}' not found (expected a YAML file, e.g. recipes/default.yaml)")
        try:
            recipe = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"recipe file '{p}' is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(recipe, dict):
            raise UserError(f"recipe file '{p}' must hold a mapping of keys, got {type(recipe).__name__}")
        recipe = _fix_numbers(recipe)
        recipe.setdefault("name", p.stem)
    cfg = _merge(DEFAULTS, recipe, "")
    cfg = _merge(cfg, parse_overrides(overrides or []), "")
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    from .data import BENCHMARKS  # late: data imports datasets

    if cfg["data"]["name"] not in BENCHMARKS:
        raise UserError(f"data.name '{cfg['data']['name']}' is unknown (expected one of {', '.join(BENCHMARKS)})")
    if cfg["data"]["name"] == "tofu" and not cfg["data"]["path"]:
        raise UserError("data.path must name a TOFU directory or hub id when data.name=tofu")
    _validate_text_data(cfg["data"])
    if cfg["finetune"]["precision"] not in PRECISIONS:
        raise UserError(f"finetune.precision '{cfg['finetune']['precision']}' is unknown (expected one of {', '.join(PRECISIONS)})")
    if cfg["model"]["prompt"] not in ("chat", "qa"):
        raise UserError(f"model.prompt '{cfg['model']['prompt']}' is unknown (expected chat or qa)")
    if cfg["data"]["num_perturbed"] < 3:
        raise UserError("data.num_perturbed must be at least 3")
    from .methods import check_method  # late: methods import torch

    for m in cfg["unlearn"]["methods"]:
        check_method(m, "unlearn.methods")
    for m, over in cfg["unlearn"]["per_method"].items():
        check_method(m, "unlearn.per_method")
        p = method_settings(cfg, m)["precision"]
        if p not in PRECISIONS:
            raise UserError(f"unlearn.per_method.{m}.precision '{p}' is unknown (expected one of {', '.join(PRECISIONS)})")
    from .robust.floor import parse_format

    for m in [None] + list(cfg["unlearn"]["per_method"]):
        st = method_settings(cfg, m) if m else cfg["unlearn"]
        where = f"unlearn.per_method.{m}" if m else "unlearn"
        for f in st["robust_floor"]:
            try:
                parse_format(f)
            except UserError as exc:
                raise UserError(f"{where}.robust_floor: {exc}") from None
        if not 0 <= st["sure_percentile"] < 100:
            raise UserError(f"{where}.sure_percentile {st['sure_percentile']} must be in [0, 100)")
        for k in ("robust_topk", "robust_fisher_exclude", "robust_prune_aware"):
            if not 0 <= st[k] <= 1:
                raise UserError(f"{where}.{k} {st[k]} must be a fraction in [0, 1]")
    if cfg["unlearn"]["precision"] not in PRECISIONS:
        raise UserError(f"unlearn.precision '{cfg['unlearn']['precision']}' is unknown (expected one of {', '.join(PRECISIONS)})")
    from .compress import check_compression

    for c in cfg["sweep"]["compressions"]:
        check_compression(c, "sweep.compressions")


def _validate_text_data(d: dict) -> None:
    for key in ("path", "corpus_path", "mmlu_path"):
        if d[key] is not None and not isinstance(d[key], str):
            raise UserError(f"data.{key} must be a directory or hub id, got {d[key]!r}")
    for key in ("forget_corpus", "retain_corpus", "wmdp_subsets"):
        v = d[key]
        if v is not None and not (isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))):
            raise UserError(f"data.{key} must be a name, a comma-separated string or a list of names, got {v!r}")
    if d["name"] == "muse_news":
        for key in ("forget_corpus", "retain_corpus"):
            if d[key] is not None and (not isinstance(d[key], str) or "," in d[key]):
                raise UserError(f"data.{key} must name one split of MUSE's raw config (e.g. forget, retain1), got {d[key]!r}")
    if d["name"] == "wmdp":
        from .data.wmdp import SUBSETS, names

        for s in names(d["wmdp_subsets"], SUBSETS):
            if s not in SUBSETS:
                raise UserError(f"data.wmdp_subsets: unknown subset '{s}' (expected some of {', '.join(SUBSETS)})")


def cache_dir(cfg: dict) -> Path:
    root = cfg.get("cache_dir") or os.environ.get("ROBUST_UNLEARN_CACHE") or Path.home() / ".cache" / "robust_unlearn"
    return Path(root).expanduser()
