"""The `editrt` command line.

Every user error prints ONE line on stderr and exits 2: bad input (EditError), argparse's own
complaints (unknown option, missing argument, bad choice: `_Parser` turns them into UsageError),
and the operating system refusing a file (OSError). Outputs are written atomically, so a failed
command leaves no file behind. Anything else is a bug and keeps its traceback.

`doctor` and `serve` are imported only when they run (`_LAZY_COMMANDS`): a missing optional
dependency of one never breaks another command.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from editrt import __version__
from editrt.errors import EditError, InputError, UsageError

EXIT_BAD_INPUT = 2


# ---------------------------------------------------------------------- argument helpers
def _field_of(option: str) -> str:
    """The keyword an option names: --complete-mask -> complete_mask, -o -> output (InputError.field)."""
    return {"-o": "output"}.get(option, option.lstrip("-").replace("-", "_"))


def _numbers(text: str, name: str, count: tuple[int, ...]) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in count:
        forms = {2: "X,Y", 3: "X,Y,LABEL", 4: "X0,Y0,X1,Y1"}
        raise InputError(f"{name} {text!r}: expected {' or '.join(forms[c] for c in count)} (numbers)", field=_field_of(name))
    return values


def load_image(path: str, name: str = "image", mode: str = "RGB") -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except FileNotFoundError:
        raise InputError(f"{name} {path}: no such file", field=_field_of(name)) from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{name} {path}: cannot read it as an image ({type(e).__name__})", field=_field_of(name)) from None


def load_mask(path: str, name: str) -> np.ndarray:
    return load_image(path, name, mode="L") > 127


def _device(args) -> str:
    from editrt.models.common import default_device, resolve_device

    return str(resolve_device(args.device, "--device") if args.device else default_device())


def _dtype(args, device: str) -> str:
    from editrt.models.common import default_dtype

    return args.dtype or default_dtype(device)


def _dtype_option(text: str) -> str:
    """--dtype: the canonical name of any spelling models/common.py knows (float16 -> fp16)."""
    from editrt.models.dtype_names import DTYPE_ALIASES

    return DTYPE_ALIASES.get(text, text)


def _progress(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _log(args):
    return (lambda what: None) if args.quiet else (lambda what: print(f"editrt: {what}", file=sys.stderr))


def _backend(args) -> dict:
    from editrt.runtime.backends import check_backend

    check_backend(args.backend, args.engines)
    return {"backend": args.backend, "engines": args.engines, "compile": args.compile, "cuda_graphs": args.cuda_graphs}


CLI_MAX_CANVAS = 4096 * 4096  # pixels of a processing canvas: beyond any model's trained size, hours on a CPU


def _check_canvas(args, size_hw) -> None:
    """--resolution on this image: its processing canvas (short side = resolution, aspect kept) within
    CLI_MAX_CANVAS, before any weights load (a 64x48 image at --resolution 4096 would be 5464x4096)."""
    from editrt.runtime.images import processing_size

    if getattr(args, "resolution", None) is None:
        return
    h, w = processing_size(tuple(size_hw), args.resolution)
    if h * w > CLI_MAX_CANVAS:
        raise InputError(f"--resolution {args.resolution}: a {w}x{h} processing canvas for this {size_hw[1]}x"
                         f"{size_hw[0]} image; expected at most {CLI_MAX_CANVAS} pixels (a lower --resolution)", field="resolution")


def _check_prompts(args) -> None:
    """--prompts FILE exists (before any weights load; its tensors are checked against the UNet after)."""
    path = getattr(args, "prompts", None)
    if path is not None and not Path(path).is_file():
        raise InputError(f"--prompts {path}: no such file; expected a task prompts .safetensors file", field="prompts")


def _reposition_pipeline(args):
    from editrt.errors import WeightsError
    from editrt.runtime.reposition import RepositionPipeline
    from editrt.weights import resolve_weights

    _check_prompts(args)
    device = _device(args)
    weights = resolve_weights(args.weights, log=_log(args))
    pipe = RepositionPipeline.from_pretrained(weights, device=device, dtype=_dtype(args, device), **_backend(args))
    if getattr(args, "prompts", None) is not None:
        try:
            pipe.use_prompts(args.prompts)
        except WeightsError as e:
            raise WeightsError(f"--prompts {e}", field="prompts") from None
    return pipe


def _prompt_args(args) -> dict:
    points = labels = box = None
    if args.point:
        parsed = [_numbers(p, "--point", (2, 3)) for p in args.point]
        points = [p[:2] for p in parsed]
        labels = [int(p[2]) if len(p) == 3 else 1 for p in parsed]
    if args.box:
        box = _numbers(args.box, "--box", (4,))
    return dict(points=points, labels=labels, box=box)


def _check_output(path: str, name: str = "-o") -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise InputError(f"{name} {path}: expected a .png file name", field=_field_of(name))
    if out.is_dir():
        raise InputError(f"{name} {path}: is a directory; expected a .png file name", field=_field_of(name))
    return out


# ---------------------------------------------------------------------- commands
def cmd_weights_init(args) -> None:
    from editrt.weights import init_weights

    path = init_weights(args.dir, args.config, args.seed, log=lambda what: _log(args)(f"writing {what}"))
    _log(args)(f"wrote '{args.config}' random weights (seed {args.seed}) to {path}")


def cmd_weights_prompts(args) -> None:
    # Task prompts from text (paper App. A.2), Table 1's SD-baseline texts, or a textual-inversion embedding:
    # editrt/prompts.py
    from editrt.prompts import write_prompts_from_embedding, write_prompts_from_preset, write_prompts_from_text

    texts = {}
    for item in args.from_text or []:  # the first '=' ends the task name: the text may hold more
        task, sep, text = item.partition("=")
        if not sep:
            raise InputError(f"--from-text {item!r}: expected TASK=TEXT", field="from_text")
        texts[task] = text
    if args.from_embedding is not None:
        if args.from_text or args.preset:
            raise InputError("--from-embedding: give it alone (not with --from-text or --preset)", field="from_embedding")
        if args.task is None:
            raise InputError("--from-embedding: expected --task remove|complete|harmonize (the prompt it writes)",
                             field="task")
        path = write_prompts_from_embedding(args.dir, args.from_embedding, args.task, text=args.text,
                                            output=args.output, tokens=50 if args.tokens is None else args.tokens,
                                            log=_log(args))
        _log(args)(f"task prompt {args.task} from {args.from_embedding} -> {path}")
        return
    if args.task is not None or args.text is not None:
        raise InputError("--task/--text: only with --from-embedding", field="task")
    if args.preset is not None:
        if args.tokens is not None:
            raise InputError(f"--tokens {args.tokens}: --preset encodes all 77 positions as diffusers does; "
                             "leave --tokens out", field="tokens")
        path = write_prompts_from_preset(args.dir, args.preset, texts, output=args.output, log=_log(args))
        _log(args)(f"task prompts {args.preset} (SEELE Table 1) -> {path}")
        return
    if not args.from_text:
        raise InputError("weights prompts: expected --from-text TASK=TEXT..., --preset NAME or --from-embedding FILE",
                         field="from_text")
    path = write_prompts_from_text(args.dir, texts, output=args.output, tokens=50 if args.tokens is None else args.tokens,
                                   log=_log(args))
    _log(args)(f"task prompts from text -> {path}")


def cmd_outpaint(args) -> None:
    # Outpainting with the complete prompt (paper App. A.4): runtime/outpaint.py
    from editrt.runtime.crop import check_crop
    from editrt.runtime.images import save_png
    from editrt.runtime.outpaint import check_extend, check_fill, outpaint

    out = _check_output(args.output)
    image = load_image(args.image)
    try:
        extend = [float(v) for v in args.extend.split(",")]
    except ValueError:
        extend = []
    if len(extend) != 4:
        raise InputError(f"--extend {args.extend!r}: expected L,T,R,B (pixels to add on each side)", field="extend")
    extend = [int(v) if v.is_integer() else v for v in extend]
    check_extend(extend, image.shape[:2])  # before any weights load
    check_fill(args.fill)
    check_crop(args.crop_padding, args.crop_size)
    _check_canvas(args, image.shape[:2])
    result = outpaint(_reposition_pipeline(args), image, extend, fill=args.fill, steps=args.steps,
                      guidance=args.guidance, seed=args.seed, resolution=args.resolution, progress=_progress(args),
                      crop_padding=args.crop_padding, crop_size=args.crop_size)
    save_png(result, out, watermark=args.watermark)
    _log(args)(f"outpaint -> {out}")


def cmd_segment(args) -> None:
    from editrt.runtime.images import save_mask_png

    out = _check_output(args.output)
    image = load_image(args.image)
    prompt = _prompt_args(args)
    mask = _reposition_pipeline(args).segment(image, **prompt)
    save_mask_png(mask, out)
    _log(args)(f"mask ({int(mask.sum())} px) -> {out}")


def cmd_inpaint(args) -> None:
    from editrt.models.deep_cache import check_options
    from editrt.runtime.crop import check_crop
    from editrt.runtime.images import save_png

    out = _check_output(args.output)
    image, mask = load_image(args.image), load_mask(args.mask, "mask")
    _check_canvas(args, image.shape[:2])
    check_crop(args.crop_padding, args.crop_size)  # both before any weights load
    check_options(args.cache_interval, args.cache_branch)
    result = _reposition_pipeline(args).inpaint(
        image, mask, task=args.task, steps=args.steps, guidance=args.guidance, seed=args.seed,
        resolution=args.resolution, progress=_progress(args), crop_padding=args.crop_padding,
        crop_size=args.crop_size, cache_interval=args.cache_interval, cache_branch=args.cache_branch,
    )
    save_png(result, out, watermark=args.watermark)
    _log(args)(f"{args.task} -> {out}")


def cmd_harmonize(args) -> None:
    # Harmonize a region (the harmonize prompt, LoRA at --lora-scale, the whole image as condition)
    from editrt.runtime.images import save_png

    out = _check_output(args.output)
    image, mask = load_image(args.image), load_mask(args.mask, "mask")
    _check_canvas(args, image.shape[:2])
    result = _reposition_pipeline(args).harmonize(
        image, mask, steps=args.steps, seed=args.seed, guidance=args.guidance, resolution=args.resolution,
        lora_scale=args.lora_scale, progress=_progress(args))
    save_png(result, out, watermark=args.watermark)
    _log(args)(f"harmonize -> {out}")


def _scale_option(text: str):
    """--scale: a number, or 'auto' (perspective from depth)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise InputError(f"--scale {text!r}: expected a number or 'auto'", field="scale") from None


