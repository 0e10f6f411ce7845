"""MUSE-News: the loader on a fixture in the hub's layout, raw-text training items, the metrics by hand
on the fixed-logit model, and a tiny end-to-end run (fine-tune, unlearn, sweep, report)."""
import json
import math

import numpy as np
import pytest
from bench_fixtures import split_file, write_muse, write_parquet
from conftest import REPO, run_cli

from robust_unlearn.config import load_recipe
from robust_unlearn.data import load_benchmark
from robust_unlearn.data.collate import IGNORE, TextDataset, chunk_corpus, collate_text
from robust_unlearn.errors import UserError
from robust_unlearn.metrics import mia, muse


@pytest.fixture(scope="module")
def muse_dir(tmp_path_factory):
    return write_muse(tmp_path_factory.mktemp("muse") / "MUSE-News")


def recipe(path, *over):
    return load_recipe(None, ["data.name=muse_news", f"data.path={path}", *over])


def test_loader_reads_the_hub_layout(muse_dir):
    b = load_benchmark(recipe(muse_dir))
    assert len(b["forget"]) == 6 and len(b["retain"]) == 6
    assert list(b["train_target"]["text"]) == list(b["forget"]["text"]) + list(b["retain"]["text"])
    assert list(b["train_oracle"]["text"]) == list(b["retain"]["text"])
    assert b["verbmem_forget"].column_names == ["prompt", "gt"] and len(b["knowmem_forget"]) == 4
    assert len(b["knowmem_forget_icl"]) == 2 and len(b["privleak_holdout"]) == 4
    cut = load_benchmark(recipe(muse_dir, "data.limit=1", "data.retain_corpus=retain2"))
    assert len(cut["knowmem_retain"]) == 1 and len(cut["knowmem_retain_icl"]) == 2  # examples are never cut
    assert list(cut["train_target"]["text"]) == [cut["forget"][0]["text"], cut["retain"][0]["text"]]


def test_loader_errors_name_the_file(muse_dir, tmp_path):
    with pytest.raises(UserError, match="no file for 'raw/retain9'"):
        load_benchmark(recipe(muse_dir, "data.retain_corpus=retain9"))
    with pytest.raises(UserError, match="not found"):
        load_benchmark(recipe(tmp_path / "nope"))
    bad = tmp_path / "bad"
    write_parquet(split_file(bad, "raw", "forget"), [{"body": "x"}])
    with pytest.raises(UserError, match="missing field 'text'"):
        load_benchmark(recipe(bad))
    with pytest.raises(UserError, match="one split of MUSE's raw config"):
        recipe(muse_dir, "data.forget_corpus=forget,retain1")


