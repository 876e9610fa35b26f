"""Load test for `editrt serve`: many concurrent clients mixing segment, drag previews and finals.

    python -m editrt.bench.serve_load --weights tiny --clients 64 --duration 60 --out serve.jsonl
    python -m editrt.bench.serve_load --url http://127.0.0.1:8000 --pid 1234 --clients 16 --duration 10

Without --url it starts `python -m editrt.runtime.server` on a free loopback port (its queue
sized to the clients), waits for /readyz and stops it at the end. Loopback only; bounded by
--duration (a client finishes its current scenario, then stops) and --clients.

Each client loops over two scenarios: a one-shot `POST /v1/segment` (three of four times), and an
interactive drag: open a session, select, send drag positions over the WebSocket every
--drag-interval seconds while reading previews, hold until a preview (or "busy") arrives (at most
10 s), release, read the final, close the session.

Reported per endpoint ("serve-segment", "serve-open", "serve-select", "serve-preview", "serve-final"):
count, client latency p50/p99, and the server overhead, two ways: request latency minus pipeline
time as the client sees it (network, parsing, validation, image coding and queue wait) and the
server's own share (server time minus pipeline run and queue wait). Also 5xx count, dropped
connections (transport errors, WebSockets closed without a close frame), previews the server
dropped as stale, and the server's RSS over time (flat = the last quarter's median within
--rss-slack-mb of the second quarter's).

--out writes one JSON line per endpoint holding, besides the endpoint's figures (and its pipeline p50), the
run's counts (5xx, 4xx, dropped connections, unfinished scenarios, previews shed, drags sent, stale previews
dropped, scenarios, HTTP status counts), its memory, the server's options (`server_args`; null with --url),
`duration_s` (the load's --duration) and `elapsed_s` (the whole run, the drain included).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

ENDPOINTS = ("segment", "open", "select", "preview", "final")


@dataclass
class Tally:
    latency_ms: dict = field(default_factory=lambda: {e: [] for e in ENDPOINTS})
    overhead_ms: dict = field(default_factory=lambda: {e: [] for e in ENDPOINTS})  # latency - pipeline
    pipeline_ms: dict = field(default_factory=lambda: {e: [] for e in ENDPOINTS})  # the server's pipeline run
    server_overhead_ms: dict = field(default_factory=lambda: {e: [] for e in ENDPOINTS})  # server - pipeline - queue
    status: dict = field(default_factory=dict)
    errors_5xx: int = 0
    other_4xx: int = 0
    dropped: int = 0
    shed: int = 0  # previews the server shed because its queue was full (WebSocket "busy")
    unfinished: int = 0  # scenarios still running `drain` s after the end, stopped by the client
    drags_sent: int = 0
    scenarios: int = 0
    problems: list = field(default_factory=list)

    def record(self, endpoint: str, latency_s: float, timing: dict | None) -> None:
        ms = latency_s * 1e3
        self.latency_ms[endpoint].append(ms)
        if timing:
            self.overhead_ms[endpoint].append(ms - timing["pipeline_ms"])
            self.pipeline_ms[endpoint].append(timing["pipeline_ms"])
            self.server_overhead_ms[endpoint].append(timing["server_ms"] - timing["pipeline_ms"] - timing["queue_ms"])

    def status_of(self, endpoint: str, code: int, text: str = "") -> bool:
        self.status[(endpoint, code)] = self.status.get((endpoint, code), 0) + 1
        if code >= 500:
            self.errors_5xx += 1
            self.problems.append(f"{endpoint}: {code} {text[:200]}")
        elif code >= 400:
            self.other_4xx += 1
            self.problems.append(f"{endpoint}: {code} {text[:200]}")
        return code == 200


def photo_png(width: int = 120, height: int = 80) -> bytes:
    from PIL import Image

    with resources.as_file(resources.files("editrt").joinpath("assets", "chelsea.png")) as path:
        img = Image.open(path).convert("RGB").resize((width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def header_timing(response) -> dict | None:
    try:
        return {"server_ms": float(response.headers["x-server-ms"]), "pipeline_ms": float(response.headers["x-pipeline-ms"]),
                "queue_ms": float(response.headers["x-queue-ms"])}
    except (KeyError, ValueError):
        return None


async def segment(client, tally: Tally, image_b64: str, rng: random.Random, size) -> None:
    w, h = size
    t0 = time.perf_counter()
    r = await client.post("/v1/segment", json={"image": image_b64, "points": [[rng.uniform(0, w - 1), rng.uniform(0, h - 1)]]})
    if tally.status_of("segment", r.status_code, r.text if r.status_code != 200 else ""):
        tally.record("segment", time.perf_counter() - t0, header_timing(r))


async def drag(client, ws_url: str, headers: dict, tally: Tally, image_b64: str, rng: random.Random, size,
               positions: int, interval: float) -> None:
    import websockets

    w, h = size
    t0 = time.perf_counter()
    r = await client.post("/v1/sessions", json={"image": image_b64})
    if not tally.status_of("open", r.status_code, r.text if r.status_code != 200 else ""):
        return
    info = r.json()
    tally.record("open", time.perf_counter() - t0, info["timing"])
    sid = info["id"]
    try:
        t0 = time.perf_counter()
        r = await client.post(f"/v1/sessions/{sid}/select", json={"points": [[w / 2 + rng.uniform(-5, 5), h / 2]]})
        if not tally.status_of("select", r.status_code, r.text if r.status_code != 200 else ""):
            return
        tally.record("select", time.perf_counter() - t0, r.json()["timing"])
        async with websockets.connect(f"{ws_url}/v1/sessions/{sid}/drag", additional_headers=headers,
                                      open_timeout=60, max_size=1 << 24) as ws:
            sent_at: dict[int, float] = {}
            seen: list[str] = []

            async def reader():
                while True:
                    m = json.loads(await ws.recv())
                    seen.append(m["type"])
                    if m["type"] == "busy":  # the server shed this preview (queue full); not an error
                        tally.shed += 1
                        continue
                    if m["type"] == "error":
                        tally.status_of("preview" if m.get("seq", 0) < positions else "final", m["status"], m["message"])
                        if m.get("seq") == positions:
                            return
                        continue
                    endpoint = "preview" if m["type"] == "preview" else "final"
                    tally.status_of(endpoint, 200)
                    tally.record(endpoint, time.perf_counter() - sent_at[m["seq"]], m["timing"])
                    if endpoint == "final":
                        return

            reading = asyncio.create_task(reader())
            for seq in range(positions):
                sent_at[seq] = time.perf_counter()
                await ws.send(json.dumps({"type": "drag", "dx": 2 + seq, "dy": 1, "seq": seq}))
                tally.drags_sent += 1
                await asyncio.sleep(interval)
            # like a user watching the screen: hold the drag until a preview (or a "busy") shows, at most 10 s
            deadline = time.perf_counter() + 10
            while not seen and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)
            sent_at[positions] = time.perf_counter()
            await ws.send(json.dumps({"type": "release", "dx": 2 + positions, "dy": 1, "seq": positions}))
            await asyncio.wait_for(reading, timeout=300)
    finally:
        r = await client.delete(f"/v1/sessions/{sid}")
        tally.status_of("close", r.status_code, r.text if r.status_code != 204 else "")


async def run_load(url: str, clients: int, duration: float, token: str | None = None, pid: int | None = None,
                   positions: int = 6, interval: float = 0.03, seed: int = 0, image: bytes | None = None,
                   drain: float = 120.0) -> dict:
    """Run the load; returns the report (see `summarize`)."""
    import httpx
    import websockets

    image = image or photo_png()
    from PIL import Image

    size = Image.open(io.BytesIO(image)).size
    image_b64 = base64.b64encode(image).decode()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    tally = Tally()
    rss: list[tuple[float, int]] = []
    ws_url = "ws" + url[len("http"):]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    deadline = time.monotonic() + duration

    async def sample_rss():
        import psutil

        proc = psutil.Process(pid or os.getpid())
        while True:
            rss.append((time.monotonic(), proc.memory_info().rss))
            await asyncio.sleep(0.25)

    async def client_loop(k: int, client):
        rng = random.Random(seed * 1000 + k)
        turn = k  # clients start at different points of the mix
        while time.monotonic() < deadline:
            tally.scenarios += 1
            try:
                if turn % 4 == 3:
                    await drag(client, ws_url, headers, tally, image_b64, rng, size, positions, interval)
                else:
                    await segment(client, tally, image_b64, rng, size)
            except (httpx.TransportError, websockets.ConnectionClosedError, OSError, asyncio.TimeoutError) as e:
                tally.dropped += 1
                tally.problems.append(f"client {k}: {type(e).__name__}: {e}")
            turn += 1

    sampler = asyncio.create_task(sample_rss())
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:
            tasks = [asyncio.create_task(client_loop(k, client)) for k in range(clients)]
            _, pending = await asyncio.wait(tasks, timeout=duration + drain)
            for task in pending:  # still draining after `drain` s: stopped by the client, reported as unfinished
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            tally.unfinished = len(pending)
    finally:
        sampler.cancel()
    elapsed = time.monotonic() - started
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        metrics = (await client.get("/metrics")).text
    return summarize(tally, rss, clients, elapsed, metrics, duration)


def _pct(values, q):
    return round(float(np.percentile(values, q)), 3) if values else None


def _stale_dropped(metrics: str) -> int:
    for line in metrics.splitlines():
        if line.startswith('editrt_ws_messages_total{kind="dropped"}'):
            return int(float(line.split()[-1]))
    return 0


def summarize(tally: Tally, rss, clients: int, elapsed: float, metrics: str, duration: float | None = None) -> dict:
    """The report: a row per endpoint and the run's counts. `duration_s` is the load's duration (clients start
    no new scenario after it), `elapsed_s` the whole run, the drain of the scenarios in flight included."""
    rows = []
    for e in ENDPOINTS:
        lat = tally.latency_ms[e]
        rows.append({"name": f"serve-{e}", "clients": clients, "duration_s": duration, "elapsed_s": round(elapsed, 2),
                     "count": len(lat), "rate_per_s": round(len(lat) / elapsed, 2), "p50_ms": _pct(lat, 50),
                     "p99_ms": _pct(lat, 99), "pipeline_p50_ms": _pct(tally.pipeline_ms[e], 50),
                     "overhead_p50_ms": _pct(tally.overhead_ms[e], 50), "overhead_p99_ms": _pct(tally.overhead_ms[e], 99),
                     "server_overhead_p50_ms": _pct(tally.server_overhead_ms[e], 50),
                     "server_overhead_p99_ms": _pct(tally.server_overhead_ms[e], 99)})
    mb = [v / 2**20 for _, v in rss]
    quarter = max(1, len(mb) // 4)
    memory = {"rss_start_mb": round(mb[0], 1) if mb else None, "rss_end_mb": round(mb[-1], 1) if mb else None,
              "rss_max_mb": round(max(mb), 1) if mb else None,
              "rss_q2_median_mb": round(statistics.median(mb[quarter:2 * quarter]), 1) if len(mb) >= 4 else None,
              "rss_q4_median_mb": round(statistics.median(mb[-quarter:]), 1) if len(mb) >= 4 else None}
    return {"rows": rows, "errors_5xx": tally.errors_5xx, "errors_4xx": tally.other_4xx, "dropped": tally.dropped,
            "unfinished": tally.unfinished, "previews_shed": tally.shed,
            "drags_sent": tally.drags_sent, "stale_previews_dropped": _stale_dropped(metrics),
            "scenarios": tally.scenarios, "memory": memory, "problems": tally.problems[:20],
            "status": {f"{k[0]}:{k[1]}": v for k, v in sorted(tally.status.items())}}


def memory_flat(report: dict, slack_mb: float) -> bool:
    m = report["memory"]
    return m["rss_q2_median_mb"] is None or m["rss_q4_median_mb"] - m["rss_q2_median_mb"] <= slack_mb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(weights: str, clients: int, extra: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    """`python -m editrt.runtime.server` on a free loopback port; returns (process, url, its options) once
    /readyz says ready."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "editrt.runtime.server", "--weights", weights, "--host", "127.0.0.1", "--port",
           str(port), "--queue-size", str(max(64, 2 * clients)), "--max-sessions", str(2 * clients), "--quiet", *extra]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            ready = httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            ready = False  # not listening yet
        if ready:
            return proc, url, cmd[3:]
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the server did not become ready in 300 s")


