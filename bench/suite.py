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
| backend | str | ours: torch-eager, torch+kvcache, torch+cudagraph, torch+kernels, torch+compile, onnxruntime, tensorrt; peers: diffusers, diffusers+compile, segment-anything, segment-anything+compile, sdpa, reference (bench/cases.py BACKENDS says what each runs) |
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
| skipped | str or null | why there is no measurement: a missing backend ("tensorrt not installed"), a row that would repeat its baseline ("no editrt kernel launched ..."), or "failed: ..." |
| cuda_graph | bool | a CUDA graph was replayed during the timed runs (every torch.cuda.CUDAGraph.replay is counted); false when skipped |
| compiled | bool | a torch.compile'd part of the row (engines' `compiled`, peers' modules) was called in its timed runs and inductor-compiled graphs ran there (counted per row, not process-wide); false when skipped |
| kernels | list of str | editrt kernels that launched in the timed runs (editrt.kernels.launches; a replayed graph's: those recorded when it was captured, whichever row captured it); [] when none or skipped |
| observed | dict or null | the work of one timed run, counted while it ran (bench/work.py): `networks` {name: calls} (our engines by spec name; a peer's modules under the same names), `denoising_steps`, `caches` {name: {hits, misses}} (e.g. "sam embeddings"), `compiled_graph_calls`; averages over the timed runs; null when skipped |
| work_differs | str or null | why this row's networks or steps legitimately differ from its baseline's (declared by the case); null: they are equal, or the row fails |
| versions | dict | python, editrt, git, torch, cuda (torch's build), diffusers, segment_anything, triton, onnxruntime, tensorrt (null: absent) |

Times are rounded to 4 significant digits and ratios are computed from the rounded times.

No row claims work that did not run (`check_claims`): torch-eager, torch+kvcache and torch+cudagraph
rows run with editrt's kernels switched off and fail if one launched; torch-eager and torch+kvcache
rows fail if a CUDA graph was replayed, torch+cudagraph rows if none was; `*+compile` rows fail unless
compiled, every other row if compiled. A torch+kernels row where no editrt kernel launched (a CPU:
the references run) is skipped with the reason instead of reporting a ratio of two equal things.
Every row does the same work as its baseline (`check_work`): a row whose networks or denoising steps per
run differ from its baseline row's fails, unless its case declares why (`work_differs`).
"""
from __future__ import annotations

import gc
import math
import os
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

from editrt.bench import work
from editrt.bench.cases import (
    BACKENDS,
    NO_GRAPH_BACKENDS,
    PLAIN_BACKENDS,
    BenchContext,
    Case,
    Run,
    Selection,
    Skip,
    dtype_name,
    matches,
)
from editrt.bench.elements_cases import elements_cases
from editrt.bench.kernel_rows import kernel_cases
from editrt.bench.less_work_cases import less_work_cases
from editrt.bench.observe import Observed, compiled_parts, row_environment, watch
from editrt.bench.preview_cases import preview_cases
from editrt.bench.reposition_cases import reposition_cases
from editrt.bench.runtime_cases import runtime_cases
from editrt.bench.seele_cases import seele_cases
from editrt.bench.timing import measure
from editrt.bench.train_cases import train_cases
from editrt.errors import InputError

SCHEMA = "editrt-bench/1"

# Each area adds its cases here (engine backends and new components add theirs as they land).
CASE_PROVIDERS: list[Callable[[BenchContext], list[Case]]] = [reposition_cases, elements_cases, runtime_cases,
                                                              kernel_cases, seele_cases, train_cases,
                                                              less_work_cases, preview_cases]
try:  # the partition clean-up rows (scipy vs the native ops), written beside the native library
    from editrt.bench.cleanup_cases import cleanup_cases
except ModuleNotFoundError as e:  # not there yet: the other rows run without them
    if e.name != "editrt.bench.cleanup_cases":
        raise
else:
    CASE_PROVIDERS.append(cleanup_cases)

ROW_FIELDS = {  # field -> allowed types (the schema, checked by the tests)
    "name": (str,), "component": (str,), "backend": (str,), "peer": (bool,), "about": (str,),
    "device": (str,), "dtype": (str,), "shape": (str,), "config": (str,), "quick": (bool,),
    "steps": (int, type(None)), "p50_ms": (float, type(None)), "p90_ms": (float, type(None)),
    "repeats": (int, type(None)), "warmup": (int, type(None)), "peak_mb": (float, type(None)),
    "memory": (str, type(None)), "flops": (int, type(None)), "tflop_s": (float, type(None)),
    "bytes": (int, type(None)), "gb_s": (float, type(None)), "baseline": (str, type(None)),
    "ratio": (float, type(None)), "skipped": (str, type(None)), "cuda_graph": (bool,), "compiled": (bool,),
    "kernels": (list,), "observed": (dict, type(None)), "work_differs": (str, type(None)), "versions": (dict,),
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


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform: no note
        return None


def shared_cpu_note(device: torch.device, load: list[float | None]) -> str | None:
    """A note when other processes competed for the CPU during the run (its times are then inflated)."""
    cores = os.cpu_count() or 1
    seen = [x for x in load if x is not None]
    if device.type == "cuda" or not seen or max(seen) <= cores:
        return None
    return (f"the CPU was shared: 1-minute load average {' / '.join(f'{x:.1f}' for x in seen)} (start / end) on "
            f"{cores} cores, so CPU times are inflated by other processes")


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
         skipped: str | None = None, ran: Ran | None = None) -> dict:
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
        "ratio": None, "skipped": skipped,
        "cuda_graph": bool(ran and ran.cuda_graph), "compiled": bool(ran and ran.compiled),
        "kernels": list(ran.kernels) if ran else [], "observed": ran.observed if ran else None,
        "work_differs": case.work_differs.get(backend), "versions": {},
    }


@dataclass
class Ran:
    """What a measured row really ran (bench/observe.py): the row's `cuda_graph`, `compiled`, `kernels`."""

    cuda_graph: bool  # a CUDA graph was replayed during the timed runs
    compiled: bool  # a torch.compile'd part was called in the timed runs, and compiled graphs ran there
    kernels: list[str]  # editrt kernels launched by the timed runs (a replayed graph's: those it captured)
    observed: dict = field(default_factory=dict)  # the work of one timed run (bench/work.py summary)
    compiled_unused: list[str] = field(default_factory=list)  # compiled parts named but not run compiled


class ClaimError(RuntimeError):
    """A row's observations contradict what its backend stands for: reported as a failed row."""


def no_kernel_reason(device: torch.device) -> str:
    if device.type == "cuda":
        return "no editrt kernel launched in this row; it would repeat its baseline"
    return ("no editrt kernel launched: on a CPU the Triton kernels' PyTorch references run (and native ops "
            "only where built), so this row would repeat its baseline")


def check_claims(backend: str, ran: Ran) -> None:
    """Fail a row whose backend claims work that did not run, or that ran work its backend excludes."""
    problems = []
    if backend in NO_GRAPH_BACKENDS and ran.cuda_graph:
        problems.append("replayed a CUDA graph")
    if backend == "torch+cudagraph" and not ran.cuda_graph:
        problems.append("replayed no CUDA graph")
    if backend in PLAIN_BACKENDS and ran.kernels:
        problems.append(f"launched editrt kernels {ran.kernels}")
    if backend.endswith("+compile") != ran.compiled:
        if ran.compiled:
            problems.append("ran torch.compile'd modules")
        elif ran.compiled_unused:
            problems.append(f"claims torch.compile'd {ran.compiled_unused} but no compiled graph of them ran in its "
                            "timed runs")
        else:
            problems.append("ran no torch.compile'd module")
    if problems:
        raise ClaimError(f"{backend} row {' and '.join(problems)}")


def _part_keys(parts: list) -> dict[tuple, object]:
    """The work key under which each part's calls are counted: an engine's by its spec name (counted by
    bench/work.py's engine wrapper), an nn.Module's by a forward hook the suite adds."""
    return {work.network(part.spec.name) if hasattr(part, "spec") else ("part", i): part for i, part in enumerate(parts)}


def _compiled(parts: dict[tuple, object], seen) -> tuple[bool, list[str]]:
    """(whether a compiled part ran compiled graphs in the timed runs, the compiled parts that did not)."""
    compiled = {key: names for key, part in parts.items() if (names := compiled_parts([part]))}
    graphs_ran = seen[work.COMPILED] > 0
    used = [key for key in compiled if seen[key] > 0 and graphs_ran]
    unused = sorted({name for key, names in compiled.items() if key not in used for name in names})
    return bool(used), unused


def _time_one(case: Case, backend: str, settings: Settings, ctx: BenchContext) -> tuple[Run, object, Ran]:
    """(run, timing, what ran) for one row; raises Skip, ClaimError, or whatever the builder or the run raises."""
    builder = case.runners[backend]
    plain = backend in PLAIN_BACKENDS
    # observing from the builder on: a CUDA graph the builder captures (a session's first edit) is recorded
    with torch.no_grad(), row_environment(plain, ctx.device), work.observing():
        run = builder()
        parts = _part_keys(run.parts)
        counted = {**{key: p for key, p in parts.items() if isinstance(p, torch.nn.Module)},
                   **{work.network(name): module for name, module in run.networks.items()}}
        try:
            with work.hooked(counted):
                # An untimed first run: proves the output is real (the last input: the timed loop starts at
                # the first, so no cache hit), captures CUDA graphs, and shows which kernels launch.
                with watch() as first:
                    out = run.call(run.inputs[-1])
                if run.check is not None:
                    run.check(out)
                del out
                if backend == "torch+kernels" and not first.kernels:
                    raise Skip(no_kernel_reason(ctx.device))
                timed = Observed()
                timing = measure(run.call, run.inputs, ctx.device, settings.warmup_runs(case.heavy),
                                 around_timed=lambda: watch(timed), **settings.repeat_policy(case.heavy))
        finally:
            if run.close is not None:
                run.close()
    compiled, unused = _compiled(parts, timed.work)
    ran = Ran(cuda_graph=timed.graph_replays > 0, compiled=compiled, kernels=sorted(timed.kernels),
              observed=work.summary(timed.work, timing.repeats), compiled_unused=unused)
    check_claims(backend, ran)
    return run, timing, ran


def check_work(rows: list[dict]) -> None:
    """Fail every measured row whose networks or denoising steps per run differ from its baseline row's, unless
    it declares why (`work_differs`); and a row that declares a difference its observations do not show."""
    by_name = {row["name"]: row for row in rows}
    for row in rows:
        base = by_name.get(row["baseline"]) if row["baseline"] else None
        if base is None or row["observed"] is None or base["observed"] is None:
            continue
        same = work.same_work(row["observed"], base["observed"])
        if same == (row["work_differs"] is None):
            continue
        if same:
            why = f"declares different work ({row['work_differs']}) but did the same work as {base['name']}"
        else:
            def shown(observed):
                return f"networks {observed['networks']}, {observed['denoising_steps']} steps"
            why = f"did other work than {base['name']}: {shown(row['observed'])} per run vs {shown(base['observed'])}"
        _fail(row, f"failed: WorkMismatch: {why}")


def _fail(row: dict, reason: str) -> None:
    """Turn a measured row into a failed one: no figure is reported for it."""
    for name in ("p50_ms", "p90_ms", "repeats", "warmup", "peak_mb", "memory", "flops", "tflop_s", "bytes", "gb_s",
                 "ratio", "observed"):
        row[name] = None
    row["skipped"] = reason
    row["cuda_graph"] = row["compiled"] = False
    row["kernels"] = []


def _fill_ratios(rows: list[dict]) -> None:
    by_name = {row["name"]: row for row in rows}
    for row in rows:
        base = by_name.get(row["baseline"]) if row["baseline"] else None
        if base and base["p50_ms"] and row["p50_ms"]:
            row["ratio"] = _significant(base["p50_ms"] / row["p50_ms"])


def run_suite(settings: Settings, progress: bool = True, log: Callable[[str], None] = lambda what: None,
              on_row: Callable[[dict], None] | None = None) -> dict:
    """Time every selected case on every backend it declares; returns the result document.

    `on_row` gets each row as soon as it is finished (its ratio against a baseline measured before it, the
    versions filled in), so a run killed half-way has handed out the rows it finished (`editrt bench --stream`).
    """
    ctx = BenchContext(settings.weights, settings.device, settings.dtype, settings.config, settings.quick,
                       settings.steps, Selection(list(settings.only)), log)
    cases = collect_cases(ctx)
    load = [_load_average()]
    device = device_name(settings.device)
    plan = [(case, backend) for case in cases for backend in case.backends()]
    rows = []
    env = versions()

    def finished(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            _fill_ratios(rows)
            on_row(dict(row, versions=env))
    bar = tqdm(plan, desc="editrt bench", unit="row", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for case, backend in bar:
        bar.set_postfix_str(f"{case.component}/{backend}")
        reason = BACKENDS[backend].unavailable(settings.device, settings.quick)
        if reason is None and case.runners[backend] is None:
            reason = f"no {backend} runner for this component yet"
        if reason is not None:
            finished(_row(case, backend, settings, device, skipped=reason))
            continue
        try:
            run, timing, ran = _time_one(case, backend, settings, ctx)
            row = _row(case, backend, settings, device, run, timing, ran=ran)
        except Skip as e:
            row = _row(case, backend, settings, device, skipped=str(e))
        except Exception as e:  # one broken row must not lose the others; it is reported as failed
            first = (str(e).strip().splitlines() or [""])[0]
            row = _row(case, backend, settings, device, skipped=f"failed: {type(e).__name__}: {first}")
            log(f"{case.component}/{backend} failed:\n{traceback.format_exc()}")
        finally:
            gc.collect()
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()
        finished(row)  # outside the try: a stream that cannot be written stops the run, it is not a failed row
    bar.close()
    load.append(_load_average())
    note = shared_cpu_note(settings.device, load)
    if note:
        ctx.notes.append(note)
    check_work(rows)
    _fill_ratios(rows)
    for row in rows:
        row["versions"] = env
    return {
        "schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": "",
        "device": device, "config": settings.config, "dtype": dtype_name(settings.dtype), "quick": settings.quick,
        "steps": settings.steps, "versions": env, "notes": ctx.notes, "rows": rows,
    }
