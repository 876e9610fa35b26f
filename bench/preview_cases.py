"""Benchmark cases of the drag previews (issue 26, item 3): a preview latent decoded by the full VAE vs the tiny one.

| component | what one timed run is |
| --- | --- |
| preview-decode-inpaint-full / -tiny | the repositioning editor's decode of a latent at the processing size (SD-2's 4-channel latent) to uint8 RGB: the full VAE's decoder engine (`vae_decoder`, what a final runs) / the preview engine (`preview_decoder`: the weights' `inpaint/vae_tiny/`, diffusers' AutoencoderTiny) |
| preview-decode-elements-full / -tiny | the same for the elements editor (`element_vae_decoder` / `elements/vae_tiny/`) |

The latents are what the decoder gets after a pass: the editor's own VAE encoding (posterior mean, scaled) of three
crops of the bundled photo at the processing size, so with published weights both decoders see photo latents.
Each row's call is the pipeline's decode step (runtime/reposition.py, runtime/elements_pipeline.py): the engine,
then the same uint8 conversion.

What each row records, observed while it ran:

* `observed.networks`: the engine's calls under its spec name (the preview engine has the full decoder's
  interface and name) and, by forward hooks on both decoder modules, which one ran (`AutoencoderKL.decoder`,
  `AutoencoderTiny.decoder`);
* `observed.decoder_flops`: every decoder call adds the FLOPs torch.utils.flop_counter.FlopCounterMode counted for
  that decoder's `decode` (bench/timing.count_flops on a meta copy of it at the row's latent shape, as
  bench/less_work_cases.counted_step_flops counts the UNet's steps); `flops` / `tflop_s`: the same count;
* `observed.output_psnr_db` (tiny rows): the preview's PSNR against the final decode (the full VAE's image of the
  same latent), over the whole image: how far a preview is from the final, not a correctness check (random weights
  give two unrelated images). It is computed inside the timed call, so the tiny rows' times include it;
* `about`: the decoder's class, its parameters (post_quant_conv + decoder for AutoencoderKL) and its folder;
  `shape`: the latent and image shapes.

The peer, diffusers' own `AutoencoderKL.decode` / `AutoencoderTiny.decode` on the folders loaded by
`from_pretrained`, is what our engines run (models/networks.py VaeDecoderNet: `vae.decode(latent / scaling_factor)`
on the module diffusers loads, nothing changed): its row loads diffusers' module, checks that its decode of a small
latent is bit-equal to our engine's, and is then skipped with that reason (a row would time the same code). A
difference fails the row: the peer must then be timed.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from editrt.bench import work
from editrt.bench.cases import BenchContext, Case, Run, Skip, dtype_name
from editrt.bench.less_work_cases import psnr_db
from editrt.bench.timing import count_flops

PEER_CHECK_LATENT = 8  # side of the latent the peer's decode is compared on (the convolutions do not depend on it)


@dataclass(frozen=True)
class Editor:
    name: str  # "inpaint" or "elements": the row names and the weights folder
    engine: str  # the full decoder's engine (what a final runs)
    pipeline: str  # BenchContext.torch_pipeline's editor

    def folder(self, ctx: BenchContext) -> Path:
        from editrt.weights import WeightsLayout

        layout = WeightsLayout(ctx.weights)
        return layout.inpaint if self.name == "inpaint" else layout.elements

    def pipe(self, ctx: BenchContext):
        return ctx.torch_pipeline("torch-eager", self.pipeline)


EDITORS = (Editor("inpaint", "vae_decoder", "reposition"), Editor("elements", "element_vae_decoder", "elements"))
DECODERS = {False: "vae", True: "vae_tiny"}  # tiny? -> the folder inside the editor's


def _classes():
    from diffusers import AutoencoderKL, AutoencoderTiny

    return {"vae": AutoencoderKL, "vae_tiny": AutoencoderTiny}


# ---------------------------------------------------------------------- cheap facts: no weights loaded
@dataclass(frozen=True)
class DecoderFacts:
    cls: str  # the diffusers class
    params: int  # parameters its decode uses
    flops: int  # FLOPs of one decode at the row's latent shape, counted by FlopCounterMode
    latent: tuple[int, ...]  # (1, C, h, w)
    image: int  # the decoded side


def _decode_params(vae) -> int:
    """Parameters `decode` uses: AutoencoderKL's post_quant_conv (where it has one) and decoder, AutoencoderTiny's
    decoder."""
    parts = [vae.decoder, getattr(vae, "post_quant_conv", None)]
    return sum(p.numel() for part in parts if part is not None for p in part.parameters())


def decoder_facts(ctx: BenchContext, editor: Editor, folder_name: str) -> DecoderFacts:
    """The decoder's class, parameters and decode FLOPs, counted on a meta copy built from its config.json."""
    def make():
        cls = _classes()[folder_name]
        vae_config = ctx.read_json(editor.folder(ctx).name, "vae", "config.json")
        unet_config = ctx.read_json(editor.folder(ctx).name, "unet", "config.json")
        config = ctx.read_json(editor.folder(ctx).name, folder_name, "config.json")
        accepted = inspect.signature(cls.__init__).parameters  # diffusers saves derived keys its __init__ refuses
        side = unet_config["sample_size"]  # the processing size's latent: the UNet's native size
        latent = (1, vae_config["latent_channels"], side, side)
        with torch.device("meta"):
            vae = cls.from_config({k: v for k, v in config.items() if k in accepted})
            z = torch.empty(latent)
        flops = count_flops(lambda x: vae.decode(x, return_dict=False)[0], z)
        if not flops:
            raise RuntimeError(f"FlopCounterMode counted no FLOPs for the {folder_name} decoder")
        return DecoderFacts(cls.__name__, _decode_params(vae), flops, latent,
                            side * 2 ** (len(vae_config["block_out_channels"]) - 1))
    return ctx.memo(f"preview decoder facts {editor.name} {folder_name}", make)


