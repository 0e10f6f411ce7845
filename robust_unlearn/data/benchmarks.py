"""The one declaration of every benchmark: ``BENCHMARKS`` (a recipe's ``data.name`` -> :class:`Benchmark`).

A benchmark is its loader (a module of ``data/``), its split names, its metric suite (a module of
``metrics/``, named here by a key that ``metrics.suite_for`` resolves: data does not import metrics)
and what the report pivots on (:class:`Metrics`). Every other module reads this registry instead of
spelling benchmark names; adding a benchmark is one entry here, its loader, and its suite (with its
key in ``metrics.SUITES``).

Light to import (no ``datasets``, no ``torch``): config, check, the CLI and the report read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import UserError
from . import muse, wmdp
from .fictitious import check_fictitious, load_fictitious
from .tofu import file_problems, load_tofu


@dataclass(frozen=True)
class Metrics:
    """A metric suite and what the report does with its metrics (shared by benchmarks with one suite)."""

    suite: str  # key of metrics.SUITES (metrics.suite_for)
    # the primary forget metric: the first of these in a ledger is the sweep heatmap and the scatter's x
    forget: tuple[str, ...]
    utility: str  # the utility metric: the scatter's y
    main: tuple[str, ...]  # columns of the report's main table (in this order, where present)
    pivot: tuple[str, ...]  # the sweep's per-metric pivot tables
    note_metric: str  # the report's note on the definitions is shown when this metric is in the ledger
    note: str
    reference_note: str  # the sweep section's sentence on the retain-oracle reference
    # metrics whose presence (numeric, in a sweep ledger) marks this suite's reference_note
    reference_metrics: tuple[str, ...] = ()
    # metric -> the ledger's split, where it is not the metric name's first part (metrics.split_of)
    ledger_splits: tuple[tuple[str, str], ...] = ()
    forget_lower_is_better: bool = True  # lower = more forgotten
    utility_lower_is_better: bool = False  # higher = more utility kept
    # how the forget answers read (1.0: no answer loops), shown next to the verdict where in the ledger: a
    # low forget metric reached by answers that loop is not the oracle's kind of forgetting
    answers: str | None = None

    @property
    def forget_metric(self) -> str:
        return self.forget[0]


@dataclass(frozen=True)
class Benchmark:
    name: str  # the recipe's data.name
    title: str  # for messages
    # (the recipe's data section with ``seed``, the recipe) -> raw splits: name -> list of rows (or None)
    load: Callable[[dict, dict], dict]
    metrics: Metrics
    # what the suite evaluates uncompressed: QA splits (TOFU's names), or the text suites' split groups
    eval_splits: tuple[str, ...]
    text_mode: str | None = None  # raw-text benchmarks: data.collate.TextDataset's mode; None: QA pairs
    reads_path: bool = True  # data.path is read (a directory or hub id)
    requires_path: bool = False  # ... and must be set
    train_utility: bool = False  # QA: data.train_utility's default (fine-tune on the utility sets too)
    uncut: tuple[str, ...] = ()  # raw-text: splits data.limit never cuts (prompt material)
    default_forget_corpus: str | None = None  # raw-text: data.forget_corpus's default
    # recipe-only checks of the data section (raise UserError); config.recipe_problems
    validate: Callable[[dict], None] | None = None
    # checks that read files: (data section, recipe) -> (problems, notes), may raise UserError; check.py
    check: Callable[[dict, dict], tuple[list[str], list[str]]] | None = None

    @property
    def is_text(self) -> bool:
        return self.text_mode is not None

    @property
    def suite(self) -> str:
        return self.metrics.suite

    def forget_name(self, d: dict) -> str:
        """What is forgotten, for run.json and the report: the forget split, or the forget corpora."""
        if not self.is_text:
            return d["forget_split"]
        corpus = d["forget_corpus"] or self.default_forget_corpus
        return ",".join(corpus) if isinstance(corpus, list) else corpus


# -- QA benchmarks (TOFU's layout): the built-in generator and TOFU ----------------------------------
QA_SPLITS = ("forget", "retain", "real_authors", "world_facts", "holdout")

TOFU_METRICS = Metrics(
    suite="tofu",
    forget=("forget_Q_A_Prob",), utility="model_utility",
    main=("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio", "forget_quality", "model_utility",
          "retain_Q_A_Prob", "retain_Q_A_ROUGE", "holdout_Q_A_Prob"),
    pivot=("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_quality", "model_utility"),
    answers="forget_Q_A_distinct_bigrams",
    note_metric="forget_Q_A_Prob",
    note="Metrics follow TOFU (Maini et al. 2024) as open-unlearning computes them; "
         "see `robust_unlearn/metrics/tofu.py` for the exact definitions.",
    reference_note="forget_quality compares every cell with the retain oracle's uncompressed forget truth ratios.",
    ledger_splits=(("model_utility", "utility"),) + tuple(  # the catalogue (metrics.mia) measures the forget set
        (m, "forget") for m in ("mia_loss", "mia_zlib", "mia_reference", "mia_min_k", "mia_min_k_plus_plus",
                                "mia_gradnorm", "privleak", "exact_memorization", "extraction_strength")),
)


def _check_fictitious(d: dict, cfg: dict) -> tuple[list[str], list[str]]:
    check_fictitious(d)
    return [], []


def _load_tofu(d: dict, cfg: dict) -> dict:
    return load_tofu(d["path"], d["forget_split"], need_oracle_train=cfg["model"].get("oracle") is None)


def _check_tofu(d: dict, cfg: dict) -> tuple[list[str], list[str]]:
    if not d["path"]:
        return [], []
    return file_problems(d["path"], d["forget_split"], need_oracle_train=cfg["model"]["oracle"] is None)


# -- raw-text benchmarks --------------------------------------------------------------------------
MUSE_METRICS = Metrics(
    suite="muse",
    forget=("forget_knowmem_ROUGE",), utility="retain_knowmem_ROUGE",
    main=("forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "privleak"),
    pivot=("forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "privleak"),
    note_metric="forget_knowmem_ROUGE",
    note="Metrics follow MUSE (Shi et al. 2024) as open-unlearning computes them; "
         "see `robust_unlearn/metrics/muse.py` for the exact definitions.",
    reference_note="privleak compares every cell with the retain oracle's uncompressed Min-K% AUC.",
    reference_metrics=("privleak",),
    ledger_splits=(("privleak", "forget"), ("mia_min_k", "forget")),  # MUSE's attack on the forget set
)
MUSE_SPLITS = ("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak")

# WMDP question sets (wmdp_bio, ...) and MMLU; a metric is <split>_acc
WMDP_SPLITS = tuple(wmdp.split_name(s) for s in wmdp.SUBSETS) + ("mmlu",)
_WMDP_ACC = tuple(f"{s}_acc" for s in WMDP_SPLITS)
WMDP_METRICS = Metrics(
    suite="wmdp",
    forget=tuple(f"{wmdp.split_name(s)}_acc" for s in wmdp.DEFAULT_SUBSETS), utility="mmlu_acc",
    main=_WMDP_ACC, pivot=_WMDP_ACC,
    note_metric="mmlu_acc",
    note="WMDP (Li et al. 2024) and MMLU zero-shot accuracy as lm-evaluation-harness computes it; "
         "see `robust_unlearn/metrics/wmdp.py` for the exact definitions.",
    reference_note="WMDP has no retain oracle: accuracies are absolute (chance is 0.25).",
    reference_metrics=_WMDP_ACC,
    # the question sets measure hazardous knowledge (forget); MMLU is utility
    ledger_splits=tuple((m, "utility" if m == "mmlu_acc" else "forget") for m in _WMDP_ACC),
)


def _load_text(loader: Callable[[dict], dict]) -> Callable[[dict, dict], dict]:
    return lambda d, cfg: loader(d)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("fictitious", "built-in fictitious", load=lambda d, cfg: load_fictitious(d), metrics=TOFU_METRICS,
              eval_splits=QA_SPLITS, reads_path=False, train_utility=True, check=_check_fictitious),
    Benchmark("tofu", "TOFU", load=_load_tofu, metrics=TOFU_METRICS, eval_splits=QA_SPLITS,
              requires_path=True, check=_check_tofu),
    Benchmark("muse_news", "MUSE-News", load=_load_text(muse.load_muse), metrics=MUSE_METRICS,
              eval_splits=MUSE_SPLITS, text_mode="chunk", uncut=muse.ICL_SPLITS,  # in-context examples
              default_forget_corpus=muse.DEFAULT_FORGET, validate=muse.validate),
    Benchmark("wmdp", "WMDP", load=_load_text(wmdp.load_wmdp), metrics=WMDP_METRICS, eval_splits=WMDP_SPLITS,
              text_mode="document", default_forget_corpus=wmdp.DEFAULT_FORGET, validate=wmdp.validate),
)}

# the distinct metric suites, in registry order (the report's tables and notes)
METRIC_SETS: tuple[Metrics, ...] = tuple(dict.fromkeys(b.metrics for b in BENCHMARKS.values()))


def unknown(name) -> str:
    return f"data.name '{name}' is unknown (expected one of {', '.join(BENCHMARKS)})"


def benchmark_of(cfg: dict) -> Benchmark:
    """The recipe's benchmark (``UserError`` for an unknown ``data.name``)."""
    b = BENCHMARKS.get(cfg["data"]["name"])
    if b is None:
        raise UserError(unknown(cfg["data"]["name"]))
    return b
