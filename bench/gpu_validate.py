"""The stages behind bench/gpu_validate.sh (its header has the command to run on a lent GPU).

    python bench/gpu_validate.py OUTDIR [--device cuda|cpu] [--budget-s 540] [--plan-only] [--stages NAME,...]

Standard library only: it runs before anything says whether torch or editrt import, and starts every
stage as a child process in its own process group, with the time the budget has left (at most the
stage's own cap), stopped with SIGTERM then SIGKILL when that runs out. OUTDIR/summary.json is rewritten
atomically when a stage starts and when it ends, so a run killed from outside (the end of a lease) leaves
every finished stage's status, seconds and files, and names the one that was running; the test and bench
stages stream their results (one JSON line per test or row) as they go.

Stage statuses: ok; failed; missing (it ran, but something it needs is absent: named in `missing`, never
counted as ok); timeout (stopped at its limit; what it finished is kept); skipped (not run: `why`);
stopped (SIGTERM / SIGINT while it ran); planned (--plan-only); running (the summary is written when a stage
starts: a run killed with SIGKILL shows the stage it was in).
Exit status: 0 when no stage failed, 1 when one did, 2 bad usage, 143 terminated (SIGTERM / SIGINT).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # run as a file: bench/'s modules (report.py, timing.py, ...) must not shadow top-level names

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "editrt-gpu-validate/1"
DEFAULT_BUDGET_S = 540
RESERVE_S = 8  # kept back from the budget: a stopped stage's grace period and the last summary
KILL_GRACE_S = 4  # SIGTERM to a stage's process group, SIGKILL this much later
TEST_TIMEOUT_S = {"cuda": 90, "cpu": 60}  # pytest-timeout's per-test limit

# Distributions the environment stage reports (dist name -> what needs it).
DISTS = ("torch", "triton", "diffusers", "transformers", "segment-anything", "safetensors", "onnx", "onnxruntime",
         "onnxruntime-gpu", "tensorrt", "ray", "pytest", "pytest-timeout", "cupy-cuda12x", "importlib-metadata")
NEEDED = {  # what is missing when absent: name -> (devices it is needed on, what it gates)
    "pytest": (("cpu", "cuda"), "the test stage"),
    "pytest-timeout": (("cpu", "cuda"), "a per-test time limit (without it only the stage's limit stops a hung test)"),
    "diffusers": (("cpu", "cuda"), "the inpainting pipelines and their diffusers peer rows"),
    "segment-anything": (("cpu", "cuda"), "the SamPredictor peer rows and oracle tests"),
    "transformers": (("cpu", "cuda"), "depth, matting and their transformers peer rows"),
    "ray": (("cpu", "cuda"), "the Ray Serve tests (under CI=true they error instead of skipping)"),
    "triton": (("cuda",), "editrt's Triton kernels"),
    "tensorrt": (("cuda",), "the TensorRT tests and rows"),
    "onnxruntime-gpu": (("cuda",), "ONNX Runtime on CUDA (CUDAExecutionProvider): the onnxruntime rows and tests"),
    "nvcc": (("cuda",), "the native CUDA clean-up op (the build falls back to CPU only)"),
    "cmake": (("cpu", "cuda"), "the native op build"),
}
# A bench row skipped for one of these reasons lacks a package (or provider) NEEDED on the device.
MISSING_ROW = re.compile(r"([\w-]+) not installed|(no CUDAExecutionProvider)")
MODULE_DIST = {"segment_anything": "segment-anything", "no CUDAExecutionProvider": "onnxruntime-gpu"}
GPU_MARK = re.compile(r"\bmark\.gpu\b")  # the test files that can hold `gpu` tests (pytest -m gpu selects in them)

# Bench rows. The inductor knobs make the compile rows' max-autotune mode benchmark no GEMM / convolution
# template on a cold cache (ATen's kernels are the only choice), so a full-size compile takes a minute, not
# ten; the last stage reruns the UNet rows without them, only if the budget still has the time.
NO_TEMPLATE_AUTOTUNE = {"TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS": "ATEN",
                        "TORCHINDUCTOR_MAX_AUTOTUNE_CONV_BACKENDS": "ATEN"}
SMOKE_ROWS = {  # tiny weights, every CUDA-only mechanism once: graphs, Triton kernels, the native op, SAM
    "cuda": "loop-inpaint-cfg2,session-preview,dual-attention-out-proj,slic-assign,partition-cleanup,sam-mask-decoder-1pt",
    "cpu": "dual-attention-out-proj,partition-cleanup",
}
FULL_GROUPS = {  # priority order: the figures the project waits for first; each group one `editrt bench` call
    "cuda": [
        ("unet", "unet-inpaint-b1,unet-inpaint-cfg2"),
        ("kernels", "dual-attention-out-proj,slic-assign,partition-cleanup"),
        ("sam", "sam-image-encoder,sam-segment-1pt"),
        ("inpaint-pass", "inpaint-pass"),
        ("reposition", "reposition-e2e,session-next-edit,session-preview"),
        ("elements", "elements-unet-cfg2,elements-render-e2e,elements-partition"),
        ("seele", "depth-estimator,matting"),
        ("rest", "unet-harmonizer-b1,unet-harmonizer-cfg2,lora-switch,vae-encode,vae-decode,sam-mask-decoder-1pt,"
                 "sam-mask-decoder-grid256,elements-unet-b1,content-encoder-256,loop-inpaint-cfg2,"
                 "loop-elements-cfg2,session-first-edit,partition-with-cleanup"),
    ],
    # a CPU checks the script, not latency: tiny weights, --quick, two small groups appending to one stream
    "cpu": [("kernels", "slic-assign"), ("sam", "sam-mask-decoder-1pt")],
}
MAX_AUTOTUNE_ROWS = "unet-inpaint-b1"
CPU_ROW_ARGS = ["--config", "tiny", "--quick", "--repeats", "3", "--warmup", "1"]


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    about: str  # one line: what it checks
    argv: list[str]
    log: str  # its stdout and stderr, under OUTDIR
    cap_s: float  # the most it may take (the budget left may give it less)
    read: str = "exit"  # how its result is read: environment | exit | native | pytest | bench
    min_s: float = 0.0  # not started with less than this left: it could not finish anything
    env: dict[str, str] = field(default_factory=dict)  # added to the environment
    cwd: Path | None = None  # default OUTDIR
    outputs: list[str] = field(default_factory=list)  # files it writes under OUTDIR
    needs: tuple[str, ...] = ("editrt",)  # facts of the environment stage it requires
    background: bool = False  # started, then joined by the first stage whose needs name it
    skip: str | None = None  # why it does not run in this plan


def gpu_test_files(tests: Path) -> list[str]:
    """The test files that mention the `gpu` marker: collecting only these spares importing every other test
    module (half a minute on a loaded 2-core CPU) and their unrelated collection errors (chromium, ...)."""
    return [str(f) for f in sorted(tests.rglob("test_*.py")) if GPU_MARK.search(f.read_text(errors="replace"))]


def plan(out: Path, device: str, python: str) -> list[Stage]:
    """Every stage, in order, with its command: the same list runs, or is only written (--plan-only)."""
    me = str(Path(__file__).resolve())
    cuda = device == "cuda"
    cli = [python, "-m", "editrt.cli"]
    stages = [
        Stage("environment", "versions, GPU, packages and tools as the stages will see them",
              [python, me, "--probe-environment", str(out / "env.json")], "env.log", 60, read="environment",
              outputs=["env.json"], needs=()),
        Stage("doctor", "`editrt doctor`: what the runtime sees (GPU, kernels' dispatch, providers, native ops)",
              [*cli, "doctor", "--json", str(out / "doctor.json")], "doctor.log", 90, outputs=["doctor.json"]),
        Stage("weights", f"random {'full' if cuda else 'tiny'} weights in the user cache (once), written while "
              "the next stages run", [python, "-c", "import sys; from editrt.weights import resolve_weights; "
              "print(resolve_weights(sys.argv[1], log=print))", "full" if cuda else "tiny"], "weights.log",
              400, background=True),
        Stage("native-build", "the native clean-up op (CUDA and CPU), built where this editrt is imported from",
              [python, "setup.py", "build_native"], "native-build.log", 240, read="native", cwd=REPO,
              env={} if cuda else {"EDITRT_CUDA": "0"}, outputs=["native.json"], needs=("editrt", "checkout")),
        Stage("pytest-gpu", "`pytest -m gpu` under CI=true, a time limit per test, each result streamed",
              [python, "-m", "pytest", *gpu_test_files(REPO / "tests"), "-c", str(REPO / "pytest.ini"), "--rootdir", str(REPO),
               "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "--continue-on-collection-errors",
               "-p", "editrt.bench.pytest_stream", "--stream-jsonl", str(out / "pytest-gpu.jsonl"),
               "--junitxml", str(out / "pytest-gpu.xml"), "--timeout", str(TEST_TIMEOUT_S[device])],
              "pytest-gpu.log", 150 if cuda else 120, read="pytest", min_s=30, env={"CI": "true"},
              outputs=["pytest-gpu.jsonl", "pytest-gpu.xml"], needs=("editrt", "pytest")),
    ]
    bench = [*cli, "bench", "--device", device, "--quiet"]
    stages.append(Stage(
        "bench-tiny", "tiny weights first: every CUDA mechanism once, before full-size weights cost time",
        [*bench, "--config", "tiny", "--quick", "--repeats", "5" if cuda else "3", "--warmup", "2" if cuda else "1",
         "--only", SMOKE_ROWS[device], "--stream", str(out / "bench-tiny.jsonl"), "--json", str(out / "bench-tiny.json")],
        "bench-tiny.log", 120, read="bench", min_s=20, env=dict(NO_TEMPLATE_AUTOTUNE),
        outputs=["bench-tiny.jsonl", "bench-tiny.json"], needs=("editrt",) if cuda else ("editrt", "weights")))
    rows = ["--config", "full"] if cuda else CPU_ROW_ARGS
    for group, only in FULL_GROUPS[device]:
        stages.append(Stage(
            f"bench-{group}", f"{'full-size' if cuda else 'tiny (CPU)'} rows: {only}",
            [*bench, *rows, "--only", only, "--stream", str(out / "bench-full.jsonl"),
             "--json", str(out / f"bench-{group}.json")],
            f"bench-{group}.log", 400, read="bench", min_s=60 if cuda else 15, env=dict(NO_TEMPLATE_AUTOTUNE),
            outputs=["bench-full.jsonl", f"bench-{group}.json"], needs=("editrt", "weights")))
    stages.append(Stage(
        "bench-max-autotune", f"{MAX_AUTOTUNE_ROWS} with inductor's max-autotune templates benchmarked (cold cache: "
        "minutes), only if the budget has them left",
        [*bench, *rows, "--only", MAX_AUTOTUNE_ROWS, "--stream", str(out / "bench-max-autotune.jsonl"),
         "--json", str(out / "bench-max-autotune.json")],
        "bench-max-autotune.log", 400, read="bench", min_s=180, outputs=["bench-max-autotune.jsonl"],
        needs=("editrt", "weights"),
        skip=None if cuda else "max-autotune benchmarks GPU templates; a CPU run with --quick runs no compile row"))
    for stage in stages:
        if cuda and stage.name not in ("environment", "doctor", "native-build"):
            stage.needs = (*stage.needs, "cuda")  # on a machine without CUDA: skipped, not run on the CPU
    return stages


# --------------------------------------------------------------------------------------------
# Probes (run by the stages' own interpreter, with the stages' environment)
# --------------------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def probe_environment(path: Path) -> int:
    facts: dict = {"python": sys.version.split()[0], "executable": sys.executable,
                   "pythonpath": os.environ.get("PYTHONPATH", ""), "packages": {},
                   "tools": {t: shutil.which(t) for t in ("nvcc", "cmake", "ninja", "nvidia-smi", "git")}}
    for dist in DISTS:
        try:
            facts["packages"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            facts["packages"][dist] = None
    facts["importable"] = {m: importlib.util.find_spec(m) is not None for m in ("pytest", "pytest_timeout")}
    try:
        import torch

        facts["torch"] = {"version": torch.__version__, "cuda_build": torch.version.cuda,
                          "cuda_available": torch.cuda.is_available(), "gpus": []}
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            props = torch.cuda.get_device_properties(i)
            facts["torch"]["gpus"].append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                                           "memory_gib": round(props.total_memory / 2**30, 1)})
    except Exception as e:  # reported, and every stage that needs torch is skipped with this reason
        facts["torch"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        import onnxruntime

        facts["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception as e:  # absent or broken: the onnxruntime rows say so themselves
        facts["onnxruntime_providers"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        import editrt

        where = Path(editrt.__file__).resolve()
        facts["editrt"] = {"version": editrt.__version__, "file": str(where), "from_checkout": REPO in where.parents}
    except Exception as e:
        facts["editrt"] = {"error": f"{type(e).__name__}: {e}"}
    if facts["tools"]["nvidia-smi"]:
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
            facts["nvidia_smi"] = smi.stdout + smi.stderr
        except (OSError, subprocess.SubprocessError) as e:
            facts["nvidia_smi"] = f"{type(e).__name__}: {e}"
    write_json_atomic(path, facts)
    return 0


def probe_native(path: Path) -> int:
    import editrt.kernels.cleanup as cleanup

    write_json_atomic(path, dict(cleanup.native_status()))
    return 0


# --------------------------------------------------------------------------------------------
# Reading a stage's results
# --------------------------------------------------------------------------------------------
def read_jsonl(path: Path, skip_lines: int = 0) -> list[dict]:
    """The whole lines of a streamed file (a line cut by a kill is left out)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines()[skip_lines:]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def missing_for(facts: dict, device: str) -> dict[str, str]:
    """What this machine lacks for the stages on `device`: name -> what it gates."""
    have = {dist: version is not None for dist, version in facts.get("packages", {}).items()}
    have["pytest"] = have.get("pytest") and facts.get("importable", {}).get("pytest", False)
    have["pytest-timeout"] = facts.get("importable", {}).get("pytest_timeout", False)
    providers = facts.get("onnxruntime_providers")
    have["onnxruntime-gpu"] = isinstance(providers, list) and "CUDAExecutionProvider" in providers
    for tool in ("nvcc", "cmake"):
        have[tool] = bool(facts.get("tools", {}).get(tool))
    return {name: why for name, (devices, why) in NEEDED.items() if device in devices and not have.get(name)}


