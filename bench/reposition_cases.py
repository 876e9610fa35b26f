"""Benchmark cases of the repositioning editor (SEELE): its networks, and its passes beside the peers.

Rows (component names; `--only` takes a name, a glob or a '-'-ended prefix such as `unet` or `sam`):

| component | what one timed run is | peer (baseline) |
| --- | --- | --- |
| unet-inpaint-b1 / -cfg2 | one UNet step through the engine interface, remove prompt; batch 1, or batch 2 = [null; task] for CFG | — |
| unet-harmonizer-b1 / -cfg2 | the same step with the harmonizer LoRA fused in (c = 1) | — |
| lora-switch | one switch of the fused LoRA between c = 0 and c = 1 (in-place weight copies) | — |
| vae-encode / vae-decode | the VAE encoder (the scaled posterior sample, noise supplied, on every backend) / decoder | — |
| sam-image-encoder | SAM's ViT on one preprocessed image | — |
| sam-mask-decoder-1pt | prompt encoder + mask decoder for one click (multimask) | — |
| sam-mask-decoder-grid256 | one batched decode of 256 single-point prompts (16x16 grid, multimask), the elements partition's query | — |
| sam-segment-1pt | a new photo and one click to the best mask: `segment`, the image encoder running in every call (the embedding cache is emptied first) | segment-anything's `SamPredictor` (set_image + predict); also with its image encoder torch.compile'd |
| inpaint-pass | one remove pass at the processing size: `inpaint` | diffusers' `StableDiffusionInpaintPipeline`, same weights, dtype, steps; SDPA attention; also with torch.compile(unet) |
| reposition-e2e | the SEELE flow with a given subject mask: remove + paste + harmonize | — |

Every row of a component calls the same thing (the engine interface, the pipeline's public method); the
backends differ only in what runs behind it (bench/results/README.md, "What each backend runs"). Peers run
the same networks the same number of times as ours: their builders name them (`Run.networks`) and the
suite fails a row whose observed work differs from its baseline's.
Network rows also declare the planned TensorRT engine (a skipped row until export/ builds it).
"""
from __future__ import annotations

import gc
import warnings

import numpy as np
import torch

from editrt.bench import work
from editrt.bench.cases import PLANNED_ENGINES, BenchContext, Case, Run, Skip, dtype_name, pipeline_parts, uncached
from editrt.bench.timing import count_flops

TIMESTEPS = (981, 501, 21)  # rotating: early, middle and late DDIM steps


def _check_shape(expected: tuple[int, ...], what: str):
    def check(out) -> None:
        out = out[0] if isinstance(out, (tuple, list)) else out
        if tuple(out.shape) != expected:
            raise AssertionError(f"{what}: output shape {tuple(out.shape)}, expected {expected}")
        if not torch.isfinite(out).all():
            raise AssertionError(f"{what}: output holds non-finite values")
    return check


def _check_image(size: int, what: str):
    def check(out) -> None:
        if out.size != (size, size):
            raise AssertionError(f"{what}: output image {out.size}, expected {(size, size)}")
    return check


def _prompt_tokens(ctx: BenchContext) -> int:
    from safetensors import safe_open

    from editrt.weights import WeightsLayout

    with safe_open(str(WeightsLayout(ctx.weights).task_prompts), "pt") as f:
        return f.get_slice("remove").get_shape()[0]


# ---------------------------------------------------------------------- UNet and LoRA
def _unet_step(ctx: BenchContext, batch: int, harmonizer: bool, backend: str = "torch-eager") -> Run:
    """One UNet step through the engine interface (what the pipeline's loop calls per step), every backend alike."""
    pipe = ctx.reposition(backend)
    engine = pipe.engines["harmonizer_unet" if harmonizer else "inpaint_unet"]
    lat = ctx.resolution // ctx.vae_scale_factor
    # CFG batches [null; task] exactly as the pipeline does; one request: the same prompt tensor every step
    embeds = pipe.prompt_embeds("harmonize" if harmonizer else "remove", batch == 2)  # (B, L, C)
    inputs = [(ctx.randn(batch, 9, lat, lat), torch.full((batch,), float(t), device=ctx.device)) for t in TIMESTEPS]

    def call(x):
        sample, t = x  # (B, 9, h, w) = noisy latents | mask | condition latents
        return engine(sample=sample, timestep=t, encoder_hidden_states=embeds)["noise_pred"]

    flops = count_flops(call, inputs[0]) if backend == "torch-eager" else None
    return Run(call, inputs, dtype_name(ctx.dtype), _check_shape((batch, 4, lat, lat), "UNet step"), flops=flops,
               parts=[engine])


