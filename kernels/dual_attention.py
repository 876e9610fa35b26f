"""Fused dual cross-attention: one launch attends every query row to two key/value sets.

Math (paper "Editable Image Elements", Algorithm 1). For each batch b and head h, with queries
q_a, q_b in R^{M x D}, a text/task set (k_a, v_a) in R^{N_a x D} and an element set
(k_b, v_b) in R^{N_b x D}::

    attn_a = softmax(scale * q_a k_a^T) v_a            # (M, D)
    attn_b = softmax(scale * q_b k_b^T) v_b            # (M, D)
    out[b] = concat_heads(attn_a) || concat_heads(attn_b)   # (M, 2*H*D)

with ``concat_heads(x)[:, h*D:(h+1)*D] = x[h]`` (the usual ``x.transpose(1, 2).reshape(B, M, H*D)``)
and ``scale = 1/sqrt(D)`` by default. The two halves feed their own output projections W_a, W_b
([C, H*D] each); because of this layout a single GEMM with the stacked weights gives their sum::

    out @ cat([W_a, W_b], dim=1).T == attn_a @ W_a.T + attn_b @ W_b.T

Algorithm (flash-attention forward, Dao et al. 2022; Triton tutorial 06). The grid is
(cdiv(M, BLOCK_M), B*H, 2): axis 2 picks the key/value set, so both attentions run in ONE launch,
through one code path (the set's pointers and strides are selected up front, so there is one
pipelined loop and one set of shared-memory buffers). A program keeps its [BLOCK_M, D] query tile
in registers and streams the keys/values in [BLOCK_N, D] tiles with an online softmax (running
row max m and row sum l, rescaling the fp32 accumulators when m grows), so no [M, N] matrix ever
reaches global memory; any M, N_a, N_b work (masked tails).

Head dims (SD: 40, 80, 160) are compile-time constants and are split into two power-of-two column
chunks D0 + D1 (`head_dim_chunks`: 32+16, 64+16, 128+32): every dot runs on tensor-core widths and
the MMA work on pad columns is 16.7% at D = 40 and 0 at 80 and 160 (one power-of-two block:
37.5% each). The head dim must have stride 1 (other layouts are copied first); when every other
stride and every base address is a multiple of 16 bytes (SD's fused projections at fp16/bf16
are), the launcher passes ALIGN = 16 bytes in elements and the kernel writes each stride as
(s // ALIGN) * ALIGN, which Triton's alignment analysis can see through: the loads become 16-byte
vector loads and asynchronous copies (cp.async) even with a 40-element head stride, where they
were scalar 2-byte accesses before (`editrt doctor --arch sm_90` shows both).

Dispatch (`kernel_handles`): fp16/bf16 on CUDA -> this kernel; fp32 on CUDA -> the reference, two
SDPA calls (full-precision dots spilled in most configs and one took minutes to compile); CPU
tensors under TRITON_INTERPRET=1 -> this kernel in the interpreter (every dtype, for the tests).
Configs (`attention_configs`) are listed per padded head dim and pruned by a shared-memory estimate
against the device's per-block limit; the autotuner keys on M, N_a and N_b bucketed to powers of
two (a new element count or image size in a tuned bucket is not benchmarked again) and its winners
persist across processes (kernels/autotune_cache.py).

Work floor: 4*B*H*M*(N_a + N_b)*D FLOPs (two GEMMs per set: QK^T and PV). Bytes: the inputs are
read once and the output written once, B*H*(2*M + 2*N_a + 2*N_b)*D*itemsize + B*M*2*H*D*itemsize;
with N_a + N_b = 333 and D <= 160 the FLOPs dominate (compute-bound on tensor cores).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import autotune_cache
from ._triton_utils import interpreter_active, next_power_of_2, shape_str, triton_disabled
from .aot import Launch, fake_arguments
from .launches import record

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_NAME = "dual_attention"  # what the launcher records in editrt.kernels.launches


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """Split D into two power-of-two widths (D0, D1) for the tensor-core dots (K >= 16 each).

    D0 is the largest power of two <= D (at least 16) and D1 the power of two (>= 16, or 0) that
    covers the rest: 40 -> (32, 16), 80 -> (64, 16), 160 -> (128, 32), 64 -> (64, 0). The dots run
    on D0 + D1 columns, so the MMA work wasted on padding is 1 - D / (D0 + D1): 16.7% at D = 40
    and 0% at 80 and 160 (one power-of-two block would waste 37.5%, 37.5% and 37.5%).
    """
    d0 = max(16, 1 << (int(head_dim).bit_length() - 1))
    rest = head_dim - d0
    d1 = 0 if rest <= 0 else max(16, next_power_of_2(rest))
    return d0, d1


def padded_mma_fraction(head_dim: int) -> float:
    """Share of the QK^T and PV tensor-core work spent on pad columns at head dim D."""
    d0, d1 = head_dim_chunks(head_dim)
    return 1.0 - head_dim / (d0 + d1)


def _config(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Autotune candidates by padded head dim D0 + D1 (the bucket that holds it), measured with
# `editrt doctor --arch sm_90 / sm_80` (registers, spills, shared memory, blocks per SM):
# every one compiles without spilling on both and fits their shared memory; each list mixes a
# large tile (tensor-core efficiency) with small-tile configs that keep 3-6 blocks per SM
# (64-74 registers at D = 40 on sm_90). D = 160 drops what spilled on sm_80 at 255 registers
# ((128, 64, 8 warps, 2 stages), (64, 64, 4, 2|3)); (BLOCK_M, BLOCK_N, warps, stages):
_GPU_CONFIGS = {
    64: [_config(128, 64, 8, 2), _config(64, 64, 4, 3), _config(64, 32, 4, 3), _config(128, 32, 8, 3)],
    128: [_config(128, 64, 8, 3), _config(64, 64, 4, 3), _config(64, 32, 4, 3), _config(128, 32, 8, 3)],
    256: [_config(128, 64, 8, 3), _config(64, 32, 4, 2), _config(64, 32, 8, 3), _config(128, 32, 8, 3)],
}
# The interpreter runs every program serially with NumPy; autotuning would multiply that cost.
_INTERPRETER_CONFIGS = [_config(32, 32, 4, 1)]


def _padded_bucket(head_dim: int) -> int:
    d0, d1 = head_dim_chunks(head_dim)
    return next(b for b in sorted(_GPU_CONFIGS) if d0 + d1 <= b)


def shared_memory_estimate(config: triton.Config, head_dim: int, itemsize: int) -> int:
    """The kernel's shared memory: K and V tiles for every pipeline stage plus the query tile
    (what Triton allocates for the dot operands; tests/test_doctor.py checks it against the
    compiled size of every candidate on sm_80 and sm_90)."""
    d0, d1 = head_dim_chunks(head_dim)
    kw = config.kwargs
    return (max(config.num_stages, 1) * kw["BLOCK_N"] * 2 + kw["BLOCK_M"]) * (d0 + d1) * itemsize


def attention_configs(head_dim: int, itemsize: int, smem_per_block: int) -> list[triton.Config]:
    """The configs the launcher may pick at head dim D on a device with `smem_per_block` bytes.

    The one source for the autotuner (`prune_configs_by`) and for `editrt doctor`.
    """
    candidates = _GPU_CONFIGS[_padded_bucket(head_dim)]
    fitting = [c for c in candidates if shared_memory_estimate(c, head_dim, itemsize) <= smem_per_block]
    return fitting or candidates[-1:]


def _device_smem_per_block() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)


def _prune_configs(configs, named_args, **kwargs):
    """Autotuner hook: keep the candidates of this head dim that fit this GPU's shared memory."""
    if interpreter_active():
        return configs
    allowed = attention_configs(kwargs["HEAD_DIM"], named_args["out_ptr"].element_size(), _device_smem_per_block())
    return [c for c in configs if c in allowed]


