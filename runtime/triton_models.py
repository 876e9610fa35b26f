"""editrt's pipelines as Triton Inference Server Python-backend models (TritonPythonModel classes).

`editrt export --format triton` writes a `model.py` per pipeline model that imports one class from
here; the server's Python stub runs it with the environment of the `python` on its PATH. Each
model loads its pipeline in `initialize` from the config's parameters (weights, device, dtype,
backend, engines) and answers each request by calling the pipeline's public API with the CLI's
defaults, so a response equals the CLI's output on the same inputs and seed byte for byte.
The request / response tensors are declared once, in export/triton.py's PIPELINE_MODELS.

Errors: a request the pipeline rejects (EditError: a point outside the image, an empty mask, an
unknown task) is answered with a Triton INVALID_ARG error carrying editrt's one-line message;
anything else with an INTERNAL error naming the exception (its traceback goes to the server log).
Either way only that request fails and the model keeps serving.

Bounds (LIMITS; a config.pbtxt parameter of the same name overrides one): every request's work and
memory are bounded from its declared sizes before any work starts, as `editrt serve` bounds them
(docs/limits.md): image pixels and sides, points, grid, iterations, steps, resolution, the processing
canvas and its pixels x steps, element counts, IMAGE_SIZE and WORKING_SIZE; floating-point inputs
must be finite (NaN guidance is refused, not rendered). Each is INVALID_ARG naming the input.
"""
from __future__ import annotations

import json
import sys
import traceback
from abc import ABC, abstractmethod

import numpy as np

from editrt.errors import EditError, EngineError, InputError
from editrt.export.specs import check_inputs
from editrt.export.triton import PIPELINE_MODELS, PipelineModel

LIMITS = {"max_pixels": 4096 * 4096, "max_side": 8192, "max_points": 64, "max_grid": 32, "max_iterations": 10,
          "max_steps": 100, "max_resolution": 2048, "max_work_pixels": 2048 * 2048,
          "max_pixel_steps": 1024 * 1024 * 50, "max_elements": 4096}
IMAGE_INPUTS = ("IMAGE", "MASK", "COMPLETE_MASK", "OCCLUDER_MASK", "EXISTING_SHADOW_MASK", "NEW_SHADOW_REGION")


def check_image_shape(name: str, shape, limits: dict) -> None:
    """An image or mask input's (H, W, ...) within the pixel limits, before its data is copied."""
    if len(shape) >= 2:
        h, w = int(shape[0]), int(shape[1])
        if h > limits["max_side"] or w > limits["max_side"] or h * w > limits["max_pixels"]:
            raise InputError(f"{name}: {w}x{h} is larger than the limit ({limits['max_pixels']} pixels, "
                             f"{limits['max_side']} per side)", field=name)


def check_work(limits: dict, image_hw, resolution: int | None, default_resolution: int, steps: int | None,
               canvas_hw=None) -> None:
    """One denoising pass (or a partition, steps None): RESOLUTION within max_resolution, the processing canvas
    (from the image and RESOLUTION, or `canvas_hw` given) within max_work_pixels, canvas x STEPS within
    max_pixel_steps, STEPS within max_steps."""
    from editrt.runtime.images import processing_size

    if steps is not None and steps > limits["max_steps"]:
        raise InputError(f"STEPS: at most {limits['max_steps']}, got {steps}", field="STEPS")
    if resolution is not None and resolution > limits["max_resolution"]:
        raise InputError(f"RESOLUTION: at most {limits['max_resolution']}, got {resolution}", field="RESOLUTION")
    h, w = canvas_hw if canvas_hw is not None else processing_size(tuple(image_hw), resolution or default_resolution)
    field = "WORKING_SIZE" if canvas_hw is not None else ("RESOLUTION" if resolution is not None else "IMAGE")
    if h * w > limits["max_work_pixels"]:
        raise InputError(f"{field}: a {w}x{h} processing canvas is more than the limit "
                         f"({limits['max_work_pixels']} pixels)", field=field)
    if steps is not None and h * w * steps > limits["max_pixel_steps"]:
        raise InputError(f"STEPS: {steps} steps on a {w}x{h} canvas is more work than the limit "
                         f"({limits['max_pixel_steps']} pixel-steps)", field="STEPS")


