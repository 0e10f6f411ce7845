"""SURE and the robust method on the tiny from-scratch target of test_methods.

Bound, as for the baselines: forget answer probability <= 0.5x the target's, retain >= 0.6x.
Structure: SURE changes only its salient modules; the robust method changes only the weights of its
mask (the rest bit-identical to the target), never one that 30% magnitude pruning of the target would
zero, and every weight it changed has a different NF4 code (by bitsandbytes' quantize_4bit) and int8
code than the target's. The same for RMU as the base (SURE_RMU, Robust_RMU); RMU's loss at layer l
gives no saliency after l, so SURE_RMU steered at layer 0 trains only layer 0.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, run_cli

from robust_unlearn.compress import compressible_linears
from robust_unlearn.config import load_recipe
from robust_unlearn.metrics.weights import audit
from robust_unlearn.models import load_model, read_metadata
from robust_unlearn.robust.floor import verify_flips
from robust_unlearn.robust.saliency import prune_threshold
from robust_unlearn.unlearn import Reference, unlearn

from test_methods import probs

REPO = Path(__file__).resolve().parents[1]

ROBUST = ["unlearn.sure_percentile=50", "unlearn.robust_topk=0.2", "unlearn.robust_floor=[nf4,int8]",
          "unlearn.robust_nullspace=4", "unlearn.per_method.SURE_NPO_KLR.epochs=10",
          "unlearn.per_method.Robust_GradDiff.lr=3e-3",
          # the recipe's per-method settings are for SmolLM2; the tiny model runs TINY's epochs
          "unlearn.per_method.SURE_GradDiff.steps=null", "unlearn.per_method.SURE_NPO_KLR.steps=null",
          "unlearn.per_method.Robust_GradDiff.steps=null", "unlearn.per_method.Robust_GradDiff.stop_forget_prob=null",
          "unlearn.per_method.Robust_GradDiff.robust_topk=0.2", "unlearn.per_method.Robust_GradDiff.robust_floor_every=0",
          "unlearn.per_method.Robust_GradDiff.robust_floor_margin=0.2",
          # the floor path on two formats: the shipped robust_qat / robust_prune_view / min_steps off
          # (test_defaults_train_through_the_deployed_grid runs them)
          "unlearn.per_method.Robust_GradDiff.robust_qat=false", "unlearn.per_method.Robust_GradDiff.robust_prune_view=0",
          "unlearn.per_method.Robust_GradDiff.min_steps=0",
          # RMU as the base: TINY's RMU settings (test_methods); SURE_RMU steers layer 0 of 2
          "unlearn.per_method.SURE_RMU.lr=2e-3", "unlearn.per_method.SURE_RMU.alpha=10",
          "unlearn.per_method.SURE_RMU.rmu_steering=5", "unlearn.per_method.SURE_RMU.rmu_layer=0",
          "unlearn.per_method.Robust_RMU.lr=2e-3", "unlearn.per_method.Robust_RMU.alpha=10",
          "unlearn.per_method.Robust_RMU.rmu_steering=5"]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    """The session's tiny fine-tuned target (conftest.tiny_models), with ROBUST's settings."""
    t = tiny_models
    cfg = load_recipe(None, t.overrides + ROBUST)
    return cfg, t.bench, t.target, t.target_key, Reference(t.target), tmp_path_factory.mktemp("robust")


def _weights(path):
    model, _ = load_model(str(path))
    return model, {f"{n}.weight": m.weight.detach().clone() for n, m in compressible_linears(model)}


@pytest.mark.parametrize("method", ["SURE_GradDiff", "SURE_NPO_KLR", "Robust_GradDiff", "SURE_RMU", "Robust_RMU"])
def test_sure_and_robust_forget_and_keep_retain(setup, method):
    cfg, bench, target, key, ref, out = setup
    f0, r0 = probs(cfg, bench, target)
    ckpt = unlearn(cfg, bench, target, key, method, out, ref)
    f1, r1 = probs(cfg, bench, ckpt)
    assert f1 <= 0.5 * f0 and r1 >= 0.6 * r0, (method, f0, f1, r0, r1)
    meta = read_metadata(ckpt)
    salient = set(meta["plan"]["salient"])
    a, wa = _weights(target)
    b, wb = _weights(ckpt)
    changed = {n for n in wa if not torch.equal(wa[n], wb[n])}
    assert changed and changed <= salient
    # nothing outside the linear weights moves either (embeddings, norms, lm_head)
    lin = set(wa)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if f"{n}" not in lin:
            assert torch.equal(p, q), n


def test_sure_rmu_trains_only_up_to_the_steered_layer(setup):
    cfg, bench, target, key, ref, out = setup
    ckpt = unlearn(cfg, bench, target, key, "SURE_RMU", out, ref)  # rmu_layer 0 (ROBUST)
    meta = read_metadata(ckpt)
    assert meta["plan"]["salient"] and all(n.startswith("model.layers.0.") for n in meta["plan"]["salient"])
    _, wa = _weights(target)
    _, wb = _weights(ckpt)
    changed = {n for n in wa if not torch.equal(wa[n], wb[n])}
    assert changed and all(n.startswith("model.layers.0.") for n in changed)


@pytest.mark.parametrize("method", ["Robust_GradDiff", "Robust_RMU"])
def test_robust_update_is_sparse_pruning_safe_and_flips_codes(setup, method):
    cfg, bench, target, key, ref, out = setup
    ckpt = unlearn(cfg, bench, target, key, method, out, ref)
    a, wa = _weights(target)
    _, wb = _weights(ckpt)
    thr = prune_threshold(a, 0.3)
    n_salient = sum(wa[n].numel() for n in read_metadata(ckpt)["plan"]["salient"])
    n_changed = 0
    for n in wa:
        upd = wa[n] != wb[n]
        if not upd.any():
            continue
        n_changed += int(upd.sum())
        assert float(wa[n][upd].abs().min()) >= thr  # pruning at 30% keeps every updated weight
        rates = verify_flips(wa[n], wb[n], upd, ["nf4", "int8"])
        assert all(r == 1.0 for r in rates.values()), (n, rates)
    assert 0 < n_changed <= 0.2 * n_salient + 1


def test_audit_reports_per_module_type(setup):
    cfg, bench, target, key, ref, out = setup
    ckpt = unlearn(cfg, bench, target, key, "Robust_GradDiff", out, ref)
    _, wa = _weights(target)
    model, _ = load_model(str(ckpt))
    rows = audit(wa, model)
    assert set(rows) <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    moved = [r for r in rows.values() if r["frac_changed"] > 0]
    assert moved and all(r["flip_rate"] == 1.0 for r in moved)
    assert all(np.isnan(r["flip_rate"]) for r in rows.values() if r["frac_changed"] == 0)


def test_audit_flip_rates_equal_the_floors_own_check(setup, tmp_path):
    """The audit's per-format flip rates use the floor's codes: on a floored checkpoint they equal the
    floor's guarantee check (``verify_flips``, bitsandbytes' own quantizers) over the same weights, and
    the audit command reports every format the checkpoint's floor names (nf4 and int8 here)."""
    cfg, bench, target, key, ref, out = setup
    ckpt = unlearn(cfg, bench, target, key, "Robust_GradDiff", out, ref)
    _, wa = _weights(target)
    model, wb = _weights(ckpt)
    rows = audit(wa, model, formats=["nf4", "int8", "rtn4-g64"])
    for fmt in ("nf4", "int8", "rtn4-g64"):
        n_upd = n_flip = 0
        for n in wa:
            upd = wa[n] != wb[n]
            if upd.any():
                k = int(upd.sum())
                n_upd += k
                n_flip += round(verify_flips(wa[n], wb[n], upd, [fmt])[fmt] * k)
        changed = sum(r["frac_changed"] * r["params"] for r in rows.values())
        flipped = sum(r["flip_rates"][fmt] * r["frac_changed"] * r["params"] for r in rows.values() if r["frac_changed"])
        assert round(changed) == n_upd and abs(flipped - n_flip) < 0.5, (fmt, flipped, n_flip)
    assert all(r["flip_rates"]["nf4"] == 1.0 and r["flip_rates"]["int8"] == 1.0 for r in rows.values() if r["frac_changed"])
    res = run_cli("audit", target, f"robust={ckpt}", "--formats", "rtn4-g64")
    assert res.returncode == 0, res.stderr
    assert "NF4 flip rate" in res.stdout and "int8 flip rate" in res.stdout and "rtn4-g64 flip rate" in res.stdout
    res = run_cli("audit", target, f"robust={ckpt}", "--formats", "nf5")
    assert res.returncode == 2 and "nf5" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_audit_command_prints_the_table_side_by_side(setup, tmp_path):
    cfg, bench, target, key, ref, out = setup
    robust = unlearn(cfg, bench, target, key, "Robust_GradDiff", out, ref)
    sure = unlearn(cfg, bench, target, key, "SURE_GradDiff", out, ref)
    res = run_cli("audit", target, f"robust={robust}", f"sure={sure}", "--json", tmp_path / "a.json")
    assert res.returncode == 0, res.stderr
    assert "| robust | " in res.stdout and "| sure | " in res.stdout and "NF4 flip rate" in res.stdout
    res = run_cli("audit", target, tmp_path / "missing")
    assert res.returncode == 2 and "missing" in res.stderr


