"""Elements across the wire: the file pair as a JSON blob, element boxes in image pixels, edit ops."""
from __future__ import annotations

import base64
import binascii

from editrt.errors import ElementsError
from editrt.runtime.elements import Elements
from editrt.runtime.server.cost import check_elements_doc, check_region_pixels
from editrt.runtime.server.errors import APIError
from editrt.runtime.server.schemas import EditOp, ElementInfo, ElementsBlob
from editrt.runtime.server.settings import Settings

NPZ = "elements.npz"  # the data file a blob's document names (the CLI's pair: NAME.json beside NAME.npz)


def to_blob(elements: Elements) -> ElementsBlob:
    """Through Elements.to_document, in memory: the blob is exactly the file pair the CLI writes."""
    doc, data = elements.to_document(NPZ)
    return ElementsBlob(doc=doc, data=base64.b64encode(data).decode())


def from_blob(blob: ElementsBlob, settings: Settings, field: str = "elements") -> Elements:
    """Through Elements.from_document, in memory (its format, version and SHA-256 checks). The declared sizes
    (image, working canvas, element count, the npz members') are bounded first (cost.py)."""
    check_elements_doc(settings, blob.doc, field)
    try:
        data = base64.b64decode(blob.data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(422, f"{field}.data", f"{field}.data: not valid base64") from None
    try:
        elements = Elements.from_document(blob.doc, data, max_data_bytes=settings.max_elements_bytes, source=field)
    except ElementsError as e:  # e.field is "doc" or "data": the blob's own field names
        raise APIError(422, f"{field}.{e.field}" if e.field in ("doc", "data") else field, str(e)) from None
    check_region_pixels(settings, elements.region_pixels(), field)
    return elements


def items(elements: Elements) -> list[ElementInfo]:
    """The alive elements' centroids and box sizes; elements live in image pixels (runtime/elements.py)."""
    out = []
    for i in elements.alive_ids:
        x, y = (float(v) for v in elements.centroids[i])
        w, h = (float(v) for v in elements.sizes[i])
        out.append(ElementInfo(id=i, x=x, y=y, w=w, h=h))
    return out


def apply_ops(elements: Elements, ops: list[EditOp], settings: Settings, field: str = "ops") -> list[int]:
    """Apply the edits in order (moves in image pixels); returns every id deleted. Bad ids name the op.
    Each op draws every alive element's region (collisions): the pixels all the ops draw together are
    bounded by max_region_pixels, each op's counted before it runs."""
    deleted: list[int] = []
    drawn = 0
    for k, op in enumerate(ops):
        try:
            drawn += elements.region_pixels(op.ids, op.scale) if op.op == "resize" else elements.region_pixels()
            check_region_pixels(settings, drawn, f"{field}.{k}")
            if op.op == "move":
                deleted += elements.move(op.ids, op.dx, op.dy)
            elif op.op == "resize":
                deleted += elements.resize(op.ids, op.scale)
            else:
                deleted += elements.delete(op.ids)
        except ElementsError as e:  # e.field names the op's own field (ids, dx, dy, scale)
            where = f"{field}.{k}.{e.field}" if e.field in EditOp.model_fields else f"{field}.{k}"
            raise APIError(422, where, f"{field}.{k}: {e}") from None
    return sorted(set(deleted))
