import os

# One intra-op thread for torch here and in every process a test starts (CLIs, servers, Triton's and Ray's workers
# inherit the variable): the tests run tiny networks, where a second OpenMP thread costs more than it computes
# (a quick `editrt bench` over 8 components: 117 s of CPU with 2 threads, 25 s with 1, on 2 cores). PyTorch's CPU
# results depend on the thread count in their last bits, so every process agrees by all using the same count.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Triton kernels run on CPU through the interpreter. The switch must be set before any
# @triton.jit function is decorated, i.e. before editrt.kernels is imported by a test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    run_slow = "slow" in (config.getoption("-m") or "")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA (no GPU on this machine)"))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="full-size check; opt in with `pytest -m slow`"))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A complete `tiny` weights directory written by `editrt weights init` (random, seed 0)."""
    from editrt.weights import init_weights

    return init_weights(tmp_path_factory.mktemp("weights") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def reposition(tiny_weights):
    from editrt.runtime.reposition import RepositionPipeline

    return RepositionPipeline.from_pretrained(tiny_weights)


@pytest.fixture(scope="session")
def diffusers_pipe(tiny_weights):
    """The oracle: diffusers' StableDiffusionInpaintPipeline on the same tiny folder (no text encoder: the
    tests pass task prompts as prompt_embeds)."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        tiny_weights / "inpaint", local_files_only=True, safety_checker=None, requires_safety_checker=False,
        text_encoder=None, tokenizer=None, feature_extractor=None, image_encoder=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def photo():
    """A real photograph (scikit-image's Chelsea, 300x451), not noise."""
    from skimage import data

    return data.chelsea()


@pytest.fixture(scope="session")
def elements_pipe(tiny_weights):
    from editrt.runtime.elements_pipeline import ElementsPipeline

    return ElementsPipeline.from_pretrained(tiny_weights)


@pytest.fixture(scope="session")
def onnx_exports(tiny_weights, tmp_path_factory):
    """`editrt export` of every tiny component (fp32, each graph checked against PyTorch): (folder, results).

    Read-only for its users: tests/export/test_onnx_export.py holds every result to its spec and PyTorch,
    test_seele_export.py the estimators', test_tensorrt.py reads the graphs (one export, not three)."""
    from editrt.export.components import export_components

    out = tmp_path_factory.mktemp("onnx-exports")
    return out, export_components(tiny_weights, "all", out, check=True)
