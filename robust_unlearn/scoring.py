"""Per-example answer NLL: the one computation that training losses and metrics share.

Logits are computed only from the first answer position on (``logits_to_keep``), so the vocabulary
projection is skipped for system-prompt and question tokens: exact, and cheaper for short answers.
"""
from __future__ import annotations

import inspect
import re

import numpy as np
import torch
import torch.nn.functional as F

from .data.collate import IGNORE

_WORDS = re.compile(r"\w+|[^\w\s]")


def distinct_bigram_share(text: str) -> float:
    """1 - seq-rep-2 of one generated text: the share of its word bigrams that are distinct (Welleck et
    al. 2020, "Neural Text Generation with Unlikelihood Training", ICLR, Sec. 5: seq-rep-n = 1 - |unique
    n-grams| / |n-grams|), over lowercased words and punctuation marks (a regex, not nltk's tokenizer:
    its punkt data is not shipped offline). 1.0 when no bigram repeats; lower as an answer loops
    ("French French author French French French author": 0.5). A text of fewer than three tokens
    counts 1.0. The collapse guard's answer check and ``evals/degenerate_answers.py`` read it."""
    words = _WORDS.findall(text.lower())
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


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
    built-in benchmark, whose chat prompts are longer than its answers. All prompts and answers in one
    batch each: :func:`score_and_generate` without generation.

    -> per prompt, per answer: (sum of token NLLs, number of tokens). Inference only.
    """
    return score_and_generate(model, prompts, answers, [False] * len(prompts), pad_id, [], 0,
                              batch_size=max(1, sum(len(g) for g in answers)), prompt_batch=max(1, len(prompts)))[0]


@torch.no_grad()
def qa_mean_nll(model, fmt, pairs: list[tuple[str, str]], batch_size: int, desc: str = "score") -> np.ndarray:
    """Mean answer-token NLL of each (question, answer) in ``fmt``'s prompt format (a
    ``data.collate.QAFormatter``): :func:`qa_pass` without generation. Unlearning's early-stop probe
    and the TOFU evaluator both use it."""
    return qa_pass(model, fmt, pairs, [], batch_size)[0]


def qa_pass(model, fmt, pairs: list[tuple[str, str]], questions: list[str], batch_size: int,
            max_new_tokens: int = 0) -> tuple[np.ndarray, dict[str, str]]:
    """Everything the QA metrics need from a model in one pass per prompt (:func:`score_and_generate`):
    the mean answer-token NLL of each (question, answer) of ``pairs`` and the greedy answer to each of
    ``questions`` (decoded, special tokens skipped), every prompt run once whatever it serves.
    Answers are cut to fit ``fmt.max_length`` after their prompt. -> (NLLs aligned with ``pairs``,
    question -> generated text)."""
    if getattr(fmt, "input_format", "default") == "open-unlearning":
        return _open_unlearning_pass(model, fmt, pairs, questions, batch_size, max_new_tokens)
    order: dict[str, list[int]] = {}
    for i, (q, _) in enumerate(pairs):
        order.setdefault(q, []).append(i)
    for q in questions:
        order.setdefault(q, [])
    qs = list(order)
    wanted = set(questions)
    prompts = [fmt.prompt_ids(q) for q in qs]
    answers = [[fmt.answer_ids(pairs[i][1])[: max(1, fmt.max_length - len(p))] for i in order[q]]
               for q, p in zip(qs, prompts)]
    res, gens = score_and_generate(model, prompts, answers, [q in wanted for q in qs], fmt.pad_id,
                                   fmt.stop_token_ids, max_new_tokens, batch_size=batch_size,
                                   prompt_batch=max(batch_size, 1))
    out = np.zeros(len(pairs), dtype=np.float64)
    for q, group in zip(qs, res):
        for i, (total, count) in zip(order[q], group):
            out[i] = total / max(count, 1)
    text = {q: fmt.tok.decode(g, skip_special_tokens=True).strip() for q, g in zip(qs, gens) if g is not None}
    return out, text


@torch.no_grad()
def qa_pass_sharded(model, fmt, pairs: list[tuple[str, str]], questions: list[str], batch_size: int,
                    max_new_tokens: int = 0, shard: tuple[int, int] | None = None) -> tuple[np.ndarray, dict[str, str]]:
    """``qa_pass`` with the work split across the processes of an ``accelerate launch``: ``shard`` =
    (this process's index, number of processes). Each process takes every ``world``-th prompt (all its
    answers and its generation), and the results are gathered on every process
    (:func:`per_item_sharded`), so each holds the whole pass. None / one process: ``qa_pass``."""
    if shard is None or shard[1] <= 1:
        return qa_pass(model, fmt, pairs, questions, batch_size, max_new_tokens)
    prompts = list(dict.fromkeys([q for q, _ in pairs] + list(questions)))

    def run(mine: list[str]) -> list[tuple[list[tuple[int, float]], str | None]]:
        """This process's prompts -> per prompt: ((pair index, NLL) of its answers, its generated text)."""
        keep = set(mine)
        idx = [i for i, (q, _) in enumerate(pairs) if q in keep]
        nll, texts = qa_pass(model, fmt, [pairs[i] for i in idx], [q for q in questions if q in keep], batch_size,
                             max_new_tokens)
        scored: dict[str, list[tuple[int, float]]] = {q: [] for q in mine}
        for i, v in zip(idx, nll.tolist()):
            scored[pairs[i][0]].append((i, v))
        return [(scored[q], texts.get(q)) for q in mine]

    out = np.zeros(len(pairs))
    merged: dict[str, str] = {}
    for q, (scored, text) in zip(prompts, per_item_sharded(run, prompts, shard)):
        for i, v in scored:
            out[i] = v
        if text is not None:
            merged[q] = text
    return out, merged


