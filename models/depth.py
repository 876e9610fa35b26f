"""Depth: DPT (MiDaS v3) in transformers' `DPTForDepthEstimation` format, read from `DIR/depth/`.

    depth/
      config.json                 DPTConfig (image_size S: the network's fixed S x S input)
      model.safetensors           the weights (model.safetensors.index.json + shards also load)
      preprocessor_config.json    DPTImageProcessor (S x S, bicubic, mean = std = 0.5), as published folders

Used by the repositioning editor for occlusion (which object is in front) and perspective-aware
scaling. The output is relative inverse depth (larger = nearer), as MiDaS and DPT predict it.
`DepthNet` is the engine's module: `pixel_values` [1, 3, S, S] -> `predicted_depth` [1, S, S];
the same module runs on the torch backend and is what `editrt export` traces.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from editrt.errors import WeightsError
from editrt.models.files import read_json

DEPTH_MODEL = "DPTForDepthEstimation"


def depth_image_size(folder: str | Path) -> int:
    """S of the S x S input, from `depth/config.json` only (no weights read)."""
    config = read_json(Path(folder) / "config.json", f"the depth model's config ({DEPTH_MODEL}, DPTConfig)")
    size = config.get("image_size", 384)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise WeightsError(f"{Path(folder) / 'config.json'}: image_size {size}: expected a square input size", field="weights")
        size = size[0]
    if not isinstance(size, int) or size < 16:
        raise WeightsError(f"{Path(folder) / 'config.json'}: image_size {size!r}: expected an int >= 16", field="weights")
    return size


def load_transformers_model(cls, folder: str | Path, what: str, dtype: torch.dtype = torch.float32):
    """`cls.from_pretrained(folder)` offline, with one-line WeightsErrors for missing or corrupt files."""
    from safetensors import SafetensorError

    folder = Path(folder)
    read_json(folder / "config.json", f"the {what} config ({cls.__name__})")
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((folder / n).is_file() for n in names):
        raise WeightsError(f"{folder}: no model.safetensors; expected the {what} weights ({cls.__name__})", field="weights")
    try:
        model = cls.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, SafetensorError, RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{folder}: cannot load the {what} ({first})", field="weights") from None
    return model.eval()


def load_depth_model(folder: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import DPTForDepthEstimation

    return load_transformers_model(DPTForDepthEstimation, folder, "depth model", dtype)


class DepthNet(nn.Module):
    """pixel_values [1, 3, S, S] (DPTImageProcessor's) -> predicted_depth [1, S, S]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values, return_dict=True).predicted_depth


def depth_processor_config(image_size: int) -> dict:
    """The DPTImageProcessor config saved beside the model: what DPT-Large's published folder says, at S."""
    return {
        "image_processor_type": "DPTImageProcessor",
        "do_resize": True, "size": {"height": image_size, "width": image_size}, "resample": 3,  # PIL bicubic
        "keep_aspect_ratio": False, "ensure_multiple_of": 1,
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_pad": False,
    }


def keep_activations_unit_scale(modules) -> None:
    """Re-initialise convolutions He-normal (fan-in, ReLU gain, zero bias) and BatchNorm scales to 1, in place.

    For *random* weights only (`editrt weights init`): transformers initialises DPT's neck and head and
    ViTMatte's decoder with N(0, 0.02) convolutions (ViTMatte's BatchNorm scales too), which, untrained,
    shrink the outputs to ~1e-9 depth and alpha = sigmoid(0) = 0.5 everywhere. Tests, parity checks and the
    pipeline's depth ordering would then compare constants. With this the outputs vary at O(1), as trained
    weights' do; the architecture and the file format are unchanged.
    """
    for module in modules:
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
