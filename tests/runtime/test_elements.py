"""Elements: image-space coordinates, content encoding, element decoder and guidance against independent
oracles (diffusers/transformers calls, hand-built attention), edit semantics, files, bad input."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from scipy import ndimage
from skimage import data
from transformers import CLIPTextModel, CLIPTokenizer

from editrt.errors import ElementsError, InputError
from editrt.models.element_unet import load_element_decoder
from editrt.runtime.elements import Elements, render_overlay
from editrt.runtime.partition import Partition, partition

GRID = 16


@pytest.fixture(scope="module")
def elements(elements_pipe):
    """Chelsea (451x300) partitioned at a 128-px working resolution (192x128): the image is larger."""
    return elements_pipe.partition(data.chelsea(), resolution=128)


def label_stats(labels: np.ndarray, i: int):
    """Centroid (x, y) and box size (w, h) of element i, measured on a label map (pixel centres at +0.5)."""
    rows, cols = np.nonzero(labels == i)
    return (np.array([cols.mean() + 0.5, rows.mean() + 0.5]),
            np.array([cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]))


def coverage(e: Elements) -> np.ndarray:
    count = np.zeros(e.image_size, int)
    for i in e.alive_ids:
        count += e.paint([i]) >= 0
    return count


# ---------------------------------------------------------------------- elements live in the image
def test_a_120x88_image_gives_120x88_labels_overlay_and_render(elements_pipe, tmp_path):
    image = np.asarray(Image.fromarray(data.chelsea()).resize((120, 88), Image.LANCZOS))
    e = elements_pipe.partition(image)  # working size (176x128) is larger than the image here
    assert e.image_size == (88, 120) and e.working_size != e.image_size
    labels = e.paint()
    assert labels.shape == (88, 120)
    assert elements_pipe.render_overlay(e, image).size == (120, 88)
    assert elements_pipe.decode(e, steps=1).size == (120, 88)
    # every alive element's coordinates are measured in the image's pixels
    assert e.alive_ids
    for i in e.alive_ids:
        centre, size = label_stats(labels, i)
        np.testing.assert_allclose(e.centroids[i], centre, rtol=1e-5)
        np.testing.assert_array_equal(e.sizes[i], size)
    # the saved pair round-trips in image space
    back = Elements.load(e.save(tmp_path / "small.json"))
    assert back.image_size == (88, 120) and back.working_size == e.working_size
    np.testing.assert_array_equal(back.paint(), labels)
    doc = json.loads((tmp_path / "small.json").read_text())
    assert doc["image_size"] == [88, 120] and doc["units"] == "image pixels"
    for i in e.alive_ids[:10]:
        row = doc["elements"][i]
        centre, size = label_stats(labels, i)
        np.testing.assert_allclose([row["x"], row["y"]], centre, rtol=1e-5)
        assert [row["w"], row["h"]] == list(size)


def test_label_map_is_the_working_partition_resized_to_the_image(elements_pipe, elements):
    """Oracle: the working-resolution partition (runtime/partition.py) resized by PIL (nearest) to 451x300."""
    rgb = elements_pipe.working_image(data.chelsea(), resolution=128)
    part = partition(elements_pipe.segmenter, rgb)
    assert part.labels.shape == (128, 192)
    oracle = np.asarray(Image.fromarray(part.labels.astype(np.int32)).resize((451, 300), Image.NEAREST))
    # pixels whose centre falls exactly on a working-pixel edge may go either way: (2j + 1) w / 2W an integer
    tie_cols = (2 * np.arange(451) + 1) * 192 % (2 * 451) == 0
    tie_rows = (2 * np.arange(300) + 1) * 128 % (2 * 300) == 0
    keep = ~tie_rows[:, None] & ~tie_cols[None, :]
    assert keep.mean() > 0.97
    np.testing.assert_array_equal(elements.paint()[keep], oracle[keep])
    assert elements.image_size == (300, 451) and elements.working_size == (128, 192)


def test_move_is_in_image_pixels_and_select_reads_the_label_map(elements):
    e = elements.copy()
    rng = np.random.default_rng()
    labels = e.paint()
    # select(point) is the label map at that pixel, for random pixels anywhere in the image
    for _ in range(200):
        x, y = rng.uniform(0, 451), rng.uniform(0, 300)
        expected = labels[int(y), int(x)]
        assert e.select(point=(x, y)) == ([] if expected < 0 else [int(expected)])
    # an integer move shifts the element's pixels by exactly (dx, dy) in the image
    centre = labels[100:200, 150:300]
    i = int(np.bincount(centre[centre >= 0]).argmax())  # the element with most pixels mid-image
    before = labels == i
    deleted = e.move(i, 7, -5)
    after = e.paint() == i
    np.testing.assert_array_equal(after[:-5, 7:], before[5:, :-7])
    assert after.sum() == before.sum()
    ys, xs = np.nonzero(after)
    point = (xs[0] + 0.5, ys[0] + 0.5)
    assert e.select(point=point) == [i]
    assert i not in deleted


def test_move_deletes_exactly_the_covered_elements(elements):
    """Oracle: the full label map before the move, read under the moved element's new pixels."""
    e = elements.copy()
    assert coverage(e).max() == 1
    before = e.paint()
    mover, target = 19, 20  # move 19 onto its right neighbour
    dx = float(e.centroids[target, 0] - e.centroids[mover, 0])
    deleted = e.move(mover, dx, 0)
    landed = e.paint([mover]) >= 0
    expected = sorted(int(j) for j in np.unique(before[landed]) if j >= 0 and j != mover)
    assert sorted(deleted) == expected and target in expected
    assert not e.alive[expected].any() and e.alive[mover]
    assert coverage(e).max() == 1  # each pixel covered by at most one element


