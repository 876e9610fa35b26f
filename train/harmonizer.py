"""SEELE's harmonizer, Eq. (2) of paper 000: the harmonize prompt and a LoRA on the UNet's attention.

    L = E_{eps, t} || eps + x - x* - eps_theta([x_t, m, x], t, z) ||^2

x is the inharmonious composite, x* the real (harmonious) image, m the composite's foreground mask; the
unmasked condition is the whole composite (the runtime's harmonize pass does the same). The paper does not say
which image x_t noises; here it is x, the input (x_t = add_noise(x, eps, t)), and x, x* are the VAE latents
of the two images with one posterior noise, so x - x* is their content difference only.

Trained: z (the harmonize prompt, [L, C], from text as `weights prompts --from-text` does) and a LoRA (A: [r,
in] Kaiming-uniform, B: [out, r] zero, so training starts at the base UNet; alpha = r, i.e. scale 1) on the
chosen attention projections, applied as a forward hook beside each frozen linear layer. Written as the runtime
reads them: `task_prompts.safetensors` (harmonize replaced, the rest kept) and `harmonizer_lora.safetensors`
in diffusers' key format (models/lora.py), which models/lora.FusedLoRA fuses at c = 1.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from editrt.errors import InputError, WeightsError
from editrt.models.files import read_json, write_atomic
from editrt.models.inpaint import PROMPT_KEYS, save_task_prompts
from editrt.models.lora import LoRALayer, save_lora
from editrt.train.data import HarmonyPair, check_iharmony, split_train_val
from editrt.train.inversion import FrozenInpainter, initial_prompt, kept_prompts, output_path
from editrt.train.job import LoopSettings, start_job, train_loop, weight_dtype
from editrt.train.samples import TRAIN_STREAM, VAL_STREAM, IndexedSamples, as_tensor, noise_draws, square_crop

INIT_TEXT = "Harmonize the subject with the lighting, color and texture of the background"
# Self-attention q, k, v, out (the paper adds LoRA "to adapt the self-attention"): at rank 51 these are
# 5,091,840 parameters on the SD-2 UNet, the attention-only choice nearest the paper's 5.12M (docs/training.md).
DEFAULT_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
DEFAULT_RANK = 51


class HarmonizerParams(nn.Module):
    """The trained tensors: the prompt and one (A, B) pair per targeted linear layer of the UNet.
    forward(B) -> (B, L, C) prompt; `attach(unet)` adds x A^T B^T to each targeted layer's output."""

    def __init__(self, prompt: torch.Tensor, unet: nn.Module, targets: tuple[str, ...], rank: int, seed: int):
        super().__init__()
        self.prompt = nn.Parameter(prompt.detach().float().clone())
        self.names = [n for n, m in unet.named_modules()
                      if isinstance(m, nn.Linear) and any(n.endswith("." + t) for t in targets)]
        if not self.names:
            raise InputError(f"--lora-targets {','.join(targets)}: no linear layer of the UNet ends with them "
                             "(e.g. attn1.to_q, attn2.to_v, to_out.0)")
        modules, generator = dict(unet.named_modules()), torch.Generator().manual_seed(seed)
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for name in self.names:
            layer = modules[name]
            down = torch.empty(rank, layer.in_features)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)  # peft's LoRA A initialisation
            self.down.append(nn.Parameter(down))
            self.up.append(nn.Parameter(torch.zeros(layer.out_features, rank)))

    def forward(self, batch: int) -> torch.Tensor:
        return self.prompt[None].expand(batch, -1, -1)  # (B, L, C)

    def attach(self, unet: nn.Module) -> list:
        """Forward hooks adding the LoRA to the UNet's targeted layers (scale alpha / r = 1); returns the handles."""
        modules, handles = dict(unet.named_modules()), []
        for i, name in enumerate(self.names):
            def hook(module, inputs, output, i=i):
                x = inputs[0].to(self.down[i].dtype)
                return output + F.linear(F.linear(x, self.down[i]), self.up[i]).to(output.dtype)
            handles.append(modules[name].register_forward_hook(hook))
        return handles

    def layers(self, state: dict[str, torch.Tensor]) -> dict[str, LoRALayer]:
        """A state dict of this module as the runtime's LoRA layers (alpha = r: scale 1)."""
        return {name: LoRALayer(down=state[f"down.{i}"].contiguous(), up=state[f"up.{i}"].contiguous(),
                                alpha=float(state[f"down.{i}"].shape[0])) for i, name in enumerate(self.names)}


def harmony_sample(pair: HarmonyPair, resolution: int, rng: np.random.Generator, latent_shape, train_timesteps):
    composite, real, mask = pair.load()
    (composite, real), (mask,) = square_crop([composite, real], [mask], mask, resolution, rng)
    return {"image": as_tensor(composite), "real": as_tensor(real),
            "mask": torch.from_numpy(mask.astype(np.float32))[None],  # (1, R, R)
            **noise_draws(rng, latent_shape, train_timesteps)}


