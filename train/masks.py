"""SEELE's task-specific training masks (paper 000 Sec. 3.2, Fig. 4b).

remove:   an object's mask moved to another place, so it holds background of the object's shape
          (the target is the image itself: the model learns to fill an object-shaped hole with background).
complete: a random contiguous part of an object's mask, randomly dilated (user masks are imprecise);
          the target is the image: the model learns to complete the object inside the hole.

Every draw comes from the `rng` passed in (train/samples.py derives it from (seed, sample index)).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from editrt.runtime.images import dilate

PLACEMENT_TRIES = 16  # random displacements tried before the least-occupied one is taken


def shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`mask` moved by (dy, dx) whole pixels; what leaves the frame is dropped."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    out[max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)] = \
        mask[max(0, -dy):min(h, h - dy), max(0, -dx):min(w, w - dx)]
    return out


@dataclass(frozen=True)
class RemoveMask:
    mask: np.ndarray  # bool [H, W]: the object's shape at its new place
    offset: tuple[int, int]  # (dy, dx) from the object to the mask
    occupied_pixels: int  # pixels of the mask over any object (0: all background)


def remove_mask(obj: np.ndarray, occupied: np.ndarray, rng: np.random.Generator,
                tries: int = PLACEMENT_TRIES) -> RemoveMask:
    """The object's mask translated so its bounding box stays in the frame (the exact shape), over background.

    `occupied`: every object's pixels (the chosen one included). Of `tries` random displacements the
    first with no occupied pixel under the moved mask wins; if none, the least occupied one.
    """
    rows, cols = np.nonzero(obj)
    h, w = obj.shape
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    best = None
    for _ in range(tries):
        dy = int(rng.integers(-y0, h - y1 + 1))  # the box [y0 + dy, y1 + dy) stays inside [0, h)
        dx = int(rng.integers(-x0, w - x1 + 1))
        if dy == 0 and dx == 0:
            continue
        moved = shift(obj, dy, dx)
        occupied_pixels = int((moved & occupied).sum())
        if best is None or occupied_pixels < best.occupied_pixels:
            best = RemoveMask(moved, (dy, dx), occupied_pixels)
        if occupied_pixels == 0:
            break
    if best is None:  # the box fills the frame (or every draw was (0, 0)): nowhere else to put it
        best = RemoveMask(obj.copy(), (0, 0), int((obj & occupied).sum()))
    return best


@dataclass(frozen=True)
class CompleteMask:
    mask: np.ndarray  # bool [H, W]: `part` dilated by `radius`
    part: np.ndarray  # bool [H, W]: one connected piece of the object's mask
    radius: int


def complete_mask(obj: np.ndarray, rng: np.random.Generator, max_radius: int,
                  keep: tuple[float, float] = (0.2, 0.8)) -> CompleteMask:
    """A contiguous part of the object: its pixels on one side of a random line (a `keep` fraction of
    them, drawn uniformly), the largest connected piece of that, dilated by a radius in [0, max_radius]."""
    rows, cols = np.nonzero(obj)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    projection = rows * np.sin(angle) + cols * np.cos(angle)
    fraction = rng.uniform(*keep)
    cut = np.quantile(projection, fraction)
    part = np.zeros_like(obj)
    part[rows[projection <= cut], cols[projection <= cut]] = True
    labels, count = ndimage.label(part)  # 4-connected pieces: keep the largest, so the part is contiguous
    if count > 1:
        sizes = ndimage.sum_labels(part, labels, index=np.arange(1, count + 1))
        part = labels == 1 + int(np.argmax(sizes))
    radius = int(rng.integers(0, max_radius + 1))
    return CompleteMask(dilate(part, radius), part, radius)
