"""SEELE's training masks (paper 000 Sec. 3.2) and the samples built from them, drawn from (seed, index)."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from editrt.runtime.images import dilate
from editrt.train.masks import complete_mask, remove_mask, shift
from editrt.train.samples import InversionSamples, sample_rng


def _scene():
    """A 48x64 frame: an ellipse (the object) and a box (another object); most of it is background."""
    y, x = np.ogrid[:48, :64]
    obj = ((y - 14) / 8.0) ** 2 + ((x - 16) / 10.0) ** 2 <= 1.0
    other = np.zeros((48, 64), bool)
    other[30:44, 40:60] = True
    return obj, other


@pytest.mark.parametrize("seed", range(8))
def test_remove_mask_is_the_object_shape_displaced_over_background(seed):
    obj, other = _scene()
    occupied = obj | other
    r = remove_mask(obj, occupied, np.random.default_rng(seed))
    dy, dx = r.offset
    assert (dy, dx) != (0, 0)  # displaced
    assert r.mask.sum() == obj.sum()  # the whole shape, nothing cut by the frame
    assert np.array_equal(shift(r.mask, -dy, -dx), obj)  # exactly the object's shape, translated
    assert r.occupied_pixels == 0 and not (r.mask & occupied).any()  # over background only


def test_remove_mask_moves_the_object_even_in_a_tight_frame():
    obj = np.zeros((10, 10), bool)
    obj[:9, :9] = True  # offsets in {0, 1} x {0, 1}: (0, 0) is a quarter of the draws
    everywhere = np.ones_like(obj)  # no free place: every offset ties, and (0, 0) must still lose
    for seed in range(32):
        r = remove_mask(obj, everywhere, np.random.default_rng(seed))
        assert r.offset != (0, 0) and np.array_equal(shift(r.mask, -r.offset[0], -r.offset[1]), obj)


def test_remove_mask_takes_the_least_occupied_place_when_no_place_is_free():
    obj = np.zeros((20, 20), bool)
    obj[2:8, 2:8] = True
    occupied = np.ones((20, 20), bool)
    occupied[10:20, 10:20] = False  # free only in the lower-right quarter, partly reachable
    r = remove_mask(obj, occupied, np.random.default_rng(0), tries=64)
    assert np.array_equal(shift(r.mask, -r.offset[0], -r.offset[1]), obj)
    assert r.occupied_pixels == int((r.mask & occupied).sum()) == 0


def _u_shape():
    """A non-convex object: a cut across it can leave two pieces, of which the part keeps one."""
    obj = np.zeros((40, 40), bool)
    obj[5:35, 5:12] = obj[5:35, 28:35] = obj[28:35, 5:35] = True
    return obj


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("shape", ["ellipse", "u"])
def test_complete_mask_is_a_connected_part_of_the_object_dilated(seed, shape):
    obj = _scene()[0] if shape == "ellipse" else _u_shape()
    c = complete_mask(obj, np.random.default_rng(seed), max_radius=3)
    assert c.part.any() and not (c.part & ~obj).any()  # a part of the object
    assert c.part.sum() < obj.sum()  # a part, not the whole (the kept fraction is at most 0.8)
    assert ndimage.label(c.part)[1] == 1  # contiguous
    assert 0 <= c.radius <= 3
    assert np.array_equal(c.mask, dilate(c.part, c.radius))  # randomly dilated (radius 0: the part itself)


def test_complete_mask_draws_vary_part_and_radius():
    obj, _ = _scene()
    draws = [complete_mask(obj, np.random.default_rng(s), max_radius=3) for s in range(16)]
    assert len({d.radius for d in draws}) > 1
    assert len({int(d.part.sum()) for d in draws}) > 8


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_samples_are_functions_of_seed_and_index(plain_dataset):
    from editrt.train.data import check_plain

    records = check_plain(plain_dataset)
    make = lambda seed: InversionSamples(records, "remove", 32, seed, 0, (4, 4, 4), 1000)  # noqa: E731
    a, b = make(0), make(0)
    assert _same(a[5], b[5])  # the same (seed, index): the same image, crop, mask, t and noises
    assert _same(a[5], make(0)[5]) and not _same(a[5], a[6]) and not _same(a[5], make(1)[5])
    s = a[5]
    assert s["image"].shape == (3, 32, 32) and s["mask"].shape == (1, 32, 32)
    assert s["noise"].shape == (4, 4, 4) and s["posterior_noise"].shape == (2, 4, 4, 4)
    assert 0 <= int(s["timestep"]) < 1000 and s["mask"].sum() > 0
    # the same image (validation sample i shows image i % 6), another index: other draws
    val = InversionSamples(records, "remove", 32, 0, 1, (4, 4, 4), 1000)
    assert not _same(val[0], val[6])
    # the stream's generator is (seed, stream, index): another stream draws other samples
    assert not _same(s, InversionSamples(records, "remove", 32, 0, 1, (4, 4, 4), 1000)[5])
    assert sample_rng(0, 0, 5).integers(1 << 30) == sample_rng(0, 0, 5).integers(1 << 30)


def test_each_pass_over_the_data_visits_every_training_image_once(plain_dataset):
    from editrt.train.samples import epoch_image

    for epoch in range(3):
        assert sorted(epoch_image(0, epoch * 6 + i, 6) for i in range(6)) == list(range(6))
