"""Elements across the wire, in memory: a blob is exactly the file pair `Elements.save` writes, and loads back.

routers/elements_io.py serialises through `Elements.to_document` / `from_document` (no temp directory per
request); the CLI reads and writes the same pair through `save` / `load`.
"""
from __future__ import annotations

import base64
import json

import numpy as np
from serving import small_photo

from editrt.runtime.server.routers.elements_io import NPZ, from_blob, to_blob
from editrt.runtime.server.settings import Settings


def test_a_blob_is_the_cli_file_pair(elements_pipe, tmp_path):
    elements = elements_pipe.partition(small_photo(), grid=4)
    elements.move(elements.alive_ids[:1], 3, -2)
    elements.resize(elements.alive_ids[-1:], 1.5)
    blob = to_blob(elements)
    path = elements.save(tmp_path / "elements.json")
    assert blob.doc == json.loads(path.read_text()) and blob.doc["data"] == NPZ == "elements.npz"
    assert base64.b64decode(blob.data) == (tmp_path / NPZ).read_bytes()

    back = from_blob(blob, Settings())
    from_file = type(elements).load(path)
    for name in ("features", "centroids", "sizes", "alive", "anchors", "scales"):
        assert np.array_equal(getattr(back, name), getattr(elements, name)), name
        assert np.array_equal(getattr(from_file, name), getattr(elements, name)), name
    assert all(np.array_equal(a, b) for a, b in zip(back.masks, elements.masks))
    assert (back.image_size, back.working_size, back.info) == (elements.image_size, elements.working_size,
                                                               elements.info)
    assert np.array_equal(back.paint(), elements.paint())
