"""Prompt formatting and batch collation for QA data, and raw-text items for corpus benchmarks.

QA: loss and probability are on the answer tokens plus the end-of-turn token; question/prompt tokens
are masked with -100. Raw text (MUSE, WMDP corpora): every token is a label, no prompt and no chat
template. Attention masks are built from sequence lengths, never from the pad id (setting pad = EOS
and masking by id would also mask EOS-like tokens inside the prompt; open-unlearning #128).
"""
from __future__ import annotations

import torch

IGNORE = -100


INPUT_FORMATS = ("default", "open-unlearning")


class QAFormatter:
    """Turns (question, answer) into token ids for one model's prompt convention.

    ``chat``: the tokenizer's chat template with a system prompt (open-unlearning adds "You are a
    helpful assistant."); the answer ends with the template's end-of-turn token.
    ``qa``: ``Question: {q}\\nAnswer: {a}`` for base models, ending with EOS.
    ``date_string``: passed to the chat template as ``date_string``. Llama-3 templates print it in the
    system turn, and without it they print today's date (``strftime_now``), so prompts would change
    from one day to the next; open-unlearning pins "10 Apr 2025" (configs/model/Llama-3.2-1B-Instruct.yaml
    at locuslab/open-unlearning@d3d7cf9).
    """

    def __init__(self, tokenizer, prompt: str = "chat", system_prompt: str | None = None, max_length: int = 256,
                 date_string: str | None = None, input_format: str = "default"):
        self.tok = tokenizer
        self.date_string = date_string
        self.input_format = input_format
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"unknown input format {input_format!r} (expected one of {', '.join(INPUT_FORMATS)})")
        # "open-unlearning": its evaluation inputs (locuslab/open-unlearning@d3d7cf9: src/data/utils.py
        # preprocess_chat_instance, src/data/collators.py): an EOS appended to every answer whose last token
        # is not EOS, attention mask = input_ids != pad (pad = EOS when the tokenizer has none), and
        # generation stopping at every EOS id of the model's generation_config (scoring.qa_pass)
        self.prompt = prompt if (prompt == "qa" or getattr(tokenizer, "chat_template", None)) else "qa"
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.end_ids = self._end_ids()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # safe: masks come from lengths, not pad ids
        self.pad_id = tokenizer.pad_token_id

    def _messages(self, question: str, answer: str | None = None) -> list[dict]:
        msgs = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": question})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs

    def _render(self, messages: list[dict], **kw) -> str:
        if self.date_string is not None:
            kw["date_string"] = self.date_string
        return self.tok.apply_chat_template(messages, tokenize=False, **kw)

    def _end_ids(self) -> list[int]:
        if self.prompt == "chat":
            marker = "\x00ANSWER\x00"
            full = self._render(self._messages("q", marker))
            tail = full.split(marker, 1)[1]
            # default: the end-of-turn marker; open-unlearning labels the template's whole tail (its newline too)
            tail = tail if self.input_format == "open-unlearning" else tail.rstrip()
            if tail:
                return self.tok(tail, add_special_tokens=False)["input_ids"]
        return [self.tok.eos_token_id]

    @property
    def stop_token_ids(self) -> list[int]:
        ids = {self.tok.eos_token_id, self.end_ids[0]} - {None}
        return sorted(ids)

    def prompt_ids(self, question: str) -> list[int]:
        """The prompt's token ids (memoised: every evaluation asks for the same questions again)."""
        memo = self.__dict__.setdefault("_prompt_memo", {})
        if question not in memo:
            memo[question] = self._prompt_ids(question)
        return list(memo[question])

    def _prompt_ids(self, question: str) -> list[int]:
        if self.prompt == "chat":
            text = self._render(self._messages(question), add_generation_prompt=True)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(f"Question: {question}\nAnswer:", add_special_tokens=True)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        text = answer if self.prompt == "chat" else " " + answer
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + self.end_ids
        if self.input_format == "open-unlearning" and ids[-1] != self.tok.eos_token_id:
            ids = ids + [self.tok.eos_token_id]
        return ids

    def collate(self, encoded: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        """A right-padded batch of ``encode`` results in this format's convention."""
        return collate_qa(encoded, self.pad_id, mask_pad=self.input_format == "open-unlearning")

    def encode(self, question: str, answer: str) -> tuple[list[int], int]:
        """-> (ids, number of prompt tokens). The answer is cut to fit ``max_length``."""
        p = self.prompt_ids(question)
        a = self.answer_ids(answer)[: max(1, self.max_length - len(p))]
        return p + a, len(p)


def collate_qa(encoded: list[tuple[list[int], int]], pad_id: int, mask_pad: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (from lengths; ``mask_pad``: also 0 wherever a token
    equals the pad id, as open-unlearning's collator) and labels (answer tokens only)."""
    n = len(encoded)
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
    if mask_pad:
        attention_mask = attention_mask * (input_ids != pad_id).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for batched generation."""
    n = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention_mask[i, width - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class QADataset(torch.utils.data.Dataset):
    """Pre-tokenized (question, answer) pairs for training."""

    def __init__(self, rows, formatter: QAFormatter):
        self.items = [formatter.encode(r["question"], r["answer"]) for r in rows]
        self.pad_id = formatter.pad_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def lengths(self) -> list[int]:
        return [len(ids) for ids, _ in self.items]

    def collate(self, batch):
        return collate_qa(batch, self.pad_id)


class PairedQADataset(QADataset):
    """(question, answer) pairs, each with an alternate answer to the same question (IdkDPO: a refusal);
    a batch holds the alternates as ``batch["alternate"]``, aligned row for row."""

    def __init__(self, rows, formatter: QAFormatter, alternate):
        super().__init__(rows, formatter)
        self.alt = [formatter.encode(r["question"], alternate(r["question"])) for r in rows]
        self.items = [(item, i) for i, item in enumerate(self.items)]

    def lengths(self) -> list[int]:
        return [len(ids) for (ids, _), _ in self.items]

    def collate(self, batch):
        out = collate_qa([item for item, _ in batch], self.pad_id)
        out["alternate"] = collate_qa([self.alt[i] for _, i in batch], self.pad_id)
        return out


def collate_text(items: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of raw-text items: input_ids, attention_mask (from lengths) and labels (every
    real token; padding is -100)."""
    n = len(items)
    width = max(len(ids) for ids in items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, ids in enumerate(items):
        t = torch.tensor(ids)
        input_ids[i, : len(ids)] = t
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(ids)] = t
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def chunk_corpus(texts: list[str], tokenizer, max_length: int, separator: str = "\n\n") -> list[list[int]]:
    """MUSE's training items (Shi et al. 2024, the baselines' data code): the corpus as one token
    stream (documents joined by ``separator``, no special tokens), cut into pieces of
    ``max_length - 1`` tokens, each led by BOS; a short last piece is filled up to ``max_length`` with
    tokens from the start of the stream. Without a BOS token, pieces of ``max_length`` tokens."""
    ids = tokenizer(separator.join(texts), add_special_tokens=False)["input_ids"]
    if not ids:
        return []
    bos = tokenizer.bos_token_id
    step = max_length - 1 if bos is not None else max_length
    if step < 1:
        raise ValueError(f"max_length {max_length} leaves no room for text")
    lead = [bos] if bos is not None else []
    chunks = [lead + ids[i: i + step] for i in range(0, len(ids), step)]
    if len(chunks[-1]) < max_length and len(ids) >= step:
        chunks[-1] = (chunks[-1] + ids)[:max_length]
    return chunks


def encode_documents(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """One training item per document (RMU's WMDP corpora): the tokenizer's encoding with its
    special tokens, truncated to ``max_length`` tokens; empty documents are dropped."""
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True)["input_ids"][:max_length]
        if len(ids) >= 2:  # at least one token to predict
            out.append(ids)
    return out


class TextDataset(torch.utils.data.Dataset):
    """Raw-text training items, every token a label. ``mode``: ``chunk`` (MUSE: the corpus cut into
    ``max_length`` pieces, :func:`chunk_corpus`) or ``document`` (WMDP/RMU: each document truncated,
    :func:`encode_documents`)."""

    def __init__(self, rows, tokenizer, max_length: int, mode: str = "chunk"):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # safe: masks come from lengths, not pad ids
        texts = [r["text"] for r in rows]
        if mode == "chunk":
            self.items = chunk_corpus(texts, tokenizer, max_length)
        elif mode == "document":
            self.items = encode_documents(texts, tokenizer, max_length)
        else:
            raise ValueError(f"unknown text mode {mode!r} (expected chunk or document)")
        if not self.items:
            raise ValueError("no training text: every document is empty")
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.items]

    def collate(self, batch):
        return collate_text(batch, self.pad_id)


def formatter_for(tok, cfg: dict) -> QAFormatter:
    """The recipe's prompt format (``model.prompt``, ``model.system_prompt``, ``model.max_length``,
    ``model.date_string``) on tokenizer ``tok``."""
    m = cfg["model"]
    return QAFormatter(tok, prompt=m["prompt"], system_prompt=m["system_prompt"], max_length=m["max_length"],
                       date_string=m["date_string"], input_format=cfg["eval"]["input_format"])
