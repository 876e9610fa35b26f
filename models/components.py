"""The weights directory's layout and the loaded components of each editor.

    DIR/
      inpaint/                      diffusers SD-2 inpainting folder: model_index.json, unet/, vae/, scheduler/,
                                    text_encoder/ + tokenizer/ (only to initialise task prompts from text);
                                    optional vae_tiny/: a diffusers AutoencoderTiny (TAESD) that decodes previews
      task_prompts.safetensors      remove / complete / harmonize / null, each [L, cross_attention_dim]
                                    (learned, or from text: `editrt weights prompts DIR --from-text`)
      harmonizer_lora.safetensors   LoRA on the UNet's attention projections, diffusers key format; optional:
                                    without it harmonize runs the base UNet (c = 0), said once on stderr
      sam/                          config.json + segment-anything checkpoint (.pth)
      depth/                        transformers DPTForDepthEstimation folder (MiDaS v3 / DPT): occlusion, perspective
      matting/                      transformers VitMatteForImageMatting folder (ViTMatte): subject alpha
      elements/                     unet/ element_adapter/ content_encoder/ vae/ scheduler/ text_encoder/ tokenizer/,
                                    optional vae_tiny/ (as inpaint/'s)
      editrt.json                   which config and seed wrote it (random weights only)

`WeightsLayout` is the one place that knows these names. `load_*_components` read a directory
into plain PyTorch modules; pipelines, exporters and the benchmark all start from them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from editrt.errors import WeightsError
from editrt.models.lora import FusedLoRA


class WeightsLayout:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    inpaint = property(lambda self: self.root / "inpaint")
    unet = property(lambda self: self.root / "inpaint" / "unet")
    vae = property(lambda self: self.root / "inpaint" / "vae")
    vae_tiny = property(lambda self: self.root / "inpaint" / "vae_tiny")
    scheduler = property(lambda self: self.root / "inpaint" / "scheduler")
    text_encoder = property(lambda self: self.root / "inpaint" / "text_encoder")
    tokenizer = property(lambda self: self.root / "inpaint" / "tokenizer")
    task_prompts = property(lambda self: self.root / "task_prompts.safetensors")
    harmonizer_lora = property(lambda self: self.root / "harmonizer_lora.safetensors")
    sam = property(lambda self: self.root / "sam")
    depth = property(lambda self: self.root / "depth")
    matting = property(lambda self: self.root / "matting")
    elements = property(lambda self: self.root / "elements")
    info = property(lambda self: self.root / "editrt.json")

    def check_root(self) -> None:
        if not self.root.is_dir():
            raise WeightsError(f"{self.root}: no such weights directory; create one with `editrt weights init {self.root}`", field="weights")

    def read_info(self) -> dict:
        if not self.info.is_file():
            return {}
        try:
            return json.loads(self.info.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{self.info}: not valid JSON ({e})", field="weights") from None

    def network_config(self) -> dict:
        """The sizes the network specs need, read from the folder's own configs (published weights too)."""
        from editrt.models.files import read_json

        config = {
            "inpaint": {"unet": read_json(self.unet / "config.json", "the inpainting UNet config"),
                        "vae": read_json(self.vae / "config.json", "the VAE config"),
                        "task_prompt_tokens": _prompt_tokens(self.task_prompts)},
            "sam": read_json(self.sam / "config.json", "a JSON naming the SAM architecture and checkpoint"),
        }
        if (self.elements / "unet" / "config.json").is_file():
            config["elements"] = {
                "unet": read_json(self.elements / "unet" / "config.json", "the element decoder UNet config"),
                "vae": read_json(self.elements / "vae" / "config.json", "the element decoder VAE config"),
                "element_adapter": read_json(self.elements / "element_adapter" / "config.json", "the element adapter config"),
            }
        from editrt.models.estimators import estimator_network_config

        config.update(estimator_network_config(self))  # depth / matting, where the folder has them
        return config


