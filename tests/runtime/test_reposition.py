"""The SEELE flow on a real photo: stages, byte-identity outside regenerated regions, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image
from runtime_doubles import box_mask, occlusion_scene

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
    result = reposition(photo, mask=subject, move=(50, 20), complete_mask=complete, occlusion=occluder,
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


# ---------------------------------------------------------------------- SEELE's pre/post-processing stages
class KnownMap:
    """Stands in for the depth network (or the matting network) with a map whose answer the test knows."""

    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self, rgb, trimap=None):
        self.calls += 1
        value = self.value(trimap) if callable(self.value) else self.value
        return np.array(value, np.float32)


def small_photo():
    from skimage import data

    return np.ascontiguousarray(data.chelsea()[100:164, 150:246])  # 64 x 96, a real photo


def scene():
    """Far wall (inverse depth 1), a near box (5), the subject (2): the box must hide the moved subject."""
    return occlusion_scene((64, 96), box=(20, 50, 60, 80), subject=(10, 40, 10, 35))


def test_occlusion_auto_hides_the_subject_exactly_where_the_box_is_nearer(reposition, monkeypatch, tmp_path):
    photo = small_photo()
    depth, box, subject = scene()
    monkeypatch.setattr(reposition, "depth_estimator", KnownMap(depth))
    complete = box_mask(photo.shape[:2], 15, 55, 45, 85)  # the user's completion region reaches over the box
    result = reposition(photo, mask=subject, move=(40, 5), occlusion="auto", complete_mask=complete, steps=1,
                        resolution=64)
    np.testing.assert_array_equal(result.stages["occluder"].mask, box)
    moved = np.roll(np.roll(subject, 5, 0), 40, 1)
    np.testing.assert_array_equal(result.stages["moved"].mask, moved & ~box)  # the hidden part is not pasted
    out = np.asarray(result.image)
    # The box stays the input's bytes: not pasted over, not completed, not harmonized.
    np.testing.assert_array_equal(out[box], photo[box])
    assert not (result.stages["completed"].mask & box).any() and not (result.stages["harmonized"].mask & box).any()
    assert (out[moved & ~box] != photo[moved & ~box]).any()
    written = {p.name for p in result.save_stages(tmp_path)}
    assert {"2_depth.png", "3_occluder_mask.png"} <= written
    with Image.open(tmp_path / "2_depth.png") as im:  # 16-bit, normalised inverse depth: the subject at 2 on [1, 5]
        assert im.mode.startswith("I") and np.asarray(im)[20, 20] == round(0.25 * 65535)
    # Without occlusion the same move pastes the subject over the box.
    plain = reposition(photo, mask=subject, move=(40, 5), harmonize=False, steps=1, resolution=64)
    np.testing.assert_array_equal(plain.stages["moved"].mask, moved)


def test_a_shadow_region_does_not_paint_over_the_occluder(reposition, monkeypatch):
    photo = small_photo()
    depth, box, subject = scene()
    monkeypatch.setattr(reposition, "depth_estimator", KnownMap(depth))
    region = box_mask(photo.shape[:2], 40, 60, 20, 90)  # the shadow's place reaches under the near box
    result = reposition(photo, mask=subject, move=(40, 5), occlusion="auto", new_shadow_region=region, steps=1,
                        resolution=64)
    assert not (result.stages["harmonized"].mask & box).any()
    np.testing.assert_array_equal(np.asarray(result.image)[box], photo[box])
    assert (result.stages["harmonized"].mask & region & ~box).any()  # the rest of the region is harmonized


def test_what_remove_regenerates_cannot_occlude(reposition, monkeypatch):
    """Depth bleeds past the subject's edge (a 1-px near ring, inside REMOVE's dilated void): those pixels are
    inpainted away, so they must not hide the moved subject."""
    from scipy import ndimage

    photo = small_photo()
    subject = box_mask(photo.shape[:2], 10, 40, 10, 35)
    depth = np.ones(photo.shape[:2], np.float32)
    depth[ndimage.binary_dilation(subject) & ~subject], depth[subject] = 5.0, 2.0
    monkeypatch.setattr(reposition, "depth_estimator", KnownMap(depth))
    result = reposition(photo, mask=subject, move=(3, 1), occlusion="auto", harmonize=False, steps=1, resolution=64)
    assert not result.stages["occluder"].mask.any()
    np.testing.assert_array_equal(result.stages["moved"].mask, np.roll(np.roll(subject, 1, 0), 3, 1))


def test_scale_auto_follows_the_footpoint_depth_and_an_explicit_scale_wins(reposition, monkeypatch):
    photo = small_photo()
    ground = np.repeat(np.arange(64, dtype=np.float32)[:, None], 96, axis=1)  # inverse depth = row
    estimator = KnownMap(ground)
    monkeypatch.setattr(reposition, "depth_estimator", estimator)
    subject = box_mask(photo.shape[:2], 30, 60, 40, 60)  # footpoint: row 59 (a 2-row band: rows 58, 59)
    result = reposition(photo, mask=subject, move=(5, -20), scale="auto", harmonize=False, steps=1, resolution=64)
    # median over the footpoint band: old (58 + 59) / 2 = 58.5, new 38.5; eps = 0.063 on both
    assert result.scale == pytest.approx(38.5 / 58.5, rel=2e-3)
    rows = np.nonzero(result.stages["moved"].mask)[0]
    assert rows.max() + 1 == 60 - 20  # the feet land where they were dropped
    assert "depth" in result.stages and estimator.calls == 1
    explicit = reposition(photo, mask=subject, move=(5, -20), scale=1.3, harmonize=False, steps=1, resolution=64)
    assert explicit.scale == 1.3 and estimator.calls == 1 and "depth" not in explicit.stages


def test_matting_blends_with_alpha_and_the_void_follows_it(reposition, monkeypatch):
    from editrt.runtime.estimators import trimap_from_mask
    from editrt.runtime.images import dilate
    from editrt.runtime.seele_stages import composite

    photo = small_photo()
    subject = box_mask(photo.shape[:2], 20, 44, 20, 44)
    matter = KnownMap(lambda trimap: np.full(trimap.shape, 0.5))  # the unknown band comes out half transparent
    monkeypatch.setattr(reposition, "matter", matter)
    result = reposition(photo, mask=subject, move=(30, 0), matting=True, trimap_band=3, harmonize=False, steps=1,
                        resolution=64)
    trimap = trimap_from_mask(subject, 3)
    np.testing.assert_array_equal(np.asarray(result.stages["trimap"].image), trimap)
    alpha = np.where(trimap == 255, 1.0, np.where(trimap == 128, 0.5, 0.0))
    np.testing.assert_array_equal(result.stages["alpha"].values, alpha)
    np.testing.assert_array_equal(result.stages["removed"].mask, dilate(trimap > 0, 1))  # alpha > 0, dilated
    moved_alpha = np.roll(alpha, 30, 1)
    removed, pasted = np.asarray(result.stages["removed"].image), np.asarray(result.stages["moved"].image)
    expected = composite(np.roll(photo, 30, 1), removed, moved_alpha)
    np.testing.assert_array_equal(pasted, expected)
    band = moved_alpha == 0.5
    assert (pasted[band] != np.roll(photo, 30, 1)[band]).any()  # a hard paste would copy the subject's pixels
    np.testing.assert_array_equal(result.stages["moved"].mask, moved_alpha > 0)
    again = reposition(photo, mask=subject, move=(10, 0), matting=True, trimap_band=3, harmonize=False, steps=1,
                       resolution=64, cache_key=("alpha-test", 1))
    reposition(photo, mask=subject, move=(12, 0), matting=True, trimap_band=3, harmonize=False, steps=1,
               resolution=64, cache_key=("alpha-test", 1))
    assert matter.calls == 2 and again.stages["alpha"].values is not None  # the second keyed call reused it
    assert any(k[0] == ("alpha-test", 1) for k in reposition.alphas._entries)
    reposition.forget("alpha-test")
    assert not any(k[0] == ("alpha-test", 1) for k in reposition.alphas._entries)


def test_shadow_moves_with_the_subject_and_a_shadow_region_is_harmonized(reposition):
    photo = small_photo()
    subject = box_mask(photo.shape[:2], 10, 40, 10, 30)
    shadow = box_mask(photo.shape[:2], 40, 46, 10, 40)  # the existing shadow at its feet
    region = (60, 50, 90, 58)  # where a shadow should appear (x0, y0, x1, y1)
    result = reposition(photo, mask=subject, move=(40, 0), existing_shadow=shadow, new_shadow_region=region, steps=1,
                        resolution=64)
    assert result.stages["removed"].mask[shadow].all()  # the old shadow is removed with the subject
    moved_shadow = np.roll(shadow, 40, 1)
    np.testing.assert_array_equal(result.stages["completed"].mask, moved_shadow)  # regenerated with the complete prompt
    area = box_mask(photo.shape[:2], 50, 58, 60, 90)
    np.testing.assert_array_equal(result.stages["new_shadow_region"].mask, area)
    assert result.stages["harmonized"].mask[area].all()
    assert result.stages["output"].mask[area].all()


@pytest.mark.parametrize("kwargs,match,field", [
    (dict(new_shadow_region=(200, 0, 300, 10)), r"new_shadow_region box \(200, 0, 300, 10\): empty after clipping",
     "new_shadow_region"),
    (dict(new_shadow_region=np.ones((10, 10), bool)), "new_shadow_region: size 10x10 differs from the image size 96x64",
     "new_shadow_region"),
    (dict(new_shadow_region=(0, 0, 10, 10), harmonize=False), "new_shadow_region: the shadow is generated by the "
     "harmonizer", "new_shadow_region"),
    (dict(scale="auto"), "scale auto: needs depth weights", "scale"),
    (dict(occlusion="auto"), "occlusion auto: needs depth weights", "occlusion"),
    (dict(occlusion="maybe"), "occlusion: expected 'none', 'auto' or a mask", "occlusion"),
    (dict(scale="big"), "scale: expected a number in", "scale"),
    (dict(matting=True), "matting: needs matting weights", "matting"),
    (dict(trimap_band=3), "trimap_band: only with matting on", "trimap_band"),
    (dict(existing_shadow=np.zeros((64, 96), bool)), "existing_shadow: is empty", "existing_shadow"),
    (dict(shadow_mask=np.zeros((64, 96), bool)), "existing_shadow: is empty", "existing_shadow"),  # older spelling
    (dict(occlusion=np.ones((64, 96), bool), occluder_mask=np.ones((64, 96), bool)), "occlusion: given twice",
     "occlusion"),
])
def test_stage_options_bad_input(reposition, monkeypatch, kwargs, match, field):
    monkeypatch.setattr(reposition, "depth_estimator", None)
    monkeypatch.setattr(reposition, "matter", None)
    calls = []
    monkeypatch.setattr(reposition, "_regenerate", lambda *a, **k: calls.append(a))
    with pytest.raises(InputError, match=match) as info:
        reposition(small_photo(), mask=box_mask((64, 96), 10, 40, 10, 30), move=(5, 0), steps=1, **kwargs)
    assert "\n" not in str(info.value) and calls == []  # refused before any network ran
    assert info.value.field == field


def test_trimap_band_larger_than_the_subject(reposition, monkeypatch):
    monkeypatch.setattr(reposition, "matter", KnownMap(lambda trimap: np.zeros(trimap.shape)))
    with pytest.raises(InputError, match="trimap band 9: larger than the subject"):
        reposition(small_photo(), mask=box_mask((64, 96), 10, 20, 10, 20), move=(5, 0), matting=True, trimap_band=9,
                   steps=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_seele_stages_on_cuda(tiny_weights, photo, dtype):
    """Depth and matting run on the GPU in low precision: the stages come out finite and in range, and the
    output keeps the input's bytes outside what was regenerated."""
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights, device="cuda", dtype=dtype)
    subject = ellipse(photo.shape[:2], 150, 200, 50, 60)
    result = pipe(photo, mask=subject, move=(40, 15), occlusion="auto", scale="auto", matting=True,
                  new_shadow_region=(190, 215, 320, 235), steps=2, resolution=64)
    for name in ("depth", "alpha"):
        values = result.stages[name].values
        assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1
    assert 0.25 <= result.scale <= 4.0
    out, regenerated = np.asarray(result.image), result.stages["output"].mask
    np.testing.assert_array_equal(out[~regenerated], photo[~regenerated])


def test_an_occluder_hiding_the_whole_moved_subject_is_refused(reposition, monkeypatch):
    depth, box, subject = scene()
    monkeypatch.setattr(reposition, "depth_estimator", KnownMap(depth))
    small = box_mask(depth.shape, 12, 22, 12, 22)  # moved by (55, 15) it lands entirely on the near box
    depth[small] = 2.0
    with pytest.raises(InputError, match=r"occlusion: the occluder hides the whole subject moved by \(55, 15\)"):
        reposition(small_photo(), mask=small, move=(55, 15), occlusion="auto", steps=1)
