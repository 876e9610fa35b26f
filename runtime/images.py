"""Image and mask plumbing shared by the pipelines: validation, processing sizes, resizing, dilation.

Images are uint8 RGB arrays [H, W, 3]; masks are bool arrays [H, W]. PIL images are accepted
at the API boundary and converted once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from scipy import ndimage

from editrt.errors import InputError
from editrt.models.files import write_atomic


def as_rgb(image, name: str = "image") -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image or an array ([H, W], [H, W, 3] or [H, W, 4])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InputError(f"{name}: expected a uint8 array, got dtype {image.dtype}", field=name)
        if image.ndim == 2:
            return np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim == 3 and image.shape[2] in (3, 4):
            return np.ascontiguousarray(image[:, :, :3])
        raise InputError(f"{name}: expected an array [H, W, 3], got shape {list(image.shape)}", field=name)
    raise InputError(f"{name}: expected a PIL image or a uint8 array, got {type(image).__name__}", field=name)


def as_mask(mask, size_hw: tuple[int, int], name: str = "mask", allow_empty: bool = False) -> np.ndarray:
    """bool [H, W] from a PIL image or array (nonzero = inside); checks it matches the image size."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise InputError(f"{name}: expected a PIL image or an array, got {type(mask).__name__}", field=name)
    if mask.ndim == 3 and mask.shape[2] in (1, 3, 4):
        mask = mask[:, :, 0]
    if mask.ndim != 2:
        raise InputError(f"{name}: expected a single-channel mask [H, W], got shape {list(mask.shape)}", field=name)
    if tuple(mask.shape) != tuple(size_hw):
        raise InputError(f"{name}: size {mask.shape[1]}x{mask.shape[0]} differs from the image size "
                         f"{size_hw[1]}x{size_hw[0]}", field=name)
    mask = mask > (127 if mask.dtype == np.uint8 else 0.5 if mask.dtype.kind == "f" else 0)
    if not allow_empty and not mask.any():
        raise InputError(f"{name}: is empty; expected at least one masked pixel", field=name)
    return mask


