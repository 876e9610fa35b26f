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


def run_diffusers_cropped(pipe, prompts, image, mask, steps, guidance, seed, resolution, padding):
    h, w = processing_size(mask.shape, resolution)
    return np.asarray(pipe(
        prompt_embeds=prompts["remove"][None], negative_prompt_embeds=prompts["null"][None],
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
