"""ONNX Runtime on CUDA (issue 21, item 6): a provider that fails to load is an error, not a silent CPU run;
and no install of editrt puts `onnxruntime` beside `onnxruntime-gpu` (two distributions of one module that
break each other's CUDA provider)."""
import ast
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

from editrt.errors import EngineError
from editrt.export.specs import NetworkSpec, TensorSpec
from editrt.runtime.engines import OrtEngine

REAL_SESSION = onnxruntime.InferenceSession
SPEC = NetworkSpec("doubler", (TensorSpec("x", ("batch", 3)),), (TensorSpec("y", ("batch", 3)),), "y = 2 x")


@pytest.fixture
def doubler(tmp_path):
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "doubler",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    path = tmp_path / "doubler.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


class CudaFailsToLoad:
    """What ONNX Runtime does when the CUDA provider's libraries do not load: the session is created
    anyway, on the CPU provider only, and says so in get_providers() (a log line is all it prints)."""

    def __init__(self, path, options=None, providers=None):
        self.asked = providers
        self.session = REAL_SESSION(path, options, providers=["CPUExecutionProvider"])

    def get_providers(self):
        return self.session.get_providers()

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_a_provider_that_did_not_load_is_an_error(doubler, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", CudaFailsToLoad)
    with pytest.raises(EngineError, match="did not load CUDAExecutionProvider .running on CPUExecutionProvider"):
        OrtEngine(SPEC, doubler, "cuda")
    # the same with providers given explicitly
    with pytest.raises(EngineError, match="did not load CUDAExecutionProvider"):
        OrtEngine(SPEC, doubler, "cpu", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_cpu_engine_runs_on_the_providers_it_asked_for(doubler):
    engine = OrtEngine(SPEC, doubler, "cpu")
    assert engine.session.get_providers() == ["CPUExecutionProvider"]
    x = torch.randn(2, 3)
    assert torch.equal(engine(x=x)["y"], x + x)


def _setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    """install_requires and extras_require as setup.py lists them (read from its source, not run)."""
    tree = ast.parse((Path(__file__).parents[2] / "setup.py").read_text())
    constants = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name)}

    def names(value) -> list[str]:
        if isinstance(value, ast.Name):
            return names(constants[value.id])
        out = []
        for item in value.elts:
            if isinstance(item, ast.Starred):
                out += names(constants[item.value.id])
            else:
                out.append(item.value.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip())
        return out

    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kwargs = {k.arg: k.value for k in call.keywords}
    extras = {k.value: names(v) for k, v in zip(kwargs["extras_require"].keys, kwargs["extras_require"].values)}
    return names(kwargs["install_requires"]), extras


def test_no_install_gets_both_onnxruntime_distributions():
    required, extras = _setup_requirements()
    assert "onnxruntime" not in required and "onnxruntime-gpu" not in required
    assert "onnxruntime" in extras["dev"] and "onnxruntime" in extras["onnxruntime"]  # CPU: pip install -e ".[dev]"
    assert "onnxruntime-gpu" in extras["gpu"] and "onnxruntime-gpu" in extras["dev-gpu"]  # the GPU machine
    for name, extra in extras.items():
        assert not {"onnxruntime", "onnxruntime-gpu"} <= set(required + extra), name


def test_without_onnxruntime_the_error_names_the_extra(doubler, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(EngineError, match=r"onnxruntime: not installed .*editrt\[onnxruntime\].*editrt\[gpu\]"):
        OrtEngine(SPEC, doubler, "cpu")
