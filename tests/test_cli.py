"""The CLI: each command works, and each bad input gives one line on stderr, exit 2, no output file."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from editrt.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_weights):
    from skimage import data

    d = tmp_path_factory.mktemp("cli")
    photo = data.chelsea()
    Image.fromarray(photo).save(d / "photo.png")
    mask = np.zeros(photo.shape[:2], np.uint8)
    mask[100:200, 150:260] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[:-10]).save(d / "small_mask.png")
    Image.fromarray(np.zeros_like(mask)).save(d / "empty_mask.png")
    (d / "not_an_image.png").write_bytes(b"hello")
    broken = d / "broken_weights"
    shutil.copytree(tiny_weights, broken)
    (broken / "task_prompts.safetensors").write_bytes(b"xx")
    return d


def run(args, capsys):
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.err


def common(tiny_weights):
    return ["--weights", tiny_weights, "--steps", "2", "--resolution", "64", "--quiet"]


def test_segment_inpaint_reposition(files, tiny_weights, tmp_path, capsys):
    rc, err = run(["segment", files / "photo.png", "--point", "200,150", "--point", "20,20,0", "-o", tmp_path / "m.png",
                   "--weights", tiny_weights, "--quiet"], capsys)
    assert rc == 0, err
    assert Image.open(tmp_path / "m.png").size == (451, 300)
    rc, err = run(["inpaint", files / "photo.png", files / "mask.png", "--task", "complete", "-o", tmp_path / "i.png",
                   *common(tiny_weights)], capsys)
    assert rc == 0, err
    rc, err = run(["reposition", files / "photo.png", "--mask", files / "mask.png", "--move", "40,-10", "--scale", "1.2",
                   "--save-stages", tmp_path / "stages", "-o", tmp_path / "r.png", *common(tiny_weights)], capsys)
    assert rc == 0, err
    out = np.asarray(Image.open(tmp_path / "r.png"))
    assert out.shape == (300, 451, 3)
    assert (tmp_path / "stages" / "1_subject_mask.png").is_file() and (tmp_path / "stages" / "4_harmonized.png").is_file()


def test_weights_init_cli(tmp_path, capsys):
    rc, err = run(["weights", "init", tmp_path / "w", "--config", "tiny", "--seed", "3"], capsys)
    assert rc == 0, err
    assert (tmp_path / "w" / "inpaint" / "unet" / "config.json").is_file()
    rc, err = run(["weights", "init", tmp_path / "w"], capsys)
    assert rc == 2 and "not empty" in err


BAD = [
    (["inpaint", "{d}/not_an_image.png", "{d}/mask.png"], "cannot read it as an image"),
    (["inpaint", "{d}/missing.png", "{d}/mask.png"], "no such file"),
    (["inpaint", "{d}/photo.png", "{d}/small_mask.png"], "mask: size 451x290 differs from the image size 451x300"),
    (["inpaint", "{d}/photo.png", "{d}/empty_mask.png"], "mask: is empty"),
    (["inpaint", "{d}/photo.png", "{d}/mask.png", "--task", "sharpen"], "task: expected 'remove' or 'complete'"),
    (["reposition", "{d}/photo.png", "--point", "500,20", "--move", "1,1"], "outside the image"),
    (["reposition", "{d}/photo.png", "--box", "10,10,20", "--move", "1,1"], "--box '10,10,20': expected X0,Y0,X1,Y1"),
    (["reposition", "{d}/photo.png", "--box", "10,10,900,20", "--move", "1,1"], "inside the image"),
    (["reposition", "{d}/photo.png", "--mask", "{d}/mask.png", "--move", "2000,0"], "outside the image"),
    (["reposition", "{d}/photo.png", "--mask", "{d}/mask.png", "--move", "a,b"], "--move 'a,b': expected X,Y"),
    (["reposition", "{d}/photo.png", "--move", "1,1"], "expected the subject as --mask"),
    (["reposition", "{d}/photo.png", "--mask", "{d}/mask.png", "--move", "1,1", "--complete-mask", "{d}/small_mask.png"],
     "complete_mask: size"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_one_line_exit_2_no_output(files, tiny_weights, tmp_path, capsys, args, message):
    out = tmp_path / "out.png"
    args = [a.format(d=files) for a in args] + ["-o", out, *common(tiny_weights)]
    rc, err = run(args, capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("editrt: error:") and message in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("weights,message", [("/nonexistent/w", "no such weights directory"),
                                              ("{d}/broken_weights", "task_prompts.safetensors: not a readable")])
def test_missing_or_corrupt_weights(files, tmp_path, capsys, weights, message):
    rc, err = run(["inpaint", files / "photo.png", files / "mask.png", "-o", tmp_path / "o.png",
                   "--weights", weights.format(d=files), "--quiet"], capsys)
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


def test_console_script_exit_code_and_no_traceback(files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "editrt.cli", "inpaint", str(files / "photo.png"),
                           str(files / "empty_mask.png"), "-o", str(tmp_path / "o.png"), "--weights", "/nonexistent"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert shutil.which("editrt"), "the console script `editrt` is installed"
