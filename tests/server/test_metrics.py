"""/metrics through prometheus_client: the exposition parses with its parser, and under several processes
(PROMETHEUS_MULTIPROC_DIR, as for Ray Serve replicas) a scrape of one reports the sum over all of them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from needs import need

import editrt

need("prometheus_client", reason="prometheus_client is not installed (pip install editrt[serve])")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

# Each process loads runtime/server/metrics.py (prometheus_client only) from its file: importing it as
# editrt.runtime.server.metrics would first import the package, i.e. the whole app (seconds per process).
METRICS_PY = Path(editrt.__file__).parent / "runtime" / "server" / "metrics.py"
RECORD = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('metrics', sys.argv[1]); "
          "metrics = importlib.util.module_from_spec(spec); spec.loader.exec_module(metrics); m = metrics.Metrics(); "
          "[m.request('/v1/segment', 'POST', 200, 0.02) for _ in range({n})]; m.count('busy', ('reposition',)); "
          "print(m.render())")


def _samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_exposition_parses_and_counts():
    from editrt.runtime.server.metrics import Metrics

    m = Metrics()
    m.gauge("editrt_sessions_open", "Open edit sessions.", lambda: 3)
    m.gauge("editrt_queue_depth", "Jobs waiting.", lambda: {(("queue",), ("reposition",)): 2})
    for seconds in (0.004, 0.02, 7.0):
        m.request("/v1/segment", "POST", 200, seconds)
    samples = _samples(m.render())
    key = (("endpoint", "/v1/segment"), ("method", "POST"), ("status", "200"))
    assert samples[("editrt_requests_total", key)] == 3
    assert samples[("editrt_request_seconds_count", (("endpoint", "/v1/segment"),))] == 3
    assert samples[("editrt_request_seconds_bucket", (("endpoint", "/v1/segment"), ("le", "0.005")))] == 1
    assert samples[("editrt_request_seconds_bucket", (("endpoint", "/v1/segment"), ("le", "10.0")))] == 3
    assert samples[("editrt_sessions_open", ())] == 3
    assert samples[("editrt_queue_depth", (("queue", "reposition"),))] == 2
    assert _samples(Metrics().render()).get(("editrt_requests_total", key)) is None  # each app its own registry


def test_several_processes_report_their_sum(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for n in (1, 2):  # replicas 1 and 2 record 1 and 2 requests, and exit
        subprocess.run([sys.executable, "-c", RECORD.format(n=n), METRICS_PY], env=env, check=True, capture_output=True,
                       timeout=60, cwd=tmp_path)
    scrape = subprocess.run([sys.executable, "-c", RECORD.format(n=0), METRICS_PY], env=env, check=True, capture_output=True,
                            text=True, timeout=60, cwd=tmp_path).stdout  # a third scrapes (recording none)
    samples = _samples(scrape)
    key = (("endpoint", "/v1/segment"), ("method", "POST"), ("status", "200"))
    assert samples[("editrt_requests_total", key)] == 3
    assert samples[("editrt_busy_total", (("queue", "reposition"),))] == 3
