"""A Triton Inference Server model repository for a weights directory (`editrt export --format triton`).

    REPO/
      README.md                   how to launch it, and every model's request / response tensors
      editrt_repository.json      which weights, engines and settings wrote it
      reposition/  inpaint/  segment/  elements_partition/  elements_render/
          config.pbtxt            backend "python"; parameters: weights, device, dtype, backend, engines
          1/model.py              one line: editrt.runtime.triton_models' model class as TritonPythonModel
      <engine>/                   one per engine in --engines (the folder `editrt export` wrote)
          config.pbtxt            platform "onnxruntime_onnx" or "tensorrt_plan", I/O from export/specs.py
          1/model.onnx | 1/model.plan

The engine models' configs come from the network specs (export/specs.py): names, data types, dims
with -1 for each dynamic axis. A network whose every input and output starts with the same dynamic
axis (the UNets' and VAEs' `batch`, the content encoder's `num_elements`) is batchable in Triton's
sense: that axis becomes the batch dimension (`max_batch_size`, left out of `dims`) and requests are
batched dynamically. The SAM decoders are not: their image embeddings are a single [1, C, h, w] and
`orig_im_size` has no batch axis at all. TensorRT plans cap the batch at their profile's maximum.

The pipeline models are Python-backend models: the loops and pipelines (denoising, SEELE, the
elements partition) run editrt's own engines in-process, loaded from the weights directory named
in the config (runtime/triton_models.py). Masks and flags are UINT8 (nonzero = inside / true), not
BOOL: the Python backend stubs of Triton 2.51 mishandle BOOL tensors next to numpy 2 (a request's
[true, false, true] arrives as all true, and BOOL outputs arrive empty). Text (the inpainting task,
the elements prompt) travels as request parameters, not BYTES tensors, for the same reason: a
BYTES input kills that stub. Every optional scalar input may also be given as a request
parameter of its lower-case name (`{"steps": 20}`). This module writes text only and never imports the
runtime: the server imports it when it loads a model.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from editrt.errors import InputError
from editrt.export.specs import NetworkSpec, TensorSpec, editor_networks, network_specs

# --------------------------------------------------------------------------- engine models
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                 "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL", "bytes": "TYPE_STRING"}
PLATFORMS = {"onnx": "onnxruntime_onnx", "plan": "tensorrt_plan"}
MODEL_FILES = {"onnx": "model.onnx", "plan": "model.plan"}
ONNX_MAX_BATCH = 8  # an ONNX graph's batch axis is unbounded; this caps what one dynamic batch may hold


def batch_axis(spec: NetworkSpec) -> str | None:
    """The dynamic axis that leads every input and output (Triton's batch dimension), or None."""
    first = {t.axes[0] if t.axes else None for t in spec.inputs + spec.outputs}
    axis = first.pop() if len(first) == 1 else None
    return axis if isinstance(axis, str) else None


def max_batch_size(spec: NetworkSpec, kind: str) -> int:
    """0 (no batch dimension) for a network that is not batchable; else the most one batch may hold."""
    axis = batch_axis(spec)
    if axis is None:
        return 0
    if kind == "plan":  # a plan runs only inside its optimisation profiles
        return min(p[axis][2] for p in spec.profiles) if spec.profiles else 1
    return ONNX_MAX_BATCH


def _dims(axes: tuple) -> list[int]:
    return [a if isinstance(a, int) else -1 for a in axes]


def _tensor(t: TensorSpec, batched: bool, shape_tensor: bool = False) -> str:
    dims = _dims(t.axes[1:] if batched else t.axes)
    fields = [f'name: "{t.name}"', f"data_type: {TRITON_DTYPES[t.dtype]}"]
    if batched and not dims:  # a per-item scalar (the UNet's timestep): one value, reshaped to []
        fields += ["dims: [ 1 ]", "reshape: { shape: [ ] }"]
    else:
        fields.append(f"dims: [ {', '.join(str(d) for d in dims)} ]")
    if shape_tensor:
        fields.append("is_shape_tensor: true")
    return "  {\n    " + "\n    ".join(fields) + "\n  }"


def _instance_group(kind: str) -> str:
    return f"instance_group [\n  {{\n    kind: {kind}\n    count: 1\n  }}\n]\n"


def engine_config(spec: NetworkSpec, kind: str, instance_kind: str = "KIND_GPU") -> str:
    """config.pbtxt of an engine model: `kind` 'onnx' or 'plan'."""
    if kind not in PLATFORMS:
        raise InputError(f"engine kind {kind!r}: expected one of {', '.join(PLATFORMS)}", field="kind")
    batch = max_batch_size(spec, kind)
    batched = batch > 0
    # TensorRT takes SAM's orig_im_size as a shape tensor (its values set the masks' size)
    shape_tensors = set(spec.value_ranges) if kind == "plan" else set()
    text = [f'name: "{spec.name}"', f'platform: "{PLATFORMS[kind]}"', f"max_batch_size: {batch}"]
    text.append("input [\n" + ",\n".join(_tensor(t, batched, t.name in shape_tensors) for t in spec.inputs) + "\n]")
    text.append("output [\n" + ",\n".join(_tensor(t, batched) for t in spec.outputs) + "\n]")
    out = "# " + spec.about + "\n" + "\n".join(text) + "\n"
    if batch > 1:
        out += "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}\n"
    return out + _instance_group(instance_kind)


# --------------------------------------------------------------------------- pipeline models
@dataclass(frozen=True)
class Port:
    """One request or response tensor of a pipeline model; `default` is what an absent optional input means."""

    name: str
    dtype: str  # a TRITON_DTYPES key
    dims: tuple[int, ...]
    about: str
    optional: bool = False
    default: object = None


def _image(name="IMAGE", about="RGB image, uint8 [H, W, 3]"):
    return Port(name, "uint8", (-1, -1, 3), about)


def _scalar(name, dtype, default, about):
    return Port(name, dtype, (1,), about, optional=True, default=default)


_STEPS = _scalar("STEPS", "int32", 50, "denoising steps (default 50)")
_SEED = _scalar("SEED", "int64", 0, "random seed (default 0)")
_RESOLUTION = _scalar("RESOLUTION", "int32", None, "processing short side, multiple of 8 (default: the model's)")
_CROP_PADDING = _scalar("CROP_PADDING", "int32", None, "regenerate only the padded box around what changes, in pixels, "
                        "pasted back at full resolution (default: off), as `--crop-padding`")
_POINTS = (Port("POINTS", "float32", (-1, 2), "clicks (x, y) in image pixels", optional=True),
           Port("LABELS", "int32", (-1,), "one per point: 1 foreground, 0 background (default: all 1)", optional=True),
           Port("BOX", "float32", (4,), "a box (x0, y0, x1, y1) around the subject", optional=True))


@dataclass(frozen=True)
class Parameter:
    """A request parameter (Triton's `parameters` of an inference request): text options."""

    name: str
    default: str
    about: str


_CROP_SIZE = Parameter("crop_size", "", "processing or native (the default with CROP_PADDING), as `--crop-size`")


@dataclass(frozen=True)
class PipelineModel:
    name: str
    editor: str  # 'reposition' or 'elements': which pipeline the model loads
    about: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    parameters: tuple[Parameter, ...] = ()

    def input(self, name: str) -> Port:
        return next(p for p in self.inputs if p.name == name)


PIPELINE_MODELS = {m.name: m for m in (
    PipelineModel("segment", "reposition", "subject mask from clicks and/or a box (SAM), as `editrt segment`",
                  (_image(), *_POINTS), (Port("MASK", "uint8", (-1, -1), "subject mask, uint8 [H, W]: 255 inside, 0 outside (the CLI's mask PNG)"),)),
    PipelineModel("inpaint", "reposition", "one prompt-guided inpainting pass, as `editrt inpaint`",
                  (_image(), Port("MASK", "uint8", (-1, -1), "region to regenerate, uint8 [H, W], nonzero = inside"),
                   _STEPS, _scalar("GUIDANCE", "float32", 1.0, "classifier-free guidance (default 1 = none)"), _SEED,
                   _RESOLUTION, _CROP_PADDING),
                  (_image(about="the inpainted image, uint8 [H, W, 3]"),),
                  (Parameter("task", "remove", "remove (default) or complete"), _CROP_SIZE)),
    PipelineModel("reposition", "reposition", "move a subject: remove, complete, harmonize (SEELE), as `editrt reposition`",
                  (_image(), Port("MASK", "uint8", (-1, -1), "subject mask, nonzero = inside (or POINTS / BOX)", optional=True), *_POINTS,
                   Port("MOVE", "float32", (2,), "move (dx, dy) in pixels"),
                   _scalar("SCALE", "float32", 1.0, "resize the subject about its box centre (default 1); the request "
                           "parameter scale=\"auto\" instead scales by the depths at the footpoints (`--scale auto`)"),
                   Port("COMPLETE_MASK", "uint8", (-1, -1), "region to complete (occluded part), nonzero = inside", optional=True),
                   Port("OCCLUDER_MASK", "uint8", (-1, -1), "region in front of the moved subject (SeeleEdit.occlusion as "
                        "a mask), nonzero = inside", optional=True),
                   _scalar("MATTING", "uint8", 0, "composite the subject with ViTMatte's alpha: 1 or 0 (default)"),
                   _scalar("TRIMAP_BAND", "int32", None, "matting trimap band in pixels (default 2% of the short side)"),
                   Port("EXISTING_SHADOW_MASK", "uint8", (-1, -1), "the subject's existing shadow (moves with it, "
                        "completed at its new place), nonzero = inside", optional=True),
                   Port("NEW_SHADOW_REGION", "uint8", (-1, -1), "where a new shadow is cast (harmonized), nonzero = "
                        "inside", optional=True),
                   _scalar("HARMONIZE", "uint8", 1, "harmonize the pasted subject: 1 (default) or 0"), _STEPS,
                   _scalar("GUIDANCE", "float32", 1.0, "classifier-free guidance (default 1 = none)"), _SEED,
                   _RESOLUTION, _CROP_PADDING),
                  (_image(about="the edited image, uint8 [H, W, 3]"),
                   Port("REGION", "uint8", (-1, -1), "the pixels that were regenerated, uint8 [H, W], 255 inside")),
                  (Parameter("occlusion", "none", "none (default) or auto: destination pixels nearer than the subject "
                             "(depth) hide it, as `--occlusion auto`"), _CROP_SIZE)),
    PipelineModel("elements_partition", "elements",
                  "split an image into elements and encode them, as `editrt elements partition`",
                  (_image(), _RESOLUTION, _scalar("GRID", "int32", 16, "query grid (default 16 -> 256 elements)"),
                   _scalar("BETA", "float32", 64.0, "distance weight (default 64)"),
                   _scalar("ITERATIONS", "int32", 1, "SLIC iterations (default 1)")),
                  (Port("LABELS", "int32", (-1, -1), "label map at the image's size, int32 [H, W], -1 = no element "
                        "(the `--labels` PNG minus 1)"),
                   Port("FEATURES", "float32", (-1, -1), "content features, float32 [N, F]"),
                   Port("CENTROIDS", "float32", (-1, 2), "element centres (x, y) in image pixels, float32 [N, 2]"),
                   Port("SIZES", "float32", (-1, 2), "bounding-box sizes (w, h) in image pixels, float32 [N, 2]"),
                   Port("ALIVE", "uint8", (-1,), "1: element has pixels, uint8 [N]"),
                   Port("IMAGE_SIZE", "int32", (2,), "(H, W) of the image"),
                   Port("WORKING_SIZE", "int32", (2,), "(h, w) canvas the decoder renders at by default"))),
    PipelineModel("elements_render", "elements",
                  "render (edited) elements with the diffusion decoder, as `editrt elements render`; the inputs are "
                  "elements_partition's outputs, edited by the client (move: CENTROIDS, resize: SIZES, delete: ALIVE)",
                  (Port("FEATURES", "float32", (-1, -1), "content features [N, F]"),
                   Port("CENTROIDS", "float32", (-1, 2), "centres (x, y) in image pixels [N, 2]"),
                   Port("SIZES", "float32", (-1, 2), "sizes (w, h) in image pixels [N, 2]"),
                   Port("ALIVE", "uint8", (-1,), "0: a deleted element (an all-zero token), uint8 [N]"),
                   Port("IMAGE_SIZE", "int32", (2,), "(H, W) of the image"),
                   Port("WORKING_SIZE", "int32", (2,), "(h, w) render canvas, multiples of 8 (default: the image "
                        "size rounded to 8)", optional=True),
                   _STEPS, _scalar("GUIDANCE", "float32", 3.0, "guidance w (default 3, the paper's)"), _SEED,
                   _RESOLUTION),
                  (_image(about="the rendered image at IMAGE_SIZE, uint8 [H, W, 3]"),),
                  (Parameter("prompt", "", "text prompt (default empty)"),)),
)}


def _port(p: Port) -> str:
    fields = [f'name: "{p.name}"', f"data_type: {TRITON_DTYPES[p.dtype]}",
              f"dims: [ {', '.join(str(d) for d in p.dims)} ]"]
    if p.optional:
        fields.append("optional: true")
    return "  {\n    " + "\n    ".join(fields) + "\n  }"


def pipeline_config(model: PipelineModel, parameters: dict[str, str], instance_kind: str = "KIND_CPU") -> str:
    """config.pbtxt of a Python-backend pipeline model; `parameters` become string parameters."""
    lines = [f"# {model.about}", f'name: "{model.name}"', 'backend: "python"',
             "max_batch_size: 0  # images differ in size: each request is one image",
             "input [\n" + ",\n".join(_port(p) for p in model.inputs) + "\n]",
             "output [\n" + ",\n".join(_port(p) for p in model.outputs) + "\n]"]
    for key, value in parameters.items():
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: {json.dumps(str(value))} }}\n}}')
    return "\n".join(lines) + "\n" + _instance_group(instance_kind)


