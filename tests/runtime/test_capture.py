"""CUDA-graph capture and replay in the scheduler, checked on the CPU (issue 21, items 2, 3, 4 and 9).

No GPU here: `ReplayingGraph` stands in for a captured graph (a replay runs every step of the loop and
no Python callback, as a CUDA graph does), and `FakeCuda` for the torch.cuda calls a capture makes. The
fake records what the real API would see (which stream a capture was given, whether two captures
overlapped, when the cache was emptied) and models the one allocator behaviour the measurement
depends on: torch.cuda.graph.__enter__ empties the cache, and a capture's allocations stay in its pool.
"""
import threading
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_scheduler import CONFIG, ToyUNet

from editrt.runtime import scheduler
from editrt.runtime.scheduler import DenoiseLoop, LoopCache, LoopKey
from editrt.runtime.work_queue import Cancelled


class ReplayingGraph:
    """A captured loop: replay() runs the whole loop with no Python in between, like a CUDA graph."""

    def __init__(self, loop):
        self.loop, self.replays = loop, 0

    def replay(self):
        self.replays += 1
        self.loop._body()


def _key(steps=4):
    return LoopKey("t", (1, 4, 8, 8), None, (("encoder_hidden_states", (1, 6, 3)),), steps, False, torch.float32)


def test_replay_runs_the_step_callbacks_so_a_cancelled_render_stops():
    unet, steps = ToyUNet(), 4
    loop = DenoiseLoop(_key(steps), unet, CONFIG, "cpu", use_graph=False)
    loop.graph = ReplayingGraph(loop)
    latents, context = torch.randn(1, 4, 8, 8), {"encoder_hidden_states": torch.randn(1, 6, 3)}
    seen = []
    out = loop.run(latents, context, callback=seen.append)
    assert seen == list(range(steps)) and loop.graph.replays == 1
    eager = DenoiseLoop(_key(steps), ToyUNet(), CONFIG, "cpu", use_graph=False).run(latents, context)
    assert torch.equal(out, eager)  # the same loop, replayed

    def cancelled(_step):
        raise Cancelled("cancelled by its owner")

    with pytest.raises(Cancelled):
        loop.run(latents, context, callback=cancelled)


def test_a_cancelled_render_under_graphs_runs_no_later_stage(tiny_weights, photo, monkeypatch):
    """SEELE runs REMOVE, then HARMONIZE: a preview cancelled while REMOVE's graph replays must not go on to
    HARMONIZE (EditSession's contract). Before the fix a replay never called the callback: every stage ran."""
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights)
    pipe.loops.use_graphs = True
    for name in ("inpaint_unet", "harmonizer_unet"):
        monkeypatch.setattr(pipe.engines[name], "supports_cuda_graph", True)
    graphs = []

    def capture(loop):
        loop.graph = ReplayingGraph(loop)
        graphs.append(loop.graph)

    monkeypatch.setattr(DenoiseLoop, "capture", capture)
    mask = np.pad(np.ones((80, 80), bool), ((100, 120), (150, 221)))
    calls = []

    def cancel_at_first_check(step):
        calls.append(step)
        raise Cancelled("cancelled by its owner")

    with pytest.raises(Cancelled):
        pipe(photo, mask=mask, move=(5, 0), steps=2, resolution=64, step_callback=cancel_at_first_check)
    assert calls == [0]
    assert [(g.loop.key.stage, g.replays) for g in graphs] == [("inpaint", 1)]  # REMOVE only, no HARMONIZE


class FakeStream:
    def __init__(self, name: str):
        self.name = name

    def wait_stream(self, other):
        """Ordering only: nothing to record for these tests."""


class FakeGraph:
    def replay(self):
        """The fake captured no kernels; these tests check capture, not replay."""


