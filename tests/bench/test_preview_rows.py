"""`editrt bench --only preview-decode` on tiny weights: a latent decoded by the full VAE vs the tiny one (drag
previews), for both editors; each row says which decoder ran, the FLOPs it counted and the preview's PSNR against
the final; the diffusers peer is skipped because it is the same code (checked bit-equal)."""
import json
import math

import pytest
import torch
from bench_cli import FAST, run_cli
from safetensors import safe_open

EDITORS = ("inpaint", "elements")
CLASSES = {"full": "AutoencoderKL", "tiny": "AutoencoderTiny"}
FOLDERS = {"full": "vae", "tiny": "vae_tiny"}


@pytest.fixture(scope="module")
def rows(tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("preview-rows") / "b.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks on a shared 2-core machine: single-threaded is faster
    try:
        rc, err = run_cli(["--weights", tiny_weights, "--quick", "--only", "preview-decode", *FAST, "--json", out])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, err[-3000:]
    return {r["name"]: r for r in json.loads(out.read_text())["rows"]}


def test_both_decoders_ran_for_both_editors(rows):
    components = {f"preview-decode-{e}-{kind}" for e in EDITORS for kind in ("full", "tiny")}
    assert set(rows) == {f"{c}/{b}" for c in components for b in ("torch-eager", "diffusers")}
    for c in components:
        ours = rows[f"{c}/torch-eager"]
        assert ours["skipped"] is None and ours["p50_ms"] > 0, (c, ours["skipped"])
        # the peer is diffusers' own decode on the same folder: checked bit-equal to ours, then skipped with that reason
        assert rows[f"{c}/diffusers"]["skipped"].startswith("the same code as ours"), c


def decode_params(folder) -> int:
    """Parameters of the decode path, read from the safetensors file diffusers wrote (not from the bench's count)."""
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(("decoder.", "post_quant_conv.")))


def test_each_row_records_the_decoder_that_ran(rows, tiny_weights):
    for editor in EDITORS:
        engine = "vae_decoder" if editor == "inpaint" else "element_vae_decoder"
        for kind, cls in CLASSES.items():
            row = rows[f"preview-decode-{editor}-{kind}/torch-eager"]
            # forward hooks on both decoder modules: only the row's own ran, once per timed run
            assert row["observed"]["networks"] == {f"{cls}.decoder": 1, engine: 1}, row["observed"]
            folder = tiny_weights / editor / FOLDERS[kind]
            assert f"{cls} decoder, {decode_params(folder):,} params ({editor}/{FOLDERS[kind]}/)" in row["about"]
            vae = json.loads((tiny_weights / editor / "vae" / "config.json").read_text())
            side = json.loads((tiny_weights / editor / "unet" / "config.json").read_text())["sample_size"]
            image = side * 2 ** (len(vae["block_out_channels"]) - 1)
            assert row["shape"] == f"latent 1x{vae['latent_channels']}x{side}x{side} -> image {image}x{image}"


def test_the_tiny_decoder_counts_fewer_flops_than_the_full_one(rows, tiny_weights):
    from diffusers import AutoencoderKL, AutoencoderTiny
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    for editor in EDITORS:
        full, tiny = (rows[f"preview-decode-{editor}-{kind}/torch-eager"] for kind in ("full", "tiny"))
        for row in (full, tiny):
            assert row["observed"]["decoder_flops"] == row["flops"] > 0
        assert tiny["flops"] < full["flops"]
        # the count (a meta copy built from config.json) is what the loaded decoder does: FlopCounterMode on the real
        # one, attention through SDPA's math path (the meta count's; FlopCounterMode misses the CPU flash kernel)
        side = json.loads((tiny_weights / editor / "unet" / "config.json").read_text())["sample_size"]
        for row, cls, folder in ((full, AutoencoderKL, "vae"), (tiny, AutoencoderTiny, "vae_tiny")):
            vae = cls.from_pretrained(tiny_weights / editor / folder, local_files_only=True).eval()
            with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                vae.decode(torch.randn(1, 4, side, side))
            assert counter.get_total_flops() == row["flops"], (editor, folder)


def test_a_preview_records_its_psnr_against_the_final(rows):
    for editor in EDITORS:
        tiny = rows[f"preview-decode-{editor}-tiny/torch-eager"]["observed"]
        # random weights: two unrelated images, a low but finite PSNR (an identical decode would be infinite)
        assert 0 < tiny["output_psnr_db"] < 40, tiny
        assert "output_psnr_db" not in rows[f"preview-decode-{editor}-full/torch-eager"]["observed"]


def test_the_full_config_previews_run_the_real_taesd_architecture():
    """`--config full` rows decode with TAESD's architecture (madebyollin/taesd's config, diffusers' AutoencoderTiny
    defaults), built from the full config's VAEs by `weights init`."""
    from diffusers import AutoencoderTiny

    from editrt.weights import load_config, tiny_vae_config

    taesd = {"encoder_block_out_channels": (64, 64, 64, 64), "decoder_block_out_channels": (64, 64, 64, 64),
             "num_encoder_blocks": (1, 3, 3, 3), "num_decoder_blocks": (3, 3, 3, 1), "latent_channels": 4,
             "upsampling_scaling_factor": 2, "act_fn": "relu", "latent_magnitude": 3, "latent_shift": 0.5,
             "scaling_factor": 1.0}
    full = load_config("full")
    with torch.device("meta"):
        defaults = AutoencoderTiny()  # diffusers' defaults: TAESD's
        for editor in EDITORS:
            tiny = AutoencoderTiny.from_config(tiny_vae_config(full[editor]["vae"], "full"))
            assert {k: tuple(v) if isinstance(v, list) else v for k, v in tiny.config.items() if k in taesd} == taesd
            assert [p.shape for p in tiny.parameters()] == [p.shape for p in defaults.parameters()]


def test_a_decoder_that_is_not_diffusers_own_fails_the_peer_row(reposition, tiny_weights, monkeypatch):
    """The peer row is skipped only while our engine's decode is bit-equal to diffusers'; otherwise the row fails."""
    from editrt.bench import preview_cases
    from editrt.bench.cases import BenchContext, Selection, Skip

    ctx = BenchContext(tiny_weights, torch.device("cpu"), torch.float32, "tiny", True, 2, Selection([]))
    monkeypatch.setattr(preview_cases.Editor, "pipe", lambda self, ctx: reposition)
    inpaint = preview_cases.EDITORS[0]
    with pytest.raises(Skip, match="the same code as ours"):
        preview_cases._peer(ctx, inpaint, tiny=False)
    full = reposition.engines["vae_decoder"]
    monkeypatch.setitem(reposition.engines, "vae_decoder", lambda **x: {"image": full(**x)["image"] + 1e-3})
    with pytest.raises(AssertionError, match="differs from diffusers' AutoencoderKL.decode"):
        preview_cases._peer(ctx, inpaint, tiny=False)
