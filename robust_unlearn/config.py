"""Recipes: YAML files merged over the defaults below, plus dotted ``key=value`` overrides.

The defaults are the schema: a recipe may only set keys that exist here (an unknown key is a
one-line error naming it), and a value must have the type of its default (``None`` defaults accept
anything). ``recipes/default.yaml`` spells the defaults out; a test keeps the two equal.

Here: the schema (``DEFAULTS``), the merge, overrides, value ranges (``recipe_problems``: what needs
nothing but the recipe) and ``method_settings``. The offline ``check`` command's probing of data files
and model configs is ``robust_unlearn.check``.
"""
from __future__ import annotations

import copy
import math
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
        "doc_min_chars": 0,        # wmdp: keep corpus documents longer than this many characters (RMU: 0)
        "doc_max_chars": None,     # wmdp: cut documents at this many characters (None: never, as RMU)
        "retain_max_tokens": None, # raw-text benchmarks: retain documents truncated at this many tokens
                                   # (None: model.max_length; RMU: 512)
    },
    "model": {
        "base": "smollm2-135m",    # smollm2-135m | tiny | a local checkpoint dir | a hub id
        "prompt": "chat",          # chat (tokenizer's chat template) | qa ("Question: ...\nAnswer: ...")
        "system_prompt": "You are a helpful assistant.",
        "target": None,            # None: fine-tune from base on forget+retain; else a checkpoint dir/hub id
        "oracle": None,            # None: fine-tune from base on retain only; else a checkpoint dir/hub id
        "trust_remote_code": False,
        "max_length": 256,
        # passed to the chat template: Llama-3 templates print it (else today's date, so prompts would
        # change daily); open-unlearning's pin (configs/model/Llama-3.2-1B-Instruct.yaml @d3d7cf9)
        "date_string": "10 Apr 2025",
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
        # open-unlearning's membership attacks (mia_*), privleak, exact_memorization, extraction_strength
        # (metrics.mia): `evaluate` turns it on unless set; `run` / `sweep` leave it off (it costs a
        # backward pass per forget and holdout example, for mia_gradnorm)
        "catalogue": False,
        # default | open-unlearning: its evaluation inputs (an EOS appended to each answer, attention mask
        # input_ids != pad, generation stopping at every generation_config EOS id), to reproduce its numbers
        "input_format": "default",
        # open-unlearning's forget_Q_A_gibberish: a sequence classifier (hub id or directory) whose class 0
        # is "clean", run on the greedy forget answers; open-unlearning's is
        # madhurjindal/autonlp-Gibberish-Detector-492513457 (locuslab/open-unlearning@d3d7cf9:
        # configs/eval/tofu_metrics/forget_Q_A_gibberish.yaml; on MUSE its forget_gibberish). null: off, as there
        "gibberish_classifier": None,
    },
    "unlearn": {
        "methods": ["GradDiff", "SimNPO", "RMU", "SURE_GradDiff", "Robust_GradDiff"],  # what `run` unlearns (robust_unlearn.methods.METHODS)
        "lr": 1.0e-4,
        "steps": 40,               # optimizer steps; None: `epochs` passes over the forget set
        "epochs": 10.0,
        "min_steps": 0,            # with steps None: at least this many optimizer steps, however few rows the
                                   # forget set has (30 epochs of one 6-row author are only 30 steps)
        "batch_size": 8,           # forget batch; the retain stream uses the same size
        "gamma": 1.0,              # forget-loss weight
        "alpha": 1.0,              # retain-regularizer weight
        "weight_decay": 0.01,
        "adam_eps": 1.0e-8,        # AdamW's epsilon (torch's default; RMU uses 1e-6)
        # LoRA adapters (peft) instead of full weights; r 0 = off. SURE_: on its salient modules.
        "lora": {"r": 0, "alpha": 16.0, "dropout": 0.0,
                 "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "grad_accum": 1,           # each step's batch_size rows as this many micro-batches (same update, less
                                   # activation memory; open-unlearning's effective batch 32 = 8 x 4)
        "gradient_checkpointing": False,  # recompute each decoder layer in backward (activations: one layer's
                                          # input each; ~1/3 more compute); `robust-unlearn plan` shows when needed
        "warmup_ratio": 0.0,
        "schedule": "constant",
        "precision": "bf16",       # fp32 | mixed | bf16 (weights + optimizer state in bf16)
        "grad_clip": 1.0,
        "npo_beta": 0.1,           # NPO (Zhang et al. 2024)
        "kl_positions": "answer",  # the KL retain term (GA_KLR, NPO_KLR) over: answer tokens | all (every attended
                                   # position, as open-unlearning's KL retain term)
        "simnpo_beta": 4.5,        # SimNPO (Fan et al. 2024): beta, margin delta
        "simnpo_delta": 0.0,
        # open-unlearning's other methods, its defaults (locuslab/open-unlearning@d3d7cf9:configs/trainer/
        # DPO.yaml, UNDIAL.yaml, WGA.yaml, SatImp.yaml, CEU.yaml)
        "dpo_beta": 0.1,           # IdkDPO
        "undial_beta": 10.0,       # UNDIAL: how far the true token's teacher logit is lowered
        "wga_beta": 1.0,           # WGA: token weight p^beta
        "satimp_beta1": 5.0,       # SatImp: token weight p^beta1 (1 - p)^beta2
        "satimp_beta2": 1.0,
        "ceu_ignore_first": 1,     # CE-U: answer tokens not trained at the start of each answer
        "rmu_layer": 7,            # RMU (Li et al. 2024): steered layer
        "rmu_params": "model\\.layers\\.(5|6|7)\\.mlp\\.down_proj\\.weight",  # regex of trained params
        "rmu_steering": 20.0,      # steering coefficient c
        "stop_forget_prob": 0.1,   # stop early once forget answer probability <= this (None: never);
                                   # "oracle": the retain oracle's forget probability, "holdout": the
                                   # target's on the holdout split (both measured by the run itself)
        "stop_under": [],          # the early stop also requires the forget level under each of these
                                   # compressions of the current weights (e.g. [nf4, prune30]; [] : off)
        "stop_every": 4,           # check it (and the collapse guard) every this many steps
        "collapse_floor": 0.8,     # stop when retain probability < this x the target's (None: no guard);
                                   # the last state above it is saved, labelled, or nothing
        "collapse_answers": 8,     # also greedy-answer the first N questions of retain, real_authors and
                                   # world_facts: their distinct-bigram share < collapse_floor x the
                                   # target's (looping answers) trips the guard too (0: retain prob only)
        "collapse_backoff": [],    # lr factors: at each trip, while one is left, put the last good state back
                                   # and train on at the next factor x the lr, fresh optimizer moments
                                   # (e.g. [0.5, 0.25]); [] : a trip stops the run. One process, no DeepSpeed
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
        "robust_qat": False,       # train through the deployed grid (one nf4 / fp4 / rtn format in robust_floor):
                                   # the forward sees each masked weight at its target value until it leaves its
                                   # target's code, then at its new code's value (straight-through gradients);
                                   # the saved update is exactly those weights, on their codes' values
        "robust_prune_view": 0.0,  # with robust_qat: each step's loss is also taken through the model pruned at
                                   # this sparsity (the target's magnitude threshold), the two averaged (0: off)
        "robust_relearn_view": 0.0,  # with robust_qat: the forget term is also taken where one simulated relearning
                                   # step of this size (sign of the retain NLL's gradient, every decoder linear)
                                   # moves the weights, and the views' forget gradients averaged (0: off)
        "robust_floor_every": 0,   # also floor every this many steps, training on from there (0: at the end only)
        "per_method": {            # method -> {key: value} overriding the keys above for that method
            "GradDiff": {"lr": 1.5e-4, "stop_forget_prob": 0.12},
            "SimNPO": {"lr": 2.0e-4, "alpha": 0.1, "simnpo_beta": 2.5},
            # open-unlearning's weights: UNDIAL has no retain term (alpha 0), SatImp's forget weight is 0.1
            # (its SatImp.yaml; the class default and README say the reverse, the YAML is what runs)
            "UNDIAL": {"alpha": 0.0},
            "SatImp": {"gamma": 0.1},
            # the wrappers train in fp32: in bf16 a sparse update on weights above the prune30
            # threshold would round away (|w| > 2^8 x lr does not move)
            "SURE_GradDiff": {"precision": "fp32", "steps": 30},
            "SURE_NPO_KLR": {"precision": "fp32", "steps": 30},
            # its length scales with the forget set (epochs over it, at least 90 steps) and it stops at the
            # retain oracle's forget probability, measured in the same run; it trains through the deployed
            # NF4 grid and through the model pruned at 30% (issue 12). robust_floor_every applies only with
            # robust_qat false (the launch ZeRO-3 needs): then it is the method shipped until 2026-11-26
            "Robust_GradDiff": {"precision": "fp32", "lr": 2.0e-3, "steps": None, "epochs": 30.0, "min_steps": 90,
                                "stop_forget_prob": "oracle", "robust_topk": 0.03, "robust_floor_every": 4,
                                "robust_floor_margin": 0.05, "robust_qat": True, "robust_prune_view": 0.3},
            "RMU": {"precision": "fp32", "lr": 1.0e-3, "steps": 80, "alpha": 10.0, "stop_forget_prob": 0.15,
                    "rmu_params": "model\\.layers\\.(5|6|7)\\.mlp\\..*_proj\\.weight"},
            # the RMU loss through SURE's saliency / the robust update (fp32, as the other wrappers)
            "SURE_RMU": {"precision": "fp32", "lr": 1.0e-3, "steps": 80, "alpha": 10.0, "stop_forget_prob": 0.15},
            "Robust_RMU": {"precision": "fp32", "lr": 1.0e-3, "steps": 80, "alpha": 10.0, "stop_forget_prob": 0.15},
        },
    },
    "sweep": {
        "compressions": ["none", "int8", "nf4", "prune30"],
        "oracle": False,           # also sweep the retain oracle (else it is evaluated uncompressed only)
        "holds_margin": 0.05,      # the verdict: forgetting holds when every column is within this of the oracle's
        # gptq4-g<G> / awq4-g<G> columns (llm-compressor): calibration text = the split's rows as the model
        # sees them (prompt + answer), concatenated and cut into `samples` rows of `length` tokens
        "calibration": {"split": "retain", "samples": 32, "length": 256,
                        "awq_n_grid": 10,       # AWQ's scale grid search points (~1.5 s each per layer group on 2 CPU cores)
                        "awq_duo_scaling": True,  # AWQ's scales from activations and weights (false: activations
                                                  # only; both: half of the grid each way, llm-compressor's option)
                        "gptq_dampening": 0.01,  # GPTQ's Hessian dampening fraction
                        # how a group's scale (and AWQ's zero point) is chosen, for GPTQ / AWQ alike:
                        # llm-compressor's weight observers, minmax (its default) or mse (the range shrunk by
                        # up to 20% where that lowers the group's quantization error)
                        "weight_observer": "minmax"},
        # relearn-retain / relearn-forget columns: optimizer steps of NLL fine-tuning from the checkpoint
        "relearn": {"steps": 10, "lr": 1.0e-4, "batch_size": 8, "precision": "fp32"},
    },
    # How a run executes; nothing here changes what it computes (not part of a checkpoint's spec key).
    "runtime": {
        "checkpoint_every": 0,     # save a resumable training state every N optimizer steps (0: never)
        "shared_reference": True,  # NPO/KL/RMU reference = the model with its trained tensors swapped back
                                   # to frozen copies of their originals, not a second full model
        "zero3_reference": "partitioned",  # under ZeRO-3 (where tensors cannot be swapped): partitioned = a
                                   # ZeRO-3 inference engine, 1/N of the target per process; full = a whole
                                   # fp32 copy on every process
    },
}

