"""Elements: content encoding, element decoder, guidance, edit semantics, files, bad input."""
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from skimage import data

from editrt.errors import ElementsError, InputError
from editrt.runtime.elements import Elements
from editrt.runtime.partition import Partition
from editrt.runtime.scheduler import DenoiseLoop


@pytest.fixture(scope="module")
def elements(elements_pipe):
    return elements_pipe.partition(data.chelsea(), resolution=128)


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


def test_element_attention_modes(elements_pipe):
    """Algorithm 1: text only, elements only, both = text + elements (per block, equal weight)."""
    block = next(iter(elements_pipe.decoder.blocks.values()))
    dim = block.norm2.normalized_shape[0]
    x, text, tokens = torch.randn(1, 10, dim), torch.randn(1, 77, 32), torch.randn(1, 256, 32)
    with torch.no_grad():
        both = block.dual_cross_attention(x, text, tokens)
        text_only = block.dual_cross_attention(x, text, None)
        elements_only = block.dual_cross_attention(x, None, tokens)
    torch.testing.assert_close(both, text_only + elements_only, rtol=0, atol=0)
    torch.testing.assert_close(text_only, block.attn2(block.norm2(x), encoder_hidden_states=text))


def test_guidance_formula(elements_pipe, elements, monkeypatch):
    """eps = eps(z, ∅, ∅) + w·[eps(z, C, S) − eps(z, ∅, ∅)], the ∅ half batched first."""
    calls, steps = [], []
    real = elements_pipe.decoder.forward

    def recording(sample, timestep, text, tokens, use_text=True):
        out = real(sample, timestep, text, tokens, use_text)
        calls.append((text.clone(), tokens.clone(), out.clone()))
        return out

    real_guided = DenoiseLoop.guided

    def guided(self, noise):
        out = real_guided(self, noise)
        steps.append(out.clone())
        return out

    monkeypatch.setattr(elements_pipe.decoder, "forward", recording)
    monkeypatch.setattr(DenoiseLoop, "guided", guided)
    elements_pipe.decode(elements, prompt="a cat", guidance=3.0, steps=2, seed=3)
    assert len(calls) == 2 and len(steps) == 2
    for (text, tokens, out), noise in zip(calls, steps):
        assert text.shape[0] == 2 and tokens.shape[0] == 2
        torch.testing.assert_close(text[0:1], elements_pipe.prompt_embedding(""))
        torch.testing.assert_close(text[1:2], elements_pipe.prompt_embedding("a cat"))
        assert torch.count_nonzero(tokens[0]) == 0 and torch.count_nonzero(tokens[1]) > 0
        torch.testing.assert_close(noise, out[0:1] + 3.0 * (out[1:2] - out[0:1]), rtol=0, atol=0)
    calls.clear()
    elements_pipe.decode(elements, guidance=1.0, steps=1)
    assert calls[0][0].shape[0] == 1  # guidance 1: one conditional pass


def test_decode_is_deterministic_and_uses_the_elements(elements_pipe, elements):
    a = np.asarray(elements_pipe.decode(elements, steps=2, seed=1))
    b = np.asarray(elements_pipe.decode(elements, steps=2, seed=1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (*elements.image_size, 3)
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


def coverage(e: Elements) -> np.ndarray:
    count = np.zeros(e.image_size, int)
    for i in e.alive_ids:
        count += e.paint([i]) >= 0
    return count


def test_move_deletes_covered_elements(elements):
    e = elements.copy()
    assert coverage(e).max() == 1
    victim_region = e.paint([20]) >= 0
    dx = (e.centroids[20, 0] - e.centroids[19, 0]) * e.image_size[1]  # move 19 onto its right neighbour 20
    deleted = e.move(19, dx, 0)
    assert 20 in deleted and not e.alive[20] and e.alive[19]
    assert coverage(e).max() == 1  # each pixel covered by at most one element
    assert ((e.paint() == 19) & victim_region).any()
    for i in deleted:
        assert not e.alive[i]


def test_resize_and_insert(elements):
    e = elements.copy()
    w0 = e.sizes[40].copy()
    deleted = e.resize(40, 2.0)
    np.testing.assert_allclose(e.sizes[40], np.minimum(w0 * 2, 1))
    assert deleted and coverage(e).max() == 1
    other = elements.copy()
    e.delete([0, 1])
    new, _ = e.insert(other, [100, 101], at=(30, 30))
    assert new == [0, 1]  # deleted slots are reused first
    np.testing.assert_array_equal(e.features[0], other.features[100])
    centre = e.centroids[[0, 1]].mean(axis=0) * np.array(e.image_size[::-1])
    np.testing.assert_allclose(centre, [30, 30], atol=1e-3)
    assert coverage(e).max() == 1


def test_select(elements):
    x, y = elements.centroids[33] * np.array(elements.image_size[::-1])
    assert elements.select(point=(x, y)) == [33]
    assert 33 in elements.select(box=(x - 1, y - 1, x + 1, y + 1))


def test_json_round_trip(elements, tmp_path):
    e = elements.copy()
    e.move(3, 4, -2)
    e.resize(50, 1.3)
    path = e.save(tmp_path / "e.json")
    back = Elements.load(path)
    assert back.image_size == e.image_size
    for name in ("features", "centroids", "sizes", "alive", "anchors", "scales"):
        np.testing.assert_array_equal(getattr(back, name), getattr(e, name), err_msg=name)
    assert all(np.array_equal(a, b) for a, b in zip(back.masks, e.masks))
    np.testing.assert_array_equal(back.paint(), e.paint())
    assert json.loads(path.read_text())["info"]["dropped_fraction"] == elements.info["dropped_fraction"]


@pytest.mark.parametrize("call,match", [
    (lambda e: e.move(999, 1, 1), "no element 999; ids are 0..255"),
    (lambda e: e.move(-1, 1, 1), "no element -1"),
    (lambda e: (e.delete(7), e.move(7, 1, 1)), "element 7 was deleted"),
    (lambda e: e.move(0, -5000, 0), "outside the image"),
    (lambda e: e.resize(0, 0.0), "scale expected"),
    (lambda e: e.delete([]), "at least one element id"),
    (lambda e: e.insert(e.copy(), [1], at=(-5, 3)), "outside the image"),
    (lambda e: e.select(point=(1000, 0)), "outside the image"),
])
def test_bad_edits(elements, call, match):
    with pytest.raises(ElementsError, match=match):
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
    overlay = elements_pipe.render_overlay(elements, data.chelsea())
    assert overlay.size == elements.image_size[::-1]
    from editrt.runtime.elements import render_overlay

    with pytest.raises(ElementsError, match="canvas"):
        render_overlay(elements, np.zeros((10, 10, 3), np.uint8))
