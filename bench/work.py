"""The work a bench row really did, counted while it runs: network calls, denoising steps, cache hits and
misses, compiled-graph runs. The suite reports it per timed run as the row's `observed` column and fails a
row whose networks or steps differ from its baseline's (bench/suite.py `check_work`).

How each count is taken (nothing is read from a row's configuration):

* our networks: every call of an editrt engine (TorchEngine, OrtEngine, the TensorRT engines), under its
  spec name (`inpaint_unet`, `vae_decoder`, `sam_image_encoder`, ...); an engine that calls another engine
  (the TensorRT harmonizer at a LoRA scale) counts once.
* a peer's networks (and ours where a row calls modules directly): forward hooks on the modules its `Run`
  names (`Run.networks`, under the same names as our engines).
* denoising steps: our DenoiseLoop's step; a peer's scheduler step, through `count_step` (bench builders
  wrap the peer's `scheduler.step` with it).
* caches: the hits and misses of every ByteLRU (`runtime/caches.py`) by its name ("sam embeddings", ...).
* compiled graphs: each call of a graph inductor compiled (torch.compile's CompiledFxGraph).
* CUDA graphs: what is counted while a graph is captured (networks, steps, editrt kernel launches) happens
  again at each replay, which runs no Python: a replay credits it. The record belongs to the graph, so a
  row that replays a graph an earlier row captured (pipelines are shared between rows) reports the same.

`observing()` installs the counting wrappers (reference-counted, removed when the last one leaves);
`tally()` opens a Counter that receives every count made while it is open.
"""
from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from editrt.kernels import launches

STEPS = ("steps",)
COMPILED = ("compiled graph calls",)
TRAIN_STEPS, TRAIN_SAMPLES = ("training steps",), ("training samples",)  # bench/train_cases.py's optimizer steps
# bench/less_work_cases.py: what the UNet really processed (its hooks count them as the UNet runs)
UNET_STEPS, UNET_FULL_STEPS = ("unet steps",), ("unet full steps",)  # every step / those that ran the deep path
UNET_LATENT_PIXELS, UNET_FLOPS = ("unet latent pixels",), ("unet flops",)  # per UNet call: H x W of its input; FLOPs
OUTPUT_PSNR = ("output psnr db",)  # a cached run's output against the uncached one's; a preview's against the final
DECODER_FLOPS = ("decoder flops",)  # bench/preview_cases.py: each VAE decoder call adds its counted FLOPs

_lock = threading.RLock()
_tallies: list[Counter] = []  # open tallies: a row's watches
_installed = 0
_restore: list = []  # (owner, attribute, original) of every installed wrapper
_engine_depth = threading.local()
_captures = weakref.WeakKeyDictionary()  # CUDA graph -> (work Counter, kernel launch Counter) recorded at capture
_open_captures: dict[int, tuple[Counter, dict]] = {}  # id(graph) -> (its tally, launch counts at capture_begin)


def network(name: str) -> tuple:
    return ("network", name)


def count(key: tuple, n: int = 1) -> None:
    """Add `n` to `key` in every open tally; while a CUDA graph is being captured, only in the capture's:
    captured work does not run then, it runs at each replay (`replayed`)."""
    if n:
        with _lock:
            capturing = [opened for opened, _ in _open_captures.values()]
            for open_tally in capturing or _tallies:
                open_tally[key] += n


def count_step() -> None:
    """One denoising step (a peer's scheduler.step wrapper calls this)."""
    count(STEPS)


def count_training_step(samples: int) -> None:
    """One optimizer step over `samples` samples (a training-step row calls this after its step ran)."""
    count(TRAIN_STEPS)
    count(TRAIN_SAMPLES, samples)


@contextmanager
def tally() -> Iterator[Counter]:
    """A Counter of everything counted while the block runs (observing() must be active to count anything)."""
    seen = Counter()
    with _lock:
        _tallies.append(seen)
    try:
        yield seen
    finally:
        with _lock:
            _tallies[:] = [t for t in _tallies if t is not seen]  # by identity: empty Counters are equal


# ---------------------------------------------------------------------- wrappers
def _engine_call(original):
    def call(self, *args, **kwargs):
        depth = getattr(_engine_depth, "value", 0)
        if depth == 0:
            count(network(self.spec.name))
        _engine_depth.value = depth + 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _engine_depth.value = depth
    return call


def _loop_step(original):
    def step(self, *args, **kwargs):
        count(STEPS)
        return original(self, *args, **kwargs)
    return step


def _cache_get(original):
    def get(self, *args, **kwargs):
        hits, misses = self.hits, self.misses
        try:
            return original(self, *args, **kwargs)
        finally:
            count(("cache", self.name, "hits"), self.hits - hits)
            count(("cache", self.name, "misses"), self.misses - misses)
    return get


def _compiled_call(original):
    def call(self, *args, **kwargs):
        count(COMPILED)
        return original(self, *args, **kwargs)
    return call


def _capture_begin(original):
    def capture_begin(self, *args, **kwargs):
        opened = Counter()
        with _lock:
            _open_captures[id(self)] = (opened, launches.counts())
        try:
            return original(self, *args, **kwargs)
        except BaseException:
            _close_capture(self)
            raise
    return capture_begin


def _close_capture(graph) -> tuple[Counter, Counter] | None:
    with _lock:
        entry = _open_captures.pop(id(graph), None)
        if entry is None:
            return None
        opened, before = entry
    after = launches.counts()
    return opened, Counter({k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)})


