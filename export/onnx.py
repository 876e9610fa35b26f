"""torch -> ONNX for one network, checked against PyTorch with ONNX Runtime.

`export_network` writes `<out>/<name>.onnx` atomically (into a temporary file, renamed when the
check passes), with the spec's I/O names and dynamic axes, opset 18. Graphs over 2 GB (the full
SD UNets in fp32) keep their weights in `<name>.onnx.data` beside the graph (ONNX's external data).

Tracing records one run, so every dynamic input is traced at one example and checked at others:
`trace_dims` puts latent axes at an odd size (diffusers then traces the up-sampling path that
takes the skips' sizes, which is right for every size), and the check (`check_cases`) runs fresh
random inputs with every dynamic axis, and shape-like values such as SAM's `orig_im_size`, moved
away from the example. It compares with the runtime's own network (`reference`), not with the
export variant that was traced (export/traceable.py).

Precision. fp32 (the default) or fp16 for the networks whose spec lists it: the fp32 graph is
converted with ONNX Runtime's float16 converter, keeping fp32 graph inputs and outputs (a Cast at
each end), so every backend feeds and reads the same tensors whichever precision was exported,
while ONNX Runtime's CUDA/TensorRT providers and a strongly typed TensorRT build compute in fp16.

Error measure: max |ort - torch| / max |torch| per output, the worst over outputs and cases.
fp32 must be <= 1e-4 (we see ~1e-6). fp16 must be <= 2e-2 against PyTorch fp32: fp16 rounds
each op's result to 2**-11 relative and a UNet chains ~50 of them (normalisations, attention
softmax, residual sums), so ~1e-3 is the expected level (the tiny UNet: 1e-3..7e-3); 2e-2 still
catches a graph that computes something else (errors of order 1).
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from editrt.errors import EngineError, InputError
from editrt.export.specs import NetworkSpec

OPSET = 18
TWO_GB = 2**31 - 1
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2}
ONNX_PRECISIONS = tuple(TOLERANCES)
LATENT_AXES = ("height", "width")
# SAM's original image sizes: the trace example (the Chelsea photo's), then those the check runs
# (square, portrait, landscape, smaller and larger than SAM's input, an odd long side)
TRACE_ORIG_IM_SIZE = (300, 451)
CHECK_ORIG_IM_SIZES = ((192, 256), (480, 640), (1024, 1024), (256, 256), (451, 300), (240, 320))
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


@dataclass
class ExportResult:
    name: str
    path: Path
    max_rel_error: float | None  # None when not checked
    seconds: float
    precision: str = "fp32"


def trace_dims(spec: NetworkSpec) -> dict[str, int]:
    """The shapes a network is traced at: each dynamic axis at its profile's optimum, latent axes at an
    odd size (not a multiple of any UNet's 2**num_upsamplers) so the traced up-sampling follows the skips."""
    dims = {}
    for name, (lo, opt, hi) in (spec.profiles[0].items() if spec.profiles else []):
        if name in LATENT_AXES and opt % 2 == 0:
            opt = opt - 1 if opt - 1 >= lo else opt + 1
            if not lo <= opt <= hi:
                raise EngineError(f"{spec.name}: profile {name} {(lo, opt, hi)} has no odd size to trace at")
        dims[name] = opt
    return _with_derived(spec, dims)


def _with_derived(spec: NetworkSpec, dims: dict[str, int]) -> dict[str, int]:
    dims = dict(dims)
    for name, (base, factor) in spec.derived.items():
        dims[name] = factor * dims[base]
    return dims


def check_cases(spec: NetworkSpec, traced: dict[str, int]) -> list[tuple[dict[str, int], dict]]:
    """(dims, context) per check run; every dynamic axis and `orig_im_size` differ from the trace example.

    Two sets of dims: each axis at its minimum (its maximum where the minimum is the example) and
    at an odd value between (its other bound where none fits); axes that must be a multiple of k
    (`spec.multiple_of`) take multiples of k between instead, a different one per axis (non-square). Networks with `orig_im_size` run one
    case per CHECK_ORIG_IM_SIZES, alternating the two sets of dims.
    """
    ranges = spec.profiles[0] if spec.profiles else {}
    low, odd = {}, {}
    for name, (lo, _, hi) in ranges.items():
        low[name] = lo if lo != traced[name] else hi
        if name in spec.multiple_of:  # e.g. ViTMatte's padded sides: the multiples between, a different one per axis
            k = spec.multiple_of[name]
            between = [v for v in range(lo, hi + 1, k) if v not in (traced[name], low[name])]
            odd[name] = between[list(spec.multiple_of).index(name) % len(between)] if between else low[name]
            continue
        between = [v for v in range(lo, hi + 1) if v % 2 == 1 and v not in (traced[name], low[name])]
        odd[name] = between[0] if between else next((v for v in (lo, hi) if v != traced[name]), traced[name])
    sets = [_with_derived(spec, low), _with_derived(spec, odd)]
    if sets[0] == sets[1]:  # static shapes (SAM's image encoder): one run
        sets = sets[:1]
    if "orig_im_size" in spec.input_names:
        return [(sets[i % len(sets)], {"orig_im_size": size}) for i, size in enumerate(CHECK_ORIG_IM_SIZES)]
    return [(d, {}) for d in sets]


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
            out[t.name] = torch.tensor(context.get("orig_im_size", TRACE_ORIG_IM_SIZE), dtype=_DTYPES[t.dtype])
        elif t.name in ("image", "patches"):
            out[t.name] = torch.rand(shape, generator=g) * 2 - 1
        elif t.name == "pixel_values":  # transformers' normalised image in [-1, 1]; ViTMatte's 4th channel a trimap
            out[t.name] = torch.rand(shape, generator=g) * 2 - 1
            if shape[1] == 4:  # trimap / 255: background 0, unknown 128 / 255, foreground 1
                levels = torch.tensor([0.0, 128 / 255, 1.0])
                out[t.name][:, 3] = levels[torch.randint(0, 3, (shape[0], *shape[2:]), generator=g)]
        else:
            out[t.name] = torch.randn(shape, generator=g)
    return out


def _max_rel_error(reference: list[torch.Tensor], actual: list[np.ndarray]) -> float:
    worst = 0.0
    for r, a in zip(reference, actual):
        r = r.detach().float().cpu().numpy()
        if r.shape != a.shape:
            raise EngineError(f"ONNX output shape {list(a.shape)} differs from PyTorch's {list(r.shape)}")
        worst = max(worst, float(np.abs(a.astype(np.float32) - r).max() / max(np.abs(r).max(), 1e-12)))
    return worst


def import_onnxruntime(purpose: str):
    """The onnxruntime module, or a one-line EngineError saying which extra installs it.

    ONNX Runtime is an extra, not a requirement: `onnxruntime` (CPU) and `onnxruntime-gpu` (CUDA) are
    two distributions of the same module and break each other when both are installed."""
    try:
        import onnxruntime
    except ImportError:
        raise EngineError(f"onnxruntime: not installed ({purpose} needs it); pip install 'editrt[onnxruntime]' "
                          "(CPU) or 'editrt[gpu]' (CUDA), not both") from None
    return onnxruntime


def ort_distributions() -> list[str]:
    """The installed distributions that provide the onnxruntime module (more than one: they conflict)."""
    from importlib import metadata

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def ort_session(path: Path):
    ort = import_onnxruntime("checking an exported graph")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(path: Path, spec: NetworkSpec, module: torch.nn.Module, inputs: dict[str, torch.Tensor],
               session=None) -> float:
    """Max relative error of the graph at `path` against `module` on `inputs` (ONNX Runtime, CPU)."""
    session = session or ort_session(path)
    with torch.no_grad():
        reference = module(*(inputs[n] for n in spec.input_names))
    reference = list(reference) if isinstance(reference, tuple) else [reference]
    actual = session.run(spec.output_names, {k: v.numpy() for k, v in inputs.items()})
    return _max_rel_error(reference, actual)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp32 graph -> fp16 compute with fp32 graph inputs and outputs (ONNX Runtime's converter)."""
    import_onnxruntime("the fp16 conversion")
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=weight_bytes(model) > TWO_GB)
    OnnxModel(model).topological_sort()  # the converter appends the input Casts after their consumers
    return model


# what to_fp16 (ONNX Runtime's convert_np_to_float16) does to each fp32 weight before the cast: it keeps
# sign and finiteness, so magnitudes below the smallest fp16 subnormal and above the largest finite fp16
# are clamped to them (a plain cast would give 0 or inf)
FP16_MIN_POSITIVE, FP16_MAX_FINITE = 5.96e-08, 65504.0


def fp16_as_exported(weights: torch.Tensor) -> torch.Tensor:
    """The fp16 tensor to_fp16 writes for an fp32 weight (on the weight's device): equal to ONNX
    Runtime's convert_np_to_float16, which matching a weight to its exported initializer needs."""
    w = weights.detach().float()
    lo, hi = FP16_MIN_POSITIVE, FP16_MAX_FINITE
    w = torch.where((w > 0) & (w < lo), torch.full_like(w, lo), w)
    w = torch.where((w < 0) & (w > -lo), torch.full_like(w, -lo), w)
    w = torch.where((w > hi) & (w < float("inf")), torch.full_like(w, hi), w)
    w = torch.where((w < -hi) & (w > float("-inf")), torch.full_like(w, -hi), w)
    return w.to(torch.float16)


def graph_precision(model: onnx.ModelProto) -> str:
    """'fp16' when the graph's floating-point weights are fp16, else 'fp32'."""
    kinds = {t.data_type for t in model.graph.initializer if len(t.dims) > 1}
    return "fp16" if onnx.TensorProto.FLOAT16 in kinds and onnx.TensorProto.FLOAT not in kinds else "fp32"


def export_network(spec: NetworkSpec, module: torch.nn.Module, out_dir: str | Path, dims: dict[str, int] | None = None,
                   check: bool = True, context: dict | None = None, reference: torch.nn.Module | None = None,
                   precision: str = "fp32") -> ExportResult:
    """Export `module` (fp32, CPU) with `spec`'s I/O to `<out_dir>/<spec.name>.onnx`; check it with ORT.

    `dims`: the trace example (default `trace_dims(spec)`); `reference`: the module the check compares
    with (default `module`); `precision`: 'fp32' or, where the spec allows it, 'fp16'.
    """
    if precision not in ONNX_PRECISIONS:
        raise InputError(f"--precision {precision!r}: ONNX exports expected one of {', '.join(ONNX_PRECISIONS)}", field="precision")
    if precision not in spec.precisions:
        raise InputError(f"{spec.name}: precision {precision!r} not supported; expected one of {', '.join(spec.precisions)}", field="precision")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{spec.name}.onnx"
    module = module.eval()
    reference = (reference or module).eval()
    for m in {id(module): module, id(reference): reference}.values():
        if hasattr(m, "apply_weights"):  # e.g. the harmonizer's LoRA, fused in place before tracing
            m.apply_weights()
    dims = dims or trace_dims(spec)
    context = context or {}
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
        if precision == "fp16":
            model = to_fp16(model)
        external = weight_bytes(model) > TWO_GB  # protobuf cannot serialise more than 2 GB in one message
        onnx.save_model(model, str(tmp), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=f"{target.name}.data" if external else None)
        del model
        onnx.checker.check_model(str(tmp))
        error = None
        if check:
            session = ort_session(tmp)
            error = max(check_onnx(tmp, spec, reference, random_inputs(spec, d, context={**context, **c}), session)
                        for d, c in check_cases(spec, dims))  # fresh inputs, away from the trace example
            if error > TOLERANCES[precision]:
                raise EngineError(f"{spec.name}: ONNX Runtime ({precision}) differs from PyTorch by {error:.2e} "
                                  f"(max relative), more than {TOLERANCES[precision]:g}")
        for f in sorted(tmp_dir.iterdir(), key=lambda f: f.suffix == ".onnx"):  # data first, graph last
            os.replace(f, out_dir / f.name)
        if not external:
            (out_dir / f"{target.name}.data").unlink(missing_ok=True)
    finally:
        for f in tmp_dir.iterdir():
            f.unlink()
        tmp_dir.rmdir()
    return ExportResult(spec.name, target, error, time.perf_counter() - start, precision)


def weight_bytes(model) -> int:
    """Bytes of the graph's weights (initializers, loaded in memory)."""
    return sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
