"""Attention processors that make the editors' UNets faster without changing their definition.

* `CachedKVCrossAttnProcessor` (repositioning UNet): the cross-attention context is a task prompt,
  constant through all denoising steps of a request, so each layer's K and V are computed once per
  request and reused by every step. Same ops as diffusers' AttnProcessor2_0 otherwise (bit-equal).
* `FusedDualCrossAttention` (element decoder): the text and element cross-attentions of a block
  (paper 001 Algorithm 1) as three launches instead of ~10: the two LayerNorm + query projections
  folded into one GEMM, both attentions in one Triton kernel (editrt.kernels.dual_attention), and
  the two output projections as one GEMM on the stacked weights. Their K/V are cached like above
  (text and element tokens are constant through a render).

The LayerNorm fold: with x̂ = (x - mean) / std shared by both norms,
    norm_t(x) Wq_tᵀ + bq_t = x̂ (Wq_t diag(γ_t))ᵀ + (Wq_t β_t + bq_t)
and likewise for the element branch; stacking the two gives one [2·inner, C] GEMM on x̂.

Caches hold the exact context tensor they were computed from and its version counter, plus the
versions of the K/V weights, so a new context or changed weights (a LoRA switch) recompute them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from editrt.errors import EditError
from editrt.kernels.dual_attention import dual_cross_attention


class Fp16OverflowError(EditError):
    """The UNet produces inf/NaN in fp16 even with fp32 attention: the weights need bf16 or fp32."""


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*D] projection -> [B, H, N, D] view (no copy; D contiguous, rows H*D apart)."""
    batch, rows, inner = t.shape
    return t.view(batch, rows, heads, inner // heads).transpose(1, 2)


def split_dual_query_heads(q: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, M, 2*H*D] stacked query projection -> (q_text, q_elements), each a [B, H, M, D] view.

    The fused kernel reads these views in place: rows 2*H*D elements apart, heads D apart, the
    element half H*D further; at fp16/bf16 with SD's D = 40/80/160 every one of those offsets is a
    multiple of 16 bytes, which lets the kernel's loads vectorise (see kernels/dual_attention.py).
    """
    batch, tokens, width = q.shape
    q = q.view(batch, tokens, 2, heads, width // (2 * heads)).permute(2, 0, 3, 1, 4)  # (2, B, H, M, D)
    return q[0], q[1]


def _weights_version(*linears) -> tuple:
    return tuple((m.weight._version, m.weight.data_ptr()) for m in linears)


class _KVCache:
    """K/V of one attention for one context tensor (held, so its identity cannot be reused)."""

    def __init__(self):
        self.context = self.version = self.kv = None

    def get(self, attn, context: torch.Tensor):
        version = (context._version, _weights_version(attn.to_k, attn.to_v))
        if self.context is not context or self.version != version:
            key, value = attn.to_k(context), attn.to_v(context)  # (B, N, inner)
            key, value = split_heads(key, attn.heads), split_heads(value, attn.heads)  # (B, H, N, D)
            self.context, self.version, self.kv = context, version, (key, value)
        return self.kv

    def clear(self):
        self.context = self.version = self.kv = None


class CachedKVCrossAttnProcessor:
    """AttnProcessor2_0 for SD cross-attention (no masks, norms or residual), with K/V cached per context."""

    def __init__(self):
        self.cache = _KVCache()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key, value = self.cache.get(attn, encoder_hidden_states)
        head_dim = key.shape[-1]
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, M, D)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # (B, M, inner)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def _plain_cross_attention(attn) -> bool:
    return (attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross and attn.norm_q is None
            and attn.norm_k is None and not attn.residual_connection)


def cache_cross_attention_kv(unet: torch.nn.Module) -> int:
    """Give every cross-attention of `unet` (text, task prompt or elements) a K/V-caching processor."""
    count = 0
    for module in unet.modules():
        if isinstance(module, Attention) and module.is_cross_attention and _plain_cross_attention(module):
            module.set_processor(CachedKVCrossAttnProcessor())
            count += 1
    return count


class FusedDualCrossAttention:
    """The dual cross-attention of an ElementTransformerBlock in three launches (see the module doc)."""

    def __init__(self, block):
        t, e = block.attn2, block.attn_elements
        if not (_plain_cross_attention(t) and _plain_cross_attention(e)) or t.heads != e.heads \
                or t.to_q.out_features != e.to_q.out_features or block.norm2.eps != block.norm_elements.eps:
            raise ValueError("fused dual attention needs two plain cross-attentions of the same heads and width")
        self.text_kv, self.element_kv = _KVCache(), _KVCache()
        self.block, self._version, self.weights = block, None, None

    def _fused_weights(self):
        b = self.block
        parts = (b.norm2, b.norm_elements, b.attn2.to_q, b.attn_elements.to_q, b.attn2.to_out[0], b.attn_elements.to_out[0])
        version = tuple((p._version, p.data_ptr()) for m in parts for p in m.parameters())
        if version != self._version:
            with torch.no_grad():
                q_w, q_b = [], []
                for norm, to_q in ((b.norm2, b.attn2.to_q), (b.norm_elements, b.attn_elements.to_q)):
                    gamma = norm.weight if norm.weight is not None else torch.ones_like(to_q.weight[0])
                    beta = norm.bias if norm.bias is not None else torch.zeros_like(to_q.weight[0])
                    q_w.append(to_q.weight * gamma[None, :])  # Wq diag(γ)
                    q_b.append(to_q.weight @ beta + (to_q.bias if to_q.bias is not None else 0))  # Wq β + bq
                o_t, o_e = b.attn2.to_out[0], b.attn_elements.to_out[0]
                o_bias = (o_t.bias if o_t.bias is not None else 0) + (o_e.bias if o_e.bias is not None else 0)
                self.weights = (torch.cat(q_w), torch.cat(q_b), torch.cat([o_t.weight, o_e.weight], dim=1),
                                o_bias if torch.is_tensor(o_bias) else None)
            self._version = version
        return self.weights

    def __call__(self, block, x: torch.Tensor, text: torch.Tensor, elements: torch.Tensor) -> torch.Tensor:
        q_weight, q_bias, out_weight, out_bias = self._fused_weights()
        width = x.shape[-1]
        x_hat = F.layer_norm(x, (width,), eps=block.norm2.eps)  # shared standardisation
        q = F.linear(x_hat, q_weight, q_bias)  # (B, M, 2 * inner): both query projections
        q_a, q_b = split_dual_query_heads(q, block.attn2.heads)  # (B, H, M, D) each
        k_a, v_a = self.text_kv.get(block.attn2, text)
        k_b, v_b = self.element_kv.get(block.attn_elements, elements)
        out = dual_cross_attention(q_a, k_a, v_a, q_b, k_b, v_b)  # (B, M, 2 * inner)
        return F.linear(out, out_weight, out_bias)  # both output projections, summed


def use_fused_dual_attention(decoder) -> int:
    """Route every element block of an ElementDecoder through FusedDualCrossAttention; returns how many."""
    for block in decoder.blocks.values():
        block.dual_processor = FusedDualCrossAttention(block)
    return len(decoder.blocks)


def clear_kv_caches(module) -> None:
    """Forget every cached K/V under `module` (before a CUDA-graph capture, so the graph computes them)."""
    if module is None:
        return
    for m in module.modules():
        processor = getattr(m, "processor", None)
        if isinstance(processor, CachedKVCrossAttnProcessor):
            processor.cache.clear()
        dual = getattr(m, "dual_processor", None)
        if isinstance(dual, FusedDualCrossAttention):
            dual.text_kv.clear()
            dual.element_kv.clear()


class UpcastAttnProcessor:
    """Attention with q, k, v in float32 (for fp16 UNets whose attention overflows), cast back after."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, dtype = hidden_states.shape[0], hidden_states.dtype
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2).float() for t in (q, k, v))  # (B, H, N, D)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out.to(dtype))) / attn.rescale_output_factor


