"""`editrt weights init`: random weights in the real formats (DESIGN.md contract 1).

The layout is models/components.py's `WeightsLayout`. `init_weights` writes random weights in
exactly that layout into a temporary sibling folder renamed into place at the end: an interrupted
init leaves nothing half-written. `full` has the real architectures (so its latency is the real
latency); `tiny` keeps every code path at a small width for CPU tests.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import diffusers
import torch

from editrt.errors import InputError
from editrt.models.components import WeightsLayout
from editrt.models.files import write_dir_atomic

CONFIG_NAMES = ("tiny", "full")
# Bumped when `init_weights` writes something new, so cached random weights are rewritten.
LAYOUT_VERSION = 5
# The preview VAEs' (vae_tiny/) width per config: full has TAESD's (diffusers' AutoencoderTiny defaults).
TINY_VAE_WIDTH = {"tiny": 8, "full": 64}


def load_config(name: str) -> dict:
    if name not in CONFIG_NAMES:
        raise InputError(f"--config: expected one of {', '.join(CONFIG_NAMES)}, got {name!r}", field="config")
    return json.loads(resources.files("editrt").joinpath("configs", f"{name}.json").read_text())


def _model_index() -> dict:
    # What diffusers writes for StableDiffusionInpaintPipeline. The pipelines never run the text
    # encoder (task inversion replaces it); `editrt weights prompts --from-text` uses it to
    # initialise task prompts from descriptions (paper App. A.2), as published SD-2 folders allow.
    return {
        "_class_name": "StableDiffusionInpaintPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def tiny_vae_config(vae_config: dict, config_name: str) -> dict:
    """An AutoencoderTiny config that decodes `vae_config`'s latents: same latent channels, one stage per VAE
    block (the same 2^k upscale). full: TAESD's blocks; tiny: one block per stage, for fast CPU tests."""
    stages, width = len(vae_config["block_out_channels"]), TINY_VAE_WIDTH[config_name]
    blocks = {} if config_name == "full" else {"num_encoder_blocks": [1] * stages, "num_decoder_blocks": [1] * stages}
    return {"encoder_block_out_channels": [width] * stages, "decoder_block_out_channels": [width] * stages,
            "latent_channels": vae_config["latent_channels"], **blocks}


def _write_tiny_vae(folder: Path, vae_config: dict, config_name: str, seed: int, log) -> None:
    from diffusers import AutoencoderTiny

    log(f"{folder.parent.name}/vae_tiny")
    torch.manual_seed(seed)  # its own seed, written last: every other network's weights stay as before
    AutoencoderTiny.from_config(tiny_vae_config(vae_config, config_name)).save_pretrained(folder, safe_serialization=True)


def _write_inpaint(layout: WeightsLayout, config: dict, generator: torch.Generator, log) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from editrt.models.inpaint import TASKS, save_task_prompts
    from editrt.models.lora import random_lora, save_lora
    from editrt.models.text import random_text_encoder, write_tiny_tokenizer

    cfg = config["inpaint"]
    layout.inpaint.mkdir(parents=True)
    (layout.inpaint / "model_index.json").write_text(json.dumps(_model_index(), indent=2) + "\n")

    log("inpaint/unet")
    torch.manual_seed(generator.initial_seed())
    unet = UNet2DConditionModel.from_config(cfg["unet"])
    unet.save_pretrained(layout.unet, safe_serialization=True)
    log("inpaint/vae")
    AutoencoderKL.from_config(cfg["vae"]).save_pretrained(layout.vae, safe_serialization=True)
    DDIMScheduler.from_config(cfg["scheduler"]).save_pretrained(layout.scheduler)
    log("inpaint/text_encoder, tokenizer")
    vocab = write_tiny_tokenizer(layout.tokenizer)  # no 49k BPE offline: see models/text.py
    random_text_encoder(cfg["text_encoder"], vocab).save_pretrained(layout.text_encoder)

    log("task_prompts.safetensors")
    dim, tokens = unet.config.cross_attention_dim, cfg["task_prompt_tokens"]
    prompts = {k: torch.randn(tokens, dim, generator=generator) for k in TASKS + ("null",)}
    save_task_prompts(layout.task_prompts, prompts, base_model=f"stable-diffusion-2-inpainting ({config['name']} random)")

    log("harmonizer_lora.safetensors")
    lora = random_lora(unet, cfg["lora_targets"], cfg["lora_rank"], generator)
    save_lora(layout.harmonizer_lora, lora, metadata={"base_model": "stable-diffusion-2-inpainting", "rank": str(cfg["lora_rank"])})
    _write_tiny_vae(layout.vae_tiny, cfg["vae"], config["name"], generator.initial_seed() + 5, log)


def _write_sam(layout: WeightsLayout, config: dict, generator: torch.Generator, log) -> None:
    from editrt.models.sam import build_sam, save_sam

    log("sam")
    torch.manual_seed(generator.initial_seed() + 1)
    sam = build_sam(config["sam"])
    save_sam(sam, layout.sam, config["sam"])


