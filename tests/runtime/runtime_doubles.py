"""Test doubles that stand in front of a real engine: they count calls and may block, never compute."""


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
