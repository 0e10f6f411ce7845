"""The compression sweep on the tiny model: resumable after a kill, one-line errors before loading."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from robust_unlearn.ledger import Ledger

# the data of the session's tiny target and oracle (conftest.tiny_models), 3 rows a split
EVAL = ["model.prompt=qa", "eval.max_new_tokens=4", "data.limit=3", "data.num_authors=4", "data.qa_per_author=4",
        "data.forget_split=forget25", "data.train_utility=false"]
COLUMNS = "none,int8,prune20"


def _env(cache):
    # one thread: the tiny model's ops are too small to share, and on a busy machine two threads
    # waiting on each other make a cell 20x slower
    return dict(os.environ, ROBUST_UNLEARN_CACHE=str(cache), OMP_NUM_THREADS="1")


def cli(*args, cache):
    return run_cli(*args, cache=cache)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def cells(path: Path) -> set[tuple]:
    return {(r["model"], r["compression"]) for r in map(json.loads, lines(path))}


@pytest.fixture(scope="module")
def models(tiny_models):
    """The session's tiny fine-tuned target and retain oracle (conftest.tiny_models), as `run` makes them."""
    return {"target": tiny_models.target, "oracle": tiny_models.oracle}


def sweep_args(models, out, columns=COLUMNS):
    return ["-v", "sweep", f"tgt={models['target']}", *EVAL, "--oracle", models["oracle"], "--compressions", columns,
            "--out", out]


