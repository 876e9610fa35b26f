"""`editrt outpaint`: the PNG equals the Python API's result, keeps the original bytes; bad input is one line, exit 2,
no file."""
import numpy as np
import pytest
from PIL import Image
from skimage import data

from editrt.cli import main
from editrt.runtime.outpaint import outpaint


@pytest.fixture(scope="module")
def photo_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("outpaint") / "photo.png"
    Image.fromarray(data.coffee()[::8, ::8]).save(path)  # 50 x 75, a real photo
    return path


def run(args, capsys):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_outpaint_cli_equals_python_api(photo_png, tiny_weights, reposition, tmp_path, capsys):
    out = tmp_path / "out.png"
    rc, err = run(["outpaint", photo_png, "--extend", "7,3,12,0", "--fill", "reflect", "-o", out, "--weights", tiny_weights,
                   "--steps", "2", "--seed", "3", "--guidance", "2", "--resolution", "64"], capsys)
    assert rc == 0, err
    assert err.splitlines() == [f"editrt: outpaint -> {out}"]
    image = np.asarray(Image.open(photo_png).convert("RGB"))
    written = np.asarray(Image.open(out).convert("RGB"))
    assert written.shape == (50 + 3, 75 + 7 + 12, 3)
    np.testing.assert_array_equal(written[3:3 + 50, 7:7 + 75], image)
    api = np.asarray(outpaint(reposition, image, [7, 3, 12, 0], fill="reflect", steps=2, seed=3, guidance=2.0,
                              resolution=64))
    np.testing.assert_array_equal(written, api)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary file left


def test_outpaint_cli_crop_flags_equal_python_api(photo_png, tiny_weights, reposition, tmp_path, capsys):
    out = tmp_path / "out.png"
    rc, err = run(["outpaint", photo_png, "--extend", "0,0,12,0", "--crop-padding", "6", "--crop-size", "processing",
                   "-o", out, "--weights", tiny_weights, "--steps", "2", "--seed", "3", "--resolution", "40"], capsys)
    assert rc == 0, err
    image = np.asarray(Image.open(photo_png).convert("RGB"))
    api = np.asarray(outpaint(reposition, image, [0, 0, 12, 0], steps=2, seed=3, resolution=40, crop_padding=6,
                              crop_size="processing"))
    uncropped = np.asarray(outpaint(reposition, image, [0, 0, 12, 0], steps=2, seed=3, resolution=40))
    written = np.asarray(Image.open(out).convert("RGB"))
    np.testing.assert_array_equal(written, api)
    assert not np.array_equal(written, uncropped)  # the flags changed the pass (the crop's own resampling)


@pytest.mark.parametrize("args,message", [
    (["--extend=-1,0,0,0"], "extend [-1, 0, 0, 0]: expected L,T,R,B, four non-negative integers"),
    (["--extend", "1.5,0,0,0"], "four non-negative integers"),
    (["--extend", "0,0,0,0"], "expected at least one side > 0"),
    (["--extend", "1,2,3"], "--extend '1,2,3': expected"),
    (["--extend", "300,0,0,0"], "the canvas would be 375x50; expected at most 4x the 75x50 image"),
    (["--extend", "4,4,4,4", "--fill", "blur"], "fill 'blur': expected one of edge, reflect, mean"),
    (["--extend", "4,0,0,0", "--crop-padding", "-1"], "crop_padding: expected a whole number of pixels >= 0"),
    (["--extend", "4,0,0,0", "--crop-padding", "8", "--crop-size", "full"], "crop_size: expected one of processing, "
     "native, got 'full'"),
    (["--extend", "4,0,0,0", "--crop-size", "native"], "crop_size 'native': only with crop_padding"),
])
def test_bad_input_is_one_line_and_writes_nothing(photo_png, tiny_weights, tmp_path, capsys, args, message):
    rc, err = run(["outpaint", photo_png, *args, "-o", tmp_path / "out.png", "--weights", tiny_weights, "--steps", "1",
                   "--quiet"], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("editrt: error: "), err
    assert message in err, err
    assert list(tmp_path.iterdir()) == []


def test_bad_files(photo_png, tiny_weights, tmp_path, capsys):
    rc, err = run(["outpaint", tmp_path / "missing.png", "--extend", "8,0,0,0", "-o", tmp_path / "o.png",
                   "--weights", tiny_weights], capsys)
    assert rc == 2 and "no such file" in err and err.count("\n") == 1
    rc, err = run(["outpaint", photo_png, "--extend", "8,0,0,0", "-o", tmp_path / "o.jpg", "--weights", tiny_weights],
                  capsys)
    assert rc == 2 and "expected a .png file name" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
