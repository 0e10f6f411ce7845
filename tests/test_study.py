"""Studies (issue 12): one recipe over seeds x forget splits; report.md with every run's values and,
over seeds, means with 95% t-intervals and ranges."""
import json

import numpy as np
import pytest
from scipy import stats

from conftest import run_cli

from robust_unlearn.report import interval, run_checks, study_runs, write_study_report


def _write_run(d, seed, values, margin=0.05):
    """values: model -> {compression: forget prob}, plus model_utility for none."""
    d.mkdir(parents=True)
    rows = []
    for model, cols in values.items():
        for comp, v in cols.items():
            if comp == "utility":
                continue
            rows.append({"model": model, "method": model if model not in ("target", "oracle") else "none",
                         "compression": comp, "metric": "forget_Q_A_Prob", "value": v})
        rows.append({"model": model, "method": model if model not in ("target", "oracle") else "none",
                     "compression": "none", "metric": "model_utility", "value": cols["utility"]})
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "run.json").write_text(json.dumps({"forget_split": d.parent.name, "seed": seed, "holds_margin": margin}))


RUNS = {
    0: {"target": {"none": 0.95, "nf4": 0.93, "utility": 0.90}, "oracle": {"none": 0.10, "utility": 0.92},
        "GradDiff": {"none": 0.08, "nf4": 0.30, "utility": 0.88},
        "Robust_GradDiff": {"none": 0.09, "nf4": 0.12, "utility": 0.85}},
    1: {"target": {"none": 0.97, "nf4": 0.96, "utility": 0.80}, "oracle": {"none": 0.12, "utility": 0.82},
        "GradDiff": {"none": 0.10, "nf4": 0.15, "utility": 0.79},
        "Robust_GradDiff": {"none": 0.11, "nf4": 0.20, "utility": 0.70}},
    2: {"target": {"none": 0.96, "nf4": 0.95, "utility": 0.85}, "oracle": {"none": 0.11, "utility": 0.86},
        "GradDiff": {"none": 0.05, "nf4": 0.40, "utility": 0.80},
        "Robust_GradDiff": {"none": 0.10, "nf4": 0.11, "utility": 0.80}},
}


@pytest.fixture
def study_dir(tmp_path):
    for seed, values in RUNS.items():
        _write_run(tmp_path / "forget10" / f"seed{seed}", seed, values)
    return tmp_path


def test_interval_is_the_t_interval():
    x = [0.09, 0.11, 0.10, 0.14]
    m, lo, hi, mn, mx = interval(x)
    half = stats.t.ppf(0.975, 3) * np.std(x, ddof=1) / np.sqrt(4)
    assert (m, lo, hi, mn, mx) == pytest.approx((np.mean(x), np.mean(x) - half, np.mean(x) + half, 0.09, 0.14))
    assert interval([0.3]) == (0.3, 0.3, 0.3, 0.3, 0.3)


def test_study_runs_and_checks(study_dir):
    es = study_runs(study_dir)
    assert [(e["seed"], e["model"]) for e in es] == [(s, m) for s in (0, 1, 2)
                                                    for m in ("target", "GradDiff", "Robust_GradDiff")]
    rob = {e["seed"]: run_checks(e) for e in es if e["model"] == "Robust_GradDiff"}
    # seed 0: worst 0.12 <= 0.09 + 0.05 and <= oracle 0.10 + 0.05; kept 0.85 / 0.90
    assert rob[0]["holds"] and rob[0]["utility_kept"] == pytest.approx(0.85 / 0.90) and rob[0]["utility_ok"]
    assert not rob[1]["holds"] and not rob[1]["utility_ok"]  # 0.20 > 0.11 + 0.05; 0.70 / 0.80 < 0.9
    gd = {e["seed"]: run_checks(e) for e in es if e["model"] == "GradDiff"}
    assert gd[0]["recovers"] and gd[0]["recovery"] == pytest.approx(0.30 / 0.08) and not gd[1]["recovers"]


