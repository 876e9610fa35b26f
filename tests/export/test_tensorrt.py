"""The TensorRT layer: everything that can be checked without TensorRT is checked here; the rest
skips with the reason (TensorRT's wheels come from NVIDIA's own index and cannot be installed here).

The fakes below (a builder/config/profile, an execution context, a refitter) only record the calls
our code makes and answer as NVIDIA's Python API documents; what is under test is our logic
(which profile values, which binding order, which refit addresses), not TensorRT.
"""
import ctypes
import json
import warnings
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from editrt.errors import EngineError, InputError
from editrt.export.components import export_components
from editrt.export.onnx import fp16_as_exported, to_fp16
from editrt.export.specs import MAX_IMAGE_SIDE, NetworkSpec, TensorSpec, network_specs
from editrt.export.tensorrt import (
    SUPPORTED_TENSORRT,
    BuildOptions,
    HarmonizerAtScale,
    RefittableHarmonizer,
    TensorRTEngine,
    add_profiles,
    bind_inputs,
    cache_key,
    cached_engine,
    check_version,
    graph_precision_of,
    harmonizer_weights,
    network_typing,
    plan_paths,
    prepare_refit_weights,
    profile_shapes,
    refit_engine,
    refit_weight_map,
    save_timing_cache,
    use_timing_cache,
)
from editrt.models.components import WeightsLayout, load_reposition_components
from editrt.runtime.engines import conforms
from editrt.weights import load_config

# BuilderFlag names of TensorRT 10 (weak typing still there) and of 11 (precision flags removed)
FLAGS_10 = {"FP16", "BF16", "FP8", "INT8", "REFIT", "STRIP_PLAN", "TF32"}
FLAGS_11 = {"REFIT", "STRIP_PLAN", "TF32"}


@pytest.fixture(scope="module")
def full_specs():
    return network_specs(load_config("full"))


@pytest.fixture(scope="module")
def tiny_specs(tiny_weights):
    return network_specs(WeightsLayout(tiny_weights).network_config())


# ---------------------------------------------------------------------- profiles
class RecordingProfile:
    def __init__(self):
        self.shapes, self.values = {}, {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    def set_shape_input(self, name, lo, opt, hi):
        self.values[name] = (tuple(lo), tuple(opt), tuple(hi))


class RecordingBuilder:
    def __init__(self):
        self.profiles = []

    def create_optimization_profile(self):
        self.profiles.append(RecordingProfile())
        return self.profiles[-1]


class RecordingConfig:
    def __init__(self):
        self.added = []

    def add_optimization_profile(self, profile):
        self.added.append(profile)


def test_profiles_cover_batch_1_and_2_and_the_working_resolutions(full_specs):
    (unet,) = profile_shapes(full_specs["inpaint_unet"], BuildOptions())
    assert unet["sample"] == ((1, 9, 32, 32), (2, 9, 64, 64), (2, 9, 128, 128))
    assert unet["encoder_hidden_states"] == ((1, 50, 1024), (2, 50, 1024), (2, 77, 1024))
    (vae,) = profile_shapes(full_specs["vae_encoder"], BuildOptions())
    assert vae["image"][1] == (1, 3, 512, 512) and vae["noise"][1] == (1, 4, 64, 64)
    (grid,) = profile_shapes(full_specs["sam_mask_decoder_grid"], BuildOptions())
    assert grid["point_coords"][1] == (256, 2) and grid["image_embeddings"][0] == (1, 256, 64, 64)
    (static,) = profile_shapes(full_specs["element_unet"], BuildOptions(static_shapes={"batch": 2, "height": 64,
                                                                                        "width": 64, "num_elements": 256}))
    assert static["element_tokens"] == ((2, 256, 768),) * 3  # one exact shape: CUDA-graph friendly
    for spec in full_specs.values():
        for profile in profile_shapes(spec, BuildOptions()):
            for lo, opt, hi in profile.values():
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), spec.name


def test_sam_decoder_profile_sets_orig_im_size_values_with_set_shape_input(full_specs):
    """Without set_shape_input TensorRT refuses the build: 'optimization profile is missing values for shape input'."""
    spec = full_specs["sam_mask_decoder"]
    builder, config = RecordingBuilder(), RecordingConfig()
    assert add_profiles(builder, config, spec, BuildOptions(), shape_inputs=["orig_im_size"]) == 1
    (profile,) = builder.profiles
    assert config.added == [profile]
    assert profile.values == {"orig_im_size": ((1, 1), (768, 1024), (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))}
    assert "orig_im_size" not in profile.shapes  # a shape tensor's values, not a dynamic shape
    assert profile.shapes["point_coords"] == ((1, 1, 2), (1, 2, 2), (1, 16, 2))
    assert set(profile.shapes) == set(spec.input_names) - {"orig_im_size"}
    # an engine input TensorRT calls a shape tensor but the spec has no values for: a clear refusal
    with pytest.raises(EngineError, match="treats input 'point_labels' as a shape tensor"):
        add_profiles(RecordingBuilder(), RecordingConfig(), spec, BuildOptions(), shape_inputs=["point_labels"])
    # a network without shape tensors gets shapes only
    builder = RecordingBuilder()
    add_profiles(builder, RecordingConfig(), full_specs["inpaint_unet"], BuildOptions(), shape_inputs=[])
    assert builder.profiles[0].values == {} and set(builder.profiles[0].shapes) == {"sample", "timestep",
                                                                                   "encoder_hidden_states"}


