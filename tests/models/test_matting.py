"""Matting (ViTMatte): Matter on the torch backend against transformers' VitMatteImageProcessor +
VitMatteForImageMatting on the same folder (the oracle), bit for bit (the same ops in the same order:
(x - 127.5) / 127.5, trimap x (1/255), zero padding to multiples of 32); trimap_from_mask against
scipy.ndimage's binary erosion / dilation; bad input.
"""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from skimage import data

from editrt.errors import InputError, WeightsError
from editrt.models.components import WeightsLayout
from editrt.models.matting import MattingNet, load_matting_model
from editrt.runtime.engines import TorchEngine
from editrt.runtime.estimators import Matter, trimap_from_mask

SIZES = [(77, 130), (130, 77), (64, 96), (33, 31), (300, 451)]  # odd, portrait, already padded, just over 32, photo


@pytest.fixture(scope="module")
def folder(tiny_weights):
    return WeightsLayout(tiny_weights).matting


@pytest.fixture(scope="module")
def oracle(folder):
    from transformers import VitMatteForImageMatting, VitMatteImageProcessor

    return VitMatteImageProcessor.from_pretrained(folder), VitMatteForImageMatting.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def matter(tiny_weights, folder):
    """The torch backend's matting engine, as build_engines makes it (the same TorchEngine over MattingNet)."""
    from editrt.runtime.backends import editor_settings

    spec = editor_settings(tiny_weights, "inpaint").specs["matting"]
    return Matter(TorchEngine(spec, MattingNet(load_matting_model(folder)), "cpu"), "cpu", torch.float32)


def _photo(shape):
    return np.asarray(Image.fromarray(data.coffee()).resize((shape[1], shape[0]), Image.BICUBIC)).copy()


