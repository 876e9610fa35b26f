"""EIE stage 2 (paper 001 Sec. 3.3, supplementary): the SD-1.5 decoder with the element cross-attentions, Eq. (5).

    L = E_{z, eps, t} || eps - U(z_t, t, C, S; theta_U, theta_S) ||^2

theta_U starts from the weights folder's `elements/unet` (the pretrained SD-1.5 UNet), theta_S (the element
adapter: the token embedder and every block's norm_elements / attn_elements, models/element_unet.py) is
randomly initialised from the seed. Both are trained; the content encoder, the text encoder and the VAE are
frozen (the paper freezes the content and text encoders; the VAE is SD's own, frozen as in SD's training).

A sample of image i (resized to an S x S square and partitioned by the runtime's partition at the start of the
job, as stage 1 does) draws, from its own (seed, index) generator (train/samples.py), in this order:

1. **Random Partition** (with probability `random_partition`, default 1: the paper "obtain[s] the random image
   elements partitioned from another sampled image"): the elements are another training image j's partition
   laid over image i, so element boundaries do not follow image i's edges. Patches and boxes are cut exactly as
   the runtime cuts them (ElementsPipeline.element_patches, Elements.boxes), from image i's pixels.
2. **Image-element dropout** (with probability `element_dropout`, default 0.5, editrt's choice: the paper gives
   no rate): an object mask from the dataset's masks (the paper's database of object masks), of a random
   training image, is laid over image i and every element it overlaps is dropped (an all-zero token, as the
   runtime gives a deleted element). The target stays the whole image: the decoder learns to fill the gap.
3. **Classifier-free-guidance dropout**, the supplementary's rates: C = empty prompt only for 30 % of samples,
   S = empty (all-zero tokens, what the runtime's guidance uses) only for 10 %, both for 10 %.
4. t, eps and the VAE posterior noise (train/samples.noise_draws).

Captions: `DIR/captions/NAME.txt` (one sentence) where present, else the empty prompt. Written as the runtime
loads them: `elements/unet/` (a plain diffusers UNet folder, the element layers taken out) and
`elements/element_adapter/` (config.json + model.safetensors, ElementDecoder.save_adapter's keys).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from editrt.errors import InputError, WeightsError
from editrt.models.files import load_diffusers, publish_folders, read_json
from editrt.models.networks import VaeEncoderNet
from editrt.train.data import ObjectImage, check_plain, split_train_val
from editrt.train.job import LoopSettings, start_job, train_loop, weight_dtype
from editrt.train.samples import TRAIN_STREAM, VAL_STREAM, IndexedSamples, as_tensor, noise_draws

# Supplementary: "we randomly set only C = ∅ for 30% of examples, S = ∅ for 10% of examples, and both for 10%".
CFG_DROP_TEXT, CFG_DROP_ELEMENTS, CFG_DROP_BOTH = 0.3, 0.1, 0.1
ELEMENT_LAYER_KEYS = (".norm_elements.", ".attn_elements.")  # theta_S inside the UNet's blocks


@dataclass
class Stage2Image:
    """One training image at S x S: its pixels, object masks, caption tokens and its own partition."""
    rgb: np.ndarray  # uint8 [S, S, 3]
    masks: list[np.ndarray]  # bool [S, S], the plain layout's objects (the element-dropout database)
    input_ids: torch.Tensor  # [77] the caption's tokens
    partition: object  # runtime/partition.Partition at S x S
    boxes: torch.Tensor  # [K, 4] (x, y, w, h) in [0, 1] of this partition's elements
    alive: torch.Tensor  # [K] bool: elements with pixels


def cfg_drops(u: float) -> tuple[bool, bool]:
    """(drop the text, drop the elements) for a uniform draw u, at the supplementary's rates."""
    if u < CFG_DROP_TEXT:
        return True, False
    if u < CFG_DROP_TEXT + CFG_DROP_ELEMENTS:
        return False, True
    if u < CFG_DROP_TEXT + CFG_DROP_ELEMENTS + CFG_DROP_BOTH:
        return True, True
    return False, False


def overlapped_elements(labels: np.ndarray, mask: np.ndarray, count: int) -> np.ndarray:
    """bool [count]: the elements of `labels` with at least one pixel under `mask`."""
    hit = np.zeros(count, bool)
    ids = labels[mask]
    hit[ids[ids >= 0]] = True
    return hit