def test_floor_inside_the_loop_keeps_the_guarantee(setup):
    cfg, bench, target, key, ref, out = setup
    cfg2 = load_recipe(None, TINY + ROBUST + ["unlearn.per_method.Robust_GradDiff.robust_floor_every=2", "unlearn.robust_floor=[rtn4-g128]",
                                              f"cache_dir={cfg['cache_dir']}"])
    ckpt = unlearn(cfg2, bench, target, key, "Robust_GradDiff", out / "every", ref)
    _, wa = _weights(target)
    _, wb = _weights(ckpt)
    moved = [n for n in wa if not torch.equal(wa[n], wb[n])]
    assert moved
    for n in moved:
        upd = wa[n] != wb[n]
        assert verify_flips(wa[n], wb[n], upd, ["rtn4-g128"])["rtn4-g128"] == 1.0


def test_defaults_train_through_the_deployed_grid_and_the_pruned_model(setup):
    """The shipped Robust_GradDiff (issue 12): robust_qat on NF4, robust_prune_view 0.3, at least 90 steps;
    a run with them saves only weights that left their target's NF4 code, on their codes' values, none of
    them a weight that pruning at 30% zeroes in the target."""
    from robust_unlearn.compress import get_compression
    from robust_unlearn.config import method_settings

    for path in (None, REPO / "recipes" / "default.yaml"):
        shipped = method_settings(load_recipe(path, []), "Robust_GradDiff")
        assert (shipped["robust_qat"], shipped["robust_prune_view"], shipped["min_steps"], shipped["robust_floor"]) == \
            (True, 0.3, 90, ["nf4"])
    cfg, bench, target, key, ref, out = setup
    on = ["unlearn.robust_floor=[nf4]", "unlearn.per_method.Robust_GradDiff.robust_qat=true",
          "unlearn.per_method.Robust_GradDiff.robust_prune_view=0.3", "unlearn.per_method.Robust_GradDiff.steps=6",
          f"cache_dir={cfg['cache_dir']}"]
    ckpt = unlearn(load_recipe(None, TINY + ROBUST + on), bench, target, key, "Robust_GradDiff", out / "shipped", ref)
    meta = read_metadata(ckpt)
    assert meta["plan"]["final"]["qat"] is True and meta["spec"]["settings"]["robust_prune_view"] == 0.3
    a, wa = _weights(target)
    b, wb = _weights(ckpt)
    wq = {f"{n}.weight": m.weight.detach() for n, m in compressible_linears(get_compression("nf4")(b))}
    thr = prune_threshold(a, 0.3)
    moved = 0
    for n in wa:
        upd = wa[n] != wb[n]
        moved += int(upd.sum())
        assert torch.equal(wq[n][upd], wb[n][upd]), n
        assert bool((wa[n][upd].abs() > thr).all()), n
    assert moved > 0


