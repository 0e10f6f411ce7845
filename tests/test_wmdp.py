"""WMDP: the loaders on fixtures in the hub's layout (questions, corpora, wikitext) and on the local MMLU
CSVs, the multiple-choice scoring against a brute-force computation, and a tiny end-to-end run."""
import json

import numpy as np
import pytest
import torch
from bench_fixtures import split_file, write_parquet, write_wmdp
from conftest import REPO, SHARED, run_cli

from robust_unlearn.config import load_recipe
from robust_unlearn.data import load_benchmark
from robust_unlearn.data.wmdp import load_mmlu, read_mmlu_csvs
from robust_unlearn.errors import UserError
from robust_unlearn.metrics import wmdp

MMLU = SHARED / "mmlu"


@pytest.fixture(scope="module")
def wmdp_dirs(tmp_path_factory):
    return write_wmdp(tmp_path_factory.mktemp("wmdp"))


def recipe(dirs, *over):
    q, c = dirs
    return load_recipe(None, ["data.name=wmdp", f"data.path={q}", f"data.corpus_path={c}", f"data.mmlu_path={MMLU}",
                              *over])


def test_loader_as_rmu_and_lm_eval(wmdp_dirs):
    b = load_benchmark(recipe(wmdp_dirs, "data.limit=3"))
    assert set(b) == {"forget", "retain", "train_target", "wmdp_bio", "wmdp_cyber", "mmlu"}
    assert "train_oracle" not in b  # WMDP has no retain oracle
    full = load_benchmark(recipe(wmdp_dirs))
    # RMU keeps every non-empty document (issue 14); data.doc_min_chars=50 drops the short ones
    assert len(full["forget"]) == 6 and all(full["retain"]["text"])
    short = load_benchmark(recipe(wmdp_dirs, "data.doc_min_chars=50"))
    assert len(short["forget"]) == 5 and all(len(t) > 50 for t in short["retain"]["text"])
    r = full["wmdp_bio"][1]
    assert len(r["choices"]) == 4 and r["answer"] == 1
    other = load_benchmark(recipe(wmdp_dirs, "data.retain_corpus=cyber-retain-corpus", "data.wmdp_subsets=[wmdp-cyber]"))
    assert "wmdp_bio" not in other and len(other["retain"]) == 5


def test_long_documents_are_kept_and_the_bio_corpus_is_gated(wmdp_dirs, tmp_path):
    q, c = wmdp_dirs
    (c / "bio-forget-corpus.jsonl").write_text(json.dumps({"text": "x" * 5000}) + "\n")  # the authors' file
    b = load_benchmark(recipe(wmdp_dirs, "data.forget_corpus=[bio-forget-corpus,cyber-forget-corpus]"))
    assert len(b["forget"]) == 7 and len(b["forget"][0]["text"]) == 5000  # RMU cuts no document
    cut = load_benchmark(recipe(wmdp_dirs, "data.forget_corpus=[bio-forget-corpus]", "data.doc_max_chars=2000"))
    assert len(cut["forget"][0]["text"]) == 2000
    with pytest.raises(UserError, match="gated"):
        load_benchmark(load_recipe(None, ["data.name=wmdp", f"data.path={q}", "data.forget_corpus=bio-forget-corpus"]))
    with pytest.raises(UserError, match="unknown subset 'wmdp-physics'"):
        recipe(wmdp_dirs, "data.wmdp_subsets=[wmdp-physics]")
    with pytest.raises(UserError, match="no file for 'wmdp-bio/test'"):
        load_benchmark(recipe((tmp_path, c)))