# ---------------------------------------------------------------------- inputs
def _to_uint8(decoded: torch.Tensor) -> np.ndarray:
    """The pipelines' conversion of a decode (runtime/reposition.py step 6): [-1, 1] -> uint8 HxWx3."""
    decoded = (decoded / 2 + 0.5).clamp(0, 1)
    return (decoded.cpu().permute(0, 2, 3, 1).float().numpy()[0] * 255).round().astype(np.uint8)


def _latents(ctx: BenchContext, editor: Editor) -> list[torch.Tensor]:
    """The editor's VAE encoding (posterior mean, scaled) of three photo crops at the processing size."""
    def make():
        vae = editor.pipe(ctx).components.vae
        side = decoder_facts(ctx, editor, "vae").image
        out = []
        for photo in ctx.photos(side):
            image = torch.from_numpy(photo).permute(2, 0, 1)[None].to(ctx.device, ctx.dtype) / 127.5 - 1.0
            out.append(vae.encode(image).latent_dist.mean * vae.config.scaling_factor)
        return out
    return ctx.memo(f"preview latents {editor.name}", make)


def _finals(ctx: BenchContext, editor: Editor) -> list[np.ndarray]:
    """The final decode (the full VAE's engine) of each latent: what a preview is compared to."""
    def make():
        engine = editor.pipe(ctx).engines[editor.engine]
        return [_to_uint8(engine(latent=z)["image"]) for z in _latents(ctx, editor)]
    return ctx.memo(f"preview finals {editor.name}", make)