def per_item_sharded(fn, items: list, shard: tuple[int, int] | None = None) -> list:
    """``fn(items) -> one result per item`` with the items split across the processes of an ``accelerate
    launch`` (``shard`` = (index, processes): each takes every ``world``-th item) and the results gathered,
    in order, on every process. None / one process: ``fn(items)``."""
    if shard is None or shard[1] <= 1:
        return list(fn(items))
    from accelerate.utils import gather_object

    rank, world = shard
    idx = list(range(rank, len(items), world))
    mine = list(fn([items[i] for i in idx])) if idx else []
    out: list = [None] * len(items)
    for ids, values in gather_object([(idx, mine)]):
        for i, v in zip(ids, values):
            out[i] = v
    return out


def _open_unlearning_pass(model, fmt, pairs, questions, batch_size: int, max_new_tokens: int):
    """``qa_pass`` with open-unlearning's inputs: whole right-padded sequences with its attention mask
    (``fmt.collate``), no shared-prompt cache (the mask hides tokens inside prompts), and greedy
    ``generate`` from left-padded prompts (mask: not pad) stopping at every EOS id of the model's
    generation_config."""
    from .data.collate import collate_prompts

    device = next(model.parameters()).device
    nll = np.zeros(len(pairs))
    texts: dict[str, str] = {}
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            enc = [fmt.encode(q, a) for q, a in pairs[i: i + batch_size]]
            batch = {k: v.to(device) for k, v in fmt.collate(enc).items()}
            total, count = answer_nll(model, batch)
            nll[i: i + len(enc)] = (total / count.clamp(min=1)).cpu().numpy()
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stops = sorted({*(eos if isinstance(eos, list) else [eos]), fmt.tok.eos_token_id} - {None})
        qs = list(dict.fromkeys(questions))
        for i in range(0, len(qs), batch_size):
            left = collate_prompts([fmt.prompt_ids(q) for q in qs[i: i + batch_size]], fmt.pad_id)
            ids = left["input_ids"].to(device)
            mask = left["attention_mask"].to(device) * (ids != fmt.pad_id).long()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stops, pad_token_id=fmt.pad_id)
            for q, row in zip(qs[i: i + batch_size], out[:, ids.shape[1]:].tolist()):
                texts[q] = fmt.tok.decode(row, skip_special_tokens=True).strip()
    return nll, texts


def qa_token_details(model, fmt, pairs: list[tuple[str, str]], batch_size: int) -> list[dict]:
    """Per (question, answer), per answer token (end-of-turn tokens included): ``lp`` = log p of the
    token, ``mu`` / ``sigma`` = mean / standard deviation (variance >= 1e-6) of log p under p at that
    position, ``hit`` = whether the argmax is the token; ``n_core`` = the answer's own tokens before
    the end-of-turn ones. numpy arrays; the membership attacks and memorization metrics read these."""
    # the answer's own tokens end before the end-of-turn ones (open-unlearning's inputs: before the last label)
    n_end = 1 if getattr(fmt, "input_format", "default") == "open-unlearning" else len(fmt.end_ids)
    out = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i: i + batch_size]
            enc = [fmt.encode(q, a) for q, a in chunk]
            batch = {k: v.to(next(model.parameters()).device) for k, v in fmt.collate(enc).items()}
            logits, target = answer_logits(model, batch)
            logp = F.log_softmax(logits, dim=-1)
            p = logp.exp()
            mu = (p * logp).sum(-1)
            var = ((p * logp * logp).sum(-1) - mu * mu).clamp(min=1e-6)
            lp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            hit = logits.argmax(-1) == target
            for j, (ids, n_prompt) in enumerate(enc):
                m = target[j] != IGNORE
                n = int(m.sum())
                full = len(fmt.answer_ids(chunk[j][1]))  # before any cut to max_length
                out.append({"lp": lp[j][m].cpu().numpy(), "mu": mu[j][m].cpu().numpy(),
                            "sigma": var[j][m].sqrt().cpu().numpy(), "hit": hit[j][m].cpu().numpy(),
                            "n_core": max(0, min(n, full - n_end))})
    return out