class Stage2Samples(IndexedSamples):
    """Eq. (5) samples (the module docstring's draws), from `records` (Stage2Image)."""

    def __init__(self, records: list[Stage2Image], resolution: int, seed: int, stream: int, latent_shape,
                 train_timesteps: int, empty_ids: torch.Tensor, random_partition: float, element_dropout: float):
        super().__init__(records, "elements-stage2", resolution, seed, stream, latent_shape, train_timesteps)
        self.empty_ids, self.random_partition, self.element_dropout = empty_ids, random_partition, element_dropout

    def make(self, record: Stage2Image, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        from editrt.runtime.elements_pipeline import ElementsPipeline

        n = len(self.records)
        # 1. Whose partition: another image's (Random Partition) or its own.
        source = record
        if rng.random() < self.random_partition and n > 1:
            others = [r for r in self.records if r is not record]
            source = others[int(rng.integers(len(others)))]
        part = source.partition
        # the runtime's own patch cutting (it does not use the pipeline's state)
        patches, ids = ElementsPipeline.element_patches(None, record.rgb, part)  # (k, 3, 32, 32)
        full = torch.zeros(part.num_elements, *patches.shape[1:])
        full[torch.from_numpy(ids)] = patches
        alive = source.alive.clone()
        # 2. Image-element dropout: an object mask of a random training image over this one.
        if rng.random() < self.element_dropout:
            holder = self.records[int(rng.integers(n))]
            mask = holder.masks[int(rng.integers(len(holder.masks)))]
            alive &= ~torch.from_numpy(overlapped_elements(part.labels, mask, part.num_elements))
        # 3. Classifier-free-guidance dropout.
        drop_text, drop_elements = cfg_drops(float(rng.random()))
        if drop_elements:
            alive = torch.zeros_like(alive)
        return {"image": as_tensor(record.rgb), "patches": full, "boxes": source.boxes, "alive": alive,
                "input_ids": self.empty_ids if drop_text else record.input_ids,
                **noise_draws(rng, self.latent_shape, self.train_timesteps)}


class Stage2(nn.Module):
    """The trained part: the element decoder (theta_U + the element attentions) and the token embedder (theta_S).
    forward(noisy latents, t, text states, features, boxes, alive) -> the UNet's prediction."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, sample, timestep, text, features, boxes, alive):
        tokens = self.decoder.embedder(features, boxes, alive)  # (B, K, D); dead elements: all-zero tokens
        return self.decoder(sample, timestep, text, element_tokens=tokens)


class FrozenParts:
    """The VAE encoder, content encoder and text encoder of the elements folder, frozen, in the weight dtype."""

    def __init__(self, folder: Path, device, dtype: torch.dtype):
        from diffusers import AutoencoderKL

        from editrt.models.content_encoder import ContentEncoder
        from editrt.models.inpaint import load_scheduler
        from editrt.models.text import load_text_encoder

        vae = load_diffusers(AutoencoderKL, folder / "vae", "element decoder VAE", dtype).requires_grad_(False)
        self.vae_encoder = VaeEncoderNet(vae.to(device).eval())
        self.content_encoder = ContentEncoder.from_pretrained(folder / "content_encoder", dtype) \
            .requires_grad_(False).to(device).eval()
        self.text_encoder = load_text_encoder(folder / "text_encoder", dtype).requires_grad_(False).to(device)
        self.scheduler = load_scheduler(folder / "scheduler")
        self.prediction = self.scheduler.config.prediction_type
        if self.prediction not in ("epsilon", "v_prediction"):
            raise WeightsError(f"{folder / 'scheduler'}: prediction_type {self.prediction!r}; expected epsilon or "
                               "v_prediction")
        self.dtype, self.feature_dim = dtype, self.content_encoder.config["feature_dim"]
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = vae.config.latent_channels

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return (self.latent_channels, resolution // self.vae_scale_factor, resolution // self.vae_scale_factor)

    @torch.no_grad()
    def conditions(self, batch: dict[str, torch.Tensor]):
        """(noisy latents, t, clean latents, text states, element features) of a batch."""
        image = batch["image"].to(self.dtype)
        latents = self.vae_encoder(image, batch["posterior_noise"][:, 0].to(self.dtype))  # (B, 4, h, w)
        noisy = self.scheduler.add_noise(latents, batch["noise"].to(self.dtype), batch["timestep"])
        text = self.text_encoder(batch["input_ids"])[0]  # (B, 77, D)
        alive = batch["alive"]
        features = torch.zeros(*alive.shape, self.feature_dim, device=alive.device, dtype=self.dtype)
        if alive.any():
            features[alive] = self.content_encoder(batch["patches"][alive].to(self.dtype)).to(self.dtype)
        return noisy, batch["timestep"], latents, text, features

    def per_sample_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eq. (5) for each sample: (B,) mean squared error of the prediction."""
        noisy, timesteps, latents, text, features = self.conditions(batch)
        pred = model(noisy, timesteps, text, features, batch["boxes"].to(self.dtype), batch["alive"])
        noise = batch["noise"].to(self.dtype)
        target = noise if self.prediction == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        dtype = torch.promote_types(self.dtype, torch.float32)
        return F.mse_loss(pred.to(dtype), target.to(dtype), reduction="none").mean(dim=(1, 2, 3))


def read_caption(folder: Path, stem: str) -> str:
    path = folder / "captions" / f"{stem}.txt"
    if not path.is_file():
        return ""
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it as UTF-8 text ({type(e).__name__}); expected one caption") from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """[77] ids, padded and truncated as the runtime's encode_prompt tokenizes."""
    return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids[0]


def prepare_images(records: list[ObjectImage], data: Path, weights: Path, size: int, grid: int, tokenizer,
                   device) -> tuple[list[Stage2Image], int]:
    """Every image and its masks at size x size, its caption's tokens and the runtime's partition of it.
    Returns (images, how many have a caption)."""
    from editrt.runtime.elements import Elements
    from editrt.runtime.elements_pipeline import ElementsPipeline
    from editrt.runtime.partition import partition

    pipe = ElementsPipeline.from_pretrained(weights, device=device)
    out, captioned = [], 0
    for record in records:
        rgb = np.asarray(Image.fromarray(record.load_rgb()).resize((size, size), Image.LANCZOS))
        masks = [np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)) for m in record.load_masks()[0]]
        masks = [m for m in masks if m.any()] or [np.ones((size, size), bool)]
        caption = read_caption(data, record.path.stem)
        captioned += bool(caption)
        part = partition(pipe.segmenter, rgb, grid=grid)
        elements = Elements.from_labels(part.labels, np.zeros((part.num_elements, 1), np.float32), (size, size))
        out.append(Stage2Image(rgb, masks, tokenize(tokenizer, caption), part, torch.from_numpy(elements.boxes()),
                               torch.from_numpy(np.asarray(elements.alive, bool))))
    return out, captioned


