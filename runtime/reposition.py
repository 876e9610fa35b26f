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

from editrt.errors import InputError, WeightsError
from editrt.models.common import resolve_dtype
from editrt.models.deep_cache import DeepCacheUNet, check_branch, check_options
from editrt.models.files import write_atomic
from editrt.models.inpaint import load_task_prompts
from editrt.runtime.backends import build_engines
from editrt.runtime.caches import ByteLRU
from editrt.runtime.crop import CropPlan, check_crop, crop_inputs, paste_back, plan_crop
from editrt.runtime.edits import Quality, SeeleEdit, seele_request
from editrt.runtime.estimators import estimators_from_engines, trimap_from_mask
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
from editrt.runtime.seele_stages import (
    as_region,
    composite,
    default_trimap_band,
    footpoint_anchor_dy,
    move_values,
    normalized_depth,
    occluder_from_depth,
    perspective_scale,
    refine_alpha,
)
from editrt.runtime.segmenter import Segmenter
from editrt.runtime.work_queue import FINAL, WorkQueue

__all__ = ["RepositionPipeline", "RepositionResult", "Stage", "check_steps", "resolve_dtype"]
REMOVE_PASS_BUDGET = 256 << 20  # bytes of memoized REMOVE results (uint8 RGB at the input size)
DEPTH_BUDGET = 64 << 20  # bytes of memoized depth maps (float32 at the input size: 4 MB for 1024^2)
ALPHA_BUDGET = 64 << 20  # bytes of memoized (trimap, alpha) pairs (5 bytes a pixel)


def check_steps(steps: int, guidance: float) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps: expected a positive integer, got {steps!r}", field="steps")
    if guidance < 1.0:
        raise InputError(f"guidance: expected >= 1.0 (1.0 = no classifier-free guidance), got {guidance}", field="guidance")


@dataclass
class Stage:
    image: Image.Image | None = None
    mask: np.ndarray | None = None
    values: np.ndarray | None = None  # a float map in [0, 1] (normalised depth, alpha)


def save_values_png(values: np.ndarray, path: str | Path) -> Path:
    """A [0, 1] float map as a 16-bit greyscale PNG: round-half-up(v x 65535), atomically."""
    data = np.floor(np.clip(np.asarray(values, np.float32), 0, 1) * 65535.0 + 0.5).astype(np.uint16)
    return write_atomic(Path(path), lambda tmp: Image.fromarray(data).save(tmp, format="PNG"))


