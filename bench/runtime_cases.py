"""Benchmark cases of the runtime scheduler and the interactive sessions (runtime/scheduler.py, session.py).

| component | what one timed run is |
| --- | --- |
| loop-inpaint-cfg2 | a whole inpainting denoising loop (UNet, guidance, DDIM update, every step) on static buffers: eager vs one replayed CUDA graph |
| loop-elements-cfg2 | the same for the element decoder (77 text and 256 element tokens) |
| session-first-edit | a new EditSession on a new photo + the first final reposition (SAM embedding, remove, harmonize) |
| session-next-edit | the next drag position of the same subject at full quality (remove is cached: paste + harmonize) |
| session-preview | the next drag position at preview quality (few steps, half resolution) |

The loops compare `torch-eager` (the same loop, not captured) with `torch+cudagraph` (CUDA only).
"""
from __future__ import annotations

import numpy as np
import torch

from editrt.bench.cases import BenchContext, Case, Run, dtype_name

PREVIEW_STEPS = 4


def _loop_run(ctx: BenchContext, editor: str, graphs: bool) -> Run:
    from editrt.runtime.scheduler import LoopCache, LoopKey

    if editor == "inpaint":
        pipe = ctx.fast_pipeline
        lat = ctx.resolution // ctx.vae_scale_factor
        engine, extra = pipe.engines["inpaint_unet"], ctx.randn(2, 5, lat, lat)
        context = {"encoder_hidden_states": pipe.prompt_embeds("remove", True)}
        config = pipe.scheduler_config
    else:
        from editrt.bench.elements_cases import elements_pipeline

        pipe = elements_pipeline(ctx, "torch+kernels")
        lat = pipe.default_resolution // pipe.vae_scale_factor
        width = pipe.embedder.proj.out_features
        engine, extra, config = pipe.engines["element_unet"], None, pipe.scheduler_config
        context = {"encoder_hidden_states": ctx.randn(2, 77, width), "element_tokens": ctx.randn(2, 256, width)}
    key = LoopKey(f"bench-{editor}", (1, 4, lat, lat), None if extra is None else tuple(extra.shape),
                  tuple((k, tuple(v.shape)) for k, v in context.items()), ctx.steps, True, ctx.dtype)
    loop = LoopCache(config, ctx.device, use_graphs=graphs).get(key, engine)
    inputs = [ctx.randn(1, 4, lat, lat) for _ in range(ctx.n_inputs)]

    def check(out) -> None:
        if tuple(out.shape) != (1, 4, lat, lat) or not torch.isfinite(out).all():
            raise AssertionError(f"loop: latents {tuple(out.shape)}, finite {bool(torch.isfinite(out).all())}")
        if graphs and loop.graph is None:
            raise AssertionError("loop: no CUDA graph was captured")

    return Run(lambda z: loop.run(z, context, extra, 3.0), inputs, dtype_name(ctx.dtype), check)


def _session_run(ctx: BenchContext, which: str) -> Run:
    from editrt.runtime.session import EditSession

    pipe, r = ctx.fast_pipeline, ctx.resolution
    photos, masks = ctx.photos(r), ctx.subject_masks(r)
    moves = [(r // 8, r // 16), (r // 10, -r // 20), (-r // 12, r // 24)]

    def check(result) -> None:
        if result.image.size != (r, r):
            raise AssertionError(f"session: image {result.image.size}, expected {(r, r)}")

    if which == "first":
        def call(x):
            photo, mask, move = x
            with EditSession(photo, pipe, steps=ctx.steps, resolution=r) as session:
                session.select(mask=mask)
                return session.final(move=move)
        return Run(call, list(zip(photos, masks, moves)), dtype_name(ctx.dtype), check)
    session = EditSession(photos[0], pipe, steps=ctx.steps, preview_steps=PREVIEW_STEPS, resolution=r)
    session.select(mask=masks[0])
    session.final(move=moves[0])  # the first edit: fills the caches
    if which == "next":
        call = lambda move: session.final(move=move)  # noqa: E731
    else:
        session.preview(move=moves[0]).result()
        call = lambda move: session.preview(move=move).result()  # noqa: E731
    return Run(call, [np.add(m, 1).tolist() for m in moves], dtype_name(ctx.dtype), check, close=session.close)


def runtime_cases(ctx: BenchContext) -> list[Case]:
    r, lat, steps = ctx.resolution, ctx.resolution // ctx.vae_scale_factor, ctx.steps
    cases = [
        Case("loop-inpaint-cfg2", f"latents 1x4x{lat}x{lat}, CFG batch 2, {steps} steps", steps=steps, heavy=True,
             runners={"torch-eager": lambda: _loop_run(ctx, "inpaint", False),
                      "torch+cudagraph": lambda: _loop_run(ctx, "inpaint", True)},
             about="a whole inpainting denoising loop on static buffers (K/V cached)"),
        Case("session-first-edit", f"{r}x{r}, new photo, remove + harmonize, {steps} steps", steps=steps, heavy=True,
             runners={"torch+kernels": lambda: _session_run(ctx, "first")}, baseline="torch+kernels",
             about="EditSession start + first final edit"),
        Case("session-next-edit", f"{r}x{r}, same subject, new move, {steps} steps", steps=steps, heavy=True,
             runners={"torch+kernels": lambda: _session_run(ctx, "next")}, baseline="torch+kernels",
             about="the next final drag position (remove cached: paste + harmonize)"),
        Case("session-preview", f"{r // 2}x{r // 2} preview, {PREVIEW_STEPS} steps", steps=PREVIEW_STEPS, heavy=True,
             runners={"torch+kernels": lambda: _session_run(ctx, "preview")}, baseline="torch+kernels",
             about="the next drag position at preview quality"),
    ]
    if (ctx.weights / "elements").is_dir():
        cases.insert(1, Case("loop-elements-cfg2", f"latents 1x4x{lat}x{lat}, 77 + 256 tokens, {steps} steps",
                             steps=steps, heavy=True,
                             runners={"torch-eager": lambda: _loop_run(ctx, "elements", False),
                                      "torch+cudagraph": lambda: _loop_run(ctx, "elements", True)},
                             about="a whole element-decoder denoising loop on static buffers"))
    return cases
