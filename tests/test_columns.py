"""The deployment columns on the tiny model: GPTQ and AWQ through llm-compressor (compressed-tensors
checkpoints, cached, loaded back in fp32), the relearning attack, and their one-line errors."""
import json

import pytest
import torch
from conftest import run_cli

from robust_unlearn.compress import compressible_linears, get_compression
from robust_unlearn.compress.relearn import RelearnData, eval_bench, forget_half
from robust_unlearn.config import load_recipe
from robust_unlearn.errors import UserError
from robust_unlearn.models import load_model
from robust_unlearn.quant import parse_format

pytest.importorskip("llmcompressor")

# small calibration and a short attack: the tiny model compresses in seconds
FAST = ["sweep.calibration.samples=4", "sweep.calibration.length=32", "sweep.calibration.awq_n_grid=3",
        "sweep.relearn.steps=2", "sweep.relearn.batch_size=4"]
EVAL = ["model.prompt=qa", "eval.max_new_tokens=4", "data.limit=6", "data.num_authors=4", "data.qa_per_author=4",
        "data.forget_split=forget25", "data.train_utility=false"]


def _calibration(tiny_models, tmp_path, cache=True):
    from robust_unlearn.data import calibration_samples
    from robust_unlearn.quant.calibrated import Calibration

    cfg = load_recipe(None, tiny_models.overrides + FAST)
    _, tok = load_model(tiny_models.target)
    samples, source = calibration_samples(cfg, tiny_models.bench, tok)
    assert len(samples) == 4 and all(len(r) == 32 for r in samples) and source.startswith("retain 4x32")
    return Calibration(samples, source, cache_dir=tmp_path / "compressed" if cache else None, ckpt="tgt",
                       awq_n_grid=3)


