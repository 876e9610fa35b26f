"""`editrt train`: the learned parts, on one process or many (Hugging Face Accelerate).

    editrt train prompts --weights W --data D --task remove --steps 9000 --log train.jsonl
    accelerate launch --multi_gpu --num_processes 8 -m editrt.cli train prompts --weights W \\
        --coco instances_train2017.json --images train2017 --task complete

`editrt/cli.py` registers the group with `add_train_parser(subparsers)`; nothing heavy (torch jobs,
accelerate) is imported until a job runs. docs/training.md has the recipes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from editrt.errors import InputError


def _loop_options(p: argparse.ArgumentParser, steps: int | None = 9000, batch: int | None = 32,
                  lr: float | None = 8e-5, paper: str = "paper 000 App. A.2") -> None:
    """Shared optimisation options; a None default is resolved by the job (per stage, see ELEMENTS_DEFAULTS)."""
    g = p.add_argument_group(f"optimisation (defaults: {paper})")
    g.add_argument("--steps", type=int, default=steps,
                   help=f"optimizer steps (default {steps if steps else 'per stage; stage 1: 30 passes over the images'})")
    g.add_argument("--batch-size", type=int, default=batch,
                   help=f"global batch: processes x --micro-batch x accumulation (default {batch or 'per stage'})")
    g.add_argument("--micro-batch", type=int, default=4,
                   help="samples per process and forward pass; the rest of the batch is accumulated (default 4)")
    g.add_argument("--lr", type=float, default=lr,
                   help=f"AdamW learning rate (default {'per stage' if lr is None else format(lr, 'g')})")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps, then constant (default 0)")
    g.add_argument("--seed", type=int, default=0, help="every draw derives from (seed, sample index)")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                   help="frozen parts in this dtype, the trained ones fp32 (default: accelerate's config)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations in backward")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even where CUDA is available")
    g.add_argument("--workers", type=int, default=2, help="data loader processes per training process (default 2)")
    g = p.add_argument_group("validation, checkpoints, log")
    g.add_argument("--val-fraction", type=float, default=0.05,
                   help="images held out for the validation loss that picks the best checkpoint (default 0.05)")
    g.add_argument("--val-samples", type=int, default=64, help="validation samples (fixed draws; default 64)")
    g.add_argument("--val-every", type=int, default=500, help="validate every N steps and at the end (default 500)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps and at the end (default 500)")
    g.add_argument("--checkpoints", metavar="DIR", help="checkpoint folder (default: train-JOB-checkpoints)")
    g.add_argument("--resume", metavar="CKPT|latest", help="continue from a step-NNNNNN checkpoint, or the latest")
    g.add_argument("--log", metavar="FILE.jsonl", help="one JSON line per step: step, loss, lr, samples_per_s, val_loss")
    g.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def _loop_settings(args, job: str):
    from editrt.train.job import LoopSettings

    return LoopSettings(
        steps=args.steps, batch_size=args.batch_size, micro_batch=args.micro_batch, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, seed=args.seed, save_every=args.save_every,
        val_every=args.val_every, val_samples=args.val_samples,
        checkpoints=Path(args.checkpoints or f"train-{job}-checkpoints"), resume=args.resume,
        log=Path(args.log) if args.log else None, workers=args.workers, mixed_precision=args.mixed_precision,
        cpu=args.cpu, quiet=args.quiet)


def _needs(module: str) -> None:
    """A missing training dependency is one line, before anything runs."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise InputError(f"editrt train: needs the module {module!r}, which is not installed "
                         "(pip install 'editrt[train]')")


def _say(args):
    return (lambda what: None) if args.quiet else (lambda what: print(f"editrt: {what}", file=sys.stderr))


