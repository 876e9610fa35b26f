"""The endpoints against the library they wrap, on a real uvicorn server over the tiny pipelines.

The server must not change results: each stateless endpoint's PNG equals what the pipeline
returns for the same inputs, bit for bit (PNG is lossless). Sessions: select -> mask, preview,
final (which becomes the image), undo (which restores it). The drag WebSocket is latest-wins:
positions that arrive while a preview runs are dropped, never queued.
"""
from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from needs import need
from serving import b64png, decode, png

websockets = need("websockets.sync.client", reason="websockets is not installed")


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def test_segment_equals_the_pipeline(client, reposition, photo_small):
    prompt = {"points": [[60, 40], [20, 70]], "labels": [1, 0]}  # a background click: labels must get through
    r = client.post("/v1/segment", json={"image": b64png(photo_small), **prompt})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert float(r.headers["x-pipeline-ms"]) > 0 and float(r.headers["x-server-ms"]) >= float(r.headers["x-pipeline-ms"])
    expected = reposition.segment(photo_small, **prompt)
    assert not np.array_equal(expected, reposition.segment(photo_small, points=prompt["points"]))
    assert np.array_equal(decode(r.content, "L") > 127, expected)


def test_multipart_upload_equals_json(client, photo_small):
    files = {"image": ("photo.png", png(photo_small), "image/png")}
    r = client.post("/v1/segment", files=files, data={"points": "[[60, 40]]"})
    j = client.post("/v1/segment", json={"image": b64png(photo_small), "points": [[60, 40]]})
    assert r.status_code == j.status_code == 200
    assert r.content == j.content


def test_reposition_and_inpaint_equal_the_pipeline(client, reposition, photo_small):
    mask = np.zeros(photo_small.shape[:2], np.uint8)
    mask[20:50, 30:70] = 255
    body = {"image": b64png(photo_small), "mask": b64png(mask), "move": [9, -4], "steps": 2, "seed": 3}
    r = client.post("/v1/reposition", json=body)
    assert r.status_code == 200, r.text
    expected = reposition(photo_small, mask=mask > 127, move=(9, -4), steps=2, seed=3).image
    assert np.array_equal(decode(r.content), np.asarray(expected))
    r = client.post("/v1/inpaint", json={"image": body["image"], "mask": body["mask"], "steps": 2, "task": "complete"})
    assert r.status_code == 200, r.text
    expected = reposition.inpaint(photo_small, mask > 127, task="complete", steps=2)
    assert np.array_equal(decode(r.content), np.asarray(expected))


def test_elements_partition_edit_render(client, server, elements_pipe, photo_small):
    r = client.post("/v1/elements/partition", json={"image": b64png(photo_small), "grid": 4})
    assert r.status_code == 200, r.text
    part = r.json()
    h, w = photo_small.shape[:2]
    assert decode(part["overlay"]).shape == (h, w, 3)
    assert all(0 <= e["x"] <= w and 0 <= e["y"] <= h for e in part["items"])
    victim = part["items"][0]["id"]
    r = client.post("/v1/elements/edit", json={"elements": part["elements"], "ops": [{"op": "delete", "ids": [victim]}]})
    assert r.status_code == 200, r.text
    edited = r.json()
    assert victim not in [e["id"] for e in edited["items"]] and edited["deleted"] == [victim]
    r = client.post("/v1/elements/render", json={"elements": edited["elements"], "steps": 2, "seed": 1})
    assert r.status_code == 200, r.text
    from editrt.runtime.server.routers.elements_io import from_blob
    from editrt.runtime.server.schemas import ElementsBlob

    expected = elements_pipe.decode(from_blob(ElementsBlob(**edited["elements"]), server.state.settings), steps=2, seed=1)
    assert np.array_equal(decode(r.content), np.asarray(expected))