@pytest.mark.parametrize("name", ["gptq4-g64", "awq4-g64"])
def test_gptq_awq_give_a_4bit_grid_in_fp32_and_are_cached(tiny_models, tmp_path, name, monkeypatch):
    calib = _calibration(tiny_models, tmp_path)
    model, _ = load_model(tiny_models.target)
    head = model.get_output_embeddings().weight.detach().clone()
    out = get_compression(name, calib)(model)
    assert out.dtype == torch.float32
    for n, lin in compressible_linears(out):  # every group of 64 holds at most 16 distinct values
        groups = lin.weight.detach().reshape(-1, 64)
        assert max(len(torch.unique(g)) for g in groups) <= 16, n
    assert torch.equal(out.get_output_embeddings().weight, head)  # lm_head kept
    cached = list((tmp_path / "compressed").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith(f"tgt-{name}-")
    assert json.loads((cached[0] / "calibration.json").read_text())["format"] == name
    # a second call reuses the compressed checkpoint: no quantizer runs
    from robust_unlearn.quant import calibrated

    monkeypatch.setattr(calibrated, "oneshot_quantize", lambda *a: pytest.fail("quantized again"))
    again = get_compression(name, calib)(load_model(tiny_models.target)[0])
    for (_, a), (_, b) in zip(compressible_linears(out), compressible_linears(again)):
        assert torch.equal(a.weight, b.weight)


def test_gptq_codes_of_the_robust_update_are_measured(tiny_models, tmp_path):
    """In memory after GPTQ the weights are fake-quantized with their stored scales: the codes
    ``stored_codes`` reads are integers in [-8, 7]."""
    from robust_unlearn.quant.calibrated import oneshot_quantize, stored_codes

    calib = _calibration(tiny_models, tmp_path, cache=False)
    model, _ = load_model(tiny_models.target)
    oneshot_quantize(model, parse_format("gptq4-g64"), calib)
    lin = compressible_linears(model)[0][1]
    k = stored_codes(lin)
    assert k is not None and int(k.min()) >= -8 and int(k.max()) <= 7


def test_relearn_columns_train_from_the_checkpoint(tiny_models):
    cfg = load_recipe(None, tiny_models.overrides + FAST)
    bench = tiny_models.bench
    half = eval_bench("relearn-forget", bench)["forget"]
    assert len(half) == len(bench["forget"]) // 2 and list(half["question"]) == list(forget_half(bench["forget"], 1)["question"])
    assert eval_bench("relearn-retain", bench) is bench
    model, tok = load_model(tiny_models.target)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = get_compression("relearn-forget", RelearnData(cfg, bench, tok))(model)
    moved = [n for n, p in out.named_parameters() if not torch.equal(p, before[n])]
    assert moved and "model.embed_tokens.weight" not in moved and out.dtype == torch.float32


def test_sweep_writes_every_column_with_its_settings(tiny_models, tmp_path):
    out = tmp_path / "run"
    cols = "none,gptq4-g64,awq4-g64,relearn-retain,relearn-forget"
    res = run_cli("sweep", f"tgt={tiny_models.target}", *EVAL, *FAST, "--oracle", tiny_models.oracle,
                  "--compressions", cols, "--out", out)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    got = {(r["model"], r["compression"]) for r in rows}
    assert {(m, c) for m in ("tgt", "oracle") for c in cols.split(",")} <= got
    gptq = [r for r in rows if r["compression"] == "gptq4-g64"]
    assert all(r["settings"]["calibration"].startswith("retain 4x32") for r in gptq)
    assert all(r["settings"]["relearn"]["steps"] == 2 for r in rows if r["compression"].startswith("relearn"))
    assert len(list((out / "compressed").iterdir())) == 4  # (tgt, oracle) x (gptq, awq)
    report = (out / "report.md").read_text()
    assert "gptq4-g64" in report and "relearn-forget" in report


@pytest.mark.parametrize("cols,needle", [
    ("none,gptq4-g128", "group 128 does not divide layer"),
    ("none,gptq5-g64", "unknown compression 'gptq5-g64'"),
])
def test_bad_columns_are_one_line(tiny_models, tmp_path, cols, needle):
    res = run_cli("sweep", f"tgt={tiny_models.target}", *EVAL, *FAST, "--compressions", cols, "--out", tmp_path / "r")
    assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_missing_extra_is_one_line(tiny_models, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_llmc(name, *a, **k):
        if name.startswith("llmcompressor"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_llmc)
    calib = _calibration(tiny_models, tmp_path)
    with pytest.raises(UserError) as exc:
        get_compression("gptq4-g64", calib)(load_model(tiny_models.target)[0])
    assert "needs llm-compressor" in str(exc.value) and "\n" not in str(exc.value)


def test_awq_duo_scaling_is_a_recipe_key_that_reaches_the_quantizer(tiny_models, tmp_path, monkeypatch):
    """``sweep.calibration.awq_duo_scaling`` (true, false or both): passed to llm-compressor's AWQModifier,
    recorded with the compressed checkpoint, and part of the calibration id only when not true (ids cached
    before it stay)."""
    import hashlib

    from llmcompressor.modifiers.transform import awq

    from robust_unlearn.quant.calibrated import QUANTIZER_KEYS, Calibration

    on = _calibration(tiny_models, tmp_path)
    old_id = hashlib.sha256(json.dumps({"samples": on.samples, "awq_n_grid": 3, "dampening": 0.01}).encode()).hexdigest()[:12]
    assert on.awq_duo_scaling is True and on.id == old_id
    c = load_recipe(None, tiny_models.overrides + FAST + ["sweep.calibration.awq_duo_scaling=false"])["sweep"]["calibration"]
    off = Calibration.of(c, on.samples, on.source, cache_dir=tmp_path / "compressed", ckpt="tgt")
    assert off.quantizer == {"awq_n_grid": 3, "awq_duo_scaling": False, "gptq_dampening": 0.01,
                             "weight_observer": "minmax"}
    assert set(off.quantizer) == set(QUANTIZER_KEYS) and off.id != on.id
    c = load_recipe(None, tiny_models.overrides + FAST + ["sweep.calibration.awq_duo_scaling=both"])["sweep"]["calibration"]
    both = Calibration.of(c, on.samples, on.source)  # llm-compressor's third value: half the grid each way
    assert both.quantizer["awq_duo_scaling"] == "both" and len({on.id, off.id, both.id}) == 3
    with pytest.raises(UserError, match="awq_duo_scaling' must be true, false or both"):
        load_recipe(None, tiny_models.overrides + ["sweep.calibration.awq_duo_scaling=half"])
    seen = []

    class Spy(awq.AWQModifier):
        def __init__(self, **kw):
            seen.append(kw.get("duo_scaling"))
            super().__init__(**kw)

    monkeypatch.setattr(awq, "AWQModifier", Spy)
    get_compression("awq4-g64", off)(load_model(tiny_models.target)[0])
    assert seen == [False]
    (cached,) = (tmp_path / "compressed").iterdir()
    assert json.loads((cached / "calibration.json").read_text())["awq_duo_scaling"] is False


def test_weight_observer_is_a_recipe_key_that_reaches_the_quantizer(tiny_models, tmp_path):
    """``sweep.calibration.weight_observer`` (minmax, llm-compressor's default, or mse): the scheme GPTQ
    quantizes with carries it, it is recorded with the compressed checkpoint, and it enters the calibration
    id only when not minmax (ids cached before it stay); an unknown name is one line."""
    from robust_unlearn.quant.calibrated import Calibration, _args

    mm = _calibration(tiny_models, tmp_path)
    c = load_recipe(None, tiny_models.overrides + FAST + ["sweep.calibration.weight_observer=mse"])["sweep"]["calibration"]
    mse = Calibration.of(c, mm.samples, mm.source, cache_dir=tmp_path / "compressed", ckpt="tgt")
    assert mm.weight_observer == "minmax" and mse.weight_observer == "mse" and mse.id != mm.id
    assert _args(parse_format("gptq4-g64")).observer is None  # llm-compressor's default: min-max
    assert _args(parse_format("gptq4-g64"), "mse").observer == "mse"
    get_compression("gptq4-g64", mse)(load_model(tiny_models.target)[0])
    (cached,) = (tmp_path / "compressed").iterdir()
    assert json.loads((cached / "calibration.json").read_text())["weight_observer"] == "mse"
    with pytest.raises(UserError, match=r"weight_observer 'median' is unknown \(expected minmax or mse\)"):
        load_recipe(None, tiny_models.overrides + ["sweep.calibration.weight_observer=median"])


def test_a_resumed_sweep_evaluates_a_column_again_when_its_settings_changed(tiny_models, tmp_path):
    """A cell is (checkpoint, evaluation, column) and, for a relearn / GPTQ / AWQ column, its settings:
    the same settings are skipped, other ones evaluated again (their rows become the latest)."""
    from robust_unlearn.ledger import Ledger

    out = tmp_path / "run"
    args = ("sweep", f"tgt={tiny_models.target}", *EVAL, "--compressions", "none,relearn-retain", "--out", out)
    ledger = lambda: Ledger(out / "results.jsonl")  # noqa: E731 (read afresh after each run)
    assert run_cli(*args, *FAST).returncode == 0
    first = len(ledger().rows())
    assert run_cli(*args, *FAST).returncode == 0 and len(ledger().rows()) == first  # nothing evaluated again
    res = run_cli(*args, *FAST, "sweep.relearn.steps=3")
    assert res.returncode == 0, res.stderr
    new = ledger().rows()[first:]
    assert new and {r["compression"] for r in new} == {"relearn-retain"}
    assert {r["settings"]["relearn"]["steps"] for r in ledger().latest() if r["compression"] == "relearn-retain"} == {3}
    second = len(ledger().rows())
    assert run_cli(*args, *FAST, "sweep.relearn.steps=3").returncode == 0 and len(ledger().rows()) == second
