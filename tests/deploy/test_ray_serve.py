"""The Ray Serve deployment (`editrt serve --ray`) on a local Ray cluster this module starts.

Two replicas over the tiny weights, two sessions per replica. The deployment must not change
results (a one-shot request's PNG equals the single-process app's, byte for byte); every request
about a session reaches the replica holding it (X-Editrt-Replica, the drag WebSocket included),
with no routing header from the client; opening more sessions than a replica holds evicts its
least recently used, which then answers 410 and has freed its pipeline cache entries. The cluster
is shut down at the end, also when a test fails.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import re
import socket
import threading
import time
from importlib import resources

import numpy as np
import pytest
import torch
from needs import need  # noqa: E402
from PIL import Image

need("ray.serve", "the deploy extra is not installed (pip install editrt[deploy])")
need("websockets", "websockets is not installed (pip install editrt[dev])")
import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from editrt.errors import InputError  # noqa: E402
from editrt.runtime.server import Settings, create_app  # noqa: E402
from editrt.runtime.server.loading import ServeConfig  # noqa: E402
from editrt.runtime.server.ray_deployment import EditrtReplica, RayOptions, build_app  # noqa: E402

SETTINGS = dict(final_steps=2, preview_steps=1, warmup=False, max_upload_bytes=2 << 20, max_pixels=1 << 20)
SESSIONS_PER_REPLICA = 2
OPTIONS = RayOptions(replicas=2, cpus_per_replica=0.5, sessions_per_replica=SESSIONS_PER_REPLICA)
REPLICA = "x-editrt-replica"


def small_photo(width: int = 96, height: int = 64) -> np.ndarray:
    with resources.as_file(resources.files("editrt").joinpath("assets", "chelsea.png")) as path:
        return np.asarray(Image.open(path).convert("RGB").resize((width, height), Image.BILINEAR))


def b64png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tiny_weights, tmp_path_factory):
    """The base url of the deployment on a local 2-CPU Ray cluster (on loopback: conftest.py), its replicas'
    metrics in one multiprocess directory; shut down at the end."""
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = dataclasses.replace(OPTIONS, metrics_dir=str(tmp_path_factory.mktemp("metrics")))
        serve.run(build_app(options, ServeConfig(weights=str(tiny_weights)), Settings(**SETTINGS)), name="editrt",
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    with httpx.Client(base_url=cluster, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def photo():
    return small_photo()


def open_session(client, photo) -> tuple[str, str]:
    """(session id, the replica that answered)."""
    r = client.post("/v1/sessions", json={"image": b64png(photo), "seed": 4})
    assert r.status_code == 200, r.text
    return r.json()["id"], r.headers[REPLICA]


def metrics_of(client, session_id: str) -> str:
    """/metrics of the replica holding `session_id`: Ray Serve's multiplexed-id header routes it there."""
    r = client.get("/metrics", headers={"serve_multiplexed_model_id": session_id})
    assert r.status_code == 200 and r.headers[REPLICA] == session_id.split(".")[0], r.text
    return r.text


def gauge(text: str, name: str, **labels: str) -> float:
    """The one sample `name{labels}` of a Prometheus text page (parsed by prometheus_client: label order is free)."""
    from prometheus_client.parser import text_string_to_metric_families

    values = [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
              if sample.name == name and sample.labels == labels]
    assert len(values) == 1, (name, labels, values)
    return values[0]


