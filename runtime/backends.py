"""Build each editor's engines for a backend: torch, onnxruntime or tensorrt.

`build_engines(editor, weights, backend, ...)` is the only place that branches on the backend;
pipelines receive a `BuiltEditor` (engines behind runtime/engines.Engine, plus the parts that stay
in PyTorch on every backend) and never look at the backend again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from editrt.errors import EngineError, InputError, WeightsError
from editrt.export.specs import EDITORS, compiled_networks, denoisers, editor_networks, network_specs
from editrt.models.components import WeightsLayout
from editrt.models.estimators import estimator_network_config, estimator_networks, estimator_networks_present
from editrt.models.sam import sam_architecture

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def check_backend(backend: str, engines: str | Path | None) -> None:
    if backend not in BACKENDS:
        raise InputError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}", field="backend")
    if backend != "torch" and engines is None:
        raise InputError(f"--engines: the {backend} backend needs the folder written by `editrt export`", field="engines")


@dataclass
class EditorSettings:
    """What an editor needs to know of a weights directory before loading any network."""

    layout: WeightsLayout
    config: dict  # the sizes the network specs need (WeightsLayout.network_config)
    specs: dict  # network name -> NetworkSpec
    vae_scale_factor: int
    resolution: int  # the default working resolution: the UNet's sample size in pixels
    sam_image_size: int


def editor_settings(weights: str | Path, editor: str) -> EditorSettings:
    """`editor` is 'inpaint' (repositioning) or 'elements'; reads only the folder's JSON configs."""
    layout = WeightsLayout(weights)
    layout.check_root()
    # depth/ and matting/ where the folder has them (models/estimators.py): their specs, for every editor
    config = {**layout.network_config(), **estimator_network_config(layout)}
    if editor not in config:
        raise WeightsError(f"{layout.elements}: missing; expected the element decoder folder (editrt weights init writes it)", field="weights")
    vae_scale_factor = 2 ** (len(config[editor]["vae"]["block_out_channels"]) - 1)
    return EditorSettings(layout, config, network_specs(config), vae_scale_factor,
                          config[editor]["unet"]["sample_size"] * vae_scale_factor,
                          sam_architecture(config["sam"])["image_size"])




@dataclass
class BuiltEditor:
    """What `build_engines` gives a pipeline: its engines and the non-engine parts, the same for every backend."""

    engines: dict  # network name -> Engine (runtime/engines.py)
    settings: EditorSettings
    scheduler_config: dict
    cuda_graphs: bool  # resolved: do the denoising loops capture CUDA graphs
    compiled: bool
    fp16_attention: str = "ok"  # the fp16 probe's verdict (torch backend): "ok" or "upcast attention"
    components: object = None  # torch backend only: the PyTorch modules, for tests and tools (never for running)
    task_prompts: dict | None = None  # reposition
    embedder: object = None  # elements: the element token embedder (PyTorch on every backend)
    tokenizer: object = None
    text_encoder: object = None
    preview_decoder: object = None  # torch backend with vae_tiny/: the tiny VAE's decoder engine (Quality.preview)