def _pb_utils():
    """The Python backend's utilities: importable only inside the server's stub process."""
    import triton_python_backend_utils

    return triton_python_backend_utils


def _device(parameter: str, args: dict) -> str:
    if parameter != "auto":
        return parameter if parameter != "cuda" or args.get("model_instance_kind") != "GPU" \
            else f"cuda:{args['model_instance_device_id']}"
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    from editrt.models.common import default_device

    return str(default_device())


def tensor_to_numpy(tensor) -> np.ndarray:
    """A request tensor as an owned numpy array, through DLPack.

    Not `as_numpy()`: the nvidia-pytriton build of the stub (Triton 2.51) reads numpy's dtype
    descriptor with numpy 1's layout, so under numpy 2 every `as_numpy()` array has zero strides
    (all elements equal the first) and `Tensor(name, array)` sends zero bytes. DLPack never touches
    numpy's descriptor and is right on every build.
    """
    from torch.utils import dlpack

    return dlpack.from_dlpack(tensor.to_dlpack()).numpy().copy()  # the request's memory is not ours to keep


def decimal(value) -> float:
    """An FP32 input value as the shortest decimal that rounds to it: the number the client wrote.

    A client's 1.2 arrives as float32 1.2000000477; the CLI parses "1.2" as the double 1.2, and a
    subject warped by either scale differs in a few pixels. Request parameters (JSON) are doubles already.
    """
    return float(str(value)) if isinstance(value, np.float32) else float(value)


def numpy_to_tensor(pb_utils, name: str, array: np.ndarray):
    import torch
    from torch.utils import dlpack

    return pb_utils.Tensor.from_dlpack(name, dlpack.to_dlpack(torch.from_numpy(np.array(array, order="C"))))


class BlsEngine:
    """An engine (runtime/engines.py protocol) served by another model of the same Triton server.

    Each call is a BLS request (Business Logic Scripting: `pb_utils.InferenceRequest(...).exec()`)
    to `model_name`, with the spec's input names; the denoising loop and the rest of the pipeline
    stay in this Python model. Tensors cross through DLPack (see `tensor_to_numpy`). A batchable
    engine model (max_batch_size > 0) takes the spec's leading axis as its batch dimension, which
    is how a client would send it too, so inputs go as they are.
    """

    backend = "triton-bls"
    supports_cuda_graph = False  # every call leaves the process
    compiled = False
    lora = None  # an exported harmonizer has its LoRA fused at c = 1

    def __init__(self, spec, model_name: str, device, pb_utils):
        import torch

        self.spec, self.model_name, self.device, self._pb = spec, model_name, torch.device(device), pb_utils

    def prepare(self) -> None:
        """Fixed weights: the engine model holds them."""

    def before_capture(self) -> None:
        """Never captured (supports_cuda_graph is False)."""

    def __call__(self, **inputs):
        import torch
        from torch.utils import dlpack

        check_inputs(self.spec, inputs)
        dtypes = {t.name: getattr(torch, t.dtype) for t in self.spec.inputs}
        tensors = [self._pb.Tensor.from_dlpack(name, dlpack.to_dlpack(
            inputs[name].detach().to("cpu", dtypes[name]).contiguous())) for name in self.spec.input_names]
        response = self._pb.InferenceRequest(model_name=self.model_name, inputs=tensors,
                                             requested_output_names=self.spec.output_names).exec()
        if response.has_error():
            raise EngineError(f"{self.spec.name}: the served model {self.model_name!r} failed: "
                              f"{response.error().message()}")
        return {name: dlpack.from_dlpack(self._pb.get_output_tensor_by_name(response, name).to_dlpack()).clone()
                .to(self.device) for name in self.spec.output_names}