def _prompt_tokens(path: Path) -> int:
    """Task prompt length (L of [L, C]) without loading the tensors; full checks in load_task_prompts."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise WeightsError(f"{path}: missing; expected the task prompts (keys remove, complete, harmonize, null)", field="weights")
    try:
        with safe_open(str(path), "pt") as f:
            if "remove" not in f.keys():
                raise WeightsError(f"{path}: missing keys ['remove']; expected remove, complete, harmonize, null", field="weights")
            return f.get_slice("remove").get_shape()[0]
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})", field="weights") from None


@dataclass
class RepositionComponents:
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    task_prompts: dict[str, torch.Tensor]
    harmonizer: FusedLoRA
    sam: torch.nn.Module
    vae_tiny: torch.nn.Module | None = None  # AutoencoderTiny for previews, where the folder has vae_tiny/


def load_reposition_components(root: str | Path, device="cpu", dtype=torch.float32) -> RepositionComponents:
    from editrt.models.inpaint import load_scheduler, load_task_prompts, load_tiny_vae, load_unet, load_vae
    from editrt.models.lora import load_harmonizer_lora
    from editrt.models.sam import load_sam

    layout = WeightsLayout(root)
    layout.check_root()
    unet = load_unet(layout.unet, dtype).to(device)
    vae = load_vae(layout.vae, dtype).to(device)
    prompts = load_task_prompts(layout.task_prompts, unet.config.cross_attention_dim)
    # The LoRA snapshot is taken after the UNet is on its device and dtype: switches copy in place.
    # No LoRA file: no layers, so every scale is the base UNet (harmonize at c = 0), warned once.
    harmonizer = FusedLoRA(unet, load_harmonizer_lora(layout.harmonizer_lora), source=str(layout.harmonizer_lora))
    tiny = load_tiny_vae(layout.vae_tiny, vae, dtype)
    return RepositionComponents(unet, vae, load_scheduler(layout.scheduler).config, prompts, harmonizer,
                                load_sam(layout.sam, device), None if tiny is None else tiny.to(device))


@dataclass
class ElementsComponents:
    decoder: torch.nn.Module  # models.element_unet.ElementDecoder
    vae: torch.nn.Module
    scheduler_config: dict
    content_encoder: torch.nn.Module
    tokenizer: object
    text_encoder: torch.nn.Module
    sam: torch.nn.Module
    vae_tiny: torch.nn.Module | None = None  # AutoencoderTiny for previews, where the folder has vae_tiny/


def load_elements_components(root: str | Path, device="cpu", dtype=torch.float32) -> ElementsComponents:
    from diffusers import AutoencoderKL

    from editrt.models.content_encoder import ContentEncoder
    from editrt.models.element_unet import load_element_decoder
    from editrt.models.files import load_diffusers
    from editrt.models.inpaint import load_scheduler, load_tiny_vae
    from editrt.models.sam import load_sam
    from editrt.models.text import load_text_encoder, load_tokenizer

    layout = WeightsLayout(root)
    layout.check_root()
    folder = layout.elements
    if not folder.is_dir():
        raise WeightsError(f"{folder}: missing; expected the element decoder folder (editrt weights init writes it)", field="weights")
    vae = load_diffusers(AutoencoderKL, folder / "vae", "element decoder VAE", dtype).eval().to(device)
    tiny = load_tiny_vae(folder / "vae_tiny", vae, dtype)
    return ElementsComponents(
        decoder=load_element_decoder(folder / "unet", folder / "element_adapter", dtype).to(device),
        vae=vae,
        scheduler_config=load_scheduler(folder / "scheduler").config,
        content_encoder=ContentEncoder.from_pretrained(folder / "content_encoder", dtype).to(device),
        tokenizer=load_tokenizer(folder / "tokenizer"),
        text_encoder=load_text_encoder(folder / "text_encoder", dtype).to(device),
        sam=load_sam(layout.sam, device),
        vae_tiny=None if tiny is None else tiny.to(device),
    )
