"""Text classifiers as metrics: open-unlearning's ``classifier_prob`` (locuslab/open-unlearning@d3d7cf9:
src/evals/metrics/utility.py), which its ``forget_Q_A_gibberish`` (TOFU) and ``forget_gibberish`` (MUSE)
run with a gibberish detector (configs/eval/{tofu,muse}_metrics/). The classifier comes from
``eval.gibberish_classifier`` (``models.load_classifier``)."""
from __future__ import annotations

import numpy as np

from ..errors import UserError

# open-unlearning's settings of the gibberish metrics: class 0 ("clean"), batches of 32, each text cut at
# 32 classifier tokens for TOFU's answers and 512 for MUSE's verbatim continuations
GIBBERISH_CLASS = 0
GIBBERISH_MAX_LENGTH = {"tofu": 32, "muse": 512}


def classifier_prob(texts: list[str], classifier, tok, batch_size: int = 32, max_length: int = 32,
                    class_id: int = 0) -> np.ndarray:
    """Per text: the sequence classifier's softmax probability of ``class_id``, each text truncated to
    ``max_length`` of its tokens (open-unlearning's ``classifier_prob``; its gibberish settings by default).

    A text with no tokens (an empty answer, with a tokenizer that adds no special tokens) is scored as
    the one token ``empty_text_token`` gives, so its value does not depend on the batch it sits in; with
    a BERT-style tokenizer, as open-unlearning's gibberish detector has, the empty text is already its
    special tokens."""
    import torch

    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        ids = tok(texts[i: i + batch_size], truncation=True, max_length=max_length)["input_ids"]
        if any(len(row) == 0 for row in ids):
            stand_in = empty_text_token(tok)
            ids = [row or [stand_in] for row in ids]
        enc = tok.pad({"input_ids": ids}, return_tensors="pt")
        enc = {k: v.to(classifier.device) for k, v in enc.items()}
        with torch.no_grad():
            out += torch.softmax(classifier(**enc).logits.float(), dim=-1)[:, class_id].cpu().tolist()
    return np.array(out)


def empty_text_token(tok) -> int:
    """The token an empty text is scored as: the tokenizer's BOS, else EOS, else pad, else unk."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(tok, name, None) is not None:
            return getattr(tok, name)
    raise UserError("eval.gibberish_classifier: its tokenizer gives an empty text no tokens and has no BOS, EOS, "
                    "pad or unk token to score it as; expected a tokenizer with one of them")


def gibberish_classifier(cfg: dict):
    """-> (classifier, tokenizer) of the recipe's ``eval.gibberish_classifier``, or None when it is null."""
    name = cfg["eval"]["gibberish_classifier"]
    if not name:
        return None
    from ..models import load_classifier

    return load_classifier(name, "eval.gibberish_classifier")
