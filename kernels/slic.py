"""SLIC-style assignment of pixels to SAM elements, and per-element statistics, on the GPU.

Assignment math (the contract is ``assign_reference``). N query elements each come with SAM
low-res mask logits L_n (h x w) and a centroid c_n = (cx_n, cy_n) in [0, 1]^2. For an output grid
H x W, pixel (i, j) sits at its centre p = ((j + 0.5)/W, (i + 0.5)/H) and gets::

    s_n(p)     = sigmoid(bilinear_upsample(L_n, (H, W), align_corners=False)[i, j])
    d_n(p)     = (p_x - cx_n)^2 + (p_y - cy_n)^2          # squared distance, coordinates in [0, 1]
    score_n(p) = s_n(p) - beta * d_n(p)
    label(p)   = argmax_n score_n(p),   ties -> the lowest n

all in float32. beta = 64 costs 0.25 at one grid spacing of a 16 x 16 grid of centroids.

Kernel algorithm (``assign``). One program per TILE_H x TILE_W tile of output pixels; it sweeps
the elements in chunks of BLOCK_N, computes for every (pixel, element) pair the bilinear sample
of L_n on the fly (four gathers from the low-res map), the sigmoid, the distance penalty and a
running argmax, and writes one int64 label per pixel: the [N, H, W] score tensor never exists.
Labels are EXACTLY equal to the reference's, which takes bit-identical float32 arithmetic:

* bilinear sample: the same operations, in the same order and with the same fused multiply-adds
  as PyTorch's own kernels (checked against torch 2.14's CPU kernels and the SASS of its CUDA
  kernel ``upsample_bilinear2d_out_frame``)::

      scale  = float(in) / float(out)                      # IEEE float32 division
      src    = max(fma(scale, dst + 0.5, -0.5), 0)
      i0     = trunc(src); i1 = min(i0 + 1, in - 1); l1 = src - i0; l0 = 1 - l1
      value  = fma(h0, fma(w0, x00, w1 * x01), h1 * fma(w0, x10, w1 * x11))       # "separable"

  except that PyTorch's CPU kernel for small outputs (H + W <= 128) takes its channels-last path,
  which computes ``fma(x11, w11, fma(x10, w10, fma(x00, w00, x01 * w01)))`` with
  ``w_ab = h_a * w_b`` ("weights4"). The reference upsamples the maps as a batch [N, 1, h, w]
  (not as channels [1, N, h, w]) so that this CPU path treats every map alike (with channels it
  vectorises over maps and the rounding depends on the map index). Under the interpreter the
  fused multiply-adds are emulated exactly in float64 (see ``_fma``).
* sigmoid: PyTorch's exact float32 sequence. On CUDA, ``1 / (1 + expf(-x))`` compiles (SASS of
  torch's sigmoid kernel) to expf's range reduction with the ``+ 1`` fused into its last FMA,
  then an IEEE reciprocal; the kernel spells out those instructions. On CPU (interpreter) torch
  uses SLEEF's ``expf_u10`` (AVX2/AVX512 builds, with FMA) plus an IEEE reciprocal; the kernel
  emulates that algorithm. (PyTorch's CPU loop computes the last <32 elements of each parallel
  chunk with glibc ``expf`` instead, so torch.sigmoid itself is not a pure function of the value
  there; the kernel matches the vectorised body.)
* centres, distances and score: float32 IEEE ops without contraction (``enable_fp_fusion=False``,
  ``div_rn``), in the reference's order.
* ties: the running argmax keeps the lowest element index among equal scores.

Pruning (exact). Because s is in [0, 1], an element n cannot win anywhere in a tile if
beta * (min_{p in tile} d_n(p) - min_k max_{p in tile} d_k(p)) > 1. Each program computes the
right-hand bound once, then skips the gathers (masked loads) of such elements and whole chunks of
them; a relative safety margin of 1e-5 keeps the test conservative under float32 rounding. The
elements are visited in Morton (Z-curve) order of their centroids so that chunks are spatially
compact; ties are still broken by the original index.

Byte floor without pruning: N*h*w*4 (logits) + N*2*4 (centroids) + H*W*8 (labels). With pruning
and a concentrated penalty (large beta) a tile reads only nearby elements' maps, so the kernel can
go below it.

Statistics (``element_stats``). For labels [H, W] (-1 = dropped; any label outside [0, N) is
ignored) the kernel accumulates per element the pixel count, the integer sums of column and row
indices and their min/max with integer atomics (deterministic: integer addition is associative),
after block-local reductions so that each program issues one atomic per element present in its
block. ``_finalize_stats`` (shared with the reference) turns them into centroids
((mean j + 0.5)/W, (mean i + 0.5)/H) and inclusive boxes (x0, y0, x1, y1); empty elements get
count 0, centroid NaN and box (-1, -1, -1, -1). Nothing leaves the device, so the T iterations of
the partition need no host synchronisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from . import autotune_cache
from ._triton_utils import interpreter_active, shape_str, use_triton
from .aot import Launch, fake_arguments
from .launches import record

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ASSIGN_KERNEL = "slic_assign"  # the names the launchers record in editrt.kernels.launches
STATS_KERNEL = "slic_element_stats"
_GPU_STATS_TILE = (256, 16, 8)  # BLOCK_P, BLOCK_E, warps of the statistics kernel on a GPU
_INT32_MAX = tl.constexpr(2**31 - 1)  # "no element" in the running argmax
# PyTorch's CPU bilinear kernel switches to its channels-last implementation (different FMA
# grouping) when out_h + out_w <= 128 (aten/src/ATen/native/cpu/UpSampleKernel.cpp,
# _use_vectorized_kernel_cond_2d).
_TORCH_CPU_SMALL_OUTPUT = 128


# --------------------------------------------------------------------------------------------
# Reference (the contract)
# --------------------------------------------------------------------------------------------


def _pixel_centres(n: int, device: torch.device) -> torch.Tensor:
    """(k + 0.5) / n for k < n, in float32 with an IEEE division by a full tensor.

    Dividing by a Python scalar would let CUDA PyTorch multiply by the reciprocal instead.
    """
    k = torch.arange(n, dtype=torch.float32, device=device) + 0.5
    return k / torch.full_like(k, float(n))


def assign_reference(logits: torch.Tensor, centroids: torch.Tensor, beta: float, out_hw) -> torch.Tensor:
    """labels[i, j] = argmax_n sigmoid(upsample(logits)[n, i, j]) - beta * d_n(i, j); ties -> lowest n.

    logits: [N, h, w] float; centroids: [N, 2] float (x, y) in [0, 1]; beta >= 0; out_hw: (H, W).
    Returns int64 labels [H, W]. Materialises [N, H, W]; inputs must be finite.
    """
    H, W = _check_assign_inputs(logits, centroids, beta, out_hw)
    N = logits.shape[0]
    device = logits.device
    # Maps as a batch of single-channel images; see the module docstring for why not [1, N, h, w].
    upsampled = F.interpolate(logits.float()[:, None], size=(H, W), mode="bilinear", align_corners=False)
    s = torch.sigmoid(upsampled[:, 0])  # (N, H, W)

    cxy = centroids.float()
    dx = _pixel_centres(W, device)[None, None, :] - cxy[:, 0, None, None]  # (N, 1, W)
    dy = _pixel_centres(H, device)[None, :, None] - cxy[:, 1, None, None]  # (N, H, 1)
    d = dx * dx + dy * dy  # (N, H, W)
    score = s - d * float(beta)  # (N, H, W); beta is rounded to float32 by the op

    best = score.amax(dim=0, keepdim=True)  # (1, H, W)
    index = torch.arange(N, device=device).view(N, 1, 1)
    # Lowest index among the maxima, explicitly (not relying on argmax's tie behaviour).
    return torch.where(score == best, index, N).amin(dim=0)  # (H, W) int64


# --------------------------------------------------------------------------------------------
# Triton: float32 arithmetic that reproduces PyTorch bit for bit
# --------------------------------------------------------------------------------------------


@triton.jit
def _fma(a, b, c, CPU_NUMERICS: tl.constexpr):
    """float32 fused multiply-add: a * b + c with a single rounding.

    On the GPU this is the fma instruction. The interpreter evaluates tl.fma as two rounded NumPy
    ops, so there it is emulated exactly in float64: a * b is exact (24 + 24 bits <= 53), the sum
    is rounded to odd (TwoSum error term, then force the last mantissa bit), and rounding a
    round-to-odd float64 to float32 (29 spare bits) gives the correctly rounded fma.
    """
    if CPU_NUMERICS:
        # Python-float constants are rounded to float32 first, like the C sources' float literals.
        product = tl.cast(a, tl.float32).to(tl.float64) * tl.cast(b, tl.float32).to(tl.float64)
        addend = tl.cast(c, tl.float32).to(tl.float64)
        total = product + addend
        # TwoSum (Knuth): error = (product + addend) - total, exactly.
        addend_part = total - product
        product_part = total - addend_part
        error = (product - product_part) + (addend - addend_part)
        # Round to odd: an inexact sum with an even mantissa moves one ulp towards the exact value.
        bits = total.to(tl.int64, bitcast=True)
        towards_exact = tl.where((error > 0) == (total > 0), 1, -1).to(tl.int64)
        bits = tl.where((error != 0) & ((bits & 1) == 0), bits + towards_exact, bits)
        return bits.to(tl.float64, bitcast=True).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _torch_sigmoid_cuda(x):
    """torch.sigmoid(x) for float32 on CUDA, bit for bit.

    PyTorch computes 1 / (1 + expf(-x)); nvcc inlines expf and fuses the "+ 1" into its final
    FMA. Instruction by instruction, from the SASS of torch 2.14's sigmoid kernel (sm_90):
    FFMA.SAT, FFMA.RM, FADD, SHF, FFMA, FFMA, MUFU.EX2, FFMA, then rcp.rn.
    """
    neg_x = -x
    t = _fma(neg_x, 0.0057249800302088261, 0.5, False)  # 0.5 - x * log2(e)/252
    t = tl.minimum(tl.maximum(t, 0.0), 1.0)  # .SAT
    # 12582913 + k with k = floor(252 * t) in [0, 252], held in the low mantissa bits (FFMA.RM)
    t = libdevice.fma_rd(t, 252.0, 12582913.0)
    j = t - 12583039.0  # the exponent j = k - 126, as a float
    two_j = (t.to(tl.int32, bitcast=True) << 23).to(tl.float32, bitcast=True)  # exponent field 1 + k: 2^j
    f = _fma(neg_x, 1.4426950216293334961, -j, False)  # -x * log2(e) - j, log2(e) split in two
    f = _fma(neg_x, 1.925963033500011079e-08, f, False)
    # MUFU.EX2. torch's expf uses the flush-to-zero form; ex2.approx.f32 here differs only for
    # f < -126, which happens only when t saturated at 0 (x > ~87), where two_j = 2^-126 and
    # 1 + two_j * e rounds to 1 either way.
    e = tl.math.exp2(f)
    denominator = _fma(two_j, e, 1.0, False)  # 1 + exp(-x), the add fused
    return libdevice.rcp_rn(denominator)


@triton.jit
def _torch_sigmoid_cpu(x):
    """torch.sigmoid(x) for float32 on CPU (AVX2/AVX512 builds), bit for bit.

    PyTorch's vectorised loop computes reciprocal(1 + exp(0 - x)) with SLEEF's expf_u10
    (sleefsimdsp.c, xexpf, FMA variant), reproduced here step by step.
    """
    d = 0.0 - x
    # SLEEF overrides exp(d) with 0 for d < -104 and inf for d > 100 (below); clamping first keeps
    # the int32 exponent arithmetic in range without changing any result.
    dc = tl.minimum(tl.maximum(d, -105.0), 101.0)
    # q = rint(d * (1/ln 2)), round half to even via the 1.5 * 2^23 trick (exact for |q| < 2^22)
    qf = (dc * 1.442695040888963407359924681001892137426645954152985934135449406931 + 12582912.0) - 12582912.0
    q = qf.to(tl.int32)
    s = _fma(qf, -0.693145751953125, dc, True)  # Cody-Waite: ln 2 = L2U + L2L
    s = _fma(qf, -1.428606765330187045e-06, s, True)
    u = _fma(tl.full(s.shape, 0.000198527617612853646278381, tl.float32), s, 0.00139304355252534151077271, True)
    u = _fma(u, s, 0.00833336077630519866943359, True)
    u = _fma(u, s, 0.0416664853692054748535156, True)
    u = _fma(u, s, 0.166666671633720397949219, True)
    u = _fma(u, s, 0.5, True)
    u = 1.0 + _fma(s * s, u, s, True)
    # ldexp(u, q) as two power-of-two multiplies (each factor stays a normal float)
    q_half = q >> 1
    u = u * ((q_half + 127) << 23).to(tl.float32, bitcast=True)
    u = u * ((q - q_half + 127) << 23).to(tl.float32, bitcast=True)
    u = tl.where(d < -104.0, 0.0, u)
    u = tl.where(d > 100.0, float("inf"), u)
    return 1.0 / (1.0 + u)  # interpreter: NumPy's IEEE division, like the vector reciprocal


@triton.jit
def _source_index(dst, in_size, out_size, CPU_NUMERICS: tl.constexpr):
    """PyTorch's bilinear source coordinate (align_corners=False) for output indices `dst`.

    Returns (i0, i1, l0, l1): the two input indices and their weights.
    """
    scale = tl.math.div_rn(in_size.to(tl.float32), out_size.to(tl.float32))
    src = _fma(scale, dst.to(tl.float32) + 0.5, -0.5, CPU_NUMERICS)
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # trunc == floor for src >= 0
    i1 = tl.minimum(i0 + 1, in_size - 1)
    l1 = src - i0.to(tl.float32)
    l0 = 1.0 - l1
    return i0, i1, l0, l1


@triton.jit
def _bilinear_combine(x00, x01, x10, x11, ly0, ly1, lx0, lx1, CPU_NUMERICS: tl.constexpr, WEIGHTS4: tl.constexpr):
    """PyTorch's bilinear combination of the four neighbours (x_rc: row r, column c)."""
    if WEIGHTS4:
        # CPU, out_h + out_w <= 128 (channels-last kernel, one channel): weights first, then
        # ((x00*w00 + x01*w01) + x10*w10) + x11*w11 with gcc's contractions.
        value = _fma(x00, ly0 * lx0, x01 * (ly0 * lx1), CPU_NUMERICS)
        value = _fma(x10, ly1 * lx0, value, CPU_NUMERICS)
        value = _fma(x11, ly1 * lx1, value, CPU_NUMERICS)
    else:
        # CPU generic kernel and CUDA: h0 * (w0*x00 + w1*x01) + h1 * (w0*x10 + w1*x11), where
        # each "p*q + r*s" is fma(p, q, r*s).
        top = _fma(lx0, x00, lx1 * x01, CPU_NUMERICS)
        bottom = _fma(lx0, x10, lx1 * x11, CPU_NUMERICS)
        value = _fma(ly0, top, ly1 * bottom, CPU_NUMERICS)
    return value


