"""Weights without harmonizer_lora.safetensors (public SD-2 inpainting + SAM, prompts from text):
harmonize runs the base UNet (c = 0), so the exported harmonizer graph computes what the inpaint graph does."""
from __future__ import annotations

import shutil

import numpy as np
import torch

from editrt.export.components import export_components
from editrt.export.onnx import check_cases, ort_session, random_inputs, trace_dims
from editrt.export.specs import network_specs
from editrt.models.components import WeightsLayout


def test_harmonizer_without_lora_exports_the_base_unet(tiny_weights, tmp_path):
    folder = shutil.copytree(tiny_weights, tmp_path / "w")
    (folder / "harmonizer_lora.safetensors").unlink()
    results = {r.name: r for r in export_components(folder, ["inpaint_unet", "harmonizer_unet"], tmp_path / "onnx")}
    spec = network_specs(WeightsLayout(folder).network_config())["harmonizer_unet"]
    dims, _ = check_cases(spec, trace_dims(spec))[-1]  # a size the trace never saw
    inputs = random_inputs(spec, dims, generator=torch.Generator().manual_seed(7))
    feed = {k: v.numpy() for k, v in inputs.items()}
    base = ort_session(results["inpaint_unet"].path).run(None, feed)
    harmonizer = ort_session(results["harmonizer_unet"].path).run(None, feed)
    assert all(np.array_equal(a, b) for a, b in zip(base, harmonizer))  # same weights, same graph: bit-equal