def test_study_report_lists_runs_and_intervals(study_dir, capsys):
    text = write_study_report(study_dir).read_text()
    assert "## forget10: 3 seeds (0, 1, 2)" in text
    assert "| Robust_GradDiff | 1 | 0.110 | 0.200 | nf4 0.200 | 0.700 | 0.875 | 0.120 | **no** | 1.818 |" in text
    m, lo, hi, mn, mx = interval([0.09, 0.11, 0.10])
    assert f"| Robust_GradDiff | 3 | {m:.3f} [{lo:.3f}, {hi:.3f}] ({mn:.3f}–{mx:.3f}) |" in text
    assert "| GradDiff | 3 |" in text and "| 2/3 |" in text  # GradDiff comes back >= 2x in seeds 0 and 2
    # `report` on a study directory rebuilds the same file
    (study_dir / "study.json").write_text(json.dumps({"name": "s"}))
    r = run_cli("report", str(study_dir))
    assert r.returncode == 0 and "## forget10: 3 seeds" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["--seeds", "0,x"], "--seeds: 'x' is not a whole number"),
    (["--seeds", "1,1"], "--seeds '1,1' names a seed twice"),
    (["--seeds", ","], "--seeds is empty"),
    (["--forget-splits", "forget10,half"], "forget split 'half' is not a valid name"),
])
def test_study_bad_inputs_are_one_line(tmp_path, args, msg):
    r = run_cli("study", *args, "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "s").exists()


def test_study_runs_each_cell_and_writes_intervals(tiny_models, tmp_path):
    """Two seeds of the tiny benchmark, GradDiff only: each cell a whole run; then resumed for free."""
    over = [*tiny_models.overrides, "unlearn.methods=[GradDiff]", "finetune.epochs=20"]
    r = run_cli("study", *over, "--seeds", "0,1", "--out", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    for seed in (0, 1):
        assert (tmp_path / "s" / "forget25" / f"seed{seed}" / "report.md").is_file()
    text = (tmp_path / "s" / "report.md").read_text()
    assert "## forget25: 2 seeds (0, 1)" in text and "| GradDiff | 2 |" in text and text == r.stdout.rstrip("\n") + "\n" * (text.endswith("\n"))
    info = json.loads((tmp_path / "s" / "study.json").read_text())
    assert info["seeds"] == [0, 1] and info["forget_splits"] == ["forget25"] and info["wall_time_s"] > 0


def test_collapsed_and_last_good_runs_are_listed_and_counted(study_dir):
    info_file = study_dir / "forget10" / "seed2" / "run.json"
    info = json.loads(info_file.read_text())
    info["collapsed"] = {"SimNPO": "SimNPO: collapsed at step 4: ...; stopped, nothing was saved"}
    info["last_good"] = {"GradDiff": "last good state (step 4); training went on and collapsed"}
    info_file.write_text(json.dumps(info))
    text = write_study_report(study_dir).read_text()
    assert "| SimNPO | 2 | collapsed, nothing saved | – | – | – | – | 0.110 | **no** | – |" in text
    assert "| GradDiff (last good state) | 2 | 0.050 |" in text
    assert "| SimNPO | 1 (1 collapsed) | – | – | – | – | 0/1 | 0/1 |" in text


def test_degenerate_answers_counts_repeated_words_in_stored_generations(tmp_path):
    """evals/degenerate_answers.py reads RUN/stats/*.json and counts answers with a word three times in a row,
    with their mean distinct-bigram share."""
    import subprocess
    import sys
    from pathlib import Path

    stats = tmp_path / "forget01" / "seed2" / "stats"
    stats.mkdir(parents=True)
    gens = {"q1": "It is by French French French author.", "q2": "It is by Victor Hugo.",
            "q3": "the the, THE end", "q4": "French author, French novel, French"}
    (stats / "m-abc-def.json").write_text(json.dumps({"forget": {"prob": [0.1], "generations": gens},
                                                     "retain": {"prob": [0.9], "generations": {"q": "Fine."}}}))
    script = Path(__file__).resolve().parents[1] / "evals" / "degenerate_answers.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, check=True).stdout
    # distinct-bigram shares: 6/7, 1, 1 ("the the , the end": no bigram twice), 5/6 -> 0.923; "Fine." 1
    assert "| forget01/seed2 | m-abc-def | 2/4 (0.923) | 0/1 (1.000) |" in out
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 2 and "no stats" in bad.stderr


def test_the_study_table_shows_how_the_forget_answers_read_when_the_ledger_has_it(study_dir):
    """forget_Q_A_distinct_bigrams (uncompressed) next to each run, the oracle's in brackets: a low forget
    probability reached by looping answers shows there."""
    text = write_study_report(study_dir).read_text()
    assert "answers (oracle)" not in text
    run = study_dir / "forget10" / "seed0"
    extra = [{"model": m, "method": m if m != "oracle" else "none", "compression": "none",
              "metric": "forget_Q_A_distinct_bigrams", "value": v} for m, v in (("oracle", 0.98), ("Robust_GradDiff", 0.41))]
    with open(run / "results.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in extra))
    text = write_study_report(study_dir).read_text()
    assert "| x back | answers (oracle) |" in text
    assert "| Robust_GradDiff | 0 | 0.090 | 0.120 | nf4 0.120 | 0.850 | 0.944 | 0.100 | yes | 1.333 | 0.410 (0.980) |" in text
    assert "| GradDiff | 1 | 0.100 | 0.150 | nf4 0.150 | 0.790 | 0.988 | 0.120 | yes | 1.500 | – (–) |" in text
