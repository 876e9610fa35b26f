"""A short bounded run of bench/serve_load.py: 16 concurrent clients for 4 s on the tiny pipelines.

Zero 5xx, zero dropped connections, every endpoint of the mix answered, the WebSocket dropped
stale drag positions instead of queueing them, and the server's overhead is reported. (The full
run, 64 clients for 60 s against a server process, is `python -m editrt.bench.serve_load`.)
Memory is only reported here: in one process the clients' own allocations are in the same RSS.
"""
from __future__ import annotations

import asyncio

from needs import need
from serving import start_server

need("websockets", reason="websockets is not installed")
need("psutil", reason="psutil is not installed")


def test_sixteen_clients_mixing_segment_drags_and_finals(reposition):
    from editrt.bench.serve_load import photo_png, print_report, run_load

    # sessions at a 64 px processing side, 1 final step: the run is bounded by draining what is in flight
    with start_server(reposition, max_sessions=64, final_steps=1, resolution=64) as server:
        report = asyncio.run(run_load(server.url, clients=16, duration=4.0, positions=3, interval=0.02,
                                      image=photo_png(64, 48), drain=90.0))
    print_report(report)
    assert report["errors_5xx"] == 0, report["problems"]
    assert report["dropped"] == 0, report["problems"]
    assert report["unfinished"] == 0, "clients still waiting 90 s after the end"
    assert report["errors_4xx"] == 0, report["problems"]
    rows = {r["name"]: r for r in report["rows"]}
    for name in ("serve-segment", "serve-open", "serve-select", "serve-preview", "serve-final"):
        assert rows[name]["count"] >= 1, name
        assert rows[name]["server_overhead_p50_ms"] is not None
    assert report["stale_previews_dropped"] >= 1  # drags arrive faster than previews run: latest wins
    assert rows["serve-preview"]["count"] < report["drags_sent"]
