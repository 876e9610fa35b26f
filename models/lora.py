"""LoRA for the harmonizer: read diffusers' LoRA files and fuse them into the UNet in place.

The harmonizer is the inpainting UNet with a LoRA fused at scale c (paper 000 Sec. 3.2 iii).
`FusedLoRA` keeps, for each LoRA-touched weight only, the base tensor W0 and the fused tensor
W0 + c·(alpha/r)·B@A, and switches by copying one into the live parameter. So

* c = 0 restores W0 bit for bit (never W1 − delta, which would round),
* c = 1 equals diffusers' `load_lora_weights` + `fuse_lora(lora_scale=1.0)` (peft merges
  W += (B@A)·scaling the same way),
* the switch is in place: the parameter's storage never changes, so captured CUDA graphs and
  exported weight maps see the new values.

Accepted key formats (the ones diffusers writes and reads for a UNet):
``unet.<module>.lora_A.weight`` / ``unet.<module>.lora_B.weight`` (peft style) or
``unet.<module>.lora.down.weight`` / ``unet.<module>.lora.up.weight`` (older diffusers style),
with an optional ``unet.<module>.alpha`` scalar (alpha defaults to the rank, i.e. scaling 1).

A weights directory without a LoRA file (the public SD-2 inpainting weights and no trained
harmonizer) is allowed: `load_harmonizer_lora` then returns no layers, so harmonize runs the base
UNet (c = 0 whatever scale is asked for) and says so once per process on stderr.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from editrt.errors import InputError, WeightsError
from editrt.models.files import read_safetensors

_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".alpha": "alpha",
}


@dataclass
class LoRALayer:
    down: torch.Tensor  # A: [r, in_features]
    up: torch.Tensor  # B: [out_features, r]
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """(B @ A) * alpha / r in float32, the order peft's merge uses."""
        return (self.up.float() @ self.down.float()) * self.scaling


def load_lora(path: str | Path) -> dict[str, LoRALayer]:
    """{UNet module path (e.g. 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'): LoRALayer}."""
    path = Path(path)
    tensors = read_safetensors(path, "the harmonizer LoRA in diffusers' LoRA key format")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith("unet."):
            raise WeightsError(f"{path}: unexpected key {key!r}; expected 'unet.<module>.lora_A.weight' / "
                               "'.lora_B.weight' (or '.lora.down.weight' / '.lora.up.weight', '.alpha')", field="weights")
        module = key[len("unet."):-len(suffix)]
        parts.setdefault(module, {})[_SUFFIXES[suffix]] = value
    if not parts:
        raise WeightsError(f"{path}: holds no LoRA weights", field="weights")
    layers = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            raise WeightsError(f"{path}: module {module!r} lacks its {'up (B)' if 'up' not in p else 'down (A)'} matrix", field="weights")
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise WeightsError(f"{path}: module {module!r} has A {list(down.shape)} and B {list(up.shape)}; "
                               "expected A [r, in] and B [out, r]", field="weights")
        alpha = float(p["alpha"]) if "alpha" in p else float(down.shape[0])
        layers[module] = LoRALayer(down=down, up=up, alpha=alpha)
    return layers


_log = logging.getLogger(__name__)
_warned_missing: set[str] = set()
_warned_lock = threading.Lock()


