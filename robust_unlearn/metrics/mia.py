"""open-unlearning's privacy and memorization catalogue (locuslab/open-unlearning@d3d7cf9:
src/evals/metrics/mia/*.py, privacy.py, memorization.py), on QA pairs.

Membership-inference attacks score every forget and every holdout example; each score is "like a
loss" (higher = less likely a member), and the ledger value ``mia_<attack>`` is the ROC AUC of telling
holdout (label 1) from forget (label 0): 1.0 = the forget set is recognised as training data, 0.5 =
indistinguishable (the ideal for a model that never saw it).

Per example, with ``nll_t`` the NLL of answer token t given the question and the answer before it:
- ``mia_loss``: the mean NLL over every answer token, the end-of-turn tokens included (the TOFU
  answer probability's own NLL);
- ``mia_zlib``: that mean NLL / the zlib-compressed length (bytes, default level) of the answer text;
- ``mia_reference``: that mean NLL minus the reference model's (the retain oracle's, uncompressed);
- ``mia_min_k`` (Shi et al. 2023): minus the mean of the ``max(1, int(k n))`` lowest token
  log-probabilities, k = 0.4 (open-unlearning's configs), over the n answer tokens before the
  end-of-turn tokens (open-unlearning drops the last labelled token, its EOS);
- ``mia_min_k_plus_plus`` (Zhang et al. 2024): the same over ``z_t = (log p(y_t) - mu_t) / sigma_t``,
  ``mu_t`` and ``sigma_t^2`` (>= 1e-6) the mean and variance of log p under p at position t;
- ``mia_gradnorm``: the mean over parameter tensors of the L2 norm of the gradient of the mean NLL
  (same tokens as Min-K), one example at a time.
``privleak`` = (AUC_r - AUC) / (1 - AUC_r + 1e-10) x 100 from ``mia_min_k``, AUC_r the retain oracle's
(0.5 without one): 0 = like the oracle, -100 = a model that memorised the forget set.

Memorization on the forget answers, teacher forced (no generation), over the tokens Min-K uses:
- ``exact_memorization``: the share of them the model's argmax predicts;
- ``extraction_strength``: 1 - k/n for the smallest k such that the argmax predictions of tokens
  k..n-1 are all right (Carlini et al.'s extraction as open-unlearning measures it; like it, 1/n when
  only the last token or none matches).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

MIN_K = 0.4
ATTACKS = ("mia_loss", "mia_zlib", "mia_reference", "mia_min_k", "mia_min_k_plus_plus", "mia_gradnorm")
MEMORIZATION = ("exact_memorization", "extraction_strength")
METRICS = ATTACKS + ("privleak",) + MEMORIZATION
NO_ORACLE_AUC = 0.5  # open-unlearning's privleak ref_value without retain logs


def auc(negatives, positives) -> float:
    """ROC AUC of scores, positives labelled 1: P(pos > neg) + P(pos = neg) / 2."""
    neg, pos = np.asarray(negatives, dtype=np.float64), np.asarray(positives, dtype=np.float64)
    if neg.size == 0 or pos.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def privleak(auc_model: float, auc_ref: float) -> float:
    """In percent; the 1e-10 keeps an oracle at AUC 1 finite (open-unlearning's privleak)."""
    return ((1.0 - auc_model) - (1.0 - auc_ref)) / (1.0 - auc_ref + 1e-10) * 100.0


def min_k_score(values, k: float = MIN_K) -> float:
    """Minus the mean of the lowest ``max(1, int(k n))`` values (0 for none)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return 0.0
    n = max(1, int(len(v) * k))
    return -float(np.mean(np.sort(v)[:n]))


def zlib_score(mean_nll: float, text: str) -> float:
    return mean_nll / len(zlib.compress(text.encode("utf-8")))


def extraction_strength(hits) -> float:
    """``hits``: per token, whether the argmax predicts it. 1 - k/n for the first k whose suffix is all
    hits (k stops at n - 1, as open-unlearning's loop); 0 for no tokens."""
    h = np.asarray(hits, dtype=bool)
    n = h.size
    if n == 0:
        return 0.0
    k = 0
    while k < n - 1 and not h[k:].all():
        k += 1
    return 1.0 - k / n


@dataclass
class TokenDetail:
    """One QA pair, per answer token: log p of the token (``lp``), the mean and standard deviation of
    log p under p at that position (``mu``, ``sigma``), whether the argmax predicts it (``hit``);
    ``n_core``: how many leading tokens are the answer itself (before the end-of-turn tokens)."""
    lp: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    hit: np.ndarray
    n_core: int

    @property
    def mean_nll(self) -> float:
        return float(-self.lp.mean()) if self.lp.size else 0.0


def example_scores(d: TokenDetail, answer: str, gradnorm: float | None, ref_nll: float | None,
                   k: float = MIN_K) -> dict[str, float]:
    """The per-example score of every attack (``ref_nll`` None: no reference score; ``gradnorm`` None:
    not computed)."""
    c = slice(0, d.n_core)
    out = {"mia_loss": d.mean_nll, "mia_zlib": zlib_score(d.mean_nll, answer),
           "mia_min_k": min_k_score(d.lp[c], k),
           "mia_min_k_plus_plus": min_k_score((d.lp[c] - d.mu[c]) / d.sigma[c], k)}
    if ref_nll is not None:
        out["mia_reference"] = d.mean_nll - ref_nll
    if gradnorm is not None:
        out["mia_gradnorm"] = gradnorm
    return out


def memorization(d: TokenDetail) -> dict[str, float]:
    hits = d.hit[: d.n_core]
    return {"exact_memorization": float(hits.mean()) if hits.size else float("nan"),
            "extraction_strength": extraction_strength(hits)}