def test_resize_and_insert_in_image_pixels(elements):
    e = elements.copy()
    w0 = e.sizes[40].copy()
    area0 = (e.paint() == 40).sum()
    deleted = e.resize(40, 2.0)
    np.testing.assert_allclose(e.sizes[40], np.minimum(w0 * 2, [451, 300]))
    assert deleted and coverage(e).max() == 1
    assert (e.paint() == 40).sum() > 3 * area0  # twice the width and height: about four times the pixels
    other = elements.copy()
    e.delete([0, 1])
    new, _ = e.insert(other, [100, 101], at=(30, 30))
    assert new == [0, 1]  # deleted slots are reused first
    np.testing.assert_array_equal(e.features[0], other.features[100])
    np.testing.assert_array_equal(e.sizes[[0, 1]], other.sizes[[100, 101]])  # pixel sizes kept
    np.testing.assert_allclose(e.centroids[[0, 1]].mean(axis=0), [30, 30], atol=1e-3)
    assert coverage(e).max() == 1
    # the inserted pixels are the other image's element 100, shifted to its new centre
    shift = np.round(e.centroids[0] - other.centroids[100]).astype(int)
    src = np.argwhere(other.paint() == 100) + shift[::-1]
    inside = (src[:, 0] >= 0) & (src[:, 0] < 300) & (src[:, 1] >= 0) & (src[:, 1] < 451)
    assert (e.paint()[src[inside, 0], src[inside, 1]] == 0).all()


@pytest.mark.parametrize("size", [(120, 88), (53, 37)])  # (W, H): image smaller than its canvas
def test_every_pixel_has_an_element_after_the_partition(elements_pipe, elements, size):
    """The clean-up's dropped pixels go to neighbouring elements (paper 001 sees ~0.1% dropped): an unedited
    render has no holes, at every image size, and each element stays one 4-connected piece."""
    image = np.asarray(Image.fromarray(data.chelsea()).resize(size, Image.LANCZOS))
    cases = [elements_pipe.partition(image)]
    if size == (120, 88):
        cases.append(elements)  # Chelsea 451x300: the image is larger than its 192x128 canvas
    cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
    for e in cases:
        labels = e.paint()
        assert e.info["working_dropped_fraction"] > 0.01  # the clean-up did drop pixels (tiny random weights)
        assert (labels >= 0).all() and e.info["dropped_fraction"] == 0.0
        assert set(np.unique(labels)) == set(e.alive_ids)
        for i in e.alive_ids:
            assert ndimage.label(labels == i, structure=cross)[1] == 1, f"element {i} is split"


