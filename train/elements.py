"""EIE stage 1 (paper 001 Sec. 3.2, supplementary): the content encoder, trained through a light decoder.

Each image (resized to S x S) is partitioned into elements by the runtime's own partition (SAM features,
grid x grid queries, runtime/partition.py) once, at the start of the job. A sample is the image, every
element's masked 32x32 patch (runtime/elements_pipeline.element_patches) and its (x, y, w, h) box
(runtime/elements.Elements.boxes). The content encoder (models/content_encoder.py, the runtime's) turns
patches into features; the light decoder reconstructs the image from the elements alone; the loss is the
l2 (mean squared) reconstruction error. All elements are given (no dropout in this stage, as the paper).

The light decoder is MAE-style: one query per p x p patch of the output, its coordinate embedding (Fourier
features of the patch centre) as the starting point, 8 self-attention blocks with a cross-attention over
the element tokens after every second one (4), and a linear head to the patch's pixels. Element tokens are
the runtime's ElementEmbedder (feature + Fourier box); padding slots are masked out of the attention.
Only the content encoder is written (`elements/content_encoder/`, as ContentEncoder.from_pretrained reads
it); the decoder lives in the checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from editrt.errors import InputError
from editrt.models.content_encoder import ContentEncoder
from editrt.models.element_unet import ElementEmbedder
from editrt.models.files import replace_dir
from editrt.train.data import IMAGE_SUFFIXES, _open_size, split_train_val
from editrt.train.job import LoopSettings, start_job, train_loop
from editrt.train.samples import TRAIN_STREAM, VAL_STREAM, IndexedSamples


class LightDecoder(nn.Module):
    """Element tokens -> image [B, 3, S, S] (see the module docstring)."""

    def __init__(self, feature_dim: int, image_size: int, patch: int = 8, width: int = 256, heads: int = 4,
                 blocks: int = 8, fourier_bands: int = 8):
        super().__init__()
        if image_size % patch:
            raise InputError(f"--resolution {image_size}: expected a multiple of the decoder patch {patch}")
        self.patch, self.grid = patch, image_size // patch
        centres = (torch.arange(self.grid, dtype=torch.float32) + 0.5) / self.grid
        yy, xx = torch.meshgrid(centres, centres, indexing="ij")
        angles = torch.stack([xx, yy], -1).reshape(-1, 2, 1) * (math.pi * 2.0 ** torch.arange(fourier_bands))
        self.register_buffer("coordinates", torch.cat([angles.sin(), angles.cos()], -1).flatten(1), persistent=False)
        self.query = nn.Linear(4 * fourier_bands, width)  # (G*G, 4 * bands) -> (G*G, width)
        self.elements = ElementEmbedder(feature_dim, fourier_bands, width)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(blocks))
        self.cross_norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks // 2))
        self.cross = nn.ModuleList(nn.MultiheadAttention(width, heads, batch_first=True) for _ in range(blocks // 2))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, patch * patch * 3))

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """features [B, K, F], boxes [B, K, 4] (x, y, w, h) in [0, 1], alive [B, K] bool -> [B, 3, S, S]."""
        b = features.shape[0]
        tokens = self.elements(features, boxes, alive)  # (B, K, D)
        x = self.query(self.coordinates)[None].expand(b, -1, -1)  # (B, G*G, D)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i % 2 == 1:  # 4 cross-attentions, after blocks 2, 4, 6, 8
                j = i // 2
                attended, _ = self.cross[j](self.cross_norms[j](x), tokens, tokens, key_padding_mask=~alive,
                                            need_weights=False)
                x = x + attended
        patches = self.head(x)  # (B, G*G, p*p*3)
        p, g = self.patch, self.grid
        return patches.reshape(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)


class Stage1(nn.Module):
    """The trained pair; forward(batch) -> (B,) reconstruction losses."""

    def __init__(self, encoder: ContentEncoder, decoder: LightDecoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        alive = batch["alive"]  # (B, K)
        features = torch.zeros(*alive.shape, self.decoder.elements.feature_dim, device=alive.device)
        features[alive] = self.encoder(batch["patches"][alive]).float()  # encoder on the live patches only
        image = self.decoder(features, batch["boxes"], alive)  # (B, 3, S, S)
        return F.mse_loss(image, batch["image"], reduction="none").mean(dim=(1, 2, 3))


def check_images(folder: str | Path) -> list[Path]:
    folder = Path(folder) / "images"
    if not folder.is_dir():
        raise InputError(f"{folder}: missing; expected DIR/images/NAME.jpg|png")
    paths = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not paths:
        raise InputError(f"{folder}: holds no .jpg or .png images")
    for p in paths:
        _open_size(p, "a training image")
    return paths


@dataclass
class PartitionedImage:
    rgb: np.ndarray  # uint8 [S, S, 3]
    patches: torch.Tensor  # [K, 3, 32, 32]
    boxes: torch.Tensor  # [K, 4]
    alive: torch.Tensor  # [K] bool


def partition_images(paths: list[Path], weights: Path, size: int, grid: int, device) -> list[PartitionedImage]:
    """Every image resized to size x size and split by the runtime's partition (SAM of the weights folder)."""
    from editrt.runtime.elements import Elements
    from editrt.runtime.elements_pipeline import ElementsPipeline
    from editrt.runtime.partition import partition

    pipe = ElementsPipeline.from_pretrained(weights, device=device)
    out = []
    for path in paths:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB").resize((size, size), Image.LANCZOS))
        part = partition(pipe.segmenter, rgb, grid=grid)
        patches, ids = pipe.element_patches(rgb, part)
        elements = Elements.from_labels(part.labels, np.zeros((part.num_elements, 1), np.float32), (size, size))
        full = torch.zeros(part.num_elements, *patches.shape[1:])
        full[torch.from_numpy(ids)] = patches
        out.append(PartitionedImage(rgb, full, torch.from_numpy(elements.boxes()),
                                    torch.from_numpy(np.asarray(elements.alive, bool))))
    return out