MODEL_PY = '''"""editrt's `{name}` model for Triton's Python backend (written by `editrt export --format triton`)."""
from editrt.runtime.triton_models import {cls} as TritonPythonModel  # noqa: F401
'''
MODEL_CLASSES = {"segment": "SegmentModel", "inpaint": "InpaintModel", "reposition": "RepositionModel",
                 "elements_partition": "ElementsPartitionModel", "elements_render": "ElementsRenderModel"}


# --------------------------------------------------------------------------- the repository
def _engine_files(engines: Path) -> dict[str, tuple[str, Path]]:
    """network name -> (kind, file) for the engines in an `editrt export` folder; a plan beats its ONNX."""
    found: dict[str, tuple[str, Path]] = {}
    for kind in ("onnx", "plan"):
        for path in sorted(engines.glob(f"*.{kind}")):
            found[path.stem] = (kind, path)
    return found


def _place(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (engines are large), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def resolve_models(components: str | list[str], available_engines) -> tuple[list[str], list[str]]:
    """(pipeline models, engine models) that `components` ('all' or names, comma-separated) asks for."""
    names = components.split(",") if isinstance(components, str) else list(components)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(PIPELINE_MODELS), sorted(available_engines)
    known = set(PIPELINE_MODELS) | set(available_engines)
    unknown = [n for n in names if n not in known]
    if unknown:
        engines_hint = f"; engines in --engines: {', '.join(sorted(available_engines))}" if available_engines else \
            " (engine models need --engines DIR, the folder `editrt export` wrote)"
        raise InputError(f"--component {unknown[0]!r}: expected 'all' or pipeline models "
                         f"{', '.join(PIPELINE_MODELS)}{engines_hint}", field="components")
    return [n for n in names if n in PIPELINE_MODELS], [n for n in names if n in available_engines]


def bls_routes(editor: str, engine_names) -> list[str]:
    """The engines among `engine_names` a pipeline model of `editor` calls over BLS: the editor's networks
    (export/specs.NETWORK_ROLES) but the optional depth and matting, which run in the pipeline model."""
    return sorted(n for n in engine_names if n in editor_networks(editor, optional=False))


def write_model_repository(weights_dir: Path, out: Path, engines: str | Path | None = None,
                           components: str | list[str] = "all", log=lambda what: None, device: str = "auto",
                           dtype: str = "auto", backend: str = "torch", bls: bool | None = None) -> Path:
    """Write a Triton model repository serving `weights_dir` to `out` (which must not exist or be empty).

    `engines`: the folder `editrt export` wrote; each engine in it becomes a model. `device`: 'auto'
    (CUDA when the server has it), 'cpu' or 'cuda'; instance groups follow it (KIND_GPU for cuda).
    `dtype`, `backend`: what the pipeline models pass to from_pretrained (backend 'onnxruntime' or
    'tensorrt' runs the engines in `engines` in-process).
    `bls`: the pipeline models call the engine models of this repository (BLS requests) instead of
    running those networks in-process; None = yes when engine models are written. The config's
    `bls` parameter lists them ("network" or "network=model", comma-separated).
    """
    from editrt.models.components import WeightsLayout
    from editrt.models.files import write_dir_atomic

    weights_dir = Path(weights_dir).resolve()
    layout = WeightsLayout(weights_dir)
    layout.check_root()
    specs = network_specs(layout.network_config())
    engines_dir = None if engines is None else Path(engines).resolve()
    if engines_dir is not None and not engines_dir.is_dir():
        raise InputError(f"--engines {engines}: not a directory; expected the folder `editrt export` wrote", field="engines")
    if backend not in ("torch", "onnxruntime", "tensorrt"):
        raise InputError(f"backend {backend!r}: expected torch, onnxruntime or tensorrt", field="backend")
    if backend != "torch" and engines_dir is None:
        raise InputError(f"--engines: the {backend} backend needs the folder written by `editrt export`", field="engines")
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"device {device!r}: expected auto, cpu or cuda", field="device")
    found = {} if engines_dir is None else {n: f for n, f in _engine_files(engines_dir).items() if n in specs}
    pipelines, engine_names = resolve_models(components, found)
    if device == "auto":
        import torch

        device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device_kind = device
    instance_kind = "KIND_GPU" if device_kind == "cuda" else "KIND_CPU"
    parameters = {"weights": str(weights_dir), "device": device, "dtype": dtype, "backend": backend}
    if engines_dir is not None:
        parameters["engines"] = str(engines_dir)

    use_bls = bool(engine_names) if bls is None else bls

    def write(tmp: Path) -> None:
        for name in pipelines:
            model = PIPELINE_MODELS[name]
            routes = bls_routes(model.editor, engine_names) if use_bls else []
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(pipeline_config(
                model, {**parameters, **({"bls": ",".join(routes)} if routes else {})}, instance_kind))
            (tmp / name / "1" / "model.py").write_text(MODEL_PY.format(name=name, cls=MODEL_CLASSES[name]))
            log(f"triton: {name} (python backend)")
        for name in engine_names:
            kind, path = found[name]
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(engine_config(specs[name], kind, instance_kind))
            _place(path, tmp / name / "1" / MODEL_FILES[kind])
            for data in path.parent.glob(f"{path.name}.data"):  # ONNX external weights keep their file name
                _place(data, tmp / name / "1" / data.name)
            log(f"triton: {name} ({PLATFORMS[kind]})")
        (tmp / "editrt_repository.json").write_text(json.dumps(
            {"weights": str(weights_dir), "engines": None if engines_dir is None else str(engines_dir),
             "device": device, "dtype": dtype, "backend": backend, "bls": use_bls, "pipeline_models": pipelines,
             "engine_models": engine_names}, indent=2) + "\n")
        (tmp / "README.md").write_text(repository_readme(pipelines, engine_names, specs, found, use_bls))

    write_dir_atomic(out, write)
    log(f"triton model repository ({len(pipelines)} pipeline models, {len(engine_names)} engine models) -> {out}")
    return Path(out)


