"""Opt-in (`pytest -m slow`): the `full` config is the real architectures, and its weights load and run.

Writes ~9 GB of random weights (SD-2 inpainting UNet + VAE, SAM ViT-B, SD-1.5 UNet + VAE, CLIP ViT-L text
encoder) and runs one short pass of each editor on the CPU (minutes).
"""
import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_weights(tmp_path_factory):
    from editrt.weights import init_weights

    return init_weights(tmp_path_factory.mktemp("full") / "w", "full", seed=0)


def test_full_architectures(full_weights):
    unet = json.loads((full_weights / "inpaint" / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 9 and unet["cross_attention_dim"] == 1024 and unet["sample_size"] == 64
    assert unet["attention_head_dim"] == [5, 10, 20, 20] and unet["use_linear_projection"] is True
    assert json.loads((full_weights / "sam" / "config.json").read_text())["architecture"] == "vit_b"
    sd15 = json.loads((full_weights / "elements" / "unet" / "config.json").read_text())
    assert sd15["cross_attention_dim"] == 768 and sd15["block_out_channels"] == [320, 640, 1280, 1280]
    from segment_anything import sam_model_registry

    from editrt.models.sam import load_sam

    ours = load_sam(full_weights / "sam")
    reference = sam_model_registry["vit_b"]()  # segment-anything's own ViT-B builder
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in reference.state_dict().items()]


def test_full_reposition_and_elements_run(full_weights):
    from skimage import data

    from editrt.runtime.elements_pipeline import ElementsPipeline
    from editrt.runtime.reposition import RepositionPipeline

    photo = data.chelsea()
    mask = np.zeros(photo.shape[:2], bool)
    mask[100:200, 150:260] = True
    pipe = RepositionPipeline.from_pretrained(full_weights)
    result = pipe(photo, mask=mask, move=(40, 0), steps=1, resolution=256)
    out = np.asarray(result.image)
    np.testing.assert_array_equal(out[~result.stages["output"].mask], photo[~result.stages["output"].mask])
    elements_pipe = ElementsPipeline.from_pretrained(full_weights)
    elements = elements_pipe.partition(photo, resolution=256)
    assert len(elements) == 16 * 16  # the default 16x16 query grid
    assert elements.image_size == photo.shape[:2] and elements.paint().shape == photo.shape[:2]
    image = elements_pipe.decode(elements, steps=1)
    assert image.size == (photo.shape[1], photo.shape[0])  # rendered back at the photo's size
    assert torch.isfinite(elements_pipe.element_tokens(elements)).all()


def test_full_export_sd2_unet_and_sam_vit_b(full_weights, tmp_path):
    """The real SD-2 UNet (over 2 GB in fp32: external data) and SAM ViT-B export and match PyTorch (<= 1e-4)."""
    from editrt.export.components import export_components

    results = export_components(full_weights, ["inpaint_unet", "sam_image_encoder"], tmp_path, check=True)
    assert all(r.max_rel_error <= 1e-4 for r in results)
    assert (tmp_path / "inpaint_unet.onnx.data").stat().st_size > 2**31


def test_full_depth_is_dpt_large_and_matting_is_vitmatte_s_equal_to_transformers(full_weights):
    """DPT-Large (343,030,465 parameters, 384 x 384) and ViTMatte-S (25,814,753) load from the folder and,
    through editrt's estimators on the torch backend, equal transformers' own pipeline / processor + model
    bit for bit on a real photo."""
    from PIL import Image
    from skimage import data
    from transformers import VitMatteForImageMatting, VitMatteImageProcessor, pipeline

    from editrt.models.components import WeightsLayout
    from editrt.runtime.backends import build_engines
    from editrt.runtime.estimators import estimators_from_engines, trimap_from_mask

    layout = WeightsLayout(full_weights)
    built = build_engines("reposition", full_weights)
    depth, matter = estimators_from_engines(built.engines, "cpu", torch.float32)
    nets = built.engines
    assert sum(p.numel() for p in nets["depth_estimator"]._module.parameters()) == 343_030_465
    assert sum(p.numel() for p in nets["matting"]._module.parameters()) == 25_814_753
    assert depth.image_size == 384
    photo = data.chelsea()
    peer = pipeline("depth-estimation", model=str(layout.depth), device="cpu")
    np.testing.assert_array_equal(depth(photo), peer(Image.fromarray(photo))["predicted_depth"].numpy())
    mask = np.zeros(photo.shape[:2], bool)
    mask[60:250, 120:330] = True
    trimap = trimap_from_mask(mask, 8)
    processor = VitMatteImageProcessor.from_pretrained(layout.matting)
    model = VitMatteForImageMatting.from_pretrained(layout.matting).eval()
    with torch.no_grad():
        expected = model(**processor(images=photo, trimaps=trimap, return_tensors="pt")).alphas[0, 0, :300, :451]
    np.testing.assert_array_equal(matter(photo, trimap), expected.numpy())


def test_full_export_depth_and_matting(full_weights, tmp_path):
    """DPT-Large and ViTMatte-S export and match PyTorch (<= 1e-4; matting checked at other multiples of 32)."""
    from editrt.export.components import export_components

    results = export_components(full_weights, ["depth_estimator", "matting"], tmp_path, check=True)
    assert [r.name for r in results] == ["depth_estimator", "matting"]
    assert all(r.max_rel_error <= 1e-4 for r in results)
