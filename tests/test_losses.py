"""Unlearning losses against hand-computed values on the fixed-logit model (issue 3 groundwork)."""
import math

import pytest
import torch
from conftest import fixed_logit_model

from robust_unlearn.data.collate import QAFormatter, collate_qa
from robust_unlearn.errors import UserError
from robust_unlearn.methods.losses import ga, gdr, klr, npo, simnpo, unlearning_objective


@pytest.fixture()
def setup(fixed_model):
    model, tok = fixed_model
    fmt = QAFormatter(tok, prompt="qa")
    batch = collate_qa([fmt.encode("q1", "a b"), fmt.encode("q2", "c")], fmt.pad_id)
    return model, batch


# token NLLs of the two answers (+ </s>): "a b" -> 0.5, 0.6, 0.7; "c" -> 0.125, 0.4
S1, S2 = -math.log(0.5 * 0.6 * 0.7), -math.log(0.125 * 0.4)


def test_ga_and_gdr(setup):
    model, batch = setup
    assert gdr(model, batch).item() == pytest.approx((S1 + S2) / 5, rel=1e-5)
    assert ga(model, batch).item() == pytest.approx(-(S1 + S2) / 5, rel=1e-5)


def test_npo_against_a_reference_is_log2_scaled_at_the_start(setup):
    model, batch = setup
    # model == reference: log ratio 0, loss = -(2/beta) log sigmoid(0) = (2/beta) log 2
    assert npo(model, batch, ref=model, beta=0.1).item() == pytest.approx(20 * math.log(2), rel=1e-5)


def test_npo_with_a_different_reference(setup):
    model, batch = setup
    ref, _ = fixed_logit_model()
    with torch.no_grad():
        ref.lm_head.weight.zero_()  # uniform next-token distribution over 12 tokens
    r1, r2 = 3 * math.log(12), 2 * math.log(12)
    beta = 0.1
    want = -2 / beta * (math.log(1 / (1 + math.exp(-beta * (S1 - r1)))) + math.log(1 / (1 + math.exp(-beta * (S2 - r2))))) / 2
    assert npo(model, batch, ref=ref, beta=beta).item() == pytest.approx(want, rel=1e-5)
    # KL(ref || model) on answer tokens, ref uniform: mean over 5 tokens of sum_v u (log u - log p)
    p_rows = [model.lm_head.weight[:, i] for i in batch["input_ids"][0, 2:5].tolist() + batch["input_ids"][1, 2:4].tolist()]
    kl = sum((torch.full((12,), 1 / 12) * (math.log(1 / 12) - torch.log_softmax(r, -1))).sum().item() for r in p_rows) / 5
    assert klr(model, batch, ref=ref).item() == pytest.approx(kl, rel=1e-5)


def test_simnpo(setup):
    model, batch = setup
    beta, delta = 4.5, 0.2
    want = sum(-2 / beta * math.log(1 / (1 + math.exp(-beta * (s / n - delta)))) for s, n in ((S1, 3), (S2, 2))) / 2
    assert simnpo(model, batch, beta=beta, delta=delta).item() == pytest.approx(want, rel=1e-5)


def test_objective_composition(setup):
    model, batch = setup
    obj = unlearning_objective("GradDiff", gamma=2.0, alpha=0.5)
    got = obj(model, {"forget": batch, "retain": batch}).item()
    assert got == pytest.approx(2.0 * -(S1 + S2) / 5 + 0.5 * (S1 + S2) / 5, rel=1e-5)
    assert obj.streams == ("forget", "retain") and not obj.needs_ref
    assert unlearning_objective("NPO_KLR").needs_ref
    with pytest.raises(UserError, match="unknown method 'GradDif'"):
        unlearning_objective("GradDif")
