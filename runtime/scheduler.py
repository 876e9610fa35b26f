"""The denoising-loop scheduler: static buffers, precomputed DDIM coefficients, CUDA graphs.

A `DenoiseLoop` runs one stage's whole loop (UNet, classifier-free guidance, DDIM update, every
step) on buffers allocated once. Timesteps and DDIM coefficients are precomputed on the device,
so a loop needs no host synchronisation. When the pipeline asks for CUDA graphs (`cuda_graphs`,
resolved in runtime/backends.build_engines) and the UNet engine declares `supports_cuda_graph`,
the loop is captured once as one CUDA graph and replayed per request (inputs are copied into the
static buffers first); otherwise (CPU, ONNX Runtime / TensorRT engines, `cuda_graphs=False`, the
`optimize=False` baseline) the same loop runs eagerly: its logic is tested on CPU.

The DDIM update is diffusers' DDIMScheduler.step (eta = 0, epsilon prediction), with the same
float32 coefficient arithmetic, so the eager loop is bit-equal to the diffusers loop on the same
device; a graph replays the same kernels, so replay equals the eager loop bit for bit.

`LoopCache` keeps loops by (stage, shapes, steps, guidance on/off, dtype, engine) within a byte
budget, least recently used evicted first; a loop's bytes are its static buffers plus, once
captured, the memory its graph's private pool reserved (measured from an emptied cache), so the
budget bounds graph pools too and an evicted loop's graph frees its pool.

Cached denoising features (`LoopKey.feature_cache` = (interval, branch), models/deep_cache.py): step i is
a full step when i % interval == 0, else a cached step on the feature the last full step kept in a static
buffer (allocated by the first full step, counted in `nbytes`). Which kind each step is depends only on
i, so the whole-loop graph holds each step's own body (full or cached) and a replay needs no Python;
one graph per step kind would need a replay and a host round trip per step instead of one per loop.

Weight switches under graphs: a captured graph reads parameters through their storage. The
harmonizer's LoRA switch (models/lora.FusedLoRA) copies the new weights into that same storage,
and `DenoiseLoop.run` calls the engine's `prepare()` before every run or replay, so a replay always
computes with the weights of its engine. `before_capture()` clears the cross-attention K/V caches,
so the graph itself recomputes K/V from the (static) prompt buffer once per replay.

Threads: a loop's buffers are shared state; loops run only inside their pipeline's work-queue job
(runtime/work_queue.py), one at a time. Captures of all pipelines take CAPTURE_LOCK, each on its
own stream, with capture_error_mode="thread_local", so another thread's CUDA calls (e.g. an
application's, or another pipeline's eager work) during a capture do not invalidate it.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from editrt.runtime.caches import ByteLRU

CAPTURE_LOCK = threading.Lock()  # one CUDA-graph capture at a time in this process (torch's rule)
cuda = torch.cuda  # the CUDA API DenoiseLoop.capture calls; the CPU tests put a recording fake here


@dataclass(frozen=True)
class LoopKey:
    stage: str
    latent_shape: tuple  # (1, 4, h, w)
    extra_shape: tuple | None  # channels concatenated to the UNet input (inpainting: mask + condition)
    context_shapes: tuple  # ((name, shape), ...) of the UNet's other inputs
    steps: int
    cfg: bool
    dtype: torch.dtype
    feature_cache: tuple | None = None  # (interval, branch): DeepCache-style reuse; None: every step is full


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
        # eta = 0: DDIMScheduler.step's std_dev_t is exactly 0, and x - 0**2 == x in float32, so the
        # direction coefficient is (1 - alpha_prev) ** 0.5 in the same float32 tensor arithmetic
        coef["beta_sqrt"].append(beta_prod_t ** 0.5)
        coef["alpha_sqrt"].append(alpha_prod_t ** 0.5)
        coef["direction"].append((1 - alpha_prod_t_prev) ** 0.5)
        coef["prev_alpha_sqrt"].append(alpha_prod_t_prev ** 0.5)
    return s.timesteps.to(device), {k: torch.stack(v).to(device) for k, v in coef.items()}


class DenoiseLoop:
    """One stage's denoising loop on static buffers (see the module docstring)."""

    def __init__(self, key: LoopKey, unet, scheduler_config, device, use_graph: bool, features=None):
        """`features` (with key.feature_cache): the engine's UNet as full and cached steps
        (models/deep_cache.DeepCacheUNet, over the same module, so `unet.prepare()` still switches its weights)."""
        if (key.feature_cache is None) != (features is None):
            raise ValueError("DenoiseLoop: feature_cache in the key and `features` go together")
        self.key, self.unet, self.device, self.features = key, unet, torch.device(device), features
        self.deep_feature = None  # the feature the last full step kept (allocated by the first one)
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
        self.graph_bytes = 0  # what the graph's private memory pool reserved at capture
        self.on_captured = None  # set by LoopCache: re-measure this loop against the budget
        self._sources: dict[str, tuple] = {}  # name -> (tensor, version) last copied into the buffer
        self.use_graph = bool(use_graph) and unet.supports_cuda_graph

    @property
    def nbytes(self) -> int:
        buffers = [self.latents, self.guidance, *self.context.values(), *self.coef.values()]
        buffers += [] if self.extra is None else [self.extra]
        buffers += [] if self.deep_feature is None else [self.deep_feature]
        return sum(t.element_size() * t.nelement() for t in buffers) + self.graph_bytes

    def _step(self, i: int) -> None:
        latents = self.latents
        model_input = torch.cat([latents] * 2) if self.key.cfg else latents
        if self.extra is not None:
            model_input = torch.cat([model_input, self.extra], dim=1)
        noise = self.guided(self._predict(model_input, i))
        c = {k: v[i] for k, v in self.coef.items()}
        pred_original = (latents - c["beta_sqrt"] * noise) / c["alpha_sqrt"]
        self.latents.copy_(c["prev_alpha_sqrt"] * pred_original + c["direction"] * noise)

    def _predict(self, model_input: torch.Tensor, i: int) -> torch.Tensor:
        """The UNet's noise prediction at step i. With feature caching, step i is a full step when
        i % interval == 0 (DeepCacheSDHelper refreshes on the first step and every interval-th after) and keeps
        its deep feature in a static buffer; the steps between run the shallow path on that buffer. The
        step kinds are fixed by i, so a captured loop holds each step's own kind of body."""
        timestep = self.timestep_inputs[i]
        if self.key.feature_cache is None:
            return self.unet(sample=model_input, timestep=timestep, **self.context)["noise_pred"]
        if i % self.key.feature_cache[0] == 0:
            noise, feature = self.features.full(model_input, timestep, **self.context)
            if self.deep_feature is None:
                self.deep_feature = torch.empty_like(feature)
            self.deep_feature.copy_(feature)
            return noise
        return self.features.cached(model_input, timestep, feature=self.deep_feature, **self.context)

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
                callback(i)  # progress, or a preview's cancellation check (a replay calls them after)

    def capture(self) -> None:
        """Warm the loop up, then capture it as one graph; one capture at a time in the process.

        1. The warm-up runs the whole loop on this capture's own side stream (allocations, cuDNN /
           inductor / Triton autotuning: everything a capture may not do), starting, like the capture,
           from `before_capture()`: torch.compile guards on the K/V caches that call clears, so a
           warm-up from filled caches would leave the capture to compile (and inductor's autotuning
           synchronizes, which fails inside a capture).
        2. Two pipelines (`editrt serve` loads both editors, each with its own work queue) may capture
           at the same time: CAPTURE_LOCK serialises captures (torch allows one per process), and each
           captures on its own stream, not torch's one process-wide default capture stream.
        3. torch.cuda.graph empties the allocator's cache on entry; emptying it before measuring makes
           `graph_bytes` what the graph's private pool reserved, so the LoopCache budget bounds pools.
        """
        with CAPTURE_LOCK:
            saved = self.latents.clone()
            main = cuda.current_stream(self.device)
            stream = cuda.Stream(self.device)
            stream.wait_stream(main)
            self.unet.before_capture()
            with cuda.stream(stream), torch.no_grad():
                self._body()
            main.wait_stream(stream)
            self.unet.before_capture()  # so the graph computes K/V from its own static prompt buffer
            self.latents.copy_(saved)
            cuda.synchronize(self.device)
            cuda.empty_cache()
            reserved = cuda.memory_reserved(self.device)
            graph = cuda.CUDAGraph()
            with cuda.graph(graph, stream=stream, capture_error_mode="thread_local"), torch.no_grad():
                self._body()
            self.graph_bytes = max(0, cuda.memory_reserved(self.device) - reserved)
            self.graph = graph

    @torch.no_grad()
    def run(self, latents: torch.Tensor, context: dict[str, torch.Tensor], extra: torch.Tensor | None = None,
            guidance: float = 1.0, callback=None) -> torch.Tensor:
        """Copy the request into the buffers, run (or replay) the loop, return the final latents.

        `callback(i)` runs after step i: between the steps when eager, after the whole replay under a
        graph (once per step, in order), so a raising callback never lets the caller's next stage start.

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
        self.unet.prepare()  # this engine's weights (the harmonizer's LoRA scale), in place, before a replay
        if self.use_graph and self.graph is None:
            self.capture()
            if self.on_captured is not None:
                self.on_captured()
            self.latents.copy_(latents)
        if self.graph is not None:
            self.graph.replay()
            # A replay runs no Python, so the per-step callbacks (progress, a preview's cancellation check)
            # run once it is queued: a cancelled preview stops here, before its next stage is queued.
            for i in range(self.key.steps if callback is not None else 0):
                callback(i)
        else:
            grows = self.features is not None and self.deep_feature is None
            self._body(callback)
            if grows and self.on_captured is not None:
                self.on_captured()  # re-measure: the first full step allocated the feature buffer
        return self.latents.clone()


class LoopCache:
    """DenoiseLoops within a byte budget, least recently used evicted first.

    `use_graphs` is the pipeline's resolved `cuda_graphs` option; a loop captures only if its UNet
    engine also declares `supports_cuda_graph`.
    """

    def __init__(self, scheduler_config, device, use_graphs: bool = False, budget_bytes: int = 2 << 30):
        self.scheduler_config, self.device, self.use_graphs = scheduler_config, torch.device(device), bool(use_graphs)
        self.cache = ByteLRU("denoising loops", budget_bytes)

    def get(self, key: LoopKey, unet, features=None) -> DenoiseLoop:
        """The loop for `key` on `unet`; `features` only with key.feature_cache (see DenoiseLoop)."""
        loop = self.cache.get((key, id(unet)))
        if loop is None or loop.unet is not unet:
            loop = DenoiseLoop(key, unet, self.scheduler_config, self.device, self.use_graphs, features)
            loop.on_captured = lambda loop=loop: self.account(loop)
            self.cache.put((key, id(unet)), loop, loop.nbytes)
        return loop

    def account(self, loop: DenoiseLoop) -> None:
        """Re-measure a loop after its capture (its graph pool now counts against the budget).

        A graph that alone exceeds the budget is dropped and its loop runs eagerly from then on: the
        cache could not keep it, and capturing it again for every request would cost more than it saves.
        """
        if loop.nbytes > self.cache.budget_bytes:
            warnings.warn(f"denoising loops: the CUDA graph of the {loop.key.stage} loop {loop.key.latent_shape} x "
                          f"{loop.key.steps} steps reserved {loop.graph_bytes >> 20} MiB, more than the "
                          f"{self.cache.budget_bytes >> 20} MiB budget; that loop runs eagerly", RuntimeWarning,
                          stacklevel=2)
            loop.graph, loop.graph_bytes, loop.use_graph = None, 0, False
        if (loop.key, id(loop.unet)) in self.cache:
            self.cache.put((loop.key, id(loop.unet)), loop, loop.nbytes)

    @property
    def loops(self) -> list[DenoiseLoop]:
        return self.cache.values()

    def clear(self) -> None:
        self.cache.clear()


def _record_on(value, stream) -> None:
    """Tell the caching allocator that `stream` uses the tensors in `value` (allocated on another stream)."""
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            value.record_stream(stream)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _record_on(v, stream)
    elif isinstance(value, dict):
        for v in value.values():
            _record_on(v, stream)


def overlap(device, *fns):
    """Run independent callables concurrently on separate CUDA streams (in order on the CPU); returns
    their results. Each stream waits for the work queued before, and the caller's stream waits for all.

    Tensors the callables return were allocated on their side streams: each is recorded on the
    caller's stream, so the allocator does not hand its memory to the side stream again while the
    caller still reads it. (Results are walked through tuples, lists and dicts.)
    """
    if torch.device(device).type != "cuda":
        return [fn() for fn in fns]
    main = torch.cuda.current_stream(device)
    results = []
    streams = [torch.cuda.Stream(device) for _ in fns]
    for fn, stream in zip(fns, streams):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            results.append(fn())
    for stream in streams:
        main.wait_stream(stream)
    for result in results:
        _record_on(result, main)
    return results
