"""The SD-2 inpainting components SEELE runs on: UNet, VAE, DDIM scheduler and learned task prompts.

Folder layout (DESIGN.md contract 1): `inpaint/` is a diffusers pipeline folder
(`model_index.json`, `unet/`, `vae/`, `scheduler/`); `task_prompts.safetensors` holds the task
prompts that replace the text encoder output (task inversion, paper 000 Sec. 3.1), each
[L, cross_attention_dim], plus `null`, the unconditional embedding for classifier-free guidance:
learned ones, or ones initialised from text descriptions by editrt/prompts.py (App. A.2).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from editrt.errors import WeightsError
from editrt.models.files import load_diffusers, read_json, read_safetensors

TASKS = ("remove", "complete", "harmonize")
PROMPT_KEYS = TASKS + ("null",)  # every prompts file holds these
# Named prompts a file may add, each [L, C] like the rest: `outpaint` (App. A.4's own outpainting prompt; outpainting
# falls back to `complete` without it), `inpaint` (plain inpainting, e.g. Places2 rows). Any other extra key is
# loaded too and usable as an inpainting task by name.
NAMED_PROMPT_KEYS = ("outpaint", "inpaint")


def load_unet(folder: str | Path, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    unet = load_diffusers(UNet2DConditionModel, Path(folder), "inpainting UNet", dtype)
    if unet.config.in_channels != 9:
        raise WeightsError(f"{Path(folder) / 'config.json'}: in_channels is {unet.config.in_channels}; "
                           "an inpainting UNet takes 9 (latents | mask | masked-image latents)", field="weights")
    return unet.eval()


def load_vae(folder: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    return load_diffusers(AutoencoderKL, Path(folder), "VAE", dtype).eval()


def _derived_block_out_channels(record: logging.LogRecord) -> bool:
    """False for the one warning diffusers gives on reading back any AutoencoderTiny it saved: it writes
    `block_out_channels` (derived from decoder_block_out_channels) into config.json, then warns the key is not an
    argument. Every other record passes; a CLI's error must stay one line."""
    message = record.getMessage()
    return not ("AutoencoderTiny" in message and "'block_out_channels'" in message)


def load_tiny_vae(folder: str | Path, vae: AutoencoderKL, dtype: torch.dtype = torch.float32) -> AutoencoderTiny | None:
    """The preview decoder (TAESD-style AutoencoderTiny, diffusers' format) in `folder`, or None where there is no
    such folder (previews then decode with the full VAE). It must decode the full `vae`'s latents: same latent
    channels and the same 2^k downscale."""
    folder = Path(folder)
    if not folder.exists():
        return None
    config_log = logging.getLogger("diffusers.configuration_utils")
    config_log.addFilter(_derived_block_out_channels)
    try:
        tiny = load_diffusers(AutoencoderTiny, folder, "preview VAE (AutoencoderTiny)", dtype).eval()
    finally:
        config_log.removeFilter(_derived_block_out_channels)
    full_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    scale = tiny.config.upsampling_scaling_factor ** (len(tiny.config.num_decoder_blocks) - 1)
    if (tiny.config.latent_channels, scale) != (vae.config.latent_channels, full_scale):
        raise WeightsError(f"{folder / 'config.json'}: latent_channels {tiny.config.latent_channels}, upscale {scale}; "
                           f"the VAE's latents have {vae.config.latent_channels} channels at 1/{full_scale} size",
                           field="weights")
    return tiny


def load_scheduler(folder: str | Path) -> DDIMScheduler:
    """A DDIM scheduler from the folder's config (a published PNDM config converts unchanged)."""
    return DDIMScheduler.from_config(read_json(Path(folder) / "scheduler_config.json", "the scheduler config"))


def save_task_prompts(path: Path, prompts: dict[str, torch.Tensor], base_model: str,
                      metadata: dict[str, str] | None = None) -> None:
    """Write the four prompts and any named extras in `prompts` (NAMED_PROMPT_KEYS, ...); `metadata` adds to (or
    overrides) the standard entries. Not atomic by itself: callers writing in place wrap it in
    models/files.write_atomic."""
    shape = list(prompts["remove"].shape)
    keys = PROMPT_KEYS + tuple(k for k in prompts if k not in PROMPT_KEYS)
    metadata = {
        "content": "learned task prompts (task inversion): UNet encoder_hidden_states that replace the text encoder output",
        "keys": ",".join(keys),
        "shape": json.dumps(shape),
        "null": "unconditional embedding for classifier-free guidance",
        "base_model": base_model,
        **(metadata or {}),
    }
    save_file({k: prompts[k].contiguous() for k in keys}, str(path), metadata=metadata)


def load_task_prompts(path: str | Path, cross_attention_dim: int) -> dict[str, torch.Tensor]:
    """{'remove', 'complete', 'harmonize', 'null', and any named extras} -> [L, cross_attention_dim] float32
    (the four first, then the extras in sorted order)."""
    path = Path(path)
    prompts = read_safetensors(path, f"the task prompts (keys {', '.join(PROMPT_KEYS)})")
    missing = [k for k in PROMPT_KEYS if k not in prompts]
    if missing:
        raise WeightsError(f"{path}: missing keys {missing}; expected {', '.join(PROMPT_KEYS)}", field="weights")
    keys = PROMPT_KEYS + tuple(sorted(k for k in prompts if k not in PROMPT_KEYS))
    lengths = set()
    for k in keys:
        t = prompts[k]
        if t.ndim != 2 or t.shape[1] != cross_attention_dim:
            raise WeightsError(f"{path}: '{k}' has shape {list(t.shape)}; expected [L, {cross_attention_dim}] "
                               "(the UNet's cross_attention_dim)", field="weights")
        lengths.add(t.shape[0])
    if len(lengths) != 1:
        raise WeightsError(f"{path}: prompts have different lengths {sorted(lengths)}; CFG batches them, so all must match", field="weights")
    return {k: prompts[k].float() for k in keys}
