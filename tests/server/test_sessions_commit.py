"""The server's sessions are translators: a final is the session's commit, run with the request's stop flag
as its step_callback, so a client that goes away stops it at the next denoising step and the session keeps
its image (issue 22's leftover, issue 23); elements drags change nothing until released."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from needs import need
from serving import b64png, decode, small_photo, start_server

websockets = need("websockets.sync.client", reason="websockets is not installed")


class _GatedUNet:
    """The inpainting UNet, counting its calls; the first call waits until the test opens the gate."""

    def __init__(self, engine):
        self.engine, self.calls = engine, 0
        self.entered, self.gate = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, **inputs):
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.gate.wait(60), "the test never opened the gate"
        return self.engine(**inputs)


def test_a_final_whose_client_went_away_stops_and_keeps_the_session(tiny_weights):
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights)
    photo = small_photo()
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[20:50, 30:70] = 255
    unet = _GatedUNet(pipe.engines["inpaint_unet"])
    with start_server(pipe, max_steps=8) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        sid = c.post("/v1/sessions", json={"image": b64png(photo), "steps": 8}).json()["id"]
        c.post(f"/v1/sessions/{sid}/select", json={"mask": b64png(mask)}).raise_for_status()
        pipe.engines["inpaint_unet"] = unet
        body = json.dumps({"dx": 6, "dy": 2}).encode()
        host, port = server.url.removeprefix("http://").split(":")
        client = socket.create_connection((host, int(port)), timeout=30)
        try:
            client.sendall(f"POST /v1/sessions/{sid}/final HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                           f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            assert unet.entered.wait(60)  # the final is inside its first denoising step
            client.close()  # the client goes away
            time.sleep(0.5)  # the server notices (it polls every 0.1 s)
        finally:
            client.close()
            unet.gate.set()
        deadline = time.monotonic() + 30
        while 'endpoint="/v1/sessions/{session_id}/final",method="POST",status="499"' not in c.get("/metrics").text:
            assert time.monotonic() < deadline, "the abandoned final was not stopped"
            time.sleep(0.1)
        assert unet.calls == 1  # stopped after the step it was in, not after all 8
        info = c.get(f"/v1/sessions/{sid}", params={"image": True}).json()
        assert info["undo"] == 0 and info["selected"]  # the stopped commit changed nothing
        np.testing.assert_array_equal(decode(info["image"]), photo)


def test_an_elements_drag_changes_nothing_until_released(server, photo_small):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        s = c.post("/v1/sessions", json={"image": b64png(photo_small), "kind": "elements"}).json()
        sid, before = s["id"], {e["id"]: e for e in s["items"]}
        target = max(before.values(), key=lambda e: e["w"] * e["h"])["id"]
        with websockets.connect(f"{server.ws_url}/v1/sessions/{sid}/drag", open_timeout=30) as ws:
            ws.send(json.dumps({"type": "drag", "ids": [target], "dx": 3, "dy": 0, "seq": 1}))
            assert json.loads(ws.recv(timeout=120))["type"] == "preview"
            dragging = {e["id"]: e for e in c.get(f"/v1/sessions/{sid}").json()["items"]}
            assert dragging == before  # a preview renders a moved copy: the session's elements did not move
            ws.send(json.dumps({"type": "release", "seq": 2}))  # an elements release names what it moves
            m = json.loads(ws.recv(timeout=120))
            assert m["type"] == "error" and m["field"] == "ids"
            ws.send(json.dumps({"type": "release", "ids": [target], "dx": 3, "dy": 0, "seq": 3}))
            m = json.loads(ws.recv(timeout=120))
            assert m["type"] == "final" and m["undo"] == 1
        after = {e["id"]: e for e in c.get(f"/v1/sessions/{sid}").json()["items"]}
        assert after[target]["x"] == pytest.approx(before[target]["x"] + 3)
        undone = c.post(f"/v1/sessions/{sid}/undo").json()
        assert {e["id"]: e for e in undone["items"]} == before and undone["undo"] == 0


def test_a_repositioning_session_refuses_element_ids(server, photo_small):
    """`ids` moves elements; a repositioning session answers 422 naming it (HTTP and WebSocket alike) instead of
    moving its subject as if the ids were not there; the socket stays open and serves the next message."""
    mask = np.zeros(photo_small.shape[:2], np.uint8)
    mask[20:50, 30:70] = 255
    with httpx.Client(base_url=server.url, timeout=60) as c:
        sid = c.post("/v1/sessions", json={"image": b64png(photo_small), "steps": 1, "preview_steps": 1}).json()["id"]
        c.post(f"/v1/sessions/{sid}/select", json={"mask": b64png(mask)}).raise_for_status()
        for route in ("preview", "final"):
            r = c.post(f"/v1/sessions/{sid}/{route}", json={"dx": 4, "dy": 0, "ids": [0]})
            assert r.status_code == 422 and r.json()["field"] == "ids", (route, r.text)
        assert c.get(f"/v1/sessions/{sid}").json()["undo"] == 0  # the refused final committed nothing
        with websockets.connect(f"{server.ws_url}/v1/sessions/{sid}/drag", open_timeout=30) as ws:
            for seq, kind in enumerate(("drag", "release")):
                ws.send(json.dumps({"type": kind, "ids": [0], "dx": 4, "dy": 0, "seq": seq}))
                m = json.loads(ws.recv(timeout=120))
                assert (m["type"], m["seq"], m["status"], m["field"]) == ("error", seq, 422, "ids"), m
            ws.send(json.dumps({"type": "drag", "dx": 4, "dy": 0, "seq": 9}))
            m = json.loads(ws.recv(timeout=120))
            assert (m["type"], m["seq"]) == ("preview", 9)