class HarmonySamples(IndexedSamples):
    def make(self, record: HarmonyPair, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return harmony_sample(record, self.resolution, rng, self.latent_shape, self.train_timesteps)


def harmonizer_loss(frozen: FrozenInpainter, params: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. (2) for each sample: (B,) mean squared error against eps + x - x*."""
    with torch.no_grad():
        model_input, timesteps, latents = frozen.model_input(batch, whole_condition=True)  # x_t from x, condition x
        real = frozen.encoder(batch["real"].to(frozen.dtype), batch["posterior_noise"][:, 0].to(frozen.dtype))
    embeds = params(model_input.shape[0]).to(frozen.dtype)  # (B, L, C)
    pred = frozen.unet(model_input, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
    dtype = torch.promote_types(frozen.dtype, torch.float32)
    target = batch["noise"].to(dtype) + latents.to(dtype) - real.to(dtype)
    return F.mse_loss(pred.to(dtype), target, reduction="none").mean(dim=(1, 2, 3))


@dataclass
class HarmonizerSettings:
    weights: Path
    data: Path
    output: Path | None = None  # task prompts (default: the weights folder's)
    lora_output: Path | None = None  # default: the weights folder's harmonizer_lora.safetensors
    init_text: str | None = None
    rank: int = DEFAULT_RANK
    targets: tuple[str, ...] = DEFAULT_TARGETS
    resolution: int = 512
    val_fraction: float = 0.05
    gradient_checkpointing: bool = False


@dataclass
class HarmonizerRun:
    output: Path
    lora_output: Path
    result: object  # train/job.LoopResult
    frozen: FrozenInpainter
    params: HarmonizerParams
    main: bool


def train_harmonizer(settings: HarmonizerSettings, loop: LoopSettings, log=lambda what: None, on_step=None,
                     accelerator=None) -> HarmonizerRun:
    # 1. Check inputs before any network loads.
    if isinstance(settings.rank, bool) or not isinstance(settings.rank, int) or settings.rank < 1:
        raise InputError(f"--lora-rank {settings.rank!r}: expected a positive integer")
    if isinstance(settings.resolution, bool) or settings.resolution < 8 or settings.resolution % 8:
        raise InputError(f"--resolution {settings.resolution}: expected a positive multiple of 8")
    accelerator, log, layout = start_job(loop, settings.weights, log, accelerator)
    out = output_path(settings)
    lora_out = layout.harmonizer_lora if settings.lora_output is None else Path(settings.lora_output)
    if lora_out.suffix != ".safetensors" or lora_out.is_dir():
        raise InputError(f"--lora-output {lora_out}: expected a .safetensors file name")
    pairs = check_iharmony(settings.data)
    train_pairs, val_pairs = split_train_val(pairs, settings.val_fraction, loop.seed)
    width = read_json(layout.unet / "config.json", "the inpainting UNet config").get("cross_attention_dim")
    source, kept = kept_prompts(settings, width)

    # 2. Frozen networks, the trained prompt + LoRA hooked into the UNet.
    frozen = FrozenInpainter(layout, accelerator.device, weight_dtype(accelerator))
    if frozen.prediction != "epsilon":
        raise WeightsError(f"{layout.scheduler}: prediction_type {frozen.prediction!r}; Eq. (2) is an epsilon target")
    if settings.gradient_checkpointing:
        frozen.unet.enable_gradient_checkpointing()
    text = INIT_TEXT if settings.init_text is None else settings.init_text
    params = HarmonizerParams(initial_prompt(layout, text, kept["harmonize"].shape[0]), frozen.unet,
                              tuple(settings.targets), settings.rank, loop.seed)
    params.to(accelerator.device)
    params.attach(frozen.unet)
    count = sum(p.numel() for p in params.parameters()) - params.prompt.numel()

    # 3. Samples and the shared loop.
    shape, timesteps = frozen.latent_shape(settings.resolution), frozen.scheduler.config.num_train_timesteps
    train_data = HarmonySamples(train_pairs, "harmonize", settings.resolution, loop.seed, TRAIN_STREAM, shape, timesteps)
    val_data = HarmonySamples(val_pairs, "harmonize", settings.resolution, loop.seed, VAL_STREAM, shape,
                              timesteps) if val_pairs else None
    identity = {"job": "harmonizer", "seed": loop.seed, "batch_size": loop.batch_size,
                "resolution": settings.resolution, "rank": settings.rank, "targets": list(settings.targets),
                "pairs": len(pairs), "val_fraction": settings.val_fraction}
    log(f"harmonizer: {len(train_pairs)} training and {len(val_pairs)} validation pairs, LoRA rank {settings.rank} on "
        f"{len(params.names)} layers ({count:,} parameters), {loop.steps} steps of {loop.batch_size} samples on "
        f"{accelerator.num_processes} process(es)")
    result = train_loop(accelerator, loop, params, lambda m, b: harmonizer_loss(frozen, m, b), train_data, val_data,
                        identity, on_step=on_step, describe="train harmonizer")

    # 4. Both files, atomically, from the best (or last) state.
    chosen = result.best if result.best is not None else result.last
    if accelerator.is_main_process:
        step = str(result.best_step if result.best is not None else result.step)
        val = "" if result.best_val_loss is None else repr(result.best_val_loss)
        recorded = json.dumps({**{k: str(v) for k, v in asdict(settings).items()},
                               **{k: str(v) for k, v in asdict(loop).items()}})
        prompts = {**kept, "harmonize": chosen["prompt"]}
        write_atomic(out, lambda tmp: save_task_prompts(tmp, {k: prompts[k] for k in PROMPT_KEYS},
                                                         base_model=str(layout.inpaint), metadata={
            "content": f"task prompts: harmonize trained with its LoRA (paper 000 Eq. 2, editrt train harmonizer); "
                       f"the other tasks and null kept from {source}",
            "init": "trained", "trained": "harmonize", "init_text": text, "step": step, "val_loss": val,
            "settings": recorded}))
        write_atomic(lora_out, lambda tmp: save_lora(tmp, params.layers(chosen), metadata={
            "content": "harmonizer LoRA (paper 000 Eq. 2, editrt train harmonizer), alpha = rank (scale 1)",
            "rank": str(settings.rank), "targets": ",".join(settings.targets), "parameters": str(count),
            "step": step, "val_loss": val, "settings": recorded}))
    accelerator.wait_for_everyone()
    return HarmonizerRun(out, lora_out, result, frozen, params, accelerator.is_main_process)
