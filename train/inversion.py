"""SEELE task inversion, Eq. (1) of paper 000: learn the remove or complete task prompt.

    L(z) = E_{eps ~ N(0, I), t} || eps - eps_theta([x_t, m, x * (1 - m)], t, z) ||^2

The SD-2 inpainting UNet and VAE are frozen (requires_grad_(False), cast to the mixed-precision
dtype); the only parameter is the task prompt z, [L, C] in float32, initialised from a text
description the way `editrt weights prompts --from-text` does (App. A.2). The 9-channel input is
built the way the runtime builds it (runtime/reposition.py `_denoise`): image in [-1, 1], latents =
the VAE posterior sample x scaling factor (models/networks.VaeEncoderNet, the exported encoder),
the mask resized nearest to the latent grid, condition = image with the mask cut out. The loss is
the mean squared error over the batch's elements (the Frobenius norm squared, divided by its size).

The output is `task_prompts.safetensors` exactly as models/inpaint.load_task_prompts reads it: the
trained task from the best held-out validation loss (the last step when there is no validation),
the other tasks and `null` kept from the file it replaces.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from editrt.errors import InputError, WeightsError
from editrt.models.components import WeightsLayout
from editrt.models.files import read_json, write_atomic
from editrt.models.inpaint import PROMPT_KEYS, load_scheduler, load_task_prompts, load_unet, load_vae, save_task_prompts
from editrt.models.networks import VaeEncoderNet
from editrt.train.job import LoopSettings, start_job, train_loop, weight_dtype
from editrt.train.samples import INVERSION_TASKS, TRAIN_STREAM, VAL_STREAM, InversionSamples

# The paper initialises each prompt "with text descriptions from the task instructions" (App. A.2);
# these are its SD_complex instructions for the same two tasks (Sec. 4).
INIT_TEXTS = {
    "remove": "Incorporate visually cohesive and high-fidelity background and texture into the provided image "
              "through inpainting",
    "complete": "Complete the subject by filling in the missing region with visually cohesive and high-fidelity "
                "background and texture",
}


class TaskPrompt(nn.Module):
    """The trained parameter: z, [L, C] float32. forward(B) -> (B, L, C), the UNet's encoder_hidden_states."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.prompt = nn.Parameter(init.detach().float().clone())

    def forward(self, batch: int) -> torch.Tensor:
        return self.prompt[None].expand(batch, -1, -1)  # (B, L, C)