def cmd_train_prompts(args) -> None:
    _needs("accelerate")
    if args.coco:
        _needs("pycocotools")
    from editrt.train.inversion import InversionSettings, train_task_prompt
    from editrt.weights import resolve_weights

    weights = resolve_weights(args.weights, log=_say(args))
    settings = InversionSettings(
        weights=Path(weights), task=args.task, output=Path(args.output) if args.output else None,
        data=Path(args.data) if args.data else None, coco=Path(args.coco) if args.coco else None,
        images=Path(args.images) if args.images else None, init_text=args.init_text, resolution=args.resolution,
        val_fraction=args.val_fraction, min_object_fraction=args.min_object_fraction,
        gradient_checkpointing=args.gradient_checkpointing)
    run = train_task_prompt(settings, _loop_settings(args, f"prompts-{args.task}"), log=_say(args))
    if not run.main:
        return
    out, result = run.output, run.result
    which = f"best validation loss {result.best_val_loss:.5g} at step {result.best_step}" \
        if result.best is not None else f"step {result.step}"
    _say(args)(f"{args.task} prompt ({which}) -> {out}")


def cmd_train_harmonizer(args) -> None:
    _needs("accelerate")
    from editrt.train.harmonizer import HarmonizerSettings, train_harmonizer
    from editrt.weights import resolve_weights

    weights = resolve_weights(args.weights, log=_say(args))
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    settings = HarmonizerSettings(
        weights=Path(weights), data=Path(args.data), output=Path(args.output) if args.output else None,
        lora_output=Path(args.lora_output) if args.lora_output else None, init_text=args.init_text,
        rank=args.lora_rank, targets=targets, resolution=args.resolution, val_fraction=args.val_fraction,
        gradient_checkpointing=args.gradient_checkpointing)
    run = train_harmonizer(settings, _loop_settings(args, "harmonizer"), log=_say(args))
    if run.main:
        _say(args)(f"harmonize prompt -> {run.output}, LoRA -> {run.lora_output}")


# Per-stage defaults (paper 001's supplementary): stage 1 AdamW lr 1e-4, betas (0.9, 0.95), batch 128, 30 epochs;
# stage 2 lr 6.4e-5, betas (0.9, 0.999), batch 64, "around 180k iterations". Resolution: stage 1 editrt's 256,
# stage 2 SD-1.5's 512.
ELEMENTS_DEFAULTS = {1: {"steps": None, "batch_size": 128, "lr": 1e-4, "betas": (0.9, 0.95), "resolution": 256},
                     2: {"steps": 180_000, "batch_size": 64, "lr": 6.4e-5, "betas": (0.9, 0.999), "resolution": 512}}


