"""Attention processors against the plain diffusers path.

K/V caching changes no arithmetic: equal bit for bit. The fused dual attention folds the
LayerNorm affine into the query weights and sums the two output projections in one GEMM, which
reorders fp32 rounding: allclose at 1e-5 (relative to the output scale).
"""
import pytest
import torch

from editrt.models.attention import cache_cross_attention_kv, use_fused_dual_attention
from editrt.models.components import load_elements_components, load_reposition_components


def test_cached_kv_is_bit_equal_and_follows_context_and_weights(tiny_weights):
    c = load_reposition_components(tiny_weights)
    unet = c.unet
    x, ctx = torch.randn(2, 9, 16, 16), torch.randn(2, 50, 32)
    with torch.no_grad():
        plain = [unet(x, t, encoder_hidden_states=ctx).sample for t in (981, 500, 21)]
        blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
        assert cache_cross_attention_kv(unet) == len(blocks) == 4  # every attn2; self-attention untouched
        cached = [unet(x, t, encoder_hidden_states=ctx).sample for t in (981, 500, 21)]
        for a, b in zip(plain, cached):
            assert torch.equal(a, b)
        other = torch.randn(2, 50, 32)  # a new context: recomputed, not the stale K/V
        fresh = unet(x, 500, encoder_hidden_states=other).sample
        ctx.mul_(2)  # the same tensor changed in place: recomputed too
        doubled = unet(x, 500, encoder_hidden_states=ctx).sample
        c.harmonizer.set_scale(1.0)  # the LoRA switch rewrites to_k / to_v in place
        fused = unet(x, 500, encoder_hidden_states=ctx).sample
    reference = load_reposition_components(tiny_weights)
    with torch.no_grad():
        assert torch.equal(fresh, reference.unet(x, 500, encoder_hidden_states=other).sample)
        assert torch.equal(doubled, reference.unet(x, 500, encoder_hidden_states=ctx).sample)
        reference.harmonizer.set_scale(1.0)
        assert torch.equal(fused, reference.unet(x, 500, encoder_hidden_states=ctx).sample)


def test_fused_dual_attention_matches_the_two_attention_path(tiny_weights):
    c = load_elements_components(tiny_weights)
    decoder = c.decoder
    for block in decoder.blocks.values():  # non-trivial LayerNorm affine, so the fold is exercised
        with torch.no_grad():
            for norm in (block.norm2, block.norm_elements):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(400.0).expand(2)  # small: the kernel runs in the interpreter
    text, tokens = torch.randn(2, 77, 32), torch.randn(2, 256, 32)
    with torch.no_grad():
        reference = decoder(x, t, text, tokens)
        assert use_fused_dual_attention(decoder) == len(decoder.blocks)
        fused = decoder(x, t, text, tokens)
        again = decoder(x, t * 0.5, text, tokens)  # K/V reused across steps
        text_only = decoder(x, t, text, None)  # one attention: the reference path
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    for block in decoder.blocks.values():
        block.dual_processor = None
    with torch.no_grad():
        torch.testing.assert_close(again, decoder(x, t * 0.5, text, tokens), rtol=1e-5,
                                   atol=1e-5 * reference.abs().max().item())
        assert torch.equal(text_only, decoder(x, t, text, None))


def _overflowing_fp16_unet(tiny_weights, score_gain: float):
    """The tiny SD-2-style UNet in fp16 with its self-attention Q/K weights scaled by `score_gain`.

    Q and K entries stay ~1e2 (finite in fp16) but their dot products reach ~1e5 > 65504, the fp16
    maximum: with diffusers' classic AttnProcessor (scores by baddbmm in the input dtype, as SD's
    fp16 attention computes them) the scores become inf and softmax gives NaN -- the failure the
    probe exists for. (PyTorch's CPU SDPA upcasts fp16 internally, so it cannot show it.)
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor

    unet = load_reposition_components(tiny_weights).unet.half()
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, Attention) and not m.is_cross_attention:
                m.to_q.weight.mul_(score_gain)
                m.to_k.weight.mul_(score_gain)
    unet.set_attn_processor(AttnProcessor())
    return unet


def test_fp16_overflow_really_falls_back_to_fp32_attention(tiny_weights):
    from editrt.models import attention

    unet = _overflowing_fp16_unet(tiny_weights, 200.0)
    assert not attention.fp16_is_finite(unet, (50, 32))  # it really overflows: no mock
    assert attention.prepare_unet(unet, torch.float16, (50, 32), cache_kv=True) == "upcast attention"
    assert all(isinstance(p, attention.UpcastAttnProcessor) for p in unet.attn_processors.values())
    assert attention.fp16_is_finite(unet, (50, 32))
    x, ctx = torch.randn(1, 9, 16, 16).half(), torch.randn(1, 50, 32).half()
    with torch.no_grad():
        assert torch.isfinite(unet(x, 300, encoder_hidden_states=ctx).sample).all()


def test_upcast_processor_computes_the_same_attention(tiny_weights):
    """At fp32 (where nothing overflows) the fp32-attention processor equals diffusers' default."""
    from editrt.models import attention

    c = load_reposition_components(tiny_weights)
    x, ctx = torch.randn(1, 9, 16, 16), torch.randn(1, 50, 32)
    with torch.no_grad():
        reference = c.unet(x, 300, encoder_hidden_states=ctx).sample
        c.unet.set_attn_processor(attention.UpcastAttnProcessor())
        upcast = c.unet(x, 300, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(upcast, reference, rtol=1e-5, atol=1e-5)


def test_fp16_overflow_outside_attention_is_a_one_line_edit_error(tiny_weights):
    from editrt.errors import EditError
    from editrt.models import attention

    unet = load_reposition_components(tiny_weights).unet.half()
    with torch.no_grad():
        unet.conv_in.weight.mul_(1e5)  # activations past 65504 before any attention: upcasting cannot help
    with pytest.raises(attention.Fp16OverflowError, match="fp16.*use bf16 or fp32") as info:
        attention.ensure_fp16_finite(unet, (50, 32))
    assert isinstance(info.value, EditError) and "\n" not in str(info.value)


def test_finite_fp16_unet_keeps_its_processors(tiny_weights):
    from editrt.models import attention

    unet = _overflowing_fp16_unet(tiny_weights, 1.0)  # unscaled: finite in fp16
    assert attention.ensure_fp16_finite(unet, (50, 32)) == "ok"
    assert not any(isinstance(p, attention.UpcastAttnProcessor) for p in unet.attn_processors.values())


@pytest.mark.gpu
@pytest.mark.slow
def test_full_sd2_unet_is_finite_in_fp16(tmp_path):
    """The real SD-2 inpainting architecture at fp16 on CUDA: probed for inf/NaN (the pipeline upcasts if needed)."""
    from diffusers import UNet2DConditionModel

    from editrt.models.attention import fp16_is_finite
    from editrt.weights import load_config

    unet = UNet2DConditionModel.from_config(load_config("full")["inpaint"]["unet"]).to("cuda", torch.float16).eval()
    assert fp16_is_finite(unet, (50, 1024))
