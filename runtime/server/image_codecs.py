"""Bytes on the wire: base64 text, PNG/JPEG uploads decoded after their header passed the size limits, PNG answers.

Every refusal is an `APIError` naming the request field the bytes came from.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from editrt.runtime.server.errors import APIError
from editrt.runtime.server.settings import Settings

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg"}  # what an upload may be (PIL format -> MIME type)
MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


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


def png_bytes(image) -> bytes:
    """PIL image, uint8 array or bool mask -> PNG bytes (masks as 0 / 255)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8) * 255 if image.dtype == bool else image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # speed over size: previews stream
    return buffer.getvalue()


def png_b64(image) -> str:
    return base64.b64encode(png_bytes(image)).decode()