def test_mmlu_from_the_csvs_and_from_the_hub_layout(tmp_path):
    rows = read_mmlu_csvs(MMLU)
    assert len({r["subject"] for r in rows}) == 57 and len(rows) > 14000
    first = rows[0]
    assert first["subject"] == "abstract_algebra" and len(first["choices"]) == 4 and first["answer"] in range(4)
    write_parquet(split_file(tmp_path, "all", "test"),
                  [{"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1}])
    assert load_mmlu(str(tmp_path)) == [{"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1,
                                          "subject": "elementary_mathematics"}]


def test_prompt_is_the_harness_format():
    ctx = wmdp.mc_context(" What is X? ", ["p", "q", "r", "s"], wmdp.description("wmdp_bio"))
    assert ctx == ("The following are multiple choice questions (with answers) about biology.\n\n"
                   "What is X?\nA. p\nB. q\nC. r\nD. s\nAnswer:")
    assert wmdp.description("mmlu", "high_school_biology").endswith("about high school biology.\n\n")
    assert "cybersecurity" in wmdp.description("wmdp_cyber")


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaForCausalLM

    from robust_unlearn.models import tiny_config, train_tokenizer

    tok = train_tokenizer(["What is X?\nA. p\nB. q\nC. r\nD. s\nAnswer: A B C D"] * 4 + ["the quick brown fox"], 300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(len(tok))).eval()
    return model, tok


def brute_force(model, ctx: list[int], cont: list[int]) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


@pytest.mark.parametrize("two_token_letters", [False, True])
def test_loglik_is_the_sum_of_continuation_log_probs(tiny, two_token_letters):
    model, tok = tiny
    ev = wmdp.MCEvaluator(tok, max_length=128, batch_size=2)
    contexts = [wmdp.mc_context(q, ["p", "q", "r", "s"]) for q in ("What is X?", "Is it?", "What is the quick fox?")]
    if two_token_letters:  # the general path (shared prompt, cached keys/values) as for multi-token letters
        plain = ev.encode
        ev.encode = lambda c: (plain(c)[0], [cont + [5] for cont in plain(c)[1]])
    got = ev.loglik(model, contexts)
    for i, c in enumerate(contexts):
        ctx, conts = ev.encode(c)
        assert len(conts) == 4 and all(len(x) == (2 if two_token_letters else 1) for x in conts)
        np.testing.assert_allclose(got[i], [brute_force(model, ctx, x) for x in conts], atol=1e-4)
    rows = [{"question": "What is X?", "choices": ["p", "q", "r", "s"], "answer": a} for a in range(4)]
    st = ev.split_stats(model, rows, "wmdp_bio")
    assert st.correct.sum() == 1 and st.pred[0] == st.pred[3]  # same question: one prediction, right once


def cli(*args, cache):
    return run_cli(*args, cache=cache, cwd=REPO)


def test_tiny_end_to_end_unlearn_sweep_report(wmdp_dirs, tmp_path, cache_dir):
    q, c = wmdp_dirs
    out = tmp_path / "run"
    args = ["-v", "run", "data.name=wmdp", f"data.path={q}", f"data.corpus_path={c}", f"data.mmlu_path={MMLU}",
            "data.limit=4", "model.base=tiny", "model.max_length=64", "finetune.epochs=1", "finetune.precision=fp32",
            "unlearn.methods=[RMU,GradDiff,SURE_GradDiff]", "unlearn.steps=2", "unlearn.batch_size=2",
            "unlearn.precision=fp32", "unlearn.per_method.GradDiff.stop_forget_prob=0.0", "unlearn.stop_every=1",
            "unlearn.rmu_layer=1",
            "unlearn.per_method.RMU.steps=2", r"unlearn.per_method.RMU.rmu_params=model\.layers\.1\.mlp\.down_proj\.weight",
            "unlearn.per_method.SURE_GradDiff.steps=2", "sweep.compressions=[none,prune20]", "--out", out]
    res = cli(*args, cache=cache_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "forget_quality" not in res.stderr  # no oracle and nothing to miss
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    cells = {}
    for r in rows:
        cells.setdefault((r["model"], r["compression"]), {})[r["metric"]] = r["value"]
    assert set(cells) == {(m, k) for m in ("target", "RMU", "GradDiff", "SURE_GradDiff") for k in ("none", "prune20")}
    for got in cells.values():
        assert set(got) == {"wmdp_bio_acc", "wmdp_cyber_acc", "mmlu_acc"}
        assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in got.values())  # 4 questions each
    assert {r["split"] for r in rows if r["metric"] == "mmlu_acc"} == {"utility"}
    report = (out / "report.md").read_text()
    assert "wmdp_cyber_acc" in report and "lm-evaluation-harness" in report and "### mmlu_acc" in report
    meta = json.loads(next((out / "checkpoints").glob("GradDiff-*/robust_unlearn.json")).read_text())
    assert len(meta["forget_prob_history"]) == meta["steps"] == 2  # the text probe ran every step


def test_recipe_is_rmu_paper_setting():
    from robust_unlearn.config import load_recipe as load
    from robust_unlearn.config import method_settings

    cfg = load(REPO / "recipes" / "wmdp" / "zephyr-7b.yaml")
    assert cfg["model"]["target"] == "HuggingFaceH4/zephyr-7b-beta" and cfg["model"]["oracle"] is None
    r = method_settings(cfg, "RMU")
    assert (r["rmu_layer"], r["rmu_steering"], r["alpha"], r["lr"], r["steps"], r["batch_size"]) == (7, 6.5, 1200.0, 5e-5, 150, 4)
    assert r["rmu_params"] == r"model\.layers\.(5|6|7)\.mlp\.down_proj\.weight" and r["grad_clip"] == 0.0
    assert cfg["data"]["retain_corpus"] == "wikitext" and cfg["data"]["forget_corpus"] == ["cyber-forget-corpus"]
    # RMU's own data and optimizer handling (issue 14): no character cut, retain text at 512 tokens, AdamW
    # without weight decay, eps 1e-6
    assert cfg["data"]["doc_min_chars"] == 0 and cfg["data"]["doc_max_chars"] is None
    assert cfg["data"]["retain_max_tokens"] == 512 and r["weight_decay"] == 0.0 and r["adam_eps"] == 1e-6
    assert cfg["sweep"]["compressions"] == ["none", "int8", "nf4", "fp4", "rtn4-g128", "prune10", "prune20", "prune30"]
