"""Task prompts from text (`editrt weights prompts --from-text`, paper App. A.2) against diffusers.

Oracle: diffusers' StableDiffusionInpaintPipeline.encode_prompt on the same inpainting folder
(text encoder + tokenizer). Tolerance: exact. The same tokenizer call and the same CLIP forward at
batch 1 in fp32 on CPU give the same bits; any difference means the tokenization (padding,
truncation, attention mask) or the slicing diverged.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from editrt.cli import main
from editrt.errors import InputError, WeightsError
from editrt.models.inpaint import load_task_prompts
from editrt.prompts import write_prompts_from_text

TEXTS = {
    "remove": "remove the object and fill in the background",
    # longer than 50 tokens with the tiny tokenizer (mostly one token per letter), and than 77
    "complete": "complete the partially hidden subject so that its missing parts continue its visible shape and texture",
    "harmonize": "",  # the empty text is allowed (SD with no prompt)
}


def oracle(folder):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        folder, local_files_only=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def weights(tiny_weights, tmp_path_factory):
    """A private copy of the tiny weights (the session's copy must keep its learned random prompts)."""
    return shutil.copytree(tiny_weights, tmp_path_factory.mktemp("prompts") / "w")


@pytest.fixture(scope="module")
def diffusers_pipe(weights):
    return oracle(weights / "inpaint")


def encode(pipe, text):
    positive, negative = pipe.encode_prompt(text, "cpu", 1, do_classifier_free_guidance=True, negative_prompt="")
    return positive[0], negative[0]  # (77, C) each


def test_prompts_equal_diffusers_encode_prompt(weights, diffusers_pipe, tmp_path):
    lines = []
    out = write_prompts_from_text(weights, TEXTS, output=tmp_path / "p.safetensors", log=lines.append)
    ours = load_file(str(out))
    assert set(ours) == {"remove", "complete", "harmonize", "null"}
    for task, text in TEXTS.items():
        positive, negative = encode(diffusers_pipe, text)
        assert ours[task].shape == (50, 32) and ours[task].dtype == torch.float32
        assert torch.equal(ours[task], positive[:50]), task
        assert torch.equal(ours["null"], negative[:50])
    assert diffusers_pipe.tokenizer(TEXTS["complete"], verbose=False).input_ids.__len__() > 77
    assert any(line.startswith("complete: the text is") and "first 50 positions" in line for line in lines), lines
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["init"] == "text" and json.loads(meta["texts"]) == TEXTS and meta["tokens"] == "50"
    assert meta["from_text"] == "remove,complete,harmonize" and meta["kept"] == ""
    # the file loads as task prompts of the UNet's width
    assert set(load_task_prompts(out, 32)) == {"remove", "complete", "harmonize", "null"}


def test_other_lengths_are_prefixes_of_the_same_encoding(weights, diffusers_pipe, tmp_path):
    texts = {"remove": "a cat", "complete": "the dog", "harmonize": "photo"}
    for tokens in (7, 77):
        out = load_file(str(write_prompts_from_text(weights, texts, output=tmp_path / f"{tokens}.safetensors",
                                                    tokens=tokens)))
        for task, text in texts.items():
            assert torch.equal(out[task], encode(diffusers_pipe, text)[0][:tokens])


def test_text_encoder_asking_for_an_attention_mask_is_followed(weights, tmp_path):
    """A CLIP config with use_attention_mask (diffusers honours it): the padding is masked as diffusers masks it."""
    folder = shutil.copytree(weights, tmp_path / "w")
    config_path = folder / "inpaint" / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_attention_mask": True}))
    pipe = oracle(folder / "inpaint")
    texts = {"remove": "remove it", "complete": "complete it", "harmonize": "harmonize"}
    ours = load_file(str(write_prompts_from_text(folder, texts)))
    for task, text in texts.items():
        assert torch.equal(ours[task], encode(pipe, text)[0][:50]), task
    unmasked = load_file(str(write_prompts_from_text(weights, texts, output=tmp_path / "plain.safetensors")))
    assert not torch.equal(unmasked["remove"], ours["remove"]), "the mask must change the padding positions"


def test_tasks_not_given_are_kept_from_the_existing_file(weights, diffusers_pipe, tmp_path):
    out = tmp_path / "p.safetensors"
    shutil.copy(weights / "task_prompts.safetensors", out)  # learned (random) prompts
    learned = load_file(str(out))
    lines = []
    write_prompts_from_text(weights, {"harmonize": "match the lighting"}, output=out, log=lines.append)
    now = load_file(str(out))
    assert torch.equal(now["remove"], learned["remove"]) and torch.equal(now["complete"], learned["complete"])
    assert torch.equal(now["harmonize"], encode(diffusers_pipe, "match the lighting")[0][:50])
    assert torch.equal(now["null"], encode(diffusers_pipe, "")[1][:50])  # null is always the empty prompt's
    assert any("kept remove, complete" in line for line in lines)
    # a second merge keeps the first one's text in the metadata
    write_prompts_from_text(weights, {"remove": "erase"}, output=out)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["texts"]) == {"remove": "erase", "harmonize": "match the lighting"}
    assert meta["from_text"] == "remove,harmonize" and meta["kept"] == "complete,harmonize"
    assert torch.equal(load_file(str(out))["complete"], learned["complete"])