class DocumentedTensorRT:
    """A stand-in for the `tensorrt` module as much as build_engine uses of it, answering as NVIDIA's Python API
    documents: its ONNX parser reports a network input per spec input, `is_shape_tensor` for the ones TensorRT
    reads on the host (SAM's orig_im_size, as the GPU test below checks on the real one). It records the
    builder's profiles and config; nothing of TensorRT's own work is imitated."""

    __version__ = "10.9.0"
    class Logger:  # Logger(Logger.WARNING): an object build_engine only passes on
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    BuilderFlag = SimpleNamespace(__members__={name: name for name in FLAGS_10}, **{name: name for name in FLAGS_10})
    NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0)

    def __init__(self, spec, shape_tensors: set[str]):
        self.builder = RecordingBuilder()
        self.config = RecordingConfig()
        self.config.get_timing_cache = lambda: SimpleNamespace(serialize=lambda: b"timing")
        self.config.create_timing_cache = lambda data: data
        self.config.set_timing_cache = lambda cache, ignore_mismatch: True  # documented: True when the cache was set
        self.config.set_flag = lambda flag: None
        inputs = [SimpleNamespace(name=n, is_shape_tensor=n in shape_tensors) for n in spec.input_names]
        network = SimpleNamespace(num_inputs=len(inputs), get_input=lambda i: inputs[i])
        self.builder.create_network = lambda flags: network
        self.builder.create_builder_config = lambda: self.config
        self.builder.build_serialized_network = lambda net, config: b"plan" if config is self.config else None
        self.OnnxParser = lambda net, logger: SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)

    def Builder(self, logger):  # noqa: N802 (TensorRT's name)
        return self.builder

    def Runtime(self, logger):  # noqa: N802
        return SimpleNamespace(deserialize_cuda_engine=lambda data: SimpleNamespace(plan=bytes(data)))


