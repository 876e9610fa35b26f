"""Cached denoising features (models/deep_cache.py, runtime/scheduler.py) against DeepCache's own helper.

Oracle: DeepCache 0.1.1's `DeepCacheSDHelper` on diffusers' StableDiffusionInpaintPipeline, with the same
tiny weights, prompt embeddings, DDIM scheduler and generator seed. Tolerance: exact. The helper returns
each skipped module's stored output; our cached step runs only the modules whose outputs still reach
the result, the same ops in the same order, so fp32 results on the CPU are byte-identical.
"""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
from needs import need
from PIL import Image

from editrt.cli import main
from editrt.errors import InputError
from editrt.models.deep_cache import DeepCacheUNet, step_flops, valid_branches
from editrt.runtime.scheduler import DenoiseLoop, LoopCache, LoopKey
from editrt.weights import load_config

SIZE = (64, 96)


@pytest.fixture(scope="module")
def deepcache_pipe(tiny_weights):
    """A private oracle pipeline: the helper rewires its modules' forward methods in place."""
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        tiny_weights / "inpaint", local_files_only=True, safety_checker=None, requires_safety_checker=False,
        text_encoder=None, tokenizer=None, feature_extractor=None, image_encoder=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def case(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    mask = np.zeros(SIZE, bool)
    mask[rng.integers(0, 20):rng.integers(30, 64), rng.integers(0, 30):rng.integers(50, 96)] = True
    return image, mask


def run_diffusers(pipe, prompts, image, mask, steps, guidance, seed, cache=None):
    """diffusers' output, with DeepCacheSDHelper(interval, branch) enabled around the call when `cache`."""
    helper = None
    if cache is not None:
        deepcache = need("DeepCache", "the DeepCache oracle: pip install DeepCache==0.1.1 (the dev extra)")
        helper = deepcache.DeepCacheSDHelper(pipe)
        helper.set_params(cache_interval=cache[0], cache_branch_id=cache[1])
        helper.enable()
    try:
        return np.asarray(pipe(
            prompt_embeds=prompts["remove"][None], negative_prompt_embeds=prompts["null"][None],
            image=Image.fromarray(image), mask_image=Image.fromarray(mask.astype(np.uint8) * 255), height=SIZE[0],
            width=SIZE[1], num_inference_steps=steps, guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0])
    finally:
        if helper is not None:
            helper.disable()


@pytest.mark.parametrize("interval,branch,guidance", [(2, 0, 1.0), (2, 3, 2.0), (3, 1, 1.0)])  # two intervals, a deeper branch, CFG
def test_cached_features_equal_deepcache_helper(reposition, deepcache_pipe, interval, branch, guidance):
    image, mask = case(interval * 10 + branch)
    ours = np.asarray(reposition.inpaint(image, mask, steps=5, guidance=guidance, seed=branch, resolution=SIZE[0],
                                         cache_interval=interval, cache_branch=branch))
    theirs = run_diffusers(deepcache_pipe, reposition.task_prompts, image, mask, 5, guidance, branch, (interval, branch))
    np.testing.assert_array_equal(ours[mask], theirs[mask])
    np.testing.assert_array_equal(ours[~mask], image[~mask])
    plain = np.asarray(reposition.inpaint(image, mask, steps=5, guidance=guidance, seed=branch, resolution=SIZE[0]))
    assert (plain[mask] != ours[mask]).any(), "the cached steps must change the output (else nothing was cached)"


def test_interval_1_and_the_disabled_helper_give_the_plain_output(reposition, deepcache_pipe):
    image, mask = case(7)
    prompts = reposition.task_prompts
    plain = np.asarray(reposition.inpaint(image, mask, steps=4, guidance=2.0, seed=1, resolution=SIZE[0]))
    every_step = np.asarray(reposition.inpaint(image, mask, steps=4, guidance=2.0, seed=1, resolution=SIZE[0],
                                               cache_interval=1, cache_branch=3))
    np.testing.assert_array_equal(every_step, plain)
    np.testing.assert_array_equal(run_diffusers(deepcache_pipe, prompts, image, mask, 4, 2.0, 1, (1, 3))[mask], plain[mask])
    run_diffusers(deepcache_pipe, prompts, image, mask, 4, 2.0, 1, (2, 0))  # enabled, then disabled again
    np.testing.assert_array_equal(run_diffusers(deepcache_pipe, prompts, image, mask, 4, 2.0, 1)[mask], plain[mask])


@pytest.mark.parametrize("latent_hw", [(8, 12), (7, 9)])  # (7, 9): not a multiple of the up factor: sizes forwarded
def test_full_step_is_the_unet_forward_bit_for_bit(reposition, latent_hw):
    unet = reposition.unet
    g = torch.Generator().manual_seed(sum(latent_hw))
    sample = torch.randn(2, 9, *latent_hw, generator=g)
    context = torch.randn(2, 50, unet.config.cross_attention_dim, generator=g)
    timestep = torch.tensor([801.0, 801.0])
    with torch.no_grad():
        plain = unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]
        for branch in valid_branches(unet):
            noise, feature = DeepCacheUNet(unet, branch).full(sample, timestep, context)
            assert torch.equal(noise, plain), branch
            assert feature.shape[0] == 2


