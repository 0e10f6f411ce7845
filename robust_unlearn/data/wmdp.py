"""WMDP (Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning").

Questions: hub ``cais/wmdp`` (``data.path``; or a local directory in its layout), configs
``wmdp-bio`` / ``wmdp-cyber`` (``wmdp-chem`` too), split ``test``; rows ``{question, choices (4),
answer (index)}``. ``data.wmdp_subsets`` picks the configs evaluated (default bio and cyber).

Unlearning corpora (``data.corpus_path``: hub ``cais/wmdp-corpora`` or a local directory), configs
``cyber-forget-corpus``, ``cyber-retain-corpus``, ``bio-retain-corpus``, split ``train``; rows ``{text}``.
``bio-forget-corpus`` is **gated**: the hub dataset does not hold it; request it from the WMDP authors
(the form linked from the ``cais/wmdp-corpora`` card) and put it in a local ``data.corpus_path`` as
``bio-forget-corpus.jsonl`` (the file the authors send) or ``bio-forget-corpus/train-*.parquet``.
``data.forget_corpus`` (default ``cyber-forget-corpus``; a list or comma-separated) and
``data.retain_corpus`` (default ``wikitext``, RMU's retain set: ``wikitext`` / ``wikitext-2-raw-v1``,
split ``test``; read from ``data.corpus_path`` when that directory holds ``wikitext-2-raw-v1/``, else
from the hub) name them. As RMU's data code: documents of at most 50 characters are dropped and the
rest cut at 2,000 characters.

Utility: MMLU (Hendrycks et al. 2021) from ``data.mmlu_path``: a local directory of the original
CSVs (``test/<subject>_test.csv``: question, A, B, C, D, answer letter; no header) or of the hub
layout (``all/test-*.parquet``), or a hub id (default ``cais/mmlu``, config ``all``, split ``test``).

-> splits: ``forget``, ``retain`` (unlearning streams), ``train_target`` (forget + retain, for
fine-tuning a target from a base), ``wmdp_bio`` / ``wmdp_cyber`` / ``wmdp_chem``, ``mmlu``. There is
no retain oracle.
"""
from __future__ import annotations

import csv
from pathlib import Path

from ..errors import UserError
from .hub import is_local, load_split, local_files

QUESTIONS_HUB = "cais/wmdp"
CORPORA_HUB = "cais/wmdp-corpora"
MMLU_HUB = "cais/mmlu"
WIKITEXT = ("wikitext", "wikitext-2-raw-v1", "test")  # RMU's retain corpus: hub id, config, split
SUBSETS = ("wmdp-bio", "wmdp-cyber", "wmdp-chem")
DEFAULT_SUBSETS = ("wmdp-bio", "wmdp-cyber")
DEFAULT_FORGET, DEFAULT_RETAIN = "cyber-forget-corpus", "wikitext"  # corpora
# RMU's own data handling (centerforaisafety/wmdp:rmu/unlearn.py, as issue 14 read it; the repository could not
# be fetched here to pin a commit): documents of any non-zero length, none cut (data.doc_min_chars /
# data.doc_max_chars change that); retain text truncated at 512 tokens (data.retain_max_tokens in the recipe)
GATED = "bio-forget-corpus"
MC_FIELDS = ("question", "choices", "answer")


def names(value, default) -> list[str]:
    if value is None:
        return list(default)
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def validate(d: dict) -> None:
    """Recipe-only checks of the ``data`` section (``config.recipe_problems``)."""
    for s in names(d["wmdp_subsets"], SUBSETS):
        if s not in SUBSETS:
            raise UserError(f"data.wmdp_subsets: unknown subset '{s}' (expected some of {', '.join(SUBSETS)})")


def split_name(subset: str) -> str:
    """``wmdp-bio`` -> ``wmdp_bio`` (the split and metric prefix)."""
    return subset.replace("-", "_")