def test_build_engine_gives_the_sam_decoder_shape_tensor_its_values(full_specs, tmp_path, monkeypatch):
    """build_engine passes the parser's shape-tensor inputs to the profiles: orig_im_size gets set_shape_input with
    the spec's value range (without it TensorRT refuses the build), every other input set_shape. Checked through the
    stand-in above: TensorRT cannot be installed here (the real build is test_tensorrt_sam_decoder_builds_...)."""
    from editrt.export import tensorrt

    spec = full_specs["sam_mask_decoder"]
    fake = DocumentedTensorRT(spec, {"orig_im_size"})
    monkeypatch.setattr(tensorrt, "tensorrt_module", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name="stand-in", major=9, minor=0))
    onnx_path = tmp_path / "sam_mask_decoder.onnx"
    onnx_path.write_bytes(b"not parsed by the stand-in")
    engine = tensorrt.build_engine(spec, onnx_path, tmp_path, BuildOptions(precision="fp32"), graph_precision="fp32")
    assert engine.plan == b"plan"
    (profile,) = fake.builder.profiles
    assert fake.config.added == [profile]
    assert profile.values == {"orig_im_size": spec.value_ranges["orig_im_size"]}
    assert profile.values["orig_im_size"] == ((1, 1), (768, 1024), (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    assert set(profile.shapes) == set(spec.input_names) - {"orig_im_size"}


# ONNX operands that hold shapes (TensorRT's shape tensors): op type -> input positions
_SHAPE_OPERANDS = {"Resize": (2, 3), "Slice": (1, 2, 3, 4), "Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,),
                   "Range": (0, 1, 2), "Tile": (1,), "Pad": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "TopK": (1,)}


def _inputs_whose_values_set_shapes(model: onnx.ModelProto) -> set[str]:
    """Graph inputs whose values (not just shapes: Shape stops the walk) reach a shape operand."""
    producer = {out: node for node in model.graph.node for out in node.output}
    graph_inputs = {i.name for i in model.graph.input}
    found, stack, seen = set(), [], set()
    for node in model.graph.node:
        stack += [node.input[i] for i in _SHAPE_OPERANDS.get(node.op_type, ()) if i < len(node.input) and node.input[i]]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in graph_inputs:
            found.add(name)
        elif name in producer and producer[name].op_type not in ("Shape", "Size"):
            stack += [i for i in producer[name].input if i]
    return found


def test_every_shape_tensor_input_of_the_exported_graphs_has_a_value_range(onnx_exports, tiny_specs):
    """An independent reading of the exported graphs (the session's one export, tests/conftest.py): the inputs
    whose values feed shapes are exactly the spec's value_ranges (orig_im_size in the SAM decoder, nothing
    anywhere else)."""
    out, _ = onnx_exports
    names = ["sam_mask_decoder", "sam_mask_decoder_grid", "vae_decoder", "content_encoder", "inpaint_unet"]
    for name in names:
        found = _inputs_whose_values_set_shapes(onnx.load(str(out / f"{name}.onnx")))
        assert found == set(tiny_specs[name].value_ranges), (name, found)
    assert set(tiny_specs["sam_mask_decoder"].value_ranges) == {"orig_im_size"}


def test_cache_key_changes_with_every_ingredient(full_specs):
    spec = full_specs["inpaint_unet"]
    base = dict(spec=spec, onnx_sha256="a" * 64, options=BuildOptions(), trt_version="10.7.0", gpu_name="NVIDIA H100",
                compute_capability=(9, 0))
    key = cache_key(**base)
    assert key == cache_key(**base)
    changes = [dict(onnx_sha256="b" * 64), dict(options=BuildOptions(precision="bf16")),
               dict(options=BuildOptions(optimization_level=5)), dict(options=BuildOptions(refit=True)),
               dict(trt_version="10.8.0"), dict(gpu_name="NVIDIA H200"), dict(compute_capability=(8, 9)),
               dict(spec=full_specs["harmonizer_unet"]),
               dict(options=BuildOptions(static_shapes={"batch": 2, "height": 64, "width": 64, "tokens": 50}))]
    keys = {cache_key(**{**base, **c}) for c in changes}
    assert len(keys) == len(changes) and key not in keys
    sam = full_specs["sam_mask_decoder"]
    wider = type(sam)(**{**sam.__dict__, "value_ranges": {"orig_im_size": ((1, 1), (768, 1024), (16384, 16384))}})
    assert cache_key(**{**base, "spec": sam}) != cache_key(**{**base, "spec": wider})


def test_bad_build_options():
    with pytest.raises(EngineError, match="precision"):
        BuildOptions(precision="int4")
    with pytest.raises(EngineError, match="optimization level"):
        BuildOptions(optimization_level=9)


# ---------------------------------------------------------------------- versions and typing
def test_supported_tensorrt_versions():
    assert check_version("10.0.1") == (10, 0)
    assert check_version("10.13.2.6") == (10, 13)
    assert check_version("11.4.0") == (11, 4)
    for version in ("8.6.1", "9.3.0", "12.0.0"):
        with pytest.raises(EngineError, match=r"supports TensorRT 10\.0 up to, not including, 12\.0"):
            check_version(version)
    with pytest.raises(EngineError, match="cannot read its version"):
        check_version("ten")
    assert SUPPORTED_TENSORRT == ((10, 0), (12, 0))


def test_network_typing_is_strong_where_the_graph_has_the_precision_and_guarded_by_version():
    for flags in (FLAGS_10, FLAGS_11):
        for precision in ("fp16", "fp32"):  # the graph already in the precision: strongly typed, no flags
            typing = network_typing(precision, precision, flags)
            assert typing.strongly_typed and typing.precision_flags == ()
    # TensorRT 10, fp32 graph: the (deprecated) weak-typing flags, which it still has
    assert network_typing("fp16", "fp32", FLAGS_10).precision_flags == ("FP16",)
    assert network_typing("bf16", "fp32", FLAGS_10).precision_flags == ("BF16",)
    assert network_typing("fp8", "fp32", FLAGS_10).precision_flags == ("FP8", "FP16")
    assert not network_typing("fp16", "fp32", FLAGS_10).strongly_typed
    # TensorRT 11 has no precision flags: never touched, a clear error instead
    with pytest.raises(EngineError, match=r"strongly typed networks only \(no BuilderFlag.FP16\); export the ONNX graph "
                                          r"with --precision fp16"):
        network_typing("fp16", "fp32", FLAGS_11)
    with pytest.raises(EngineError, match="no BuilderFlag.BF16"):
        network_typing("bf16", "fp32", FLAGS_11)
    with pytest.raises(EngineError, match="the ONNX graph is fp16"):
        network_typing("fp32", "fp16", FLAGS_10)


def test_graph_precision_comes_from_the_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"networks": {
        "inpaint_unet": {"onnx": "inpaint_unet.onnx", "precision": "fp16"},
        "vae_decoder": {"onnx": "vae_decoder.onnx", "precision": "fp32"}}}))
    assert graph_precision_of(tmp_path / "inpaint_unet.onnx") == "fp16"
    assert graph_precision_of(tmp_path / "vae_decoder.onnx") == "fp32"
    assert graph_precision_of(tmp_path / "other.onnx") == "fp32"
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(EngineError, match="manifest.json: not valid JSON"):
        graph_precision_of(tmp_path / "inpaint_unet.onnx")


