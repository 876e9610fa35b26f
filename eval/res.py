"""`editrt eval res ROOT`: SEELE's subject-repositioning benchmark (ReS, the paper's Table 1).

Every task moves the source view's subject by the difference of the subject centres and compares the result
with the other view (whole image). Protocols:

* `paper` (Table 1's setup): images at short side 512, no pre- or post-processing (no depth, matting or
  harmonization); the completion mask comes from the amodal annotation.
* `editrt`: the images at their own size (or --short-side), editrt's defaults (the harmonize stage on).

Removal order (SeeleEdit.remove_order, recorded in each row's settings as `removal_order`): `paper` moves the
subject first and removes with the moved subject in view, as the paper does; `editrt` keeps the pipeline's
default cached order (remove on the unmoved image, paste afterwards).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from editrt.errors import EditError
from editrt.eval.datasets import ResTask, res_pair_numbers, res_tasks

PROTOCOLS = ("paper", "editrt")
PAPER_SHORT_SIDE = 512


@dataclass
class ResSettings:
    protocol: str
    short_side: int | None
    steps: int
    guidance: float
    seed: int
    resolution: int | None  # the pipeline's processing short side (None: the model's)
    harmonize: bool
    depth: bool = False
    matting: bool = False
    removal_order: str = "cached"  # SeeleEdit.remove_order: "cached" (remove on the unmoved image) or "paper" (move first)


def settings_for(protocol: str, short_side: int | None, steps: int, guidance: float, seed: int,
                 resolution: int | None) -> ResSettings:
    if protocol == "paper":
        return ResSettings("paper", PAPER_SHORT_SIDE if short_side is None else short_side, steps, guidance, seed,
                           resolution, harmonize=False, removal_order="paper")
    return ResSettings("editrt", short_side, steps, guidance, seed, resolution, harmonize=True)


def reposition(pipe, task: ResTask, settings: ResSettings) -> np.ndarray:
    """The one call into the repositioning editor for a ReS task (uint8 RGB result at the task's size)."""
    result = pipe(task.source, mask=task.subject, move=task.move,
                  complete_mask=task.complete if task.complete.any() else None, harmonize=settings.harmonize,
                  steps=settings.steps, guidance=settings.guidance, seed=settings.seed,
                  resolution=settings.resolution, remove_order=settings.removal_order)
    return np.asarray(result.image.convert("RGB"))


def check_root(root) -> None:
    """The layout's file names, before any weights load."""
    res_pair_numbers(Path(root))


def evaluate(pipe, root, settings: ResSettings, scorer, limit: int | None = None, log=None) -> None:
    """Score every task of ROOT (up to `limit`) into `scorer`: one row each, in pair order."""
    for task in res_tasks(root, settings.short_side, limit, log=log):
        row = {"sample": task.sample, "direction": task.direction, "move": list(task.move),
               "settings": asdict(settings)}
        start = time.perf_counter()
        try:
            pred = reposition(pipe, task, settings)
        except EditError as e:
            scorer.failed(row, e)
            continue
        row["seconds"] = round(time.perf_counter() - start, 4)
        scorer.score(row, pred, task.target, image_name=f"{task.sample}_{task.direction}")
        if log:
            m = scorer.rows[-1]["metrics"]
            log(f"{task.sample} {task.direction} move {task.move}: psnr {m['psnr']:.2f} ssim {m['ssim']:.3f}"
                + (f" lpips {m['lpips']:.3f}" if "lpips" in m else ""))
