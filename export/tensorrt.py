"""ONNX -> TensorRT engines: build, cache, refit, run. Written against NVIDIA's TensorRT Python API, 10.x and 11.x.

TensorRT cannot be installed on the development machines (its wheels come from NVIDIA's own
index), so this module imports `tensorrt` only inside the functions that need it and keeps every
decision that does not need it in plain functions tested without it: the supported versions, how
the network is typed, the optimisation profiles (shapes and shape-tensor values), cache keys and
validity, the refit weight map and the refit weights, the order in which a run binds its inputs.

Supported: TensorRT >= 10.0, < 12 (SUPPORTED_TENSORRT). Networks are built strongly typed
(NetworkDefinitionCreationFlag.STRONGLY_TYPED, 10.0+): each layer runs in the type the ONNX graph
says, so an fp16 engine is built from an fp16 export (`editrt export --precision fp16`). TensorRT 11
removed the weak-typing precision flags (BuilderFlag.FP16 / BF16 / FP8); where a TensorRT 10 still
has them, an fp32 graph may be built with them (bf16, fp8 and fp16 from an fp32 graph, deprecated),
and nowhere else (`network_typing`).

Lifecycle (as TensorRT's demo/Diffusion): build (`build_engine`: parse ONNX, optimisation profiles,
persisted timing cache, progress) -> cache (`cached_engine`: keyed by everything that changes the
plan; atomic writes; a corrupt or mismatched plan is rebuilt with a warning) -> load
(`TensorRTEngine`: deserialize, execution context) -> run (`bind_inputs`: input shapes, then the
host addresses of shape-tensor inputs, then output shapes; `execute_async_v3` on the engine's stream).

Shape tensors. SAM's mask decoder takes `orig_im_size`, whose values set the masks' size: TensorRT
calls it a shape tensor. The profile gives it min/opt/max values (`set_shape_input`, from the
spec's value_ranges), or the build fails ("optimization profile is missing values for shape
input"); at run time it lives in host memory and its address is set before output shapes are read.

The harmonizer is one refittable UNet engine: c = 0 (the base UNet, for remove/complete) and
c = 1 (LoRA fused) differ only in the LoRA-touched weights, which `trt.Refitter` swaps in place
instead of a second UNet being held in memory. The weights of each scale are prepared once as
contiguous device tensors in the graph's layout and dtype (`prepare_refit_weights`), held for the
engine's life (TensorRT reads them during refit_cuda_engine), and handed over by device address.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from editrt.errors import EngineError
from editrt.export.specs import NetworkSpec, check_inputs
from editrt.models.files import write_bytes_atomic
from editrt.models.lora import LoRAScale

cuda = torch.cuda  # the CUDA API TensorRTEngine runs on; the CPU tests put a recording fake here

PRECISIONS = ("fp16", "bf16", "fp8", "fp32")
SUPPORTED_TENSORRT = ((10, 0), (12, 0))  # [lowest, first unsupported): setup.py's tensorrt>=10.0,<12
NOT_INSTALLED = "tensorrt not installed (its wheels come from NVIDIA's own index: pip install 'editrt[tensorrt]')"
# weak-typing builder flags per precision, for an fp32 graph (TensorRT 10 only: 11 removed them)
WEAK_TYPING_FLAGS = {"fp16": ("FP16",), "bf16": ("BF16",), "fp8": ("FP8", "FP16"), "fp32": ()}


def tensorrt_module():
    try:
        import tensorrt
    except ImportError:
        raise EngineError(NOT_INSTALLED) from None
    check_version(tensorrt.__version__)
    return tensorrt


def check_version(version: str) -> tuple[int, int]:
    """(major, minor) of a supported TensorRT; EngineError naming the supported range otherwise."""
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        raise EngineError(f"tensorrt {version!r}: cannot read its version") from None
    (lo, hi) = SUPPORTED_TENSORRT
    if not lo <= (major, minor) < hi:
        raise EngineError(f"tensorrt {version}: editrt supports TensorRT {lo[0]}.{lo[1]} up to, not including, {hi[0]}.{hi[1]}")
    return major, minor


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


@dataclass(frozen=True)
class NetworkTyping:
    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED
    precision_flags: tuple[str, ...]  # BuilderFlag names (weak typing only)


def network_typing(precision: str, graph_precision: str, builder_flags) -> NetworkTyping:
    """How to build `precision` from a graph exported at `graph_precision`, given the BuilderFlag names
    this TensorRT has. Strongly typed whenever the graph already is in that precision."""
    if precision == graph_precision:
        return NetworkTyping(True, ())
    if graph_precision != "fp32":
        raise EngineError(f"precision {precision}: the ONNX graph is {graph_precision}; a strongly typed engine runs "
                          f"the graph's types (export it with --precision {precision} or build {graph_precision})")
    flags = WEAK_TYPING_FLAGS[precision]
    missing = [f for f in flags if f not in set(builder_flags)]
    if missing:
        hint = "export the ONNX graph with --precision fp16" if precision == "fp16" else \
            "editrt exports fp32 and fp16 graphs only"
        raise EngineError(f"precision {precision}: this TensorRT builds strongly typed networks only "
                          f"(no BuilderFlag.{missing[0]}); {hint}")
    return NetworkTyping(False, flags)


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


def add_profiles(builder, config, spec: NetworkSpec, options: BuildOptions, shape_inputs) -> int:
    """Create and add every optimisation profile of `spec`: `set_shape` for execution inputs,
    `set_shape_input` (min/opt/max values) for the network's shape-tensor inputs. Returns how many."""
    shape_inputs = set(shape_inputs)
    unknown = sorted(shape_inputs - set(spec.value_ranges))
    if unknown:
        raise EngineError(f"{spec.name}: TensorRT treats input {unknown[0]!r} as a shape tensor but the spec gives "
                          "no value range for it (NetworkSpec.value_ranges)")
    profiles = profile_shapes(spec, options)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            if name not in shape_inputs:
                profile.set_shape(name, lo, opt, hi)
        for name in sorted(shape_inputs):
            lo, opt, hi = spec.value_ranges[name]
            profile.set_shape_input(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    return len(profiles)


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
    precision, profiles (shapes and shape-tensor values) and builder flags."""
    ingredients = {
        "network": spec.name, "onnx_sha256": onnx_sha256, "tensorrt": trt_version, "gpu": gpu_name,
        "compute_capability": list(compute_capability), "precision": options.precision,
        "optimization_level": options.optimization_level, "refit": options.refit,
        "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profile_shapes(spec, options)],
        "values": {k: [list(v) for v in r] for k, r in sorted(spec.value_ranges.items())},
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


def graph_precision_of(onnx_path: Path) -> str:
    """The precision `editrt export` recorded for this graph in the manifest beside it (fp32 if none)."""
    manifest = onnx_path.parent / "manifest.json"
    try:
        networks = json.loads(manifest.read_text()).get("networks", {})
    except FileNotFoundError:
        return "fp32"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{manifest}: not valid JSON ({e})") from None
    return next((n.get("precision", "fp32") for n in networks.values() if n.get("onnx") == onnx_path.name), "fp32")


# ---------------------------------------------------------------------- refit weights (torch only)
def refit_weight_map(onnx_path: Path, params: dict[str, torch.Tensor]) -> dict[str, dict]:
    """ONNX initializer name -> {"param", "transposed", "dtype"} for each LoRA-touched weight.

    The exporter may fold a Linear's weight into a transposed MatMul constant with a generated
    name, so initializers are matched by value: exactly W or W^T as the graph holds it (fp16:
    as to_fp16 converted it, tiny magnitudes clamped, see export/onnx.fp16_as_exported).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from editrt.export.onnx import fp16_as_exported

    model = onnx.load(str(onnx_path), load_external_data=True)
    by_shape: dict[tuple, list] = {}
    for init in model.graph.initializer:
        by_shape.setdefault(tuple(init.dims), []).append(init)
    mapping: dict[str, dict] = {}
    for name, tensor in params.items():
        w = tensor.detach().float().cpu()
        found = None
        for transposed, target in ((False, w), (True, w.T)):
            for init in by_shape.get(tuple(target.shape), []):
                value = numpy_helper.to_array(init)
                expected = fp16_as_exported(target).numpy() if value.dtype == np.float16 else \
                    target.numpy().astype(value.dtype)
                if init.name not in mapping and np.array_equal(value, expected):
                    found = (init.name, transposed, str(value.dtype))
                    break
            if found:
                break
        if found is None:
            raise EngineError(f"{onnx_path}: no initializer holds the LoRA-touched weight {name!r}; re-export the harmonizer")
        mapping[found[0]] = {"param": name, "transposed": found[1], "dtype": found[2]}
    return mapping


def prepare_refit_weights(refit_map: dict[str, dict], weights_by_scale: dict[float, dict[str, torch.Tensor]],
                          device) -> dict[float, dict[str, torch.Tensor]]:
    """Per scale: initializer name -> a contiguous tensor on `device` in the initializer's layout and dtype.

    Made once per engine (a transposed weight is laid out once here, not at every refit) and kept
    for the engine's life: TensorRT reads the memory during refit_cuda_engine. fp16 weights are
    converted as the exporter converted the graph (fp16_as_exported), so a refit at the exported
    scale puts back exactly the exported weights.
    """
    from editrt.export.onnx import fp16_as_exported

    out = {}
    for scale, weights in weights_by_scale.items():
        out[scale] = {}
        for init, m in refit_map.items():
            w = weights[m["param"]].detach()
            w = w.t() if m["transposed"] else w
            dtype = getattr(torch, m.get("dtype", "float32"))
            w = fp16_as_exported(w.to(device)) if dtype == torch.float16 else w.to(device=device, dtype=dtype)
            out[scale][init] = w.contiguous()
    return out


def harmonizer_weights(weights_root: Path, refit_map: dict[str, dict], scales=(0.0, 1.0), device="cuda"
                       ) -> dict[float, dict[str, torch.Tensor]]:
    """The refit weights at each scale, fused from the weights directory as FusedLoRA fuses them."""
    from editrt.models.components import WeightsLayout
    from editrt.models.inpaint import load_unet
    from editrt.models.lora import FusedLoRA, load_harmonizer_lora

    layout = WeightsLayout(weights_root)
    unet = load_unet(layout.unet)
    # no LoRA file: no layers, so every scale is the base UNet (warned once, as the torch backend does)
    lora = FusedLoRA(unet, load_harmonizer_lora(layout.harmonizer_lora), source=str(layout.harmonizer_lora))
    return prepare_refit_weights(refit_map, {s: lora.fused_weights(s) for s in scales}, device)


def refit_engine(trt, refitter, weights: dict[str, torch.Tensor], synchronize) -> None:
    """Swap `weights` into the engine behind `refitter`, by address (device or host).

    `synchronize()` first: a run still in flight on the engine's stream must not read weights
    half-swapped. The tensors stay owned by the caller, alive past refit_cuda_engine.
    """
    synchronize()
    for name, t in weights.items():
        if not t.is_contiguous():
            raise EngineError(f"refit weight {name!r}: not contiguous (prepare it with prepare_refit_weights)")
        location = trt.TensorLocation.DEVICE if t.is_cuda else trt.TensorLocation.HOST
        if not refitter.set_named_weights(name, trt.Weights(_trt_dtype(trt, t.dtype), t.data_ptr(), t.numel()), location):
            raise EngineError(f"cannot refit weight {name!r} (not a refittable weight of this engine, or another shape/dtype)")
    if not refitter.refit_cuda_engine():
        raise EngineError("TensorRT refit failed")


# ---------------------------------------------------------------------- binding a run
def bind_inputs(context, inputs: dict[str, torch.Tensor], shape_inputs, output_names) -> dict[str, tuple]:
    """Bind one run's inputs to an execution context; returns the output shapes.

    Order matters: execution inputs' shapes first, then the host addresses of shape-tensor inputs
    (their values set output shapes), and only then the output shapes are read.
    """
    shape_inputs = set(shape_inputs)
    for name, t in inputs.items():
        if name in shape_inputs:
            if t.device.type != "cpu":
                raise EngineError(f"shape-tensor input {name!r}: must be in host memory")
        else:
            context.set_input_shape(name, tuple(t.shape))
    for name, t in inputs.items():
        context.set_tensor_address(name, t.data_ptr())
    shapes = {n: tuple(context.get_tensor_shape(n)) for n in output_names}
    unknown = [n for n, s in shapes.items() if any(d < 0 for d in s)]
    if unknown:
        raise EngineError(f"TensorRT cannot infer the shape of output {unknown[0]!r} from these inputs")
    return shapes


# ---------------------------------------------------------------------- what needs TensorRT
def _trt_dtype_to_torch(trt, dtype):
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}[dtype]