class FrozenInpainter:
    """The frozen SD-2 inpainting UNet + VAE encoder + noise schedule, on one device and dtype."""

    def __init__(self, layout: WeightsLayout, device, dtype: torch.dtype):
        self.unet = load_unet(layout.unet, dtype).requires_grad_(False).to(device)
        self.vae = load_vae(layout.vae, dtype).requires_grad_(False).to(device)
        self.encoder = VaeEncoderNet(self.vae)
        self.scheduler = load_scheduler(layout.scheduler)
        self.prediction = self.scheduler.config.prediction_type
        if self.prediction not in ("epsilon", "v_prediction"):
            raise WeightsError(f"{layout.scheduler}: prediction_type {self.prediction!r}; expected epsilon "
                               "(SD-2 inpainting) or v_prediction")
        self.dtype = dtype
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.vae.config.latent_channels

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return (self.latent_channels, resolution // self.vae_scale_factor, resolution // self.vae_scale_factor)

    @torch.no_grad()
    def model_input(self, batch: dict[str, torch.Tensor], whole_condition: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(9-channel UNet input, timesteps, clean latents) for a batch; `whole_condition`: the unmasked
        condition is the whole image (the harmonizer, Eq. 2) instead of the image with the mask cut out."""
        image, mask = batch["image"].to(self.dtype), batch["mask"].to(self.dtype)  # (B, 3, R, R), (B, 1, R, R)
        noise, posterior = batch["noise"].to(self.dtype), batch["posterior_noise"].to(self.dtype)
        latents = self.encoder(image, posterior[:, 0])  # (B, 4, h, w)
        condition = image if whole_condition else image * (mask < 0.5)
        condition_latents = self.encoder(condition, posterior[:, 1])  # (B, 4, h, w)
        mask_latent = F.interpolate(mask, size=latents.shape[-2:])  # (B, 1, h, w), nearest as the runtime
        noisy = self.scheduler.add_noise(latents, noise, batch["timestep"])
        return torch.cat([noisy, mask_latent, condition_latents], dim=1), batch["timestep"], latents

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, timesteps)

    def per_sample_loss(self, prompt: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eq. (1) for each sample: (B,) mean squared error of the UNet's prediction."""
        model_input, timesteps, latents = self.model_input(batch)
        embeds = prompt(model_input.shape[0]).to(self.dtype)  # (B, L, C); the gradient reaches z in fp32
        pred = self.unet(model_input, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
        target = self.target(latents, batch["noise"].to(self.dtype), timesteps)
        dtype = torch.promote_types(self.dtype, torch.float32)  # fp16/bf16 runs: the loss in fp32; fp64 stays
        return F.mse_loss(pred.to(dtype), target.to(dtype), reduction="none").mean(dim=(1, 2, 3))


@dataclass
class InversionSettings:
    weights: Path
    task: str
    output: Path | None = None
    data: Path | None = None
    coco: Path | None = None
    images: Path | None = None
    init_text: str | None = None
    resolution: int = 512
    val_fraction: float = 0.05
    min_object_fraction: float = 0.01
    gradient_checkpointing: bool = False


def output_path(settings: InversionSettings) -> Path:
    path = WeightsLayout(settings.weights).task_prompts if settings.output is None else Path(settings.output)
    if path.suffix != ".safetensors" or path.is_dir():
        raise InputError(f"-o {path}: expected a .safetensors file name")
    return path


def load_records(settings: InversionSettings, log):
    from editrt.train.data import check_coco, check_plain

    if (settings.data is None) == (settings.coco is None):
        raise InputError("data: give either --data DIR (plain layout) or --coco ANNOTATIONS.json --images DIR")
    if settings.coco is not None:
        if settings.images is None:
            raise InputError(f"--coco {settings.coco}: also give --images DIR, the folder of its images")
        return check_coco(settings.coco, settings.images, settings.min_object_fraction, log)
    return check_plain(settings.data)


def kept_prompts(settings: InversionSettings, width: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """The prompts file whose other tasks and null the output keeps: the output if it exists, else the weights'."""
    out = output_path(settings)
    source = out if out.is_file() else WeightsLayout(settings.weights).task_prompts
    if not source.is_file():
        raise InputError(f"{source}: missing; expected task prompts to keep the other tasks from (write them with "
                         f"`editrt weights prompts {settings.weights} --from-text ...`)")
    return source, load_task_prompts(source, width)


def initial_prompt(layout: WeightsLayout, text: str, tokens: int) -> torch.Tensor:
    """[L, C] from text, exactly as `editrt weights prompts --from-text` encodes it (models/text_prompts.TextPromptEncoder)."""
    from editrt.models.text_prompts import TextPromptEncoder

    encoder = TextPromptEncoder(layout)
    encoder.text_encoder.requires_grad_(False)
    if tokens > encoder.max_length:
        raise InputError(f"the kept prompts are {tokens} tokens; the text encoder gives at most {encoder.max_length}")
    return encoder.encode(text, tokens)


def train_task_prompt(settings: InversionSettings, loop: LoopSettings, log=lambda what: None, on_step=None,
                      accelerator=None):
    """Train one task prompt; the main process writes it (atomically). Returns the run (output path, loop
    result, the frozen networks and the trained prompt module)."""
    # 1. Check inputs: task, output, data, prompts to keep (before any network loads or any step runs).
    if settings.task not in INVERSION_TASKS:
        raise InputError(f"--task {settings.task!r}: expected {' or '.join(INVERSION_TASKS)} (harmonize: "
                         "`editrt train harmonizer`)")
    if isinstance(settings.resolution, bool) or settings.resolution < 8 or settings.resolution % 8:
        raise InputError(f"--resolution {settings.resolution}: expected a positive multiple of 8")
    accelerator, log, layout = start_job(loop, settings.weights, log, accelerator)
    out = output_path(settings)
    records = load_records(settings, log)
    from editrt.train.data import split_train_val

    train_records, val_records = split_train_val(records, settings.val_fraction, loop.seed)
    width = read_json(layout.unet / "config.json", "the inpainting UNet config").get("cross_attention_dim")
    source, kept = kept_prompts(settings, width)
    tokens = kept["remove"].shape[0]

    # 2. The frozen networks in the weight dtype, the prompt from text.
    frozen = FrozenInpainter(layout, accelerator.device, weight_dtype(accelerator))
    if settings.gradient_checkpointing:
        frozen.unet.enable_gradient_checkpointing()
    text = INIT_TEXTS[settings.task] if settings.init_text is None else settings.init_text
    prompt = TaskPrompt(initial_prompt(layout, text, tokens))

    # 3. Samples as functions of (seed, index), then the shared loop.
    shape = frozen.latent_shape(settings.resolution)
    timesteps = frozen.scheduler.config.num_train_timesteps
    train_data = InversionSamples(train_records, settings.task, settings.resolution, loop.seed, TRAIN_STREAM, shape,
                                  timesteps)
    val_data = InversionSamples(val_records, settings.task, settings.resolution, loop.seed, VAL_STREAM, shape,
                                timesteps) if val_records else None
    identity = {"job": "prompts", "task": settings.task, "seed": loop.seed, "batch_size": loop.batch_size,
                "resolution": settings.resolution, "tokens": tokens, "images": len(records),
                "val_fraction": settings.val_fraction}
    log(f"{settings.task}: {len(train_records)} training and {len(val_records)} validation images, "
        f"{loop.steps} steps of {loop.batch_size} samples on {accelerator.num_processes} process(es)")
    result = train_loop(accelerator, loop, prompt, frozen.per_sample_loss, train_data, val_data, identity,
                        on_step=on_step, describe=f"train prompts ({settings.task})")

    # 4. The best (or last) prompt into the runtime's file, the other tasks kept.
    chosen = result.best if result.best is not None else result.last
    if accelerator.is_main_process:
        prompts = {**kept, settings.task: chosen["prompt"]}
        metadata = {
            "content": f"task prompts: {settings.task} trained by task inversion (paper 000 Eq. 1, editrt train "
                       f"prompts); the other tasks and null kept from {source}",
            "init": "trained",
            "trained": settings.task,
            "init_text": text,
            "step": str(result.best_step if result.best is not None else result.step),
            "val_loss": "" if result.best_val_loss is None else repr(result.best_val_loss),
            "settings": json.dumps({**{k: str(v) for k, v in asdict(settings).items()},
                                    **{k: str(v) for k, v in asdict(loop).items()}}),
        }
        write_atomic(out, lambda tmp: save_task_prompts(tmp, {k: prompts[k] for k in PROMPT_KEYS},
                                                         base_model=str(layout.inpaint), metadata=metadata))
    accelerator.wait_for_everyone()
    return InversionRun(out, result, frozen, prompt, accelerator.is_main_process)


@dataclass
class InversionRun:
    output: Path
    result: object  # train/job.LoopResult
    frozen: FrozenInpainter
    prompt: TaskPrompt
    main: bool  # this is the main process (the one that wrote the output)
