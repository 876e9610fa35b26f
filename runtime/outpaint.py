"""Outpainting with the complete task prompt (paper 000 App. A.4): extend the canvas, generate the border.

The paper treats outpainting as subject completion "with a more holistic perspective": the same
inpainting UNet, the complete prompt, and a mask that is the whole new border. So this is one
`RepositionPipeline.inpaint(canvas, border, task="complete")` call (public API: it runs as one job
of the pipeline's work queue), and the original pixels are pasted back byte for byte at (left, top).
The paper trains its own outpainting prompt (App. A.4, on Flickr-Scenery): a prompts file that holds an
`outpaint` key (models/inpaint.NAMED_PROMPT_KEYS) is used for it; without one, the complete prompt.

What `fill` changes. The inpainting UNet's condition is the canvas with the masked region set to
zero (diffusers' `image * (mask < 0.5)`), so the fill's own pixels never reach it. They reach it only
through resampling: the canvas is resized (Lanczos) to the processing size, whose sides are
multiples of 8 with the short side = `resolution`, and the resampling kernel mixes fill pixels into
original pixels next to the seam that the (box-covering) processing mask leaves unmasked. `edge`
repeats the border pixels, so that mix is closest to the image itself; `reflect` mirrors the image;
`mean` is its mean colour. When the canvas already is the processing size (no resize), every fill
gives the same result bit for bit; the original region of the output never depends on it.

Limits: extensions are non-negative integers, at least one > 0; the canvas is at most
`MAX_FACTOR` times the image on each axis and at most `MAX_CANVAS_PIXELS` pixels.
"""
from __future__ import annotations

import numbers

import numpy as np
from PIL import Image

from editrt.errors import InputError
from editrt.runtime.crop import check_crop
from editrt.runtime.images import as_rgb

FILLS = ("edge", "reflect", "mean")
MAX_FACTOR = 4  # canvas side <= 4 x the image side: l + r <= 3 W, t + b <= 3 H
MAX_CANVAS_PIXELS = 64_000_000  # 64 megapixels, about 8000 x 8000


def check_extend(extend, size_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in pixels, checked against the image size (H, W)."""
    try:
        values = list(extend)
    except TypeError:
        values = []
    ok = len(values) == 4 and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0
                                  for v in values)
    if not ok:
        raise InputError(f"extend {extend!r}: expected L,T,R,B, four non-negative integers (pixels)", field="extend")
    left, top, right, bottom = (int(v) for v in values)
    if left + top + right + bottom == 0:
        raise InputError("extend 0,0,0,0: expected at least one side > 0 (pixels to add)", field="extend")
    h, w = size_hw
    canvas_w, canvas_h = w + left + right, h + top + bottom
    if canvas_w > MAX_FACTOR * w or canvas_h > MAX_FACTOR * h or canvas_w * canvas_h > MAX_CANVAS_PIXELS:
        raise InputError(f"extend {left},{top},{right},{bottom}: the canvas would be {canvas_w}x{canvas_h}; expected at "
                         f"most {MAX_FACTOR}x the {w}x{h} image on each axis ({MAX_FACTOR * w}x{MAX_FACTOR * h}) and "
                         f"{MAX_CANVAS_PIXELS // 1_000_000} megapixels", field="extend")
    return left, top, right, bottom


def check_fill(fill) -> str:
    if fill not in FILLS:
        raise InputError(f"fill {fill!r}: expected one of {', '.join(FILLS)}", field="fill")
    return fill


def pad_canvas(rgb: np.ndarray, extend: tuple[int, int, int, int], fill: str = "edge") -> tuple[np.ndarray, np.ndarray]:
    """(canvas uint8 [H', W', 3], border mask bool [H', W']): the image at (left, top), the new border filled."""
    check_fill(fill)
    left, top, right, bottom = extend
    h, w = rgb.shape[:2]
    widths = ((top, bottom), (left, right), (0, 0))
    if fill == "mean":
        mean = np.round(rgb.reshape(-1, 3).mean(axis=0)).astype(np.uint8)  # (3,)
        canvas = np.empty((h + top + bottom, w + left + right, 3), np.uint8)
        canvas[:] = mean
        canvas[top:top + h, left:left + w] = rgb
    else:
        canvas = np.pad(rgb, widths, mode=fill)  # numpy reflects repeatedly when a side exceeds the image
    border = np.ones(canvas.shape[:2], bool)
    border[top:top + h, left:left + w] = False
    return canvas, border


def outpaint_task(pipeline) -> str:
    """The prompt outpainting runs with: `outpaint` when the loaded prompts hold one, else `complete`."""
    return "outpaint" if "outpaint" in pipeline.task_prompts else "complete"


def outpaint(pipeline, image, extend, fill: str = "edge", steps: int = 50, guidance: float = 1.0, seed: int = 0,
             resolution: int | None = None, progress: bool = False, crop_padding: int | None = None,
             crop_size: str | None = None) -> Image.Image:
    """The image on a canvas extended by `extend` = (left, top, right, bottom) pixels, the border generated
    with the outpaint prompt (the complete prompt when the prompts have none); the original pixels are
    byte-identical at (left, top).

    `crop_padding` / `crop_size` (runtime/crop.py): one cropped pass over the padded box around the new border.
    The box grows to the processing size's aspect (diffusers' rule), so a border along a whole side spans the whole
    canvas: the crop then changes how the canvas is resampled and pasted back, not how much is processed."""
    # 1. Check inputs.
    rgb = as_rgb(image)
    left, top, right, bottom = check_extend(extend, rgb.shape[:2])
    check_fill(fill)
    check_crop(crop_padding, crop_size)
    h, w = rgb.shape[:2]

    # 2. The canvas and its mask: everything new is generated.
    canvas, border = pad_canvas(rgb, (left, top, right, bottom), fill)

    # 3. One inpainting pass over the border (the pipeline's work queue orders it): the outpaint prompt, if any.
    task = outpaint_task(pipeline)
    result = np.array(pipeline.inpaint(canvas, border, task=task, steps=steps, guidance=guidance, seed=seed,
                                       resolution=resolution, progress=progress, crop_padding=crop_padding,
                                       crop_size=crop_size))

    # 4. The original pixels, byte for byte (inpaint keeps unmasked bytes too; this is outpaint's own promise).
    result[top:top + h, left:left + w] = rgb
    return Image.fromarray(result)
