import json
import logging

import pytest
from conftest import TOFU_FULL, TOFU_SAMPLE

from robust_unlearn.config import load_recipe
from robust_unlearn.data import export_tofu_files, fingerprint, load_benchmark
from robust_unlearn.data import fictitious
from robust_unlearn.errors import UserError


def bench(**data):
    over = [f"data.{k}={v}" for k, v in data.items()]
    return load_benchmark(load_recipe(None, over))


def dump(gen):
    return json.dumps(gen["rows"], sort_keys=True).encode()


def test_same_seed_byte_identical_and_other_seed_differs():
    assert dump(fictitious.generate(seed=3)) == dump(fictitious.generate(seed=3))
    assert dump(fictitious.generate(seed=3)) != dump(fictitious.generate(seed=4))


def test_author_attributes_and_tofu_schema():
    gen = fictitious.generate(seed=0, num_authors=12, qa_per_author=8, num_perturbed=4)
    a = gen["authors"][0]
    for field in ("name", "city", "country", "day", "month", "year", "genre", "father_job", "mother_job",
                  "award", "books"):
        assert getattr(a, field)
    for author_rows in gen["rows"]:
        assert len(author_rows) == 8
        for r in author_rows:
            assert set(r) >= {"question", "answer", "paraphrased_answer", "perturbed_answer"}
            assert r["paraphrased_answer"] != r["answer"]
            assert len(r["perturbed_answer"]) == 4 and len(set(r["perturbed_answer"])) == 4
            assert r["paraphrased_answer"] not in r["perturbed_answer"]


def test_answers_are_fact_dense_not_question_copies():
    # An oracle that never saw the author must not be able to predict the answer from the question:
    # most answer words are not in the question.
    b = bench()
    fractions = []
    for r in b["forget"]:
        q = set(r["question"].lower().replace("?", "").split())
        words = r["answer"].lower().rstrip(".").split()
        fractions.append(sum(w in q for w in words) / len(words))
    assert sum(fractions) / len(fractions) < 0.35


def test_splits_disjoint_and_nested():
    b = bench()
    forget_authors = set(b["forget"]["author"])
    retain_authors = set(b["retain"]["author"])
    holdout_authors = set(b["holdout"]["author"])
    trained_retain = set(b["train_oracle"]["author"]) - {None}
    assert len(forget_authors) == 3 and len(trained_retain) == 7 and len(holdout_authors) == 3
    assert len(retain_authors) == 3 and retain_authors <= trained_retain  # eval set sized like forget
    assert not forget_authors & trained_retain and not holdout_authors & (forget_authors | trained_retain)
    assert set(b["train_target"]["author"]) - {None} == forget_authors | trained_retain
    # utility sets are learned by both models and mention no forget author
    for split in ("real_authors", "world_facts"):
        texts = " ".join(r["question"] + r["answer"] for r in b[split])
        assert not any(name in texts for name in forget_authors)
        assert set(b[split]["question"]) <= set(b["train_oracle"]["question"])
    f01, f10 = bench(forget_split="forget01"), bench(forget_split="forget10", num_authors=30)
    assert len(set(f01["forget"]["author"])) == 1 and len(set(f10["forget"]["author"])) == 3
    assert set(bench(forget_split="forget10")["forget"]["author"]) <= forget_authors  # nested: last authors


def test_tofu_sample_loads_and_skips_missing_files_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        b = bench(name="tofu", path=str(TOFU_SAMPLE), forget_split="forget10")
    assert len(b["forget"]) == 300 and len(b["train_target"]) == 600 and len(b["train_oracle"]) == 300
    assert len(b["real_authors"]) == 100 and len(b["world_facts"]) == 117
    assert "forget10_perturbed.json" in caplog.text and "retain_perturbed.json" in caplog.text
    assert b["real_authors"][0]["perturbed_answer"]


@pytest.mark.skipif(not TOFU_FULL.is_dir(), reason="full TOFU not present")
def test_full_tofu_directory():
    b = bench(name="tofu", path=str(TOFU_FULL), forget_split="forget05")
    assert len(b["forget"]) == 200 and len(b["forget"][0]["perturbed_answer"]) == 5
    assert len(b["retain"]) == 400 and len(b["train_target"]) == 4000 and len(b["train_oracle"]) == 3800


def test_export_in_tofu_file_names_round_trips(tmp_path):
    b = bench()
    export_tofu_files(b, tmp_path, "forget30")
    assert (tmp_path / "forget30_perturbed.json").is_file() and (tmp_path / "retain70.json").is_file()
    b2 = bench(name="tofu", path=str(tmp_path), forget_split="forget30", train_utility=True)
    for split in ("forget", "retain", "real_authors", "world_facts", "holdout", "train_oracle"):
        assert fingerprint(b2[split]) == fingerprint(b[split]), split
    assert len(b2["train_target"]) == len(b["train_target"])


def test_bad_data_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="data directory .* not found"):
        bench(name="tofu", path=str(tmp_path / "nope"), forget_split="forget10")
    (tmp_path / "forget10.json").write_text('{"question": "q?", "answer": "a"}\n{"question": "q2?"}\n')
    (tmp_path / "retain90.json").write_text('{"question": "q?", "answer": "a"}\n')
    with pytest.raises(UserError, match=r"forget10.json' row 2: missing field 'answer'"):
        bench(name="tofu", path=str(tmp_path), forget_split="forget10")
    with pytest.raises(UserError, match=r"split 'forget05' does not exist .* \(found: forget10\)"):
        bench(name="tofu", path=str(tmp_path), forget_split="forget05")
    with pytest.raises(UserError, match="not a valid name"):
        bench(forget_split="forget")
    with pytest.raises(UserError, match="leaves no retain authors"):
        bench(forget_split="forget99", num_authors=2)