class FakeCuda:
    """The torch.cuda calls of DenoiseLoop.capture, recorded; `allocate` is what one UNet call allocates."""

    def __init__(self):
        self.default_capture_stream = FakeStream("torch.cuda.graph's process-wide default capture stream")
        self.main = self.current = FakeStream("main")
        self.cached = self.pools = 0  # bytes the allocator caches / graph pools hold
        self.capturing = self.most_at_once = 0
        self.capture_streams = []
        self.overlapped = threading.Event()

    def current_stream(self, device=None):
        return self.current

    def Stream(self, device=None):  # noqa: N802 (torch's name)
        return FakeStream("side")

    @contextmanager
    def stream(self, s):
        previous, self.current = self.current, s
        try:
            yield
        finally:
            self.current = previous

    def synchronize(self, device=None):
        """Nothing is queued on a fake."""

    def empty_cache(self):
        self.cached = 0

    def memory_reserved(self, device=None):
        return self.cached + self.pools

    def CUDAGraph(self):  # noqa: N802 (torch's name)
        return FakeGraph()

    @contextmanager
    def graph(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        """As torch.cuda.graph: synchronize, empty the cache, capture on `stream` (default: one per process)."""
        self.synchronize()
        self.empty_cache()
        self.capture_streams.append(stream or self.default_capture_stream)
        self.capturing += 1
        self.most_at_once = max(self.most_at_once, self.capturing)
        if self.capturing > 1:
            self.overlapped.set()
        self.overlapped.wait(0.5)  # give a second, unserialised capture the time to begin inside this one
        try:
            with self.stream(stream or self.default_capture_stream):
                yield
        finally:
            self.capturing -= 1

    def allocate(self, nbytes: int):
        """Activations: inside a capture they stay in the graph's pool, outside they end up cached."""
        if self.capturing:
            self.pools += nbytes
        else:
            self.cached += nbytes


class AllocatingUNet(ToyUNet):
    supports_cuda_graph = True

    def __init__(self, fake: FakeCuda, nbytes: int = 1000):
        super().__init__()
        self.fake, self.nbytes = fake, nbytes

    def __call__(self, **inputs):
        self.fake.allocate(self.nbytes)
        return super().__call__(**inputs)


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(scheduler, "cuda", fake)
    return fake


def test_graph_bytes_are_the_graph_pool_so_the_budget_bounds_pools(fake_cuda):
    """Measured after the warm-up, the cache torch.cuda.graph empties made graph_bytes ~0 (issue 21 item 4)."""
    unet, steps = AllocatingUNet(fake_cuda, 1000), 4
    loop = DenoiseLoop(_key(steps), unet, CONFIG, "cpu", use_graph=True)
    loop.capture()
    assert loop.graph is not None and loop.graph_bytes == steps * 1000 == fake_cuda.pools
    # a budget with room for two loops' buffers and one graph pool keeps one captured loop, not two
    buffers = DenoiseLoop(_key(steps), unet, CONFIG, "cpu", use_graph=False).nbytes
    cache = LoopCache(CONFIG, "cpu", use_graphs=True, budget_bytes=2 * buffers + steps * 1000)
    inputs = torch.randn(1, 4, 8, 8), {"encoder_hidden_states": torch.randn(1, 6, 3)}
    first = cache.get(_key(steps), unet)
    first.run(*inputs)
    second = cache.get(replace(_key(steps), stage="other"), unet)
    second.run(*inputs)
    assert first.graph is not None and second.graph is not None
    assert cache.loops == [second] and cache.cache.bytes <= cache.cache.budget_bytes


def test_a_graph_larger_than_the_budget_is_dropped_and_its_loop_runs_eagerly(fake_cuda):
    """Not stored, such a loop would be captured again for every request of its shape."""
    unet, steps = AllocatingUNet(fake_cuda, 1000), 4
    buffers = DenoiseLoop(_key(steps), unet, CONFIG, "cpu", use_graph=False).nbytes
    cache = LoopCache(CONFIG, "cpu", use_graphs=True, budget_bytes=buffers + steps * 1000 - 1)
    inputs = torch.randn(1, 4, 8, 8), {"encoder_hidden_states": torch.randn(1, 6, 3)}
    loop = cache.get(_key(steps), unet)
    with pytest.warns(RuntimeWarning, match="more than the 0 MiB budget; that loop runs eagerly"):
        first = loop.run(*inputs)
    assert loop.graph is None and not loop.use_graph and cache.loops == [loop] and cache.cache.bytes == buffers
    calls = unet.calls
    assert torch.equal(cache.get(_key(steps), unet).run(*inputs), first)  # eager, not captured again
    assert unet.calls == calls + steps and len(fake_cuda.capture_streams) == 1
    eager = DenoiseLoop(_key(steps), ToyUNet(), CONFIG, "cpu", use_graph=False).run(*inputs)
    assert torch.equal(first, eager)


def test_captures_are_serialised_each_on_its_own_stream(fake_cuda):
    """Two pipelines capturing at once (issue 21 item 3): one capture at a time, neither on the shared stream."""
    loops = [DenoiseLoop(_key(2), AllocatingUNet(fake_cuda), CONFIG, "cpu", use_graph=True) for _ in range(2)]
    errors = []

    def capture(loop):
        try:
            loop.capture()
        except Exception as e:  # noqa: BLE001 (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=capture, args=(loop,)) for loop in loops]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and all(loop.graph is not None for loop in loops)
    assert fake_cuda.most_at_once == 1
    streams = fake_cuda.capture_streams
    assert len(streams) == 2 and streams[0] is not streams[1]
    assert fake_cuda.default_capture_stream not in streams


class CachedAttentionUNet(torch.nn.Module):
    """A 'UNet' whose cross-attention caches its K/V (models/attention.py), run by torch.compile
    (`backend` counts the graphs dynamo compiles) behind the engine interface."""

    supports_cuda_graph, compiled, lora, device = True, True, None, torch.device("cpu")

    def __init__(self, fake: FakeCuda, backend):
        from diffusers.models.attention_processor import Attention

        from editrt.models.attention import cache_cross_attention_kv

        super().__init__()
        torch.manual_seed(0)
        self.fake, self.attn = fake, Attention(query_dim=4, cross_attention_dim=3, heads=2, dim_head=2)
        assert cache_cross_attention_kv(self) == 1
        self.forward_compiled = torch.compile(self.forward, backend=backend)

    def forward(self, sample, timestep, encoder_hidden_states):
        tokens = sample[:, :4].flatten(2).transpose(1, 2)  # (B, h*w, 4)
        out = self.attn(tokens, encoder_hidden_states=encoder_hidden_states)
        return out.transpose(1, 2).reshape(sample[:, :4].shape) + timestep[:, None, None, None] / 1000

    def prepare(self):
        """Fixed weights."""

    def before_capture(self):
        from editrt.models.attention import clear_kv_caches

        clear_kv_caches(self)

    def __call__(self, **inputs):
        self.fake.allocate(1)
        return {"noise_pred": self.forward_compiled(**inputs)}


def test_capture_compiles_nothing_the_warm_up_did_not(fake_cuda, monkeypatch):
    """compile=True under graphs (issue 21 item 2): before_capture() clears the K/V caches torch.compile guards
    on; a warm-up from filled caches left the capture to compile (on CUDA inductor autotunes there, which a
    capture may not). A real torch.compile (backend counting graphs) around a fake capture."""
    phase, compiles = ["warm-up"], []

    def counting_backend(gm, example_inputs):
        compiles.append(phase[0])
        return gm.forward

    unet = CachedAttentionUNet(fake_cuda, counting_backend)
    real_graph = fake_cuda.graph

    @contextmanager
    def graph(*args, **kwargs):
        phase[0] = "capture"
        with real_graph(*args, **kwargs):
            yield
        phase[0] = "after"

    monkeypatch.setattr(fake_cuda, "graph", graph)
    key = LoopKey("t", (1, 4, 2, 2), None, (("encoder_hidden_states", (2, 5, 3)),), 3, True, torch.float32)
    loop = DenoiseLoop(key, unet, CONFIG, "cpu", use_graph=False)
    inputs = torch.randn(1, 4, 2, 2), {"encoder_hidden_states": torch.randn(2, 5, 3)}
    loop.run(*inputs, guidance=3.0)  # an eager request first: the caches hold this prompt's K/V
    loop.use_graph = True
    loop.run(*inputs, guidance=3.0)  # warm-up + capture
    assert loop.graph is not None and "warm-up" in compiles
    assert "capture" not in compiles, compiles


# ---------------------------------------------------------------------- the same on a GPU
def _inpaint_case():
    image = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:40, 12:44] = True
    return image, mask


