"""Timing one benchmark region: warm-up, repeated runs over rotating inputs, median and p90, peak memory.

The method (DESIGN.md "bench/ reports like a paper table"):

* Warm-up runs first and are never counted: module loading, allocator growth, cuDNN/cuBLAS handle
  creation and lazy caches stay out of the numbers.
* Each timed run gets the next of several pre-built inputs (round robin), so repeated runs over one
  buffer do not measure a warm hardware cache and consecutive runs never see the same input. That does
  not defeat a per-image cache that holds every input (SAM's embedding cache keeps them all after the
  warm-up): a row that claims uncached work empties such a cache inside its call, and its `observed`
  column (bench/work.py) shows the cache misses and network calls each timed run really made. Inputs
  are checked: an all-zero tensor is refused, because zeros hide unwritten outputs and can run faster
  than real data.
* CUDA: the device is synchronised before each run (the region starts from an idle GPU, as a user's
  call would), a pair of CUDA events brackets the region, and the end event is waited on. CPU:
  `time.perf_counter` around the call (CPU work is synchronous).
* Reported: the median (p50) and the 90th percentile (p90) of the per-run times. A time of 0.0 ms
  is refused: it means the timer did not see the work.
* Peak memory over the timed runs: on CUDA `torch.cuda.max_memory_allocated` (reset after the
  warm-up; everything the process holds on that GPU, weights included); on CPU the process's peak
  resident set size (Linux VmHWM, reset after the warm-up through /proc/self/clear_refs; where it
  cannot be reset, the lifetime peak `ru_maxrss`). `Timing.memory` says which one was read.
"""
from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class TimingError(RuntimeError):
    """A measurement that must not be reported (zero inputs, zero or negative times)."""


@dataclass
class Timing:
    samples_ms: list[float]
    warmup: int
    peak_mb: float | None
    memory: str | None  # what peak_mb is: "cuda max allocated", "process peak RSS", "process lifetime peak RSS"

    @property
    def repeats(self) -> int:
        return len(self.samples_ms)

    @property
    def p50_ms(self) -> float:
        return float(np.median(self.samples_ms))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 90))


# ---------------------------------------------------------------------- inputs
def _tensors(value) -> list[np.ndarray | torch.Tensor]:
    """Every array-like leaf in a (nested) input."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if hasattr(value, "__array_interface__"):  # PIL images
        return [np.asarray(value)]
    return []


def check_not_zero(inputs: list, what: str = "input") -> None:
    """Refuse inputs holding an all-zero tensor (see the module docstring)."""
    for i, value in enumerate(inputs):
        for t in _tensors(value):
            if t.size if isinstance(t, np.ndarray) else t.numel():
                nonzero = np.count_nonzero(t) if isinstance(t, np.ndarray) else int(torch.count_nonzero(t))
                if nonzero == 0:
                    raise TimingError(f"{what} {i}: an all-zero tensor of shape {list(t.shape)}; "
                                      "benchmarks never run on zeros")


# ---------------------------------------------------------------------- memory
def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:  # no /proc (not Linux): the caller falls back to the lifetime peak
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset Linux's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory over a region: `reset()` before it, `read()` after it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = True

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.resettable = _reset_rss_peak() and _read_status_kb("VmHWM") is not None

    def read(self) -> tuple[float | None, str | None]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda max allocated"
        if self.resettable:
            return _read_status_kb("VmHWM") / 1024, "process peak RSS"
        # ru_maxrss is in kilobytes on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process lifetime peak RSS"


# ---------------------------------------------------------------------- timing
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(call: Callable[[Any], Any], inputs: list, device: torch.device | str, warmup: int,
            repeats: int | None = None, budget_s: float = 1.0, min_repeats: int = 5,
            max_repeats: int = 100, around_timed: Callable[[], AbstractContextManager] | None = None) -> Timing:
    """Time `call(x)` for x rotating through `inputs`.

    `repeats=None` picks the count from the warm-up's speed so that the timed runs take about
    `budget_s` (like triton.testing.do_bench), clamped to [min_repeats, max_repeats].
    `around_timed()` (optional) is a context entered around the timed runs only, not the warm-up
    (the suite observes there what really ran: bench/observe.py).
    """
    device = torch.device(device)
    if not inputs:
        raise TimingError("no inputs to time on")
    check_not_zero(inputs)
    cuda = device.type == "cuda"
    counter = 0  # one round-robin position across warm-up and timed runs

    def next_input():
        nonlocal counter
        x = inputs[counter % len(inputs)]
        counter += 1
        return x

    # Warm-up, timed on the host clock only to size the timed loop.
    warm_ms = []
    for _ in range(max(warmup, 0 if repeats is not None else 1)):
        x = next_input()
        _synchronize(device)
        t0 = time.perf_counter()
        call(x)
        _synchronize(device)
        warm_ms.append((time.perf_counter() - t0) * 1e3)
    if repeats is None:
        estimate_ms = max(min(warm_ms), 1e-3)
        repeats = int(min(max(budget_s * 1e3 / estimate_ms, min_repeats), max_repeats))
    if repeats < 1:
        raise TimingError(f"repeats: expected at least 1, got {repeats}")

    memory = PeakMemory(device)
    memory.reset()
    samples = []
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with around_timed() if around_timed is not None else nullcontext():
        for _ in range(repeats):
            x = next_input()
            if cuda:
                torch.cuda.synchronize(device)
                start.record()
                call(x)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                call(x)
                samples.append((time.perf_counter() - t0) * 1e3)
    peak_mb, what = memory.read()

    bad = [s for s in samples if not (s > 0.0 and math.isfinite(s))]
    if bad:
        raise TimingError(f"{len(bad)} of {len(samples)} runs measured {bad[0]!r} ms: the timer did not see the work")
    return Timing(samples_ms=samples, warmup=len(warm_ms), peak_mb=peak_mb, memory=what)


def count_flops(call: Callable[[Any], Any], x) -> int | None:
    """FLOPs of one `call(x)` as PyTorch's FlopCounterMode counts them (matmuls, convolutions,
    attention); None when it cannot count. Used for the TFLOP/s column, not for timing."""
    from torch.utils.flop_counter import FlopCounterMode

    try:  # inference mode: FlopCounterMode's module hooks trip over parameters returned under no_grad
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            call(x)
        total = counter.get_total_flops()
    except Exception:  # a counter failure must not cost the measurement
        return None
    return int(total) or None
