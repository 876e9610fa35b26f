"""`/healthz` stays fast while unauthenticated clients send large bodies (issue 22, item 6), on a real server.

`editrt serve --weights DIR --token T --port P` runs in a subprocess on loopback (its own event loop and
interpreter, as in production: nothing in this process competes with it for the GIL). Four clients each
send 12 MB request bodies without a token, over and over, for a few seconds, while a fifth client with the
token asks for /healthz; the median answer must come within 50 ms. The edge refuses a request without
the token from its headers (runtime/server/app.py, `Edge`), so the bodies are never buffered or parsed;
before that fix the median was ~400 ms. The server is stopped in a `finally`, even when the test fails.
"""
from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

TOKEN = "edge-load-token"
BODY_BYTES = 12 << 20
SENDERS = 4
LOAD_S = 3.0
P50_MS = 50.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_weights):
    """`editrt serve` in a subprocess on 127.0.0.1 (the reposition editor only: the load is on the edge)."""
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("EDITRT_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "editrt.cli", "serve", "--weights", str(tiny_weights),
                             "--editors", "reposition", "--token", TOKEN, "--host", "127.0.0.1", "--port", str(port),
                             "--no-warmup", "--quiet"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        with httpx.Client(base_url=url, timeout=5, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            while True:
                assert proc.poll() is None, f"editrt serve exited {proc.returncode}: {_tail(log)}"
                assert time.monotonic() < deadline, f"editrt serve did not answer /healthz: {_tail(log)}"
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _tail(log) -> str:
    log.seek(0)
    return log.read()[-2000:]


class Sender(threading.Thread):
    """Sends POST /v1/segment with a 12 MB body and no token, again and again, until `stop` is set."""

    def __init__(self, port: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.port, self.stop = port, stop
        self.sent = 0  # body bytes written to the socket
        self.statuses: list[bytes] = []
        self.resets = 0

    def run(self):
        head = (f"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {BODY_BYTES}\r\n\r\n").encode()
        chunk = b'{"points": [' + b"[1, 2], " * ((1 << 20) // 8 - 2) + b"[1, 2]]}"  # 1 MB of a JSON points list
        chunk = chunk[:1 << 20]
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(head)
                    for _ in range(BODY_BYTES // len(chunk)):  # all of it, whatever the server answers
                        s.sendall(chunk)
                        self.sent += len(chunk)
                    self.statuses.append(s.recv(64)[:12])
            except OSError:  # the server closed the connection while the body was still being written
                self.resets += 1


def test_healthz_stays_fast_under_unauthenticated_12mb_bodies(served):
    port = int(served.rsplit(":", 1)[1])
    stop = threading.Event()
    senders = [Sender(port, stop) for _ in range(SENDERS)]
    latencies = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # the refusal: from the headers alone
        s.sendall(f"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {BODY_BYTES}\r\n\r\n".encode())
        head = s.recv(4096).lower()
        assert head.startswith(b"http/1.1 401") and b"connection: close" in head, head[:300]
    with httpx.Client(base_url=served, timeout=10, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        assert c.get("/healthz").status_code == 200  # the connection is open before the load starts
        for s in senders:
            s.start()
        try:
            time.sleep(0.3)  # the senders are writing
            t_end = time.monotonic() + LOAD_S
            while time.monotonic() < t_end:
                t0 = time.perf_counter()
                r = c.get("/healthz")
                latencies.append((time.perf_counter() - t0) * 1e3)
                assert r.status_code == 200
                time.sleep(0.02)
        finally:
            stop.set()
            for s in senders:
                s.join(timeout=30)
    sent = sum(s.sent for s in senders)
    statuses = [status for s in senders for status in s.statuses]
    assert sent >= SENDERS * BODY_BYTES, f"the load did not happen: {sent} bytes sent"
    assert all(status.startswith(b"HTTP/1.1 401") for status in statuses), statuses[:5]  # or a closed connection
    p50 = statistics.median(latencies)
    print(f"/healthz under load: p50 {p50:.1f} ms over {len(latencies)} requests; {sent / 2**20:.0f} MB sent, {len(statuses)} refusals read, "
          f"{sum(s.resets for s in senders)} connections closed mid-body")
    assert p50 < P50_MS, f"/healthz p50 {p50:.1f} ms under load (p90 {sorted(latencies)[int(len(latencies) * 0.9)]:.1f})"