def bls_engines(parameter: str, pipe, pb_utils) -> dict[str, str]:
    """Replace the pipeline's engines named in the `bls` parameter ("network[=model],...") by BLS calls.

    Returns network -> served model name. The pipeline's engine dict is shared with its segmenter
    and loop cache, so replacing entries in place reroutes every stage that runs them.
    """
    routes = {}
    for item in filter(None, (part.strip() for part in parameter.split(","))):
        network, _, model_name = item.partition("=")
        if network not in pipe.engines:
            raise InputError(f"bls: {network!r} is not an engine of this pipeline; expected one of "
                             f"{', '.join(sorted(pipe.engines))}", field="bls")
        routes[network] = model_name or network
    for network, model_name in routes.items():
        pipe.engines[network] = BlsEngine(pipe.engines[network].spec, model_name, pipe.device, pb_utils)
    return routes


class Request:
    """One request's inputs as numpy values, with the declared defaults for absent optional inputs.

    An optional scalar input may come as a tensor or as a request parameter of its lower-case name;
    the text options (PipelineModel.parameters) come as request parameters only.
    """

    def __init__(self, model: PipelineModel, request, pb_utils, limits: dict | None = None):
        self.model, self._request, self._pb = model, request, pb_utils
        self.model_limits = limits or LIMITS
        text = request.parameters() if hasattr(request, "parameters") else "{}"
        self.parameters = json.loads(text or "{}")
        known = {p.name.lower() for p in model.inputs if p.dims == (1,)} | {q.name for q in model.parameters}
        unknown = sorted(set(self.parameters) - known)
        if unknown:
            raise InputError(f"{model.name}: unknown request parameter {unknown[0]!r}; expected one of "
                             f"{', '.join(sorted(known))}", field="parameters")

    def array(self, name: str):
        """The input's array; None for an absent optional input (Triton leaves required ones to the model)."""
        tensor = self._pb.get_input_tensor_by_name(self._request, name)
        if tensor is None:
            if not self.model.input(name).optional:
                raise InputError(f"{self.model.name}: missing input {name!r}; expected "
                                 f"{', '.join(p.name for p in self.model.inputs if not p.optional)}", field=name)
            return None
        if name in IMAGE_INPUTS:
            check_image_shape(name, tensor.shape(), self.model_limits)
        arr = tensor_to_numpy(tensor)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InputError(f"{name}: expected finite numbers (no NaN or infinity)", field=name)
        return arr

    def value(self, name: str):
        """A scalar input as a Python value; the request parameter, or the default, where absent."""
        port = self.model.input(name)
        arr = self.array(name)
        if arr is None:
            return self.parameters.get(name.lower(), port.default)
        if name.lower() in self.parameters:
            raise InputError(f"{name}: given both as an input tensor and as a request parameter", field=name)
        if arr.size != 1:
            raise InputError(f"{name}: expected one value, got shape {list(arr.shape)}", field=name)
        value = arr.reshape(-1)[0]
        return decimal(value) if arr.dtype == np.float32 else value.item()

    def text(self, name: str) -> str:
        value = self.parameters.get(name, next(q.default for q in self.model.parameters if q.name == name))
        if not isinstance(value, str):
            raise InputError(f"request parameter {name!r}: expected a string, got {value!r}", field=name)
        return value

    def integer(self, name: str):
        value = self.value(name)
        if value is None:
            return None
        try:
            whole = not isinstance(value, bool) and float(value).is_integer()
        except (TypeError, ValueError):  # e.g. a request parameter "abc"
            whole = False
        if not whole:
            raise InputError(f"{name}: expected an integer, got {value!r}", field=name)
        return int(float(value))

    def number(self, name: str) -> float:
        value = self.value(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise InputError(f"{name}: expected a finite number, got {value!r}", field=name)
        return float(value)

    def prompt(self) -> dict:
        """points / labels / box as the CLI passes them: labels default to 1 (foreground)."""
        points, labels, box = self.array("POINTS"), self.array("LABELS"), self.array("BOX")
        if points is not None and len(points) > self.model_limits["max_points"]:
            raise InputError(f"POINTS: at most {self.model_limits['max_points']} points, got {len(points)}", field="POINTS")
        if labels is not None and points is None:
            raise InputError("LABELS: given without POINTS", field="LABELS")
        if points is not None:
            labels = [1] * len(points) if labels is None else [int(v) for v in labels]
            if len(labels) != len(points):
                raise InputError(f"LABELS: expected one label per point ({len(points)}), got {len(labels)}", field="LABELS")
            points = [[decimal(x), decimal(y)] for x, y in points]
        return dict(points=points, labels=labels, box=None if box is None else [decimal(v) for v in box])

    def mask(self, name: str):
        arr = self.array(name)
        return None if arr is None else arr != 0


def _mask_bytes(mask: np.ndarray) -> np.ndarray:
    """A bool mask as uint8 255 / 0: the pixels of the CLI's mask PNG (BOOL tensors: see export/triton.py)."""
    return np.where(mask, 255, 0).astype(np.uint8)


class PipelineModelBase(ABC):
    """initialize / execute / finalize shared by the five models; subclasses say what one request does."""

    name: str  # a PIPELINE_MODELS key

    def initialize(self, args: dict) -> None:
        self.pb = _pb_utils()
        self.model = PIPELINE_MODELS[self.name]
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.limits = {k: int(params.get(k, v)) for k, v in LIMITS.items()}
        if "weights" not in params:
            raise InputError(f"{self.name}: config.pbtxt has no 'weights' parameter (the weights directory)", field="weights")
        device = _device(params.get("device", "auto"), args)
        dtype = params.get("dtype", "auto")
        if dtype == "auto":
            from editrt.models.common import default_dtype

            dtype = default_dtype(device)
        options = dict(device=device, dtype=dtype, backend=params.get("backend", "torch"),
                       engines=params.get("engines") or None)
        if self.model.editor == "reposition":
            from editrt.runtime.reposition import RepositionPipeline

            self.pipe = RepositionPipeline.from_pretrained(params["weights"], **options)
        else:
            from editrt.runtime.elements_pipeline import ElementsPipeline

            self.pipe = ElementsPipeline.from_pretrained(params["weights"], **options)
        self.bls = bls_engines(params.get("bls", ""), self.pipe, self.pb)

    def execute(self, requests) -> list:
        responses = []
        for request in requests:  # requests of one call are independent: one failing fails only itself
            try:
                outputs = self.run(Request(self.model, request, self.pb, self.limits))
                responses.append(self.pb.InferenceResponse(output_tensors=[
                    numpy_to_tensor(self.pb, port.name, outputs[port.name])
                    for port in self.model.outputs]))
            except EditError as e:
                responses.append(self.pb.InferenceResponse(error=self._error(str(e), "INVALID_ARG")))
            except Exception as e:  # noqa: BLE001 - a bug answers this request with an error, the model serves on
                traceback.print_exc(file=sys.stderr)
                responses.append(self.pb.InferenceResponse(
                    error=self._error(f"{self.name}: internal error {type(e).__name__}: {e}", "INTERNAL")))
        return responses

    def _error(self, message: str, code: str):
        error = self.pb.TritonError
        return error(message, getattr(error, code)) if hasattr(error, code) else error(message)

    def finalize(self) -> None:
        self.pipe = None

    @abstractmethod
    def run(self, request: Request) -> dict[str, np.ndarray]:
        """One request's outputs by name: what each pipeline model computes."""


class SegmentModel(PipelineModelBase):
    name = "segment"

    def run(self, r: Request) -> dict:
        prompt = r.prompt()
        if prompt["points"] is None and prompt["box"] is None:
            raise InputError("segment: expected POINTS and/or BOX", field="POINTS")
        return {"MASK": _mask_bytes(self.pipe.segment(r.array("IMAGE"), **prompt))}


class InpaintModel(PipelineModelBase):
    name = "inpaint"

    def run(self, r: Request) -> dict:
        image = r.array("IMAGE")
        check_work(self.limits, image.shape[:2], r.integer("RESOLUTION"), self.pipe.default_resolution,
                   r.integer("STEPS"))
        try:
            result = self.pipe.inpaint(image, r.mask("MASK"), task=r.text("task"), steps=r.integer("STEPS"),
                                       guidance=r.number("GUIDANCE"), seed=r.integer("SEED"),
                                       resolution=r.integer("RESOLUTION"), crop_padding=r.integer("CROP_PADDING"),
                                       crop_size=r.text("crop_size") or None)
        except EditError as e:  # the crop's fields named as this model's input
            port = {"crop_padding": "CROP_PADDING"}.get(e.field)
            raise type(e)(f"{port}: {e}" if port else str(e), field=port or e.field) from None
        return {"IMAGE": np.asarray(result)}


class RepositionModel(PipelineModelBase):
    name = "reposition"
    # the library's field names (EditError.field: SeeleEdit / Quality attributes, the call's keywords) -> this
    # model's input names; "occlusion" is the OCCLUDER_MASK input or the `occlusion` request parameter
    PORTS = {"mask": "MASK", "points": "POINTS", "labels": "LABELS", "box": "BOX", "move": "MOVE", "scale": "SCALE",
             "complete_mask": "COMPLETE_MASK", "matting": "MATTING", "trimap_band": "TRIMAP_BAND",
             "existing_shadow": "EXISTING_SHADOW_MASK", "new_shadow_region": "NEW_SHADOW_REGION",
             "harmonize": "HARMONIZE", "steps": "STEPS", "guidance": "GUIDANCE", "seed": "SEED",
             "resolution": "RESOLUTION", "crop_padding": "CROP_PADDING", "crop_size": "crop_size"}

    def run(self, r: Request) -> dict:
        mask, prompt = r.mask("MASK"), r.prompt()
        if mask is None and prompt["points"] is None and prompt["box"] is None:
            raise InputError("reposition: expected the subject as MASK, POINTS or BOX", field="MASK")
        image = r.array("IMAGE")
        check_work(self.limits, image.shape[:2], r.integer("RESOLUTION"), self.pipe.default_resolution,
                   r.integer("STEPS"))
        try:
            edit, quality = self.edit(r)
            result = self.pipe(image, edit, mask=mask, **prompt, quality=quality)
        except EditError as e:  # named as this model's input, then editrt's message
            port = self.port(e.field, r)
            raise type(e)(f"{port}: {e}" if port else str(e), field=port or e.field) from None
        return {"IMAGE": np.asarray(result.image), "REGION": _mask_bytes(result.stages["output"].mask)}

    @staticmethod
    def edit(r: Request):
        """The request's inputs as a SeeleEdit and a Quality (runtime/edits.py)."""
        from editrt.runtime.edits import Quality, SeeleEdit

        occluder = r.mask("OCCLUDER_MASK")
        occlusion = r.text("occlusion")
        if occluder is not None:
            if occlusion != "none":
                raise InputError("OCCLUDER_MASK: give the occluder as OCCLUDER_MASK or occlusion=auto, not both",
                                 field="occlusion")
            occlusion = occluder
        # scale="auto" (a request parameter, as the CLI's `--scale auto`): the depths at the footpoints decide
        scale = "auto" if r.parameters.get("scale") == "auto" else r.number("SCALE")
        edit = SeeleEdit(move=[decimal(v) for v in r.array("MOVE")], scale=scale, occlusion=occlusion,
                         matting=bool(r.integer("MATTING")), trimap_band=r.integer("TRIMAP_BAND"),
                         harmonize=bool(r.integer("HARMONIZE")), complete_mask=r.mask("COMPLETE_MASK"),
                         existing_shadow=r.mask("EXISTING_SHADOW_MASK"), new_shadow_region=r.mask("NEW_SHADOW_REGION"))
        quality = Quality(steps=r.integer("STEPS"), guidance=r.number("GUIDANCE"), seed=r.integer("SEED"),
                          resolution=r.integer("RESOLUTION"), crop_padding=r.integer("CROP_PADDING"),
                          crop_size=r.text("crop_size") or None)
        return edit, quality

    def port(self, field: str | None, r: Request) -> str | None:
        if field == "occlusion":
            return "OCCLUDER_MASK" if r.mask("OCCLUDER_MASK") is not None else "occlusion"
        return self.PORTS.get(field)


class ElementsPartitionModel(PipelineModelBase):
    name = "elements_partition"

    def run(self, r: Request) -> dict:
        image, grid, iterations = r.array("IMAGE"), r.integer("GRID"), r.integer("ITERATIONS")
        if grid is not None and grid > self.limits["max_grid"]:
            raise InputError(f"GRID: at most {self.limits['max_grid']}, got {grid}", field="GRID")
        if iterations is not None and iterations > self.limits["max_iterations"]:
            raise InputError(f"ITERATIONS: at most {self.limits['max_iterations']}, got {iterations}", field="ITERATIONS")
        check_work(self.limits, image.shape[:2], r.integer("RESOLUTION"), self.pipe.default_resolution, None)
        elements = self.pipe.partition(image, resolution=r.integer("RESOLUTION"), grid=grid,
                                       beta=r.number("BETA"), iterations=iterations)
        return {"LABELS": elements.paint().astype(np.int32), "FEATURES": elements.features.astype(np.float32),
                "CENTROIDS": elements.centroids.astype(np.float32), "SIZES": elements.sizes.astype(np.float32),
                "ALIVE": elements.alive.astype(np.uint8), "IMAGE_SIZE": np.array(elements.image_size, np.int32),
                "WORKING_SIZE": np.array(elements.working_size, np.int32)}


class ElementsRenderModel(PipelineModelBase):
    name = "elements_render"

    def run(self, r: Request) -> dict:
        from editrt.runtime.elements import Elements

        features, centroids, sizes, alive = (r.array(n) for n in ("FEATURES", "CENTROIDS", "SIZES", "ALIVE"))
        n = len(features)
        if n > self.limits["max_elements"]:
            raise InputError(f"FEATURES: at most {self.limits['max_elements']} elements, got {n}", field="FEATURES")
        for name, arr in (("CENTROIDS", centroids), ("SIZES", sizes), ("ALIVE", alive)):
            if len(arr) != n:
                raise InputError(f"{name}: expected {n} rows (one per element of FEATURES), got {len(arr)}", field=name)
        image_size = tuple(int(v) for v in r.array("IMAGE_SIZE"))
        if min(image_size) < 1:
            raise InputError(f"IMAGE_SIZE: expected (H, W) >= 1, got {list(image_size)}", field="IMAGE_SIZE")
        check_image_shape("IMAGE_SIZE", image_size, self.limits)
        working = r.array("WORKING_SIZE")
        # the decoder reads features, positions, sizes and alive only; regions matter for edits, not here
        elements = Elements(image_size, features.astype(np.float32), centroids.astype(np.float32),
                            sizes.astype(np.float32), alive != 0, [np.zeros((0, 0), bool)] * n,
                            np.zeros((n, 2), np.float32),
                            working_size=None if working is None else tuple(int(v) for v in working))
        if min(elements.working_size) < 8 or any(v % 8 for v in elements.working_size):
            raise InputError(f"WORKING_SIZE: expected multiples of 8, got {list(elements.working_size)}", field="WORKING_SIZE")
        resolution, steps = r.integer("RESOLUTION"), r.integer("STEPS")
        canvas = None if resolution is not None else elements.working_size
        check_work(self.limits, image_size, resolution, self.pipe.default_resolution, steps, canvas)
        image = self.pipe.decode(elements, prompt=r.text("prompt"), guidance=r.number("GUIDANCE"),
                                 steps=r.integer("STEPS"), seed=r.integer("SEED"), resolution=r.integer("RESOLUTION"))
        return {"IMAGE": np.asarray(image)}
