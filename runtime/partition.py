"""Image element partition: SLIC in SAM's feature space (paper 001 Sec. 3.1, App. C.3, Algorithm 2).

    C0 = Q (a 16x16 grid of query points)
    for i in 1..T:
        s  = sigmoid(SAM mask logits of each query C_{i-1})        one batched mask-decoder call
        q  = argmax_n s(m, n)                                       plain SAM assignment
        C  = centroids(q)          (an element with no pixel keeps its grid point)
        C~ = beta_c * C + (1 - beta_c) * Q                          centroid adjustment
        q~ = argmax_n [s(m, n) - beta * d(m, C~_n)]                 distance regularisation (Eq. 1)
        C_i = centroids(q~)
    morphological opening + connected components (each element keeps its largest piece; the rest
    is dropped), then every dropped pixel is given to a neighbouring element: no pixel is left
    without one

The assignment is `editrt.kernels.slic` (`assign` on CUDA, its reference `assign_reference`
elsewhere; both give equal labels): logits upsampled bilinearly (align_corners=False) to the
working resolution, pixel centres ((j + 0.5)/W, (i + 0.5)/H), squared distances in normalised
coordinates (beta = 64 costs 0.25 at one grid spacing), ties to the lowest index.

The clean-up is `editrt.kernels.cleanup` (the native op on the labels' device, so on CUDA the label
map leaves the device only once, as the result; its scipy reference elsewhere; both give equal
labels); `cleanup.fill_dropped` then grows the elements into the pixels it dropped (on the same
device), and the statistics are measured on the filled map.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from editrt.errors import InputError
from editrt.kernels import cleanup, slic
from editrt.runtime.segmenter import Segmenter


@dataclass
class Partition:
    labels: np.ndarray  # int64 [H, W], element id of every pixel (the dropped ones given to a neighbouring element)
    centroids: np.ndarray  # float32 [N, 2] (x, y) in [0, 1]; NaN for an element without pixels
    boxes: np.ndarray  # int64 [N, 4] (x0, y0, x1, y1) inclusive; -1 for an element without pixels
    counts: np.ndarray  # int64 [N] pixels per element
    dropped_fraction: float  # share of pixels the clean-up dropped, then gave to neighbours (the paper sees ~0.1%)

    @property
    def num_elements(self) -> int:
        return len(self.counts)


def grid_points(grid: int) -> torch.Tensor:
    """[grid*grid, 2] (x, y) cell centres in [0, 1], row-major (element id = row * grid + column)."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)


def _assign(logits, centroids, beta, out_hw):
    fn = slic.assign if logits.is_cuda else slic.assign_reference
    return fn(logits, centroids.to(logits.device), beta, out_hw)


def _stats(labels, n):
    return (slic.element_stats if labels.is_cuda else slic.element_stats_reference)(labels, n)


def _centroids_or_grid(labels, grid_q):
    counts, centroids, _ = _stats(labels, len(grid_q))
    return torch.where((counts > 0)[:, None], centroids, grid_q.to(centroids.device))


def _cleanup(labels: torch.Tensor, num_elements: int, opening: int) -> cleanup.Cleaned:
    try:
        return cleanup.cleanup(labels, num_elements, opening)
    except ValueError as e:  # the kernels' input errors, at the API edge; field None: the label map, element
        raise InputError(f"partition clean-up: {e}") from e  # count and opening are checked together there


def clean_labels(labels: np.ndarray, num_elements: int, opening: int = 1, fill: bool = False) -> np.ndarray:
    """Morphological opening of each element, then keep its largest connected piece; the rest -> -1.

    int64 [H, W] labels in [-1, num_elements); the native op when built, else scipy
    (`editrt.kernels.cleanup.clean_labels_reference`, the oracle): equal results. `fill`: the pixels the
    clean-up dropped go to a neighbouring element (`cleanup.fill_dropped`); pixels -1 on input stay -1.
    """
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        raise InputError(f"labels: expected an integer numpy label map, got {getattr(labels, 'dtype', type(labels))}", field="labels")
    given = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    cleaned = _cleanup(given, num_elements, opening).labels
    return (cleanup.fill_dropped(cleaned, fillable=given >= 0) if fill else cleaned).numpy()


def partition(segmenter: Segmenter, rgb: np.ndarray, grid: int = 16, beta: float = 64.0, beta_c: float = 0.2,
              iterations: int = 1, opening: int = 1) -> Partition:
    """Partition `rgb` (the working resolution) into at most grid*grid elements."""
    h, w = rgb.shape[:2]
    grid_q = grid_points(grid)  # (N, 2)
    centroids = grid_q
    for _ in range(iterations):
        # 1. SAM scores of every query (the image embedding is cached across iterations).
        points = centroids.cpu().numpy() * np.array([w, h], dtype=np.float32)
        logits = segmenter.grid_logits(rgb, points)  # (N, h', w')
        # 2. Plain SAM assignment and its centroids, pulled towards the grid.
        q = _assign(logits, centroids, 0.0, (h, w))
        adjusted = beta_c * _centroids_or_grid(q, grid_q) + (1 - beta_c) * grid_q.to(logits.device)
        # 3. Distance-regularised assignment (Eq. 1).
        labels = _assign(logits, adjusted, beta, (h, w))
        centroids = _centroids_or_grid(labels, grid_q)
    # 4. Clean-up on the labels' device: opening + largest connected piece per element; the pixels it drops
    #    go to a neighbouring element, so an unedited render has no holes; statistics of the filled map.
    cleaned = _cleanup(labels, len(grid_q), opening).labels
    dropped = float((cleaned < 0).double().mean())
    filled = cleanup.fill_dropped(cleaned)
    counts, centroids, boxes = _stats(filled, len(grid_q))
    final = filled.cpu().numpy()  # the one transfer of the label map
    return Partition(labels=final, centroids=centroids.cpu().numpy(), boxes=boxes.cpu().numpy(),
                     counts=counts.cpu().numpy(), dropped_fraction=dropped)