# ---------------------------------------------------------------------- binding a run
class DocumentedContext:
    """Answers like IExecutionContext: an output whose shape depends on a shape-tensor input has
    unknown (-1) dims until that input's (host) address is set; input shapes must be set first."""

    def __init__(self, host_memory=None):
        self.calls, self.shapes, self.addresses = [], {}, {}
        self.host_memory = host_memory or {}  # address -> the tensor living there

    def set_input_shape(self, name, shape):
        self.calls.append(("set_input_shape", name))
        self.shapes[name] = shape

    def set_tensor_address(self, name, ptr):
        self.calls.append(("set_tensor_address", name))
        self.addresses[name] = ptr

    def get_tensor_shape(self, name):
        self.calls.append(("get_tensor_shape", name))
        if name != "masks":
            return (1, 4)
        if self.addresses.get("orig_im_size") not in self.host_memory:
            return (1, 4, -1, -1)
        h, w = self.host_memory[self.addresses["orig_im_size"]].tolist()  # TensorRT reads the values there
        return (1, 4, h, w)


def test_shape_tensor_inputs_get_host_addresses_before_output_shapes_are_read():
    size = torch.tensor([240, 320], dtype=torch.int64)
    ctx = DocumentedContext({size.data_ptr(): size})
    inputs = {"point_coords": torch.zeros(1, 3, 2), "orig_im_size": size}
    shapes = bind_inputs(ctx, inputs, {"orig_im_size"}, ["masks", "iou_predictions"])
    assert shapes == {"masks": (1, 4, 240, 320), "iou_predictions": (1, 4)}
    assert ctx.addresses["orig_im_size"] == size.data_ptr()  # the host tensor itself
    first_read = ctx.calls.index(("get_tensor_shape", "masks"))
    assert ctx.calls.index(("set_tensor_address", "orig_im_size")) < first_read
    assert ctx.calls.index(("set_input_shape", "point_coords")) < first_read
    assert ("set_input_shape", "orig_im_size") not in ctx.calls  # a shape tensor's shape is static
    with pytest.raises(EngineError, match="shape-tensor input 'orig_im_size': must be in host memory"):
        bind_inputs(DocumentedContext(), {"orig_im_size": torch.empty(2, device="meta")}, {"orig_im_size"}, ["masks"])

    class NoValues(DocumentedContext):
        def set_tensor_address(self, name, ptr):
            if name != "orig_im_size":
                super().set_tensor_address(name, ptr)

    with pytest.raises(EngineError, match="cannot infer the shape of output 'masks'"):
        bind_inputs(NoValues({size.data_ptr(): size}), inputs, {"orig_im_size"}, ["masks"])


# ---------------------------------------------------------------------- refit
def _fake_trt():
    class Weights:
        def __init__(self, dtype, ptr, count):
            self.dtype, self.ptr, self.count = dtype, ptr, count

    return SimpleNamespace(Weights=Weights, TensorLocation=SimpleNamespace(DEVICE="device", HOST="host"),
                           float32="trt.float32", float16="trt.float16", bfloat16="trt.bfloat16")


class RecordingRefitter:
    def __init__(self, events, accept=True):
        self.events, self.accept, self.set = events, accept, {}

    def set_named_weights(self, name, weights, location):
        self.events.append("set")
        self.set[name] = (weights.ptr, weights.count, weights.dtype, location)
        return self.accept

    def refit_cuda_engine(self):
        self.events.append("refit")
        return True