def test_missing_tasks_without_a_file_to_keep_them_from(weights, tmp_path):
    out = tmp_path / "new.safetensors"
    with pytest.raises(InputError, match=r"no text for complete, harmonize and .*new.safetensors does not exist"):
        write_prompts_from_text(weights, {"remove": "erase"}, output=out)
    assert not out.exists()


@pytest.mark.parametrize("texts,kwargs,error,match", [
    ({}, {}, InputError, "expected TASK=TEXT"),
    ({"sharpen": "x"}, {}, InputError, "unknown task 'sharpen'; expected remove, complete, harmonize"),
    ({"null": "x", "remove": "a", "complete": "b", "harmonize": "c"}, {}, InputError, "null is always the empty prompt"),
    ({"remove": 3, "complete": "b", "harmonize": "c"}, {}, InputError, "remove: expected a text, got int"),
    (TEXTS, {"tokens": 0}, InputError, "--tokens 0: expected a positive integer"),
    (TEXTS, {"tokens": 78}, InputError, "--tokens 78: the text encoder gives 77 positions"),
    (TEXTS, {"output": "p.pt"}, InputError, "expected a .safetensors file name"),
    ({"remove": "a"}, {"tokens": 20, "keep": True}, InputError, r"holds 50-token prompts, kept for complete, harmonize"),
])
def test_bad_input_writes_nothing(weights, tmp_path, texts, kwargs, error, match):
    out = tmp_path / "p.safetensors"
    if kwargs.pop("keep", False):
        shutil.copy(weights / "task_prompts.safetensors", out)
    before = out.read_bytes() if out.exists() else None
    kwargs.setdefault("output", out)
    with pytest.raises(error, match=match):
        write_prompts_from_text(weights, texts, **kwargs)
    assert (out.read_bytes() if out.exists() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if before is None else ["p.safetensors"])


def test_weights_problems_name_the_file(weights, tmp_path):
    folder = shutil.copytree(weights, tmp_path / "w")
    shutil.rmtree(folder / "inpaint" / "text_encoder")
    with pytest.raises(WeightsError, match="text_encoder/config.json: missing; expected a transformers CLIPTextModel"):
        write_prompts_from_text(folder, TEXTS)
    folder = shutil.copytree(weights, tmp_path / "w2")
    unet_config = folder / "inpaint" / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "cross_attention_dim": 64}))
    with pytest.raises(WeightsError, match="hidden_size 32, but the UNet's cross_attention_dim is 64"):
        write_prompts_from_text(folder, TEXTS)
    folder = shutil.copytree(weights, tmp_path / "w3")
    prompts = folder / "task_prompts.safetensors"
    save_file({"remove": torch.zeros(50, 32)}, str(prompts))  # the existing file is not task prompts
    with pytest.raises(WeightsError, match="missing keys"):
        write_prompts_from_text(folder, {"remove": "a"})


