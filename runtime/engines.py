"""One engine interface for every backend (DESIGN.md contract 2): the `Engine` protocol.

An engine is one compiled network with named, typed inputs and outputs (its `NetworkSpec`):

    outputs = engine(sample=..., timestep=..., encoder_hidden_states=...)   # dict name -> tensor

Pipelines and the scheduler talk only to these members; nothing else of an engine is read:

    spec                 NetworkSpec: I/O names, axes, dtypes (export/specs.py)
    backend              "torch" | "onnxruntime" | "tensorrt": for reports only, never branched on
    device               torch.device its outputs live on
    supports_cuda_graph  True when its __call__ may be captured inside a torch.cuda.graph with the
                         scheduler's static buffers (torch on CUDA); False: always run eagerly
    compiled             whether torch.compile runs it (bench rows report it)
    lora                 the declared weight-switch capability: a `LoRAScale` when the engine's LoRA
                         scale can change (the harmonizer), None for fixed weights
    prepare()            put this engine's weights in place. __call__ does it itself; the scheduler
                         calls it before every CUDA-graph replay (a replay runs no Python)
    before_capture()     forget state a captured graph must not bake in (cached cross-attention K/V)

Weight switches are explicit. Engines that share one module (inpaint_unet at c = 0 and
harmonizer_unet at c = 1 share the UNet) each hold their own scale and apply it in `prepare()`
by an in-place copy (models/lora.FusedLoRA), so neither can run at the other's weights and a
captured graph, which reads parameters through their storage, sees the switch. `lora.set(c)`
changes only that engine's scale; the pipeline sets it at stage boundaries inside one work-queue
job (runtime/work_queue.py), so no other job runs between the switch and the run.

Implementations: `TorchEngine` (eager or torch.compile), `OrtEngine` (ONNX Runtime), and the
TensorRT engines of export/tensorrt.py. `conforms(engine)` is checked once at build time.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from editrt.errors import EngineError
from editrt.export.specs import NetworkSpec, check_inputs
from editrt.models.lora import LoRAScale

__all__ = ["Engine", "LoRAScale", "OrtEngine", "TorchEngine", "check_inputs", "conforms"]

_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
ENGINE_MEMBERS = ("spec", "backend", "device", "supports_cuda_graph", "compiled", "lora", "prepare", "before_capture")


class Engine(Protocol):
    spec: NetworkSpec
    backend: str
    device: torch.device
    supports_cuda_graph: bool
    compiled: bool
    lora: LoRAScale | None

    def prepare(self) -> None: ...

    def before_capture(self) -> None: ...

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]: ...


def conforms(engine) -> None:
    """Raise EngineError unless `engine` declares every member of the protocol (checked once, at build)."""
    missing = [m for m in ENGINE_MEMBERS if m not in dir(engine)]
    if missing or not callable(engine):
        raise EngineError(f"{type(engine).__name__}: not an editrt engine (missing {missing or ['__call__']})")


def compile_mode(device: torch.device) -> str:
    """Inductor inside our own whole-loop CUDA graphs: its own cudagraph trees would nest, so not those."""
    return "max-autotune-no-cudagraphs" if device.type == "cuda" else "default"


class TorchEngine:
    """A models/networks.py module run by PyTorch: eager, or torch.compile (inductor) when `compile`.

    `lora` / `lora_scale`: the FusedLoRA this engine's module shares and the scale this engine runs
    at; `switchable` declares the scale changeable (engine.lora), else it is fixed (inpaint: 0).
    """

    backend = "torch"

    def __init__(self, spec: NetworkSpec, module: torch.nn.Module, device=None, *, lora=None, lora_scale: float = 0.0,
                 switchable: bool = False, compile: bool = False):
        self.spec, self._module = spec, module
        if device is None:
            first = next(module.parameters(), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self.supports_cuda_graph = self.device.type == "cuda"
        self._fused, self._fixed_scale = lora, float(lora_scale)
        self.lora = LoRAScale(lora_scale) if (lora is not None and switchable) else None
        self.compiled = bool(compile)
        self._forward = torch.compile(module, mode=compile_mode(self.device)) if compile else module

    @property
    def scale(self) -> float:
        return self.lora.value if self.lora is not None else self._fixed_scale

    def prepare(self) -> None:
        if self._fused is not None:
            self._fused.set_scale(self.scale)  # in place; a no-op when already there

    def before_capture(self) -> None:
        from editrt.models.attention import clear_kv_caches

        clear_kv_caches(self._module)  # so a graph computes K/V from its own static prompt buffer

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        check_inputs(self.spec, inputs)
        self.prepare()
        outputs = self._forward(*(inputs[name] for name in self.spec.input_names))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return dict(zip(self.spec.output_names, outputs))


def _ort_install_hint() -> str:
    from editrt.export.onnx import ort_distributions

    installed = ort_distributions()
    if len(installed) > 1:
        return (f"{' and '.join(installed)} are both installed and break each other: pip uninstall -y "
                f"{' '.join(installed)} && pip install 'editrt[gpu]'")
    return "CUDA needs onnxruntime-gpu (pip install 'editrt[gpu]') with the CUDA and cuDNN libraries it was built for"


class OrtEngine:
    """An exported ONNX graph run by ONNX Runtime.

    On CUDA tensors with onnxruntime-gpu, inputs and outputs stay on the GPU (IO binding); on CPU
    the tensors are handed over as numpy arrays without copies where possible.

    Stream order under IO binding: ORT's CUDA provider runs on its own stream, which knows nothing
    of torch's. So the engine waits for torch's current stream before the run (the inputs torch
    wrote are complete) and for ORT's outputs after it (`synchronize_outputs`), before torch reads
    them. Costs a host sync per call; ONNX Runtime is not the backend for whole-loop graphs.
    """

    backend = "onnxruntime"
    supports_cuda_graph = False
    compiled = False
    lora = None

    def __init__(self, spec: NetworkSpec, path: str | Path, device: torch.device | str = "cpu", providers=None):
        from editrt.export.onnx import import_onnxruntime

        ort = import_onnxruntime("the onnxruntime backend")
        self.spec, self.path, self.device = spec, Path(path), torch.device(device)
        if not self.path.is_file():
            raise EngineError(f"{self.path}: missing; export it with `editrt export --component {spec.name}`")
        available = ort.get_available_providers()
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda":
                if "CUDAExecutionProvider" not in available:
                    raise EngineError(f"{spec.name}: CUDA requested but this onnxruntime has no CUDAExecutionProvider "
                                      f"({_ort_install_hint()})")
                device_id = self.device.index or 0
                providers = [("CUDAExecutionProvider", {"device_id": device_id})] + providers
                # ONNX Runtime's own TensorRT execution provider, first, when asked for and present
                if os.environ.get("EDITRT_ORT_TENSORRT") == "1" and "TensorrtExecutionProvider" in available:
                    cache = str(self.path.parent / "ort_trt_cache")
                    providers.insert(0, ("TensorrtExecutionProvider", {
                        "device_id": device_id, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": cache, "trt_timing_cache_enable": True}))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise EngineError(f"{self.path}: not a loadable ONNX model ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        # ONNX Runtime drops a provider that fails to load (missing CUDA/cuDNN libraries, a version mismatch)
        # with only a log line and runs on the CPU: the session's own list is the truth
        requested = [p if isinstance(p, str) else p[0] for p in providers]
        dropped = [p for p in requested if p not in self.session.get_providers()]
        if dropped:
            raise EngineError(f"{self.path}: ONNX Runtime did not load {', '.join(dropped)} (running on "
                              f"{', '.join(self.session.get_providers())}); {_ort_install_hint()}")
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if names != (spec.input_names, spec.output_names):
            raise EngineError(f"{self.path}: I/O {names} does not match the {spec.name} spec "
                              f"{(spec.input_names, spec.output_names)}; re-export it")
        self.dtypes = {i.name: i.type for i in self.session.get_inputs()}

    def prepare(self) -> None:
        """Fixed weights (an exported harmonizer has its LoRA fused at c = 1)."""

    def before_capture(self) -> None:
        """Never captured (supports_cuda_graph is False)."""

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        check_inputs(self.spec, inputs)
        if self.device.type == "cuda":
            return self._run_bound(inputs)
        feeds = {name: self._as_input(name, t).numpy() for name, t in inputs.items()}
        outputs = self.session.run(self.spec.output_names, feeds)
        return {name: torch.from_numpy(array) for name, array in zip(self.spec.output_names, outputs)}

    def _as_input(self, name: str, t: torch.Tensor) -> torch.Tensor:
        want = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
                "tensor(int32)": torch.int32, "tensor(bfloat16)": torch.bfloat16}[self.dtypes[name]]
        return t.detach().to(self.device, want).contiguous()

    def _run_bound(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CUDA: bind torch memory directly; outputs are preallocated from the spec's axes when the
        inputs determine them (all but SAM's mask size, which depends on input values)."""
        binding, device_id = self.session.io_binding(), self.device.index or 0
        kept = {}
        for name, t in inputs.items():
            t = kept[name] = self._as_input(name, t)  # keep alive until the run ends
            binding.bind_input(name, "cuda", device_id, _NUMPY[str(t.dtype)[6:]], tuple(t.shape), t.data_ptr())
        dims = self.spec.dims_of({k: tuple(v.shape) for k, v in kept.items()})
        outputs = {}
        for out in self.spec.outputs:
            if all(not isinstance(a, str) or a in dims for a in out.axes):
                t = outputs[out.name] = torch.empty(out.shape(dims), dtype=torch.float32, device=self.device)
                binding.bind_output(out.name, "cuda", device_id, np.float32, tuple(t.shape), t.data_ptr())
            else:
                binding.bind_output(out.name, "cuda", device_id)
        # torch wrote the inputs (and allocated the outputs) on its stream: finish that before ORT reads
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # ORT's stream done before torch reads the outputs
        for out, value in zip(self.spec.outputs, binding.get_outputs()):
            if out.name not in outputs:
                outputs[out.name] = torch.from_numpy(value.numpy()).to(self.device)
        return outputs
