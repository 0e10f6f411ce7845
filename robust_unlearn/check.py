"""The offline ``check`` command: every problem of a recipe at once, without training or downloading.

What ``config.load_recipe`` checks (``config.recipe_problems``), plus what needs files: the data
(split names, a local TOFU directory's files) and the models (a local checkpoint's config.json, read
without weights; RMU's layer and parameters against the model built on the meta device).
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from .config import assemble, cache_dir, method_settings, recipe_problems
from .errors import UserError


class RecipeCheck(NamedTuple):
    cfg: dict | None        # the merged recipe (None when the file could not be read)
    problems: list[str]     # one line each; empty: the recipe is fine
    notes: list[str]        # what was not checked, or what a run will skip
    models: dict[str, str]  # model.base / target / oracle -> how it was checked


def check_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RecipeCheck:
    """Every problem of a recipe at once, offline: what ``load_recipe`` checks, plus the data
    (split names, a local TOFU directory's files) and the models (a local checkpoint's config.json,
    read without weights: ``unlearn.rmu_layer`` and ``unlearn.rmu_params`` against its layers and
    parameter names). Hub ids are noted as not checked."""
    problems: list[str] = []
    cfg = assemble(path, overrides, problems)
    if cfg is None:
        return RecipeCheck(None, problems, [], {})
    problems += recipe_problems(cfg)
    notes: list[str] = []
    _check_data(cfg, problems, notes)
    models = _check_models(cfg, problems, notes)
    _check_classifier(cfg, problems, notes)
    return RecipeCheck(cfg, problems, notes, models)


def _check_classifier(cfg: dict, problems: list[str], notes: list[str]) -> None:
    """``eval.gibberish_classifier``: a local directory must hold a config.json; a hub id is noted."""
    from .models import is_local

    name = cfg["eval"]["gibberish_classifier"]
    if not name:
        return
    if not is_local(name):
        notes.append(f"eval.gibberish_classifier '{name}': hub id, not checked offline")
    elif not (Path(name).expanduser() / "config.json").is_file():
        problems.append(f"eval.gibberish_classifier '{name}' has no config.json (expected a sequence classifier's "
                        "directory or a hub id)")


def _check_data(cfg: dict, problems: list[str], notes: list[str]) -> None:
    from .data.benchmarks import BENCHMARKS

    d = cfg["data"]
    bench = BENCHMARKS.get(d["name"])
    if bench is None or bench.check is None:
        return
    try:
        bad, skipped = bench.check(d, cfg)
        problems += bad
        notes += skipped
        if d["path"] and not bench.reads_path:
            notes.append(f"data.path '{d['path']}' is not read when data.name={bench.name}")
    except UserError as exc:
        problems.append(str(exc))


def _model_config(cfg: dict, role: str, problems: list[str]) -> tuple[Any, str]:
    """-> (transformers config or None, a short description) of ``model.<role>``."""
    from .models import check_model_dir, is_local, smollm2_cache_dir, smollm2_gguf, tiny_config

    name = cfg["model"][role]
    where = f"model.{role} '{name}'"
    gguf_file = None
    if role == "base" and name == "tiny":
        return tiny_config(vocab_size=1024), "built-in tiny: llama, 2 layers"
    if role == "base" and name == "smollm2-135m":
        try:
            gguf = smollm2_gguf()
        except UserError as exc:
            problems.append(f"model.base: {exc}")
            return None, "built-in SmolLM2-135M-Instruct, missing"
        desc = "built-in SmolLM2-135M-Instruct"
        p = smollm2_cache_dir(cache_dir(cfg), gguf)  # its safetensors copy, once made; else the GGUF's metadata
        if not (p / "config.json").is_file():
            p, gguf_file = gguf.parent, gguf.name
    elif not is_local(name):
        return None, "hub id, not checked offline"
    else:
        p = Path(name).expanduser()
        if not p.exists():
            problems.append(f"{where} not found (expected a local checkpoint directory or a hub id such as org/name)")
            return None, "not found"
        try:
            check_model_dir(p)
        except UserError as exc:
            problems.append(f"model.{role}: {exc}")
            return None, "not a checkpoint"
        if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
            problems.append(f"{where} has no tokenizer files (expected tokenizer.json or tokenizer_config.json "
                            "saved with the checkpoint)")
        desc = "local"
    try:
        conf = _read_config(str(p), cfg["model"]["trust_remote_code"], gguf_file)
    except Exception as exc:  # transformers raises OSError / ValueError / KeyError for bad configs
        problems.append(f"{where}: its config could not be read ({str(exc).splitlines()[0]})")
        return None, "unreadable config"
    return conf, f"{desc}: {getattr(conf, 'model_type', '?')}, {getattr(conf, 'num_hidden_layers', '?')} layers"


def model_config(cfg: dict, path: str | None = None) -> tuple[Any, str]:
    """-> (config, name) of the model a recipe trains: ``path`` (a config.json or a directory with one),
    else model.target, else model.base (the built-in ones, a local directory, or a hub id whose config is
    in the local Hugging Face cache). One line naming what to pass when it cannot be read offline."""
    if path is not None:
        p = Path(path).expanduser()
        f = p / "config.json" if p.is_dir() else p
        if not f.is_file():
            raise UserError(f"--model-config '{path}' not found (expected a config.json or a directory holding one)")
        try:
            return _read_config(str(f), cfg["model"]["trust_remote_code"]), str(path)
        except Exception as exc:
            raise UserError(f"--model-config '{path}': not a model config ({str(exc).splitlines()[0]})") from None
    role = "target" if cfg["model"]["target"] is not None else "base"
    name = cfg["model"][role]
    problems: list[str] = []
    conf, _ = _model_config(cfg, role, problems)
    if problems:
        raise UserError(problems[0])
    if conf is None:  # a hub id: its config only if the local cache has it (nothing is downloaded)
        from transformers import AutoConfig

        try:
            conf = AutoConfig.from_pretrained(name, trust_remote_code=cfg["model"]["trust_remote_code"],
                                              local_files_only=True)
        except Exception:
            raise UserError(f"model.{role} '{name}' is a hub id whose config is not in the local cache (expected "
                            "--model-config PATH, its config.json)") from None
    return conf, name


@functools.lru_cache(maxsize=16)
def _read_config(path: str, trust_remote_code: bool, gguf_file: str | None = None):
    from transformers import AutoConfig

    from .models import quiet_transformers

    quiet_transformers()
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)


def _check_models(cfg: dict, problems: list[str], notes: list[str]) -> dict[str, str]:
    m = cfg["model"]
    base_needed = m["target"] is None or m["oracle"] is None
    models, configs, descs = {}, {}, {}
    for role in ("base", "target", "oracle"):
        if m[role] is None:
            models[role] = "fine-tuned from model.base"
        elif role == "base" and not base_needed:
            models[role] = "not used (model.target and model.oracle are given)"
        else:
            configs[role], descs[role] = _model_config(cfg, role, problems)
            models[role] = f"{m[role]} ({descs[role]})"
    # the unlearned model has the target's architecture (the base's when the target is fine-tuned)
    role = "target" if m["target"] is not None else "base"
    rmu = [x for x in cfg["unlearn"]["methods"] if _base_method(x) == "RMU"]
    if rmu and configs.get(role) is None:
        notes.append(f"RMU's rmu_layer and rmu_params not checked against model.{role} ({descs[role]})")
    elif rmu:
        problems += _rmu_problems(cfg, rmu, configs[role], f"model.{role} '{m[role]}'")
    problems += _group_problems(cfg, configs.get(role), f"model.{role} '{m[role]}'", notes)
    return models


def _group_problems(cfg: dict, conf, where: str, notes: list[str]) -> list[str]:
    """Each gptq / awq column's group against the layer widths of the model built on the meta device."""
    from .compress import needs_calibration
    from .quant import parse_format

    cal = [c for c in cfg["sweep"]["compressions"] if needs_calibration(str(c))]
    if not cal:
        return []
    if conf is None:
        notes.append(f"the groups of {', '.join(cal)} not checked against the model (its config is not local)")
        return []
    from .compress import compressible_linears
    from .errors import UserError
    from .models import model_on_meta

    try:
        model = model_on_meta(conf, cfg["model"]["trust_remote_code"])
    except Exception as exc:  # an architecture transformers cannot build
        return [f"{where}: cannot build the model from its config to check {cal[0]} ({str(exc).splitlines()[0]})"]
    widths = {n: lin.in_features for n, lin in compressible_linears(model)}
    out = []
    for c in cal:
        try:
            parse_format(c).check_widths(widths)
        except UserError as exc:
            out.append(f"sweep.compressions: {exc}")
    return out


