"""The element decoder of Editable Image Elements (paper 001 Sec. 3.3, Algorithm 1).

An SD-1.5 UNet (diffusers `UNet2DConditionModel`) in which every transformer block with a text
cross-attention gets a second cross-attention on the element tokens, with its own LayerNorm and
q/k/v/out. Both read the output of the self-attention; their outputs are added with equal weight
(Algorithm 1; text only, elements only, or both):

    x = x + attn1(norm1(x))
    y = attn2(norm2(x), text) + attn_elements(norm_elements(x), elements)
    x = x + y
    x = x + ff(norm3(x))

Element tokens: a Fourier embedding of (x, y, w, h) concatenated with the 32-d content feature,
projected to the cross-attention width. The projection has no bias, so a deleted element (feature
and embedded position zeroed, paper "Supporting editing operations") is an all-zero token, the
same as the unconditional element tokens of classifier-free guidance.

Weights: `elements/unet/` is a plain diffusers SD-1.5 UNet folder (SD-1.5 weights drop in);
`elements/element_adapter/` holds config.json and model.safetensors with the embedder and every
block's `norm_elements` / `attn_elements`, keyed by the block's path in the UNet.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from safetensors.torch import save_file

from editrt.errors import WeightsError
from editrt.models.files import load_diffusers, read_json, read_safetensors


class ElementEmbedder(nn.Module):
    """(feature, x, y, w, h) per element -> element tokens [B, N, token_dim]."""

    def __init__(self, feature_dim: int = 32, fourier_bands: int = 8, token_dim: int = 768):
        super().__init__()
        self.feature_dim, self.fourier_bands = feature_dim, fourier_bands
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(fourier_bands), persistent=False)
        self.proj = nn.Linear(4 * 2 * fourier_bands + feature_dim, token_dim, bias=False)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """features [B, N, F]; boxes [B, N, 4] = (x, y, w, h) in [0, 1]; alive [B, N] bool."""
        angles = boxes[..., None] * self.frequencies  # (B, N, 4, bands)
        position = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (B, N, 8 * bands)
        tokens = torch.cat([position, features], dim=-1) * alive[..., None].to(features.dtype)
        return self.proj(tokens)


class ElementTransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock (layer-norm variant) plus the element cross-attention.

    Keeps the wrapped block's submodule names (norm1, attn1, norm2, attn2, norm3, ff), so the
    UNet's state dict is unchanged; adds norm_elements and attn_elements. `dual_cross_attention`
    is the swappable part: the fused Triton path replaces it (editrt.kernels.dual_attention).
    """

    def __init__(self, block: BasicTransformerBlock, element_dim: int):
        super().__init__()
        if block.norm_type != "layer_norm" or block.pos_embed is not None or block.only_cross_attention or block.attn2 is None:
            raise ValueError("element attention supports SD-style blocks (layer norm, text cross-attention) only")
        self.norm1, self.attn1, self.norm2, self.attn2, self.norm3, self.ff = (
            block.norm1, block.attn1, block.norm2, block.attn2, block.norm3, block.ff)
        dim = block.norm2.normalized_shape[0]
        self.norm_elements = nn.LayerNorm(dim, eps=block.norm2.eps, elementwise_affine=block.norm2.elementwise_affine)
        self.attn_elements = Attention(
            query_dim=dim, cross_attention_dim=element_dim, heads=block.attn2.heads,
            dim_head=block.attn2.inner_dim // block.attn2.heads, bias=block.attn2.to_q.bias is not None,
            out_bias=block.attn2.to_out[0].bias is not None,
        )
        self.dual_processor = None  # None: the reference two-attention path below

    def dual_cross_attention(self, x: torch.Tensor, text: torch.Tensor | None, elements: torch.Tensor | None) -> torch.Tensor:
        if self.dual_processor is not None and text is not None and elements is not None:
            return self.dual_processor(self, x, text, elements)
        y = None
        if text is not None:
            y = self.attn2(self.norm2(x), encoder_hidden_states=text)
        if elements is not None:
            y_elements = self.attn_elements(self.norm_elements(x), encoder_hidden_states=elements)
            y = y_elements if y is None else y + y_elements
        return y

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        kwargs = cross_attention_kwargs or {}
        elements = kwargs.get("element_tokens")
        text = encoder_hidden_states if kwargs.get("use_text", True) else None
        # 1. Self-attention.
        hidden_states = self.attn1(self.norm1(hidden_states), attention_mask=attention_mask) + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        # 2. Text and element cross-attention, summed (Algorithm 1).
        y = self.dual_cross_attention(hidden_states, text, elements)
        if y is not None:
            hidden_states = y + hidden_states
        # 3. Feed-forward.
        hidden_states = self.ff(self.norm3(hidden_states)) + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        return hidden_states