def _region_option(text: str, name: str):
    """A mask file, or a box X0,Y0,X1,Y1 in pixels (clipped to the image by the pipeline)."""
    parts = text.split(",")
    if len(parts) == 4 and not Path(text).exists():
        return _numbers(text, name, (4,))
    return load_mask(text, name)


def _seele_edit(args):
    """The command line's SEELE options as a SeeleEdit (runtime/edits.py), before any weights load.
    The existing shadow given as a box is a second SAM selection: made later, on the pipeline."""
    from editrt.runtime.edits import SeeleEdit

    occlusion = args.occlusion if args.occlusion in ("auto", "none") else load_mask(args.occlusion, "--occlusion")
    if args.occluder_mask:
        if not isinstance(occlusion, str) or occlusion == "auto":
            raise InputError("--occluder-mask: the same as --occlusion MASK (and not with --occlusion auto); give "
                             "one of them", field="occlusion")
        occlusion = load_mask(args.occluder_mask, "--occluder-mask")
    if args.dilation is not None and args.dilation < 0:
        raise InputError(f"--dilation {args.dilation}: expected an integer >= 0 (pixels)", field="dilation")
    if args.existing_shadow_mask and args.existing_shadow_box:
        raise InputError("--existing-shadow-mask, --existing-shadow-box: give the existing shadow one way",
                         field="existing_shadow")
    return SeeleEdit(
        move=_numbers(args.move, "--move", (2,)), scale=args.scale, occlusion=occlusion,
        matting=args.matting == "on", trimap_band=args.trimap_band, harmonize=not args.no_harmonize,
        complete_mask=load_mask(args.complete_mask, "--complete-mask") if args.complete_mask else None,
        existing_shadow=load_mask(args.existing_shadow_mask, "--existing-shadow-mask")
        if args.existing_shadow_mask else None,
        new_shadow_region=_region_option(args.new_shadow_region, "--new-shadow-region")
        if args.new_shadow_region else None,
        dilation=args.dilation, remove_order=args.remove_order)


