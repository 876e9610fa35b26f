"""Every refusal names the request field it is about, from the library's `EditError.field`, never from its message.

Each stateless route maps the keywords of the pipeline call it makes to its own request fields
(routers/stateless.py); here each field gets a bad value that only the pipeline can see (pydantic
and the route's own checks have passed), and the 422 must name that field. Then errors with a
field and a message that names some *other* field go through a route's job: the answer follows
the field, whatever the wording.
"""
from __future__ import annotations

import copy

import httpx
import numpy as np
import pytest
from serving import b64png

from editrt.errors import EditError, ElementsError, InputError


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def named(r: httpx.Response, field: str) -> dict:
    assert r.status_code == 422, (r.status_code, r.text[:300])
    body = r.json()
    assert body["field"] == field, body
    return body


def mask_png(shape, box=None) -> str:
    """A mask PNG of `shape` (H, W): 255 inside `box` (y0, y1, x0, x1), empty without one."""
    m = np.zeros(shape, np.uint8)
    if box is not None:
        y0, y1, x0, x1 = box
        m[y0:y1, x0:x1] = 255
    return b64png(m)


SUBJECT = (20, 50, 30, 70)  # rows, cols of the 120x80 photo's subject in these tests


# ---------------------------------------------------------------------- each field of each route, from the pipeline
@pytest.mark.parametrize("change, field", [
    (dict(points=[[500, 10]]), "points"),  # outside the 120x80 image
    (dict(points=[[10, -3]]), "points"),
    (dict(points=None, box=[50, 50, 10, 10]), "box"),  # x0 > x1
    (dict(points=None, box=[10, 10, 500, 60]), "box"),  # past the image
])
def test_segment(client, photo_small, change, field):
    body = {"image": b64png(photo_small), "points": [[60, 40]], **change}
    named(client.post("/v1/segment", json={k: v for k, v in body.items() if v is not None}), field)


@pytest.mark.parametrize("mask, field", [
    (mask_png((10, 10), (0, 10, 0, 10)), "mask"),  # not the image's size
    (mask_png((80, 120)), "mask"),  # empty
])
def test_inpaint(client, photo_small, mask, field):
    named(client.post("/v1/inpaint", json={"image": b64png(photo_small), "mask": mask, "steps": 1}), field)


@pytest.mark.parametrize("change, field", [
    (dict(move=[5000, 0]), "move"),  # the whole subject leaves the image
    (dict(mask=mask_png((80, 120))), "mask"),  # an empty subject
    (dict(mask=None, points=[[500, 10]]), "points"),
    (dict(mask=None, box=[10, 10, 500, 60]), "box"),
    (dict(complete_mask=mask_png((10, 10), (0, 10, 0, 10))), "complete_mask"),
    (dict(occluder_mask=mask_png((10, 10), (0, 10, 0, 10))), "occluder_mask"),
    (dict(occluder_mask=mask_png((80, 120), (0, 80, 0, 120)), occlusion="auto"), "occluder_mask"),
    (dict(existing_shadow_mask=mask_png((10, 10), (0, 10, 0, 10))), "existing_shadow_mask"),
    (dict(matting=True, trimap_band=200), "trimap_band"),  # wider than the subject
    (dict(trimap_band=3), "trimap_band"),  # without matting
    (dict(new_shadow_box=[200, 0, 300, 10]), "new_shadow_box"),  # the box form of new_shadow_region
    (dict(new_shadow_box=[60, 60, 110, 70], harmonize=False), "new_shadow_box"),
    (dict(new_shadow_region=mask_png((10, 10), (0, 10, 0, 10))), "new_shadow_region"),  # the mask form
    (dict(new_shadow_region=mask_png((80, 120), (60, 70, 60, 110)), harmonize=False), "new_shadow_region"),
    (dict(crop_padding=-1), "crop_padding"),  # the schema's bound
    (dict(crop_padding=4, crop_size="whole"), "crop_size"),
    (dict(crop_size="native"), "crop_size"),  # a size without a crop: the typed edit's refusal
])
def test_reposition(client, photo_small, change, field):
    body = {"image": b64png(photo_small), "mask": mask_png((80, 120), SUBJECT), "move": [6, 2], "steps": 1,
            **change}
    named(client.post("/v1/reposition", json={k: v for k, v in body.items() if v is not None}), field)


@pytest.mark.parametrize("change, field", [
    (dict(crop_padding=-1), "crop_padding"),
    (dict(crop_padding=2.5), "crop_padding"),
    (dict(crop_padding=4, crop_size="whole"), "crop_size"),
    (dict(crop_size="processing"), "crop_size"),  # without crop_padding: refused by the session's Quality
    (dict(kind="elements", crop_padding=4), "crop_padding"),  # an elements session renders the whole image
])
def test_session_crop_options(client, photo_small, change, field):
    named(client.post("/v1/sessions", json={"image": b64png(photo_small), **change}), field)


