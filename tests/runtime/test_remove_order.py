"""SeeleEdit.remove_order: the cached order (REMOVE on the unmoved image, paste after) and SEELE's paper order
(paste first, REMOVE with the moved subject in view). 64 px, 2 steps, harmonize off: the REMOVE pass's own
input is read off the VAE encoder (its `image` is the masked condition at the processing size, here 64)."""
import numpy as np
import pytest
from runtime_doubles import CountingEngine, box_mask

from editrt.errors import InputError
from editrt.runtime.edits import Quality, SeeleEdit
from editrt.runtime.images import dilate

MOVE = (16, 4)


class EncoderInputs(CountingEngine):
    """Keeps each call's `image` input (the condition the pass is encoded from), as uint8-scale numbers."""

    def __init__(self, engine):
        super().__init__(engine, [], "vae_encoder")
        self.images = []

    def __call__(self, **inputs):
        self.images.append((inputs["image"][0].float().cpu().numpy().transpose(1, 2, 0) + 1) * 127.5)
        return super().__call__(**inputs)


@pytest.fixture
def scene(photo):
    rgb = np.ascontiguousarray(photo[100:164, 150:214])
    return rgb, box_mask(rgb.shape[:2], 20, 40, 10, 30)


@pytest.fixture
def encoder(reposition):
    original = reposition.engines["vae_encoder"]
    spy = reposition.engines["vae_encoder"] = EncoderInputs(original)
    try:
        yield spy
    finally:
        reposition.engines["vae_encoder"] = original


def run(pipe, rgb, subject, order):
    return pipe(rgb, SeeleEdit(move=MOVE, harmonize=False, remove_order=order), mask=subject,
                quality=Quality(steps=2, resolution=64))


def test_paper_order_removes_with_the_moved_subject_in_view(reposition, scene, encoder):
    rgb, subject = scene
    result = run(reposition, rgb, subject, "paper")
    assert list(result.stages) == ["input", "subject", "moved", "removed", "output"]
    visible, void = result.stages["moved"].mask, result.stages["removed"].mask
    moved = np.roll(np.roll(rgb, MOVE[1], 0), MOVE[0], 1)
    np.testing.assert_array_equal(visible, np.roll(np.roll(subject, MOVE[1], 0), MOVE[0], 1))
    # the void is the dilated subject less the moved subject, which stays in view and is not regenerated
    np.testing.assert_array_equal(void, dilate(subject, 1) & ~visible)
    [condition] = encoder.images  # one pass: REMOVE
    np.testing.assert_allclose(condition[visible], moved[visible], atol=1e-3)
    out = np.asarray(result.image)
    np.testing.assert_array_equal(out[visible], moved[visible])  # pasted crisp, not through the VAE
    np.testing.assert_array_equal(out[~(void | visible)], rgb[~(void | visible)])


def test_cached_order_removes_on_the_unmoved_image(reposition, scene, encoder):
    rgb, subject = scene
    result = run(reposition, rgb, subject, "cached")
    assert list(result.stages) == ["input", "subject", "removed", "moved", "output"]
    visible, void = result.stages["moved"].mask, result.stages["removed"].mask
    [condition] = encoder.images
    seen = visible & ~void  # where the moved subject lands outside the void: the REMOVE pass sees the background
    assert seen.any()
    np.testing.assert_allclose(condition[seen], rgb[seen], atol=1e-3)
    # the same as the public inpaint pass on the dilated subject, with the moved subject pasted over it
    removed = np.asarray(reposition.inpaint(rgb, dilate(subject, 1), "remove", steps=2, resolution=64)).copy()
    removed[visible] = np.roll(np.roll(rgb, MOVE[1], 0), MOVE[0], 1)[visible]
    np.testing.assert_array_equal(np.asarray(result.image), removed)
    assert SeeleEdit().remove_order == "cached"


def test_the_orders_differ_and_the_bad_one_is_named(reposition, scene):
    rgb, subject = scene
    paper, cached = (np.asarray(run(reposition, rgb, subject, o).image) for o in ("paper", "cached"))
    assert (paper != cached).any()
    with pytest.raises(InputError, match="remove_order: expected one of cached, paper, got 'first'") as e:
        SeeleEdit(remove_order="first")
    assert e.value.field == "remove_order"
