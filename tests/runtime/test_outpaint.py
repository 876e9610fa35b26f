"""Outpainting (paper App. A.4): the canvas border generated with the complete prompt, the image kept.

Oracle: diffusers' StableDiffusionInpaintPipeline on the same canvas and border mask with
prompt_embeds = the complete prompt (negative = null). Tolerance: exact, as for inpainting
(tests/runtime/test_reposition_oracles.py): the same ops in the same order on CPU in fp32.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from editrt.errors import InputError
from editrt.runtime.outpaint import MAX_FACTOR, outpaint, pad_canvas


def crop(rng, h, w):
    """A real photo's crop of h x w at a random place."""
    photo = data.astronaut()
    y, x = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
    return np.ascontiguousarray(photo[y:y + h, x:x + w])


def test_outpaint_equals_diffusers_on_the_canvas(reposition, diffusers_pipe):
    rng = np.random.default_rng()  # new sizes, split and content every run
    canvas_h, canvas_w = (int(v) for v in rng.choice([48, 56, 64], 2))
    h, w = int(rng.integers(16, canvas_h - 7)), int(rng.integers(16, canvas_w - 7))
    left, top = int(rng.integers(0, canvas_w - w + 1)), int(rng.integers(0, canvas_h - h + 1))
    extend = [left, top, canvas_w - w - left, canvas_h - h - top]
    image = crop(rng, h, w)
    # resolution = the canvas' short side, both sides multiples of 8: no resize, diffusers sees the same canvas
    ours = np.asarray(outpaint(reposition, image, extend, steps=3, guidance=3.0, seed=4, resolution=min(canvas_h, canvas_w)))
    assert ours.shape == (canvas_h, canvas_w, 3)
    np.testing.assert_array_equal(ours[top:top + h, left:left + w], image)

    canvas, border = pad_canvas(image, tuple(extend), "edge")
    prompts = reposition.task_prompts
    theirs = np.asarray(diffusers_pipe(
        prompt_embeds=prompts["complete"][None], negative_prompt_embeds=prompts["null"][None],
        image=Image.fromarray(canvas), mask_image=Image.fromarray(border.astype(np.uint8) * 255),
        height=canvas_h, width=canvas_w, num_inference_steps=3, guidance_scale=3.0,
        generator=torch.Generator("cpu").manual_seed(4)).images[0])
    np.testing.assert_array_equal(ours[border], theirs[border])


def test_resized_canvas_keeps_the_original_bytes(reposition):
    image = data.chelsea()[::4, ::4].copy()  # 75 x 113: no side a multiple of 8
    extend = (5, 0, 17, 9)
    out = np.asarray(outpaint(reposition, image, extend, steps=2, seed=1, resolution=64))
    assert out.shape == (75 + 9, 113 + 5 + 17, 3)
    np.testing.assert_array_equal(out[0:75, 5:5 + 113], image)
    canvas, border = pad_canvas(image, extend, "edge")
    assert np.abs(out[border].astype(int) - canvas[border]).mean() > 1, "the border must be generated, not the fill"


def test_fill_only_reaches_the_model_through_resampling(reposition):
    """The UNet's condition has the border zeroed: fills differ only where a resize mixes them into the seam."""
    image = data.chelsea()[100:148, 200:240].copy()  # 48 x 40 -> a 64 x 64 canvas: no resize at resolution 64
    same = [np.asarray(outpaint(reposition, image, (8, 8, 16, 8), fill=f, steps=1, resolution=64))
            for f in ("edge", "reflect", "mean")]
    np.testing.assert_array_equal(same[0], same[1])
    np.testing.assert_array_equal(same[0], same[2])
    image = data.chelsea()[::4, ::4].copy()
    resized = [np.asarray(outpaint(reposition, image, (8, 0, 16, 8), fill=f, steps=1, resolution=64))
               for f in ("edge", "mean")]
    assert not np.array_equal(resized[0], resized[1])
    for out in resized:
        np.testing.assert_array_equal(out[0:75, 8:8 + 113], image)


def test_pad_canvas_fills():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    canvas, border = pad_canvas(image, (1, 2, 0, 1), "edge")
    assert canvas.shape == (5, 4, 3)
    expected = np.ones((5, 4), bool)
    expected[2:4, 1:4] = False  # the image at (left, top) = (1, 2)
    np.testing.assert_array_equal(border, expected)
    np.testing.assert_array_equal(canvas[2:4, 1:4], image)
    np.testing.assert_array_equal(canvas[0, 1:], image[0])  # above: the first row repeated
    np.testing.assert_array_equal(canvas[2:4, 0], image[:, 0])  # left: the first column repeated
    canvas, _ = pad_canvas(image, (0, 0, 2, 0), "reflect")
    np.testing.assert_array_equal(canvas[:, 3], image[:, 1])  # mirrored about the last column
    np.testing.assert_array_equal(canvas[:, 4], image[:, 0])
    canvas, border = pad_canvas(image, (1, 1, 1, 1), "mean")
    np.testing.assert_array_equal(canvas[border], np.tile(np.round(image.reshape(-1, 3).mean(0)), (border.sum(), 1)))


@pytest.mark.parametrize("extend,fill,match", [
    ([-1, 0, 0, 0], "edge", r"extend \[-1, 0, 0, 0\]: expected L,T,R,B, four non-negative integers"),
    ([1.5, 0, 0, 0], "edge", "four non-negative integers"),
    ([True, 0, 0, 0], "edge", "four non-negative integers"),
    ([1, 2, 3], "edge", "four non-negative integers"),
    ("8,8,8,8", "edge", "four non-negative integers"),
    (None, "edge", "four non-negative integers"),
    ([0, 0, 0, 0], "edge", "expected at least one side > 0"),
    ([0, 0, 3 * 40 + 1, 0], "edge", f"the canvas would be 161x30; expected at most {MAX_FACTOR}x the 40x30 image"),
    ([0, 3 * 30, 0, 1], "edge", "the canvas would be 40x121"),
    ([4, 4, 4, 4], "blur", "fill 'blur': expected one of edge, reflect, mean"),
])
def test_bad_input(reposition, extend, fill, match):
    with pytest.raises(InputError, match=match):
        outpaint(reposition, np.zeros((30, 40, 3), np.uint8), extend, fill=fill, steps=1)


def test_megapixel_limit(reposition, monkeypatch):
    import editrt.runtime.outpaint as module

    monkeypatch.setattr(module, "MAX_CANVAS_PIXELS", 2_000_000)
    with pytest.raises(InputError, match="the canvas would be 2000x1001; .* and 2 megapixels"):
        outpaint(reposition, np.zeros((1000, 1000, 3), np.uint8), [500, 1, 500, 0], steps=1)


def test_numpy_integers_are_accepted(reposition):
    image = data.chelsea()[:24, :32].copy()
    out = outpaint(reposition, image, np.array([8, 0, 0, 8]), steps=1, resolution=32)
    assert out.size == (40, 32)
    np.testing.assert_array_equal(np.asarray(out)[0:24, 8:40], image)


def test_the_size_limit_itself_is_accepted(reposition):
    image = data.chelsea()[:16, :8].copy()
    out = outpaint(reposition, image, [3 * 8, 0, 0, 3 * 16], steps=1, resolution=8)  # exactly 4x on each axis
    assert out.size == (32, 64)
    np.testing.assert_array_equal(np.asarray(out)[0:16, 24:32], image)
