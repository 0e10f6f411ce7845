"""Reading TOFU-format data: a local directory of TOFU's JSON-lines files, or a hub id.

File names are TOFU's own (locuslab/TOFU): ``forget10.json``, ``forget10_perturbed.json``,
``retain90.json``, ``retain_perturbed.json``, ``real_authors_perturbed.json``,
``world_facts_perturbed.json``, ``full.json``; a ``holdoutNN.json`` is used when present.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

REQUIRED = ("question", "answer")
PERTURBED_REQUIRED = ("question", "answer", "perturbed_answer")


def _check_rows(rows: list[dict], source: str, required: tuple[str, ...]) -> list[dict]:
    out = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UserError(f"data file '{source}' row {i}: expected a JSON object with fields {', '.join(required)}")
        for field in required:
            if field not in row:
                raise UserError(f"data file '{source}' row {i}: missing field '{field}' (expected fields: {', '.join(required)})")
        if not isinstance(row["question"], str) or not isinstance(row["answer"], str):
            raise UserError(f"data file '{source}' row {i}: 'question' and 'answer' must be strings")
        pert = row.get("perturbed_answer") or []
        if isinstance(pert, str):
            pert = [pert]
        if not isinstance(pert, list) or not all(isinstance(p, str) for p in pert):
            raise UserError(f"data file '{source}' row {i}: 'perturbed_answer' must be a list of strings")
        para = row.get("paraphrased_answer")
        if para is not None and not isinstance(para, str):
            raise UserError(f"data file '{source}' row {i}: 'paraphrased_answer' must be a string")
        out.append({"question": row["question"], "answer": row["answer"], "paraphrased_answer": para,
                    "perturbed_answer": list(pert), "author": row.get("author")})
    return out


def read_jsonl(path: Path, required: tuple[str, ...] = REQUIRED) -> list[dict]:
    """TOFU's files are JSON lines; a file holding one JSON list is accepted too."""
    text = path.read_text(encoding="utf-8")
    rows: list = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise UserError(f"data file '{path}' is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"data file '{path}' line {lineno} is not valid JSON: {exc.msg}") from None
    return _check_rows(rows, str(path), required)


def forget_percent(split: str) -> int:
    """``forgetNN`` -> NN (the percent of authors forgotten); ``UserError`` for any other name."""
    m = re.fullmatch(r"forget(\d{2})", split)
    if not m or not 0 < int(m.group(1)) < 100:
        raise UserError(f"forget split '{split}' is not a valid name (expected forgetNN, e.g. forget01, forget05, forget10)")
    return int(m.group(1))


def _available_forget_splits(directory: Path) -> list[str]:
    return sorted({m.group(1) for p in directory.glob("forget*.json")
                   if (m := re.fullmatch(r"(forget\d{2})(_perturbed)?\.json", p.name))})


class _Source:
    """Files by TOFU name from a local directory or from a hub dataset (one config per file)."""

    def __init__(self, path: str):
        self.path = path
        self.local = Path(path).expanduser()
        self.is_local = self.local.exists() or "/" not in path or path.startswith((".", "/", "~"))
        if self.is_local and not self.local.is_dir():
            raise UserError(f"data directory '{path}' not found (expected a directory of TOFU JSON-lines files such as forget10.json, retain90.json)")

    def has(self, name: str) -> bool:
        if self.is_local:
            return (self.local / f"{name}.json").is_file()
        return True  # a hub dataset is asked for lazily; a missing config is reported then

    def read(self, name: str, required: tuple[str, ...] = REQUIRED) -> list[dict]:
        if self.is_local:
            return read_jsonl(self.local / f"{name}.json", required)
        import datasets  # hub id, e.g. "locuslab/TOFU": one dataset config per TOFU file name

        try:
            ds = datasets.load_dataset(self.path, name, split="train")
        except Exception as exc:  # network, unknown config, ...
            raise UserError(f"could not load '{name}' from hub dataset '{self.path}': {str(exc).splitlines()[0]}") from None
        return _check_rows([dict(r) for r in ds], f"{self.path}:{name}", required)

    def where(self, name: str) -> str:
        return str(self.local / f"{name}.json") if self.is_local else f"{self.path}:{name}"

    def forget_splits(self) -> list[str]:
        return _available_forget_splits(self.local) if self.is_local else []


def _optional_files(forget_split: str) -> list[tuple[str, str]]:
    """(TOFU file name, what is skipped without it) for the files a run can do without."""
    return [(f"{forget_split}_perturbed", "forget truth ratio and forget quality"),
            ("retain_perturbed", "retain truth ratio"), ("real_authors_perturbed", "real-authors metrics"),
            ("world_facts_perturbed", "world-facts metrics")]


def file_problems(path: str, forget_split: str, need_oracle_train: bool = True) -> tuple[list[str], list[str]]:
    """What ``load_tofu`` would reject (problems) and skip (notes) from a local TOFU directory, found
    from its file names alone; a hub id -> ([], [a note that it was not checked]). ``UserError`` for a
    bad split name or a local path that is not a directory."""
    pct = forget_percent(forget_split)
    src = _Source(path)
    if not src.is_local:
        return [], [f"data.path '{path}' is a hub id: not checked offline"]
    problems = []
    if not (src.has(forget_split) or src.has(f"{forget_split}_perturbed")):
        found = ", ".join(src.forget_splits()) or "none"
        problems.append(f"split '{forget_split}' does not exist in data directory '{path}' (found: {found})")
    retain_name = f"retain{100 - pct:02d}"
    if need_oracle_train and not src.has(retain_name):
        problems.append(f"data file '{src.where(retain_name)}' not found (the retain split matching {forget_split})")
    notes = [f"{what} will be skipped: file '{src.where(name)}' not found"
             for name, what in _optional_files(forget_split) if not src.has(name)]
    return problems, notes


def load_tofu(path: str, forget_split: str, need_oracle_train: bool = True) -> dict:
    """-> dict of split name -> rows; ``None`` for a split whose file is absent (warned)."""
    pct = forget_percent(forget_split)
    src = _Source(path)
    retain_name = f"retain{100 - pct:02d}"
    if src.is_local:
        problems, _ = file_problems(path, forget_split, need_oracle_train=False)
        if problems:
            raise UserError(problems[0])

    def optional(name: str, required: tuple[str, ...], what: str) -> list[dict] | None:
        if src.has(name):
            return src.read(name, required)
        log.warning("%s skipped: file '%s' not found", what, src.where(name))
        return None

    forget_full = src.read(forget_split) if src.has(forget_split) else None
    skipped = dict(_optional_files(forget_split))
    forget_eval = optional(f"{forget_split}_perturbed", PERTURBED_REQUIRED, skipped[f"{forget_split}_perturbed"])
    if forget_eval is None:
        forget_eval = forget_full
    retain_train = src.read(retain_name) if src.has(retain_name) else None
    if retain_train is None and need_oracle_train:
        raise UserError(f"data file '{src.where(retain_name)}' not found (the retain split matching {forget_split})")
    retain_eval = optional("retain_perturbed", PERTURBED_REQUIRED, skipped["retain_perturbed"])
    if retain_eval is None:
        retain_eval = retain_train
    if src.has("full"):
        full = src.read("full")
    else:
        full = (forget_full or forget_eval) + (retain_train or [])
    return {
        "full": full,
        "retain_train": retain_train,
        "forget": forget_eval,
        "retain": retain_eval,
        "real_authors": optional("real_authors_perturbed", PERTURBED_REQUIRED, skipped["real_authors_perturbed"]),
        "world_facts": optional("world_facts_perturbed", PERTURBED_REQUIRED, skipped["world_facts_perturbed"]),
        "holdout": src.read(f"holdout{pct:02d}") if src.has(f"holdout{pct:02d}") and src.is_local else None,
    }
