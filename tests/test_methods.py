"""Every unlearning method, through the one training loop, on a tiny from-scratch target.

Bound (stated once, checked for every method): forget answer probability falls to <= 0.5x the
target's; for methods with a retain term (GradDiff, GA_KLR, NPO, NPO_KLR, SimNPO, RMU) the retain
answer probability stays >= 0.6x the target's. GA and NPO_ForgetOnly have no retain term: only the first part.
"""
import numpy as np
import pytest
import torch

from conftest import TINY

from robust_unlearn.config import load_recipe
from robust_unlearn.data.collate import formatter_for
from robust_unlearn.errors import TrainingDiverged, UserError
from robust_unlearn.metrics.tofu import Evaluator
from robust_unlearn.models import load_model, read_metadata
from robust_unlearn.unlearn import Reference, unlearn

RETAIN_TERM = {"GradDiff", "GA_KLR", "NPO", "NPO_KLR", "SimNPO", "RMU", "IdkDPO", "WGA", "SatImp"}
# open-unlearning's other methods (issue 14); UNDIAL (alpha 0 there) and CE-U have no retain term
OU_METHODS = ["IdkDPO", "UNDIAL", "WGA", "SatImp", "CE-U"]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    """The session's tiny fine-tuned target (conftest.tiny_models)."""
    t = tiny_models
    return t.cfg, t.bench, t.target, t.target_key, Reference(t.target), tmp_path_factory.mktemp("unlearned")


def probs(cfg, bench, path):
    model, tok = load_model(str(path))
    ev = Evaluator(formatter_for(tok, cfg))
    return [float(np.exp(-ev.mean_nll(model, [(r["question"], r["answer"]) for r in bench[s]])).mean())
            for s in ("forget", "retain")]


@pytest.mark.parametrize("method", ["GA", "GradDiff", "GA_KLR", "NPO_ForgetOnly", "NPO", "NPO_KLR", "SimNPO", "RMU"]
                         + OU_METHODS)
def test_method_forgets_and_keeps_retain(setup, method):
    cfg, bench, target, key, ref, out = setup
    f0, r0 = probs(cfg, bench, target)
    assert f0 > 0.6  # the target knows the forget set
    ckpt = unlearn(cfg, bench, target, key, method, out, ref)
    f1, r1 = probs(cfg, bench, ckpt)
    assert f1 <= 0.5 * f0, (method, f0, f1)
    if method in RETAIN_TERM:
        assert r1 >= 0.6 * r0, (method, r0, r1)
    meta = read_metadata(ckpt)
    assert meta["method"] == method and meta["precision"] == "fp32" and meta["update"]["mean_abs_dw"] > 0


def test_rmu_changes_only_the_named_parameters(setup):
    cfg, bench, target, key, ref, out = setup
    ckpt = unlearn(cfg, bench, target, key, "RMU", out, ref)
    a, _ = load_model(target)
    b, _ = load_model(str(ckpt))
    changed = {n for (n, p), q in zip(a.named_parameters(), b.parameters()) if not torch.equal(p, q)}
    assert changed and all(".mlp." in n and n.split(".")[2] in ("0", "1") for n in changed)


