"""Hashes and ids: the cache keys of checkpoints and evaluation setups.

What is hashed is part of every cache key (fine-tuned and unlearned checkpoints, ledger cells): change
nothing here without meaning to invalidate every cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .data import fingerprint


def stable_hash(obj) -> str:
    """sha256 (hex) of ``obj`` as sorted-key JSON (anything else through ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def base_identity(base: Path | str) -> dict:
    """A base model as part of a fine-tuning spec: a local directory by its path and weight files'
    names and sizes, anything else by its (hub) name."""
    p = Path(base)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        return {"path": str(p.resolve()), "weights": [(f.name, f.stat().st_size) for f in files]}
    return {"hub": str(base)}


def ckpt_id(path: str) -> str:
    """A checkpoint's id (16 hex): of its weight files' names, sizes and mtimes, or of its name."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin"))
        return stable_hash([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])[:16]
    return stable_hash(path)[:16]


def prompt_spec(cfg: dict) -> dict:
    """What of the recipe decides the prompt's tokens (a part of every cache key). ``date_string``
    enters only when it differs from the default, so keys made before it existed stay valid."""
    from .config import DEFAULTS

    m = cfg["model"]
    spec = {k: m[k] for k in ("prompt", "system_prompt", "max_length")}
    if m.get("date_string") != DEFAULTS["model"]["date_string"]:
        spec["date_string"] = m.get("date_string")
    return spec


def eval_id(cfg: dict, bench) -> str:
    """An evaluation setup's id (16 hex): the eval settings, the prompt format and every evaluated
    split's fingerprint."""
    # eval.catalogue only adds metrics: off, it leaves the ids made before it existed as they were
    # eval.catalogue, eval.input_format and eval.gibberish_classifier at their defaults leave the ids made before
    # they existed as they were
    ev = {k: v for k, v in cfg["eval"].items()
          if not ((k == "catalogue" and not v) or (k == "input_format" and v == "default")
                  or (k == "gibberish_classifier" and v is None))}
    spec = {"eval": ev, "prompt": prompt_spec(cfg),
            "data": {s: fingerprint(bench[s]) for s in bench if not s.startswith("train_")}}
    return stable_hash(spec)[:16]
