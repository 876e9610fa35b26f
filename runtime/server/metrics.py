"""Prometheus text exposition (format 0.0.4) for the server, without a client library.

Counters and histograms are keyed by label tuples; `render()` writes them with the gauges the
app samples at scrape time (queue depth, open sessions, session / cache bytes, CUDA memory).
"""
from __future__ import annotations

import threading
from collections import defaultdict

# seconds: from a tiny-weights preview on CPU (~10 ms) to a full-size final (~10 s)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1


def _labels(names: tuple[str, ...], values: tuple) -> str:
    def escape(v):
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return ",".join(f'{n}="{escape(v)}"' for n, v in zip(names, values))


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = defaultdict(int)  # (endpoint, method, status)
        self.latency: dict[tuple, Histogram] = defaultdict(Histogram)  # (endpoint,)
        self.stage: dict[tuple, Histogram] = defaultdict(Histogram)  # (queue, stage, phase=wait|run)
        self.busy: dict[tuple, int] = defaultdict(int)  # (queue,)
        self.ws_messages: dict[tuple, int] = defaultdict(int)  # (kind,) received / previews / dropped / finals
        self.gauges = {}  # name -> (help, callable returning {labels tuple: value} or a number)

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, method, status)] += 1
            self.latency[(endpoint,)].observe(seconds)

    def stage_time(self, queue: str, stage: str, wait_s: float, run_s: float) -> None:
        with self._lock:
            self.stage[(queue, stage, "wait")].observe(wait_s)
            self.stage[(queue, stage, "run")].observe(run_s)

    def count(self, table: str, key: tuple) -> None:
        with self._lock:
            getattr(self, table)[key] += 1

    def gauge(self, name: str, help_: str, sample) -> None:
        self.gauges[name] = (help_, sample)

    def render(self) -> str:
        out: list[str] = []

        def counter(name, help_, table, names):
            out.append(f"# HELP {name} {help_}\n# TYPE {name} counter")
            for key, v in sorted(table.items(), key=lambda kv: tuple(map(str, kv[0]))):
                out.append(f"{name}{{{_labels(names, key)}}} {v}")

        def histogram(name, help_, table, names):
            out.append(f"# HELP {name} {help_}\n# TYPE {name} histogram")
            for key, h in sorted(table.items(), key=lambda kv: tuple(map(str, kv[0]))):
                base, total = _labels(names, key), 0
                for bound, c in zip(BUCKETS, h.counts):
                    total += c
                    out.append(f'{name}_bucket{{{base},le="{bound}"}} {total}')
                total += h.counts[-1]
                out.append(f'{name}_bucket{{{base},le="+Inf"}} {total}')
                out.append(f"{name}_sum{{{base}}} {h.sum:.6f}")
                out.append(f"{name}_count{{{base}}} {total}")

        with self._lock:
            counter("editrt_requests_total", "HTTP requests by endpoint, method and status.", self.requests,
                    ("endpoint", "method", "status"))
            histogram("editrt_request_seconds", "Request latency, arrival to response, per endpoint.", self.latency,
                      ("endpoint",))
            histogram("editrt_stage_seconds", "Pipeline jobs: time waiting in the work queue and running, per stage.",
                      self.stage, ("queue", "stage", "phase"))
            counter("editrt_busy_total", "Requests refused with 503 because a work queue was full.", self.busy,
                    ("queue",))
            counter("editrt_ws_messages_total", "WebSocket drag-loop messages: received, dropped (stale or "
                    "superseded), shed (queue full), previews and finals sent.", self.ws_messages, ("kind",))
        for name, (help_, sample) in self.gauges.items():
            value = sample()
            if value is None:
                continue
            out.append(f"# HELP {name} {help_}\n# TYPE {name} gauge")
            if isinstance(value, dict):
                for key, v in value.items():
                    out.append(f"{name}{{{_labels(key[0], key[1])}}} {v}")
            else:
                out.append(f"{name} {value}")
        return "\n".join(out) + "\n"