def qa_gradnorms(model, fmt, pairs: list[tuple[str, str]], n_core: list[int]) -> np.ndarray:
    """Per (question, answer), one at a time: the mean over parameter tensors of the L2 norm of the
    gradient of the mean NLL of its first ``n_core`` answer tokens (open-unlearning's GradNorm
    attack). Parameters that cannot take a gradient (quantized int8 weights) are left out; the
    model's ``requires_grad`` flags and gradients are put back afterwards."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    saved = [p.grad for p in params]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    out = []
    try:
        for (q, a), k in zip(pairs, n_core):
            batch = {kk: v.to(params[0].device) for kk, v in fmt.collate([fmt.encode(q, a)]).items()}
            nll, mask = token_nll(model, batch)
            keep = mask & (mask.long().cumsum(dim=1) <= max(k, 1))
            loss = nll[keep].mean()
            model.zero_grad(set_to_none=True)
            loss.backward()
            norms = [float(p.grad.norm(2)) for p in params if p.grad is not None]
            out.append(float(np.mean(norms)) if norms else 0.0)
    finally:
        for p, f, g in zip(params, flags, saved):
            p.grad = g
            p.requires_grad_(f)
    return np.array(out)


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


def select_cache(cache, idx: torch.Tensor):
    """A new cache holding rows ``idx`` of ``cache`` (which stays as it is): each layer object is
    copied shallowly with its key/value tensors index-selected, so any layer type keeps its settings."""
    import copy

    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            new.keys = layer.keys.index_select(0, idx)
            new.values = layer.values.index_select(0, idx)
        out.layers.append(new)
    return out


@torch.no_grad()
def greedy_from_cache(model, cache, mask: torch.Tensor, first_logits: torch.Tensor, stop_ids: list[int],
                      max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding of a batch whose prompts are already in ``cache`` (left-padded, attention
    ``mask``; ``first_logits`` predict each first new token). Rows that produced a stop token leave
    the batch. -> per row, the new tokens before the first stop token (at most ``max_new_tokens``)."""
    device = mask.device
    n = mask.shape[0]
    out: list[list[int]] = [[] for _ in range(n)]
    stops = torch.tensor(sorted(set(stop_ids)), device=device)
    live = torch.arange(n, device=device)  # original row of each batch row
    tok = first_logits.argmax(-1)
    pos = mask.sum(1)  # position of the next token of each row
    for step in range(max_new_tokens):
        ended = torch.isin(tok, stops)
        for r, t, e in zip(live.tolist(), tok.tolist(), ended.tolist()):
            if not e:
                out[r].append(t)
        keep = (~ended).nonzero().flatten()
        if keep.numel() == 0 or step == max_new_tokens - 1:
            break
        if keep.numel() < live.numel():  # drop the finished rows
            live, tok, pos, mask = live[keep], tok[keep], pos[keep], mask[keep]
            cache = select_cache(cache, keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]
        pos = pos + 1
        tok = logits.argmax(-1)
    return out


def _common_prefix(prompts: list[list[int]], least: int = 4) -> int:
    """How many leading tokens all prompts share, leaving each at least one token of its own (0 when
    fewer than ``least`` are shared, or for a single prompt)."""
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    k = 0
    while k < n and all(p[k] == first[k] for p in prompts):
        k += 1
    return k if k >= least else 0


def _greedy_if_forced(answer: list[int], agree: list[bool], stops: set[int], max_new_tokens: int) -> list[int] | None:
    """The greedy output, when teacher forcing ``answer`` shows that decoding would produce it (the
    argmax agreed with each next token, ``agree``, through the first stop token or through
    ``max_new_tokens`` tokens); else None."""
    end = next((t for t, tok in enumerate(answer) if tok in stops), None)
    need = max_new_tokens if end is None or end >= max_new_tokens else end + 1
    if need > len(answer) or not all(agree[:need]):
        return None
    return answer[: min(need, end if end is not None else need)]


