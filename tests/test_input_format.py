"""eval.input_format: open-unlearning reproduces its evaluation inputs: an EOS appended to answers whose
template turn does not end with one, attention mask = input_ids != pad (pad = EOS when the tokenizer
has none, which hides the prompt's own EOS tokens), and scoring through whole sequences."""
import numpy as np
import pytest
import torch
from conftest import chat_tokenizer

from robust_unlearn.config import load_recipe
from robust_unlearn.data.collate import QAFormatter, formatter_for
from robust_unlearn.scoring import qa_pass

# the system turn ends with EOS; the assistant turn with a non-EOS end-of-turn marker
TEMPLATE = ("{%- for m in messages %}{%- if m['role'] == 'system' %}sys: {{ m['content'] }}</s>"
            "{%- else %}{{ m['role'] }}: {{ m['content'] }} END{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}assistant:{%- endif %}")


@pytest.fixture
def tok():  # as Llama-3: no pad token, so pad = EOS
    return chat_tokenizer("sys user assistant END Who wrote the book? Nobody did. a helpful assistant", TEMPLATE, pad=False)


def test_labels_mask_and_names(tok):
    default = QAFormatter(tok, "chat", "a helpful assistant")
    ou = QAFormatter(tok, "chat", "a helpful assistant", input_format="open-unlearning")
    eos = tok.eos_token_id
    assert default.pad_id == eos  # no pad token: EOS pads
    a0, a1 = default.answer_ids("Nobody did."), ou.answer_ids("Nobody did.")
    assert a1 == a0 + [eos] and a0[-1] != eos  # the extra EOS label
    enc = [ou.encode("Who wrote the book?", "Nobody did.")]
    b0, b1 = default.collate(enc), ou.collate(enc)
    ids = b1["input_ids"][0]
    assert eos in ids[: enc[0][1]].tolist()  # the system turn's EOS, inside the prompt
    assert torch.equal(b1["attention_mask"][0], (ids != eos).long())  # hidden, as open-unlearning's mask
    assert int(b0["attention_mask"].sum()) == len(ids) and torch.equal(b0["labels"], b1["labels"])
    cfg = load_recipe(None, ["eval.input_format=open-unlearning"])
    assert formatter_for(tok, cfg).input_format == "open-unlearning"
    with pytest.raises(Exception, match="unknown"):
        load_recipe(None, ["eval.input_format=hf"])


def test_open_unlearning_scoring_equals_the_default_where_inputs_agree(fixed_model):
    """On the fixed-logit model with qa prompts (answers already end with EOS, no EOS in prompts), both
    modes compute the same NLLs; greedy generation gives the same text."""
    model, tok = fixed_model
    pairs = [("q1", "a b"), ("q2", "c"), ("q1", "b")]
    d = QAFormatter(tok, prompt="qa")
    o = QAFormatter(tok, prompt="qa", input_format="open-unlearning")
    n0, t0 = qa_pass(model, d, pairs, ["q1", "q2"], 2, 4)
    n1, t1 = qa_pass(model, o, pairs, ["q1", "q2"], 2, 4)
    assert np.allclose(n0, n1, rtol=1e-5) and t0 == t1