@dataclass
class RepositionResult:
    image: Image.Image
    stages: dict[str, Stage] = field(default_factory=dict)
    scale: float = 1.0  # the scale applied (scale="auto": the perspective rule's)
    # with Quality.crop_padding: (x1, y1, x2, y2), the padded box around everything the edit changes, outside which
    # every pixel is the input's (which pass works in which box: _remove, docs/crop-and-cache.md); None without
    crop_box: tuple[int, int, int, int] | None = None

    def save_stages(self, folder: str | Path) -> list[Path]:
        """Every stage as `{i}_{name}.png` (RGB, 8-bit), `{i}_{name}_mask.png` (255 inside) and, for float
        maps (depth normalised to [0, 1] with 1 = nearest; alpha), a 16-bit greyscale `{i}_{name}.png`."""
        written = []
        for i, (name, stage) in enumerate(self.stages.items()):
            if stage.image is not None:
                written.append(save_png(stage.image, Path(folder) / f"{i}_{name}.png"))
            if stage.values is not None:
                written.append(save_values_png(stage.values, Path(folder) / f"{i}_{name}.png"))
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
        # SEELE's depth (DPT) and matting (ViTMatte), when the weights folder has them; else None
        # (DPT's input is always S x S: on torch + CUDA it replays one CUDA graph when the loops capture them)
        self.depth_estimator, self.matter = estimators_from_engines(engines, self.device, dtype, cuda_graphs=cuda_graphs)
        self.depth_maps = ByteLRU("depth maps", DEPTH_BUDGET)
        self.alphas = ByteLRU("subject alphas", ALPHA_BUDGET)
        self._embeds: dict[tuple, torch.Tensor] = {}  # (task, cfg) -> tensor: at most 8, fixed size
        self.preview_decoder = None  # the tiny VAE's decoder engine: from_pretrained sets it (BuiltEditor's)

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
        pipe = cls(built.engines, built.task_prompts, built.scheduler_config, w.vae_scale_factor, w.resolution,
                   w.sam_image_size, device, dtype, built.components, built.cuda_graphs, built.compiled, max_waiting)
        pipe.preview_decoder = built.preview_decoder
        return pipe

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
        return [self.segmenter.cache, self.remove_passes, self.depth_maps, self.alphas, self.loops.cache]

    def forget(self, owner) -> None:
        """Drop what is cached for `owner` (a closed session's token): REMOVE passes, alphas and depth maps
        whose cache_key (or image_key) is `owner` or a tuple starting with it, and the SAM embedding stored
        under image_key=owner."""
        def owned(key) -> bool:
            name = key[0]
            return name == owner or (isinstance(name, tuple) and len(name) > 0 and name[0] == owner)
        self.work.run(lambda: (self.remove_passes.discard(owned), self.alphas.discard(owned),
                               self.depth_maps.discard(owned), self.segmenter.forget(owner)))

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

    # ------------------------------------------------------------------ task prompts
    def use_prompts(self, path: str | Path) -> None:
        """Run with the task prompts of another prompts file (`--prompts FILE`): the four of the weights folder's
        layout and any named extras (`outpaint`, `inpaint`, ...), each [L, C] with the UNet's C. An exported UNet
        (onnxruntime, tensorrt) was built for the loaded prompts' L: a file with another L is refused there."""
        current = self.task_prompts["null"]
        prompts = load_task_prompts(path, current.shape[1])
        if self.components is None and prompts["null"].shape != current.shape:
            raise WeightsError(f"{path}: prompts of {prompts['null'].shape[0]} tokens; the exported UNet takes "
                               f"{current.shape[0]}", field="prompts")

        def swap():
            self.task_prompts = prompts
            self._embeds.clear()  # new tensors: the K/V caches see new contexts and recompute
        self.work.run(swap)

    def inpainting_tasks(self) -> tuple[str, ...]:
        """The prompts `inpaint` takes by name: every loaded prompt but `harmonize` and `null`."""
        return tuple(k for k in self.task_prompts if k not in ("harmonize", "null"))

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
                 progress: bool, step_callback=None, feature_cache: tuple[int, int] | None = None,
                 preview: bool = False) -> np.ndarray:
        """One prompt-guided inpainting pass at the given (processing) size; returns decoded uint8 RGB.

        Mirrors StableDiffusionInpaintPipeline.__call__ with strength 1 and a 9-channel UNet. The
        harmonize task runs the harmonizer UNet, and its unmasked condition is the whole image
        (paper Eq. 2) instead of the image with the mask cut out. `feature_cache` (interval, branch): reuse
        the UNet's deep features between steps (DeepCacheSDHelper's semantics; models/deep_cache.py). `preview`:
        decode with the tiny VAE where the weights have one (Quality.preview).
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
                      (("encoder_hidden_states", tuple(embeds.shape)),), steps, do_cfg, dtype, feature_cache)
        features = None if feature_cache is None else DeepCacheUNet(self.components.unet, feature_cache[1])
        with tqdm(total=steps, disable=not progress, desc="denoising", leave=False) as bar:
            latents = self.loops.get(key, unet, features).run(latents, {"encoder_hidden_states": embeds}, extra, guidance,
                                                    callback=lambda i: (bar.update(), step_callback and step_callback(i)))

        # 6. Decode to uint8 exactly as VaeImageProcessor.postprocess + numpy_to_pil.
        # A preview decodes with the tiny VAE where one is loaded (diffusers' AutoencoderTiny takes the same latents).
        decoder = self.preview_decoder if preview and self.preview_decoder is not None else self.engines["vae_decoder"]
        decoded = decoder(latent=latents)["image"]
        decoded = (decoded / 2 + 0.5).clamp(0, 1)
        decoded = decoded.cpu().permute(0, 2, 3, 1).float().numpy()
        return (decoded[0] * 255).round().astype(np.uint8)

    def _regenerate(self, image, mask, task: str, steps: int, guidance: float, seed: int, resolution: int | None,
                    progress: bool, mask_name: str = "mask", step_callback=None, crop_padding: int | None = None,
                    crop_size: str | None = None, cache_interval: int | None = None,
                    cache_branch: int | None = None, preview: bool = False,
                    crop_around: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Run one pass at the processing resolution; paste the result back inside `mask` only.

        `crop_padding` / `crop_size`: work on the padded box around the mask only (runtime/crop.py); around
        `crop_around` instead where given (a repositioning's passes share the box around all they change).
        `cache_interval` / `cache_branch`: reuse the UNet's deep features between steps (models/deep_cache.py).
        """
        if task == "null" or task not in self.task_prompts:
            names = [k for k in self.task_prompts if k != "null"]
            raise InputError(f"task: expected one of {', '.join(names)}, got {task!r}", field="task")
        check_steps(steps, guidance)
        crop_size = check_crop(crop_padding, crop_size)
        cache = self._feature_cache(cache_interval, cache_branch)
        rgb = as_rgb(image)
        mask = as_mask(mask, rgb.shape[:2], name=mask_name)
        size = processing_size(rgb.shape[:2], resolution or self.default_resolution)
        if crop_size is not None:
            plan = self._crop_plan(mask if crop_around is None else crop_around, rgb.shape[:2], resolution,
                                   crop_padding, crop_size)
            work_rgb, work_mask = crop_inputs(rgb, mask, plan)
            decoded = self._denoise(work_rgb, work_mask, task, steps, guidance, seed, progress, step_callback, cache, preview)
            return paste_back(rgb, mask, decoded, plan), mask
        work_rgb, work_mask = resize_rgb(rgb, size), resize_mask_covering(mask, size)
        decoded = self._denoise(work_rgb, work_mask, task, steps, guidance, seed, progress, step_callback, cache, preview)
        decoded = resize_rgb(decoded, rgb.shape[:2])
        out = rgb.copy()
        out[mask] = decoded[mask]  # outside the mask: the input bytes, untouched
        return out, mask

    def _crop_plan(self, around: np.ndarray, size_hw: tuple[int, int], resolution: int | None, padding: int,
                   mode: str) -> CropPlan:
        """The padded box around `around` in an image of `size_hw` and the size it is processed at (runtime/crop.py)."""
        return plan_crop(around, processing_size(size_hw, resolution or self.default_resolution), padding, mode)

    def _feature_cache(self, interval: int | None, branch: int | None) -> tuple[int, int] | None:
        """(interval, branch) of DeepCache-style feature reuse, or None when off (no interval, or 1)."""
        cache = check_options(interval, branch)
        if cache is not None and self.components is None:
            raise InputError(f"cache_interval: needs the torch backend (the {self.engines['inpaint_unet'].backend} "
                             "UNet runs as one opaque engine)", field="cache_interval")
        if cache is not None:
            check_branch(self.components.unet, cache[1])
        return cache

    def inpaint(self, image, mask, task: str = "remove", steps: int = 50, guidance: float = 1.0, seed: int = 0,
                resolution: int | None = None, progress: bool = False, crop_padding: int | None = None,
                crop_size: str | None = None, cache_interval: int | None = None,
                cache_branch: int | None = None) -> Image.Image:
        """One prompt-guided inpainting pass (task 'remove', 'complete', or a named prompt the prompts file adds:
        `inpainting_tasks()`); no hidden mask dilation.

        `crop_padding` (px): regenerate only the padded box around the mask (diffusers' padding_mask_crop);
        `crop_size`: "native" (default with a crop: the box at its own resolution, at most the processing
        size) or "processing" (resized to the processing size, as diffusers does). `cache_interval` N,
        `cache_branch` B: DeepCache's feature reuse (the deep UNet features computed every N-th step).
        """
        if task not in self.inpainting_tasks():
            names = [repr(k) for k in self.inpainting_tasks()]
            raise InputError(f"task: expected {' or '.join([', '.join(names[:-1]), names[-1]])}, got {task!r}",
                             field="task")
        out, _ = self.work.run(lambda: self._regenerate(image, mask, task, steps, guidance, seed, resolution, progress,
                                                        crop_padding=crop_padding, crop_size=crop_size,
                                                        cache_interval=cache_interval, cache_branch=cache_branch))
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
                             "has its LoRA fused at 1", field="lora_scale")

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

    # ------------------------------------------------------------------ depth and matting (SEELE pre-processing)
    def _depth_map(self, rgb: np.ndarray, key, why: str) -> np.ndarray:
        """Relative inverse depth [H, W] of the image (DPT), memoized under `key` (None: not cached)."""
        if self.depth_estimator is None:
            raise InputError(f"{why}: needs depth weights (the weights folder's depth/, DPT); none are loaded", field=why.split()[0])
        depth = None if key is None else self.depth_maps.get(key)
        if depth is None:
            depth = self.depth_estimator(rgb)
            if key is not None:
                depth.setflags(write=False)
                self.depth_maps.put(key, depth)
        return depth

    def _alpha(self, rgb: np.ndarray, carried: np.ndarray, band: int, key) -> tuple[np.ndarray, np.ndarray]:
        """(trimap, alpha) of the subject (ViTMatte; the trimap's known regions imposed), memoized under `key`."""
        if self.matter is None:
            raise InputError("matting: needs matting weights (the weights folder's matting/, ViTMatte); none are loaded", field="matting")
        cached = None if key is None else self.alphas.get(key)
        if cached is None:
            trimap = trimap_from_mask(carried, band)
            cached = (trimap, refine_alpha(self.matter(rgb, trimap), trimap))
            if key is not None:
                for a in cached:
                    a.setflags(write=False)
                self.alphas.put(key, cached)
        return cached

    # ------------------------------------------------------------------ the SEELE flow
    def __call__(self, image, edit: SeeleEdit | None = None, *, mask=None, points=None, labels=None, box=None,
                 quality: Quality | None = None, progress: bool = False, cache_key=None, image_key=None,
                 step_callback=None, priority: int = FINAL, **keywords) -> RepositionResult:
        """The SEELE flow (`edit`, runtime/edits.py) on the subject `mask` (or SAM from points / box), as one job
        of the pipeline's work queue.

        Keyword form: the SeeleEdit and Quality attributes may be given as keywords instead (`move=(dx, dy),
        scale="auto", steps=20, ...`; runtime/edits.seele_request maps them, and the older spellings
        occluder_mask / shadow_mask / shadow_region, in one place).

        `cache_key`: a hashable the caller chooses to name (image, subject mask, existing shadow), e.g. a
        session's token and selection number; it must change when any of them changes. With it, the
        REMOVE pass and the subject's alpha matte, which depend on the image and subject but not on the
        move, are memoized in the pipeline's bounded caches: a new drag position then costs only paste +
        harmonize, and no image is hashed. `image_key` names the image alone (its depth map is memoized
        under it; default: under `cache_key`). `step_callback(i)` runs after each eager denoising step.
        """
        edit, quality = seele_request(edit, quality, keywords)
        flow = _Flow(as_rgb(image), edit, quality, cache_key, image_key, progress, step_callback)
        return self.work.run(lambda: self._reposition(flow, mask, points, labels, box), priority)

    def _reposition(self, flow: _Flow, mask, points, labels, box) -> RepositionResult:
        self._bind(flow)
        self._select_subject(flow, mask, points, labels, box)
        self._perspective(flow)
        self._matte(flow)
        self._place(flow)
        self._regions(flow)
        if flow.edit.remove_order == "paper":  # SEELE's order: move first, REMOVE with the moved subject in view
            self._paste(flow)
            self._remove(flow)
        else:  # the cached order: REMOVE does not depend on the move, so a drag reuses it
            self._remove(flow)
            self._paste(flow)
        self._complete(flow)
        self._harmonize(flow)
        return flow.result()

    def _bind(self, flow: _Flow) -> None:
        """1. The edit's masks against the image (all checks before any network runs)."""
        edit, size = flow.edit, flow.size
        flow.complete = None if edit.complete_mask is None else as_mask(edit.complete_mask, size, "complete_mask")
        flow.occluder = None if edit.occluder_mask is None else as_mask(edit.occluder_mask, size, "occlusion")
        flow.shadow = None if edit.existing_shadow is None else as_mask(edit.existing_shadow, size, "existing_shadow")
        flow.new_shadow = None if edit.new_shadow_region is None else \
            as_region(edit.new_shadow_region, size, "new_shadow_region")
        if (edit.auto_scale or edit.auto_occlusion) and self.depth_estimator is None:
            name = "scale" if edit.auto_scale else "occlusion"
            raise InputError(f"{name} auto: needs depth weights (the weights folder's depth/, DPT); none are loaded",
                             field=name)
        if edit.matting and self.matter is None:
            raise InputError("matting: needs matting weights (the weights folder's matting/, ViTMatte); none are loaded", field="matting")
        flow.radius = max(1, round(0.01 * min(size))) if edit.dilation is None else int(edit.dilation)

    def _select_subject(self, flow: _Flow, mask, points, labels, box) -> None:
        """2. Subject mask: given, or SAM from points / box. Its existing shadow moves with it (App. A.3 iv)."""
        if mask is not None:
            subject = as_mask(mask, flow.size, "mask")
        else:
            subject = self.segment(flow.rgb, points=points, labels=labels, box=box)
        flow.stages["subject"] = Stage(mask=subject)
        flow.subject = subject
        flow.carried = subject if flow.shadow is None else subject | flow.shadow
        if flow.shadow is not None:
            flow.stages["existing_shadow"] = Stage(mask=flow.shadow)

    def _perspective(self, flow: _Flow) -> None:
        """3. Depth (occlusion, perspective), once per image; scale "auto": the footpoint's inverse-depth ratio,
        the feet stay where dropped."""
        edit = flow.edit
        if not (edit.auto_scale or edit.auto_occlusion):
            return
        owner = flow.image_key if flow.image_key is not None else flow.cache_key
        depth_key = None if owner is None else (owner, "depth", self.dtype)
        flow.depth = self._depth_map(flow.rgb, depth_key, "scale auto" if edit.auto_scale else "occlusion auto")
        flow.stages["depth"] = Stage(values=normalized_depth(flow.depth))
        if edit.auto_scale:
            flow.scale = perspective_scale(flow.depth, flow.subject, flow.dx, flow.dy, carried=flow.carried)
            flow.dy += footpoint_anchor_dy(flow.subject, flow.scale, centre_of=flow.carried)

    def _matte(self, flow: _Flow) -> None:
        """4. Matting: trimap from the mask, alpha out (once per subject)."""
        if not flow.edit.matting:
            flow.source = flow.carried
            return
        band = flow.edit.trimap_band
        flow.band = default_trimap_band(flow.size, flow.carried) if band is None else band
        alpha_key = None if flow.cache_key is None else (flow.cache_key, "alpha", flow.band, self.dtype)
        trimap, flow.alpha = self._alpha(flow.rgb, flow.carried, flow.band, alpha_key)
        flow.stages["trimap"] = Stage(image=Image.fromarray(trimap))
        flow.stages["alpha"] = Stage(values=flow.alpha)
        flow.source = flow.alpha > 0

    def _place(self, flow: _Flow) -> None:
        """5. Move / scale the subject; the occluders hide part of it."""
        dx, dy, scale, size = flow.dx, flow.dy, flow.scale, flow.size
        flow.moved_rgb, moved_mask = shift_or_warp(flow.rgb, flow.carried, dx, dy, scale)
        flow.moved_alpha = None if flow.alpha is None else move_values(flow.alpha, flow.carried, dx, dy, scale)
        support = moved_mask if flow.moved_alpha is None else flow.moved_alpha > 0
        if not support.any():
            raise InputError(f"move ({dx:g}, {dy:g}) x{scale:g}: puts the whole subject outside the image ({size[1]}x{size[0]})", field="move")
        if flow.edit.auto_occlusion:  # (a given occluder mask is the caller's own: not repeated as a stage)
            # what REMOVE regenerates (the subject's dilated reach) is inpainted away: it cannot be in front
            flow.occluder = occluder_from_depth(flow.depth, flow.subject, moves_with=flow.shadow) & \
                ~dilate(flow.source, flow.radius)
            flow.stages["occluder"] = Stage(mask=flow.occluder)
        flow.visible = support & ~flow.occluder if flow.occluder is not None else support
        if not flow.visible.any():
            raise InputError(f"occlusion: the occluder hides the whole subject moved by ({dx:g}, {dy:g}); "
                             "nothing would be pasted", field="occlusion")

    def _regions(self, flow: _Flow) -> None:
        """6. What each generative pass will regenerate (known before any runs: masks, not pixels) and, with a crop,
        the one box around them all (Quality.crop_padding; runtime/crop.py): the void, the moved subject, the part to
        complete and the harmonize area with its new shadow. Every pass that sees the moved subject works in it."""
        flow.void = dilate(flow.source, flow.radius)
        region = flow.complete  # COMPLETE: the user's mask and the moved existing shadow, never over the occluders
        if flow.shadow is not None:
            moved_shadow = move_values(flow.shadow, flow.carried, flow.dx, flow.dy, flow.scale) >= 0.5
            region = moved_shadow if region is None else region | moved_shadow
        if region is not None and flow.occluder is not None:
            region = region & ~flow.occluder
        flow.completion = region if region is not None and region.any() else None
        if flow.edit.harmonize:  # HARMONIZE: the pasted (and completed) subject, dilated, and a new shadow
            area = dilate(flow.visible if flow.completion is None else flow.visible | flow.completion, flow.radius)
            if flow.new_shadow is not None:
                area |= flow.new_shadow
            if flow.occluder is not None:  # last: not even a new shadow paints over what is in front
                area &= ~flow.occluder
            flow.harmony = area
        q = flow.quality
        if q.crop_padding is not None:
            changed = flow.void | flow.visible
            for part in (flow.completion, flow.harmony):
                if part is not None:
                    changed |= part
            flow.crop_around = changed
            flow.crop = self._crop_plan(changed, flow.size, q.resolution, q.crop_padding, q.crop_size)

    def _pass(self, flow: _Flow, image: np.ndarray, mask: np.ndarray, task: str, guidance: float, seed: int,
              mask_name: str, crop_around: np.ndarray | None) -> np.ndarray:
        """One generative pass of the flow at its quality (with a crop: in the box around `crop_around`)."""
        q = flow.quality
        out, _ = self._regenerate(image, mask, task, q.steps, guidance, seed, q.resolution, flow.progress, mask_name,
                                  flow.step_callback, crop_padding=q.crop_padding, crop_size=q.crop_size,
                                  preview=q.preview, crop_around=crop_around)
        return out

    def _remove(self, flow: _Flow) -> None:
        """7. REMOVE: inpaint the void the subject (and its shadow / its alpha's reach) leaves, dilated.

        Cached order: on the unmoved image, memoized per (subject, quality) under the caller's cache_key (it does
        not depend on the move). Paper order: on the image with the moved subject pasted, the void less the moved
        subject (it stays in view and is not regenerated); it depends on the move, so it is never memoized.
        With a crop, the paper order's pass works in the box around all the edit changes (it sees the moved subject);
        the cached order's in the box around the void alone: it runs on the unmoved image, and a box that followed
        the move would make it depend on the move (a drag could no longer reuse it)."""
        q = flow.quality
        void = flow.void
        if flow.edit.remove_order == "paper":
            void = void & ~flow.visible
            if not void.any():  # the moved subject covers all it left: nothing to remove
                return
            flow.current = self._pass(flow, flow.current, void, "remove", flow.guidance, q.seed, "mask",
                                      flow.crop_around)
            flow.stages["removed"] = Stage(image=Image.fromarray(flow.current), mask=void)
            flow.regenerated = flow.regenerated | void
            return
        remove_key = (flow.cache_key, flow.radius, q.steps, flow.guidance, q.seed, q.resolution, self.dtype, flow.band,
                      q.preview, q.crop_padding, q.crop_size)
        current = None if flow.cache_key is None else self.remove_passes.get(remove_key)
        if current is None:
            current = self._pass(flow, flow.rgb, void, "remove", flow.guidance, q.seed, "mask", None)
            if flow.cache_key is not None:
                current.setflags(write=False)  # shared by later calls: nobody may write into it
                self.remove_passes.put(remove_key, current)
        flow.stages["removed"] = Stage(image=Image.fromarray(current), mask=void)
        flow.current, flow.regenerated = current, void

    def _paste(self, flow: _Flow) -> None:
        """8. Paste the moved subject: hard, or blended with its alpha (hidden part: alpha 0); onto the REMOVE
        result (cached order) or onto the input (paper order: REMOVE comes next)."""
        visible = flow.visible
        if flow.current is None:  # paper order: nothing regenerated yet
            flow.current, flow.regenerated = flow.rgb, np.zeros(flow.size, bool)
        if flow.moved_alpha is None:
            flow.current = flow.current.copy()
            flow.current[visible] = flow.moved_rgb[visible]
        else:
            flow.current = composite(flow.moved_rgb, flow.current, np.where(visible, flow.moved_alpha, 0.0))
        flow.stages["moved"] = Stage(image=Image.fromarray(flow.current), mask=visible)
        flow.regenerated = flow.regenerated | visible

    def _complete(self, flow: _Flow) -> None:
        """9. COMPLETE the occluded / cut-off part (user mask, output coordinates) and the moved existing shadow,
        never over the occluders (the region: _regions)."""
        region = flow.completion
        if region is None:
            return
        flow.current = self._pass(flow, flow.current, region, "complete", flow.guidance, flow.quality.seed + 1,
                                  "complete_mask", flow.crop_around)
        flow.stages["completed"] = Stage(image=Image.fromarray(flow.current), mask=region)
        flow.regenerated |= region

    def _harmonize(self, flow: _Flow) -> None:
        """10. HARMONIZE the pasted subject with its new surroundings (LoRA at c = 1), and the region where a new
        shadow is cast (App. A.3 iv); the occluders stay as they are (the area: _regions)."""
        if not flow.edit.harmonize:
            return
        if flow.new_shadow is not None:
            flow.stages["new_shadow_region"] = Stage(mask=flow.new_shadow)
        area = flow.harmony
        flow.current = self._pass(flow, flow.current, area, "harmonize", 1.0, flow.quality.seed + 2,
                                  "harmonize region", flow.crop_around)
        flow.stages["harmonized"] = Stage(image=Image.fromarray(flow.current), mask=area)
        flow.regenerated |= area