class ElementSamples(IndexedSamples):
    """No random draws beyond which image: stage 1 gives every element (the paper: no dropout)."""

    def make(self, record: PartitionedImage, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        image = torch.from_numpy(record.rgb.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
        return {"image": image, "patches": record.patches, "boxes": record.boxes, "alive": record.alive}


@dataclass
class ElementsSettings:
    weights: Path
    data: Path
    output: Path | None = None  # default: the weights folder's elements/content_encoder
    resolution: int = 256
    grid: int = 16
    val_fraction: float = 0.05


def train_content_encoder(settings: ElementsSettings, loop: LoopSettings, log=lambda what: None, on_step=None,
                          accelerator=None):
    """Train the content encoder; `loop.steps` None: 30 passes over the training images (the paper's 30 epochs)."""
    epochs_steps = loop.steps is None
    if epochs_steps:
        loop.steps = 1  # checked now, set once the training images are counted
    accelerator, log, layout = start_job(loop, settings.weights, log, accelerator)
    out = layout.elements / "content_encoder" if settings.output is None else Path(settings.output)
    paths = check_images(settings.data)
    encoder = ContentEncoder.from_pretrained(layout.elements / "content_encoder").float().train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(loop.seed)  # the light decoder's random start: from the seed, the same on every process
        decoder = LightDecoder(encoder.config["feature_dim"], settings.resolution)
    log(f"elements stage 1: partitioning {len(paths)} images at {settings.resolution}x{settings.resolution}")
    images = partition_images(paths, layout.root, settings.resolution, settings.grid, accelerator.device)
    train_images, val_images = split_train_val(images, settings.val_fraction, loop.seed)
    if epochs_steps:
        loop.steps = max(1, math.ceil(30 * len(train_images) / loop.batch_size))
    train_data = ElementSamples(train_images, "elements", settings.resolution, loop.seed, TRAIN_STREAM, (0, 0, 0), 1)
    val_data = ElementSamples(val_images, "elements", settings.resolution, loop.seed, VAL_STREAM, (0, 0, 0), 1) \
        if val_images else None
    identity = {"job": "elements-stage1", "seed": loop.seed, "batch_size": loop.batch_size,
                "resolution": settings.resolution, "grid": settings.grid, "images": len(paths),
                "val_fraction": settings.val_fraction}
    model = Stage1(encoder, decoder)
    result = train_loop(accelerator, loop, model, lambda m, b: m(b), train_data, val_data, identity,
                        on_step=on_step, describe="train elements (stage 1)")
    chosen = result.best if result.best is not None else result.last
    if accelerator.is_main_process:
        trained = ContentEncoder(**encoder.config)
        trained.load_state_dict({k[len("encoder."):]: v for k, v in chosen.items() if k.startswith("encoder.")})
        replace_dir(out, trained.save_pretrained)  # a crash leaves the old encoder or the new, never none
    accelerator.wait_for_everyone()
    return out, result, model