def test_qat_trains_through_the_deployed_grid_and_saves_it_exactly(setup):
    """``robust_qat``: what the forward saw is what is saved: the weights that left their target's nf4 code,
    on their new codes' values (bitsandbytes' NF4 gives them back bit for bit); every other weight the target's."""
    from robust_unlearn.compress import get_compression

    cfg, bench, target, key, ref, out = setup
    cfg2 = load_recipe(None, TINY + ROBUST + ["unlearn.robust_floor=[nf4]", "unlearn.per_method.Robust_GradDiff.robust_qat=true",
                                              "unlearn.per_method.Robust_GradDiff.robust_floor_every=2",  # ignored under qat
                                              f"cache_dir={cfg['cache_dir']}"])
    f0, _ = probs(cfg2, bench, target)
    ckpt = unlearn(cfg2, bench, target, key, "Robust_GradDiff", out / "qat", ref)
    meta = read_metadata(ckpt)
    assert meta["plan"]["final"]["qat"] is True and meta["spec"]["settings"]["robust_qat"] is True
    f1, _ = probs(cfg2, bench, ckpt)
    assert f1 < f0  # it still unlearns
    a, wa = _weights(target)
    b, wb = _weights(ckpt)
    assert not any("parametrizations" in n for n, _ in b.named_parameters())
    q = get_compression("nf4")(b)
    wq = {f"{n}.weight": m.weight.detach() for n, m in compressible_linears(q)}
    n_changed = 0
    for n in wa:
        upd = wa[n] != wb[n]
        n_changed += int(upd.sum())
        if upd.any():
            assert verify_flips(wa[n], wb[n], upd, ["nf4"])["nf4"] == 1.0
            assert torch.equal(wq[n][upd], wb[n][upd]), n
    assert 0 < n_changed == meta["plan"]["final"]["updated_params"]


