"""`editrt export` of depth_estimator (DPT) and matting (ViTMatte), checked with ONNX Runtime.

Tolerance: max |ort - torch| / max |torch| <= 1e-4 (export/onnx.py's fp32 bound; we see ~1e-6 for
depth, ~1e-7 for the sigmoid alphas): ONNX Runtime and PyTorch run different fp32 kernels (summation
order, fused GELU/LayerNorm), so bit equality is not expected; a graph with a frozen size is off by
order 1. Matting is traced at 512 x 512 and checked here at other multiples of 32, non-square.
"""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from editrt.errors import EngineError, WeightsError
from editrt.export.components import export_components, resolve_components
from editrt.export.onnx import random_inputs, trace_dims
from editrt.export.specs import optional_networks
from editrt.models.components import WeightsLayout
from editrt.runtime.backends import editor_settings, exported_estimators
from editrt.runtime.engines import OrtEngine, TorchEngine
from editrt.runtime.estimators import DepthEstimator, Matter, trimap_from_mask

ESTIMATORS = optional_networks()  # depth and matting: exported where the weights folder has them


@pytest.fixture(scope="module")
def exported(onnx_exports):
    """The estimators of the session's one `export_components(tiny_weights, "all", check=True)` (tests/conftest.py):
    "all" exports them where the weights have them, as tiny_weights do."""
    out, results = onnx_exports
    return out, [r for r in results if r.name in ESTIMATORS]


@pytest.fixture(scope="module")
def engines(exported, tiny_weights):
    from editrt.models.estimators import estimator_networks

    out, _ = exported
    specs = editor_settings(tiny_weights, "inpaint").specs
    nets = estimator_networks(WeightsLayout(tiny_weights), ESTIMATORS)
    return ({n: TorchEngine(specs[n], nets[n], "cpu") for n in ESTIMATORS},
            {n: OrtEngine(specs[n], out / f"{n}.onnx") for n in ESTIMATORS})


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_export_checks_both_within_1e_4(exported):
    out, results = exported
    assert [r.name for r in results] == list(ESTIMATORS)
    for r in results:
        assert r.path.is_file() and r.max_rel_error is not None and r.max_rel_error <= 1e-4, r


def test_matting_is_traced_at_a_multiple_of_32(tiny_weights):
    spec = editor_settings(tiny_weights, "inpaint").specs["matting"]
    dims = trace_dims(spec)
    assert dims == {"image_height": 512, "image_width": 512}


@pytest.mark.parametrize("dims", [{"image_height": 96, "image_width": 160}, {"image_height": 32, "image_width": 64},
                                  {"image_height": 128, "image_width": 32}])
def test_matting_graph_serves_other_sizes(engines, dims):
    torch_engines, ort_engines = engines
    spec = torch_engines["matting"].spec
    inputs = random_inputs(spec, dims, torch.Generator().manual_seed(sum(dims.values())))
    ref, ort = torch_engines["matting"](**inputs)["alphas"], ort_engines["matting"](**inputs)["alphas"]
    assert ref.shape == (1, 1, dims["image_height"], dims["image_width"])
    assert ref.std() > 1e-2  # the alpha varies: the bound below is not one between two constants
    assert _rel(ort, ref) <= 1e-4


def test_depth_graph_on_fresh_inputs(engines):
    torch_engines, ort_engines = engines
    inputs = random_inputs(torch_engines["depth_estimator"].spec, {}, torch.Generator().manual_seed(7))
    ref = torch_engines["depth_estimator"](**inputs)["predicted_depth"]
    assert ref.shape == (1, 64, 64)
    assert _rel(ort_engines["depth_estimator"](**inputs)["predicted_depth"], ref) <= 1e-4


@pytest.mark.parametrize("shape", [(77, 130), (130, 77)])
def test_estimators_on_onnxruntime_match_torch(engines, shape):
    torch_engines, ort_engines = engines
    rgb = np.asarray(Image.fromarray(data.chelsea()).resize((shape[1], shape[0]), Image.BICUBIC)).copy()
    depth = [DepthEstimator(e["depth_estimator"], 64, "cpu", torch.float32)(rgb) for e in engines]
    assert _rel(torch.from_numpy(depth[1]), torch.from_numpy(depth[0])) <= 1e-4
    mask = np.zeros(shape, bool)
    mask[shape[0] // 4: 3 * shape[0] // 4, shape[1] // 4: 3 * shape[1] // 4] = True
    trimap = trimap_from_mask(mask, 3)
    alpha = [Matter(e["matting"], "cpu", torch.float32)(rgb, trimap) for e in engines]
    assert np.abs(alpha[1] - alpha[0]).max() <= 1e-4  # alpha in [0, 1]: absolute = relative to its range


def test_engines_refuse_sides_that_are_not_multiples_of_32(engines):
    for engine in (engines[0]["matting"], engines[1]["matting"]):
        with pytest.raises(EngineError, match="axis 'image_height' is 77, expected a multiple of 32"):
            engine(pixel_values=torch.zeros(1, 4, 77, 128))
    with pytest.raises(EngineError, match="pixel_values"):
        engines[1]["depth_estimator"](pixel_values=torch.zeros(1, 3, 32, 32))  # fixed S x S = 64


def test_manifest_and_file_backend_selection(exported, tiny_weights, tmp_path):
    import json

    out, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"depth_estimator", "matting"} <= set(manifest["networks"])
    layout = WeightsLayout(tiny_weights)
    assert exported_estimators(layout, out) == ("depth_estimator", "matting")
    assert exported_estimators(layout, tmp_path) == ()  # an export folder from before the estimators


def test_all_skips_estimators_the_weights_lack_but_naming_one_requires_it(tiny_weights, tmp_path):
    root = tmp_path / "w"
    shutil.copytree(tiny_weights, root, ignore=shutil.ignore_patterns("depth", "elements"))
    names = resolve_components("all", root)
    assert "depth_estimator" not in names and "matting" in names
    assert "depth_estimator" in resolve_components("all", tiny_weights)
    with pytest.raises(WeightsError, match="depth/config.json: missing"):
        export_components(root, ["depth_estimator"], tmp_path / "out")
    assert not (tmp_path / "out" / "depth_estimator.onnx").exists()


def test_tensorrt_profiles_need_no_tensorrt(tiny_weights):
    """The optimisation profiles TensorRT would build with (export/tensorrt.profile_shapes; no TensorRT needed)."""
    from editrt.export.specs import MATTING_SIDES
    from editrt.export.tensorrt import BuildOptions, profile_shapes

    specs = editor_settings(tiny_weights, "inpaint").specs
    (matting,) = profile_shapes(specs["matting"], BuildOptions(precision="fp32"))
    assert matting == {"pixel_values": tuple((1, 4, s, s) for s in MATTING_SIDES)}
    assert all(s % 32 == 0 for s in MATTING_SIDES)
    (depth,) = profile_shapes(specs["depth_estimator"], BuildOptions(precision="fp32"))
    assert depth == {"pixel_values": ((1, 3, 64, 64),) * 3}  # static S x S
