"""`editrt train elements` stage 1: the content encoder through the light decoder (tiny weights, CPU)."""
import hashlib
import shutil

import numpy as np
import torch

from editrt.cli import main
from editrt.models.components import WeightsLayout
from editrt.models.content_encoder import ContentEncoder
from editrt.train.elements import LightDecoder, Stage1


def _elements(k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, k, 8, generator=g), torch.rand(1, k, 4, generator=g), torch.ones(1, k, dtype=torch.bool)


def test_padding_slots_change_nothing():
    """Images have different numbers of live elements; the dead slots (any content) must not be attended to."""
    torch.manual_seed(0)
    decoder = LightDecoder(feature_dim=8, image_size=16, patch=4, width=32, heads=2).eval()
    features, boxes, alive = _elements()
    pad_f, pad_b, _ = _elements(3, seed=1)
    with torch.no_grad():
        plain = decoder(features, boxes, alive)
        padded = decoder(torch.cat([features, 10 * pad_f], 1), torch.cat([boxes, pad_b], 1),
                         torch.cat([alive, torch.zeros(1, 3, dtype=torch.bool)], 1))
    assert plain.shape == (1, 3, 16, 16)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)


def test_the_reconstruction_loss_on_a_fixed_batch_falls(tiny_weights):
    torch.manual_seed(0)
    encoder = ContentEncoder.from_pretrained(WeightsLayout(tiny_weights).elements / "content_encoder").train()
    model = Stage1(encoder, LightDecoder(encoder.config["feature_dim"], 16, patch=4, width=32, heads=2))
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    batch = {"image": image, "patches": torch.rand(2, 4, 3, 32, 32, generator=g) * 2 - 1,
             "boxes": torch.rand(2, 4, 4, generator=g), "alive": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    losses = []
    for _ in range(30):
        loss = model(batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    # both parts learn: the encoder's parameters receive gradients through the decoder
    model(batch).mean().backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_trained_encoder_loads_through_weights_and_changes_the_features(tiny_weights, plain_dataset, tmp_path,
                                                                           photo):
    from editrt.runtime.elements_pipeline import ElementsPipeline

    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    before_files = _digest(weights / "elements")
    before = ElementsPipeline.from_pretrained(weights).partition(photo, resolution=64, grid=4).features
    assert main(["train", "elements", "--weights", str(weights), "--data", str(plain_dataset), "--steps", "2",
                 "--batch-size", "2", "--micro-batch", "1", "--resolution", "32", "--grid", "4", "--lr", "1e-2",
                 "--val-samples", "2", "--workers", "0", "--cpu", "--quiet", "--checkpoints", str(tmp_path / "ck"),
                 "--log", str(tmp_path / "e.jsonl")]) == 0
    after_files = _digest(weights / "elements")
    changed = {k for k in before_files if before_files[k] != after_files.get(k)}
    assert changed == {"content_encoder/model.safetensors"} and set(after_files) == set(before_files)
    # what is written is the trained encoder: the checkpoint's (validation only at the end: best = last)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "ck" / "step-000002" / "model.safetensors"))
    written = load_file(str(weights / "elements" / "content_encoder" / "model.safetensors"))
    assert written.keys() == {k[len("encoder."):] for k in state if k.startswith("encoder.")}
    assert all(torch.equal(v, state["encoder." + k]) for k, v in written.items())
    after = ElementsPipeline.from_pretrained(weights).partition(photo, resolution=64, grid=4).features
    assert before.shape == after.shape and not np.allclose(before, after)
    assert not list((weights / "elements").glob(".*"))  # no temporary folder left behind