@dataclass
class _Flow:
    """One SEELE call's inputs and what its steps produce, in the order they produce it."""

    rgb: np.ndarray
    edit: SeeleEdit
    quality: Quality
    cache_key: object
    image_key: object
    progress: bool
    step_callback: object
    stages: dict = field(default_factory=dict)
    complete: np.ndarray | None = None  # the bound masks (_bind)
    occluder: np.ndarray | None = None
    shadow: np.ndarray | None = None
    new_shadow: np.ndarray | None = None
    radius: int = 1
    subject: np.ndarray | None = None  # _select_subject
    carried: np.ndarray | None = None  # the subject and its existing shadow: what moves
    depth: np.ndarray | None = None  # _perspective
    band: int | None = None  # _matte
    alpha: np.ndarray | None = None
    source: np.ndarray | None = None  # what leaves its place (alpha > 0 with matting)
    moved_rgb: np.ndarray | None = None  # _place
    moved_alpha: np.ndarray | None = None
    visible: np.ndarray | None = None
    void: np.ndarray | None = None  # _regions: what REMOVE regenerates (the paper order: less the moved subject)
    completion: np.ndarray | None = None  # what COMPLETE regenerates (None: nothing to complete)
    harmony: np.ndarray | None = None  # what HARMONIZE regenerates (None: harmonize off)
    crop_around: np.ndarray | None = None  # with a crop: all the edit changes, whose padded box the passes work in
    crop: CropPlan | None = None
    current: np.ndarray | None = None  # the image being regenerated, stage after stage
    regenerated: np.ndarray | None = None  # what is pasted back into the input

    def __post_init__(self):
        self.size = self.rgb.shape[:2]
        self.dx, self.dy = self.edit.move
        self.scale = self.edit.scale  # "auto": replaced by _perspective
        self.guidance = self.quality.guidance_or(1.0)
        self.stages["input"] = Stage(image=Image.fromarray(self.rgb))

    def result(self) -> RepositionResult:
        """11. Paste only the regenerated regions back into the original image."""
        out = self.rgb.copy()
        out[self.regenerated] = self.current[self.regenerated]
        image = Image.fromarray(out)
        self.stages["output"] = Stage(image=image, mask=self.regenerated)
        return RepositionResult(image=image, stages=self.stages, scale=float(self.scale),
                                crop_box=None if self.crop is None else self.crop.box)