# ---------------------------------------------------------------------- what ran
def _decoder_modules(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's decoder modules by class: the full VAE's and, where loaded, the tiny one's."""
    vaes = [pipe.components.vae, pipe.components.vae_tiny]
    return {type(vae).__name__: vae for vae in vaes if vae is not None}


def _count_decoder_flops(ctx: BenchContext, editor: Editor, vaes: dict[str, torch.nn.Module]):
    """Forward hooks on each VAE's decoder: every call adds that decoder's counted decode FLOPs. Returns the undo."""
    by_class = {cls.__name__: name for name, cls in _classes().items()}
    handles = []
    for cls, vae in vaes.items():
        flops = decoder_facts(ctx, editor, by_class[cls]).flops
        handles.append(vae.decoder.register_forward_hook(lambda *_, flops=flops: work.count(work.DECODER_FLOPS, flops)))

    def undo():
        for handle in handles:
            handle.remove()
    return undo


def _engine(pipe, editor: Editor, tiny: bool):
    if not tiny:
        return pipe.engines[editor.engine]
    if pipe.preview_decoder is None:
        raise Skip(f"no {editor.name}/vae_tiny/ in these weights: previews decode with the full VAE (write new "
                   "weights with `editrt weights init`)")
    return pipe.preview_decoder


# ---------------------------------------------------------------------- ours
def _ours(ctx: BenchContext, editor: Editor, tiny: bool) -> Run:
    pipe = editor.pipe(ctx)
    engine = _engine(pipe, editor, tiny)
    latents = _latents(ctx, editor)
    finals = _finals(ctx, editor) if tiny else [None] * len(latents)
    whole = np.ones(finals[0].shape[:2], bool) if tiny else None
    facts = decoder_facts(ctx, editor, DECODERS[tiny])
    vaes = _decoder_modules(pipe)
    undo = _count_decoder_flops(ctx, editor, vaes)

    def call(x):
        latent, final = x
        image = _to_uint8(engine(latent=latent)["image"])
        if final is not None:
            work.count(work.OUTPUT_PSNR, psnr_db(image, final, whole))
        return image

    def check(image) -> None:
        expected = (facts.image, facts.image, 3)
        if image.shape != expected or image.dtype != np.uint8:
            raise AssertionError(f"preview decode: image {image.shape} {image.dtype}, expected {expected} uint8")

    return Run(call, list(zip(latents, finals)), dtype_name(ctx.dtype), check, flops=facts.flops, close=undo,
               parts=[engine], networks={f"{cls}.decoder": vae.decoder for cls, vae in vaes.items()})


# ---------------------------------------------------------------------- the peer: diffusers' own decode
def _peer(ctx: BenchContext, editor: Editor, tiny: bool) -> Run:
    """Diffusers' decode on the module its from_pretrained loads from the same folder: compared with ours on a small
    latent; bit-equal -> skipped (the same code), else a failed row."""
    from diffusers.utils import logging as diffusers_logging

    engine = _engine(editor.pipe(ctx), editor, tiny)
    folder = editor.folder(ctx) / DECODERS[tiny]
    cls = _classes()[DECODERS[tiny]]
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # AutoencoderTiny's config holds a key diffusers itself writes and warns on
    try:
        theirs = cls.from_pretrained(folder, local_files_only=True, torch_dtype=ctx.dtype).to(ctx.device).eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)
    z = ctx.randn(1, theirs.config.latent_channels, PEER_CHECK_LATENT, PEER_CHECK_LATENT)
    with torch.no_grad():  # the suite calls builders under no_grad; a direct call (a test) too
        ours = engine(latent=z)["image"]
        peer = theirs.decode(z / theirs.config.scaling_factor, return_dict=False)[0]
    if not torch.equal(ours, peer):
        raise AssertionError(f"our {DECODERS[tiny]} decode differs from diffusers' {cls.__name__}.decode on "
                             f"{folder} (largest difference {float((ours - peer).abs().max()):.3g}): time the peer")
    raise Skip(f"the same code as ours: our engine runs diffusers' {cls.__name__}.decode on the module "
               f"from_pretrained loads from {editor.name}/{DECODERS[tiny]}/, nothing changed (bit-equal on a test "
               "latent); a peer row would time it twice")


# ---------------------------------------------------------------------- the cases
def preview_cases(ctx: BenchContext) -> list[Case]:
    if not ctx.selection.may_want_family("preview-decode"):
        return []
    cases = []
    for editor in EDITORS:
        root = editor.folder(ctx)
        if not root.is_dir():  # weights written before the elements editor: elements_cases notes it
            continue
        for tiny, folder_name in DECODERS.items():
            component = f"preview-decode-{editor.name}-{'tiny' if tiny else 'full'}"
            use = "preview engine (a drag preview)" if tiny else "full decoder engine (what a final runs)"
            if not (root / folder_name).is_dir():
                shape, about = "no vae_tiny/ folder", f"{editor.name}: no tiny VAE in these weights"
            else:
                f = decoder_facts(ctx, editor, folder_name)
                shape = f"latent {'x'.join(map(str, f.latent))} -> image {f.image}x{f.image}"
                about = (f"{editor.name}: a latent decoded to uint8 RGB by the {use}: {f.cls} decoder, "
                         f"{f.params:,} params ({editor.name}/{folder_name}/)")
            cases.append(Case(component, shape, heavy=True, about=about,
                              runners={"torch-eager": lambda e=editor, t=tiny: _ours(ctx, e, t),
                                       "diffusers": lambda e=editor, t=tiny: _peer(ctx, e, t)}))
    return cases
