"""`editrt train elements --stage 2`: the element decoder, Eq. (5) of paper 001 (tiny weights, CPU, 32 px, grid 4)."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from editrt.cli import main
from editrt.models.components import WeightsLayout
from editrt.models.text import load_tokenizer
from editrt.train.data import check_plain
from editrt.train.elements_stage2 import (
    CFG_DROP_BOTH,
    CFG_DROP_ELEMENTS,
    CFG_DROP_TEXT,
    Stage2Samples,
    overlapped_elements,
    prepare_images,
    tokenize,
)
from editrt.train.samples import TRAIN_STREAM

RESOLUTION, GRID = 32, 4
STAGE2 = ["--stage", "2", "--resolution", str(RESOLUTION), "--grid", str(GRID), "--workers", "0", "--cpu", "--quiet"]


@pytest.fixture(scope="module")
def captioned(plain_dataset, tmp_path_factory):
    """The plain dataset with a caption for every image (so a dropped caption is visible in the tokens)."""
    folder = tmp_path_factory.mktemp("captioned") / "data"
    shutil.copytree(plain_dataset, folder)
    (folder / "captions").mkdir()
    for image in (folder / "images").iterdir():
        (folder / "captions" / f"{image.stem}.txt").write_text(f"a photo of the {image.stem}\n")
    return folder


@pytest.fixture(scope="module")
def stage2_images(tiny_weights, captioned):
    tokenizer = load_tokenizer(WeightsLayout(tiny_weights).elements / "tokenizer")
    images, count = prepare_images(check_plain(captioned), captioned, Path(tiny_weights), RESOLUTION, GRID, tokenizer,
                                   "cpu")
    assert count == len(images) == 6
    return images, tokenize(tokenizer, "")


def _samples(stage2_images, random_partition=1.0, element_dropout=0.5, seed=0):
    images, empty = stage2_images
    return Stage2Samples(images, RESOLUTION, seed, TRAIN_STREAM, (4, 4, 4), 1000, empty, random_partition,
                         element_dropout)


def _own_image(images, sample):
    """The record whose pixels the sample shows."""
    return next(i for i, r in enumerate(images) if torch.equal(torch.from_numpy(r.rgb.astype(np.float32) / 127.5 - 1)
                                                              .permute(2, 0, 1), sample["image"]))


def test_the_paper_s_guidance_dropout_rates(stage2_images):
    """Supplementary: only C = empty for 30 % of samples, only S = empty for 10 %, both for 10 %."""
    images, empty = stage2_images
    samples = _samples(stage2_images, element_dropout=0.0)
    n, counts = 600, {"text": 0, "elements": 0, "both": 0, "none": 0}
    for g in range(n):
        s = samples[g]
        no_text, no_elements = torch.equal(s["input_ids"], empty), not s["alive"].any()
        counts["both" if no_text and no_elements else "text" if no_text else "elements" if no_elements else "none"] += 1
    expected = {"text": CFG_DROP_TEXT, "elements": CFG_DROP_ELEMENTS, "both": CFG_DROP_BOTH}
    assert expected == {"text": 0.3, "elements": 0.1, "both": 0.1}
    for k, p in expected.items():  # 4.5 binomial standard deviations
        assert abs(counts[k] / n - p) <= 4.5 * (p * (1 - p) / n) ** 0.5, counts


def test_random_partition_takes_another_image_s_elements(stage2_images):
    images, _ = stage2_images
    own_boxes = [r.boxes for r in images]
    assert all(not torch.equal(own_boxes[i], own_boxes[j]) for i in range(6) for j in range(i))  # partitions differ
    for probability, expect_own in ((1.0, False), (0.0, True)):
        samples = _samples(stage2_images, random_partition=probability, element_dropout=0.0)
        for g in range(12):
            s = samples[g]
            i = _own_image(images, s)
            assert torch.equal(s["boxes"], own_boxes[i]) == expect_own, (probability, g)
            source = next(r for r in images if torch.equal(r.boxes, s["boxes"]))
            # patches are the runtime's cut of THIS image's pixels by the source partition
            from editrt.runtime.elements_pipeline import ElementsPipeline

            patches, ids = ElementsPipeline.element_patches(None, images[i].rgb, source.partition)
            torch.testing.assert_close(s["patches"][torch.from_numpy(ids)], patches, rtol=0, atol=0)


def test_element_dropout_drops_the_elements_under_an_object_mask(stage2_images):
    images, empty = stage2_images
    samples = _samples(stage2_images, element_dropout=1.0)
    database = [m for r in images for m in r.masks]
    checked = 0
    for g in range(40):
        s = samples[g]
        if not s["alive"].any():  # the guidance dropout's S = empty
            continue
        source = next(r for r in images if torch.equal(r.boxes, s["boxes"]))
        labels, k = source.partition.labels, source.partition.num_elements
        candidates = [source.alive & ~torch.from_numpy(overlapped_elements(labels, m, k)) for m in database]
        assert any(torch.equal(s["alive"], c) for c in candidates), g
        assert (source.alive & ~s["alive"]).any()  # something was dropped
        checked += 1
    assert checked >= 20
    # without dropout every element of the partition is given (unless guidance drops them all)
    kept = _samples(stage2_images, element_dropout=0.0)
    for g in range(20):
        s = kept[g]
        source = next(r for r in images if torch.equal(r.boxes, s["boxes"]))
        assert torch.equal(s["alive"], source.alive) or not s["alive"].any()


def test_samples_are_functions_of_seed_and_index(stage2_images):
    a, b = _samples(stage2_images), _samples(stage2_images)
    for g in (0, 7, 31):
        x, y = a[g], b[g]
        assert all(torch.equal(x[k], y[k]) for k in x)
    other = _samples(stage2_images, seed=1)[7]
    assert not torch.equal(other["noise"], a[7]["noise"])


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_stage2_trains_the_decoder_only_and_writes_what_the_runtime_loads(tiny_weights, captioned, tmp_path, photo):
    """theta_U and theta_S train (every one of their tensors gets a gradient); the VAE, content encoder and text
    encoder do not; the written folders load through --weights as the trained model and change the render."""
    from safetensors.torch import load_file

    from editrt.runtime.elements_pipeline import ElementsPipeline
    from editrt.train.elements_stage2 import Stage2Settings, train_decoder
    from editrt.train.job import LoopSettings

    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    before_files = _digest(weights / "elements")
    pipe = ElementsPipeline.from_pretrained(weights)
    elements = pipe.partition(photo, resolution=64, grid=GRID)
    before = np.asarray(pipe.decode(elements, steps=2, resolution=64))

    loop = LoopSettings(steps=2, batch_size=2, micro_batch=1, lr=1e-3, val_samples=2, val_every=2, save_every=2,
                        workers=0, cpu=True, quiet=True, checkpoints=tmp_path / "ck", log=tmp_path / "s2.jsonl")
    run = train_decoder(Stage2Settings(weights=weights, data=captioned, resolution=RESOLUTION, grid=GRID), loop)

    # 1. Only the decoder's tensors are trained, and all of them receive a gradient.
    names = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert any(".attn_elements." in n for n in names) and any(n.startswith("decoder.embedder.") for n in names)
    assert any(".attn1." in n for n in names) and any("conv_in" in n for n in names)  # theta_U too
    frozen = [run.frozen.vae_encoder, run.frozen.content_encoder, run.frozen.text_encoder]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    batch = {k: torch.stack([v] * 2) for k, v in _samples_for_grad(run, captioned, weights).items()}
    run.model.zero_grad()
    run.frozen.per_sample_loss(run.model, batch).mean().backward()
    missing = [n for n, p in run.model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]
    # the prediction sees the element contents (through the frozen content encoder) and the caption
    with torch.no_grad():
        loss = run.frozen.per_sample_loss(run.model, batch)
        for key, value in (("patches", -batch["patches"]), ("input_ids", torch.flip(batch["input_ids"], [1]))):
            assert not torch.allclose(run.frozen.per_sample_loss(run.model, {**batch, key: value}), loss), key

    # 2. Exactly the two folders change (and the frozen parts' files stay bit for bit); no temporary left.
    after_files = _digest(weights / "elements")
    changed = {k.split("/")[0] for k in set(before_files) | set(after_files) if before_files.get(k) != after_files.get(k)}
    assert changed == {"unet", "element_adapter"}
    assert not list((weights / "elements").glob(".*"))
    assert json.loads((weights / "elements" / "element_adapter" / "training.json").read_text())["step"] == 2

    # 3. The runtime's loader gives the trained model (the checkpoint's state: validation ran at the end only).
    state = load_file(str(tmp_path / "ck" / "step-000002" / "model.safetensors"))
    loaded = ElementsPipeline.from_pretrained(weights)
    sample = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    features, boxes = torch.randn(1, 16, 32), torch.rand(1, 16, 4)
    alive = torch.arange(16)[None] % 3 > 0
    run.model.load_state_dict(state)
    with torch.no_grad():
        tokens = loaded.embedder(features, boxes, alive)
        runtime = loaded.decoder(sample, torch.tensor([500]), text, element_tokens=tokens)
        trained = run.model.eval()(sample, torch.tensor([500]), text, features, boxes, alive)
    torch.testing.assert_close(runtime, trained, rtol=1e-5, atol=1e-6)
    after = np.asarray(loaded.decode(loaded.partition(photo, resolution=64, grid=GRID), steps=2, resolution=64))
    assert before.shape == after.shape and not np.array_equal(before, after)


def _samples_for_grad(run, captioned, weights):
    """One sample that keeps text and elements (no guidance dropout), for the gradient check."""
    tokenizer = load_tokenizer(WeightsLayout(weights).elements / "tokenizer")
    images, _ = prepare_images(check_plain(captioned)[:2], captioned, Path(weights), RESOLUTION, GRID, tokenizer, "cpu")
    samples = Stage2Samples(images, RESOLUTION, 0, TRAIN_STREAM, run.frozen.latent_shape(RESOLUTION), 1000,
                            tokenize(tokenizer, ""), 1.0, 0.0)
    empty = tokenize(tokenizer, "")
    return next(s for s in (samples[g] for g in range(50))
                if s["alive"].any() and not torch.equal(s["input_ids"], empty))


def test_the_cli_refuses_bad_stage_options(tiny_weights, plain_dataset, tmp_path, capsys):
    common = ["train", "elements", "--weights", str(tiny_weights), "--data", str(plain_dataset), "--steps", "1",
              "--batch-size", "1", "--micro-batch", "1", "--checkpoints", str(tmp_path / "ck")]
    assert main([*common, "--stage", "3"]) == 2
    assert "--stage 3" in capsys.readouterr().err
    assert main([*common, *STAGE2, "--element-dropout", "1.5"]) == 2
    assert "--element-dropout 1.5" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


def test_the_loss_on_a_fixed_batch_falls(tiny_weights, stage2_images):
    """Eq. (5) on one fixed batch (text and elements kept): 30 AdamW steps at a high rate fit it."""
    from diffusers import UNet2DConditionModel

    from editrt.models.element_unet import adapter_config, build_element_decoder
    from editrt.models.files import load_diffusers
    from editrt.train.elements_stage2 import FrozenParts, Stage2

    folder = WeightsLayout(tiny_weights).elements
    frozen = FrozenParts(folder, "cpu", torch.float32)
    unet = load_diffusers(UNet2DConditionModel, folder / "unet", "element decoder UNet", torch.float32)
    torch.manual_seed(0)
    model = Stage2(build_element_decoder(unet, adapter_config(frozen.feature_dim, 8, 32))).train()
    images, empty = stage2_images
    samples = Stage2Samples(images, RESOLUTION, 0, TRAIN_STREAM, frozen.latent_shape(RESOLUTION), 1000, empty, 1.0, 0.0)
    kept = [s for s in (samples[g] for g in range(40)) if s["alive"].any() and not torch.equal(s["input_ids"], empty)]
    batch = {k: torch.stack([s[k] for s in kept[:2]]) for k in kept[0]}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = frozen.per_sample_loss(model, batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("change, field", [(dict(resolution=36), "resolution"), (dict(resolution=True), "resolution"),
                                           (dict(random_partition=1.5), "random_partition"),
                                           (dict(element_dropout=float("nan")), "element_dropout")])
def test_stage2_settings_refuse_bad_values_naming_the_field(change, field):
    from editrt.errors import InputError
    from editrt.train.elements_stage2 import Stage2Settings

    with pytest.raises(InputError) as e:
        Stage2Settings(weights=Path("w"), data=Path("d"), **change).check()
    assert e.value.field == field
