"""Region crops: inpaint only a padded box around the mask, paste the regenerated pixels back.

The crop box is diffusers' `VaeImageProcessor.get_crop_region(mask, width, height, pad)`: the mask's
bounding box, padded by `pad` pixels (clipped to the image), then widened (or heightened) about its
centre to the processing size's aspect ratio, shifted back inside the image where it sticks out.

Two working sizes (`crop_size`):
* "processing": diffusers' `padding_mask_crop`. The crop is resized to the processing size with
  `resize_mode="fill"` (aspect kept, the short way filled by stretching the edge rows or columns), the
  mask the same way then binarized at 0.5; the decoded result is resized back to the box with
  `resize_mode="crop"` and pasted inside the mask only (`apply_overlay`). Same PIL operations, so
  the result equals diffusers' bit for bit (tests/runtime/test_crop.py).
* "native": the crop at its own resolution. The box is grown to the next multiple of 8 on each side
  (inside the image), so a crop that fits the processing size is not resampled at all and a small edit
  costs less than a large one. A crop larger than the processing size is scaled down to fit it (each
  side rounded up to a multiple of 8, capped at the processing size) and the result scaled back.

Either way only pixels inside the mask change: every other pixel keeps its input bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from editrt.errors import InputError
from editrt.runtime.images import resize_mask_covering, resize_rgb

CROP_SIZES = ("processing", "native")
LANCZOS = Image.Resampling.LANCZOS  # VaeImageProcessor's default `resample`


def check_crop(padding, size) -> str | None:
    """Validate (crop_padding, crop_size); returns the crop size in force (None: no crop)."""
    if padding is None:
        if size is not None:
            raise InputError(f"crop_size {size!r}: only with crop_padding (the crop is off without it)", field="crop_size")
        return None
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise InputError(f"crop_padding: expected a whole number of pixels >= 0, got {padding!r}", field="crop_padding")
    size = "native" if size is None else size
    if size not in CROP_SIZES:
        raise InputError(f"crop_size: expected one of {', '.join(CROP_SIZES)}, got {size!r}", field="crop_size")
    return size


def crop_region(mask: np.ndarray, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of the padded box around the mask, grown to the aspect of width x height
    (the semantics of diffusers' get_crop_region, including its rounding and border shifts)."""
    h, w = mask.shape
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    x1, y1 = int(max(cols[0] - pad, 0)), int(max(rows[0] - pad, 0))
    x2, y2 = int(min(cols[-1] + 1 + pad, w)), int(min(rows[-1] + 1 + pad, h))
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, extra: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) by `extra` about its centre, then shift it inside [0, limit) and clip."""
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def _ceil8(n: float) -> int:
    return max(8, -(-int(np.ceil(n)) // 8) * 8)


@dataclass(frozen=True)
class CropPlan:
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) in the input image
    work_hw: tuple[int, int]  # the size the UNet pass runs at
    mode: str  # "processing" | "native"

    @property
    def box_hw(self) -> tuple[int, int]:
        x1, y1, x2, y2 = self.box
        return y2 - y1, x2 - x1


def plan_crop(mask: np.ndarray, processing_hw: tuple[int, int], padding: int, mode: str) -> CropPlan:
    """The crop box and the size it is processed at (see the module docstring)."""
    ph, pw = processing_hw
    box = crop_region(mask, pw, ph, padding)
    if mode == "processing":
        return CropPlan(box, (ph, pw), mode)
    x1, y1, x2, y2 = box
    bh, bw = y2 - y1, x2 - x1
    if bh <= ph and bw <= pw:  # fits: grow the box to multiples of 8 so nothing is resampled
        (y1, y2), (x1, x2) = _grow(y1, y2, _ceil8(bh) - bh, mask.shape[0]), _grow(x1, x2, _ceil8(bw) - bw, mask.shape[1])
        return CropPlan((x1, y1, x2, y2), (_ceil8(bh), _ceil8(bw)), mode)
    scale = min(ph / bh, pw / bw)
    return CropPlan(box, (min(ph, _ceil8(bh * scale)), min(pw, _ceil8(bw * scale))), mode)


def _resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Fit inside width x height keeping the aspect, centred; the empty bands repeat the edge rows / columns."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        band = height // 2 - src_h // 2
        if band > 0:
            out.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, band), box=(0, resized.height, width, resized.height)),
                      box=(0, band + src_h))
    elif ratio > src_ratio:
        band = width // 2 - src_w // 2
        if band > 0:
            out.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((band, height), box=(resized.width, 0, resized.width, height)),
                      box=(band + src_w, 0))
    return out


def _resize_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize keeping the aspect so it covers width x height, centred; what sticks out is cut."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def crop_inputs(rgb: np.ndarray, mask: np.ndarray, plan: CropPlan) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, mask) of the crop at the plan's working size."""
    x1, y1, x2, y2 = plan.box
    h, w = plan.work_hw
    if plan.mode == "processing":
        image = _resize_fill(Image.fromarray(rgb).crop(plan.box), w, h)
        area = _resize_fill(Image.fromarray(mask.astype(np.uint8) * 255).crop(plan.box), w, h)
        return np.asarray(image), np.asarray(area, np.float32) / 255.0 >= 0.5  # diffusers' binarize
    return resize_rgb(rgb[y1:y2, x1:x2], (h, w)), resize_mask_covering(mask[y1:y2, x1:x2], (h, w))


def paste_back(rgb: np.ndarray, mask: np.ndarray, decoded: np.ndarray, plan: CropPlan) -> np.ndarray:
    """The input with the decoded crop, resized back to the box, pasted inside the mask only."""
    x1, y1, x2, y2 = plan.box
    bh, bw = plan.box_hw
    if plan.mode == "processing":
        region = np.asarray(_resize_crop(Image.fromarray(decoded), bw, bh))
    else:
        region = resize_rgb(decoded, (bh, bw))
    out = rgb.copy()
    inside = mask[y1:y2, x1:x2]
    out[y1:y2, x1:x2][inside] = region[inside]
    return out
