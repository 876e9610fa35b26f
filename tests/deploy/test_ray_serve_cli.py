"""`editrt serve --ray` from the command line: bad options are one-line errors (exit 2); a real run
starts a local Ray whose processes all listen on loopback only, answers, and Ctrl-C stops it leaving no Ray
process behind."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from needs import need  # noqa: E402

need("ray.serve", "the deploy extra is not installed (pip install editrt[deploy])")
import httpx  # noqa: E402

from editrt.cli import main  # noqa: E402
from editrt.runtime.server.cli import LOCAL_RAY_ENV  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "2"], "--replicas: only with --ray"),
    (["--ray", "--replicas", "0"], "--replicas: expected a positive number, got 0"),
    (["--ray", "--replicas", "3", "--max-replicas", "2"], "--replicas 3: expected between --min-replicas (1) and "
                                                           "--max-replicas (2)"),
    (["--ray", "--device", "cuda:1"], "--device cuda:1: with --ray, expected cpu or cuda"),
    (["--ray", "--device", "cuda", "--gpus-per-replica", "0"], "--device cuda: a replica sees no GPU"),
])
def test_bad_ray_options_are_one_line_errors(argv, message, tiny_weights, capsys):
    assert main(["serve", "--weights", str(tiny_weights), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"editrt: error: {message}") and err.count("\n") == 1, err


LOOPBACK_IPS = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening(pids) -> dict[str, set[str]]:
    """'pid command' -> the addresses its TCP sockets listen on."""
    found = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            name = f"{pid} {' '.join(proc.cmdline())[:120]}"
            found[name] = {f"{c.laddr.ip}:{c.laddr.port}" for c in proc.net_connections(kind="inet")
                           if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # it exited while we looked
            continue
    return found


def ray_processes(marker: str, pids: bool = False) -> list:
    """Command lines (or pids) of the processes started under the Ray temp dir `marker` (raylet, GCS, agents,
    workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it exited while we looked, or is not ours to read
            continue
        if proc.name.isdigit() and int(proc.name) != os.getpid() and marker in cmdline:
            found.append(int(proc.name) if pids else cmdline[:200])
    return found


def test_serve_ray_runs_until_interrupted_and_leaves_no_ray_process(tiny_weights):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_tmp = tempfile.mkdtemp(prefix="ert", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # without the variable this folder's conftest sets for in-process clusters: `editrt serve` must set it itself
    env = {**{k: v for k, v in os.environ.items() if k not in LOCAL_RAY_ENV}, "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen([sys.executable, "-m", "editrt.cli", "serve", "--ray", "--weights", str(tiny_weights),
                             "--editors", "reposition", "--replicas", "1", "--cpus-per-replica", "1",
                             "--port", str(port), "--no-warmup", "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("editrt: serving on") for line in err):  # printed once serve.run returned
            assert proc.poll() is None, "".join(err)[-2000:]
            assert time.monotonic() < deadline, "editrt serve --ray did not start"
            time.sleep(0.5)
        r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30)
        assert r.status_code == 200 and r.json()["pipelines"] == ["reposition"] and r.headers["x-editrt-replica"]
        assert ray_processes(ray_tmp), "expected the local Ray's processes while it serves"
        # Ray's control plane has no authentication: GCS, raylet, agents, the replica and the driver (the editrt
        # process, with Serve's HTTP proxy on --host 127.0.0.1) listen on loopback only.
        sockets = listening([proc.pid, *ray_processes(ray_tmp, pids=True)])
        assert any(name.split()[0] == str(proc.pid) for name in sockets)
        assert any("gcs_server" in name for name in sockets) and any("raylet" in name for name in sockets), sockets
        exposed = {name: sorted(a for a in addresses if a.rsplit(":", 1)[0] not in LOOPBACK_IPS)
                   for name, addresses in sockets.items()}
        assert not any(exposed.values()), {name: a for name, a in exposed.items() if a}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, "".join(err)[-2000:]
        reader.join(timeout=10)
        assert any(line.startswith("editrt: stopping Ray Serve") for line in err), "".join(err)[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 20
    while ray_processes(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(ray_tmp)
