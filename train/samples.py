"""Training samples as pure functions of (seed, sample index): what makes many processes testable.

Sample g of the training stream (g = step x global batch + position) draws everything from one
generator seeded with (seed, stream, g): which image (a seeded permutation per pass over the data),
the crop, which object, the mask, t, the noise eps and the two VAE posterior noises. Which process
computes sample g therefore changes nothing: N processes with global batch B see the same samples as
one process with batch B (train/job.py assigns the indices).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from PIL import Image

from editrt.train.data import ObjectImage
from editrt.train.masks import complete_mask, remove_mask

TRAIN_STREAM, VAL_STREAM = 0, 1
INVERSION_TASKS = ("remove", "complete")


def sample_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def epoch_image(seed: int, index: int, count: int) -> int:
    """The image of training sample `index`: position index % count of pass index // count's permutation."""
    order = np.random.default_rng(np.random.SeedSequence([seed, 0xE9, index // count])).permutation(count)
    return int(order[index % count])


def square_crop(rgbs: list[np.ndarray], masks: list[np.ndarray], focus: np.ndarray, resolution: int,
                rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Short side resized to `resolution` (LANCZOS; masks nearest), then one random square crop of all of them
    holding as much of the `focus` mask's bounding box as fits."""
    h, w = focus.shape
    scale = resolution / min(h, w)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))  # PIL (W, H)
    rgbs = [np.asarray(Image.fromarray(rgb).resize(size, Image.LANCZOS)) for rgb in rgbs]
    masks = [np.asarray(Image.fromarray(m).resize(size, Image.NEAREST)) for m in masks]
    focus = np.asarray(Image.fromarray(focus).resize(size, Image.NEAREST))
    rows, cols = np.nonzero(focus)
    if rows.size == 0:  # the object vanished in the resize (a sliver): any crop
        rows, cols = np.array([0, size[1] - 1]), np.array([0, size[0] - 1])

    def offset(lo: int, hi: int, length: int) -> int:
        # crops [o, o + R) that contain [lo, hi] if they can, else the box's centre
        first, last = max(0, hi + 1 - resolution), min(length - resolution, lo)
        if first > last:
            centre = (lo + hi) // 2
            first = last = min(max(0, centre - resolution // 2), length - resolution)
        return int(rng.integers(first, last + 1))

    oy = offset(rows.min(), rows.max(), size[1])
    ox = offset(cols.min(), cols.max(), size[0])
    window = (slice(oy, oy + resolution), slice(ox, ox + resolution))
    return [rgb[window] for rgb in rgbs], [m[window] for m in masks]


def inversion_sample(record: ObjectImage, task: str, resolution: int, rng: np.random.Generator,
                     latent_shape: tuple[int, int, int], train_timesteps: int) -> dict[str, torch.Tensor]:
    """One (image, task mask, t, noises) sample for Eq. (1); every draw from `rng`, in a fixed order."""
    rgb = record.load_rgb()
    masks, pickable = record.load_masks()
    # 1. The object (never a crowd region or a sliver), then a crop that holds it.
    candidates = [i for i, ok in enumerate(pickable) if ok and masks[i].any()]
    chosen = candidates[int(rng.integers(len(candidates)))]
    (rgb,), masks = square_crop([rgb], masks, masks[chosen], resolution, rng)
    obj = masks[chosen]
    if not obj.any():  # cropped away entirely (a very long thin object): the nearest stand-in is its box
        obj = np.zeros_like(obj)
        obj[resolution // 4: 3 * resolution // 4, resolution // 4: 3 * resolution // 4] = True
    # 2. The task's mask (Sec. 3.2).
    if task == "remove":
        occupied = np.logical_or.reduce(masks) | obj
        mask = remove_mask(obj, occupied, rng).mask
    else:
        mask = complete_mask(obj, rng, max_radius=max(1, round(0.02 * resolution))).mask
    # 3. t and the noises.
    return {"image": as_tensor(rgb), "mask": torch.from_numpy(mask.astype(np.float32))[None],  # (1, R, R): 1 = regenerate
            **noise_draws(rng, latent_shape, train_timesteps)}


def as_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()  # (3, R, R) in [-1, 1]


def noise_draws(rng: np.random.Generator, latent_shape: tuple[int, int, int], train_timesteps: int) -> dict:
    """t, eps and two VAE posterior noises, from a torch generator seeded by this sample's own stream."""
    timestep = int(rng.integers(0, train_timesteps))
    generator = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
    noise = torch.randn(latent_shape, generator=generator)  # (4, h, w)
    posterior_noise = torch.randn((2, *latent_shape), generator=generator)  # target latents | condition latents
    return {"timestep": torch.tensor(timestep), "noise": noise, "posterior_noise": posterior_noise}


class IndexedSamples(torch.utils.data.Dataset, ABC):
    """Index -> sample: training stream g (a record by seeded permutation) or validation sample i (record i % n).
    Subclasses say how a record becomes a sample (`make`)."""

    def __init__(self, records: list, task: str, resolution: int, seed: int, stream: int,
                 latent_shape: tuple[int, int, int], train_timesteps: int):
        self.records, self.task, self.resolution, self.seed, self.stream = records, task, resolution, seed, stream
        self.latent_shape, self.train_timesteps = latent_shape, train_timesteps

    def __len__(self) -> int:  # indices are unbounded (passes over the data); the sampler says which
        return 2**62

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = sample_rng(self.seed, self.stream, index)
        n = len(self.records)
        image = epoch_image(self.seed, index, n) if self.stream == TRAIN_STREAM else index % n
        return self.make(self.records[image], rng)

    @abstractmethod
    def make(self, record, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """One training sample from `record`, every random draw from `rng`."""


class InversionSamples(IndexedSamples):
    """Eq. (1) samples: an object image, the task's mask (remove / complete)."""

    def make(self, record: ObjectImage, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return inversion_sample(record, self.task, self.resolution, rng, self.latent_shape, self.train_timesteps)
