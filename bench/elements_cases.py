"""Benchmark cases of the editable-image-elements editor (paper 001).

| component | what one timed run is |
| --- | --- |
| elements-unet-b1 / -cfg2 | one element-decoder step (SD-1.5 UNet + element cross-attention beside every text one); 77 text tokens and 256 element tokens; batch 1, or batch 2 = [(∅, ∅); (C, S)] for CFG |
| content-encoder-256 | the content encoder on 256 element patches (32x32 crops of a real photo) |
| elements-partition | `partition`: SAM embedding (computed in every call: the embedding cache is emptied first), 16x16 grid decode, SLIC assignment, clean-up, content encoding |
| elements-render-e2e | `decode`: render 256 elements with CFG (w = 3), DDIM steps, VAE decode |

No peer computes these; every row is its own PyTorch-eager baseline. Weights written before the
elements editor existed have no `elements/` folder: the rows are then absent, with a note.
"""
from __future__ import annotations

import torch

from editrt.bench.cases import PLANNED_ENGINES, BenchContext, Case, Run, dtype_name, pipeline_parts, uncached
from editrt.bench.timing import count_flops

GRID = 16  # 16x16 query points -> 256 elements, the paper's N
PROMPT = "a photo of a cat"


def elements_pipeline(ctx: BenchContext, backend: str = "torch-eager"):
    """The elements pipeline a backend's row runs (BenchContext.pipeline_options says what each asks for)."""
    if backend != "onnxruntime":
        return ctx.torch_pipeline(backend, "elements")
    ctx.check_onnxruntime()

    def load():
        from editrt.runtime.elements_pipeline import ElementsPipeline

        return ElementsPipeline.from_pretrained(ctx.weights, device=ctx.device, dtype=ctx.dtype,
                                               backend="onnxruntime", engines=ctx.onnx_dir())

    return ctx.memo("elements pipeline onnxruntime", load)


def _check_shape(expected: tuple[int, ...], what: str):
    def check(out) -> None:
        if tuple(out.shape) != expected or not torch.isfinite(out).all():
            raise AssertionError(f"{what}: output {tuple(out.shape)} (finite: {bool(torch.isfinite(out).all())}), "
                                 f"expected {expected}")
    return check


def _decoder_step(ctx: BenchContext, batch: int, backend: str = "torch-eager") -> Run:
    pipe = elements_pipeline(ctx, backend)
    lat = pipe.default_resolution // pipe.vae_scale_factor
    width = pipe.embedder.proj.out_features
    text = pipe.prompt_embedding(PROMPT)  # (1, 77, D)
    if batch == 2:  # CFG: [(∅, ∅); (C, S)], the unconditional element tokens are all zero
        text = torch.cat([pipe.prompt_embedding(""), text])
    # one render: the same text and element tokens every step (as the pipeline passes them)
    tokens = ctx.randn(1, GRID * GRID, width)  # (1, N, D)
    if batch == 2:
        tokens = torch.cat([torch.zeros_like(tokens), tokens])
    inputs = [(ctx.randn(batch, 4, lat, lat), torch.full((batch,), float(t), device=ctx.device)) for t in (981, 501, 21)]
    unet = pipe.engines["element_unet"]

    def call(x):
        sample, t = x
        return unet(sample=sample, timestep=t, encoder_hidden_states=text, element_tokens=tokens)["noise_pred"]

    flops = count_flops(call, inputs[0]) if backend == "torch-eager" else None
    return Run(call, inputs, dtype_name(ctx.dtype), _check_shape((batch, 4, lat, lat), "element decoder step"),
               flops=flops, parts=[unet])


def _content_encoder(ctx: BenchContext, backend: str = "torch-eager") -> Run:
    from editrt.models.content_encoder import PATCH

    pipe = elements_pipeline(ctx, backend)
    inputs = []
    for photo in ctx.photos(GRID * PATCH):  # a 16x16 grid of 32x32 patches of a real photo
        image = torch.from_numpy(photo).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, 512, 512)
        patches = image.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH)  # (3, 16, 16, 32, 32)
        inputs.append(patches.permute(1, 2, 0, 3, 4).reshape(-1, 3, PATCH, PATCH).to(ctx.device, ctx.dtype))
    engine = pipe.engines["content_encoder"]
    call = lambda x: engine(patches=x)["features"]  # noqa: E731
    flops = count_flops(call, inputs[0]) if backend == "torch-eager" else None
    return Run(call, inputs, dtype_name(ctx.dtype), _check_shape((GRID * GRID, pipe.embedder.feature_dim),
                                                                 "content encoder"), flops=flops, parts=[engine])