@pytest.fixture(scope="module")
def harmonizer_exports(tiny_weights, tmp_path_factory):
    out = {}
    for precision in ("fp32", "fp16"):
        d = tmp_path_factory.mktemp(f"harmonizer_{precision}")
        export_components(tiny_weights, ["harmonizer_unet"], d, check=False, precision=precision)
        out[precision] = d
    return out


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_refit_weights_are_the_graphs_initializers_prepared_once(tiny_weights, harmonizer_exports, precision):
    d = harmonizer_exports[precision]
    refit_map = json.loads((d / "manifest.json").read_text())["networks"]["harmonizer_unet"]["refit_map"]
    components = load_reposition_components(tiny_weights)
    assert sorted(m["param"] for m in refit_map.values()) == sorted(components.harmonizer.params)
    assert any(m["transposed"] for m in refit_map.values())  # the exporter folded some Linear weights to W^T
    weights = harmonizer_weights(tiny_weights, refit_map, device="cpu")
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(d / "harmonizer_unet.onnx")).graph.initializer}
    for name, m in refit_map.items():
        got = weights[1.0][name]
        assert got.is_contiguous() and got.dtype == {"fp32": torch.float32, "fp16": torch.float16}[precision]
        np.testing.assert_array_equal(got.numpy(), initializers[name])  # c = 1: exactly what was exported
        base = components.harmonizer.base[m["param"]]
        base = base.t() if m["transposed"] else base
        np.testing.assert_array_equal(weights[0.0][name].numpy(),  # fp16: converted as the exporter converts
                                      (fp16_as_exported(base) if precision == "fp16" else base).numpy())
    # refit hands TensorRT the prepared memory itself: no copy per switch, the same addresses every time
    events = []
    refitter = RecordingRefitter(events)
    for _ in range(2):
        refit_engine(_fake_trt(), refitter, weights[0.0], synchronize=lambda: events.append("sync"))
        assert {n: v[0] for n, v in refitter.set.items()} == {n: t.data_ptr() for n, t in weights[0.0].items()}
    assert events[0] == "sync" and events.index("refit") > events.index("set")  # stream synchronised first
    assert all(v[1] == weights[0.0][n].numel() and v[3] == "host" for n, v in refitter.set.items())
    with pytest.raises(EngineError, match="cannot refit weight"):
        refit_engine(_fake_trt(), RecordingRefitter([], accept=False), weights[1.0], synchronize=lambda: None)
    name = next(n for n, m in refit_map.items() if m["transposed"])
    with pytest.raises(EngineError, match="not contiguous"):
        refit_engine(_fake_trt(), RecordingRefitter([]), {name: weights[1.0][name].t()}, synchronize=lambda: None)


def test_refit_map_refuses_a_graph_without_the_weights(tiny_weights, tmp_path):
    export_components(tiny_weights, ["vae_decoder"], tmp_path, check=False)
    with pytest.raises(EngineError, match="no initializer holds"):
        refit_weight_map(tmp_path / "vae_decoder.onnx", {"x": torch.ones(3, 5)})


def test_fp16_refit_map_finds_weights_the_fp16_converter_clamped(tmp_path):
    """ONNX Runtime's fp16 converter clamps magnitudes in (0, 5.96e-8) to 5.96e-8 (a plain cast gives 0);
    matched by a plain cast, a 1280-wide N(0, 0.02) weight had no initializer (issue 21 item 5)."""
    from onnx import TensorProto, helper
    from onnxruntime.transformers.float16 import convert_np_to_float16

    w = torch.randn(320, 1280, generator=torch.Generator().manual_seed(15)) * 0.02
    assert ((w != 0) & (w.half() == 0)).sum() == 2  # a plain cast flushes two of its values to 0, the converter not
    # y = x W^T as the exporter folds a Linear (a transposed MatMul constant), converted by the exporter's to_fp16
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w_t"], ["y"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1280])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 320])],
                              [numpy_helper.from_array(w.t().contiguous().numpy(), "w_t")])
    path = tmp_path / "linear.onnx"
    onnx.save(to_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), str(path))
    refit_map = refit_weight_map(path, {"linear.weight": w})
    assert refit_map == {"w_t": {"param": "linear.weight", "transposed": True, "dtype": "float16"}}
    exported = next(numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if i.name == "w_t")
    prepared = prepare_refit_weights(refit_map, {1.0: {"linear.weight": w}}, "cpu")[1.0]["w_t"]
    np.testing.assert_array_equal(prepared.numpy(), exported)  # a refit puts back exactly the exported weights
    # the conversion is the converter's own, edge values included (the oracle: convert_np_to_float16)
    edges = torch.tensor([0.0, -0.0, 1e-9, -1e-9, 5.96e-8, -6e-8, 6e-5, 65504.0, 7e4, -7e4, float("inf"),
                          float("-inf"), float("nan"), 0.02])
    for t in (w, edges):
        np.testing.assert_array_equal(fp16_as_exported(t).numpy(), convert_np_to_float16(t.numpy()))


def test_prepare_refit_weights_lays_out_transposed_weights_once():
    w = torch.arange(6.0).reshape(2, 3)
    out = prepare_refit_weights({"a": {"param": "p", "transposed": True, "dtype": "float16"},
                                 "b": {"param": "p", "transposed": False}}, {1.0: {"p": w}}, "cpu")
    assert out[1.0]["a"].is_contiguous() and out[1.0]["a"].dtype == torch.float16
    assert torch.equal(out[1.0]["a"].float(), w.t()) and torch.equal(out[1.0]["b"], w)


# ---------------------------------------------------------------------- the Engine protocol
class RecordingEngine:
    """Stands in for a TensorRTEngine under the harmonizer views: records refits and runs."""

    def __init__(self):
        self.device, self.refits, self.runs = torch.device("cpu"), [], []

    def refit(self, weights):
        self.refits.append(weights["w"])
        return 0.0

    def __call__(self, **inputs):
        self.runs.append(inputs)
        return {"noise_pred": inputs["sample"]}


