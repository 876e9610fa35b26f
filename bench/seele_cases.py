"""Benchmark cases of the repositioning editor's estimators: depth (DPT / MiDaS v3) and matting (ViTMatte).

| component | what one timed run is | peer (baseline) |
| --- | --- | --- |
| depth-estimator | a photo (uint8, r x r) to relative inverse depth at r x r: the pipeline's `DepthEstimator` (resize to S x S, DPT, resize back) | transformers' `pipeline("depth-estimation", model=DIR/depth)` on the same photo; also with `torch.compile(pipe.model)` |
| matting | a photo and the trimap of a subject mask to alpha at r x r: the pipeline's `Matter` (normalise, pad to 32, ViTMatte, crop) | `VitMatteImageProcessor` + `VitMatteForImageMatting` from DIR/matting (transformers has no matting pipeline); also with the model torch.compile'd |

Our rows call the estimator the pipeline holds (`RepositionPipeline.depth_estimator` / `.matter`), so
every backend runs the same pre/post-processing and differs only in the engine behind it: torch-eager
(the model's own modules), torch+cudagraph (depth only: DPT replayed from one CUDA graph; CUDA only),
torch+compile (inductor on the engine's module; on CUDA inside that graph), onnxruntime (the exported
graph), tensorrt (declared; a skipped row where TensorRT is absent). The peers load their own copy of
the same folder, in the bench's dtype, on the bench's device, and compute the same output (tests
hold them equal: tests/models/test_depth.py, test_matting.py). Weights folders without depth/ or
matting/ have no such rows (a note says so).
"""
from __future__ import annotations

import gc

import numpy as np
import torch

from editrt.bench.cases import PLANNED_ENGINES, BenchContext, Case, Run, Skip, dtype_name

# The peers are bench/cases.py's `transformers` and `transformers+compile` backends (see the table above).
OURS = ("torch+compile", "onnxruntime")
DEPTH_OURS = ("torch+cudagraph", *OURS)  # DPT's fixed S x S input replays as one CUDA graph (CUDA only)


