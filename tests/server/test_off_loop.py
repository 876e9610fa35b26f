"""CPU work a route does itself runs on a worker thread, never on the event loop that serves every other request:
PNG encoding of image answers and compressing an elements blob (routers/common.png_response, stateless.partition).

Each is observed where it runs (the real function is still called): inside the event loop's thread
asyncio.get_running_loop() answers, on a worker thread it raises.
"""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from serving import b64png


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def where_it_runs(module, name: str, monkeypatch) -> list[str]:
    """Wrap module.name so each call records 'loop' or 'worker'; returns the record."""
    seen, real = [], getattr(module, name)

    def recording(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            seen.append("loop")
        except RuntimeError:
            seen.append("worker")
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, recording)
    return seen


def test_png_answers_are_encoded_off_the_loop(client, photo_small, monkeypatch):
    from editrt.runtime.server.routers import common

    seen = where_it_runs(common, "png_bytes", monkeypatch)
    r = client.post("/v1/segment", json={"image": b64png(photo_small), "points": [[60, 40]]})
    assert r.status_code == 200, r.text
    mask = np.zeros(photo_small.shape[:2], np.uint8)
    mask[20:50, 30:70] = 255
    r = client.post("/v1/inpaint", json={"image": b64png(photo_small), "mask": b64png(mask), "steps": 1})
    assert r.status_code == 200, r.text
    assert seen == ["worker", "worker"]


def test_elements_blobs_are_compressed_off_the_loop(client, photo_small, monkeypatch):
    from editrt.runtime.server.routers import stateless

    seen = where_it_runs(stateless, "to_blob", monkeypatch)
    r = client.post("/v1/elements/partition", json={"image": b64png(photo_small), "grid": 4})
    assert r.status_code == 200, r.text
    blob = r.json()["elements"]
    r = client.post("/v1/elements/edit", json={"elements": blob, "ops": [{"op": "delete", "ids": [r.json()["items"][0]["id"]]}]})
    assert r.status_code == 200, r.text
    assert seen == ["worker", "worker"]


def test_elements_preview_snapshots_are_made_off_the_loop(client, server, photo_small, monkeypatch):
    """An elements preview starts with the session's snapshot: a copy of its elements with the move applied (every
    region drawn to find collisions; long with many elements or large regions). It is made on a worker thread,
    over HTTP and over the drag WebSocket, and the preview still answers. So is the hit test of elements/select
    (the regions under the point drawn)."""
    import json

    from needs import need

    from editrt.runtime.session import ElementsSession

    websockets = need("websockets.sync.client", reason="websockets is not installed")
    s = client.post("/v1/sessions", json={"image": b64png(photo_small), "kind": "elements", "preview_steps": 1})
    assert s.status_code == 200, s.text
    sid, items = s.json()["id"], s.json()["items"]
    target = max(items, key=lambda e: e["w"] * e["h"])["id"]
    from editrt.runtime.elements import Elements

    hit_tests = where_it_runs(Elements, "select", monkeypatch)
    r = client.post(f"/v1/sessions/{sid}/elements/select", json={"point": [60, 40]})
    assert r.status_code == 200 and hit_tests == ["worker"], (r.text, hit_tests)
    seen = where_it_runs(ElementsSession, "edited", monkeypatch)
    r = client.post(f"/v1/sessions/{sid}/preview", json={"ids": [target], "dx": 3, "dy": 0})
    assert r.status_code == 200, r.text
    with websockets.connect(f"{server.ws_url}/v1/sessions/{sid}/drag", open_timeout=30) as ws:
        ws.send(json.dumps({"type": "drag", "ids": [target], "dx": 2, "dy": 1, "seq": 1}))
        m = json.loads(ws.recv(timeout=120))
        assert (m["type"], m["seq"]) == ("preview", 1), m
    assert seen == ["worker", "worker"]