def _subject(shape):
    """An ellipse mask, off-centre, so the trimap has all three levels at any of SIZES."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return ((yy - 0.45 * shape[0]) / (0.3 * shape[0])) ** 2 + ((xx - 0.55 * shape[1]) / (0.3 * shape[1])) ** 2 <= 1


@pytest.mark.parametrize("shape", SIZES)
def test_alpha_equals_vitmatte_bit_for_bit(matter, oracle, shape):
    processor, model = oracle
    rgb, trimap = _photo(shape), trimap_from_mask(_subject(shape), 3)
    inputs = processor(images=rgb, trimaps=trimap, return_tensors="pt")
    assert torch.equal(matter.preprocess(rgb, trimap), inputs["pixel_values"])
    with torch.no_grad():
        expected = model(**inputs).alphas[0, 0, :shape[0], :shape[1]].numpy()  # cropped back to the image
    alpha = matter(rgb, trimap)
    assert alpha.dtype == np.float32 and alpha.shape == shape
    np.testing.assert_array_equal(alpha, expected)
    assert 0 <= alpha.min() and alpha.max() <= 1


def test_random_weights_give_an_alpha_that_varies(matter):
    """`editrt weights init`'s random ViTMatte is not stuck at sigmoid(0) = 0.5 (models/depth.py
    keep_activations_unit_scale): otherwise every comparison here would compare constants."""
    alpha = matter(_photo((96, 128)), trimap_from_mask(_subject((96, 128)), 4))
    assert alpha.std() > 0.02 and alpha.max() - alpha.min() > 0.1


def test_padding_is_zeros_at_the_bottom_right(matter):
    x = matter.preprocess(_photo((33, 70)), trimap_from_mask(_subject((33, 70)), 2))
    assert x.shape == (1, 4, 64, 96)
    assert not x[..., 33:, :].any() and not x[..., :, 70:].any() and x[..., :33, :70].abs().sum() > 0


@pytest.mark.parametrize("bad_trimap, what", [
    (np.zeros((10, 11), np.uint8), r"trimap: expected uint8 \[10, 12\]"),
    (np.zeros((10, 12), np.float32), "trimap: expected uint8"),
    ([[0]], "trimap: expected uint8"),
])
def test_bad_trimaps_are_one_line_input_errors(matter, bad_trimap, what):
    with pytest.raises(InputError, match=what) as e:
        matter(np.zeros((10, 12, 3), np.uint8), bad_trimap)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------- trimap_from_mask
def _scipy_trimap(mask, band):
    """The documented geometry, computed by scipy.ndimage: a (2 band + 1)^2 square; outside the image is
    foreground for the erosion (border_value=1) and background for the dilation (border_value=0)."""
    square = np.ones((2 * band + 1, 2 * band + 1), bool)
    eroded = ndimage.binary_erosion(mask, structure=square, border_value=1)
    dilated = ndimage.binary_dilation(mask, structure=square, border_value=0)
    expected = np.zeros(mask.shape, np.uint8)
    expected[dilated] = 128
    expected[eroded] = 255
    return expected


def _masks():
    rng = np.random.default_rng(0)
    blobs = ndimage.gaussian_filter(rng.standard_normal((77, 130)), 6) > 0.02  # several irregular pieces
    edge = np.zeros((60, 90), bool)
    edge[:35, 50:] = True  # cut by the top and right edges of the frame
    holes = _subject((101, 64))
    holes[40:46, 25:33] = False  # a hole inside the subject
    return {"blobs": blobs, "edge": edge, "holes": holes, "ellipse": _subject((300, 451))}


@pytest.mark.parametrize("name", ["blobs", "edge", "holes", "ellipse"])
@pytest.mark.parametrize("band", [1, 2, 5])
def test_trimap_equals_scipy_erosion_and_dilation(name, band):
    mask = _masks()[name]
    trimap = trimap_from_mask(mask, band)
    assert trimap.dtype == np.uint8 and trimap.shape == mask.shape
    assert set(np.unique(trimap)) == {0, 128, 255}
    np.testing.assert_array_equal(trimap, _scipy_trimap(mask, band))


def test_a_subject_cut_by_the_frame_stays_foreground_at_the_frame():
    trimap = trimap_from_mask(_masks()["edge"], 4)
    assert (trimap[0, 60:85] == 255).all() and (trimap[:25, -1] == 255).all()
    assert (trimap[35:39, 60] == 128).all() and trimap[39, 60] == 0  # the band is 4 px outside the subject
    assert (trimap[31:35, 60] == 128).all() and trimap[30, 60] == 255  # and 4 px inside: 2 x band across the edge


def test_a_band_larger_than_the_subject_is_a_one_line_error():
    mask = np.zeros((50, 50), bool)
    mask[20:27, 10:40] = True  # 7 px thick: band 3 keeps its middle row, band 4 erodes it away
    assert (trimap_from_mask(mask, 3) == 255).sum() == 30 - 6
    with pytest.raises(InputError, match="trimap band 4: larger than the subject") as e:
        trimap_from_mask(mask, 4)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mask, band, what", [
    (np.zeros((8, 8), bool), 2, "mask: empty"),
    (np.ones((8, 8), np.uint8), 2, "mask: expected a bool array"),
    (np.ones((2, 8, 8), bool), 2, "mask: expected a bool array"),
    (np.ones((8, 8), bool), 0, "trimap band 0: expected a whole number"),
    (np.ones((8, 8), bool), 1.5, "trimap band 1.5: expected a whole number"),
    (np.ones((8, 8), bool), True, "trimap band True: expected a whole number"),
])
def test_bad_masks_and_bands_are_input_errors(mask, band, what):
    with pytest.raises(InputError, match=what):
        trimap_from_mask(mask, band)


# ---------------------------------------------------------------------- the folder
def test_missing_or_corrupt_matting_files_are_one_line_weights_errors(folder, tmp_path):
    copy = tmp_path / "matting"
    shutil.copytree(folder, copy)
    (copy / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(WeightsError, match="cannot load the matting model") as e:
        load_matting_model(copy)
    assert "\n" not in str(e.value)
    (copy / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors; expected the matting model weights"):
        load_matting_model(copy)


def test_full_config_is_vitmatte_s_on_the_meta_device():
    """`full` builds ViTMatte-S (hustvl/vitmatte-small-composition-1k): 25,814,753 parameters (no allocation)."""
    from transformers import VitDetConfig, VitMatteConfig, VitMatteForImageMatting

    from editrt.weights import load_config

    cfg = load_config("full")["matting"]
    with torch.device("meta"):
        model = VitMatteForImageMatting(VitMatteConfig(backbone_config=VitDetConfig(**cfg["backbone"]), **cfg["model"]))
    assert sum(p.numel() for p in model.parameters()) == 25_814_753
