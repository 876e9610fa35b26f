"""fp16 ONNX export (`editrt export --precision fp16`): fp16 inside, fp32 at the graph's edges.

Tolerance: max |ort - torch| / max |torch| <= 2e-2 against PyTorch fp32, and against PyTorch fp16
on the same inputs. fp16 rounds each op to 2**-11 relative; a UNet chains ~50 such ops, so ~1e-3
is expected (we see 1e-3..7e-3 on the tiny UNet, ~1e-3 on the VAE decoder); a graph computing anything
else is off by order 1. ONNX Runtime's CPU provider has fp16 kernels for every op these graphs use,
so parity runs here; the CUDA provider's run is the gpu test.
"""
import copy
import json

import numpy as np
import onnx
import pytest
import torch

from editrt.errors import InputError
from editrt.export.components import export_components
from editrt.export.onnx import TOLERANCES, export_network, graph_precision, random_inputs, weight_bytes
from editrt.export.specs import network_specs
from editrt.models.components import WeightsLayout, load_reposition_components
from editrt.models.networks import reposition_networks
from editrt.runtime.engines import OrtEngine

FP16_NETWORKS = ["inpaint_unet", "vae_decoder"]


@pytest.fixture(scope="module")
def fp16_engines(tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    results = export_components(tiny_weights, FP16_NETWORKS + ["sam_mask_decoder"], out, check=True, precision="fp16")
    return out, results


@pytest.fixture(scope="module")
def specs(tiny_weights):
    return network_specs(WeightsLayout(tiny_weights).network_config())


@pytest.fixture(scope="module")
def networks(tiny_weights):
    nets = reposition_networks(load_reposition_components(tiny_weights))
    nets["inpaint_unet"].apply_weights()  # c = 0, as exported
    return nets


def _rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_fp16_export_computes_in_fp16_with_fp32_graph_io(fp16_engines, specs):
    out, results = fp16_engines
    manifest = json.loads((out / "manifest.json").read_text())["networks"]
    assert {r.name: r.precision for r in results} == {"inpaint_unet": "fp16", "vae_decoder": "fp16",
                                                      "sam_mask_decoder": "fp32"}  # SAM's spec: fp32 only
    for r in results:
        assert manifest[r.name]["precision"] == r.precision
        assert r.max_rel_error <= TOLERANCES[r.precision]
        model = onnx.load(str(r.path))
        assert graph_precision(model) == r.precision
        for tensor in list(model.graph.input) + list(model.graph.output):  # the spec's I/O dtypes, unchanged
            spec_dtype = next(t.dtype for t in specs[r.name].inputs + specs[r.name].outputs if t.name == tensor.name)
            assert onnx.helper.tensor_dtype_to_np_dtype(tensor.type.tensor_type.elem_type) == np.dtype(spec_dtype)
    unet = onnx.load(str(out / "inpaint_unet.onnx"))
    weights = [i for i in unet.graph.initializer if len(i.dims) > 1]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)


@pytest.mark.parametrize("name", FP16_NETWORKS)
def test_fp16_graph_matches_pytorch_fp32_and_fp16_away_from_the_trace_example(fp16_engines, specs, networks, name):
    out, _ = fp16_engines
    spec, module = specs[name], networks[name]
    engine = OrtEngine(spec, out / f"{name}.onnx")
    half = copy.deepcopy(module).half()
    g = torch.Generator().manual_seed(5)
    for h, w, batch in ((11, 11, 1), (9, 14, 2), (16, 16, 2)):  # traced at 15x15, batch 2
        inputs = random_inputs(spec, {"batch": batch, "height": h, "width": w, "tokens": 50}, generator=g)
        with torch.no_grad():
            ref32 = module(*(inputs[n] for n in spec.input_names))
            ref16 = half(*(inputs[n].half() if n != "timestep" else inputs[n] for n in spec.input_names))
        got = engine(**inputs)[spec.output_names[0]]
        assert got.dtype == torch.float32 and got.shape == ref32.shape
        assert _rel_max(got, ref32) <= 2e-2, (name, h, w)
        assert _rel_max(got, ref16) <= 2e-2, (name, h, w)
        assert torch.isfinite(got).all()


def test_fp32_stays_the_default_and_bad_precisions_are_refused(fp16_engines, tiny_weights, specs, networks, tmp_path):
    results = export_components(tiny_weights, ["vae_decoder"], tmp_path / "default", check=False)
    assert results[0].precision == "fp32" and graph_precision(onnx.load(str(results[0].path))) == "fp32"
    fp32_bytes = weight_bytes(onnx.load(str(results[0].path)))
    assert fp32_bytes > 1.95 * weight_bytes(onnx.load(str(fp16_engines[0] / "vae_decoder.onnx")))  # half the bytes
    with pytest.raises(InputError, match="--precision 'int8': ONNX exports expected one of fp32, fp16"):
        export_components(tiny_weights, ["vae_decoder"], tmp_path / "bad", precision="int8")
    with pytest.raises(InputError, match="sam_mask_decoder: precision 'fp16' not supported; expected one of fp32"):
        export_network(specs["sam_mask_decoder"], networks["sam_mask_decoder"], tmp_path / "sam", precision="fp16")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "sam").exists()


@pytest.mark.gpu
def test_fp16_unet_on_the_onnxruntime_cuda_provider_matches_torch_fp16(fp16_engines, specs, tiny_weights):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without CUDAExecutionProvider (pip install 'editrt[gpu]')")
    out, _ = fp16_engines
    spec = specs["inpaint_unet"]
    module = reposition_networks(load_reposition_components(tiny_weights, "cuda"))["inpaint_unet"]
    module.apply_weights()
    half = copy.deepcopy(module).half()
    engine = OrtEngine(spec, out / "inpaint_unet.onnx", "cuda")
    inputs = {k: v.cuda() for k, v in random_inputs(spec, {"batch": 2, "height": 13, "width": 11, "tokens": 77}).items()}
    with torch.no_grad():
        ref16 = half(*(inputs[n].half() if n != "timestep" else inputs[n] for n in spec.input_names))
    got = engine(**inputs)["noise_pred"]
    assert got.is_cuda and _rel_max(got, ref16) <= 2e-2
