"""The content encoder of Editable Image Elements (paper 001 Sec. 3.2, App. C.1, Fig. 13).

Each element's masked patch, cropped to its bounding box and resized to 32x32, is encoded to a
32-d appearance feature. The architecture is the SD KL-autoencoder's convolutional encoder
(diffusers' `Encoder`: residual blocks, stride-2 downsampling, a middle block of two residual
blocks and one attention layer) with fewer blocks per level and 4 downsamplings (32 -> 2), then
one convolution over the remaining 2x2 to the feature. A patch sees nothing but its own pixels, so
the feature cannot depend on where the element sits in the image; position and size are carried
separately as (x, y, w, h).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from diffusers.models.autoencoders.vae import Encoder
from safetensors.torch import save_file

from editrt.errors import WeightsError
from editrt.models.files import read_json, read_safetensors

PATCH = 32  # every patch is resized to PATCH x PATCH before encoding


class ContentEncoder(nn.Module):
    def __init__(self, block_out_channels=(32, 64, 128, 128, 128), layers_per_block=1, norm_num_groups=32,
                 feature_dim=32, patch_size=PATCH):
        super().__init__()
        self.config = dict(block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
                           norm_num_groups=norm_num_groups, feature_dim=feature_dim, patch_size=patch_size)
        levels = len(block_out_channels)
        self.encoder = Encoder(
            in_channels=3, out_channels=feature_dim, down_block_types=("DownEncoderBlock2D",) * levels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups, double_z=False, mid_block_add_attention=True,
        )
        remaining = patch_size // 2 ** (levels - 1)
        self.to_feature = nn.Conv2d(feature_dim, feature_dim, kernel_size=remaining)  # (r x r) -> 1 x 1

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [N, 3, 32, 32] in [-1, 1] (outside the element: 0) -> features [N, feature_dim]."""
        return self.to_feature(self.encoder(patches)).flatten(1)

    def save_pretrained(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> ContentEncoder:
        folder = Path(folder)
        config = read_json(folder / "config.json", "the content encoder config")
        try:
            model = cls(**config)
        except TypeError as e:
            raise WeightsError(f"{folder / 'config.json'}: unexpected content encoder config ({e})", field="weights") from None
        path = folder / "model.safetensors"
        try:
            model.load_state_dict(read_safetensors(path, "the content encoder weights"))
        except RuntimeError as e:
            raise WeightsError(f"{path}: does not match {folder / 'config.json'} ({str(e).splitlines()[0]})", field="weights") from None
        return model.to(dtype).eval()
