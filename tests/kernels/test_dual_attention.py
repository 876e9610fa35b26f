"""editrt.kernels.dual_attention against its SDPA reference.

Inputs are fresh random tensors every run (no fixed seed); shapes are in the test ids. On CPU the
kernel runs through Triton's interpreter at small sizes; the real SD-1.5 sizes run under `gpu`.

Tolerances, against the fp32 SDPA result on the same (low-precision) inputs:
* fp32 1e-5 abs + 1e-5 rel: fp32 accumulation everywhere; the only differences are exp2 vs exp,
  the online rescaling and the summation order, a few ulp of outputs of size ~1 (seen: <= 2e-6).
* fp16 2e-3: the probabilities are rounded to fp16 before the PV product (2^-11 relative each,
  as in flash attention) and the output to fp16 (half an ulp, 2^-12 relative); |out| <~ 3.
  Seen: <= 1e-3, the same as SDPA's own fp16 result.
* bf16 2e-2: the same two roundings with bf16's 8x larger unit (2^-8). Seen: ~1e-2 (SDPA bf16: ~5e-3).
"""

import pytest
import torch

from editrt.kernels import dual_attention as da
from editrt.kernels import launches
from editrt.kernels.dual_attention import dual_cross_attention, dual_cross_attention_reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _random_inputs(B, H, M, N_a, N_b, D, dtype, device="cpu", strided=False):
    """q_a, k_a, v_a, q_b, k_b, v_b. strided=True gives [B, rows, H, D] storage viewed as
    [B, H, rows, D] (what a projection followed by a head split produces): non-contiguous."""

    def make(rows):
        if strided:
            return torch.randn(B, rows, H, D, device=device).to(dtype).transpose(1, 2)
        return torch.randn(B, H, rows, D, device=device).to(dtype)

    return make(M), make(N_a), make(N_a), make(M), make(N_b), make(N_b)


def _run_poisoned(inputs, scale=None):
    """Kernel output written into a NaN-filled buffer, so unwritten elements fail the check."""
    q_a = inputs[0]
    B, H, M, D = q_a.shape
    out = torch.full((B, M, 2 * H * D), float("nan"), dtype=q_a.dtype, device=q_a.device)
    result = dual_cross_attention(*inputs, scale=scale, out=out)
    assert result.data_ptr() == out.data_ptr()
    return out


def _check_against_reference(inputs, scale=None):
    dtype = inputs[0].dtype
    out = _run_poisoned(inputs, scale)
    assert not out.isnan().any(), "kernel left elements of the output unwritten"
    expected = dual_cross_attention_reference(*(t.float() for t in inputs), scale=scale)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


# M = 37 and N_b = 45 are not multiples of the interpreter's 32-wide blocks; N_a = 13 < one block.
CPU_CASES = [
    # (B, H, M, N_a, N_b, D, dtype, strided)
    (2, 2, 37, 13, 45, 40, torch.float32, False),
    (1, 3, 37, 13, 45, 64, torch.float32, True),
    (2, 2, 37, 13, 45, 80, torch.float32, False),
    (1, 2, 21, 7, 33, 160, torch.float32, True),
    (2, 2, 37, 13, 45, 40, torch.float16, True),
    (1, 2, 37, 13, 45, 80, torch.float16, False),
    (1, 2, 37, 13, 45, 64, torch.bfloat16, False),
    (2, 1, 21, 7, 33, 160, torch.bfloat16, True),
    (1, 1, 5, 1, 3, 24, torch.float32, False),  # tiny: single key in set a, D not a multiple of 16
]


def _case_id(case):
    B, H, M, N_a, N_b, D, dtype, strided = case
    layout = "strided" if strided else "contig"
    return f"B{B}-H{H}-M{M}-Na{N_a}-Nb{N_b}-D{D}-{str(dtype).split('.')[-1]}-{layout}"


@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_matches_reference_cpu(case):
    B, H, M, N_a, N_b, D, dtype, strided = case
    _check_against_reference(_random_inputs(B, H, M, N_a, N_b, D, dtype, strided=strided))


def test_custom_scale_and_functional_path():
    inputs = _random_inputs(1, 2, 19, 5, 9, 32, torch.float32)
    out = dual_cross_attention(*inputs, scale=0.37)  # through torch.ops.editrt.dual_cross_attention
    expected = dual_cross_attention_reference(*inputs, scale=0.37)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_stacked_projection_identity():
    """One GEMM with cat([W_a, W_b], 1) equals the two projections summed."""
    B, H, M, N_a, N_b, D = 2, 2, 23, 11, 37, 40
    C = 48  # output channels of the projections
    inputs = _random_inputs(B, H, M, N_a, N_b, D, torch.float32)
    w_a = torch.randn(C, H * D) / (H * D) ** 0.5
    w_b = torch.randn(C, H * D) / (H * D) ** 0.5

    fused = _run_poisoned(inputs) @ torch.cat([w_a, w_b], dim=1).T  # (B, M, C)

    q_a, k_a, v_a, q_b, k_b, v_b = inputs
    attn_a = torch.nn.functional.scaled_dot_product_attention(q_a, k_a, v_a)  # (B, H, M, D)
    attn_b = torch.nn.functional.scaled_dot_product_attention(q_b, k_b, v_b)
    attn_a = attn_a.transpose(1, 2).reshape(B, M, H * D)
    attn_b = attn_b.transpose(1, 2).reshape(B, M, H * D)
    separate = attn_a @ w_a.T + attn_b @ w_b.T
    torch.testing.assert_close(fused, separate, atol=1e-5, rtol=1e-5)


