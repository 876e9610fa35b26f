"""Build each editor's engines for a backend: torch, onnxruntime or tensorrt.

The only place that branches on the backend; pipelines receive a dict name -> engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from editrt.errors import EngineError, InputError, WeightsError
from editrt.export.specs import network_specs
from editrt.models.components import WeightsLayout
from editrt.models.sam import sam_architecture

BACKENDS = ("torch", "onnxruntime", "tensorrt")
REPOSITION_NETWORKS = ("inpaint_unet", "harmonizer_unet", "vae_encoder", "vae_decoder", "sam_image_encoder",
                       "sam_mask_decoder", "sam_mask_decoder_grid")
ELEMENTS_NETWORKS = ("content_encoder", "element_unet", "element_vae_decoder", "sam_image_encoder",
                     "sam_mask_decoder", "sam_mask_decoder_grid")


def check_backend(backend: str, engines: str | Path | None) -> None:
    if backend not in BACKENDS:
        raise InputError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "torch" and engines is None:
        raise InputError(f"--engines: the {backend} backend needs the folder written by `editrt export`")


@dataclass
class EditorSettings:
    """What an editor needs to know of a weights directory before loading any network."""

    layout: WeightsLayout
    config: dict  # the sizes the network specs need (WeightsLayout.network_config)
    specs: dict  # network name -> NetworkSpec
    vae_scale_factor: int
    resolution: int  # the default working resolution: the UNet's sample size in pixels
    sam_image_size: int


def editor_settings(weights: str | Path, editor: str) -> EditorSettings:
    """`editor` is 'inpaint' (repositioning) or 'elements'; reads only the folder's JSON configs."""
    layout = WeightsLayout(weights)
    layout.check_root()
    config = layout.network_config()
    if editor not in config:
        raise WeightsError(f"{layout.elements}: missing; expected the element decoder folder (editrt weights init writes it)")
    vae_scale_factor = 2 ** (len(config[editor]["vae"]["block_out_channels"]) - 1)
    return EditorSettings(layout, config, network_specs(config), vae_scale_factor,
                          config[editor]["unet"]["sample_size"] * vae_scale_factor,
                          sam_architecture(config["sam"])["image_size"])


def torch_engines(specs: dict, networks: dict[str, torch.nn.Module], names) -> dict:
    from editrt.runtime.engines import TorchEngine

    return {name: TorchEngine(specs[name], networks[name]) for name in names}


def file_engines(specs: dict, names, backend: str, engines_dir: str | Path, device, weights: str | Path) -> dict:
    """Engines from an `editrt export` folder: ONNX files (onnxruntime) or TensorRT plans built from them."""
    engines_dir = Path(engines_dir)
    if not engines_dir.is_dir():
        raise EngineError(f"{engines_dir}: no such engines folder; write it with `editrt export -o {engines_dir}`")
    if backend == "onnxruntime":
        from editrt.runtime.engines import OrtEngine

        return {name: OrtEngine(specs[name], engines_dir / f"{name}.onnx", device) for name in names}
    from editrt.export import tensorrt as trt

    engines = {name: trt.load_engine(specs[name], engines_dir, device) for name in names
               if name not in ("inpaint_unet", "harmonizer_unet")}
    if "harmonizer_unet" in names:  # one refittable UNet for c = 0 and c = 1 (no second UNet in memory)
        manifest = read_manifest(engines_dir)
        refit_map = manifest.get("networks", {}).get("harmonizer_unet", {}).get("refit_map")
        if not refit_map:
            raise EngineError(f"{engines_dir / 'manifest.json'}: no refit map for harmonizer_unet; re-export it")
        shared = trt.RefittableHarmonizer(trt.load_engine(specs["harmonizer_unet"], engines_dir, device),
                                          trt.harmonizer_weights(Path(weights), refit_map))
        engines["harmonizer_unet"] = trt.HarmonizerAtScale(shared, 1.0, specs["harmonizer_unet"])
        engines["inpaint_unet"] = trt.HarmonizerAtScale(shared, 0.0, specs["inpaint_unet"])
    return engines


def read_manifest(engines_dir: Path) -> dict:
    import json

    path = engines_dir / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{path}: missing; expected the manifest `editrt export` writes") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
