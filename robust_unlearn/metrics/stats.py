"""Per-example stats of an evaluation (one dataclass per split: ``tofu.SplitStats``, ``muse.GenStats``,
...), saved as one JSON object per cell next to the ledger and read back (the oracle's reference)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def save_stats(path: Path, per: dict) -> None:
    """``per``: split -> stats dataclass; arrays as lists. Written to a temporary file, then renamed."""
    obj = {split: {k: _plain(v) for k, v in vars(st).items()} for split, st in per.items()}
    tmp = path.with_suffix(".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def _plain(v):
    """Arrays (also inside a dict, e.g. per-attack scores) as lists, numpy scalars as numbers."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def load_stats(path) -> dict | None:
    """What ``save_stats`` wrote (split -> field -> value, arrays as lists), or None without the file."""
    path = Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text())
