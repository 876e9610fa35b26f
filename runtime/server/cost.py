"""The cost model at the edge: a request's worst-case work and memory, from its declared sizes, before any work.

Every bound is a Settings field (settings.py; docs/limits.md lists them with their `editrt serve`
options). A denoising pass costs its processing canvas (H x W, from the image and `resolution`)
times its steps; a partition its canvas; an elements edit the pixels of the regions it draws (every
op draws every alive element's region to find collisions, runtime/elements.py); an elements blob
its declared image and working sizes, element count and npz members' declared sizes. A request
over a bound is answered 413 (too much work) or 422 (a value outside the server's range), naming
the field, and nothing runs.
"""
from __future__ import annotations

from editrt.errors import EditError
from editrt.runtime.elements import FORMAT
from editrt.runtime.images import processing_size
from editrt.runtime.server.errors import APIError
from editrt.runtime.server.image_codecs import check_size
from editrt.runtime.server.settings import Settings


def check_resolution(settings: Settings, resolution: int | None, field: str = "resolution") -> None:
    if resolution is not None and resolution > settings.max_resolution:
        raise APIError(422, field, f"{field}: at most {settings.max_resolution} on this server, got {resolution}")


def canvas(image_hw: tuple[int, int], resolution: int) -> tuple[int, int]:
    """The processing canvas (H, W) a pipeline works at for an image of `image_hw` and a `resolution`."""
    try:
        return processing_size(tuple(image_hw), int(resolution))
    except EditError as e:
        raise APIError(422, "resolution", str(e)) from None


def check_pass(settings: Settings, image_hw: tuple[int, int], resolution: int | None, default_resolution: int,
               steps: int | None, steps_field: str = "steps") -> None:
    """One denoising pass (or a partition, `steps` None) of an `image_hw` image at `resolution` (None: the model's
    `default_resolution`): its canvas within max_work_pixels, canvas x steps within max_pixel_steps."""
    check_resolution(settings, resolution)
    h, w = canvas(image_hw, resolution or default_resolution)
    field = "resolution" if resolution is not None else "image"
    if h * w > settings.max_work_pixels:
        raise APIError(413, field, f"{field}: the processing canvas would be {w}x{h} for this "
                       f"{image_hw[1]}x{image_hw[0]} image, more than the limit ({settings.max_work_pixels} pixels)")
    if steps is not None and h * w * steps > settings.max_pixel_steps:
        raise APIError(413, steps_field, f"{steps_field}: {steps} steps on a {w}x{h} canvas is more work than the "
                       f"limit ({settings.max_pixel_steps} pixel-steps); ask for fewer steps or a lower resolution")


def check_canvas_steps(settings: Settings, canvas_hw: tuple[int, int], steps: int, steps_field: str = "steps") -> None:
    """A denoising pass on a canvas a request declares directly (an elements blob's working size, itself
    bounded by check_elements_doc): canvas x steps within max_pixel_steps."""
    h, w = canvas_hw
    if h * w * steps > settings.max_pixel_steps:
        raise APIError(413, steps_field, f"{steps_field}: {steps} steps on a {w}x{h} canvas is more work than the "
                       f"limit ({settings.max_pixel_steps} pixel-steps)")


def _pair(value, field: str) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise APIError(422, field, f"{field}: expected [height, width] as two integers")
    return value[0], value[1]


def check_elements_doc(settings: Settings, doc: dict, field: str = "elements") -> None:
    """An elements blob's JSON document, from its declared sizes: the image within the image limits, the
    working canvas within max_work_pixels, the element count within max_elements. (A document that is not an
    elements file is left to Elements.load, which says so before reading anything else.)"""
    if doc.get("format") != FORMAT:
        return
    h, w = _pair(doc.get("image_size"), f"{field}.doc.image_size")
    check_size(w, h, f"{field}.doc.image_size", settings)
    if doc.get("working_size") is not None:
        wh, ww = _pair(doc["working_size"], f"{field}.doc.working_size")
        if wh < 1 or ww < 1 or wh * ww > settings.max_work_pixels:
            raise APIError(413, f"{field}.doc.working_size", f"{field}.doc.working_size: {ww}x{wh} is outside "
                           f"1..{settings.max_work_pixels} pixels")
    n = doc.get("num_elements")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise APIError(422, f"{field}.doc.num_elements", f"{field}.doc.num_elements: expected a count")
    if n > settings.max_elements:
        raise APIError(413, f"{field}.doc.num_elements", f"{field}.doc.num_elements: {n} is more than the limit "
                       f"({settings.max_elements})")


def check_region_pixels(settings: Settings, pixels: int, field: str) -> None:
    if pixels > settings.max_region_pixels:
        raise APIError(413, field, f"{field}: these edits draw {pixels} region pixels, more than the limit "
                       f"({settings.max_region_pixels}); scale less or edit fewer elements per request")
