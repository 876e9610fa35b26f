"""Benchmark rows of the less-work options of `inpaint` (issue 26): region crops and cached denoising features.

| component | what one timed run is | peer (baseline) |
| --- | --- | --- |
| crop-whole-MASK | a 2048x1536 photo (scaled with the processing size: 4r x 3r) inpainted whole at short side r | `StableDiffusionInpaintPipeline` at the same size |
| crop-processing-MASK | the same, `crop_padding` P, `crop_size="processing"`: the padded box resized to the processing size | the same pipeline with `padding_mask_crop=P` |
| crop-native-MASK | `crop_size="native"`: the padded box at its own resolution (multiple of 8, at most the processing size) | — (diffusers has no native-size crop) |
| crop-reposition-whole | the SEELE flow (remove + paste + harmonize, cached order) on a 4032x3024 photo (scaled as above: 7.875r x 5.906r), a 240x320 subject moved by (200, 40), the photo regenerated whole at short side r | — |
| crop-reposition-native | the same with `Quality(crop_padding=P, crop_size="native")`: REMOVE in the box around the void, HARMONIZE in the box around the void and the moved subject, each at its own resolution | — (no peer repositions) |
| deepcache-off | an r x r inpainting pass, every UNet step full | `StableDiffusionInpaintPipeline` |
| deepcache-iN-bB | the same with `cache_interval=N, cache_branch=B` | the same pipeline with DeepCache's `DeepCacheSDHelper(N, B)` |

MASK is `m120x90` or `m480x360`: a 120x90 or a 480x360 box mask at r = 512 (scaled by r / 512 on other processing
sizes, as the photo and the padding P = 32 are), three positions rotating. The processing size r is the UNet's
native size (`BenchContext.resolution`: 512 for `full`).

Each row's `observed` counts what the UNet processed, while it ran (hooks on the UNet's `conv_in`, run by every
step, and `mid_block`, run only by a step that computes the deep features, ours and the peer's alike):
`unet_full_steps`, `unet_cached_steps`, `unet_latent_pixels` (latent H x W summed over the UNet calls: a crop's
size shows here) and, on the deepcache rows, `unet_flops` / `unet_flops_per_step`: each counted step adds the
FLOPs `models.deep_cache.step_flops` counted (torch's FlopCounterMode, on a meta copy of the UNet at the row's
shapes) for its kind; on the crop-reposition rows every UNet step adds the FLOPs of a full step at its own latent size
(the passes of a crop differ in size), counted the same way. The suite holds ours and the peer's to the same counts (bench/work.py `same_work`). The
deepcache rows also record `output_psnr_db`: the output's PSNR against the uncached output of the same input and
seed, over the mask's pixels (ours keeps the input bytes outside the mask, diffusers returns the decoded image).
"""
from __future__ import annotations

import gc
import math
import warnings

import numpy as np
import torch

from editrt.bench import work
from editrt.bench.cases import BenchContext, Case, Run, Skip, dtype_name, pipeline_parts

REFERENCE_SIDE = 512  # the sizes below are the issue's, at processing size 512
PHOTO_WH = (2048, 1536)
REPOSITION_PHOTO_WH = (4032, 3024)  # the ReS dataset's photo size
SUBJECT_WH, SUBJECT_MOVE = (240, 320), (200, 40)  # a subject whose edit (void + moved subject) fits the processing size
MASKS_WH = {"m120x90": (120, 90), "m480x360": (480, 360)}
CROP_PADDING = 32
CACHE_SETTINGS = ((3, 0), (2, 1))  # (cache_interval, cache_branch): DeepCache's usual N=3 at the shallowest branch


def _scaled(ctx: BenchContext, v: int) -> int:
    return max(1, round(v * ctx.resolution / REFERENCE_SIDE))


