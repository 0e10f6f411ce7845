"""`robust-unlearn plan`: the parameter accounting is exact, the peak is within 15% of a measured one on the
tiny model, and bad inputs are one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robust_unlearn.cli import main
from robust_unlearn.config import DEFAULTS
from robust_unlearn.models import model_on_meta, tiny_config
from robust_unlearn.plan import Setup, plan_method, shape_of, trained_params

REPO = Path(__file__).resolve().parents[1]


def _settings(**kw):
    s = {k: v for k, v in DEFAULTS["unlearn"].items() if k not in ("methods", "per_method")}
    s.update(kw)
    return s


@pytest.mark.parametrize("tied", [True, False])
def test_shape_counts_the_real_models_parameters(tied):
    conf = tiny_config(512, hidden_size=128, intermediate_size=320, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=tied)
    from transformers import LlamaForCausalLM

    real = LlamaForCausalLM(conf)
    shape = shape_of(model_on_meta(conf))
    assert shape.params == sum(p.numel() for p in real.parameters())
    assert shape.tied is tied and shape.layers == 3 and shape.kv_width == 64 and shape.q_width == 128
    # LoRA on every linear: r x (in + out) each, what peft creates
    from robust_unlearn.lora import add_adapters, target_modules

    st = _settings(lora={**DEFAULTS["unlearn"]["lora"], "r": 4})
    peft = add_adapters(real, st, target_modules(real, st))
    assert trained_params(shape, "GradDiff", st, lora_r=4) == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert trained_params(shape, "RMU", st) == sum(p.numel() for n, p in real.named_parameters()
                                                   if "layers.5" in n or "layers.6" in n or "layers.7" in n
                                                   if n.endswith("mlp.down_proj.weight"))


def test_memory_savers_lower_the_plan_and_zero3_divides_it():
    conf = tiny_config(2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2)
    shape = shape_of(model_on_meta(conf))
    st = _settings()
    base = Setup(batch_size=8, seq_len=256, precision="bf16")
    p = plan_method(shape, "NPO", st, base)
    assert plan_method(shape, "NPO", st, Setup(**{**base.__dict__, "checkpointing": True}))["activations"] < p["activations"]
    assert plan_method(shape, "NPO", st, Setup(**{**base.__dict__, "grad_accum": 4}))["activations"] == \
        pytest.approx(p["activations"] / 4)
    z3 = plan_method(shape, "NPO", st, Setup(**{**base.__dict__, "gpus": 4, "zero": 3, "reference": "partitioned"}))
    full = plan_method(shape, "NPO", st, Setup(**{**base.__dict__, "gpus": 4, "zero": 3, "reference": "full"}))
    assert z3["weights"] == pytest.approx(p["weights"] / 4)
    assert z3["reference"] == pytest.approx(shape.params * 2 / 4) and full["reference"] == shape.params * 4
    assert plan_method(shape, "SimNPO", st, base)["reference"] == 0  # reference-free


def test_robust_options_add_their_state_and_keep_to_the_launches_they_run_under():
    """robust_qat: its parametrizations' state and deployed copies, never ZeRO-3; robust_prune_view: the
    frozen linears' pruned copies and both views' activations, never gradient checkpointing;
    robust_relearn_view: one process only."""
    from robust_unlearn.plan import candidates

    conf = tiny_config(2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2)
    shape = shape_of(model_on_meta(conf))
    base = Setup(batch_size=8, seq_len=256, precision="fp32")
    off, qat = _settings(), _settings(robust_qat=True)
    view, relearn = _settings(robust_qat=True, robust_prune_view=0.3), _settings(robust_qat=True, robust_relearn_view=3e-4)
    p0, p1, p2 = (plan_method(shape, "Robust_GradDiff", s, base) for s in (off, qat, view))
    T = p0["trained_params"]
    sure = plan_method(shape, "SURE_GradDiff", off, base)
    # the null-space step keeps the retain stream only: half SURE_'s activations on the same modules
    assert p0["activations"] == pytest.approx(sure["activations"] / 2)
    assert p0["robust_state"] == pytest.approx(T * (1 + 4 + 4 * off["robust_nullspace"] * off["robust_topk"]))
    assert p1["robust_state"] - p0["robust_state"] == pytest.approx(T * 9)  # fp32 target values, mask, int32 codes
    assert p1["activations"] - p0["activations"] == T * 4  # the deployed copy kept for backward
    assert p2["robust_state"] - p1["robust_state"] == pytest.approx((shape.linear_params - T) * 4 + T)
    assert p2["activations"] > 2 * p0["activations"] and p2["logits"] > p1["logits"]
    launches = {s: {(c.gpus, c.zero, c.checkpointing) for c in candidates(base, 4, "Robust_GradDiff", st)}
                for s, st in (("off", off), ("qat", qat), ("view", view), ("relearn", relearn))}
    assert (4, 3, False) in launches["off"] and not any(z == 3 for _, z, _ in launches["qat"])
    assert (4, 2, True) in launches["qat"] and not any(c for _, _, c in launches["view"])
    assert {g for g, _, _ in launches["relearn"]} == {1}


def test_plan_is_within_15_percent_of_the_measured_peak_on_the_tiny_model(tmp_path):
    """evals/plan_check.py runs three steps per configuration in a fresh process (GradDiff fp32 and bf16,
    NPO fp32 with its reference, LoRA GradDiff, Robust_GradDiff's step with its shipped robust_qat and
    robust_prune_view) and compares the peak with the plan's."""
    out = tmp_path / "rows.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(REPO / "evals" / "plan_check.py"), "--only", "0,1,3,7,9", "--json", str(out)],
                   check=True, env=env, capture_output=True, text=True, timeout=600)
    rows = json.loads(out.read_text())
    assert len(rows) == 5
    for r in rows:
        assert abs(r["planned"] / r["measured"] - 1) <= 0.15, r


def _config_file(tmp_path, **kw) -> Path:
    conf = tiny_config(1024, **kw)
    f = tmp_path / "config.json"
    f.write_text(json.dumps(conf.to_dict()))
    return f


def test_plan_command_prints_every_method_and_what_fits(tmp_path, capsys):
    f = _config_file(tmp_path)
    assert main(["plan", "--model-config", str(f), "--gpu-gb", "4", "--reserve-gb", "0.5",
                 "unlearn.methods=[GradDiff,NPO_KLR,Robust_GradDiff]"]) == 0
    out = capsys.readouterr().out
    for m in ("## GradDiff", "## NPO_KLR", "## Robust_GradDiff", "what fits 4 GiB"):
        assert m in out
    assert out.count("| yes |") == 3  # a 2-layer model fits 3.5 GiB as written


def test_plan_finds_a_configuration_that_fits_a_small_budget(tmp_path, capsys):
    f = _config_file(tmp_path, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=4)
    assert main(["plan", "--model-config", str(f), "--gpus", "2", "--gpu-gb", "0.2", "--reserve-gb", "0",
                 "unlearn.methods=[GradDiff]", "unlearn.per_method.GradDiff.precision=bf16"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| GradDiff |")][0]
    assert "| no |" in row and "none of the candidates" not in row


@pytest.mark.parametrize("argv,expected", [
    (["--gpus", "0"], "--gpus 0: expected a whole number"),
    (["--gpu-gb", "-1"], "--gpu-gb -1.0: expected the memory"),
    (["--model-config", "/nonexistent/cfg.json"], "--model-config '/nonexistent/cfg.json' not found"),
    (["model.base=org/not-cached-anywhere"], "is a hub id whose config is not in the local cache"),
])
def test_plan_bad_input_is_one_line(argv, expected, capsys):
    assert main(["plan"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1