def test_harmonizer_views_implement_the_engine_protocol_and_switch_only_when_needed(full_specs):
    engine = RecordingEngine()
    shared = RefittableHarmonizer(engine, {0.0: {"w": "c0"}, 1.0: {"w": "c1"}}, scale=1.0)
    harmonizer = HarmonizerAtScale(shared, 1.0, full_specs["harmonizer_unet"])
    inpaint = HarmonizerAtScale(shared, 0.0, full_specs["inpaint_unet"])
    for view in (harmonizer, inpaint):
        conforms(view)
        assert view.backend == "tensorrt" and not view.supports_cuda_graph and view.device == engine.device
    assert inpaint.lora is None and harmonizer.lora.allowed == (0.0, 1.0)
    x = torch.zeros(1)
    harmonizer(sample=x)
    assert engine.refits == []  # already at c = 1
    inpaint(sample=x)
    inpaint(sample=x)
    harmonizer(sample=x)
    assert engine.refits == ["c0", "c1"] and len(engine.runs) == 4
    harmonizer.lora.set(0.0)  # the pipeline's explicit switch; prepare() applies it
    harmonizer.prepare()
    assert engine.refits == ["c0", "c1", "c0"] and shared.scale == 0.0
    inpaint(sample=x)
    assert len(engine.refits) == 3  # both views at c = 0 now: no refit
    with pytest.raises(InputError, match="lora_scale 0.5: the harmonizer_unet engine accepts one of 0, 1"):
        harmonizer.lora.set(0.5)
    # TensorRTEngine without TensorRT behind it: the protocol's members are its class attributes and
    # methods plus the spec and device its constructor sets
    shell = object.__new__(type("Shell", (TensorRTEngine,), {"spec": full_specs["vae_decoder"], "device": torch.device("cpu")}))
    conforms(shell)
    assert shell.lora is None and not shell.supports_cuda_graph and shell.backend == "tensorrt"


# ---------------------------------------------------------------------- the engine cache
def test_engine_cache_builds_reuses_and_rebuilds(full_specs, tmp_path):
    spec = full_specs["vae_decoder"]
    builds = []

    def build():
        builds.append(1)
        return b"PLAN" + bytes([len(builds)])

    def deserialize(data):
        return ("engine", data) if data.startswith(b"PLAN") else None

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first build and the reuse are silent
        assert cached_engine(spec, tmp_path, "k1", build, deserialize) == ("engine", b"PLAN\x01")
        assert cached_engine(spec, tmp_path, "k1", build, deserialize) == ("engine", b"PLAN\x01")
    assert len(builds) == 1
    with pytest.warns(UserWarning, match="built for other inputs"):
        cached_engine(spec, tmp_path, "k2", build, deserialize)  # mismatched key: rebuilt, never loaded
    assert len(builds) == 2
    plan, meta = plan_paths(tmp_path, spec.name)
    plan.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="corrupt"):
        assert cached_engine(spec, tmp_path, "k2", build, deserialize)[1].startswith(b"PLAN")
    assert json.loads(meta.read_text())["key"] == "k2"
    meta.unlink()
    with pytest.warns(UserWarning, match="recording its cache key"):
        cached_engine(spec, tmp_path, "k2", build, deserialize)
    assert sorted(p.name for p in tmp_path.iterdir()) == [plan.name, meta.name]  # no temp files left
    (tmp_path / "other").mkdir()
    with pytest.raises(EngineError, match="failed to build"):
        cached_engine(spec, tmp_path / "other", "k3", lambda: None, deserialize)


class TimingCache:
    def __init__(self, blob: bytes):
        self.blob = blob

    def serialize(self):
        return memoryview(self.blob + b"+timings")