def test_qat_with_a_reference_method_computes_the_targets_reference(setup):
    """``robust_qat`` parametrizes the trained weights after the shared reference froze their copies (their
    names change); a method with a reference (Robust_NPO, the pruned view too) runs, and its reference is
    still the target: the weights are bit-identical to a run whose reference is a second model. (Found on
    TOFU: Robust_NPO with Robust_GradDiff's shipped robust options stopped at its first step with a KeyError.)"""
    cfg, bench, target, key, _, out = setup
    sd = {}
    for shared in (True, False):
        c = load_recipe(None, TINY + ROBUST + ["unlearn.robust_floor=[nf4]", "unlearn.per_method.Robust_NPO.robust_qat=true",
                                               "unlearn.per_method.Robust_NPO.robust_prune_view=0.3",
                                               "unlearn.per_method.Robust_NPO.steps=3",
                                               f"runtime.shared_reference={str(shared).lower()}",
                                               f"cache_dir={cfg['cache_dir']}"])
        path = unlearn(c, bench, target, key, "Robust_NPO", out / f"qat-ref-{shared}", Reference(target))
        meta = read_metadata(path)
        assert meta["reference"] == ("shared" if shared else "full copy") and meta["plan"]["final"]["qat"] is True
        sd[shared] = load_model(str(path))[0].state_dict()
    assert all(torch.equal(sd[True][k], sd[False][k]) for k in sd[True])
    _, wa = _weights(target)
    assert any(not torch.equal(wa[n], sd[True][n]) for n in wa)  # it moved something


