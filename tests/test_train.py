import math

import pytest
import torch

from robust_unlearn.config import load_recipe
from robust_unlearn.data import load_benchmark
from robust_unlearn.data.collate import IGNORE, QADataset, QAFormatter, collate_qa
from robust_unlearn.errors import TrainingDiverged
from robust_unlearn.methods import get_objective
from robust_unlearn.models import load_model, tiny_base
from robust_unlearn import pipeline
from robust_unlearn.train import LengthGroupedBatches, train

TINY = ["model.base=tiny", "model.prompt=qa", "data.num_authors=4", "data.qa_per_author=3",
        "data.forget_split=forget25", "finetune.precision=fp32"]


@pytest.fixture()
def tiny(cache_dir):
    cfg = load_recipe(None, TINY)
    bench = load_benchmark(cfg)
    texts = [t for r in bench["train_target"] for t in (r["question"], r["answer"])]
    model, tok = load_model(str(tiny_base(cache_dir, texts)))
    return cfg, bench, model, tok


def test_labels_cover_answer_and_end_token_and_mask_comes_from_lengths(tiny):
    _, _, _, tok = tiny
    fmt = QAFormatter(tok, prompt="qa")
    tok.pad_token = tok.eos_token  # the open-unlearning #128 trap: pad == EOS
    q = "Who wrote </s> this?"  # an EOS-like token inside the prompt
    ids, n_prompt = fmt.encode(q, "Me.")
    batch = collate_qa([(ids, n_prompt), fmt.encode("Hi?", "A longer answer here.")], tok.pad_token_id)
    assert batch["attention_mask"][0].sum().item() == len(ids)  # the in-prompt EOS is attended
    lab = batch["labels"][0]
    assert (lab[:n_prompt] == IGNORE).all() and lab[len(ids) - 1].item() == tok.eos_token_id
    assert tok.decode(lab[n_prompt:len(ids) - 1]).strip() == "Me."
    assert (lab[len(ids):] == IGNORE).all()


def test_length_grouped_batches_cover_every_row_once_per_epoch():
    lengths = [5, 9, 3, 7, 1, 8, 2, 6, 4, 10, 11]
    s = LengthGroupedBatches(lengths, 3, torch.Generator().manual_seed(0), group=2)
    batches = list(iter(s))
    assert sorted(i for b in batches for i in b) == list(range(11)) and len(batches) == len(s)
    assert batches != list(iter(s))  # a new order next epoch


def test_finetune_lowers_loss(tiny):
    cfg, bench, model, tok = tiny
    ds = QADataset(bench["train_target"], QAFormatter(tok, prompt="qa"))
    ft = dict(cfg["finetune"], lr=3e-3, epochs=6, batch_size=4)
    model, losses = train(model, get_objective("nll"), {"train": ds}, ft)
    assert math.fsum(losses[-3:]) / 3 < 0.7 * math.fsum(losses[:3]) / 3


def test_min_steps_lengthens_a_short_epoch_budget_only(tiny):
    cfg, bench, model, tok = tiny
    ds = QADataset(bench["train_target"], QAFormatter(tok, prompt="qa"))
    n = math.ceil(len(bench["train_target"]) / 4)  # batches in one epoch
    ft = dict(cfg["finetune"], lr=1e-5, epochs=1, batch_size=4, steps=None)

    def steps(**kw):
        return len(train(model, get_objective("nll"), {"train": ds}, dict(ft, **kw))[1])

    assert steps(min_steps=0) == n
    assert steps(min_steps=n + 2) == n + 2
    assert steps(epochs=2, min_steps=n + 2) == 2 * n
    assert steps(steps=2, min_steps=n + 2) == 2


def test_nan_loss_stops_and_saves_nothing(tiny, cache_dir, monkeypatch):
    cfg, bench, _, _ = tiny
    cfg = dict(cfg, cache_dir=str(cache_dir / "nan"))

    def nan_objective(model, batches):
        return get_objective("nll")(model, batches) * float("nan")

    monkeypatch.setattr(pipeline, "get_objective", lambda name: nan_objective)
    base = tiny_base(cache_dir, [t for r in bench["train_target"] for t in (r["question"], r["answer"])])
    with pytest.raises(TrainingDiverged, match="loss became nan at step 1"):
        pipeline.finetune_cached(cfg, bench, "target", base)
    models = cache_dir / "nan" / "models"
    assert not models.exists() or not any(models.iterdir())


def test_unknown_objective_is_a_clear_error():
    from robust_unlearn.errors import UserError

    with pytest.raises(UserError, match="unknown method 'gradascent'"):
        get_objective("gradascent")