class BuilderConfig:
    """IBuilderConfig's timing-cache calls as TensorRT documents them: set_timing_cache returns False, and
    the config keeps no cache, for a cache recorded on another GPU or TensorRT version (ignore_mismatch=False)."""

    def __init__(self, foreign: bytes):
        self.foreign, self.cache = foreign, None

    def create_timing_cache(self, blob):
        return TimingCache(bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.blob == self.foreign and not ignore_mismatch:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


def test_a_foreign_timing_cache_is_replaced_and_the_plan_still_written(full_specs, tmp_path):
    """Issue 21 item 7: a refused cache left the config without one, serialize() then failed on None and the
    plan was never written (every load rebuilt)."""
    spec, timing = full_specs["vae_decoder"], tmp_path / "timing.cache"
    timing.write_bytes(b"from another GPU")
    config = BuilderConfig(foreign=b"from another GPU")

    def build():
        use_timing_cache(config, timing)
        save_timing_cache(config, timing)
        return b"PLAN"

    with pytest.warns(UserWarning, match="timing cache from another GPU or TensorRT version"):
        assert cached_engine(spec, tmp_path, "k", build, lambda data: ("engine", data)) == ("engine", b"PLAN")
    assert plan_paths(tmp_path, spec.name)[0].read_bytes() == b"PLAN"
    assert timing.read_bytes() == b"+timings"  # the fresh cache's timings replaced the foreign file
    # a cache of this GPU is used as it is, silently
    config = BuilderConfig(foreign=b"from another GPU")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        use_timing_cache(config, timing)
    assert config.get_timing_cache().blob == b"+timings"


# ---------------------------------------------------------------------- TensorRTEngine.replay (issue 21, item 10)
class ReplayLog:
    """What the CUDA and TensorRT calls did, in order."""

    def __init__(self):
        self.events, self.capturing = [], None


class LoggedStream:
    def __init__(self, log, name):
        self.log, self.name, self.cuda_stream = log, name, name

    def wait_stream(self, other):
        self.log.events.append(("wait", self.name, other.name))

    def synchronize(self):
        self.log.events.append(("synchronize", self.name))


class LoggedGraph:
    def __init__(self):
        self.kernels = []

    def replay(self):
        for kernel in self.kernels:
            kernel()


class LoggedCuda:
    """torch.cuda as TensorRTEngine uses it: a capture records the kernels launched inside it."""

    def __init__(self, log):
        self.log, self.main = log, LoggedStream(log, "caller")

    def Stream(self, device=None):  # noqa: N802 (torch's name)
        return LoggedStream(self.log, "engine")

    def current_stream(self, device=None):
        return self.main

    def CUDAGraph(self):  # noqa: N802 (torch's name)
        return LoggedGraph()

    @contextmanager
    def graph(self, graph, stream=None):
        self.log.capturing = graph
        try:
            yield
        finally:
            self.log.capturing = None


def _float_view(address: int, shape) -> np.ndarray:
    """The float32 host memory at `address` (what an engine reads and writes through a bound address)."""
    count = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(address)).reshape(shape)


class DoublingContext:
    """An IExecutionContext of an engine computing y = 2 x, on host memory, through bound addresses."""

    def __init__(self, log, number):
        self.log, self.number, self.shapes, self.addresses = log, number, {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        return self.shapes["x"]

    def execute_async_v3(self, stream):
        shape, x, y = self.shapes["x"], self.addresses["x"], self.addresses["y"]

        def kernel():
            _float_view(y, shape)[...] = 2 * _float_view(x, shape)

        self.log.events.append(("execute", self.number, stream, "captured" if self.log.capturing else "run"))
        if self.log.capturing is not None:
            self.log.capturing.kernels.append(kernel)
        else:
            kernel()
        return True


class DoublingEngine:
    num_io_tensors = 2

    def __init__(self, log):
        self.log, self.contexts = log, []

    def create_execution_context(self):
        self.contexts.append(DoublingContext(self.log, len(self.contexts)))
        return self.contexts[-1]

    def get_tensor_name(self, i):
        return ["x", "y"][i]

    def get_tensor_mode(self, name):
        return "input" if name == "x" else "output"

    def get_tensor_dtype(self, name):
        return "trt.float32"

    def is_shape_inference_io(self, name):
        return False


def test_replay_copies_inputs_orders_the_warm_up_and_keeps_a_context_per_shape(monkeypatch):
    from editrt.export import tensorrt as trt_module

    log = ReplayLog()
    fake_trt = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="input", OUTPUT="output"), float32="trt.float32",
                               float16="trt.float16", bfloat16="trt.bfloat16", int32="trt.int32", int64="trt.int64",
                               bool="trt.bool")
    monkeypatch.setattr(trt_module, "tensorrt_module", lambda: fake_trt)
    monkeypatch.setattr(trt_module, "cuda", LoggedCuda(log))
    spec = NetworkSpec("doubler", (TensorSpec("x", ("batch", 3)),), (TensorSpec("y", ("batch", 3)),), "y = 2 x")
    engine = TensorRTEngine(spec, DoublingEngine(log), "cpu")

    first = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.equal(engine.replay(x=first)["y"], 2 * first)
    warm_up = log.events.index(("execute", 1, "engine", "run"))
    assert ("wait", "engine", "caller") in log.events[:warm_up]  # the warm-up reads what the caller's stream wrote
    second = torch.tensor([[10.0, 20.0, 30.0]])
    assert torch.equal(engine.replay(x=second)["y"], 2 * second)
    assert torch.equal(first, torch.tensor([[1.0, 2.0, 3.0]]))  # the caller's tensor is not the static input
    # another shape: its own graph on its own context; the first graph still computes right afterwards
    pair = torch.tensor([[1.0, 1.0, 1.0], [4.0, 5.0, 6.0]])
    assert torch.equal(engine.replay(x=pair)["y"], 2 * pair)
    assert torch.equal(engine.replay(x=first)["y"], 2 * first)
    contexts = {number for kind, number, *_ in log.events if kind == "execute"}
    assert contexts == {1, 2}  # one context per graph shape, neither the eager one (0)
    assert engine.engine.contexts[1].shapes["x"] == (1, 3) and engine.engine.contexts[2].shapes["x"] == (2, 3)


