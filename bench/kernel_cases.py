"""Benchmark cases for the Triton kernels (inputs and callables only; the timing harness is separate).

Every case is a dict:
    name      what is measured
    shape     the sizes, as text (one column of the results table)
    dtype     the dtype the inputs are built in
    kernel    no-argument callable: the editrt kernel path
    baseline  no-argument callable: the plain PyTorch path computing the same result
    flops     (dual attention) work of one call: see ``dual_attention_cases``
    bytes     (SLIC assign) byte floor of one call: see ``slic_assign_cases``

Each callable rotates among a few pre-built random inputs, so nothing is timed on zeros or on the
same cached input twice in a row. Building the cases allocates all inputs up front.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from editrt.kernels.dual_attention import dual_cross_attention
from editrt.kernels.slic import assign, assign_reference

_NUM_INPUT_SETS = 3

# SD-1.5 UNet cross-attention at 512 x 512 (64 x 64 latents): B = 2 (classifier-free guidance),
# 8 heads, (query tokens, head dim) per resolution; text prompt N_a = 77, elements N_b = 256.
_SD15_ATTENTION = [
    # (B, H, M, D, N_a, N_b)
    (2, 8, 4096, 40, 77, 256),
    (2, 8, 1024, 80, 77, 256),
    (2, 8, 256, 160, 77, 256),
    (2, 8, 64, 160, 77, 256),
]
_QUICK_ATTENTION = [(1, 2, 64, 40, 77, 256)]

# SAM: 256 elements, 256 x 256 low-res mask logits, assigned at 512 x 512 and 1024 x 1024.
_SLIC_ASSIGN = [
    # (N, h, w, H, W, beta)
    (256, 256, 256, 512, 512, 64.0),
    (256, 256, 256, 1024, 1024, 64.0),
]
_QUICK_SLIC_ASSIGN = [(16, 32, 32, 64, 64, 64.0)]


def _rotating(inputs: list, fn):
    """A no-argument callable that applies `fn` to the next input set on every call."""
    cycle = itertools.cycle(inputs)
    return lambda: fn(*next(cycle))


def dual_attention_cases(device, dtype, quick: bool) -> list[dict]:
    """Fused dual cross-attention + the stacked output GEMM vs. two SDPA + the same stacked GEMM.

    Both paths end in the one [2*H*D -> C] GEMM on the stacked output weights (as FusedDualCrossAttention
    runs it: both output projections, summed): the peer concatenates its two SDPA outputs and multiplies
    by the same stacked weight, so the ratio measures the attention kernel, not the stacking.

    flops = attention 4*B*H*M*(N_a + N_b)*D (QK^T and PV for both sets) plus the output
    projection 2*B*M*(2*H*D)*C with C = H*D output channels (the same in both paths).
    ``attention_flops`` is the first term.
    """
    cases = []
    for B, H, M, D, N_a, N_b in _QUICK_ATTENTION if quick else _SD15_ATTENTION:
        C = H * D  # SD's to_out projection maps inner_dim -> inner_dim

        def make_inputs(B=B, H=H, M=M, D=D, N_a=N_a, N_b=N_b, C=C):
            q_a = torch.randn(B, H, M, D, device=device, dtype=dtype)
            q_b = torch.randn(B, H, M, D, device=device, dtype=dtype)
            k_a, v_a = (torch.randn(B, H, N_a, D, device=device, dtype=dtype) for _ in range(2))
            k_b, v_b = (torch.randn(B, H, N_b, D, device=device, dtype=dtype) for _ in range(2))
            w_a = torch.randn(C, H * D, device=device, dtype=dtype) / (H * D) ** 0.5
            w_b = torch.randn(C, H * D, device=device, dtype=dtype) / (H * D) ** 0.5
            w_stacked = torch.cat([w_a, w_b], dim=1)  # (C, 2*H*D), built once like a loaded weight
            return (q_a, k_a, v_a, q_b, k_b, v_b, w_stacked)

        inputs = [make_inputs() for _ in range(_NUM_INPUT_SETS)]

        def kernel(q_a, k_a, v_a, q_b, k_b, v_b, w_stacked):
            return F.linear(dual_cross_attention(q_a, k_a, v_a, q_b, k_b, v_b), w_stacked)  # (B, M, C)

        def baseline(q_a, k_a, v_a, q_b, k_b, v_b, w_stacked, B=B, M=M, H=H, D=D):
            attn_a = F.scaled_dot_product_attention(q_a, k_a, v_a)  # (B, H, M, D)
            attn_b = F.scaled_dot_product_attention(q_b, k_b, v_b)
            attn_a = attn_a.transpose(1, 2).reshape(B, M, H * D)  # (B, M, H*D)
            attn_b = attn_b.transpose(1, 2).reshape(B, M, H * D)
            return F.linear(torch.cat([attn_a, attn_b], dim=-1), w_stacked)  # (B, M, C): the same stacked GEMM

        attention_flops = 4 * B * H * M * (N_a + N_b) * D
        projection_flops = 2 * B * M * (2 * H * D) * C
        cases.append(
            dict(
                name="dual-attention+out-proj",
                shape=f"B={B} H={H} M={M} D={D} N_a={N_a} N_b={N_b} C={C}",
                kernel=_rotating(inputs, kernel),
                baseline=_rotating(inputs, baseline),
                dtype=dtype,
                flops=attention_flops + projection_flops,
                attention_flops=attention_flops,
            )
        )
    return cases


def slic_assign_cases(device, quick: bool) -> list[dict]:
    """``slic.assign`` (fused, exact) vs. ``slic.assign_reference`` (materialises [N, H, W]).

    bytes = N*h*w*4 (float32 logits) + N*2*4 (centroids) + H*W*8 (int64 labels), the minimum
    without pruning; with pruning (large beta, spread-out centroids) the kernel reads less, so its
    "GB/s" against this floor can exceed the memory bandwidth.
    """
    cases = []
    for N, h, w, H, W, beta in _QUICK_SLIC_ASSIGN if quick else _SLIC_ASSIGN:

        def make_inputs(N=N, h=h, w=w):
            logits = torch.randn(N, h, w, device=device) * 8  # SAM low-res logits are O(10)
            centroids = torch.rand(N, 2, device=device)
            return (logits, centroids)

        inputs = [make_inputs() for _ in range(_NUM_INPUT_SETS)]
        cases.append(
            dict(
                name="slic-assign",
                shape=f"N={N} logits={h}x{w} out={H}x{W} beta={beta:g}",
                kernel=_rotating(inputs, lambda logits, c, beta=beta, hw=(H, W): assign(logits, c, beta, hw)),
                baseline=_rotating(
                    inputs, lambda logits, c, beta=beta, hw=(H, W): assign_reference(logits, c, beta, hw)
                ),
                dtype=torch.float32,  # logits; labels are int64
                bytes=N * h * w * 4 + N * 2 * 4 + H * W * 8,
            )
        )
    return cases
