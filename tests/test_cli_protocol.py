"""The protocol options of `editrt reposition`: --remove-order (SEELE's order or the cached one) and --dilation
(the void's growth), read back from --save-stages. 64 px, 2 steps, harmonize off."""
import numpy as np
import pytest
from PIL import Image

from editrt.cli import main
from editrt.runtime.images import dilate

MOVE = (16, 4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from skimage import data

    d = tmp_path_factory.mktemp("protocol")
    Image.fromarray(np.ascontiguousarray(data.chelsea()[100:164, 150:214])).save(d / "photo.png")
    subject = np.zeros((64, 64), bool)
    subject[20:40, 10:30] = True
    Image.fromarray(subject.astype(np.uint8) * 255).save(d / "mask.png")
    return d, subject


def reposition(files, tiny_weights, out, *options):
    d, _ = files
    argv = ["reposition", d / "photo.png", "--mask", d / "mask.png", "--move", ",".join(map(str, MOVE)),
            "--no-harmonize", "--save-stages", out / "stages", "-o", out / "out.png", *options,
            "--weights", tiny_weights, "--steps", "2", "--resolution", "64", "--quiet"]
    return main([str(a) for a in argv])


def mask(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 127


def test_remove_order_paper_removes_after_the_move(files, tiny_weights, tmp_path, capsys):
    _, subject = files
    assert reposition(files, tiny_weights, tmp_path, "--remove-order", "paper") == 0, capsys.readouterr().err
    stages = tmp_path / "stages"
    moved = mask(stages / "2_moved_mask.png")
    np.testing.assert_array_equal(moved, np.roll(np.roll(subject, MOVE[1], 0), MOVE[0], 1))
    np.testing.assert_array_equal(mask(stages / "3_removed_mask.png"), dilate(subject, 1) & ~moved)
    # the REMOVE pass ran on the image with the subject already moved: its input holds the moved subject
    photo = np.asarray(Image.open(files[0] / "photo.png"))
    removed = np.asarray(Image.open(stages / "3_removed.png"))
    np.testing.assert_array_equal(removed[moved], np.roll(np.roll(photo, MOVE[1], 0), MOVE[0], 1)[moved])


def test_remove_order_cached_is_the_default(files, tiny_weights, tmp_path, capsys):
    for name, options in (("default", ()), ("cached", ("--remove-order", "cached"))):
        assert reposition(files, tiny_weights, tmp_path / name, *options) == 0, capsys.readouterr().err
        assert (tmp_path / name / "stages" / "2_removed_mask.png").is_file()  # REMOVE before the move
    assert np.array_equal(np.asarray(Image.open(tmp_path / "default" / "out.png")),
                          np.asarray(Image.open(tmp_path / "cached" / "out.png")))


def test_dilation_grows_the_void(files, tiny_weights, tmp_path, capsys):
    _, subject = files
    assert reposition(files, tiny_weights, tmp_path, "--dilation", "4") == 0, capsys.readouterr().err
    void = mask(tmp_path / "stages" / "2_removed_mask.png")
    np.testing.assert_array_equal(void, dilate(subject, 4))
    assert void.sum() > dilate(subject, 1).sum()  # the default at 64 px: 1% of the short side, at least 1


@pytest.mark.parametrize("options,match", [
    (("--dilation", "-1"), "--dilation -1: expected an integer >= 0"),
    (("--remove-order", "first"), "--remove-order: invalid choice: 'first'"),
])
def test_bad_protocol_options_one_line(files, tiny_weights, tmp_path, capsys, options, match):
    assert reposition(files, tiny_weights, tmp_path, *options) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.png").exists()
