"""The metric catalogue (metrics.mia) hand-checked on the fixed-logit model, whose next-token
distribution is BIGRAM by construction; the AUCs against a rank statistic computed with scipy."""
import math
import zlib

import numpy as np
import pytest
import torch
from conftest import WORDS, bigram_prob
from scipy import stats

from robust_unlearn.data.collate import QAFormatter
from robust_unlearn.metrics import mia
from robust_unlearn.metrics.tofu import Evaluator, OracleReference, SplitStats

FORGET = [("q1", "a b"), ("q2", "a c")]
HOLDOUT = [("q1", "b c"), ("q2", "c"), ("q1", "b")]


def tokens(answer):
    """(prev, token) of each answer token after "Answer:", the EOS included."""
    ws = answer.split() + ["</s>"]
    return list(zip(["Answer:"] + ws[:-1], ws))


def by_hand(answer, ref_nll=None):
    pairs = tokens(answer)
    lp = [math.log(bigram_prob(p, t)) for p, t in pairs]
    core = pairs[:-1]  # before the end-of-turn (EOS) token
    core_lp = lp[:-1]
    n_k = max(1, int(len(core) * 0.4))
    zs = []
    for (prev, tok), l in zip(core, core_lp):
        row = np.array([bigram_prob(prev, w) for w in WORDS])
        mu = float((row * np.log(row)).sum())
        sd = math.sqrt(max(float((row * np.log(row) ** 2).sum()) - mu * mu, 1e-6))
        zs.append((l - mu) / sd)
    loss = -sum(lp) / len(lp)
    out = {"mia_loss": loss, "mia_zlib": loss / len(zlib.compress(answer.encode())),
           "mia_min_k": -float(np.mean(sorted(core_lp)[:n_k])), "mia_min_k_plus_plus": -float(np.mean(sorted(zs)[:n_k]))}
    if ref_nll is not None:
        out["mia_reference"] = loss - ref_nll
    hits = [max(WORDS, key=lambda w: bigram_prob(p, w)) == t for p, t in core]
    return out, hits


@pytest.fixture()
def setup(fixed_model):
    model, tok = fixed_model
    return model, Evaluator(QAFormatter(tok, prompt="qa"), batch_size=2, catalogue=True)


def rows_of(pairs):
    return [{"question": q, "answer": a} for q, a in pairs]


def test_catalogue_by_hand(setup):
    model, ev = setup
    rows = {"forget": rows_of(FORGET), "holdout": rows_of(HOLDOUT)}
    per = {s: SplitStats(prob=np.ones(len(rows[s]))) for s in rows}
    ref_f, ref_h = np.array([1.0, 2.0]), np.array([0.5, 1.5, 2.5])  # the oracle's per-example answer NLLs
    ref = OracleReference(np.ones(2), ref_f, ref_h, min_k_auc=0.6)
    got = ev.catalogue_metrics(model, rows, per, ref)
    want_f = [by_hand(a, r) for (_, a), r in zip(FORGET, ref_f)]
    want_h = [by_hand(a, r) for (_, a), r in zip(HOLDOUT, ref_h)]
    for name in ("mia_loss", "mia_zlib", "mia_reference", "mia_min_k", "mia_min_k_plus_plus"):
        assert np.allclose(per["forget"].mia[name], [w[0][name] for w in want_f], rtol=1e-5), name
        assert np.allclose(per["holdout"].mia[name], [w[0][name] for w in want_h], rtol=1e-5), name
        f, h = per["forget"].mia[name], per["holdout"].mia[name]
        # ROC AUC = the Mann-Whitney U of holdout over forget / (n_f n_h)
        u = stats.mannwhitneyu(h, f).statistic / (len(f) * len(h))
        assert got[name] == pytest.approx(u), name
    assert got["privleak"] == pytest.approx((0.6 - got["mia_min_k"]) / (1 - 0.6) * 100)
    # memorization: "a b" -> a and b are the argmax (EM 1, ES 1); "a c" -> a yes, c no (EM 0.5, ES 1 - 1/2)
    assert [h for _, h in want_f] == [[True, True], [True, False]]
    assert got["exact_memorization"] == pytest.approx((1.0 + 0.5) / 2)
    assert got["extraction_strength"] == pytest.approx((1.0 + 0.5) / 2)
    assert mia.extraction_strength([False, False]) == 0.5 and mia.extraction_strength([False, True, True]) == 1 - 1 / 3


def test_gradnorm_is_the_mean_per_tensor_norm(setup):
    model, ev = setup
    from robust_unlearn.data.collate import collate_qa
    from robust_unlearn.scoring import token_nll

    rows = {"forget": rows_of(FORGET), "holdout": rows_of(HOLDOUT)}
    per = {s: SplitStats(prob=np.ones(len(rows[s]))) for s in rows}
    ev.catalogue_metrics(model, rows, per, None)
    q, a = FORGET[0]
    batch = collate_qa([ev.fmt.encode(q, a)], ev.fmt.pad_id)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    nll, mask = token_nll(model, batch)
    loss = nll[mask][:2].mean()  # the two answer tokens before EOS
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    want = np.mean([float(g.norm()) for g in grads if g is not None])
    assert per["forget"].mia["mia_gradnorm"][0] == pytest.approx(want, rel=1e-4)
    assert all(p.grad is None for p in params)  # nothing left behind


def test_oracle_is_its_own_reference(setup):
    model, ev = setup
    rows = {"forget": rows_of(FORGET), "holdout": rows_of(HOLDOUT)}
    per = {s: SplitStats(prob=np.ones(len(rows[s]))) for s in rows}
    got = ev.catalogue_metrics(model, rows, per, "self")
    assert got["mia_reference"] == 0.5 and got["privleak"] == pytest.approx(0.0)
    got = ev.catalogue_metrics(model, rows, per, None)  # no oracle: privleak against 0.5, no mia_reference
    assert "mia_reference" not in got and got["privleak"] == pytest.approx((0.5 - got["mia_min_k"]) / 0.5 * 100)
