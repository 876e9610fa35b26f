"""Benchmark rows of one training step of each `editrt train` job, beside diffusers' own step where one exists.

| component | what one timed run is |
| --- | --- |
| train-prompts-step | one AdamW step of task inversion (Eq. 1, train/inversion.py) on a batch of B samples: two VAE encodes, the inpainting UNet forward and backward to the [L, C] prompt |
| train-harmonizer-step | one AdamW step of the harmonizer (Eq. 2, train/harmonizer.py): three VAE encodes, the UNet with the LoRA forward and backward to prompt + LoRA |
| train-elements-stage1-step | one AdamW step of EIE stage 1 (train/elements.py): the content encoder on every element's patch, the light decoder, backward to both |
| train-elements-stage2-step | one AdamW step of EIE stage 2 (Eq. 5, train/elements_stage2.py): VAE encode, text encoder, content encoder (frozen), the element decoder UNet forward and backward to all of it |

Rows: `torch-eager` (ours: the job's own loss function and trained module, as `editrt train` runs them, without
Accelerate around them) and, where diffusers has a training script for the same model, `diffusers` (the peer):
for the prompts, one step of diffusers' `examples/textual_inversion/textual_inversion.py` (a new token's input
embedding trained through the text encoder) on the same inpainting UNet, with the 9-channel input the
inpainting UNet takes; for the harmonizer, one step of `examples/text_to_image/train_text_to_image_lora.py`
(peft's LoRA added with `unet.add_adapter`, the same rank and target layers as ours, LoRA parameters in fp32)
on the same UNet. Both use the same batch (images, masks, t, noise) and dtype as ours: frozen networks in the
bench dtype, trained tensors in fp32 (both scripts' mixed-precision recipe). The elements rows have no peer
(no diffusers script trains an element decoder or its encoder).

Each row's `observed` says what one timed run did: `training_steps` (1) and `training_samples` (B), and the
network calls. samples/s = training_samples / (p50_ms / 1000); `peak_mb` is the step's peak memory.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from editrt.bench import work
from editrt.bench.cases import BenchContext, Case, Run, Skip, dtype_name

BATCH = 4  # samples per timed step (per process; `editrt train`'s default --micro-batch)
PHOTOS = 2  # partitioned photos the elements rows' batches are cut from (stage 2 lays each over the other)
PREFIX = "train"
PROMPTS, HARMONIZER = "train-prompts-step", "train-harmonizer-step"
STAGE1, STAGE2 = "train-elements-stage1-step", "train-elements-stage2-step"
TINY_SIDE, TINY_RANK = 32, 4  # tiny weights: every code path at CPU-test size


def _seele_resolution(ctx: BenchContext) -> int:
    """The prompts / harmonizer jobs' --resolution: the inpainting UNet's native size (SD-2: 512)."""
    return TINY_SIDE if ctx.config == "tiny" else ctx.resolution


def _lora_rank(ctx: BenchContext) -> int:
    from editrt.train.harmonizer import DEFAULT_RANK

    return TINY_RANK if ctx.config == "tiny" else DEFAULT_RANK


TEXT_DIFFERS = ("diffusers' script encodes a caption with the text encoder in every step (textual inversion: the "
                "learned token goes through it); editrt trains the encoder's output directly and runs none")


def _square_masks(size: int, n: int) -> list[np.ndarray]:
    """n different object-like masks (ellipses at different places)."""
    y, x = np.ogrid[:size, :size]
    return [((y - size * (0.3 + 0.1 * i)) / (0.2 * size)) ** 2 + ((x - size * (0.6 - 0.1 * i)) / (0.25 * size)) ** 2
            <= 1 for i in range(n)]


def _inpaint_batches(ctx: BenchContext, resolution: int, latent_shape, timesteps: int, real: bool = False) -> list:
    """ctx.n_inputs batches of B samples: photo crops in [-1, 1], object masks, t, noises (train/samples.py's keys)."""
    from editrt.train.samples import as_tensor, noise_draws

    photos, masks = ctx.photos(resolution, BATCH * ctx.n_inputs), _square_masks(resolution, BATCH)
    rng = np.random.default_rng(7)
    batches = []
    for b in range(ctx.n_inputs):
        samples = []
        for i in range(BATCH):
            rgb = photos[b * BATCH + i]
            sample = {"image": as_tensor(rgb), "mask": torch.from_numpy(masks[i].astype(np.float32))[None],
                      **noise_draws(rng, latent_shape, timesteps)}
            if real:  # the harmonizer's pair: the composite is the photo with the object's colours shifted
                composite = rgb.astype(np.float32)
                composite[masks[i]] = np.clip(composite[masks[i]] * [1.2, 0.9, 0.7], 0, 255)
                sample["real"], sample["image"] = sample["image"], as_tensor(composite)
            samples.append(sample)
        batches.append({k: torch.stack([s[k] for s in samples]).to(ctx.device) for k in samples[0]})
    return batches


def _step(parameters, loss_fn, lr: float, betas=(0.9, 0.999)):
    """(call, check): call(batch) runs one AdamW step with gradients on (the suite times under no_grad); check(loss)
    proves the step ran: a finite loss, and the trained tensors moved since the row was built."""
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=betas)
    start = [p.detach().clone() for p in parameters]

    def check(loss) -> None:
        if not torch.isfinite(loss).all():
            raise AssertionError(f"training step: loss {loss}")
        if all(torch.equal(p, s) for p, s in zip(parameters, start, strict=True)):
            raise AssertionError("training step: no trained tensor changed")

    def call(batch):
        with torch.enable_grad():
            loss = loss_fn(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        work.count_training_step(BATCH)
        return loss.detach()
    return call, check


def _layout(ctx: BenchContext):
    from editrt.models.components import WeightsLayout

    return WeightsLayout(ctx.weights)


# ---------------------------------------------------------------------- SEELE: prompts and harmonizer
def _frozen_inpainter(ctx: BenchContext):
    from editrt.train.inversion import FrozenInpainter

    return ctx.memo("train frozen inpainter", lambda: FrozenInpainter(_layout(ctx), ctx.device, ctx.dtype))


def _kept_prompt(ctx: BenchContext, task: str) -> torch.Tensor:
    from editrt.models.inpaint import load_task_prompts

    return load_task_prompts(_layout(ctx).task_prompts, ctx.unet_config["cross_attention_dim"])[task]


def _prompts_ours(ctx: BenchContext) -> Run:
    from editrt.train.inversion import TaskPrompt

    frozen = _frozen_inpainter(ctx)
    prompt = TaskPrompt(_kept_prompt(ctx, "remove")).to(ctx.device)
    batches = _inpaint_batches(ctx, _seele_resolution(ctx), frozen.latent_shape(_seele_resolution(ctx)),
                               frozen.scheduler.config.num_train_timesteps)
    call, check = _step(prompt.parameters(), lambda b: frozen.per_sample_loss(prompt, b).mean(), lr=8e-5)
    return Run(call, batches, dtype_name(ctx.dtype), check, parts=[frozen.unet],
               networks={"inpaint_unet": frozen.unet, "vae_encoder": frozen.encoder})


def _peer_text_side(ctx: BenchContext, token: str | None):
    """diffusers' scripts' text side, from the inpainting folder: tokenizer (+ a placeholder token for textual
    inversion, its embedding initialised from an existing token's, as the script does) and the text encoder."""
    from transformers import CLIPTextModel, CLIPTokenizer

    layout = _layout(ctx)
    tokenizer = CLIPTokenizer.from_pretrained(layout.tokenizer, local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(layout.text_encoder, local_files_only=True)
    if token is not None:
        if tokenizer.add_tokens(token) != 1:
            raise Skip(f"the tokenizer already has {token!r}")
        text_encoder.resize_token_embeddings(len(tokenizer))
        embeddings = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            embeddings[-1] = embeddings[tokenizer.convert_tokens_to_ids(tokenizer.tokenize("photo")[0])]
    text = f"a photo of {token}" if token else "a photo"
    ids = tokenizer(text, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.repeat(BATCH, 1).to(ctx.device)
    return tokenizer, text_encoder.to(ctx.device), ids


def _peer_unet_vae(ctx: BenchContext):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    layout = _layout(ctx)
    unet = UNet2DConditionModel.from_pretrained(layout.unet, local_files_only=True).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(layout.vae, local_files_only=True).requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(layout.scheduler, local_files_only=True)  # the scripts' scheduler
    return unet.to(ctx.device, ctx.dtype), vae.to(ctx.device, ctx.dtype), scheduler


def _peer_inpaint_input(vae, scheduler, batch, dtype, whole_condition: bool):
    """The scripts' latents (vae.encode(...).latent_dist with the batch's posterior noise, x scaling factor),
    plus what the 9-channel inpainting UNet needs: the mask at latent size and the condition's latents."""
    def encode(image, noise):
        dist = vae.encode(image.to(dtype)).latent_dist
        return (dist.mean + dist.std * noise.to(dtype)) * vae.config.scaling_factor

    image, mask = batch["image"], batch["mask"].to(dtype)
    latents = encode(image, batch["posterior_noise"][:, 0])
    condition = encode(image if whole_condition else image * (mask < 0.5), batch["posterior_noise"][:, 1])
    noisy = scheduler.add_noise(latents, batch["noise"].to(dtype), batch["timestep"])
    return torch.cat([noisy, F.interpolate(mask, size=latents.shape[-2:]), condition], 1), latents


def _prompts_diffusers(ctx: BenchContext) -> Run:
    """One step of diffusers' textual_inversion.py on the inpainting UNet."""
    unet, vae, scheduler = _peer_unet_vae(ctx)
    tokenizer, text_encoder, ids = _peer_text_side(ctx, "<remove-task>")
    # the script: only the token embeddings train (and the rows of the other tokens are restored after the step)
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 flattened CLIPTextModel
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    embeddings = text_encoder.get_input_embeddings()
    original = embeddings.weight.detach().clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool, device=ctx.device)
    keep[-1] = False
    side = _seele_resolution(ctx)
    batches = _inpaint_batches(ctx, side, (vae.config.latent_channels, *([side // ctx.vae_scale_factor] * 2)),
                               scheduler.config.num_train_timesteps)

    def loss_fn(batch):
        with torch.no_grad():
            model_input, _ = _peer_inpaint_input(vae, scheduler, batch, ctx.dtype, whole_condition=False)
        states = text_encoder(ids)[0].to(ctx.dtype)
        pred = unet(model_input, batch["timestep"], states).sample
        return F.mse_loss(pred.float(), batch["noise"].float(), reduction="mean")

    step, check = _step(embeddings.parameters(), loss_fn, lr=8e-5)

    def call(batch):
        loss = step(batch)
        with torch.no_grad():  # the script's index_no_updates
            embeddings.weight[keep] = original[keep]
        return loss
    return Run(call, batches, dtype_name(ctx.dtype), check, parts=[unet],
               networks={"inpaint_unet": unet, "vae_encoder": vae.encoder, "text_encoder": text_encoder})


def _harmonizer_ours(ctx: BenchContext) -> Run:
    from editrt.models.inpaint import load_unet
    from editrt.train.harmonizer import DEFAULT_TARGETS, HarmonizerParams, harmonizer_loss
    from editrt.train.inversion import FrozenInpainter

    frozen = FrozenInpainter(_layout(ctx), ctx.device, ctx.dtype)  # its own UNet: the LoRA hooks stay on it
    frozen.unet = load_unet(_layout(ctx).unet, ctx.dtype).requires_grad_(False).to(ctx.device)
    params = HarmonizerParams(_kept_prompt(ctx, "harmonize"), frozen.unet, DEFAULT_TARGETS, _lora_rank(ctx), 0)
    params.to(ctx.device)
    params.attach(frozen.unet)
    batches = _inpaint_batches(ctx, _seele_resolution(ctx), frozen.latent_shape(_seele_resolution(ctx)),
                               frozen.scheduler.config.num_train_timesteps, real=True)
    call, check = _step(params.parameters(), lambda b: harmonizer_loss(frozen, params, b).mean(), lr=8e-5)
    return Run(call, batches, dtype_name(ctx.dtype), check, parts=[frozen.unet],
               networks={"inpaint_unet": frozen.unet, "vae_encoder": frozen.encoder})


def _harmonizer_diffusers(ctx: BenchContext) -> Run:
    """One step of diffusers' train_text_to_image_lora.py on the inpainting UNet (peft LoRA, same rank/targets)."""
    from peft import LoraConfig

    from editrt.train.harmonizer import DEFAULT_TARGETS

    unet, vae, scheduler = _peer_unet_vae(ctx)
    _, text_encoder, ids = _peer_text_side(ctx, None)
    text_encoder.requires_grad_(False)
    rank = _lora_rank(ctx)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(DEFAULT_TARGETS)))
    for p in unet.parameters():  # the script's cast_training_params: the LoRA in fp32
        if p.requires_grad:
            p.data = p.data.float()
    lora = [p for p in unet.parameters() if p.requires_grad]
    side = _seele_resolution(ctx)
    batches = _inpaint_batches(ctx, side, (vae.config.latent_channels, *([side // ctx.vae_scale_factor] * 2)),
                               scheduler.config.num_train_timesteps, real=True)

    def loss_fn(batch):
        with torch.no_grad():
            model_input, _ = _peer_inpaint_input(vae, scheduler, batch, ctx.dtype, whole_condition=True)
        states = text_encoder(ids)[0].to(ctx.dtype)
        pred = unet(model_input, batch["timestep"], states).sample
        return F.mse_loss(pred.float(), batch["noise"].float(), reduction="mean")

    call, check = _step(lora, loss_fn, lr=8e-5)
    return Run(call, batches, dtype_name(ctx.dtype), check, parts=[unet],
               networks={"inpaint_unet": unet, "vae_encoder": vae.encoder, "text_encoder": text_encoder})


# ---------------------------------------------------------------------- EIE: stage 1 and stage 2
TINY_ELEMENTS_SIDE = 32  # tiny weights: both stages at 32 px (every code path, CPU-test sized)


def _elements_resolution(ctx: BenchContext, stage: int) -> int:
    """The jobs' default --resolution: stage 1 256, stage 2 the decoder UNet's native size (SD-1.5: 512)."""
    if ctx.config == "tiny":
        return TINY_ELEMENTS_SIDE
    unet = ctx.read_json("elements", "unet", "config.json")
    vae = ctx.read_json("elements", "vae", "config.json")
    return 256 if stage == 1 else unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def _partitions(ctx: BenchContext, size: int):
    """Each bench photo at size x size and the runtime's partition of it (16x16 grid)."""
    def make():
        from editrt.runtime.partition import partition

        pipe = ctx.torch_pipeline("torch-eager", "elements")  # SAM of the weights (shared with the elements rows)
        return pipe, [(rgb, partition(pipe.segmenter, rgb)) for rgb in ctx.photos(size, PHOTOS)]
    return ctx.memo(f"train partitions {size}", make)


def _element_tensors(ctx: BenchContext, size: int, source_shift: int = 0) -> list[dict]:
    """Per photo: patches of photo i cut by partition i + source_shift (stage 2's Random Partition), boxes, alive."""
    from editrt.runtime.elements import Elements
    from editrt.runtime.elements_pipeline import ElementsPipeline

    _, parts = _partitions(ctx, size)
    out = []
    for i, (rgb, _) in enumerate(parts):
        part = parts[(i + source_shift) % len(parts)][1]
        patches, ids = ElementsPipeline.element_patches(None, rgb, part)
        full = torch.zeros(part.num_elements, *patches.shape[1:])
        full[torch.from_numpy(ids)] = patches
        elements = Elements.from_labels(part.labels, np.zeros((part.num_elements, 1), np.float32), (size, size))
        out.append({"image": torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1).permute(2, 0, 1), "patches": full,
                    "boxes": torch.from_numpy(elements.boxes()), "alive": torch.from_numpy(np.asarray(elements.alive))})
    return out


def _stage1_ours(ctx: BenchContext) -> Run:
    from editrt.models.content_encoder import ContentEncoder
    from editrt.train.elements import LightDecoder, Stage1

    size = _elements_resolution(ctx, 1)
    encoder = ContentEncoder.from_pretrained(_layout(ctx).elements / "content_encoder").float().train()
    torch.manual_seed(0)
    model = Stage1(encoder, LightDecoder(encoder.config["feature_dim"], size)).to(ctx.device)
    samples = _element_tensors(ctx, size)
    batches = [{k: torch.stack([samples[(b + i) % PHOTOS][k] for i in range(BATCH)]).to(ctx.device)
                for k in samples[0]} for b in range(ctx.n_inputs)]
    # the module trains in fp32 (the job's Accelerate autocasts under --mixed-precision); here as the loop sees it
    autocast = ctx.dtype != torch.float32

    def loss_fn(batch):
        with torch.autocast(ctx.device.type, dtype=ctx.dtype, enabled=autocast):
            return model(batch).float().mean()

    call, check = _step(model.parameters(), loss_fn, lr=1e-4, betas=(0.9, 0.95))
    return Run(call, batches, dtype_name(ctx.dtype), check, parts=[model],
               networks={"content_encoder": encoder, "light_decoder": model.decoder})


def _stage2_ours(ctx: BenchContext) -> Run:
    from diffusers import UNet2DConditionModel

    from editrt.models.element_unet import adapter_config, build_element_decoder
    from editrt.models.files import load_diffusers
    from editrt.models.text import load_tokenizer
    from editrt.train.elements_stage2 import FrozenParts, Stage2, tokenize
    from editrt.train.samples import noise_draws

    folder = _layout(ctx).elements
    size = _elements_resolution(ctx, 2)
    frozen = FrozenParts(folder, ctx.device, ctx.dtype)
    unet = load_diffusers(UNet2DConditionModel, folder / "unet", "element decoder UNet", torch.float32)
    config = ctx.read_json("elements", "element_adapter", "config.json")
    torch.manual_seed(0)
    model = Stage2(build_element_decoder(unet, adapter_config(frozen.feature_dim, config["fourier_bands"],
                                                              unet.config.cross_attention_dim))).to(ctx.device).train()
    ids = tokenize(load_tokenizer(folder / "tokenizer"), "a photo of a cat")
    samples = _element_tensors(ctx, size, source_shift=1)
    rng = np.random.default_rng(11)
    batches = []
    for b in range(ctx.n_inputs):
        chosen = [{**samples[(b + i) % PHOTOS], "input_ids": ids,
                   **noise_draws(rng, frozen.latent_shape(size), frozen.scheduler.config.num_train_timesteps)}
                  for i in range(BATCH)]
        batches.append({k: torch.stack([s[k] for s in chosen]).to(ctx.device) for k in chosen[0]})
    autocast = ctx.dtype != torch.float32

    def loss_fn(batch):
        with torch.autocast(ctx.device.type, dtype=ctx.dtype, enabled=autocast):
            return frozen.per_sample_loss(model, batch).float().mean()

    call, check = _step(model.parameters(), loss_fn, lr=6.4e-5)
    return Run(call, batches, dtype_name(ctx.dtype), check, parts=[model],
               networks={"element_unet": model.decoder.unet, "vae_encoder": frozen.vae_encoder,
                         "content_encoder": frozen.content_encoder, "text_encoder": frozen.text_encoder})


def train_cases(ctx: BenchContext) -> list[Case]:
    if not ctx.selection.may_want_family(PREFIX):
        return []
    res = _seele_resolution(ctx)
    cases = []
    if ctx.selection.wants(PROMPTS):
        cases.append(Case(PROMPTS, f"B={BATCH}, {res}x{res}, prompt [L, {ctx.unet_config['cross_attention_dim']}]",
                          {"torch-eager": lambda: _prompts_ours(ctx), "diffusers": lambda: _prompts_diffusers(ctx)},
                          heavy=True, work_differs={"diffusers": TEXT_DIFFERS},
                          about="one AdamW step of task inversion (Eq. 1) vs diffusers' textual-inversion step, "
                                "same UNet, batch and dtype"))
    if ctx.selection.wants(HARMONIZER):
        cases.append(Case(HARMONIZER, f"B={BATCH}, {res}x{res}, LoRA rank {_lora_rank(ctx)} on self-attention q/k/v/out",
                          {"torch-eager": lambda: _harmonizer_ours(ctx),
                           "diffusers": lambda: _harmonizer_diffusers(ctx)},
                          heavy=True, work_differs={"diffusers": (
                              "diffusers' LoRA script encodes a caption with the text encoder in every step and "
                              "encodes two images; editrt's Eq. (2) trains the prompt directly and also encodes the "
                              "real image (the target's x*)")},
                          about="one AdamW step of the harmonizer (Eq. 2: prompt + LoRA) vs diffusers' LoRA step "
                                "(peft, same rank and layers), same UNet, batch and dtype"))
    for name, builder, what in ((STAGE1, _stage1_ours, "stage 1: content encoder + light decoder"),
                                (STAGE2, _stage2_ours, "stage 2: element decoder UNet + adapter (Eq. 5)")):
        if ctx.selection.wants(name):
            side = _elements_resolution(ctx, 1 if name == STAGE1 else 2)
            cases.append(Case(name, f"B={BATCH}, {side}x{side}, 16x16 grid", {"torch-eager": lambda b=builder: b(ctx)},
                              heavy=True, about=f"one AdamW step of EIE {what}"))
    return cases


def samples_per_second(row: dict) -> float | None:
    """A training-step row's throughput: its observed samples per timed run over its median time."""
    observed, p50 = row.get("observed") or {}, row.get("p50_ms")
    if not p50 or "training_samples" not in observed or not math.isfinite(p50):
        return None
    return observed["training_samples"] / (p50 / 1000.0)
