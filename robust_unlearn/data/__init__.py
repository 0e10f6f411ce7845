"""Benchmarks -> ``datasets.DatasetDict`` with the splits every later stage reads.

Splits (rows: question, answer, paraphrased_answer, perturbed_answer, author):
- ``train_target``: what the target model is fine-tuned on (forget + retain [+ utility sets])
- ``train_oracle``: what the retain oracle is fine-tuned on (retain [+ utility sets])
- ``forget``, ``retain``: evaluation sets (with paraphrased / perturbed answers when available)
- ``real_authors``, ``world_facts``: utility sets (TOFU's names); ``holdout``: never-trained authors
A split is absent when its data is (e.g. no ``world_facts_perturbed.json``): its metrics are skipped.

Each benchmark is declared once, in ``data.benchmarks.BENCHMARKS`` (loader, splits, metric suite).
The raw-text benchmarks (``Benchmark.text_mode`` set) have their own splits (see their loaders):
``train_target`` [``train_oracle``], ``forget`` and ``retain`` hold ``{text}`` documents (trained on every token, :class:`data.collate.TextDataset`), the rest are their
evaluation sets.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from .benchmarks import BENCHMARKS, Benchmark, benchmark_of
from .tofu import forget_percent

if TYPE_CHECKING:
    import datasets

__all__ = ["BENCHMARKS", "Benchmark", "benchmark_of", "dataset_for", "export_tofu_files", "fingerprint",
           "is_text_benchmark", "load_benchmark", "target_texts"]


def _features():
    import datasets  # late: the registry and the checks need no datasets

    return datasets.Features({
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "paraphrased_answer": datasets.Value("string"),
        "perturbed_answer": datasets.Sequence(datasets.Value("string")),
        "author": datasets.Value("string"),
    })


def load_benchmark(cfg: dict) -> datasets.DatasetDict:
    """``cfg`` is the recipe (its ``data`` and ``seed`` keys are read)."""
    import datasets

    d = dict(cfg["data"], seed=cfg.get("seed", 0))
    b = benchmark_of(cfg)
    raw = b.load(d, cfg)
    if b.is_text:
        return _text_splits(b, d, raw)
    limit = d.get("limit")
    if limit is not None:
        raw = {k: (v[: int(limit)] if v is not None else None) for k, v in raw.items()}
    train_utility = d.get("train_utility")
    if train_utility is None:
        train_utility = b.train_utility
    utility = []
    if train_utility:
        utility = (raw["real_authors"] or []) + (raw["world_facts"] or [])
    splits = {"train_target": raw["full"] + utility}
    if raw["retain_train"] is not None:
        splits["train_oracle"] = raw["retain_train"] + utility
    for name in b.eval_splits:
        if raw.get(name):
            splits[name] = raw[name]
    features = _features()
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v, features=features) for k, v in splits.items()})


def _text_splits(b: Benchmark, d: dict, raw: dict) -> datasets.DatasetDict:
    import datasets

    limit = d.get("limit")
    splits = {}
    for name, rows in raw.items():
        if limit is not None and name not in b.uncut and not name.startswith("train_"):
            rows = rows[: int(limit)]
        if rows:
            splits[name] = rows
    if limit is not None:  # the training corpora follow the cut streams
        splits["train_target"] = splits["forget"] + splits["retain"]
        if "train_oracle" in splits:
            splits["train_oracle"] = splits["retain"]
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def is_text_benchmark(cfg: dict) -> bool:
    return benchmark_of(cfg).is_text


def target_texts(bench) -> list[str]:
    """The text of ``train_target`` (raw documents, or every question and answer): what a tiny base
    model's tokenizer is trained on (``models.resolve_base``)."""
    rows = bench["train_target"]
    if "text" in rows.column_names:  # a raw-text benchmark
        return list(rows["text"])
    return [t for r in rows for t in (r["question"], r["answer"])]


def retain_rows(bench):
    """The retain rows that training sees: the oracle's training rows where the benchmark has them."""
    return bench["train_oracle"] if "train_oracle" in bench else bench["retain"]


def dataset_for(cfg: dict, rows, tok, alternate: str | None = None, retain: bool = False):
    """Training items of ``rows`` for this recipe's benchmark: QA pairs in the model's prompt format
    (answer tokens trained), or raw text (every token trained; MUSE chunks, WMDP documents), both
    cut to ``model.max_length`` tokens."""
    from .collate import QADataset, TextDataset, formatter_for  # late: collate imports torch

    mode = benchmark_of(cfg).text_mode
    if mode is not None:
        if alternate is not None:
            raise UserError(f"this method needs question-answer rows (refusals as alternates); benchmark "
                            f"'{cfg['data']['name']}' is raw text")
        limit = cfg["model"]["max_length"]
        if retain and cfg["data"]["retain_max_tokens"]:  # RMU truncates its retain text shorter
            limit = min(limit, cfg["data"]["retain_max_tokens"])
        return TextDataset(rows, tok, limit, mode)
    if alternate == "idk":
        from .collate import PairedQADataset
        from .refusals import refusal_for

        return PairedQADataset(rows, formatter_for(tok, cfg), refusal_for)
    return QADataset(rows, formatter_for(tok, cfg))


def calibration_samples(cfg: dict, bench, tok) -> tuple[list[list[int]], str]:
    """GPTQ / AWQ calibration (``sweep.calibration``): the rows of its split as the model sees them
    (QA: prompt + answer in the recipe's prompt format; text benchmarks: the text), concatenated in
    order and cut into ``samples`` rows of ``length`` tokens (fewer when the split is shorter; then one
    row of what there is). -> (token-id rows, a description for the ledger)."""
    c = cfg["sweep"]["calibration"]
    split = c["split"]
    if split not in bench:
        raise UserError(f"sweep.calibration.split '{split}' is not a split of this benchmark "
                        f"(expected one of: {', '.join(bench)})")
    rows = bench[split]
    if benchmark_of(cfg).text_mode is not None:
        stream = [t for r in rows for t in tok(r["text"], add_special_tokens=False)["input_ids"]]
    else:
        from .collate import formatter_for  # late: collate imports torch

        fmt = formatter_for(tok, cfg)
        stream = [t for r in rows for t in fmt.encode(r["question"], r["answer"])[0]]
    n, length = c["samples"], c["length"]
    out = [stream[i * length:(i + 1) * length] for i in range(min(n, len(stream) // length))]
    if not out and stream:
        out = [stream[:length]]
    if not out:
        raise UserError(f"sweep.calibration.split '{split}' has no text to calibrate on")
    return out, f"{split} {len(out)}x{len(out[0])} tokens"


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
