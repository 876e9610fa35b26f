"""`editrt harmonize IMG MASK` and `--prompts FILE` on every command that uses task prompts (reposition, inpaint,
outpaint, harmonize), with named prompt sets: `outpaint` for outpainting (else `complete`), `inpaint`, ...
64 px, 2 steps. A prompt's effect is shown by equality: a file whose `outpaint` is X outpaints exactly like a file
whose `complete` is X (and no outpaint key)."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from editrt.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_weights):
    from skimage import data

    d = tmp_path_factory.mktemp("prompts")
    Image.fromarray(np.ascontiguousarray(data.chelsea()[100:164, 150:214])).save(d / "photo.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 10:30] = 255
    Image.fromarray(mask).save(d / "mask.png")
    base = load_file(str(tiny_weights / "task_prompts.safetensors"))
    other = torch.randn(base["null"].shape, generator=torch.Generator().manual_seed(7))
    save_file({**base, "outpaint": other, "inpaint": other.clone()}, str(d / "named.safetensors"))
    save_file({**base, "complete": other, "remove": other.clone(), "harmonize": other.clone()},
              str(d / "swapped.safetensors"))
    save_file({k: v for k, v in base.items() if k != "harmonize"}, str(d / "no_harmonize.safetensors"))
    save_file({**base, "outpaint": other[:, :-1].contiguous()}, str(d / "narrow.safetensors"))
    (d / "garbage.safetensors").write_bytes(b"not tensors")
    return d


def run(capsys, *argv, weights):
    rc = main([str(a) for a in [*argv, "--weights", weights, "--steps", "2", "--resolution", "64", "--quiet"]])
    return rc, capsys.readouterr().err


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_harmonize_command(files, tiny_weights, tmp_path, capsys):
    from editrt.runtime.reposition import RepositionPipeline

    rc, err = run(capsys, "harmonize", files / "photo.png", files / "mask.png", "-o", tmp_path / "h.png",
                  weights=tiny_weights)
    assert rc == 0, err
    photo, out = image(files / "photo.png"), image(tmp_path / "h.png")
    inside = np.asarray(Image.open(files / "mask.png")) > 127
    np.testing.assert_array_equal(out[~inside], photo[~inside])
    assert (out[inside] != photo[inside]).any()
    api = RepositionPipeline.from_pretrained(tiny_weights).harmonize(photo, inside, steps=2, resolution=64)
    np.testing.assert_array_equal(out, np.asarray(api))
    rc, err = run(capsys, "harmonize", files / "photo.png", files / "mask.png", "--lora-scale", "0", "-o",
                  tmp_path / "h0.png", weights=tiny_weights)
    assert rc == 0, err
    assert (image(tmp_path / "h0.png") != out).any()  # the LoRA's scale reaches the pass


def test_outpaint_uses_the_outpaint_prompt_when_present(files, tiny_weights, tmp_path, capsys):
    for name, prompts in (("default", ()), ("named", ("--prompts", files / "named.safetensors")),
                          ("swapped", ("--prompts", files / "swapped.safetensors"))):
        rc, err = run(capsys, "outpaint", files / "photo.png", "--extend=16,0,0,0", *prompts, "-o",
                      tmp_path / f"{name}.png", weights=tiny_weights)
        assert rc == 0, err
    named, swapped, default = (image(tmp_path / f"{n}.png") for n in ("named", "swapped", "default"))
    np.testing.assert_array_equal(named, swapped)  # outpaint = X  ==  complete = X (no outpaint key)
    assert (named != default).any()


def test_prompts_reach_inpaint_reposition_and_harmonize(files, tiny_weights, tmp_path, capsys):
    photo, mask = files / "photo.png", files / "mask.png"
    commands = {"inpaint": ("inpaint", photo, mask), "harmonize": ("harmonize", photo, mask),
                "reposition": ("reposition", photo, "--mask", mask, "--move", "8,2")}
    for name, argv in commands.items():
        outs = []
        for i, prompts in enumerate(((), ("--prompts", files / "swapped.safetensors"))):
            rc, err = run(capsys, *argv, *prompts, "-o", tmp_path / f"{name}{i}.png", weights=tiny_weights)
            assert rc == 0, (name, err)
            outs.append(image(tmp_path / f"{name}{i}.png"))
        assert (outs[0] != outs[1]).any(), name
    # a named prompt is an inpainting task: --task inpaint with inpaint = X is --task remove with remove = X
    rc, err = run(capsys, "inpaint", photo, mask, "--task", "inpaint", "--prompts", files / "named.safetensors",
                  "-o", tmp_path / "named_inpaint.png", weights=tiny_weights)
    assert rc == 0, err
    np.testing.assert_array_equal(image(tmp_path / "named_inpaint.png"), image(tmp_path / "inpaint1.png"))


@pytest.mark.parametrize("prompts,match", [
    ("missing.safetensors", "--prompts {d}/missing.safetensors: no such file"),
    ("garbage.safetensors", "--prompts {d}/garbage.safetensors: not a readable safetensors file"),
    ("no_harmonize.safetensors", "--prompts {d}/no_harmonize.safetensors: missing keys ['harmonize']"),
    ("narrow.safetensors", "--prompts {d}/narrow.safetensors: 'outpaint' has shape"),
])
def test_bad_prompts_file_one_line(files, tiny_weights, tmp_path, capsys, prompts, match):
    rc, err = run(capsys, "outpaint", files / "photo.png", "--extend=16,0,0,0", "--prompts", files / prompts,
                  "-o", tmp_path / "o.png", weights=tiny_weights)
    assert rc == 2 and match.format(d=files) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists()


def test_unknown_task_names_the_loaded_prompts(files, tiny_weights, tmp_path, capsys):
    rc, err = run(capsys, "inpaint", files / "photo.png", files / "mask.png", "--task", "inpaint", "-o",
                  tmp_path / "i.png", weights=tiny_weights)
    assert rc == 2 and "task: expected 'remove' or 'complete', got 'inpaint'" in err
    rc, err = run(capsys, "inpaint", files / "photo.png", files / "mask.png", "--task", "sharpen", "--prompts",
                  files / "named.safetensors", "-o", tmp_path / "i.png", weights=tiny_weights)
    assert rc == 2 and "task: expected 'remove', 'complete', 'inpaint' or 'outpaint', got 'sharpen'" in err
