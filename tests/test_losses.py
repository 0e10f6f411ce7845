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


# ---- open-unlearning's other methods (issue 14), hand-computed from BIGRAM --------------------------
from conftest import WORDS, bigram_prob  # noqa: E402

from robust_unlearn.methods.losses import ceu, dpo, satimp, undial, wga  # noqa: E402

P_TOKENS = [0.5, 0.6, 0.7, 0.125, 0.4]  # the answer tokens' probabilities (see S1, S2)


def test_wga_and_satimp(setup):
    model, batch = setup
    nll = [-math.log(p) for p in P_TOKENS]
    beta = 1.5
    want = -sum(p ** beta * n for p, n in zip(P_TOKENS, nll)) / 5
    assert wga(model, batch, beta=beta).item() == pytest.approx(want, rel=1e-5)
    b1, b2 = 5.0, 1.0
    want = -sum(p ** b1 * (1 - p) ** b2 * n for p, n in zip(P_TOKENS, nll)) / 5
    assert satimp(model, batch, beta1=b1, beta2=b2).item() == pytest.approx(want, rel=1e-5)


def _row(prev):
    return [bigram_prob(prev, w) for w in WORDS]


def test_ceu_ignores_the_first_answer_token(setup):
    model, batch = setup
    # trained positions: "b" after "a", "</s>" after "b" (example 1), "</s>" after "c" (example 2)
    terms = []
    for prev, y in (("a", "b"), ("b", "</s>"), ("c", "</s>")):
        p = _row(prev)
        k = WORDS.index(y)
        q = [0.0 if v == k else p[v] / (1 - p[k]) for v in range(len(WORDS))]
        terms.append(-sum(qv * math.log(p[v]) for v, qv in enumerate(q) if qv))
    assert ceu(model, batch, ignore_first=1).item() == pytest.approx(sum(terms) / 3, rel=1e-5)
    # ignore nothing: also "a" after "Answer:" and "c" after "Answer:"
    assert ceu(model, batch, ignore_first=0).item() != pytest.approx(sum(terms) / 3, rel=1e-3)


def test_idkdpo_prefers_the_alternate(setup, fixed_model):
    model, batch = setup
    _, tok = fixed_model
    fmt = QAFormatter(tok, prompt="qa")
    batch = dict(batch, alternate=collate_qa([fmt.encode("q1", "c"), fmt.encode("q2", "a b")], fmt.pad_id))
    ref, _ = fixed_logit_model()
    with torch.no_grad():
        ref.lm_head.weight.zero_()  # uniform: log p_ref = -log 12 per token
    r1, r2 = 3 * math.log(12), 2 * math.log(12)
    beta = 0.1
    margins = [(r2 - S2) - (r1 - S1), (r1 - S1) - (r2 - S2)]  # (logp_w - logp_ref_w) - (logp_l - logp_ref_l)
    want = -2 / beta * sum(math.log(1 / (1 + math.exp(-beta * m))) for m in margins) / 2
    assert dpo(model, batch, ref=ref, beta=beta).item() == pytest.approx(want, rel=1e-5)
    # against itself: every margin 0 -> (2/beta) log 2
    assert dpo(model, batch, ref=model, beta=beta).item() == pytest.approx(20 * math.log(2), rel=1e-5)


def test_undial_distills_from_the_shifted_teacher(setup):
    model, batch = setup
    beta = 3.0
    ids, labels, att = batch["input_ids"], batch["labels"], batch["attention_mask"]
    terms = []
    for i in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not att[i, t + 1]:
                continue
            p = _row(WORDS[ids[i, t]])
            z = [math.log(x) for x in p]
            if labels[i, t + 1] != -100:
                z[int(labels[i, t + 1])] -= beta
            m = max(z)
            e = [math.exp(x - m) for x in z]
            q = [x / sum(e) for x in e]
            terms.append(-sum(qv * math.log(pv) for qv, pv in zip(q, p)))
    assert undial(model, batch, ref=model, beta=beta).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_kl_retain_over_all_positions(setup):
    model, batch = setup
    ref, _ = fixed_logit_model()
    with torch.no_grad():
        ref.lm_head.weight.zero_()  # uniform reference
    ids, att = batch["input_ids"], batch["attention_mask"]
    rows = [ids[i, t].item() for i in range(ids.shape[0]) for t in range(ids.shape[1]) if att[i, t]]
    kl = sum(sum(1 / 12 * (math.log(1 / 12) - math.log(bigram_prob(WORDS[r], w))) for w in WORDS) for r in rows) / len(rows)
    assert klr(model, batch, ref=ref, positions="all").item() == pytest.approx(kl, rel=1e-5)
    assert klr(model, batch, ref=ref, positions="answer").item() != pytest.approx(kl, rel=1e-3)