def test_reference_is_loaded_once_and_reused(setup, monkeypatch):
    cfg, bench, target, key, _, out = setup
    import robust_unlearn.unlearn as U

    calls = []
    real = U.load_model
    monkeypatch.setattr(U, "load_model", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    ref = Reference(target)
    cfg2 = load_recipe(None, TINY + ["unlearn.steps=2", "runtime.shared_reference=false",
                                     f"cache_dir={cfg['cache_dir']}"])
    for m in ("NPO", "NPO_KLR", "RMU"):
        unlearn(cfg2, bench, target, key, m, out / "once", ref)
    assert calls.count(target) == 4  # 3 models to train + 1 full reference copy, loaded once
    calls.clear()
    cfg3 = load_recipe(None, TINY + ["unlearn.steps=2", f"cache_dir={cfg['cache_dir']}"])
    for m in ("NPO_KLR", "RMU"):
        unlearn(cfg3, bench, target, key, m, out / "shared", Reference(target))
    assert calls.count(target) == 2  # the shared reference loads nothing


@pytest.mark.parametrize("method", ["RMU", "NPO_KLR", "SURE_NPO_KLR", "Robust_RMU"])
def test_shared_reference_gives_the_full_copy_weights(setup, method):
    """The reference from frozen copies of the trained tensors computes exactly what a second model
    does (fp32): the unlearned weights are bit-identical."""
    cfg, bench, target, key, _, out = setup
    sd = {}
    for shared in (True, False):
        c = load_recipe(None, TINY + ["unlearn.steps=3", "unlearn.per_method.SURE_NPO_KLR.steps=3",
                                      f"runtime.shared_reference={str(shared).lower()}",
                                      f"cache_dir={cfg['cache_dir']}"])
        path = unlearn(c, bench, target, key, method, out / f"ref-{shared}", Reference(target))
        assert read_metadata(path)["reference"] == ("shared" if shared else "full copy")
        sd[shared] = load_model(str(path))[0].state_dict()
    assert all(torch.equal(sd[True][k], sd[False][k]) for k in sd[True])


def test_shared_reference_and_sparse_masks_follow_the_model_to_its_device(setup):
    """The loop moves the model to the accelerator after the shared reference froze its copies and the
    step rule made its masks; on an H200 both stayed on the CPU (`mat2 is on cpu`). The only other
    device here is ``meta`` (shapes only): the reference's copies and the step rule's masks follow the
    weights there."""
    from robust_unlearn.robust.update import SparseUpdate
    from robust_unlearn.unlearn import SharedReference

    cfg, bench, target, *_ = setup
    model, _ = load_model(str(target))
    name, w = next((n, p) for n, p in model.named_parameters() if n.endswith("mlp.down_proj.weight"))
    for p in model.parameters():
        p.requires_grad_(False)
    w.requires_grad_(True)
    step = SparseUpdate(model, {name: torch.ones_like(w, dtype=torch.bool)})
    step.params[name] = torch.nn.Parameter(w.detach().to("meta"))  # the weight, since moved
    step.start()
    assert step.masks[name].device.type == "meta" and step.w0[name].device.type == "meta"
    shared = SharedReference(model, fallback=None)
    assert shared.freeze() == w.numel()
    model.to("meta")
    shared(input_ids=torch.tensor([[1, 2, 3]], device="meta"))
    assert shared._orig[name].device.type == "meta"


def test_precision_is_recorded_and_bf16_saves_bf16(setup):
    cfg, bench, target, key, ref, out = setup
    cfg2 = load_recipe(None, TINY + ["unlearn.steps=2", "unlearn.precision=bf16", f"cache_dir={cfg['cache_dir']}"])
    meta = read_metadata(unlearn(cfg2, bench, target, key, "GradDiff", out / "bf16", ref))
    assert meta["precision"] == "bf16" and meta["saved_dtype"] == "bfloat16"


def test_diverging_ga_is_one_clear_error_and_saves_nothing(setup):
    cfg, bench, target, key, ref, out = setup
    cfg2 = load_recipe(None, TINY + ["unlearn.lr=1e4", "unlearn.grad_clip=0", "unlearn.steps=60",
                                     f"cache_dir={cfg['cache_dir']}"])
    with pytest.raises(TrainingDiverged, match="unlearn GA: loss became"):
        unlearn(cfg2, bench, target, key, "GA", out / "nan", ref)
    assert not (out / "nan").exists() or not any(p.name.startswith("GA") for p in (out / "nan").iterdir())


def test_early_stop_at_forget_probability(setup):
    cfg, bench, target, key, ref, out = setup
    cfg2 = load_recipe(None, TINY + ["unlearn.per_method.GradDiff.stop_forget_prob=0.5", "unlearn.stop_every=1",
                                     f"cache_dir={cfg['cache_dir']}"])
    meta = read_metadata(unlearn(cfg2, bench, target, key, "GradDiff", out / "stop", ref))
    hist = meta["forget_prob_history"]
    assert hist[-1][1] <= 0.5 and all(p > 0.5 for _, p in hist[:-1]) and meta["steps"] == hist[-1][0] < 60


@pytest.mark.parametrize("over,msg", [
    (["unlearn.methods=[GradDiff,Forgetful]"], "unlearn.methods: unknown method 'Forgetful'"),
    (["unlearn.per_method.NPO.lrr=1"], "unknown recipe key 'unlearn.per_method.NPO.lrr'"),
    (["sweep.compressions=[nf4,int3]"], "sweep.compressions: unknown compression 'int3'"),
])
def test_bad_method_or_compression_names(over, msg):
    with pytest.raises(UserError, match=msg):
        load_recipe(None, over)


@pytest.mark.parametrize("method", ["SURE_IdkDPO", "Robust_UNDIAL", "Robust_CE-U"])
def test_open_unlearning_methods_wrap_as_sure_and_robust(setup, method):
    """The wrappers take any base: SURE trains only the salient modules, Robust also floors them."""
    cfg, bench, target, key, ref, out = setup
    cfg = load_recipe(None, [f"cache_dir={cfg['cache_dir']}"] + TINY + [
        "unlearn.sure_percentile=50", f"unlearn.per_method.{method}.steps=4", f"unlearn.per_method.{method}.stop_forget_prob=null"])
    ckpt = unlearn(cfg, bench, target, key, method, out, ref)
    meta = read_metadata(ckpt)
    salient = set(meta["plan"]["salient"])
    a, _ = load_model(str(target))
    b, _ = load_model(str(ckpt))
    changed = {n for (n, p), q in zip(a.named_parameters(), b.parameters()) if not torch.equal(p, q)}
    assert meta["method"] == method and changed and changed <= salient, (changed - salient)


def test_open_unlearning_names_are_aliases():
    """open-unlearning's method names are accepted and resolved: its NPO has an NLL retain term here too."""
    from robust_unlearn.methods import METHODS, canonical_method

    cfg = load_recipe(None, ["unlearn.methods=[GradAscent,NPO_GDR,DPO,CEU,SURE_GradAscent]",
                             "unlearn.per_method.CEU.lr=3e-5"])
    assert cfg["unlearn"]["methods"] == ["GA", "NPO", "IdkDPO", "CE-U", "SURE_GA"]
    assert cfg["unlearn"]["per_method"]["CE-U"]["lr"] == 3e-5 and "CEU" not in cfg["unlearn"]["per_method"]
    assert METHODS["NPO"] == ("npo", "gdr") and METHODS["NPO_ForgetOnly"] == ("npo", None)
    assert canonical_method("GradDiff") == "GradDiff"


def test_reference_terms_run_where_the_reference_is():
    """A reference on another device than the batch (a DeepSpeed launch's setup: the model still on the
    CPU, a whole reference on the GPU) scores the batch on its own device and hands back the batch's: the
    meta device stands in for the GPU (it refuses CPU operands as CUDA does), so the call fails only if a
    CPU tensor reaches the reference."""
    from robust_unlearn.methods import losses as L

    calls = []

    class Ref(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, device="meta"))

        def forward(self, input_ids, attention_mask):
            calls.append((input_ids.device.type, attention_mask.device.type))
            return input_ids.float() + self.w

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    with pytest.raises(NotImplementedError):  # handed back: meta holds no data to copy to the CPU
        L._with_ref(Ref(), lambda r, b: r(**b), batch)
    assert calls == [("meta", "meta")]
    same = {k: v.to("meta") for k, v in batch.items()}
    assert L._with_ref(Ref(), lambda r, b: r(**b), same).device.type == "meta"
