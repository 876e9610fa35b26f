"""torch -> ONNX for one network, checked against PyTorch with ONNX Runtime.

`export_network` writes `<out>/<name>.onnx` atomically (into a temporary file, renamed when the
check passes), with the spec's I/O names and dynamic axes, opset 18. Graphs over 2 GB (the full
SD UNets in fp32) keep their weights in `<name>.onnx.data` beside the graph (ONNX's external data).

The check runs the module and the ONNX graph on fresh random inputs of the spec's shapes and
reports the max relative error max|ort - torch| / max|torch| (fp32: <= 1e-4 required).
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from editrt.errors import EngineError
from editrt.export.specs import NetworkSpec

OPSET = 18
TWO_GB = 2**31 - 1
FP32_TOLERANCE = 1e-4


@dataclass
class ExportResult:
    name: str
    path: Path
    max_rel_error: float | None  # None when not checked
    seconds: float


def random_inputs(spec: NetworkSpec, dims: dict[str, int], generator: torch.Generator | None = None,
                  context: dict | None = None) -> dict[str, torch.Tensor]:
    """Fresh, valid, non-zero random inputs for `spec` at `dims` (timesteps and SAM prompts in range)."""
    g = generator or torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    context = context or {}
    out = {}
    for t in spec.inputs:
        shape = t.shape(dims)
        if t.name == "timestep":
            out[t.name] = torch.randint(1, 1000, shape, generator=g).float()
        elif t.name == "point_coords":
            out[t.name] = torch.rand(shape, generator=g) * context.get("sam_image_size", 1024) * 0.9
        elif t.name == "point_labels":
            out[t.name] = torch.randint(0, 2, shape, generator=g).float()
            out[t.name][..., -1] = -1  # the padding point SamPredictor adds
        elif t.name == "has_mask_input":
            out[t.name] = torch.zeros(shape)
        elif t.name == "orig_im_size":
            out[t.name] = torch.tensor(context.get("orig_im_size", (300.0, 451.0)))
        elif t.name in ("image", "patches"):
            out[t.name] = torch.rand(shape, generator=g) * 2 - 1
        else:
            out[t.name] = torch.randn(shape, generator=g)
    return out


def _max_rel_error(reference: list[torch.Tensor], actual: list[np.ndarray]) -> float:
    worst = 0.0
    for r, a in zip(reference, actual):
        r = r.detach().float().cpu().numpy()
        if r.shape != a.shape:
            raise EngineError(f"ONNX output shape {list(a.shape)} differs from PyTorch's {list(r.shape)}")
        worst = max(worst, float(np.abs(a - r).max() / max(np.abs(r).max(), 1e-12)))
    return worst


def check_onnx(path: Path, spec: NetworkSpec, module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference = module(*(inputs[n] for n in spec.input_names))
    reference = list(reference) if isinstance(reference, tuple) else [reference]
    actual = session.run(spec.output_names, {k: v.numpy() for k, v in inputs.items()})
    return _max_rel_error(reference, actual)


def export_network(spec: NetworkSpec, module: torch.nn.Module, out_dir: str | Path, dims: dict[str, int],
                   check: bool = True, context: dict | None = None) -> ExportResult:
    """Export `module` (fp32, CPU) with `spec`'s I/O to `<out_dir>/<spec.name>.onnx`; check it with ORT."""
    import time

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{spec.name}.onnx"
    module = module.eval()
    if hasattr(module, "apply_weights"):  # e.g. the harmonizer's LoRA, fused in place before tracing
        module.apply_weights()
    example = random_inputs(spec, dims, context=context)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=out_dir))
    try:
        tmp = tmp_dir / target.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            # The TorchScript exporter: fast, and it names dynamic axes as TensorRT users expect.
            torch.onnx.export(module, tuple(example[n] for n in spec.input_names), str(tmp), dynamo=False,
                              input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic_axes(), opset_version=OPSET, do_constant_folding=True)
        model = onnx.load(str(tmp), load_external_data=True)
        for f in tmp_dir.iterdir():
            f.unlink()
        external = weight_bytes(model) > TWO_GB  # protobuf cannot serialise more than 2 GB in one message
        onnx.save_model(model, str(tmp), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=f"{target.name}.data" if external else None)
        onnx.checker.check_model(str(tmp))
        error = None
        if check:
            fresh = random_inputs(spec, dims, context=context)  # not the tracing inputs
            error = check_onnx(tmp, spec, module, fresh)
            if error > FP32_TOLERANCE:
                raise EngineError(f"{spec.name}: ONNX Runtime differs from PyTorch by {error:.2e} (max relative), "
                                  f"more than {FP32_TOLERANCE:g}")
        for f in sorted(tmp_dir.iterdir(), key=lambda f: f.suffix == ".onnx"):  # data first, graph last
            os.replace(f, out_dir / f.name)
        if not external:
            (out_dir / f"{target.name}.data").unlink(missing_ok=True)
    finally:
        for f in tmp_dir.iterdir():
            f.unlink()
        tmp_dir.rmdir()
    return ExportResult(spec.name, target, error, time.perf_counter() - start)


def weight_bytes(model) -> int:
    """Bytes of the graph's weights (initializers, loaded in memory)."""
    return sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
