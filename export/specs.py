"""One frozen spec per exported network: I/O names, dtypes, axes and optimisation profiles.

Everything that exports, builds, runs or benchmarks an engine reads its I/O from here; nothing
else hard-codes an engine's tensor names. Axes are ints (static) or names (dynamic). Dynamic
names are shared across tensors of a network (the same `batch` everywhere) and get a
(min, opt, max) range per profile for TensorRT.

Names follow what TensorRT / Triton Inference Server users know from diffusers' and
segment-anything's own exports: `sample`, `timestep`, `encoder_hidden_states` -> `noise_pred`;
SAM's `SamOnnxModel` I/O for the prompt decoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from editrt.errors import EngineError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    axes: tuple  # ints (static) and names (dynamic)
    dtype: str = "float32"

    @property
    def dynamic(self) -> dict[int, str]:
        return {i: a for i, a in enumerate(self.axes) if isinstance(a, str)}

    def shape(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(dims[a] if isinstance(a, str) else a for a in self.axes)


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    about: str
    # TensorRT optimisation profiles: one dict per profile, dynamic axis name -> (min, opt, max)
    profiles: tuple[dict, ...] = field(default_factory=tuple)
    # an engine whose weights are switched in place (refit) rather than duplicated
    refittable: bool = False
    # dynamic axes that are a multiple of another (image size = 8 x latent size): name -> (base, factor)
    derived: dict = field(default_factory=dict)
    # compute precisions its ONNX graph may be exported at (graph I/O stays as `inputs`/`outputs` say):
    # fp16 for the diffusion networks; SAM and the content encoder stay fp32 (SAM's masks are
    # thresholded logits, and the encoders are cheap next to the UNets)
    precisions: tuple[str, ...] = ("fp32",)
    # shape-tensor inputs (values that set output shapes, e.g. SAM's orig_im_size): name -> (min, opt,
    # max) values, for every profile (TensorRT's IOptimizationProfile.set_shape_input)
    value_ranges: dict = field(default_factory=dict)
    # dynamic axes whose sizes must be a multiple of k: name -> k (ViTMatte's padded image: 32)
    multiple_of: dict = field(default_factory=dict)

    @property
    def role(self) -> NetworkRole:
        """Which editors run this network, and how (NETWORK_ROLES)."""
        return NETWORK_ROLES[self.name]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's `dynamic_axes`."""
        return {t.name: t.dynamic for t in self.inputs + self.outputs if t.dynamic}

    def dims_of(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        """Dynamic axis values implied by concrete input shapes; raises ValueError on a mismatch."""
        dims: dict[str, int] = {}
        for t in self.inputs:
            if t.name not in shapes:
                raise ValueError(f"{self.name}: missing input {t.name!r}")
            shape = tuple(shapes[t.name])
            if len(shape) != len(t.axes):
                raise ValueError(f"{self.name}: input {t.name!r} has shape {list(shape)}, expected {len(t.axes)} axes {list(t.axes)}")
            for axis, size in zip(t.axes, shape):
                if isinstance(axis, int) and axis != size:
                    raise ValueError(f"{self.name}: input {t.name!r} has shape {list(shape)}, expected {list(t.axes)}")
                if isinstance(axis, str) and dims.setdefault(axis, size) != size:
                    raise ValueError(f"{self.name}: axis {axis!r} is {dims[axis]} in one input and {size} in {t.name!r}")
        for name, k in self.multiple_of.items():
            if name in dims and dims[name] % k:
                raise ValueError(f"{self.name}: axis {name!r} is {dims[name]}, expected a multiple of {k}")
        for name, (base, factor) in self.derived.items():
            if base in dims and dims.setdefault(name, factor * dims[base]) != factor * dims[base]:
                raise ValueError(f"{self.name}: axis {name!r} is {dims[name]}, expected {factor} x {base} = {factor * dims[base]}")
        return dims


EDITORS = ("reposition", "elements")


@dataclass(frozen=True)
class NetworkRole:
    editors: tuple[str, ...]  # the pipelines that run it (a shared network is loaded once per editor)
    denoiser: bool = False  # runs every denoising step: the loop CUDA graphs capture needs it capturable
    optional: bool = False  # only where the weights folder has it (depth/, matting/); pipelines run without it
    compiled: bool = False  # what `compile=True` runs through inductor (torch backend)


# The one place that says which editor uses which network (issue 23): backends, export, Triton and the
# tests read it through the functions below. Order is export order (the manifest, `--component all`).
NETWORK_ROLES = {
    "inpaint_unet": NetworkRole(("reposition",), denoiser=True, compiled=True),
    "harmonizer_unet": NetworkRole(("reposition",), denoiser=True, compiled=True),
    "vae_encoder": NetworkRole(("reposition",), compiled=True),
    "vae_decoder": NetworkRole(("reposition",), compiled=True),
    "sam_image_encoder": NetworkRole(EDITORS, compiled=True),
    "sam_mask_decoder": NetworkRole(EDITORS),
    "sam_mask_decoder_grid": NetworkRole(EDITORS),
    "content_encoder": NetworkRole(("elements",)),
    "element_unet": NetworkRole(("elements",), denoiser=True, compiled=True),
    "element_vae_decoder": NetworkRole(("elements",), compiled=True),
    "depth_estimator": NetworkRole(("reposition",), optional=True, compiled=True),
    "matting": NetworkRole(("reposition",), optional=True, compiled=True),
}


def all_networks() -> tuple[str, ...]:
    return tuple(NETWORK_ROLES)


def editor_networks(editor: str, optional: bool = True) -> tuple[str, ...]:
    """The networks `editor` runs; optional=False leaves out those only some weights folders have."""
    return tuple(n for n, r in NETWORK_ROLES.items() if editor in r.editors and (optional or not r.optional))


def denoisers(editor: str) -> tuple[str, ...]:
    return tuple(n for n in editor_networks(editor) if NETWORK_ROLES[n].denoiser)


def optional_networks() -> tuple[str, ...]:
    return tuple(n for n, r in NETWORK_ROLES.items() if r.optional)


def compiled_networks() -> tuple[str, ...]:
    return tuple(n for n, r in NETWORK_ROLES.items() if r.compiled)


MAX_IMAGE_SIDE = 8192
# ViTMatte's padded input side: TensorRT profile (min, opt, max). ViTDet's global-attention blocks are
# quadratic in the tokens ((side / 16)^2), so larger photos are matted on a crop around the subject.
MATTING_SIDES = (32, 512, 2048)  # the largest input image side the SAM decoder engines accept (masks at full size)


def _range(lo: int, opt: int, hi: int) -> tuple[int, int, int]:
    return (lo, opt, hi)


def network_specs(config: dict) -> dict[str, NetworkSpec]:
    """The specs of every exported network for a weights config (the dict of editrt/configs/*.json)."""
    inpaint, elements = config["inpaint"], config.get("elements")
    c_inpaint = inpaint["unet"]["cross_attention_dim"]
    latent = inpaint["unet"]["sample_size"]  # 64 for SD-2 (512 px)
    tokens = inpaint["task_prompt_tokens"]
    # Working resolutions: short side = the default, long side up to 2x (landscape/portrait photos).
    lat = _range(latent // 2, latent, latent * 2)
    batch = {"batch": _range(1, 2, 2)}  # 1 = no CFG, 2 = CFG
    unet_io = (
        (TensorSpec("sample", ("batch", 9, "height", "width")),
         TensorSpec("timestep", ("batch",)),
         TensorSpec("encoder_hidden_states", ("batch", "tokens", c_inpaint))),
        (TensorSpec("noise_pred", ("batch", 4, "height", "width")),),
    )
    fp16 = ("fp32", "fp16")
    unet_profiles = ({**batch, "height": lat, "width": lat, "tokens": _range(tokens, tokens, 77)},)
    img = tuple(8 * v for v in lat)
    image_axes = {"image_height": ("height", 8), "image_width": ("width", 8)}
    specs = [
        NetworkSpec("inpaint_unet", *unet_io, "SD-2 inpainting UNet; the task prompt replaces the text encoder output",
                    unet_profiles, precisions=fp16),
        NetworkSpec("harmonizer_unet", *unet_io, "the inpainting UNet with the harmonizer LoRA fused at c = 1",
                    unet_profiles, refittable=True, precisions=fp16),
        NetworkSpec("vae_encoder",
                    (TensorSpec("image", ("batch", 3, "image_height", "image_width")),
                     TensorSpec("noise", ("batch", 4, "height", "width"))),
                    (TensorSpec("latent", ("batch", 4, "height", "width")),),
                    "image in [-1, 1] -> scaled latent (mean + std * noise) * scaling_factor; noise = 0 gives the "
                    "scaled mean (the noise comes from the pipeline's generator, as diffusers draws it)",
                    ({"batch": _range(1, 1, 1), "image_height": img, "image_width": img, "height": lat, "width": lat},),
                    derived=image_axes, precisions=fp16),
        NetworkSpec("vae_decoder",
                    (TensorSpec("latent", ("batch", 4, "height", "width")),),
                    (TensorSpec("image", ("batch", 3, "image_height", "image_width")),),
                    "scaled latent -> image in [-1, 1] (the decoder divides by scaling_factor)",
                    ({"batch": _range(1, 1, 1), "height": lat, "width": lat},), derived=image_axes, precisions=fp16),
    ]
    sam = _sam_sizes(config["sam"])
    emb, low = sam["image_size"] // sam["patch_size"], 4 * (sam["image_size"] // sam["patch_size"])
    c_sam = sam["prompt_embed_dim"]
    specs += [
        NetworkSpec("sam_image_encoder",
                    (TensorSpec("image", (1, 3, sam["image_size"], sam["image_size"])),),
                    (TensorSpec("image_embeddings", (1, c_sam, emb, emb)),),
                    "SAM ViT: normalised, padded image -> image embeddings"),
        NetworkSpec("sam_mask_decoder",
                    (TensorSpec("image_embeddings", (1, c_sam, emb, emb)),
                     TensorSpec("point_coords", (1, "num_points", 2)),
                     TensorSpec("point_labels", (1, "num_points")),
                     TensorSpec("mask_input", (1, 1, low, low)),
                     TensorSpec("has_mask_input", (1,)),
                     # int64: it is a shape tensor (it sets the masks' size), and TensorRT takes shape-tensor
                     # I/O as integers only; every backend casts the caller's (float) sizes to it
                     TensorSpec("orig_im_size", (2,), "int64")),
                    (TensorSpec("masks", (1, 4, "mask_height", "mask_width")),
                     TensorSpec("iou_predictions", (1, 4)),
                     TensorSpec("low_res_masks", (1, 4, low, low))),
                    "segment-anything's SamOnnxModel (all 4 mask tokens; token 0 is the single-mask output)",
                    ({"num_points": _range(1, 2, 16)},),
                    value_ranges={"orig_im_size": ((1, 1), (3 * sam["image_size"] // 4, sam["image_size"]),
                                                   (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))}),
        NetworkSpec("sam_mask_decoder_grid",
                    (TensorSpec("image_embeddings", (1, c_sam, emb, emb)),
                     TensorSpec("point_coords", ("num_queries", 2))),
                    (TensorSpec("low_res_logits", ("num_queries", low, low)),),
                    "N single foreground points decoded in one call; each keeps its best-IoU multimask logits "
                    "(the elements partition's 16x16 grid)",
                    ({"num_queries": _range(1, 256, 256)},)),
    ]
    if elements:
        c_el = elements["unet"]["cross_attention_dim"]
        lat_el = elements["unet"]["sample_size"]
        lat_e = _range(lat_el // 2, lat_el, lat_el * 2)
        specs += [
            NetworkSpec("content_encoder",
                        (TensorSpec("patches", ("num_elements", 3, 32, 32)),),
                        (TensorSpec("features", ("num_elements", elements["element_adapter"]["feature_dim"])),),
                        "masked 32x32 element patches -> 32-d content features",
                        ({"num_elements": _range(1, 256, 512)},)),
            NetworkSpec("element_unet",
                        (TensorSpec("sample", ("batch", 4, "height", "width")),
                         TensorSpec("timestep", ("batch",)),
                         TensorSpec("encoder_hidden_states", ("batch", 77, c_el)),
                         TensorSpec("element_tokens", ("batch", "num_elements", c_el))),
                        (TensorSpec("noise_pred", ("batch", 4, "height", "width")),),
                        "SD-1.5 UNet with the element cross-attention beside every text cross-attention",
                        ({**batch, "height": lat_e, "width": lat_e, "num_elements": _range(1, 256, 512)},),
                        precisions=fp16),
            NetworkSpec("element_vae_decoder",
                        (TensorSpec("latent", ("batch", 4, "height", "width")),),
                        (TensorSpec("image", ("batch", 3, "image_height", "image_width")),),
                        "the element decoder's VAE: scaled latent -> image in [-1, 1]",
                        ({"batch": _range(1, 1, 1), "height": lat_e, "width": lat_e},),
                        derived={"image_height": ("height", 8), "image_width": ("width", 8)}, precisions=fp16),
        ]
    specs += estimator_specs(config)
    undeclared = [s.name for s in specs if s.name not in NETWORK_ROLES]
    if undeclared:  # a library bug, not bad input: every spec has its role declared above
        raise AssertionError(f"networks without a role in NETWORK_ROLES: {undeclared}")
    return {s.name: s for s in specs}


def estimator_specs(config: dict) -> list[NetworkSpec]:
    """Depth (DPT) and matting (ViTMatte), for configs that have them (`depth`: {"model": DPTConfig dict},
    `matting`: present). Both have batch 1: one image per call, as the editor asks."""
    specs = []
    if config.get("depth"):
        size = config["depth"]["model"].get("image_size", 384)
        size = size[0] if isinstance(size, (list, tuple)) else size
        specs.append(NetworkSpec(
            "depth_estimator",
            (TensorSpec("pixel_values", (1, 3, size, size)),),
            (TensorSpec("predicted_depth", (1, size, size)),),
            "DPT (MiDaS v3): DPTImageProcessor's S x S image (mean = std = 0.5) -> relative inverse depth at S x S"))
        # fp32 only: ONNX Runtime's float16 conversion of DPT is off by order 1 against PyTorch (seen on the
        # tiny DPT: max relative 1.0); not exported in fp16 until that is understood
    if config.get("matting"):
        side = _range(*MATTING_SIDES)
        specs.append(NetworkSpec(
            "matting",
            (TensorSpec("pixel_values", (1, 4, "image_height", "image_width")),),
            (TensorSpec("alphas", (1, 1, "image_height", "image_width")),),
            "ViTMatte: image (mean = std = 0.5) | trimap / 255, zero-padded to multiples of 32 -> alpha in [0, 1]",
            ({"image_height": side, "image_width": side},),
            multiple_of={"image_height": 32, "image_width": 32}))
    return specs


def _sam_sizes(sam_config: dict) -> dict:
    from editrt.models.sam import sam_architecture

    return sam_architecture(sam_config)


def check_inputs(spec: NetworkSpec, inputs: dict) -> dict[str, int]:
    """Every engine's input check: names from the spec, shapes against its axes; returns the axis sizes.

    A wrong name or shape is an EngineError naming the network and the input, not a crash deep inside
    a runtime.
    """
    unknown = set(inputs) - set(spec.input_names)
    if unknown:
        raise EngineError(f"{spec.name}: unexpected inputs {sorted(unknown)}; expected {spec.input_names}")
    try:
        return spec.dims_of({k: tuple(v.shape) for k, v in inputs.items()})
    except ValueError as e:
        raise EngineError(str(e)) from None
