"""The benchmark case registry: backends, cases, and the shared context cases are built from.

A **case** is one component at one shape (`unet-inpaint-b1`, `sam-mask-decoder-grid256`, ...).
It maps each backend it supports to a **builder**: a function, called only when that row runs,
that loads what it needs and returns a `Run` (the call to time and the inputs to rotate through).
Each (case, backend) pair becomes one row of the results; within a case, every row is compared to
the row of the case's `baseline` backend (PyTorch eager for our components, the peer library where
a peer computes the same thing).

Extending the suite:

* a new row (component): write a builder and add a `Case` to an area module's `*_cases(ctx)`
  function (e.g. `reposition_cases.py`); a new area is one more entry in `suite.CASE_PROVIDERS`;
* a new backend for a component: add `"onnxruntime": build_unet_ort` to that case's `runners`
  (the backend must be listed in `BACKENDS`, which says what it needs to be available);
* a planned backend with no runner yet is declared with `None`: its row is printed as skipped,
  with the backend's own reason when it is absent ("tensorrt not installed").

A builder's `Run` names the engines / modules its call runs (`parts`): the row's `compiled` column is
read from them; `cuda_graph`, `kernels` and the work (`observed`: network calls, steps, cache hits) are
observed while the row runs (bench/observe.py, bench/work.py). A peer's builder names its networks
(`Run.networks`) as our engines are named, so the suite can hold its work equal to ours. Our torch
backends load their pipeline through `BenchContext.torch_pipeline(backend)`, whose from_pretrained
options (`pipeline_options`) are the one place that says what each backend asks for.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# ---------------------------------------------------------------------- backends
@dataclass(frozen=True)
class Backend:
    name: str
    peer: bool = False  # another library computing the same thing, not editrt
    module: str | None = None  # the Python package it needs
    cuda_only: str | None = None  # why it is not timed on CPU, if it is not
    compiles: bool = False  # torch.compile: skipped with --quick on a CPU (see `unavailable`)

    def unavailable(self, device: torch.device, quick: bool = False) -> str | None:
        """Why this backend cannot run here, or None."""
        if self.module and importlib.util.find_spec(self.module) is None:
            return f"{self.module} not installed"
        if self.cuda_only and device.type != "cuda":
            return self.cuda_only
        if self.compiles and quick and device.type != "cuda":
            return COMPILE_SKIPPED
        return None


COMPILE_SKIPPED = ("torch.compile is not run with --quick on a CPU (inductor compiles C++ for minutes on a small "
                   "CPU); measured without --quick and on CUDA")
GRAPHS_NEED_CUDA = "CUDA graphs need CUDA"

# What each of our backends runs. The `cuda_graph`, `compiled` and `kernels` columns of a row say what
# really ran (bench/observe.py); suite.check_claims fails a row whose observations contradict its backend.
BACKENDS = {b.name: b for b in [
    # ours
    Backend("torch-eager"),  # plain diffusers / segment-anything modules, eager loop, no editrt kernel
    Backend("torch+kvcache"),  # + per-request cross-attention K/V caches, still eager, no editrt kernel
    Backend("torch+cudagraph", cuda_only=GRAPHS_NEED_CUDA),  # + whole denoising loops replayed as CUDA graphs
    # + editrt's Triton kernels (fused dual attention, SLIC assignment) where they apply; a row where none
    # launched is skipped (on a CPU the pipelines run the kernels' PyTorch references)
    Backend("torch+kernels", module="triton"),
    Backend("torch+compile", compiles=True),  # from_pretrained(compile=True): torch.compile on the networks
    Backend("onnxruntime", module="onnxruntime"),
    Backend("tensorrt", module="tensorrt", cuda_only="TensorRT needs CUDA"),
    # peers
    Backend("diffusers", peer=True, module="diffusers"),
    Backend("diffusers+compile", peer=True, module="diffusers", compiles=True),  # torch.compile(pipe.unet)
    Backend("segment-anything", peer=True, module="segment_anything"),
    # SamPredictor with torch.compile(sam.image_encoder)
    Backend("segment-anything+compile", peer=True, module="segment_anything", compiles=True),
    # transformers' pipeline("depth-estimation") for depth; VitMatteImageProcessor + VitMatteForImageMatting for matting
    Backend("transformers", peer=True, module="transformers"),
    Backend("transformers+compile", peer=True, module="transformers", compiles=True),  # the same, model torch.compile'd
    Backend("sdpa", peer=True),  # two scaled_dot_product_attention calls, heads concatenated, one stacked GEMM
    Backend("reference", peer=True),  # the pure-PyTorch reference beside a kernel
    # the partition clean-up rows (bench/cleanup_cases.py): per-element scipy.ndimage vs the native op
    Backend("scipy", peer=True, module="scipy"),
    Backend("native-cpu"),  # editrt_native op on CPU tensors (launches cleanup_labels_cpu)
    Backend("native-cuda", cuda_only="the native CUDA op needs CUDA"),  # (launches cleanup_labels_cuda)
]}

# Rows of these backends run with editrt's kernels switched off and must launch none.
PLAIN_BACKENDS = ("torch-eager", "torch+kvcache", "torch+cudagraph")
# Rows of these backends must not replay a CUDA graph.
NO_GRAPH_BACKENDS = ("torch-eager", "torch+kvcache")

# Declared on every network case: a skipped row until export/ builds TensorRT engines.
PLANNED_ENGINES: dict[str, None] = {"tensorrt": None}


# ---------------------------------------------------------------------- cases
@dataclass
class Run:
    """What a builder returns: one call to time and the inputs it rotates through."""

    call: Callable[[Any], Any]  # one timed run on one input
    inputs: list  # pre-built, random or real data, never zeros; at least 2 where a cache could hit
    dtype: str  # the precision that really ran (a peer may differ from ours: recorded as is)
    check: Callable[[Any], None] | None = None  # validates one output: proves the work really happened
    flops: int | None = None  # per call, for TFLOP/s
    bytes: int | None = None  # per call, for GB/s (memory-bound components)
    close: Callable[[], None] | None = None  # restores shared state (e.g. LoRA scale) after timing
    parts: list = field(default_factory=list)  # the engines / nn.Modules the call runs: `compiled` reads them
    # modules whose calls the row's `observed` counts under these names (a peer's networks, named as our engines
    # are: "inpaint_unet", "sam_image_encoder", ...); our engines are counted without being listed (bench/work.py)
    networks: dict = field(default_factory=dict)


Builder = Callable[[], Run]


class Skip(Exception):
    """Raised by a builder when its row cannot run here: the row is printed as skipped with the reason."""


@dataclass
class Case:
    component: str  # row name; lowercase words joined by '-', families share a prefix ("unet-", "sam-")
    shape: str  # the input shapes, as people read them
    runners: dict[str, Builder | None]  # backend -> builder (None: declared, not built yet -> skipped row)
    baseline: str = "torch-eager"  # the backend every other row of this case is compared to
    steps: int | None = None  # denoising steps, for whole passes
    heavy: bool = False  # a whole pipeline: fewer repeats
    about: str = ""  # one line: what exactly is timed
    # backend -> why that row's observed networks or steps legitimately differ from its baseline's; a row not
    # named here fails when they differ (bench/suite.py check_work), and fails when named but they do not
    work_differs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        unknown = [b for b in self.runners if b not in BACKENDS]
        if unknown:
            raise ValueError(f"case {self.component}: unknown backends {unknown}; known: {sorted(BACKENDS)}")
        if self.baseline not in self.runners:
            raise ValueError(f"case {self.component}: baseline {self.baseline!r} is not among its runners")
        if self.baseline in self.work_differs or not set(self.work_differs) <= set(self.runners):
            raise ValueError(f"case {self.component}: work_differs names {sorted(self.work_differs)}; expected "
                             f"backends of its runners other than the baseline {self.baseline!r}")

    def backends(self) -> list[str]:
        """Baseline first, then the others in declaration order."""
        return [self.baseline] + [b for b in self.runners if b != self.baseline]


# ---------------------------------------------------------------------- selection (--only)
def matches(component: str, pattern: str) -> bool:
    """`--only` semantics: the exact name, a glob (`unet-*`), or a prefix ending at a '-' (`sam`)."""
    return component == pattern or fnmatch.fnmatchcase(component, pattern) or component.startswith(pattern + "-")


@dataclass
class Selection:
    patterns: list[str] = field(default_factory=list)  # empty: everything

    def wants(self, component: str) -> bool:
        return not self.patterns or any(matches(component, p) for p in self.patterns)

    def may_want_family(self, prefix: str) -> bool:
        """Cheap pre-check before building a family of cases whose names start with `prefix`."""
        return not self.patterns or any(
            matches(prefix, p) or p.startswith(prefix) or fnmatch.fnmatchcase(prefix + "-x", p) for p in self.patterns
        )


# ---------------------------------------------------------------------- context
def _photo() -> np.ndarray:
    """The bundled real photograph (Chelsea the cat, 451x300), uint8 RGB."""
    from importlib import resources

    from PIL import Image

    with resources.files("editrt").joinpath("assets", "chelsea.png").open("rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


class BenchContext:
    """What cases share: options, the weights, lazily loaded models, and input makers.

    Models load on first use, so `--only` runs load only what they time.
    """

    def __init__(self, weights: Path, device: torch.device, dtype: torch.dtype, config: str, quick: bool,
                 steps: int, selection: Selection, log: Callable[[str], None] = lambda what: None):
        self.weights, self.device, self.dtype = Path(weights), torch.device(device), dtype
        self.config, self.quick, self.steps, self.selection, self.log = config, quick, steps, selection, log
        self.n_inputs = 3  # rotating input sets per row
        self.notes: list[str] = []  # why some rows are absent (printed under the table)
        self._generator = torch.Generator("cpu").manual_seed(1234)
        self._memo: dict[str, Any] = {}

    def memo(self, key: str, make: Callable[[], Any]) -> Any:
        """`make()` once per run: inputs and models that several rows share (a peer and ours on the same data).
        A failure is kept too: every row that needs it fails with it at once, instead of repeating minutes
        of work (an ONNX export) only to fail the same way."""
        if key not in self._memo:
            try:
                self._memo[key] = (True, make())
            except Exception as e:  # Skip included: re-raised below for every row that needs it
                self._memo[key] = (False, e)
        ok, value = self._memo[key]
        if not ok:
            raise value
        return value

    # cheap facts read from the weights' JSON files (no model load)
    def read_json(self, *parts) -> dict:
        return json.loads(self.weights.joinpath(*parts).read_text())

    @cached_property
    def unet_config(self) -> dict:
        return self.read_json("inpaint", "unet", "config.json")

    @cached_property
    def vae_config(self) -> dict:
        return self.read_json("inpaint", "vae", "config.json")

    @cached_property
    def sam_architecture(self) -> dict:
        from editrt.models.sam import sam_architecture

        return sam_architecture(self.read_json("sam", "config.json"))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def resolution(self) -> int:
        """The processing side (square images): the UNet's native size, as the pipeline defaults to."""
        return self.unet_config["sample_size"] * self.vae_scale_factor

    # models
    def pipeline_options(self, backend: str, editor: str = "reposition") -> dict:
        """from_pretrained options of our torch backends (see BACKENDS): what each row asks for.

        The rows' `cuda_graph` / `kernels` / `compiled` columns then say what really ran.
        """
        on_cuda = self.device.type == "cuda"
        options = {
            "torch-eager": dict(optimize=False, cuda_graphs=False),
            "torch+kvcache": dict(optimize=True, cuda_graphs=False),
            "torch+cudagraph": dict(optimize=True, cuda_graphs=True),  # an error where graphs are unsupported
            "torch+kernels": dict(optimize=True, cuda_graphs=None),  # None: graphs where supported
            "torch+compile": dict(optimize=True, cuda_graphs=None, compile=True),
        }[backend]
        if editor == "elements":  # the fused Triton dual attention: only the kernels row (and compile's default)
            options["kernels"] = {"torch+kernels": on_cuda, "torch+compile": None}.get(backend, False)
        return options

    def torch_pipeline(self, backend: str, editor: str = "reposition"):
        """The pipeline a torch backend's row runs, loaded once per distinct set of options."""
        options = self.pipeline_options(backend, editor)
        effective = dict(options)
        if self.device.type != "cuda" and effective.get("cuda_graphs") is None:
            effective["cuda_graphs"] = False  # the same pipeline on a CPU: no graphs either way
        key = f"{editor} pipeline {sorted(effective.items())}"
        return self.memo(key, lambda: self._load_pipeline(editor, options))

    def _load_pipeline(self, editor: str, options: dict):
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        if editor == "reposition":
            from editrt.runtime.reposition import RepositionPipeline as Pipeline
        else:
            from editrt.runtime.elements_pipeline import ElementsPipeline as Pipeline
        self.log(f"loading the {editor} pipeline from {self.weights} ({', '.join(f'{k}={v}' for k, v in options.items())})")
        bars = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
        for module, _ in bars:
            module.disable_progress_bar()  # their loading bars would cut through ours
        try:
            return Pipeline.from_pretrained(self.weights, device=self.device, dtype=self.dtype, **options)
        finally:
            for module, was_on in bars:
                if was_on:
                    module.enable_progress_bar()

    @property
    def pipeline(self):
        """Plain modules, eager loops: the PyTorch eager baseline (and the modules the component rows time)."""
        return self.torch_pipeline("torch-eager")

    def onnx_dir(self) -> Path:
        """ONNX files of these weights (exported once, cached by the weights' fingerprint)."""
        def export():
            from editrt.export.components import export_components, weights_fingerprint
            from editrt.weights import cache_dir

            out = cache_dir() / "engines" / weights_fingerprint(self.weights)[:16]
            if not (out / "manifest.json").is_file():
                self.log(f"exporting ONNX engines to {out}")
                export_components(self.weights, "all", out, check=True)
            return out

        return self.memo("onnx dir", export)

    def check_onnxruntime(self) -> None:
        import onnxruntime as ort

        if self.device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip("onnxruntime has no CUDAExecutionProvider here (pip install 'editrt[gpu]')")
        if self.dtype != torch.float32:
            raise Skip(f"the ONNX graphs are fp32; this run is {dtype_name(self.dtype)}")

    @cached_property
    def ort_pipeline(self):
        from editrt.runtime.reposition import RepositionPipeline

        self.check_onnxruntime()
        return RepositionPipeline.from_pretrained(self.weights, device=self.device, dtype=self.dtype,
                                                  backend="onnxruntime", engines=self.onnx_dir())

    def reposition(self, backend: str):
        """The repositioning pipeline of one of our backends."""
        return self.ort_pipeline if backend == "onnxruntime" else self.torch_pipeline(backend)

    # inputs
    def randn(self, *shape, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Standard normal on the bench device (drawn on the CPU generator: the same on every device)."""
        return torch.randn(*shape, generator=self._generator).to(self.device, dtype or self.dtype)

    def photos(self, size: int, n: int | None = None) -> list[np.ndarray]:
        """`n` different square crops of the real photograph, resized to size x size (uint8 RGB)."""
        from PIL import Image

        photo = _photo()
        h, w = photo.shape[:2]
        side = min(h, w) * 9 // 10
        out = []
        for i in range(n or self.n_inputs):
            x0 = (w - side) * i // max(1, (n or self.n_inputs) - 1)  # crops slide left to right
            y0 = (h - side) * (i % 2)
            crop = photo[y0:y0 + side, x0:x0 + side]
            out.append(np.array(Image.fromarray(crop).resize((size, size), Image.LANCZOS)))  # writable
        return out

    def subject_masks(self, size: int, n: int | None = None) -> list[np.ndarray]:
        """`n` different non-empty elliptical subject masks (bool, size x size), inside the central area."""
        rng = np.random.default_rng(7)
        yy, xx = np.mgrid[:size, :size]
        out = []
        for _ in range(n or self.n_inputs):
            cy, cx = rng.uniform(0.35, 0.6, 2) * size
            ry, rx = rng.uniform(0.1, 0.2, 2) * size
            out.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0)
        return out


def uncached(pipe, call):
    """`call` with the pipeline's SAM embedding cache emptied first: every call computes its photo's embedding,
    as SamPredictor.set_image does. Rotating photos alone would not do it: the cache holds every bench photo
    after the warm-up, and builders that pick clicks segment the photos first."""
    def run(x):
        pipe.segmenter.cache.clear()
        return call(x)
    return run


def pipeline_parts(pipe) -> list:
    """The engines a pipeline runs: what a row's `compiled` column inspects (bench/observe.compiled_parts)."""
    return list(pipe.engines.values())