def _write_depth(layout: WeightsLayout, config: dict, generator: torch.Generator, log) -> None:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    from editrt.models.depth import depth_processor_config, keep_activations_unit_scale

    log("depth")
    torch.manual_seed(generator.initial_seed() + 3)
    model = DPTForDepthEstimation(DPTConfig(**config["depth"]["model"]))
    keep_activations_unit_scale([*model.neck.modules(), *model.head.modules()])  # else depth ~1e-9 untrained
    model.save_pretrained(layout.depth, safe_serialization=True)
    # the processor config too, as published folders have it: transformers' own pipeline loads the folder as-is
    processor = depth_processor_config(model.config.image_size)
    DPTImageProcessor(**{k: v for k, v in processor.items() if k != "image_processor_type"}).save_pretrained(layout.depth)


def _write_matting(layout: WeightsLayout, config: dict, generator: torch.Generator, log) -> None:
    from transformers import VitDetConfig, VitMatteConfig, VitMatteForImageMatting, VitMatteImageProcessor

    from editrt.models.depth import keep_activations_unit_scale
    from editrt.models.matting import matting_processor_config

    log("matting")
    torch.manual_seed(generator.initial_seed() + 4)
    cfg = config["matting"]
    model_config = VitMatteConfig(backbone_config=VitDetConfig(**cfg["backbone"]), **cfg["model"])
    model = VitMatteForImageMatting(model_config)
    keep_activations_unit_scale(model.decoder.modules())  # else alpha = sigmoid(0) = 0.5 everywhere untrained
    model.save_pretrained(layout.matting, safe_serialization=True)
    processor = matting_processor_config()
    VitMatteImageProcessor(**{k: v for k, v in processor.items() if k != "image_processor_type"}).save_pretrained(layout.matting)


def _write_elements(layout: WeightsLayout, config: dict, generator: torch.Generator, log) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from editrt.models.content_encoder import ContentEncoder
    from editrt.models.element_unet import adapter_config, build_element_decoder
    from editrt.models.text import random_text_encoder, write_tiny_tokenizer

    cfg, root = config["elements"], layout.elements
    torch.manual_seed(generator.initial_seed() + 2)
    log("elements/unet")
    unet = UNet2DConditionModel.from_config(cfg["unet"])
    unet.save_pretrained(root / "unet", safe_serialization=True)
    log("elements/element_adapter")
    adapter = adapter_config(token_dim=unet.config.cross_attention_dim, **cfg["element_adapter"])
    build_element_decoder(unet, adapter).save_adapter(root / "element_adapter")
    log("elements/content_encoder")
    ContentEncoder(**cfg["content_encoder"]).save_pretrained(root / "content_encoder")
    log("elements/vae, scheduler, text_encoder, tokenizer")
    AutoencoderKL.from_config(cfg["vae"]).save_pretrained(root / "vae", safe_serialization=True)
    DDIMScheduler.from_config(cfg["scheduler"]).save_pretrained(root / "scheduler")
    vocab = write_tiny_tokenizer(root / "tokenizer")
    random_text_encoder(cfg["text_encoder"], vocab).save_pretrained(root / "text_encoder")
    _write_tiny_vae(root / "vae_tiny", cfg["vae"], config["name"], generator.initial_seed() + 6, log)


def init_weights(directory: str | Path, config: str = "tiny", seed: int = 0, log=lambda what: None) -> Path:
    """Write a complete weights directory of random weights in the real formats; returns its path."""
    cfg = load_config(config)

    def write(tmp: Path) -> None:
        layout = WeightsLayout(tmp)
        generator = torch.Generator().manual_seed(seed)
        _write_inpaint(layout, cfg, generator, log)
        _write_sam(layout, cfg, generator, log)
        _write_depth(layout, cfg, generator, log)
        _write_matting(layout, cfg, generator, log)
        _write_elements(layout, cfg, generator, log)
        layout.info.write_text(json.dumps({"config": config, "seed": seed, "format": LAYOUT_VERSION}, indent=2) + "\n")

    target = write_dir_atomic(directory, write)
    return target


def cache_dir() -> Path:
    import os

    return Path(os.environ.get("EDITRT_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "editrt"))


def resolve_weights(spec: str | Path | None, log=lambda what: None) -> Path:
    """A weights directory from `--weights`: a folder, or 'tiny' / 'full' for cached random weights.

    Without `--weights`, $EDITRT_WEIGHTS is used. 'tiny' and 'full' (when no folder of that name
    exists) mean random weights of that config, written once under the user cache (seed 0).
    """
    import os

    spec = spec or os.environ.get("EDITRT_WEIGHTS")
    if not spec:
        raise InputError("--weights: expected a weights directory (or 'tiny' / 'full' for random weights); "
                         "set it or $EDITRT_WEIGHTS", field="weights")
    path = Path(spec)
    if path.is_dir() or str(spec) not in CONFIG_NAMES:
        WeightsLayout(path).check_root()
        return path
    cached = cache_dir() / "weights" / f"{spec}-seed0-v{LAYOUT_VERSION}"
    if not cached.is_dir():
        log(f"writing random '{spec}' weights to {cached} (once)")
        try:
            init_weights(cached, str(spec), seed=0)
        except (OSError, InputError):
            if not cached.is_dir():  # not a concurrent writer that finished first
                raise
    return cached
