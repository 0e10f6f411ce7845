"""Compressions as model -> model functions."""
import copy

import pytest
import torch

from robust_unlearn.compress import compressible_linears, get_compression
from robust_unlearn.quant.rtn import rtn_tensor
from robust_unlearn.errors import UserError
from robust_unlearn.models import tiny_config


@pytest.fixture()
def model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(300, hidden_size=72, intermediate_size=136)).eval()  # not multiples of 64


def test_rtn_by_hand():
    w = torch.tensor([[1.0, -0.3, 0.26, 0.5]])
    # per channel: D = 1 / 2^3 = 0.125 -> round([8, -2.4, 2.08, 4]) * D
    assert torch.allclose(rtn_tensor(w, 4), torch.tensor([[1.0, -0.25, 0.25, 0.5]]))
    # groups of 2: D = 0.125 for [1, -0.3]; D = 0.0625 for [0.26, 0.5]
    assert torch.allclose(rtn_tensor(w, 4, group_size=2), torch.tensor([[1.0, -0.25, 0.25, 0.5]]))
    w2 = torch.tensor([[0.5, 0.2, 0.03, 0.09, 0.1]])
    assert torch.allclose(rtn_tensor(w2, 4, group_size=3), torch.tensor([[0.5, 0.1875, 0.0, 0.0875, 0.1]]))


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3])
def test_pruning_hits_the_sparsity_and_spares_lm_head(model, fraction):
    before = copy.deepcopy(model)
    get_compression(f"prune{int(fraction * 100)}")(model)
    lins = compressible_linears(model)
    total = sum(m.weight.numel() for _, m in lins)
    zeros = sum((m.weight == 0).sum().item() for _, m in lins)
    assert abs(zeros / total - fraction) < 0.001
    kept_min = min(m.weight[m.weight != 0].abs().min().item() for _, m in lins)
    dropped_max = max((b.weight.abs() * (m.weight == 0)).max().item()
                      for (_, m), (_, b) in zip(lins, compressible_linears(before)))
    assert dropped_max <= kept_min
    assert torch.equal(model.get_output_embeddings().weight, before.get_output_embeddings().weight)


@pytest.mark.parametrize("name,dq", [("nf4", False), ("nf4-dq", True), ("fp4", False)])
def test_4bit_agrees_with_bitsandbytes_linear4bit(model, name, dq):
    import bitsandbytes as bnb

    ref = copy.deepcopy(model)
    get_compression(name)(model)
    worst = 0.0
    for (n, lin), (_, orig) in zip(compressible_linears(model), compressible_linears(ref)):
        l4 = bnb.nn.Linear4bit(orig.in_features, orig.out_features, bias=False, compute_dtype=torch.float32,
                               quant_type=name[:3], compress_statistics=dq)
        l4.weight = bnb.nn.Params4bit(orig.weight.data.clone(), requires_grad=False, quant_type=name[:3],
                                      blocksize=64, compress_statistics=dq)
        l4 = l4.to("cpu")
        x = torch.randn(5, orig.in_features)
        worst = max(worst, (l4(x) - lin(x)).abs().max().item())
        assert not torch.equal(lin.weight, orig.weight)
    print(f"{name}: max |Linear4bit - ours| = {worst:.2e}")
    assert worst < 1e-5


def test_int8_is_bitsandbytes_llm_int8_and_close_to_fp32(model):
    """int8: every decoder linear is a bnb Linear8bitLt holding bnb's own int8 row-absmax weights;
    logits stay within 0.03 (max abs) of fp32 on a random tiny Llama whose logits reach ~1.5."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    ref = copy.deepcopy(model)
    get_compression("int8")(model)
    pairs = list(zip(compressible_linears(model), compressible_linears(ref)))
    assert len(pairs) == 2 * 7
    for (n, lin), (n_ref, orig) in pairs:
        assert n == n_ref and type(lin) is bnb.nn.Linear8bitLt and type(orig) is torch.nn.Linear
        assert lin.weight.dtype == torch.int8 and lin.state.threshold == 6.0 and not lin.state.has_fp16_weights
        cb, scb, _ = F.int8_vectorwise_quant(orig.weight.data.half())
        assert torch.equal(lin.weight.data, cb) and torch.equal(lin.weight.SCB, scb)
    assert type(model.lm_head) is torch.nn.Linear
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    x = torch.randint(0, 300, (3, 17))
    with torch.no_grad():
        fp32, int8 = ref(x).logits, model(x).logits
    assert int8.dtype == torch.float32
    err = (fp32 - int8).abs().max().item()
    print(f"int8: max |logits fp32 - int8| = {err:.2e} (max |logit| {fp32.abs().max().item():.2f})")
    assert 0 < err < 0.03
    assert model.generate(x[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (3, 7)


def test_unknown_compression_is_a_clear_error():
    with pytest.raises(UserError, match="unknown compression 'nf3'.*int8"):
        get_compression("nf3")
