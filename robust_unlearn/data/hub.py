"""One split of a hub dataset, from the hub or from a local directory in the hub's file layout.

A hub dataset with configs stores each split of config ``C`` as ``C/<split>-00000-of-0000N.parquet``
(``muse-bench/MUSE-News``: ``raw/forget-00000-of-00001.parquet``; ``cais/wmdp``:
``wmdp-bio/test-00000-of-00001.parquet``). A local directory in that layout is read with pyarrow
(parquet) or as JSON lines; ``C/<split>.parquet``, ``C/<split>.jsonl``, ``C/<split>.json``
and (for a single-split config) ``C.jsonl`` next to the folders are accepted too. Anything else is a
hub id, loaded with ``datasets.load_dataset(path, C, split=split)``.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def is_local(path: str) -> bool:
    p = Path(path).expanduser()
    return p.exists() or "/" not in path or path.startswith((".", "/", "~"))


def local_files(root: Path, config: str, split: str) -> tuple[str, list[Path]] | None:
    """-> (builder, files) for ``config``/``split`` under ``root``, or None."""
    d = root / config
    for builder, patterns in (("parquet", (f"{split}-*.parquet", f"{split}.parquet")),
                              ("json", (f"{split}-*.jsonl", f"{split}.jsonl", f"{split}.json"))):
        for pat in patterns:
            files = sorted(d.glob(pat)) if d.is_dir() else []
            if files:
                return builder, files
    single = root / f"{config}.jsonl"
    if single.is_file():
        return "json", [single]
    return None


def _read_local(builder: str, path: Path) -> list[dict]:
    """A parquet file (pyarrow), a JSON-lines file, or a file holding one JSON list."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_split(path: str, config: str, split: str, fields: tuple[str, ...], what: str = "data") -> list[dict]:
    """Rows (dicts) of ``config``/``split`` of the dataset at ``path`` (a local directory in the
    hub's layout, or a hub id), each checked to have ``fields``."""
    where = f"{path}:{config}/{split}"
    if is_local(path):
        root = Path(path).expanduser()
        if not root.is_dir():
            raise UserError(f"{what} directory '{path}' not found (expected a directory in the hub's layout, "
                            f"e.g. {config}/{split}-00000-of-00001.parquet, or a hub id)")
        found = local_files(root, config, split)
        if found is None:
            raise UserError(f"{what}: no file for '{config}/{split}' in '{path}' (expected "
                            f"{root / config / (split + '-00000-of-00001.parquet')} or .jsonl, as the hub's layout)")
        builder, files = found
        where = str(files[0])
        rows = []
        for f in files:
            try:
                rows += _read_local(builder, f)
            except Exception as exc:
                raise UserError(f"{what} file '{f}' could not be read: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    else:
        import datasets

        try:
            ds = datasets.load_dataset(path, config, split=split)
        except Exception as exc:  # network, gated, unknown config, ...
            raise UserError(f"could not load '{config}/{split}' from hub dataset '{path}': "
                            f"{(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
        rows = [dict(r) for r in ds]
    for i, r in enumerate(rows, 1):
        missing = [f for f in fields if f not in r]
        if missing:
            raise UserError(f"{what} '{where}' row {i}: missing field '{missing[0]}' (expected fields: {', '.join(fields)})")
    return rows
