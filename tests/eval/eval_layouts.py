"""Writers of the synthetic eval datasets (shared by tests/eval)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# A ReS view: a photo with a rectangular "subject" pasted in. Rectangles are [y0, y1) x [x0, x1) at the
# image's size; masks are stored at half size (as the release stores them smaller than 4032x3024) with
# even coordinates, so the nearest resize gives back exactly the rectangle.
RES_SIZE = (128, 160)  # (H, W): small for CPU time; the tests evaluate at --short-side 128 (pixels as decoded)


def rect_mask(size_hw, rect) -> np.ndarray:
    mask = np.zeros(size_hw, bool)
    y0, y1, x0, x1 = rect
    mask[y0:y1, x0:x1] = True
    return mask


def write_res_view(root: Path, i: int, v: int, photo: np.ndarray, visible, amodal=None) -> None:
    """p{i}_{v}.jpg with the subject (a bright patch) where `visible` is; masks at half size."""
    rgb = photo.copy()
    rgb[rect_mask(RES_SIZE, visible)] = (230, 60, 40)
    Image.fromarray(rgb).save(root / f"p{i}_{v}.jpg", quality=95)
    half = (RES_SIZE[0] // 2, RES_SIZE[1] // 2)
    for name, rect in (("mask", visible), ("amodal", amodal)):
        if rect is not None:
            small = rect_mask(half, [c // 2 for c in rect])
            Image.fromarray(small.astype(np.uint8) * 255).save(root / f"p{i}_{v}_{name}.png")