@pytest.mark.parametrize("option", ["robust_qat=true", "stop_under=[nf4]"])
def test_one_process_options_refuse_a_multi_process_launch_in_one_line(setup, monkeypatch, option):
    """``stop_under`` on any multi-process launch, ``robust_qat`` under ZeRO-3 (DDP and ZeRO-2 run it:
    tests/test_distributed.py) stop before training in one line."""
    from accelerate.state import PartialState

    from robust_unlearn import engine
    from robust_unlearn.errors import UserError

    cfg, bench, target, key, ref, out = setup
    cfg2 = load_recipe(None, TINY + ROBUST + ["unlearn.robust_floor=[nf4]", f"unlearn.per_method.Robust_GradDiff.{option}",
                                              f"cache_dir={cfg['cache_dir']}"])
    PartialState()  # initialized before its property is patched
    monkeypatch.setattr(PartialState, "num_processes", property(lambda self: 2), raising=False)
    if option.startswith("robust_qat"):
        monkeypatch.setattr(engine, "zero_stage", lambda: 3)
    with pytest.raises(UserError) as exc:
        unlearn(cfg2, bench, target, key, "Robust_GradDiff", out / "two", ref)
    assert "\n" not in str(exc.value) and "one process" in str(exc.value) and option.split("=")[0] in str(exc.value)
    assert not (out / "two").exists() or not any((out / "two").iterdir())