def _corpus(name: str, corpus_path: str, min_chars: int = 0, max_chars: int | None = None) -> list[dict]:
    if name == "wikitext":
        hub, config, split = WIKITEXT
        local = is_local(corpus_path) and Path(corpus_path).expanduser().is_dir() \
            and local_files(Path(corpus_path).expanduser(), config, split) is not None
        rows = load_split(corpus_path if local else hub, config, split, ("text",), "WMDP retain corpus")
    else:
        if name == GATED and not is_local(corpus_path):
            raise UserError(f"'{GATED}' is gated and not on the hub dataset '{corpus_path}': request it from the "
                            "WMDP authors (form linked from the cais/wmdp-corpora dataset card) and set data.corpus_path "
                            f"to a directory holding {GATED}.jsonl")
        rows = load_split(corpus_path, name, "train", ("text",), "WMDP corpus")
    texts = [str(r["text"]) for r in rows]
    return [{"text": t[:max_chars] if max_chars else t} for t in texts if len(t) > min_chars]


def _mc_rows(rows: list[dict], where: str) -> list[dict]:
    out = []
    for i, r in enumerate(rows, 1):
        choices = list(r["choices"])
        answer = r["answer"]
        if isinstance(answer, str) and answer.strip().upper() in "ABCD" and len(answer.strip()) == 1:
            answer = "ABCD".index(answer.strip().upper())
        if len(choices) != 4 or not isinstance(answer, int) or not 0 <= answer < 4:
            raise UserError(f"{where} row {i}: expected 4 choices and an answer index 0-3, got "
                            f"{len(choices)} choices and answer {r['answer']!r}")
        row = {"question": str(r["question"]), "choices": [str(c) for c in choices], "answer": int(answer)}
        if "subject" in r:
            row["subject"] = str(r["subject"])
        out.append(row)
    return out


def read_mmlu_csvs(directory: Path, split: str = "test") -> list[dict] | None:
    """The original MMLU release: ``<split>/<subject>_<split>.csv``, rows question, A, B, C, D, answer
    letter (no header). -> rows with ``subject``, or None when the directory holds no such files."""
    files = sorted((directory / split).glob(f"*_{split}.csv"))
    if not files:
        return None
    rows = []
    for f in files:
        subject = f.name[: -len(f"_{split}.csv")]
        with f.open(newline="", encoding="utf-8") as fh:
            for i, rec in enumerate(csv.reader(fh), 1):
                if len(rec) != 6 or rec[5].strip() not in ("A", "B", "C", "D"):
                    raise UserError(f"MMLU file '{f}' row {i}: expected 6 columns (question, A, B, C, D, answer letter)")
                rows.append({"question": rec[0], "choices": rec[1:5], "answer": "ABCD".index(rec[5].strip()),
                             "subject": subject})
    return rows


def load_mmlu(path: str) -> list[dict]:
    if is_local(path):
        root = Path(path).expanduser()
        if not root.is_dir():
            raise UserError(f"MMLU directory '{path}' not found (expected test/<subject>_test.csv files, the hub's "
                            "all/test-*.parquet layout, or a hub id such as cais/mmlu)")
        rows = read_mmlu_csvs(root)
        if rows is not None:
            return _mc_rows(rows, f"MMLU '{path}'")
    rows = load_split(path, "all", "test", MC_FIELDS + ("subject",), "MMLU")
    return _mc_rows(rows, f"MMLU '{path}'")


def load_wmdp(d: dict) -> dict[str, list[dict]]:
    """``d``: the recipe's ``data`` section."""
    path = d["path"] or QUESTIONS_HUB
    corpus_path = d["corpus_path"] or CORPORA_HUB
    lo, hi = d["doc_min_chars"], d["doc_max_chars"]
    forget = [r for n in names(d["forget_corpus"], [DEFAULT_FORGET]) for r in _corpus(n, corpus_path, lo, hi)]
    retain = [r for n in names(d["retain_corpus"], [DEFAULT_RETAIN]) for r in _corpus(n, corpus_path, lo, hi)]
    if not forget or not retain:
        raise UserError(f"WMDP: the {'forget' if not forget else 'retain'} corpus has no document longer than "
                        f"{lo} characters (data.doc_min_chars)")
    out = {"forget": forget, "retain": retain, "train_target": forget + retain}
    for subset in names(d["wmdp_subsets"], DEFAULT_SUBSETS):
        rows = load_split(path, subset, "test", MC_FIELDS, "WMDP questions")
        out[split_name(subset)] = _mc_rows(rows, f"WMDP '{path}:{subset}'")
    out["mmlu"] = load_mmlu(d["mmlu_path"] or MMLU_HUB)
    return out
