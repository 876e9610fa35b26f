"""The server's Prometheus metrics, through prometheus_client (the ecosystem's implementation).

Counters and histograms are prometheus_client metrics in a registry of this app's own (several apps
in one process, as the tests start them, do not collide); gauges (queue depth, open sessions,
session / cache bytes, CUDA memory) are sampled by a collector at scrape time. Under several
processes (Ray Serve replicas) with PROMETHEUS_MULTIPROC_DIR set, prometheus_client keeps counters
and histograms in files there and a scrape of any process reports their sum over all processes
(its MultiProcessCollector); the sampled gauges are that process's own.
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

# seconds: from a tiny-weights preview on CPU (~10 ms) to a full-size final (~10 s)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COUNTERS = {"requests": ("editrt_requests", ("endpoint", "method", "status")), "busy": ("editrt_busy", ("queue",)),
            "ws_messages": ("editrt_ws_messages", ("kind",))}  # Metrics attribute -> (name, label names)


class _Gauges:
    """A collector: the gauges the app registered, sampled when scraped."""

    def __init__(self):
        self.gauges = {}  # name -> (help, callable returning {(label names, label values): value} or a number)

    def collect(self):
        for name, (help_, sample) in self.gauges.items():
            value = sample()
            if value is None:
                continue
            if isinstance(value, dict):
                names = next(iter(value))[0] if value else ()
                family = GaugeMetricFamily(name, help_, labels=list(names))
                for (_, values), v in value.items():
                    family.add_metric([str(x) for x in values], v)
            else:
                family = GaugeMetricFamily(name, help_, value=value)
            yield family


class Metrics:
    def __init__(self):
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        # multiprocess mode: the values live in PROMETHEUS_MULTIPROC_DIR; the scrape's collector reads them there
        own = None if self.multiprocess else self.registry
        self.requests = Counter(COUNTERS["requests"][0], "HTTP requests by endpoint, method and status.",
                                COUNTERS["requests"][1], registry=own)
        self.latency = Histogram("editrt_request_seconds", "Request latency, arrival to response, per endpoint.",
                                 ("endpoint",), buckets=BUCKETS, registry=own)
        self.stage = Histogram("editrt_stage_seconds", "Pipeline jobs: time waiting in the work queue and running, "
                               "per stage.", ("queue", "stage", "phase"), buckets=BUCKETS, registry=own)
        self.busy = Counter(COUNTERS["busy"][0], "Requests refused with 503 because a work queue was full.",
                            COUNTERS["busy"][1], registry=own)
        self.ws_messages = Counter(COUNTERS["ws_messages"][0], "WebSocket drag-loop messages: received, dropped "
                                   "(stale or superseded), shed (queue full), previews and finals sent.",
                                   COUNTERS["ws_messages"][1], registry=own)
        self._gauges = _Gauges()
        self.registry.register(self._gauges)
        if self.multiprocess:
            MultiProcessCollector(self.registry)

    def request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def stage_time(self, queue: str, stage: str, wait_s: float, run_s: float) -> None:
        self.stage.labels(queue, stage, "wait").observe(wait_s)
        self.stage.labels(queue, stage, "run").observe(run_s)

    def count(self, table: str, key: tuple) -> None:
        getattr(self, table).labels(*key).inc()

    def value(self, table: str, key: tuple) -> float:
        """A counter's current value (0 before its first count), as a scrape would report it."""
        name, label_names = COUNTERS[table]
        return self.registry.get_sample_value(f"{name}_total", dict(zip(label_names, map(str, key)))) or 0.0

    def gauge(self, name: str, help_: str, sample) -> None:
        self._gauges.gauges[name] = (help_, sample)

    def render(self) -> str:
        """The exposition text (format 0.0.4)."""
        return generate_latest(self.registry).decode()
