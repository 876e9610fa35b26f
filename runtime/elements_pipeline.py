"""The editable-image-elements editor (paper 001): partition -> elements -> edits -> diffusion render.

    image ─► SAM ─► 16x16 grid queries ─► SLIC assignment (runtime/partition.py) ─► elements
          ─► content encoder on each masked 32x32 patch ─► (feature, x, y, w, h)
    edited elements ─► element tokens ─► SD-1.5 UNet with element cross-attention ─► VAE decode

Classifier-free guidance exactly as the paper: eps(z, ∅, ∅) + w·[eps(z, C, S) − eps(z, ∅, ∅)],
w = 3, DDIM, 50 steps by default; ∅ is the empty-prompt embedding and all-zero element tokens.

Elements live in the user's image (runtime/elements.py): the partition, the content encoder and
the decoder run at a working resolution, and results come back at the image's size.

Sharing (DESIGN.md contract 6): one pipeline serves many threads. Every public method that runs
an engine or a PyTorch part (text encoder, token embedder) holds the pipeline's work queue turn
(`self.work`, runtime/work_queue.py) for its whole body, so engines, loop buffers, CUDA graphs and
the caches are used by one job at a time; `Elements` are the caller's, never stored here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from editrt.errors import ElementsError, InputError
from editrt.models.common import resolve_device, resolve_dtype
from editrt.models.content_encoder import PATCH
from editrt.models.text import encode_prompt
from editrt.runtime.backends import build_engines
from editrt.runtime.caches import ByteLRU
from editrt.runtime.elements import Elements, render_overlay
from editrt.runtime.images import as_rgb, processing_size, resize_rgb
from editrt.runtime.partition import Partition, partition
from editrt.runtime.reposition import check_steps
from editrt.runtime.scheduler import LoopCache, LoopKey
from editrt.runtime.segmenter import Segmenter
from editrt.runtime.work_queue import FINAL, WorkQueue

PROMPT_BUDGET = 64 << 20  # bytes of cached prompt embeddings (SD-1.5: 77 x 768 fp32 = 236 KB each)


def check_square(square) -> int:
    """`square`: the side of a square working canvas (paper 001 partitions 512 x 512), a positive multiple of 8."""
    if isinstance(square, bool) or not isinstance(square, (int, np.integer)) or square < 8 or square % 8:
        raise InputError(f"square: expected a positive multiple of 8 (the paper's is 512), got {square!r}",
                         field="square")
    return int(square)


class ElementsPipeline:
    """Editable image elements over engines (torch, onnxruntime or tensorrt): any device, fp32 / fp16 / bf16.

    The text encoder and the element token embedder stay in PyTorch on every backend: they run
    once per prompt / per edit, not per denoising step.
    """

    def __init__(self, engines: dict, embedder, tokenizer, text_encoder, scheduler_config, vae_scale_factor: int,
                 default_resolution: int, sam_image_size: int, device="cpu", dtype=torch.float32, components=None,
                 cuda_graphs: bool = False, compiled: bool = False, max_waiting: int = 64):
        self.engines, self.embedder = engines, embedder
        self.tokenizer, self.text_encoder, self.scheduler_config = tokenizer, text_encoder, scheduler_config
        self.vae_scale_factor, self.default_resolution = vae_scale_factor, default_resolution
        self.device, self.dtype, self.components = torch.device(device), dtype, components
        self.cuda_graphs, self.compiled = cuda_graphs, compiled
        self.work = WorkQueue(max_waiting, name="editrt-elements")
        self.segmenter = Segmenter(engines, sam_image_size, self.device)
        self.prompts = ByteLRU("prompt embeddings", PROMPT_BUDGET)
        self.loops = LoopCache(scheduler_config, self.device, use_graphs=cuda_graphs)
        self.preview_decoder = None  # the tiny VAE's decoder engine: from_pretrained sets it (BuiltEditor's)

    @classmethod
    def from_pretrained(cls, weights: str | Path, device="cpu", dtype="fp32", backend: str = "torch",
                        engines: str | Path | None = None, optimize: bool = True, kernels: bool | None = None,
                        cuda_graphs: bool | None = None, compile: bool = False,
                        max_waiting: int = 64) -> ElementsPipeline:
        """Load from a weights directory (see RepositionPipeline.from_pretrained for `backend`, `optimize`,
        `cuda_graphs`, `compile` and `max_waiting`).

        `kernels` (torch backend): run each block's text + element cross-attention as the fused
        Triton dual attention (default: on CUDA); otherwise the two attentions of Algorithm 1.
        """
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        built = build_engines("elements", weights, backend, device=device, dtype=dtype, engines_dir=engines,
                              optimize=optimize, compile=compile, cuda_graphs=cuda_graphs, kernels=kernels)
        w = built.settings
        pipe = cls(built.engines, built.embedder, built.tokenizer, built.text_encoder, built.scheduler_config,
                   w.vae_scale_factor, w.resolution, w.sam_image_size, device, dtype, built.components,
                   built.cuda_graphs, built.compiled, max_waiting)
        pipe.preview_decoder = built.preview_decoder
        return pipe

    @property
    def decoder(self):
        """The PyTorch element decoder (torch backend; for tests and tools, the pipeline runs its engine)."""
        if self.components is None:
            raise AttributeError("decoder: only the torch backend holds PyTorch modules")
        return self.components.decoder

    def caches(self) -> list[ByteLRU]:
        """Every byte-budgeted cache this pipeline holds."""
        return [self.segmenter.cache, self.prompts, self.loops.cache]

    # ------------------------------------------------------------------ partition and encoding
    def working_image(self, image, resolution: int | None = None) -> np.ndarray:
        rgb = as_rgb(image)
        return resize_rgb(rgb, processing_size(rgb.shape[:2], resolution or self.default_resolution))

    def partition(self, image, resolution: int | None = None, grid: int = 16, beta: float = 64.0, beta_c: float = 0.2,
                  iterations: int = 1, priority: int = FINAL, square: int | None = None) -> Elements:
        """Split `image` into at most grid*grid elements and encode each; the elements live in `image`'s pixels.

        SAM, the assignment and the content encoder run at the working resolution (short side
        `resolution`, default the model's; or, with `square`, the image resized to square x square as
        the paper's 512 x 512, aspect not kept); the label map is then resized to the image (nearest),
        and the decoder renders on that working canvas by default.
        """
        if square is not None:
            square = check_square(square)
            if resolution is not None:
                raise InputError("partition: expected resolution or square, not both", field="square")
        wrong = [name for name, bad in (("grid", grid < 1), ("iterations", iterations < 1), ("beta", beta < 0),
                                        ("beta_c", not 0 <= beta_c <= 1)) if bad]
        if wrong:
            raise InputError(f"partition: expected grid >= 1, iterations >= 1, beta >= 0, 0 <= beta_c <= 1; got "
                             f"grid={grid}, iterations={iterations}, beta={beta}, beta_c={beta_c}", field=wrong[0])
        original = as_rgb(image)
        rgb = self.working_image(original, resolution) if square is None else resize_rgb(original, (square, square))

        def job():
            part = partition(self.segmenter, rgb, grid=grid, beta=beta, beta_c=beta_c, iterations=iterations)
            return part, self.encode_elements(rgb, part)

        part, features = self.work.run(job, priority=priority)
        info = {"working_dropped_fraction": part.dropped_fraction, "resolution": min(rgb.shape[:2]),
                "grid": grid, "beta": beta, "beta_c": beta_c, "iterations": iterations}
        if square is not None:
            info["square"] = square
        return Elements.from_labels(part.labels, features, original.shape[:2], info)

    def element_patches(self, rgb: np.ndarray, part: Partition) -> tuple[torch.Tensor, np.ndarray]:
        """Each element's masked patch (outside its mask: 0), cropped to its box, resized to 32x32.

        Returns (patches [K, 3, 32, 32] in [-1, 1], the ids of the K elements with pixels). A patch
        holds nothing but the element's own pixels, so it does not depend on the element's position.
        """
        image = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)
        ids = np.flatnonzero(part.counts > 0)
        patches = []
        for n in ids:
            x0, y0, x1, y1 = (int(v) for v in part.boxes[n])
            mask = torch.from_numpy(part.labels[y0:y1 + 1, x0:x1 + 1] == n)
            crop = image[:, y0:y1 + 1, x0:x1 + 1] * mask  # (3, h, w)
            patches.append(F.interpolate(crop[None], size=(PATCH, PATCH), mode="bilinear", align_corners=False,
                                         antialias=True)[0])
        return torch.stack(patches) if patches else torch.zeros(0, 3, PATCH, PATCH), ids

    @torch.no_grad()
    def encode_elements(self, rgb: np.ndarray, part: Partition) -> np.ndarray:
        """[N, F] content features of the partition's elements (zero for an element without pixels)."""
        patches, ids = self.element_patches(rgb, part)
        features = np.zeros((part.num_elements, self.embedder.feature_dim), np.float32)
        if len(ids):
            encoder = self.engines["content_encoder"]
            encoded = self.work.run(lambda: encoder(patches=patches.to(self.device, self.dtype))["features"])
            features[ids] = encoded.float().cpu().numpy()
        return features

    # ------------------------------------------------------------------ rendering
    def prompt_embedding(self, prompt: str) -> torch.Tensor:
        """[1, 77, D] CLIP hidden states, cached per prompt (an edit session re-renders with the same text)."""
        def job():
            embedding = self.prompts.get(prompt)
            if embedding is None:
                embedding = encode_prompt(self.tokenizer, self.text_encoder, prompt).to(self.device, self.dtype)
                self.prompts.put(prompt, embedding)
            return embedding
        return self.work.run(job)

    def element_tokens(self, elements: Elements) -> torch.Tensor:
        """[1, N, D]: deleted elements give all-zero tokens (feature and embedded position zeroed)."""
        to = dict(device=self.device, dtype=self.dtype)
        features, boxes, alive = (torch.from_numpy(a)[None] for a in (elements.features, elements.boxes(), elements.alive))

        @torch.no_grad()
        def job():
            return self.embedder(features.to(**to), boxes.to(**to), alive.to(self.device))
        return self.work.run(job)

    @torch.no_grad()
    def decode(self, elements: Elements, prompt: str = "", guidance: float = 3.0, steps: int = 50, seed: int = 0,
               progress: bool = False, step_callback=None, size: tuple[int, int] | None = None,
               resolution: int | None = None, priority: int = FINAL, preview: bool = False) -> Image.Image:
        """Render the (edited) elements at the image's size; guidance w combines eps(∅, ∅) and eps(C, S) as in the paper.

        The decoder runs on a working canvas, resized to the image's size at the end: `size` (H, W,
        multiples of 8) or `resolution` (its short side) choose it, by default the partition's (a
        preview renders smaller). Positions and sizes reach the decoder normalised, so any canvas works.
        `step_callback(i)` runs after each denoising step on the thread running the job (a preview's
        raises work_queue.Cancelled there to stop); `priority` orders it in the work queue. `preview`: decode
        with the tiny VAE where the weights have one (Quality.preview).
        """
        check_steps(steps, guidance)
        if not isinstance(prompt, str):
            raise InputError(f"prompt: expected text, got {type(prompt).__name__}", field="prompt")
        if size is not None and resolution is not None:
            raise InputError("decode: expected size or resolution, not both", field="resolution")
        if resolution is not None:
            size = processing_size(elements.image_size, resolution)
        h, w = size or elements.working_size
        if h % self.vae_scale_factor or w % self.vae_scale_factor:
            raise ElementsError(f"elements: working canvas {w}x{h} is not a multiple of {self.vae_scale_factor}", field="elements")
        if elements.features.shape[1] != self.embedder.feature_dim:
            raise ElementsError(f"elements: feature size {elements.features.shape[1]} does not match the decoder's "
                                f"{self.embedder.feature_dim} (elements from other weights?)", field="elements")
        snapshot = elements.copy()  # the edit state when asked: the caller may go on editing `elements`
        image = self.work.run(lambda: self._render(snapshot, prompt, guidance, steps, seed, progress,
                                                   step_callback, (h, w), preview), priority=priority)
        return Image.fromarray(resize_rgb(image, elements.image_size))  # back in the user's image

    @torch.no_grad()
    def _render(self, elements: Elements, prompt: str, guidance: float, steps: int, seed: int, progress: bool,
                step_callback, size: tuple[int, int], preview: bool = False) -> np.ndarray:
        """uint8 [h, w, 3] on the working canvas `size`; runs holding the work queue's turn."""
        h, w = size
        do_cfg = guidance > 1.0

        # 1. Conditions: (C, S) and, for guidance, (∅, ∅) batched first.
        text, tokens = self.prompt_embedding(prompt), self.element_tokens(elements)  # (1, 77, D), (1, N, D)
        if do_cfg:
            text = torch.cat([self.prompt_embedding(""), text])
            tokens = torch.cat([torch.zeros_like(tokens), tokens])

        # 2. Initial noise (CPU generator, as diffusers does).
        generator = torch.Generator("cpu").manual_seed(seed)
        shape = (1, 4, h // self.vae_scale_factor, w // self.vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        latents = latents * DDIMScheduler.from_config(self.scheduler_config).init_noise_sigma

        # 3. Denoising loop: static buffers, coefficients on the device; one CUDA graph on CUDA.
        key = LoopKey("elements", tuple(latents.shape), None, (("encoder_hidden_states", tuple(text.shape)),
                                                                ("element_tokens", tuple(tokens.shape))),
                      steps, do_cfg, self.dtype)
        with tqdm(total=steps, disable=not progress, desc="rendering", leave=False) as bar:
            latents = self.loops.get(key, self.engines["element_unet"]).run(
                latents, {"encoder_hidden_states": text, "element_tokens": tokens}, None, guidance,
                callback=lambda i: (bar.update(), step_callback and step_callback(i)))

        # 4. Decode (a preview with the tiny VAE where one is loaded).
        decoder = self.preview_decoder if preview and self.preview_decoder is not None else self.engines["element_vae_decoder"]
        image = decoder(latent=latents)["image"]
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        return (image[0] * 255).round().astype(np.uint8)

    def render_overlay(self, elements: Elements, image=None, ids: bool = False) -> Image.Image:
        """Boundaries and centroids over the input image (the one partitioned: same size)."""
        return render_overlay(elements, None if image is None else as_rgb(image), ids=ids)
