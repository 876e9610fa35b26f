"""The `editrt` command line.

Bad input (EditError) prints one line on stderr and exits 2; outputs are written atomically, so
a failed command leaves no file behind. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from editrt.errors import EditError, InputError

EXIT_BAD_INPUT = 2


# ---------------------------------------------------------------------- argument helpers
def _numbers(text: str, name: str, count: tuple[int, ...]) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in count:
        forms = {2: "X,Y", 3: "X,Y,LABEL", 4: "X0,Y0,X1,Y1"}
        raise InputError(f"{name} {text!r}: expected {' or '.join(forms[c] for c in count)} (numbers)")
    return values


def load_image(path: str, name: str = "image", mode: str = "RGB") -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except FileNotFoundError:
        raise InputError(f"{name} {path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{name} {path}: cannot read it as an image ({type(e).__name__})") from None


def load_mask(path: str, name: str) -> np.ndarray:
    return load_image(path, name, mode="L") > 127


def _device(args) -> str:
    import torch

    if args.device:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"--device {args.device}: CUDA is not available on this machine")
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(args, device: str) -> str:
    return args.dtype or ("fp16" if device.startswith("cuda") else "fp32")


def _progress(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _log(args):
    return (lambda what: None) if args.quiet else (lambda what: print(f"editrt: {what}", file=sys.stderr))


def _reposition_pipeline(args):
    from editrt.runtime.reposition import RepositionPipeline
    from editrt.weights import resolve_weights

    device = _device(args)
    weights = resolve_weights(args.weights, log=_log(args))
    return RepositionPipeline.from_pretrained(weights, device=device, dtype=_dtype(args, device))


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
        raise InputError(f"{name} {path}: expected a .png file name")
    if out.is_dir():
        raise InputError(f"{name} {path}: is a directory; expected a .png file name")
    return out


# ---------------------------------------------------------------------- commands
def cmd_weights_init(args) -> None:
    from editrt.weights import init_weights

    path = init_weights(args.dir, args.config, args.seed, log=lambda what: _log(args)(f"writing {what}"))
    _log(args)(f"wrote '{args.config}' random weights (seed {args.seed}) to {path}")


def cmd_segment(args) -> None:
    from editrt.runtime.images import save_mask_png

    out = _check_output(args.output)
    image = load_image(args.image)
    prompt = _prompt_args(args)
    mask = _reposition_pipeline(args).segment(image, **prompt)
    save_mask_png(mask, out)
    _log(args)(f"mask ({int(mask.sum())} px) -> {out}")


def cmd_inpaint(args) -> None:
    from editrt.runtime.images import save_png

    out = _check_output(args.output)
    image, mask = load_image(args.image), load_mask(args.mask, "mask")
    result = _reposition_pipeline(args).inpaint(
        image, mask, task=args.task, steps=args.steps, guidance=args.guidance, seed=args.seed,
        resolution=args.resolution, progress=_progress(args),
    )
    save_png(result, out, watermark=args.watermark)
    _log(args)(f"{args.task} -> {out}")


def cmd_reposition(args) -> None:
    from editrt.runtime.images import save_png

    out = _check_output(args.output)
    image = load_image(args.image)
    if args.mask is None and not args.point and not args.box:
        raise InputError("reposition: expected the subject as --mask M, --point X,Y or --box X0,Y0,X1,Y1")
    mask = load_mask(args.mask, "--mask") if args.mask else None
    complete = load_mask(args.complete_mask, "--complete-mask") if args.complete_mask else None
    occluder = load_mask(args.occluder_mask, "--occluder-mask") if args.occluder_mask else None
    stages_dir = Path(args.save_stages) if args.save_stages else None
    if stages_dir is not None and stages_dir.exists() and (not stages_dir.is_dir() or any(stages_dir.iterdir())):
        raise InputError(f"--save-stages {stages_dir}: exists and is not an empty directory")
    result = _reposition_pipeline(args)(
        image, mask=mask, **_prompt_args(args), move=_numbers(args.move, "--move", (2,)), scale=args.scale,
        complete_mask=complete, occluder_mask=occluder, harmonize=not args.no_harmonize, steps=args.steps,
        guidance=args.guidance, seed=args.seed, resolution=args.resolution, progress=_progress(args),
    )
    if stages_dir is not None:  # into a temporary sibling, renamed when complete
        stages_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stages_dir.name}.", dir=stages_dir.parent))
        try:
            result.save_stages(tmp)
            if stages_dir.exists():
                stages_dir.rmdir()
            tmp.rename(stages_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    save_png(result.image, out, watermark=args.watermark)
    _log(args)(f"reposition -> {out}" + (f" (stages in {stages_dir})" if stages_dir else ""))


# ---------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, steps: bool = True) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--weights", help="weights directory, or 'tiny' / 'full' for cached random weights "
                   "(default: $EDITRT_WEIGHTS)")
    g.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp16 on CUDA, fp32 on CPU")
    if steps:
        g.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
        g.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale; 1 = off (default)")
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--resolution", type=int, help="processing short side, multiple of 8 (default: the model's)")
        g.add_argument("--watermark", action="store_true",
                       help="also embed an invisible watermark (changes every pixel slightly)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def _prompt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--point", action="append", metavar="X,Y[,LABEL]",
                   help="a click on the subject (label 1) or background (label 0); repeatable")
    p.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box around the subject")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editrt", description="Low-latency diffusion-based spatial image editing.")
    sub = parser.add_subparsers(dest="command", required=True)

    weights = sub.add_parser("weights", help="weights directories").add_subparsers(dest="weights_command", required=True)
    p = weights.add_parser("init", help="write random weights in the real formats")
    p.add_argument("dir")
    p.add_argument("--config", choices=["tiny", "full"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_weights_init)

    p = sub.add_parser("segment", help="subject mask from a click or a box (SAM)")
    p.add_argument("image")
    _prompt(p)
    p.add_argument("-o", "--output", required=True, metavar="MASK.png")
    _common(p, steps=False)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("inpaint", help="one prompt-guided inpainting pass")
    p.add_argument("image")
    p.add_argument("mask")
    p.add_argument("--task", default="remove", help="remove (default) or complete")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png")
    _common(p)
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("reposition", help="move a subject: remove, complete, harmonize (SEELE)")
    p.add_argument("image")
    _prompt(p)
    p.add_argument("--mask", help="the subject mask instead of --point/--box")
    p.add_argument("--move", required=True, metavar="DX,DY", help="move in pixels")
    p.add_argument("--scale", type=float, default=1.0, help="resize the subject about its box centre")
    p.add_argument("--complete-mask", metavar="M", help="region to complete (occluded part), output coordinates")
    p.add_argument("--occluder-mask", metavar="M", help="region in front of the moved subject")
    p.add_argument("--no-harmonize", action="store_true")
    p.add_argument("--save-stages", metavar="DIR", help="write every stage's image and mask here")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png")
    _common(p)
    p.set_defaults(func=cmd_reposition)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except EditError as e:
        print(f"editrt: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("editrt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
