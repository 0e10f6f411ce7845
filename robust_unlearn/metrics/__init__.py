"""Evaluation metrics, one module per benchmark: ``tofu`` (TOFU and the built-in fictitious
benchmark; Maini et al. 2024, as open-unlearning computes it), ``muse`` (MUSE-News; Shi et al. 2024),
``wmdp`` (WMDP and MMLU accuracy; Li et al. 2024, as lm-evaluation-harness). ``weights``: the weight
audit.

:func:`suite_for` is the one place a recipe's benchmark picks its metric set. A suite tells the sweep
``reference_metric`` (the metric compared with the retain oracle's uncompressed evaluation:
forget_quality, privleak; None for WMDP), ``load_reference(stats_path)`` (that comparison's input,
read from a cell's saved per-example stats), ``splits(compression)`` (what is evaluated in a column)
and ``evaluator(tokenizer)`` (an object with ``evaluate(model, bench, reference, splits) -> (metrics,
per-split stats)``).
"""
from __future__ import annotations


def suite_for(cfg: dict):
    name = cfg["data"]["name"]
    if name == "muse_news":
        from .muse import MuseSuite

        return MuseSuite(cfg)
    if name == "wmdp":
        from .wmdp import WmdpSuite

        return WmdpSuite(cfg)
    from .tofu import TofuSuite

    return TofuSuite(cfg)


def split_of(metric: str) -> str:
    """The ledger's ``split`` of a metric name: the data split it measures (utility, forget, retain, ...)."""
    if metric in ("model_utility", "mmlu_acc"):
        return "utility"
    if metric in ("privleak", "mia_min_k") or metric.startswith("wmdp_"):
        return "forget"  # MUSE's attack on the forget set; WMDP's hazardous knowledge
    return metric.split("_", 1)[0]
