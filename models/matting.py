"""Matting: ViTMatte in transformers' `VitMatteForImageMatting` format, read from `DIR/matting/`.

    matting/
      config.json                 VitMatteConfig with its ViTDet backbone_config (4 input channels)
      model.safetensors
      preprocessor_config.json    VitMatteImageProcessor (mean = std = 0.5, pad to multiples of 32)

Used by the repositioning editor to cut the subject out with a soft alpha instead of SAM's hard
mask edge (hair, fur). Input: the image and a trimap (runtime/estimators.trimap_from_mask makes
one from the SAM mask). `MattingNet` is the engine's module: `pixel_values` [1, 4, H', W'] (H', W'
multiples of 32) -> `alphas` [1, 1, H', W']; the torch backend runs it and `editrt export` traces it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from editrt.models.depth import load_transformers_model

MATTING_MODEL = "VitMatteForImageMatting"


def load_matting_model(folder: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import VitMatteForImageMatting

    return load_transformers_model(VitMatteForImageMatting, folder, "matting model", dtype)


class MattingNet(nn.Module):
    """pixel_values [1, 4, H', W'] (VitMatteImageProcessor's) -> alphas [1, 1, H', W'] in [0, 1]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values, return_dict=True).alphas


def matting_processor_config() -> dict:
    """The VitMatteImageProcessor config saved beside the model (as hustvl/vitmatte-small-composition-1k's)."""
    return {
        "image_processor_type": "VitMatteImageProcessor",
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_pad": True, "size_divisor": 32,
    }