def read_pytest(records: list[dict]) -> dict:
    tests = [r for r in records if r.get("event") == "test"]
    counts: dict[str, int] = {}
    for r in tests:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    broken = [r for r in records if r.get("event") == "collect"] + [r for r in tests if r["outcome"] in ("failed", "error")]
    missing = sorted({r["missing"] for r in broken + tests if r.get("missing")})
    failed = [f"{r['nodeid']}: {r['message']}" for r in broken if not r.get("missing")]
    timeouts = [r["nodeid"] for r in broken if "Timeout" in (r.get("message") or "")]
    skipped: dict[str, int] = {}
    for r in tests:
        if r["outcome"] == "skipped" and not r.get("missing"):
            skipped[r["message"]] = skipped.get(r["message"], 0) + 1
    started = {r["nodeid"] for r in records if r.get("event") == "start"}
    running = sorted(started - {r["nodeid"] for r in tests})
    return {"counts": counts, "collection_errors": sum(r.get("event") == "collect" for r in records),
            "failed": failed, "timeouts": timeouts, "missing": missing, "skipped": skipped,
            "unfinished": running, "ended": any(r.get("event") == "end" for r in records)}


def row_missing(reason: str | None, device: str) -> str | None:
    """The package a skipped row lacks, where that package is NEEDED on `device` (TensorRT is not, on a CPU)."""
    found = MISSING_ROW.search(reason or "")
    if found is None or (reason or "").startswith("failed:"):
        return None
    name = MODULE_DIST.get(found.group(1) or found.group(2), found.group(1) or found.group(2))
    return name if device in NEEDED.get(name, ((),))[0] else None


