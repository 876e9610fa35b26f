"""`editrt train harmonizer`: Eq. (2), the harmonize prompt and a LoRA, on tiny weights and a 4-pair
iHarmony4-layout folder (CPU, 32x32 crops, one torch thread)."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from editrt.errors import InputError
from editrt.models.components import WeightsLayout
from editrt.models.inpaint import load_unet, load_vae
from editrt.models.lora import FusedLoRA, load_lora
from editrt.train.data import check_iharmony
from editrt.train.harmonizer import (
    HarmonizerParams,
    HarmonizerSettings,
    HarmonySamples,
    harmonizer_loss,
    train_harmonizer,
)
from editrt.train.inversion import FrozenInpainter, initial_prompt
from editrt.train.job import LoopSettings

RESOLUTION = 32
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # both attentions, as the tiny weights' own LoRA


def _train(weights, data, tmp_path, name, on_step=None, **loop):
    options = dict(steps=2, batch_size=2, micro_batch=1, lr=1e-2, val_samples=2, val_every=2, save_every=2,
                   workers=0, cpu=True, quiet=True, checkpoints=tmp_path / f"{name}-ck", log=tmp_path / f"{name}.jsonl")
    options.update(loop)
    settings = HarmonizerSettings(weights=Path(weights), data=Path(data), output=tmp_path / f"{name}-prompts.safetensors",
                                  lora_output=tmp_path / f"{name}-lora.safetensors", rank=4, targets=TARGETS,
                                  resolution=RESOLUTION)
    return train_harmonizer(settings, LoopSettings(**options), on_step=on_step)


def _batch(data, frozen, indices=(0, 1)):
    samples = HarmonySamples(check_iharmony(data), "harmonize", RESOLUTION, 0, 0, frozen.latent_shape(RESOLUTION), 1000)
    items = [samples[i] for i in indices]
    return {k: torch.stack([s[k] for s in items]) for k in items[0]}


@pytest.fixture(scope="module")
def trained(tiny_weights, iharmony_dataset, tmp_path_factory):
    return _train(tiny_weights, iharmony_dataset, tmp_path_factory.mktemp("harmonizer"), "run")


def test_only_the_prompt_and_the_lora_are_trained(trained, tiny_weights, iharmony_dataset):
    layout = WeightsLayout(tiny_weights)
    for frozen, fresh in ((trained.frozen.unet, load_unet(layout.unet)), (trained.frozen.vae, load_vae(layout.vae))):
        fresh_params = dict(fresh.named_parameters())
        for name, p in frozen.named_parameters():
            assert not p.requires_grad and p.grad is None and torch.equal(p, fresh_params[name]), name
    loss = harmonizer_loss(trained.frozen, trained.params, _batch(iharmony_dataset, trained.frozen)).mean()
    loss.backward()
    with_grad = {n for m in (trained.frozen.unet, trained.frozen.vae, trained.params) for n, p in m.named_parameters()
                 if p.grad is not None}
    assert with_grad == {n for n, _ in trained.params.named_parameters()}
    assert len(trained.params.names) == 32 and all(trained.params.up[i].abs().sum() > 0 for i in range(32))


def test_the_written_lora_fused_by_the_runtime_is_the_trained_unet(trained, tiny_weights, iharmony_dataset):
    """models/lora.FusedLoRA at c = 1 on a fresh UNet (the runtime's harmonizer) = the training-time UNet + hooks."""
    layout = WeightsLayout(tiny_weights)
    layers = load_lora(trained.lora_output)
    assert set(layers) == set(trained.params.names) and all(v.down.shape[0] == 4 for v in layers.values())
    batch = _batch(iharmony_dataset, trained.frozen)
    x, t, _ = trained.frozen.model_input(batch, whole_condition=True)
    embeds = load_file(str(trained.output))["harmonize"][None].expand(2, -1, -1)
    with torch.no_grad():
        hooked = trained.frozen.unet(x, t, encoder_hidden_states=embeds).sample
        unet = load_unet(layout.unet)
        base = unet(x, t, encoder_hidden_states=embeds).sample
        FusedLoRA(unet, layers).set_scale(1.0)
        fused = unet(x, t, encoder_hidden_states=embeds).sample
    assert (hooked - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(fused, hooked, rtol=1e-5, atol=1e-5)


def test_the_unet_is_conditioned_on_the_whole_composite(trained, iharmony_dataset):
    """Eq. (2)'s input [x_t, m, x]: the condition latents are the VAE encoding of the composite, hole included."""
    frozen, batch = trained.frozen, _batch(iharmony_dataset, trained.frozen)
    seen = []
    handle = frozen.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            harmonizer_loss(frozen, trained.params, batch)
    finally:
        handle.remove()
    whole = frozen.encoder(batch["image"], batch["posterior_noise"][:, 1])
    assert torch.equal(seen[0][:, 5:], whole)


def test_lora_and_prompt_gradients_match_a_finite_difference(tiny_weights, iharmony_dataset):
    layout = WeightsLayout(tiny_weights)
    frozen = FrozenInpainter(layout, "cpu", torch.float64)
    params = HarmonizerParams(initial_prompt(layout, "harmonize", 50), frozen.unet, TARGETS, 2, seed=0).double()
    with torch.no_grad():
        for up in params.up:  # B = 0 at the start would leave A's gradient 0: test from a non-zero B
            up.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    params.attach(frozen.unet)
    batch = _batch(iharmony_dataset, frozen)
    g = torch.Generator().manual_seed(0)
    directions = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params.parameters()]
    harmonizer_loss(frozen, params, batch).mean().backward()
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params.parameters(), directions))
    start = [p.detach().clone() for p in params.parameters()]

    def loss_at(h):
        with torch.no_grad():
            for p, p0, d in zip(params.parameters(), start, directions):
                p.copy_(p0 + h * d)
            return float(harmonizer_loss(frozen, params, batch).mean())
    h = 1e-5
    numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)
    assert abs(analytic) > 1e-4