# ---------------------------------------------------------------------- counting what the UNet processed
def count_unet_work(unet, flops=None, network: str | None = None):
    """Wrap `unet.conv_in` and `unet.mid_block` (instance attributes, set before DeepCache's helper wraps the
    modules: its cached steps never call the mid block's own forward) to count every step, the full ones,
    the latent pixels and, with `flops` (step_flops' counts, or a function of the step's latent (h, w) giving
    them), the FLOPs of each step's kind. `network`: also count each step as one call of that network (our
    cached loop runs the UNet's blocks through models/deep_cache.DeepCacheUNet, not through the engine
    bench/work.py counts). Returns the undo."""
    conv_in, mid = unet.conv_in.forward, unet.mid_block.forward
    step = {}  # the current step's FLOPs (its mid block runs after its conv_in, at the conv_in's latent size)

    def counted_conv_in(sample, *args, **kwargs):
        work.count(work.UNET_STEPS)
        if network is not None:
            work.count(work.network(network))
        work.count(work.UNET_LATENT_PIXELS, int(sample.shape[-2] * sample.shape[-1]))
        step["flops"] = flops(tuple(sample.shape[-2:])) if callable(flops) else flops
        if step["flops"]:
            work.count(work.UNET_FLOPS, step["flops"]["cached"])
        return conv_in(sample, *args, **kwargs)

    def counted_mid(*args, **kwargs):
        work.count(work.UNET_FULL_STEPS)
        if step.get("flops"):
            work.count(work.UNET_FLOPS, step["flops"]["full"] - step["flops"]["cached"])
        return mid(*args, **kwargs)

    unet.conv_in.forward, unet.mid_block.forward = counted_conv_in, counted_mid

    def undo():
        del unet.conv_in.forward, unet.mid_block.forward  # back to the class's forward
    return undo


def counted_step_flops(ctx: BenchContext, branch: int, latent_hw: tuple[int, int]) -> dict:
    """step_flops of this UNet's architecture at the row's latent size (batch 1, guidance 1), on meta tensors."""
    from diffusers import UNet2DConditionModel

    from editrt.bench.reposition_cases import _prompt_tokens
    from editrt.models.deep_cache import step_flops

    config = ctx.unet_config
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        sample = torch.empty(1, config["in_channels"], *latent_hw)
        context = torch.empty(1, _prompt_tokens(ctx), config["cross_attention_dim"])
        timestep = torch.tensor([501.0])
    return step_flops(unet, branch, sample, timestep, context)


def psnr_db(a, b, mask) -> float:
    """PSNR of `a` against `b` over the mask's pixels (ours keeps the input bytes outside it, diffusers does not)."""
    err = np.mean((np.asarray(a, np.float64)[mask] - np.asarray(b, np.float64)[mask]) ** 2)
    return math.inf if err == 0 else 10 * math.log10(255.0 ** 2 / err)


# ---------------------------------------------------------------------- inputs
def _crop_inputs(ctx: BenchContext, mask_key: str) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(photo, mask, seed): the photo at 2048x1536 scaled, a box mask at three positions."""
    from PIL import Image

    def make():
        w, h = (_scaled(ctx, v) for v in PHOTO_WH)
        mw, mh = (_scaled(ctx, v) for v in MASKS_WH[mask_key])
        photos = ctx.photos(max(w, h))
        out = []
        for seed, (fx, fy) in enumerate(((0.3, 0.4), (0.6, 0.5), (0.45, 0.65))):
            photo = np.asarray(Image.fromarray(photos[seed]).resize((w, h), Image.LANCZOS))
            mask = np.zeros((h, w), bool)
            x0, y0 = int(fx * (w - mw)), int(fy * (h - mh))
            mask[y0:y0 + mh, x0:x0 + mw] = True
            out.append((photo, mask, seed))
        return out
    return ctx.memo(f"crop inputs {mask_key}", make)


def _reposition_inputs(ctx: BenchContext) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(photo, subject mask, seed): the photo at 4032x3024 scaled, an elliptical subject at three positions on the
    left half (moved right, it stays inside)."""
    from PIL import Image

    def make():
        w, h = (_scaled(ctx, v) for v in REPOSITION_PHOTO_WH)
        sw, sh = (_scaled(ctx, v) for v in SUBJECT_WH)
        photos = ctx.photos(max(w, h))
        yy, xx = np.mgrid[:h, :w]
        out = []
        for seed, (fx, fy) in enumerate(((0.15, 0.35), (0.3, 0.5), (0.2, 0.6))):
            photo = np.asarray(Image.fromarray(photos[seed]).resize((w, h), Image.LANCZOS))
            cx, cy = fx * w, fy * h
            out.append((photo, ((xx - cx) / (sw / 2)) ** 2 + ((yy - cy) / (sh / 2)) ** 2 <= 1.0, seed))
        return out
    return ctx.memo("crop reposition inputs", make)


