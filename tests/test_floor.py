"""The quantization-bin floor: grid codes against bitsandbytes, the Triton kernel against the torch
reference bit for bit, and the guarantee of ``apply_floor`` checked with bitsandbytes' own quantizers.

The kernel tests (marked ``kernel``) need a CUDA device or triton's CPU interpreter, TRITON_INTERPRET=1,
which triton reads when it is first imported (its own ``tl.zeros`` & co. are decorated then), long
before any test runs. So only they run under the interpreter: ``test_kernel_tests_under_the_interpreter``
runs them in a child pytest with TRITON_INTERPRET=1; in this process (without the variable, as every
other test, so end-to-end runs take the floor's torch path) they are skipped, except
``test_apply_floor_flips_every_updated_element``, which checks the guarantee on both paths."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robust_unlearn.errors import UserError
from robust_unlearn.robust import floor as F

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
KERNEL = INTERPRET or torch.cuda.is_available()  # the Triton kernel can run in this process


def kernel_test(fn):
    """A test of the Triton kernel itself: run by the child pytest under TRITON_INTERPRET=1."""
    return pytest.mark.kernel(pytest.mark.skipif(
        not KERNEL, reason="runs in test_kernel_tests_under_the_interpreter (TRITON_INTERPRET=1)")(fn))


@pytest.mark.skipif(INTERPRET, reason="this is the interpreter's process")
def test_kernel_tests_under_the_interpreter():
    """The ``kernel`` tests of this file in a child pytest with TRITON_INTERPRET=1 set before triton loads."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "kernel", __file__],
                       cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMAT_SETS = [("nf4",), ("fp4",), ("int8",), ("rtn4-g128",), ("nf4", "int8", "rtn4-g128")]
SHAPES = [(37, 150), (5, 1031)]  # neither a multiple of 64 nor of 128


def bits(w):
    return w.view(torch.int32 if w.element_size() == 4 else torch.int16)


def case(shape, dtype, seed=0, step=1e-4, density=0.7):
    """Target weights, current = target + a small update, the update mask; the current also differs
    from the target outside the mask (the floor must ignore that)."""
    g = torch.Generator().manual_seed(seed)
    wt = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    wc = (wt.float() + step * torch.randn(shape, generator=g)).to(dtype)
    mask = torch.rand(shape, generator=g) < density
    return wt, wc, mask


# ---- formats and grid codes -----------------------------------------------------------------------
def test_parse_format_and_unknown_name():
    assert F.parse_format("nf4").quant_type == "nf4"
    assert F.parse_format("nf4-dq").key == F.parse_format("nf4").key
    assert F.parse_format("rtn4-g128").group == 128 and F.parse_format("rtn8").group == 0
    for bad in ("nf5", "rtn3", "rtn4-g0", "int4", ""):
        with pytest.raises(UserError) as exc:
            F.parse_format(bad)
        assert "\n" not in str(exc.value) and "expected one of" in str(exc.value)
    wt, wc, mask = case((4, 70), torch.float32)
    with pytest.raises(UserError):
        F.apply_floor(wt, wc, mask, formats=("nf4", "gptq"))


# ---- the kernel against the torch reference -------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("formats", FORMAT_SETS)
@kernel_test
def test_kernel_pass_matches_reference(dtype, formats):
    for i, shape in enumerate(SHAPES):
        wt, wc, mask = case(shape, dtype, seed=i)
        if i == 1:  # some block absmax elements move inward / outward by more than a bin
            flat = wc.view(-1)
            flat[::97] = (wt.view(-1)[::97].float() * torch.where(torch.arange(flat[::97].numel()) % 2 == 0,
                                                                    0.5, 1.5)).to(dtype)
        out_t, cnt_t = F.floor_pass(wt, wc, mask, formats, backend="triton")
        out_r, cnt_r = F.floor_pass(wt, wc, mask, formats, backend="torch")
        assert out_t.dtype == dtype and out_t.shape == wt.shape
        assert torch.equal(bits(out_t), bits(out_r)), (shape, int((bits(out_t) != bits(out_r)).sum()))
        assert cnt_t == cnt_r and cnt_t[0] > 0


