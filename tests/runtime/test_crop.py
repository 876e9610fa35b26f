"""Region crops (runtime/crop.py) against diffusers' own `padding_mask_crop`.

Tolerance: exact. crop_size="processing" runs the same PIL crop / fill-resize / binarize / crop-resize
/ overlay operations as diffusers 0.42.1's VaeImageProcessor and the same denoising ops as its
StableDiffusionInpaintPipeline (tests/runtime/test_reposition_oracles.py holds the uncropped pass to it
bit for bit), on the same tiny weights, prompt embeddings and generator seed, so fp32 results on the
CPU are byte-identical; any difference means the crop, the resampling or the paste diverged.
"""
import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from editrt.cli import main
from editrt.errors import InputError
from editrt.runtime.crop import crop_region, plan_crop
from editrt.runtime.images import processing_size


def boxed_mask(size_hw, box):
    mask = np.zeros(size_hw, bool)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def run_diffusers_cropped(pipe, prompts, image, mask, steps, guidance, seed, resolution, padding, task="remove"):
    h, w = processing_size(mask.shape, resolution)
    return np.asarray(pipe(
        prompt_embeds=prompts[task][None], negative_prompt_embeds=prompts["null"][None],
        image=Image.fromarray(image), mask_image=Image.fromarray(mask.astype(np.uint8) * 255), height=h, width=w,
        num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed),
        padding_mask_crop=padding,
    ).images[0])


# The boxes' branches are test_crop_region_equals_diffusers_get_crop_region's; these cover the resize-and-fill
# (same aspect, bands above and below, bands left and right), both crop-back branches, guidance 1 and CFG.
@pytest.mark.parametrize("size_hw,box,padding,resolution,guidance", [
    ((150, 100), (100, 60, 150, 100), 4, 64, 3.0),  # mask in the bottom-right corner: the crop is shifted back
    ((200, 120), (50, 5, 80, 60), 32, 128, 1.0),  # tall image, a wide mask: the crop grows in height
    ((61, 90), (5, 0, 55, 90), 8, 64, 2.0),  # the 90x61 crop cannot reach the 96x64 aspect: fill bands
])
def test_processing_crop_equals_diffusers_padding_mask_crop(reposition, diffusers_pipe, size_hw, box, padding,
                                                              resolution, guidance):
    image = np.random.default_rng(sum(box) + padding).integers(0, 256, (*size_hw, 3), dtype=np.uint8)
    mask = boxed_mask(size_hw, box)
    ours = np.asarray(reposition.inpaint(image, mask, steps=2, guidance=guidance, seed=padding, resolution=resolution,
                                         crop_padding=padding, crop_size="processing"))
    theirs = run_diffusers_cropped(diffusers_pipe, reposition.task_prompts, image, mask, 2, guidance, padding,
                                   resolution, padding)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours[~mask], image[~mask])  # outside the mask: the input bytes
    assert (ours[mask] != image[mask]).any()


def test_crop_region_equals_diffusers_get_crop_region():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = rng.integers(8, 90, 2)
        mask = np.zeros((h, w), bool)
        for _ in range(rng.integers(1, 4)):  # one to three blobs, anywhere (borders included)
            y, x = rng.integers(0, h), rng.integers(0, w)
            mask[y:y + rng.integers(1, h), x:x + rng.integers(1, w)] = True
        width, height = (int(v) * 8 for v in rng.integers(1, 20, 2))
        pad = int(rng.integers(0, 40))
        theirs = VaeImageProcessor.get_crop_region(Image.fromarray(mask.astype(np.uint8) * 255), width, height, pad=pad)
        assert crop_region(mask, width, height, pad) == tuple(int(v) for v in theirs), (mask.shape, width, height, pad)


def test_native_crop_is_processed_at_its_own_size(reposition, monkeypatch):
    image = np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    small, large = boxed_mask((480, 640), (200, 300, 230, 340)), boxed_mask((480, 640), (100, 100, 400, 500))
    proc = processing_size((480, 640), 128)  # (128, 168): a crop larger than this is scaled down to fit
    plan = plan_crop(small, proc, 4, "native")
    assert plan.work_hw == plan.box_hw == (40, 56)  # 30x40 + 2x4 padding, 38x49 at the aspect, multiples of 8
    big = plan_crop(large, proc, 4, "native")
    assert big.work_hw == proc and big.box_hw[0] > proc[0]
    worked = []  # what each UNet pass ran on (recorded, then the real pass runs)
    denoise = reposition._denoise
    monkeypatch.setattr(reposition, "_denoise", lambda rgb, *a: worked.append(rgb.copy()) or denoise(rgb, *a))
    out = np.asarray(reposition.inpaint(image, small, steps=2, seed=1, resolution=128, crop_padding=4))
    x1, y1, x2, y2 = plan.box
    assert len(worked) == 1  # on the crop's own pixels, not resampled, not the 128x168 canvas
    np.testing.assert_array_equal(worked[0], image[y1:y2, x1:x2])
    np.testing.assert_array_equal(out[~small], image[~small])
    assert (out[small] != image[small]).any()