def _lora_switch(ctx: BenchContext) -> Run:
    from editrt.weights import WeightsLayout

    if not WeightsLayout(ctx.weights).harmonizer_lora.is_file():
        raise Skip("no harmonizer LoRA in these weights: harmonize runs the base UNet, there is nothing to switch")
    harmonizer = ctx.pipeline.harmonizer
    harmonizer.fused_weights(1.0)  # made once per scale and cached, as the first harmonize pass does
    weight_bytes = sum(p.numel() * p.element_size() for p in harmonizer.params.values())

    def check(_) -> None:
        name, param = next(iter(harmonizer.params.items()))
        expected = harmonizer.fused_weights(harmonizer.scale)[name]
        if not torch.equal(param, expected):
            raise AssertionError(f"LoRA switch: {name} does not hold the weights of scale {harmonizer.scale}")

    # Inputs alternate, so every timed call is a real switch; each copies every touched weight once.
    return Run(harmonizer.set_scale, [1.0, 0.0], dtype_name(ctx.dtype), check, bytes=2 * weight_bytes,
               close=lambda: harmonizer.set_scale(0.0))


def _lora_shape(ctx: BenchContext) -> str:
    from safetensors import safe_open

    from editrt.weights import WeightsLayout

    params, count = 0, 0
    if not WeightsLayout(ctx.weights).harmonizer_lora.is_file():
        return "no LoRA"
    with safe_open(str(WeightsLayout(ctx.weights).harmonizer_lora), "pt") as f:
        for key in f.keys():
            if key.endswith((".lora_A.weight", ".lora.down.weight")):
                up = key.replace("lora_A", "lora_B").replace("lora.down", "lora.up")
                params += f.get_slice(up).get_shape()[0] * f.get_slice(key).get_shape()[1]
                count += 1
    return f"{count} weights, {params / 1e6:.2f}M params"


# ---------------------------------------------------------------------- VAE
def _vae_run(ctx: BenchContext, encode: bool, backend: str = "torch-eager") -> Run:
    """The VAE through the engine interface, every backend alike: the encoder's latent is the posterior
    sample (mean + std * noise, scaled) the pipeline uses, the decoder's input a scaled latent."""
    pipe, r = ctx.reposition(backend), ctx.resolution
    lat = r // ctx.vae_scale_factor
    if encode:
        engine = pipe.engines["vae_encoder"]
        photos = [torch.from_numpy(p).permute(2, 0, 1)[None].to(ctx.device, ctx.dtype) / 127.5 - 1.0
                  for p in ctx.photos(r)]
        inputs = [(photo, ctx.randn(1, 4, lat, lat)) for photo in photos]
        call = lambda x: engine(image=x[0], noise=x[1])["latent"]  # noqa: E731
        check = _check_shape((1, 4, lat, lat), "VAE encode")
    else:
        engine = pipe.engines["vae_decoder"]
        inputs = [ctx.randn(1, 4, lat, lat) for _ in range(ctx.n_inputs)]
        call = lambda z: engine(latent=z)["image"]  # noqa: E731
        check = _check_shape((1, 3, r, r), "VAE decode")
    flops = count_flops(call, inputs[0]) if backend == "torch-eager" else None
    return Run(call, inputs, dtype_name(ctx.dtype), check, flops=flops, parts=[engine])


# ---------------------------------------------------------------------- SAM
def _sam_dtype(sam) -> str:
    return dtype_name(next(sam.parameters()).dtype)


def _sam_encoder_inputs(ctx: BenchContext) -> list[torch.Tensor]:
    """Preprocessed real photographs at SAM's input size (what SamPredictor.set_image feeds the ViT)."""
    sam = ctx.pipeline.sam
    size = sam.image_encoder.img_size
    return [sam.preprocess(torch.as_tensor(p, device=ctx.device).permute(2, 0, 1).contiguous()[None])
            for p in ctx.photos(size)]  # (1, 3, S, S)


def _sam_image_encoder(ctx: BenchContext, backend: str = "torch-eager") -> Run:
    """SAM's ViT through the engine interface (as `segment` and the partition call it), every backend alike."""
    engine = ctx.reposition(backend).engines["sam_image_encoder"]
    inputs = _sam_encoder_inputs(ctx)
    e = ctx.sam_architecture["image_size"] // ctx.sam_architecture["patch_size"]
    call = lambda x: engine(image=x)["image_embeddings"]  # noqa: E731
    flops = count_flops(call, inputs[0]) if backend == "torch-eager" else None
    return Run(call, inputs, _sam_dtype(ctx.pipeline.sam),
               _check_shape((1, ctx.sam_architecture["prompt_embed_dim"], e, e), "SAM encoder"), flops=flops,
               parts=[engine])


