"""The benchmark registry (data.benchmarks, issue 11): one declaration per benchmark that every other
module reads."""
from __future__ import annotations

import pytest

from robust_unlearn import report
from robust_unlearn.data import BENCHMARKS, benchmark_of
from robust_unlearn.data.benchmarks import METRIC_SETS, QA_SPLITS
from robust_unlearn.errors import UserError
from robust_unlearn.metrics import SUITES, split_of


def test_every_benchmark_is_complete():
    assert list(BENCHMARKS) == ["fictitious", "tofu", "muse_news", "wmdp"]  # the recipe schema's data.name values
    for name, b in BENCHMARKS.items():
        assert b.name == name and b.suite in SUITES and b.eval_splits
        assert b.metrics.forget_metric in b.metrics.main and b.metrics.utility in b.metrics.main
        assert set(b.metrics.pivot) <= set(b.metrics.main)
        assert b.is_text == (name in ("muse_news", "wmdp"))
    assert BENCHMARKS["tofu"].eval_splits == QA_SPLITS == BENCHMARKS["fictitious"].eval_splits


def test_report_and_ledger_read_the_declarations():
    for ms in METRIC_SETS:
        assert set(ms.main) <= set(report.MAIN) and set(ms.pivot) <= set(report.PIVOT)
        assert (ms.forget_metric, ms.forget_metric, ms.utility) in report.PLOTS
        assert report.NOTES[ms.note_metric] == ms.note
    assert [split_of(m) for m in ("model_utility", "mmlu_acc", "privleak", "mia_min_k", "wmdp_chem_acc",
                                  "forget_Q_A_Prob", "ra_Truth_Ratio", "retain_knowmem_ROUGE")] == \
        ["utility", "utility", "forget", "forget", "forget", "forget", "ra", "retain"]


def test_forget_name_and_unknown_benchmark():
    d = {"forget_split": "forget10", "forget_corpus": None}
    assert BENCHMARKS["tofu"].forget_name(d) == "forget10"
    assert BENCHMARKS["muse_news"].forget_name(d) == "forget"
    assert BENCHMARKS["wmdp"].forget_name(d) == "cyber-forget-corpus"
    assert BENCHMARKS["wmdp"].forget_name(dict(d, forget_corpus=["a", "b"])) == "a,b"
    with pytest.raises(UserError, match="data.name 'nope' is unknown"):
        benchmark_of({"data": {"name": "nope"}})