def _bad_input_cases():
    good = _random_inputs(1, 2, 8, 3, 5, 16, torch.float32)
    q_a, k_a, v_a, q_b, k_b, v_b = good
    return {
        "k_a wrong head dim": ((q_a, k_a[..., :8], v_a, q_b, k_b, v_b), "k_a"),
        "v_b rows differ from k_b": ((q_a, k_a, v_a, q_b, k_b, v_b[:, :, :4]), "v_b"),
        "q_b rows differ from q_a": ((q_a, k_a, v_a, q_b[:, :, :7], k_b, v_b), "q_b"),
        "3-D query": ((q_a[0], k_a, v_a, q_b, k_b, v_b), "q_a"),
        "dtype mismatch": ((q_a, k_a, v_a.double(), q_b, k_b, v_b), "v_a"),
        "unsupported dtype": (tuple(t.double() for t in good), "q_a"),
        "head dim > 256": (_random_inputs(1, 1, 2, 1, 1, 257, torch.float32), "q_a"),
        "empty key set": ((q_a, k_a[:, :, :0], v_a[:, :, :0], q_b, k_b, v_b), "k_a"),
    }


@pytest.mark.parametrize("name", list(_bad_input_cases()))
def test_bad_inputs_raise(name):
    args, culprit = _bad_input_cases()[name]
    with pytest.raises(ValueError, match=culprit):
        dual_cross_attention(*args)
    with pytest.raises(ValueError, match=culprit):
        dual_cross_attention_reference(*args)


def test_bad_out_raises():
    inputs = _random_inputs(1, 2, 8, 3, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="out"):
        dual_cross_attention(*inputs, out=torch.empty(1, 8, 16))
    with pytest.raises(ValueError, match="out"):
        dual_cross_attention(*inputs, out=torch.empty(1, 8, 64, dtype=torch.float16))


def test_disable_env_var_falls_back_to_reference(monkeypatch):
    inputs = _random_inputs(1, 2, 9, 3, 5, 16, torch.float32)

    def no_kernel(*args, **kwargs):
        raise AssertionError("Triton kernel launched although EDITRT_DISABLE_TRITON=1")

    monkeypatch.setenv("EDITRT_DISABLE_TRITON", "1")
    monkeypatch.setattr(da, "_launch", no_kernel)
    torch.testing.assert_close(dual_cross_attention(*inputs), dual_cross_attention_reference(*inputs))
    out = torch.full((1, 9, 64), float("nan"))
    dual_cross_attention(*inputs, out=out)
    torch.testing.assert_close(out, dual_cross_attention_reference(*inputs))


def test_custom_op_registration():
    """Schema, fake (meta) implementation and dispatch of torch.ops.editrt.dual_cross_attention."""
    inputs = _random_inputs(1, 2, 5, 3, 4, 16, torch.float32)
    torch.library.opcheck(torch.ops.editrt.dual_cross_attention.default, (*inputs, 0.25))


# --------------------------------------------------------------------------------------------
# GPU: SD-1.5 sizes (heads 8, D = 320/8, 640/8, 1280/8)
# --------------------------------------------------------------------------------------------

GPU_SHAPES = [(4096, 40), (1024, 80), (256, 160), (64, 160)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("N_a", [50, 77])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("M,D", GPU_SHAPES, ids=[f"M{m}-D{d}" for m, d in GPU_SHAPES])
def test_matches_reference_gpu(M, D, B, N_a, dtype):
    _check_against_reference(_random_inputs(B, 8, M, N_a, 256, D, dtype, device="cuda", strided=B == 2))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [40, 64, 80, 160])
def test_fp32_gpu_takes_sdpa(D):
    """fp32 on CUDA runs the SDPA pair: correct, and no Triton launch."""
    with launches.track() as seen:
        _check_against_reference(_random_inputs(2, 8, 333, 77, 256, D, torch.float32, device="cuda"))
    assert seen.names == []


@pytest.mark.gpu
def test_fp16_gpu_launch_is_recorded():
    with launches.track() as seen:
        _check_against_reference(_random_inputs(2, 8, 64, 77, 256, 40, torch.float16, device="cuda"))
    assert seen.names == ["dual_attention"]


# --------------------------------------------------------------------------------------------
# Dispatch, launch recording, layouts
# --------------------------------------------------------------------------------------------


