"""`editrt eval harmonize ROOT`: local harmonization on the iHarmony4 test set (SEELE Table 3a).

Each composite and its mask are resized to --size x --size (SEELE: 512; iHarmony4 papers: 256), harmonized
inside the mask (harmonize prompt + LoRA) and compared with the real image: MSE and PSNR over the whole image,
fMSE over the foreground (MSE x H x W / foreground pixels, as DoveNet's evaluation), on the 0..255 scale.
"""
from __future__ import annotations

import time

import numpy as np
from PIL import Image

from editrt.errors import EditError
from editrt.eval.datasets import HarmonySample, read_mask, read_rgb
from editrt.eval.metrics import pixel_metrics


def harmonize(pipe, composite: np.ndarray, mask: np.ndarray, steps: int, guidance: float, seed: int,
              resolution: int | None) -> np.ndarray:
    """The one call into the harmonizer (uint8 RGB at the composite's size)."""
    out = pipe.harmonize(composite, mask, steps=steps, seed=seed, guidance=guidance, resolution=resolution)
    return np.asarray(out.convert("RGB"))


def load(sample: HarmonySample, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(composite, real, mask) at size x size (bicubic images, nearest mask)."""
    composite, real = read_rgb(sample.composite), read_rgb(sample.real)
    mask = read_mask(sample.mask, composite.shape[:2])
    square = lambda rgb: np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))
    mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
    return square(composite), square(real), mask


def evaluate(pipe, samples: list[HarmonySample], size: int, steps: int, guidance: float, seed: int,
             resolution: int | None, scorer, log=None) -> None:
    settings = {"size": size, "steps": steps, "guidance": guidance, "seed": seed, "resolution": resolution}
    for sample in samples:
        composite, real, mask = load(sample, size)
        row = {"sample": sample.composite.name, "subset": sample.subset, "settings": settings}
        start = time.perf_counter()
        try:
            pred = harmonize(pipe, composite, mask, steps, guidance, seed, resolution)
        except EditError as e:
            scorer.failed(row, e)
            continue
        row["seconds"] = round(time.perf_counter() - start, 4)
        m = scorer.score(row, pred, real, image_name=sample.composite.stem,
                         extra=lambda p, t, fg=mask: {"fmse": pixel_metrics(p, t, fg)["mse"]})["metrics"]
        if log:
            log(f"{sample.subset}/{sample.composite.name}: mse {m['mse']:.2f} fmse {m['fmse']:.2f} psnr {m['psnr']:.2f}")


def columns(rows: list[dict]) -> dict[str, list[dict]]:
    """'All' first (the run's FID goes there), then each sub-dataset."""
    groups = {"All": rows}
    for row in rows:
        groups.setdefault(row["subset"], []).append(row)
    return groups