def cmd_reposition(args) -> None:
    import dataclasses

    from editrt.runtime.edits import Quality
    from editrt.runtime.images import save_png

    out = _check_output(args.output)
    image = load_image(args.image)
    if args.mask is None and not args.point and not args.box:
        raise InputError("reposition: expected the subject as --mask M, --point X,Y or --box X0,Y0,X1,Y1", field="mask")
    mask = load_mask(args.mask, "--mask") if args.mask else None
    edit = _seele_edit(args)
    quality = Quality(steps=args.steps, guidance=args.guidance, seed=args.seed, resolution=args.resolution,
                      crop_padding=args.crop_padding, crop_size=args.crop_size)
    shadow_box = _numbers(args.existing_shadow_box, "--existing-shadow-box", (4,)) if args.existing_shadow_box \
        else None
    stages_dir = Path(args.save_stages) if args.save_stages else None
    if stages_dir is not None and stages_dir.exists() and (not stages_dir.is_dir() or any(stages_dir.iterdir())):
        raise InputError(f"--save-stages {stages_dir}: exists and is not an empty directory", field="save_stages")
    _check_canvas(args, image.shape[:2])
    pipe = _reposition_pipeline(args)
    if shadow_box is not None:  # a second selection: SAM on the shadow's box
        edit = dataclasses.replace(edit, existing_shadow=pipe.segment(image, box=shadow_box))
    result = pipe(image, edit, mask=mask, **_prompt_args(args), quality=quality, progress=_progress(args))
    if stages_dir is not None:  # into a temporary sibling, renamed when complete
        from editrt.models.files import write_dir_atomic

        write_dir_atomic(stages_dir, result.save_stages)
    save_png(result.image, out, watermark=args.watermark)
    scaled = f" (scale auto: {result.scale:.3f})" if args.scale == "auto" else ""
    _log(args)(f"reposition -> {out}{scaled}" + (f" (stages in {stages_dir})" if stages_dir else ""))