@contextlib.contextmanager
def torch_threads(count: int):
    """PyTorch CPU results depend on the intra-op thread count in their last bits (1 of 255 here for an
    inpainting pass): the reference runs with as many threads as a replica (RayOptions.cpu_threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_one_shot_requests_equal_the_single_process_server(client, reposition, elements_pipe, photo):
    from fastapi.testclient import TestClient

    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[16:44, 24:64] = 255
    requests = [("/v1/segment", {"image": b64png(photo), "points": [[48, 30], [10, 50]], "labels": [1, 0]}),
                ("/v1/inpaint", {"image": b64png(photo), "mask": b64png(mask), "steps": 2, "seed": 7,
                                 "task": "remove"})]
    app = create_app(reposition=reposition, elements=elements_pipe, settings=Settings(**SETTINGS))
    with torch_threads(OPTIONS.cpu_threads), TestClient(app, base_url="http://127.0.0.1") as local:  # a loopback Host, as a no-token server asks
        for path, body in requests:
            expected = local.post(path, json=body)
            assert expected.status_code == 200, expected.text
            answered = set()
            for _ in range(4):  # one-shot requests go to either replica; each must give the same bytes
                r = client.post(path, json=body)
                assert r.status_code == 200, r.text
                assert r.content == expected.content, f"{path}: the deployment changed the result"
                answered.add(r.headers[REPLICA])
    assert answered and all(re.fullmatch(r"[a-z0-9]+", a) for a in answered)


def test_a_sessions_requests_all_reach_its_replica(client, cluster, photo):
    sessions = [open_session(client, photo) for _ in range(2)]
    # New sessions go to the replica holding the fewest: two sessions, two replicas.
    assert len({replica for _, replica in sessions}) == 2, sessions
    for sid, replica in sessions:
        assert sid.startswith(replica + ".")  # the id names its replica: routing needs nothing else
        seen = []
        r = client.post(f"/v1/sessions/{sid}/select", json={"points": [[48, 30]]})
        assert r.status_code == 200, r.text
        seen.append(r.headers[REPLICA])
        for dx in (2, 5, 9):
            r = client.post(f"/v1/sessions/{sid}/preview", json={"dx": dx, "dy": 1})
            assert r.status_code == 200, r.text
            seen.append(r.headers[REPLICA])
        r = client.post(f"/v1/sessions/{sid}/final", json={"dx": 9, "dy": 1})
        assert r.status_code == 200, r.text
        seen.append(r.headers[REPLICA])
        r = client.get(f"/v1/sessions/{sid}")
        assert r.status_code == 200 and r.json()["undo"] == 1, r.text
        seen.append(r.headers[REPLICA])
        assert set(seen) == {replica}, seen
        # The drag WebSocket (a browser cannot set headers on it) is routed by its path alone.
        r = client.post(f"/v1/sessions/{sid}/select", json={"points": [[40, 30]]})
        assert r.status_code == 200, r.text
        with connect(f"{cluster.replace('http', 'ws', 1)}/v1/sessions/{sid}/drag", open_timeout=60) as ws:
            assert ws.response.headers[REPLICA] == replica
            ws.send(json.dumps({"type": "drag", "dx": 3, "dy": 0, "seq": 1}))
            m = json.loads(ws.recv(timeout=120))
            assert m["type"] == "preview" and m["seq"] == 1, m
            ws.send(json.dumps({"type": "release", "dx": 4, "dy": 0, "seq": 2}))
            m = json.loads(ws.recv(timeout=120))
            while m["type"] == "preview":
                m = json.loads(ws.recv(timeout=120))
            assert m["type"] == "final" and m["seq"] == 2 and m["undo"] == 2, m


def test_counters_add_up_over_the_replicas(client, photo):
    """Both replicas write their counters to RayOptions.metrics_dir: either replica's /metrics reports the sum,
    so the sessions opened on both (one each) count on each page."""
    sessions = [open_session(client, photo) for _ in range(2)]
    assert len({replica for _, replica in sessions}) == 2, sessions
    opened = [gauge(metrics_of(client, sid), "editrt_requests_total", endpoint="/v1/sessions", method="POST",
                    status="200") for sid, _ in sessions]
    assert opened[0] == opened[1] >= 2, opened
    for sid, _ in sessions:
        client.delete(f"/v1/sessions/{sid}")


def test_eviction_closes_the_least_recently_used_session(client, cluster, photo):
    first, home = open_session(client, photo)
    assert client.post(f"/v1/sessions/{first}/select", json={"points": [[48, 30]]}).status_code == 200
    assert client.post(f"/v1/sessions/{first}/preview", json={"dx": 6}).status_code == 200  # caches a REMOVE pass
    remove_passes = dict(name="editrt_cache_bytes", pipeline="reposition", cache="remove passes")
    assert gauge(metrics_of(client, first), **remove_passes) > 0
    newer = []
    for _ in range(2 * SESSIONS_PER_REPLICA + 2):  # new sessions alternate between the two replicas
        sid, replica = open_session(client, photo)
        if replica == home:
            newer.append(sid)
        if len(newer) == SESSIONS_PER_REPLICA:
            break
    assert len(newer) == SESSIONS_PER_REPLICA, newer
    # `first` was the least recently used of `home`'s sessions: the multiplexer evicted it.
    r = client.get(f"/v1/sessions/{first}")
    assert r.status_code == 410 and r.headers[REPLICA] == home, r.text
    body = r.json()
    assert body["error"] == "gone" and body["field"] == "session_id" and first in body["message"], body
    r = client.post(f"/v1/sessions/{first}/preview", json={"dx": 6})
    assert r.status_code == 410 and first in r.json()["message"]
    for sid in newer:
        assert client.get(f"/v1/sessions/{sid}").status_code == 200
    # Eviction closed the session: its REMOVE passes left the pipeline's cache (every session of
    # `home` that previewed is older than `first`, so evicted too); the replica holds exactly its cap.
    deadline = time.monotonic() + 20
    while True:
        text = metrics_of(client, newer[-1])
        if gauge(text, **remove_passes) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert gauge(text, **remove_passes) == 0
    assert gauge(text, "editrt_sessions_open") == SESSIONS_PER_REPLICA
    assert gauge(text, "editrt_sessions_evicted_total", reason="lru") >= 1
    # The drag WebSocket of an evicted session is refused with the same message.
    with pytest.raises(InvalidStatus) as refused:  # closed before the handshake: HTTP 403
        connect(f"{cluster.replace('http', 'ws', 1)}/v1/sessions/{first}/drag", open_timeout=60)
    assert refused.value.response.status_code == 403


def test_unknown_sessions_are_gone_not_errors(client, photo):
    sid, replica = open_session(client, photo)
    for unknown in (f"{replica}.not-a-session", "noreplica.not-a-session"):
        r = client.get(f"/v1/sessions/{unknown}")
        assert r.status_code == 410, r.text
        assert r.json()["field"] == "session_id" and unknown in r.json()["message"]
    assert client.get(f"/v1/sessions/{sid}").status_code == 200  # asking about unknown ids evicted nothing
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    r = client.get(f"/v1/sessions/{sid}")
    assert r.status_code == 410 and sid in r.json()["message"]


@pytest.mark.parametrize("options, message", [
    (dict(replicas=0), "--replicas: expected a positive number, got 0"),
    (dict(replicas=5, max_replicas=4), "--replicas 5: expected between --min-replicas (1) and --max-replicas (4)"),
    (dict(replicas=1, min_replicas=2), "--replicas 1: expected between --min-replicas (2)"),
    (dict(gpus_per_replica=-1), "--gpus-per-replica: expected a non-negative number, got -1"),
    (dict(sessions_per_replica=0), "--sessions-per-replica: expected a positive number"),
    (dict(target_ongoing_requests=20), "--target-ongoing-requests 20: expected less than the 16"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(InputError, match=re.escape(message)):
        RayOptions(**options).check()


def test_autoscaling_options_are_what_ray_serve_accepts():
    options = RayOptions(replicas=2, min_replicas=1, max_replicas=4, target_ongoing_requests=3, gpus_per_replica=0.5)
    deployment = serve.deployment(**options.deployment_options())(EditrtReplica)
    config = deployment._deployment_config.autoscaling_config  # what Ray Serve validated and will apply
    assert (config.min_replicas, config.initial_replicas, config.max_replicas) == (1, 2, 4)
    assert config.target_ongoing_requests == 3 and config.downscale_delay_s >= 60
    assert deployment.ray_actor_options["num_gpus"] == 0.5
    fixed = serve.deployment(**RayOptions(replicas=3).deployment_options())(EditrtReplica)
    assert fixed.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None


def test_autoscaling_adds_a_replica_within_seconds_of_demand(cluster, tiny_weights, photo):
    """README: with autoscaling, a replica is added after 5 s above the target. A second app on the running cluster
    (1 to 2 replicas, target 1 ongoing request) gets three clients sending inpainting passes back to back; the
    replicas Ray reports for it (serve.status) reach 2 within 90 s, which an upscale delay beyond that bound cannot
    give. The app is deleted at the end, also on failure."""
    name = "editrt-scaling"
    options = RayOptions(replicas=1, min_replicas=1, max_replicas=2, target_ongoing_requests=1, cpus_per_replica=0.5,
                         sessions_per_replica=SESSIONS_PER_REPLICA, name=name)
    serve.run(build_app(options, ServeConfig(weights=str(tiny_weights)), Settings(**SETTINGS)), name=name,
              route_prefix="/scaling")
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[20:44, 30:66] = 255
    body = {"image": b64png(photo), "mask": b64png(mask), "steps": 8}
    stop, statuses = threading.Event(), []

    def client_loop():
        with httpx.Client(base_url=cluster, timeout=120) as c:
            while not stop.is_set():
                statuses.append(c.post("/scaling/v1/inpaint", json=body).status_code)

    def replicas() -> int:
        deployment = serve.status().applications[name].deployments[name]
        return sum(deployment.replica_states.values())

    clients = [threading.Thread(target=client_loop, daemon=True) for _ in range(3)]
    try:
        assert replicas() == 1
        started = time.monotonic()
        for thread in clients:
            thread.start()
        while replicas() < 2 and time.monotonic() - started < 90:
            time.sleep(0.5)
        waited = time.monotonic() - started
        assert replicas() == 2, f"still one replica {waited:.0f} s into three clients' load (target 1 each)"
        assert statuses and set(statuses) == {200}, statuses
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=150)
        serve.delete(name)


def test_the_session_check_keeps_the_apps_token_rule():
    """Without the token the 410 check is skipped (the app answers 401), so an unauthenticated client
    neither learns what a replica holds nor touches its sessions' LRU order."""
    from editrt.runtime.server.ray_deployment import _authorized

    def scope(kind="http", header=None, query=b"", subprotocols=()):
        return {"type": kind, "headers": [(b"authorization", header)] if header else [], "query_string": query,
                "subprotocols": list(subprotocols)}

    assert _authorized(scope(), None)
    assert _authorized(scope(header=b"Bearer s3cret"), "s3cret")
    assert not _authorized(scope(header=b"Bearer wrong"), "s3cret")
    assert not _authorized(scope(), "s3cret")
    assert not _authorized(scope(query=b"token=s3cret"), "s3cret")  # never a token in the URL (logs keep it)
    assert not _authorized(scope("websocket", query=b"token=s3cret"), "s3cret")
    assert _authorized(scope("websocket", subprotocols=("editrt", "bearer.s3cret")), "s3cret")
    assert not _authorized(scope("websocket", subprotocols=("editrt", "bearer.nope")), "s3cret")