def test_chunking_as_muse(fixed_model):
    _, tok = fixed_model
    texts = ["a b c", "d e"]  # 5 tokens as one stream (no BOS in the stream)
    chunks = chunk_corpus(texts, tok, 3)
    bos = tok.bos_token_id
    ids = tok("a b c d e", add_special_tokens=False)["input_ids"]
    # pieces of max_length - 1 tokens, each led by BOS; the short last one filled from the start
    assert chunks == [[bos, ids[0], ids[1]], [bos, ids[2], ids[3]], [bos, ids[4], ids[0]]]
    batch = collate_text([[1, 5, 6], [1, 7]], pad_id=0)
    assert batch["labels"].tolist() == [[1, 5, 6], [1, 7, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    ds = TextDataset([{"text": "a b c"}, {"text": "d e"}], tok, 3, "document")
    assert ds.lengths() == [3, 2]


def test_min_k_auc_and_privleak_formulas():
    lp = np.log([0.5, 0.1, 0.9, 0.2, 0.8])
    assert mia.min_k_score(lp) == pytest.approx(-(math.log(0.1) + math.log(0.2)) / 2)  # int(0.4 * 5) = 2
    assert mia.min_k_score(np.log([0.3])) == pytest.approx(-math.log(0.3))  # at least one token
    assert mia.auc([1.0, 2.0], [3.0, 4.0]) == 1.0 and mia.auc([3.0, 4.0], [1.0, 2.0]) == 0.0
    assert mia.auc([1.0, 2.0], [2.0, 0.5]) == pytest.approx((0.5 + 0 + 1 + 0) / 4)  # one tie counts half
    # a target that still memorises: AUC 1 -> privleak -100 against a retain oracle at AUC 0.5
    assert mia.privleak(1.0, 0.5) == pytest.approx(-100.0)
    assert mia.privleak(0.5, 0.5) == 0.0 and mia.privleak(0.2, 0.4) == pytest.approx((0.8 - 0.6) / 0.6 * 100)
    assert mia.privleak(1.0, 1.0) == 0.0  # an oracle at AUC 1 stays its own reference
    assert muse.cut_at_stop("a b\n\nQuestion: x") == "a b" and muse.cut_at_stop(" c ") == "c"
    assert muse.knowmem_prompt([{"question": "q", "answer": "a"}], "r") == \
        "Question: q\n\nAnswer: a\n\n\nQuestion: r\n\nAnswer: "


def test_metrics_by_hand(fixed_model):
    """On the bigram model greedy decoding from "Answer:" gives "a b" (0.5, 0.6, then </s> at 0.7)."""
    import datasets

    model, tok = fixed_model
    ev = muse.MuseEvaluator(tok, max_length=64, batch_size=2)
    lp = ev.token_logprobs(model, ["Answer: a b", "Answer: c d"])
    np.testing.assert_allclose(lp[0], np.log([0.5, 0.6]), atol=1e-5)
    np.testing.assert_allclose(lp[1], np.log([0.125, 0.4]), atol=1e-5)
    bench = datasets.DatasetDict({
        "verbmem_forget": datasets.Dataset.from_list([{"prompt": "Answer:", "gt": "a b c"}]),
        "knowmem_forget": datasets.Dataset.from_list([{"question": "q1", "answer": "a b"},
                                                      {"question": "q2", "answer": "d"}]),
        "knowmem_forget_icl": datasets.Dataset.from_list([{"question": "q2", "answer": "c"}]),
        "privleak_forget": datasets.Dataset.from_list([{"text": "Answer: a b"}, {"text": "Answer: c d"}]),
        "privleak_holdout": datasets.Dataset.from_list([{"text": "Answer: b c"}, {"text": "q1 e"}]),
    })
    metrics, per = ev.evaluate(model, bench, reference=0.25)
    assert metrics["forget_verbmem_ROUGE"] == pytest.approx(0.8)  # "a b" vs "a b c": P 1, R 2/3
    assert per["knowmem_forget"].generations == ["a b", "a b"]
    assert metrics["forget_knowmem_ROUGE"] == pytest.approx((1.0 + 0.0) / 2)
    assert "retain_knowmem_ROUGE" not in metrics  # no retain QA in this bench
    # Min-K (k = 0.4 of 2 tokens -> the lowest one): forget a b -> 0.5, c d -> 0.125; holdout b c -> 0.1,
    # "q1 e" -> 1/12 (q1 has no bigram row: uniform)
    np.testing.assert_allclose(per["privleak"].forget_scores, [-math.log(0.5), -math.log(0.125)], atol=1e-5)
    np.testing.assert_allclose(per["privleak"].holdout_scores, [-math.log(0.1), math.log(12)], atol=1e-5)
    assert metrics["mia_min_k"] == 1.0  # every holdout text scores above every forget text
    assert metrics["privleak"] == pytest.approx(((1 - 1.0) - (1 - 0.25)) / (1 - 0.25) * 100)  # -100
    self_metrics, _ = ev.evaluate(model, bench, reference="self", splits=("privleak",))
    assert self_metrics == {"mia_min_k": metrics["mia_min_k"], "privleak": 0.0}


def cli(*args, cache):
    return run_cli(*args, cache=cache, cwd=REPO)


TINY = ["model.base=tiny", "model.prompt=qa", "model.max_length=96", "finetune.epochs=2", "finetune.precision=fp32",
        "finetune.batch_size=4", "unlearn.precision=fp32", "unlearn.steps=2", "unlearn.batch_size=2",
        "unlearn.stop_forget_prob=null", "unlearn.rmu_layer=1", "unlearn.per_method.RMU.steps=2",
        r"unlearn.per_method.RMU.rmu_params=model\.layers\.1\.mlp\.down_proj\.weight",
        "unlearn.per_method.SURE_GradDiff.steps=2", "unlearn.per_method.Robust_GradDiff.steps=2",
        "unlearn.per_method.Robust_GradDiff.robust_floor_every=0", "eval.batch_size=8"]


def test_tiny_end_to_end_unlearn_sweep_report(muse_dir, tmp_path, cache_dir):
    out = tmp_path / "run"
    res = cli("-v", "run", "data.name=muse_news", f"data.path={muse_dir}", *TINY,
              "unlearn.methods=[GradDiff,RMU,Robust_GradDiff]", "sweep.compressions=[none,nf4,prune20]",
              "sweep.oracle=true", "--out", out, cache=cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    cells = {}
    for r in rows:
        cells.setdefault((r["model"], r["compression"]), {})[r["metric"]] = r["value"]
    models = {"target", "oracle", "GradDiff", "RMU", "Robust_GradDiff"}
    assert set(cells) == {(m, c) for m in models for c in ("none", "nf4", "prune20")}
    for (m, c), got in cells.items():
        assert set(got) == set(muse.METRICS), (m, c, got)
        assert all(0.0 <= got[k] <= 1.0 for k in ("forget_verbmem_ROUGE", "forget_knowmem_ROUGE",
                                                    "retain_knowmem_ROUGE", "mia_min_k"))
    assert cells[("oracle", "none")]["privleak"] == 0.0  # the oracle is its own reference
    auc_ref = cells[("oracle", "none")]["mia_min_k"]
    for key, got in cells.items():  # every cell against the uncompressed oracle
        assert got["privleak"] == pytest.approx(mia.privleak(got["mia_min_k"], auc_ref))
    splits = {r["metric"]: r["split"] for r in rows}
    assert splits["privleak"] == "forget" and splits["retain_knowmem_ROUGE"] == "retain"
    report = (out / "report.md").read_text()
    assert "forget_knowmem_ROUGE" in report and "### privleak" in report and "MUSE (Shi et al. 2024)" in report
    assert (out / "forget_heatmap.png").is_file() and (out / "utility_vs_forget.png").is_file()
    meta = json.loads(next((out / "checkpoints").glob("Robust_GradDiff-*/robust_unlearn.json")).read_text())
    assert meta["steps"] == 2 and meta["plan"]["salient_modules"] >= 1

    res = cli("-v", "run", "data.name=muse_news", f"data.path={muse_dir}", *TINY,
              "unlearn.methods=[GradDiff,RMU,Robust_GradDiff]", "sweep.compressions=[none,nf4,prune20]",
              "sweep.oracle=true", "--out", out, cache=cache_dir)
    assert res.returncode == 0 and "evaluated in" not in res.stderr and "reusing" in res.stderr


def test_recipe_is_muse_setting():
    from robust_unlearn.config import method_settings

    cfg = load_recipe(REPO / "recipes" / "muse" / "llama2-7b_news.yaml")
    assert cfg["data"]["name"] == "muse_news" and cfg["model"]["target"] == "muse-bench/MUSE-News_target"
    assert cfg["model"]["oracle"] == "muse-bench/MUSE-News_retrain" and cfg["model"]["max_length"] == 2048
    g = method_settings(cfg, "GradDiff")
    assert (g["lr"], g["epochs"], g["batch_size"], g["schedule"], g["stop_forget_prob"]) == (1e-5, 10.0, 32, "constant", None)
    assert cfg["unlearn"]["methods"] == ["GradDiff", "SimNPO", "RMU", "SURE_GradDiff", "Robust_GradDiff"]
    s = method_settings(cfg, "SimNPO")  # Fan et al.'s MUSE-News setting, not their TOFU one (issue 14)
    assert (s["simnpo_beta"], s["gamma"], s["alpha"], s["simnpo_delta"]) == (0.7, 1.0, 0.1, 0.1)
    assert cfg["sweep"]["compressions"] == ["none", "int8", "nf4", "fp4", "rtn4-g128", "prune10", "prune20", "prune30"]


def test_forget_gibberish_on_the_verbatim_continuations(fixed_model, gibberish_dir):
    """open-unlearning's MUSE forget_gibberish: the classifier's mean P(class 0) over the verbmem
    continuations, each cut at 512 classifier tokens; off without eval.gibberish_classifier."""
    import datasets

    from robust_unlearn.metrics.classifier import classifier_prob
    from robust_unlearn.models import load_classifier

    model, tok = fixed_model
    ev = muse.MuseEvaluator(tok, max_length=64, batch_size=2)
    bench = datasets.DatasetDict({"verbmem_forget": datasets.Dataset.from_list(
        [{"prompt": "Answer:", "gt": "a b c"}, {"prompt": "Answer: a", "gt": "d"}])})
    metrics, _ = ev.evaluate(model, bench, splits=("verbmem_forget",))
    assert "forget_gibberish" not in metrics
    clf, ctok = ev.gibberish = load_classifier(str(gibberish_dir), "eval.gibberish_classifier")
    metrics, per = ev.evaluate(model, bench, splits=("verbmem_forget",))
    gens = per["verbmem_forget"].generations
    assert all(gens), gens  # (an empty text has no token for this tokenizer to classify)
    want = [classifier_prob([g], clf, ctok, batch_size=1, max_length=512)[0] for g in gens]
    np.testing.assert_allclose(per["verbmem_forget"].gibberish, want, atol=1e-5)
    assert metrics["forget_gibberish"] == pytest.approx(np.mean(want), abs=1e-6)