def _elements_pipeline(args):
    from editrt.runtime.elements_pipeline import ElementsPipeline
    from editrt.weights import resolve_weights

    device = _device(args)
    weights = resolve_weights(args.weights, log=_log(args))
    return ElementsPipeline.from_pretrained(weights, device=device, dtype=_dtype(args, device), **_backend(args))


def _check_elements_output(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".json":
        raise InputError(f"-o {path}: expected a .json file name (the .npz is written beside it)", field="output")
    return out


def cmd_elements_partition(args) -> None:
    from editrt.runtime.images import save_labels_png, save_png

    out = _check_elements_output(args.output)
    overlay = _check_output(args.overlay, "--overlay") if args.overlay else None
    labels = _check_output(args.labels, "--labels") if args.labels else None
    image = load_image(args.image)
    _check_canvas(args, image.shape[:2])
    if args.square is not None:  # before any weights load
        from editrt.runtime.elements_pipeline import check_square

        if args.resolution is not None:
            raise InputError("--square and --resolution: expected one of them, not both", field="square")
        if check_square(args.square) ** 2 > CLI_MAX_CANVAS:
            raise InputError(f"--square {args.square}: expected a canvas of at most {CLI_MAX_CANVAS} pixels",
                             field="square")
    pipe = _elements_pipeline(args)
    elements = pipe.partition(image, resolution=args.resolution, grid=args.grid, beta=args.beta,
                              iterations=args.iterations, square=args.square)
    if overlay:
        save_png(pipe.render_overlay(elements, image, ids=args.ids), overlay)
    if labels:
        save_labels_png(elements.paint(), labels)
    elements.save(out)
    (h, w), (wh, ww) = elements.image_size, elements.working_size
    _log(args)(f"{len(elements.alive_ids)} elements on the {w}x{h} image (working size {ww}x{wh}), "
               f"{100 * elements.info['working_dropped_fraction']:.2f}% of pixels dropped by the clean-up and given to "
               f"neighbouring elements -> {out}")


class _EditOp(argparse.Action):
    """Keeps --move/--resize/--delete/--insert in command-line order in args.ops."""

    def __call__(self, parser, namespace, value, option_string=None):
        ops = getattr(namespace, "ops", None) or []
        ops.append((option_string, value))
        namespace.ops = ops


def _ids(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split("+")]
    except ValueError:
        raise InputError(f"{option} {text!r}: expected element ids like 12 or 12+13", field=_field_of(option)) from None


def _split(text: str, sep: str, option: str, form: str) -> tuple[str, str]:
    if sep not in text:
        raise InputError(f"{option} {text!r}: expected {form}", field=_field_of(option))
    return tuple(text.rsplit(sep, 1))


def cmd_elements_edit(args) -> None:
    from editrt.runtime.elements import Elements

    out = _check_elements_output(args.output)
    elements = Elements.load(args.elements)
    if not getattr(args, "ops", None):
        raise InputError("edit: expected at least one --move, --resize, --delete or --insert", field="ops")
    for option, value in args.ops:
        if option == "--move":
            ids, delta = _split(value, ":", option, "ID:DX,DY")
            dx, dy = _numbers(delta, option, (2,))
            deleted = elements.move(_ids(ids, option), dx, dy)
        elif option == "--resize":
            ids, scale = _split(value, ":", option, "ID:SCALE")
            deleted = elements.resize(_ids(ids, option), _numbers(scale, option, (1,))[0])
        elif option == "--delete":
            deleted = elements.delete(_ids(value, option))
        else:  # --insert OTHER.json:IDS@X,Y
            source, at = _split(value, "@", option, "OTHER.json:ID[+ID...]@X,Y")
            other, ids = _split(source, ":", option, "OTHER.json:ID[+ID...]@X,Y")
            new, deleted = elements.insert(Elements.load(other), _ids(ids, option), _numbers(at, option, (2,)))
            _log(args)(f"{option} {value}: new ids {new}")
        if deleted and option != "--delete":
            _log(args)(f"{option} {value}: deleted the covered elements {deleted}")
    elements.save(out)
    _log(args)(f"{len(elements.alive_ids)} elements -> {out}")


def cmd_elements_render(args) -> None:
    from editrt.runtime.elements import Elements
    from editrt.runtime.images import save_png

    out = _check_output(args.output)
    elements = Elements.load(args.elements)
    _check_canvas(args, elements.image_size)
    image = _elements_pipeline(args).decode(elements, prompt=args.prompt, guidance=args.guidance, steps=args.steps,
                                            seed=args.seed, resolution=args.resolution, progress=_progress(args))
    save_png(image, out, watermark=args.watermark)
    _log(args)(f"render -> {out}")


def cmd_elements_show(args) -> None:
    from editrt.runtime.elements import Elements

    elements = Elements.load(args.elements)
    if args.point or args.box:
        point = _numbers(args.point, "--point", (2,)) if args.point else None
        box = _numbers(args.box, "--box", (4,)) if args.box else None
        ids = elements.select(point=point, box=box)
    else:
        ids = elements.alive_ids
    for i in ids:  # image pixels
        (x, y), (w, h) = elements.centroids[i], elements.sizes[i]
        print(f"{i}\tx={x:.1f}\ty={y:.1f}\tw={w:.1f}\th={h:.1f}")


def cmd_export(args) -> None:
    from editrt.export.components import FORMATS, export_components, resolve_components
    from editrt.weights import resolve_weights

    if args.format == "triton":  # a Triton Inference Server model repository: export/triton.py
        from editrt.export.triton import write_model_repository

        out = Path(args.output)
        if out.exists() and not out.is_dir():
            raise InputError(f"-o {out}: exists and is not a directory", field="output")
        weights = resolve_weights(args.weights, log=_log(args))
        write_model_repository(weights, out, engines=args.engines, components=args.component, log=_log(args))
        return
    if args.engines:
        raise InputError("--engines: only with --format triton (the engines a model repository serves)", field="engines")

    if args.format not in FORMATS:
        raise InputError(f"--format {args.format!r}: expected one of {', '.join(FORMATS)}", field="format")
    names = resolve_components(args.component.split(",") if args.component != "all" else "all")
    precision = args.precision or ("fp16" if args.format == "tensorrt" else "fp32")
    # bf16 / fp8 TensorRT engines build from the fp32 graph; fp16 engines from the fp16 graph (strongly typed)
    onnx_precision = precision if precision in ("fp32", "fp16") else "fp32"
    if args.format == "tensorrt":  # before any work: TensorRT and a GPU must be there
        from editrt.export.tensorrt import BuildOptions, tensorrt_module

        tensorrt_module()
        BuildOptions(precision=precision, optimization_level=args.optimization_level)
        if not __import__("torch").cuda.is_available():
            raise InputError("--format tensorrt: needs a CUDA GPU", field="format")
    elif precision not in ("fp32", "fp16"):
        raise InputError(f"--precision {precision}: ONNX graphs are fp32 or fp16 (bf16 and fp8 are TensorRT's)", field="precision")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out}: exists and is not a directory", field="output")
    weights = resolve_weights(args.weights, log=_log(args))
    if args.component == "all":  # leaves out the estimators (depth/, matting/) a published folder lacks
        names = resolve_components("all", weights)
    results = export_components(weights, names, out, check=True, progress=_progress(args), log=_log(args),
                                precision=onnx_precision)
    if args.check:
        for r in results:
            print(f"{r.name}\tmax relative error vs PyTorch {r.max_rel_error:.2e}\t{r.path}\t{r.precision}")
    if args.format == "tensorrt":
        from editrt.export.specs import network_specs
        from editrt.export.tensorrt import BuildOptions, build_engine
        from editrt.models.components import WeightsLayout

        specs = network_specs(WeightsLayout(weights).network_config())
        for r in results:
            if r.name == "inpaint_unet":
                continue  # served by the refittable harmonizer engine at c = 0
            options = BuildOptions(precision=precision, optimization_level=args.optimization_level,
                                   refit=specs[r.name].refittable)
            build_engine(specs[r.name], r.path, out, options, progress=_progress(args), log=_log(args),
                         graph_precision=r.precision)


