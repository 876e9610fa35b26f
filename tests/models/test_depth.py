"""Depth (DPT / MiDaS v3): editrt's DepthEstimator on the torch backend against transformers' own
`pipeline("depth-estimation")` on the same folder (the oracle), bit for bit; the folder's loader errors.

Bit-equal, not a tolerance: the estimator runs the same ops in the same order as DPTImageProcessor
(torchvision's uint8 bicubic resize on the CPU, the fused (x - 127.5) / 127.5) and as
post_process_depth_estimation (bicubic, align_corners=False), and the engine runs the same model.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from editrt.errors import InputError, WeightsError
from editrt.models.components import WeightsLayout
from editrt.models.depth import depth_image_size, load_depth_model
from editrt.runtime.backends import build_engines
from editrt.runtime.estimators import DepthEstimator, estimators_from_engines

SIZES = [(77, 130), (130, 77), (64, 64), (31, 200)]  # landscape, portrait, exactly S x S (no resize), odd


@pytest.fixture(scope="module")
def built(tiny_weights):
    return build_engines("reposition", tiny_weights)


@pytest.fixture(scope="module")
def estimator(built):
    depth, _ = estimators_from_engines(built.engines, "cpu", torch.float32)
    return depth


@pytest.fixture(scope="module")
def hf_pipeline(tiny_weights):
    from transformers import pipeline

    return pipeline("depth-estimation", model=str(WeightsLayout(tiny_weights).depth), device="cpu")


def _image(shape, seed):
    """A crop of a real photo resized to `shape` (not noise)."""
    photo = Image.fromarray(data.astronaut()).resize((shape[1], shape[0]), Image.BICUBIC)
    rgb = np.asarray(photo).copy()
    rgb[::7] = np.random.default_rng(seed).integers(0, 256, rgb[::7].shape, dtype=np.uint8)  # and some texture
    return rgb


def test_the_engine_is_present_and_reads_s_from_the_folder(built, tiny_weights, estimator):
    assert "depth_estimator" in built.engines
    assert estimator.image_size == depth_image_size(WeightsLayout(tiny_weights).depth) == 64
    assert built.engines["depth_estimator"].spec.input("pixel_values").axes == (1, 3, 64, 64)


@pytest.mark.parametrize("shape", [(300, 451)] + SIZES)
def test_depth_equals_transformers_pipeline_bit_for_bit(estimator, hf_pipeline, shape):
    rgb = data.chelsea() if shape == (300, 451) else _image(shape, seed=sum(shape))
    ours = estimator(rgb)
    reference = hf_pipeline(Image.fromarray(rgb))["predicted_depth"].numpy()
    assert ours.dtype == np.float32 and ours.shape == shape
    np.testing.assert_array_equal(ours, reference)


def test_random_weights_give_a_depth_that_varies(estimator):
    """`editrt weights init`'s random DPT predicts O(1) values that vary over the photo (not ~1e-9: see
    models/depth.py keep_activations_unit_scale), so comparisons and depth orderings are not of constants."""
    depth = estimator(data.chelsea())
    assert depth.std() > 1e-2 and (depth > 0).mean() > 0.5


def test_pixel_values_equal_dpt_image_processor(estimator, hf_pipeline):
    rgb = _image((77, 130), seed=1)
    expected = hf_pipeline.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
    assert torch.equal(estimator.preprocess(rgb), expected)


def test_nearer_is_larger_is_what_the_model_says(estimator, hf_pipeline):
    """The estimator hands back the model's relative inverse depth untouched (no sign flip, no rescale)."""
    rgb = _image((90, 120), seed=3)
    model = hf_pipeline.model
    inputs = hf_pipeline.image_processor(images=rgb, return_tensors="pt")
    with torch.no_grad():
        raw = model(**inputs).predicted_depth
    assert torch.equal(estimator.engine(pixel_values=estimator.preprocess(rgb))["predicted_depth"], raw)


@pytest.mark.parametrize("bad, what", [
    (np.zeros((10, 10), np.uint8), "uint8 RGB array"),
    (np.zeros((10, 10, 4), np.uint8), "uint8 RGB array"),
    (np.zeros((10, 10, 3), np.float32), "uint8 RGB array"),
    (np.zeros((0, 10, 3), np.uint8), "non-empty"),
])
def test_bad_images_are_one_line_input_errors(estimator, bad, what):
    with pytest.raises(InputError, match=what) as e:
        estimator(bad)
    assert "\n" not in str(e.value)