def _full_step_flops(ctx: BenchContext, latent_hw: tuple[int, int]) -> dict:
    """A full UNet step's FLOPs at `latent_hw` (every step of an uncached pass is full: its 'cached' part plus the
    rest add up to it)."""
    return ctx.memo(f"step flops 0 {latent_hw}", lambda: counted_step_flops(ctx, 0, latent_hw))


def _ours_reposition(ctx: BenchContext, crop: dict) -> Run:
    from editrt.runtime.edits import Quality

    pipe = ctx.torch_pipeline("torch-eager")
    undo = count_unet_work(pipe.components.unet, lambda hw: _full_step_flops(ctx, hw))
    inputs = _reposition_inputs(ctx)
    move = tuple(_scaled(ctx, v) for v in SUBJECT_MOVE)

    def call(x):
        photo, mask, seed = x
        quality = Quality(steps=ctx.steps, guidance=1.0, seed=seed, resolution=ctx.resolution, **crop)
        return pipe(photo, mask=mask, move=move, harmonize=True, quality=quality).image

    return Run(call, inputs, dtype_name(ctx.dtype), _check_size(inputs[0][0].shape[1::-1], "reposition"),
               parts=pipeline_parts(pipe), close=undo)


def _square_inputs(ctx: BenchContext) -> list[tuple[np.ndarray, np.ndarray, int]]:
    r = ctx.resolution
    return [(photo, mask, seed) for seed, (photo, mask) in enumerate(zip(ctx.photos(r), ctx.subject_masks(r)))]


def _check_size(size_wh: tuple[int, int], what: str):
    def check(out) -> None:
        if out.size != size_wh:
            raise AssertionError(f"{what}: output image {out.size}, expected {size_wh}")
    return check


# ---------------------------------------------------------------------- ours
def _ours(ctx: BenchContext, inputs, options: dict, flops: dict | None = None, psnr_against=None) -> Run:
    pipe = ctx.torch_pipeline("torch-eager")
    cached = options.get("cache_interval", 1) > 1
    undo = count_unet_work(pipe.components.unet, flops, network="inpaint_unet" if cached else None)
    size = inputs[0][0].shape[1::-1]

    def call(x):
        out = pipe.inpaint(x[0], x[1], task="remove", steps=ctx.steps, guidance=1.0, seed=x[2],
                           resolution=ctx.resolution, **options)
        if psnr_against is not None:
            work.count(work.OUTPUT_PSNR, psnr_against[x[2]](out))
        return out

    return Run(call, inputs, dtype_name(ctx.dtype), _check_size(size, "inpaint"), parts=pipeline_parts(pipe),
               close=undo)


# ---------------------------------------------------------------------- diffusers
def _load_peer(ctx: BenchContext):
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import logging as diffusers_logging

    from editrt.weights import WeightsLayout

    bar_was_on = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            peer = StableDiffusionInpaintPipeline.from_pretrained(
                WeightsLayout(ctx.weights).inpaint, local_files_only=True, torch_dtype=ctx.dtype, safety_checker=None,
                requires_safety_checker=False, text_encoder=None, tokenizer=None, feature_extractor=None,
                image_encoder=None,
            ).to(ctx.device)
    finally:
        if bar_was_on:
            diffusers_logging.enable_progress_bar()
    peer.set_progress_bar_config(disable=True)
    scheduler_step = peer.scheduler.step

    def counted_step(*args, **kwargs):
        work.count_step()
        return scheduler_step(*args, **kwargs)

    peer.scheduler.step = counted_step
    return peer


