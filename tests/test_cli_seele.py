"""`editrt reposition` with SEELE's stages (occlusion, perspective, matting, shadows) on a real photo, tiny weights."""
import shutil

import numpy as np
import pytest
from PIL import Image

from editrt.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_weights):
    from skimage import data

    d = tmp_path_factory.mktemp("cli-seele")
    photo = data.chelsea()
    Image.fromarray(photo).save(d / "photo.png")
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[100:200, 150:260] = 255
    Image.fromarray(mask).save(d / "mask.png")
    shadow = np.zeros_like(mask)
    shadow[200:215, 150:280] = 255
    Image.fromarray(shadow).save(d / "shadow.png")
    region = np.zeros_like(mask)
    region[215:235, 190:320] = 255
    Image.fromarray(region).save(d / "region.png")
    Image.fromarray(mask[:-10]).save(d / "small_mask.png")
    no_depth = d / "weights_without_depth"
    shutil.copytree(tiny_weights, no_depth)
    shutil.rmtree(no_depth / "depth")
    shutil.rmtree(no_depth / "matting")
    return d


def run(args, capsys):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def common(weights):
    return ["--weights", weights, "--steps", "2", "--resolution", "64", "--quiet"]


def test_reposition_with_every_stage_on_a_real_photo(files, tiny_weights, tmp_path, capsys):
    stages = tmp_path / "stages"
    rc, err = run(["reposition", files / "photo.png", "--mask", files / "mask.png", "--move", "40,15",
                   "--occlusion", "auto", "--scale", "auto", "--matting", "on", "--existing-shadow-mask",
                   files / "shadow.png", "--new-shadow-region", files / "region.png", "--save-stages", stages, "-o", tmp_path / "r.png",
                   *common(tiny_weights)], capsys)
    assert rc == 0, err
    names = sorted(p.name for p in stages.iterdir())
    for stage in ("existing_shadow_mask", "depth", "trimap", "alpha", "occluder_mask", "removed", "moved", "completed",
                  "new_shadow_region_mask", "harmonized", "output"):
        assert any(n.split("_", 1)[1].startswith(stage) for n in names), (stage, names)
    photo = np.asarray(Image.open(files / "photo.png"))
    out = np.asarray(Image.open(tmp_path / "r.png"))
    regenerated = np.asarray(Image.open(next(stages.glob("*_output_mask.png"))))[:, :, 0] > 127
    np.testing.assert_array_equal(out[~regenerated], photo[~regenerated])  # the input's bytes outside
    region = np.asarray(Image.open(files / "region.png")) > 127
    occluder = np.asarray(Image.open(next(stages.glob("*_occluder_mask.png"))).convert("L")) > 127
    assert regenerated[region & ~occluder].all()  # the shadow region was harmonized, except what is in front
    assert not (regenerated & occluder & ~(np.asarray(Image.open(next(stages.glob("*_removed_mask.png"))).convert("L"))
                                          > 127)).any()  # the occluders stay the input's bytes
    with Image.open(next(stages.glob("*_depth.png"))) as im, Image.open(next(stages.glob("*_alpha.png"))) as al:
        assert im.mode.startswith("I") and im.size == (451, 300) and al.mode.startswith("I")
        assert np.asarray(al).max() == 65535  # the eroded subject is opaque


def test_explicit_scale_a_shadow_selection_and_a_box_region(files, tiny_weights, tmp_path, capsys):
    stages = tmp_path / "stages"
    rc, err = run(["reposition", files / "photo.png", "--mask", files / "mask.png", "--move=-30,0", "--scale", "0.9",
                   "--existing-shadow-box", "150,200,280,215", "--new-shadow-region", "100,210,240,230",
                   "--occlusion", "none",
                   "--save-stages", stages, "-o", tmp_path / "r.png", *common(tiny_weights)], capsys)
    assert rc == 0, err
    names = {p.name for p in stages.iterdir()}
    assert "2_existing_shadow_mask.png" in names and "6_new_shadow_region_mask.png" in names and "5_completed.png" in names
    assert not any("depth" in n for n in names)  # an explicit scale needs no depth


