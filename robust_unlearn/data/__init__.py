"""Benchmarks -> ``datasets.DatasetDict`` with the splits every later stage reads.

Splits (rows: question, answer, paraphrased_answer, perturbed_answer, author):
- ``train_target``: what the target model is fine-tuned on (forget + retain [+ utility sets])
- ``train_oracle``: what the retain oracle is fine-tuned on (retain [+ utility sets])
- ``forget``, ``retain``: evaluation sets (with paraphrased / perturbed answers when available)
- ``real_authors``, ``world_facts``: utility sets (TOFU's names); ``holdout``: never-trained authors
A split is absent when its data is (e.g. no ``world_facts_perturbed.json``): its metrics are skipped.

The raw-text benchmarks (``TEXT_BENCHMARKS``: ``muse_news``, ``wmdp``) have their own splits (see
``data.muse`` and ``data.wmdp``): ``train_target`` [``train_oracle``], ``forget`` and ``retain`` hold
``{text}`` documents (trained on every token, :class:`data.collate.TextDataset`), the rest are their
evaluation sets.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets

from ..errors import UserError
from . import fictitious
from .tofu import forget_percent, load_tofu

BENCHMARKS = ("fictitious", "tofu", "muse_news", "wmdp")
# raw-text benchmarks -> how a corpus becomes training items (data.collate.TextDataset's mode)
TEXT_BENCHMARKS = {"muse_news": "chunk", "wmdp": "document"}

EVAL_SPLITS = ("forget", "retain", "real_authors", "world_facts", "holdout")
FEATURES = datasets.Features({
    "question": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "paraphrased_answer": datasets.Value("string"),
    "perturbed_answer": datasets.Sequence(datasets.Value("string")),
    "author": datasets.Value("string"),
})


def check_fictitious(d: dict) -> int:
    """Forget authors of the built-in benchmark for the recipe's ``data`` section (``UserError`` if the
    split leaves no retain author or asks for more question types than there are)."""
    pct = forget_percent(d["forget_split"])
    n = d["num_authors"]
    k = fictitious.forget_author_count(pct, n)
    if k >= n:
        raise UserError(f"data.forget_split '{d['forget_split']}' leaves no retain authors out of data.num_authors={n}")
    most = len(fictitious.QUESTION_ORDER)
    if not 1 <= d["qa_per_author"] <= most:
        raise UserError(f"data.qa_per_author {d['qa_per_author']} must be in 1..{most} (question types per author)")
    return k


def _fictitious_splits(d: dict) -> dict:
    n = d["num_authors"]
    k = check_fictitious(d)
    gen = fictitious.generate(seed=d["seed"], num_authors=n, qa_per_author=d["qa_per_author"],
                              num_perturbed=d["num_perturbed"], holdout_authors=d["holdout_authors"])
    rows = gen["rows"]
    forget = [r for a in rows[n - k:n] for r in a]
    retain = [r for a in rows[:n - k] for r in a]
    # As TOFU's retain_perturbed (400 rows, the size of forget10): retain metrics are taken on as
    # many retain authors as there are forget authors.
    retain_eval = [r for a in rows[:min(k, n - k)] for r in a]
    holdout = [r for a in rows[n:] for r in a] or None
    return {"full": retain + forget, "retain_train": retain, "forget": forget, "retain": retain_eval,
            "real_authors": gen["real_authors"], "world_facts": gen["world_facts"], "holdout": holdout}


def load_benchmark(cfg: dict) -> datasets.DatasetDict:
    """``cfg`` is the recipe (its ``data`` and ``seed`` keys are read)."""
    d = dict(cfg["data"], seed=cfg.get("seed", 0))
    if d["name"] in TEXT_BENCHMARKS:
        return _load_text_benchmark(d)
    if d["name"] == "fictitious":
        raw = _fictitious_splits(d)
    elif d["name"] == "tofu":
        raw = load_tofu(d["path"], d["forget_split"], need_oracle_train=cfg["model"].get("oracle") is None)
    else:
        raise UserError(f"data.name '{d['name']}' is unknown (expected one of {', '.join(BENCHMARKS)})")
    limit = d.get("limit")
    if limit is not None:
        raw = {k: (v[: int(limit)] if v is not None else None) for k, v in raw.items()}
    train_utility = d.get("train_utility")
    if train_utility is None:
        train_utility = d["name"] == "fictitious"
    utility = []
    if train_utility:
        utility = (raw["real_authors"] or []) + (raw["world_facts"] or [])
    splits = {"train_target": raw["full"] + utility}
    if raw["retain_train"] is not None:
        splits["train_oracle"] = raw["retain_train"] + utility
    for name in EVAL_SPLITS:
        if raw.get(name):
            splits[name] = raw[name]
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v, features=FEATURES) for k, v in splits.items()})


def _load_text_benchmark(d: dict) -> datasets.DatasetDict:
    if d["name"] == "muse_news":
        from .muse import ICL_SPLITS, load_muse

        raw, keep = load_muse(d), ICL_SPLITS  # the in-context examples are prompt material: never cut
    else:
        from .wmdp import load_wmdp

        raw, keep = load_wmdp(d), ()
    limit = d.get("limit")
    splits = {}
    for name, rows in raw.items():
        if limit is not None and name not in keep and not name.startswith("train_"):
            rows = rows[: int(limit)]
        if rows:
            splits[name] = rows
    if limit is not None:  # the training corpora follow the cut streams
        splits["train_target"] = splits["forget"] + splits["retain"]
        if "train_oracle" in splits:
            splits["train_oracle"] = splits["retain"]
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def is_text_benchmark(cfg: dict) -> bool:
    return cfg["data"]["name"] in TEXT_BENCHMARKS


def target_texts(bench) -> list[str]:
    """The text of ``train_target`` (raw documents, or every question and answer): what a tiny base
    model's tokenizer is trained on (``models.resolve_base``)."""
    rows = bench["train_target"]
    if "text" in rows.column_names:  # a raw-text benchmark
        return list(rows["text"])
    return [t for r in rows for t in (r["question"], r["answer"])]