def repository_readme(pipelines: list[str], engine_names: list[str], specs: dict, found: dict, bls: bool) -> str:
    lines = ["# editrt model repository for Triton Inference Server", "",
             "Written by `editrt export --format triton`. Launch it with a Triton server whose Python environment "
             "has editrt installed (the Python backend's stub runs the `python` on `PATH`):", "",
             "```", "tritonserver --model-repository=$PWD", "```", "",
             "For a CPU-only machine, the `tritonserver` of the `nvidia-pytriton` wheel works: unpack the wheel, "
             "copy `pytriton/tritonserver/python_backend_stubs/3.X/triton_python_backend_stub` (your Python's "
             "version) into `pytriton/tritonserver/backends/python/`, then", "",
             "```", "LD_LIBRARY_PATH=$WHEEL/nvidia_pytriton.libs:$(python -c 'import sysconfig; "
             "print(sysconfig.get_config_var(\"LIBDIR\"))') \\",
             "  $WHEEL/pytriton/tritonserver/bin/tritonserver --model-repository=$PWD \\",
             "  --backend-directory=$WHEEL/pytriton/tritonserver/backends", "```", "",
             "That bundle has only the Python backend: load the pipeline models alone with "
             "`--model-control-mode=explicit --load-model=segment --load-model=inpaint ...`.", "",
             "Ready when `curl -sf localhost:8000/v2/health/ready` succeeds. Every model's config parameters name "
             "the weights directory (`weights`), `device` (auto, cpu, cuda), `dtype` (auto = fp16 on CUDA, "
             "fp32 on CPU) and `backend`; edit them in `config.pbtxt` to move the repository.", "",
             "Memory: each pipeline model is its own process with its own pipeline (segment, inpaint and "
             "reposition each load the repositioning weights, in-process even where they call engine models by "
             "BLS), so load only the models you serve.", "",
             "Bad requests (wrong shapes, missing inputs, points outside the image) get a Triton error naming the "
             "input; the server keeps serving. Optional scalar inputs take the CLI's defaults when absent, and may "
             "instead be sent as request parameters of their lower-case names (`{\"steps\": 20}`). Masks are UINT8 "
             "(nonzero = inside); text goes in request parameters (no BYTES tensors).", ""]
    if pipelines:
        lines += ["## Pipeline models (Python backend)", ""]
        for name in pipelines:
            model = PIPELINE_MODELS[name]
            lines += [f"### `{name}`", "", model.about + ".", "", "| tensor | type | dims | |", "| --- | --- | --- | --- |"]
            for direction, ports in (("in", model.inputs), ("out", model.outputs)):
                for p in ports:
                    note = ("optional; " if p.optional else "") + p.about
                    lines.append(f"| {direction}: `{p.name}` | {TRITON_DTYPES[p.dtype][5:]} | {list(p.dims)} | {note} |")
            for q in model.parameters:
                lines.append(f"| request parameter `{q.name}` | string | | {q.about} |")
            lines.append("")
        lines += ["Elements: `elements_partition` returns the elements as tensors; an edit is the client changing "
                  "them (a move adds (dx, dy) to CENTROIDS, a resize scales SIZES, a delete clears ALIVE) before "
                  "sending FEATURES, CENTROIDS, SIZES, ALIVE, IMAGE_SIZE and WORKING_SIZE to `elements_render`. "
                  "Unedited, the render equals `editrt elements render` of the partition's ELEMENTS.json byte for "
                  "byte.", ""]
    if engine_names:
        lines += ["## Engine models", "", "| model | platform | max_batch_size | inputs | outputs |",
                  "| --- | --- | --- | --- | --- |"]
        for name in engine_names:
            kind = found[name][0]
            spec = specs[name]
            io = [", ".join(f"`{t.name}` {list(t.axes)}" for t in ts) for ts in (spec.inputs, spec.outputs)]
            lines.append(f"| `{name}` | {PLATFORMS[kind]} | {max_batch_size(spec, kind)} | {io[0]} | {io[1]} |")
        lines += ["", "Named axes are dynamic (-1 in config.pbtxt); with max_batch_size > 0 the first axis is "
                  "Triton's batch dimension and requests are batched dynamically. The SAM decoders are not "
                  "batchable: their image embeddings are one [1, C, h, w] and `orig_im_size` has no batch axis. "
                  "TensorRT plans batch only within their optimisation profile.", ""]
        lines += ["The pipeline models call these engine models (BLS requests; their `bls` parameter lists the "
                  "networks) and run the other networks in-process: load the engine models too." if bls else
                  "The pipeline models run every network in-process; the engine models serve clients directly.", ""]
    return "\n".join(lines)