def _trt_dtype(trt, dtype: torch.dtype):
    return {torch.float32: trt.float32, torch.float16: trt.float16, torch.bfloat16: trt.bfloat16}[dtype]


def use_timing_cache(config, timing_path: Path) -> None:
    """Give the builder config the timing cache saved at `timing_path`, or a fresh one.

    A cache recorded on another GPU or TensorRT version is refused by set_timing_cache (it returns
    False and the config keeps no cache); the build then starts from an empty cache, with a warning,
    and its timings replace the foreign file when the build saves its cache.
    """
    blob = timing_path.read_bytes() if timing_path.is_file() else b""
    if blob and config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False):
        return
    if blob:
        warnings.warn(f"{timing_path}: a timing cache from another GPU or TensorRT version; building with a fresh "
                      "one (it replaces this file)", stacklevel=2)
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise EngineError("TensorRT refused an empty timing cache")


def save_timing_cache(config, timing_path: Path) -> None:
    """Write the config's timing cache (what this build measured, merged with what it loaded)."""
    cache = config.get_timing_cache()
    if cache is None:  # no cache attached: nothing was recorded to keep
        warnings.warn(f"{timing_path}: the build kept no timing cache; the next build times every tactic again",
                      stacklevel=2)
        return
    write_bytes_atomic(timing_path, bytes(cache.serialize()))


