"""Benchmark rows of the partition's clean-up (kernels/cleanup.py): scipy vs the native ops.

| component | what one timed run is |
| --- | --- |
| partition-cleanup | the clean-up of one 512x512 label map with 256 elements: 3x3 opening and each element's largest 4-connected piece, with the result's statistics (counts, centroids, boxes) |
| partition-with-cleanup | `runtime.partition.partition` of a 512x512 photo whose SAM embedding is cached (SAM grid decode, SLIC assignment, clean-up; `observed` shows the embedding-cache hit and no image-encoder call) with the clean-up of each row's backend: the clean-up's share of the partition is partition-cleanup's p50 over this p50 (printed by the quick look below) |

Rows: `scipy` (baseline: per-element scipy.ndimage on the host, `cleanup_reference`), `native-cpu`
(the op on CPU tensors) and `native-cuda` (the op on CUDA tensors; skipped without CUDA or
without a CUDA build). The label maps are realistic partitions: SLIC superpixels of crops of the
bench photograph (scikit-image; jittered-grid Voronoi regions with wiggly borders where it is
absent), ids shuffled over 0..255, with label noise from nearby pixels and a few dropped pixels.
Every output is checked against the scipy result of the same map before timing.

Quick look without the whole suite: `python -m editrt.bench.cleanup_cases [WEIGHTS]` (the
partition rows need a weights directory with elements/, e.g. from `editrt weights init`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch

from editrt.bench.cases import BenchContext, Case, Run, Skip, dtype_name, pipeline_parts

SIZE = 512  # the paper's working resolution
ELEMENTS = 256  # its 16x16 grid
COMPONENT = "partition-cleanup"
PARTITION_COMPONENT = "partition-with-cleanup"


def _superpixels(photo: np.ndarray, n: int) -> np.ndarray:
    from skimage.segmentation import slic

    return slic(photo, n_segments=n, compactness=10, start_label=0).astype(np.int64)


def _voronoi(size: int, n: int, rng: np.random.Generator) -> np.ndarray:
    side = int(np.ceil(np.sqrt(n)))
    gy, gx = np.divmod(np.arange(n), side)
    pts = np.stack([(gx + rng.uniform(0.2, 0.8, n)) * size / side, (gy + rng.uniform(0.2, 0.8, n)) * size / side], 1)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    yy += 4 * np.sin(xx / 9 + rng.uniform(0, 6))
    xx += 4 * np.cos(yy / 7 + rng.uniform(0, 6))
    best = np.full((size, size), np.inf, np.float32)
    labels = np.zeros((size, size), np.int64)
    for k, (px, py) in enumerate(pts):  # nearest point, without an [H, W, N] array
        d = (xx - px) ** 2 + (yy - py) ** 2
        closer = d < best
        best[closer], labels[closer] = d[closer], k
    return labels


def label_maps(ctx: BenchContext, size: int = SIZE, n: int = ELEMENTS) -> list[np.ndarray]:
    """`ctx.n_inputs` different realistic int64 [size, size] maps with ids in [-1, n)."""
    rng = np.random.default_rng(13)
    try:
        regions = [_superpixels(photo, n) for photo in ctx.photos(size)]
    except ImportError:  # scikit-image is a dev extra
        regions = [_voronoi(size, n, rng) for _ in range(ctx.n_inputs)]
    maps = []
    for segments in regions:
        labels = rng.permutation(n)[segments % n]  # shuffled ids (SLIC may return a few more regions than asked)
        # noise: 1% of pixels take the label of a pixel up to 4 steps away (islands, ragged borders)
        flip = rng.random(labels.shape) < 0.01
        src_y = np.clip(np.arange(size)[:, None] + rng.integers(-4, 5, labels.shape), 0, size - 1)
        src_x = np.clip(np.arange(size)[None, :] + rng.integers(-4, 5, labels.shape), 0, size - 1)
        labels[flip] = labels[src_y, src_x][flip]
        labels[rng.random(labels.shape) < 0.001] = -1
        maps.append(labels)
    return maps


def _expected(ctx: BenchContext) -> list[np.ndarray]:
    from editrt.kernels.cleanup import clean_labels_reference

    return ctx.memo("cleanup expected", lambda: [clean_labels_reference(m, ELEMENTS, 1) for m in _maps(ctx)])


def _maps(ctx: BenchContext) -> list[np.ndarray]:
    return ctx.memo("cleanup label maps", lambda: label_maps(ctx))


def _checker(ctx: BenchContext):
    """Validates an output by finding which input it came from: it must equal scipy's result for that map."""
    expected = _expected(ctx)

    def check(out) -> None:
        got = out.labels.cpu().numpy()
        if not any(np.array_equal(got, e) for e in expected):
            raise AssertionError(f"{COMPONENT}: native labels differ from the scipy path")
    return check


def _scipy(ctx: BenchContext) -> Run:
    from editrt.kernels.cleanup import cleanup_reference

    inputs = [torch.from_numpy(m) for m in _maps(ctx)]
    return Run(lambda x: cleanup_reference(x, ELEMENTS, 1), inputs, "int64", _checker(ctx))


