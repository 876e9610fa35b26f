"""The denoising-loop scheduler: static buffers, precomputed DDIM coefficients, CUDA graphs.

A `DenoiseLoop` runs one stage's whole loop (UNet, classifier-free guidance, DDIM update, every
step) on buffers allocated once. Timesteps and DDIM coefficients are precomputed on the device,
so a loop needs no host synchronisation; on CUDA with a PyTorch UNet it is captured once as one
CUDA graph and replayed per request (inputs are copied into the static buffers first). On the CPU,
or with ONNX Runtime / TensorRT engines, the same loop runs eagerly: its logic is tested on CPU.

The DDIM update is diffusers' DDIMScheduler.step (eta = 0, epsilon prediction), with the same
float32 coefficient arithmetic, so the eager loop is bit-equal to the diffusers loop on the same
device; a graph replays the same kernels, so replay equals the eager loop bit for bit.

`LoopCache` keeps loops by (stage, shapes, steps, guidance on/off, dtype) and drops the least
recently used beyond `capacity` (each CUDA graph holds its own memory pool).

Weight switches under graphs: a captured graph reads parameters through their storage. The
harmonizer's LoRA switch (models/lora.FusedLoRA) copies the new weights into that same storage,
and `DenoiseLoop.run` applies the UNet's weights before every replay, so a replay always computes
with the weights of its stage. The cross-attention K/V caches are cleared before capture, so the
graph itself recomputes K/V from the (static) prompt buffer once per replay.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler


@dataclass(frozen=True)
class LoopKey:
    stage: str
    latent_shape: tuple  # (1, 4, h, w)
    extra_shape: tuple | None  # channels concatenated to the UNet input (inpainting: mask + condition)
    context_shapes: tuple  # ((name, shape), ...) of the UNet's other inputs
    steps: int
    cfg: bool
    dtype: torch.dtype


def ddim_coefficients(scheduler_config, steps: int, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(timesteps [S] int64, {name: [S] float32}) for eta = 0, computed as DDIMScheduler.step does."""
    s = DDIMScheduler.from_config(scheduler_config)
    if s.config.prediction_type != "epsilon" or s.config.thresholding or s.config.clip_sample:
        raise ValueError("the loop implements epsilon prediction without clipping or thresholding")
    s.set_timesteps(steps)
    coef = {"beta_sqrt": [], "alpha_sqrt": [], "direction": [], "prev_alpha_sqrt": []}
    for t in s.timesteps:
        prev_t = t - s.config.num_train_timesteps // s.num_inference_steps
        alpha_prod_t = s.alphas_cumprod[t]
        alpha_prod_t_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        std_dev_t = 0.0 * s._get_variance(t, prev_t) ** 0.5  # eta = 0, in the same tensor arithmetic
        coef["beta_sqrt"].append(beta_prod_t ** 0.5)
        coef["alpha_sqrt"].append(alpha_prod_t ** 0.5)
        coef["direction"].append((1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5)
        coef["prev_alpha_sqrt"].append(alpha_prod_t_prev ** 0.5)
    return s.timesteps.to(device), {k: torch.stack(v).to(device) for k, v in coef.items()}


class DenoiseLoop:
    """One stage's denoising loop on static buffers (see the module docstring)."""

    def __init__(self, key: LoopKey, unet, scheduler_config, device, use_graph: bool):
        self.key, self.unet, self.device = key, unet, torch.device(device)
        batch = 2 if key.cfg else 1
        dtype = key.dtype
        # 1. Static buffers: what a request copies in, and the latents the loop updates in place.
        self.latents = torch.zeros(key.latent_shape, device=self.device, dtype=dtype)
        self.extra = None if key.extra_shape is None else torch.zeros(key.extra_shape, device=self.device, dtype=dtype)
        self.context = {name: torch.zeros(shape, device=self.device, dtype=dtype) for name, shape in key.context_shapes}
        self.guidance = torch.ones((), device=self.device, dtype=torch.float32)
        # 2. Timesteps (as the UNet's float [B] input) and DDIM coefficients, on the device.
        timesteps, self.coef = ddim_coefficients(scheduler_config, key.steps, self.device)
        self.timestep_inputs = [t.to(torch.float32).expand(batch) for t in timesteps]
        self.graph = None
        self._sources: dict[str, tuple] = {}  # name -> (tensor, version) last copied into the buffer
        self.use_graph = use_graph and self.device.type == "cuda" and getattr(unet, "backend", None) == "torch"

    def _step(self, i: int) -> None:
        latents = self.latents
        model_input = torch.cat([latents] * 2) if self.key.cfg else latents
        if self.extra is not None:
            model_input = torch.cat([model_input, self.extra], dim=1)
        noise = self.guided(self.unet(sample=model_input, timestep=self.timestep_inputs[i], **self.context)["noise_pred"])
        c = {k: v[i] for k, v in self.coef.items()}
        pred_original = (latents - c["beta_sqrt"] * noise) / c["alpha_sqrt"]
        self.latents.copy_(c["prev_alpha_sqrt"] * pred_original + c["direction"] * noise)

    def guided(self, noise: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance: eps(∅) + w·[eps(cond) − eps(∅)], the ∅ half batched first."""
        if not self.key.cfg:
            return noise
        noise_uncond, noise_cond = noise.chunk(2)
        return noise_uncond + self.guidance * (noise_cond - noise_uncond)

    def _body(self, callback=None) -> None:
        for i in range(self.key.steps):
            self._step(i)
            if callback is not None:
                callback(i)  # eager only: progress, or a preview's cancellation check

    def _apply_weights(self) -> None:
        module = getattr(self.unet, "module", None)
        if hasattr(module, "apply_weights"):
            module.apply_weights()

    def capture(self) -> None:
        """Warm up on a side stream (allocations, autotuning), then capture the whole loop."""
        from editrt.models.attention import clear_kv_caches

        saved = self.latents.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                self.latents.copy_(saved)
                self._body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        clear_kv_caches(getattr(self.unet, "module", None))  # so the graph computes K/V from its own buffer
        self.graph = torch.cuda.CUDAGraph()
        self.latents.copy_(saved)
        with torch.cuda.graph(self.graph), torch.no_grad():
            self._body()

    @torch.no_grad()
    def run(self, latents: torch.Tensor, context: dict[str, torch.Tensor], extra: torch.Tensor | None = None,
            guidance: float = 1.0, callback=None) -> torch.Tensor:
        """Copy the request into the buffers, run (or replay) the loop, return the final latents.

        A context tensor that is the very one copied last time, unchanged, is not copied again, so
        the eager path keeps its cross-attention K/V across requests (a session's task prompt).
        """
        self.latents.copy_(latents)
        if extra is not None:
            self.extra.copy_(extra)
        for name, value in context.items():
            source = self._sources.get(name)
            if source is None or source[0] is not value or source[1] != value._version:
                self.context[name].copy_(value)
                self._sources[name] = (value, value._version)
        self.guidance.fill_(guidance)
        self._apply_weights()  # e.g. the harmonizer's LoRA: in place, before any replay
        if self.use_graph and self.graph is None:
            self.capture()
            self.latents.copy_(latents)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body(callback)
        return self.latents.clone()


class LoopCache:
    """DenoiseLoops keyed by LoopKey, least recently used dropped beyond `capacity`."""

    def __init__(self, scheduler_config, device, use_graphs: bool | None = None, capacity: int = 8):
        self.scheduler_config, self.device = scheduler_config, torch.device(device)
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.capacity, self.loops = capacity, OrderedDict()

    def get(self, key: LoopKey, unet) -> DenoiseLoop:
        loop = self.loops.get(key)
        if loop is None or loop.unet is not unet:
            loop = DenoiseLoop(key, unet, self.scheduler_config, self.device, self.use_graphs)
            self.loops[key] = loop
            while len(self.loops) > self.capacity:
                self.loops.popitem(last=False)
        self.loops.move_to_end(key)
        return loop

    def clear(self) -> None:
        self.loops.clear()


def overlap(device, *fns):
    """Run independent callables concurrently on separate CUDA streams (in order on the CPU); returns
    their results. Each stream waits for the work queued before, and the caller's stream waits for all."""
    if torch.device(device).type != "cuda":
        return [fn() for fn in fns]
    main = torch.cuda.current_stream()
    results = []
    streams = [torch.cuda.Stream() for _ in fns]
    for fn, stream in zip(fns, streams):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            results.append(fn())
    for stream in streams:
        main.wait_stream(stream)
    return results