PRECISIONS = ("fp32", "mixed", "bf16")
# keys whose default is None: the type a value must have when it is not null
NULLABLE = {"cache_dir": str, "data.path": str, "data.train_utility": bool, "data.limit": int,
            "data.doc_max_chars": int, "data.retain_max_tokens": int,
            "model.target": str, "model.oracle": str, "eval.gibberish_classifier": str}
# keys (last part of the dotted name) with a value by default that may also be null
NULL_OK = ("system_prompt", "date_string", "steps", "stop_forget_prob", "collapse_floor")
# stop_forget_prob may also name a level the run measures itself (unlearn.stop_level)
STOP_LEVELS = ("oracle", "holdout")


def _merge(base: dict, update: dict, where: str, problems: list[str]) -> dict:
    """``base`` with ``update`` merged in; each unknown key or ill-typed value is appended to
    ``problems`` (and left at its value in ``base``), so that every one of them is found at once."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        path = f"{where}{key}"
        if key not in base:
            valid = ", ".join(sorted(base))
            problems.append(f"unknown recipe key '{path}' (valid keys here: {valid})")
        elif isinstance(base[key], dict) and key == "per_method":
            if not isinstance(value, dict):
                problems.append(f"recipe key '{path}' must be a mapping of method -> settings, got {value!r}")
                continue
            settings = {k: v for k, v in DEFAULTS["unlearn"].items() if k not in ("methods", "per_method")}
            for method, over in value.items():
                if over is not None and not isinstance(over, dict):
                    problems.append(f"recipe key '{path}.{method}' must be a mapping of setting -> value, got {over!r}")
                    continue
                good = {}
                for k, v in (over or {}).items():  # known keys, right types
                    before = len(problems)
                    checked = _merge(settings, {k: v}, f"{path}.{method}.", problems)
                    if len(problems) == before:
                        good[k] = checked[k]
                out[key].setdefault(method, {}).update(good)
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                problems.append(f"recipe key '{path}' must be a mapping, got {value!r}")
                continue
            out[key] = _merge(base[key], value, path + ".", problems)
        else:
            try:
                out[key] = _check_type(path, _schema_default(path), value)
            except UserError as exc:
                problems.append(str(exc))
    return out


def _schema_default(path: str) -> Any:
    """The value in DEFAULTS that types the key ``path`` (``unlearn.per_method.<m>.<k>``: ``unlearn.<k>``)."""
    parts = path.split(".")
    if parts[:2] == ["unlearn", "per_method"] and len(parts) == 4:
        return DEFAULTS["unlearn"][parts[3]]
    node = DEFAULTS
    for part in parts:
        node = node[part]
    return node


def method_settings(cfg: dict, method: str) -> dict:
    """``cfg['unlearn']`` with ``per_method[method]`` applied (the settings one method trains with)."""
    u = {k: v for k, v in cfg["unlearn"].items() if k not in ("methods", "per_method")}
    u.update(cfg["unlearn"]["per_method"].get(method, {}))
    return u


WEIGHT_OBSERVERS = ("minmax", "mse")  # sweep.calibration.weight_observer: llm-compressor's observer names

# boolean keys that also take these words (llm-compressor's AWQ duo_scaling "both": half of the grid
# without duo scaling, half with it)
BOOL_WORDS = {"awq_duo_scaling": ("both",)}


def _check_type(path: str, default: Any, value: Any) -> Any:
    if default is None and value is not None and path in NULLABLE:
        default = NULLABLE[path]()  # the type's empty value stands in for the check below
    if default is None:
        return value
    if value is None:
        if path.rsplit(".", 1)[-1] in NULL_OK:
            return value
        raise UserError(f"recipe key '{path}' must not be null")
    if isinstance(default, bool):
        words = BOOL_WORDS.get(path.rsplit(".", 1)[-1], ())
        if not isinstance(value, bool) and value not in words:
            raise UserError(f"recipe key '{path}' must be {', '.join(['true', 'false', *words][:-1])} or "
                            f"{(['false', *words])[-1]}, got {value!r}")
        return value
    if path.rsplit(".", 1)[-1] == "stop_forget_prob" and isinstance(value, str):
        if value not in STOP_LEVELS:
            raise UserError(f"recipe key '{path}' must be a number in [0, 1] or one of {', '.join(STOP_LEVELS)}, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"recipe key '{path}' must be a number, got {value!r}")
        if isinstance(default, float):
            return float(value)
        return int(value) if isinstance(value, float) and value.is_integer() else value  # "1e3" -> 1000
    if isinstance(default, str) and not isinstance(value, str):
        raise UserError(f"recipe key '{path}' must be a string, got {value!r}")
    if isinstance(default, list) and not isinstance(value, list):
        raise UserError(f"recipe key '{path}' must be a list, got {value!r}")
    return value


def parse_overrides(items: list[str], problems: list[str] | None = None) -> dict:
    """``["data.name=tofu", "finetune.lr=1e-5"]`` -> nested dict (values parsed as YAML scalars).
    A malformed item raises ``UserError``, or is appended to ``problems`` when a list is given."""
    out: dict = {}
    for item in items:
        try:
            if "=" not in item:
                raise UserError(f"override '{item}' must look like dotted.key=value")
            key, raw = item.split("=", 1)
            if not all(part.strip() for part in key.split(".")):
                raise UserError(f"override '{item}' has {'no key' if not key.strip() else 'an empty key part'} "
                                "(expected dotted.key=value, e.g. unlearn.lr=1e-5)")
            try:
                value = yaml.safe_load(raw) if raw != "" else None
            except yaml.YAMLError:
                raise UserError(f"override '{item}': the value is not a valid YAML scalar or list") from None
            if isinstance(value, str) and _looks_numeric(value):
                value = float(value)
            node = out
            parts = key.strip().split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise UserError(f"override '{item}' sets a key inside '{part}', which another override sets to a value")
            node[parts[-1]] = value
        except UserError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
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


def assemble(path, overrides: list[str], problems: list[str]) -> dict | None:
    """Defaults <- recipe file <- overrides, each problem appended to ``problems``; None when the
    file itself cannot be read (nothing else can be checked then)."""
    recipe: dict = {}
    if path is None:
        path = DEFAULT_RECIPE if DEFAULT_RECIPE.exists() else None
    if path is not None:
        p = Path(path)
        if p.is_dir():
            problems.append(f"recipe file '{p}' is a directory (expected a YAML file, e.g. recipes/default.yaml)")
            return None
        if not p.is_file():
            hint = "" if p.suffix in (".yaml", ".yml") else "; an override looks like dotted.key=value"
            problems.append(f"recipe file '{p}' not found (expected a YAML file, e.g. recipes/default.yaml{hint})")
            return None
        try:
            recipe = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            problems.append(f"recipe file '{p}' is not valid YAML: {str(exc).splitlines()[0]}")
            return None
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"recipe file '{p}' cannot be read ({exc.__class__.__name__}: "
                            f"{getattr(exc, 'strerror', None) or exc}; expected a YAML text file)")
            return None
        if recipe is None:
            problems.append(f"recipe file '{p}' is empty (expected a mapping of recipe keys, e.g. "
                            "recipes/default.yaml; run without a recipe for the defaults)")
            return None
        if not isinstance(recipe, dict):
            problems.append(f"recipe file '{p}' must hold a mapping of keys, got {type(recipe).__name__}")
            return None
        recipe = _fix_numbers(recipe)
        recipe.setdefault("name", p.stem)
    cfg = _merge(DEFAULTS, recipe, "", problems)
    return _canonical_methods(_merge(cfg, parse_overrides(overrides or [], problems), "", problems))


def _canonical_methods(cfg: dict) -> dict:
    """Method aliases (open-unlearning's names: ``methods.ALIASES``) -> the names here, in
    ``unlearn.methods`` and as ``unlearn.per_method`` keys (an alias's settings merged into its name's)."""
    from .methods import canonical_method  # late: methods import torch

    u = cfg["unlearn"]
    if isinstance(u.get("methods"), list):
        u["methods"] = [canonical_method(m) for m in u["methods"]]
    per = {}
    for m, over in u["per_method"].items():
        per.setdefault(canonical_method(m), {}).update(over or {})
    u["per_method"] = per
    return cfg


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict:
    """Defaults <- recipe file <- overrides; validated (``UserError`` naming the first problem;
    ``check.check_recipe`` lists them all). ``path=None`` is the built-in default."""
    problems: list[str] = []
    cfg = assemble(path, overrides, problems)
    if cfg is not None:
        problems += recipe_problems(cfg)
    if problems:
        raise UserError(problems[0])
    return cfg


def validate(cfg: dict) -> None:
    """``UserError`` naming the first of ``recipe_problems(cfg)``."""
    problems = recipe_problems(cfg)
    if problems:
        raise UserError(problems[0])


class _Range:
    """Allowed numbers of one key: bounds (open or closed), whole numbers only."""

    def __init__(self, lo=None, hi=None, *, open_lo=False, open_hi=False, whole=False):
        self.lo, self.hi, self.open_lo, self.open_hi, self.whole = lo, hi, open_lo, open_hi, whole

    def problem(self, path: str, value: Any) -> str | None:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # null where allowed, or a type problem (both the merge's business)
        ok = math.isfinite(value) and not (self.whole and value != int(value))
        ok = ok and (self.lo is None or (value > self.lo if self.open_lo else value >= self.lo))
        ok = ok and (self.hi is None or (value < self.hi if self.open_hi else value <= self.hi))
        return None if ok else f"{path} {value} must be {self.describe()}"

    def describe(self) -> str:
        what = "a whole number" if self.whole else "a number"
        if self.lo is not None and self.hi is not None:
            return (f"{what} in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}{')' if self.open_hi else ']'}")
        if self.lo is not None:
            return f"{what} {'>' if self.open_lo else '>='} {self.lo:g}"
        return what


_POSITIVE = _Range(0, open_lo=True)
_NONNEG = _Range(0)
_FRACTION = _Range(0, 1)
_COUNT = _Range(1, whole=True)
_RANGES = {  # key -> allowed values (recipe keys outside unlearn)
    "seed": _Range(whole=True),
    "data.num_authors": _Range(2, whole=True),
    "data.qa_per_author": _COUNT,
    "data.num_perturbed": _Range(3, whole=True),
    "data.holdout_authors": _Range(0, whole=True),
    "data.limit": _Range(1, whole=True),
    "data.doc_min_chars": _Range(0, whole=True),
    "data.doc_max_chars": _Range(1, whole=True),
    "data.retain_max_tokens": _Range(1, whole=True),
    "model.max_length": _COUNT,
    "finetune.epochs": _POSITIVE,
    "finetune.lr": _POSITIVE,
    "finetune.batch_size": _COUNT,
    "finetune.weight_decay": _NONNEG,
    "finetune.warmup_ratio": _FRACTION,
    "finetune.grad_clip": _NONNEG,
    "eval.batch_size": _COUNT,
    "eval.max_new_tokens": _COUNT,
    "runtime.checkpoint_every": _Range(0, whole=True),
    "sweep.holds_margin": _NONNEG,
    "sweep.calibration.samples": _COUNT,
    "sweep.calibration.length": _COUNT,
    "sweep.calibration.awq_n_grid": _Range(3, whole=True),  # llm-compressor's duo-scaling grid needs 3
    "sweep.calibration.gptq_dampening": _Range(0, 1, open_lo=True),
    "sweep.relearn.steps": _COUNT,
    "sweep.relearn.lr": _POSITIVE,
    "sweep.relearn.batch_size": _COUNT,
}
_SETTING_RANGES = {  # unlearn.<key> and unlearn.per_method.<method>.<key>
    "lr": _POSITIVE,
    "steps": _Range(0, whole=True),
    "epochs": _POSITIVE,
    "min_steps": _Range(0, whole=True),
    "batch_size": _COUNT,
    "gamma": _NONNEG,
    "alpha": _NONNEG,
    "weight_decay": _NONNEG,
    "warmup_ratio": _FRACTION,
    "grad_clip": _NONNEG,
    "npo_beta": _POSITIVE,
    "adam_eps": _POSITIVE,
    "grad_accum": _COUNT,
    "simnpo_beta": _POSITIVE,
    "dpo_beta": _POSITIVE,
    "undial_beta": _NONNEG,
    "wga_beta": _NONNEG,
    "satimp_beta1": _NONNEG,
    "satimp_beta2": _NONNEG,
    "ceu_ignore_first": _Range(0, whole=True),
    "rmu_layer": _Range(whole=True),
    "stop_forget_prob": _Range(0, 1),
    "collapse_floor": _Range(0, 1, open_lo=True),
    "collapse_answers": _Range(0, whole=True),
    "stop_every": _COUNT,
    "sure_percentile": _Range(0, 100, open_hi=True),
    "robust_topk": _FRACTION,
    "robust_fisher_exclude": _FRACTION,
    "robust_nullspace": _Range(0, whole=True),
    "robust_prune_aware": _FRACTION,
    "robust_floor_margin": _Range(0, 0.5, open_lo=True, open_hi=True),
    "robust_prune_view": _Range(0, 1, open_hi=True),
    "robust_relearn_view": _Range(0),
    "robust_floor_every": _Range(0, whole=True),
}


def _get(cfg: dict, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def recipe_problems(cfg: dict) -> list[str]:
    """Every problem of a merged recipe that needs nothing but the recipe (names of methods,
    compressions, precisions, floor formats; value ranges), one line each. ``load_recipe`` raises the
    first; ``check.check_recipe`` adds what needs files or model configs."""
    out: list[str] = []
    from .data.benchmarks import BENCHMARKS, unknown

    bench = BENCHMARKS.get(cfg["data"]["name"])
    if bench is None:
        out.append(unknown(cfg["data"]["name"]))
    elif bench.requires_path and not cfg["data"]["path"]:
        out.append(f"data.path must name a {bench.title} directory or hub id when data.name={bench.name}")
    try:
        _validate_data(cfg["data"], bench)
    except UserError as exc:
        out.append(str(exc))
    if cfg["finetune"]["precision"] not in PRECISIONS:
        out.append(f"finetune.precision '{cfg['finetune']['precision']}' is unknown (expected one of {', '.join(PRECISIONS)})")
    if cfg["sweep"]["calibration"]["weight_observer"] not in WEIGHT_OBSERVERS:
        out.append(f"sweep.calibration.weight_observer '{cfg['sweep']['calibration']['weight_observer']}' is unknown "
                   f"(expected {' or '.join(WEIGHT_OBSERVERS)})")
    if cfg["eval"]["input_format"] not in ("default", "open-unlearning"):
        out.append(f"eval.input_format '{cfg['eval']['input_format']}' is unknown (expected default or open-unlearning)")
    if cfg["model"]["prompt"] not in ("chat", "qa"):
        out.append(f"model.prompt '{cfg['model']['prompt']}' is unknown (expected chat or qa)")
    from .methods import check_method  # late: methods import torch

    for m in cfg["unlearn"]["methods"]:
        try:
            check_method(m, "unlearn.methods")
        except UserError as exc:
            out.append(str(exc))
    for m in cfg["unlearn"]["per_method"]:
        try:
            check_method(m, "unlearn.per_method")
        except UserError as exc:
            out.append(str(exc))
    # each unlearning setting where it is set: under unlearn, or under one method's per_method
    scopes = [("unlearn", cfg["unlearn"], [k for k in cfg["unlearn"] if k not in ("methods", "per_method")])]
    scopes += [(f"unlearn.per_method.{m}", method_settings(cfg, m), list(over))
               for m, over in cfg["unlearn"]["per_method"].items()]
    from .quant.formats import KIND_INT8
    from .robust.floor import MAX_FORMATS, floor_format

    for where, st, keys in scopes:
        for k in keys:
            if k in _SETTING_RANGES and not (k == "stop_forget_prob" and st[k] in STOP_LEVELS):
                p = _SETTING_RANGES[k].problem(f"{where}.{k}", st[k])
                if p:
                    out.append(p)
        if "precision" in keys and st["precision"] not in PRECISIONS:
            out.append(f"{where}.precision '{st['precision']}' is unknown (expected one of {', '.join(PRECISIONS)})")
        if "schedule" in keys:
            out += _schedule_problems(f"{where}.schedule", st["schedule"])
        if "lora" in keys:
            lo = st["lora"]
            if not (isinstance(lo.get("r"), int) and lo["r"] >= 0):
                out.append(f"{where}.lora.r {lo.get('r')!r} must be a whole number >= 0 (0: no LoRA)")
            if not (isinstance(lo.get("alpha"), (int, float)) and lo["alpha"] > 0):
                out.append(f"{where}.lora.alpha {lo.get('alpha')!r} must be > 0")
            if not (isinstance(lo.get("dropout"), (int, float)) and 0 <= lo["dropout"] < 1):
                out.append(f"{where}.lora.dropout {lo.get('dropout')!r} must be in [0, 1)")
        if "stop_under" in keys:
            under = st["stop_under"]
            if not isinstance(under, list):
                out.append(f"{where}.stop_under {under!r} must be a list of compressions (e.g. [nf4, prune30])")
            else:
                from .compress import RELEARN, check_compression, needs_calibration

                for c in under:
                    if str(c) in RELEARN or needs_calibration(str(c)) or str(c) == "none":
                        out.append(f"{where}.stop_under: '{c}' cannot be probed during training (expected a "
                                   f"compression that needs no data: nf4, int8, fp4, rtn4[-g<G>], prune<N>, ...)")
                        continue
                    try:
                        check_compression(str(c), f"{where}.stop_under")
                    except UserError as exc:
                        out.append(str(exc))
        if "collapse_backoff" in keys:
            b = st["collapse_backoff"]
            if not (isinstance(b, list) and all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1
                                                for f in b)):
                out.append(f"{where}.collapse_backoff {b!r} must be a list of lr factors in (0, 1] (e.g. [0.5, 0.25]; "
                           f"[] : off)")
        if "kl_positions" in keys and st["kl_positions"] not in ("answer", "all"):
            out.append(f"{where}.kl_positions '{st['kl_positions']}' is unknown (expected answer or all)")
        if "robust_floor" in keys:
            formats = set()
            for f in st["robust_floor"]:
                try:
                    formats.add(floor_format(f).key)
                except UserError as exc:
                    out.append(f"{where}.robust_floor: {exc}")
            if len(formats) > MAX_FORMATS:
                out.append(f"{where}.robust_floor names {len(formats)} formats (at most {MAX_FORMATS} at once)")
        if st.get("robust_qat") and ("robust_qat" in keys or "robust_floor" in keys):
            try:
                fl = [floor_format(f) for f in st["robust_floor"]]
            except UserError:
                fl = None
            if fl is not None and (len({f.key for f in fl}) != 1 or fl[0].kind == KIND_INT8):
                out.append(f"{where}.robust_qat needs exactly one nf4 / fp4 / rtn format in robust_floor "
                           f"(got {list(st['robust_floor'])}): the forward uses one grid's code values")
        for view in ("robust_prune_view", "robust_relearn_view"):
            if st.get(view) and not st.get("robust_qat"):
                out.append(f"{where}.{view} {st[view]} needs robust_qat true (it trains through the "
                           f"{'pruned' if view == 'robust_prune_view' else 'relearned'} model's deployed weights)")
            elif st.get(view) and st.get("gradient_checkpointing") and (view in keys or "gradient_checkpointing" in keys):
                # checkpointing recomputes the view's forward in backward, after the view has been taken off
                out.append(f"{where}.{view} {st[view]} cannot run with gradient_checkpointing (backward would "
                           f"recompute the view's forward without it); set one of them off")
        if "rmu_params" in keys:
            try:
                re.compile(st["rmu_params"])
            except (re.error, TypeError) as exc:
                out.append(f"{where}.rmu_params '{st['rmu_params']}' is not a valid regular expression ({exc})")
    from .compress import check_compression

    for c in cfg["sweep"]["compressions"]:
        try:
            check_compression(str(c), "sweep.compressions")
        except UserError as exc:
            out.append(str(exc))
    for key, rule in _RANGES.items():
        p = rule.problem(key, _get(cfg, key))
        if p:
            out.append(p)
    out += _schedule_problems("finetune.schedule", cfg["finetune"]["schedule"])
    if cfg["runtime"]["zero3_reference"] not in ("partitioned", "full"):
        out.append(f"runtime.zero3_reference '{cfg['runtime']['zero3_reference']}' is unknown (expected partitioned or full)")
    if cfg["sweep"]["relearn"]["precision"] not in PRECISIONS:
        out.append(f"sweep.relearn.precision '{cfg['sweep']['relearn']['precision']}' is unknown "
                   f"(expected one of {', '.join(PRECISIONS)})")
    return out


def _schedule_problems(where: str, name: Any) -> list[str]:
    from transformers import SchedulerType

    names = [s.value for s in SchedulerType]
    return [] if name in names else [f"{where} '{name}' is unknown (expected a transformers scheduler: {', '.join(names)})"]


def _validate_data(d: dict, bench) -> None:
    """Types of the data keys, then the benchmark's own recipe-only checks (``Benchmark.validate``)."""
    for key in ("path", "corpus_path", "mmlu_path"):
        if d[key] is not None and not isinstance(d[key], str):
            raise UserError(f"data.{key} must be a directory or hub id, got {d[key]!r}")
    for key in ("forget_corpus", "retain_corpus", "wmdp_subsets"):
        v = d[key]
        if v is not None and not (isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))):
            raise UserError(f"data.{key} must be a name, a comma-separated string or a list of names, got {v!r}")
    if bench is not None and bench.validate is not None:
        bench.validate(d)


def cache_dir(cfg: dict) -> Path:
    root = cfg.get("cache_dir") or os.environ.get("ROBUST_UNLEARN_CACHE") or Path.home() / ".cache" / "robust_unlearn"
    return Path(root).expanduser()