def read_bench(rows: list[dict], device: str) -> dict:
    measured = [r["name"] for r in rows if r.get("skipped") is None]
    failed = [f"{r['name']}: {r['skipped']}" for r in rows if (r.get("skipped") or "").startswith("failed:")]
    missing = sorted({r["skipped"] for r in rows if row_missing(r.get("skipped"), device)})
    skipped: dict[str, list[str]] = {}
    for r in rows:
        reason = r.get("skipped")
        if reason and not reason.startswith("failed:") and reason not in missing:
            skipped.setdefault(reason, []).append(r["name"])
    return {"rows": len(rows), "measured": measured, "failed": failed, "missing": missing, "skipped": skipped}


# --------------------------------------------------------------------------------------------
# Running the plan
# --------------------------------------------------------------------------------------------
class Terminated(Exception):
    """SIGTERM / SIGINT: stop the running stage, write the summary, exit 143."""


def _terminate(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (Linux /proc). Stages stay in this script's process group, so whoever
    kills that group (a lease ending, the kill test) kills the stages too; this script stops one stage by its tree."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            continue


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM to a stage's process tree, SIGKILL to what is left of it after the grace period."""
    tree = process_tree(proc.pid)
    signal_all(tree, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):  # whatever still runs after the grace gets SIGKILL
        proc.wait(timeout=KILL_GRACE_S)
    signal_all(sorted(set(tree) | set(process_tree(proc.pid) if proc.poll() is None else [])), signal.SIGKILL)
    proc.wait()


class Validation:
    def __init__(self, out: Path, device: str, budget_s: float, python: str, plan_only: bool, argv: list[str],
                 chosen: list[str] | None = None):
        self.out, self.device, self.budget_s, self.python, self.plan_only = out, device, budget_s, python, plan_only
        self.stages = plan(out, device, python)
        for stage in self.stages:
            if chosen is not None and stage.name not in chosen and stage.skip is None:
                stage.skip = "not asked for (--stages)"
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s - RESERVE_S
        self.facts: dict = {}
        self.missing: dict[str, str] = {}
        self.background: dict[str, tuple[subprocess.Popen, float, float]] = {}  # name -> (process, start, limit)
        self.ended: dict[str, float] = {}  # background stage -> when its process exited (monotonic)
        self.running: tuple[str, subprocess.Popen] | None = None  # the foreground stage
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.command = shlex.join(["bench/gpu_validate.sh", *argv])
        self.records = {s.name: self._record(s) for s in self.stages}

    # ------------------------------------------------------------------ the summary
    def _record(self, stage: Stage) -> dict:
        status = "skipped" if stage.skip else "planned"
        return {"name": stage.name, "about": stage.about, "status": status, "seconds": 0.0, "limit_s": None,
                "command": shlex.join(stage.argv), "cwd": str(stage.cwd or self.out), "env": stage.env,
                "log": stage.log, "outputs": stage.outputs, "background": stage.background, "why": stage.skip,
                "missing": [], "detail": {}}

    def log(self, line: str) -> None:
        stamp = f"{time.monotonic() - self.t0:6.1f}s"
        print(f"gpu_validate [{stamp}] {line}", file=sys.stderr, flush=True)
        with open(self.out / "validate.log", "a") as f:
            f.write(f"[{stamp}] {line}\n")

    def verdict(self) -> str:
        statuses = [r["status"] for r in self.records.values()]
        if "running" in statuses:
            return "running"
        if "failed" in statuses:
            return "failed"
        if any(s in ("missing", "timeout", "stopped") for s in statuses) or any(
                r["status"] == "skipped" and not self.by_design(r["name"]) for r in self.records.values()):
            return "incomplete"
        return "planned" if self.plan_only else "ok"

    def by_design(self, name: str) -> bool:
        return next(s for s in self.stages if s.name == name).skip is not None

    def write_summary(self) -> None:
        write_json_atomic(self.out / "summary.json", {
            "schema": SCHEMA, "command": self.command, "device": self.device, "budget_s": self.budget_s,
            "plan_only": self.plan_only, "repo": str(REPO), "outdir": str(self.out), "started": self.started,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.monotonic() - self.t0, 1), "verdict": self.verdict(),
            "missing": self.missing, "stages": list(self.records.values())})

    # ------------------------------------------------------------------ one stage
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def unmet(self, stage: Stage) -> str | None:
        """Why a stage cannot run here (a need the environment stage did not find), or None."""
        for need in stage.needs:
            if need == "editrt" and "error" in self.facts.get("editrt", {"error": "the environment stage did not run"}):
                return f"editrt is not importable: {self.facts.get('editrt', {}).get('error', 'no environment facts')}"
            if need == "checkout" and not self.facts["editrt"].get("from_checkout"):
                return (f"editrt is imported from {self.facts['editrt']['file']}, not from {REPO}: the native op "
                        "is built by `pip install --no-deps --no-build-isolation -e .` in the checkout it comes from")
            if need == "pytest" and "pytest" in self.missing:
                return "pytest is not installed"
            if need == "cuda" and not self.facts.get("torch", {}).get("cuda_available"):
                return "CUDA is not available to torch here (the environment stage says why); --device cpu checks the script"
            if need == "weights":  # not asked for (--stages): `editrt bench` writes them itself if needed
                weights = self.records["weights"]
                if weights["status"] not in ("ok", "running") and not self.by_design("weights"):
                    return f"the weights stage did not write them ({weights['status']}: {weights['why']})"
        return None

    def start(self, stage: Stage, limit: float) -> subprocess.Popen:
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg", **stage.env)
        if stage.read == "pytest" and "pytest-timeout" in self.missing:  # pytest would refuse the option
            stage.argv = stage.argv[:stage.argv.index("--timeout")]
        record = self.records[stage.name]
        record.update(status="running", limit_s=round(limit), command=shlex.join(stage.argv),
                      started_s=round(time.monotonic() - self.t0, 1))  # into the run: a killed run shows how long it ran
        self.log(f"{stage.name}: {record['command']} (limit {limit:.0f} s, log {stage.log})")
        # SIGTERM / SIGINT wait until the process is registered (as running, or as a background stage), so stop_all
        # finds every process this script started
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            with open(self.out / stage.log, "ab") as log:
                proc = subprocess.Popen(stage.argv, cwd=stage.cwd or self.out, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if stage.background:
                self.background[stage.name] = (proc, time.monotonic(), limit)
            else:
                self.running = (stage.name, proc)
            return proc
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})

    def wait(self, name: str, proc: subprocess.Popen, limit: float) -> tuple[int | None, bool]:
        """(exit code, stopped at its limit)."""
        self.running = (name, proc)  # a background stage being joined is the foreground one now
        try:
            rc, stopped = proc.wait(timeout=max(limit, 0.0)), False
        except subprocess.TimeoutExpired:
            stop_tree(proc)
            rc, stopped = proc.returncode, True
        self.running = None  # not in a `finally`: on SIGTERM stop_all still needs it
        return rc, stopped

    def run_stage(self, stage: Stage) -> None:
        record = self.records[stage.name]
        if stage.skip:
            return
        if self.plan_only:
            record["limit_s"] = round(min(stage.cap_s, self.budget_s - RESERVE_S))
            return
        why = self.unmet(stage)
        if why is None and self.left() < max(stage.min_s, 1.0):
            why = (f"{max(self.left(), 0):.0f} s of the {self.budget_s:.0f} s budget left; this stage needs at least "
                   f"{stage.min_s:.0f} s")
        if why is not None:
            record.update(status="skipped", why=why)
            self.log(f"{stage.name}: skipped ({why})")
            self.write_summary()
            return
        self.join_background(stage)
        if stage.needs and (why := self.unmet(stage)):  # a background stage it waited for did not make it
            record.update(status="skipped", why=why)
            self.write_summary()
            return
        limit = min(stage.cap_s, self.left() - KILL_GRACE_S)
        begin = time.monotonic()
        proc = self.start(stage, limit)
        if stage.background:
            # its seconds end when it exits, not when a later stage gets round to joining it
            threading.Thread(target=self.note_end, args=(stage.name, proc), daemon=True).start()
            self.write_summary()
            return
        self.write_summary()
        rc, stopped = self.wait(stage.name, proc, limit)
        self.finish(stage, rc, stopped, begin)

    def note_end(self, name: str, proc: subprocess.Popen) -> None:
        proc.wait()
        self.ended[name] = time.monotonic()

    def join_background(self, stage: Stage | None) -> None:
        """Wait for the background stages `stage` needs (None: the run is over: collect the finished ones, stop
        the others)."""
        for name in [n for n in self.background if stage is None or n in stage.needs]:
            proc, begin, limit = self.background.pop(name)
            waited = 0.0 if stage is None else min(limit - (time.monotonic() - begin), self.left() - KILL_GRACE_S)
            if stage is not None:
                self.log(f"{stage.name}: waiting for {name} (at most {max(waited, 0):.0f} s)")
            rc, stopped = self.wait(name, proc, waited)
            self.finish(next(s for s in self.stages if s.name == name), rc, stopped, begin, self.ended.get(name))

    def finish(self, stage: Stage, rc: int | None, stopped: bool, begin: float, end: float | None = None) -> None:
        """Read a stage's results; its seconds run from `begin` to `end` (default: now, its results read)."""
        record = self.records[stage.name]
        record["exit_code"] = rc
        status, why, missing, detail = getattr(self, f"read_{stage.read}")(stage, None if stopped else rc)
        seconds = (end or time.monotonic()) - begin
        record["seconds"] = round(seconds, 1)
        if stopped and status != "failed":
            status = "timeout"
            why = f"stopped at its limit of {record['limit_s']} s (the budget left); what it finished is kept" + (
                f"; {why}" if why else "")
        record.update(status=status, why=why, missing=missing, detail=detail)
        self.log(f"{stage.name}: {status} in {seconds:.1f} s" + (f" ({why})" if why else ""))
        self.write_summary()

    # ------------------------------------------------------------------ readers: (status, why, missing, detail)
    def read_exit(self, stage: Stage, rc: int | None):
        if rc in (0, None):
            return "ok", None, [], {}
        return "failed", f"exit code {rc}: see {stage.log}", [], {}

    def read_environment(self, stage: Stage, rc: int | None):
        try:
            self.facts = json.loads((self.out / "env.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            return "failed", f"no environment facts ({type(e).__name__}; exit code {rc}, see {stage.log})", [], {}
        self.missing = missing_for(self.facts, self.device)
        problems = [f"editrt: {self.facts['editrt']['error']}"] if "error" in self.facts["editrt"] else []
        if "error" in self.facts["torch"]:
            problems.append(f"torch: {self.facts['torch']['error']}")
        elif self.device == "cuda" and not self.facts["torch"]["cuda_available"]:
            problems.append(f"CUDA is not available (torch {self.facts['torch']['version']}, built for CUDA "
                            f"{self.facts['torch']['cuda_build']})")
        missing = [f"{name}: {why}" for name, why in self.missing.items()]
        torch = self.facts["torch"]
        detail = {"python": self.facts["python"], "torch": torch.get("version"), "cuda_build": torch.get("cuda_build"),
                  "cuda_available": torch.get("cuda_available"), "gpus": torch.get("gpus"),
                  "editrt": self.facts["editrt"].get("file"), "onnxruntime_providers": self.facts["onnxruntime_providers"]}
        if problems:
            return "failed", "; ".join(problems), missing, detail
        return ("missing" if missing else "ok"), None, missing, detail

    def read_native(self, stage: Stage, rc: int | None):
        probe = [self.python, str(Path(__file__).resolve()), "--probe-native", str(self.out / "native.json")]
        try:
            done = subprocess.run(probe, cwd=self.out, capture_output=True, text=True, timeout=max(min(60, self.left()), 5),
                                  env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
            status = json.loads((self.out / "native.json").read_text()) if done.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
            status = None
        if status is None:
            return "failed", f"the native op's status could not be read (exit code {rc}; see {stage.log})", [], {}
        log = (self.out / stage.log).read_text(errors="replace")
        reason = next((line.split("native ops not built: ", 1)[1] for line in log.splitlines()
                       if "native ops not built: " in line), None)
        want = "cuda" if self.device == "cuda" else "cpu"
        if rc == 0 and status.get(want):
            return "ok", None, [], status
        if self.device == "cuda" and status.get("cpu") and "nvcc" in self.missing:
            return "missing", "built for the CPU only: no nvcc (CUDA toolkit) on this machine", ["nvcc"], status
        if reason and "cmake not found" in reason:
            return "missing", "cmake not found", ["cmake"], status
        return "failed", f"not loaded for {want}: {reason or status.get('error')} (exit code {rc}; see {stage.log})", [], status

    def read_pytest(self, stage: Stage, rc: int | None):
        detail = read_pytest(read_jsonl(self.out / "pytest-gpu.jsonl"))
        detail["per_test_timeout_s"] = TEST_TIMEOUT_S[self.device] if "--timeout" in stage.argv else None
        if detail["per_test_timeout_s"] is None:
            detail["per_test_timeout_why"] = "pytest-timeout is not installed: only the stage's limit stops a hung test"
        if detail["failed"] or rc not in (0, 1, 5, None):
            return "failed", f"{len(detail['failed'])} failed or errored (exit code {rc}; see {stage.log})", \
                detail["missing"], detail
        if detail["missing"]:
            return "missing", "tests could not run: a dependency is absent", detail["missing"], detail
        return "ok", None, [], detail

    def read_bench(self, stage: Stage, rc: int | None):
        stream = self.out / next(o for o in stage.outputs if o.endswith(".jsonl"))
        seen = self.records[stage.name].setdefault("detail", {}).get("stream_lines_before", 0)
        detail = read_bench(read_jsonl(stream, skip_lines=seen), self.device)
        detail["stream"] = stream.name
        if detail["failed"]:
            return "failed", f"{len(detail['failed'])} row(s) failed (exit code {rc}; see {stage.log})", \
                detail["missing"], detail
        if rc not in (0, None):
            return "failed", f"exit code {rc}: see {stage.log}", detail["missing"], detail
        if detail["missing"]:
            return "missing", "rows not measured: a backend is absent", detail["missing"], detail
        return "ok", None, [], detail

    # ------------------------------------------------------------------ the whole run
    def run(self) -> int:
        self.log(f"{self.command}: device {self.device}, budget {self.budget_s:.0f} s, results in {self.out}"
                 + (" (plan only)" if self.plan_only else ""))
        self.write_summary()
        try:
            for stage in self.stages:
                if stage.read == "bench":  # where this stage's rows start in a stream other stages share
                    stream = self.out / next(o for o in stage.outputs if o.endswith(".jsonl"))
                    self.records[stage.name]["detail"] = {"stream_lines_before": line_count(stream)}
                self.run_stage(stage)
            self.join_background(None)
        except Terminated as e:
            self.stop_all(f"stopped from outside ({e}) while it ran")
            self.write_summary()
            return 143
        self.write_summary()
        self.report()
        return 1 if self.verdict() == "failed" else 0

    def stop_all(self, why: str) -> None:
        """SIGTERM / SIGINT: stop the foreground and background stages; they are recorded as `stopped`."""
        for name, (proc, begin, _) in list(self.background.items()):
            if proc.poll() is not None:  # a background stage that finished: its result stands
                self.background.pop(name)
                self.finish(next(s for s in self.stages if s.name == name), proc.returncode, False, begin,
                            self.ended.get(name))
        procs = [(name, proc) for name, (proc, _, _) in self.background.items()]
        procs += [self.running] if self.running is not None else []
        for name, proc in procs:
            stop_tree(proc)
            self.records[name].update(status="stopped", why=why, exit_code=proc.returncode)
        self.background.clear()

    def report(self) -> None:
        width = max(len(name) for name in self.records)
        lines = [f"gpu_validate: {self.verdict()} in {time.monotonic() - self.t0:.0f} s of {self.budget_s:.0f} s "
                 f"({self.out / 'summary.json'})"]
        for r in self.records.values():
            lines.append(f"  {r['name']:<{width}}  {r['status']:<8} {r['seconds']:6.1f} s  {r['why'] or ''}".rstrip())
        print("\n".join(lines), file=sys.stderr)


# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_validate.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", metavar="OUTDIR", nargs="?", help="where every result goes (created; never the checkout)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (default: the GPU run) or cpu (the same stages on tiny weights, to check the script)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds the whole run may take; each stage gets what is left (default {DEFAULT_BUDGET_S})")
    p.add_argument("--plan-only", action="store_true",
                   help="write summary.json with every stage's command and limit, run nothing")
    p.add_argument("--stages", metavar="NAME,...", help="run only these stages (e.g. bench-unet,bench-sam on a second "
                   "lease); the others are recorded as skipped, not asked for")
    p.add_argument("--probe-environment", metavar="JSON", help=argparse.SUPPRESS)  # the stages' own probes
    p.add_argument("--probe-native", metavar="JSON", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.probe_environment:
        return probe_environment(Path(args.probe_environment))
    if args.probe_native:
        return probe_native(Path(args.probe_native))
    if not args.outdir:
        print("usage: bench/gpu_validate.sh OUTDIR [--device cuda|cpu] [--budget-s S] [--plan-only] [--stages NAME,...]",
              file=sys.stderr)
        return 2
    if not args.budget_s > RESERVE_S + 10:
        print(f"gpu_validate: --budget-s {args.budget_s:g}: expected more than {RESERVE_S + 10} seconds", file=sys.stderr)
        return 2
    out = Path(args.outdir).resolve()
    python = os.environ.get("PYTHON") or sys.executable
    names = [s.name for s in plan(out, args.device, python)]
    chosen = [n.strip() for n in args.stages.split(",")] if args.stages else None
    if chosen is not None and (unknown := [n for n in chosen if n not in names]):
        print(f"gpu_validate: --stages {args.stages}: no stage {', '.join(unknown)}; stages: {', '.join(names)}",
              file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"gpu_validate: OUTDIR {args.outdir}: cannot create it ({e.strerror})", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    return Validation(out, args.device, args.budget_s, python, args.plan_only, argv, chosen).run()


if __name__ == "__main__":
    sys.exit(main())
