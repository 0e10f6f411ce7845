"""LoRA unlearning (unlearn.lora, peft): adapters on the chosen modules only, merged as W + (alpha/r) B A,
the reference is the model with its adapters off, SURE puts them on its salient modules."""
import pytest
import torch

from robust_unlearn.compress import compressible_linears
from robust_unlearn.config import load_recipe
from robust_unlearn.errors import UserError
from robust_unlearn.lora import add_adapters, merge, target_modules
from robust_unlearn.models import load_model, read_metadata
from robust_unlearn.unlearn import Reference, unlearn

LORA = ["unlearn.lora.r=4", "unlearn.lora.alpha=8", "unlearn.lora.targets=[q_proj,v_proj,down_proj]",
        "unlearn.lr=3e-3"]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    t = tiny_models
    cfg = load_recipe(None, t.overrides + LORA)
    return cfg, t.bench, t.target, t.target_key, Reference(t.target), tmp_path_factory.mktemp("lora")


def test_merged_weights_are_base_plus_scaled_ba(setup):
    cfg, _, target, _, _, _ = setup
    from robust_unlearn.config import method_settings

    settings = method_settings(cfg, "GradDiff")
    model, _ = load_model(target)
    base = {n: lin.weight.detach().clone() for n, lin in compressible_linears(model)}
    names = target_modules(model, settings)
    assert names and all(n.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "down_proj") for n in names)
    pm = add_adapters(model, settings, names)
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {n for n, _ in pm.named_parameters() if "lora_" in n}
    g = torch.Generator().manual_seed(0)
    want = {}
    for n in names:
        mod = pm.base_model.model.get_submodule(n)
        with torch.no_grad():
            mod.lora_B["default"].weight.copy_(torch.randn(mod.lora_B["default"].weight.shape, generator=g) * 0.1)
        a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        want[n] = base[n] + (8 / 4) * (b @ a).detach()
    merged = merge(pm)
    for n, lin in compressible_linears(merged):
        expect = want.get(n, base[n])
        assert torch.allclose(lin.weight, expect, atol=1e-6), n


@pytest.mark.parametrize("method", ["GradDiff", "NPO", "SURE_GradDiff"])
def test_lora_unlearning_changes_only_the_adapted_modules(setup, method):
    cfg, bench, target, key, ref, out = setup
    ckpt = unlearn(cfg, bench, target, key, method, out, ref)
    meta = read_metadata(ckpt)
    targets = set(meta["plan"]["lora_targets"])
    a, _ = load_model(target)
    b, _ = load_model(str(ckpt))
    changed = {n[: -len(".weight")] for (n, p), q in zip(a.named_parameters(), b.parameters()) if not torch.equal(p, q)}
    assert changed and changed <= targets, changed - targets
    if method.startswith("SURE_"):
        assert targets <= {n[: -len(".weight")] for n in meta["plan"]["salient"]}
    lora_params = sum(4 * (m.in_features + m.out_features) for n, m in compressible_linears(a) if n in targets)
    assert meta["trained_params"] == lora_params
    if method == "NPO":
        assert meta["reference"] == "the model with its LoRA adapters off"


def test_robust_with_lora_floors_the_largest_share_of_the_merged_delta(setup, tiny_models):
    """Robust_ + LoRA: adapters on the salient modules, merged; then the largest robust_topk share of each
    adapted weight's |W - W0| is floored (every kept weight flips its NF4 and int8 codes) and the rest of
    the delta goes back to the target exactly."""
    from robust_unlearn.robust.floor import verify_flips

    from test_robust import ROBUST

    _, bench, target, key, ref, out = setup
    cfg = load_recipe(None, tiny_models.overrides + LORA + ROBUST)  # floor nf4 + int8, top 20%
    path = unlearn(cfg, bench, target, key, "Robust_GradDiff", out, ref)
    meta = read_metadata(path)
    final = meta["plan"]["final"]
    assert final["floor"] == ["nf4", "int8"] and final["updated_params"] > 0
    targets = set(meta["plan"]["lora_targets"])
    a, b = load_model(target)[0], load_model(str(path))[0]
    wa, wb = dict(compressible_linears(a)), dict(compressible_linears(b))
    topk = final["lora_delta_kept"]
    for n in wa:
        w0, w = wa[n].weight.detach(), wb[n].weight.detach()
        changed = w != w0
        if n not in targets:
            assert not changed.any(), n
            continue
        assert changed.float().mean() <= topk + 1e-3, (n, float(changed.float().mean()))
        rates = verify_flips(w0, w, changed, ["nf4", "int8"])
        assert all(r == 1.0 for r in rates.values()), (n, rates)


def test_lora_with_rmu_is_one_line(setup):
    cfg, bench, target, key, ref, out = setup
    with pytest.raises(UserError) as exc:
        unlearn(cfg, bench, target, key, "RMU", out, ref)
    assert "\n" not in str(exc.value) and "lora" in str(exc.value)
    with pytest.raises(UserError, match="lora.r"):
        load_recipe(None, ["unlearn.lora.r=-1"])
