"""`editrt weights init` writes the real formats; every loader reads exactly that layout."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editrt.errors import InputError, WeightsError
from editrt.runtime.reposition import RepositionPipeline
from editrt.weights import WeightsLayout, init_weights


def test_layout_is_complete(tiny_weights):
    layout = WeightsLayout(tiny_weights)
    index = json.loads((layout.inpaint / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    unet_cfg = json.loads((layout.unet / "config.json").read_text())
    assert unet_cfg["in_channels"] == 9 and unet_cfg["use_linear_projection"] is True
    with safe_open(str(layout.task_prompts), "pt") as f:
        assert set(f.keys()) == {"remove", "complete", "harmonize", "null"}
        meta = f.metadata()
        assert json.loads(meta["shape"]) == [50, unet_cfg["cross_attention_dim"]]
        assert "encoder_hidden_states" in meta["content"] and "stable-diffusion-2-inpainting" in meta["base_model"]
    with safe_open(str(layout.harmonizer_lora), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")) for k in keys)
    assert any(".attn2.to_k." in k for k in keys) and any(".attn1.to_out.0." in k for k in keys)
    assert json.loads((layout.sam / "config.json").read_text())["architecture"] == "custom"


def test_round_trip_same_seed_same_weights(tiny_weights, tmp_path):
    again = init_weights(tmp_path / "again", "tiny", seed=0)
    a, b = RepositionPipeline.from_pretrained(tiny_weights), RepositionPipeline.from_pretrained(again)
    for (name, p), (_, q) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(p, q), name
    for (name, p), (_, q) in zip(a.sam.state_dict().items(), b.sam.state_dict().items()):
        assert torch.equal(p, q), name
    other = init_weights(tmp_path / "other", "tiny", seed=1)
    c = RepositionPipeline.from_pretrained(other)
    assert not torch.equal(a.task_prompts["remove"], c.task_prompts["remove"])


def test_init_refuses_non_empty_dir_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(InputError, match="not empty"):
        init_weights(tmp_path / "full", "tiny")
    import editrt.weights as w

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(w, "_write_sam", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        init_weights(tmp_path / "new", "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_write_dir_atomic_replaces_an_empty_folder_and_leaves_nothing_on_failure(tmp_path):
    from editrt.models.files import write_dir_atomic

    def write(folder):
        (folder / "a.txt").write_text("a")
        (folder / "sub").mkdir()
        (folder / "sub" / "b.txt").write_text("b")

    (tmp_path / "empty").mkdir()
    out = write_dir_atomic(tmp_path / "empty", write)
    assert (out / "sub" / "b.txt").read_text() == "b" and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]

    def half(folder):
        (folder / "a.txt").write_text("a")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_dir_atomic(tmp_path / "new", half)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no temporary sibling, no half folder
    with pytest.raises(InputError, match="not empty"):
        write_dir_atomic(tmp_path / "empty", write)


def copy_weights(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return WeightsLayout(dst)


@pytest.mark.parametrize("damage,match", [
    (lambda L: (L.unet / "diffusion_pytorch_model.safetensors").unlink(), r"unet: no diffusion_pytorch_model"),
    (lambda L: (L.unet / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage" * 10), r"unet: cannot load"),
    (lambda L: (L.vae / "config.json").write_text("{not json"), r"vae/config.json: not valid JSON"),
    (lambda L: L.task_prompts.unlink(), r"task_prompts.safetensors: missing"),
    (lambda L: save_file({"remove": torch.zeros(50, 32)}, str(L.task_prompts)), r"task_prompts.safetensors: missing keys"),
    (lambda L: save_file({k: torch.zeros(50, 7) for k in ("remove", "complete", "harmonize", "null")}, str(L.task_prompts)),
     r"expected \[L, 32\]"),
    (lambda L: L.harmonizer_lora.write_bytes(b"\x00" * 5), r"harmonizer_lora.safetensors: not a readable"),
    (lambda L: save_file({"unet.nope.to_q.lora_A.weight": torch.zeros(4, 32), "unet.nope.to_q.lora_B.weight": torch.zeros(32, 4)},
                         str(L.harmonizer_lora)), r"'nope.to_q' is not a linear layer"),
    (lambda L: (L.sam / "config.json").unlink(), r"sam/config.json: missing"),
    (lambda L: (L.sam / "sam_tiny.pth").write_bytes(b"not a checkpoint"), r"sam_tiny.pth: not a readable"),
    (lambda L: (L.scheduler / "scheduler_config.json").unlink(), r"scheduler_config.json: missing"),
])
def test_missing_or_malformed_file_names_the_file(tiny_weights, tmp_path, damage, match):
    layout = copy_weights(tiny_weights, tmp_path / "w")
    damage(layout)
    with pytest.raises(WeightsError, match=match):
        RepositionPipeline.from_pretrained(layout.root)


def test_sam_checkpoint_of_other_architecture(tiny_weights, tmp_path):
    layout = copy_weights(tiny_weights, tmp_path / "w")
    cfg = json.loads((layout.sam / "config.json").read_text())
    cfg["encoder_depth"] = 3
    (layout.sam / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="does not match architecture"):
        RepositionPipeline.from_pretrained(layout.root)


def test_missing_directory():
    with pytest.raises(WeightsError, match="no such weights directory"):
        RepositionPipeline.from_pretrained("/nonexistent/weights")


def test_published_layout_loads_unchanged(tiny_weights, tmp_path):
    """A published SD-2 inpainting folder lists a text encoder and ships a PNDM scheduler config."""
    layout = copy_weights(tiny_weights, tmp_path / "w")
    index = json.loads((layout.inpaint / "model_index.json").read_text())
    index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"],
                 scheduler=["diffusers", "PNDMScheduler"])
    (layout.inpaint / "model_index.json").write_text(json.dumps(index))
    (layout.scheduler / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None,
    }))
    (layout.root / "editrt.json").unlink()
    pipe = RepositionPipeline.from_pretrained(layout.root)
    assert type(pipe).__name__ == "RepositionPipeline" and pipe.scheduler_config["steps_offset"] == 1


def test_lora_with_alpha_and_old_key_names(tiny_weights, tmp_path):
    """diffusers' older 'lora.down/up' names and an explicit alpha load too; alpha scales the delta."""
    from safetensors.torch import load_file

    from editrt.models.lora import load_lora

    new = load_file(str(WeightsLayout(tiny_weights).harmonizer_lora))
    old = {}
    for k, v in new.items():
        old[k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")] = v
        if k.endswith(".lora_A.weight"):
            old[k.replace(".lora_A.weight", ".alpha")] = torch.tensor(2.0)
    save_file(old, str(tmp_path / "old.safetensors"))
    a, b = load_lora(WeightsLayout(tiny_weights).harmonizer_lora), load_lora(tmp_path / "old.safetensors")
    assert a.keys() == b.keys()
    name = next(iter(a))
    torch.testing.assert_close(b[name].delta(), a[name].delta() * 2.0 / a[name].down.shape[0], rtol=0, atol=0)