def _sam_mask_decoder(ctx: BenchContext, grid: int | None) -> Run:
    sam = ctx.pipeline.sam
    size = sam.image_encoder.img_size
    with torch.no_grad():
        features = [sam.image_encoder(x) for x in _sam_encoder_inputs(ctx)]  # real embeddings, (1, D, E, E)
    rng = np.random.default_rng(3)
    if grid is None:  # one click per input, somewhere in the middle of the photo
        points = [rng.uniform(0.25, 0.75, (1, 1, 2)) * size for _ in features]
    else:  # grid x grid query points at cell centres, as the elements partition places them
        centres = (np.arange(grid) + 0.5) * size / grid
        gx, gy = np.meshgrid(centres, centres)
        points = [np.stack([gx.ravel(), gy.ravel()], axis=1)[:, None, :]] * len(features)  # (N, 1, 2)
    inputs = [(f, torch.as_tensor(p, dtype=torch.float, device=ctx.device),
               torch.ones(p.shape[:2], dtype=torch.int, device=ctx.device)) for f, p in zip(features, points)]

    def call(x):
        image_embedding, coords, labels = x  # (1, D, E, E), (N, 1, 2), (N, 1)
        sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        return sam.mask_decoder(image_embeddings=image_embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=True)  # 3 candidates per prompt, as `segment` and the partition

    n = 1 if grid is None else grid * grid
    low_res = tuple(4 * s for s in sam.prompt_encoder.image_embedding_size)
    return Run(call, inputs, _sam_dtype(sam), _check_shape((n, 3, *low_res), "SAM decoder"),
               flops=count_flops(call, inputs[0]), networks={"sam_mask_decoder": sam.mask_decoder})


def _segment_inputs(ctx: BenchContext) -> list[tuple[np.ndarray, list[float]]]:
    """(photo, click) pairs on which `segment` finds a subject (random weights may find none at a point)."""
    from editrt.errors import InputError

    def make():
        pipe = ctx.pipeline
        size = pipe.sam.image_encoder.img_size
        inputs = []
        candidates = [[0.5, 0.5], [0.4, 0.6], [0.6, 0.4], [0.3, 0.3], [0.7, 0.7], [0.5, 0.25], [0.25, 0.5]]
        for i, photo in enumerate(ctx.photos(size)):
            for cx, cy in candidates[i:] + candidates[:i]:  # a different click per photo where possible
                point = [cx * size, cy * size]
                try:
                    pipe.segment(photo, points=[point])
                except InputError:
                    continue
                inputs.append((photo, point))
                break
        if len(inputs) < 2:
            raise RuntimeError("SAM found no subject at any tried click on the bench photos")
        return inputs

    return ctx.memo("segment inputs", make)


def _check_mask(what: str):
    def check(mask) -> None:
        if mask.ndim != 2 or not mask.any():
            raise AssertionError(f"{what}: expected a non-empty [H, W] mask, got shape {mask.shape}")
    return check


def _segment_ours(ctx: BenchContext, backend: str = "torch-eager") -> Run:
    pipe = ctx.reposition(backend)
    call = uncached(pipe, lambda x: pipe.segment(x[0], points=[x[1]]))
    return Run(call, _segment_inputs(ctx), _sam_dtype(ctx.pipeline.sam), _check_mask("segment"),
               parts=pipeline_parts(pipe))


def _segment_sam_predictor(ctx: BenchContext, compile: bool = False) -> Run:
    """segment-anything's SamPredictor on the same model object (same weights, device and dtype); with
    `compile`, its image encoder is torch.compile'd (default mode) for this row, and restored after."""
    from segment_anything import SamPredictor

    sam = ctx.pipeline.sam
    predictor = SamPredictor(sam)
    encoder = sam.image_encoder
    if compile:  # editrt's own engines hold the encoder module itself, so they never see this swap
        sam.image_encoder = torch.compile(encoder)

    def call(x):
        photo, point = x
        predictor.set_image(photo)
        masks, iou, _ = predictor.predict(point_coords=np.array([point]), point_labels=np.array([1]),
                                          multimask_output=True)
        return masks[int(np.argmax(iou))]

    def close():
        sam.image_encoder = encoder

    return Run(call, _segment_inputs(ctx), _sam_dtype(sam), _check_mask("SamPredictor"), parts=[sam.image_encoder],
               close=close, networks={"sam_image_encoder": sam.image_encoder, "sam_mask_decoder": sam.mask_decoder})


