"""The editable-image-elements editor (paper 001): partition -> elements -> edits -> diffusion render.

    image ─► SAM ─► 16x16 grid queries ─► SLIC assignment (runtime/partition.py) ─► elements
          ─► content encoder on each masked 32x32 patch ─► (feature, x, y, w, h)
    edited elements ─► element tokens ─► SD-1.5 UNet with element cross-attention ─► VAE decode

Classifier-free guidance exactly as the paper: eps(z, ∅, ∅) + w·[eps(z, C, S) − eps(z, ∅, ∅)],
w = 3, DDIM, 50 steps by default; ∅ is the empty-prompt embedding and all-zero element tokens.
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
from editrt.models.attention import prepare_unet, use_fused_dual_attention
from editrt.models.components import load_elements_components
from editrt.models.content_encoder import PATCH
from editrt.models.element_unet import load_element_embedder
from editrt.models.inpaint import load_scheduler
from editrt.models.networks import elements_networks
from editrt.models.text import encode_prompt, load_text_encoder, load_tokenizer
from editrt.runtime.backends import ELEMENTS_NETWORKS, check_backend, editor_settings, file_engines, torch_engines
from editrt.runtime.elements import Elements, render_overlay
from editrt.runtime.images import as_rgb, processing_size, resize_rgb
from editrt.runtime.partition import Partition, partition
from editrt.runtime.reposition import check_steps, resolve_dtype
from editrt.runtime.scheduler import LoopCache, LoopKey
from editrt.runtime.segmenter import Segmenter


class ElementsPipeline:
    """Editable image elements over engines (torch, onnxruntime or tensorrt): any device, fp32 / fp16 / bf16.

    The text encoder and the element token embedder stay in PyTorch on every backend: they run
    once per prompt / per edit, not per denoising step.
    """

    def __init__(self, engines: dict, embedder, tokenizer, text_encoder, scheduler_config, vae_scale_factor: int,
                 default_resolution: int, sam_image_size: int, device="cpu", dtype=torch.float32, components=None):
        self.engines, self.embedder = engines, embedder
        self.tokenizer, self.text_encoder, self.scheduler_config = tokenizer, text_encoder, scheduler_config
        self.vae_scale_factor, self.default_resolution = vae_scale_factor, default_resolution
        self.device, self.dtype, self.components = torch.device(device), dtype, components
        self.segmenter = Segmenter(engines, sam_image_size, self.device)
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self.loops = LoopCache(scheduler_config, self.device)  # CUDA graphs on CUDA (torch backend)

    @classmethod
    def from_pretrained(cls, weights: str | Path, device="cpu", dtype="fp32", backend: str = "torch",
                        engines: str | Path | None = None, optimize: bool = True,
                        kernels: bool | None = None) -> ElementsPipeline:
        """Load from a weights directory (see RepositionPipeline.from_pretrained for `backend`, `optimize`).

        `kernels` (torch backend): run each block's text + element cross-attention as the fused
        Triton dual attention (default: on CUDA); otherwise the two attentions of Algorithm 1.
        """
        check_backend(backend, engines)
        dtype = resolve_dtype(dtype)
        w = editor_settings(weights, "elements")
        sizes = (w.vae_scale_factor, w.resolution, w.sam_image_size)
        if backend == "torch":
            c = load_elements_components(weights, device, dtype)
            # the fp16 probe runs the text-only path; the element attention has the same widths
            prepare_unet(c.decoder.unet, dtype, (77, c.decoder.unet.config.cross_attention_dim), cache_kv=optimize)
            if kernels if kernels is not None else torch.device(device).type == "cuda":
                use_fused_dual_attention(c.decoder)
            engines_ = torch_engines(w.specs, elements_networks(c), ELEMENTS_NETWORKS)
            return cls(engines_, c.decoder.embedder, c.tokenizer, c.text_encoder, c.scheduler_config, *sizes,
                       device, dtype, c)
        root = w.layout.elements
        engines_ = file_engines(w.specs, ELEMENTS_NETWORKS, backend, engines, device, weights)
        return cls(engines_, load_element_embedder(root / "element_adapter", dtype).to(device),
                   load_tokenizer(root / "tokenizer"), load_text_encoder(root / "text_encoder", dtype).to(device),
                   load_scheduler(root / "scheduler").config, *sizes, device, dtype)

    @property
    def decoder(self):
        if self.components is None:
            raise AttributeError("decoder: only the torch backend holds PyTorch modules")
        return self.components.decoder

    # ------------------------------------------------------------------ partition and encoding
    def working_image(self, image, resolution: int | None = None) -> np.ndarray:
        rgb = as_rgb(image)
        return resize_rgb(rgb, processing_size(rgb.shape[:2], resolution or self.default_resolution))

    def partition(self, image, resolution: int | None = None, grid: int = 16, beta: float = 64.0, beta_c: float = 0.2,
                  iterations: int = 1) -> Elements:
        """Split `image` into at most grid*grid elements at the working resolution and encode each."""
        if iterations < 1 or grid < 1 or beta < 0 or not 0 <= beta_c <= 1:
            raise InputError(f"partition: expected grid >= 1, iterations >= 1, beta >= 0, 0 <= beta_c <= 1; got "
                             f"grid={grid}, iterations={iterations}, beta={beta}, beta_c={beta_c}")
        original = as_rgb(image)
        rgb = self.working_image(original, resolution)
        part = partition(self.segmenter, rgb, grid=grid, beta=beta, beta_c=beta_c, iterations=iterations)
        features = self.encode_elements(rgb, part)
        h, w = rgb.shape[:2]
        alive = part.counts > 0
        masks, anchors, sizes = [], np.zeros((part.num_elements, 2), np.float32), np.zeros((part.num_elements, 2), np.float32)
        for n in range(part.num_elements):
            if not alive[n]:
                masks.append(np.zeros((0, 0), bool))
                continue
            x0, y0, x1, y1 = (int(v) for v in part.boxes[n])
            masks.append(part.labels[y0:y1 + 1, x0:x1 + 1] == n)
            anchors[n] = part.centroids[n] * np.array([w, h], np.float32) - np.array([x0, y0], np.float32)
            sizes[n] = ((x1 - x0 + 1) / w, (y1 - y0 + 1) / h)
        centroids = np.nan_to_num(part.centroids, nan=0.0).astype(np.float32)
        info = {"dropped_fraction": part.dropped_fraction, "source_size": list(original.shape[:2]),
                "grid": grid, "beta": beta, "beta_c": beta_c, "iterations": iterations}
        return Elements((h, w), features, centroids, sizes, alive, masks, anchors, info=info)

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
        patches, ids = self.element_patches(rgb, part)
        features = np.zeros((part.num_elements, self.embedder.feature_dim), np.float32)
        if len(ids):
            encoded = self.engines["content_encoder"](patches=patches.to(self.device, self.dtype))["features"]
            features[ids] = encoded.float().cpu().numpy()
        return features

    # ------------------------------------------------------------------ rendering
    def prompt_embedding(self, prompt: str) -> torch.Tensor:
        """[1, 77, D] CLIP hidden states, cached per prompt (an edit session re-renders with the same text)."""
        if prompt not in self._prompt_cache:
            if len(self._prompt_cache) > 32:
                self._prompt_cache.clear()
            self._prompt_cache[prompt] = encode_prompt(self.tokenizer, self.text_encoder, prompt).to(self.device, self.dtype)
        return self._prompt_cache[prompt]

    def element_tokens(self, elements: Elements) -> torch.Tensor:
        """[1, N, D]: deleted elements give all-zero tokens (feature and embedded position zeroed)."""
        to = dict(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            return self.embedder(torch.from_numpy(elements.features)[None].to(**to),
                                         torch.from_numpy(elements.boxes())[None].to(**to),
                                         torch.from_numpy(elements.alive)[None].to(self.device))

    @torch.no_grad()
    def decode(self, elements: Elements, prompt: str = "", guidance: float = 3.0, steps: int = 50, seed: int = 0,
               progress: bool = False, step_callback=None, size: tuple[int, int] | None = None) -> Image.Image:
        """Render the (edited) elements; guidance w combines eps(∅, ∅) and eps(C, S) as in the paper.

        `size` (H, W) renders on another canvas than the elements' own (their positions and sizes
        are normalised): a preview renders smaller.
        """
        check_steps(steps, guidance)
        if not isinstance(prompt, str):
            raise InputError(f"prompt: expected text, got {type(prompt).__name__}")
        h, w = size or elements.image_size
        if h % self.vae_scale_factor or w % self.vae_scale_factor:
            raise ElementsError(f"elements: canvas {w}x{h} is not a multiple of {self.vae_scale_factor}")
        if elements.features.shape[1] != self.embedder.feature_dim:
            raise ElementsError(f"elements: feature size {elements.features.shape[1]} does not match the decoder's "
                                f"{self.embedder.feature_dim} (elements from other weights?)")
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

        # 4. Decode.
        image = self.engines["element_vae_decoder"](latent=latents)["image"]
        image = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        return Image.fromarray((image[0] * 255).round().astype(np.uint8))

    def render_overlay(self, elements: Elements, image=None, ids: bool = False) -> Image.Image:
        if image is not None:
            image = resize_rgb(as_rgb(image), elements.image_size)
        return render_overlay(elements, image, ids=ids)
