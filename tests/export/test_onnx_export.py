"""ONNX export of every tiny component, checked with ONNX Runtime, and the onnxruntime backend end to end.

Tolerances. Export: max relative error <= 1e-4 in fp32 (the exporter refuses more; we see ~1e-6).
Backends: ONNX Runtime and PyTorch run different fp32 kernels (summation order, fused ops), so
their images may differ by rounding; after a few denoising steps of a random-weights model we allow
2 uint8 levels (we see 0-1) and SAM masks may differ at a handful of threshold pixels.
"""
import json

import numpy as np
import onnx
import pytest
import torch
from skimage import data

from editrt.errors import EngineError
from editrt.export.components import COMPONENTS, export_components
from editrt.export.specs import network_specs
from editrt.models.components import WeightsLayout
from editrt.runtime.engines import OrtEngine


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_weights):
    out = tmp_path_factory.mktemp("engines")
    results = export_components(tiny_weights, "all", out, check=True)
    return out, results


@pytest.fixture(scope="module")
def specs(tiny_weights):
    return network_specs(WeightsLayout(tiny_weights).network_config())


def test_every_component_exports_and_matches_pytorch(engines, specs):
    out, results = engines
    assert [r.name for r in results] == list(COMPONENTS)
    manifest = json.loads((out / "manifest.json").read_text())
    for r in results:
        assert r.max_rel_error is not None and r.max_rel_error <= 1e-4, (r.name, r.max_rel_error)
        assert manifest["networks"][r.name]["max_rel_error"] == r.max_rel_error
        model = onnx.load(str(r.path))
        assert model.opset_import[0].version >= 17
        spec = specs[r.name]
        assert [i.name for i in model.graph.input] == spec.input_names
        assert [o.name for o in model.graph.output] == spec.output_names
        for tensor in model.graph.input:  # named dynamic axes where the spec has them
            expected = specs[r.name].input(tensor.name).axes
            got = [d.dim_param or d.dim_value for d in tensor.type.tensor_type.shape.dim]
            assert got == list(expected), (r.name, tensor.name, got, expected)
    assert len(manifest["networks"]["harmonizer_unet"]["refit_map"]) == 32


def test_engine_rejects_bad_inputs_and_files(engines, specs, tmp_path):
    out, _ = engines
    engine = OrtEngine(specs["vae_decoder"], out / "vae_decoder.onnx")
    with pytest.raises(EngineError, match=r"vae_decoder: input 'latent' has shape \[1, 3, 8, 8\], expected"):
        engine(latent=torch.randn(1, 3, 8, 8))
    with pytest.raises(EngineError, match="unexpected inputs"):
        engine(latent=torch.randn(1, 4, 8, 8), other=torch.zeros(1))
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(EngineError, match="not a loadable ONNX model"):
        OrtEngine(specs["vae_decoder"], tmp_path / "bad.onnx")
    with pytest.raises(EngineError, match="does not match the vae_decoder spec"):
        OrtEngine(specs["vae_decoder"], out / "vae_encoder.onnx")
    with pytest.raises(EngineError, match="missing; export it"):
        OrtEngine(specs["vae_decoder"], tmp_path / "none.onnx")


def test_onnxruntime_backend_matches_torch(engines, tiny_weights):
    from editrt.runtime.elements_pipeline import ElementsPipeline
    from editrt.runtime.reposition import RepositionPipeline

    out, _ = engines
    photo = data.chelsea()
    mask = np.zeros(photo.shape[:2], bool)
    mask[100:200, 150:260] = True
    torch_pipe = RepositionPipeline.from_pretrained(tiny_weights)
    ort_pipe = RepositionPipeline.from_pretrained(tiny_weights, backend="onnxruntime", engines=out)
    for guidance in (1.0, 3.0):
        a = np.asarray(torch_pipe(photo, mask=mask, move=(30, 5), steps=3, guidance=guidance).image).astype(int)
        b = np.asarray(ort_pipe(photo, mask=mask, move=(30, 5), steps=3, guidance=guidance).image).astype(int)
        assert np.abs(a - b).max() <= 2
    a, b = torch_pipe.segment(photo, points=[[200, 150]]), ort_pipe.segment(photo, points=[[200, 150]])
    assert (a != b).mean() < 1e-3
    with pytest.raises(Exception, match="fused at 1"):
        ort_pipe.harmonize(photo, mask, steps=1, lora_scale=0.0)

    torch_el = ElementsPipeline.from_pretrained(tiny_weights)
    ort_el = ElementsPipeline.from_pretrained(tiny_weights, backend="onnxruntime", engines=out)
    ea, eb = torch_el.partition(photo), ort_el.partition(photo)
    assert (ea.paint() != eb.paint()).mean() < 1e-3
    np.testing.assert_allclose(ea.features, eb.features, rtol=1e-4, atol=1e-4)
    ia = np.asarray(torch_el.decode(ea, steps=3)).astype(int)
    ib = np.asarray(ort_el.decode(ea, steps=3)).astype(int)
    assert np.abs(ia - ib).max() <= 2


def test_external_data_for_large_graphs(tiny_weights, tmp_path, monkeypatch):
    """Graphs over 2 GB keep their weights in <name>.onnx.data (forced here with a tiny threshold)."""
    import editrt.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "TWO_GB", 1000)
    export_components(tiny_weights, ["vae_decoder"], tmp_path, check=True)
    assert (tmp_path / "vae_decoder.onnx.data").stat().st_size > (tmp_path / "vae_decoder.onnx").stat().st_size
    specs = network_specs(WeightsLayout(tiny_weights).network_config())
    out = OrtEngine(specs["vae_decoder"], tmp_path / "vae_decoder.onnx")(latent=torch.randn(1, 4, 8, 8))["image"]
    assert out.shape == (1, 3, 64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "vae_decoder.onnx", "vae_decoder.onnx.data"]


def test_export_cli(tiny_weights, tmp_path, capsys):
    from editrt.cli import main

    assert main(["export", "--weights", str(tiny_weights), "--component", "content_encoder,vae_decoder",
                 "-o", str(tmp_path / "e"), "--check", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["content_encoder", "vae_decoder"]
    assert all("max relative error vs PyTorch" in line for line in lines)
    assert main(["export", "--weights", str(tiny_weights), "--component", "unet", "-o", str(tmp_path / "x")]) == 2
    assert "expected 'all' or one of" in capsys.readouterr().err
    assert main(["export", "--weights", str(tiny_weights), "--format", "tensorrt", "-o", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "tensorrt not installed" in err or "needs a CUDA GPU" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "t").exists()