def _peer(ctx: BenchContext, inputs, crop_padding: int | None = None, cache: tuple[int, int] | None = None,
          flops: dict | None = None, psnr_against=None) -> Run:
    from PIL import Image

    from editrt.models.inpaint import load_task_prompts
    from editrt.runtime.images import processing_size
    from editrt.weights import WeightsLayout

    helper_class = None
    if cache is not None:
        try:
            from DeepCache import DeepCacheSDHelper as helper_class
        except ImportError:
            raise Skip("DeepCache not installed (pip install DeepCache==0.1.1, the dev extra)") from None
    peer = _load_peer(ctx)
    undo = count_unet_work(peer.unet, flops)  # before the helper: it wraps what is there
    helper = None
    if helper_class is not None:
        helper = helper_class(peer)
        helper.set_params(cache_interval=cache[0], cache_branch_id=cache[1])
        helper.enable()
    prompt = load_task_prompts(WeightsLayout(ctx.weights).task_prompts, ctx.unet_config["cross_attention_dim"])["remove"]
    prompt = prompt[None].to(ctx.device, ctx.dtype)
    h, w = processing_size(inputs[0][1].shape, ctx.resolution)
    # diffusers returns the processing size, or with padding_mask_crop the photo's own (the crop pasted back)
    out_size = (w, h) if crop_padding is None else inputs[0][0].shape[1::-1]
    pil = [(Image.fromarray(photo), Image.fromarray(mask.astype(np.uint8) * 255), seed) for photo, mask, seed in inputs]
    extra = {} if crop_padding is None else {"padding_mask_crop": crop_padding}

    def call(x):
        image, mask, seed = x
        out = peer(prompt_embeds=prompt, image=image, mask_image=mask, height=h, width=w, num_inference_steps=ctx.steps,
                   guidance_scale=1.0, generator=torch.Generator("cpu").manual_seed(seed), **extra).images[0]
        if psnr_against is not None:
            work.count(work.OUTPUT_PSNR, psnr_against[seed](out))
        return out

    def close():
        nonlocal peer
        if helper is not None:
            helper.disable()
        undo()
        peer = None
        gc.collect()

    return Run(call, pil, dtype_name(ctx.dtype), _check_size(out_size, "diffusers inpaint"), close=close,
               parts=[peer.unet], networks={"inpaint_unet": peer.unet, "vae_encoder": peer.vae.encoder,
                                            "vae_decoder": peer.vae.decoder})


# ---------------------------------------------------------------------- deepcache rows' references
def _uncached_outputs(ctx: BenchContext, peer: bool) -> dict:
    """seed -> a function giving an output's PSNR against the uncached output of that input (ours or the peer's)."""
    def make():
        run = _peer(ctx, _square_inputs(ctx)) if peer else _ours(ctx, _square_inputs(ctx), {})
        try:
            with torch.no_grad():
                refs = {x[2]: np.asarray(run.call(x)) for x in run.inputs}
        finally:
            run.close()
        masks = {seed: mask for _, mask, seed in _square_inputs(ctx)}
        return {seed: (lambda out, ref=ref, mask=masks[seed]: psnr_db(out, ref, mask)) for seed, ref in refs.items()}
    return ctx.memo(f"uncached outputs {'peer' if peer else 'ours'}", make)


def _deepcache_flops(ctx: BenchContext, branch: int) -> dict:
    lat = ctx.resolution // ctx.vae_scale_factor
    return ctx.memo(f"step flops {branch}", lambda: counted_step_flops(ctx, branch, (lat, lat)))