@triton.jit
def _torch_sigmoid(x, CPU_NUMERICS: tl.constexpr):
    if CPU_NUMERICS:
        return _torch_sigmoid_cpu(x)
    else:
        return _torch_sigmoid_cuda(x)


@triton.jit
def _element_bounds(cx, cy, x_lo, x_hi, y_lo, y_hi):
    """Squared distance from each centroid to the nearest / farthest point of the tile's box."""
    gx = tl.maximum(tl.maximum(x_lo - cx, cx - x_hi), 0.0)
    gy = tl.maximum(tl.maximum(y_lo - cy, cy - y_hi), 0.0)
    fx = tl.maximum(tl.abs(cx - x_lo), tl.abs(cx - x_hi))
    fy = tl.maximum(tl.abs(cy - y_lo), tl.abs(cy - y_hi))
    return gx * gx + gy * gy, fx * fx + fy * fy


# (tile rows, tile cols, elements per chunk, warps). Measured with `editrt doctor --arch sm_90`:
# 8 (pixel, element) pairs per thread take 157-175 registers (1-3 blocks, 8-12 warps per SM; 16
# pairs spill); 4 pairs take 80-100 registers and keep 16-24 warps per SM resident, which hides
# the latency of the four gathers per pair. The list keeps two 8-pair configs (more independent
# work per thread) beside three 4-pair ones and lets the autotuner time them; capping 8-pair
# configs at 128 registers (maxnreg) spilled 84-100 bytes, so it is not used.
_GPU_ASSIGN_CONFIGS = [
    triton.Config({"TILE_H": th, "TILE_W": tw, "BLOCK_N": bn}, num_warps=nw)
    for th, tw, bn, nw in [(16, 16, 4, 8), (8, 16, 8, 8), (8, 8, 8, 4), (16, 16, 8, 8), (8, 16, 8, 4)]
]
# Large tiles under the interpreter: fewer program instances, each run serially in Python.
_INTERPRETER_ASSIGN_CONFIGS = [triton.Config({"TILE_H": 32, "TILE_W": 32, "BLOCK_N": 32}, num_warps=4)]
_ASSIGN_CONFIGS = _INTERPRETER_ASSIGN_CONFIGS if interpreter_active() else _GPU_ASSIGN_CONFIGS


