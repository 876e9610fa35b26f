"""Drag previews decode with the weights' tiny VAE (vae_tiny/, diffusers' AutoencoderTiny); finals never do."""
import json
import shutil

import numpy as np
import pytest
import torch
from runtime_doubles import CountingEngine

from editrt.errors import WeightsError
from editrt.runtime.session import EditSession

MASK = np.pad(np.ones((80, 90), bool), ((100, 120), (150, 211)))  # on the 300x451 photo


class _LatentsSeen(CountingEngine):
    """Counts calls and keeps the latents each call decoded."""

    def __init__(self, engine, calls, name):
        super().__init__(engine, calls, name)
        self.latents = []

    def __call__(self, **inputs):
        self.latents.append(inputs["latent"].detach().clone())
        return super().__call__(**inputs)


def _count_decoders(pipe, full_name: str, calls: list) -> None:
    pipe.engines[full_name] = CountingEngine(pipe.engines[full_name], calls, "full")
    pipe.preview_decoder = CountingEngine(pipe.preview_decoder, calls, "tiny")


def test_weights_init_writes_a_loadable_tiny_vae_for_both_editors(tiny_weights, tmp_path):
    from diffusers import AutoencoderKL, AutoencoderTiny

    from editrt.models.inpaint import load_tiny_vae

    for editor in ("inpaint", "elements"):
        vae = AutoencoderKL.from_pretrained(tiny_weights / editor / "vae")
        tiny = load_tiny_vae(tiny_weights / editor / "vae_tiny", vae)
        assert isinstance(tiny, AutoencoderTiny)
        latents = torch.zeros(1, 4, 8, 10)
        with torch.no_grad():  # decodes the full VAE's latents to the full VAE's image size
            assert tiny.decode(latents).sample.shape == vae.decode(latents).sample.shape == (1, 3, 64, 80)
    assert load_tiny_vae(tmp_path / "absent", vae) is None  # no folder: previews use the full VAE
    bad = tmp_path / "vae_tiny"
    shutil.copytree(tiny_weights / "inpaint" / "vae_tiny", bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "upsampling_scaling_factor": 4}))
    with pytest.raises(WeightsError, match=r"vae_tiny/config.json: latent_channels 4, upscale 64; .* at 1/8 size"):
        load_tiny_vae(bad, vae)


def test_quality_preview_is_a_bool():
    from editrt.errors import InputError
    from editrt.runtime.edits import Quality

    assert Quality().preview is False
    with pytest.raises(InputError, match=r"^preview: expected True or False, got 1$"):
        Quality(preview=1)


def test_a_preview_pass_decodes_the_unets_latents_with_the_tiny_vae_as_diffusers_does(reposition, photo):
    """Same latents as the full decode; the tiny VAE decodes them the way diffusers pipelines use AutoencoderTiny
    (vae.decode(latents / vae.config.scaling_factor), then VaeImageProcessor.postprocess): exact."""
    from diffusers.image_processor import VaeImageProcessor

    from editrt.runtime.images import resize_mask_covering, resize_rgb

    rgb, mask = resize_rgb(photo, (64, 96)), resize_mask_covering(MASK, (64, 96))
    calls, full_decoder, tiny_decoder = [], reposition.engines["vae_decoder"], reposition.preview_decoder
    try:
        full = reposition.engines["vae_decoder"] = _LatentsSeen(full_decoder, calls, "full")
        tiny = reposition.preview_decoder = _LatentsSeen(tiny_decoder, calls, "tiny")
        final = reposition._denoise(rgb, mask, "remove", 2, 1.0, 0, False)
        preview = reposition._denoise(rgb, mask, "remove", 2, 1.0, 0, False, preview=True)
    finally:
        reposition.engines["vae_decoder"], reposition.preview_decoder = full_decoder, tiny_decoder
    assert calls == ["full", "tiny"]
    torch.testing.assert_close(tiny.latents[0], full.latents[0], rtol=0, atol=0)
    vae = reposition.components.vae_tiny
    with torch.no_grad():
        decoded = vae.decode(tiny.latents[0] / vae.config.scaling_factor).sample
    expected = np.asarray(VaeImageProcessor(vae_scale_factor=8).postprocess(decoded, output_type="pil")[0])
    np.testing.assert_array_equal(preview, expected)
    assert not np.array_equal(preview, final)  # random tiny weights: a different decoder, different pixels


def test_reposition_previews_use_the_tiny_vae_and_finals_and_commits_never(tiny_weights, photo):
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights)
    calls = []
    _count_decoders(pipe, "vae_decoder", calls)
    # previews at the finals' steps and resolution: the memoized REMOVE pass must still not cross between them
    with EditSession(photo, pipe, steps=1, preview_steps=1, resolution=64, preview_resolution=64) as session:
        session.select(mask=MASK)
        session.preview(move=(20, 5)).result(timeout=120)
        assert calls and set(calls) == {"tiny"}  # REMOVE and HARMONIZE decoded by the tiny VAE
        del calls[:]
        final = session.final(move=(20, 5))
        assert calls and set(calls) == {"full"}
        direct = pipe(photo, mask=MASK, move=(20, 5), steps=1, resolution=64)
        np.testing.assert_array_equal(np.asarray(final.image), np.asarray(direct.image))
        del calls[:]
        session.commit(move=(20, 5))
        assert calls and set(calls) == {"full"}


def test_elements_previews_use_the_tiny_vae_and_finals_never(elements_pipe, photo):
    calls, full_decoder, tiny_decoder = [], elements_pipe.engines["element_vae_decoder"], elements_pipe.preview_decoder
    try:
        with EditSession(photo, elements_pipe, steps=1, preview_steps=1, resolution=64) as session:
            _count_decoders(elements_pipe, "element_vae_decoder", calls)
            session.preview(prompt="a cat").result(timeout=120)
            assert calls == ["tiny"]
            session.final(prompt="a cat")
            session.commit(prompt="a cat")
            assert calls == ["tiny", "full", "full"]
    finally:
        elements_pipe.engines["element_vae_decoder"], elements_pipe.preview_decoder = full_decoder, tiny_decoder


def test_without_vae_tiny_previews_decode_with_the_full_vae_as_before(tiny_weights, photo, tmp_path):
    from editrt.runtime.edits import Quality
    from editrt.runtime.reposition import RepositionPipeline

    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    shutil.rmtree(weights / "inpaint" / "vae_tiny")
    pipe = RepositionPipeline.from_pretrained(weights)
    assert pipe.preview_decoder is None
    with EditSession(photo, pipe, steps=1, preview_steps=1, resolution=64, preview_resolution=64) as session:
        session.select(mask=MASK)
        preview = session.preview(move=(20, 5)).result(timeout=120)
    assert session.preview_quality.preview
    plain = pipe(photo, mask=MASK, move=(20, 5), quality=Quality(steps=1, resolution=64))  # preview=False
    np.testing.assert_array_equal(np.asarray(preview.image), np.asarray(plain.image))