def test_relearn_view_steps_every_linear_against_the_retain_gradient(setup):
    """``robust_relearn_view``: the view is the model after one sign step of size alpha down the retain NLL's
    gradient on every decoder linear weight (the deployed value for trained ones); the model itself is
    untouched, and a run with it trains, saves on the NF4 codes, and is refused where it cannot run."""
    from robust_unlearn.compress import compressible_linears
    from robust_unlearn.data import dataset_for
    from robust_unlearn.methods.losses import gdr
    from robust_unlearn.robust.update import RelearnView

    cfg, bench, target, key, ref, out = setup
    model, tok = load_model(str(target))
    for p in model.parameters():
        p.requires_grad_(False)
    ds = dataset_for(cfg, bench["retain"], tok)
    batch = ds.collate([ds[i] for i in range(4)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    alpha = 1e-5  # small enough for the first-order step to lower the retain NLL on this tiny model
    view = RelearnView(model, alpha, {}).of(model, batch)
    names = [f"{n}.weight" for n, _ in compressible_linears(model)]
    want = {}
    for n in names:
        w = dict(model.named_parameters())[n]
        w.requires_grad_(True)
    g = torch.autograd.grad(gdr(model, batch), [dict(model.named_parameters())[n] for n in names])
    for n, gn in zip(names, g):
        want[n] = before[n] - alpha * torch.sign(gn)
    assert all(torch.equal(view._tensors[n], want[n]) for n in names)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        assert float(gdr(view, batch)) < float(gdr(model, batch))  # the attack step lowers the retain NLL
    cfg2 = load_recipe(None, TINY + ROBUST + ["unlearn.robust_floor=[nf4]", "unlearn.per_method.Robust_GradDiff.robust_qat=true",
                                              "unlearn.per_method.Robust_GradDiff.robust_relearn_view=1e-3",
                                              f"cache_dir={cfg['cache_dir']}"])
    f0, _ = probs(cfg2, bench, target)
    ckpt = unlearn(cfg2, bench, target, key, "Robust_GradDiff", out / "qat_relearn", ref)
    meta = read_metadata(ckpt)
    assert meta["spec"]["settings"]["robust_relearn_view"] == 1e-3 and meta["plan"]["final"]["qat"] is True
    assert probs(cfg2, bench, ckpt)[0] < f0
    with pytest.raises(Exception, match="robust_relearn_view 0.001 needs robust_qat true"):
        load_recipe(None, ["unlearn.robust_relearn_view=1e-3"])


def test_qat_is_off_in_the_spec_of_earlier_checkpoints(setup):
    cfg, *_ = setup
    from robust_unlearn.unlearn import SPEC_OFF

    assert SPEC_OFF["robust_qat"] is False and cfg["unlearn"]["robust_qat"] is False


def test_prune_view_trains_through_the_pruned_model_and_restores_it(setup):
    """``robust_prune_view`` (with ``robust_qat``): through the view the model is the target-threshold pruned
    one (frozen linears' pruned copies, trained ones masked in their parametrization); the model itself is
    untouched, and one backward through both graphs gives the sum of the two passes' gradients."""
    from robust_unlearn.compress.prune import magnitude_prune
    from robust_unlearn.robust.update import PrunedView

    cfg, bench, target, key, ref, out = setup
    model, _ = load_model(str(target))
    pruned = magnitude_prune(load_model(str(target))[0], 0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    view = PrunedView(model, 0.3, {})
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        assert torch.equal(view.of(model)(input_ids=ids).logits, pruned(input_ids=ids).logits)  # = compress.prune
        assert not torch.equal(model(input_ids=ids).logits, pruned(input_ids=ids).logits)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    head = model.lm_head.weight  # trained here; not a decoder linear, so the view leaves it as it is
    head.requires_grad_(True)
    (model(input_ids=ids).logits.sum() + view.of(model)(input_ids=ids).logits.sum()).backward()
    one = head.grad.clone()
    head.grad = None
    model(input_ids=ids).logits.sum().backward()
    pruned.lm_head.weight.requires_grad_(True)
    pruned(input_ids=ids).logits.sum().backward()
    assert torch.allclose(one, head.grad + pruned.lm_head.weight.grad, atol=1e-5)
    cfg2 = load_recipe(None, TINY + ROBUST + ["unlearn.robust_floor=[nf4]", "unlearn.per_method.Robust_GradDiff.robust_qat=true",
                                              "unlearn.per_method.Robust_GradDiff.robust_prune_view=0.3",
                                              f"cache_dir={cfg['cache_dir']}"])
    f0, _ = probs(cfg2, bench, target)
    ckpt = unlearn(cfg2, bench, target, key, "Robust_GradDiff", out / "qat_prune", ref)
    assert read_metadata(ckpt)["spec"]["settings"]["robust_prune_view"] == 0.3
    assert probs(cfg2, bench, ckpt)[0] < f0
    with pytest.raises(Exception, match="robust_prune_view 0.3 needs robust_qat true"):
        load_recipe(None, ["unlearn.robust_prune_view=0.3"])


def test_saliency_moves_each_batch_to_the_models_device(monkeypatch):
    """The setup's gradient passes (saliency, attribution, retain Fisher) read a plain DataLoader, whose
    batches are on the CPU; the model is on the process's device. On a GPU they used to meet there and fail
    (index on cpu, weights on cuda:0: found on one H200 at 1B). On the CPU this checks the call."""
    from robust_unlearn.robust import saliency as S

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    monkeypatch.setattr(S, "linear_weights", lambda m: {"0.weight": m[0].weight})
    sent = []
    real = S.send_to_device
    monkeypatch.setattr(S, "send_to_device", lambda b, d: (sent.append(d), real(b, d))[1])
    batches = [{"x": torch.ones(2, 3)}, {"x": torch.zeros(1, 3)}]
    S.forget_scores(model, lambda m, b: m(b["x"]).sum(), batches)
    assert sent == [model[0].weight.device] * 2


def test_sparse_update_follows_the_engine_to_its_device():
    """Under DeepSpeed the step rule starts on the CPU (masks, target values, gradient hooks) and the engine
    then moves the model to the process's GPU: ``attach`` moves them after it, so the hooks, the revert of
    unmasked weights and a resumed null-space history meet the weights on one device. The meta device
    stands in for the GPU here (it refuses CPU operands as CUDA does)."""
    from robust_unlearn.engine import _Plain
    from robust_unlearn.robust.update import SparseUpdate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    upd = SparseUpdate(model, {"0.weight": torch.rand(3, 4) > 0.5}, nullspace=2)
    upd.start()  # on the CPU, as under DeepSpeed before acc.prepare
    state = {"steps": 1, "retain": [torch.ones(int(upd.masks["0.weight"].sum()))]}
    with torch.device("meta"):  # the engine's model: the same parameters, placed on its device
        placed = torch.nn.Sequential(torch.nn.Linear(4, 3))
    upd.attach(_Plain(), placed)
    upd.load_state_dict(state)  # a resumed run's history, saved from another device
    placed(torch.ones(2, 4, device="meta")).sum().backward()  # the hook masks a meta gradient
    upd.after_step()  # keeps masked weights, reverts the rest: torch.where on one device
    assert {t.device.type for t in [*upd.masks.values(), *upd.w0.values(), *upd._retain]} == {"meta"}
    assert placed[0].weight.grad.device.type == "meta"