def _native(ctx: BenchContext, device: str) -> Run:
    from editrt.kernels import cleanup

    if device == "cuda" and not torch.cuda.is_available():
        raise Skip("no CUDA device")
    if not cleanup.native_available(device):
        raise Skip(f"native {device} op not loaded: {cleanup.native_status()['error']}")
    inputs = [torch.from_numpy(m).to(device) for m in _maps(ctx)]
    return Run(lambda x: cleanup.cleanup_native(x, ELEMENTS, 1), inputs, "int64", _checker(ctx),
               bytes=SIZE * SIZE * 8 * 2)  # the floor: read the labels once, write the result once


@contextmanager
def _native_switch(on: bool):
    """EDITRT_NATIVE for the duration of one call (the partition picks its clean-up path per call)."""
    before = os.environ.get("EDITRT_NATIVE")
    os.environ["EDITRT_NATIVE"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["EDITRT_NATIVE"]
        else:
            os.environ["EDITRT_NATIVE"] = before


def _partition(ctx: BenchContext, backend: str) -> Run:
    from editrt.kernels import cleanup
    from editrt.runtime.partition import partition
    from editrt.weights import WeightsLayout

    if not WeightsLayout(ctx.weights).elements.is_dir():
        raise Skip(f"{ctx.weights} has no elements/ folder (SAM weights for the partition)")
    device = {"scipy": ctx.device.type, "native-cpu": "cpu", "native-cuda": "cuda"}[backend]
    if device != ctx.device.type:
        raise Skip(f"the partition's labels are on {ctx.device.type} here; this row cleans {device} labels")
    if backend != "scipy" and not cleanup.native_available(device):
        raise Skip(f"native {device} op not loaded: {cleanup.native_status()['error']}")

    def load():
        from editrt.runtime.elements_pipeline import ElementsPipeline

        return ElementsPipeline.from_pretrained(ctx.weights, device=ctx.device, dtype=ctx.dtype)

    pipe = ctx.memo("cleanup elements pipeline", load)
    photos = [pipe.working_image(photo, resolution=SIZE) for photo in ctx.photos(SIZE)]
    for rgb in photos:  # every timed run decodes against a cached embedding (the row times what follows it)
        pipe.segmenter.embedding(rgb)

    def call(rgb):
        with _native_switch(backend != "scipy"):
            return partition(pipe.segmenter, rgb)

    def check(part) -> None:
        if not (part.counts > 0).any():
            raise AssertionError(f"{PARTITION_COMPONENT}: no element survived")

    return Run(call, photos, dtype_name(ctx.dtype), check, parts=pipeline_parts(pipe))


def cleanup_cases(ctx: BenchContext) -> list[Case]:
    cases = []
    if ctx.selection.wants(COMPONENT):
        cases.append(Case(COMPONENT, f"labels {SIZE}x{SIZE} int64, N={ELEMENTS}, opening 1",
                          {"scipy": lambda: _scipy(ctx), "native-cpu": lambda: _native(ctx, "cpu"),
                           "native-cuda": lambda: _native(ctx, "cuda")},
                          baseline="scipy",
                          about="partition clean-up: 3x3 opening + largest 4-connected piece per element"))
    if ctx.selection.wants(PARTITION_COMPONENT):
        cases.append(Case(PARTITION_COMPONENT, f"{SIZE}x{SIZE} photo, 16x16 grid",
                          {b: (lambda b=b: _partition(ctx, b)) for b in ("scipy", "native-cpu", "native-cuda")},
                          baseline="scipy", heavy=True,
                          about="the partition (SAM embedding cached) with this row's clean-up (share: partition-cleanup p50 / this)"))
    return cases


if __name__ == "__main__":  # a quick look without the whole suite: python -m editrt.bench.cleanup_cases [WEIGHTS]
    import sys
    from pathlib import Path

    from editrt.bench.cases import Selection
    from editrt.bench.timing import measure

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weights = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("weights")
    context = BenchContext(weights, device, torch.float32, "tiny", True, 1, Selection())
    times = {}
    for case in cleanup_cases(context):
        for backend in case.backends():
            try:
                run = case.runners[backend]()
            except Skip as e:
                print(f"{case.component}/{backend}: skipped ({e})")
                continue
            with torch.no_grad():
                run.check(run.call(run.inputs[-1]))
                timing = measure(run.call, run.inputs, device, warmup=1 if case.heavy else 2)
            times[case.component, backend] = timing.p50_ms
            base = times.get((case.component, case.baseline))
            ratio = f", {base / timing.p50_ms:.1f}x {case.baseline}" if backend != case.baseline and base else ""
            share = times.get((COMPONENT, backend)) if case.component == PARTITION_COMPONENT else None
            share = f", clean-up {100 * share / timing.p50_ms:.1f}% of it" if share else ""
            print(f"{case.component}/{backend}: p50 {timing.p50_ms:.2f} ms over {timing.repeats} runs{ratio}{share}")