def cmd_train_elements(args) -> None:
    from editrt.weights import resolve_weights

    if args.stage not in ELEMENTS_DEFAULTS:
        raise InputError(f"--stage {args.stage}: expected 1 (content encoder) or 2 (the diffusion decoder)")
    _needs("accelerate")
    defaults = ELEMENTS_DEFAULTS[args.stage]
    for name in ("steps", "batch_size", "lr", "resolution"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    weights = resolve_weights(args.weights, log=_say(args))
    loop = _loop_settings(args, f"elements-stage{args.stage}")
    loop.betas = defaults["betas"]
    if args.stage == 1:
        from editrt.train.elements import ElementsSettings, train_content_encoder

        settings = ElementsSettings(weights=Path(weights), data=Path(args.data),
                                    output=Path(args.output) if args.output else None, resolution=args.resolution,
                                    grid=args.grid, val_fraction=args.val_fraction)
        out, _, _ = train_content_encoder(settings, loop, log=_say(args))
        _say(args)(f"content encoder -> {out}")
        return
    from editrt.train.elements_stage2 import Stage2Settings, train_decoder

    settings = Stage2Settings(weights=Path(weights), data=Path(args.data),
                              output=Path(args.output) if args.output else None, resolution=args.resolution,
                              grid=args.grid, val_fraction=args.val_fraction, random_partition=args.random_partition,
                              element_dropout=args.element_dropout,
                              gradient_checkpointing=args.gradient_checkpointing)
    run = train_decoder(settings, loop, log=_say(args))
    if run.main:
        _say(args)(f"element decoder -> {run.unet}, {run.adapter}")


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train the learned parts (task prompts, harmonizer) on Accelerate")
    jobs = train.add_subparsers(dest="train_command", required=True, metavar="JOB")

    p = jobs.add_parser("prompts", help="SEELE task inversion (Eq. 1): the remove or complete task prompt")
    p.add_argument("--weights", help="weights directory with inpaint/ and task_prompts.safetensors "
                   "(default: $EDITRT_WEIGHTS)")
    p.add_argument("--task", required=True, choices=("remove", "complete"))
    p.add_argument("--data", metavar="DIR", help="plain layout: DIR/images/NAME.jpg|png + DIR/masks/NAME_K.png")
    p.add_argument("--coco", metavar="ANNOTATIONS.json", help="COCO instance annotations (with --images)")
    p.add_argument("--images", metavar="DIR", help="the COCO images folder")
    p.add_argument("--min-object-fraction", type=float, default=0.01,
                   help="COCO: objects smaller than this fraction of the image are never picked (default 0.01)")
    p.add_argument("-o", "--output", metavar="FILE.safetensors",
                   help="default: the weights folder's task_prompts.safetensors (the other tasks kept)")
    p.add_argument("--init-text", help="the description the prompt starts from (default: the paper's instruction)")
    p.add_argument("--resolution", type=int, default=512, help="square training crops (default 512, SD-2's)")
    _loop_options(p)
    p.set_defaults(func=cmd_train_prompts)

    p = jobs.add_parser("harmonizer", help="SEELE's harmonizer (Eq. 2): the harmonize prompt and a LoRA")
    p.add_argument("--weights", help="weights directory with inpaint/ and task_prompts.safetensors "
                   "(default: $EDITRT_WEIGHTS)")
    p.add_argument("--data", required=True, metavar="DIR", help="iHarmony4 layout: composite_images/, masks/, "
                   "real_images/, NAME_train.txt")
    p.add_argument("-o", "--output", metavar="FILE.safetensors",
                   help="task prompts (default: the weights folder's task_prompts.safetensors, other tasks kept)")
    p.add_argument("--lora-output", metavar="FILE.safetensors",
                   help="default: the weights folder's harmonizer_lora.safetensors")
    p.add_argument("--lora-rank", type=int, default=51, help="LoRA rank (default 51: 5.09M parameters on SD-2 with "
                   "the default targets, the paper's adapter has 5.12M)")
    p.add_argument("--lora-targets", default="attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0",
                   help="comma-separated suffixes of the UNet's linear layers (default: self-attention q, k, v, out)")
    p.add_argument("--init-text", help="the description the harmonize prompt starts from")
    p.add_argument("--resolution", type=int, default=512, help="square training crops (default 512)")
    _loop_options(p)
    p.set_defaults(func=cmd_train_harmonizer)

    p = jobs.add_parser("elements", help="EIE: stage 1 the content encoder (light MAE-style decoder), stage 2 the "
                        "SD-1.5 decoder with the element cross-attentions (Eq. 5)")
    p.add_argument("--weights", help="weights directory with sam/ and elements/ (default: $EDITRT_WEIGHTS)")
    p.add_argument("--data", required=True, metavar="DIR", help="DIR/images/NAME.jpg|png; stage 2 also "
                   "DIR/masks/NAME_K.png (element dropout) and optional DIR/captions/NAME.txt")
    p.add_argument("--stage", type=int, default=1, help="1: content encoder (default); 2: the diffusion decoder "
                   "(elements/unet + elements/element_adapter), content and text encoders frozen")
    p.add_argument("-o", "--output", metavar="DIR", help="stage 1: the content encoder folder (default: the weights "
                   "folder's elements/content_encoder); stage 2: the folder receiving unet/ and element_adapter/ "
                   "(default: the weights folder's elements/)")
    p.add_argument("--resolution", type=int, help="images resized to this square (default: stage 1 256, stage 2 512)")
    p.add_argument("--grid", type=int, default=16, help="partition query grid (16 -> 256 elements)")
    p.add_argument("--random-partition", type=float, default=1.0,
                   help="stage 2: share of samples whose elements are another image's partition (default 1)")
    p.add_argument("--element-dropout", type=float, default=0.5,
                   help="stage 2: share of samples with the elements under a random object mask dropped (default "
                   "0.5; the paper gives no rate)")
    _loop_options(p, steps=None, batch=None, lr=None,
                  paper="paper 001's supplementary; stage 1: lr 1e-4, betas (0.9, 0.95), batch 128, 30 epochs; "
                  "stage 2: lr 6.4e-5, betas (0.9, 0.999), batch 64, 180,000 steps")
    p.set_defaults(func=cmd_train_elements)