_ALL_GPU_CONFIGS = list(dict.fromkeys(c for cs in _GPU_CONFIGS.values() for c in cs))
_CONFIGS = _INTERPRETER_CONFIGS if interpreter_active() else _ALL_GPU_CONFIGS


@triton.jit
def _load_tile(base, rows, row_valid, s_row, col0, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[rows, WIDTH] tile of columns col0 .. col0 + WIDTH of a [rows, HEAD_DIM] operand (zeros past D)."""
    offs_d = col0 + tl.arange(0, WIDTH)
    mask = row_valid[:, None]
    if col0 + WIDTH > HEAD_DIM:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    return tl.load(base + rows[:, None] * s_row + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, rows, row_valid, s_row, col0, tile, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_d = col0 + tl.arange(0, WIDTH)
    mask = row_valid[:, None]
    if col0 + WIDTH > HEAD_DIM:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * s_row + offs_d[None, :], tile, mask=mask)


@triton.jit
def _dot(a, b, acc, IEEE_DOT: tl.constexpr):
    if IEEE_DOT:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.autotune(configs=_CONFIGS, key=["M_KEY", "NA_KEY", "NB_KEY", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _dual_attention_fwd_kernel(
    qa_ptr, ka_ptr, va_ptr, qb_ptr, kb_ptr, vb_ptr, out_ptr,
    # strides (batch, head, row) of each input; the head dim is contiguous (stride 1)
    s_qa_b, s_qa_h, s_qa_m,
    s_ka_b, s_ka_h, s_ka_n,
    s_va_b, s_va_h, s_va_n,
    s_qb_b, s_qb_h, s_qb_m,
    s_kb_b, s_kb_h, s_kb_n,
    s_vb_b, s_vb_h, s_vb_n,
    s_out_b, s_out_m,
    H, M, N_a, N_b,
    qk_scale_log2,  # scale * log2(e): the softmax runs in base 2 (exp2 is the native instruction)
    M_KEY, NA_KEY, NB_KEY,  # autotune key only (unused): M, N_a, N_b bucketed by autotune_cache.size_bucket
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,  # D, exact: masks of the tail chunk fold to constants
    D0: tl.constexpr, D1: tl.constexpr,  # head_dim_chunks(D); D1 == 0: one chunk
    ALIGN: tl.constexpr,  # every non-unit stride is a multiple of ALIGN elements (16 bytes) or 1
    IEEE_DOT: tl.constexpr,  # fp32 inputs (interpreter only): full-precision dots instead of TF32
    BF16_DOT_IN_FP32: tl.constexpr,  # interpreter only: see below
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    kv_set = tl.program_id(2)  # 0: set a (text/task prompt), 1: set b (elements)
    b = pid_bh // H
    h = pid_bh % H

    # One code path for both sets (a single pipelined loop: one set of shared-memory buffers).
    # Strides are rewritten as (s // ALIGN) * ALIGN: equal to s (the launcher checked), but it
    # tells Triton's alignment analysis that rows and heads start on 16-byte boundaries even when
    # the head stride is 40 elements, so the loads vectorise (ld.global.v4 / cp.async).
    if kv_set == 0:
        q_base = qa_ptr + b * (s_qa_b // ALIGN * ALIGN) + h * (s_qa_h // ALIGN * ALIGN)
        k_base = ka_ptr + b * (s_ka_b // ALIGN * ALIGN) + h * (s_ka_h // ALIGN * ALIGN)
        v_base = va_ptr + b * (s_va_b // ALIGN * ALIGN) + h * (s_va_h // ALIGN * ALIGN)
        s_qm = s_qa_m // ALIGN * ALIGN
        s_kn = s_ka_n // ALIGN * ALIGN
        s_vn = s_va_n // ALIGN * ALIGN
        n_kv = N_a
    else:
        q_base = qb_ptr + b * (s_qb_b // ALIGN * ALIGN) + h * (s_qb_h // ALIGN * ALIGN)
        k_base = kb_ptr + b * (s_kb_b // ALIGN * ALIGN) + h * (s_kb_h // ALIGN * ALIGN)
        v_base = vb_ptr + b * (s_vb_b // ALIGN * ALIGN) + h * (s_vb_h // ALIGN * ALIGN)
        s_qm = s_qb_m // ALIGN * ALIGN
        s_kn = s_kb_n // ALIGN * ALIGN
        s_vn = s_vb_n // ALIGN * ALIGN
        n_kv = N_b
    # Heads-merged output: set a fills columns [0, H*D), set b [H*D, 2*H*D); head h at h*D.
    s_out_m = s_out_m // ALIGN * ALIGN
    out_base = out_ptr + b * (s_out_b // ALIGN * ALIGN) + (kv_set * H + h) * HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_valid = offs_m < M

    # The query tile (two column chunks) stays in registers for the whole key/value sweep.
    q0 = _load_tile(q_base, offs_m, m_valid, s_qm, 0, D0, HEAD_DIM)  # (BLOCK_M, D0)
    if BF16_DOT_IN_FP32:
        # Triton's CPU interpreter multiplies bf16 tiles as raw integers; bf16 x bf16 products
        # are exact in fp32, so upcasting first gives the bf16 tensor-core result.
        q0 = q0.to(tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        q1 = _load_tile(q_base, offs_m, m_valid, s_qm, D0, D1, HEAD_DIM)  # (BLOCK_M, D1)
        if BF16_DOT_IN_FP32:
            q1 = q1.to(tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(logit - m_i)

    for start_n in range(0, n_kv, BLOCK_N):
        kv_rows = start_n + offs_n
        n_valid = kv_rows < n_kv
        k0 = _load_tile(k_base, kv_rows, n_valid, s_kn, 0, D0, HEAD_DIM)
        v0 = _load_tile(v_base, kv_rows, n_valid, s_vn, 0, D0, HEAD_DIM)
        if BF16_DOT_IN_FP32:
            k0 = k0.to(tl.float32)
            v0 = v0.to(tl.float32)
        qk = _dot(q0, tl.trans(k0), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE_DOT)
        if D1 > 0:
            k1 = _load_tile(k_base, kv_rows, n_valid, s_kn, D0, D1, HEAD_DIM)
            v1 = _load_tile(v_base, kv_rows, n_valid, s_vn, D0, D1, HEAD_DIM)
            if BF16_DOT_IN_FP32:
                k1 = k1.to(tl.float32)
                v1 = v1.to(tl.float32)
            qk = _dot(q1, tl.trans(k1), qk, IEEE_DOT)  # (BLOCK_M, BLOCK_N), fp32 accumulate
        qk = qk * qk_scale_log2
        qk = tl.where(n_valid[None, :], qk, float("-inf"))  # key tail: no probability mass

        # Online softmax: every block holds >= 1 valid key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if not IEEE_DOT:
            # p is rounded to the input dtype (fp16/bf16) for the tensor-core PV product, as in
            # flash attention; the accumulators stay fp32.
            p = p.to(out_ptr.dtype.element_ty)
            if BF16_DOT_IN_FP32:
                p = p.to(tl.float32)
        acc0 = _dot(p, v0, acc0 * alpha[:, None], IEEE_DOT)
        if D1 > 0:
            acc1 = _dot(p, v1, acc1 * alpha[:, None], IEEE_DOT)
        m_i = m_new

    dtype = out_ptr.dtype.element_ty
    _store_tile(out_base, offs_m, m_valid, s_out_m, 0, (acc0 / l_i[:, None]).to(dtype), D0, HEAD_DIM)
    if D1 > 0:
        _store_tile(out_base, offs_m, m_valid, s_out_m, D0, (acc1 / l_i[:, None]).to(dtype), D1, HEAD_DIM)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_inputs(q_a, k_a, v_a, q_b, k_b, v_b) -> tuple[int, int, int, int, int, int]:
    """Validate the six operands; return (B, H, M, D, N_a, N_b)."""
    named = {"q_a": q_a, "k_a": k_a, "v_a": v_a, "q_b": q_b, "k_b": k_b, "v_b": v_b}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, H, rows, D], got shape {shape_str(t)}")
    if q_a.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q_a: expected dtype float32, float16 or bfloat16, got {q_a.dtype}")
    for name, t in named.items():
        if t.dtype != q_a.dtype:
            raise ValueError(f"{name}: expected dtype {q_a.dtype} (the dtype of q_a), got {t.dtype}")
        if t.device != q_a.device:
            raise ValueError(f"{name}: expected device {q_a.device} (the device of q_a), got {t.device}")

    B, H, M, D = q_a.shape
    if D < 1 or D > _MAX_HEAD_DIM:
        raise ValueError(f"q_a: expected head dim 1..{_MAX_HEAD_DIM}, got D={D}")
    if M < 1:
        raise ValueError(f"q_a: expected at least one query row, got M={M}")
    if tuple(q_b.shape) != (B, H, M, D):
        raise ValueError(f"q_b: expected shape [{B}, {H}, {M}, {D}] (same as q_a), got {shape_str(q_b)}")
    for k_name, v_name, k, v in (("k_a", "v_a", k_a, v_a), ("k_b", "v_b", k_b, v_b)):
        n = k.shape[2]
        if n < 1 or tuple(k.shape) != (B, H, n, D):
            raise ValueError(f"{k_name}: expected shape [{B}, {H}, N>=1, {D}], got {shape_str(k)}")
        if tuple(v.shape) != (B, H, n, D):
            raise ValueError(f"{v_name}: expected shape [{B}, {H}, {n}, {D}] (same as {k_name}), got {shape_str(v)}")
    return B, H, M, D, k_a.shape[2], k_b.shape[2]


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _check_out(out: torch.Tensor, q_a: torch.Tensor, B: int, M: int, C: int) -> None:
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != (B, M, C):
        raise ValueError(f"out: expected shape [{B}, {M}, {C}], got {shape_str(out)}")
    if out.dtype != q_a.dtype or out.device != q_a.device:
        raise ValueError(f"out: expected dtype {q_a.dtype} on {q_a.device}, got {out.dtype} on {out.device}")


# --------------------------------------------------------------------------------------------
# Launcher, reference, public API
# --------------------------------------------------------------------------------------------


def kernel_handles(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a call on `device_type` tensors of `dtype` runs the Triton kernel (else the SDPA pair).

    fp32 on CUDA takes the reference (two SDPA calls): the kernel's fp32 path needs full-precision
    dots, whose configs spill (up to 268 KB) and take minutes to compile on sm_90, while SDPA's
    fp32 kernels are as fast. The Triton kernel serves fp16 and bf16 on CUDA, and every dtype under
    the interpreter (TRITON_INTERPRET=1 on CPU), where the fp32 path tests the algorithm tightly.
    """
    if triton_disabled():
        return False
    if interpreter_active():
        return device_type == "cpu"
    return device_type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def _unit_d(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _alignment(tensors, itemsize: int) -> int:
    """16 bytes in elements if every operand starts on a 16-byte boundary and every row, head and
    batch stride is a multiple of 16 bytes (SD's head dims 40/80/160 at fp16/bf16 are), else 1."""
    elems = 16 // itemsize
    for t in tensors:
        if t.data_ptr() % 16 or any(s % elems for s in t.stride()[:-1]):
            return 1
    return elems


def kernel_arguments(q_a, k_a, v_a, q_b, k_b, v_b, scale: float, out: torch.Tensor) -> tuple[list, dict]:
    """(positional args, constexpr kwargs) of one launch; operands have unit stride on D.

    Used by the launcher and by `editrt doctor` (which passes meta tensors), so both compile the same.
    """
    B, H, M, D = q_a.shape
    d0, d1 = head_dim_chunks(D)
    operands = (q_a, k_a, v_a, q_b, k_b, v_b)
    args = [*operands, out]
    for t in operands:
        args += list(t.stride()[:3])
    args += [*out.stride()[:2], H, M, k_a.shape[2], k_b.shape[2], scale * _LOG2E]
    args += [autotune_cache.size_bucket(n) for n in (M, k_a.shape[2], k_b.shape[2])]
    constexprs = dict(
        HEAD_DIM=D, D0=d0, D1=d1,
        ALIGN=_alignment((*operands, out), q_a.element_size()),
        IEEE_DOT=q_a.dtype == torch.float32,
        BF16_DOT_IN_FP32=interpreter_active() and q_a.dtype == torch.bfloat16,
    )
    return args, constexprs


def _launch(q_a, k_a, v_a, q_b, k_b, v_b, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Run the Triton kernel into `out` ([B, M, 2*H*D]); inputs are already validated."""
    B, H, M, D = q_a.shape
    q_a, k_a, v_a, q_b, k_b, v_b = (_unit_d(t) for t in (q_a, k_a, v_a, q_b, k_b, v_b))
    target = out if out.stride(-1) == 1 else torch.empty_like(out, memory_format=torch.contiguous_format)
    args, constexprs = kernel_arguments(q_a, k_a, v_a, q_b, k_b, v_b, scale, target)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), B * H, 2)

    with autotune_cache.persisted(_dual_attention_fwd_kernel, KERNEL_NAME, q_a.device):
        _dual_attention_fwd_kernel[grid](*args, **constexprs)
    record(KERNEL_NAME)
    return out if target is out else out.copy_(target)


def aot_launches(q_a, k_a, v_a, q_b, k_b, v_b, out, smem_per_block: int, shape: str) -> list[Launch]:
    """Every launch `_launch` can make for these (meta) operands: one per config the autotuner may
    pick on a device with `smem_per_block` bytes of shared memory per block (for `editrt doctor`)."""
    if not kernel_handles("cuda", q_a.dtype):
        return []
    args, constexprs = kernel_arguments(q_a, k_a, v_a, q_b, k_b, v_b, 1.0, out)
    launches = []
    for config in attention_configs(q_a.shape[-1], q_a.element_size(), smem_per_block):
        kw = config.kwargs
        name = f"D={q_a.shape[-1]} {str(q_a.dtype).split('.')[-1]} BLOCK_M={kw['BLOCK_M']} BLOCK_N={kw['BLOCK_N']} " \
               f"warps={config.num_warps} stages={config.num_stages}"
        launches.append(Launch(KERNEL_NAME, name, shape, _dual_attention_fwd_kernel.fn, fake_arguments(args),
                               {**constexprs, **config.all_kwargs()}))
    return launches


def dual_cross_attention_reference(q_a, k_a, v_a, q_b, k_b, v_b, scale=None) -> torch.Tensor:
    """Pure-PyTorch reference: two SDPA calls with the same scale, heads merged, concatenated."""
    B, H, M, D, _, _ = _check_inputs(q_a, k_a, v_a, q_b, k_b, v_b)
    scale = _resolve_scale(scale, D)
    attn_a = F.scaled_dot_product_attention(q_a, k_a, v_a, scale=scale)  # (B, H, M, D)
    attn_b = F.scaled_dot_product_attention(q_b, k_b, v_b, scale=scale)  # (B, H, M, D)
    attn_a = attn_a.transpose(1, 2).reshape(B, M, H * D)  # (B, M, H*D), head h at cols h*D:(h+1)*D
    attn_b = attn_b.transpose(1, 2).reshape(B, M, H * D)
    return torch.cat([attn_a, attn_b], dim=-1)  # (B, M, 2*H*D)


@torch.library.custom_op("editrt::dual_cross_attention", mutates_args=())
def _dual_cross_attention_op(
    q_a: torch.Tensor, k_a: torch.Tensor, v_a: torch.Tensor,
    q_b: torch.Tensor, k_b: torch.Tensor, v_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    B, H, M, D, _, _ = _check_inputs(q_a, k_a, v_a, q_b, k_b, v_b)
    if not kernel_handles(q_a.device.type, q_a.dtype):
        return dual_cross_attention_reference(q_a, k_a, v_a, q_b, k_b, v_b, scale)
    out = torch.empty((B, M, 2 * H * D), dtype=q_a.dtype, device=q_a.device)
    return _launch(q_a, k_a, v_a, q_b, k_b, v_b, scale, out)


@_dual_cross_attention_op.register_fake
def _dual_cross_attention_fake(q_a, k_a, v_a, q_b, k_b, v_b, scale):
    B, H, M, D = q_a.shape
    return q_a.new_empty((B, M, 2 * H * D))


def dual_cross_attention(q_a, k_a, v_a, q_b, k_b, v_b, scale=None, out=None) -> torch.Tensor:
    """Both cross-attentions in one launch; returns [B, M, 2*H*D] (set a heads, then set b heads).

    q_*: [B, H, M, D]; k_a, v_a: [B, H, N_a, D]; k_b, v_b: [B, H, N_b, D]; fp32/fp16/bf16, one
    device and dtype; D <= 256; strides are free (a head dim with stride != 1 is copied first).
    ``scale`` defaults to 1/sqrt(D). fp32 on CUDA runs the reference (two SDPA calls, see
    `kernel_handles`). ``out`` (optional, [B, M, 2*H*D], same dtype/device) receives the result;
    without it the call goes through the ``torch.ops.editrt.dual_cross_attention`` custom op,
    which torch.compile sees.
    """
    B, H, M, D, _, _ = _check_inputs(q_a, k_a, v_a, q_b, k_b, v_b)
    scale = _resolve_scale(scale, D)
    if out is None:
        return torch.ops.editrt.dual_cross_attention(q_a, k_a, v_a, q_b, k_b, v_b, scale)
    _check_out(out, q_a, B, M, 2 * H * D)
    if kernel_handles(q_a.device.type, q_a.dtype):
        return _launch(q_a, k_a, v_a, q_b, k_b, v_b, scale, out)
    return out.copy_(dual_cross_attention_reference(q_a, k_a, v_a, q_b, k_b, v_b, scale))
