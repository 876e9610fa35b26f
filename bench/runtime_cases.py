"""Benchmark cases of the runtime scheduler and the interactive sessions (runtime/scheduler.py, session.py).

| component | what one timed run is |
| --- | --- |
| loop-inpaint-cfg2 | a whole inpainting denoising loop (UNet, guidance, DDIM update, every step) on static buffers |
| loop-elements-cfg2 | the same for the element decoder (77 text and 256 element tokens) |
| session-first-edit | a new EditSession on a new photo (its SAM embedding, computed in every call: the embedding cache is emptied first) + one click (mask decode) + the first final reposition (remove, harmonize) |
| session-next-edit | the next drag position of the same subject at full quality (remove is cached: paste + harmonize) |
| session-preview | the next drag position at preview quality (few steps, half resolution) |

Each compares `torch-eager` (plain UNet, eager loop) with `torch+kvcache` (K/V-cached UNet, eager loop)
and `torch+cudagraph` (the K/V-cached loop captured once, replayed; CUDA only). The first edit selects
its subject with a click, as a user does: a given mask would time a SAM embedding nothing uses.
"""
from __future__ import annotations

import numpy as np
import torch

from editrt.bench.cases import BenchContext, Case, Run, dtype_name, pipeline_parts

PREVIEW_STEPS = 4


def _loop_run(ctx: BenchContext, editor: str, backend: str) -> Run:
    """A whole denoising loop on static buffers: torch-eager (plain UNet), torch+kvcache (K/V-cached UNet,
    eager loop), torch+cudagraph (the K/V-cached UNet's loop captured once, replayed per run)."""
    from editrt.runtime.scheduler import LoopCache, LoopKey

    graphs = backend == "torch+cudagraph"
    variant = "torch-eager" if backend == "torch-eager" else "torch+kvcache"  # the UNet the loop calls
    if editor == "inpaint":
        pipe = ctx.reposition(variant)
        lat = ctx.resolution // ctx.vae_scale_factor
        engine, extra = pipe.engines["inpaint_unet"], ctx.randn(2, 5, lat, lat)
        context = {"encoder_hidden_states": pipe.prompt_embeds("remove", True)}
        config = pipe.scheduler_config
    else:
        from editrt.bench.elements_cases import elements_pipeline

        pipe = elements_pipeline(ctx, variant)
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

    return Run(lambda z: loop.run(z, context, extra, 3.0), inputs, dtype_name(ctx.dtype), check, parts=[engine])


def _session_inputs(ctx: BenchContext) -> list[tuple[np.ndarray, list[float], tuple[int, int]]]:
    """(photo, click, move): different photos at the processing size, each with a click on which SAM finds a
    subject (random weights may find none at a point) and a move that keeps it inside the image."""
    from editrt.errors import InputError
    from editrt.runtime.images import shift_or_warp

    def make():
        pipe, r = ctx.pipeline, ctx.resolution
        moves = [(r // 8, r // 16), (r // 10, -r // 20), (-r // 12, r // 24)]
        candidates = [[0.5, 0.5], [0.4, 0.6], [0.6, 0.4], [0.3, 0.3], [0.7, 0.7], [0.5, 0.25], [0.25, 0.5]]
        inputs = []
        for i, photo in enumerate(ctx.photos(r)):
            for cx, cy in candidates[i:] + candidates[:i]:
                point = [cx * r, cy * r]
                try:
                    subject = pipe.segment(photo, points=[point])
                except InputError:
                    continue
                if not shift_or_warp(photo, subject, *moves[i], 1.0)[1].any():
                    continue  # the move would put the whole subject outside the image
                inputs.append((photo, point, moves[i]))
                break
        if len(inputs) < 2:
            raise RuntimeError("SAM found no movable subject at any tried click on the bench photos")
        return inputs

    return ctx.memo("session inputs", make)


def _session_run(ctx: BenchContext, which: str, backend: str) -> Run:
    from editrt.runtime.session import EditSession

    pipe, r = ctx.reposition(backend), ctx.resolution
    inputs = _session_inputs(ctx)

    def check(result) -> None:
        if result.image.size != (r, r):
            raise AssertionError(f"session: image {result.image.size}, expected {(r, r)}")

    if which == "first":
        def call(x):  # what a user's first edit costs: the photo's SAM embedding, a click, a final drag
            photo, point, move = x
            # a new photo has no embedding yet; the bench photos' are cached (their clicks were chosen on them,
            # and the warm-up fills the cache), so it is emptied: every call embeds, as a user's first edit does
            pipe.segmenter.cache.clear()
            with EditSession(photo, pipe, steps=ctx.steps, resolution=r) as session:
                session.select(points=[point])
                return session.final(move=move)
        return Run(call, inputs, dtype_name(ctx.dtype), check, parts=pipeline_parts(pipe))
    photo, point, move = inputs[0]
    session = EditSession(photo, pipe, steps=ctx.steps, preview_steps=PREVIEW_STEPS, resolution=r)
    session.select(points=[point])
    session.final(move=move)  # the first edit: fills the caches
    moves = [np.add(move, d).tolist() for d in ((1, 0), (0, 1), (-1, -1))]  # the next drag positions
    if which == "next":
        call = lambda m: session.final(move=m)  # noqa: E731
    else:
        session.preview(move=move).result()
        call = lambda m: session.preview(move=m).result()  # noqa: E731
    return Run(call, moves, dtype_name(ctx.dtype), check, close=session.close, parts=pipeline_parts(pipe))


def runtime_cases(ctx: BenchContext) -> list[Case]:
    r, lat, steps = ctx.resolution, ctx.resolution // ctx.vae_scale_factor, ctx.steps

    def runners(build) -> dict:
        return {b: (lambda b=b: build(b)) for b in ("torch-eager", "torch+kvcache", "torch+cudagraph")}

    cases = [
        Case("loop-inpaint-cfg2", f"latents 1x4x{lat}x{lat}, CFG batch 2, {steps} steps", steps=steps, heavy=True,
             runners=runners(lambda b: _loop_run(ctx, "inpaint", b)),
             about="a whole inpainting denoising loop on static buffers"),
        Case("session-first-edit", f"{r}x{r}, new photo, 1 click, remove + harmonize, {steps} steps", steps=steps,
             heavy=True, runners=runners(lambda b: _session_run(ctx, "first", b)),
             about="EditSession on a new photo (SAM embedding) + one click (mask decode) + the first final edit"),
        Case("session-next-edit", f"{r}x{r}, same subject, new move, {steps} steps", steps=steps, heavy=True,
             runners=runners(lambda b: _session_run(ctx, "next", b)),
             about="the next final drag position (remove cached: paste + harmonize)"),
        Case("session-preview", f"{r // 2}x{r // 2} preview, {PREVIEW_STEPS} steps", steps=PREVIEW_STEPS, heavy=True,
             runners=runners(lambda b: _session_run(ctx, "preview", b)),
             about="the next drag position at preview quality"),
    ]
    if (ctx.weights / "elements").is_dir():
        cases.insert(1, Case("loop-elements-cfg2", f"latents 1x4x{lat}x{lat}, 77 + 256 tokens, {steps} steps",
                             steps=steps, heavy=True, runners=runners(lambda b: _loop_run(ctx, "elements", b)),
                             about="a whole element-decoder denoising loop on static buffers"))
    return cases