@torch.no_grad()
def fp16_is_finite(unet, context_shape: tuple[int, int], timesteps=(999, 500, 1)) -> bool:
    """One CFG-sized UNet step per timestep on random latents: are all outputs finite?

    The latents come from a fixed seed: the verdict at load must not depend on the global RNG's state."""
    p = next(unet.parameters())
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, size, size, generator=g).to(p.device, p.dtype)
    context = torch.randn(2, *context_shape, generator=g).to(p.device, p.dtype)
    return all(torch.isfinite(unet(sample, torch.tensor(t, device=p.device), encoder_hidden_states=context).sample).all()
               for t in timesteps)


def ensure_fp16_finite(unet, context_shape: tuple[int, int]) -> str:
    """fp16 SD-2 UNets are known to overflow in attention (black images): probe, and upcast if needed.

    Returns "ok" or "upcast attention"; raises Fp16OverflowError (an EditError: one line at the
    CLI) if even fp32 attention overflows.
    """
    if fp16_is_finite(unet, context_shape):
        return "ok"
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(UpcastAttnProcessor())
    if not fp16_is_finite(unet, context_shape):
        raise Fp16OverflowError("dtype fp16: the UNet overflows in fp16 even with fp32 attention; use bf16 or fp32")
    return "upcast attention"


def prepare_unet(unet, dtype: torch.dtype, context_shape: tuple[int, int], cache_kv: bool) -> str:
    """fp16: probe first (an upcast replaces the attention processors); then, unless upcast, K/V caching.

    Returns the fp16 probe's verdict ("ok" or "upcast attention").
    """
    attention = ensure_fp16_finite(unet, context_shape) if dtype == torch.float16 else "ok"
    if cache_kv and attention == "ok":
        cache_cross_attention_kv(unet)
    return attention