# ---------------------------------------------------------------------- passes and end to end
def _pass_inputs(ctx: BenchContext) -> list[tuple[np.ndarray, np.ndarray, int]]:
    r = ctx.resolution
    return [(photo, mask, seed) for seed, (photo, mask) in enumerate(zip(ctx.photos(r), ctx.subject_masks(r)))]


def _inpaint_ours(ctx: BenchContext, backend: str = "torch-eager") -> Run:
    pipe = ctx.reposition(backend)
    call = lambda x: pipe.inpaint(x[0], x[1], task="remove", steps=ctx.steps, guidance=1.0, seed=x[2])  # noqa: E731
    return Run(call, _pass_inputs(ctx), dtype_name(ctx.dtype), _check_image(ctx.resolution, "inpaint"),
               parts=pipeline_parts(pipe))


def diffusers_compile_mode(device: torch.device) -> str:
    """diffusers' documented recipe on CUDA: torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    (inductor with its CUDA graphs); on a CPU inductor's default mode."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def _inpaint_diffusers(ctx: BenchContext, compile: bool = False) -> Run:
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import logging as diffusers_logging
    from PIL import Image

    from editrt.models.inpaint import load_task_prompts
    from editrt.weights import WeightsLayout

    layout = WeightsLayout(ctx.weights)
    bar_was_on = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # its "Loading pipeline components" bar would cut through ours
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; older ones know only that name
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            peer = StableDiffusionInpaintPipeline.from_pretrained(
                layout.inpaint, local_files_only=True, torch_dtype=ctx.dtype, safety_checker=None,
                requires_safety_checker=False, text_encoder=None, tokenizer=None, feature_extractor=None,
                image_encoder=None,
            ).to(ctx.device)  # its own copy of the UNet and VAE, with diffusers' default SDPA attention
    finally:
        if bar_was_on:
            diffusers_logging.enable_progress_bar()
    peer.set_progress_bar_config(disable=True)
    scheduler_step = peer.scheduler.step

    def counted_step(*args, **kwargs):  # the peer's denoising steps, for the row's observed work
        work.count_step()
        return scheduler_step(*args, **kwargs)

    peer.scheduler.step = counted_step
    if compile:
        peer.unet = torch.compile(peer.unet, mode=diffusers_compile_mode(ctx.device), fullgraph=ctx.device.type == "cuda")
    prompt = load_task_prompts(layout.task_prompts, ctx.unet_config["cross_attention_dim"])["remove"]
    prompt = prompt[None].to(ctx.device, ctx.dtype)  # (1, L, C): the task prompt as prompt_embeds
    r = ctx.resolution
    inputs = [(Image.fromarray(photo), Image.fromarray(mask.astype(np.uint8) * 255), seed)
              for photo, mask, seed in _pass_inputs(ctx)]

    def call(x):
        image, mask, seed = x
        return peer(prompt_embeds=prompt, image=image, mask_image=mask, height=r, width=r,
                    num_inference_steps=ctx.steps, guidance_scale=1.0,
                    generator=torch.Generator("cpu").manual_seed(seed)).images[0]

    def close():
        nonlocal peer
        peer = None  # drop the peer's copy of the weights before the next row's memory is read
        gc.collect()

    return Run(call, inputs, dtype_name(ctx.dtype), _check_image(r, "diffusers inpaint"), close=close,
               parts=[peer.unet], networks={"inpaint_unet": peer.unet, "vae_encoder": peer.vae.encoder,
                                            "vae_decoder": peer.vae.decoder})


def _reposition_e2e(ctx: BenchContext, backend: str = "torch-eager") -> Run:
    pipe, r = ctx.reposition(backend), ctx.resolution
    move = (r // 8, r // 16)  # the masks sit in the central area, so the moved subject stays inside

    def call(x):
        photo, mask, seed = x
        return pipe(photo, mask=mask, move=move, steps=ctx.steps, guidance=1.0, seed=seed, harmonize=True).image

    return Run(call, _pass_inputs(ctx), dtype_name(ctx.dtype), _check_image(r, "reposition"), parts=pipeline_parts(pipe))


# ---------------------------------------------------------------------- the cases
# Whole passes: every torch variant beside its baseline (the repositioning editor has no editrt kernel,
# so it has no torch+kernels row: it would repeat torch+cudagraph).
PASS_BACKENDS = ("torch+kvcache", "torch+cudagraph", "torch+compile", "onnxruntime")


def _runners(build, backends, baseline: str = "torch-eager") -> dict:
    """{backend: builder} for `build(backend)`, baseline first."""
    return {b: (lambda b=b: build(b)) for b in (baseline, *backends)}


def reposition_cases(ctx: BenchContext) -> list[Case]:
    r, lat = ctx.resolution, ctx.resolution // ctx.vae_scale_factor
    tokens, width = _prompt_tokens(ctx), ctx.unet_config["cross_attention_dim"]
    sam = ctx.sam_architecture
    s, e, d = sam["image_size"], sam["image_size"] // sam["patch_size"], sam["prompt_embed_dim"]
    steps = ctx.steps

    def unet(component: str, batch: int, harmonizer: bool) -> Case:
        # torch.compile only at batch 1, the shape the passes below run (guidance 1): one compilation each
        compiled = ("torch+compile",) if batch == 1 else ()
        return Case(component, f"x {batch}x9x{lat}x{lat}, ctx {batch}x{tokens}x{width}",
                    {**_runners(lambda b: _unet_step(ctx, batch, harmonizer, b),
                                ("torch+kvcache", *compiled, "onnxruntime")), **PLANNED_ENGINES},
                    about=("harmonizer (LoRA fused, c = 1) " if harmonizer else "inpainting ")
                    + f"UNet step, batch {batch}, through the engine interface")

    return [
        unet("unet-inpaint-b1", 1, False),
        unet("unet-inpaint-cfg2", 2, False),
        unet("unet-harmonizer-b1", 1, True),
        unet("unet-harmonizer-cfg2", 2, True),
        Case("lora-switch", _lora_shape(ctx), {"torch-eager": lambda: _lora_switch(ctx)},
             about="one in-place switch of the fused LoRA between c = 0 and c = 1"),
        Case("vae-encode", f"1x3x{r}x{r} -> 1x4x{lat}x{lat}",
             {**_runners(lambda b: _vae_run(ctx, True, b), ("torch+compile", "onnxruntime")), **PLANNED_ENGINES},
             about="VAE encoder to the scaled posterior sample (mean + std * noise), every backend"),
        Case("vae-decode", f"1x4x{lat}x{lat} -> 1x3x{r}x{r}",
             {**_runners(lambda b: _vae_run(ctx, False, b), ("torch+compile", "onnxruntime")), **PLANNED_ENGINES},
             about="VAE decoder"),
        Case("sam-image-encoder", f"1x3x{s}x{s} -> 1x{d}x{e}x{e}",
             {**_runners(lambda b: _sam_image_encoder(ctx, b), ("torch+compile", "onnxruntime")), **PLANNED_ENGINES},
             about="SAM ViT image encoder"),
        Case("sam-mask-decoder-1pt", f"1 point, emb 1x{d}x{e}x{e}",
             {"torch-eager": lambda: _sam_mask_decoder(ctx, None), **PLANNED_ENGINES},
             about="SAM prompt encoder + mask decoder, one click, 3 masks"),
        Case("sam-mask-decoder-grid256", f"256 points (16x16), emb 1x{d}x{e}x{e}",
             {"torch-eager": lambda: _sam_mask_decoder(ctx, 16), **PLANNED_ENGINES},
             about="SAM prompt encoder + mask decoder, 256 single-point prompts in one batched call"),
        Case("sam-segment-1pt", f"{s}x{s} photo, 1 point",
             {"segment-anything": lambda: _segment_sam_predictor(ctx),
              "segment-anything+compile": lambda: _segment_sam_predictor(ctx, compile=True),
              **_runners(lambda b: _segment_ours(ctx, b), ("torch+compile",))},
             baseline="segment-anything",
             about="new photo + one click -> best mask, image encoder in every call (SamPredictor, its encoder "
                   "torch.compile'd, vs segment with its embedding cache emptied per call)"),
        Case("inpaint-pass", f"{r}x{r}, remove, {steps} steps", steps=steps, heavy=True,
             runners={"diffusers": lambda: _inpaint_diffusers(ctx),
                      "diffusers+compile": lambda: _inpaint_diffusers(ctx, compile=True),
                      **_runners(lambda b: _inpaint_ours(ctx, b), PASS_BACKENDS)},
             baseline="diffusers",
             about=f"one inpainting pass, guidance 1 (StableDiffusionInpaintPipeline, also with torch.compile(unet, "
                   f"mode={diffusers_compile_mode(ctx.device)!r}), vs inpaint)"),
        Case("reposition-e2e", f"{r}x{r}, remove + harmonize, {steps} steps each", steps=steps, heavy=True,
             runners=_runners(lambda b: _reposition_e2e(ctx, b), PASS_BACKENDS),
             about="the SEELE flow with a given mask: remove, paste, harmonize, paste back"),
    ]
