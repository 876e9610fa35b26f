"""The engine protocol and build_engines: one backend branch, explicit weight switches, cuda_graphs, compile.

Oracles: the harmonizer engines are held to the base UNet (c = 0) and to FusedLoRA's fused weights
computed independently from the LoRA file (c = 1); torch.compile is held to the same module run
eagerly.
"""
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from editrt.errors import EngineError, InputError
from editrt.export.specs import NetworkSpec, TensorSpec, compiled_networks, editor_networks
from editrt.models.networks import UNetNet
from editrt.runtime.backends import build_engines
from editrt.runtime.engines import ENGINE_MEMBERS, LoRAScale, TorchEngine, conforms


@pytest.fixture(scope="module")
def built(tiny_weights):
    return build_engines("reposition", tiny_weights)


def _unet_inputs(built, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    tokens, width = built.task_prompts["null"].shape
    return dict(sample=torch.randn(2, 9, size, size, generator=g), timestep=torch.tensor([917.0, 31.0]),
                encoder_hidden_states=torch.randn(2, tokens, width, generator=g))


def test_every_built_engine_declares_the_protocol(tiny_weights, built):
    elements = build_engines("elements", tiny_weights)
    for b, names in ((built, editor_networks("reposition")), (elements, editor_networks("elements"))):
        assert sorted(b.engines) == sorted(names)
        for engine in b.engines.values():
            conforms(engine)
            assert engine.backend == "torch" and engine.device == torch.device("cpu")
            assert engine.supports_cuda_graph is False and engine.compiled is False
    # only the harmonizer declares a switchable LoRA; the inpainting view of the same UNet is fixed at c = 0
    assert [n for n, e in built.engines.items() if e.lora is not None] == ["harmonizer_unet"]
    assert built.engines["harmonizer_unet"].lora.value == 1.0


def test_conforms_names_what_is_missing():
    class Half:
        spec = backend = device = None

        def __call__(self, **inputs):
            return {}

    with pytest.raises(EngineError, match=r"Half: not an editrt engine \(missing \['supports_cuda_graph'"):
        conforms(Half())
    assert set(ENGINE_MEMBERS) >= {"prepare", "before_capture", "lora"}


def test_engines_sharing_the_unet_each_run_at_their_own_weights(tiny_weights, built):
    """inpaint (c = 0) and harmonizer (c = 1) share one UNet: whatever ran last, each sees its own weights."""
    from editrt.models.components import load_reposition_components
    from editrt.models.networks import reposition_networks

    inpaint, harmonizer = built.engines["inpaint_unet"], built.engines["harmonizer_unet"]
    x = _unet_inputs(built)
    base = inpaint(**x)["noise_pred"]
    fused = harmonizer(**x)["noise_pred"]
    assert not torch.equal(base, fused)
    np.testing.assert_array_equal(inpaint(**x)["noise_pred"], base)  # after the harmonizer ran: still c = 0
    # independent oracles: a fresh UNet at c = 0 (no LoRA touched) and a fresh one with the LoRA applied at 1
    fresh = load_reposition_components(tiny_weights)
    nets = reposition_networks(fresh)
    with torch.no_grad():
        np.testing.assert_array_equal(nets["inpaint_unet"](*x.values()), base)
        nets["harmonizer_unet"].apply_weights()
        np.testing.assert_array_equal(nets["harmonizer_unet"](*x.values()), fused)
    # an explicit switch changes only the engine it is made on
    harmonizer.lora.set(0.0)
    try:
        np.testing.assert_array_equal(harmonizer(**x)["noise_pred"], base)
        harmonizer.prepare()
        np.testing.assert_array_equal(inpaint(**x)["noise_pred"], base)
    finally:
        harmonizer.lora.set(1.0)
    np.testing.assert_array_equal(harmonizer(**x)["noise_pred"], fused)


def test_unet_forward_has_no_weight_side_effect(built):
    """Running the module (not the engine) after a c = 1 switch keeps c = 1: forward never switches."""
    harmonizer, inpaint = built.engines["harmonizer_unet"], built.engines["inpaint_unet"]
    x = _unet_inputs(built, seed=1)
    harmonizer.prepare()  # the shared UNet now holds c = 1
    module = UNetNet(built.components.unet, built.components.harmonizer, 0.0)  # claims c = 0, is never applied
    with torch.no_grad():
        out = module(*x.values())
    np.testing.assert_array_equal(out, harmonizer(**x)["noise_pred"])
    inpaint.prepare()


def test_lora_scale_rejects_what_the_engine_cannot_switch_to():
    with pytest.raises(InputError, match="accepts one of 0, 1"):
        LoRAScale(1.0, allowed=(0.0, 1.0)).set(0.5)
    with pytest.raises(InputError, match="accepts a finite number"):
        LoRAScale(1.0).set(float("nan"))


def test_cuda_graphs_resolution_on_cpu(tiny_weights, built):
    assert built.cuda_graphs is False  # CPU: nothing can be captured
    with pytest.raises(InputError, match="cuda_graphs=True: the torch backend on cpu cannot be captured"):
        build_engines("reposition", tiny_weights, cuda_graphs=True)
    with pytest.raises(InputError, match="compile: torch.compile runs the torch backend only"):
        build_engines("reposition", tiny_weights, "onnxruntime", engines_dir=tiny_weights, compile=True)
    with pytest.raises(InputError, match="editor: expected 'reposition' or 'elements'"):
        build_engines("inpaint", tiny_weights)


def test_compile_flag_reaches_exactly_the_compiled_networks(tiny_weights):
    b = build_engines("reposition", tiny_weights, compile=True)
    assert b.compiled
    assert {n for n, e in b.engines.items() if e.compiled} == set(compiled_networks()) & set(editor_networks("reposition"))
    # compile replaces the K/V caching (its Python-side cache state is not traceable)
    from editrt.models.attention import CachedKVCrossAttnProcessor

    assert not any(isinstance(getattr(m, "processor", None), CachedKVCrossAttnProcessor) for m in b.components.unet.modules())


def _micro_unet_engine(compile):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4, block_out_channels=(8,),
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                layers_per_block=1, cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4).eval()
    spec = NetworkSpec("inpaint_unet", (TensorSpec("sample", ("batch", 9, "height", "width")),
                                        TensorSpec("timestep", ("batch",)),
                                        TensorSpec("encoder_hidden_states", ("batch", "tokens", 8))),
                       (TensorSpec("noise_pred", ("batch", 4, "height", "width")),), "a one-block UNet")
    return TorchEngine(spec, UNetNet(unet), compile=compile)