def _capture_end(original):
    def capture_end(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        finally:
            record = _close_capture(self)
            if record is not None:
                try:
                    _captures[self] = record
                except TypeError:  # a graph object that cannot be weakly referenced: nothing to credit later
                    pass
    return capture_end


def replayed(graph) -> None:
    """Credit one replay of `graph` with the work and kernel launches recorded while it was captured."""
    try:
        record = _captures.get(graph)
    except TypeError:  # not weakly referenceable (a test's stand-in): it was never recorded
        record = None
    if record is None:
        return
    work, kernels = record
    for key, n in work.items():
        count(key, n)
    for name, n in kernels.items():
        for _ in range(n):
            launches.record(name)


def _targets() -> list[tuple[object, str, object]]:
    """(owner, attribute, wrapper factory) of everything observing() wraps."""
    from editrt.runtime.caches import ByteLRU
    from editrt.runtime.engines import OrtEngine, TorchEngine
    from editrt.runtime.scheduler import DenoiseLoop

    targets = [(TorchEngine, "__call__", _engine_call), (OrtEngine, "__call__", _engine_call),
               (DenoiseLoop, "_step", _loop_step), (ByteLRU, "get", _cache_get),
               (torch.cuda.graphs.CUDAGraph, "capture_begin", _capture_begin),
               (torch.cuda.graphs.CUDAGraph, "capture_end", _capture_end)]
    from editrt.export import tensorrt  # imports tensorrt itself only where it is needed

    targets += [(tensorrt.TensorRTEngine, "__call__", _engine_call), (tensorrt.HarmonizerAtScale, "__call__", _engine_call)]
    try:
        from torch._inductor.output_code import CompiledFxGraph
    except ImportError:  # an older torch: compiled-graph calls are not counted, so no row can claim compiled
        return targets
    return targets + [(CompiledFxGraph, "__call__", _compiled_call)]


@contextmanager
def observing() -> Iterator[None]:
    """Count work while the block runs (wrappers installed on first entry, removed on the last exit)."""
    global _installed
    with _lock:
        if _installed == 0:
            for owner, attribute, wrap in _targets():
                original = owner.__dict__[attribute]
                _restore.append((owner, attribute, original))
                setattr(owner, attribute, wrap(original))
        _installed += 1
    try:
        yield
    finally:
        with _lock:
            _installed -= 1
            if _installed == 0:
                while _restore:
                    owner, attribute, original = _restore.pop()
                    setattr(owner, attribute, original)


@contextmanager
def hooked(modules: dict[tuple, torch.nn.Module]) -> Iterator[None]:
    """Count each call of these modules under its key (forward hooks, removed after the block)."""
    handles = []
    try:
        for key, module in modules.items():
            handles.append(module.register_forward_hook(lambda *_, key=key: count(key)))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------- the row's column
def _per_run(total: int, runs: int) -> int | float:
    value = total / runs
    return int(value) if value == int(value) else round(value, 3)


def summary(seen: Counter, runs: int) -> dict:
    """The row's `observed` column: what one timed run did, on average over `runs` timed runs."""
    networks = {key[1]: _per_run(n, runs) for key, n in sorted(seen.items()) if key[0] == "network" and n}
    caches: dict[str, dict] = {}
    for key, n in sorted(seen.items()):
        if key[0] == "cache":
            caches.setdefault(key[1], {"hits": 0, "misses": 0})[key[2]] = _per_run(n, runs)
    out = {"networks": networks, "denoising_steps": _per_run(seen[STEPS], runs), "caches": caches,
           "compiled_graph_calls": _per_run(seen[COMPILED], runs)}
    if seen[TRAIN_STEPS]:  # training-step rows only (the other rows' column is unchanged)
        out["training_steps"] = _per_run(seen[TRAIN_STEPS], runs)
        out["training_samples"] = _per_run(seen[TRAIN_SAMPLES], runs)
    if seen[UNET_STEPS]:  # less-work rows only: UNet steps by kind, the latent pixels and FLOPs they processed
        out["unet_full_steps"] = _per_run(seen[UNET_FULL_STEPS], runs)
        out["unet_cached_steps"] = _per_run(seen[UNET_STEPS] - seen[UNET_FULL_STEPS], runs)
        out["unet_latent_pixels"] = _per_run(seen[UNET_LATENT_PIXELS], runs)
        if seen[UNET_FLOPS]:
            out["unet_flops"] = _per_run(seen[UNET_FLOPS], runs)
            out["unet_flops_per_step"] = _per_run(seen[UNET_FLOPS], seen[UNET_STEPS])
    if seen[DECODER_FLOPS]:  # preview-decode rows: the VAE decoders' FLOPs
        out["decoder_flops"] = _per_run(seen[DECODER_FLOPS], runs)
    if seen[OUTPUT_PSNR]:  # deepcache rows (against the uncached output), tiny preview rows (against the final)
        out["output_psnr_db"] = round(seen[OUTPUT_PSNR] / runs, 2)
    return out


def same_work(a: dict, b: dict) -> bool:
    """Whether two rows' `observed` ran the same networks the same number of times, and the same steps
    (caches and compiled-graph calls are how a row runs its work, not which work: not compared)."""
    return a["networks"] == b["networks"] and a["denoising_steps"] == b["denoising_steps"] and \
        a.get("training_samples") == b.get("training_samples") and \
        all(a.get(key) == b.get(key) for key in ("unet_full_steps", "unet_latent_pixels", "unet_flops", "decoder_flops"))
