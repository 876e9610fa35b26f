"""What the server refuses, and that it keeps serving afterwards: token, sizes, bombs, formats, fields,
session caps and TTL, a full work queue (503 + Retry-After)."""
from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from needs import need
from PIL import Image
from serving import b64png, png, small_photo, start_server

websockets = need("websockets.sync.client", reason="websockets is not installed")
from websockets.exceptions import InvalidStatus  # noqa: E402

TOKEN = "s3cret-token"


def error(r, status: int, field: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["field"] == field, body
    assert body["message"] and body["error"]
    return body


@pytest.fixture(scope="module")
def guarded(reposition, elements_pipe):
    with start_server(reposition, elements_pipe, token=TOKEN, max_sessions=2, max_steps=4) as server:
        yield server


@pytest.fixture(scope="module")
def auth(guarded):
    with httpx.Client(base_url=guarded.url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


def test_token_on_every_endpoint_and_the_websocket(guarded, auth):
    schema = auth.get("/openapi.json").json()
    with httpx.Client(base_url=guarded.url, timeout=30) as anon:
        for path, methods in schema["paths"].items():
            for method in methods:
                url = path.replace("{session_id}", "x")
                r = anon.request(method, url, json={})
                error(r, 401, "authorization")
                assert r.headers["www-authenticate"] == "Bearer"
                r = anon.request(method, url, json={}, headers={"Authorization": "Bearer wrong"})
                error(r, 401, "authorization")
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            assert anon.get(path).status_code == 401, path
        assert anon.get("/").status_code == 200  # the page itself: static, no data
    assert auth.get("/healthz").status_code == 200
    sid = auth.post("/v1/sessions", json={"image": b64png(small_photo())}).json()["id"]
    with pytest.raises(InvalidStatus):
        websockets.connect(f"{guarded.ws_url}/v1/sessions/{sid}/drag", open_timeout=10)
    with pytest.raises(InvalidStatus):
        websockets.connect(f"{guarded.ws_url}/v1/sessions/{sid}/drag", subprotocols=["editrt", "bearer.wrong"],
                           open_timeout=10)
    with pytest.raises(InvalidStatus):  # never in the URL: access logs and browser histories keep URLs
        websockets.connect(f"{guarded.ws_url}/v1/sessions/{sid}/drag?token={TOKEN}", open_timeout=10)
    with websockets.connect(f"{guarded.ws_url}/v1/sessions/{sid}/drag", subprotocols=["editrt", f"bearer.{TOKEN}"],
                            open_timeout=10) as ws:
        assert ws.subprotocol == "editrt"
        ws.send(json.dumps({"type": "drag", "dx": 1}))
        assert json.loads(ws.recv(timeout=30))["field"] == "selected"  # authenticated: the session answers


def bomb_png(width: int, height: int) -> bytes:
    """A valid grey PNG of width x height zeros, compressed row by row (never held in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z, row, parts = zlib.compressobj(9), b"\x00" * (width + 1), []
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def test_sizes_bombs_and_formats(auth):
    bomb = bomb_png(8000, 8000)  # 64 Mpx of zeros in ~60 KB; the test server allows 1 Mpx
    assert len(bomb) < 200_000
    t0 = time.perf_counter()
    body = error(auth.post("/v1/segment", json={"image": base64.b64encode(bomb).decode(), "points": [[1, 1]]}),
                 413, "image")
    assert "8000x8000" in body["message"]
    assert time.perf_counter() - t0 < 5  # refused from the header: decoding 64 Mpx would take longer
    error(auth.post("/v1/segment", files={"image": ("b.png", bomb, "image/png")}, data={"points": "[[1, 1]]"}),
          413, "image")
    error(auth.post("/v1/segment", content=b"x" * (3 << 20), headers={"content-type": "application/json"}),
          413, "content-length")
    error(auth.post("/v1/segment", content=b"image=1", headers={"content-type": "text/plain"}), 415, "content-type")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    error(auth.post("/v1/segment", json={"image": base64.b64encode(gif.getvalue()).decode(), "points": [[1, 1]]}),
          415, "image")
    error(auth.post("/v1/segment", files={"image": ("p.png", png(small_photo()), "image/jpeg")},
                    data={"points": "[[1, 1]]"}), 415, "image")
    truncated = png(small_photo())[:300]
    error(auth.post("/v1/segment", json={"image": base64.b64encode(truncated).decode(), "points": [[1, 1]]}),
          400, "image")
    error(auth.post("/v1/segment", json={"image": "%%%not base64", "points": [[1, 1]]}), 422, "image")


@pytest.mark.parametrize("body, field", [
    ({"points": [[1, 1]]}, "image"),
    ({"image": "IMG", "points": "x"}, "points"),
    ({"image": "IMG", "points": [[1, 2, 3]]}, "points.0"),
    ({"image": "IMG", "points": [[1e9, 1]]}, "points.0.0"),
    ({"image": "IMG", "points": [[500, 10]]}, "points"),  # outside the 120x80 image: the pipeline says so
    ({"image": "IMG", "points": [[10, 10]], "labels": [1, 0]}, "labels"),
    ({"image": "IMG", "points": [[10, 10]], "labels": [7]}, "labels.0"),
    ({"image": "IMG", "box": [50, 50, 10, 10]}, "box"),
    ({"image": "IMG"}, "points"),
    ({"image": "IMG", "points": [[10, 10]], "colour": "red"}, "colour"),
])
def test_bad_segment_fields_are_named(auth, body, field):
    img = b64png(small_photo())
    body = {k: img if v == "IMG" else v for k, v in body.items()}
    error(auth.post("/v1/segment", json=body), 422, field)


def test_bad_fields_elsewhere_are_named(auth):
    img = b64png(small_photo())
    small_mask = b64png(np.full((10, 10), 255, np.uint8))
    error(auth.post("/v1/inpaint", json={"image": img, "mask": small_mask}), 422, "mask")  # size differs
    error(auth.post("/v1/inpaint", json={"image": img, "mask": img, "steps": 5}), 422, "steps")  # > max_steps 4
    error(auth.post("/v1/inpaint", json={"image": img, "mask": img, "task": "paint"}), 422, "task")
    error(auth.post("/v1/reposition", json={"image": img, "points": [[60, 40]], "move": [5000, 0], "steps": 1}),
          422, "move")
    error(auth.post("/v1/reposition", content=b'{"image": "a", "move": [NaN, 1]}',
                    headers={"content-type": "application/json"}), 422, "move.0")
    error(auth.post("/v1/elements/edit", json={"elements": {"doc": {}, "data": "AAAA"},
                                               "ops": [{"op": "delete", "ids": [0]}]}), 422, "elements.doc")
    error(auth.post("/v1/sessions/nope/select", json={"points": [[1, 1]]}), 404, "session_id")
    error(auth.post("/v1/sessions", json={"image": img, "kind": "video"}), 422, "kind")
    error(auth.get("/v1/nothing"), 404, "path")
    assert auth.get("/healthz").status_code == 200  # and the server still answers


def test_session_lru_cap(guarded, auth):
    img = b64png(small_photo())
    ids = [auth.post("/v1/sessions", json={"image": img}).json()["id"] for _ in range(2)]
    assert auth.get(f"/v1/sessions/{ids[0]}").status_code == 200  # now ids[1] is the least recently used
    ids.append(auth.post("/v1/sessions", json={"image": img}).json()["id"])
    assert len(guarded.state.sessions) == 2
    error(auth.get(f"/v1/sessions/{ids[1]}"), 404, "session_id")
    assert auth.get(f"/v1/sessions/{ids[0]}").status_code == 200
    assert auth.get(f"/v1/sessions/{ids[2]}").status_code == 200
    assert guarded.state.sessions.evicted["lru"] >= 1


def test_session_ttl(reposition):
    with start_server(reposition, session_ttl_s=1.0) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        sid = c.post("/v1/sessions", json={"image": b64png(small_photo())}).json()["id"]
        assert c.get(f"/v1/sessions/{sid}").status_code == 200
        time.sleep(2.5)  # > ttl; the sweeper runs every ttl/4
        error(c.get(f"/v1/sessions/{sid}"), 404, "session_id")
        assert server.state.sessions.evicted["ttl"] == 1


def test_session_byte_budget(reposition):
    photo = small_photo()
    with start_server(reposition, session_bytes=int(photo.nbytes * 1.5)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as c:
        first = c.post("/v1/sessions", json={"image": b64png(photo)}).json()["id"]
        second = c.post("/v1/sessions", json={"image": b64png(photo)}).json()["id"]
        error(c.get(f"/v1/sessions/{first}"), 404, "session_id")
        assert c.get(f"/v1/sessions/{second}").status_code == 200
        assert server.state.sessions.evicted["bytes"] == 1
        big = small_photo(240, 160)
        error(c.post("/v1/sessions", json={"image": b64png(big)}), 413, "image")  # alone over the budget


def test_full_queue_answers_503_and_recovers(tiny_weights):
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights, max_waiting=2)
    photo = b64png(small_photo())
    with start_server(pipe) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        gate, holding = threading.Event(), threading.Event()
        blocker = threading.Thread(target=lambda: pipe.work.run(lambda: (holding.set(), gate.wait(30))))
        blocker.start()  # holds the pipeline's turn, as a long final would
        try:
            assert holding.wait(10)
            with ThreadPoolExecutor(6) as pool:
                futures = [pool.submit(c.post, "/v1/segment", json={"image": photo, "points": [[60, 40]]})
                           for _ in range(6)]
                time.sleep(1.0)
                gate.set()
                responses = [f.result() for f in futures]
        finally:
            gate.set()
            blocker.join()
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
        busy = next(r for r in responses if r.status_code == 503)
        error(busy, 503, "queue")
        assert int(busy.headers["retry-after"]) >= 1
        assert "editrt_busy_total" in c.get("/metrics").text
        assert c.post("/v1/segment", json={"image": photo, "points": [[60, 40]]}).status_code == 200


def test_readyz_waits_for_the_warm_up(reposition):
    with start_server(reposition, warmup=True) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        deadline = time.monotonic() + 60
        states = []
        while time.monotonic() < deadline:
            r = c.get("/readyz")
            states.append(r.status_code)
            if r.status_code == 200:
                break
            time.sleep(0.05)
        assert states[-1] == 200 and r.json()["warm"] is True
        assert all(s in (200, 503) for s in states)
