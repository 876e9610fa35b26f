"""`editrt eval`: the papers' evaluation protocols and their metrics (docs/eval.md).

    editrt eval res ReS/ --weights W --protocol paper --lpips-weights alexnet.pth -o runs.jsonl --save-images out/
    editrt eval metrics PRED_DIR GT_DIR [--masks DIR --region mask]
    editrt eval harmonize iHarmony4/ --weights W --size 512
    editrt eval inpaint places/ --weights W --mask-protocol files
    editrt eval reconstruct images/ --weights W --square 512
    editrt eval table "SD simple=sd-simple.jsonl" "SEELE=seele.jsonl" --table-md table1.md

`editrt/cli.py` loads this module only when `eval` runs (its lazy-command table: `configure_parser` builds the
options, `run` runs them): `editrt --version` imports no torch. Bad input is an EditError (one line, exit 2);
a run whose samples the editor refused writes everything and exits 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from editrt.errors import InputError


def _say(args):
    return (lambda what: None) if args.quiet else (lambda what: print(f"editrt: {what}", file=sys.stderr))


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def _outputs(p: argparse.ArgumentParser, images: bool = True) -> None:
    g = p.add_argument_group("metrics and outputs")
    g.add_argument("--lpips-weights", metavar="FILE", help="torchvision's AlexNet state dict (alexnet-owt-7be5be79.pth) "
                   "for LPIPS (default: torch.hub's cache; else LPIPS is skipped, and said so)")
    g.add_argument("--fid-weights", metavar="FILE", help="torch-fidelity's Inception (weights-inception-2015-12-05-"
                   "6726825d.pth) for FID (default: torch.hub's cache; else FID is skipped, and said so)")
    g.add_argument("-o", "--output", metavar="RUNS.jsonl", help="one JSON row per sample")
    g.add_argument("--table-md", metavar="FILE.md", help="the summary table in Markdown (also printed)")
    g.add_argument("--table-json", metavar="FILE.json", help="the summary table as JSON")
    if images:
        g.add_argument("--save-images", metavar="DIR", help="write each result as DIR/NAME.png (a new folder)")
        g.add_argument("--limit", type=_count, metavar="N", help="evaluate the first N samples only")


def _check_outputs(args) -> None:
    """Before any work: output names that cannot be written later (a folder given for a file)."""
    for option in ("output", "table_md", "table_json"):
        path = getattr(args, option, None)
        if path and Path(path).is_dir():
            raise InputError(f"--{option.replace('_', '-')} {path}: is a directory; expected a file name", field=option)
    images = getattr(args, "save_images", None)
    if images and Path(images).exists() and (not Path(images).is_dir() or any(Path(images).iterdir())):
        raise InputError(f"--save-images {images}: already exists and is not empty; choose a new directory",
                         field="save_images")


# ---------------------------------------------------------------------- commands
def cmd_res(args) -> int:
    from editrt.cli import _reposition_pipeline
    from editrt.eval import res
    from editrt.eval.runner import prepare_scorer, run_eval

    _check_outputs(args)
    res.check_root(args.root)
    settings = res.settings_for(args.protocol, args.short_side, args.steps, args.guidance, args.seed, args.resolution)
    scorer = prepare_scorer(args)
    pipe = _reposition_pipeline(args)
    label = args.label or f"editrt ({args.protocol})"
    return run_eval(args, scorer, label, lambda scorer: res.evaluate(pipe, args.root, settings, scorer, args.limit,
                                                             log=_say(args)))


def cmd_metrics(args) -> int:
    from editrt.eval.datasets import image_files, read_mask, read_rgb, upright_size
    from editrt.eval.runner import prepare_scorer, run_eval

    _check_outputs(args)
    preds, targets = image_files(Path(args.pred_dir), "predictions"), image_files(Path(args.gt_dir), "targets")
    masks = image_files(Path(args.masks), "masks") if args.masks else None
    if args.region == "mask" and masks is None:
        raise InputError("--region mask: needs --masks DIR (one mask per target, by name)", field="region")
    problems = [f"{args.gt_dir}/{targets[n].name}: no prediction of that name in {args.pred_dir}"
                for n in targets if n not in preds]
    problems += [f"{args.pred_dir}/{preds[n].name}: no target of that name in {args.gt_dir}"
                 for n in preds if n not in targets]
    if masks is not None:
        problems += [f"{args.gt_dir}/{targets[n].name}: no mask of that name in {args.masks}"
                     for n in targets if n not in masks]
    names = sorted(set(preds) & set(targets))
    for name in names:  # from the headers: the pixels are read one pair at a time when scored
        (pw, ph), (tw, th) = upright_size(preds[name]), upright_size(targets[name])
        if (pw, ph) != (tw, th):
            problems.append(f"{preds[name]}: size {pw}x{ph} differs from its target {targets[name]} ({tw}x{th})")
    if problems:
        for line in problems:
            print(f"editrt: {line}", file=sys.stderr)
        raise InputError(f"{len(problems)} file(s) missing or mismatched (listed above); expected the same names "
                         "and sizes in both folders", field="pred_dir")
    args.save_images = None

    def body(scorer):
        for name in names:
            pred, target = read_rgb(preds[name]), read_rgb(targets[name])
            region = read_mask(masks[name], target.shape[:2]) if args.region == "mask" else None
            scorer.score({"sample": name, "region": args.region}, pred, target, region)

    return run_eval(args, prepare_scorer(args), Path(args.pred_dir).name or "predictions", body, log=print)


def cmd_harmonize(args) -> int:
    from editrt.cli import _reposition_pipeline
    from editrt.eval import harmonize
    from editrt.eval.datasets import iharmony_samples
    from editrt.eval.runner import prepare_scorer, run_eval

    _check_outputs(args)
    samples = iharmony_samples(args.root)[: args.limit]
    scorer = prepare_scorer(args)
    pipe = _reposition_pipeline(args)
    return run_eval(args, scorer, "All", lambda scorer: harmonize.evaluate(
        pipe, samples, args.size, args.steps, args.guidance, args.seed, args.resolution, scorer, log=_say(args)),
        columns=harmonize.columns)


def cmd_inpaint(args) -> int:
    from editrt.cli import _reposition_pipeline
    from editrt.eval import inpainting
    from editrt.eval.datasets import inpaint_samples
    from editrt.eval.runner import prepare_scorer, run_eval

    _check_outputs(args)
    samples = inpaint_samples(args.root, args.mask_protocol)[: args.limit]
    scorer = prepare_scorer(args)
    pipe = _reposition_pipeline(args)
    label = f"editrt ({args.task})"
    return run_eval(args, scorer, label, lambda scorer: inpainting.evaluate(
        pipe, samples, args.mask_protocol, args.short_side, args.task, args.region, args.steps, args.guidance,
        args.seed, args.resolution, scorer, log=_say(args)))


def cmd_reconstruct(args) -> int:
    from editrt.cli import _elements_pipeline
    from editrt.eval import reconstruct
    from editrt.eval.datasets import image_files
    from editrt.eval.runner import prepare_scorer, run_eval

    _check_outputs(args)
    if args.square < 0 or args.square % 8:
        raise InputError(f"--square {args.square}: expected 0 (keep the size) or a positive multiple of 8",
                         field="square")
    files = dict(list(image_files(Path(args.images)).items())[: args.limit])
    scorer = prepare_scorer(args)
    pipe = _elements_pipeline(args)
    return run_eval(args, scorer, "editrt (elements)", lambda scorer: reconstruct.evaluate(
        pipe, files, args.square, args.steps, args.guidance, args.seed, args.resolution, scorer, log=_say(args)))


def cmd_table(args) -> int:
    from editrt.eval.report import markdown, means, read_rows, table, write_json, write_text

    _check_outputs(args)
    columns = {}
    for item in args.runs:
        label, sep, path = item.rpartition("=")
        path = Path(path)
        label = label if sep else path.stem
        if label in columns:
            raise InputError(f"{item}: a second column named {label!r}; name each run LABEL=FILE", field="runs")
        columns[label] = means(read_rows(path))
    data = {**table(columns), "note": "per-sample means; set-level metrics (FID) are in each run's own table"}
    if args.table_json:
        write_json(args.table_json, data)
    text = markdown(data)
    if args.table_md:
        write_text(args.table_md, text)
    print(text, end="")
    return 0


# ---------------------------------------------------------------------- parser
def _prompts(p) -> None:
    """--prompts FILE: the task prompts to evaluate (e.g. `weights prompts --preset sd-simple`), as the editing
    commands take it; checked before the weights load."""
    p.add_argument("--prompts", metavar="FILE", help="task prompts .safetensors to run with instead of the weights "
                   "folder's (e.g. SEELE Table 1's SD baselines: editrt weights prompts W --preset sd-simple)")


def configure_parser(p: argparse.ArgumentParser) -> None:
    from editrt.cli import _common
    from editrt.eval.datasets import MASK_PROTOCOLS
    from editrt.eval.res import PROTOCOLS

    sub = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")

    q = sub.add_parser("res", help="SEELE's ReS benchmark: both directions of every pair (the paper's Table 1)")
    q.add_argument("root", help="the ReS folder (p{i}_1.jpg, p{i}_2.jpg, p{i}_{1,2}_mask.png, p{i}_{1,2}_amodal.png)")
    q.add_argument("--protocol", choices=PROTOCOLS, default="paper",
                   help="paper (default): short side 512, no depth / matting / harmonize stages; editrt: "
                   "the images' own size (or --short-side) with editrt's defaults (harmonize on)")
    q.add_argument("--short-side", type=_count, metavar="PX", help="evaluation size (default: 512 with "
                   "--protocol paper, the image's own with editrt)")
    q.add_argument("--label", help="the table's column name (default: 'editrt (PROTOCOL)')")
    _outputs(q)
    _common(q)
    _prompts(q)
    q.set_defaults(eval_func=cmd_res)

    q = sub.add_parser("metrics", help="PSNR, SSIM, MSE, LPIPS, FID of PRED_DIR against GT_DIR (files matched by name)")
    q.add_argument("pred_dir")
    q.add_argument("gt_dir")
    q.add_argument("--masks", metavar="DIR", help="a mask per target, by name (for --region mask)")
    q.add_argument("--region", choices=("full", "mask"), default="full",
                   help="full (default) or the mask's pixels (PSNR, MSE; SSIM's map averaged there; LPIPS and "
                   "FID stay whole-image)")
    q.add_argument("--device", help="cpu, cuda, cuda:N for LPIPS and FID (default: cuda when available)")
    q.add_argument("--quiet", action="store_true")
    _outputs(q, images=False)
    q.set_defaults(eval_func=cmd_metrics)

    q = sub.add_parser("harmonize", help="local harmonization on the iHarmony4 test set: MSE, fMSE, PSNR")
    q.add_argument("root", help="an iHarmony4 sub-dataset folder (composite_images/, masks/, real_images/, "
                   "*_test.txt) or the folder holding several")
    q.add_argument("--size", type=_count, default=512, help="square evaluation size (default 512 as SEELE; 256 "
                   "as most harmonization papers)")
    _outputs(q)
    _common(q)
    _prompts(q)
    q.set_defaults(eval_func=cmd_harmonize)

    q = sub.add_parser("inpaint", help="inpainting on a Places2-style folder (images/, masks/)")
    q.add_argument("root", help="ROOT/images/NAME.jpg|png and, for --mask-protocol files, ROOT/masks/NAME.png")
    q.add_argument("--mask-protocol", choices=MASK_PROTOCOLS, default="files",
                   help="files (default): ROOT/masks/NAME.png; center: the centred box of a quarter of the area")
    q.add_argument("--task", choices=("remove", "complete"), default="remove", help="task prompt (default remove)")
    q.add_argument("--region", choices=("full", "mask"), default="full", help="PSNR/SSIM/MSE over the whole "
                   "image (default) or the hole")
    q.add_argument("--short-side", type=_count, metavar="PX", help="resize each image first (default: as stored)")
    _outputs(q)
    _common(q)
    _prompts(q)
    q.set_defaults(eval_func=cmd_inpaint)

    q = sub.add_parser("reconstruct", help="EIE reconstruction: partition -> render -> metrics")
    q.add_argument("images", help="a folder of .jpg/.png images")
    q.add_argument("--square", type=int, default=512, help="resize each image to N x N first, as the paper "
                   "(default 512; 0 keeps its size)")
    _outputs(q)
    _common(q, guidance=3.0)
    q.set_defaults(eval_func=cmd_reconstruct)


    q = sub.add_parser("table", help="one table, a column per run, from the RUNS.jsonl files of several evals")
    q.add_argument("runs", nargs="+", metavar="[LABEL=]RUNS.jsonl", help="a run's rows (the column is named LABEL, "
                   "default the file's stem)")
    q.add_argument("--table-md", metavar="FILE.md", help="also write the Markdown here")
    q.add_argument("--table-json", metavar="FILE.json", help="the table as JSON")
    q.set_defaults(eval_func=cmd_table)


def run(args) -> int:
    return args.eval_func(args)
