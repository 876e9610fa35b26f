"""`editrt eval reconstruct IMAGES`: EIE's reconstruction (its App. B, Table 2): partition each image into
elements, render the unedited elements with the diffusion decoder, compare with the image.

The paper works on 512 x 512 images (`--square 512`, bicubic); `--square 0` keeps each image's own size.
"""
from __future__ import annotations

import time

import numpy as np
from PIL import Image

from editrt.errors import EditError
from editrt.eval.datasets import read_rgb


def reconstruct(pipe, image: np.ndarray, steps: int, guidance: float, seed: int,
                resolution: int | None) -> tuple[np.ndarray, float]:
    """The one call into the elements editor: (the rendered uint8 RGB image, the fraction of working pixels
    the partition's clean-up dropped before they were given to a neighbouring element)."""
    elements = pipe.partition(image, resolution=resolution)
    out = pipe.decode(elements, steps=steps, guidance=guidance, seed=seed)
    return np.asarray(out.convert("RGB")), float(elements.info["working_dropped_fraction"])


def evaluate(pipe, files: dict, square: int, steps: int, guidance: float, seed: int, resolution: int | None,
             scorer, log=None) -> None:
    settings = {"square": square, "steps": steps, "guidance": guidance, "seed": seed, "resolution": resolution}
    for name, path in files.items():
        image = read_rgb(path)
        if square:
            image = np.asarray(Image.fromarray(image).resize((square, square), Image.BICUBIC))
        row = {"sample": name, "settings": settings}
        start = time.perf_counter()
        try:
            pred, dropped = reconstruct(pipe, image, steps, guidance, seed, resolution)
        except EditError as e:
            scorer.failed(row, e)
            continue
        row["seconds"] = round(time.perf_counter() - start, 4)
        row["working_dropped_fraction"] = dropped
        m = scorer.score(row, pred, image, image_name=name)["metrics"]
        if log:
            log(f"{name}: psnr {m['psnr']:.2f} ssim {m['ssim']:.3f} ({100 * dropped:.2f}% of the working pixels refilled after the clean-up)")
