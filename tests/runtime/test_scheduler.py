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
        """Fixed weights: nothing to put in place."""

    def before_capture(self):
        """No cached state a capture could bake in."""

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


def test_lora_switch_is_in_place_and_exact(tiny_weights):
    """The switch copies into the live parameters (storage never moves: graphs and exported weight maps
    stay valid), c = 0 restores the base weights bit for bit, c = 1 is base + delta computed
    independently, and switching back and forth allocates no new fused copies."""
    from editrt.models.components import load_reposition_components

    lora = load_reposition_components(tiny_weights).harmonizer
    pointers = {n: p.data_ptr() for n, p in lora.params.items()}
    base = {n: p.detach().clone() for n, p in lora.params.items()}
    lora.set_scale(1.0)
    for name, param in lora.params.items():
        expected = (base[name].float() + lora.deltas[name]).to(base[name].dtype)
        assert torch.equal(param, expected), name
    fused_copy = lora.fused_weights(1.0)
    for _ in range(3):
        lora.set_scale(0.0)
        lora.set_scale(1.0)
    assert lora.fused_weights(1.0) is fused_copy  # reused, not rebuilt
    lora.set_scale(0.0)
    assert {n: p.data_ptr() for n, p in lora.params.items()} == pointers
    assert all(torch.equal(p, base[n]) for n, p in lora.params.items())
    for scale in (0.25, 0.5, 0.75):  # a sweep of scales keeps at most KEEP_FUSED fused copies
        lora.set_scale(scale)
    assert len(lora._fused) == lora.KEEP_FUSED


@pytest.mark.gpu
@pytest.mark.slow
def test_lora_switch_at_full_size_takes_under_5_ms_on_the_gpu():
    """What it bounds: one c = 0 <-> 1 switch of the FULL SD-2 harmonizer LoRA (every attention
    projection of the real UNet, the full config's rank) in fp16 on the GPU, i.e. the cost a
    harmonize stage boundary adds. A device copy of those weights at HBM bandwidth is well under
    1 ms; 5 ms fails a host round trip per tensor or a re-fusion (B @ A) per switch."""
    from diffusers import UNet2DConditionModel

    from editrt.models.lora import FusedLoRA, random_lora
    from editrt.weights import load_config

    cfg = load_config("full")["inpaint"]
    unet = UNet2DConditionModel.from_config(cfg["unet"]).to("cuda", torch.float16)
    layers = random_lora(unet, cfg["lora_targets"], cfg["lora_rank"], torch.Generator().manual_seed(0))
    lora = FusedLoRA(unet, layers)
    touched = sum(p.numel() for p in lora.params.values())
    assert touched > 50_000_000  # really the full-size LoRA-touched weights
    lora.set_scale(1.0)
    lora.set_scale(0.0)  # builds and caches the fused copy
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        lora.set_scale(1.0)
        lora.set_scale(0.0)
    torch.cuda.synchronize()
    per_switch = (time.perf_counter() - start) / 20
    assert per_switch < 0.005, f"{per_switch * 1e3:.2f} ms per switch of {touched / 1e6:.0f}M parameters"


@pytest.mark.gpu
def test_graph_replay_equals_eager_and_follows_weight_switches(tiny_weights):
    """CUDA graphs (cuda_graphs=True) against the eager loop on the same GPU, bit for bit, across
    LoRA switches: inpaint (c = 0), harmonize (c = 1), harmonize at c = 0.5, inpaint again; the
    second round replays the graphs the first captured."""
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights, device="cuda", cuda_graphs=True)
    eager = RepositionPipeline.from_pretrained(tiny_weights, device="cuda", cuda_graphs=False)
    assert pipe.cuda_graphs and not eager.cuda_graphs
    image = np.random.default_rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    mask = np.zeros((128, 128), bool)
    mask[30:90, 20:70] = True
    calls = (lambda p: p.inpaint(image, mask, steps=4, guidance=3.0),
             lambda p: p.harmonize(image, mask, steps=4),
             lambda p: p.harmonize(image, mask, steps=4, lora_scale=0.5),
             lambda p: p.inpaint(image, mask, steps=4, guidance=3.0))
    first = [np.asarray(call(eager)) for call in calls]
    for _ in range(2):
        for call, expected in zip(calls, first):
            np.testing.assert_array_equal(np.asarray(call(pipe)), expected)
    assert any(loop.graph is not None for loop in pipe.loops.loops)
    assert all(loop.graph is None for loop in eager.loops.loops)
    assert not np.array_equal(first[1], first[2])  # the switch to 0.5 mattered


@pytest.mark.gpu
def test_optimize_false_never_captures(tiny_weights):
    """The torch-eager baseline on CUDA runs no graph (issue 10); cuda_graphs=True adds them to it."""
    from editrt.runtime.reposition import RepositionPipeline

    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:40, 10:40] = True
    baseline = RepositionPipeline.from_pretrained(tiny_weights, device="cuda", optimize=False)
    graphs = RepositionPipeline.from_pretrained(tiny_weights, device="cuda", optimize=False, cuda_graphs=True)
    a = np.asarray(baseline.inpaint(image, mask, steps=3, resolution=64))
    b = np.asarray(graphs.inpaint(image, mask, steps=3, resolution=64))
    assert all(loop.graph is None for loop in baseline.loops.loops)
    assert any(loop.graph is not None for loop in graphs.loops.loops)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("requested,optimize,capable,expected", [
    (None, True, True, True),  # the default where graphs work: on
    (None, False, True, False),  # the torch-eager baseline: never a graph (issue 10)
    (False, True, True, False),
    (True, False, True, True),  # the torch+cudagraph row: graphs without the K/V cache
    (None, True, False, False),  # CPU / ONNX Runtime / TensorRT: eager loops
    (False, False, False, False),
])
def test_cuda_graphs_resolution(requested, optimize, capable, expected):
    from editrt.runtime.backends import resolve_cuda_graphs

    assert resolve_cuda_graphs(requested, optimize, capable, "x") is expected


def test_cuda_graphs_true_where_impossible_is_a_clear_error():
    from editrt.errors import InputError
    from editrt.runtime.backends import resolve_cuda_graphs

    with pytest.raises(InputError, match="cuda_graphs=True: the onnxruntime backend on cuda cannot be captured"):
        resolve_cuda_graphs(True, True, False, "the onnxruntime backend on cuda")


def test_pipelines_hand_the_resolved_option_to_their_loops(tiny_weights):
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights, optimize=False)
    assert pipe.cuda_graphs is False and pipe.loops.use_graphs is False
