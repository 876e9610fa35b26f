"""`editrt train prompts`: SEELE task inversion (Eq. 1) on tiny weights and a 6-image dataset, on CPU.

Runs use 32x32 crops (4x4 latents), micro batches of one sample and one torch thread: the shared 2-core
machine runs a tiny UNet far faster single-threaded.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from editrt.cli import main
from editrt.models.components import WeightsLayout
from editrt.models.inpaint import load_unet, load_vae
from editrt.train.data import check_plain
from editrt.train.inversion import FrozenInpainter, InversionSettings, TaskPrompt, initial_prompt, train_task_prompt
from editrt.train.job import LoopSettings
from editrt.train.samples import InversionSamples

RESOLUTION = 32
# Two processes vs one: tests/train/test_processes.py (one launch for every job).


def _run(weights, data, tmp_path, name, on_step=None, **loop):
    options = dict(steps=2, batch_size=2, micro_batch=1, lr=1e-2, val_samples=2, val_every=2, save_every=2,
                   workers=0, cpu=True, quiet=True, checkpoints=tmp_path / f"{name}-ck", log=tmp_path / f"{name}.jsonl")
    options.update(loop)
    settings = InversionSettings(weights=Path(weights), task="remove", output=tmp_path / f"{name}.safetensors",
                                 data=Path(data), resolution=RESOLUTION)
    return train_task_prompt(settings, LoopSettings(**options), on_step=on_step)


def _batch(weights, data, frozen, indices=(0, 1, 2, 3), task="remove"):
    samples = InversionSamples(check_plain(data), task, RESOLUTION, 0, 0, frozen.latent_shape(RESOLUTION), 1000)
    items = [samples[i] for i in indices]
    return {k: torch.stack([s[k] for s in items]) for k in items[0]}


def _log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_only_the_prompt_is_trained_and_the_frozen_networks_stay_bit_identical(tiny_weights, plain_dataset, tmp_path):
    layout = WeightsLayout(tiny_weights)
    run = _run(tiny_weights, plain_dataset, tmp_path, "frozen")
    init = initial_prompt(layout, "Incorporate visually cohesive and high-fidelity background and texture into the "
                          "provided image through inpainting", 50)
    assert not torch.equal(run.prompt.prompt.detach(), init)  # the prompt moved
    for trained, fresh in ((run.frozen.unet, load_unet(layout.unet)), (run.frozen.vae, load_vae(layout.vae))):
        fresh_params = dict(fresh.named_parameters())
        for name, p in trained.named_parameters():
            assert not p.requires_grad and p.grad is None, name
            assert torch.equal(p, fresh_params[name]), name
    # one more backward: the prompt is the only tensor that receives a gradient
    loss = run.frozen.per_sample_loss(run.prompt, _batch(tiny_weights, plain_dataset, run.frozen)).mean()
    loss.backward()
    with_grad = [n for m in (run.frozen.unet, run.frozen.vae, run.prompt) for n, p in m.named_parameters()
                 if p.grad is not None]
    assert with_grad == ["prompt"] and run.prompt.prompt.grad.abs().sum() > 0


def test_the_condition_shows_nothing_of_the_masked_pixels(tiny_weights, plain_dataset):
    """Eq. (1)'s input [x_t, m, x * (1 - m)]: repainting the masked pixels changes x_t only."""
    frozen = FrozenInpainter(WeightsLayout(tiny_weights), "cpu", torch.float32)
    batch = _batch(tiny_weights, plain_dataset, frozen, indices=(0, 1))
    repainted = {**batch, "image": torch.where(batch["mask"] > 0.5, -batch["image"], batch["image"])}
    (a, t, _), (b, _, _) = frozen.model_input(batch), frozen.model_input(repainted)
    assert a.shape == (2, 9, 4, 4) and torch.equal(t, batch["timestep"])
    assert torch.equal(a[:, 4:], b[:, 4:])  # mask and condition latents: blind to the hole's content
    assert not torch.equal(a[:, :4], b[:, :4])  # the noised target latents do see it
    assert torch.equal(a[:, 4:5], torch.nn.functional.interpolate(batch["mask"], size=(4, 4)))