def test_square_partition_maps_the_elements_back_to_the_image(elements_pipe):
    """`square`: the paper partitions 512 x 512; the 120x88 image is stretched to 64 x 64, and each image
    pixel takes the element of the square map's pixel under its centre (both sides upsampled: exact)."""
    image = np.asarray(Image.fromarray(data.chelsea()).resize((120, 88), Image.LANCZOS))
    e = elements_pipe.partition(image, square=64, grid=8)
    assert e.image_size == (88, 120) and e.working_size == (64, 64) and e.info["square"] == 64
    square_rgb = np.asarray(Image.fromarray(image).resize((64, 64), Image.LANCZOS))
    part = partition(elements_pipe.segmenter, square_rgb, grid=8)
    rows, cols = ((np.arange(88) + 0.5) * 64 / 88).astype(int), ((np.arange(120) + 0.5) * 64 / 120).astype(int)
    labels = e.paint()
    np.testing.assert_array_equal(labels, part.labels[rows[:, None], cols[None, :]])
    assert (labels >= 0).all()
    for i in e.alive_ids:
        centre, size = label_stats(labels, i)
        np.testing.assert_allclose(e.centroids[i], centre, rtol=1e-5)
        np.testing.assert_array_equal(e.sizes[i], size)


@pytest.mark.parametrize("args,match", [
    (["--square", "60"], "square: expected a positive multiple of 8"),
    (["--square", "64", "--resolution", "64"], "--square and --resolution: expected one of them"),
    (["--square", "8192"], "--square 8192: expected a canvas of at most"),
])
def test_cli_square_partition_and_its_bad_values(tiny_weights, tmp_path, capsys, args, match):
    from editrt.cli import main

    Image.fromarray(np.asarray(Image.fromarray(data.chelsea()).resize((120, 88)))).save(tmp_path / "p.png")
    common = ["elements", "partition", str(tmp_path / "p.png"), "--grid", "8", "--weights", str(tiny_weights), "--quiet"]
    assert main(common + args + ["-o", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("bad*"))  # nothing written
    if args[1] == "60":  # one good run beside the bad ones
        assert main(common + ["--square", "64", "-o", str(tmp_path / "e.json")]) == 0
        doc = json.loads((tmp_path / "e.json").read_text())
        assert doc["working_size"] == [64, 64] and doc["image_size"] == [88, 120] and doc["info"]["square"] == 64


def test_insert_reuses_freed_slots_and_never_grows_n(elements, elements_pipe):
    """Paper 001 keeps N fixed: k deletions make room for k insertions, no more."""
    e, other = elements.copy(), elements.copy()
    n = len(e)
    free = [i for i in range(n) if not e.alive[i]]  # elements the clean-up left without pixels
    deleted = e.alive_ids[:3]
    e.delete(deleted)
    new, _ = e.insert(other, other.alive_ids[-3 - len(free):], at=(200, 150))
    assert len(e) == n and sorted(new) == sorted(free + deleted)
    assert elements_pipe.element_tokens(e).shape[1] == n  # the decoder still sees N tokens
    free = [i for i in range(n) if not e.alive[i]]  # the slots of the elements the insert covered
    before = e.copy()
    want = other.alive_ids[:len(free) + 1]
    with pytest.raises(ElementsError, match=rf"insert: {len(want)} element\(s\) need free slots, {len(free)} of {n} "
                       "are free") as caught:
        e.insert(other, want, at=(30, 30))
    assert caught.value.field == "ids"
    assert len(e) == n and (e.alive == before.alive).all()  # refused before anything changed
    assert elements_pipe.element_tokens(e).shape[1] == n


def test_select_box_in_image_pixels(elements):
    x, y = elements.centroids[33]
    assert 33 in elements.select(box=(x - 1, y - 1, x + 1, y + 1))
    inside = elements.select(box=(0, 0, 225, 150))
    assert inside and all(elements.centroids[i, 0] <= 225 and elements.centroids[i, 1] <= 150 for i in inside)


def test_json_round_trip(elements, tmp_path):
    e = elements.copy()
    e.move(3, 4, -2)
    e.resize(50, 1.3)
    path = e.save(tmp_path / "e.json")
    back = Elements.load(path)
    assert back.image_size == e.image_size and back.working_size == e.working_size
    for name in ("features", "centroids", "sizes", "alive", "anchors", "scales"):
        np.testing.assert_array_equal(getattr(back, name), getattr(e, name), err_msg=name)
    assert all(np.array_equal(a, b) for a, b in zip(back.masks, e.masks))
    np.testing.assert_array_equal(back.paint(), e.paint())
    assert json.loads(path.read_text())["info"]["dropped_fraction"] == elements.info["dropped_fraction"]


def test_version_1_files_still_load(elements, tmp_path):
    """Version 1 stored x, y, w, h normalised to its canvas (which was also the working size)."""
    path = elements.save(tmp_path / "v2.json")
    doc = json.loads(path.read_text())
    H, W = doc["image_size"]
    doc["version"] = 1
    del doc["working_size"], doc["units"]
    for row in doc["elements"]:
        row.update(x=row["x"] / W, y=row["y"] / H, w=row["w"] / W, h=row["h"] / H)
    (tmp_path / "v1.json").write_text(json.dumps(doc))
    old = Elements.load(tmp_path / "v1.json")
    np.testing.assert_allclose(old.centroids, elements.centroids, rtol=1e-5)
    np.testing.assert_array_equal(old.paint(), elements.paint())


@pytest.mark.parametrize("call,match", [
    (lambda e: e.move(len(e), 1, 1), "no element {n}; ids are 0..{last}"),
    (lambda e: e.move(-1, 1, 1), "no element -1"),
    (lambda e: (e.delete(7), e.move(7, 1, 1)), "element 7 was deleted"),
    (lambda e: e.move(0, -5000, 0), r"outside the image \(451x300\)"),
    (lambda e: e.resize(0, 0.0), "scale expected"),
    (lambda e: e.delete([]), "at least one element id"),
    (lambda e: e.insert(e.copy(), [1], at=(-5, 3)), "outside the image"),
    (lambda e: e.select(point=(451, 0)), r"outside the image \(451x300\)"),
])
def test_bad_edits(elements, call, match):
    n = len(elements)
    with pytest.raises(ElementsError, match=match.format(n=n, last=n - 1)):
        call(elements.copy())


def test_corrupt_or_mismatched_files(elements, tmp_path):
    a = elements.copy().save(tmp_path / "a.json")
    b = elements.copy()
    b.features += 1  # another partition's data
    b.save(tmp_path / "b.json")
    doc = json.loads(a.read_text())
    doc["data"] = "b.npz"
    (tmp_path / "mixed.json").write_text(json.dumps(doc))
    with pytest.raises(ElementsError, match="does not match it"):
        Elements.load(tmp_path / "mixed.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ElementsError, match="not valid JSON"):
        Elements.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ElementsError, match="not an editrt elements file"):
        Elements.load(tmp_path / "other.json")
    doc = json.loads(a.read_text())
    doc["elements"] = doc["elements"][:-1]
    (tmp_path / "short.json").write_text(json.dumps(doc))
    with pytest.raises(ElementsError, match="malformed"):
        Elements.load(tmp_path / "short.json")
    doc = json.loads(a.read_text())
    doc["working_size"] = [100, 64]
    (tmp_path / "odd.json").write_text(json.dumps(doc))
    with pytest.raises(ElementsError, match="not a multiple of 8"):
        Elements.load(tmp_path / "odd.json")
    (tmp_path / "a.npz").unlink()
    with pytest.raises(ElementsError, match="is missing"):
        Elements.load(a)
    with pytest.raises(ElementsError, match="no such elements file"):
        Elements.load(tmp_path / "nope.json")


def test_decode_and_overlay_refuse_mismatches(elements_pipe, elements):
    wrong = elements.copy()
    wrong.features = wrong.features[:, :8]
    with pytest.raises(ElementsError, match="feature size 8"):
        elements_pipe.decode(wrong, steps=1)
    with pytest.raises(InputError, match="guidance"):
        elements_pipe.decode(elements, steps=1, guidance=0.5)
    with pytest.raises(ElementsError, match="not a multiple of"):
        elements_pipe.decode(elements, steps=1, size=(100, 60))
    assert elements_pipe.render_overlay(elements, data.chelsea()).size == (451, 300)
    with pytest.raises(ElementsError, match=r"image is 10x10, the elements' image is 451x300"):
        render_overlay(elements, np.zeros((10, 10, 3), np.uint8))


# ---------------------------------------------------------------------- content encoder
def one_element_partition(shape, top, left, patch_mask):
    labels = np.full(shape, -1, np.int64)
    h, w = patch_mask.shape
    labels[top:top + h, left:left + w][patch_mask] = 0
    rows, cols = np.nonzero(labels == 0)
    return Partition(labels=labels, centroids=np.array([[(cols.mean() + .5) / shape[1], (rows.mean() + .5) / shape[0]]], np.float32),
                     boxes=np.array([[cols.min(), rows.min(), cols.max(), rows.max()]]), counts=np.array([len(rows)]),
                     dropped_fraction=0.0)


def test_content_feature_does_not_depend_on_position(elements_pipe):
    rng = np.random.default_rng()
    patch = rng.integers(0, 256, (23, 17, 3), dtype=np.uint8)
    mask = rng.random((23, 17)) > 0.3
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True  # the box is the patch's
    features = []
    for top, left in ((5, 9), (70, 100)):
        canvas = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)  # different surroundings each time
        canvas[top:top + 23, left:left + 17] = patch
        features.append(elements_pipe.encode_elements(canvas, one_element_partition((128, 128), top, left, mask))[0])
    np.testing.assert_array_equal(features[0], features[1])
    assert np.abs(features[0]).sum() > 0