def test_precision_records_what_ran():
    """DeepSpeed's bf16 mode keeps fp32 master weights: recorded as such, not as pure bf16."""
    from accelerate.utils import DistributedType

    from robust_unlearn.train import precision_ran

    assert precision_ran("bf16", DistributedType.DEEPSPEED) == "bf16+fp32-master"
    assert precision_ran("bf16", DistributedType.NO) == "bf16"
    assert precision_ran("mixed", DistributedType.DEEPSPEED) == "mixed"
    assert precision_ran("fp32", DistributedType.MULTI_GPU) == "fp32"


@pytest.mark.parametrize("method", ["GradDiff", "SimNPO", "IdkDPO"])
def test_gradient_accumulation_equals_the_whole_batch(tiny, method):
    """unlearn.grad_accum: a step's batch as micro-batches, gradients accumulated, gives the update of
    the whole batch (token means rescaled to the batch's, as across processes)."""
    import copy

    from robust_unlearn.data import dataset_for
    from robust_unlearn.methods import build_objective

    cfg, _, model, tok = tiny
    cfg = load_recipe(None, TINY + ["data.qa_per_author=4"])  # 4 forget rows, 12 retain rows: whole batches of 4
    bench = load_benchmark(cfg)
    ref = copy.deepcopy(model).eval()
    out = []
    for accum in (1, 2, 4):
        m = copy.deepcopy(model)
        obj = build_objective(method, {**_settings(cfg), "grad_accum": accum}, m, ref=ref)
        streams = {"forget": dataset_for(cfg, bench["forget"], tok, getattr(obj, "alternate", None)),
                   "retain": dataset_for(cfg, bench["retain"], tok)}
        tcfg = {**_settings(cfg), "lr": 1e-3, "batch_size": 4, "steps": 3, "precision": "fp32", "grad_accum": accum,
                "weight_decay": 0.0, "warmup_ratio": 0.0, "schedule": "constant", "grad_clip": 0.0}
        m, losses = train(m, obj, streams, tcfg, seed=0, primary="forget")
        out.append((torch.cat([p.detach().flatten() for p in m.parameters()]), losses))
    for w, losses in out[1:]:
        # within a tenth of one lr-1e-3 step: only the order of float sums differs, which Adam's
        # normalisation magnifies on gradients near zero (measured: <= 4e-5)
        assert torch.allclose(w, out[0][0], atol=1e-4), (method, float((w - out[0][0]).abs().max()))
        assert losses == pytest.approx(out[0][1], rel=1e-4, abs=1e-6)


def _settings(cfg):
    from robust_unlearn.config import method_settings

    return dict(method_settings(cfg, "GradDiff"))


def test_gradient_accumulation_must_divide_the_batch(tiny):
    cfg, bench, model, tok = tiny
    from robust_unlearn.data import dataset_for
    from robust_unlearn.errors import UserError

    tcfg = {**_settings(cfg), "batch_size": 4, "steps": 1, "precision": "fp32", "grad_accum": 3}
    with pytest.raises(UserError, match="multiple of grad_accum 3"):
        train(model, get_objective("nll"), {"train": dataset_for(cfg, bench["retain"], tok)}, tcfg)


@pytest.mark.parametrize("method", ["GradDiff", "NPO"])
def test_gradient_checkpointing_gives_the_same_update(tiny, method):
    """unlearn.gradient_checkpointing recomputes each layer in backward: the same losses and weights as
    without it, and the returned model has it switched off again."""
    import copy

    from robust_unlearn.data import dataset_for
    from robust_unlearn.methods import build_objective

    cfg, bench, model, tok = tiny
    ref = copy.deepcopy(model).eval()
    out = []
    for ckpt in (False, True):
        m = copy.deepcopy(model)
        obj = build_objective(method, _settings(cfg), m, ref=ref)
        streams = {"forget": dataset_for(cfg, bench["forget"], tok), "retain": dataset_for(cfg, bench["retain"], tok)}
        tcfg = {**_settings(cfg), "lr": 1e-3, "batch_size": 4, "steps": 3, "precision": "fp32",
                "gradient_checkpointing": ckpt}
        m, losses = train(m, obj, streams, tcfg, seed=0, primary="forget")
        assert not getattr(m, "is_activation_checkpointing", getattr(m, "is_gradient_checkpointing", False))
        out.append((torch.cat([p.detach().flatten() for p in m.parameters()]), losses))
    assert torch.allclose(out[1][0], out[0][0], atol=1e-5), float((out[1][0] - out[0][0]).abs().max())
    assert out[1][1] == pytest.approx(out[0][1], rel=1e-5, abs=1e-6)