# ---------------------------------------------------------------------- the cases
def less_work_cases(ctx: BenchContext) -> list[Case]:
    if not (ctx.selection.may_want_family("crop") or ctx.selection.may_want_family("deepcache")):
        return []
    r, steps = ctx.resolution, ctx.steps
    pad = _scaled(ctx, CROP_PADDING)
    photo = "x".join(str(_scaled(ctx, v)) for v in PHOTO_WH)
    cases = []
    for key, (mw, mh) in MASKS_WH.items():
        mask = f"{_scaled(ctx, mw)}x{_scaled(ctx, mh)}"
        shape = f"{photo} photo, {mask} mask, short side {r}, remove, {steps} steps"

        def inputs(key=key):
            return _crop_inputs(ctx, key)
        cases += [
            Case(f"crop-whole-{key}", shape, steps=steps, heavy=True, baseline="diffusers",
                 runners={"diffusers": lambda inputs=inputs: _peer(ctx, inputs()),
                          "torch-eager": lambda inputs=inputs: _ours(ctx, inputs(), {})},
                 about="the whole photo regenerated at the processing size (no crop)"),
            Case(f"crop-processing-{key}", shape + f", crop padding {pad}", steps=steps, heavy=True,
                 baseline="diffusers",
                 runners={"diffusers": lambda inputs=inputs: _peer(ctx, inputs(), crop_padding=pad),
                          "torch-eager": lambda inputs=inputs: _ours(ctx, inputs(), {"crop_padding": pad,
                                                                                     "crop_size": "processing"})},
                 about=f"the padded box around the mask resized to the processing size (padding_mask_crop={pad})"),
            Case(f"crop-native-{key}", shape + f", crop padding {pad}", steps=steps, heavy=True,
                 runners={"torch-eager": lambda inputs=inputs: _ours(ctx, inputs(), {"crop_padding": pad,
                                                                                     "crop_size": "native"})},
                 about="the padded box around the mask at its own resolution (crop_size='native'; no peer has it)"),
        ]

    photo = "x".join(str(_scaled(ctx, v)) for v in REPOSITION_PHOTO_WH)
    subject = "x".join(str(_scaled(ctx, v)) for v in SUBJECT_WH)
    move = tuple(_scaled(ctx, v) for v in SUBJECT_MOVE)
    shape = f"{photo} photo, {subject} subject moved {move}, short side {r}, remove + harmonize, {steps} steps each"
    cases += [
        Case("crop-reposition-whole", shape, steps=steps, heavy=True,
             runners={"torch-eager": lambda: _ours_reposition(ctx, {})},
             about="the SEELE flow, every pass on the whole photo resized to the processing size"),
        Case("crop-reposition-native", shape + f", crop padding {pad}", steps=steps, heavy=True,
             runners={"torch-eager": lambda: _ours_reposition(ctx, {"crop_padding": pad, "crop_size": "native"})},
             about="the SEELE flow with a native crop: REMOVE in the padded box around the void, HARMONIZE around "
                   "the void and the moved subject, each at its own resolution, pasted back at full resolution"),
    ]

    def flops0():
        return _deepcache_flops(ctx, 0)
    shape = f"{r}x{r}, remove, {steps} steps"
    cases.append(Case("deepcache-off", shape, steps=steps, heavy=True, baseline="diffusers",
                      runners={"diffusers": lambda: _peer(ctx, _square_inputs(ctx), flops=flops0()),
                               "torch-eager": lambda: _ours(ctx, _square_inputs(ctx), {}, flops=flops0())},
                      about="an inpainting pass, every UNet step full (the cached rows' reference)"))
    for interval, branch in CACHE_SETTINGS:
        def peer(interval=interval, branch=branch):
            return _peer(ctx, _square_inputs(ctx), cache=(interval, branch), flops=_deepcache_flops(ctx, branch),
                         psnr_against=_uncached_outputs(ctx, peer=True))

        def ours(interval=interval, branch=branch):
            return _ours(ctx, _square_inputs(ctx), {"cache_interval": interval, "cache_branch": branch},
                         flops=_deepcache_flops(ctx, branch), psnr_against=_uncached_outputs(ctx, peer=False))
        cases.append(Case(f"deepcache-i{interval}-b{branch}", shape + f", cache interval {interval} branch {branch}",
                          steps=steps, heavy=True, baseline="diffusers", runners={"diffusers": peer, "torch-eager": ours},
                          about=f"cached UNet features (ours: cache_interval={interval}, cache_branch={branch}; "
                                f"diffusers + DeepCacheSDHelper with the same)"))
    return cases
