"""Running the suite: collect the cases, time each (case, backend) pair, and assemble the result rows.

The result document (what `--json` writes, schema "editrt-bench/1"; bench/results/README.md has
the same table)::

    {"schema": "editrt-bench/1", "created": ISO-8601 UTC, "command": the command line,
     "device", "config", "dtype", "quick", "steps", "versions": {...},
     "notes": [why some rows are absent], "rows": [row, ...]}

One row per (component, backend); every setting is a column, so a row stands alone:

| field | type | meaning |
| --- | --- | --- |
| name | str | "component/backend": what `baseline` refers to |
| component | str | e.g. "unet-inpaint-b1", "sam-segment-1pt", "inpaint-pass", "elements-render-e2e" |
| backend | str | torch-eager, torch+kernels, torch+cudagraph, onnxruntime, tensorrt (ours) or a peer: diffusers, segment-anything, sdpa, reference |
| peer | bool | the row times another library, not editrt |
| about | str | what one timed run is |
| device | str | GPU name (torch.cuda.get_device_name) or CPU model and thread count |
| dtype | str | the precision that ran: fp32, fp16, bf16 (a peer's own, recorded as is) |
| shape | str | input shapes |
| config | str | weights config: tiny, full, or the config named by the weights directory ("custom" if none) |
| quick | bool | run with --quick |
| steps | int or null | denoising steps, for whole passes |
| p50_ms, p90_ms | float or null | median and 90th percentile of the timed runs, ms (null when skipped) |
| repeats, warmup | int or null | timed runs and untimed warm-up runs |
| peak_mb | float or null | peak memory over the timed runs, MiB; see `memory` |
| memory | str or null | "cuda max allocated" (all tensors on the GPU, weights included), "process peak RSS" (whole process, reset per row), or "process lifetime peak RSS" |
| flops, tflop_s | int / float or null | FLOPs per run (PyTorch's FlopCounterMode, or the kernel's count) and FLOPs / p50 |
| bytes, gb_s | int / float or null | bytes moved per run, for memory-bound rows, and bytes / p50 |
| baseline | str or null | name of the row this one is compared to; null for a baseline row |
| ratio | float or null | baseline p50 / this p50 (> 1: this row is faster); null for baselines and unmeasured pairs |
| skipped | str or null | why there is no measurement: a missing backend ("tensorrt not installed") or "failed: ..." |
| versions | dict | python, editrt, git, torch, cuda (torch's build), diffusers, segment_anything, triton, onnxruntime, tensorrt (null: absent) |

Times are rounded to 4 significant digits and ratios are computed from the rounded times.
"""
from __future__ import annotations

import gc
import math
import platform
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from editrt.bench.cases import BACKENDS, BenchContext, Case, Run, Selection, Skip, dtype_name, matches
from editrt.bench.elements_cases import elements_cases
from editrt.bench.kernel_rows import kernel_cases
from editrt.bench.reposition_cases import reposition_cases
from editrt.bench.runtime_cases import runtime_cases
from editrt.bench.timing import measure
from editrt.errors import InputError

SCHEMA = "editrt-bench/1"

# Each area adds its cases here (engine backends and new components add theirs as they land).
CASE_PROVIDERS: list[Callable[[BenchContext], list[Case]]] = [reposition_cases, elements_cases, runtime_cases,
                                                              kernel_cases]

ROW_FIELDS = {  # field -> allowed types (the schema, checked by the tests)
    "name": (str,), "component": (str,), "backend": (str,), "peer": (bool,), "about": (str,),
    "device": (str,), "dtype": (str,), "shape": (str,), "config": (str,), "quick": (bool,),
    "steps": (int, type(None)), "p50_ms": (float, type(None)), "p90_ms": (float, type(None)),
    "repeats": (int, type(None)), "warmup": (int, type(None)), "peak_mb": (float, type(None)),
    "memory": (str, type(None)), "flops": (int, type(None)), "tflop_s": (float, type(None)),
    "bytes": (int, type(None)), "gb_s": (float, type(None)), "baseline": (str, type(None)),
    "ratio": (float, type(None)), "skipped": (str, type(None)), "versions": (dict,),
}
VERSION_KEYS = ("python", "editrt", "git", "torch", "cuda", "diffusers", "segment_anything", "triton",
                "onnxruntime", "tensorrt")


@dataclass
class Settings:
    weights: Path
    device: torch.device
    dtype: torch.dtype
    config: str
    quick: bool = False
    steps: int = 20
    only: list[str] = field(default_factory=list)
    repeats: int | None = None  # None: sized from the warm-up (see timing.measure)
    warmup: int | None = None  # None: the device's default

    def warmup_runs(self, heavy: bool) -> int:
        if self.warmup is not None:
            return self.warmup
        if heavy:  # a whole pass already repeats its networks many times
            return 1 if self.quick or self.device.type != "cuda" else 2
        if self.device.type == "cuda":  # handles, autotuning and allocator growth settle slower there
            return 3 if self.quick else 10
        return 1 if self.quick else 3

    def repeat_policy(self, heavy: bool) -> dict:
        """measure()'s repeat arguments: a fixed count, or a time budget with bounds."""
        if self.repeats is not None:
            return dict(repeats=self.repeats)
        if self.quick:
            return dict(budget_s=2.0, min_repeats=3 if heavy else 5, max_repeats=100)
        return dict(budget_s=5.0, min_repeats=5 if heavy else 10, max_repeats=500)


