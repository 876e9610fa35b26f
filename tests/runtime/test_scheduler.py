"""The denoising-loop scheduler: equal to diffusers' DDIM loop, keyed loops, weight switches, CUDA graphs.

CPU: the loop runs eagerly and must equal diffusers' DDIMScheduler loop bit for bit (same float32
coefficient arithmetic, same ops). CUDA (marked gpu): a graph replays the same kernels, so replay
must equal the eager loop bit for bit, also after a LoRA weight switch.
"""
import time

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from editrt.runtime.scheduler import DenoiseLoop, LoopCache, LoopKey

CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


class ToyUNet:
    """A deterministic 'UNet' behind the engine interface: depends on sample, timestep and context."""

    backend = "toy"
    supports_cuda_graph = False
    compiled = False
    lora = None
    device = torch.device("cpu")

    def __init__(self):
        self.calls = 0

    def prepare(self):
        pass

    def before_capture(self):
        pass

    def __call__(self, sample, timestep, encoder_hidden_states):
        self.calls += 1
        mix = encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]
        return {"noise_pred": torch.tanh(sample[:, :4] * 0.7 + timestep[:, None, None, None] / 1000 + mix)}


@pytest.mark.parametrize("steps,guidance", [(5, 1.0), (7, 4.5), (50, 7.5)])
def test_loop_equals_diffusers_ddim_bit_for_bit(steps, guidance):
    unet, cfg = ToyUNet(), guidance > 1
    batch = 2 if cfg else 1
    latents, extra = torch.randn(1, 4, 8, 8), torch.randn(batch, 5, 8, 8)
    context = torch.randn(batch, 6, 3)
    key = LoopKey("t", (1, 4, 8, 8), (batch, 5, 8, 8), (("encoder_hidden_states", (batch, 6, 3)),), steps, cfg, torch.float32)
    ours = DenoiseLoop(key, unet, CONFIG, "cpu", use_graph=False).run(latents, {"encoder_hidden_states": context},
                                                                       extra, guidance)
    scheduler = DDIMScheduler.from_config(CONFIG)
    scheduler.set_timesteps(steps)
    x = latents.clone()
    for t in scheduler.timesteps:
        model_input = torch.cat([torch.cat([x] * 2) if cfg else x, extra], dim=1)
        noise = unet(sample=model_input, timestep=t.float().expand(batch), encoder_hidden_states=context)["noise_pred"]
        if cfg:
            u, c = noise.chunk(2)
            noise = u + guidance * (c - u)
        x = scheduler.step(noise, t, x, eta=0.0, return_dict=False)[0]
    assert torch.equal(ours, x)


def test_loop_cache_keys_and_lru_eviction_by_bytes():
    unet = ToyUNet()

    def key(steps=4, cfg=False, h=8):
        return LoopKey("t", (1, 4, h, h), None, (("encoder_hidden_states", (1, 6, 3)),), steps, cfg, torch.float32)

    one = DenoiseLoop(key(), unet, CONFIG, "cpu", use_graph=False).nbytes
    assert one > 0
    cache = LoopCache(CONFIG, "cpu", budget_bytes=2 * one)  # room for two loops of this size
    a = cache.get(key(), unet)
    assert cache.get(key(), unet) is a  # same key, same engine: the same loop
    b = cache.get(key(), ToyUNet())
    assert b is not a  # another engine: another loop
    assert cache.get(key(), unet) is a  # a is now the most recently used
    c = cache.get(LoopKey("other stage", (1, 4, 8, 8), None, (("encoder_hidden_states", (1, 6, 3)),), 4, False,
                          torch.float32), unet)
    assert c is not a and len(cache.loops) == 2
    assert {id(loop) for loop in cache.loops} == {id(a), id(c)}  # b, the least recently used, went
    assert cache.cache.bytes <= 2 * one


def test_context_copied_once_per_tensor_so_kv_caches_hold(reposition):
    """A session's task prompt: the same tensor every request -> not copied again -> K/V cache hit."""
    to_k = reposition.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    calls = []
    handle = to_k.register_forward_hook(lambda *a: calls.append(1))
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:40, 10:40] = True
    try:
        reposition.inpaint(image, mask, steps=3, resolution=64)
        first = len(calls)
        reposition.inpaint(image, mask, steps=3, resolution=64, seed=5)
    finally:
        handle.remove()
    assert first == 1 and len(calls) == 1  # K/V once for the first request, reused by the second


def test_harmonizer_switch_between_loops_uses_the_right_weights(tiny_weights):
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights)
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:50, 5:30] = True
    a = np.asarray(pipe.inpaint(image, mask, steps=2, resolution=64))
    h = np.asarray(pipe.harmonize(image, mask, steps=2, resolution=64))
    b = np.asarray(pipe.inpaint(image, mask, steps=2, resolution=64))
    np.testing.assert_array_equal(a, b)  # back on the base weights after the harmonizer ran
    fresh = RepositionPipeline.from_pretrained(tiny_weights)
    np.testing.assert_array_equal(h, np.asarray(fresh.harmonize(image, mask, steps=2, resolution=64)))


def test_lora_switch_is_in_place_and_fast(reposition):
    lora = reposition.harmonizer
    pointers = {n: p.data_ptr() for n, p in lora.params.items()}
    lora.set_scale(1.0)
    lora.set_scale(0.0)  # the first switch builds the fused copy; time the steady state
    start = time.perf_counter()
    for _ in range(10):
        lora.set_scale(1.0)
        lora.set_scale(0.0)
    per_switch = (time.perf_counter() - start) / 20
    assert {n: p.data_ptr() for n, p in lora.params.items()} == pointers  # storage never moves
    assert per_switch < 0.010


@pytest.mark.gpu
def test_graph_replay_equals_eager_and_follows_weight_switches(tiny_weights):
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights, device="cuda")
    eager = RepositionPipeline.from_pretrained(tiny_weights, device="cuda")
    eager.loops.use_graphs = False
    image = np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    mask = np.zeros((128, 128), bool)
    mask[30:90, 20:70] = True
    for _ in range(2):  # the second round replays the graphs captured in the first
        for call in (lambda p: p.inpaint(image, mask, steps=4, guidance=3.0),
                     lambda p: p.harmonize(image, mask, steps=4),
                     lambda p: p.inpaint(image, mask, steps=4, guidance=3.0)):
            np.testing.assert_array_equal(np.asarray(call(pipe)), np.asarray(call(eager)))
    assert any(loop.graph is not None for loop in pipe.loops.loops.values())
    lora = pipe.harmonizer
    torch.cuda.synchronize()
    start = time.perf_counter()
    lora.set_scale(1.0)
    torch.cuda.synchronize()
    assert time.perf_counter() - start < 0.010
