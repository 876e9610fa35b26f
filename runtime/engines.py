"""One engine interface for every backend (DESIGN.md contract 2).

An engine is a compiled component with named, typed inputs and outputs (its `NetworkSpec`):

    outputs = engine(sample=..., timestep=..., encoder_hidden_states=...)   # dict name -> tensor

Pipelines talk only to this interface. Implementations: `TorchEngine` (the models/networks.py
module itself, eager), `OrtEngine` (ONNX Runtime: CPU here; with onnxruntime-gpu the CUDA
execution provider with IO binding, and its TensorRT provider first when EDITRT_ORT_TENSORRT=1)
and, in export/tensorrt.py, `TensorRTEngine`.
Every engine checks its inputs against the spec, so a wrong shape is a clear error, not a crash
deep inside a runtime.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from editrt.errors import EngineError
from editrt.export.specs import NetworkSpec

_NUMPY = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def check_inputs(spec: NetworkSpec, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
    unknown = set(inputs) - set(spec.input_names)
    if unknown:
        raise EngineError(f"{spec.name}: unexpected inputs {sorted(unknown)}; expected {spec.input_names}")
    try:
        return spec.dims_of({k: tuple(v.shape) for k, v in inputs.items()})
    except ValueError as e:
        raise EngineError(str(e)) from None


class TorchEngine:
    """A network module run eagerly by PyTorch (the reference backend)."""

    backend = "torch"

    def __init__(self, spec: NetworkSpec, module: torch.nn.Module):
        self.spec, self.module = spec, module

    def set_lora_scale(self, scale: float) -> None:
        """For the harmonizer: the LoRA scale its weights are switched to (in place) on the next call."""
        if not hasattr(self.module, "lora_scale"):
            raise EngineError(f"{self.spec.name}: has no LoRA to scale")
        self.module.lora_scale = scale

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        check_inputs(self.spec, inputs)
        outputs = self.module(*(inputs[name] for name in self.spec.input_names))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return dict(zip(self.spec.output_names, outputs))


class OrtEngine:
    """An exported ONNX graph run by ONNX Runtime.

    On CUDA tensors with onnxruntime-gpu, inputs and outputs stay on the GPU (IO binding); on CPU
    the tensors are handed over as numpy arrays without copies where possible.
    """

    backend = "onnxruntime"

    def __init__(self, spec: NetworkSpec, path: str | Path, device: torch.device | str = "cpu", providers=None):
        import onnxruntime as ort

        self.spec, self.path, self.device = spec, Path(path), torch.device(device)
        if not self.path.is_file():
            raise EngineError(f"{self.path}: missing; export it with `editrt export --component {spec.name}`")
        available = ort.get_available_providers()
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda":
                if "CUDAExecutionProvider" not in available:
                    raise EngineError(f"{spec.name}: CUDA requested but this onnxruntime has no CUDAExecutionProvider "
                                      "(pip install 'editrt[gpu]')")
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
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if names != (spec.input_names, spec.output_names):
            raise EngineError(f"{self.path}: I/O {names} does not match the {spec.name} spec "
                              f"{(spec.input_names, spec.output_names)}; re-export it")
        self.dtypes = {i.name: i.type for i in self.session.get_inputs()}

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
        self.session.run_with_iobinding(binding)
        for out, value in zip(self.spec.outputs, binding.get_outputs()):
            if out.name not in outputs:
                outputs[out.name] = torch.from_numpy(value.numpy()).to(self.device)
        return outputs