# ---------------------------------------------------------------------- decoder and guidance
def test_decoder_with_zero_element_output_equals_plain_unet(elements_pipe, tiny_weights):
    plain = UNet2DConditionModel.from_pretrained(tiny_weights / "elements" / "unet")
    decoder = elements_pipe.decoder
    saved = {k: v.clone() for k, v in decoder.adapter_state_dict().items()}
    x, t = torch.randn(2, 4, 16, 16), torch.tensor(321)
    text, tokens = torch.randn(2, 77, 32), torch.randn(2, 256, 32)
    try:
        with torch.no_grad():
            assert not torch.equal(decoder(x, t, text, tokens), plain(x, t, encoder_hidden_states=text).sample)
            for block in decoder.blocks.values():
                block.attn_elements.to_out[0].weight.zero_()
                block.attn_elements.to_out[0].bias.zero_()
            assert torch.equal(decoder(x, t, text, tokens), plain(x, t, encoder_hidden_states=text).sample)
            assert torch.equal(decoder(x, t, text, None), plain(x, t, encoder_hidden_states=text).sample)
    finally:
        with torch.no_grad():
            for k, v in decoder.adapter_state_dict().items():
                v.copy_(saved[k])


def hand_attention(attn, x, context):
    """Multi-head attention written out with plain matmuls from the module's weights (no diffusers processor)."""
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    heads = attn.heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return attn.to_out[0](out)


