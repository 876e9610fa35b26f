"""Every config.pbtxt `editrt export --format triton` can write, against Triton's own ModelConfig schema.

No server here (tests/deploy/test_triton.py runs one): each generated config is parsed by protobuf's
text format into tritonclient's `ModelConfig` (an unknown field, enum or a malformed list fails),
then held to what the network spec says: every named axis is -1, every static axis its size, data
types as Triton names numpy's (tritonclient.utils.np_to_triton_dtype), a batch dimension exactly
where every tensor starts with the same dynamic axis, TensorRT batches within the profile, and
the expected values for a few networks written out literally. Both weights configs (tiny, full).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from needs import need  # noqa: E402

from editrt.errors import InputError
from editrt.export.specs import network_specs
from editrt.export.triton import PIPELINE_MODELS, engine_config, pipeline_config, write_model_repository

DEPLOY = "pip install -e '.[deploy]'"


model_config_pb2 = need("tritonclient.grpc.model_config_pb2", DEPLOY)
text_format = need("google.protobuf.text_format", DEPLOY)
np_to_triton_dtype = need("tritonclient.utils", DEPLOY).np_to_triton_dtype
CONFIGS = Path(__file__).resolve().parents[2] / "editrt" / "configs"


def parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def type_name(value) -> str:
    return model_config_pb2.DataType.Name(value)


def specs_of(config: str) -> dict:
    return network_specs(json.loads((CONFIGS / f"{config}.json").read_text()))


@pytest.mark.parametrize("config", ["tiny", "full"])
@pytest.mark.parametrize("kind", ["onnx", "plan"])
def test_engine_configs_parse_and_follow_the_specs(config, kind):
    for name, spec in specs_of(config).items():
        cfg = parse(engine_config(spec, kind, "KIND_GPU"))
        assert cfg.name == name
        assert cfg.platform == {"onnx": "onnxruntime_onnx", "plan": "tensorrt_plan"}[kind]
        tensors = spec.inputs + spec.outputs
        firsts = {t.axes[0] for t in tensors}
        batchable = len(firsts) == 1 and isinstance(next(iter(firsts)), str)
        assert (cfg.max_batch_size > 0) == batchable, name
        assert cfg.HasField("dynamic_batching") == (cfg.max_batch_size > 1), name
        if kind == "plan" and batchable:
            axis = next(iter(firsts))
            assert cfg.max_batch_size <= min(p[axis][2] for p in spec.profiles), name
        assert [t.name for t in cfg.input] == spec.input_names and [t.name for t in cfg.output] == spec.output_names
        for got, want in zip(list(cfg.input) + list(cfg.output), tensors):
            assert type_name(got.data_type) == "TYPE_" + np_to_triton_dtype(np.dtype(want.dtype)), (name, want.name)
            axes = want.axes[1:] if batchable else want.axes
            if batchable and not axes:  # a per-item scalar: one value, reshaped away
                assert list(got.dims) == [1] and list(got.reshape.shape) == [], (name, want.name)
                continue
            assert len(got.dims) == len(axes), (name, want.name)
            for dim, axis in zip(got.dims, axes):
                assert dim == (-1 if isinstance(axis, str) else axis), (name, want.name, list(got.dims))
        assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]


def test_engine_configs_literal_expectations():
    specs = specs_of("tiny")
    vae = parse(engine_config(specs["vae_decoder"], "onnx"))
    assert vae.max_batch_size == 8 and list(vae.input[0].dims) == [4, -1, -1] and list(vae.output[0].dims) == [3, -1, -1]
    assert vae.dynamic_batching.max_queue_delay_microseconds > 0
    sam = parse(engine_config(specs["sam_mask_decoder"], "plan"))
    assert sam.max_batch_size == 0 and not sam.HasField("dynamic_batching")
    by_name = {t.name: t for t in sam.input}
    assert list(by_name["point_coords"].dims) == [1, -1, 2] and list(by_name["image_embeddings"].dims) == [1, 32, 16, 16]
    assert type_name(by_name["orig_im_size"].data_type) == "TYPE_INT64" and by_name["orig_im_size"].is_shape_tensor
    assert not parse(engine_config(specs["sam_mask_decoder"], "onnx")).input[5].is_shape_tensor
    unet = parse(engine_config(specs_of("full")["inpaint_unet"], "plan"))
    assert unet.max_batch_size == 2  # batch 1 (no CFG) or 2 (CFG): the TensorRT profile's range
    timestep = next(t for t in unet.input if t.name == "timestep")
    assert list(timestep.dims) == [1] and timestep.HasField("reshape") and list(timestep.reshape.shape) == []
    assert list(unet.input[0].dims) == [9, -1, -1] and list(unet.input[2].dims) == [-1, 1024]
    content = parse(engine_config(specs["content_encoder"], "onnx"))
    assert content.max_batch_size == 8 and list(content.input[0].dims) == [3, 32, 32]


def test_pipeline_configs_parse_and_declare_their_tensors():
    for name, model in PIPELINE_MODELS.items():
        cfg = parse(pipeline_config(model, {"weights": "/w \"quoted\"", "device": "cpu"}, "KIND_CPU"))
        assert cfg.name == name and cfg.backend == "python" and cfg.max_batch_size == 0
        assert cfg.parameters["weights"].string_value == '/w "quoted"'
        assert [t.name for t in cfg.input] == [p.name for p in model.inputs]
        assert [t.optional for t in cfg.input] == [p.optional for p in model.inputs]
        assert [t.name for t in cfg.output] == [p.name for p in model.outputs]
        for t in list(cfg.input) + list(cfg.output):
            # the wheel's Python stub mishandles BOOL and BYTES tensors under numpy 2 (export/triton.py)
            assert type_name(t.data_type) not in ("TYPE_BOOL", "TYPE_STRING"), (name, t.name)
        images = [t for t in cfg.input if t.name == "IMAGE"]
        for image in images:
            assert type_name(image.data_type) == "TYPE_UINT8" and list(image.dims) == [-1, -1, 3]


def test_repository_writer_refuses_bad_requests_and_leaves_nothing(tiny_weights, tmp_path):
    out = tmp_path / "repo"
    with pytest.raises(InputError, match="'nonsense'"):
        write_model_repository(tiny_weights, out, components="segment,nonsense")
    with pytest.raises(InputError, match="--engines"):
        write_model_repository(tiny_weights, out, components="vae_decoder")
    with pytest.raises(InputError, match="--engines"):
        write_model_repository(tiny_weights, out, engines=tmp_path / "missing")
    assert not out.exists() and not list(tmp_path.glob(".repo*")), "a failed export must leave nothing behind"

    class Interrupted(Exception):
        """Raised by the log callback halfway through writing (a full disk, a Ctrl-C)."""

    def log(what: str) -> None:
        if "inpaint" in what:
            raise Interrupted(what)

    with pytest.raises(Interrupted):
        write_model_repository(tiny_weights, out, log=log)
    assert not out.exists() and not list(tmp_path.glob(".repo*")), "an interrupted export must leave nothing behind"
    (out / "x").mkdir(parents=True)
    with pytest.raises(InputError, match="not empty"):
        write_model_repository(tiny_weights, out)


def test_cli_writes_only_the_chosen_models(tiny_weights, tmp_path):
    from editrt.cli import main

    out = tmp_path / "repo"
    assert main(["export", "--format", "triton", "--weights", str(tiny_weights), "-o", str(out), "--component",
                 "segment,elements_render", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["elements_render", "segment"]
    model_py = (out / "segment" / "1" / "model.py").read_text()
    assert "from editrt.runtime.triton_models import SegmentModel as TritonPythonModel" in model_py
    cfg = parse((out / "segment" / "config.pbtxt").read_text())
    assert cfg.parameters["weights"].string_value == str(Path(tiny_weights).resolve())
    assert {"device", "dtype", "backend"} <= set(cfg.parameters)
    assert main(["export", "--format", "triton", "--weights", str(tiny_weights), "-o", str(tmp_path / "r2"),
                 "--component", "unknown_model", "--quiet"]) == 2
    assert not (tmp_path / "r2").exists()


def test_cuda_repository_asks_for_gpu_instances(tiny_weights, tmp_path):
    """Exported for a GPU: every model gets KIND_GPU instances, and a model instance on GPU N runs on cuda:N."""
    from editrt.runtime.triton_models import _device

    out = write_model_repository(tiny_weights, tmp_path / "repo", device="cuda", dtype="fp16")
    for name in PIPELINE_MODELS:
        cfg = parse((out / name / "config.pbtxt").read_text())
        assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
        assert cfg.parameters["device"].string_value == "cuda" and cfg.parameters["dtype"].string_value == "fp16"
    on_gpu = {"model_instance_kind": "GPU", "model_instance_device_id": "1"}
    assert _device("cuda", on_gpu) == "cuda:1" and _device("auto", on_gpu) == "cuda:1"
    assert _device("cpu", on_gpu) == "cpu"
    assert _device("cuda:0", {"model_instance_kind": "CPU", "model_instance_device_id": "0"}) == "cuda:0"