@kernel_test
def test_kernel_counter_modes_and_block_sizes_agree():
    """Per-program counters (the default) and the atomic ones, at two tile sizes: same weights, same counts."""
    from robust_unlearn.kernels.quant_floor import launch_floor_pass

    wt, wc, mask = case((37, 150), torch.bfloat16, seed=5, step=3e-3)
    plan, wt, wc, mask = F._prepare(wt, wc, mask, ["nf4", "int8"], F.DEFAULT_MARGIN, F.MIN_ULPS)
    st_t = plan.stats(wt)
    st_c = plan.current_stats(torch.where(mask, wc, wt), wt, mask, plan.target_codes(wt))
    stats, desc = plan.kernel_args(st_t, st_c)
    ref, ref_counts = F._pass_torch(plan, wt, wc, mask, st_t, st_c)
    for block, partial in ((1024, True), (1024, False), (2048, True)):
        out, counts = launch_floor_pass(wt, wc, mask, stats, plan.tables, desc, margin=plan.margin,
                                        block_size=block, partial=partial, **plan.constexprs())
        assert torch.equal(bits(out), bits(ref)) and counts == ref_counts and counts[0] > 0, (block, partial)


@kernel_test
def test_kernel_whole_floor_matches_torch_backend():
    wt, wc, mask = case((37, 150), torch.bfloat16, seed=3, step=3e-3)
    a = F.apply_floor(wt, wc, mask, formats=("nf4", "int8", "rtn4-g128"), backend="triton")
    b = F.apply_floor(wt, wc, mask, formats=("nf4", "int8", "rtn4-g128"), backend="torch")
    assert a.backend == "triton" and b.backend == "torch"
    assert torch.equal(bits(a.weight), bits(b.weight))
    assert (a.n_updated, a.n_moved_by_floor, a.n_reverted, a.iterations) == \
           (b.n_updated, b.n_moved_by_floor, b.n_reverted, b.iterations)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_on_cuda_matches_reference(dtype):
    for formats in FORMAT_SETS:
        wt, wc, mask = case((257, 1031), dtype, step=1e-3)
        wt, wc, mask = wt.cuda(), wc.cuda(), mask.cuda()
        out_t, cnt_t = F.floor_pass(wt, wc, mask, formats, backend="triton")
        out_r, cnt_r = F.floor_pass(wt, wc, mask, formats, backend="torch")
        assert torch.equal(bits(out_t), bits(out_r)) and cnt_t == cnt_r
        res = F.apply_floor(wt, wc, mask, formats)
        assert res.backend == "triton" and min(F.verify_flips(wt, res.weight, mask, formats).values()) == 1.0


COMPILE_FOR_SM90 = """
import os, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
try:
    from triton.backends.nvidia.compiler import get_ptxas
    get_ptxas(90)
except Exception as exc:  # no CUDA toolchain in this triton
    print(exc); sys.exit(77)
from robust_unlearn.kernels.quant_floor import quant_floor_kernel
from robust_unlearn.robust.floor import _Plan
for dtype, ptr, formats in ((torch.bfloat16, "*i16", ["nf4"]), (torch.float32, "*fp32", ["nf4", "int8", "rtn4-g128"])):
    plan = _Plan(formats, 0.2, 2, (37, 150), dtype, "cpu")
    ce = dict(plan.constexprs(), IN_KIND=0 if dtype == torch.float32 else 1, BLOCK_SIZE=1024, PARTIAL=True)
    sig = dict(wt_ptr=ptr, wc_ptr=ptr, mask_ptr="*u8", out_ptr=ptr, stats_ptr="*fp32", tab_ptr="*fp32",
               desc_ptr="*i32", cnt_ptr="*i32", n="i32", margin="fp32", **{k: "constexpr" for k in ce})
    k = triton.compile(ASTSource(fn=quant_floor_kernel, signature=sig, constexprs=ce),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
    assert k.asm["cubin"] and "fma.rn.f32" not in k.asm["ptx"]
print("compiled")
"""