def dataset_for(cfg: dict, rows, tok):
    """Training items of ``rows`` for this recipe's benchmark: QA pairs in the model's prompt format
    (answer tokens trained), or raw text (every token trained; MUSE chunks, WMDP documents), both
    cut to ``model.max_length`` tokens."""
    from .collate import QADataset, TextDataset, formatter_for  # late: collate imports torch

    mode = TEXT_BENCHMARKS.get(cfg["data"]["name"])
    if mode is not None:
        return TextDataset(rows, tok, cfg["model"]["max_length"], mode)
    return QADataset(rows, formatter_for(tok, cfg))


def fingerprint(rows) -> str:
    """A content hash of rows (a Dataset or a list of dicts), stable across processes."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(dict(r), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def export_tofu_files(bench: datasets.DatasetDict, directory: str | Path, forget_split: str) -> list[Path]:
    """Write a benchmark in TOFU's file names (so any TOFU tool, and our own loader, reads it)."""
    pct = forget_percent(forget_split)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    names = {"full": "full", f"{forget_split}_perturbed": "forget", "retain_perturbed": "retain",
             "real_authors_perturbed": "real_authors", "world_facts_perturbed": "world_facts",
             f"holdout{pct:02d}": "holdout"}
    written = []
    for fname, split in names.items():
        if fname == "full":
            rows = [r for r in bench["train_target"] if r["author"] is not None]
        elif split in bench:
            rows = list(bench[split])
        else:
            continue
        path = out / f"{fname}.json"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        written.append(path)
    if "train_oracle" in bench:
        rows = [r for r in bench["train_oracle"] if r["author"] is not None]
        path = out / f"retain{100 - pct:02d}.json"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        written.append(path)
        fpath = out / f"{forget_split}.json"
        fpath.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in bench["forget"]), encoding="utf-8")
        written.append(fpath)
    return written