def test_a_failed_write_leaves_the_old_file(weights, tmp_path, monkeypatch):
    import editrt.prompts

    out = tmp_path / "p.safetensors"
    shutil.copy(weights / "task_prompts.safetensors", out)
    before = out.read_bytes()

    def broken(path, *args, **kwargs):
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(editrt.prompts, "save_task_prompts", broken)
    with pytest.raises(OSError, match="disk full"):
        write_prompts_from_text(weights, TEXTS, output=out)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_cli_prompts_then_inpaint_equals_diffusers_with_the_text(weights, diffusers_pipe, tmp_path, capsys):
    """End to end: with --tokens 77 the prompts are diffusers' own text embeddings, so `editrt inpaint`
    with them equals diffusers' pipeline given the *text* prompt and negative_prompt=""."""
    folder = shutil.copytree(weights, tmp_path / "w")
    args = ["weights", "prompts", folder, "--from-text", "remove=erase the thing", "complete=complete=it",
            "harmonize=blend in", "--tokens", "77"]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    assert "task prompts from text ->" in capsys.readouterr().err
    prompts = load_file(str(folder / "task_prompts.safetensors"))
    assert torch.equal(prompts["complete"], encode(diffusers_pipe, "complete=it")[0])  # the first '=' ends the name

    rng = np.random.default_rng()
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    y, x = rng.integers(0, 32, 2)
    mask[y:y + 24, x:x + 20] = 255
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    args = ["inpaint", tmp_path / "in.png", tmp_path / "mask.png", "-o", tmp_path / "out.png", "--weights", folder,
            "--steps", "2", "--guidance", "4", "--seed", "5", "--resolution", "64", "--quiet"]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    ours = np.asarray(Image.open(tmp_path / "out.png"))
    theirs = np.asarray(diffusers_pipe(
        prompt="erase the thing", negative_prompt="", image=Image.fromarray(image), mask_image=Image.fromarray(mask),
        height=64, width=64, num_inference_steps=2, guidance_scale=4.0,
        generator=torch.Generator("cpu").manual_seed(5)).images[0])
    inside = mask > 127
    np.testing.assert_array_equal(ours[inside], theirs[inside])
    np.testing.assert_array_equal(ours[~inside], image[~inside])


def test_cli_errors_are_one_line(weights, tmp_path, capsys):
    rc = main(["weights", "prompts", str(weights), "--from-text", "remove", "-o", str(tmp_path / "p.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "expected TASK=TEXT" in err
    rc = main(["weights", "prompts", str(weights), "--from-text", "remove=a", "-o", str(tmp_path / "p.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no text for complete, harmonize" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_full_sd2_text_encoder_gives_50_by_1024(tmp_path):
    """The `full` config's text encoder (SD-2's OpenCLIP ViT-H text tower, 23 layers, 1024 wide): [50, 1024] prompts,
    equal to transformers' CLIPTextModel on the same folder (diffusers would need the 3.4 GB UNet here)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from editrt.models.components import WeightsLayout
    from editrt.models.text import random_text_encoder, write_tiny_tokenizer
    from editrt.weights import load_config

    config = load_config("full")["inpaint"]
    layout = WeightsLayout(tmp_path / "w")
    layout.unet.mkdir(parents=True)
    (layout.unet / "config.json").write_text(json.dumps(config["unet"]))  # only its cross_attention_dim is read
    vocab = write_tiny_tokenizer(layout.tokenizer)
    torch.manual_seed(0)
    random_text_encoder(config["text_encoder"], vocab).save_pretrained(layout.text_encoder)
    texts = {"remove": "remove it", "complete": "complete it", "harmonize": "harmonize it"}
    ours = load_file(str(write_prompts_from_text(layout.root, texts)))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: (50, 1024) for k in ("remove", "complete", "harmonize", "null")}
    model = CLIPTextModel.from_pretrained(layout.text_encoder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(layout.tokenizer)
    with torch.no_grad():
        ids = tokenizer("complete it", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ours["complete"], model(ids).last_hidden_state[0, :50])
