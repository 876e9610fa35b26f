"""Test doubles that stand in front of a real engine (they count calls and may block, never compute), and
hand-made scenes whose answer is known by construction."""
import numpy as np


class CountingEngine:
    """Delegates the whole Engine protocol to `engine`; appends `name` to `calls` on each call and
    runs `before()` first (e.g. wait on an event so a test can hold a job inside its loop)."""

    def __init__(self, engine, calls: list, name: str, before=None):
        self.engine, self.calls, self.name, self.before = engine, calls, name, before
        self.spec, self.backend, self.device = engine.spec, engine.backend, engine.device
        self.supports_cuda_graph, self.compiled, self.lora = engine.supports_cuda_graph, engine.compiled, engine.lora

    def prepare(self):
        self.engine.prepare()

    def before_capture(self):
        self.engine.before_capture()

    def __call__(self, **inputs):
        self.calls.append(self.name)
        if self.before is not None:
            self.before()
        return self.engine(**inputs)


class CapturingEngine(CountingEngine):
    """Like CountingEngine, and keeps every output dict (to check what a later step clamps or rounds)."""

    def __init__(self, engine, name: str = "captured"):
        super().__init__(engine, [], name)
        self.outputs = []

    def __call__(self, **inputs):
        out = super().__call__(**inputs)
        self.outputs.append({k: v.detach().float().cpu().clone() for k, v in out.items()})
        return out


def box_mask(shape, r0, r1, c0, c1) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def occlusion_scene(shape=(80, 120), box=(30, 60, 70, 90), subject=(20, 50, 10, 40)):
    """A far wall (inverse depth 1), a near box (5) and the subject (2): depth order known by construction."""
    depth = np.ones(shape, np.float32)
    box_m, subject_m = box_mask(shape, *box), box_mask(shape, *subject)
    depth[box_m], depth[subject_m] = 5.0, 2.0
    return depth, box_m, subject_m
