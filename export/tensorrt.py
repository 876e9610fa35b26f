"""ONNX -> TensorRT engines: build, cache, refit, run. Written against NVIDIA's TensorRT 10 Python API.

TensorRT cannot be installed on the development machines (its wheels come from NVIDIA's own
index), so this module imports `tensorrt` only inside the functions that need it and keeps every
decision that does not need it (profiles, cache keys, cache validity, the refit weight map) in
plain functions that are tested without it.

Lifecycle (as TensorRT's demo/Diffusion): build (`build_engine`: parse ONNX, optimisation profiles,
precision flags, persisted timing cache, progress) -> cache (`cached_engine`: keyed by everything
that changes the plan; atomic writes; a corrupt or mismatched plan is rebuilt with a warning) ->
load (`TensorRTEngine`: deserialize, execution context) -> run (`set_input_shape`,
`set_tensor_address`, `execute_async_v3` on a stream; CUDA-graph capture for static shapes).

The harmonizer is one refittable UNet engine: c = 0 (the base UNet, for remove/complete) and
c = 1 (LoRA fused) differ only in the LoRA-touched weights, which `trt.Refitter` swaps in place
instead of a second UNet being held in memory.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from editrt.errors import EngineError
from editrt.export.specs import NetworkSpec
from editrt.models.files import write_bytes_atomic

PRECISIONS = ("fp16", "bf16", "fp8", "fp32")
NOT_INSTALLED = "tensorrt not installed (its wheels come from NVIDIA's own index: pip install 'editrt[tensorrt]')"


def tensorrt_module():
    try:
        import tensorrt
    except ImportError:
        raise EngineError(NOT_INSTALLED) from None
    return tensorrt


# ---------------------------------------------------------------------- what needs no TensorRT
@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"
    optimization_level: int = 3  # TensorRT's builder_optimization_level, 0..5
    refit: bool = False
    static_shapes: dict | None = None  # {axis: size}: one exact profile (for CUDA graphs) instead of ranges

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise EngineError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0 <= self.optimization_level <= 5:
            raise EngineError(f"optimization level: expected 0..5, got {self.optimization_level}")


def profile_shapes(spec: NetworkSpec, options: BuildOptions) -> list[dict[str, tuple]]:
    """Per optimisation profile: input name -> (min shape, opt shape, max shape)."""
    profiles = []
    ranges_list = spec.profiles or ({},)
    if options.static_shapes is not None:
        ranges_list = ({k: (v, v, v) for k, v in options.static_shapes.items()},)
    for ranges in ranges_list:
        dims = [{a: r[i] for a, r in ranges.items()} for i in range(3)]
        for d in dims:
            for name, (base, factor) in spec.derived.items():
                d.setdefault(name, factor * d[base])
        shapes = {}
        for t in spec.inputs:
            missing = [a for a in t.dynamic.values() if a not in dims[0]]
            if missing:
                raise EngineError(f"{spec.name}: no profile range for the dynamic axes {missing} of {t.name!r}")
            shapes[t.name] = tuple(t.shape(d) for d in dims)
        profiles.append(shapes)
    return profiles


def onnx_digest(onnx_path: Path) -> str:
    """SHA-256 over the graph file and its external data files (the weights change the plan too)."""
    h = hashlib.sha256()
    files = [onnx_path] + sorted(onnx_path.parent.glob(onnx_path.name + ".data"))
    for path in files:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_key(spec: NetworkSpec, onnx_sha256: str, options: BuildOptions, trt_version: str, gpu_name: str,
              compute_capability: tuple[int, int]) -> str:
    """Everything that changes a serialized plan: the ONNX file and its data, TensorRT, the GPU,
    precision, profiles and builder flags."""
    ingredients = {
        "network": spec.name, "onnx_sha256": onnx_sha256, "tensorrt": trt_version, "gpu": gpu_name,
        "compute_capability": list(compute_capability), "precision": options.precision,
        "optimization_level": options.optimization_level, "refit": options.refit,
        "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profile_shapes(spec, options)],
    }
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()


def plan_paths(engines_dir: Path, name: str) -> tuple[Path, Path]:
    return engines_dir / f"{name}.plan", engines_dir / f"{name}.plan.json"


def cached_engine(spec: NetworkSpec, engines_dir: Path, key: str, build, deserialize):
    """The deserialized engine for `key`: from the cache when valid, else built (and cached).

    `build()` returns serialized plan bytes; `deserialize(bytes)` returns an engine or None. A plan
    whose recorded key differs, or that does not deserialize, is rebuilt with a warning, never used.
    """
    plan, meta = plan_paths(engines_dir, spec.name)
    if plan.is_file() and meta.is_file():
        try:
            recorded = json.loads(meta.read_text()).get("key")
        except (json.JSONDecodeError, UnicodeDecodeError):
            recorded = None
        if recorded != key:
            warnings.warn(f"{plan}: built for other inputs (ONNX, TensorRT, GPU, precision or profiles); rebuilding", stacklevel=2)
        else:
            engine = deserialize(plan.read_bytes())
            if engine is not None:
                return engine
            warnings.warn(f"{plan}: corrupt or unreadable by this TensorRT; rebuilding", stacklevel=2)
    elif plan.is_file():
        warnings.warn(f"{plan}: has no {meta.name} recording its cache key; rebuilding", stacklevel=2)
    data = build()
    if data is None:
        raise EngineError(f"{spec.name}: TensorRT failed to build the engine")
    engine = deserialize(data)
    if engine is None:
        raise EngineError(f"{spec.name}: TensorRT built a plan it cannot deserialize")
    write_bytes_atomic(plan, bytes(data))
    write_bytes_atomic(meta, json.dumps({"key": key, "network": spec.name, "built": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    return engine


def refit_weight_map(onnx_path: Path, params: dict[str, torch.Tensor]) -> dict[str, dict]:
    """ONNX initializer name -> {"param": UNet parameter, "transposed": bool} for each LoRA-touched weight.

    The exporter may fold a Linear's weight into a transposed MatMul constant with a generated
    name, so initializers are matched by value (exactly W or W^T) in the exported graph.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=True)
    by_shape: dict[tuple, list] = {}
    for init in model.graph.initializer:
        by_shape.setdefault(tuple(init.dims), []).append(init)
    mapping: dict[str, dict] = {}
    for name, tensor in params.items():
        w = tensor.detach().float().cpu().numpy()
        found = None
        for transposed, target in ((False, w), (True, w.T)):
            for init in by_shape.get(target.shape, []):
                if init.name not in mapping and np.array_equal(numpy_helper.to_array(init).astype(np.float32), target):
                    found = (init.name, transposed)
                    break
            if found:
                break
        if found is None:
            raise EngineError(f"{onnx_path}: no initializer holds the LoRA-touched weight {name!r}; re-export the harmonizer")
        mapping[found[0]] = {"param": name, "transposed": found[1]}
    return mapping