def _band(size: int) -> int:
    """The trimap band of the matting rows: ~1.5 % of the side, as wide as a soft edge at that size."""
    return max(2, size // 64)


def _check_map(size: int, what: str, lo: float | None = None, hi: float | None = None):
    def check(out) -> None:
        out = out.cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        if out.shape != (size, size):
            raise AssertionError(f"{what}: output shape {out.shape}, expected {(size, size)}")
        if not np.isfinite(out).all():
            raise AssertionError(f"{what}: output holds non-finite values")
        if (lo is not None and out.min() < lo) or (hi is not None and out.max() > hi):
            raise AssertionError(f"{what}: values outside [{lo}, {hi}]")
    return check


def _estimator(ctx: BenchContext, backend: str, name: str):
    """The pipeline's DepthEstimator / Matter for one of our backends (engines from build_engines)."""
    pipe = ctx.reposition(backend)
    estimator = pipe.depth_estimator if name == "depth_estimator" else pipe.matter
    if estimator is None:
        raise Skip(f"the {backend} pipeline has no {name} engine (an export folder written before it existed: "
                   f"`editrt export --component {name}`)")
    return estimator, pipe.engines[name]


def _depth_ours(ctx: BenchContext, backend: str = "torch-eager") -> Run:
    estimator, engine = _estimator(ctx, backend, "depth_estimator")
    r = ctx.resolution
    inputs = ctx.photos(r)
    flops = None
    if backend == "torch-eager":
        from editrt.bench.timing import count_flops

        flops = count_flops(estimator, inputs[0])
    return Run(estimator, inputs, dtype_name(ctx.dtype), _check_map(r, "depth"), flops=flops, parts=[engine])


def _matting_inputs(ctx: BenchContext) -> list[tuple[np.ndarray, np.ndarray]]:
    from editrt.runtime.estimators import trimap_from_mask

    r = ctx.resolution
    return [(photo, trimap_from_mask(mask, _band(r))) for photo, mask in zip(ctx.photos(r), ctx.subject_masks(r))]


def _matting_ours(ctx: BenchContext, backend: str = "torch-eager") -> Run:
    matter, engine = _estimator(ctx, backend, "matting")
    inputs = _matting_inputs(ctx)
    call = lambda x: matter(*x)  # noqa: E731
    flops = None
    if backend == "torch-eager":
        from editrt.bench.timing import count_flops

        flops = count_flops(call, inputs[0])
    return Run(call, inputs, dtype_name(ctx.dtype), _check_map(ctx.resolution, "matting", 0.0, 1.0), flops=flops,
               parts=[engine])


def _quiet_transformers():
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # its "Loading weights" bar would cut through ours
    return lambda: logging.enable_progress_bar() if was_on else None


def _depth_transformers(ctx: BenchContext, compile: bool = False) -> Run:
    from PIL import Image
    from transformers import pipeline

    from editrt.models.components import WeightsLayout

    restore = _quiet_transformers()
    try:
        peer = pipeline("depth-estimation", model=str(WeightsLayout(ctx.weights).depth), device=ctx.device,
                        dtype=ctx.dtype)
    finally:
        restore()
    if compile:
        peer.model = torch.compile(peer.model)
    images = [Image.fromarray(p) for p in ctx.photos(ctx.resolution)]
    call = lambda image: peer(image)["predicted_depth"]  # noqa: E731

    def close():
        nonlocal peer
        peer = None  # drop the peer's copy of the weights before the next row's memory is read
        gc.collect()

    return Run(call, images, dtype_name(peer.model.dtype), _check_map(ctx.resolution, "transformers depth"),
               parts=[peer.model], close=close, networks={"depth_estimator": peer.model})


def _matting_transformers(ctx: BenchContext, compile: bool = False) -> Run:
    from transformers import VitMatteForImageMatting, VitMatteImageProcessor

    from editrt.models.components import WeightsLayout

    folder = WeightsLayout(ctx.weights).matting
    restore = _quiet_transformers()
    try:
        processor = VitMatteImageProcessor.from_pretrained(folder)
        model = VitMatteForImageMatting.from_pretrained(folder, dtype=ctx.dtype).eval().to(ctx.device)
    finally:
        restore()
    run_model = torch.compile(model) if compile else model
    r = ctx.resolution

    def call(x):
        photo, trimap = x
        inputs = processor(images=photo, trimaps=trimap, return_tensors="pt").to(ctx.device, ctx.dtype)
        return run_model(**inputs).alphas[0, 0, :r, :r]  # cropped back to the photo, as the model card does

    def close():
        nonlocal model, run_model
        model = run_model = None
        gc.collect()

    return Run(call, _matting_inputs(ctx), dtype_name(ctx.dtype), _check_map(r, "transformers matting", 0.0, 1.0),
               parts=[run_model], close=close, networks={"matting": run_model})


def _runners(build, peer, ours=OURS) -> dict:
    return {"transformers": lambda: peer(False), "transformers+compile": lambda: peer(True),
            "torch-eager": lambda: build("torch-eager"), **{b: (lambda b=b: build(b)) for b in ours},
            **PLANNED_ENGINES}


def seele_cases(ctx: BenchContext) -> list[Case]:
    from editrt.models.components import WeightsLayout
    from editrt.models.estimators import estimator_networks_present

    if not ctx.selection.may_want_family("depth") and not ctx.selection.may_want_family("matting"):
        return []
    present = estimator_networks_present(WeightsLayout(ctx.weights))
    r, cases = ctx.resolution, []
    if "depth_estimator" in present:
        size = ctx.read_json("depth", "config.json").get("image_size", 384)
        cases.append(Case("depth-estimator", f"{r}x{r} photo -> 1x3x{size}x{size} -> {r}x{r}",
                          _runners(lambda b: _depth_ours(ctx, b), lambda c: _depth_transformers(ctx, c), DEPTH_OURS),
                          baseline="transformers",
                          about="photo to relative inverse depth, DPT (pipeline('depth-estimation'), also with its "
                                "model torch.compile'd, vs DepthEstimator)"))
    else:
        ctx.notes.append(f"no depth-estimator rows: {ctx.weights}/depth has no config.json")
    if "matting" in present:
        cases.append(Case("matting", f"{r}x{r} photo + trimap (band {_band(r)}) -> 1x4x{-(-r // 32) * 32}x"
                                     f"{-(-r // 32) * 32} -> {r}x{r}",
                          _runners(lambda b: _matting_ours(ctx, b), lambda c: _matting_transformers(ctx, c)),
                          baseline="transformers",
                          about="photo + trimap to alpha, ViTMatte (VitMatteImageProcessor + VitMatteForImageMatting, "
                                "also torch.compile'd, vs Matter)"))
    else:
        ctx.notes.append(f"no matting rows: {ctx.weights}/matting has no config.json")
    return cases
