"""`editrt elements partition | edit | render | show`: happy path and one-line errors with nothing written."""
import json

import numpy as np
import pytest
from PIL import Image

from editrt.cli import main


def run(args, capsys):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr()


GRID = 8  # --grid 8: at most 64 elements


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory, tiny_weights):
    from skimage import data

    d = tmp_path_factory.mktemp("el")
    Image.fromarray(data.chelsea()).save(d / "photo.png")
    assert main(["elements", "partition", str(d / "photo.png"), "-o", str(d / "e.json"), "--overlay", str(d / "o.png"),
                 "--grid", str(GRID), "--weights", str(tiny_weights), "--quiet"]) == 0
    return d


def test_partition_edit_render_show_in_image_pixels(partitioned, tiny_weights, tmp_path, capsys):
    d = partitioned
    doc = json.loads((d / "e.json").read_text())
    assert doc["num_elements"] == GRID * GRID and (d / "e.npz").is_file()
    assert doc["image_size"] == [300, 451] and doc["units"] == "image pixels"  # the photo's size
    assert Image.open(d / "o.png").size == (451, 300)
    alive = [r["id"] for r in doc["elements"] if r["alive"]]
    a, b, big, gone = alive[1], alive[2], alive[len(alive) // 2], alive[0]
    rc, io = run(["elements", "edit", d / "e.json", "--move", f"{a}+{b}:12,4", "--resize", f"{big}:1.4",
                  "--delete", str(gone), "--insert", f"{d / 'e.json'}:{alive[-1]}@20,20", "-o", tmp_path / "ed.json"],
                 capsys)
    assert rc == 0, io.err
    edited = json.loads((tmp_path / "ed.json").read_text())
    assert f"new ids [{gone}]" in io.err and edited["elements"][gone]["alive"]  # the slot freed by --delete is reused
    for i in (a, b):  # moved by exactly 12, 4 image pixels
        assert edited["elements"][i]["x"] == pytest.approx(doc["elements"][i]["x"] + 12, abs=1e-4)
        assert edited["elements"][i]["y"] == pytest.approx(doc["elements"][i]["y"] + 4, abs=1e-4)
    assert (edited["elements"][gone]["x"], edited["elements"][gone]["y"]) == pytest.approx((20, 20), abs=1e-3)
    rc, io = run(["elements", "render", tmp_path / "ed.json", "--prompt", "a cat", "--steps", "2", "-o", tmp_path / "r.png",
                  "--weights", tiny_weights, "--quiet"], capsys)
    assert rc == 0, io.err
    assert Image.open(tmp_path / "r.png").size == (451, 300)
    from editrt.runtime.elements import Elements

    labels = Elements.load(d / "e.json").paint()
    for x, y in ((5.5, 7.25), (200, 150), (450, 299)):
        rc, io = run(["elements", "show", d / "e.json", "--point", f"{x},{y}"], capsys)
        expected = labels[int(y), int(x)]
        assert rc == 0 and (io.out.split("\t")[0] == str(expected) if expected >= 0 else io.out == "")


def test_small_image_keeps_its_size(tiny_weights, tmp_path, capsys):
    """A 120x88 image gives a 120x88 label map, overlay and render (the working size, 176x128, stays inside)."""
    from skimage import data

    from editrt.runtime.elements import Elements

    Image.fromarray(data.chelsea()).resize((120, 88)).save(tmp_path / "small.png")
    rc, io = run(["elements", "partition", tmp_path / "small.png", "-o", tmp_path / "s.json", "--overlay",
                  tmp_path / "o.png", "--labels", tmp_path / "labels.png", "--weights", tiny_weights], capsys)
    assert rc == 0, io.err
    assert "on the 120x88 image" in io.err
    labels = Elements.load(tmp_path / "s.json").paint()
    assert labels.shape == (88, 120)
    saved = Image.open(tmp_path / "labels.png")
    assert saved.size == (120, 88)
    np.testing.assert_array_equal(np.asarray(saved).astype(np.int64) - 1, labels)  # id + 1, 0 = no element
    assert Image.open(tmp_path / "o.png").size == (120, 88)
    rc, io = run(["elements", "render", tmp_path / "s.json", "--steps", "1", "-o", tmp_path / "r.png",
                  "--weights", tiny_weights, "--quiet"], capsys)
    assert rc == 0, io.err
    assert Image.open(tmp_path / "r.png").size == (120, 88)


BAD = [
    (["edit", "{d}/e.json", "--move", f"{GRID * GRID}:1,1"], f"no element {GRID * GRID}; ids are 0..{GRID * GRID - 1}"),
    (["edit", "{d}/e.json", "--move", "5:5000,0"], "outside the image (451x300)"),
    (["edit", "{d}/e.json", "--move", "5"], "expected ID:DX,DY"),
    (["edit", "{d}/e.json", "--delete", "x"], "expected element ids"),
    (["edit", "{d}/e.json"], "expected at least one --move"),
    (["edit", "{d}/corrupt.json", "--delete", "1"], "not valid JSON"),
    (["edit", "{d}/mismatched.json", "--delete", "1"], "does not match it"),
    (["render", "{d}/corrupt.json"], "not valid JSON"),
    (["partition", "{d}/o.png", "--resolution", "100"], "multiple of 8"),
    (["partition", "{d}/nothing.png"], "no such file"),
    (["partition", "{d}/o.png", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["render", "{d}/e.json", "--bogus"], "unrecognized arguments: --bogus"),
    (["show"], "the following arguments are required: ELEMENTS.json"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input(partitioned, tiny_weights, tmp_path, capsys, args, message):
    d = partitioned
    (d / "corrupt.json").write_text("{")
    doc = json.loads((d / "e.json").read_text())
    doc["data_sha256"] = "0" * 64
    (d / "mismatched.json").write_text(json.dumps(doc))
    out = tmp_path / ("out.png" if args[0] == "render" else "out.json")
    args = ["elements"] + [a.format(d=d) for a in args] + (["-o", out] if args[0] != "show" else [])
    if args[1] not in ("edit", "show"):
        args += ["--weights", tiny_weights, "--quiet"]
    rc, io = run(args, capsys)
    assert rc == 2 and io.err.startswith("editrt: error:") and io.err.count("\n") == 1 and message in io.err, io.err
    assert list(tmp_path.iterdir()) == []