def test_element_attention_modes_against_hand_built_attention(elements_pipe):
    """Algorithm 1: y = attn2(norm2(x), text) + attn_elements(norm_elements(x), elements); each alone too."""
    block = copy.deepcopy(next(iter(elements_pipe.decoder.blocks.values())))
    with torch.no_grad():
        for p in block.parameters():  # random norms too, so norm2 and norm_elements differ
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    dim = block.norm2.normalized_shape[0]
    x, text, tokens = torch.randn(2, 10, dim), torch.randn(2, 77, 32), torch.randn(2, 256, 32)
    with torch.no_grad():
        y_text = hand_attention(block.attn2, torch.nn.functional.layer_norm(
            x, (dim,), block.norm2.weight, block.norm2.bias, block.norm2.eps), text)
        y_elements = hand_attention(block.attn_elements, torch.nn.functional.layer_norm(
            x, (dim,), block.norm_elements.weight, block.norm_elements.bias, block.norm_elements.eps), tokens)
        # fp32, different summation order than SDPA: 1e-5 relative
        torch.testing.assert_close(block.dual_cross_attention(x, text, None), y_text, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(block.dual_cross_attention(x, None, tokens), y_elements, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(block.dual_cross_attention(x, text, tokens), y_text + y_elements, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def oracle_parts(tiny_weights):
    """The element decoder's parts loaded afresh with diffusers / transformers: plain attention processors,
    no K/V cache, no engine, no loop of ours."""
    root = tiny_weights / "elements"
    return dict(
        decoder=load_element_decoder(root / "unet", root / "element_adapter"),
        vae=AutoencoderKL.from_pretrained(root / "vae").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder").eval(),
        scheduler_folder=root / "scheduler",
    )


@torch.no_grad()
def oracle_render(parts, e: Elements, prompt: str, guidance: float, steps: int, seed: int) -> np.ndarray:
    """The paper's sampler written out: DDIM (diffusers' scheduler.step), two separate UNet calls per step,
    eps = eps(z, ∅, ∅) + w·[eps(z, C, S) − eps(z, ∅, ∅)], VAE decode. Tokens from the label map, by hand."""
    tok, enc = parts["tokenizer"], parts["text_encoder"]
    embed = lambda text: enc(tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,  # noqa: E731
                                 return_tensors="pt").input_ids)[0]
    labels = e.paint()
    H, W = e.image_size
    boxes = np.zeros((len(e), 4), np.float32)
    alive = np.zeros(len(e), bool)
    for i in np.unique(labels[labels >= 0]):
        centre, size = label_stats(labels, i)
        boxes[i] = (centre[0] / W, centre[1] / H, size[0] / W, size[1] / H)
        alive[i] = True
    embedder = parts["decoder"].embedder
    tokens = embedder(torch.from_numpy(e.features)[None], torch.from_numpy(boxes)[None], torch.from_numpy(alive)[None])
    null_tokens = torch.zeros_like(tokens)
    scheduler = DDIMScheduler.from_pretrained(parts["scheduler_folder"])
    scheduler.set_timesteps(steps)
    h, w = e.working_size
    latents = randn_tensor((1, 4, h // 8, w // 8), generator=torch.Generator("cpu").manual_seed(seed))
    latents = latents * scheduler.init_noise_sigma
    text, null_text = embed(prompt), embed("")
    for t in scheduler.timesteps:
        eps_c = parts["decoder"](latents, t, text, tokens)
        if guidance > 1:
            eps_u = parts["decoder"](latents, t, null_text, null_tokens)
            eps_c = eps_u + guidance * (eps_c - eps_u)
        latents = scheduler.step(eps_c, t, latents).prev_sample
    vae = parts["vae"]
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return ((image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_render_matches_the_paper_sampler_written_out(elements_pipe, oracle_parts, guidance):
    """Our decode (engines, K/V cache, batched CFG, device-side DDIM loop) vs the sampler written with
    diffusers' own calls, on edited elements of an image whose size is the working size (no final resize).
    Tolerance: 1 grey level (fp32 rounding of different summation orders, then uint8 rounding)."""
    image = np.asarray(Image.fromarray(data.coffee()).resize((192, 128), Image.LANCZOS))
    e = elements_pipe.partition(image, resolution=128)
    assert e.image_size == e.working_size == (128, 192)
    e.move(int(e.paint()[64, 96]), 9, 4)
    e.delete(e.alive_ids[:30])
    ours = np.asarray(elements_pipe.decode(e, prompt="a cat", guidance=guidance, steps=3, seed=11)).astype(int)
    oracle = oracle_render(oracle_parts, e, "a cat", guidance, 3, 11).astype(int)
    assert ours.shape == oracle.shape == (128, 192, 3)
    assert np.abs(ours - oracle).max() <= 1
    assert oracle.std() > 1  # not a constant image that any sampler would match


def test_decode_is_deterministic_uses_the_elements_and_returns_the_image_size(elements_pipe, elements):
    a = np.asarray(elements_pipe.decode(elements, steps=2, seed=1))
    b = np.asarray(elements_pipe.decode(elements, steps=2, seed=1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (300, 451, 3)  # the image's size, not the 192x128 working canvas
    edited = elements.copy()
    edited.delete(edited.alive_ids[:40])
    assert np.abs(np.asarray(elements_pipe.decode(edited, steps=2, seed=1)).astype(int) - a).max() > 0


def test_deleted_elements_are_zero_tokens(elements_pipe, elements):
    edited = elements.copy()
    edited.delete([5, 6])
    tokens = elements_pipe.element_tokens(edited)[0]
    assert tokens.shape[0] == len(elements)  # the token count stays N
    assert torch.count_nonzero(tokens[5]) == 0 and torch.count_nonzero(tokens[6]) == 0
    assert torch.count_nonzero(tokens[7]) > 0


def test_threads_sharing_one_pipeline_match_serial_runs(elements_pipe, elements):
    """8 threads, different edits / prompts / guidance / seeds, plus two partitions, on one pipeline: bit-equal
    to running them one by one (the work queue orders the device work; each call snapshots its elements)."""
    from concurrent.futures import ThreadPoolExecutor

    renders = []
    for k in range(8):
        e = elements.copy()
        e.delete(e.alive_ids[5 * k:5 * k + 5])
        e.move(e.alive_ids[-1 - k], 3 * k - 9, 2 - k)
        renders.append((e, f"a photo {k}", 1.0 + k % 3, k))
    crops = [data.astronaut()[:200, :240], data.coffee()[100:300, 50:330]]
    render = lambda a: np.asarray(elements_pipe.decode(a[0], prompt=a[1], guidance=a[2], steps=2, seed=a[3],  # noqa: E731
                                                       resolution=64))
    split = lambda image: elements_pipe.partition(image, resolution=64).paint()  # noqa: E731
    serial = [render(a) for a in renders] + [split(c) for c in crops]
    with ThreadPoolExecutor(len(renders) + len(crops)) as pool:
        threaded = [f.result() for f in [pool.submit(render, a) for a in renders] + [pool.submit(split, c) for c in crops]]
    for k, (a, b) in enumerate(zip(serial, threaded)):
        np.testing.assert_array_equal(a, b, err_msg=f"job {k}")
    assert len({r.tobytes() for r in serial[:8]}) == 8  # the jobs really differ


@pytest.mark.gpu
def test_cuda_graph_render_matches_eager_and_threads_match_serial(tiny_weights, elements):
    """On CUDA the render loop replays one CUDA graph: it matches the eager loop (1 grey level: fp32 kernels
    may pick other algorithms under capture), and threads sharing the graph pipeline are bit-equal to serial."""
    from concurrent.futures import ThreadPoolExecutor

    from editrt.runtime.elements_pipeline import ElementsPipeline

    graphs = ElementsPipeline.from_pretrained(tiny_weights, device="cuda", cuda_graphs=True)
    eager = ElementsPipeline.from_pretrained(tiny_weights, device="cuda", cuda_graphs=False)
    assert graphs.cuda_graphs and not eager.cuda_graphs
    a = np.asarray(graphs.decode(elements, prompt="a cat", steps=3, seed=2)).astype(int)
    b = np.asarray(eager.decode(elements, prompt="a cat", steps=3, seed=2)).astype(int)
    assert a.shape == (300, 451, 3) and np.abs(a - b).max() <= 1
    edits = []
    for k in range(8):
        e = elements.copy()
        e.delete(e.alive_ids[4 * k:4 * k + 4])
        edits.append((e, k))
    render = lambda x: np.asarray(graphs.decode(x[0], prompt="a cat", steps=3, seed=x[1]))  # noqa: E731
    serial = [render(x) for x in edits]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(render, edits))
    for s, t in zip(serial, threaded):
        np.testing.assert_array_equal(s, t)


def test_decode_renders_the_elements_as_they_were_when_asked(elements_pipe, elements):
    """A decode waiting for the pipeline's turn renders the edit state of its call, not what the caller changed
    since (the caller holds its Elements and may go on editing)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    e = elements.copy()
    expected = np.asarray(elements_pipe.decode(e, steps=1, seed=4, resolution=64))
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=lambda: elements_pipe.work.run(lambda: (held.set(), release.wait(60))))
    holder.start()
    try:
        assert held.wait(60)
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(elements_pipe.decode, e, steps=1, seed=4, resolution=64)
            deadline = time.monotonic() + 60
            while elements_pipe.work.waiting == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert elements_pipe.work.waiting == 1  # the decode waits for the turn: its call has happened
            e.delete(e.alive_ids)  # the caller edits on
            release.set()
            out = np.asarray(future.result(timeout=300))
    finally:
        release.set()
        holder.join()
    np.testing.assert_array_equal(out, expected)