def _base_method(name: str) -> str | None:
    from .methods import METHOD_NAMES, split_method

    return split_method(name)[1] if name in METHOD_NAMES else None


def _rmu_problems(cfg: dict, methods: list[str], conf, where: str) -> list[str]:
    """``rmu_layer`` in range and (plain RMU; SURE_/Robust_RMU choose by saliency) ``rmu_params`` matching
    parameters that reach its loss, for each RMU method, on the model built from ``conf`` on the meta
    device (no memory for weights)."""
    from .methods import split_method
    from .methods.rmu import decoder_layers, find_layer, set_trainable
    from .models import model_on_meta

    try:
        model = model_on_meta(conf, cfg["model"]["trust_remote_code"])
    except Exception as exc:  # an architecture transformers cannot build
        return [f"{where}: cannot build the model from its config to check RMU ({str(exc).splitlines()[0]})"]
    out = []
    for method in methods:
        st = method_settings(cfg, method)
        try:
            re.compile(st["rmu_params"])
        except (re.error, TypeError):
            continue  # reported by recipe_problems
        if not isinstance(st["rmu_layer"], int):
            continue  # reported by recipe_problems
        found = []
        checks = [lambda: find_layer(model, st["rmu_layer"])]
        if split_method(method)[0] is None:
            checks.append(lambda: set_trainable(model, st["rmu_params"]))
        for check in checks:
            try:
                found.append(check())
            except UserError as exc:
                out.append(f"{method} on {where}: {exc}")
        if len(found) < 2:  # a check failed, or a wrapper (no rmu_params to check)
            continue
        # the loss is taken at the output of layer rmu_layer: only the embeddings and layers up to it train
        names, layer = found[1], st["rmu_layer"] % len(decoder_layers(model))
        if not [n for n in names if (_layer_of(n) is not None and _layer_of(n) <= layer) or "embed" in n]:
            out.append(f"{method} on {where}: unlearn.rmu_params '{st['rmu_params']}' matches only parameters after "
                       f"layer {st['rmu_layer']} (e.g. {names[0]}), which RMU's loss at that layer does not train")
    return out


def _layer_of(param_name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", param_name)
    return int(m.group(1)) if m else None
