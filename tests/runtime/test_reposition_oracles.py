"""The repositioning editor against its external oracles (DESIGN.md contract 4).

Tolerance: exact. Our pass runs the same PyTorch ops in the same order as diffusers'
StableDiffusionInpaintPipeline (and segment-anything's SamPredictor) on the same weights, so
fp32 results are bit-identical on CPU; any difference means the algorithm diverged.
"""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image
from segment_anything import SamPredictor


def random_case(seed, size=(128, 128)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    mask = np.zeros(size, bool)
    y0, x0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
    mask[y0:y0 + rng.integers(8, size[0] // 2), x0:x0 + rng.integers(8, size[1] // 2)] = True
    return image, mask


def run_diffusers(pipe, prompts, task, image, mask, steps, guidance, seed, condition=None):
    h, w = mask.shape
    return np.asarray(pipe(
        prompt_embeds=prompts[task][None], negative_prompt_embeds=prompts["null"][None],
        image=Image.fromarray(image), mask_image=Image.fromarray(mask.astype(np.uint8) * 255),
        masked_image_latents=condition, height=h, width=w, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0])


@pytest.mark.parametrize("task,guidance,seed", [("remove", 1.0, 0), ("remove", 4.0, 1), ("complete", 1.0, 2), ("complete", 7.5, 3)])
def test_inpaint_equals_diffusers(reposition, diffusers_pipe, task, guidance, seed):
    fresh = int(np.random.default_rng().integers(1 << 30))  # new inputs every run
    image, mask = random_case(fresh)
    ours = np.asarray(reposition.inpaint(image, mask, task=task, steps=4, guidance=guidance, seed=seed))
    theirs = run_diffusers(diffusers_pipe, reposition.task_prompts, task, image, mask, 4, guidance, seed)
    np.testing.assert_array_equal(ours[mask], theirs[mask])
    np.testing.assert_array_equal(ours[~mask], image[~mask])  # outside: the input bytes


def test_inpaint_non_square(reposition, diffusers_pipe):
    image, mask = random_case(7, size=(96, 160))
    ours = np.asarray(reposition.inpaint(image, mask, steps=3, guidance=2.0, seed=9, resolution=96))
    theirs = run_diffusers(diffusers_pipe, reposition.task_prompts, "remove", image, mask, 3, 2.0, 9)
    np.testing.assert_array_equal(ours[mask], theirs[mask])


def full_condition(image):
    # The harmonizer's unmasked condition is the whole (inharmonious) image: diffusers takes it as
    # `masked_image_latents` in pixel space and encodes it with the same generator.
    return torch.from_numpy(np.stack([image.astype(np.float32) / 255.0]).transpose(0, 3, 1, 2)) * 2.0 - 1.0


def test_harmonize_lora_scale_0_is_base_unet_bit_for_bit(reposition, diffusers_pipe):
    image, mask = random_case(11)
    before = {n: p.detach().clone() for n, p in reposition.unet.named_parameters()}
    ours = np.asarray(reposition.harmonize(image, mask, steps=3, seed=4, lora_scale=0.0))
    theirs = run_diffusers(diffusers_pipe, reposition.task_prompts, "harmonize", image, mask, 3, 1.0, 4, full_condition(image))
    np.testing.assert_array_equal(ours[mask], theirs[mask])
    # after a c = 1 pass, the next base-UNet pass runs on the base weights, bit for bit
    reposition.harmonize(image, mask, steps=1, seed=4, lora_scale=1.0)
    assert any(not torch.equal(before[n], p) for n, p in reposition.unet.named_parameters())  # c = 1 is in place
    again = np.asarray(reposition.inpaint(image, mask, steps=3, seed=4))
    theirs = run_diffusers(diffusers_pipe, reposition.task_prompts, "remove", image, mask, 3, 1.0, 4)
    np.testing.assert_array_equal(again[mask], theirs[mask])
    for name, p in reposition.unet.named_parameters():
        assert torch.equal(before[name], p), name


def test_harmonize_lora_scale_1_equals_diffusers_fuse_lora(reposition, tiny_weights):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        tiny_weights / "inpaint", local_files_only=True, safety_checker=None, requires_safety_checker=False,
        text_encoder=None, tokenizer=None, feature_extractor=None, image_encoder=None,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tiny_weights / "harmonizer_lora.safetensors")
    pipe.fuse_lora(lora_scale=1.0)
    image, mask = random_case(int(np.random.default_rng().integers(1 << 30)))
    ours = np.asarray(reposition.harmonize(image, mask, steps=3, seed=6))
    theirs = run_diffusers(pipe, reposition.task_prompts, "harmonize", image, mask, 3, 1.0, 6, full_condition(image))
    np.testing.assert_array_equal(ours[mask], theirs[mask])
    base = np.asarray(reposition.harmonize(image, mask, steps=3, seed=6, lora_scale=0.0))
    assert np.abs(base[mask].astype(int) - ours[mask]).max() > 0, "the LoRA must change the result"


@pytest.mark.parametrize("prompt", [
    dict(points=[[120, 100]]),
    dict(points=[[60, 50], [300, 200]], labels=[1, 0]),
    dict(box=[40, 30, 400, 260]),
    dict(points=[[200, 150]], box=[100, 50, 350, 280]),
])
def test_segment_equals_sam_predictor(reposition, photo, prompt):
    predictor = SamPredictor(reposition.sam)
    predictor.set_image(photo)
    points = np.array(prompt["points"], float) if "points" in prompt else None
    labels = np.array(prompt.get("labels", [1] * len(points))) if points is not None else None
    box = np.array(prompt["box"], float) if "box" in prompt else None
    masks, iou, _ = predictor.predict(point_coords=points, point_labels=labels, box=box, multimask_output=True)
    ours = reposition.segment(photo, **prompt)
    np.testing.assert_array_equal(ours, masks[int(np.argmax(iou))])


def test_segment_caches_the_image_embedding(reposition, photo, monkeypatch):
    reposition.segment(photo, points=[[10, 10]])
    calls = []
    original = reposition.sam.image_encoder.forward
    monkeypatch.setattr(reposition.sam.image_encoder, "forward", lambda x: calls.append(1) or original(x))
    reposition.segment(photo, points=[[20, 30]])
    assert calls == []
    reposition.segment(photo[::-1].copy(), points=[[20, 30]])
    assert calls == [1]
