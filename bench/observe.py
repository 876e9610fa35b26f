"""What a row really ran, observed rather than asked for: editrt kernels, CUDA graph replays, torch.compile,
and the work itself (bench/work.py: network calls, steps, cache hits and misses).

Every measured row carries these columns filled from here (bench/suite.py):

* `kernels`: the editrt kernels that launched in the timed runs (editrt.kernels.launches: each launcher
  records a launch where it really launches; a launcher that falls back to its PyTorch reference records
  nothing). A replayed CUDA graph launches from the GPU's copy, not from Python: a replay credits the
  launches recorded while that graph was captured (bench/work.py), whichever row captured it, so the
  column does not depend on the order of the rows.
* `cuda_graph`: whether a CUDA graph was replayed during the timed runs: every
  `torch.cuda.CUDAGraph.replay` is counted while a row runs (editrt's whole-loop graphs and any
  other library's, e.g. torch.compile's "reduce-overhead" CUDA graph trees, alike).
* `compiled`: whether a torch.compile'd part the row names (`compiled_parts`) was called in the timed
  runs and inductor-compiled graphs ran there (bench/work.py counts their calls): this row's, not any
  compilation earlier in the process.
* `observed`: the work of one timed run (bench/work.py `summary`).

`Observed` is filled by `watch()`: enter it around the runs to observe, read it after leaving.
"""
from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from editrt.bench import work
from editrt.kernels import launches

_replays_lock = threading.Lock()
_replays = 0  # process-wide count of CUDAGraph.replay calls while a watch is active
_watchers = 0
_original_replay = None


def _counting_replay(self, *args, **kwargs):
    global _replays
    with _replays_lock:
        _replays += 1
    work.replayed(self)  # the work and kernels captured in this graph run again
    return _original_replay(self, *args, **kwargs)


def _install() -> None:
    global _watchers, _original_replay
    with _replays_lock:
        if _watchers == 0:
            _original_replay = torch.cuda.graphs.CUDAGraph.replay
            torch.cuda.graphs.CUDAGraph.replay = _counting_replay
        _watchers += 1


def _uninstall() -> None:
    global _watchers
    with _replays_lock:
        _watchers -= 1
        if _watchers == 0:
            torch.cuda.graphs.CUDAGraph.replay = _original_replay


def replays() -> int:
    with _replays_lock:
        return _replays


@dataclass
class Observed:
    kernels: list[str] = field(default_factory=list)  # editrt kernels launched inside the block, sorted
    graph_replays: int = 0  # CUDA graph replays inside the block
    work: Counter = field(default_factory=Counter)  # bench/work.py's counts inside the block


@contextmanager
def watch(into: Observed | None = None) -> Iterator[Observed]:
    """Observe the block: which editrt kernels launched, how many CUDA graphs were replayed, and the work
    counted (filled into `into`, or a new Observed, when the block ends)."""
    seen = Observed() if into is None else into
    _install()
    before = replays()
    try:
        with work.observing(), work.tally() as counted, launches.track() as launched:
            yield seen
    finally:
        seen.graph_replays = replays() - before
        _uninstall()
    seen.kernels = launched.names
    seen.work = counted


def is_compiled(module) -> bool:
    """A module run through torch.compile: an OptimizedModule, or one compiled in place (`module.compile()`)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(module, OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None


def compiled_parts(parts: Iterable) -> list[str]:
    """Names of the torch.compile'd parts among `parts`: nn.Modules (searched with their submodules; a
    peer's torch.compile(unet)) and editrt engines (their `compiled` member, runtime/engines.py)."""
    found = []
    for part in parts:
        if isinstance(part, torch.nn.Module):
            found += [type(getattr(m, "_orig_mod", m)).__name__ for m in part.modules() if is_compiled(m)]
        elif getattr(part, "compiled", False) is True:
            found.append(part.spec.name if hasattr(part, "spec") else type(part).__name__)
    return sorted(set(found))


# ---------------------------------------------------------------------- what may launch
KERNEL_SWITCHES = {"EDITRT_DISABLE_TRITON": "1", "EDITRT_NATIVE": "0"}  # kernels/_triton_utils.py; the native ops
NO_INTERPRETER = {"TRITON_INTERPRET": "0"}  # read at call time by kernels/_triton_utils.use_triton


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """The block runs with these environment variables set; the previous values are restored after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def row_environment(plain: bool, device: torch.device):
    """What a row may launch. Plain rows (torch-eager, torch+kvcache, torch+cudagraph): editrt's Triton
    kernels and native ops switched off, their PyTorch references run. On a CPU, Triton kernels never run
    in Triton's interpreter (a test harness may have switched it on): that is no timing; native CPU ops
    still run where a row allows kernels, and are timed."""
    values = dict(KERNEL_SWITCHES) if plain else {}
    if device.type != "cuda":
        values.update(NO_INTERPRETER)
    return environment(values)
