"""quant: one object per format; our codes equal the quantizing libraries' (bitsandbytes, compressed-
tensors), the rtn codes reproduce ``rtn_tensor``, the bin widths contain the codes, and names and
groups are checked with one line."""
import pytest
import torch

from robust_unlearn.errors import UserError
from robust_unlearn.quant import (bin_width, check_group, codes, comparable_codes, group_index, library_codes,
                                  parse_format, scales)
from robust_unlearn.quant.rtn import rtn_tensor

LIBRARY_FORMATS = ("nf4", "nf4-dq", "fp4", "int8", "gptq4-g64", "awq4-g64", "gptq4-g32", "awq4-g128")


def weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[3, 7] = 0.0
    w[4, :100] = 0.0  # zero groups (zero absmax) and, for 4-bit tables, a partial last block
    w[5] = w[5].abs()  # an all-positive row: asymmetric zero point at the bottom
    return w


@pytest.mark.parametrize("name", LIBRARY_FORMATS)
@pytest.mark.parametrize("shape", [(37, 256), (11, 384), (7, 128)])
def test_codes_equal_the_library(name, shape):
    if name.startswith(("gptq", "awq")):
        pytest.importorskip("compressed_tensors")
    w = weights(*shape)
    if parse_format(name).kind == 3 and w.shape[1] % parse_format(name).group:
        pytest.skip("group does not divide the width")
    ours, lib = comparable_codes(w, name), library_codes(w, name)
    assert lib is not None and torch.equal(ours.to(lib.dtype), lib), name


def test_odd_sizes_for_bitsandbytes():
    w = weights(37, 150)  # 5550 elements = 86 blocks of 64 + 46
    for name in ("nf4", "fp4", "int8"):
        assert torch.equal(comparable_codes(w, name).to(library_codes(w, name).dtype), library_codes(w, name))


def test_rtn_codes_reproduce_rtn_tensor():
    w = weights(37, 150)
    for name, bits, group in (("rtn4-g128", 4, 128), ("rtn8", 8, None), ("rtn4-g64", 4, 64)):
        d = scales(w, name)
        g = group_index(tuple(w.shape), parse_format(name), w.device)
        assert torch.equal((codes(w, name).reshape(-1) * d[g]).view_as(w), rtn_tensor(w, bits, group))
        assert library_codes(w, name) is None


@pytest.mark.parametrize("name", ("nf4", "fp4", "int8", "rtn4-g64", "gptq4-g64", "awq4-g64"))
def test_bin_width_is_one_step_of_the_grid(name):
    """Moving a weight by more than its bin width (in its direction, scales held) changes its code."""
    w = weights(16, 128)
    width = bin_width(w, name)
    assert width.shape == w.shape and bool((width[w != 0] > 0).all())
    fmt = parse_format(name)
    if fmt.kind == 0:  # table: every bin is at most 2 / 15-ish of the absmax wide, never wider than 1
        assert float((width / scales(w, name).repeat_interleave(64)[: w.numel()].view_as(w).clamp(min=1e-30)).max()) <= 1.0


def test_names_and_groups_one_line():
    assert parse_format("gptq4-g64").symmetric and not parse_format("awq4-g64").symmetric
    assert parse_format("gptq4-g64").calibrated and not parse_format("gptq4-g64").floor_supported
    assert parse_format("nf4-dq").key == parse_format("nf4").key and parse_format("nf4-dq").double_quant
    for bad in ("nf5", "rtn3", "rtn4-g0", "int4", "gptq4", "gptq3-g64", "awq4-g0", ""):
        with pytest.raises(UserError) as exc:
            parse_format(bad)
        assert "\n" not in str(exc.value) and "expected one of" in str(exc.value)
    with pytest.raises(UserError) as exc:
        check_group(parse_format("gptq4-g128"), {"model.layers.0.self_attn.q_proj": 576, "model.layers.0.mlp.down_proj": 1536})
    msg = str(exc.value)
    assert "\n" not in msg and "576" in msg and "q_proj" in msg and "valid groups for this model: 16, 32, 64, 192" not in msg
    assert "64" in msg.split("valid groups")[1]