# keyed on size buckets (autotune_cache.size_bucket), so a new element count or image size in a tuned
# bucket is not benchmarked again
@triton.autotune(configs=_ASSIGN_CONFIGS, key=["N_KEY", "HW_KEY", "H_KEY", "W_KEY", "PRUNE"])
@triton.jit(do_not_specialize=["N", "h", "w", "H", "W"])  # sizes of 1 must stay runtime ints
def _assign_kernel(
    logits_ptr, centroids_ptr, order_ptr, labels_ptr,
    N, h, w, H, W,
    s_ln, s_lh, s_lw,  # logits strides (element, row, col)
    s_oh, s_ow,  # labels strides
    beta,
    N_KEY, HW_KEY, H_KEY, W_KEY,  # autotune key only (unused): N, h * w, H, W bucketed
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr,
    PRUNE: tl.constexpr,
    CPU_NUMERICS: tl.constexpr,  # interpreter: PyTorch-CPU arithmetic; else PyTorch-CUDA
    WEIGHTS4: tl.constexpr,  # PyTorch CPU's small-output bilinear grouping (H + W <= 128)
):
    BLOCK_P: tl.constexpr = TILE_H * TILE_W
    tile_row0 = tl.program_id(0) * TILE_H
    tile_col0 = tl.program_id(1) * TILE_W

    # Pixels of this tile, flattened: (BLOCK_P,)
    offs_p = tl.arange(0, BLOCK_P)
    rows = tile_row0 + offs_p // TILE_W
    cols = tile_col0 + offs_p % TILE_W
    pixel_valid = (rows < H) & (cols < W)

    # Everything that depends only on the pixel is computed once and reused for all N maps.
    y0, y1, ly0, ly1 = _source_index(rows, h, H, CPU_NUMERICS)
    x0, x1, lx0, lx1 = _source_index(cols, w, W, CPU_NUMERICS)
    off00 = y0 * s_lh + x0 * s_lw
    off01 = y0 * s_lh + x1 * s_lw
    off10 = y1 * s_lh + x0 * s_lw
    off11 = y1 * s_lh + x1 * s_lw
    px = tl.math.div_rn(cols.to(tl.float32) + 0.5, W.to(tl.float32))  # pixel centres
    py = tl.math.div_rn(rows.to(tl.float32) + 0.5, H.to(tl.float32))

    offs_n = tl.arange(0, BLOCK_N)
    if PRUNE:
        # Box of the tile's valid pixel centres (monotone in the index, so exact bounds).
        last_row = tl.minimum(tile_row0 + TILE_H, H) - 1
        last_col = tl.minimum(tile_col0 + TILE_W, W) - 1
        x_lo = tl.math.div_rn(tile_col0.to(tl.float32) + 0.5, W.to(tl.float32))
        x_hi = tl.math.div_rn(last_col.to(tl.float32) + 0.5, W.to(tl.float32))
        y_lo = tl.math.div_rn(tile_row0.to(tl.float32) + 0.5, H.to(tl.float32))
        y_hi = tl.math.div_rn(last_row.to(tl.float32) + 0.5, H.to(tl.float32))
        # Pass 1: the smallest worst-case distance over all elements (a score floor of -beta*that).
        min_far_lanes = tl.full([BLOCK_N], float("inf"), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n_valid = n0 + offs_n < N
            cx = tl.load(centroids_ptr + 2 * (n0 + offs_n), mask=n_valid, other=0.0)
            cy = tl.load(centroids_ptr + 2 * (n0 + offs_n) + 1, mask=n_valid, other=0.0)
            _, far = _element_bounds(cx, cy, x_lo, x_hi, y_lo, y_hi)
            min_far_lanes = tl.minimum(min_far_lanes, tl.where(n_valid, far, float("inf")))
        min_far = tl.min(min_far_lanes, axis=0)
        # Element n is out if beta*near_n > beta*min_far + 1: its score stays below another one's
        # (s <= 1 vs s >= 0). The 1e-5 relative slack is ~100x the float32 error of the distances
        # and penalties, so the inequality also stays strict after rounding: a pruned element can
        # neither win nor tie.
        prune_above = beta * min_far * (1.0 + 1e-5) + (1.0 + 1e-5)

    best_score = tl.full([BLOCK_P], float("-inf"), tl.float32)
    best_index = tl.full([BLOCK_P], _INT32_MAX, tl.int32)

    for n0 in range(0, N, BLOCK_N):
        slot = n0 + offs_n  # position in the visiting order, (BLOCK_N,)
        slot_valid = slot < N
        element = tl.load(order_ptr + slot, mask=slot_valid, other=0)  # original element index
        cx = tl.load(centroids_ptr + 2 * element, mask=slot_valid, other=0.0)
        cy = tl.load(centroids_ptr + 2 * element + 1, mask=slot_valid, other=0.0)
        alive = slot_valid
        if PRUNE:
            near, _ = _element_bounds(cx, cy, x_lo, x_hi, y_lo, y_hi)
            alive = alive & (beta * near * (1.0 - 1e-5) <= prune_above)
        if tl.max(alive.to(tl.int32), axis=0) > 0:
            pair_mask = pixel_valid[:, None] & alive[None, :]  # (BLOCK_P, BLOCK_N)

            # Bilinear sample of each map at each pixel: four gathers from the low-res maps.
            map_base = logits_ptr + element[None, :].to(tl.int64) * s_ln
            x00 = tl.load(map_base + off00[:, None], mask=pair_mask, other=0.0).to(tl.float32)
            x01 = tl.load(map_base + off01[:, None], mask=pair_mask, other=0.0).to(tl.float32)
            x10 = tl.load(map_base + off10[:, None], mask=pair_mask, other=0.0).to(tl.float32)
            x11 = tl.load(map_base + off11[:, None], mask=pair_mask, other=0.0).to(tl.float32)
            value = _bilinear_combine(
                x00, x01, x10, x11, ly0[:, None], ly1[:, None], lx0[:, None], lx1[:, None],
                CPU_NUMERICS, WEIGHTS4,
            )
            s = _torch_sigmoid(value, CPU_NUMERICS)  # (BLOCK_P, BLOCK_N)

            dx = px[:, None] - cx[None, :]
            dy = py[:, None] - cy[None, :]
            score = s - (dx * dx + dy * dy) * beta  # (BLOCK_P, BLOCK_N)
            score = tl.where(pair_mask, score, float("-inf"))

            # Chunk argmax, ties -> lowest original index, then merge into the running best.
            chunk_best = tl.max(score, axis=1)
            is_best = (score == chunk_best[:, None]) & pair_mask
            chunk_index = tl.min(tl.where(is_best, element[None, :], _INT32_MAX), axis=1)
            better = (chunk_best > best_score) | ((chunk_best == best_score) & (chunk_index < best_index))
            best_score = tl.where(better, chunk_best, best_score)
            best_index = tl.where(better, chunk_index, best_index)

    tl.store(labels_ptr + rows * s_oh + cols * s_ow, best_index.to(tl.int64), mask=pixel_valid)


@triton.jit(do_not_specialize=["h", "w", "H", "W"])
def _upsample_sigmoid_kernel(
    logits_ptr, value_ptr, sigmoid_ptr, h, w, H, W,
    BLOCK: tl.constexpr, CPU_NUMERICS: tl.constexpr, WEIGHTS4: tl.constexpr,
):
    """Test/debug probe: the per-pixel value and sigmoid that _assign_kernel computes, for one map
    (program_id(1)), written out so they can be compared bit for bit with PyTorch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < H * W
    rows = offs // W
    cols = offs % W
    y0, y1, ly0, ly1 = _source_index(rows, h, H, CPU_NUMERICS)
    x0, x1, lx0, lx1 = _source_index(cols, w, W, CPU_NUMERICS)
    base = logits_ptr + tl.program_id(1).to(tl.int64) * h * w  # contiguous [N, h, w]
    x00 = tl.load(base + y0 * w + x0, mask=valid, other=0.0).to(tl.float32)
    x01 = tl.load(base + y0 * w + x1, mask=valid, other=0.0).to(tl.float32)
    x10 = tl.load(base + y1 * w + x0, mask=valid, other=0.0).to(tl.float32)
    x11 = tl.load(base + y1 * w + x1, mask=valid, other=0.0).to(tl.float32)
    value = _bilinear_combine(x00, x01, x10, x11, ly0, ly1, lx0, lx1, CPU_NUMERICS, WEIGHTS4)
    out_offs = tl.program_id(1).to(tl.int64) * H * W + offs
    tl.store(value_ptr + out_offs, value, mask=valid)
    tl.store(sigmoid_ptr + out_offs, _torch_sigmoid(value, CPU_NUMERICS), mask=valid)


@triton.jit
def _element_stats_kernel(
    labels_ptr, H, W, s_lh, s_lw, N,
    counts_ptr, sum_x_ptr, sum_y_ptr, min_x_ptr, min_y_ptr, max_x_ptr, max_y_ptr,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # Grid: (pixel blocks, element blocks). Each program reduces its pixels against its elements
    # locally, then issues one atomic per element present in the block.
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_valid = offs_p < H * W
    rows = offs_p // W
    cols = offs_p % W
    label = tl.load(labels_ptr + rows * s_lh + cols * s_lw, mask=pixel_valid, other=-1)

    element = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    hit = (label[:, None] == element[None, :]) & pixel_valid[:, None] & (element[None, :] < N)

    col64 = cols.to(tl.int64)[:, None]
    row64 = rows.to(tl.int64)[:, None]
    count = tl.sum(hit.to(tl.int64), axis=0)  # (BLOCK_E,)
    sum_x = tl.sum(tl.where(hit, col64, 0), axis=0)
    sum_y = tl.sum(tl.where(hit, row64, 0), axis=0)
    min_x = tl.min(tl.where(hit, col64, 2**62), axis=0)
    min_y = tl.min(tl.where(hit, row64, 2**62), axis=0)
    max_x = tl.max(tl.where(hit, col64, -1), axis=0)
    max_y = tl.max(tl.where(hit, row64, -1), axis=0)

    present = count > 0
    tl.atomic_add(counts_ptr + element, count, mask=present)
    tl.atomic_add(sum_x_ptr + element, sum_x, mask=present)
    tl.atomic_add(sum_y_ptr + element, sum_y, mask=present)
    tl.atomic_min(min_x_ptr + element, min_x, mask=present)
    tl.atomic_min(min_y_ptr + element, min_y, mask=present)
    tl.atomic_max(max_x_ptr + element, max_x, mask=present)
    tl.atomic_max(max_y_ptr + element, max_y, mask=present)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_out_hw(out_hw) -> tuple[int, int]:
    try:
        H, W = (int(v) for v in out_hw)
        ok = all(float(v) == int(v) for v in out_hw)
    except (TypeError, ValueError):
        raise ValueError(f"out_hw: expected a pair of positive ints (H, W), got {out_hw!r}") from None
    if not ok or H < 1 or W < 1:
        raise ValueError(f"out_hw: expected a pair of positive ints (H, W), got {out_hw!r}")
    return H, W


def _check_assign_inputs(logits, centroids, beta, out_hw) -> tuple[int, int]:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or min(logits.shape) < 1:
        got = shape_str(logits) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a non-empty [N, h, w] tensor, got {got}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"logits: expected dtype float32, float16 or bfloat16, got {logits.dtype}")
    N = logits.shape[0]
    if not isinstance(centroids, torch.Tensor) or tuple(centroids.shape) != (N, 2):
        got = shape_str(centroids) if isinstance(centroids, torch.Tensor) else type(centroids).__name__
        raise ValueError(f"centroids: expected shape [{N}, 2] (one (x, y) per logit map), got {got}")
    if centroids.dtype not in _FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"centroids: expected a floating dtype, got {centroids.dtype}")
    if centroids.device != logits.device:
        raise ValueError(f"centroids: expected device {logits.device} (the device of logits), got {centroids.device}")
    if isinstance(beta, torch.Tensor) or not isinstance(beta, (int, float)):
        raise ValueError(f"beta: expected a Python float, got {type(beta).__name__}")
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta: expected a finite value >= 0, got {beta}")
    return _check_out_hw(out_hw)


def _check_labels(labels: torch.Tensor, num_elements: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        got = shape_str(labels) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected a [H, W] tensor, got {got}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels: expected dtype int64, got {labels.dtype}")
    if isinstance(num_elements, bool) or not isinstance(num_elements, int) or num_elements < 1:
        raise ValueError(f"num_elements: expected a positive int, got {num_elements!r}")


# --------------------------------------------------------------------------------------------
# assign: launcher, custom op, public API
# --------------------------------------------------------------------------------------------


def _morton_order(centroids: torch.Tensor) -> torch.Tensor:
    """Element indices sorted along a Z-curve of their centroids (int32, on device, no sync)."""
    q = (centroids.clamp(0.0, 1.0) * 1023.0).to(torch.int64)  # (N, 2), 10 bits per axis
    key = torch.zeros_like(q[:, 0])
    for bit in range(10):
        key |= ((q[:, 0] >> bit) & 1) << (2 * bit)
        key |= ((q[:, 1] >> bit) & 1) << (2 * bit + 1)
    return torch.argsort(key, stable=True).to(torch.int32)


def assign_kernel_arguments(logits, centroids32, order, beta: float, out: torch.Tensor, prune: bool) -> tuple[list, dict]:
    """(positional args, constexprs and compile options) of one assignment launch.

    Used by the launcher and by `editrt doctor` (with meta tensors), so both compile the same.
    """
    N, h, w = logits.shape
    H, W = out.shape
    cpu_numerics = logits.device.type == "cpu"
    args = [logits, centroids32, order, out, N, h, w, H, W, *logits.stride(), *out.stride(), float(beta),
            *(autotune_cache.size_bucket(n) for n in (N, h * w, H, W))]
    options = dict(
        PRUNE=prune,
        CPU_NUMERICS=cpu_numerics,
        WEIGHTS4=cpu_numerics and H + W <= _TORCH_CPU_SMALL_OUTPUT,
        enable_fp_fusion=False,  # every FMA is explicit; the reference rounds each op
        enable_reflect_ftz=False,  # libdevice without flush-to-zero, as PyTorch's CUDA build
    )
    return args, options


def _launch_assign(logits, centroids, beta: float, H: int, W: int, out: torch.Tensor, prune: bool = True):
    """Run the assignment kernel into `out` ([H, W] int64); inputs are already validated."""
    N = logits.shape[0]
    centroids32 = centroids.to(torch.float32).contiguous()  # (N, 2)
    order = _morton_order(centroids32) if prune else torch.arange(N, dtype=torch.int32, device=logits.device)
    args, options = assign_kernel_arguments(logits, centroids32, order, beta, out, prune)

    def grid(meta):
        return (triton.cdiv(H, meta["TILE_H"]), triton.cdiv(W, meta["TILE_W"]))

    with autotune_cache.persisted(_assign_kernel, ASSIGN_KERNEL, logits.device):
        _assign_kernel[grid](*args, **options)
    record(ASSIGN_KERNEL)
    return out


def aot_assign_launches(N: int, h: int, w: int, H: int, W: int, dtype: torch.dtype, shape: str) -> list[Launch]:
    """Every launch `_launch_assign` can make for these sizes on a GPU (one per autotune config), with
    the layout the partition passes (contiguous [N, h, w] logits), for `editrt doctor`."""
    logits = torch.empty(N, h, w, dtype=dtype, device="meta")
    centroids32 = torch.empty(N, 2, device="meta")
    order = torch.empty(N, dtype=torch.int32, device="meta")
    out = torch.empty(H, W, dtype=torch.int64, device="meta")
    args, options = assign_kernel_arguments(logits, centroids32, order, 64.0, out, prune=True)
    options["CPU_NUMERICS"] = options["WEIGHTS4"] = False  # a CUDA launch
    return [Launch(ASSIGN_KERNEL, _config_name(c), shape, _assign_kernel.fn, fake_arguments(args),
                   {**options, **c.all_kwargs()}) for c in _GPU_ASSIGN_CONFIGS]


def _config_name(config) -> str:
    extra = f" maxnreg={config.maxnreg}" if config.maxnreg else ""
    return " ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f" warps={config.num_warps}{extra}"


def _upsample_sigmoid_probe(logits: torch.Tensor, out_hw) -> tuple[torch.Tensor, torch.Tensor]:
    """(upsampled [N, H, W], sigmoid of it) as computed inside the assignment kernel.

    For tests: these must equal F.interpolate(...) and torch.sigmoid(...) bit for bit.
    """
    H, W = _check_out_hw(out_hw)
    logits = logits.contiguous()
    N, h, w = logits.shape
    cpu_numerics = logits.device.type == "cpu"
    value = torch.empty((N, H, W), dtype=torch.float32, device=logits.device)
    sigmoid = torch.empty_like(value)
    block = 1024
    _upsample_sigmoid_kernel[(triton.cdiv(H * W, block), N)](
        logits, value, sigmoid, h, w, H, W,
        BLOCK=block, CPU_NUMERICS=cpu_numerics,
        WEIGHTS4=cpu_numerics and H + W <= _TORCH_CPU_SMALL_OUTPUT,
        enable_fp_fusion=False,
        enable_reflect_ftz=False,
    )
    return value, sigmoid


@torch.library.custom_op("editrt::slic_assign", mutates_args=())
def _assign_op(logits: torch.Tensor, centroids: torch.Tensor, beta: float, out_h: int, out_w: int) -> torch.Tensor:
    H, W = _check_assign_inputs(logits, centroids, beta, (out_h, out_w))
    if not use_triton(logits):
        return assign_reference(logits, centroids, beta, (H, W))
    out = torch.empty((H, W), dtype=torch.int64, device=logits.device)
    return _launch_assign(logits, centroids, beta, H, W, out)


@_assign_op.register_fake
def _assign_fake(logits, centroids, beta, out_h, out_w):
    return logits.new_empty((out_h, out_w), dtype=torch.int64)


def assign(logits: torch.Tensor, centroids: torch.Tensor, beta: float, out_hw, out=None) -> torch.Tensor:
    """Exact Triton version of ``assign_reference``: int64 labels [H, W], equal to the reference.

    ``out`` (optional, [H, W] int64 on the logits' device) receives the labels; without it the
    call goes through the ``torch.ops.editrt.slic_assign`` custom op (visible to torch.compile).
    """
    H, W = _check_assign_inputs(logits, centroids, beta, out_hw)
    if out is None:
        return torch.ops.editrt.slic_assign(logits, centroids, float(beta), H, W)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (H, W) or out.dtype != torch.int64:
        got = f"{shape_str(out)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out: expected an int64 tensor of shape [{H}, {W}], got {got}")
    if out.device != logits.device:
        raise ValueError(f"out: expected device {logits.device}, got {out.device}")
    if use_triton(logits):
        return _launch_assign(logits, centroids, beta, H, W, out)
    return out.copy_(assign_reference(logits, centroids, beta, (H, W)))


# --------------------------------------------------------------------------------------------
# element_stats: reference, launcher, custom op, public API
# --------------------------------------------------------------------------------------------


def _finalize_stats(counts, sum_x, sum_y, min_x, min_y, max_x, max_y, H: int, W: int):
    """Integer accumulators -> (counts, centroids (x, y) float32, boxes (x0, y0, x1, y1) int64)."""
    n = counts.to(torch.float64)
    cx = (sum_x.to(torch.float64) / n + 0.5) / W  # mean of (j + 0.5)/W; 0/0 -> NaN when empty
    cy = (sum_y.to(torch.float64) / n + 0.5) / H
    centroids = torch.stack([cx, cy], dim=1).to(torch.float32)  # (N, 2)
    boxes = torch.stack([min_x, min_y, max_x, max_y], dim=1)  # (N, 4)
    boxes = torch.where((counts > 0)[:, None], boxes, torch.full_like(boxes, -1))
    return counts, centroids, boxes


def element_stats_reference(labels: torch.Tensor, num_elements: int):
    """(counts [N] int64, centroids [N, 2] float32, boxes [N, 4] int64) of each element's pixels.

    Pixels whose label is outside [0, num_elements) (e.g. -1 = dropped) are ignored.
    """
    _check_labels(labels, num_elements)
    H, W = labels.shape
    N = num_elements
    device = labels.device
    flat = labels.reshape(-1)  # (H*W,)
    rows = torch.arange(H, device=device).repeat_interleave(W)  # (H*W,)
    cols = torch.arange(W, device=device).repeat(H)
    keep = (flat >= 0) & (flat < N)
    flat, rows, cols = flat[keep], rows[keep], cols[keep]

    zeros = torch.zeros(N, dtype=torch.int64, device=device)
    counts = zeros.scatter_add(0, flat, torch.ones_like(flat))
    sum_x = zeros.scatter_add(0, flat, cols)
    sum_y = zeros.scatter_add(0, flat, rows)
    big = torch.full((N,), 2**62, dtype=torch.int64, device=device)
    min_x = big.scatter_reduce(0, flat, cols, reduce="amin")
    min_y = big.scatter_reduce(0, flat, rows, reduce="amin")
    max_x = (zeros - 1).scatter_reduce(0, flat, cols, reduce="amax")
    max_y = (zeros - 1).scatter_reduce(0, flat, rows, reduce="amax")
    return _finalize_stats(counts, sum_x, sum_y, min_x, min_y, max_x, max_y, H, W)


def _launch_element_stats(labels: torch.Tensor, num_elements: int):
    H, W = labels.shape
    N = num_elements
    device = labels.device
    counts, sum_x, sum_y, max_x, max_y = (torch.zeros(N, dtype=torch.int64, device=device) for _ in range(5))
    max_x -= 1
    max_y -= 1
    min_x, min_y = (torch.full((N,), 2**62, dtype=torch.int64, device=device) for _ in range(2))
    args, options = stats_kernel_arguments(labels, N, counts, sum_x, sum_y, min_x, min_y, max_x, max_y)
    grid = (triton.cdiv(H * W, options["BLOCK_P"]), triton.cdiv(N, options["BLOCK_E"]))
    _element_stats_kernel[grid](*args, **options)
    record(STATS_KERNEL)
    return _finalize_stats(counts, sum_x, sum_y, min_x, min_y, max_x, max_y, H, W)


def stats_kernel_arguments(labels, N: int, *accumulators) -> tuple[list, dict]:
    """(positional args, constexprs) of one statistics launch (launcher and `editrt doctor`)."""
    H, W = labels.shape
    # [BLOCK_P, BLOCK_E] int64 tiles: 256 x 16 over 8 warps stays in registers on sm_90.
    block_p, block_e, warps = (1024, 32, 4) if interpreter_active() else _GPU_STATS_TILE
    return [labels, H, W, *labels.stride(), N, *accumulators], dict(BLOCK_P=block_p, BLOCK_E=block_e, num_warps=warps)


def aot_stats_launches(N: int, H: int, W: int, shape: str) -> list[Launch]:
    """The statistics launch for these sizes on a GPU, for `editrt doctor`."""
    labels = torch.empty(H, W, dtype=torch.int64, device="meta")
    accumulators = [torch.empty(N, dtype=torch.int64, device="meta") for _ in range(7)]
    args, options = stats_kernel_arguments(labels, N, *accumulators)
    block_p, block_e, warps = _GPU_STATS_TILE
    options.update(BLOCK_P=block_p, BLOCK_E=block_e, num_warps=warps)
    return [Launch(STATS_KERNEL, f"BLOCK_P={block_p} BLOCK_E={block_e} warps={warps}", shape,
                   _element_stats_kernel, fake_arguments(args), options)]


@torch.library.custom_op("editrt::slic_element_stats", mutates_args=())
def _element_stats_op(labels: torch.Tensor, num_elements: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_labels(labels, num_elements)
    if not use_triton(labels):
        return element_stats_reference(labels, num_elements)
    return _launch_element_stats(labels, num_elements)


@_element_stats_op.register_fake
def _element_stats_fake(labels, num_elements):
    return (
        labels.new_empty((num_elements,), dtype=torch.int64),
        labels.new_empty((num_elements, 2), dtype=torch.float32),
        labels.new_empty((num_elements, 4), dtype=torch.int64),
    )


def element_stats(labels: torch.Tensor, num_elements: int):
    """(counts [N] int64, centroids [N, 2] float32 (x, y), boxes [N, 4] int64 (x0, y0, x1, y1)).

    Deterministic; labels outside [0, num_elements) (e.g. -1) are ignored; empty elements get
    count 0, centroid NaN and box (-1, -1, -1, -1).
    """
    _check_labels(labels, num_elements)
    return torch.ops.editrt.slic_element_stats(labels, num_elements)
