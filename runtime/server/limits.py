"""What the server accepts: its settings, and image decoding that refuses a bomb before decoding it.

Every check here raises `APIError` with the HTTP status, the request field it is about and a
one-line message; the app turns it into the JSON error body (schemas.ErrorBody).
"""
from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg"}  # what an upload may be (PIL format -> MIME type)
MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


class RedactQuery(logging.Filter):
    """An access-log filter: the request line without its query string (a token given as ?token= never
    reaches a log line). uvicorn's access records carry (client, method, path?query, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?<redacted>", *args[3:])
        return True


class APIError(Exception):
    """A request the server refuses: HTTP `status`, the request `field` it is about, a one-line `message`."""

    def __init__(self, status: int, field: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}


@dataclass
class Settings:
    """Limits and defaults. Every limit bounds memory or time a single request can take."""

    token: str | None = None  # bearer token; None = no authentication (only safe on loopback)
    max_upload_bytes: int = 16 * 1024 * 1024  # a whole request body
    max_pixels: int = 4096 * 4096  # width x height of any image, checked from the header before decoding
    max_side: int = 8192
    max_points: int = 64
    max_steps: int = 100
    # the cost model (cost.py): what a request's declared sizes may make the server do, checked before any work
    max_resolution: int = 2048  # processing short side a request may ask for (`resolution`)
    max_work_pixels: int = 2048 * 2048  # the processing canvas (H x W) of a denoising pass or a partition
    max_pixel_steps: int = 1024 * 1024 * 50  # canvas pixels x denoising steps of one pass
    max_elements: int = 4096  # elements in an elements blob
    max_elements_bytes: int = 64 * 1024 * 1024  # an elements blob's npz, uncompressed (its members' declared sizes)
    max_region_pixels: int = 64 * 1024 * 1024  # all alive elements' (scaled) regions together, pixels
    ws_per_session: int = 4  # drag WebSockets open on one session at a time
    read_timeout_s: float = 30.0  # a request body must arrive within this (408 after)
    # Host names a request may name (None: loopback names when there is no token, any with one) and page
    # origins besides the server's own (Origin must equal the Host, else 403)
    allowed_hosts: tuple[str, ...] | None = None
    allowed_origins: tuple[str, ...] = ()
    max_sessions: int = 16  # LRU cap: the least recently used session is closed beyond it
    session_ttl_s: float = 15 * 60  # idle sessions are closed after this
    session_bytes: int = 1024 * 1024 * 1024  # byte budget of all sessions together (images, masks, caches)
    history: int = 8  # undo depth per session
    queue_size: int = 32  # jobs waiting per pipeline before the server answers 503
    retry_after_s: int = 1
    final_steps: int = 20  # session defaults (a request may ask for fewer or more, up to max_steps)
    preview_steps: int = 4
    resolution: int | None = None  # session processing resolution (None: the model's)
    preview_resolution: int | None = None
    warmup: bool = True  # run one small request through each pipeline before /readyz says ready
    weights: str = ""  # shown by /readyz
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        settings = cls(**overrides)
        if settings.token is None and os.environ.get("EDITRT_TOKEN"):
            settings.token = os.environ["EDITRT_TOKEN"]
        return settings


def b64decode(text: str, name: str) -> bytes:
    """Base64 (optionally a `data:...;base64,` URL) -> bytes."""
    if not isinstance(text, str):
        raise APIError(422, name, f"{name}: expected base64 text")
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if not head.endswith(";base64"):
            raise APIError(422, name, f"{name}: a data URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(422, name, f"{name}: not valid base64") from None


def sniff_format(data: bytes, name: str, content_type: str | None = None) -> str:
    """'PNG' or 'JPEG' from the magic bytes; a declared content type must agree with them."""
    fmt = next((f for magic, f in MAGIC.items() if data.startswith(magic)), None)
    if fmt is None:
        raise APIError(415, name, f"{name}: expected a PNG or JPEG image")
    if content_type and content_type not in ("application/octet-stream", FORMATS[fmt]):
        raise APIError(415, name, f"{name}: declared {content_type} but the data is {FORMATS[fmt]}")
    return fmt


def decode_image(data: bytes, name: str, settings: Settings, mode: str = "RGB",
                 content_type: str | None = None) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 array, refusing oversized images from their header, before any pixel is decoded.

    Image.open reads only the header; the size check runs before `load()`. Pillow's own bomb
    guard (DecompressionBombWarning/Error, from its global MAX_IMAGE_PIXELS, which is not changed
    here) is turned into the same 413.
    """
    if not data:
        raise APIError(422, name, f"{name}: is empty; expected a PNG or JPEG image")
    fmt = sniff_format(data, name, content_type)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                w, h = im.size
                check_size(w, h, name, settings)
                im.load()  # now decode: bounded by the check above
                if im.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I", "CMYK", "YCbCr"):
                    raise APIError(415, name, f"{name}: unsupported pixel mode {im.mode}")
                return np.asarray(im.convert(mode))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(413, name, f"{name}: the image is too large (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise APIError(415, name, f"{name}: cannot read it as a {fmt} image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated / corrupt files
        raise APIError(400, name, f"{name}: corrupt {fmt} data ({type(e).__name__})") from None


def check_size(w: int, h: int, name: str, settings: Settings) -> None:
    if w < 1 or h < 1:
        raise APIError(422, name, f"{name}: has no pixels ({w}x{h})")
    if w > settings.max_side or h > settings.max_side or w * h > settings.max_pixels:
        raise APIError(413, name, f"{name}: {w}x{h} is larger than the limit ({settings.max_pixels} pixels, "
                       f"{settings.max_side} per side)")


def mask_from_image(data: np.ndarray) -> np.ndarray:
    """An L image -> bool mask (> 127 inside), as the CLI reads mask files."""
    return data > 127


def png_bytes(image) -> bytes:
    """PIL image, uint8 array or bool mask -> PNG bytes (masks as 0 / 255)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8) * 255 if image.dtype == bool else image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # speed over size: previews stream
    return buffer.getvalue()


def png_b64(image) -> str:
    return base64.b64encode(png_bytes(image)).decode()
