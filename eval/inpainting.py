"""`editrt eval inpaint ROOT`: prompt-guided inpainting on a Places2-style folder (SEELE Table 2a).

ROOT/images/NAME.{jpg,png}; the hole is ROOT/masks/NAME.png (`--mask-protocol files`: the masks of the
protocol being reproduced, e.g. those MAT / Co-Mod-GAN publish) or the centred box (`center`).
Metrics against the original image: PSNR, SSIM, MSE (whole image, or the hole with --region mask), LPIPS, FID.
"""
from __future__ import annotations

import time

import numpy as np

from editrt.errors import EditError
from editrt.eval.datasets import center_box, read_mask, read_rgb, resize_short_side


def inpaint(pipe, image: np.ndarray, mask: np.ndarray, task: str, steps: int, guidance: float, seed: int,
            resolution: int | None) -> np.ndarray:
    """The one call into the inpainting pass (uint8 RGB at the image's size)."""
    out = pipe.inpaint(image, mask, task=task, steps=steps, guidance=guidance, seed=seed, resolution=resolution)
    return np.asarray(out.convert("RGB"))


def evaluate(pipe, samples, protocol: str, short_side: int | None, task: str, region: str, steps: int,
             guidance: float, seed: int, resolution: int | None, scorer, log=None) -> None:
    settings = {"mask_protocol": protocol, "short_side": short_side, "task": task, "region": region,
                "steps": steps, "guidance": guidance, "seed": seed, "resolution": resolution}
    for name, image_path, mask_path in samples:
        image = resize_short_side(read_rgb(image_path), short_side)
        mask = center_box(image.shape[:2]) if mask_path is None else read_mask(mask_path, image.shape[:2])
        row = {"sample": name, "settings": settings}
        start = time.perf_counter()
        try:
            pred = inpaint(pipe, image, mask, task, steps, guidance, seed, resolution)
        except EditError as e:
            scorer.failed(row, e)
            continue
        row["seconds"] = round(time.perf_counter() - start, 4)
        m = scorer.score(row, pred, image, region=mask if region == "mask" else None, image_name=name)["metrics"]
        if log:
            log(f"{name}: psnr {m['psnr']:.2f} ssim {m['ssim']:.3f}")
