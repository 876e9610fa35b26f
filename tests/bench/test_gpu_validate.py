"""bench/gpu_validate.sh's orchestration, on any machine: a stand-in `python` answers the GPU steps (it runs
the real interpreter for everything else), so the test sees every step run, each exit code recorded in
summary.txt, a failing step not stopping the others, the exit status, and a missing `doctor` logged."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_validate.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
# the steps' commands: record them (and the PYTHONPATH they see), answer with the configured exit codes
case "$*" in
  *"-m pytest"*"gpu and slow"*) echo "slow $*" >> "$CALLS"; exit "${SLOW_RC:-0}" ;;
  *"-m pytest"*) echo "gpu $*" >> "$CALLS"; exit "${GPU_RC:-0}" ;;
  *"-m editrt.cli bench"*) echo "bench PYTHONPATH=${PYTHONPATH:-}" >> "$CALLS"
      [ -n "${IMPORT_SUITE:-}" ] || exit "${BENCH_RC:-0}"
      exec "$REAL_PYTHON" -c "import editrt.bench.suite as s, sys; open(sys.argv[1], 'a').write('suite ' + s.__file__ + chr(10)); sys.exit(int(sys.argv[2]))" "$CALLS" "${BENCH_RC:-0}" ;;
  "-c import editrt.bench.suite") exit "${PROBE_RC:-0}" ;;
  "-") cat > /dev/null; echo "torch (stand-in)"; exit 0 ;;
  *"-m editrt.cli doctor --help"*) exit "${DOCTOR_HELP_RC:-0}" ;;
  *"-m editrt.cli doctor"*) echo "doctor $*" >> "$CALLS"; exit 0 ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""


def validate(tmp_path, **rcs) -> tuple[int, str, dict, str]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    env = dict(os.environ, PYTHON=str(fake), REAL_PYTHON=sys.executable, CALLS=str(calls),
               **{k: str(v) for k, v in rcs.items()})
    done = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=300)
    summary = {line.split()[0]: line for line in (out / "summary.txt").read_text().splitlines()}
    return done.returncode, done.stderr, summary, calls.read_text() if calls.exists() else ""


def test_every_step_runs_and_is_recorded(tmp_path):
    rc, err, summary, calls = validate(tmp_path)
    assert rc == 0, err
    assert list(summary) == ["GPU_TESTS", "SLOW_GPU_TESTS", "BENCH", "DOCTOR"]
    assert all("rc=0" in line and " ok " in line for line in summary.values()), summary
    bench_args = calls.splitlines()
    assert any(line.startswith("gpu ") and "-m gpu" in line for line in bench_args)
    assert any(line.startswith("slow ") for line in bench_args) and any(line.startswith("doctor ") for line in bench_args)
    assert (tmp_path / "out" / "env.txt").read_text().count("torch") >= 1


def test_a_failing_step_does_not_stop_the_others(tmp_path):
    rc, err, summary, calls = validate(tmp_path, GPU_RC=1, BENCH_RC=3)
    assert rc == 1
    assert "rc=1" in summary["GPU_TESTS"] and "FAILED" in summary["GPU_TESTS"]
    assert "rc=3" in summary["BENCH"] and "FAILED" in summary["BENCH"] and "the benchmark failed" in err
    assert "rc=0" in summary["SLOW_GPU_TESTS"] and "rc=0" in summary["DOCTOR"]  # still ran after the failures
    assert "doctor " in calls


def test_no_slow_tests_selected_is_not_a_failure_and_a_missing_doctor_is_logged(tmp_path):
    rc, err, summary, calls = validate(tmp_path, SLOW_RC=5, DOCTOR_HELP_RC=2)
    assert rc == 0, err
    assert "no tests selected" in summary["SLOW_GPU_TESTS"] and "missing" in summary["DOCTOR"]
    assert "doctor " not in calls


def test_usage(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: bench/gpu_validate.sh OUTDIR" in done.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="symbolic links and bash")
def test_an_uninstalled_checkout_is_imported_from_its_source_tree(tmp_path):
    """Where `import editrt.bench.suite` fails (no pip install), the steps import the checkout through links."""
    fake = tmp_path / "python"
    # the import probe fails, as without an installed editrt; the other calls behave as in validate()
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    env = dict(os.environ, PYTHON=str(fake), REAL_PYTHON=sys.executable, CALLS=str(calls), PYTHONPATH="/keep/me",
               PROBE_RC="1", IMPORT_SUITE="1")
    done = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    bench = next(line for line in calls.read_text().splitlines() if line.startswith("bench "))
    assert f"PYTHONPATH={out}/.editrt-src:/keep/me" in bench  # the caller's PYTHONPATH (e.g. .site) kept after
    suite_file = next(line for line in calls.read_text().splitlines() if line.startswith("suite "))
    assert suite_file == f"suite {out}/.editrt-src/editrt/bench/suite.py"
    assert (out / ".editrt-src" / "editrt" / "bench" / "suite.py").resolve() == SCRIPT.parent / "suite.py"
