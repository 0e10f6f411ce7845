"""MUSE-News (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models"):
hub dataset ``muse-bench/MUSE-News``, or a local directory in its layout (``data.path``).

Configs and splits read (the dataset card's names):
- ``raw``: ``forget`` (the corpus to unlearn), ``retain1`` (the retain corpus unlearning may use),
  ``retain2``, ``holdout``; rows ``{text}``. ``data.forget_corpus`` / ``data.retain_corpus`` name the
  raw splits (default ``forget`` / ``retain1``).
- ``verbmem``: ``forget``; rows ``{prompt, gt}`` (a passage's opening and its continuation).
- ``knowmem``: ``forget_qa``, ``retain_qa`` (100 QA each) and ``forget_qa_icl``, ``retain_qa_icl`` (the
  in-context examples); rows ``{question, answer}``.
- ``privleak``: ``forget``, ``holdout`` (membership-inference texts); rows ``{text}``.

-> splits (lists of rows): ``forget``, ``retain`` (unlearning streams), ``train_target`` (forget +
retain, for fine-tuning a target from a base), ``train_oracle`` (retain), ``verbmem_forget``,
``knowmem_forget``, ``knowmem_forget_icl``, ``knowmem_retain``, ``knowmem_retain_icl``,
``privleak_forget``, ``privleak_holdout``.
"""
from __future__ import annotations

from ..errors import UserError
from .hub import load_split

HUB_ID = "muse-bench/MUSE-News"
EVAL = {  # split name -> (config, hub split, fields)
    "verbmem_forget": ("verbmem", "forget", ("prompt", "gt")),
    "knowmem_forget": ("knowmem", "forget_qa", ("question", "answer")),
    "knowmem_forget_icl": ("knowmem", "forget_qa_icl", ("question", "answer")),
    "knowmem_retain": ("knowmem", "retain_qa", ("question", "answer")),
    "knowmem_retain_icl": ("knowmem", "retain_qa_icl", ("question", "answer")),
    "privleak_forget": ("privleak", "forget", ("text",)),
    "privleak_holdout": ("privleak", "holdout", ("text",)),
}
ICL_SPLITS = ("knowmem_forget_icl", "knowmem_retain_icl")
DEFAULT_FORGET, DEFAULT_RETAIN = "forget", "retain1"  # raw splits


def _text_rows(rows: list[dict]) -> list[dict]:
    return [{"text": str(r["text"])} for r in rows if str(r["text"]).strip()]


def validate(d: dict) -> None:
    """Recipe-only checks of the ``data`` section (``config.recipe_problems``)."""
    for key in ("forget_corpus", "retain_corpus"):
        if d[key] is not None and (not isinstance(d[key], str) or "," in d[key]):
            raise UserError(f"data.{key} must name one split of MUSE's raw config (e.g. forget, retain1), got {d[key]!r}")


def load_muse(d: dict) -> dict[str, list[dict]]:
    """``d``: the recipe's ``data`` section."""
    path = d["path"] or HUB_ID
    forget_name = d["forget_corpus"] or DEFAULT_FORGET
    retain_name = d["retain_corpus"] or DEFAULT_RETAIN
    forget = _text_rows(load_split(path, "raw", forget_name, ("text",), "MUSE data"))
    retain = _text_rows(load_split(path, "raw", retain_name, ("text",), "MUSE data"))
    out = {"forget": forget, "retain": retain, "train_target": forget + retain, "train_oracle": retain}
    for name, (config, split, fields) in EVAL.items():
        rows = load_split(path, config, split, fields, "MUSE data")
        out[name] = [{f: str(r[f]) for f in fields} for r in rows]
    return out