def test_native_crop_at_the_border_of_an_image_not_a_multiple_of_8(reposition):
    image = np.random.default_rng(4).integers(0, 256, (61, 90, 3), dtype=np.uint8)
    mask = boxed_mask((61, 90), (40, 70, 61, 90))
    out = np.asarray(reposition.inpaint(image, mask, steps=2, seed=2, resolution=64, crop_padding=30,
                                        crop_size="native"))
    np.testing.assert_array_equal(out[~mask], image[~mask])
    assert (out[mask] != image[mask]).any()


@pytest.mark.parametrize("options,field", [
    (dict(crop_padding=-1), "crop_padding"),
    (dict(crop_padding=2.5), "crop_padding"),
    (dict(crop_padding=8, crop_size="full"), "crop_size"),
    (dict(crop_size="native"), "crop_size"),  # a size without a crop
])
def test_bad_crop_options_name_their_field(reposition, options, field):
    image, mask = np.zeros((32, 32, 3), np.uint8), boxed_mask((32, 32), (4, 4, 9, 9))
    with pytest.raises(InputError) as e:
        reposition.inpaint(image, mask, steps=1, **options)
    assert e.value.field == field


def test_cli_crop_size_is_checked_before_anything_runs(tmp_path, capsys):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "i.png")
    Image.fromarray(boxed_mask((32, 32), (4, 4, 9, 9)).astype(np.uint8) * 255).save(tmp_path / "m.png")
    rc = main(["inpaint", str(tmp_path / "i.png"), str(tmp_path / "m.png"), "-o", str(tmp_path / "o.png"),
               "--crop-padding", "8", "--crop-size", "full", "--weights", str(tmp_path / "absent"), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "crop_size: expected one of processing, native" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


def test_cli_crop_padding_32_processing_equals_diffusers(tiny_weights, diffusers_pipe, reposition, photo, tmp_path,
                                                         capsys):
    """The issue's done-when, through the command line: a real photo, --crop-padding 32 --crop-size processing."""
    mask = boxed_mask(photo.shape[:2], (120, 180, 170, 260))
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    rc = main(["inpaint", str(tmp_path / "photo.png"), str(tmp_path / "mask.png"), "-o", str(tmp_path / "out.png"),
               "--crop-padding", "32", "--crop-size", "processing", "--steps", "3", "--seed", "4", "--resolution", "64",
               "--weights", str(tiny_weights), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    theirs = run_diffusers_cropped(diffusers_pipe, reposition.task_prompts, photo, mask, 3, 1.0, 4, 64, 32)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), theirs)


# ---------------------------------------------------------------------- repositioning and outpainting with a crop
def seele_scene():
    """A real photo at its processing size (64 x 96 at resolution 64), a subject on the left moved 50 px right and
    a part to complete beside its new place: REMOVE, COMPLETE and HARMONIZE all run."""
    from skimage import data

    image = np.ascontiguousarray(data.chelsea()[100:164, 150:246])
    subject, complete = boxed_mask((64, 96), (20, 8, 36, 22)), boxed_mask((64, 96), (36, 58, 40, 72))
    return image, subject, complete


def outside(box, shape):
    x1, y1, x2, y2 = box
    out = np.ones(shape, bool)
    out[y1:y2, x1:x2] = False
    return out


def test_reposition_crop_equals_the_uncropped_flow_on_the_crop(reposition):
    """The paper order (every pass sees the moved subject): the box holds the void and the moved subject, nothing
    outside it changes, and inside it the result is the whole SEELE flow run on the crop alone (native crop: the
    box is processed at its own size, so no resampling separates the two; exact)."""
    from editrt.runtime.edits import Quality, SeeleEdit

    image, subject, complete = seele_scene()
    edit = SeeleEdit(move=(50, 0), dilation=2, complete_mask=complete, remove_order="paper")
    result = reposition(image, edit, mask=subject, quality=Quality(steps=2, resolution=64, crop_padding=3))
    out, box = np.asarray(result.image), result.crop_box
    x1, y1, x2, y2 = box
    assert x1 <= 8 - 2 and x2 >= 72 + 2 and y1 <= 20 - 2 and y2 >= 40 + 2  # void (dilated) and moved subject inside
    assert (x2 - x1, y2 - y1) != (96, 64)  # a real crop, not the whole image
    np.testing.assert_array_equal(out[outside(box, subject.shape)], image[outside(box, subject.shape)])
    crop = np.s_[y1:y2, x1:x2]
    alone = reposition(image[crop], SeeleEdit(move=(50, 0), dilation=2, complete_mask=complete[crop],
                                              remove_order="paper"),
                       mask=subject[crop], quality=Quality(steps=2, resolution=min(y2 - y1, x2 - x1)))
    np.testing.assert_array_equal(out[crop], np.asarray(alone.image))


@pytest.mark.parametrize("crop_size", ["processing", "native"])
def test_reposition_crop_whose_box_is_the_whole_image_equals_no_crop(reposition, crop_size):
    """A padding that reaches every border makes the box the whole image; at an image of the processing size neither
    crop size resamples anything, so the result is the uncropped flow's, byte for byte."""
    from editrt.runtime.edits import Quality, SeeleEdit

    image, subject, complete = seele_scene()
    edit = SeeleEdit(move=(50, 0), dilation=2, complete_mask=complete)
    plain = reposition(image, edit, mask=subject, quality=Quality(steps=2, resolution=64))
    cropped = reposition(image, edit, mask=subject,
                         quality=Quality(steps=2, resolution=64, crop_padding=96, crop_size=crop_size))
    assert plain.crop_box is None and cropped.crop_box == (0, 0, 96, 64)
    np.testing.assert_array_equal(np.asarray(cropped.image), np.asarray(plain.image))


def test_cached_order_remove_with_a_crop_does_not_depend_on_the_move(reposition):
    """The cached order's REMOVE runs on the unmoved image in the box around the void alone: two moves give the same
    REMOVE result (what lets a drag reuse it), while the edit's box follows the moved subject."""
    from editrt.runtime.edits import Quality

    image, subject, _ = seele_scene()
    quality = Quality(steps=2, resolution=64, crop_padding=3)
    near, far = (reposition(image, mask=subject, move=(dx, 0), dilation=2, harmonize=False, quality=quality)
                 for dx in (20, 50))
    np.testing.assert_array_equal(np.asarray(near.stages["removed"].image), np.asarray(far.stages["removed"].image))
    assert near.crop_box != far.crop_box and far.crop_box[2] >= 72
    for r in (near, far):
        np.testing.assert_array_equal(np.asarray(r.image)[outside(r.crop_box, subject.shape)],
                                      image[outside(r.crop_box, subject.shape)])


@pytest.mark.parametrize("options,field", [
    (dict(crop_padding=-3), "crop_padding"),
    (dict(crop_padding="8"), "crop_padding"),
    (dict(crop_padding=8, crop_size="whole"), "crop_size"),
    (dict(crop_size="processing"), "crop_size"),  # a size without a crop
])
def test_quality_refuses_bad_crop_options_naming_the_field(reposition, options, field):
    from editrt.runtime.edits import Quality

    with pytest.raises(InputError) as e:
        Quality(**options)
    assert e.value.field == field and "\n" not in str(e.value)
    image, subject, _ = seele_scene()
    with pytest.raises(InputError) as e:  # the keyword form: refused where the Quality is built, before any pass
        reposition(image, mask=subject, move=(5, 0), steps=1, **options)
    assert e.value.field == field
    assert Quality(crop_padding=8).crop_size == "native"  # the default size with a crop


def test_outpaint_processing_crop_equals_diffusers_padding_mask_crop_on_the_canvas(reposition, diffusers_pipe):
    """Outpainting with a crop is one cropped inpainting pass over the new border: with crop_size "processing" it equals
    diffusers' padding_mask_crop on the padded canvas (exact). The canvas (64 x 112) is not the processing size
    (48 x 84 at resolution 48), so a pass that ignored the crop would resample differently and differ. (A border along
    a whole side grows, with the box's aspect rule, to the whole canvas: the crop changes how it is resampled and
    pasted, not how much is processed.)"""
    from editrt.runtime.outpaint import outpaint, outpaint_task, pad_canvas

    image = seele_scene()[0]
    out = np.asarray(outpaint(reposition, image, (0, 0, 16, 0), steps=2, seed=5, resolution=48, crop_padding=8,
                              crop_size="processing"))
    canvas, border = pad_canvas(image, (0, 0, 16, 0))
    theirs = run_diffusers_cropped(diffusers_pipe, reposition.task_prompts, canvas, border, 2, 1.0, 5, 48, 8,
                                   task=outpaint_task(reposition))
    np.testing.assert_array_equal(out, theirs)
    np.testing.assert_array_equal(out[:, :96], image)
    with pytest.raises(InputError) as e:
        outpaint(reposition, image, (0, 0, 16, 0), steps=1, crop_size="native")
    assert e.value.field == "crop_size"


def test_dilate_equals_binary_dilation_with_the_disk():
    """images.dilate (distance transform over the mask's window; photo-size masks made it 40 s per call with the
    structure) against its reference, scipy's binary_dilation with the disk structure: masks anywhere, borders
    included, radii 1 to 12 (exact)."""
    from scipy import ndimage

    from editrt.runtime.images import dilate

    rng = np.random.default_rng(1)
    for _ in range(120):
        h, w = rng.integers(1, 60, 2)
        mask = np.zeros((h, w), bool)
        for _ in range(rng.integers(1, 4)):  # blobs and single pixels, some on the border
            y, x = rng.integers(0, h), rng.integers(0, w)
            mask[y:y + rng.integers(1, 8), x:x + rng.integers(1, 8)] = True
        r = int(rng.integers(1, 13))
        y, x = np.ogrid[-r:r + 1, -r:r + 1]
        np.testing.assert_array_equal(dilate(mask, r), ndimage.binary_dilation(mask, structure=x * x + y * y <= r * r),
                                      err_msg=f"{mask.shape} r={r}")
    assert not dilate(np.zeros((5, 5), bool), 3).any()
