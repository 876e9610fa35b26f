"""`editrt export`: every component of a weights directory to ONNX (and from there to TensorRT).

    out/
      inpaint_unet.onnx  harmonizer_unet.onnx  vae_encoder.onnx  vae_decoder.onnx
      sam_image_encoder.onnx  sam_mask_decoder.onnx  sam_mask_decoder_grid.onnx
      content_encoder.onnx  element_unet.onnx  element_vae_decoder.onnx
      depth_estimator.onnx  matting.onnx          (where the weights have depth/ and matting/)
      manifest.json          which weights, what was checked (max relative error vs PyTorch), versions
      *.plan                 TensorRT engines (--format tensorrt), with their cache keys in the manifest

Export runs on the CPU from the same modules the PyTorch backend runs (models/networks.py), through
an export variant where a module's trace would freeze a dynamic input (export/traceable.py); the
check compares each graph with the runtime's own module. `precision='fp16'` exports the networks
whose spec lists fp16 (the UNets and VAEs) in fp16 and the others (SAM, the content encoder) in
fp32; the manifest records each network's precision.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from editrt.errors import InputError
from editrt.export.onnx import ONNX_PRECISIONS, ExportResult, export_network, trace_dims
from editrt.export.specs import NetworkSpec, all_networks, editor_networks, network_specs, optional_networks
from editrt.export.traceable import export_module
from editrt.models.components import WeightsLayout, load_elements_components, load_reposition_components
from editrt.models.estimators import (
    estimator_network_config,
    estimator_networks,
    estimator_networks_present,
)
from editrt.models.files import write_atomic
from editrt.models.networks import elements_networks, reposition_networks

FORMATS = ("onnx", "tensorrt")


def export_dims(spec: NetworkSpec) -> dict[str, int]:
    """The shapes a network is traced at (export/onnx.py `trace_dims`; the check runs at others)."""
    return trace_dims(spec)


def weights_fingerprint(root: Path) -> str:
    """Identity of a weights directory: hash of every file's name, size and modification time."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        h.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolve_components(names: list[str] | str, weights: str | Path | None = None) -> list[str]:
    """Component names from --component; 'all' leaves out the estimators the `weights` folder lacks
    (published weights may have no depth/ or matting/; asking for one by name still requires it)."""
    names = [names] if isinstance(names, str) else list(names)
    components = all_networks()
    if names == ["all"]:
        if weights is None:
            return list(components)
        present = estimator_networks_present(WeightsLayout(weights))
        return [n for n in components if n not in optional_networks() or n in present]
    unknown = [n for n in names if n not in components]
    if unknown:
        raise InputError(f"--component {unknown[0]!r}: expected 'all' or one of {', '.join(components)}",
                         field="names")
    return names


def export_components(weights: str | Path, names, out_dir: str | Path, check: bool = True, progress: bool = False,
                      log=lambda what: None, precision: str = "fp32") -> list[ExportResult]:
    """Export `names` ('all' or component names) of `weights` to ONNX in `out_dir`; returns what was written.

    `precision`: 'fp32' (default) or 'fp16' (for the networks whose spec allows it; the others stay fp32).
    """
    from tqdm.auto import tqdm

    if precision not in ONNX_PRECISIONS:
        raise InputError(f"--precision {precision!r}: ONNX exports expected one of {', '.join(ONNX_PRECISIONS)}", field="precision")
    layout = WeightsLayout(weights)
    layout.check_root()
    names = resolve_components(names, weights)
    estimators = [n for n in names if n in optional_networks()]
    config = {**layout.network_config(), **estimator_network_config(layout, estimators)}
    specs = network_specs(config)
    networks: dict[str, torch.nn.Module] = {}
    # a network both editors run (SAM) is built from the repositioning weights; load each editor only if needed
    reposition = editor_networks("reposition", optional=False)
    elements = [n for n in editor_networks("elements", optional=False) if n not in reposition]
    if any(n in reposition for n in names):
        networks.update({k: v for k, v in reposition_networks(load_reposition_components(weights)).items()
                         if k in reposition})
    if any(n in elements for n in names):
        networks.update({k: v for k, v in elements_networks(load_elements_components(weights)).items() if k in elements})
    networks.update(estimator_networks(layout, estimators))
    from editrt.models.sam import sam_architecture

    context = {"sam_image_size": sam_architecture(config["sam"])["image_size"]}
    results, extra = [], {}
    for name in tqdm(names, desc="export", disable=not progress):
        spec = specs[name]
        result = export_network(spec, export_module(name, networks[name]), out_dir, export_dims(spec), check=check,
                                context=context, reference=networks[name],
                                precision=precision if precision in spec.precisions else "fp32")
        log(f"{name}: {result.path} ({result.precision})"
            + (f", max relative error vs PyTorch {result.max_rel_error:.2e}" if check else ""))
        results.append(result)
        if name == "harmonizer_unet":  # which initializers a TensorRT refit swaps between c = 0 and c = 1
            from editrt.export.tensorrt import refit_weight_map

            harmonizer = networks[name]
            harmonizer.apply_weights()  # c = 1, as exported
            extra[name] = {"refit_map": refit_weight_map(result.path, harmonizer.lora.params)}
    write_manifest(Path(out_dir), layout.root, results, extra)
    return results


def write_manifest(out_dir: Path, weights_root: Path, results: list[ExportResult], extra: dict | None = None) -> None:
    import onnx
    import onnxruntime

    from editrt import __version__

    path = out_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {"networks": {}}
    manifest.update({
        "weights": str(weights_root.resolve()), "weights_fingerprint": weights_fingerprint(weights_root),
        "versions": {"editrt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
    })
    for r in results:
        manifest["networks"][r.name] = {"onnx": r.path.name, "precision": r.precision, "max_rel_error": r.max_rel_error,
                                        "export_seconds": round(r.seconds, 2), **(extra or {}).get(r.name, {})}
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
