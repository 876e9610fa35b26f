"""`editrt bench --only crop,deepcache` on tiny weights: region crops beside diffusers' padding_mask_crop and cached
UNet features beside DeepCacheSDHelper; each row's observed counters say what the UNet processed."""
import json

import pytest
import torch
from bench_cli import FAST, run_cli
from needs import need

from editrt.bench.less_work_cases import CACHE_SETTINGS

STEPS = 3  # interval 3: 1 full + 2 cached steps; interval 2: 2 full + 1 cached
REPOSITION = ("crop-reposition-whole/torch-eager", "crop-reposition-native/torch-eager")  # two passes: remove, harmonize


def steps_of(name: str) -> int:
    return 2 * STEPS if name in REPOSITION else STEPS


@pytest.fixture(scope="module")
def rows(tiny_weights, tmp_path_factory):
    need("DeepCache", "the deepcache rows' peer: pip install DeepCache==0.1.1 (the dev extra)")
    out = tmp_path_factory.mktemp("less-work-rows") / "b.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks on a shared 2-core machine: single-threaded is faster
    try:
        rc, err = run_cli(["--weights", tiny_weights, "--quick", "--only", "crop,deepcache", *FAST, "--steps", STEPS,
                           "--json", out])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, err[-3000:]
    return {r["name"]: r for r in json.loads(out.read_text())["rows"]}


def test_only_crop_and_deepcache_rows_ran_and_measured(rows):
    masks = ("m120x90", "m480x360")
    expected = {f"crop-{kind}-{m}/{b}" for m in masks for kind in ("whole", "processing") for b in ("torch-eager", "diffusers")}
    expected |= {f"crop-native-{m}/torch-eager" for m in masks}
    cached = [f"deepcache-i{i}-b{b}" for i, b in CACHE_SETTINGS]
    expected |= {f"{c}/{b}" for c in ("deepcache-off", *cached) for b in ("torch-eager", "diffusers")}
    expected |= set(REPOSITION)  # `--only crop` takes the repositioning rows too
    assert set(rows) == expected
    for name, row in rows.items():
        assert row["skipped"] is None and row["p50_ms"] > 0, (name, row["skipped"])
        assert row["observed"]["denoising_steps"] == steps_of(name), name


def pixels(rows, name):
    return rows[name]["observed"]["unet_latent_pixels"]


def test_a_native_crop_of_a_smaller_mask_processes_fewer_pixels(rows):
    small, large = pixels(rows, "crop-native-m120x90/torch-eager"), pixels(rows, "crop-native-m480x360/torch-eager")
    assert small <= 0.5 * large  # the done-when, in the work the UNet did
    assert large < pixels(rows, "crop-whole-m480x360/torch-eager")
    for m in ("m120x90", "m480x360"):  # whole and processing crops: the processing size whatever the mask
        sizes = {pixels(rows, f"crop-{kind}-{m}/{b}") for kind in ("whole", "processing") for b in ("torch-eager", "diffusers")}
        assert sizes == {pixels(rows, "crop-whole-m480x360/diffusers")}, m
    for name, row in rows.items():
        assert row["observed"]["unet_full_steps"] + row["observed"]["unet_cached_steps"] == steps_of(name), name


def test_a_reposition_with_a_crop_counts_less_unet_work_than_the_whole_photo(rows):
    """The issue's row: the same SEELE flow on the same photo, whole vs a native crop; the same passes and steps,
    fewer latent pixels and FLOPs (counted per step at each pass's own size)."""
    whole, crop = (rows[name]["observed"] for name in REPOSITION)
    assert whole["networks"] == crop["networks"] and whole["unet_full_steps"] == crop["unet_full_steps"] == 2 * STEPS
    assert 0 < crop["unet_latent_pixels"] < whole["unet_latent_pixels"]
    assert 0 < crop["unet_flops"] < whole["unet_flops"]
    assert whole["unet_flops_per_step"] * 2 * STEPS == whole["unet_flops"]  # every step full, all at one size


def test_a_cached_run_counts_fewer_flops(rows):
    def seen(name):
        return rows[name]["observed"]

    plain = seen("deepcache-off/torch-eager")
    assert plain["unet_full_steps"] == STEPS and plain["unet_cached_steps"] == 0
    assert seen("deepcache-off/diffusers")["unet_flops"] == plain["unet_flops"] > 0
    full_steps = {(3, 0): 1, (2, 1): 2}  # steps 0..2: full when i % interval == 0
    for interval, branch in CACHE_SETTINGS:
        ours, peer = seen(f"deepcache-i{interval}-b{branch}/torch-eager"), seen(f"deepcache-i{interval}-b{branch}/diffusers")
        assert ours["unet_full_steps"] == peer["unet_full_steps"] == full_steps[interval, branch]
        assert ours["unet_cached_steps"] == peer["unet_cached_steps"] == STEPS - full_steps[interval, branch]
        assert ours["unet_flops"] == peer["unet_flops"] < plain["unet_flops"]
        assert ours["unet_flops_per_step"] < plain["unet_flops_per_step"]
        # ours equals the helper's output (tests/runtime/test_deep_cache.py), so the deviation is the same
        assert 0 < ours["output_psnr_db"] == peer["output_psnr_db"] < float("inf")


def test_without_deepcache_the_peer_row_is_skipped_with_the_reason(tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "DeepCache", None)  # import DeepCache raises ImportError
    out = tmp_path / "b.json"
    rc, err = run_cli(["--weights", tiny_weights, "--quick", "--only", "deepcache-i3-b0", *FAST, "--json", out])
    assert rc == 0, err[-3000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["deepcache-i3-b0/diffusers"]["skipped"].startswith("DeepCache not installed")
    assert rows["deepcache-i3-b0/torch-eager"]["skipped"] is None  # ours still runs, with no ratio
    assert rows["deepcache-i3-b0/torch-eager"]["ratio"] is None