def test_compiled_unet_equals_eager_within_rounding():
    """torch.compile (inductor, CPU) of a one-block diffusers UNet against the same module eagerly.

    Tolerance: max |compiled - eager| <= 1e-5 * max |eager|. Inductor fuses and reorders fp32
    arithmetic (GroupNorm / softmax reductions, fused multiply-adds), so it is not bit-equal; the
    difference is float32 rounding (measured ~4e-7 relative here). A wrong graph (a dropped
    residual, the wrong input order) differs by O(1).
    """
    import torch._dynamo.utils as dynamo_utils

    compiled, eager = _micro_unet_engine(True), _micro_unet_engine(False)
    g = torch.Generator().manual_seed(3)
    x = dict(sample=torch.randn(2, 9, 8, 8, generator=g), timestep=torch.tensor([500.0, 10.0]),
             encoder_hidden_states=torch.randn(2, 5, 8, generator=g))
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    out = compiled(**x)["noise_pred"]
    assert dynamo_utils.counters["stats"]["unique_graphs"] > graphs  # inductor really compiled it
    ref = eager(**x)["noise_pred"]
    assert compiled.compiled and not eager.compiled
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.slow
def test_compiled_pipeline_pass_equals_eager(tiny_weights, photo):
    """A 2-step inpainting pass with compile=True (UNet, VAE compiled) against eager: uint8 pixels
    within 1 level (the latents differ by float32 rounding, see the test above)."""
    from editrt.runtime.reposition import RepositionPipeline

    mask = np.zeros(photo.shape[:2], bool)
    mask[100:200, 150:260] = True
    eager = RepositionPipeline.from_pretrained(tiny_weights)
    compiled = RepositionPipeline.from_pretrained(tiny_weights, compile=True)
    a = np.asarray(eager.inpaint(photo, mask, steps=2, resolution=64)).astype(int)
    b = np.asarray(compiled.inpaint(photo, mask, steps=2, resolution=64)).astype(int)
    assert np.abs(a - b).max() <= 1
