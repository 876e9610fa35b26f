"""The exported networks as PyTorch modules whose forward has exactly the spec's I/O.

The same modules serve the PyTorch backend (runtime/engines.TorchEngine) and the ONNX export, so
the exported graph is, op for op, what the PyTorch backend runs. Each wraps plain model code from
editrt.models / diffusers / segment-anything; nothing here changes the math.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from segment_anything.utils.onnx import SamOnnxModel


class UNetNet(nn.Module):
    """(sample, timestep, encoder_hidden_states) -> noise_pred, for the inpainting UNet and the harmonizer.

    The harmonizer is the same UNet with its LoRA fused at `lora_scale`. `forward` never switches
    weights: whoever runs the module puts them in place first, explicitly (the runtime's engine
    `prepare()`, runtime/engines.py; the ONNX export calls `apply_weights()` once before tracing).
    """

    def __init__(self, unet, lora=None, lora_scale: float = 0.0):
        super().__init__()
        self.unet, self.lora, self.lora_scale = unet, lora, lora_scale

    def apply_weights(self) -> None:
        """Fuse the LoRA at this module's own `lora_scale` (in place)."""
        if self.lora is not None:
            self.lora.set_scale(self.lora_scale)

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VaeEncoderNet(nn.Module):
    """(image, noise) -> (mean + std * noise) * scaling_factor: diffusers' latent_dist.sample, noise supplied."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image, noise):
        dist = self.vae.encode(image).latent_dist
        return (dist.mean + dist.std * noise) * self.vae.config.scaling_factor


class VaeDecoderNet(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent / self.vae.config.scaling_factor, return_dict=False)[0]


class SamImageEncoderNet(nn.Module):
    def __init__(self, sam):
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image):
        return self.image_encoder(image)


def sam_mask_decoder_net(sam) -> nn.Module:
    """segment-anything's own SamOnnxModel, returning all 4 mask tokens (multimask = tokens 1..3)."""
    return SamOnnxModel(sam, return_single_mask=False)


class SamGridDecoderNet(nn.Module):
    """N single foreground points (input-frame coordinates) -> each query's best-IoU multimask logits.

    The same prompt embedding as SamPredictor for one point (the point, then a padding point).
    """

    def __init__(self, sam):
        super().__init__()
        self.sam = sam

    def forward(self, image_embeddings, point_coords):
        n = point_coords.shape[0]
        coords = torch.stack([point_coords, torch.zeros_like(point_coords)], dim=1)  # (N, 2, 2): point, pad
        labels = torch.stack([torch.ones_like(point_coords[:, 0]), -torch.ones_like(point_coords[:, 0])], dim=1)
        prompt = self.sam.prompt_encoder
        sparse = prompt.pe_layer.forward_with_coords(coords + 0.5, prompt.input_image_size)  # (N, 2, C)
        sparse = sparse * (labels[..., None] != -1) + prompt.not_a_point_embed.weight * (labels[..., None] == -1)
        sparse = sparse + prompt.point_embeddings[1].weight * (labels[..., None] == 1)
        dense = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *prompt.image_embedding_size)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=image_embeddings, image_pe=prompt.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
        )  # (N, 3, 4h, 4w), (N, 3)
        best = iou.argmax(dim=1)
        return torch.gather(low_res, 1, best[:, None, None, None].expand(-1, 1, *low_res.shape[2:]))[:, 0]


class ElementUNetNet(nn.Module):
    """(sample, timestep, encoder_hidden_states, element_tokens) -> noise_pred."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, sample, timestep, encoder_hidden_states, element_tokens):
        return self.decoder(sample, timestep, encoder_hidden_states, element_tokens)


class ContentEncoderNet(nn.Module):
    def __init__(self, content_encoder):
        super().__init__()
        self.content_encoder = content_encoder

    def forward(self, patches):
        return self.content_encoder(patches)


def reposition_networks(c) -> dict[str, nn.Module]:
    """The networks that can be built from models.components.RepositionComponents; which of them an editor
    runs is export/specs.NETWORK_ROLES's to say (backends and export pick from this by role)."""
    return {
        "inpaint_unet": UNetNet(c.unet, c.harmonizer, 0.0),
        "harmonizer_unet": UNetNet(c.unet, c.harmonizer, 1.0),
        "vae_encoder": VaeEncoderNet(c.vae),
        "vae_decoder": VaeDecoderNet(c.vae),
        "sam_image_encoder": SamImageEncoderNet(c.sam),
        "sam_mask_decoder": sam_mask_decoder_net(c.sam),
        "sam_mask_decoder_grid": SamGridDecoderNet(c.sam),
    }


def elements_networks(c) -> dict[str, nn.Module]:
    """The networks that can be built from models.components.ElementsComponents (picked by role, as above)."""
    return {
        "content_encoder": ContentEncoderNet(c.content_encoder),
        "element_unet": ElementUNetNet(c.decoder),
        "element_vae_decoder": VaeDecoderNet(c.vae),
        "sam_image_encoder": SamImageEncoderNet(c.sam),
        "sam_mask_decoder": sam_mask_decoder_net(c.sam),
        "sam_mask_decoder_grid": SamGridDecoderNet(c.sam),
    }
