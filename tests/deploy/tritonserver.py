"""A real Triton Inference Server for tests: the `tritonserver` binary of the nvidia-pytriton wheel.

The wheel (x86-64 Linux) ships tritonserver with its Python backend and one backend stub per
Python version; it runs on CPU-only machines. `server_bundle()` finds the unpacked wheel
($EDITRT_PYTRITON_DIR, or a cache folder it fills once with `python -m pip download --no-deps`,
unpacked here so nvidia-pytriton's numpy<2 pin never touches the environment) and builds a backend
folder with the stub matching this interpreter. `TritonServer` starts it on free loopback ports in
its own process group (the model stubs are its children), polls readiness, and kills the whole
group when stopped.

The stub embeds the libpython it links and takes its environment (sys.path, site-packages) from
the `python` first on PATH, so the environment running the tests puts its own `bin` first and
its LIBDIR on LD_LIBRARY_PATH: the models then import this very editrt.
"""
from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

PYTRITON_VERSION = "0.7.0"


class ServerUnavailable(RuntimeError):
    """tritonserver cannot run here (platform, no wheel); the tests skip outside CI and fail in it."""


def _cache() -> Path:
    from editrt.weights import cache_dir

    return cache_dir()


def _extract(wheel: Path, into: Path) -> None:
    """Unzip keeping the executable bits (zipfile drops them; the wheel records them)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            path = Path(z.extract(info, into))
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                path.chmod(mode)


def unpacked_wheel() -> Path:
    """The unpacked nvidia-pytriton wheel: $EDITRT_PYTRITON_DIR, or fetched once into the editrt cache."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise ServerUnavailable(f"the nvidia-pytriton wheel's tritonserver is x86-64 Linux only, not "
                                f"{platform.system()} {platform.machine()}")
    given = os.environ.get("EDITRT_PYTRITON_DIR")
    if given:
        if not (Path(given) / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
            raise ServerUnavailable(f"$EDITRT_PYTRITON_DIR {given}: no pytriton/tritonserver/bin/tritonserver in it")
        return Path(given)
    target = _cache() / f"pytriton-{PYTRITON_VERSION}"
    if (target / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pytriton-") as tmp:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
             f"nvidia-pytriton=={PYTRITON_VERSION}", "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("nvidia_pytriton-*.whl"))
        if download.returncode or not wheels:
            raise ServerUnavailable(f"pip download nvidia-pytriton=={PYTRITON_VERSION} failed: "
                                    f"{download.stderr.strip().splitlines()[-1:] or download.returncode}")
        unpacked = Path(tmp) / "unpacked"
        _extract(wheels[0], unpacked)
        try:
            unpacked.rename(target)  # atomic: a concurrent run that finished first wins
        except OSError:
            if not target.is_dir():
                raise
    return target


def server_bundle() -> tuple[Path, Path, Path]:
    """(tritonserver binary, backend directory, library folder) for this Python version."""
    wheel = unpacked_wheel()
    root = wheel / "pytriton" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerUnavailable(f"nvidia-pytriton {PYTRITON_VERSION} has no Python backend stub for Python {version}")
    backends = wheel / f"backends-py{version}"
    if not (backends / "python" / "triton_python_backend_stub").is_file():
        tmp = Path(tempfile.mkdtemp(dir=wheel, prefix=".backends-"))
        shutil.copytree(root / "backends" / "python", tmp / "python")
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        try:
            tmp.rename(backends)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return root / "bin" / "tritonserver", backends, wheel / "nvidia_pytriton.libs"


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class TritonServer:
    """tritonserver on loopback ports serving `repositories`; explicit model control, `models` loaded at start."""

    def __init__(self, repositories: list[Path], models: list[str], log_path: Path):
        self.repositories, self.models, self.log_path = [Path(r) for r in repositories], list(models), Path(log_path)
        self.process: subprocess.Popen | None = None
        self.http_port, self.grpc_port = free_ports(2)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 240.0) -> TritonServer:
        binary, backends, libs = server_bundle()
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (sysconfig.get_config_var("LIBDIR"), str(libs), env.get("LD_LIBRARY_PATH")) if p)
        command = [str(binary), *(f"--model-repository={r}" for r in self.repositories), f"--backend-directory={backends}",
                   "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                   "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}", "--allow-metrics=false",
                   "--model-control-mode=explicit", "--exit-timeout-secs=3", "--log-verbose=0",
                   *(f"--load-model={m}" for m in self.models)]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open while the server runs; closed in stop()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode} before it was ready:\n"
                                   f"{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM the process group (server and model stubs), SIGKILL what is left after 20 s."""
        if self.process is None:
            return
        try:
            pgid = os.getpgid(self.process.pid)
        except ProcessLookupError:  # already reaped: no group left
            pgid = None
        for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL: stubs that outlived the server, or a stuck one
            if pgid is None:
                break
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:  # the whole group is gone
                break
            if sig == signal.SIGTERM:
                try:
                    self.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    continue
        self.process.wait()
        self._log.close()
        self.process = None
