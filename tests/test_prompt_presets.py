"""`editrt weights prompts --preset` (SEELE Table 1's SD baselines) and `--from-embedding` (textual inversion).

Oracle: diffusers' StableDiffusionInpaintPipeline on the same tiny inpainting folder: `encode_prompt` for the preset
texts, and `load_textual_inversion` + `encode_prompt` for embeddings. Tolerance: exact (the same tokens through the
same CLIP forward at batch 1 in fp32 on CPU give the same bits).
"""
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from editrt.cli import main
from editrt.errors import InputError
from editrt.prompts import write_prompts_from_embedding, write_prompts_from_preset

# The paper's texts (paper 000 Sec. 4, "Competitors and setup on ReS"), typed here from the paper, not from the code.
PAPER = {
    "sd-no": {"remove": "", "complete": ""},
    "sd-simple": {"remove": "inpaint", "complete": "complete the subject"},
    "sd-complex": {
        "remove": "Incorporate visually cohesive and high-fidelity background and texture into the provided image "
                  "through inpainting",
        "complete": "Complete the subject by filling in the missing region with visually cohesive and high-fidelity "
                    "background and texture",
    },
}


def fresh_pipe(folder):
    """A pipeline of its own: load_textual_inversion changes its tokenizer and text encoder."""
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        folder, local_files_only=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(pipe, text):
    positive, negative = pipe.encode_prompt(text, "cpu", 1, do_classifier_free_guidance=True, negative_prompt="")
    return positive[0], negative[0]  # (77, C) each


def metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def weights(tiny_weights, tmp_path_factory):
    return shutil.copytree(tiny_weights, tmp_path_factory.mktemp("presets") / "w")


@pytest.fixture(scope="module")
def plain_pipe(weights):
    return fresh_pipe(weights / "inpaint")


@pytest.mark.parametrize("preset", ["sd-no", "sd-simple", "sd-complex"])
def test_presets_are_diffusers_text_embeddings_of_the_papers_texts(weights, plain_pipe, tmp_path, preset):
    lines = []
    out = write_prompts_from_preset(weights, preset, output=tmp_path / "p.safetensors", log=lines.append)
    ours = load_file(str(out))
    texts = {**PAPER[preset], "harmonize": ""}
    for task, text in texts.items():
        positive, negative = encode(plain_pipe, text)
        assert ours[task].shape == (77, 32), task  # all 77 positions, not cut to 50
        assert torch.equal(ours[task], positive), task
    assert torch.equal(ours["null"], encode(plain_pipe, "")[1])
    meta = metadata(out)
    assert json.loads(meta["texts"]) == texts and meta["preset"] == preset and meta["tokens"] == "77"
    assert meta["not_from_paper"] == "harmonize" and "Sec. 4" in meta["preset_source"]
    assert any(line.startswith("harmonize: the paper gives no text") for line in lines), lines