@torch.no_grad()
def score_and_generate(model, prompts: list[list[int]], answers: list[list[list[int]]], generate: list[bool],
                       pad_id: int, stop_ids: list[int], max_new_tokens: int, batch_size: int = 32,
                       prompt_batch: int = 64) -> tuple[list[list[tuple[float, int]]], list[list[int] | None]]:
    """One pass over each prompt serves every use of it: the NLLs of all its answers (as
    :func:`shared_prompt_nll`) and, where ``generate[i]``, its greedy answer (as
    :func:`greedy_from_cache`), both continuing from the same key/value cache of the prompt.

    Prompts are taken in order of length, ``prompt_batch`` at a time; their answers in batches of at
    most ``batch_size``, sorted by length. An answer that greedy decoding would produce is found
    without decoding: when the argmax at every position of a scored answer is that answer's next
    token, up to and including its first stop token, greedy decoding from the prompt yields exactly
    it (teacher forcing and decoding compute the same logits). Only prompts none of whose answers
    passes that check are decoded. -> (per prompt, per answer: (sum of token NLLs, number of
    tokens); per prompt: the generated token ids, or None)."""
    from transformers import DynamicCache

    from .data.collate import collate_prompts

    device = next(model.parameters()).device
    stops = set(stop_ids)
    nll: list[list[tuple[float, int]]] = [[] for _ in prompts]
    gens: list[list[int] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    # the tokens every prompt starts with (a chat template's system turn) run once, for all prompts
    shared = _common_prefix(prompts)
    prefix_cache = None
    if shared:
        prefix_cache = model(input_ids=torch.tensor([prompts[0][:shared]], device=device),
                             past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1).past_key_values
    for s in range(0, len(order), prompt_batch):
        idx = order[s: s + prompt_batch]
        left = collate_prompts([prompts[i][shared:] for i in idx], pad_id)
        ids, mask = left["input_ids"].to(device), left["attention_mask"].to(device)
        pos = (mask.cumsum(1) - 1).clamp(min=0) + shared
        past = DynamicCache()
        if shared:  # [shared prefix | left-padded rest]: the padding sits between them, masked
            past = select_cache(prefix_cache, torch.zeros(len(idx), dtype=torch.long, device=device))
            mask = torch.cat([mask.new_ones(len(idx), shared), mask], 1)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                    use_cache=True, logits_to_keep=1)
        cache, first = out.past_key_values, out.logits[:, -1].float()
        flat = [(j, k) for j, i in enumerate(idx) for k in range(len(answers[i]))]
        flat.sort(key=lambda jk: len(answers[idx[jk[0]]][jk[1]]))
        got: dict[tuple[int, int], tuple[float, int]] = {}
        for b in range(0, len(flat), batch_size):
            part = flat[b: b + batch_size]
            owner = torch.tensor([j for j, _ in part], device=device)
            seqs = [answers[idx[j]][k] for j, k in part]
            width = max(len(a) for a in seqs)
            a_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
            a_mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
            for r, a in enumerate(seqs):
                a_ids[r, : len(a)] = torch.tensor(a)
                a_mask[r, : len(a)] = 1
            p_mask = mask[owner]
            a_pos = p_mask.sum(1, keepdim=True) + torch.arange(width, device=device)
            logits = model(input_ids=a_ids, attention_mask=torch.cat([p_mask, a_mask], 1), position_ids=a_pos,
                           past_key_values=select_cache(cache, owner), use_cache=True).logits.float()
            logits = torch.cat([first[owner].unsqueeze(1), logits[:, :-1]], 1)
            target = a_ids.masked_fill(a_mask == 0, IGNORE)
            tok_nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                                      reduction="none").view(target.shape)
            for (j, k), total, count in zip(part, (tok_nll * a_mask).sum(1).tolist(), a_mask.sum(1).tolist()):
                got[(j, k)] = (total, count)
            if any(generate[idx[j]] and gens[idx[j]] is None for j, _ in part):
                agree = (logits.argmax(-1) == a_ids).tolist()
                for r, (j, _) in enumerate(part):
                    if generate[idx[j]] and gens[idx[j]] is None:
                        gens[idx[j]] = _greedy_if_forced(seqs[r], agree[r], stops, max_new_tokens)
        for j, i in enumerate(idx):
            nll[i] = [got[(j, k)] for k in range(len(answers[i]))]
        rows = [j for j, i in enumerate(idx) if generate[i] and gens[i] is None]
        if rows:
            sel = torch.tensor(rows, device=device)
            new = greedy_from_cache(model, select_cache(cache, sel), mask[sel], first[sel], stop_ids, max_new_tokens)
            for j, g in zip(rows, new):
                gens[idx[j]] = g
    return nll, gens