@pytest.fixture(scope="module")
def blob(client, photo_small):
    r = client.post("/v1/elements/partition", json={"image": b64png(photo_small), "grid": 4})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_thin_image_partitions(client):
    """A 400x2 strip spans less than one row of SAM's low-resolution logits: it partitions (it was a 500)."""
    thin = b64png(np.tile(np.arange(400, dtype=np.uint8)[None, :, None], (2, 1, 3)))
    r = client.post("/v1/elements/partition", json={"image": thin, "grid": 2, "resolution": 8})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["canvas"] == [2, 400]


@pytest.mark.parametrize("library, request_field", [("image", "image"), ("grid", "grid"), ("beta", "beta"),
                                                     ("iterations", "iterations"), ("resolution", "resolution"),
                                                     ("beta_c", "body")])
def test_partition_maps_the_pipelines_fields(client, photo_small, elements_pipe, monkeypatch, library,
                                             request_field):
    """The partition's own checks (grid, beta, iterations) are pydantic's first; its map still names each one."""
    def partition(*args, **kwargs):
        raise InputError("wording free to change", field=library)
    monkeypatch.setattr(elements_pipe, "partition", partition)
    named(client.post("/v1/elements/partition", json={"image": b64png(photo_small), "grid": 4}), request_field)


def test_elements_edit_names_the_op_and_its_field(client, blob):
    alive = [item["id"] for item in blob["items"]]
    doc = blob["elements"]["doc"]
    dead = next((i for i in range(doc["num_elements"]) if i not in alive), None)
    edit = lambda ops: client.post("/v1/elements/edit", json={"elements": blob["elements"], "ops": ops})  # noqa: E731
    named(edit([{"op": "delete", "ids": [doc["num_elements"] + 5]}]), "ops.0.ids")  # no such element
    named(edit([{"op": "delete", "ids": [alive[0]]}, {"op": "move", "ids": [alive[0]], "dx": 1}]), "ops.1.ids")
    named(edit([{"op": "move", "ids": [alive[0]], "dx": 1000}]), "ops.0.dx")  # its centre leaves the image
    named(edit([{"op": "move", "ids": [alive[0]], "dy": -1000}]), "ops.0.dy")
    if dead is not None:
        named(edit([{"op": "resize", "ids": [dead], "scale": 2}]), "ops.0.ids")


def test_elements_blob_names_doc_or_data(client, blob):
    wrong = copy.deepcopy(blob["elements"])
    wrong["doc"]["elements"][0]["id"] = 7  # ids out of order: the document is wrong
    named(client.post("/v1/elements/render", json={"elements": wrong, "steps": 1}), "elements.doc")
    other = copy.deepcopy(blob["elements"])
    other["data"] = blob["elements"]["data"][:-8] + "AAAAAAAA"  # SHA-256 differs: the data is wrong
    named(client.post("/v1/elements/render", json={"elements": other, "steps": 1}), "elements.data")


def test_render_names_the_elements(client, server, blob, elements_pipe):
    """A blob whose features the decoder cannot take (another feature size): the pipeline's `elements`."""
    from editrt.runtime.server.routers.elements_io import from_blob, to_blob
    from editrt.runtime.server.schemas import ElementsBlob

    el = from_blob(ElementsBlob(**blob["elements"]), server.state.settings)
    el.features = np.zeros((len(el), el.features.shape[1] + 3), np.float32)
    named(client.post("/v1/elements/render", json={"elements": to_blob(el).model_dump(), "steps": 1}), "elements")


# ---------------------------------------------------------------------- the field, never the message
@pytest.mark.parametrize("error, field", [
    (InputError("something else entirely", field="points"), "points"),
    (InputError("box (1, 2, 3, 4): the message names another field", field="points"), "points"),
    (InputError("points: the message names this field, the error another", field="labels"), "labels"),
    (EditError("mask: named in the message only"), "body"),  # no field: no single input to blame
    (InputError("points: a field this route does not take", field="lora_scale"), "body"),
])
def test_the_field_comes_from_the_error_not_its_message(client, reposition, photo_small, monkeypatch, error, field):
    def segment(*args, **kwargs):
        raise error
    monkeypatch.setattr(reposition, "segment", segment)
    body = named(client.post("/v1/segment", json={"image": b64png(photo_small), "points": [[60, 40]]}), field)
    assert body["message"] == str(error)


@pytest.mark.parametrize("library, request_field", [("elements", "elements"), ("prompt", "prompt"),
                                                     ("steps", "steps"), ("ids", "body")])
def test_render_maps_the_decoders_fields(client, blob, elements_pipe, monkeypatch, library, request_field):
    def decode(*args, **kwargs):
        raise ElementsError("wording free to change", field=library)
    monkeypatch.setattr(elements_pipe, "decode", decode)
    named(client.post("/v1/elements/render", json={"elements": blob["elements"], "steps": 1}), request_field)