def test_preset_with_a_harmonize_text_and_what_it_refuses(weights, plain_pipe, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    args = ["weights", "prompts", str(weights), "--preset", "sd-simple", "--from-text", "harmonize=match the light",
            "-o", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    ours = load_file(str(out))
    assert torch.equal(ours["harmonize"], encode(plain_pipe, "match the light")[0])
    assert torch.equal(ours["complete"], encode(plain_pipe, "complete the subject")[0])
    assert metadata(out)["not_from_paper"] == "harmonize"
    capsys.readouterr()
    out.unlink()
    for extra, message in [(["--from-text", "remove=erase"], "--preset sd-simple quotes the paper's text for remove"),
                           (["--tokens", "50"], "--preset encodes all 77 positions"),
                           (["--from-embedding", str(tmp_path / "e.bin")], "give it alone")]:
        rc = main(["weights", "prompts", str(weights), "--preset", "sd-simple", "-o", str(out)] + extra)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_single_vector_embedding_equals_diffusers_load_textual_inversion(weights, tmp_path):
    torch.manual_seed(1)
    file = tmp_path / "learned_embeds.safetensors"
    save_file({"<gap>": torch.randn(1, 32)}, str(file))  # diffusers' train_textual_inversion layout
    text = "fill the <gap> with the sky"
    learned = load_file(str(weights / "task_prompts.safetensors"))  # the other tasks are kept from this file
    out = shutil.copy(weights / "task_prompts.safetensors", tmp_path / "p.safetensors")
    write_prompts_from_embedding(weights, file, "remove", text=text, output=out, tokens=50)
    ours = load_file(str(out))
    pipe = fresh_pipe(weights / "inpaint")
    pipe.load_textual_inversion(str(file))
    positive, negative = encode(pipe, text)
    assert torch.equal(ours["remove"], positive[:50])
    assert torch.equal(ours["null"], negative[:50])
    assert not torch.equal(ours["remove"], encode(fresh_pipe(weights / "inpaint"), text)[0][:50]), \
        "the embedding must change the encoding"
    assert torch.equal(ours["complete"], learned["complete"]) and torch.equal(ours["harmonize"], learned["harmonize"])
    write_prompts_from_embedding(weights, file, "complete", output=out)  # text: the token alone
    kept = load_file(str(out))
    assert torch.equal(kept["remove"], ours["remove"]) and torch.equal(kept["harmonize"], learned["harmonize"])
    assert torch.equal(kept["complete"], encode(pipe, "<gap>")[0][:50])
    meta = metadata(out)
    assert meta["init"] == "embedding" and meta["token"] == "<gap>" and meta["from_embedding"] == "complete"
    assert meta["kept"] == "remove,harmonize" and json.loads(meta["texts"])["complete"] == "<gap>"


@pytest.mark.parametrize("layout", ["diffusers", "a1111"])
def test_multi_vector_bin_embedding_equals_diffusers_through_the_cli(weights, tmp_path, capsys, layout):
    torch.manual_seed(2)
    vectors = torch.randn(3, 32)
    file = tmp_path / "learned_embeds.bin"
    torch.save({"<style>": vectors} if layout == "diffusers" else
               {"name": "<style>", "string_to_param": {"*": vectors}}, file)
    folder = shutil.copytree(weights, tmp_path / "w")
    write_prompts_from_preset(folder, "sd-simple")  # 77-token remove and complete, kept below
    text = "a photo in <style> light"
    args = ["weights", "prompts", str(folder), "--from-embedding", str(file), "--task", "harmonize", "--text", text,
            "--tokens", "77"]
    assert main(args) == 0, capsys.readouterr().err
    assert "task prompt harmonize from" in capsys.readouterr().err
    ours = load_file(str(folder / "task_prompts.safetensors"))
    pipe = fresh_pipe(weights / "inpaint")
    pipe.load_textual_inversion(str(file))
    assert "<style>_2" in pipe.tokenizer.get_vocab()  # three tokens: <style> <style>_1 <style>_2
    assert torch.equal(ours["harmonize"], encode(pipe, text)[0])
    assert torch.equal(ours["remove"], encode(fresh_pipe(weights / "inpaint"), "inpaint")[0])
    assert metadata(folder / "task_prompts.safetensors")["vectors"] == "3"


def _bad_files(d):
    """name -> (writer, expected message)."""
    return {
        "missing": (lambda p: None, "no such file"),
        "garbage.safetensors": (lambda p: p.write_bytes(b"not safetensors"), "not a readable safetensors file"),
        "garbage.bin": (lambda p: p.write_bytes(b"not a pickle"), "not a readable torch file"),
        "e.txt": (lambda p: p.write_text("x"), "expected a .safetensors or .bin"),
        "two.safetensors": (lambda p: save_file({"<a>": torch.zeros(1, 32), "<b>": torch.zeros(1, 32)}, str(p)),
                            "holds ['<a>', '<b>']; expected one {token: [n, C] tensor}"),
        "wide.safetensors": (lambda p: save_file({"<a>": torch.zeros(2, 64)}, str(p)), "[2, 64]; expected [n, 32]"),
        "int.safetensors": (lambda p: save_file({"<a>": torch.zeros(1, 32, dtype=torch.int32)}, str(p)),
                            "expected a float [n, C] or [C] tensor"),
        "cube.safetensors": (lambda p: save_file({"<a>": torch.zeros(1, 2, 32)}, str(p)),
                             "expected a float [n, C] or [C] tensor"),
        "nan.safetensors": (lambda p: save_file({"<a>": torch.full((1, 32), float("nan"))}, str(p)),
                            "NaN or infinite"),
        "known.safetensors": (lambda p: save_file({"a": torch.zeros(1, 32)}, str(p)), "token 'a' is already in"),
        "spaced.safetensors": (lambda p: save_file({"<a b>": torch.zeros(1, 32)}, str(p)),
                               "expected a non-empty name without spaces"),
    }


@pytest.mark.parametrize("name", list(_bad_files(None)))
def test_bad_embedding_files_are_one_line_and_write_nothing(weights, tmp_path, capsys, name):
    write, message = _bad_files(tmp_path)[name]
    files = tmp_path / "in"
    files.mkdir()
    file = files / name
    write(file)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=r"^--from-embedding .*" + message.replace("[", r"\[").replace("]", r"\]")
                       .replace("{", r"\{").replace("}", r"\}")) as error:
        write_prompts_from_embedding(weights, file, "remove", output=out / "p.safetensors")
    assert error.value.field == "from_embedding"
    rc = main(["weights", "prompts", str(weights), "--from-embedding", str(file), "--task", "remove",
               "-o", str(out / "p.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--from-embedding" in err and message in err, err
    assert list(out.iterdir()) == []


def test_embedding_prompt_must_hold_the_token(weights, tmp_path):
    file = tmp_path / "e.safetensors"
    save_file({"<gap>": torch.zeros(1, 32)}, str(file))
    with pytest.raises(InputError, match="--text 'the sky': does not hold the token '<gap>'"):
        write_prompts_from_embedding(weights, file, "remove", text="the sky", output=tmp_path / "p.safetensors")
    with pytest.raises(InputError, match="--task 'null': expected one of remove, complete, harmonize"):
        write_prompts_from_embedding(weights, file, "null", output=tmp_path / "p.safetensors")
    with pytest.raises(InputError, match="--from-embedding writes one task's prompt; .*p.safetensors does not exist "
                                         "to keep complete, harmonize from"):
        write_prompts_from_embedding(weights, file, "remove", output=tmp_path / "p.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]