def test_trained_files_load_through_weights_and_change_harmonize(tiny_weights, iharmony_dataset, tmp_path, photo):
    from editrt.cli import main
    from editrt.runtime.reposition import RepositionPipeline

    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    mask = np.zeros((64, 96), bool)
    mask[16:48, 24:72] = True
    image = photo[:64, :96]

    def harmonized():
        pipe = RepositionPipeline.from_pretrained(weights)
        return np.asarray(pipe.harmonize(image, mask, steps=2, resolution=64))
    before, prompts_before = harmonized(), load_file(str(weights / "task_prompts.safetensors"))
    assert main(["train", "harmonizer", "--weights", str(weights), "--data", str(iharmony_dataset), "--steps", "1",
                 "--batch-size", "2", "--micro-batch", "1", "--resolution", str(RESOLUTION), "--lr", "0.5",
                 "--lora-rank", "2", "--lora-targets", "attn1.to_q,attn1.to_v", "--val-samples", "0", "--workers", "0",
                 "--cpu", "--quiet", "--checkpoints", str(tmp_path / "ck")]) == 0
    prompts = load_file(str(weights / "task_prompts.safetensors"))
    assert not torch.equal(prompts["harmonize"], prompts_before["harmonize"])
    assert all(torch.equal(prompts[k], prompts_before[k]) for k in ("remove", "complete", "null"))
    assert all(".attn1.to_q" in n or ".attn1.to_v" in n for n in load_lora(weights / "harmonizer_lora.safetensors"))
    after = harmonized()
    assert not np.array_equal(before, after) and np.array_equal(before[~mask], after[~mask])


@pytest.mark.parametrize("how", ["no mask", "no list", "size differs"])
def test_a_bad_iharmony_folder_is_one_error_naming_the_file(tmp_path, how):
    from train_fixtures import write_iharmony_dataset

    folder = write_iharmony_dataset(tmp_path / "data")
    if how == "no mask":
        bad = sorted((folder / "masks").iterdir())[1]
        bad.unlink()
    elif how == "no list":
        bad = folder
        (folder / "HTest_train.txt").unlink()
    else:
        from PIL import Image

        bad = sorted((folder / "real_images").iterdir())[0]
        Image.new("RGB", (7, 7)).save(bad)
    with pytest.raises(InputError) as e:
        check_iharmony(folder)
    assert str(bad) in str(e.value)


def test_an_interrupted_harmonizer_run_resumes_to_the_same_files(tiny_weights, iharmony_dataset, tmp_path):
    """Prompt and LoRA (and AdamW's state for both) go through accelerate's save_state / load_state."""
    whole = _train(tiny_weights, iharmony_dataset, tmp_path, "whole", steps=3, save_every=1, val_every=1)

    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_weights, iharmony_dataset, tmp_path, "parts", steps=3, save_every=1, val_every=1,
               on_step=interrupt)
    resumed = _train(tiny_weights, iharmony_dataset, tmp_path, "parts", steps=3, save_every=1, val_every=1,
                     resume="latest")
    for a, b in ((whole.output, resumed.output), (whole.lora_output, resumed.lora_output)):
        x, y = load_file(str(a)), load_file(str(b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