def test_killed_sweep_resumes_to_the_uninterrupted_ledger(models, tmp_path, cache_dir):
    full = tmp_path / "full"
    res = cli(*sweep_args(models, full), cache=cache_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    want = [json.loads(x) for x in lines(full / "results.jsonl")]
    assert cells(full / "results.jsonl") == {(m, c) for m in ("oracle", "tgt") for c in COLUMNS.split(",")}
    assert all("time" not in k for r in want for k in r)
    assert "tgt / int8: evaluated in" in res.stderr
    metrics = {(r["model"], r["compression"], r["metric"]): r["value"] for r in want}
    assert metrics[("oracle", "none", "forget_quality")] == pytest.approx(1.0)
    for col in COLUMNS.split(","):
        assert ("tgt", col, "forget_quality") in metrics and ("oracle", col, "forget_quality") in metrics
    assert (full / "forget_heatmap.png").is_file() and "| tgt |" in (full / "report.md").read_text()

    killed = tmp_path / "killed"
    ledger = killed / "results.jsonl"
    # a separate process: it is SIGKILLed mid-sweep
    proc = subprocess.Popen([sys.executable, "-m", "robust_unlearn.cli", *map(str, sweep_args(models, killed))],
                            env=_env(cache_dir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not cells(ledger) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert 1 <= len(cells(ledger)) < len(cells(full / "results.jsonl"))
    partial = lines(ledger)
    assert partial == [json.dumps(r, sort_keys=True) for r in want[: len(partial)]]  # whole cells, no torn row
    with open(ledger, "a") as fh:  # and a crash mid-write on top: a torn last line
        fh.write(partial[-1][: len(partial[-1]) // 2])

    res = cli(*sweep_args(models, killed), cache=cache_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "already in the ledger" in res.stderr
    assert [json.loads(x) for x in lines(ledger)] == want
    assert ledger.read_text().endswith("\n")

    res = cli(*sweep_args(models, killed), cache=cache_dir)  # complete: nothing is loaded or appended
    assert res.returncode == 0 and "evaluated in" not in res.stderr and "Loading" not in res.stderr
    assert [json.loads(x) for x in lines(ledger)] == want


def test_a_cell_missing_its_last_rows_is_evaluated_again(models, tmp_path, cache_dir):
    """A kill inside a cell's append leaves its first rows and a torn fragment: on resume the cell is
    not taken as done (each row records how many rows its cell has), and only its missing rows go in."""
    out = tmp_path / "cut"
    assert cli(*sweep_args(models, out, "none"), cache=cache_dir).returncode == 0
    ledger = out / "results.jsonl"
    want = lines(ledger)
    assert all(json.loads(x)["cell_rows"] == sum(1 for y in want if json.loads(y)["model"] == json.loads(x)["model"])
               for x in want)
    ledger.write_text("\n".join(want[:-2]) + "\n" + want[-2][:10])  # the last cell lost a row, one torn
    res = cli(*sweep_args(models, out, "none"), cache=cache_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "tgt / none: evaluated in" in res.stderr and "oracle / none: already in the ledger" in res.stderr
    got = [json.loads(x) for x in lines(ledger)]
    assert sorted(got, key=lambda r: (r["model"], r["metric"])) == sorted(map(json.loads, want), key=lambda r: (r["model"], r["metric"]))


def test_ledger_drops_a_torn_tail_and_appends_in_one_write(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    rows = [{"model": "m", "method": "none", "compression": c, "split": "forget", "metric": "forget_Q_A_Prob",
             "value": v, "ckpt": "c", "eval": "e"} for c, v in (("none", 0.5), ("int8", 0.25))]
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or real_write(fd, data))
    assert Ledger(path).append(rows) == 2 and len(writes) == 1
    good = path.read_bytes()
    with open(path, "ab") as fh:
        fh.write(b'{"model": "m", "method": "no')
    led = Ledger(path)
    assert led.rows() == rows and led.problems == [(3, led.problems[0][1])]  # skipped, with its line number
    assert path.read_bytes() == good + b'{"model": "m", "method": "no'  # reading never changes the file
    more = [dict(rows[0], compression="nf4")]
    assert led.append(more + rows) == 1  # only the new row
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows + more  # the torn tail cut, not glued


def test_unknown_compression_is_one_line_before_loading(models, tmp_path, cache_dir):
    res = cli("sweep", models["target"], *EVAL, "--compressions", "none,int9", "--out", tmp_path / "o", cache=cache_dir)
    assert res.returncode == 2
    err = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("robust-unlearn: error: --compressions: unknown compression 'int9'")
    assert "int8" in err[0] and not (tmp_path / "o").exists()


def test_tokenizer_of_another_model_is_one_line(models, tmp_path, cache_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from robust_unlearn.models import save_model, tiny_config

    tok = AutoTokenizer.from_pretrained(models["target"])
    save_model(LlamaForCausalLM(tiny_config(16)), tok, tmp_path / "bad")
    res = cli("sweep", f"bad={tmp_path / 'bad'}", *EVAL, "--compressions", "none", "--out", tmp_path / "o",
              cache=cache_dir)
    assert res.returncode == 2
    err = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and "tokenizer of" in err[0] and "embedding has 16 rows" in err[0], res.stderr


def test_every_cell_is_evaluated_on_the_process_device(tiny_models, tmp_path, monkeypatch):
    """The sweep moves each loaded checkpoint and each compressed copy to accelerate's device for this
    process (on a GPU machine: the GPU; it used to evaluate on the CPU there, 20-30x slower at 1B)."""
    from accelerate.state import PartialState

    from robust_unlearn import sweep as sweep_mod
    from robust_unlearn.config import load_recipe

    moved, evaluated = [], []
    real_load = sweep_mod.load_model

    def load(*a, **k):
        model, tok = real_load(*a, **k)
        real_to = model.to
        model.to = lambda *args, **kw: (moved.append(args[0] if args else kw.get("device")), real_to(*args, **kw))[1]
        return model, tok

    monkeypatch.setattr(sweep_mod, "load_model", load)
    cfg = load_recipe(None, tiny_models.overrides + EVAL)
    ev = sweep_mod.suite_for(cfg).evaluator(sweep_mod.load_tokenizer(tiny_models.target))
    real_eval = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda m, *a, **k: (evaluated.append(m), real_eval(m, *a, **k))[1])
    sweep_mod.sweep(cfg, tiny_models.bench, tmp_path / "run", [("tgt", tiny_models.target, "none")],
                    ["none", "prune20"], evaluator=ev)
    device = PartialState().device
    assert len(evaluated) == 2 and moved.count(device) >= 3  # the checkpoint, then each evaluated model (a deep copy records too)
    assert all(p.device == device for m in evaluated for p in m.parameters())