def plain_unet_state(state: dict[str, torch.Tensor], prefix: str = "decoder.unet.") -> dict[str, torch.Tensor]:
    """The UNet's own tensors from a Stage2 state dict: the element layers (theta_S) taken out."""
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not any(s in k for s in ELEMENT_LAYER_KEYS)}


def write_decoder(state: dict[str, torch.Tensor], unet_config: dict, adapter: dict, out: Path,
                  record: dict | None = None) -> None:
    """`out/unet` and `out/element_adapter` from a Stage2 state dict, in the runtime's formats (the adapter folder
    also gets `training.json`, `record`); published together (publish_folders): a reader, or a crash, sees both
    old or both new."""
    from diffusers import UNet2DConditionModel

    from editrt.models.element_unet import build_element_decoder

    unet = UNet2DConditionModel.from_config(unet_config)
    decoder = build_element_decoder(unet, adapter)
    decoder.load_state_dict({k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")})
    plain = UNet2DConditionModel.from_config(unet_config)
    plain.load_state_dict(plain_unet_state(state))  # strict: every UNet tensor, nothing else
    def write_adapter(tmp: Path) -> None:
        decoder.save_adapter(tmp)
        if record is not None:
            (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")

    publish_folders(out, {"unet": lambda tmp: plain.save_pretrained(tmp, safe_serialization=True),
                          "element_adapter": write_adapter})




@dataclass
class Stage2Settings:
    weights: Path
    data: Path
    output: Path | None = None  # a folder receiving unet/ and element_adapter/ (default: the weights' elements/)
    resolution: int = 512
    grid: int = 16
    val_fraction: float = 0.05
    random_partition: float = 1.0
    element_dropout: float = 0.5
    gradient_checkpointing: bool = False

    def check(self) -> None:
        if isinstance(self.resolution, bool) or self.resolution < 8 or self.resolution % 8:
            raise InputError(f"--resolution {self.resolution}: expected a positive multiple of 8", field="resolution")
        for name in ("random_partition", "element_dropout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1):
                raise InputError(f"--{name.replace('_', '-')} {value!r}: expected a probability in [0, 1]", field=name)


@dataclass
class Stage2Run:
    unet: Path
    adapter: Path
    result: object  # train/job.LoopResult
    frozen: FrozenParts
    model: Stage2
    main: bool


def train_decoder(settings: Stage2Settings, loop: LoopSettings, log=lambda what: None, on_step=None,
                  accelerator=None) -> Stage2Run:
    """EIE stage 2; the main process writes elements/unet and elements/element_adapter."""
    from editrt.models.element_unet import adapter_config, build_element_decoder
    from editrt.models.text import load_tokenizer

    # 1. Check inputs before any network loads.
    settings.check()
    accelerator, log, layout = start_job(loop, settings.weights, log, accelerator)
    folder = layout.elements
    out = folder if settings.output is None else Path(settings.output)
    records = check_plain(settings.data)
    unet_config = read_json(folder / "unet" / "config.json", "the element decoder UNet config")
    old_adapter = folder / "element_adapter" / "config.json"
    bands = read_json(old_adapter, "the element adapter config").get("fourier_bands", 8) if old_adapter.is_file() else 8

    # 2. Frozen parts; theta_U from the pretrained UNet, theta_S from the seed.
    from diffusers import UNet2DConditionModel

    frozen = FrozenParts(folder, accelerator.device, weight_dtype(accelerator))
    adapter = adapter_config(frozen.feature_dim, bands, unet_config["cross_attention_dim"])
    unet = load_diffusers(UNet2DConditionModel, folder / "unet", "element decoder UNet", torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(loop.seed)  # theta_S: the same random start on every process and every run
        model = Stage2(build_element_decoder(unet, adapter)).float().train()
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    tokenizer = load_tokenizer(folder / "tokenizer")
    log(f"elements stage 2: partitioning {len(records)} images at {settings.resolution}x{settings.resolution}")
    images, captioned = prepare_images(records, settings.data, layout.root, settings.resolution, settings.grid,
                                       tokenizer, accelerator.device)
    log(f"elements stage 2: {captioned} of {len(images)} images have a caption (captions/NAME.txt); the others "
        "train with the empty prompt")
    train_images, val_images = split_train_val(images, settings.val_fraction, loop.seed)

    # 3. Samples and the shared loop.
    shape, timesteps = frozen.latent_shape(settings.resolution), frozen.scheduler.config.num_train_timesteps
    empty = tokenize(tokenizer, "")

    def samples(recs, stream):
        return Stage2Samples(recs, settings.resolution, loop.seed, stream, shape, timesteps, empty,
                             settings.random_partition, settings.element_dropout)

    identity = {"job": "elements-stage2", "seed": loop.seed, "batch_size": loop.batch_size,
                "resolution": settings.resolution, "grid": settings.grid, "images": len(records),
                "val_fraction": settings.val_fraction, "random_partition": settings.random_partition,
                "element_dropout": settings.element_dropout}
    trained = sum(p.numel() for p in model.parameters())
    log(f"elements stage 2: {len(train_images)} training and {len(val_images)} validation images, {trained:,} "
        f"trained parameters, {loop.steps} steps of {loop.batch_size} samples on {accelerator.num_processes} "
        "process(es)")
    result = train_loop(accelerator, loop, model, frozen.per_sample_loss, samples(train_images, TRAIN_STREAM),
                        samples(val_images, VAL_STREAM) if val_images else None, identity, on_step=on_step,
                        describe="train elements (stage 2)")

    # 4. The best (or last) state into the runtime's two folders.
    chosen = result.best if result.best is not None else result.last
    unet_out, adapter_out = out / "unet", out / "element_adapter"
    if accelerator.is_main_process:
        write_decoder(chosen, unet_config, adapter, out, {
            "content": "element adapter trained with the UNet (paper 001 Eq. 5, editrt train elements --stage 2)",
            "step": result.best_step if result.best is not None else result.step,
            "val_loss": result.best_val_loss})
    accelerator.wait_for_everyone()
    return Stage2Run(unet_out, adapter_out, result, frozen, model, accelerator.is_main_process)