def test_missing_or_corrupt_depth_files_are_one_line_weights_errors(tiny_weights, tmp_path):
    folder = tmp_path / "depth"
    shutil.copytree(WeightsLayout(tiny_weights).depth, folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot load the depth model") as e:
        load_depth_model(folder)
    assert "\n" not in str(e.value)
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors"):
        load_depth_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        depth_image_size(folder)
    (folder / "config.json").unlink()
    with pytest.raises(WeightsError, match="missing; expected the depth model config"):
        load_depth_model(folder)


def test_non_square_image_size_is_refused(tiny_weights, tmp_path):
    folder = tmp_path / "depth"
    shutil.copytree(WeightsLayout(tiny_weights).depth, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_size": [64, 96]}))
    with pytest.raises(WeightsError, match="expected a square input size"):
        depth_image_size(folder)


def test_weights_without_depth_or_matting_build_without_those_engines(tiny_weights, tmp_path):
    """Published weights may lack depth/ and matting/: the keys are absent (the presence flags stages reads)."""
    root = tmp_path / "w"
    shutil.copytree(tiny_weights, root, ignore=shutil.ignore_patterns("depth", "matting", "elements"))
    built = build_engines("reposition", root)
    assert "depth_estimator" not in built.engines and "matting" not in built.engines
    assert estimators_from_engines(built.engines, "cpu", torch.float32) == (None, None)
    assert "depth_estimator" not in built.settings.specs


def test_full_config_is_dpt_large_on_the_meta_device():
    """`full` builds DPT-Large's real architecture: Intel/dpt-large's 343,030,465 parameters (no allocation)."""
    from transformers import DPTConfig, DPTForDepthEstimation

    from editrt.weights import load_config

    with torch.device("meta"):
        model = DPTForDepthEstimation(DPTConfig(**load_config("full")["depth"]["model"]))
    assert sum(p.numel() for p in model.parameters()) == 343_030_465
    assert model.config.image_size == 384 and model.config.hidden_size == 1024 and model.config.num_hidden_layers == 24


def test_depth_estimator_runs_an_fp16_engine_and_returns_float32(tiny_weights):
    """dtype is the engine's: inputs cast to it, the depth comes back float32 (bf16 here: CPU has no fp16 conv)."""
    from editrt.models.depth import DepthNet

    net = DepthNet(load_depth_model(WeightsLayout(tiny_weights).depth, torch.bfloat16))

    def engine(pixel_values):
        assert pixel_values.dtype == torch.bfloat16
        with torch.no_grad():
            return {"predicted_depth": net(pixel_values)}

    out = DepthEstimator(engine, 64, "cpu", torch.bfloat16)(_image((50, 70), seed=5))
    assert out.dtype == np.float32 and out.shape == (50, 70) and np.isfinite(out).all()


def test_cuda_graph_is_off_where_the_engine_cannot_be_captured(built, estimator):
    graphed = DepthEstimator(built.engines["depth_estimator"], 64, "cpu", torch.float32, cuda_graph=True)
    assert graphed.captured is None  # a CPU TorchEngine: supports_cuda_graph is False, so it runs eagerly
    rgb = _image((40, 90), seed=9)
    np.testing.assert_array_equal(graphed(rgb), estimator(rgb))


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_and_the_transformers_pipeline_on_cuda(tiny_weights):
    """A replay runs the captured kernels: bit-equal to the eager engine. Against transformers' pipeline on
    the same GPU (its own model instance): max relative 1e-5, as cuBLAS may choose other GEMM algorithms."""
    from transformers import pipeline

    built = build_engines("reposition", tiny_weights, device="cuda")
    engine = built.engines["depth_estimator"]
    eager = DepthEstimator(engine, 64, "cuda", torch.float32)
    graphed = DepthEstimator(engine, 64, "cuda", torch.float32, cuda_graph=True)
    peer = pipeline("depth-estimation", model=str(WeightsLayout(tiny_weights).depth), device="cuda")
    for i, shape in enumerate(SIZES):
        rgb = _image(shape, seed=i)
        out = graphed(rgb)
        np.testing.assert_array_equal(out, eager(rgb))
        reference = peer(Image.fromarray(rgb))["predicted_depth"].cpu().numpy()
        assert np.abs(out - reference).max() <= 1e-5 * np.abs(reference).max()
    assert graphed.captured.graph is not None
