"""The command line, in this process (conftest.run_cli): end-to-end runs on the session's tiny model, and
bad inputs as one-line errors (exit 2)."""
import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, TOFU_SAMPLE, run_cli

TINY = ["model.base=tiny", "model.prompt=qa", "finetune.epochs=1", "finetune.precision=fp32",
        "eval.max_new_tokens=8", "unlearn.methods=[]", "sweep.compressions=[none]"]
# the whole default flow on the tiny model: unlearn with two methods, then a 3-column sweep
FLOW = ["unlearn.methods=[GradDiff,RMU]", "unlearn.steps=2", "unlearn.per_method.RMU.steps=2", "unlearn.rmu_layer=1",
        "unlearn.precision=fp32", r"unlearn.per_method.RMU.rmu_params=model\.layers\.1\.mlp\.down_proj\.weight",
        "sweep.compressions=[none,nf4,prune20]",
        "sweep.oracle=true"]


def cli(*args, cache, cwd=None):
    return run_cli(*args, cache=cache, cwd=cwd or REPO)


def rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def test_help_on_every_subcommand(cache_dir):
    for sub in ([], ["run"], ["evaluate"], ["report"]):
        res = cli(*sub, "--help", cache=cache_dir)
        assert res.returncode == 0 and "usage: robust-unlearn" in res.stdout


def test_in_process_cli_leaves_no_state_behind(tmp_path):
    """``main`` points the robust_unlearn logger at the stderr of the moment (and stops propagation),
    filters warnings and sets environment variables: run_cli puts all of it back, so a later test's
    caplog still sees the library's warnings."""
    import logging
    import os
    import warnings

    logger = logging.getLogger("robust_unlearn")
    before = (logger.handlers[:], logger.level, logger.propagate, warnings.filters[:], dict(os.environ), os.getcwd())
    res = run_cli("-v", "report", "nothere", cache=tmp_path, cwd=tmp_path)
    assert res.returncode == 2 and "run directory 'nothere' not found" in res.stderr
    assert (logger.handlers[:], logger.level, logger.propagate, warnings.filters[:], dict(os.environ),
            os.getcwd()) == before