# ---------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse, but its complaints are UsageError (one line, exit 2 in `main`) instead of usage + exit."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {' '.join(message.split())} (see `{self.prog} --help`)")

    def exit(self, status: int = 0, message: str | None = None):
        if status:
            raise UsageError(f"{self.prog}: {' '.join((message or 'failed').split())}")
        super().exit(status, message)  # --help, --version: their text on stdout, exit 0


# name -> (module with configure_parser(parser) and run(args) -> exit code, help)
_LAZY_COMMANDS = {
    "bench": ("editrt.bench.cli", "latency benchmark suite: components, passes, peers side by side"),
    "eval": ("editrt.eval.cli", "the papers' evaluations: ReS, iHarmony4, inpainting, reconstruction, metrics"),
    "doctor": ("editrt.doctor", "check this machine: GPU, kernels (compiled ahead of time), backends"),
    "serve": ("editrt.runtime.server.cli", "serve both editors over HTTP (FastAPI) with a web editor page"),
}


def _add_lazy_command(sub, name: str, selected: str | None) -> None:
    module_name, help_text = _LAZY_COMMANDS[name]
    p = sub.add_parser(name, help=help_text)
    if name != selected:  # not running: its module is not imported at all
        p.add_argument("rest", nargs=argparse.REMAINDER)
        return
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:  # an optional part or its dependency is absent: only this command fails
        raise _unavailable(name, e) from None
    module.configure_parser(p)

    def run(args) -> int:
        try:
            return module.run(args)
        except ModuleNotFoundError as e:  # a dependency the command imports only when it runs (uvicorn, ...)
            raise _unavailable(name, e) from None

    p.set_defaults(func=run)


