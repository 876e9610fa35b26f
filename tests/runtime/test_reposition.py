"""The SEELE flow on a real photo: stages, byte-identity outside regenerated regions, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from editrt.errors import EditError, InputError
from editrt.runtime.images import read_watermark, save_png


def ellipse(shape, cy, cx, ry, rx):
    y, x = np.ogrid[:shape[0], :shape[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def test_reposition_real_photo_with_stages(reposition, photo, tmp_path):
    subject = ellipse(photo.shape[:2], 150, 200, 60, 80)
    complete = ellipse(photo.shape[:2], 240, 260, 20, 30)
    occluder = np.zeros(photo.shape[:2], bool)
    occluder[:, 300:310] = True
    result = reposition(photo, mask=subject, move=(50, 20), complete_mask=complete, occluder_mask=occluder,
                        steps=3, seed=1, resolution=128)
    out = np.asarray(result.image)
    assert out.shape == photo.shape and out.dtype == np.uint8
    assert list(result.stages) == ["input", "subject", "removed", "moved", "completed", "harmonized", "output"]
    regenerated = result.stages["output"].mask
    # Outside the regenerated regions (their dilated masks) the input bytes are untouched.
    np.testing.assert_array_equal(out[~regenerated], photo[~regenerated])
    assert (out[regenerated] != photo[regenerated]).any()
    # The moved subject is pasted with its own pixels, except where the occluder hides it.
    visible = result.stages["moved"].mask
    moved = np.zeros_like(subject)
    moved[20:, 50:] = subject[:-20, :-50]
    np.testing.assert_array_equal(visible, moved & ~occluder)
    moved_stage = np.asarray(result.stages["moved"].image)
    np.testing.assert_array_equal(moved_stage[visible], np.roll(np.roll(photo, 20, 0), 50, 1)[visible])
    written = result.save_stages(tmp_path / "stages")
    assert {p.name for p in written} >= {"0_input.png", "1_subject_mask.png", "2_removed.png", "5_harmonized.png", "6_output.png"}
    assert Image.open(tmp_path / "stages" / "6_output.png").text["Software"].startswith("editrt")


def test_reposition_from_a_click_scaled_without_harmonize(reposition, photo):
    result = reposition(photo, points=[[200, 150]], move=(-30, 5), scale=0.8, harmonize=False, steps=2, resolution=64)
    assert "harmonized" not in result.stages and result.stages["subject"].mask.any()
    out, regenerated = np.asarray(result.image), result.stages["output"].mask
    np.testing.assert_array_equal(out[~regenerated], photo[~regenerated])


def test_inpaint_at_other_size_keeps_outside_bytes(reposition, photo):
    mask = ellipse(photo.shape[:2], 100, 100, 30, 50)
    out = np.asarray(reposition.inpaint(photo, mask, task="complete", steps=2, resolution=96))
    np.testing.assert_array_equal(out[~mask], photo[~mask])
    assert (out[mask] != photo[mask]).any()


@pytest.mark.parametrize("call,match", [
    (lambda p, img, m: p.inpaint(img, np.zeros(img.shape[:2], bool)), "mask: is empty"),
    (lambda p, img, m: p.inpaint(img, m[:-1]), "mask: size 451x299 differs from the image size 451x300"),
    (lambda p, img, m: p.inpaint(img, m, task="erase"), "task: expected 'remove' or 'complete'"),
    (lambda p, img, m: p.inpaint(img, m, steps=0), "steps: expected a positive integer"),
    (lambda p, img, m: p.inpaint(img, m, resolution=100), "resolution: expected a positive multiple of 8"),
    (lambda p, img, m: p.inpaint(img.astype(np.float32), m), "image: expected a uint8 array"),
    (lambda p, img, m: p.segment(img, points=[[451, 10]]), r"point \(451, 10\): outside the image"),
    (lambda p, img, m: p.segment(img, points=[[-1, 10]]), "outside the image"),
    (lambda p, img, m: p.segment(img, box=[10, 10, 500, 100]), "box .*: expected x0 < x1, y0 < y1 inside the image"),
    (lambda p, img, m: p.segment(img, box=[50, 10, 20, 100]), "box"),
    (lambda p, img, m: p.segment(img), "expected at least one point or a box"),
    (lambda p, img, m: p(img, mask=m, move=(1000, 0), steps=1), "puts the whole subject outside the image"),
    (lambda p, img, m: p(img, mask=m, move=(0, 0), scale=0, steps=1), "scale: expected"),
    (lambda p, img, m: p(img, mask=m, move="left", steps=1), "move: expected"),
    (lambda p, img, m: p(img, mask=m, move=(1, 1), complete_mask=m[:, :10], steps=1), "complete_mask: size"),
])
def test_bad_input_raises_one_clear_error(reposition, photo, call, match):
    mask = ellipse(photo.shape[:2], 150, 200, 40, 40)
    with pytest.raises(InputError, match=match) as info:
        call(reposition, photo, mask)
    assert isinstance(info.value, EditError) and "\n" not in str(info.value)


def test_provenance_chunk_and_invisible_watermark(tmp_path, photo):
    path = save_png(photo, tmp_path / "plain.png")
    with Image.open(path) as im:
        assert "editrt" in im.text["Comment"] and np.array_equal(np.asarray(im), photo)
    path = save_png(photo, tmp_path / "marked.png", watermark=True)
    marked = np.asarray(Image.open(path))
    assert (marked != photo).any(axis=2).mean() > 0.5  # documented: it touches every region of the image
    assert read_watermark(marked) == b"editrt"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_regenerates_a_sane_region(tiny_weights, dtype):
    """fp16 / bf16 inside the mask: the decoder's raw output is finite and in range before the clamp
    (an fp16 overflow gives inf/NaN there, which the uint8 conversion would hide), the region is not
    flat, and it stays near the fp32 pipeline's result (same seed, same noise).

    Bounds: mean |low - fp32| inside the mask <= 4 of 255 levels (measured on the tiny weights:
    ~0.75 bf16, ~0.1 fp16: rounding of the weights and activations); standard deviation inside
    > 10 levels (measured ~57; a constant or near-constant fill gives < 1).
    """
    from runtime_doubles import CapturingEngine

    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights, dtype=dtype)
    reference = RepositionPipeline.from_pretrained(tiny_weights)
    assert pipe.unet.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    decoder = pipe.engines["vae_decoder"] = CapturingEngine(pipe.engines["vae_decoder"])
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = ellipse((64, 64), 30, 30, 10, 14)
    for run in (lambda p: p.inpaint(image, mask, steps=2, guidance=2.0, resolution=64),
                lambda p: p.harmonize(image, mask, steps=1, resolution=64)):
        out = np.asarray(run(pipe))
        raw = decoder.outputs[-1]["image"]
        assert torch.isfinite(raw).all() and raw.abs().max() < 4.0  # [-1, 1] nominal; clamped after
        np.testing.assert_array_equal(out[~mask], image[~mask])
        inside = out[mask].astype(float)
        assert inside.std() > 10.0  # not a constant fill
        expected = np.asarray(run(reference))[mask].astype(float)
        assert np.abs(inside - expected).mean() <= 4.0