def test_kernel_compiles_for_cuda_without_a_gpu():
    """The real (not interpreted) compile down to an sm_90 cubin, in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode == 77:
        pytest.skip(f"triton has no CUDA toolchain here: {r.stdout.strip()}")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


# ---- the guarantee --------------------------------------------------------------------------------
def check_result(wt, wc, mask, res, formats):
    out = res.weight
    assert out.dtype == wc.dtype
    assert torch.equal(bits(out)[~mask], bits(wt)[~mask])  # outside the mask: the target, bit for bit
    assert F.verify_flips(wt, out, mask, formats) == {F.parse_format(f).name: 1.0 for f in formats}
    updated = mask & (out != wt)
    moved = updated & (bits(out) != bits(wc))
    assert int(updated.sum()) == res.n_updated > 0 and int(moved.sum()) == res.n_moved_by_floor
    direction = torch.sign(wc.float() - wt.float())
    assert torch.equal(torch.sign(out.float() - wc.float())[moved], direction[moved])  # moved further, same way
    assert res.n_updated + res.n_reverted + res.n_zero_update == int(mask.sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("formats", FORMAT_SETS)
@pytest.mark.kernel
def test_apply_floor_flips_every_updated_element(dtype, formats):
    wt, wc, mask = case((37, 150), dtype, seed=1, step=3e-4)
    res = F.apply_floor(wt, wc, mask, formats=formats)
    assert res.backend == ("triton" if KERNEL else "torch")  # auto: the kernel where it can run
    check_result(wt, wc, mask, res, formats)
    # without the floor these updates mostly keep the target's codes
    assert min(F.verify_flips(wt, torch.where(mask, wc, wt), mask, formats).values()) < 0.5


def test_int8_checked_with_bitsandbytes_linear8bitlt():
    import bitsandbytes as bnb

    wt, wc, mask = case((24, 150), torch.bfloat16, seed=2, step=1e-3)
    out = F.apply_floor(wt, wc, mask, formats="int8").weight

    def cb(w):  # the int8 codes bitsandbytes' Linear8bitLt holds (Int8Params quantizes on .to(device))
        p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        return p.data if p.data.dtype == torch.int8 else p.CB

    updated = mask & (out != wt)
    assert bool((cb(out) != cb(wt))[updated].all())


def test_tiny_updates_are_floored_one_bin():
    wt, _, mask = case((37, 150), torch.float32, seed=4)
    g = torch.Generator().manual_seed(5)
    wc = wt + 1e-6 * torch.where(torch.rand(wt.shape, generator=g) < 0.5, -1.0, 1.0)
    assert F.verify_flips(wt, torch.where(mask, wc, wt), mask, ["nf4"])["nf4"] < 0.02
    res = F.apply_floor(wt, wc, mask, formats="nf4")
    check_result(wt, wc, mask, res, ["nf4"])
    assert res.n_moved_by_floor >= 0.95 * res.n_updated
    # where the block scale is unchanged, each moved element went exactly one bin
    same_scale = (F.scales(res.weight, "nf4") == F.scales(wt, "nf4")).repeat_interleave(64)[:wt.numel()].view_as(wt)
    moved = mask & (res.weight != wc) & (res.weight != wt) & same_scale
    step = (F.codes(res.weight, "nf4") - F.codes(wt, "nf4"))[moved]
    assert moved.sum() > 1000 and bool((step.abs() == 1).all())


def test_already_flipped_elements_are_untouched():
    wt, wc, mask = case((37, 150), torch.bfloat16, seed=6, step=2e-3)
    first = F.apply_floor(wt, wc, mask, formats=("nf4", "rtn4-g128"))
    again = F.apply_floor(wt, first.weight, mask, formats=("nf4", "rtn4-g128"))
    assert torch.equal(bits(again.weight), bits(first.weight))
    assert again.n_moved_by_floor == 0 and again.n_reverted == 0 and again.iterations == 1
    # big updates (several bins) already flip: the floor leaves them bit for bit
    sign = torch.where(torch.rand(wt.shape, generator=torch.Generator().manual_seed(0)) < 0.5, -1.0, 1.0)
    big = (wt.float() + 0.02 * sign).to(wt.dtype)
    mixed = torch.where(torch.arange(wt.numel()).view_as(wt) % 2 == 0, big, wc)
    res = F.apply_floor(wt, mixed, mask, formats="nf4")
    flipped = mask & (F.codes(torch.where(mask, mixed, wt), "nf4") != F.codes(wt, "nf4"))
    flipped &= F.scales(torch.where(mask, mixed, wt), "nf4").eq(F.scales(res.weight, "nf4")).repeat_interleave(64)[
        :wt.numel()].view_as(wt)
    assert flipped.sum() > 500 and torch.equal(bits(res.weight)[flipped], bits(mixed)[flipped])


def test_extreme_bins_outward_are_reverted_and_counted():
    g = torch.Generator().manual_seed(7)
    wt = torch.rand(3, 64, generator=g) - 0.5                 # |w| < 0.5 in every block of 64 / row
    wt[0, 0], wt[0, 1] = 1.0, 0.9                               # absmax; 0.9 is nf4 code 15 and int8 code 114
    wt[1, 0], wt[1, 1] = -1.0, -0.9
    wt[2, 0] = 1.0
    wc = wt.clone()
    wc[0, 0] += 1e-3      # absmax outward: no higher bin under its own scale
    wc[0, 1] += 1e-4      # code 15 moving up
    wc[1, 0] -= 1e-3      # negative absmax outward
    wc[1, 1] -= 1e-4      # code 0 moving down
    wc[2, 0] -= 1e-4      # absmax moving inward: must flip (its block scale becomes the 2nd largest)
    wc[2, 5] += 1e-5      # an ordinary element
    mask = wc != wt
    res = F.apply_floor(wt, wc, mask, formats="nf4")
    assert res.n_reverted == 4 and res.n_updated == 2
    for r, c in ((0, 0), (0, 1), (1, 0), (1, 1)):
        assert bits(res.weight)[r, c] == bits(wt)[r, c]
    assert F.codes(res.weight, "nf4")[2, 0] != F.codes(wt, "nf4")[2, 0] and res.weight[2, 0] < wt[2, 0]
    check_result(wt, wc, mask, res, ["nf4"])
    # per-row formats: the row absmax moving outward is reverted too; 0.9 is not extreme for int8 / rtn8
    for fmt in ("int8", "rtn8"):
        res = F.apply_floor(wt, wc, mask, formats=fmt)
        assert res.n_reverted == 2 and bits(res.weight)[0, 0] == bits(wt)[0, 0]
        check_result(wt, wc, mask, res, [fmt])


def test_zero_updates_in_mask_are_counted_and_kept():
    wt, wc, mask = case((5, 1031), torch.float16, seed=8, step=1e-2)
    wc = torch.where(torch.arange(wc.numel()).view_as(wc) % 3 == 0, wt, wc)
    res = F.apply_floor(wt, wc, mask, formats="fp4")
    zero = mask & (wc == wt)
    assert res.n_zero_update == int(zero.sum()) > 0
    assert torch.equal(bits(res.weight)[zero], bits(wt)[zero])
    check_result(wt, wc, mask, res, ["fp4"])


def test_bf16_save_load_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    formats = ("nf4", "int8", "rtn4-g128")
    wt, wc, mask = case((5, 1031), torch.bfloat16, seed=9, step=1e-3)
    res = F.apply_floor(wt, wc, mask, formats=formats)
    save_file({"w": res.weight, "t": wt}, str(tmp_path / "m.safetensors"))
    back = load_file(str(tmp_path / "m.safetensors"))
    assert back["w"].dtype == torch.bfloat16 and torch.equal(bits(back["w"]), bits(res.weight))
    assert F.verify_flips(back["t"], back["w"], mask, formats) == {"nf4": 1.0, "int8": 1.0, "rtn4-g128": 1.0}


def test_one_dim_weight_and_errors():
    wt, wc, mask = case((1000,), torch.float32, seed=10, step=1e-4)
    res = F.apply_floor(wt, wc, mask, formats=("int8", "rtn4"))
    check_result(wt, wc, mask, res, ["int8", "rtn4"])
    wt, wc, mask = case((37, 150), torch.float32, seed=0)
    with pytest.raises(F.FloorError, match="did not converge"):
        F.apply_floor(wt, wc, mask, formats="nf4", max_iters=1)
    with pytest.raises(UserError):
        F.apply_floor(wt, wc.double(), mask)
    with pytest.raises(UserError):
        F.apply_floor(wt, wc, mask, margin=0.7)


@kernel_test
def test_kernel_package_import_path():
    import robust_unlearn.kernels.quant_floor as qf

    assert callable(qf.launch_floor_pass)
    wt, wc, mask = case((37, 150), torch.float16, seed=11, step=1e-3)
    res = F.apply_floor(wt, wc, mask, formats="nf4", backend="triton")
    assert res.backend == "triton" and F.verify_flips(wt, res.weight, mask, ["nf4"])["nf4"] == 1.0


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "rtn4-g64"])
def test_snap_puts_updated_weights_where_the_quantizer_leaves_them(fmt):
    """``snap_to_codes`` (``robust_qat``'s saved state): every updated element sits on its code's dequantized value,
    so compressing with that format leaves it bit for bit; codes and scales are the floor's."""
    from robust_unlearn.compress import get_compression

    wt, wc, mask = case((37, 150), torch.float32, seed=6, step=3e-4)
    res = F.apply_floor(wt, wc, mask, formats=fmt)
    out, n = F.snap_to_codes(wt, res.weight, fmt)
    updated = out != wt
    assert torch.equal(updated, res.weight != wt) and n > 0.5 * int(updated.sum())
    assert torch.equal(F.codes(out, fmt), F.codes(res.weight, fmt))
    assert torch.equal(F.scales(out, fmt), F.scales(res.weight, fmt))
    assert bool((F.codes(out, fmt) != F.codes(wt, fmt))[updated].all())  # the floor's guarantee holds
    assert torch.equal(out[~updated], wt[~updated])
    lin = torch.nn.Linear(150, 37, bias=False)
    lin.weight.data = out.clone()
    q = get_compression(fmt)(torch.nn.Sequential(lin))[0].weight.detach()
    assert torch.equal(q[updated], out[updated])  # the quantizer's own output (bitsandbytes for nf4 / fp4)
    assert not torch.equal(q[~updated], out[~updated])  # the rest is rounded as usual


def test_dequantized_equals_bitsandbytes_on_odd_sizes():
    import bitsandbytes.functional as bf

    from robust_unlearn.quant import dequantized

    g = torch.Generator().manual_seed(7)
    for shape in [(5, 77), (130,), (3, 3, 41)]:
        w = torch.randn(shape, generator=g) * 0.03
        for qt in ["nf4", "fp4"]:
            q, st = bf.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=False)
            back = bf.dequantize_4bit(q, st, blocksize=64, quant_type=qt).view(shape)  # 1-d comes back as [1, n]
            assert torch.equal(dequantized(w, qt), back), (shape, qt)
    with pytest.raises(ValueError, match="int8 is not an nf4 / fp4 / rtn format"):
        dequantized(w, "int8")


def test_qat_needs_one_table_or_rtn_format():
    from robust_unlearn.config import load_recipe

    with pytest.raises(UserError, match="robust_qat needs exactly one nf4 / fp4 / rtn format"):
        load_recipe(None, ["unlearn.robust_qat=true", "unlearn.robust_floor=[nf4,fp4]"])
