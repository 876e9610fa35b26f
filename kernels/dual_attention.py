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
(cdiv(M, BLOCK_M), B*H, 2): axis 2 picks the key/value set, so both attentions run in ONE launch.
A program keeps its [BLOCK_M, D] query tile in registers and streams the keys/values in
[BLOCK_N, D] tiles with an online softmax (running row max m and row sum l, rescaling the fp32
accumulator when m grows), so no [M, N] matrix ever reaches global memory. Head dims that are not
powers of two (SD: 40, 80, 160) are padded to the next power of two inside the kernel with masked
loads; any M, N_a, N_b work (masked tails).

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

from ._triton_utils import interpreter_active, next_power_of_2, use_triton

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if interpreter_active():
    # The interpreter runs every program serially with NumPy; autotuning would multiply that cost.
    _CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 8, 2),
            (128, 64, 4, 3),
            (64, 64, 4, 3),
            (64, 32, 4, 2),
            (32, 64, 4, 2),
            # fit fp32 with D padded to 256 (H100: 227 KB shared memory per block); configs that do
            # not fit are skipped by the autotuner (OutOfResources)
            (64, 32, 4, 1),
            (32, 32, 4, 1),
        ]
    ]


@triton.jit
def _attend_one_set(
    q_base, k_base, v_base, out_base,
    s_qm, s_qd, s_kn, s_kd, s_vn, s_vd, s_out_m, s_out_c,
    M, n_kv, D, qk_scale_log2, pid_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE_DOT: tl.constexpr,
    BF16_DOT_IN_FP32: tl.constexpr,
):
    """softmax(q k^T * scale) v for one [BLOCK_M] query tile of one (batch, head, key/value set)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < M
    d_valid = offs_d < D  # BLOCK_D is D rounded up to a power of two; the pad lanes load zeros

    # The query tile stays in registers for the whole key/value sweep.
    q = tl.load(
        q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
        mask=m_valid[:, None] & d_valid[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    if BF16_DOT_IN_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base-2 logits)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(logit - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, n_kv, BLOCK_N):
        kv_rows = start_n + offs_n
        n_valid = kv_rows < n_kv
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + kv_rows[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv_rows[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
        if BF16_DOT_IN_FP32:
            # Triton's CPU interpreter multiplies bf16 tiles as raw integers; bf16 x bf16 products
            # are exact in fp32, so upcasting first gives the bf16 tensor-core result.
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        if IEEE_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N), fp32 accumulate
        qk = qk * qk_scale_log2
        qk = tl.where(n_valid[None, :], qk, float("-inf"))  # key tail: no probability mass

        # Online softmax: every block holds >= 1 valid key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            # p is rounded to the input dtype (fp16/bf16) for the tensor-core PV product, as in
            # flash attention; acc stays fp32.
            p_lowp = p.to(v_base.dtype.element_ty)
            if BF16_DOT_IN_FP32:
                p_lowp = p_lowp.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p_lowp, v)
        m_i = m_new

    acc = acc / l_i[:, None]
    out_ptrs = out_base + offs_m[:, None] * s_out_m + offs_d[None, :] * s_out_c
    tl.store(out_ptrs, acc.to(out_base.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


@triton.autotune(configs=_CONFIGS, key=["M", "N_a", "N_b", "BLOCK_D", "IEEE_DOT"])
@triton.jit
def _dual_attention_fwd_kernel(
    qa_ptr, ka_ptr, va_ptr, qb_ptr, kb_ptr, vb_ptr, out_ptr,
    # strides (batch, head, row, dim) of each input; they may be non-contiguous views
    s_qa_b, s_qa_h, s_qa_m, s_qa_d,
    s_ka_b, s_ka_h, s_ka_n, s_ka_d,
    s_va_b, s_va_h, s_va_n, s_va_d,
    s_qb_b, s_qb_h, s_qb_m, s_qb_d,
    s_kb_b, s_kb_h, s_kb_n, s_kb_d,
    s_vb_b, s_vb_h, s_vb_n, s_vb_d,
    s_out_b, s_out_m, s_out_c,
    H, M, N_a, N_b, D,
    qk_scale_log2,  # scale * log2(e): the softmax runs in base 2 (exp2 is the native instruction)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE_DOT: tl.constexpr,  # fp32 inputs: full-precision dots instead of TF32
    BF16_DOT_IN_FP32: tl.constexpr,  # interpreter only, see _attend_one_set
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    kv_set = tl.program_id(2)  # 0: set a (text/task prompt), 1: set b (elements)
    b = pid_bh // H
    h = pid_bh % H
    # Heads-merged output: set a fills columns [0, H*D), set b [H*D, 2*H*D); head h at h*D.
    out_row0 = out_ptr + b * s_out_b + h * D * s_out_c

    # Each branch inlines the same helper with its own operands, so Triton still specialises the
    # strides of each set (stride 1 on D gives vectorised loads) -- no runtime pointer select.
    if kv_set == 0:
        _attend_one_set(
            qa_ptr + b * s_qa_b + h * s_qa_h, ka_ptr + b * s_ka_b + h * s_ka_h,
            va_ptr + b * s_va_b + h * s_va_h, out_row0,
            s_qa_m, s_qa_d, s_ka_n, s_ka_d, s_va_n, s_va_d, s_out_m, s_out_c,
            M, N_a, D, qk_scale_log2, pid_m,
            BLOCK_M, BLOCK_N, BLOCK_D, IEEE_DOT, BF16_DOT_IN_FP32,
        )
    else:
        _attend_one_set(
            qb_ptr + b * s_qb_b + h * s_qb_h, kb_ptr + b * s_kb_b + h * s_kb_h,
            vb_ptr + b * s_vb_b + h * s_vb_h, out_row0 + H * D * s_out_c,
            s_qb_m, s_qb_d, s_kb_n, s_kb_d, s_vb_n, s_vb_d, s_out_m, s_out_c,
            M, N_b, D, qk_scale_log2, pid_m,
            BLOCK_M, BLOCK_N, BLOCK_D, IEEE_DOT, BF16_DOT_IN_FP32,
        )


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_inputs(q_a, k_a, v_a, q_b, k_b, v_b) -> tuple[int, int, int, int, int, int]:
    """Validate the six operands; return (B, H, M, D, N_a, N_b)."""
    named = {"q_a": q_a, "k_a": k_a, "v_a": v_a, "q_b": q_b, "k_b": k_b, "v_b": v_b}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, H, rows, D], got shape {_shape(t)}")
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
        raise ValueError(f"q_b: expected shape [{B}, {H}, {M}, {D}] (same as q_a), got {_shape(q_b)}")
    for k_name, v_name, k, v in (("k_a", "v_a", k_a, v_a), ("k_b", "v_b", k_b, v_b)):
        n = k.shape[2]
        if n < 1 or tuple(k.shape) != (B, H, n, D):
            raise ValueError(f"{k_name}: expected shape [{B}, {H}, N>=1, {D}], got {_shape(k)}")
        if tuple(v.shape) != (B, H, n, D):
            raise ValueError(f"{v_name}: expected shape [{B}, {H}, {n}, {D}] (same as {k_name}), got {_shape(v)}")
    return B, H, M, D, k_a.shape[2], k_b.shape[2]


def _resolve_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _check_out(out: torch.Tensor, q_a: torch.Tensor, B: int, M: int, C: int) -> None:
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != (B, M, C):
        raise ValueError(f"out: expected shape [{B}, {M}, {C}], got {_shape(out)}")
    if out.dtype != q_a.dtype or out.device != q_a.device:
        raise ValueError(f"out: expected dtype {q_a.dtype} on {q_a.device}, got {out.dtype} on {out.device}")


# --------------------------------------------------------------------------------------------
# Launcher, reference, public API
# --------------------------------------------------------------------------------------------


def _launch(q_a, k_a, v_a, q_b, k_b, v_b, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Run the Triton kernel into `out` ([B, M, 2*H*D]); inputs are already validated."""
    B, H, M, D = q_a.shape
    N_a, N_b = k_a.shape[2], k_b.shape[2]
    block_d = max(16, next_power_of_2(D))  # tl.dot needs K >= 16

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), B * H, 2)

    _dual_attention_fwd_kernel[grid](
        q_a, k_a, v_a, q_b, k_b, v_b, out,
        *q_a.stride(), *k_a.stride(), *v_a.stride(),
        *q_b.stride(), *k_b.stride(), *v_b.stride(),
        *out.stride(),
        H, M, N_a, N_b, D,
        scale * _LOG2E,
        BLOCK_D=block_d,
        IEEE_DOT=q_a.dtype == torch.float32,
        BF16_DOT_IN_FP32=interpreter_active() and q_a.dtype == torch.bfloat16,
    )
    return out


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
    if not use_triton(q_a):
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
    device and dtype; D <= 256; strides are free. ``scale`` defaults to 1/sqrt(D). ``out``
    (optional, [B, M, 2*H*D], same dtype/device) receives the result; without it the call goes
    through the ``torch.ops.editrt.dual_cross_attention`` custom op, which torch.compile sees.
    """
    B, H, M, D, _, _ = _check_inputs(q_a, k_a, v_a, q_b, k_b, v_b)
    scale = _resolve_scale(scale, D)
    if out is None:
        return torch.ops.editrt.dual_cross_attention(q_a, k_a, v_a, q_b, k_b, v_b, scale)
    _check_out(out, q_a, B, M, 2 * H * D)
    if use_triton(q_a):
        return _launch(q_a, k_a, v_a, q_b, k_b, v_b, scale, out)
    return out.copy_(dual_cross_attention_reference(q_a, k_a, v_a, q_b, k_b, v_b, scale))
