"""Per-example answer NLL: the one computation that training losses and metrics share.

Logits are computed only from the first answer position on (``logits_to_keep``), so the vocabulary
projection is skipped for system-prompt and question tokens: exact, and cheaper for short answers.
"""
from __future__ import annotations

import inspect

import numpy as np
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


def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (NLL of every target token, mask of the scored ones), both [batch, positions], float32."""
    logits, target = answer_logits(model, batch)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view(target.shape)
    return nll, target != IGNORE


def answer_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sum of token NLLs, number of answer tokens), one entry per example, float32."""
    logits, target = answer_logits(model, batch)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view(target.shape)
    mask = target != IGNORE
    return (nll * mask).sum(dim=1), mask.sum(dim=1)


@torch.no_grad()
def shared_prompt_nll(model, prompts: list[list[int]], answers: list[list[list[int]]], pad_id: int
                      ) -> list[list[tuple[float, int]]]:
    """Answer NLLs when several answers share one prompt (a question with its paraphrased and
    perturbed answers): each prompt is run once, its key/value cache is copied to its answers, and
    only the answer tokens are run again. Exact (positions continue from the prompt; left padding
    is masked), up to float rounding; about 2x fewer tokens than scoring every pair in full on the
    built-in benchmark, whose chat prompts are longer than its answers.

    -> per prompt, per answer: (sum of token NLLs, number of tokens). Inference only.
    """
    from transformers import DynamicCache

    from .data.collate import collate_prompts

    device = next(model.parameters()).device
    left = collate_prompts(prompts, pad_id)  # left-padded: every prompt ends at the last position
    ids, mask = left["input_ids"].to(device), left["attention_mask"].to(device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    first_logits = out.logits[:, -1].float()  # predicts each answer's first token
    owner = [i for i, group in enumerate(answers) for _ in group]
    flat = [a for group in answers for a in group]
    idx = torch.tensor(owner, device=device)
    cache = out.past_key_values
    cache.reorder_cache(idx)
    a_width = max(len(a) for a in flat)
    a_ids = torch.full((len(flat), a_width), pad_id, dtype=torch.long, device=device)
    a_mask = torch.zeros((len(flat), a_width), dtype=torch.long, device=device)
    for j, a in enumerate(flat):
        a_ids[j, : len(a)] = torch.tensor(a)
        a_mask[j, : len(a)] = 1
    a_pos = mask[idx].sum(1, keepdim=True) + torch.arange(a_width, device=device)
    logits = model(input_ids=a_ids, attention_mask=torch.cat([mask[idx], a_mask], 1), position_ids=a_pos,
                   past_key_values=cache, use_cache=True).logits.float()
    # position t of the answer predicts token t + 1; the prompt's last position predicts token 0
    logits = torch.cat([first_logits[idx].unsqueeze(1), logits[:, :-1]], 1)
    target = a_ids.masked_fill(a_mask == 0, IGNORE)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view(target.shape)
    sums, counts = (nll * a_mask).sum(1).tolist(), a_mask.sum(1).tolist()
    res, j = [], 0
    for group in answers:
        res.append([(sums[j + k], counts[j + k]) for k in range(len(group))])
        j += len(group)
    return res


@torch.no_grad()
def qa_mean_nll(model, fmt, pairs: list[tuple[str, str]], batch_size: int, desc: str = "score") -> np.ndarray:
    """Mean answer-token NLL of each (question, answer) in ``fmt``'s prompt format (a
    ``data.collate.QAFormatter``). Pairs with the same question share one pass over the prompt
    (:func:`shared_prompt_nll`); batches hold about ``batch_size`` answers of questions of similar
    length. The same computation as ``metrics.tofu.Evaluator.mean_nll``: unlearning's early-stop
    probe uses it without importing the metrics."""
    from tqdm.auto import tqdm

    groups: dict[str, list[int]] = {}
    for i, (q, _) in enumerate(pairs):
        groups.setdefault(q, []).append(i)
    questions = sorted(groups, key=lambda q: len(fmt.prompt_ids(q)))
    out = np.zeros(len(pairs), dtype=np.float64)
    batches, cur, size = [], [], 0
    for q in questions:
        if cur and size + len(groups[q]) > batch_size:
            batches.append(cur)
            cur, size = [], 0
        cur.append(q)
        size += len(groups[q])
    if cur:
        batches.append(cur)
    for qs in tqdm(batches, desc=desc, leave=False, disable=len(batches) < 4):
        prompts = [fmt.prompt_ids(q) for q in qs]
        room = [max(1, fmt.max_length - len(p)) for p in prompts]
        answers = [[fmt.answer_ids(pairs[i][1])[:r] for i in groups[q]] for q, r in zip(qs, room)]
        res = shared_prompt_nll(model, prompts, answers, fmt.pad_id)
        for q, group in zip(qs, res):
            for i, (total, count) in zip(groups[q], group):
                out[i] = total / max(count, 1)
    return out


@torch.no_grad()
def next_token_logprobs(model, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    """-> [n, vocab] float32 log-probabilities of the token after each prompt (one left-padded pass,
    positions counted from each prompt's first token, as :func:`shared_prompt_nll`'s first step)."""
    from .data.collate import collate_prompts

    device = next(model.parameters()).device
    left = collate_prompts(prompts, pad_id)
    ids, mask = left["input_ids"].to(device), left["attention_mask"].to(device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1].float()
    return F.log_softmax(logits, dim=-1)


class TokenizedEval:
    """What every evaluator of raw-text / multiple-choice benchmarks holds: the tokenizer (a pad id is
    set when missing; masks always come from lengths, never from pad ids), the longest input and the
    batch size."""

    def __init__(self, tokenizer, max_length: int = 2048, batch_size: int = 32):
        self.tok = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = tokenizer.pad_token_id
        self.max_length = max_length
        self.batch_size = batch_size
