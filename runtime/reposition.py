"""Subject repositioning (SEELE, paper 000): segment, move, remove, complete, harmonize, paste back.

One SD-2 inpainting UNet does every generative stage; only the task prompt changes (task
inversion), and for harmonization a LoRA is fused in at scale c = 1. The inpainting pass is,
step for step, diffusers' `StableDiffusionInpaintPipeline` with `prompt_embeds` = task prompt,
`negative_prompt_embeds` = null prompt and a DDIM scheduler (tests hold it to that oracle).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from editrt.errors import InputError
from editrt.models.common import resolve_dtype
from editrt.models.inpaint import TASKS
from editrt.runtime.backends import build_engines
from editrt.runtime.caches import ByteLRU
from editrt.runtime.images import (
    as_mask,
    as_rgb,
    dilate,
    processing_size,
    resize_mask_covering,
    resize_rgb,
    save_mask_png,
    save_png,
    shift_or_warp,
)
from editrt.runtime.scheduler import LoopCache, LoopKey
from editrt.runtime.segmenter import Segmenter
from editrt.runtime.work_queue import FINAL, WorkQueue

__all__ = ["RepositionPipeline", "RepositionResult", "Stage", "check_steps", "resolve_dtype"]
REMOVE_PASS_BUDGET = 256 << 20  # bytes of memoized REMOVE results (uint8 RGB at the input size)


def check_steps(steps: int, guidance: float) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps: expected a positive integer, got {steps!r}")
    if guidance < 1.0:
        raise InputError(f"guidance: expected >= 1.0 (1.0 = no classifier-free guidance), got {guidance}")


@dataclass
class Stage:
    image: Image.Image | None = None
    mask: np.ndarray | None = None


@dataclass
class RepositionResult:
    image: Image.Image
    stages: dict[str, Stage] = field(default_factory=dict)

    def save_stages(self, folder: str | Path) -> list[Path]:
        written = []
        for i, (name, stage) in enumerate(self.stages.items()):
            if stage.image is not None:
                written.append(save_png(stage.image, Path(folder) / f"{i}_{name}.png"))
            if stage.mask is not None:
                written.append(save_mask_png(stage.mask, Path(folder) / f"{i}_{name}_mask.png"))
        return written


class RepositionPipeline:
    """SEELE over engines (torch, onnxruntime or tensorrt): any device, fp32 / fp16 / bf16.

    Threads: one pipeline may serve many threads and sessions. Every public method runs as one job
    of `self.work` (runtime/work_queue.py), so engines, loop buffers, graphs and caches are used by
    one job at a time, and results equal those of running the same calls one by one.

    `components` holds the PyTorch modules on the torch backend (None otherwise): `unet`, `vae`,
    `sam` and `harmonizer` (the in-place LoRA switch) are exposed from it for tests and tools.
    """

    def __init__(self, engines: dict, task_prompts: dict, scheduler_config, vae_scale_factor: int,
                 default_resolution: int, sam_image_size: int, device="cpu", dtype=torch.float32, components=None,
                 cuda_graphs: bool = False, compiled: bool = False, max_waiting: int = 64):
        self.engines, self.task_prompts, self.scheduler_config = engines, task_prompts, scheduler_config
        self.vae_scale_factor, self.default_resolution = vae_scale_factor, default_resolution
        self.device, self.dtype, self.components = torch.device(device), dtype, components
        self.cuda_graphs, self.compiled = cuda_graphs, compiled
        self.work = WorkQueue(max_waiting, name="editrt-reposition")
        self.segmenter = Segmenter(engines, sam_image_size, self.device)
        self.loops = LoopCache(scheduler_config, self.device, use_graphs=cuda_graphs)
        self.remove_passes = ByteLRU("remove passes", REMOVE_PASS_BUDGET)
        self._embeds: dict[tuple, torch.Tensor] = {}  # (task, cfg) -> tensor: at most 8, fixed size

    @classmethod
    def from_pretrained(cls, weights: str | Path, device="cpu", dtype="fp32", backend: str = "torch",
                        engines: str | Path | None = None, optimize: bool = True, cuda_graphs: bool | None = None,
                        compile: bool = False, max_waiting: int = 64) -> RepositionPipeline:
        """Load from a weights directory; `backend` 'onnxruntime' / 'tensorrt' run the networks exported
        to `engines` by `editrt export` (task prompts and the scheduler still come from `weights`).

        `optimize` (torch backend): cache each cross-attention's K/V per request (the task prompt is
        constant through the denoising loop; bit-equal results). False: plain diffusers modules.
        `cuda_graphs`: None = capture each denoising loop as one CUDA graph where supported (torch
        on CUDA) when `optimize`; False = never; True = always (an error where unsupported).
        `compile`: torch.compile (inductor) the UNet, VAE and SAM image encoder (torch backend).
        `max_waiting`: requests that may wait for the pipeline before one raises BusyError.
        """
        dtype = resolve_dtype(dtype)
        built = build_engines("reposition", weights, backend, device=device, dtype=dtype, engines_dir=engines,
                              optimize=optimize, compile=compile, cuda_graphs=cuda_graphs)
        w = built.settings
        return cls(built.engines, built.task_prompts, built.scheduler_config, w.vae_scale_factor, w.resolution,
                   w.sam_image_size, device, dtype, built.components, built.cuda_graphs, built.compiled, max_waiting)

    def _component(self, name):
        if self.components is None:
            raise AttributeError(f"{name}: only the torch backend holds PyTorch modules")
        return getattr(self.components, name)

    unet = property(lambda self: self._component("unet"))
    vae = property(lambda self: self._component("vae"))
    sam = property(lambda self: self._component("sam"))
    harmonizer = property(lambda self: self._component("harmonizer"))

    def caches(self) -> list[ByteLRU]:
        """Every byte-budgeted cache this pipeline holds (the cross-attention K/V caches are one entry
        per layer inside the UNet, bounded by construction)."""
        return [self.segmenter.cache, self.remove_passes, self.loops.cache]

    def forget(self, owner) -> None:
        """Drop what is cached for `owner` (a closed session's token): REMOVE passes whose cache_key is
        `owner` or a tuple starting with it, and the SAM embedding stored under image_key=owner."""
        def owned(key) -> bool:
            name = key[0]
            return name == owner or (isinstance(name, tuple) and len(name) > 0 and name[0] == owner)
        self.work.run(lambda: (self.remove_passes.discard(owned), self.segmenter.forget(owner)))

    # ------------------------------------------------------------------ segmentation
    def segment(self, image, points=None, labels=None, box=None, image_key=None) -> np.ndarray:
        """Subject mask (bool [H, W]) from points (x, y) with labels (1 fg, 0 bg) and/or a box (x0, y0, x1, y1).

        Multimask output; the mask with the best predicted IoU wins (as SamPredictor users do).
        The SAM image embedding is cached per image (`image_key`, a caller's name for the image, or
        a digest of its pixels), so new clicks on the same image are cheap.
        """
        rgb = as_rgb(image)
        return self.work.run(lambda: self.segmenter.masks(rgb, points=points, labels=labels, box=box,
                                                          image_key=image_key))

    # ------------------------------------------------------------------ inpainting
    @torch.no_grad()
    def prompt_embeds(self, task: str, cfg: bool) -> torch.Tensor:
        """[1 or 2, L, C] on the device, made once: the same tensor every request, so K/V caches hold."""
        def make():
            key = (task, cfg)
            if key not in self._embeds:
                prompt = self.task_prompts[task]
                embeds = torch.stack([self.task_prompts["null"], prompt]) if cfg else prompt[None]
                self._embeds[key] = embeds.to(self.device, self.dtype)
            return self._embeds[key]
        return self.work.run(make)

    def _denoise(self, rgb: np.ndarray, mask: np.ndarray, task: str, steps: int, guidance: float, seed: int,
                 progress: bool, step_callback=None) -> np.ndarray:
        """One prompt-guided inpainting pass at the given (processing) size; returns decoded uint8 RGB.

        Mirrors StableDiffusionInpaintPipeline.__call__ with strength 1 and a 9-channel UNet. The
        harmonize task runs the harmonizer UNet, and its unmasked condition is the whole image
        (paper Eq. 2) instead of the image with the mask cut out.
        """
        device, dtype = self.device, self.dtype
        harmonize = task == "harmonize"
        h, w = mask.shape
        lh, lw = h // self.vae_scale_factor, w // self.vae_scale_factor
        do_cfg = guidance > 1.0

        # 1. Prompts: [null; task] batched for CFG, like negative_prompt_embeds / prompt_embeds.
        embeds = self.prompt_embeds(task, do_cfg)  # (B, L, C)

        # 2. The initial noise scale (DDIM: 1.0); timesteps and coefficients live in the loop.
        init_noise_sigma = DDIMScheduler.from_config(self.scheduler_config).init_noise_sigma

        # 3. Image and mask in the pipeline's value ranges.
        # Built the way VaeImageProcessor does (NHWC numpy, transposed): conv kernels on CPU pick
        # their path by memory layout, and bit-equality with the diffusers oracle depends on it.
        image = torch.from_numpy(np.stack([rgb.astype(np.float32) / 255.0]).transpose(0, 3, 1, 2))  # (1, 3, H, W)
        image = 2.0 * image - 1.0
        mask_t = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, H, W)

        # 4. Initial noise first, then the condition latents: the generator's draw order matters.
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = randn_tensor((1, 4, lh, lw), generator=generator, device=device, dtype=dtype)
        latents = latents * init_noise_sigma
        mask_latent = F.interpolate(mask_t, size=(lh, lw)).to(device, dtype)
        condition = image if harmonize else image * (mask_t < 0.5)
        # the VAE posterior sample's noise, drawn where diffusers' latent_dist.sample(generator) draws it
        posterior_noise = randn_tensor((1, 4, lh, lw), generator=generator, device=device, dtype=dtype)
        condition_latents = self.engines["vae_encoder"](image=condition.to(device, dtype), noise=posterior_noise)["latent"]
        if do_cfg:
            mask_latent = torch.cat([mask_latent] * 2)
            condition_latents = torch.cat([condition_latents] * 2)

        # 5. Denoising loop: static buffers, coefficients on the device; one CUDA graph on CUDA.
        unet = self.engines["harmonizer_unet" if harmonize else "inpaint_unet"]
        extra = torch.cat([mask_latent, condition_latents], dim=1)  # (B, 5, h, w): mask | condition latents
        key = LoopKey("harmonize" if harmonize else "inpaint", tuple(latents.shape), tuple(extra.shape),
                      (("encoder_hidden_states", tuple(embeds.shape)),), steps, do_cfg, dtype)
        with tqdm(total=steps, disable=not progress, desc="denoising", leave=False) as bar:
            latents = self.loops.get(key, unet).run(latents, {"encoder_hidden_states": embeds}, extra, guidance,
                                                    callback=lambda i: (bar.update(), step_callback and step_callback(i)))

        # 6. Decode to uint8 exactly as VaeImageProcessor.postprocess + numpy_to_pil.
        decoded = self.engines["vae_decoder"](latent=latents)["image"]
        decoded = (decoded / 2 + 0.5).clamp(0, 1)
        decoded = decoded.cpu().permute(0, 2, 3, 1).float().numpy()
        return (decoded[0] * 255).round().astype(np.uint8)

    def _regenerate(self, image, mask, task: str, steps: int, guidance: float, seed: int, resolution: int | None,
                    progress: bool, mask_name: str = "mask", step_callback=None) -> tuple[np.ndarray, np.ndarray]:
        """Run one pass at the processing resolution; paste the result back inside `mask` only."""
        if task not in TASKS:
            raise InputError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
        check_steps(steps, guidance)
        rgb = as_rgb(image)
        mask = as_mask(mask, rgb.shape[:2], name=mask_name)
        size = processing_size(rgb.shape[:2], resolution or self.default_resolution)
        work_rgb, work_mask = resize_rgb(rgb, size), resize_mask_covering(mask, size)
        decoded = self._denoise(work_rgb, work_mask, task, steps, guidance, seed, progress, step_callback)
        decoded = resize_rgb(decoded, rgb.shape[:2])
        out = rgb.copy()
        out[mask] = decoded[mask]  # outside the mask: the input bytes, untouched
        return out, mask

    def inpaint(self, image, mask, task: str = "remove", steps: int = 50, guidance: float = 1.0, seed: int = 0,
                resolution: int | None = None, progress: bool = False) -> Image.Image:
        """One prompt-guided inpainting pass (task 'remove' or 'complete'); no hidden mask dilation."""
        if task not in ("remove", "complete"):
            raise InputError(f"task: expected 'remove' or 'complete', got {task!r}")
        out, _ = self.work.run(lambda: self._regenerate(image, mask, task, steps, guidance, seed, resolution, progress))
        return Image.fromarray(out)

    def harmonize(self, image, mask, steps: int = 50, seed: int = 0, guidance: float = 1.0, resolution: int | None = None,
                  lora_scale: float = 1.0, progress: bool = False) -> Image.Image:
        """Harmonize the masked region: harmonize prompt, LoRA fused at `lora_scale`, whole image as condition.

        lora_scale 0 is the base UNet bit for bit; other scales than 1 need an engine that declares
        a switchable LoRA (torch: in place; tensorrt: refit); an exported ONNX harmonizer is fused at 1.
        The scale is set on the harmonizer engine for this call only, inside this call's job.
        """
        lora = self.engines["harmonizer_unet"].lora
        if lora is None and lora_scale != 1.0:
            raise InputError(f"lora_scale {lora_scale:g}: the {self.engines['harmonizer_unet'].backend} harmonizer "
                             "has its LoRA fused at 1")

        def job():
            if lora is None:
                return self._regenerate(image, mask, "harmonize", steps, guidance, seed, resolution, progress)[0]
            previous = lora.value
            lora.set(lora_scale)  # the stage boundary: applied by the engine's prepare() before it runs
            try:
                return self._regenerate(image, mask, "harmonize", steps, guidance, seed, resolution, progress)[0]
            finally:
                lora.set(previous)
        return Image.fromarray(self.work.run(job))

    # ------------------------------------------------------------------ the SEELE flow
    def __call__(self, image, mask=None, points=None, labels=None, box=None, move=(0, 0), scale: float = 1.0,
                 complete_mask=None, occluder_mask=None, harmonize: bool = True, steps: int = 50,
                 guidance: float = 1.0, seed: int = 0, resolution: int | None = None, dilation: int | None = None,
                 progress: bool = False, cache_key=None, step_callback=None, priority: int = FINAL) -> RepositionResult:
        """The SEELE flow, as one job of the pipeline's work queue.

        `cache_key`: a hashable the caller chooses to name (image, subject mask), e.g. an EditSession's
        token and selection number; it must change when either changes. With it, the REMOVE pass,
        which depends on the image and subject but not on the move, is memoized in the pipeline's
        bounded `remove_passes` cache: a new drag position then costs only paste + harmonize, and no
        image is hashed. `step_callback(i)` runs after each eager denoising step (on the job's thread).
        """
        return self.work.run(lambda: self._reposition(
            image, mask, points, labels, box, move, scale, complete_mask, occluder_mask, harmonize, steps, guidance,
            seed, resolution, dilation, progress, cache_key, step_callback), priority)

    def _reposition(self, image, mask, points, labels, box, move, scale, complete_mask, occluder_mask, harmonize,
                    steps, guidance, seed, resolution, dilation, progress, cache_key, step_callback) -> RepositionResult:
        # 1. Check inputs.
        rgb = as_rgb(image)
        size = rgb.shape[:2]
        check_steps(steps, guidance)
        if not (isinstance(scale, (int, float)) and 0.05 <= scale <= 20):
            raise InputError(f"scale: expected a number in [0.05, 20], got {scale!r}")
        try:
            dx, dy = (float(v) for v in move)
        except (TypeError, ValueError):
            raise InputError(f"move: expected (dx, dy) in pixels, got {move!r}") from None
        complete = None if complete_mask is None else as_mask(complete_mask, size, "complete_mask")
        occluder = None if occluder_mask is None else as_mask(occluder_mask, size, "occluder_mask")
        radius = max(1, round(0.01 * min(size))) if dilation is None else int(dilation)
        stages: dict[str, Stage] = {"input": Stage(image=Image.fromarray(rgb))}

        # 2. Subject mask: given, or SAM from points / box.
        if mask is not None:
            subject = as_mask(mask, size, "mask")
        else:
            subject = self.segment(rgb, points=points, labels=labels, box=box)
        stages["subject"] = Stage(mask=subject)

        # 3. Move / scale the subject; hide the parts under occluders.
        moved_rgb, moved_mask = shift_or_warp(rgb, subject, dx, dy, scale)
        if not moved_mask.any():
            raise InputError(f"move ({dx:g}, {dy:g}) x{scale:g}: puts the whole subject outside the image ({size[1]}x{size[0]})")
        visible = moved_mask & ~occluder if occluder is not None else moved_mask

        # 4. REMOVE: inpaint the void the subject leaves (dilated: SAM edges leave a halo otherwise).
        void = dilate(subject, radius)
        remove_key = (cache_key, radius, steps, guidance, seed, resolution, self.dtype)
        current = None if cache_key is None else self.remove_passes.get(remove_key)
        if current is None:
            current, _ = self._regenerate(rgb, void, "remove", steps, guidance, seed, resolution, progress, "mask",
                                          step_callback)
            if cache_key is not None:
                current.setflags(write=False)  # shared by later calls: nobody may write into it
                self.remove_passes.put(remove_key, current)
        stages["removed"] = Stage(image=Image.fromarray(current), mask=void)

        # 5. Paste the moved subject.
        current = current.copy()
        current[visible] = moved_rgb[visible]
        stages["moved"] = Stage(image=Image.fromarray(current), mask=visible)
        regenerated = void | visible

        # 6. COMPLETE the occluded / cut-off part of the subject (user mask, output coordinates).
        if complete is not None:
            current, _ = self._regenerate(current, complete, "complete", steps, guidance, seed + 1, resolution,
                                          progress, "complete_mask", step_callback)
            stages["completed"] = Stage(image=Image.fromarray(current), mask=complete)
            regenerated |= complete

        # 7. HARMONIZE the pasted subject with its new surroundings (LoRA at c = 1).
        if harmonize:
            region = dilate(visible if complete is None else visible | complete, radius)
            current, _ = self._regenerate(current, region, "harmonize", steps, 1.0, seed + 2, resolution, progress,
                                          "harmonize region", step_callback)
            stages["harmonized"] = Stage(image=Image.fromarray(current), mask=region)
            regenerated |= region

        # 8. Paste only the regenerated regions back into the original image.
        out = rgb.copy()
        out[regenerated] = current[regenerated]
        result = Image.fromarray(out)
        stages["output"] = Stage(image=result, mask=regenerated)
        return RepositionResult(image=result, stages=stages)