def _check_elements(elements) -> None:
    if not elements.alive.any():
        raise AssertionError("partition: no element survived")


def _partition(ctx: BenchContext, backend: str = "torch-eager") -> Run:
    pipe = elements_pipeline(ctx, backend)
    photos = ctx.photos(pipe.default_resolution)
    # the embedding cache holds every bench photo after the warm-up: emptied per call, so each call embeds
    return Run(uncached(pipe, lambda photo: pipe.partition(photo, grid=GRID)), photos, dtype_name(ctx.dtype),
               _check_elements, parts=pipeline_parts(pipe))


def _render(ctx: BenchContext, backend: str = "torch-eager") -> Run:
    pipe = elements_pipeline(ctx, backend)
    size = pipe.default_resolution
    inputs = [(pipe.partition(photo, grid=GRID), seed) for seed, photo in enumerate(ctx.photos(size))]

    def call(x):
        elements, seed = x
        return pipe.decode(elements, prompt=PROMPT, guidance=3.0, steps=ctx.steps, seed=seed)

    def check(image) -> None:
        if image.size != (size, size):
            raise AssertionError(f"render: image {image.size}, expected {(size, size)}")

    return Run(call, inputs, dtype_name(ctx.dtype), check, parts=pipeline_parts(pipe))


def elements_cases(ctx: BenchContext) -> list[Case]:
    from editrt.weights import WeightsLayout

    root = WeightsLayout(ctx.weights).elements
    if not root.is_dir():
        ctx.notes.append(f"elements rows absent: {ctx.weights} has no elements/ folder (weights written before "
                         "the elements editor; write new ones with `editrt weights init`)")
        return []
    unet = ctx.read_json("elements", "unet", "config.json")
    vae = ctx.read_json("elements", "vae", "config.json")
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    size, lat, width = unet["sample_size"] * scale, unet["sample_size"], unet["cross_attention_dim"]
    n, steps = GRID * GRID, ctx.steps

    def runners(build, backends) -> dict:
        return {b: (lambda b=b: build(b)) for b in ("torch-eager", *backends)}

    def step(component: str, batch: int) -> Case:
        # torch.compile at the CFG batch the render runs: one compilation
        compiled = ("torch+compile",) if batch == 2 else ()
        return Case(component, f"x {batch}x4x{lat}x{lat}, text {batch}x77x{width}, elements {batch}x{n}x{width}",
                    {**runners(lambda b: _decoder_step(ctx, batch, b), ("torch+kvcache", "torch+kernels", *compiled,
                                                                       "onnxruntime")), **PLANNED_ENGINES},
                    about=f"element decoder UNet step (dual cross-attention), batch {batch}")

    return [
        step("elements-unet-b1", 1),
        step("elements-unet-cfg2", 2),
        Case("content-encoder-256", f"{n}x3x32x32", {**runners(lambda b: _content_encoder(ctx, b), ("onnxruntime",)),
                                                     **PLANNED_ENGINES},
             about="content encoder on 256 element patches"),
        Case("elements-partition", f"{size}x{size} photo, {GRID}x{GRID} grid",
             runners(lambda b: _partition(ctx, b), ("torch+kernels", "onnxruntime")), heavy=True,
             about="SAM embedding + grid decode + SLIC assignment + clean-up + content encoding"),
        Case("elements-render-e2e", f"{size}x{size}, {n} elements, CFG w=3, {steps} steps", steps=steps, heavy=True,
             runners=runners(lambda b: _render(ctx, b), ("torch+kvcache", "torch+cudagraph", "torch+kernels",
                                                         "torch+compile", "onnxruntime")),
             about="render the elements: CFG denoising + VAE decode"),
    ]