# ---------------------------------------------------------------------- what needs TensorRT
def _trt_dtype_to_torch(trt, dtype):
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}[dtype]


def build_engine(spec: NetworkSpec, onnx_path: Path, engines_dir: Path, options: BuildOptions = BuildOptions(),
                 progress: bool = False, log=lambda what: None):
    """Build (or take from the cache) the TensorRT engine of `spec` from its ONNX file."""
    trt = tensorrt_module()
    if not torch.cuda.is_available():
        raise EngineError(f"{spec.name}: TensorRT needs a CUDA GPU")
    logger = trt.Logger(trt.Logger.WARNING)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    key = cache_key(spec, onnx_digest(onnx_path), options, trt.__version__, props.name, (props.major, props.minor))
    timing_path = engines_dir / "timing.cache"
    runtime = trt.Runtime(logger)

    def build():
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"{onnx_path}: TensorRT cannot parse it ({errors})")
        config = builder.create_builder_config()
        config.builder_optimization_level = options.optimization_level
        flags = {"fp16": [trt.BuilderFlag.FP16], "bf16": [trt.BuilderFlag.BF16],
                 "fp8": [trt.BuilderFlag.FP8, trt.BuilderFlag.FP16], "fp32": []}[options.precision]
        for flag in flags + ([trt.BuilderFlag.REFIT] if options.refit else []):
            config.set_flag(flag)
        cache = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        for shapes in profile_shapes(spec, options):
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        if progress:
            config.progress_monitor = _progress_monitor(trt)
        log(f"{spec.name}: building a {options.precision} TensorRT engine (optimization level {options.optimization_level})")
        start = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        log(f"{spec.name}: built in {time.perf_counter() - start:.1f} s")
        write_bytes_atomic(timing_path, bytes(config.get_timing_cache().serialize()))
        return plan

    return cached_engine(spec, engines_dir, key, build, runtime.deserialize_cuda_engine)


def _progress_monitor(trt):
    from tqdm.auto import tqdm

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=False)

        def step_complete(self, phase_name, step):
            self.bars[phase_name].n = step + 1
            self.bars[phase_name].refresh()
            return True  # keep building

        def phase_finish(self, phase_name):
            self.bars.pop(phase_name).close()

    return Monitor()