def _unavailable(name: str, e: ModuleNotFoundError) -> InputError:
    return InputError(f"{name}: unavailable; it needs the module {e.name!r}, which is not installed", field=name)


def _common(p: argparse.ArgumentParser, steps: bool = True, guidance: float = 1.0) -> None:
    from editrt.models.dtype_names import DTYPE_ALIASES, DTYPE_NAMES

    g = p.add_argument_group("common options")
    g.add_argument("--weights", help="weights directory, or 'tiny' / 'full' for cached random weights "
                   "(default: $EDITRT_WEIGHTS)")
    g.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    g.add_argument("--dtype", type=_dtype_option, choices=DTYPE_NAMES, metavar="DTYPE",
                   help=f"{', '.join(DTYPE_NAMES)} or {', '.join(DTYPE_ALIASES)} (default: fp16 on CUDA, fp32 on CPU)")
    g.add_argument("--backend", default="torch", help="torch (default), onnxruntime or tensorrt")
    g.add_argument("--engines", metavar="DIR", help="the folder `editrt export` wrote (onnxruntime, tensorrt)")
    # from_pretrained's compile / cuda_graphs (runtime/backends.build_engines)
    g.add_argument("--compile", action="store_true",
                   help="torch backend: torch.compile the UNets, VAE and SAM image encoder (the first run compiles)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False, default=None,
                   help="run the denoising loop eagerly (default: one CUDA graph per loop where supported: torch on CUDA)")
    if steps:
        g.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
        g.add_argument("--guidance", type=float, default=guidance,
                       help=f"classifier-free guidance scale; 1 = off (default {guidance:g})")
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--resolution", type=int, help="processing short side, multiple of 8 (default: the model's)")
        g.add_argument("--watermark", action="store_true",
                       help="also embed an invisible watermark (changes every pixel slightly)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def _prompts_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", metavar="FILE", help="task prompts .safetensors to run with instead of the weights "
                   "folder's (remove, complete, harmonize, null, and optionally outpaint, inpaint, ...)")


def _crop_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--crop-padding", type=int, metavar="PX",
                   help=f"regenerate only the box around {what}, padded by PX pixels (diffusers' padding_mask_crop)")
    p.add_argument("--crop-size", metavar="processing|native",
                   help="with --crop-padding: 'native' (default) works on the crop at its own resolution (a multiple "
                   "of 8, at most the processing size); 'processing' resizes it to the processing size (diffusers)")