def _session(client, photo, **extra) -> dict:
    r = client.post("/v1/sessions", json={"image": b64png(photo), **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_session_select_final_undo(client, photo_small):
    s = _session(client, photo_small)
    sid = s["id"]
    assert (s["width"], s["height"]) == (120, 80) and not s["selected"]
    r = client.post(f"/v1/sessions/{sid}/final", json={"dx": 5})
    assert r.status_code == 409 and r.json()["field"] == "selected"
    r = client.post(f"/v1/sessions/{sid}/select", json={"points": [[60, 40]]})
    assert r.status_code == 200 and r.json()["area"] > 0
    r = client.post(f"/v1/sessions/{sid}/preview", json={"dx": 6, "dy": 2})
    assert r.status_code == 200, r.text
    r = client.post(f"/v1/sessions/{sid}/final", json={"dx": 6, "dy": 2})
    assert r.status_code == 200, r.text
    final = decode(r.json()["image"])
    assert not np.array_equal(final, photo_small)
    info = client.get(f"/v1/sessions/{sid}", params={"image": True}).json()
    assert info["undo"] == 1 and not info["selected"] and np.array_equal(decode(info["image"]), final)
    r = client.post(f"/v1/sessions/{sid}/undo")
    assert r.status_code == 200 and np.array_equal(decode(r.json()["image"]), photo_small)
    assert client.post(f"/v1/sessions/{sid}/undo").json()["field"] == "undo"
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert client.get(f"/v1/sessions/{sid}").status_code == 404


def test_drag_websocket_is_latest_wins(client, server, photo_small):
    sid = _session(client, photo_small)["id"]
    client.post(f"/v1/sessions/{sid}/select", json={"points": [[60, 40]]}).raise_for_status()
    metrics = server.state.metrics
    dropped_before = metrics.value("ws_messages", ("dropped",))
    with websockets.connect(f"{server.ws_url}/v1/sessions/{sid}/drag", open_timeout=30) as ws:
        ws.send(json.dumps({"type": "drag", "dx": 1, "dy": 0, "seq": 0}))
        time.sleep(0.05)  # the first preview is running: these 20 arrive while it runs
        for seq in range(1, 21):
            ws.send(json.dumps({"type": "drag", "dx": 1 + seq, "dy": 0, "seq": seq}))
        seqs = []
        while not seqs or seqs[-1] != 20:  # the newest always runs
            m = json.loads(ws.recv(timeout=120))
            assert m["type"] == "preview", m
            seqs.append(m["seq"])
        # latest wins: a position superseded before its preview started never runs. How many ran depends on how
        # fast this client's 20 sends arrive against one preview's time (under CPU load a few slip in between):
        # in order, and most of them dropped
        assert seqs == sorted(set(seqs)) and seqs[0] == 0 and len(seqs) <= 6, seqs
        ws.send(json.dumps({"type": "drag", "dx": 2, "dy": 2, "seq": 21}))
        ws.send(json.dumps({"type": "release", "dx": 3, "dy": 2, "seq": 22}))  # replaces the pending drag
        m = json.loads(ws.recv(timeout=120))
        while m["type"] == "preview":
            m = json.loads(ws.recv(timeout=120))
        assert m["type"] == "final" and m["seq"] == 22 and m["undo"] == 1
        assert m["timing"]["server_ms"] >= m["timing"]["pipeline_ms"] > 0
        ws.send("not json")
        assert json.loads(ws.recv(timeout=30))["field"] == "message"
        ws.send(json.dumps({"type": "drag", "dx": "far", "seq": 23}))
        assert json.loads(ws.recv(timeout=30))["field"] == "dx"
        ws.send(b"\x00binary")
        assert json.loads(ws.recv(timeout=30))["field"] == "message"
        ws.send(json.dumps({"type": "drag", "dx": 1, "seq": 24}))  # the socket still works
        assert json.loads(ws.recv(timeout=120))["seq"] == 24
    assert metrics.value("ws_messages", ("dropped",)) - dropped_before >= 20 - len(seqs) + 1


def test_elements_session(client, photo_small):
    s = _session(client, photo_small, kind="elements")
    sid, items = s["id"], s["items"]
    assert decode(s["overlay"]).shape == (80, 120, 3)
    big = max(items, key=lambda e: e["w"] * e["h"])
    r = client.post(f"/v1/sessions/{sid}/elements/select", json={"point": [big["x"], big["y"]]})
    assert r.status_code == 200
    target = r.json()["ids"][0]
    r = client.post(f"/v1/sessions/{sid}/elements/edit", json={"ops": [{"op": "delete", "ids": [target]}]})
    assert r.status_code == 200 and target not in [e["id"] for e in r.json()["items"]]
    r = client.post(f"/v1/sessions/{sid}/render", json={"prompt": "a cat"})
    assert r.status_code == 200 and decode(r.json()["image"]).shape[2] == 3
    r = client.post(f"/v1/sessions/{sid}/undo")
    assert target in [e["id"] for e in r.json()["items"]]
    r = client.post(f"/v1/sessions/{sid}/select", json={"points": [[1, 1]]})
    assert r.status_code == 409 and r.json()["field"] == "session_id"


def test_operations(client, server):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["pipelines"] == ["elements", "reposition"]
    text = client.get("/metrics").text
    for name in ("editrt_requests_total{", "editrt_request_seconds_bucket{", "editrt_stage_seconds_bucket{",
                 "editrt_queue_depth{", "editrt_sessions_open ", "editrt_cache_bytes{", "editrt_session_bytes "):
        assert name in text, name
    assert 'endpoint="/v1/segment",method="POST",status="200"' in text
    assert 'phase="run",queue="reposition",stage="segment"' in text  # prometheus_client writes labels sorted
    schema = client.get("/openapi.json").json()
    assert {"/v1/segment", "/v1/sessions", "/v1/sessions/{session_id}/select"} <= set(schema["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "editor.js" in page.text
    assert client.get("/static/editor.js").status_code == 200


def test_a_final_supersedes_a_queued_preview(client, reposition, photo_small):
    """The final jumps the queue and cancels the session's waiting preview: that request gets a 409, not a 500."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    sid = _session(client, photo_small)["id"]
    client.post(f"/v1/sessions/{sid}/select", json={"points": [[60, 40]]}).raise_for_status()
    gate, holding = threading.Event(), threading.Event()
    blocker = threading.Thread(target=lambda: reposition.work.run(lambda: (holding.set(), gate.wait(30))))
    blocker.start()  # holds the pipeline's turn, so both requests wait in its queue
    try:
        assert holding.wait(10)
        with ThreadPoolExecutor(2) as pool:
            preview = pool.submit(client.post, f"/v1/sessions/{sid}/preview", json={"dx": 3})
            time.sleep(0.5)
            final = pool.submit(client.post, f"/v1/sessions/{sid}/final", json={"dx": 4})
            time.sleep(0.5)
            gate.set()
            preview, final = preview.result(), final.result()
    finally:
        gate.set()
        blocker.join()
    assert final.status_code == 200, final.text
    assert preview.status_code == 409 and preview.json()["field"] == "session_id", preview.text


def test_release_cancels_the_queued_preview(client, server, reposition, photo_small):
    """A release while the socket's preview waits in the queue: the preview never runs, the final comes first."""
    import threading

    sid = _session(client, photo_small)["id"]
    client.post(f"/v1/sessions/{sid}/select", json={"points": [[60, 40]]}).raise_for_status()
    gate, holding = threading.Event(), threading.Event()
    with websockets.connect(f"{server.ws_url}/v1/sessions/{sid}/drag", open_timeout=30) as ws:
        blocker = threading.Thread(target=lambda: reposition.work.run(lambda: (holding.set(), gate.wait(30))))
        blocker.start()
        try:
            assert holding.wait(10)
            ws.send(json.dumps({"type": "drag", "dx": 4, "dy": 0, "seq": 1}))
            time.sleep(0.5)  # the preview is queued behind the held turn
            ws.send(json.dumps({"type": "release", "dx": 5, "dy": 0, "seq": 2}))
            time.sleep(0.5)
        finally:
            gate.set()
            blocker.join()
        m = json.loads(ws.recv(timeout=120))
        assert m["type"] == "final" and m["seq"] == 2, m["type"]


def test_reposition_seele_options_equal_the_pipeline(client, reposition, photo_small):
    mask = np.zeros(photo_small.shape[:2], np.uint8)
    mask[20:50, 30:70] = 255
    shadow = np.zeros_like(mask)
    shadow[50:56, 30:80] = 255
    body = {"image": b64png(photo_small), "mask": b64png(mask), "existing_shadow_mask": b64png(shadow), "move": [12, 3],
            "steps": 1, "seed": 2, "scale": "auto", "occlusion": "auto", "matting": True, "trimap_band": 3,
            "new_shadow_box": [70, 60, 110, 70]}
    r = client.post("/v1/reposition", json=body)
    assert r.status_code == 200, r.text
    expected = reposition(photo_small, mask=mask > 127, existing_shadow=shadow > 127, move=(12, 3), steps=1, seed=2,
                          scale="auto", occlusion="auto", matting=True, trimap_band=3, new_shadow_region=(70, 60, 110, 70))
    assert np.array_equal(decode(r.content), np.asarray(expected.image))
    plain = reposition(photo_small, mask=mask > 127, move=(12, 3), steps=1, seed=2).image
    assert not np.array_equal(decode(r.content), np.asarray(plain))  # the options reached the pipeline
    for change, field in ((dict(new_shadow_box=[200, 0, 300, 10]), "new_shadow_box"), (dict(trimap_band=40), "trimap_band"),
                          (dict(scale="big"), "scale"), (dict(occlusion="maybe"), "occlusion")):
        r = client.post("/v1/reposition", json={**body, **change})
        assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_session_shadow_selection_and_seele_drag_options(client, photo_small):
    sid = _session(client, photo_small)["id"]
    mask = np.zeros(photo_small.shape[:2], np.uint8)
    mask[20:50, 30:70] = 255
    r = client.post(f"/v1/sessions/{sid}/select", json={"target": "shadow", "mask": b64png(mask)})
    assert r.status_code == 409 and r.json()["field"] == "selected"
    client.post(f"/v1/sessions/{sid}/select", json={"mask": b64png(mask)}).raise_for_status()
    shadow = np.zeros_like(mask)
    shadow[50:56, 30:80] = 255
    r = client.post(f"/v1/sessions/{sid}/select", json={"target": "shadow", "mask": b64png(shadow)})
    assert r.status_code == 200 and r.json()["area"] == 6 * 50
    assert client.get(f"/v1/sessions/{sid}").json()["shadow"]
    move = {"dx": 10, "dy": 2, "scale": "auto", "matting": True, "trimap_band": 3, "new_shadow_box": [70, 60, 110, 70]}
    r = client.post(f"/v1/sessions/{sid}/preview", json=move)
    assert r.status_code == 200, r.text
    r = client.post(f"/v1/sessions/{sid}/final", json={**move, "trimap_band": 50})
    assert r.status_code == 422 and r.json()["field"] == "trimap_band", r.text
    r = client.post(f"/v1/sessions/{sid}/final", json=move)
    assert r.status_code == 200, r.text
    el = _session(client, photo_small, kind="elements")["id"]
    r = client.post(f"/v1/sessions/{el}/final", json={"ids": [0], "scale": "auto"})
    assert r.status_code == 422 and r.json()["field"] == "scale"


def test_reposition_stage_masks_as_multipart_files_equal_json(client, photo_small):
    mask = np.zeros(photo_small.shape[:2], np.uint8)
    mask[20:50, 30:70] = 255
    region = np.zeros_like(mask)
    region[55:65, 60:100] = 255
    fields = {"move": "[6, 2]", "steps": "1", "harmonize": "true", "matting": "true"}
    files = {name: (f"{name}.png", png(a), "image/png") for name, a in
             (("image", photo_small), ("mask", mask), ("new_shadow_region", region))}
    r = client.post("/v1/reposition", files=files, data=fields)
    j = client.post("/v1/reposition", json={"image": b64png(photo_small), "mask": b64png(mask),
                                            "new_shadow_region": b64png(region), "move": [6, 2], "steps": 1,
                                            "matting": True})
    assert r.status_code == j.status_code == 200, r.text
    assert r.content == j.content


def _crop_scene(photo):
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[20:50, 10:40] = 255
    return mask, {"move": (40, 2)}


def test_reposition_crop_form_fields_reach_the_typed_edit(client, reposition, photo_small):
    """crop_padding / crop_size as multipart form fields: the PNG is the library's result with that crop (a route
    that dropped them would return the uncropped one, which resamples the whole image and differs)."""
    from editrt.runtime.edits import Quality

    mask, edit = _crop_scene(photo_small)
    files = {name: (f"{name}.png", png(a), "image/png") for name, a in (("image", photo_small), ("mask", mask))}
    r = client.post("/v1/reposition", files=files, data={"move": json.dumps(edit["move"]), "steps": "1",
                                                          "crop_padding": "4", "crop_size": "native"})
    assert r.status_code == 200, r.text
    expected = reposition(photo_small, mask=mask, **edit, quality=Quality(steps=1, crop_padding=4, crop_size="native"))
    assert expected.crop_box != (0, 0, 120, 80)
    np.testing.assert_array_equal(decode(r.content), np.asarray(expected.image))


def test_a_session_opened_with_a_crop_renders_with_it(client, server, reposition, photo_small):
    from editrt.runtime.edits import Quality

    mask, edit = _crop_scene(photo_small)
    sid = _session(client, photo_small, crop_padding=4)["id"]
    client.post(f"/v1/sessions/{sid}/select", json={"mask": b64png(mask)}).raise_for_status()
    r = client.post(f"/v1/sessions/{sid}/final", json={"dx": edit["move"][0], "dy": edit["move"][1]})
    assert r.status_code == 200, r.text
    steps = server.state.settings.final_steps
    expected = reposition(photo_small, mask=mask, **edit, quality=Quality(steps=steps, resolution=reposition.default_resolution,
                                                                          crop_padding=4))
    np.testing.assert_array_equal(decode(r.json()["image"]), np.asarray(expected.image))
    client.delete(f"/v1/sessions/{sid}")


def test_a_request_whose_session_closed_while_it_waited_is_404(client, server, photo_small):
    """DELETE, the TTL or an eviction can close a session while one of its jobs waits in the queue: when the
    job runs, the session refuses (InputError field 'session'); the answer is 404 on session_id, as for a
    session that was already gone, not 422 on the body."""
    sid = _session(client, photo_small)["id"]
    mask = np.zeros(photo_small.shape[:2], np.uint8)
    mask[20:50, 30:70] = 255
    client.post(f"/v1/sessions/{sid}/select", json={"mask": b64png(mask)}).raise_for_status()
    client.post(f"/v1/sessions/{sid}/final", json={"dx": 5, "dy": 0}).raise_for_status()  # something to undo
    client.post(f"/v1/sessions/{sid}/select", json={"mask": b64png(mask)}).raise_for_status()
    server.state.sessions.get(sid).session.close()  # closed under the request, still in the store
    for path, body in (("final", {"dx": 5, "dy": 0}), ("undo", None), ("select", {"mask": b64png(mask)})):
        r = client.post(f"/v1/sessions/{sid}/{path}", json=body)
        assert r.status_code == 404 and r.json()["field"] == "session_id", (path, r.text)
