"""bench/gpu_validate.sh for real, on the CPU: the same stages as on a GPU (`--device cpu`: tiny weights, the
gpu tests skip), a run killed from outside, a stopped one, and the CUDA plan written without a GPU (--plan-only).

The complete run takes one to two minutes on a 2-core CPU (most of it is starting Python with torch once per
stage); the killed run stops itself at its first bench row.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from editrt.bench import gpu_validate

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_validate.sh"

CPU_BUDGET_S = 240
FINAL = {"ok", "failed", "missing", "timeout", "skipped", "stopped"}
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="bash, /proc and process groups")


def start(out: Path, *args: str) -> subprocess.Popen:
    """The script in its own process group (as a lease's command), with this interpreter as its python."""
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.Popen(["bash", str(SCRIPT), str(out), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def stages(out: Path) -> dict[str, dict]:
    return {s["name"]: s for s in summary(out)["stages"]}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:  # gone meanwhile
            continue
    return found


def checkout_state() -> str:
    """What a commit would pick up: tracked changes and untracked files that git does not ignore."""
    return subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all"],
                          capture_output=True, text=True, check=True).stdout


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One complete `--device cpu --budget-s 240` run: (exit code, stderr, OUTDIR, seconds, checkout before/after)."""
    out = tmp_path_factory.mktemp("validate") / "out"
    before = checkout_state()
    begin = time.monotonic()
    proc = start(out, "--device", "cpu", "--budget-s", str(CPU_BUDGET_S))
    try:
        _, err = proc.communicate(timeout=CPU_BUDGET_S + 60)
    finally:
        stop(proc)
    return proc.returncode, err, out, time.monotonic() - begin, before, checkout_state()


def test_cpu_run_exits_0_within_its_budget_with_every_stage_recorded(cpu_run):
    rc, err, out, seconds, _, _ = cpu_run
    assert rc == 0, err
    assert seconds < CPU_BUDGET_S
    doc = summary(out)
    assert doc["verdict"] in ("ok", "incomplete") and doc["device"] == "cpu" and doc["budget_s"] == CPU_BUDGET_S
    by_name = {s["name"]: s for s in doc["stages"]}
    assert list(by_name)[:5] == ["environment", "doctor", "weights", "native-build", "pytest-gpu"]
    for stage in doc["stages"]:
        assert stage["status"] in FINAL and isinstance(stage["seconds"], float), stage
        if stage["status"] != "skipped":
            assert stage["seconds"] > 0 and stage["limit_s"] <= CPU_BUDGET_S, stage
        if stage["status"] in ("missing", "skipped"):  # a missing package is named, never counted as ok
            assert stage["missing"] or stage["why"], stage
    for name in ("environment", "doctor", "weights", "native-build", "bench-tiny", "bench-kernels", "bench-sam"):
        assert by_name[name]["status"] in ("ok", "missing"), by_name[name]
    assert by_name["bench-max-autotune"]["status"] == "skipped" and by_name["bench-max-autotune"]["why"]
    # the doctor's own JSON, the native op's status, the environment facts
    assert "torch" in json.loads((out / "doctor.json").read_text())["environment"]
    assert json.loads((out / "native.json").read_text())["cpu"] is True
    assert json.loads((out / "env.json").read_text())["editrt"]["from_checkout"] is True
    # every gpu test streamed (they skip on a CPU), the junit file written at the end
    tests = [r for r in lines(out / "pytest-gpu.jsonl") if r["event"] == "test"]
    assert tests and all(r["outcome"] == "skipped" for r in tests)
    assert by_name["pytest-gpu"]["detail"]["counts"] == {"skipped": len(tests)}
    assert (out / "pytest-gpu.xml").read_text().count("<testcase") == len(tests)


def test_streamed_rows_are_the_rows_of_the_result_documents(cpu_run):
    """`editrt bench --stream`: every row of the --json document, appended; groups append to one file."""
    out = cpu_run[2]
    tiny_doc = json.loads((out / "bench-tiny.json").read_text())
    streamed = lines(out / "bench-tiny.jsonl")
    assert [r["name"] for r in streamed] == [r["name"] for r in tiny_doc["rows"]]
    for row, final in zip(streamed, tiny_doc["rows"]):
        assert {k: row[k] for k in ("p50_ms", "p90_ms", "ratio", "skipped", "versions")} == \
               {k: final[k] for k in ("p50_ms", "p90_ms", "ratio", "skipped", "versions")}
    assert any(r["ratio"] is not None for r in streamed)  # native-cpu vs scipy: the baseline streamed first
    groups = [json.loads((out / f"bench-{g}.json").read_text()) for g in ("kernels", "sam")]
    assert [r["name"] for r in lines(out / "bench-full.jsonl")] == [r["name"] for g in groups for r in g["rows"]]


def test_cpu_run_writes_nothing_a_commit_would_pick_up(cpu_run):
    _, _, out, _, before, after = cpu_run
    assert after == before
    assert REPO not in out.parents


def test_a_run_killed_from_outside_keeps_the_finished_stages(tmp_path):
    """SIGKILL to the run's process group (as when a lease ends) once its first bench row is streamed: the stages
    finished so far are in summary.json with their files, the bench row survives, no stage process is left.
    (--stages spares this run the native build and the test stage the complete run above checks.)"""
    out = tmp_path / "killed"
    proc = start(out, "--device", "cpu", "--budget-s", str(CPU_BUDGET_S), "--stages", "environment,doctor,bench-tiny")
    try:
        stream = out / "bench-tiny.jsonl"
        while proc.poll() is None and not (stream.is_file() and stream.read_text().endswith("\n")):
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        stop(proc)
    by_name = stages(out)
    for name in ("environment", "doctor"):
        assert by_name[name]["status"] in ("ok", "missing") and by_name[name]["seconds"] > 0, by_name[name]
    assert by_name["bench-tiny"]["status"] == "running"
    assert by_name["native-build"]["status"] == by_name["bench-kernels"]["status"] == "skipped"
    assert "torch" in json.loads((out / "doctor.json").read_text())["environment"]
    rows = lines(stream)
    assert rows and rows[0]["name"] == "dual-attention-out-proj/sdpa" and rows[0]["p50_ms"] > 0
    assert not (out / "bench-tiny.json").exists()  # the document comes at the end: the row came from the stream
    assert processes_mentioning(str(out)) == []


def test_sigterm_stops_the_running_stage_and_records_it(tmp_path):
    out = tmp_path / "terminated"
    proc = start(out, "--device", "cpu", "--budget-s", str(CPU_BUDGET_S))
    try:
        while proc.poll() is None and not (out / "summary.json").is_file():
            time.sleep(0.05)
        while proc.poll() is None and stages(out)["environment"]["status"] != "running":
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 143, err
    doc = summary(out)
    assert doc["verdict"] == "incomplete"
    assert doc["stages"][0]["status"] == "stopped" and "SIGTERM" in doc["stages"][0]["why"]
    assert processes_mentioning(str(out)) == []


# --------------------------------------------------------------------------------------------
def test_the_cuda_plan_asks_for_the_full_size_rows(tmp_path, tiny_weights):
    """--plan-only: the commands a GPU run would execute, from the same plan, without a GPU."""
    import torch

    from editrt.bench.cases import BenchContext, Selection
    from editrt.bench.suite import collect_cases

    out = tmp_path / "plan"
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--plan-only"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert done.returncode == 0, done.stderr
    doc = summary(out)
    assert doc["device"] == "cuda" and doc["budget_s"] == 540 and doc["verdict"] == "planned"
    plan = {s["name"]: s for s in doc["stages"]}
    assert list(plan)[:2] == ["environment", "doctor"]
    assert all(s["limit_s"] <= 540 for s in plan.values())
    assert not any("--save" in s["command"] for s in plan.values())

    pytest_cmd = plan["pytest-gpu"]["command"].split()
    assert plan["pytest-gpu"]["env"]["CI"] == "true"
    assert " -m gpu " in plan["pytest-gpu"]["command"] and "--timeout" in pytest_cmd
    assert "editrt.bench.pytest_stream" in pytest_cmd and "--junitxml" in pytest_cmd

    bench = [s for s in plan.values() if s["name"].startswith("bench-")]
    assert bench[0]["name"] == "bench-tiny" and "--config tiny" in bench[0]["command"]
    full, max_autotune = bench[1:-1], bench[-1]
    assert max_autotune["name"] == "bench-max-autotune" and max_autotune["env"] == {}
    only: list[str] = []
    for stage in full + [max_autotune]:
        cmd = stage["command"].split()
        assert "--device cuda" in stage["command"] and "--config full" in stage["command"], stage["command"]
        assert "--quick" not in cmd and "--stream" in cmd, stage["command"]
        only += cmd[cmd.index("--only") + 1].split(",")
    for stage in full:  # no max-autotune template benchmarking on a cold cache, except in the last stage
        assert stage["env"] == gpu_validate.NO_TEMPLATE_AUTOTUNE
    for figure in ("unet-inpaint-b1", "unet-inpaint-cfg2", "sam-image-encoder", "inpaint-pass", "reposition-e2e",
                   "elements-render-e2e", "dual-attention-out-proj", "slic-assign", "partition-cleanup"):
        assert figure in only
    # every component the plan names exists (a renamed one would cost a lease a failed group)
    ctx = BenchContext(tiny_weights, torch.device("cpu"), torch.float32, "tiny", True, 20, Selection([]), print)
    known = {case.component for case in collect_cases(ctx)}
    smoke = bench[0]["command"].split()
    assert set(only) | set(smoke[smoke.index("--only") + 1].split(",")) <= known


def test_usage(tmp_path):
    for args, says in (([], "usage: bench/gpu_validate.sh OUTDIR"),
                       ([str(tmp_path / "o"), "--budget-s", "5"], "--budget-s 5: expected more than"),
                       ([str(tmp_path / "o"), "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
                       ([str(tmp_path / "o"), "--stages", "doctor,bench-everything"], "no stage bench-everything")):
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and says in done.stderr, (args, done.stderr)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
STREAM_TESTS = '''
import threading
import pytest

def test_passes():
    pass

def test_fails():
    assert 1 + 1 == 3, "arithmetic"

def test_lacks_a_package():
    import no_such_package_xyz  # noqa: F401

def test_skips_for_a_package():
    pytest.importorskip("no_such_package_abc")

def test_skips_for_a_reason():
    pytest.skip("needs CUDA")

def test_hangs():
    threading.Event().wait()
'''


def test_the_stream_plugin_records_each_outcome_and_what_is_missing(tmp_path):
    (tmp_path / "test_sample.py").write_text(STREAM_TESTS)
    (tmp_path / "test_broken.py").write_text("import no_such_module_at_import  # noqa: F401\n")
    (tmp_path / "test_our_bug.py").write_text("import editrt.no_such_module  # noqa: F401\n")
    stream = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "pytest", str(tmp_path), "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
           "-c", os.devnull, "--continue-on-collection-errors", "-p", "editrt.bench.pytest_stream",
           "--stream-jsonl", str(stream)]
    timeout = importlib.util.find_spec("pytest_timeout") is not None
    if timeout:
        cmd += ["--timeout", "3"]
    else:
        cmd += ["-k", "not hangs"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    records = lines(stream)
    tests = {r["nodeid"].split("::")[1]: r for r in records if r["event"] == "test"}
    assert tests["test_passes"]["outcome"] == "passed"
    assert tests["test_fails"]["outcome"] == "failed" and tests["test_fails"]["missing"] is None
    assert "arithmetic" in tests["test_fails"]["message"]
    assert tests["test_lacks_a_package"]["missing"] == "no_such_package_xyz"
    assert tests["test_skips_for_a_package"]["outcome"] == "skipped"
    assert tests["test_skips_for_a_package"]["missing"] == "no_such_package_abc"
    assert tests["test_skips_for_a_reason"]["missing"] is None
    collect = {Path(r["nodeid"]).name: r for r in records if r["event"] == "collect"}
    assert collect["test_broken.py"]["missing"] == "no_such_module_at_import"
    assert collect["test_our_bug.py"]["missing"] is None  # an editrt module that does not import is a bug
    assert records[-1] == {"event": "end", "exitstatus": done.returncode}

    read = gpu_validate.read_pytest(records)
    assert read["missing"] == ["no_such_module_at_import", "no_such_package_abc", "no_such_package_xyz"]
    assert sorted(f.split("::")[-1].split(":")[0] for f in read["failed"]) == \
           sorted(["test_fails", "test_our_bug.py"] + (["test_hangs"] if timeout else []))
    assert read["skipped"] == {"needs CUDA": 1}
    if timeout:
        assert [t.split("::")[1] for t in read["timeouts"]] == ["test_hangs"]


def test_bench_stream_needs_an_existing_folder(tmp_path, capsys):
    from editrt.cli import main

    assert main(["bench", "--stream", str(tmp_path / "absent" / "rows.jsonl"), "--quick"]) == 2
    assert "--stream" in capsys.readouterr().err and not (tmp_path / "absent").exists()
