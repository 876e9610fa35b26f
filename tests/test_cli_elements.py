"""`editrt elements partition | edit | render | show`: happy path and one-line errors with nothing written."""
import json

import pytest
from PIL import Image

from editrt.cli import main


def run(args, capsys):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr()


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory, tiny_weights):
    from skimage import data

    d = tmp_path_factory.mktemp("el")
    Image.fromarray(data.chelsea()).save(d / "photo.png")
    assert main(["elements", "partition", str(d / "photo.png"), "-o", str(d / "e.json"), "--overlay", str(d / "o.png"),
                 "--weights", str(tiny_weights), "--quiet"]) == 0
    return d


def test_partition_edit_render_show(partitioned, tiny_weights, tmp_path, capsys):
    d = partitioned
    doc = json.loads((d / "e.json").read_text())
    assert doc["num_elements"] == 256 and (d / "e.npz").is_file()
    assert Image.open(d / "o.png").size == tuple(doc["image_size"][::-1])
    rc, io = run(["elements", "edit", d / "e.json", "--move", "10+11:12,4", "--resize", "40:1.4", "--delete", "3",
                  "--insert", f"{d / 'e.json'}:100@20,20", "-o", tmp_path / "ed.json"], capsys)
    assert rc == 0, io.err
    edited = json.loads((tmp_path / "ed.json").read_text())
    assert "new ids [3]" in io.err and edited["elements"][3]["alive"]  # the slot freed by --delete 3 is reused
    assert edited["elements"][10]["x"] > doc["elements"][10]["x"]
    rc, io = run(["elements", "render", tmp_path / "ed.json", "--prompt", "a cat", "--steps", "2", "-o", tmp_path / "r.png",
                  "--weights", tiny_weights, "--quiet"], capsys)
    assert rc == 0, io.err
    assert Image.open(tmp_path / "r.png").size == tuple(doc["image_size"][::-1])
    x, y = doc["elements"][77]["x"] * doc["image_size"][1], doc["elements"][77]["y"] * doc["image_size"][0]
    rc, io = run(["elements", "show", d / "e.json", "--point", f"{x},{y}"], capsys)
    assert rc == 0 and io.out.startswith("77\t")


BAD = [
    (["edit", "{d}/e.json", "--move", "300:1,1"], "no element 300"),
    (["edit", "{d}/e.json", "--move", "5:5000,0"], "outside the image"),
    (["edit", "{d}/e.json", "--move", "5"], "expected ID:DX,DY"),
    (["edit", "{d}/e.json", "--delete", "x"], "expected element ids"),
    (["edit", "{d}/e.json"], "expected at least one --move"),
    (["edit", "{d}/corrupt.json", "--delete", "1"], "not valid JSON"),
    (["edit", "{d}/mismatched.json", "--delete", "1"], "does not match it"),
    (["render", "{d}/corrupt.json"], "not valid JSON"),
    (["partition", "{d}/o.png", "--resolution", "100"], "multiple of 8"),
    (["partition", "{d}/nothing.png"], "no such file"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input(partitioned, tiny_weights, tmp_path, capsys, args, message):
    d = partitioned
    (d / "corrupt.json").write_text("{")
    doc = json.loads((d / "e.json").read_text())
    doc["data_sha256"] = "0" * 64
    (d / "mismatched.json").write_text(json.dumps(doc))
    out = tmp_path / ("out.png" if args[0] == "render" else "out.json")
    args = ["elements"] + [a.format(d=d) for a in args] + ["-o", out]
    if args[1] != "edit":
        args += ["--weights", tiny_weights, "--quiet"]
    rc, io = run(args, capsys)
    assert rc == 2 and io.err.startswith("editrt: error:") and io.err.count("\n") == 1 and message in io.err, io.err
    assert list(tmp_path.iterdir()) == []