def build_engines(editor: str, weights: str | Path, backend: str = "torch", *, device="cpu", dtype=torch.float32,
                  engines_dir: str | Path | None = None, optimize: bool = True, compile: bool = False,
                  cuda_graphs: bool | None = None, kernels: bool | None = None) -> BuiltEditor:
    """The one place that branches on the backend. `editor` is "reposition" or "elements".

    optimize     torch: cross-attention K/V cached per request (bit-equal); False: plain diffusers modules
    compile      torch: torch.compile (inductor) on the UNets, VAE and SAM image encoder; it replaces the
                 K/V caching (its Python-side cache state is not traceable)
    cuda_graphs  None: capture the denoising loops where the UNet engine supports it (torch on CUDA) and
                 `optimize` is on; False: never; True: always (an error where unsupported)
    kernels      elements, torch: the fused Triton dual attention (default: on CUDA)
    """
    from editrt.models.common import resolve_device
    from editrt.runtime.engines import conforms

    if editor not in EDITORS:
        raise InputError(f"editor: expected 'reposition' or 'elements', got {editor!r}", field="editor")
    check_backend(backend, engines_dir)
    if compile and backend != "torch":
        raise InputError(f"compile: torch.compile runs the torch backend only, not {backend}", field="compile")
    device = resolve_device(device)
    w = editor_settings(weights, "inpaint" if editor == "reposition" else "elements")
    names = editor_networks(editor)
    if backend == "torch":
        built = _torch_editor(editor, weights, w, device, dtype, optimize, compile, kernels)
    else:
        built = _file_editor(editor, weights, w, names, backend, engines_dir, device, dtype)
    for engine in built.engines.values():
        conforms(engine)
    capable = all(built.engines[n].supports_cuda_graph for n in denoisers(editor))
    built.cuda_graphs = resolve_cuda_graphs(cuda_graphs, optimize, capable, f"the {backend} backend on {device}")
    return built


def resolve_cuda_graphs(requested: bool | None, optimize: bool, capable: bool, what: str) -> bool:
    """Whether denoising loops capture: None -> where capable and optimizing; False -> never;
    True -> always (InputError where the denoiser engines cannot be captured)."""
    if requested and not capable:
        raise InputError(f"cuda_graphs=True: {what} cannot be captured in a CUDA graph "
                         "(needs the torch backend on a CUDA device)", field="cuda_graphs")
    return capable and (optimize if requested is None else bool(requested))


def _torch_editor(editor, weights, w: EditorSettings, device, dtype, optimize, compile, kernels) -> BuiltEditor:
    from editrt.models.attention import prepare_unet
    from editrt.runtime.engines import TorchEngine

    # K/V caching stays the default on every device: it is bit-equal and only removes work (cProfile of a 20-step
    # tiny pass: 160 fewer linear calls, the to_k / to_v of every cross-attention at every step, the rest identical).
    # Quick-bench rows where it lost to eager were CPU-sharing noise (docs/benchmarks.md, "Is the default slower").
    cache_kv = optimize and not compile

    def engine(name, module, **lora):
        return TorchEngine(w.specs[name], module, device, compile=compile and name in compiled_networks(), **lora)

    if editor == "reposition":
        from editrt.models.components import load_reposition_components
        from editrt.models.networks import reposition_networks

        c = load_reposition_components(weights, device, dtype)
        verdict = prepare_unet(c.unet, dtype, tuple(c.task_prompts["null"].shape), cache_kv=cache_kv)
        nets = reposition_networks(c)
        # one UNet, two engines: each applies its own LoRA scale before it runs (never the other's)
        loras = {"inpaint_unet": dict(lora=c.harmonizer, lora_scale=0.0),
                 "harmonizer_unet": dict(lora=c.harmonizer, lora_scale=1.0, switchable=True)}
        engines = {n: engine(n, nets[n], **loras.get(n, {})) for n in editor_networks(editor, optional=False)}
        estimators = estimator_networks(w.layout, estimator_networks_present(w.layout), device, dtype)
        engines.update({n: engine(n, net) for n, net in estimators.items()})
        return BuiltEditor(engines, w, c.scheduler_config, False, compile, verdict, c, task_prompts=c.task_prompts,
                           preview_decoder=_preview_decoder(c, w.specs["vae_decoder"], device))
    from editrt.models.attention import use_fused_dual_attention
    from editrt.models.components import load_elements_components
    from editrt.models.networks import elements_networks

    c = load_elements_components(weights, device, dtype)
    # the fp16 probe runs the text-only path; the element attention has the same widths
    verdict = prepare_unet(c.decoder.unet, dtype, (77, c.decoder.unet.config.cross_attention_dim), cache_kv=cache_kv)
    if kernels if kernels is not None else device.type == "cuda":
        use_fused_dual_attention(c.decoder)
    nets = elements_networks(c)
    engines = {n: engine(n, nets[n]) for n in editor_networks(editor, optional=False)}
    return BuiltEditor(engines, w, c.scheduler_config, False, compile, verdict, c, embedder=c.decoder.embedder,
                       tokenizer=c.tokenizer, text_encoder=c.text_encoder,
                       preview_decoder=_preview_decoder(c, w.specs["element_vae_decoder"], device))