BAD = [
    (["--new-shadow-region", "600,0,700,10"], "new_shadow_region box (600, 0, 700, 10): empty after clipping to the "
     "image (451x300)"),
    (["--new-shadow-region", "{d}/small_mask.png"], "new_shadow_region: size 451x290 differs from the image size 451x300"),
    (["--scale", "auto", "--weights-override", "{d}/weights_without_depth"], "scale auto: needs depth weights"),
    (["--occlusion", "auto", "--weights-override", "{d}/weights_without_depth"], "occlusion auto: needs depth weights"),
    (["--matting", "on", "--weights-override", "{d}/weights_without_depth"], "matting: needs matting weights"),
    (["--matting", "on", "--trimap-band", "60"], "trimap band 60: larger than the subject"),
    (["--trimap-band", "3"], "trimap_band: only with matting on"),
    (["--scale", "big"], "--scale"),
    (["--occlusion", "{d}/missing.png"], "--occlusion {d}/missing.png: no such file"),
    (["--matting", "maybe"], "--matting"),
    (["--new-shadow-region", "1,2,3,4", "--no-harmonize"], "new_shadow_region: the shadow is generated by the "
     "harmonizer"),
    (["--shadow-region", "1,2,3,4", "--no-harmonize"], "new_shadow_region: the shadow"),  # the older spelling, hidden
    (["--existing-shadow-mask", "{d}/mask.png", "--existing-shadow-box", "1,2,3,4"], "give the existing shadow one way"),
    (["--occlusion", "auto", "--occluder-mask", "{d}/mask.png"], "--occluder-mask: the same as --occlusion MASK"),
    (["--crop-padding", "-2"], "crop_padding: expected a whole number of pixels >= 0, got -2"),
    (["--crop-padding", "8", "--crop-size", "full"], "crop_size: expected one of processing, native, got 'full'"),
    (["--crop-size", "native"], "crop_size 'native': only with crop_padding"),
]


def test_reposition_crop_flags_equal_the_python_api(files, tiny_weights, reposition, tmp_path, capsys):
    """--crop-padding / --crop-size reach the Quality: the PNG is the library's cropped result, and outside the crop
    box every byte is the photo's."""
    from editrt.runtime.edits import Quality

    rc, err = run(["reposition", files / "photo.png", "--mask", files / "mask.png", "--move", "40,15", "--crop-padding",
                   "8", "--crop-size", "processing", "-o", tmp_path / "r.png", *common(tiny_weights)], capsys)
    assert rc == 0, err
    photo = np.asarray(Image.open(files / "photo.png").convert("RGB"))
    mask = np.asarray(Image.open(files / "mask.png")) > 127
    expected = reposition(photo, mask=mask, move=(40, 15),
                          quality=Quality(steps=2, resolution=64, crop_padding=8, crop_size="processing"))
    written = np.asarray(Image.open(tmp_path / "r.png").convert("RGB"))
    np.testing.assert_array_equal(written, np.asarray(expected.image))
    x1, y1, x2, y2 = expected.crop_box
    inside = np.zeros(mask.shape, bool)
    inside[y1:y2, x1:x2] = True
    assert (x2 - x1) * (y2 - y1) < mask.size and (written[inside] != photo[inside]).any()
    np.testing.assert_array_equal(written[~inside], photo[~inside])


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_stage_options_one_line_exit_2_nothing_written(files, tiny_weights, tmp_path, capsys, extra, message):
    extra = [a.format(d=files) for a in extra]
    weights = tiny_weights
    if "--weights-override" in extra:
        i = extra.index("--weights-override")
        weights = extra[i + 1]
        del extra[i:i + 2]
    out, stages = tmp_path / "out.png", tmp_path / "stages"
    rc, err = run(["reposition", files / "photo.png", "--mask", files / "mask.png", "--move", "10,5", *extra,
                   "--save-stages", stages, "-o", out, *common(weights)], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("editrt: error:") and message.format(d=files) in err, err
    assert list(tmp_path.iterdir()) == []


def test_export_all_leaves_out_the_estimators_a_folder_lacks(files, tiny_weights, tmp_path, capsys, monkeypatch):
    import editrt.export.components as components

    asked = []
    monkeypatch.setattr(components, "export_components", lambda weights, names, *a, **k: asked.append(names) or [])
    for weights in (tiny_weights, files / "weights_without_depth"):
        rc, err = run(["export", "--weights", weights, "-o", tmp_path / "onnx", "--quiet"], capsys)
        assert rc == 0, err
    with_estimators, without = asked
    assert {"depth_estimator", "matting"} <= set(with_estimators)
    assert set(with_estimators) - set(without) == {"depth_estimator", "matting"}