def build_engine(spec: NetworkSpec, onnx_path: Path, engines_dir: Path, options: BuildOptions = BuildOptions(),
                 progress: bool = False, log=lambda what: None, graph_precision: str | None = None):
    """Build (or take from the cache) the TensorRT engine of `spec` from its ONNX file.

    `graph_precision`: the precision the graph was exported at (default: what the manifest says).
    """
    trt = tensorrt_module()
    if not torch.cuda.is_available():
        raise EngineError(f"{spec.name}: TensorRT needs a CUDA GPU")
    typing = network_typing(options.precision, graph_precision or graph_precision_of(onnx_path),
                            trt.BuilderFlag.__members__)
    logger = trt.Logger(trt.Logger.WARNING)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    key = cache_key(spec, onnx_digest(onnx_path), options, trt.__version__, props.name, (props.major, props.minor))
    timing_path = engines_dir / "timing.cache"
    runtime = trt.Runtime(logger)

    def build():
        builder = trt.Builder(logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typing.strongly_typed else 0
        network = builder.create_network(flags)  # explicit batch is the only mode since TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"{onnx_path}: TensorRT cannot parse it ({errors})")
        config = builder.create_builder_config()
        config.builder_optimization_level = options.optimization_level
        for flag in typing.precision_flags + (("REFIT",) if options.refit else ()):
            config.set_flag(getattr(trt.BuilderFlag, flag))
        use_timing_cache(config, timing_path)
        network_inputs = [network.get_input(i) for i in range(network.num_inputs)]
        add_profiles(builder, config, spec, options, [t.name for t in network_inputs if t.is_shape_tensor])
        if progress:
            config.progress_monitor = _progress_monitor(trt)
        log(f"{spec.name}: building a {options.precision} TensorRT engine ("
            f"{'strongly typed' if typing.strongly_typed else 'flags ' + '+'.join(typing.precision_flags)}, "
            f"optimization level {options.optimization_level})")
        start = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        log(f"{spec.name}: built in {time.perf_counter() - start:.1f} s")
        save_timing_cache(config, timing_path)
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
    """A deserialized engine behind the runtime's Engine protocol (runtime/engines.py).

    Runs on its own stream, ordered after the caller's current stream and before it again, so it
    is not captured inside the scheduler's whole-loop graphs (supports_cuda_graph = False);
    `replay` is its own CUDA-graph path for static shapes.
    """

    backend = "tensorrt"
    supports_cuda_graph = False
    compiled = False
    lora = None

    def __init__(self, spec: NetworkSpec, engine, device):
        trt = tensorrt_module()
        self.spec, self.engine, self.device = spec, engine, torch.device(device)
        self.trt = trt
        self.context = engine.create_execution_context()
        self.stream = cuda.Stream(self.device)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if sorted(inputs) != sorted(spec.input_names) or sorted(set(names) - set(inputs)) != sorted(spec.output_names):
            raise EngineError(f"{spec.name}: engine I/O {names} does not match the spec; rebuild it")
        self.dtypes = {n: _trt_dtype_to_torch(trt, engine.get_tensor_dtype(n)) for n in names}
        # inputs whose values TensorRT reads on the host to infer shapes (SAM's orig_im_size)
        self.shape_inputs = {n for n in inputs if engine.is_shape_inference_io(n)}
        self.graphs: dict[tuple, tuple] = {}  # static input shapes -> (graph, its context, inputs, outputs)
        self.refitter = None
        self._host_inputs: dict[str, torch.Tensor] = {}  # the last run's shape-tensor values, kept while it may run

    def prepare(self) -> None:
        """Fixed weights: nothing to put in place (the harmonizer's views refit in theirs)."""

    def before_capture(self) -> None:
        """No state a capture could bake in (the engine is never captured by the scheduler)."""

    def _bind(self, context, ins: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bind `ins` to `context`; returns the output tensors it allocated and bound."""
        shapes = bind_inputs(context, ins, self.shape_inputs, self.spec.output_names)
        outs = {n: torch.empty(s, dtype=self.dtypes[n], device=self.device) for n, s in shapes.items()}
        for name, t in outs.items():
            context.set_tensor_address(name, t.data_ptr())
        return outs

    def _execute(self, context) -> None:
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError(f"{self.spec.name}: TensorRT execution failed")

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        check_inputs(self.spec, inputs)
        self.prepare()
        ins = {n: t.to("cpu" if n in self.shape_inputs else self.device, self.dtypes[n]).contiguous()
               for n, t in inputs.items()}
        outs = self._bind(self.context, ins)
        self.stream.wait_stream(cuda.current_stream(self.device))
        self._execute(self.context)
        self._host_inputs = {n: t for n, t in ins.items() if not t.is_cuda}
        cuda.current_stream(self.device).wait_stream(self.stream)
        for t in list(ins.values()) + list(outs.values()):
            if t.is_cuda:
                t.record_stream(self.stream)  # allocated on the caller's stream, used on ours
        return outs

    def replay(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Like __call__, through a CUDA graph captured once per static input shapes.

        Each shape has its own static input buffers (copies, never the caller's tensors: every replay
        copies into them) and its own execution context (a context holds the shapes and scratch memory
        its graph baked in; binding another shape to it would corrupt that graph). The warm-up runs
        after the caller's stream, which produced the inputs. A replay runs on the caller's stream and
        returns the graph's output buffers: valid until this shape's next replay.
        """
        if self.shape_inputs:
            raise EngineError(f"{self.spec.name}: has shape-tensor inputs; a CUDA graph would freeze their values")
        check_inputs(self.spec, inputs)
        key = tuple((n, tuple(t.shape)) for n, t in sorted(inputs.items()))
        if key not in self.graphs:
            context = self.engine.create_execution_context()
            ins = {n: torch.empty(t.shape, dtype=self.dtypes[n], device=self.device) for n, t in inputs.items()}
            for name, t in inputs.items():
                ins[name].copy_(t)  # on the caller's stream
            outs = self._bind(context, ins)
            self.stream.wait_stream(cuda.current_stream(self.device))
            self._execute(context)  # warm-up outside the capture (TensorRT allocates lazily)
            self.stream.synchronize()
            graph = cuda.CUDAGraph()
            with cuda.graph(graph, stream=self.stream):
                self._execute(context)
            self.graphs[key] = (graph, context, ins, outs)
        graph, _, ins, outs = self.graphs[key]
        for name, t in inputs.items():
            ins[name].copy_(t)
        graph.replay()
        return outs

    def refit(self, weights: dict[str, torch.Tensor]) -> float:
        """Swap named weights in place (refittable engines); returns the seconds it took."""
        start = time.perf_counter()
        if self.refitter is None:
            self.refitter = self.trt.Refitter(self.engine, self.trt.Logger(self.trt.Logger.WARNING))
        try:
            refit_engine(self.trt, self.refitter, weights, self.stream.synchronize)
        except EngineError as e:
            raise EngineError(f"{self.spec.name}: {e}") from None
        self.graphs.clear()  # captured graphs may hold the old weights' addresses: recapture
        return time.perf_counter() - start


class RefittableHarmonizer:
    """One refittable UNet engine serving both c = 0 (inpaint_unet) and c = 1 (harmonizer_unet).

    `weights_by_scale[c]`: the LoRA-touched initializers at scale c (prepare_refit_weights), held
    here for the engine's life. A switch to another scale refits and records how long it took.
    """

    def __init__(self, engine, weights_by_scale: dict[float, dict[str, torch.Tensor]], scale: float = 1.0):
        self.engine, self.weights, self.scale = engine, weights_by_scale, scale
        self.refit_seconds: list[float] = []

    def switch(self, scale: float) -> None:
        if scale != self.scale:
            if scale not in self.weights:
                raise EngineError(f"harmonizer: no weights prepared for LoRA scale {scale:g}")
            if self.weights[scale]:  # empty without a LoRA file: both scales are the base weights
                self.refit_seconds.append(self.engine.refit(self.weights[scale]))
            self.scale = scale


class HarmonizerAtScale:
    """The Engine protocol onto a RefittableHarmonizer at one LoRA scale.

    A refittable spec (harmonizer_unet) gets a switchable `lora` limited to the prepared scales;
    the other view (inpaint_unet, c = 0) has fixed weights (`lora` None). `prepare()` refits the
    shared engine to this view's scale when the other view ran last.
    """

    backend = "tensorrt"
    supports_cuda_graph = False
    compiled = False

    def __init__(self, shared: RefittableHarmonizer, scale: float, spec: NetworkSpec, switchable: bool | None = None):
        self.shared, self.spec, self._fixed_scale = shared, spec, float(scale)
        switchable = spec.refittable if switchable is None else switchable
        self.lora = LoRAScale(scale, allowed=tuple(sorted(shared.weights)), name=spec.name) if switchable else None

    @property
    def device(self) -> torch.device:
        return self.shared.engine.device

    @property
    def scale(self) -> float:
        return self.lora.value if self.lora is not None else self._fixed_scale

    def prepare(self) -> None:
        self.shared.switch(self.scale)

    def before_capture(self) -> None:
        """Never captured (supports_cuda_graph = False)."""

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        self.prepare()
        return self.shared.engine(**inputs)


def load_engine(spec: NetworkSpec, engines_dir: Path, device, options: BuildOptions | None = None) -> TensorRTEngine:
    """The TensorRT engine of `spec` from `engines_dir` (built from its ONNX file on first use).

    Default options: the graph's own precision (strongly typed), refit where the spec is refittable.
    """
    engines_dir = Path(engines_dir)
    onnx_path = engines_dir / f"{spec.name}.onnx"
    if not onnx_path.is_file():
        raise EngineError(f"{onnx_path}: missing; export it with `editrt export --component {spec.name}`")
    options = options or BuildOptions(precision=graph_precision_of(onnx_path), refit=spec.refittable)
    return TensorRTEngine(spec, build_engine(spec, onnx_path, engines_dir, options), device)


def tensorrt_engines(specs: dict[str, NetworkSpec], names, engines_dir: Path, device, weights_root: Path,
                     refit_map: dict[str, dict] | None) -> dict:
    """The TensorRT engines of `names`; inpaint_unet and harmonizer_unet as two views of one refittable UNet."""
    engines = {n: load_engine(specs[n], engines_dir, device) for n in names if n not in ("inpaint_unet", "harmonizer_unet")}
    if "harmonizer_unet" in names or "inpaint_unet" in names:
        if not refit_map:
            raise EngineError(f"{Path(engines_dir) / 'manifest.json'}: no refit map for harmonizer_unet; re-export it")
        shared = RefittableHarmonizer(load_engine(specs["harmonizer_unet"], engines_dir, device),
                                      harmonizer_weights(Path(weights_root), refit_map, device=device))
        engines["harmonizer_unet"] = HarmonizerAtScale(shared, 1.0, specs["harmonizer_unet"], switchable=True)
        engines["inpaint_unet"] = HarmonizerAtScale(shared, 0.0, specs["inpaint_unet"], switchable=False)
    return {n: engines[n] for n in names}