def processing_size(size_hw: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(H, W) with the short side = `resolution` and both sides multiples of 8 (aspect kept)."""
    if resolution < 8 or resolution % 8:
        raise InputError(f"resolution: expected a positive multiple of 8, got {resolution}", field="resolution")
    h, w = size_hw
    scale = resolution / min(h, w)
    return max(8, round(h * scale / 8) * 8), max(8, round(w * scale / 8) * 8)


def resize_rgb(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if tuple(image.shape[:2]) == tuple(size_hw):
        return image
    return np.asarray(Image.fromarray(image).resize((size_hw[1], size_hw[0]), Image.LANCZOS))


def resize_mask_covering(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize a mask so that every target pixel touching the mask is inside (never loses thin parts)."""
    if tuple(mask.shape) == tuple(size_hw):
        return mask
    area = Image.fromarray(mask.astype(np.uint8) * 255).resize((size_hw[1], size_hw[0]), Image.BOX)
    return np.asarray(area) > 0


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """`mask` grown by a disk of `radius` pixels: scipy's binary_dilation with the disk x^2 + y^2 <= r^2 as its
    structure, computed exactly as "Euclidean distance to the mask <= r" (distance transform) over the mask's
    bounding box grown by r. That is linear in the window's pixels; the structure costs (2r + 1)^2 per pixel of the
    whole image (40 s for the 1% radius of a 4032x3024 photo)."""
    if radius <= 0:
        return mask
    out = np.zeros(mask.shape, bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return out
    (h, w), r = mask.shape, int(radius)
    y0, y1, x0, x1 = max(rows[0] - r, 0), min(rows[-1] + r + 1, h), max(cols[0] - r, 0), min(cols[-1] + r + 1, w)
    window = np.asarray(mask[y0:y1, x0:x1], bool)  # holds every mask pixel: distances inside it are the true ones
    out[y0:y1, x0:x1] = ndimage.distance_transform_edt(~window) <= r  # sqrt of an integer: exact against r
    return out


def shift_or_warp(image: np.ndarray, mask: np.ndarray, dx: float, dy: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Move the masked pixels by (dx, dy) and scale them about the mask's bounding-box centre.

    Returns (moved RGB, moved mask), both at the input size. An integer move at scale 1 is an
    exact pixel shift; anything else resamples (bilinear RGB, mask thresholded at 0.5).
    """
    h, w = mask.shape
    if scale == 1.0 and float(dx).is_integer() and float(dy).is_integer():
        dx, dy = int(dx), int(dy)
        moved_rgb, moved_mask = np.zeros_like(image), np.zeros_like(mask)
        ys, yd = (slice(max(0, -dy), min(h, h - dy)), slice(max(0, dy), min(h, h + dy)))
        xs, xd = (slice(max(0, -dx), min(w, w - dx)), slice(max(0, dx), min(w, w + dx)))
        if ys.start < ys.stop and xs.start < xs.stop:
            moved_rgb[yd, xd] = image[ys, xs]
            moved_mask[yd, xd] = mask[ys, xs]
        return moved_rgb, moved_mask
    rows, cols = np.nonzero(mask)
    cx, cy = (cols.min() + cols.max() + 1) / 2, (rows.min() + rows.max() + 1) / 2
    # PIL's affine maps each output pixel (x, y) to the input point (a x + b y + c, d x + e y + f).
    inv = 1.0 / scale
    coeffs = (inv, 0.0, cx - (cx + dx) * inv, 0.0, inv, cy - (cy + dy) * inv)
    moved_rgb = np.asarray(Image.fromarray(image).transform((w, h), Image.AFFINE, coeffs, resample=Image.BILINEAR))
    soft = Image.fromarray(mask.astype(np.float32)).transform((w, h), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    return moved_rgb, np.asarray(soft) >= 0.5


PROVENANCE = "edited by editrt (diffusion-based image editing; the edited regions are generated)"
WATERMARK = b"editrt"


def save_png(image, path: str | Path, watermark: bool = False) -> Path:
    """Write a PNG that says it was edited by editrt (a tEXt chunk), atomically (temp file + rename).

    `watermark=True` also embeds an invisible watermark (invisible-watermark's dwtDctSvd). Unlike the
    text chunk it survives re-encoding, but it changes every pixel slightly.
    """
    from editrt import __version__

    path = Path(path)
    array = as_rgb(image)
    if watermark:
        array = embed_watermark(array)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"editrt {__version__}")
    info.add_text("Comment", PROVENANCE)
    write_atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG", pnginfo=info))
    return path


def save_mask_png(mask: np.ndarray, path: str | Path) -> Path:
    return save_png(np.repeat((mask.astype(np.uint8) * 255)[:, :, None], 3, axis=2), path)


def save_labels_png(labels: np.ndarray, path: str | Path) -> Path:
    """A label map (int, -1 = none) as a 16-bit greyscale PNG of id + 1 (0 = no element), atomically."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.min(initial=0) < -1 or labels.max(initial=0) >= 2**16 - 1:
        raise InputError(f"labels: expected a 2-D map of ids in [-1, {2**16 - 2}], got shape {list(labels.shape)}", field="labels")
    image = Image.fromarray((labels + 1).astype(np.uint16))
    return write_atomic(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def load_labels_png(path: str | Path) -> np.ndarray:
    """The label map int64 [H, W] (-1 = no element) that save_labels_png wrote."""
    with Image.open(path) as im:
        return np.asarray(im).astype(np.int64) - 1


def embed_watermark(rgb: np.ndarray) -> np.ndarray:
    try:
        from imwatermark import WatermarkEncoder
    except ImportError:
        raise InputError("--watermark: needs the invisible-watermark package (pip install 'editrt[watermark]')", field="watermark") from None
    if min(rgb.shape[:2]) < 256:
        raise InputError(f"--watermark: the image is {rgb.shape[1]}x{rgb.shape[0]}; the invisible watermark needs at least 256x256", field="watermark")
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", WATERMARK)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    return np.ascontiguousarray(encoder.encode(bgr, "dwtDctSvd")[:, :, ::-1])


def read_watermark(rgb: np.ndarray) -> bytes:
    from imwatermark import WatermarkDecoder

    decoder = WatermarkDecoder("bytes", len(WATERMARK) * 8)
    return decoder.decode(np.ascontiguousarray(rgb[:, :, ::-1]), "dwtDctSvd")