@pytest.mark.gpu
def test_cuda_graph_bytes_count_the_graph_pool(tiny_weights):
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights, device="cuda", cuda_graphs=True)
    image, mask = _inpaint_case()
    pipe.inpaint(image, mask, steps=3, guidance=3.0, resolution=64)
    captured = [loop for loop in pipe.loops.loops if loop.graph is not None]
    assert captured and all(loop.graph_bytes > 0 for loop in captured)
    assert pipe.loops.cache.bytes == sum(loop.nbytes for loop in pipe.loops.loops) <= pipe.loops.cache.budget_bytes


@pytest.mark.gpu
def test_two_pipelines_capture_at_once_and_equal_serial_runs(tiny_weights):
    """`editrt serve` holds two pipelines, each with its own work queue: their first requests capture at once."""
    from editrt.runtime.reposition import RepositionPipeline

    image, mask = _inpaint_case()
    pipes = [RepositionPipeline.from_pretrained(tiny_weights, device="cuda", cuda_graphs=True) for _ in range(2)]
    results, errors = [None, None], []

    def run(i):
        try:
            results[i] = np.asarray(pipes[i].inpaint(image, mask, steps=3, guidance=3.0, resolution=64, seed=i))
        except Exception as e:  # noqa: BLE001 (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    serial = RepositionPipeline.from_pretrained(tiny_weights, device="cuda", cuda_graphs=True)
    for i in range(2):  # the serial pipeline replays the graph it captured first for the second seed
        np.testing.assert_array_equal(results[i], np.asarray(serial.inpaint(image, mask, steps=3, guidance=3.0,
                                                                             resolution=64, seed=i)))