# ---------------------------------------------------------------------- environment facts
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:  # not Linux: platform.processor()'s answer stands
        return f"{model} ({torch.get_num_threads()} threads)"
    return f"{model} ({torch.get_num_threads()} threads)"


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import editrt

    def of(*dists):
        for dist in dists:
            try:
                return version(dist)
            except PackageNotFoundError:
                continue
        return None

    return {
        "python": platform.python_version(), "editrt": editrt.__version__, "git": _git_commit(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": of("diffusers"),
        "segment_anything": of("segment-anything", "segment_anything"), "triton": of("triton"),
        "onnxruntime": of("onnxruntime", "onnxruntime-gpu"), "tensorrt": of("tensorrt"),
    }


def _significant(x: float | None, digits: int = 4) -> float | None:
    if x is None or x == 0 or not math.isfinite(x):
        return x
    return float(round(x, digits - 1 - math.floor(math.log10(abs(x)))))


# ---------------------------------------------------------------------- the run
def collect_cases(ctx: BenchContext) -> list[Case]:
    cases = [case for provider in CASE_PROVIDERS for case in provider(ctx)]
    unmatched = [p for p in ctx.selection.patterns if not any(matches(c.component, p) for c in cases)]
    if unmatched:
        known = ", ".join(c.component for c in cases)
        why = "".join(f"; {note}" for note in ctx.notes)
        raise InputError(f"--only {','.join(unmatched)}: matches no component; known: {known}{why}")
    return [c for c in cases if ctx.selection.wants(c.component)]


def _row(case: Case, backend: str, settings: Settings, device: str, run: Run | None = None, timing=None,
         skipped: str | None = None) -> dict:
    p50 = _significant(timing.p50_ms) if timing else None
    flops = run.flops if run and run.flops else None
    nbytes = run.bytes if run and run.bytes else None
    return {
        "name": f"{case.component}/{backend}", "component": case.component, "backend": backend,
        "peer": BACKENDS[backend].peer, "about": case.about, "device": device,
        "dtype": run.dtype if run else dtype_name(settings.dtype), "shape": case.shape,
        "config": settings.config, "quick": settings.quick, "steps": case.steps,
        "p50_ms": p50, "p90_ms": _significant(timing.p90_ms) if timing else None,
        "repeats": timing.repeats if timing else None, "warmup": timing.warmup if timing else None,
        "peak_mb": round(timing.peak_mb, 1) if timing and timing.peak_mb is not None else None,
        "memory": timing.memory if timing else None,
        "flops": int(flops) if flops and p50 else None,
        "tflop_s": _significant(flops / (p50 * 1e-3) / 1e12) if flops and p50 else None,
        "bytes": int(nbytes) if nbytes and p50 else None,
        "gb_s": _significant(nbytes / (p50 * 1e-3) / 1e9) if nbytes and p50 else None,
        "baseline": None if backend == case.baseline else f"{case.component}/{case.baseline}",
        "ratio": None, "skipped": skipped, "versions": {},
    }


def _time_one(case: Case, backend: str, settings: Settings, ctx: BenchContext):
    """(run, timing) for one row; raises whatever the builder or the run raises."""
    builder = case.runners[backend]
    with torch.no_grad():
        run = builder()
        try:
            if run.check is not None:  # an untimed run that proves the output is real (the last input:
                run.check(run.call(run.inputs[-1]))  # the timed loop starts at the first, so no cache hit)
            timing = measure(run.call, run.inputs, ctx.device, settings.warmup_runs(case.heavy),
                             **settings.repeat_policy(case.heavy))
        finally:
            if run.close is not None:
                run.close()
    return run, timing


def _fill_ratios(rows: list[dict]) -> None:
    by_name = {row["name"]: row for row in rows}
    for row in rows:
        base = by_name.get(row["baseline"]) if row["baseline"] else None
        if base and base["p50_ms"] and row["p50_ms"]:
            row["ratio"] = _significant(base["p50_ms"] / row["p50_ms"])


def run_suite(settings: Settings, progress: bool = True, log: Callable[[str], None] = lambda what: None) -> dict:
    """Time every selected case on every backend it declares; returns the result document."""
    ctx = BenchContext(settings.weights, settings.device, settings.dtype, settings.config, settings.quick,
                       settings.steps, Selection(list(settings.only)), log)
    cases = collect_cases(ctx)
    device = device_name(settings.device)
    plan = [(case, backend) for case in cases for backend in case.backends()]
    rows = []
    bar = tqdm(plan, desc="editrt bench", unit="row", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for case, backend in bar:
        bar.set_postfix_str(f"{case.component}/{backend}")
        reason = BACKENDS[backend].unavailable(settings.device)
        if reason is None and case.runners[backend] is None:
            reason = f"no {backend} runner for this component yet"
        if reason is not None:
            rows.append(_row(case, backend, settings, device, skipped=reason))
            continue
        try:
            run, timing = _time_one(case, backend, settings, ctx)
            rows.append(_row(case, backend, settings, device, run, timing))
        except Skip as e:
            rows.append(_row(case, backend, settings, device, skipped=str(e)))
        except Exception as e:  # one broken row must not lose the others; it is reported as failed
            first = (str(e).strip().splitlines() or [""])[0]
            rows.append(_row(case, backend, settings, device, skipped=f"failed: {type(e).__name__}: {first}"))
            log(f"{case.component}/{backend} failed:\n{traceback.format_exc()}")
        finally:
            gc.collect()
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    _fill_ratios(rows)
    env = versions()
    for row in rows:
        row["versions"] = env
    return {
        "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": "",
        "device": device, "config": settings.config, "dtype": dtype_name(settings.dtype), "quick": settings.quick,
        "steps": settings.steps, "versions": env, "notes": ctx.notes, "rows": rows,
    }