def load_harmonizer_lora(path: str | Path) -> dict[str, LoRALayer]:
    """`load_lora(path)`, or no layers when the file does not exist (harmonize then runs the base UNet).

    The missing file is reported once per process and path, as one WARNING line of the
    'editrt.models.lora' logger (stderr when logging is not configured), however many times a
    pipeline, exporter or benchmark loads the same directory. Any other problem with the file
    (unreadable, a folder in its place, bad keys) is still a WeightsError.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        return load_lora(path)
    with _warned_lock:
        first = str(path) not in _warned_missing
        _warned_missing.add(str(path))
    if first:
        _log.warning("editrt: warning: %s: missing; harmonize runs the base UNet (LoRA scale c = 0)", path)
    return {}


def save_lora(path: Path, layers: dict[str, LoRALayer], metadata: dict[str, str] | None = None) -> None:
    tensors = {}
    for module, layer in layers.items():
        tensors[f"unet.{module}.lora_A.weight"] = layer.down.contiguous()
        tensors[f"unet.{module}.lora_B.weight"] = layer.up.contiguous()
    save_file(tensors, str(path), metadata=metadata or {})


def random_lora(unet: torch.nn.Module, targets: list[str], rank: int, generator: torch.Generator) -> dict[str, LoRALayer]:
    """A random LoRA on every attention projection named in `targets` (e.g. 'to_q', 'to_out.0').

    B is not zero (as a freshly initialised peft LoRA would be) so that c = 1 visibly differs from c = 0.
    """
    layers = {}
    for name, module in unet.named_modules():
        if not any(name.endswith("." + t) for t in targets) or not isinstance(module, torch.nn.Linear):
            continue
        if ".attn1." not in name and ".attn2." not in name:
            continue
        out_f, in_f = module.weight.shape
        down = torch.randn(rank, in_f, generator=generator) / in_f**0.5
        up = torch.randn(out_f, rank, generator=generator) * (0.5 / rank**0.5)
        layers[name] = LoRALayer(down=down, up=up, alpha=float(rank))
    return layers


class FusedLoRA:
    """Switches a UNet between its base weights (c = 0) and LoRA-fused weights (c != 0) in place."""

    def __init__(self, unet: torch.nn.Module, layers: dict[str, LoRALayer], source: str = "LoRA"):
        modules = dict(unet.named_modules())
        self.params: dict[str, torch.nn.Parameter] = {}
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            module = modules.get(name)
            if not isinstance(module, torch.nn.Linear):
                raise WeightsError(f"{source}: module {name!r} is not a linear layer of the UNet", field="weights")
            if tuple(module.weight.shape) != (layer.up.shape[0], layer.down.shape[1]):
                raise WeightsError(f"{source}: module {name!r} has weight {list(module.weight.shape)} but the LoRA "
                                   f"gives [{layer.up.shape[0]}, {layer.down.shape[1]}]", field="weights")
            self.params[name] = module.weight
            self.base[name] = module.weight.detach().clone()
            self.deltas[name] = layer.delta().to(module.weight.device)
        self.scale = 0.0
        self._fused: dict[float, dict[str, torch.Tensor]] = {}  # insertion order = least recently used first

    # fused copies kept besides the base: c = 1 (the harmonizer) and the last other scale asked for.
    # Each is a full copy of the LoRA-touched weights, so an unbounded dict would grow per scale.
    KEEP_FUSED = 2

    def fused_weights(self, scale: float) -> dict[str, torch.Tensor]:
        """The LoRA-touched weights at `scale` (cached, at most KEEP_FUSED scales: switching back and
        forth between them costs copies only)."""
        if scale == 0.0:
            return self.base
        fused = self._fused.pop(scale, None)
        if fused is None:
            fused = {n: (self.base[n].float() + scale * self.deltas[n]).to(self.base[n].dtype) for n in self.params}
        self._fused[scale] = fused  # most recently used last
        while len(self._fused) > self.KEEP_FUSED:
            del self._fused[next(iter(self._fused))]
        return fused

    @torch.no_grad()
    def set_scale(self, scale: float) -> None:
        if scale == self.scale:
            return
        weights = self.fused_weights(scale)
        for name, param in self.params.items():
            param.copy_(weights[name])
        self.scale = scale


class LoRAScale:
    """An engine's LoRA scale c: set by the pipeline, applied by the engine's prepare() (runtime/engines.py).

    Lives here, below export/ and runtime/, so every backend's engine can declare it.

    `allowed` lists the scales the engine can switch to (TensorRT: those it has refit weights
    for); None: any finite scale (PyTorch fuses on demand).
    """

    def __init__(self, value: float, allowed: tuple[float, ...] | None = None, name: str = "harmonizer"):
        self.allowed, self.name = allowed, name
        self.value = float(value)

    def set(self, scale: float) -> None:
        scale = float(scale)
        if not np.isfinite(scale) or (self.allowed is not None and scale not in self.allowed):
            expected = "a finite number" if self.allowed is None else "one of " + ", ".join(f"{a:g}" for a in self.allowed)
            raise InputError(f"lora_scale {scale:g}: the {self.name} engine accepts {expected}", field="lora_scale")
        self.value = scale