def test_python_dash_m_entry_point(monkeypatch, capsys):
    """``python -m robust_unlearn`` (robust_unlearn/__main__.py, what ``accelerate launch -m`` runs)."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["robust_unlearn", "report", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("robust_unlearn", run_name="__main__")
    assert exc.value.code == 0 and "usage: robust-unlearn report" in capsys.readouterr().out


def test_run_tiny_end_to_end_then_reuse_cache(tmp_path, tiny_models):
    """`run` on the session's tiny target and oracle: fine-tuned by the same cached code path `run` calls,
    so here both come from the cache."""
    out = tmp_path / "run"
    args = ["-v", "run", *tiny_models.overrides, "eval.max_new_tokens=8", *FLOW, "--out", out]
    res = cli(*args, cache=tiny_models.cache)
    assert res.returncode == 0, res.stderr[-2000:]
    got = rows(out)
    assert {r["model"] for r in got} == {"target", "oracle", "GradDiff", "RMU"}
    cells = {(r["model"], r["compression"]) for r in got}
    assert cells == {(m, c) for m in ("target", "oracle", "GradDiff", "RMU") for c in ("none", "nf4", "prune20")}
    assert {r["precision"] for r in got if r["model"] == "GradDiff"} == {"fp32"}
    assert (out / "forget_heatmap.png").is_file() and (out / "utility_vs_forget.png").is_file()
    assert all({"model", "method", "compression", "split", "metric", "value"} <= set(r) for r in got)
    metrics = {(r["model"], r["metric"]): r["value"] for r in got if r["compression"] == "none"}
    for name in ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio", "forget_quality", "model_utility"):
        assert ("target", name) in metrics
    assert metrics[("oracle", "forget_quality")] == pytest.approx(1.0)
    assert (out / "report.md").read_text().count("| target |") >= 1
    info = json.loads((out / "run.json").read_text())
    assert info["models"]["target"] == tiny_models.target and info["models"]["oracle"] == tiny_models.oracle
    assert info["command"].startswith("robust-unlearn -v run model.base=tiny")
    # second run: models come from the cache, cells from the ledger
    res2 = cli(*args, cache=tiny_models.cache)
    assert res2.returncode == 0
    assert "reusing cached checkpoint" in res2.stderr and "fine-tune" not in res2.stderr.replace("reusing", "")
    assert "evaluated in" not in res2.stderr
    assert len(rows(out)) == len(got)  # nothing duplicated


def test_run_on_real_tofu_sample_subset(tmp_path, cache_dir):
    out = tmp_path / "tofu"
    res = cli("run", "recipes/default.yaml", "data.name=tofu", f"data.path={TOFU_SAMPLE}", "data.forget_split=forget10",
              "data.limit=12", *TINY, "--out", out, cache=cache_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    got = {(r["model"], r["metric"]) for r in rows(out)}
    assert ("target", "forget_Q_A_Prob") in got and ("target", "ra_Q_A_Prob_normalised") in got
    # no perturbed forget/retain files in the sample: skipped with a warning naming the file
    assert "forget10_perturbed.json" in res.stderr and ("target", "forget_quality") not in got


def test_evaluate_a_checkpoint(tmp_path, tiny_models):
    t = tiny_models
    res = cli("evaluate", t.target, *TINY, "data.num_authors=4", "data.qa_per_author=4", "data.forget_split=forget25",
              "data.train_utility=false", "--oracle", t.oracle, "--label", "tgt", "--out", tmp_path / "ev",
              cache=t.cache)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "forget_quality" in res.stdout and "model_utility" in res.stdout
    assert {r["model"] for r in rows(tmp_path / "ev")} == {"tgt", "oracle"}  # the oracle: evaluated for forget_quality
    # the whole catalogue by default (issue 14), against the oracle
    from robust_unlearn.metrics.mia import METRICS

    got = {r["model"]: {} for r in rows(tmp_path / "ev")}
    for r in rows(tmp_path / "ev"):
        got[r["model"]][r["metric"]] = r["value"]
    assert set(METRICS) <= set(got["tgt"]) and set(METRICS) <= set(got["oracle"])
    assert got["oracle"]["privleak"] == pytest.approx(0.0) and got["oracle"]["mia_reference"] == 0.5
    assert all(r["split"] == "forget" for r in rows(tmp_path / "ev") if r["metric"] in METRICS)


@pytest.mark.parametrize("case", ["unknown_key", "missing_dir", "missing_field", "bad_split", "no_weights",
                                  "bad_recipe_file", "bad_type", "unknown_method", "unknown_compression",
                                  "nan_loss"])
def test_bad_input_is_one_line_exit_2(case, tmp_path, cache_dir, request):
    args = {
        "unknown_key": ["run", "data.nmae=tofu"],
        "missing_dir": ["run", "data.name=tofu", f"data.path={tmp_path / 'missing'}"],
        "missing_field": ["run", "data.name=tofu", f"data.path={tmp_path}", "data.forget_split=forget10"],
        "bad_split": ["run", "data.name=tofu", f"data.path={TOFU_SAMPLE}", "data.forget_split=forget05"],
        "no_weights": ["evaluate", tmp_path / "empty_model", *TINY],
        "bad_recipe_file": ["run", tmp_path / "nope.yaml"],
        "bad_type": ["run", "finetune.lr=fast"],
        "unknown_method": ["unlearn", *TINY, "--methods", "GradDiff,GradAscentX"],
        "unknown_compression": ["run", "sweep.compressions=[none,nf3]"],
        "nan_loss": ["unlearn", "unlearn.lr=1e4", "unlearn.grad_clip=0", "unlearn.steps=60", "--methods", "GA",
                     "--out", tmp_path / "nan"],
    }[case]
    if case == "nan_loss":  # the session's tiny target (cached): only the diverging unlearning runs
        args[1:1] = request.getfixturevalue("tiny_models").overrides
    if case == "missing_field":
        (tmp_path / "forget10.json").write_text('{"question": "Who?", "answer": "Me."}\n{"answer": "x"}\n')
        (tmp_path / "retain90.json").write_text('{"question": "Who?", "answer": "Me."}\n')
    if case == "no_weights":
        (tmp_path / "empty_model").mkdir()
        (tmp_path / "empty_model" / "config.json").write_text("{}")
    res = cli(*args, cache=cache_dir)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    if case == "nan_loss":  # training had started: its progress bars come first, then the one error line
        lines = [line for line in lines if line.startswith("robust-unlearn:")]
    assert len(lines) == 1 and lines[0].startswith("robust-unlearn: error:"), res.stderr
    assert "Traceback" not in res.stderr
    expect = {"unknown_key": "data.nmae", "missing_dir": "missing", "missing_field": "missing field 'question'",
              "bad_split": "forget05", "no_weights": "no weights", "bad_recipe_file": "nope.yaml",
              "bad_type": "finetune.lr", "unknown_method": "unknown method 'GradAscentX'",
              "unknown_compression": "unknown compression 'nf3'", "nan_loss": "unlearn GA: loss became"}[case]
    assert expect in lines[0]
    if case == "nan_loss":  # nothing from the diverged run reached a checkpoint
        ckpts = tmp_path / "nan" / "checkpoints"
        assert not ckpts.exists() or not [p for p in ckpts.iterdir() if not p.name.startswith(".")]


# ---- bad inputs, tried as a new user would (issue 11): in-process, nothing trained or loaded ----------------
ROW = {"model": "target", "method": "none", "compression": "none", "split": "forget", "metric": "forget_Q_A_Prob",
       "value": 0.5, "ckpt": "c", "eval": "e"}


def main_rc(*args):
    """``robust-unlearn ARGS`` in this process -> (exit code, stdout, stderr lines that are not blank)."""
    res = run_cli(*args)
    return res.returncode, res.stdout, [line for line in res.stderr.splitlines() if line.strip()]


def one_error_line(*args) -> str:
    rc, _, err = main_rc(*args)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("robust-unlearn") and ": error: " in err[0], err
    return err[0]


@pytest.fixture
def play(tmp_path, monkeypatch):
    """A scratch folder with the things a new user points at by mistake."""
    monkeypatch.setenv("ROBUST_UNLEARN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep me\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comment.yaml").write_text("# nothing yet\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    (tmp_path / "runout").mkdir()
    (tmp_path / "runout" / "checkpoints").write_text("")
    return tmp_path


BAD_INPUTS = {  # args -> what the one error line must say
    # an output directory that cannot be one: before any work
    "run_out_file": (["run", "model.base=tiny", "--out", "afile"], "--out 'afile' is a file, not a directory"),
    "run_out_under_file": (["run", "model.base=tiny", "--out", "afile/x"], "'afile' is a file, not a directory"),
    "run_out_empty": (["run", "model.base=tiny", "--out", ""], "--out is empty"),
    "evaluate_out_file": (["evaluate", "adir", "model.base=tiny", "--out", "afile"], "--out 'afile' is a file"),
    "unlearn_out_file": (["unlearn", "model.base=tiny", "--out", "afile"], "--out 'afile' is a file"),
    "unlearn_ckpts_file": (["unlearn", "model.base=tiny", "--out", "runout"], "checkpoints is a file"),
    "sweep_out_file": (["sweep", "adir", "--out", "afile"], "--out 'afile' is a file"),
    "audit_json_dir": (["audit", "adir", "adir", "--json", "adir"], "--json 'adir' is a directory"),
    "audit_json_under_file": (["audit", "adir", "adir", "--json", "afile/a.json"], "'afile' is a file"),
    # recipes and overrides
    "recipe_missing": (["run", "nope.yaml"], "recipe file 'nope.yaml' not found"),
    "recipe_is_dir": (["run", "adir"], "recipe file 'adir' is a directory"),
    "recipe_empty": (["run", "empty.yaml"], "recipe file 'empty.yaml' is empty"),
    "recipe_only_comment": (["run", "comment.yaml"], "recipe file 'comment.yaml' is empty"),
    "recipe_list": (["run", "list.yaml"], "must hold a mapping of keys, got list"),
    "recipe_malformed": (["run", "bad.yaml"], "recipe file 'bad.yaml' is not valid YAML"),
    "override_bare_word": (["run", "foo"], "an override looks like dotted.key=value"),
    "override_no_key": (["run", "=1"], "override '=1' has no key"),
    "override_empty_part": (["run", "data..name=tofu"], "override 'data..name=tofu' has an empty key part"),
    "override_bad_number": (["run", "unlearn.lr=abc"], "recipe key 'unlearn.lr' must be a number"),
    "evaluate_recipe_dir": (["evaluate", "adir", "--recipe", "adir"], "recipe file 'adir' is a directory"),
    # flags and names
    "unknown_flag": (["run", "--bogus"], "unrecognized arguments: --bogus"),
    "report_extra_arg": (["report", "adir", "b"], "unrecognized arguments: b"),
    "audit_one_arg": (["audit", "adir"], "the following arguments are required: CKPT"),
    "methods_empty": (["unlearn", "model.base=tiny", "--methods", ""], "--methods is empty"),
    "methods_commas": (["unlearn", "model.base=tiny", "--methods", " , "], "--methods is empty"),
    "methods_unknown": (["unlearn", "model.base=tiny", "--methods", "GA,,Bogus"], "unknown method 'Bogus'"),
    "compressions_unknown": (["sweep", "adir", "--out", "o", "--compressions", "nf3"], "unknown compression 'nf3'"),
    "compressions_empty": (["sweep", "adir", "--out", "o", "--compressions", ","], "--compressions is empty"),
    "sweep_label_empty": (["sweep", "adir", "--out", "o", "--label", "a,"], "--label 'a,' has an empty label"),
    # checkpoints
    "sweep_ckpt_missing": (["sweep", "nothere", "--out", "o"], "model directory 'nothere' not found"),
    "sweep_ckpt_file": (["sweep", "afile", "--out", "o"], "model directory 'afile' is a file"),
    "sweep_oracle_missing": (["sweep", "adir", "--out", "o", "--oracle", "nothere"], "'nothere' not found"),
    "evaluate_model_missing": (["evaluate", "nothere", "model.base=tiny"], "model directory 'nothere' not found"),
    "evaluate_model_file": (["evaluate", "afile"], "model directory 'afile' is a file"),
    # a positional after an option joins the others (argparse alone said 'unrecognized arguments')
    "evaluate_override_after_option": (["evaluate", "nothere", "--out", "e", "model.base=tiny"], "'nothere' not found"),
    "evaluate_label_empty": (["evaluate", "adir", "--label", ""], "--label is empty"),
    "unlearn_target_missing": (["unlearn", "model.base=tiny", "--target", "nothere"], "'nothere' not found"),
    "audit_target_missing": (["audit", "nothere", "adir"], "model directory 'nothere' not found"),
    # report
    "report_missing_dir": (["report", "nothere"], "run directory 'nothere' not found"),
    "report_no_ledger": (["report", "adir"], "run directory 'adir' has no results.jsonl"),
    "report_on_file": (["report", "afile"], "'afile' is a file, not a run directory"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_new_user_bad_input_is_one_line_exit_2(case, play):
    args, expect = BAD_INPUTS[case]
    before = sorted(p.relative_to(play) for p in play.rglob("*"))
    assert expect in one_error_line(*args)
    assert (play / "afile").read_text() == "keep me\n"
    assert sorted(p.relative_to(play) for p in play.rglob("*")) == before  # nothing created: no work was done


def test_report_on_a_ledger_whose_only_line_is_torn(play):
    ledger = play / "adir" / "results.jsonl"
    ledger.write_bytes(b'{"model": "tar')
    rc, _, err = main_rc("report", "adir")
    assert rc == 2 and len(err) == 2, err
    assert err[0].startswith("robust-unlearn: warning:") and f"{Path('adir', 'results.jsonl')} line 1: torn" in err[0]
    assert err[1].startswith("robust-unlearn: error: ledger") and "no valid rows (1 torn" in err[1]
    assert ledger.read_bytes() == b'{"model": "tar' and not (play / "adir" / "report.md").exists()


def test_report_on_an_empty_ledger(play):
    (play / "adir" / "results.jsonl").write_text("")
    assert "no valid rows (the file is empty" in one_error_line("report", "adir")


def test_report_skips_bad_lines_with_a_warning_each_and_keeps_the_rest(play):
    ledger = play / "adir" / "results.jsonl"
    data = (json.dumps(ROW) + "\ngarbage\n[1, 2]\n" + json.dumps(dict(ROW, compression="nf4")) + "\n"
            + '{"model": "oracle"}\n' + json.dumps(ROW)[:20])
    ledger.write_text(data)
    (play / "adir" / "run.json").write_text('{"name": ')  # cut short too
    rc, out, err = main_rc("report", "adir")
    assert rc == 0, err
    assert all(line.startswith("robust-unlearn: warning:") for line in err)
    where = [line.split(": ")[2].split(" line ")[-1].split(":")[0] for line in err if " line " in line]
    assert where == ["2", "3", "5", "6"], err  # each bad line, by number, once
    assert "run.json" in err[-1]
    assert "| target | none | none |" in out and "| target | none | nf4 |" in out
    assert ledger.read_text() == data  # a report never changes the ledger


def test_append_after_a_torn_last_line_keeps_every_valid_row(tmp_path):
    from robust_unlearn.ledger import Ledger

    path = tmp_path / "results.jsonl"
    good = json.dumps(ROW, sort_keys=True) + "\nnot json\n" + json.dumps(dict(ROW, compression="nf4")) + "\n"
    path.write_text(good + '{"model": "tar')  # a bad line mid-file, then a torn tail
    led = Ledger(path)
    assert [r["compression"] for r in led.rows()] == ["none", "nf4"] and [n for n, _ in led.problems] == [2, 4]
    assert path.read_text() == good + '{"model": "tar'  # reading changes nothing
    assert led.append([dict(ROW, compression="int8")]) == 1
    assert path.read_text() == good + json.dumps(dict(ROW, compression="int8"), sort_keys=True) + "\n"
    assert [r["compression"] for r in Ledger(path).rows()] == ["none", "nf4", "int8"]  # not glued, none lost


def test_append_after_a_whole_row_without_its_newline(tmp_path):
    from robust_unlearn.ledger import Ledger

    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(ROW))  # complete, only the newline missing: a row, kept
    led = Ledger(path)
    assert led.rows() == [ROW] and not led.problems
    assert led.append([dict(ROW, compression="nf4")]) == 1
    assert [r["compression"] for r in Ledger(path).rows()] == ["none", "nf4"] and path.read_text().endswith("\n")