def test_loop_with_interval_1_is_the_uncached_loop_bit_for_bit(reposition):
    """Every step a full step of DeepCacheUNet (the path a cached loop's full steps take) equals the engine's loop."""
    engine = reposition.engines["inpaint_unet"]
    g = torch.Generator().manual_seed(5)
    latents, extra = torch.randn(1, 4, 8, 12, generator=g), torch.randn(2, 5, 8, 12, generator=g)
    context = {"encoder_hidden_states": reposition.prompt_embeds("remove", True)}

    def loop(feature_cache, features):
        key = LoopKey("t", (1, 4, 8, 12), (2, 5, 8, 12), (("encoder_hidden_states", (2, 50, 32)),), 4, True,
                      torch.float32, feature_cache)
        return DenoiseLoop(key, engine, reposition.scheduler_config, "cpu", False, features).run(latents, context, extra, 3.0)

    uncached = loop(None, None)
    assert torch.equal(loop((1, 0), DeepCacheUNet(reposition.unet, 0)), uncached)
    assert not torch.equal(loop((2, 0), DeepCacheUNet(reposition.unet, 0)), uncached)


def test_the_feature_buffer_counts_against_the_loop_budget(reposition):
    engine = reposition.engines["inpaint_unet"]
    cache = LoopCache(reposition.scheduler_config, "cpu")
    key = LoopKey("t", (1, 4, 8, 12), (1, 5, 8, 12), (("encoder_hidden_states", (1, 50, 32)),), 3, False,
                  torch.float32, (2, 0))
    loop = cache.get(key, engine, DeepCacheUNet(reposition.unet, 0))
    before = cache.cache.bytes
    loop.run(torch.randn(1, 4, 8, 12), {"encoder_hidden_states": reposition.prompt_embeds("remove", False)},
             torch.randn(1, 5, 8, 12))
    feature = loop.deep_feature
    assert cache.cache.bytes == before + feature.element_size() * feature.nelement() == loop.nbytes


def test_cached_steps_count_less_unet_work():
    """FLOPs counted by torch's FlopCounterMode on meta tensors (shapes only, plain diffusers attention): one
    full and one cached step of the tiny UNet and of the full SD-2 inpainting UNet at 512x512 with CFG."""
    counts = {}
    for name, latent_hw, branches in (("tiny", (8, 12), None), ("full", (64, 64), (0, 11))):
        config = load_config(name)["inpaint"]["unet"]
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
            sample, context = torch.empty(2, 9, *latent_hw), torch.empty(2, 50, config["cross_attention_dim"])
            timestep = torch.tensor([501.0, 501.0])
        counts[name] = [step_flops(unet, b, sample, timestep, context) for b in branches or valid_branches(unet)]
    for name, steps in counts.items():
        for c in steps:
            assert c["full"] == c["plain"] > c["cached"] > 0, name
        cached = [c["cached"] for c in steps]  # a deeper branch keeps more of the UNet on a cached step
        assert cached == sorted(cached) and len(set(cached)) == len(cached), name
    assert counts["full"][0]["cached"] < counts["full"][0]["full"] / 10  # branch 0: only the outermost layers


@pytest.mark.parametrize("options,field", [
    (dict(cache_interval=0), "cache_interval"),
    (dict(cache_interval=2.5), "cache_interval"),
    (dict(cache_interval=2, cache_branch=2), "cache_branch"),  # the tiny up blocks have 2 layers: no layer 2
    (dict(cache_interval=2, cache_branch=6), "cache_branch"),  # 2 up blocks: no block 2
    (dict(cache_interval=2, cache_branch=-1), "cache_branch"),
    (dict(cache_branch=0), "cache_branch"),  # a branch without an interval
])
def test_bad_cache_options_name_their_field(reposition, options, field):
    image, mask = case(0)
    with pytest.raises(InputError) as e:
        reposition.inpaint(image, mask, steps=1, **options)
    assert e.value.field == field


def test_cli_cache_interval_is_checked_before_anything_runs(tmp_path, capsys):
    image, mask = case(1)
    Image.fromarray(image).save(tmp_path / "i.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    rc = main(["inpaint", str(tmp_path / "i.png"), str(tmp_path / "m.png"), "-o", str(tmp_path / "o.png"),
               "--cache-interval", "0", "--weights", str(tmp_path / "absent"), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "cache_interval: expected a whole number of steps >= 1" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o.png").exists()


def test_cli_cache_interval_3_branch_0_equals_the_helper(tiny_weights, reposition, deepcache_pipe, tmp_path, capsys):
    """The issue's done-when, through the command line: --cache-interval 3 --cache-branch 0 --steps 6."""
    image, mask = case(6)
    Image.fromarray(image).save(tmp_path / "i.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    rc = main(["inpaint", str(tmp_path / "i.png"), str(tmp_path / "m.png"), "-o", str(tmp_path / "o.png"),
               "--cache-interval", "3", "--cache-branch", "0", "--steps", "6", "--seed", "8",
               "--resolution", str(SIZE[0]), "--weights", str(tiny_weights), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    ours = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"))
    theirs = run_diffusers(deepcache_pipe, reposition.task_prompts, image, mask, 6, 1.0, 8, (3, 0))
    np.testing.assert_array_equal(ours[mask], theirs[mask])


@pytest.mark.gpu
def test_cached_loop_captured_in_a_cuda_graph_equals_eager(tiny_weights):
    from editrt.runtime.reposition import RepositionPipeline

    image, mask = case(3)
    outputs = {}
    for graphs in (False, True):
        pipe = RepositionPipeline.from_pretrained(tiny_weights, device="cuda", cuda_graphs=graphs)
        for _ in range(2):  # the second call replays the captured graph
            outputs[graphs] = np.asarray(pipe.inpaint(image, mask, steps=5, guidance=2.0, seed=2, resolution=SIZE[0],
                                                      cache_interval=3, cache_branch=1))
        assert all((loop.graph is not None) == graphs for loop in pipe.loops.loops)
    np.testing.assert_array_equal(outputs[True], outputs[False])