class TensorRTEngine:
    """A deserialized engine behind the engine interface; optional CUDA-graph replay for static shapes."""

    backend = "tensorrt"

    def __init__(self, spec: NetworkSpec, engine, device):
        trt = tensorrt_module()
        self.spec, self.engine, self.device = spec, engine, torch.device(device)
        self.trt = trt
        self.context = engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if sorted(inputs) != sorted(spec.input_names) or sorted(set(names) - set(inputs)) != sorted(spec.output_names):
            raise EngineError(f"{spec.name}: engine I/O {names} does not match the spec; rebuild it")
        self.dtypes = {n: _trt_dtype_to_torch(trt, engine.get_tensor_dtype(n)) for n in names}
        self.graphs: dict[tuple, tuple] = {}  # static input shapes -> (graph, inputs, outputs)
        self.refitter = None

    def _run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        for name, t in inputs.items():
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        for name, t in outputs.items():
            self.context.set_tensor_address(name, t.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError(f"{self.spec.name}: TensorRT execution failed")

    def _buffers(self, inputs: dict[str, torch.Tensor]):
        ins = {n: t.to(self.device, self.dtypes[n]).contiguous() for n, t in inputs.items()}
        for name, t in ins.items():
            self.context.set_input_shape(name, tuple(t.shape))
        outs = {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device=self.device)
                for n in self.spec.output_names}
        return ins, outs

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        from editrt.runtime.engines import check_inputs

        check_inputs(self.spec, inputs)
        ins, outs = self._buffers(inputs)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._run(ins, outs)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return outs

    def replay(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Like __call__, through a CUDA graph captured once per static input shapes."""
        key = tuple((n, tuple(t.shape)) for n, t in sorted(inputs.items()))
        if key not in self.graphs:
            ins, outs = self._buffers(inputs)
            self._run(ins, outs)  # warm-up outside the capture (TensorRT allocates lazily)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._run(ins, outs)
            self.graphs[key] = (graph, ins, outs)
        graph, ins, outs = self.graphs[key]
        for name, t in inputs.items():
            ins[name].copy_(t)
        graph.replay()
        return outs

    def refit(self, weights: dict[str, np.ndarray]) -> float:
        """Swap named weights in place (refittable engines); returns the seconds it took."""
        start = time.perf_counter()
        if self.refitter is None:
            self.refitter = self.trt.Refitter(self.engine, self.trt.Logger(self.trt.Logger.WARNING))
        for name, array in weights.items():
            if not self.refitter.set_named_weights(name, self.trt.Weights(np.ascontiguousarray(array))):
                raise EngineError(f"{self.spec.name}: cannot refit weight {name!r}")
        if not self.refitter.refit_cuda_engine():
            raise EngineError(f"{self.spec.name}: refit failed")
        self.graphs.clear()  # captured graphs may hold the old weights' addresses: recapture
        return time.perf_counter() - start


class RefittableHarmonizer:
    """One refittable UNet engine serving both c = 0 (inpaint_unet) and c = 1 (harmonizer_unet).

    `weights_by_scale[c]` are the LoRA-touched initializers at scale c (named by `refit_weight_map`);
    a call at another scale than the engine holds refits first and records how long it took.
    """

    def __init__(self, engine: TensorRTEngine, weights_by_scale: dict[float, dict[str, np.ndarray]], scale: float = 1.0):
        self.engine, self.weights, self.scale = engine, weights_by_scale, scale
        self.refit_seconds: list[float] = []

    def switch(self, scale: float) -> None:
        if scale != self.scale:
            if scale not in self.weights:
                raise EngineError(f"harmonizer: no weights prepared for LoRA scale {scale:g}")
            self.refit_seconds.append(self.engine.refit(self.weights[scale]))
            self.scale = scale


class HarmonizerAtScale:
    """The engine interface onto a RefittableHarmonizer at one LoRA scale."""

    backend = "tensorrt"

    def __init__(self, shared: RefittableHarmonizer, scale: float, spec: NetworkSpec):
        self.shared, self.scale, self.spec = shared, scale, spec

    def set_lora_scale(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        self.shared.switch(self.scale)
        return self.shared.engine(**inputs)


def harmonizer_weights(weights_root: Path, refit_map: dict[str, dict], scales=(0.0, 1.0)) -> dict[float, dict[str, np.ndarray]]:
    """The refit weights at each scale, computed from the weights directory as FusedLoRA computes them."""
    from editrt.models.components import WeightsLayout
    from editrt.models.inpaint import load_unet
    from editrt.models.lora import FusedLoRA, load_lora

    layout = WeightsLayout(weights_root)
    unet = load_unet(layout.unet)
    lora = FusedLoRA(unet, load_lora(layout.harmonizer_lora), source=str(layout.harmonizer_lora))
    out = {}
    for scale in scales:
        fused = lora.fused_weights(scale)
        out[scale] = {init: (fused[m["param"]].T if m["transposed"] else fused[m["param"]]).numpy()
                      for init, m in refit_map.items()}
    return out


def load_engine(spec: NetworkSpec, engines_dir: Path, device, options: BuildOptions | None = None) -> TensorRTEngine:
    """The TensorRT engine of `spec` from `engines_dir` (built from its ONNX file on first use)."""
    onnx_path = engines_dir / f"{spec.name}.onnx"
    if not onnx_path.is_file():
        raise EngineError(f"{onnx_path}: missing; export it with `editrt export --component {spec.name}`")
    engine = build_engine(spec, onnx_path, engines_dir, options or BuildOptions(refit=spec.refittable))
    return TensorRTEngine(spec, engine, device)
