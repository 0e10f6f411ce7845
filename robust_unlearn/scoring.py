"""Per-example answer NLL: the one computation that training losses and metrics share.

Logits are computed only from the first answer position on (``logits_to_keep``), so the vocabulary
projection is skipped for system-prompt and question tokens: exact, and cheaper for short answers.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .data.collate import IGNORE


def _accepts_logits_to_keep(model) -> bool:
    fwd = getattr(model, "_ru_keep", None)
    if fwd is None:
        fwd = "logits_to_keep" in inspect.signature(model.forward).parameters
        try:
            model._ru_keep = fwd
        except Exception:  # a wrapped module may refuse attributes
            pass
    return fwd


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (float32 logits predicting each target token, target ids with -100 off the answer),
    both [batch, positions], from the first answer position on."""
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    width = input_ids.shape[1]
    has_label = labels != IGNORE
    first = int(has_label.float().argmax(dim=1)[has_label.any(dim=1)].min()) if has_label.any() else width - 1
    start = max(first - 1, 0)
    kwargs = {}
    if _accepts_logits_to_keep(getattr(model, "module", model)):
        kwargs["logits_to_keep"] = width - start
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    logits = out.logits
    if logits.shape[1] != width - start:  # model ignored logits_to_keep
        logits = logits[:, start:]
    return logits[:, :-1].float(), labels[:, start + 1:]


def answer_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sum of token NLLs, number of answer tokens), one entry per example, float32."""
    logits, target = answer_logits(model, batch)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view(target.shape)
    mask = target != IGNORE
    return (nll * mask).sum(dim=1), mask.sum(dim=1)