def _preview_decoder(components, full_decoder_spec, device):
    """The tiny VAE's decoder engine where the weights have vae_tiny/, else None. Torch backend only: it is not
    exported, so onnxruntime and tensorrt previews decode with the full VAE. Same inputs and outputs as the full
    decoder; not in `engines`, which holds the editor's exported networks (export/specs.NETWORK_ROLES)."""
    from editrt.models.networks import VaeDecoderNet
    from editrt.runtime.engines import TorchEngine

    if components.vae_tiny is None:
        return None
    return TorchEngine(full_decoder_spec, VaeDecoderNet(components.vae_tiny), device)


def _file_editor(editor, weights, w: EditorSettings, names, backend, engines_dir, device, dtype) -> BuiltEditor:
    from editrt.models.inpaint import load_scheduler

    if editor == "reposition":
        names = editor_networks(editor, optional=False) + exported_estimators(w.layout, engines_dir)
    engines = file_engines(w.specs, names, backend, engines_dir, device, weights)
    if editor == "reposition":
        from editrt.models.inpaint import load_task_prompts

        prompts = load_task_prompts(w.layout.task_prompts, w.config["inpaint"]["unet"]["cross_attention_dim"])
        return BuiltEditor(engines, w, load_scheduler(w.layout.scheduler).config, False, False,
                           task_prompts=prompts)
    from editrt.models.element_unet import load_element_embedder
    from editrt.models.text import load_text_encoder, load_tokenizer

    root = w.layout.elements
    return BuiltEditor(engines, w, load_scheduler(root / "scheduler").config, False, False,
                       embedder=load_element_embedder(root / "element_adapter", dtype).to(device),
                       tokenizer=load_tokenizer(root / "tokenizer"),
                       text_encoder=load_text_encoder(root / "text_encoder", dtype).to(device))


def exported_estimators(layout: WeightsLayout, engines_dir: str | Path) -> tuple[str, ...]:
    """The estimator networks a file backend runs: those the weights have and `editrt export` wrote
    (folders exported before depth and matting existed have none; their pipelines run without them)."""
    return tuple(n for n in estimator_networks_present(layout) if (Path(engines_dir) / f"{n}.onnx").is_file())


def torch_engines(specs: dict, networks: dict[str, torch.nn.Module], names) -> dict:
    """Plain eager TorchEngines over `networks` (no LoRA sharing); prefer build_engines."""
    from editrt.runtime.engines import TorchEngine

    return {name: TorchEngine(specs[name], networks[name]) for name in names}


def file_engines(specs: dict, names, backend: str, engines_dir: str | Path, device, weights: str | Path) -> dict:
    """Engines from an `editrt export` folder: ONNX files (onnxruntime) or TensorRT plans built from them."""
    engines_dir = Path(engines_dir)
    if not engines_dir.is_dir():
        raise EngineError(f"{engines_dir}: no such engines folder; write it with `editrt export -o {engines_dir}`", field="engines")
    if backend == "onnxruntime":
        from editrt.runtime.engines import OrtEngine

        return {name: OrtEngine(specs[name], engines_dir / f"{name}.onnx", device) for name in names}
    from editrt.export import tensorrt as trt

    refit_map = read_manifest(engines_dir).get("networks", {}).get("harmonizer_unet", {}).get("refit_map")
    # inpaint_unet (c = 0, fixed) and harmonizer_unet (c = 1, switchable) are two views of one refittable engine
    return trt.tensorrt_engines(specs, names, engines_dir, device, Path(weights), refit_map)


def read_manifest(engines_dir: Path) -> dict:
    import json

    path = engines_dir / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{path}: missing; expected the manifest `editrt export` writes", field="engines") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path}: not valid JSON ({e})", field="engines") from None