def _prompt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--point", action="append", metavar="X,Y[,LABEL]",
                   help="a click on the subject (label 1) or background (label 0); repeatable")
    p.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box around the subject")


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; `selected` (the command about to run) is the only lazy command imported."""
    parser = _Parser(prog="editrt", description="Low-latency diffusion-based spatial image editing.")
    parser.add_argument("--version", action="version", version=f"editrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    weights = sub.add_parser("weights", help="weights directories").add_subparsers(dest="weights_command", required=True)
    p = weights.add_parser("init", help="write random weights in the real formats")
    p.add_argument("dir")
    p.add_argument("--config", choices=["tiny", "full"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_weights_init)
    p = weights.add_parser("prompts", help="task prompts from text, SEELE Table 1's SD-baseline texts or a "
                                           "textual-inversion embedding, with the SD-2 text encoder")
    p.add_argument("dir", help="weights directory whose inpaint/text_encoder and inpaint/tokenizer encode the text")
    p.add_argument("--from-text", nargs="+", metavar="TASK=TEXT",
                   help="remove=..., complete=..., harmonize=... (null is the empty prompt)")
    p.add_argument("--preset", choices=["sd-no", "sd-simple", "sd-complex"],
                   help="the paper's SD-baseline texts (Table 1) at all 77 positions; --from-text may add harmonize")
    p.add_argument("--from-embedding", metavar="FILE", help="textual-inversion embedding (learned_embeds.safetensors "
                   "or .bin): its token in a prompt, encoded for --task")
    p.add_argument("--task", help="with --from-embedding: remove, complete or harmonize")
    p.add_argument("--text", help="with --from-embedding: the prompt holding the token (default: the token alone)")
    p.add_argument("-o", "--output", metavar="FILE", help="default: DIR/task_prompts.safetensors")
    p.add_argument("--tokens", type=int, help="prompt length L of [L, C] (default 50, the paper's; --preset: 77)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_weights_prompts)

    p = sub.add_parser("segment", help="subject mask from a click or a box (SAM)")
    p.add_argument("image")
    _prompt(p)
    p.add_argument("-o", "--output", required=True, metavar="MASK.png")
    _common(p, steps=False)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("inpaint", help="one prompt-guided inpainting pass")
    p.add_argument("image")
    p.add_argument("mask")
    p.add_argument("--task", default="remove", help="remove (default), complete, or a named prompt of the prompts "
                   "file (inpaint, outpaint, ...)")
    _prompts_file(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT.png")
    _crop_options(p, "the mask")
    p.add_argument("--cache-interval", type=int, metavar="N",
                   help="DeepCache: compute the UNet's deep features every N-th step, reuse them between (default off)")
    p.add_argument("--cache-branch", type=int, metavar="B",
                   help="DeepCache branch id (block * 3 + layer, from the output side; default 0, the shallowest)")
    _common(p)
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("harmonize", help="harmonize a masked region with its surroundings (harmonize prompt + LoRA)")
    p.add_argument("image")
    p.add_argument("mask")
    p.add_argument("--lora-scale", type=float, default=1.0, metavar="C",
                   help="the harmonizer LoRA's scale (default 1, the paper's; 0 = the base UNet)")
    _prompts_file(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT.png")
    _common(p)
    p.set_defaults(func=cmd_harmonize)

    p = sub.add_parser("reposition", help="move a subject: remove, complete, harmonize (SEELE)")
    p.add_argument("image")
    _prompt(p)
    p.add_argument("--mask", help="the subject mask instead of --point/--box")
    p.add_argument("--move", required=True, metavar="DX,DY", help="move in pixels")
    p.add_argument("--scale", type=_scale_option, default=1.0, metavar="S|auto",
                   help="resize the subject about its box centre; 'auto': by the ratio of (DPT) inverse depth at "
                   "its new and old footpoint, clamped to [0.25, 4], the footpoint kept where dropped")
    p.add_argument("--complete-mask", metavar="M", help="region to complete (occluded part), output coordinates")
    p.add_argument("--occluder-mask", metavar="M", help="region in front of the moved subject")
    p.add_argument("--occlusion", default="none", metavar="auto|none|M",
                   help="auto: pixels nearer than the subject (DPT depth, margin 5%% of the depth range) hide it "
                   "where it lands; M: a mask of them (as --occluder-mask); none (default)")
    p.add_argument("--matting", choices=("on", "off"), default="off",
                   help="on: composite the subject with its ViTMatte alpha; the removed void follows alpha > 0")
    p.add_argument("--trimap-band", type=int, metavar="PX",
                   help="matting: unknown band on each side of the mask edge (default 2%% of the short side)")
    p.add_argument("--existing-shadow-mask", metavar="M", help="the subject's existing shadow: moved and removed with "
                   "it, regenerated at its new place with the complete prompt")
    p.add_argument("--existing-shadow-box", metavar="X0,Y0,X1,Y1",
                   help="the subject's existing shadow as a second SAM selection (instead of --existing-shadow-mask)")
    p.add_argument("--new-shadow-region", metavar="M|X0,Y0,X1,Y1", help="where a new shadow is cast (output "
                   "coordinates; a mask or a box): harmonized with the LoRA harmonizer")
    # the older spellings (--shadow-* named both concepts): kept, hidden, for existing scripts
    p.add_argument("--shadow-mask", dest="existing_shadow_mask", help=argparse.SUPPRESS)
    p.add_argument("--shadow-box", dest="existing_shadow_box", help=argparse.SUPPRESS)
    p.add_argument("--shadow-region", dest="new_shadow_region", help=argparse.SUPPRESS)
    p.add_argument("--no-harmonize", action="store_true")
    p.add_argument("--remove-order", choices=("cached", "paper"), default="cached",
                   help="cached (default): REMOVE on the unmoved image, the subject pasted after (an interactive drag "
                   "reuses the REMOVE pass); paper: SEELE's order, the subject moved first and REMOVE run with it "
                   "in view (the void less the moved subject)")
    _prompts_file(p)
    p.add_argument("--dilation", type=int, metavar="PX",
                   help="pixels the REMOVE void and the harmonize area grow by (default 1%% of the short side)")
    p.add_argument("--save-stages", metavar="DIR", help="write every stage's image and mask here (depth and alpha "
                   "as 16-bit greyscale PNGs)")
    _crop_options(p, "all the move changes (the void, the moved subject, what is completed and harmonized)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png")
    _common(p)
    p.set_defaults(func=cmd_reposition)

    p = sub.add_parser("outpaint", help="extend the canvas with the outpaint prompt (else the complete prompt); "
                       "the original pixels stay")
    p.add_argument("image")
    p.add_argument("--extend", required=True, metavar="L,T,R,B", help="pixels to add on each side "
                   "(write --extend=0,0,64,0 if a value could read as an option)")
    p.add_argument("--fill", default="edge", help="what the resize to the processing size sees beyond the seam: "
                   "edge (default: repeats the border pixels), reflect or mean; the model never sees the new "
                   "border's own pixels (they are masked out), so with no resize every fill gives the same result")
    _prompts_file(p)
    _crop_options(p, "the new border")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png")
    _common(p)
    p.set_defaults(func=cmd_outpaint)

    elements = sub.add_parser("elements", help="editable image elements").add_subparsers(dest="elements_command", required=True)
    p = elements.add_parser("partition", help="split an image into elements (SAM-feature SLIC) and encode them")
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True, metavar="ELEMENTS.json")
    p.add_argument("--overlay", metavar="PNG", help="also draw the element boundaries and centroids")
    p.add_argument("--ids", action="store_true", help="label each centroid with its id in the overlay")
    p.add_argument("--labels", metavar="PNG", help="also write the label map at the image's size: a 16-bit PNG "
                   "of element id + 1 (0 = no element)")
    p.add_argument("--resolution", type=int, help="working short side, multiple of 8 (default: the model's); "
                   "the elements, their label map and the overlay stay at the image's size")
    p.add_argument("--square", type=int, metavar="N", help="partition the image resized to N x N (the paper's 512; "
                   "multiple of 8; instead of --resolution); the elements are mapped back to the image's pixels")
    p.add_argument("--grid", type=int, default=16, help="query grid (16 -> 256 elements)")
    p.add_argument("--beta", type=float, default=64.0, help="distance weight (Eq. 1)")
    p.add_argument("--iterations", type=int, default=1, help="SLIC iterations T")
    _common(p, steps=False)
    p.set_defaults(func=cmd_elements_partition)

    p = elements.add_parser("edit", help="move, resize, delete or insert elements (applied in order)")
    p.add_argument("elements", metavar="ELEMENTS.json")
    p.add_argument("--move", action=_EditOp, metavar="ID[+ID]:DX,DY", help="move by DX,DY image pixels")
    p.add_argument("--resize", action=_EditOp, metavar="ID[+ID]:SCALE")
    p.add_argument("--delete", action=_EditOp, metavar="ID[+ID]")
    p.add_argument("--insert", action=_EditOp, metavar="OTHER.json:ID[+ID]@X,Y",
                   help="copy elements of another partition, their joint centre at image pixel X,Y")
    p.add_argument("-o", "--output", required=True, metavar="EDITED.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_elements_edit)

    p = elements.add_parser("render", help="render elements with the diffusion decoder, at the image's size")
    p.add_argument("elements", metavar="ELEMENTS.json")
    p.add_argument("--prompt", default="", help="text prompt (default: empty)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png")
    _common(p, guidance=3.0)
    p.set_defaults(func=cmd_elements_render)

    p = elements.add_parser("show", help="list elements (all, the one under --point, or those centred in --box)")
    p.add_argument("elements", metavar="ELEMENTS.json")
    p.add_argument("--point", metavar="X,Y", help="image pixel")
    p.add_argument("--box", metavar="X0,Y0,X1,Y1", help="image pixels")
    p.set_defaults(func=cmd_elements_show)

    p = sub.add_parser("export", help="export components to ONNX (and build TensorRT engines)")
    p.add_argument("--component", default="all", help="all (default) or comma-separated names")
    p.add_argument("--format", default="onnx", help="onnx (default), tensorrt (ONNX first, then engines) or "
                   "triton (a Triton Inference Server model repository)")
    p.add_argument("--engines", metavar="DIR", help="triton: the folder `editrt export` wrote, whose engines the "
                   "repository serves (default: the pipelines run editrt's own engines in-process)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    p.add_argument("--check", action="store_true",
                   help="print each component's max relative error vs PyTorch (ONNX Runtime on fresh random inputs; "
                   "one line per component on stdout: name, error, path, precision). The check itself always runs: "
                   "a component above its tolerance (fp32 1e-4, fp16 2e-2) fails the command (exit 2) and its graph "
                   "is not written")
    p.add_argument("--precision", help="onnx: fp32 (default) or fp16 (UNets and VAEs; SAM and the content encoder "
                   "stay fp32); tensorrt: fp16 (default), bf16, fp8 or fp32")
    p.add_argument("--optimization-level", type=int, default=3, help="TensorRT builder optimization level 0..5")
    p.add_argument("--weights", help="weights directory, or 'tiny' / 'full' (default: $EDITRT_WEIGHTS)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    from editrt.train.cli import add_train_parser  # argparse only: the jobs import torch/accelerate when they run

    add_train_parser(sub)
    for name in _LAZY_COMMANDS:
        _add_lazy_command(sub, name, selected)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    import os

    # Loading local weights needs no per-file download bars from huggingface_hub / transformers.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (in-process use): the variable is read at import
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    selected = next((a for a in argv if not a.startswith("-")), None)  # the top level has options only before it
    try:
        try:
            args = build_parser(selected).parse_args(argv)
        except SystemExit as e:  # --help or --version: printed, nothing to run
            return e.code if isinstance(e.code, int) else 0
        rc = args.func(args)
    except EditError as e:
        print(f"editrt: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # the system refused a file (permissions, disk full): the user's to fix, not a bug
        where = f"{e.filename}: " if e.filename else ""
        print(f"editrt: error: {where}{_one_line(e.strerror or e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("editrt: interrupted", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
