"""Evaluation metrics, one module per benchmark: ``tofu`` (TOFU and the built-in fictitious
benchmark; Maini et al. 2024, as open-unlearning computes it), ``muse`` (MUSE-News; Shi et al. 2024),
``wmdp`` (WMDP and MMLU accuracy; Li et al. 2024, as lm-evaluation-harness). ``weights``: the weight
audit.

:func:`suite_for` resolves the suite key of a recipe's benchmark (declared in ``data.benchmarks``:
``Metrics.suite``) within this package. A suite tells the sweep ``reference_metric`` (the metric compared with the retain oracle's uncompressed evaluation:
forget_quality, privleak; None for WMDP), ``load_reference(stats_path)`` (that comparison's input,
read from a cell's saved per-example stats), ``splits(compression)`` (what is evaluated in a column)
and ``evaluator(tokenizer)`` (an object with ``evaluate(model, bench, reference, splits) -> (metrics,
per-split stats)``).
"""
from __future__ import annotations

from ..data.benchmarks import BENCHMARKS, benchmark_of


def _tofu(cfg: dict):
    from .tofu import TofuSuite

    return TofuSuite(cfg)


def _muse(cfg: dict):
    from .muse import MuseSuite

    return MuseSuite(cfg)


def _wmdp(cfg: dict):
    from .wmdp import WmdpSuite

    return WmdpSuite(cfg)


# a benchmark's Metrics.suite (data.benchmarks) -> its suite (late imports: the suites import torch)
SUITES = {"tofu": _tofu, "muse": _muse, "wmdp": _wmdp}

# metric -> ledger split, where it is not the metric name's first part (every benchmark's declaration)
LEDGER_SPLITS = {m: split for b in BENCHMARKS.values() for m, split in b.metrics.ledger_splits}


def suite_for(cfg: dict):
    return SUITES[benchmark_of(cfg).suite](cfg)


def split_of(metric: str) -> str:
    """The ledger's ``split`` of a metric name: the data split it measures (utility, forget, retain, ...)."""
    return LEDGER_SPLITS.get(metric) or metric.split("_", 1)[0]
