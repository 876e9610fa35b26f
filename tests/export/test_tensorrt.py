"""The TensorRT layer: everything that can be checked without TensorRT is checked here; the rest
skips with the reason (TensorRT's wheels come from NVIDIA's own index and cannot be installed here)."""
import json
import warnings

import numpy as np
import pytest
import torch

from editrt.errors import EngineError
from editrt.export.components import export_components
from editrt.export.specs import network_specs
from editrt.export.tensorrt import (
    BuildOptions,
    cache_key,
    cached_engine,
    harmonizer_weights,
    plan_paths,
    profile_shapes,
    refit_weight_map,
)
from editrt.models.components import WeightsLayout
from editrt.weights import load_config


@pytest.fixture(scope="module")
def full_specs():
    return network_specs(load_config("full"))


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


def test_bad_build_options():
    with pytest.raises(EngineError, match="precision"):
        BuildOptions(precision="int4")
    with pytest.raises(EngineError, match="optimization level"):
        BuildOptions(optimization_level=9)


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


def test_refit_map_and_weights(tiny_weights, tmp_path):
    """The harmonizer's refit map names every LoRA-touched initializer; its c=1 weights are the exported ones."""
    import onnx
    from onnx import numpy_helper

    from editrt.models.components import load_reposition_components

    export_components(tiny_weights, ["harmonizer_unet"], tmp_path, check=False)
    refit_map = json.loads((tmp_path / "manifest.json").read_text())["networks"]["harmonizer_unet"]["refit_map"]
    components = load_reposition_components(tiny_weights)
    assert sorted(m["param"] for m in refit_map.values()) == sorted(components.harmonizer.params)
    weights = harmonizer_weights(tiny_weights, refit_map)
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "harmonizer_unet.onnx")).graph.initializer}
    for name, m in refit_map.items():
        np.testing.assert_array_equal(weights[1.0][name], initializers[name])
        base = components.harmonizer.base[m["param"]].numpy()
        np.testing.assert_array_equal(weights[0.0][name], base.T if m["transposed"] else base)
    # a map against a graph without those weights is refused
    export_components(tiny_weights, ["vae_decoder"], tmp_path / "v", check=False)
    with pytest.raises(EngineError, match="no initializer holds"):
        refit_weight_map(tmp_path / "v" / "vae_decoder.onnx", {"x": torch.ones(3, 5)})


def test_tensorrt_build_and_run(tiny_weights, tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt not installed (wheels only from NVIDIA's index)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs CUDA")
    from editrt.export.tensorrt import load_engine
    from editrt.runtime.engines import TorchEngine

    export_components(tiny_weights, ["vae_decoder"], tmp_path)
    specs = network_specs(WeightsLayout(tiny_weights).network_config())
    engine = load_engine(specs["vae_decoder"], tmp_path, "cuda", BuildOptions(precision="fp32"))
    latent = torch.randn(1, 4, 16, 16, device="cuda")
    from editrt.models.components import load_reposition_components
    from editrt.models.networks import reposition_networks

    reference = TorchEngine(specs["vae_decoder"], reposition_networks(load_reposition_components(tiny_weights, "cuda"))["vae_decoder"])
    torch.testing.assert_close(engine(latent=latent)["image"], reference(latent=latent)["image"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(engine.replay(latent=latent)["image"], engine(latent=latent)["image"])