def test_interpreter_launch_is_recorded_and_reference_is_not(monkeypatch):
    inputs = _random_inputs(1, 2, 9, 3, 5, 16, torch.float32)
    with launches.track() as seen:
        dual_cross_attention(*inputs)
    assert seen.counts == {"dual_attention": 1}
    monkeypatch.setenv("EDITRT_DISABLE_TRITON", "1")
    with launches.track() as seen:
        dual_cross_attention(*inputs)
        dual_cross_attention_reference(*inputs)
    assert seen.names == []


def test_dispatch_rule(monkeypatch):
    """fp32 on CUDA goes to SDPA; fp16/bf16 on CUDA to Triton; CPU tensors to Triton only under the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not da.kernel_handles("cuda", torch.float32)
    assert da.kernel_handles("cuda", torch.float16) and da.kernel_handles("cuda", torch.bfloat16)
    assert not da.kernel_handles("cpu", torch.float16)
    monkeypatch.setenv("EDITRT_DISABLE_TRITON", "1")
    assert not da.kernel_handles("cuda", torch.float16)
    monkeypatch.setenv("EDITRT_DISABLE_TRITON", "0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert da.kernel_handles("cpu", torch.float32) and not da.kernel_handles("cuda", torch.float16)


@pytest.mark.parametrize("D", [8, 16, 24, 40, 64, 80, 100, 160, 200, 256])
def test_head_dim_chunks_cover_d_with_tensor_core_widths(D):
    d0, d1 = da.head_dim_chunks(D)
    assert d0 >= 16 and d0 & (d0 - 1) == 0 and (d1 == 0 or (d1 >= 16 and d1 & (d1 - 1) == 0))
    assert d0 + d1 >= D and (d1 == 0 or d0 < D)  # covers D; a second chunk only when D0 alone is short
    assert d0 + d1 <= da.next_power_of_2(max(D, 16))  # never more padding than one power-of-two block


def test_sd_head_dims_waste_less_mma_than_one_power_of_two_block():
    assert da.padded_mma_fraction(40) == pytest.approx(1 / 6)  # 48 columns instead of 64
    assert da.padded_mma_fraction(80) == 0 and da.padded_mma_fraction(160) == 0


def test_unaligned_and_strided_layouts():
    """Views whose strides are not multiples of 16 bytes take ALIGN=1 (and stay correct); a head dim
    with stride != 1 and an `out` with a strided last dim are copied around the kernel."""
    B, H, M, N_a, N_b, D = 1, 2, 19, 7, 9, 20
    big = torch.randn(B, H, M + 1, D + 3)
    q_a = big[:, :, 1:, 1:D + 1]  # offset by a row and a column, row stride D + 3: unaligned
    inputs = [q_a] + list(_random_inputs(B, H, M, N_a, N_b, D, torch.float32)[1:])
    assert da._alignment(inputs, 4) == 1
    _check_against_reference(inputs)
    half = [t.half() for t in _random_inputs(B, H, M, N_a, N_b, 40, torch.float32, strided=True)]
    assert da._alignment(half, 2) == 8  # [B, rows, H, 40] storage: every stride a multiple of 8
    _check_against_reference(half)
    d_strided = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in _random_inputs(B, H, M, N_a, N_b, D, torch.float32)]
    assert d_strided[0].stride(-1) != 1
    _check_against_reference(d_strided)
    out = torch.full((B, M, 4 * H * D), float("nan"))[:, :, ::2]  # last-dim stride 2
    dual_cross_attention(*d_strided, out=out)
    expected = dual_cross_attention_reference(*d_strided)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_fp16_misaligned_strides_fall_back_to_align_1():
    """Head stride 20 fp16 elements = 40 bytes: not a 16-byte multiple, so no alignment claim."""
    inputs = [t.half() for t in _random_inputs(1, 2, 33, 5, 7, 20, torch.float32, strided=True)]
    assert da._alignment(inputs, 2) == 1
    _check_against_reference(inputs)


def test_autotuner_prunes_with_the_doctors_config_source(monkeypatch):
    """On a GPU the autotuner's prune hook keeps exactly `attention_configs` for the device's shared
    memory: the list `editrt doctor` compiles (here with sm_89's 99 KB, where D = 160 loses configs)."""
    assert da._dual_attention_fwd_kernel.early_config_prune is da._prune_configs
    monkeypatch.setattr(da, "interpreter_active", lambda: False)
    monkeypatch.setattr(da, "_device_smem_per_block", lambda: 99 * 1024)
    out = torch.empty(1, dtype=torch.float16)
    for D in (40, 80, 160):
        kept = da._prune_configs(da._ALL_GPU_CONFIGS, {"out_ptr": out}, HEAD_DIM=D)
        assert set(kept) == set(da.attention_configs(D, 2, 99 * 1024)) and len(kept) == len(set(kept))
        assert set(kept) <= set(da._GPU_CONFIGS[da._padded_bucket(D)])
    assert len(da._prune_configs(da._ALL_GPU_CONFIGS, {"out_ptr": out}, HEAD_DIM=160)) < len(da._GPU_CONFIGS[256])