# ---------------------------------------------------------------------- with TensorRT and a GPU
def _needs_tensorrt():
    pytest.importorskip("tensorrt", reason="tensorrt not installed (wheels only from NVIDIA's index)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs CUDA")


@pytest.mark.gpu
def test_tensorrt_build_and_run(tiny_weights, tmp_path):
    _needs_tensorrt()
    from editrt.export.tensorrt import load_engine
    from editrt.models.networks import reposition_networks

    export_components(tiny_weights, ["vae_decoder"], tmp_path)
    specs = network_specs(WeightsLayout(tiny_weights).network_config())
    engine = load_engine(specs["vae_decoder"], tmp_path, "cuda", BuildOptions(precision="fp32"))
    conforms(engine)
    reference = reposition_networks(load_reposition_components(tiny_weights, "cuda"))["vae_decoder"]
    for h, w in ((16, 16), (11, 13)):  # the export example is 15x15
        latent = torch.randn(1, 4, h, w, device="cuda")
        with torch.no_grad():
            expected = reference(latent)
        torch.testing.assert_close(engine(latent=latent)["image"], expected, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(engine.replay(latent=latent)["image"], engine(latent=latent)["image"])


@pytest.mark.gpu
def test_tensorrt_sam_decoder_builds_with_its_shape_tensor_and_follows_orig_im_size(tiny_weights, tmp_path):
    _needs_tensorrt()
    from segment_anything.utils.onnx import SamOnnxModel

    from editrt.export.onnx import random_inputs
    from editrt.export.tensorrt import load_engine

    export_components(tiny_weights, ["sam_mask_decoder"], tmp_path)
    spec = network_specs(WeightsLayout(tiny_weights).network_config())["sam_mask_decoder"]
    engine = load_engine(spec, tmp_path, "cuda", BuildOptions(precision="fp32"))
    assert engine.shape_inputs == {"orig_im_size"}
    oracle = SamOnnxModel(load_reposition_components(tiny_weights).sam, return_single_mask=False).eval()
    for size in ((240, 320), (1024, 1024), (451, 300)):
        inputs = random_inputs(spec, {"num_points": 3}, context={"sam_image_size": 256, "orig_im_size": size})
        with torch.no_grad():
            expected = oracle(*(inputs[n].float() if n == "orig_im_size" else inputs[n] for n in spec.input_names))
        got = engine(**{k: v.cuda() for k, v in inputs.items()})
        for name, ref in zip(spec.output_names, expected):
            torch.testing.assert_close(got[name].cpu(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_tensorrt_harmonizer_views_refit_between_c0_and_c1_like_torch(tiny_weights, tmp_path):
    """fp16 graph -> strongly typed fp16 engine; the two views of the one refittable UNet match
    PyTorch fp32 at c = 0 and c = 1 (<= 2e-2 max relative, the fp16 export tolerance), switching
    back and forth, at a latent size away from the 15x15 trace example."""
    _needs_tensorrt()
    from editrt.export.onnx import random_inputs
    from editrt.export.tensorrt import tensorrt_engines
    from editrt.models.networks import reposition_networks

    export_components(tiny_weights, ["inpaint_unet", "harmonizer_unet"], tmp_path, precision="fp16")
    specs = network_specs(WeightsLayout(tiny_weights).network_config())
    refit_map = json.loads((tmp_path / "manifest.json").read_text())["networks"]["harmonizer_unet"]["refit_map"]
    engines = tensorrt_engines(specs, ["inpaint_unet", "harmonizer_unet"], tmp_path, "cuda", tiny_weights, refit_map)
    nets = reposition_networks(load_reposition_components(tiny_weights, "cuda"))
    inputs = {k: v.cuda() for k, v in random_inputs(specs["inpaint_unet"], {"batch": 2, "height": 11, "width": 13,
                                                                            "tokens": 50}).items()}
    for name in ("inpaint_unet", "harmonizer_unet", "inpaint_unet", "harmonizer_unet"):
        conforms(engines[name])
        nets[name].apply_weights()
        with torch.no_grad():
            expected = nets[name](*(inputs[n] for n in specs[name].input_names))
        got = engines[name](**inputs)["noise_pred"]
        assert float((got.float() - expected).abs().max() / expected.abs().max()) <= 2e-2, name
    assert len(engines["harmonizer_unet"].shared.refit_seconds) == 4  # built at c = 1: every switch refits once