def test_the_loss_on_a_fixed_batch_falls_over_30_steps(tiny_weights, plain_dataset):
    layout = WeightsLayout(tiny_weights)
    frozen = FrozenInpainter(layout, "cpu", torch.float32)
    batch = _batch(tiny_weights, plain_dataset, frozen)
    prompt = TaskPrompt(initial_prompt(layout, "inpaint", 50))
    optimizer = torch.optim.AdamW(prompt.parameters(), lr=0.1, weight_decay=0.01)
    losses = []
    for _ in range(30):
        loss = frozen.per_sample_loss(prompt, batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[10] < losses[0] and losses[-1] < 0.9 * losses[0], losses


def test_one_gradient_matches_a_finite_difference(tiny_weights, plain_dataset):
    layout = WeightsLayout(tiny_weights)
    frozen = FrozenInpainter(layout, "cpu", torch.float64)  # float64: the difference quotient is exact enough
    batch = _batch(tiny_weights, plain_dataset, frozen, indices=(0, 1))
    prompt = TaskPrompt(initial_prompt(layout, "inpaint", 50)).double()
    direction = torch.randn(prompt.prompt.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    frozen.per_sample_loss(prompt, batch).mean().backward()
    analytic = float((prompt.prompt.grad * direction).sum())
    h = 1e-5
    with torch.no_grad():
        p0 = prompt.prompt.clone()
        prompt.prompt.copy_(p0 + h * direction)
        up = float(frozen.per_sample_loss(prompt, batch).mean())
        prompt.prompt.copy_(p0 - h * direction)
        down = float(frozen.per_sample_loss(prompt, batch).mean())
    numeric = (up - down) / (2 * h)
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)
    assert abs(analytic) > 1e-4  # a real slope, not 0 = 0


def test_interrupted_and_resumed_equals_uninterrupted(tiny_weights, plain_dataset, tmp_path):
    whole = _run(tiny_weights, plain_dataset, tmp_path, "whole", steps=4)

    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_weights, plain_dataset, tmp_path, "parts", steps=4, on_step=interrupt)
    assert not (tmp_path / "parts.safetensors").exists()  # an interrupted job writes no output
    resumed = _run(tiny_weights, plain_dataset, tmp_path, "parts", steps=4, resume="latest")
    a, b = load_file(str(whole.output)), load_file(str(resumed.output))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert resumed.result.best_step == whole.result.best_step
    rows = [r for r in _log(tmp_path / "parts.jsonl") if "step" in r and "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "samples_per_s"} <= set(r) and r["samples_per_s"] > 0 for r in rows)
    assert ["val_loss" in r for r in rows] == [False, True, False, True]  # --val-every 2
    assert [r["loss"] for r in rows] == [r["loss"] for r in _log(tmp_path / "whole.jsonl") if "loss" in r]


def test_the_output_is_the_prompt_of_the_best_validation_loss(tiny_weights, plain_dataset, tmp_path):
    run = _run(tiny_weights, plain_dataset, tmp_path, "best", steps=3, lr=10, val_every=1, save_every=1)
    rows = [r for r in _log(tmp_path / "best.jsonl") if "val_loss" in r]
    best = min(rows, key=lambda r: r["val_loss"])
    assert [r["step"] for r in rows] == [1, 2, 3] and run.result.best_step == best["step"]
    assert best["step"] != 3  # at this learning rate the last step is not the best: the choice matters
    saved = load_file(str(tmp_path / "best-ck" / f"step-{best['step']:06d}" / "model.safetensors"))["prompt"]
    assert torch.equal(load_file(str(run.output))["remove"], saved)
    with safe_open(str(run.output), "pt") as f:
        assert f.metadata()["step"] == str(best["step"]) and float(f.metadata()["val_loss"]) == best["val_loss"]


def test_the_written_prompts_load_through_weights_and_change_inpaint(tiny_weights, plain_dataset, tmp_path, photo):
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    from PIL import Image

    Image.fromarray(photo[:64, :96]).save(image)
    m = np.zeros((64, 96), np.uint8)
    m[16:48, 24:72] = 255
    Image.fromarray(m).save(mask)
    inpaint = ["inpaint", str(image), str(mask), "--weights", str(weights), "--task", "remove", "--steps", "2",
               "--resolution", "64", "--quiet"]
    assert main([*inpaint, "-o", str(tmp_path / "before.png")]) == 0
    before = load_file(str(weights / "task_prompts.safetensors"))
    assert main(["train", "prompts", "--weights", str(weights), "--data", str(plain_dataset), "--task", "remove",
                 "--steps", "2", "--batch-size", "2", "--micro-batch", "1", "--resolution", str(RESOLUTION),
                 "--lr", "0.5", "--val-samples", "2", "--workers", "0", "--cpu", "--quiet",
                 "--checkpoints", str(tmp_path / "ck")]) == 0  # no -o: into the weights folder
    after = load_file(str(weights / "task_prompts.safetensors"))
    assert set(after) == set(before) and not torch.equal(after["remove"], before["remove"])
    for kept in ("complete", "harmonize", "null"):
        assert torch.equal(after[kept], before[kept]), kept
    with safe_open(str(weights / "task_prompts.safetensors"), "pt") as f:
        assert f.metadata()["init"] == "trained" and f.metadata()["trained"] == "remove"
    assert main([*inpaint, "-o", str(tmp_path / "after.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("before", "after"))
    assert not np.array_equal(a, b) and np.array_equal(a[m == 0], b[m == 0])