def print_report(report: dict, out=sys.stdout) -> None:
    cols = ("name", "count", "rate_per_s", "p50_ms", "p99_ms", "overhead_p50_ms", "overhead_p99_ms",
            "server_overhead_p50_ms", "server_overhead_p99_ms")
    print(" | ".join(cols), file=out)
    for row in report["rows"]:
        print(" | ".join(str(row[c]) for c in cols), file=out)
    print(f"5xx {report['errors_5xx']}  4xx {report['errors_4xx']}  dropped connections {report['dropped']}  "
          f"unfinished after the drain {report['unfinished']}  previews shed (queue full) {report['previews_shed']}  "
          f"drags sent {report['drags_sent']}, stale previews dropped by the server {report['stale_previews_dropped']}  "
          f"memory {report['memory']}", file=out)
    for p in report["problems"]:
        print(f"  problem: {p}", file=out)


RUN_FIELDS = ("errors_5xx", "errors_4xx", "dropped", "unfinished", "previews_shed", "drags_sent",
              "stale_previews_dropped", "scenarios")


def jsonl_row(row: dict, report: dict, memory_flat: bool, server_args: list[str] | None) -> dict:
    """One line of --out: the endpoint's row with the run's counts, memory and the server's options, so every
    figure quoted from a run (previews shed, drags sent, the server flags, the duration) is in the file."""
    return {**row, **{k: report[k] for k in RUN_FIELDS}, "status": report["status"], **report["memory"],
            "memory_flat": memory_flat, "server_args": server_args}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m editrt.bench.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="tiny", help="weights for the server it starts (default tiny)")
    p.add_argument("--url", help="an already running server (loopback) instead of starting one")
    p.add_argument("--pid", type=int, help="with --url: the server's process id, for its memory")
    p.add_argument("--token", default=os.environ.get("EDITRT_TOKEN"))
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="seconds (at most 60)")
    p.add_argument("--positions", type=int, default=6, help="drag positions per drag")
    p.add_argument("--drag-interval", type=float, default=0.03)
    p.add_argument("--drain", type=float, default=120.0, help="seconds the clients may finish in after --duration")
    p.add_argument("--rss-slack-mb", type=float, default=64.0)
    p.add_argument("--out", help="write the rows as JSON lines here")
    p.add_argument("server_args", nargs="*", help="after --: more options for the server (e.g. -- --device cuda)")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 0 < args.duration <= 60:
        p.error("--clients 1..256 and --duration in (0, 60] (the load test is bounded)")
    if args.url and not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        p.error("--url: loopback only")
    proc, server_args = None, None  # the options of a server started elsewhere (--url) are not known here
    url, pid = args.url, args.pid
    if url is None:
        proc, url, server_args = start_server(args.weights, args.clients, args.server_args)
        pid = proc.pid
    try:
        report = asyncio.run(run_load(url, args.clients, args.duration, args.token, pid, args.positions,
                                      args.drag_interval, drain=args.drain))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print_report(report)
    flat = memory_flat(report, args.rss_slack_mb)
    if args.out:
        with open(args.out, "w") as f:
            for row in report["rows"]:
                f.write(json.dumps(jsonl_row(row, report, flat, server_args)) + "\n")
    ok = report["errors_5xx"] == 0 and report["dropped"] == 0 and report["unfinished"] == 0 and flat
    print("PASS" if ok else "FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