def add_element_attention(unet: UNet2DConditionModel, element_dim: int) -> dict[str, ElementTransformerBlock]:
    """Swap every cross-attention BasicTransformerBlock of `unet` for an ElementTransformerBlock (in place)."""
    blocks = {}
    for name, module in list(unet.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BasicTransformerBlock) and child.attn2 is not None:
                new = ElementTransformerBlock(child, element_dim).to(next(child.parameters()).dtype)
                setattr(module, child_name, new) if not isinstance(module, nn.ModuleList) else module.__setitem__(int(child_name), new)
                blocks[f"{name}.{child_name}" if name else child_name] = new
    return blocks


class ElementDecoder(nn.Module):
    """noise_pred = decoder(sample, timestep, text hidden states, element tokens)."""

    def __init__(self, unet: UNet2DConditionModel, embedder: ElementEmbedder, adapter_config: dict):
        super().__init__()
        self.unet, self.embedder, self.adapter_config = unet, embedder, adapter_config
        self.blocks = add_element_attention(unet, embedder.proj.out_features)

    def forward(self, sample, timestep, encoder_hidden_states, element_tokens=None, use_text: bool = True):
        kwargs = {"element_tokens": element_tokens, "use_text": use_text}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         cross_attention_kwargs=kwargs, return_dict=False)[0]

    # -- weights
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"embedder.{k}": v for k, v in self.embedder.state_dict().items()}
        for path, block in self.blocks.items():
            for k, v in block.norm_elements.state_dict().items():
                state[f"blocks.{path}.norm_elements.{k}"] = v
            for k, v in block.attn_elements.state_dict().items():
                state[f"blocks.{path}.attn_elements.{k}"] = v
        return state

    def save_adapter(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.adapter_config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.adapter_state_dict().items()}, str(folder / "model.safetensors"))

    def load_adapter(self, path: Path) -> None:
        state = read_safetensors(path, "the element attention and embedder weights")
        expected = self.adapter_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise WeightsError(f"{path}: does not match the UNet (missing {missing[:2]}..., unexpected {unexpected[:2]}...)"
                               if missing and unexpected else
                               f"{path}: {'missing' if missing else 'unexpected'} keys {(missing or unexpected)[:3]}", field="weights")
        with torch.no_grad():
            for k, v in state.items():
                if v.shape != expected[k].shape:
                    raise WeightsError(f"{path}: '{k}' has shape {list(v.shape)}, expected {list(expected[k].shape)}", field="weights")
                expected[k].copy_(v)


def adapter_config(feature_dim: int, fourier_bands: int, token_dim: int) -> dict:
    return {"feature_dim": feature_dim, "fourier_bands": fourier_bands, "token_dim": token_dim}


def build_element_decoder(unet: UNet2DConditionModel, config: dict) -> ElementDecoder:
    embedder = ElementEmbedder(config["feature_dim"], config["fourier_bands"], config["token_dim"])
    return ElementDecoder(unet, embedder.to(unet.dtype), config)


def load_element_decoder(unet_folder: Path, adapter_folder: Path, dtype: torch.dtype = torch.float32) -> ElementDecoder:
    unet = load_diffusers(UNet2DConditionModel, unet_folder, "element decoder UNet", dtype).eval()
    config_path = adapter_folder / "config.json"
    config = read_json(config_path, "the element adapter config")
    if config.get("token_dim") != unet.config.cross_attention_dim:
        raise WeightsError(f"{config_path}: token_dim {config.get('token_dim')} differs from the UNet's "
                           f"cross_attention_dim {unet.config.cross_attention_dim}", field="weights")
    decoder = build_element_decoder(unet, config)
    decoder.load_adapter(adapter_folder / "model.safetensors")
    return decoder.eval()


def load_element_embedder(adapter_folder: Path, dtype: torch.dtype = torch.float32) -> ElementEmbedder:
    """Only the token embedder (for backends that run the UNet as an engine)."""
    config = read_json(adapter_folder / "config.json", "the element adapter config")
    embedder = ElementEmbedder(config["feature_dim"], config["fourier_bands"], config["token_dim"])
    state = read_safetensors(adapter_folder / "model.safetensors", "the element attention and embedder weights")
    try:
        embedder.load_state_dict({k[len("embedder."):]: v for k, v in state.items() if k.startswith("embedder.")})
    except RuntimeError as e:
        raise WeightsError(f"{adapter_folder / 'model.safetensors'}: embedder weights do not match its config "
                           f"({str(e).splitlines()[0]})", field="weights") from None
    return embedder.to(dtype).eval()
