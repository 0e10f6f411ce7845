import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TOFU_SAMPLE = SHARED / "tofu_sample"
TOFU_FULL = SHARED / "tofu"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# ---- a Llama whose next-token distribution is fixed by construction --------------------------
WORDS = ["<pad>", "<s>", "</s>", "Question:", "Answer:", "q1", "q2", "a", "b", "c", "d", "e"]
# BIGRAM[prev] = {next: probability}; the rest of the row's mass is spread evenly over other tokens.
BIGRAM = {
    "Answer:": {"a": 0.5, "b": 0.25, "c": 0.125},
    "a": {"b": 0.6, "c": 0.2},
    "b": {"</s>": 0.7, "c": 0.1},
    "c": {"</s>": 0.4, "d": 0.4},
    "d": {"</s>": 0.9},
}


def bigram_prob(prev: str, nxt: str) -> float:
    row = BIGRAM.get(prev, {})
    if nxt in row:
        return row[nxt]
    rest = 1.0 - sum(row.values())
    return rest / (len(WORDS) - len(row))


def fixed_logit_model():
    """LlamaForCausalLM with hidden = vocab: embeddings are one-hot, every layer adds zero to the
    residual stream (o_proj, down_proj = 0), the final RMSNorm maps e_i to e_i, and lm_head column i
    holds log P(. | token i). So logits at a position depend only on its token, exactly as BIGRAM."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    V = len(WORDS)
    cfg = LlamaConfig(vocab_size=V, hidden_size=V, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=V, rms_norm_eps=1e-12, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(V))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1 / math.sqrt(V))
        logp = torch.tensor([[math.log(bigram_prob(prev, nxt)) for nxt in WORDS] for prev in WORDS])
        model.lm_head.weight.copy_(logp.T)  # logits = W @ e_prev = column prev
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def fixed_model():
    return fixed_logit_model()
