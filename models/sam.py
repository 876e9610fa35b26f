"""Segment Anything: build and load segment-anything's own `Sam` from a weights folder.

Folder layout (DESIGN.md contract 1)::

    sam/config.json   {"architecture": "vit_b" | "vit_l" | "vit_h" | "custom", "checkpoint": "<file>.pth", ...}
    sam/<file>.pth    a segment-anything state dict (the published checkpoints drop in unchanged)

"custom" builds a smaller ViT from segment-anything's own classes (the `tiny` test config); its
config lists the sizes. Whatever the size, `load_sam` returns `segment_anything.modeling.Sam`, so
`SamPredictor` works on it and is our test oracle.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from editrt.errors import WeightsError
from editrt.models.files import read_json

# The published architectures, as segment-anything's build_sam.py defines them.
PUBLISHED = {
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=[7, 15, 23, 31]),
}
# Everything else of a published SAM (fixed in segment-anything's _build_sam).
PUBLISHED_COMMON = dict(
    image_size=1024, patch_size=16, window_size=14, prompt_embed_dim=256, mask_in_chans=16,
    decoder_mlp_dim=2048, decoder_num_heads=8, iou_head_hidden_dim=256,
)
CUSTOM_KEYS = [
    "image_size", "patch_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
    "encoder_global_attn_indexes", "window_size", "prompt_embed_dim", "mask_in_chans",
    "decoder_mlp_dim", "decoder_num_heads", "iou_head_hidden_dim",
]


def sam_architecture(config: dict) -> dict:
    """The full set of sizes for a config.json dict (published names expand to their sizes)."""
    arch = config.get("architecture")
    if arch in PUBLISHED:
        return {**PUBLISHED_COMMON, **PUBLISHED[arch]}
    if arch == "custom":
        missing = [k for k in CUSTOM_KEYS if k not in config]
        if missing:
            raise WeightsError(f"sam config: architecture 'custom' needs the keys {missing}", field="weights")
        return {k: config[k] for k in CUSTOM_KEYS}
    raise WeightsError(f"sam config: 'architecture' must be one of {sorted(PUBLISHED)} or 'custom', got {arch!r}", field="weights")


def build_sam(config: dict) -> Sam:
    """segment-anything's `Sam` with random weights for a config.json dict (mirrors `_build_sam`)."""
    a = sam_architecture(config)
    embedding_size = a["image_size"] // a["patch_size"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=a["encoder_depth"],
            embed_dim=a["encoder_embed_dim"],
            img_size=a["image_size"],
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=a["encoder_num_heads"],
            patch_size=a["patch_size"],
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=a["encoder_global_attn_indexes"],
            window_size=a["window_size"],
            out_chans=a["prompt_embed_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=a["prompt_embed_dim"],
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(a["image_size"], a["image_size"]),
            mask_in_chans=a["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=a["prompt_embed_dim"],
                mlp_dim=a["decoder_mlp_dim"],
                num_heads=a["decoder_num_heads"],
            ),
            transformer_dim=a["prompt_embed_dim"],
            iou_head_depth=3,
            iou_head_hidden_dim=a["iou_head_hidden_dim"],
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def save_sam(sam: Sam, folder: Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), folder / config["checkpoint"])
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_sam(folder: str | Path, device: str | torch.device = "cpu") -> Sam:
    """Load segment-anything's `Sam` from `folder` (config.json + checkpoint). Errors name the file."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = read_json(config_path, "a JSON naming the SAM architecture and checkpoint")
    if "checkpoint" not in config:
        raise WeightsError(f"{config_path}: expected an object with 'architecture' and 'checkpoint'", field="weights")
    sam = build_sam(config)
    checkpoint = folder / config["checkpoint"]
    if not checkpoint.is_file():
        raise WeightsError(f"{checkpoint}: missing; expected the segment-anything checkpoint named in {config_path.name}", field="weights")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip/pickle
        raise WeightsError(f"{checkpoint}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})", field="weights") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{checkpoint}: expected a state dict, got {type(state).__name__}", field="weights")
    try:
        sam.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise WeightsError(f"{checkpoint}: does not match architecture {config['architecture']!r} ({first})", field="weights") from None
    return sam.to(device)
