"""The depth-estimator and matting bench rows on tiny weights: the peers (transformers) really run,
our rows run the pipeline's own estimators, every row says what ran, and weights without the
models get a note instead of rows."""
import shutil

import numpy as np
import pytest
import torch

from editrt.bench import suite
from editrt.bench.cases import BACKENDS, BenchContext, Skip


@pytest.fixture(scope="module")
def rows(tiny_weights):
    from transformers import VitMatteForImageMatting
    from transformers.pipelines import DepthEstimationPipeline

    calls = {"pipeline": 0, "vitmatte": 0}

    def counting(original, key):
        def wrapper(self, *args, **kwargs):
            calls[key] += 1
            return original(self, *args, **kwargs)
        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DepthEstimationPipeline, "__call__", counting(DepthEstimationPipeline.__call__, "pipeline"))
        mp.setattr(VitMatteForImageMatting, "forward", counting(VitMatteForImageMatting.forward, "vitmatte"))
        # the onnxruntime rows need the whole editor exported (a minute on tiny weights): tests/export covers
        # the estimators' graphs; here the row must say why it did not run
        mp.setattr(BenchContext, "onnx_dir", lambda self: (_ for _ in ()).throw(Skip("no export in this test")))
        settings = suite.Settings(tiny_weights, torch.device("cpu"), torch.float32, "tiny", quick=True,
                                  only=["depth-estimator", "matting"], repeats=2, warmup=1)
        doc = suite.run_suite(settings, progress=False)
    return {r["name"]: r for r in doc["rows"]}, calls, doc


def test_rows_and_what_ran(rows):
    by_name, calls, _ = rows
    for component in ("depth-estimator", "matting"):
        graphs = ("torch+cudagraph",) if component == "depth-estimator" else ()
        names = {f"{component}/{b}" for b in ("transformers", "transformers+compile", "torch-eager", "torch+compile",
                                              "onnxruntime", "tensorrt", *graphs)}
        assert names == {n for n in by_name if n.startswith(component + "/")}
        peer, ours = by_name[f"{component}/transformers"], by_name[f"{component}/torch-eager"]
        assert peer["peer"] and peer["baseline"] is None and peer["p50_ms"] > 0 and not peer["compiled"]
        assert not ours["peer"] and ours["baseline"] == f"{component}/transformers" and ours["p50_ms"] > 0
        assert ours["ratio"] is not None and not ours["compiled"] and not ours["cuda_graph"] and ours["kernels"] == []
        assert ours["flops"] and ours["flops"] > 0
        network = {"depth-estimator": "depth_estimator", "matting": "matting"}[component]  # one call per photo
        assert peer["observed"]["networks"] == ours["observed"]["networks"] == {network: 1}
        assert by_name[f"{component}/onnxruntime"]["skipped"] == "no export in this test"
        if graphs:
            assert by_name[f"{component}/torch+cudagraph"]["skipped"] == "CUDA graphs need CUDA"
        for compiled in ("torch+compile", "transformers+compile"):  # --quick on a CPU: not compiled, says so
            assert by_name[f"{component}/{compiled}"]["skipped"].startswith("torch.compile is not run with --quick")
    # warm-up + first run + 2 timed runs, each a real call of the peer's own entry point
    assert calls["pipeline"] >= 4 and calls["vitmatte"] >= 4
    assert BACKENDS["transformers"].peer and BACKENDS["transformers+compile"].compiles


def test_weights_without_the_models_get_notes_not_rows(tiny_weights, tmp_path):
    from editrt.bench.cases import Selection
    from editrt.bench.seele_cases import seele_cases

    root = tmp_path / "w"
    shutil.copytree(tiny_weights, root, ignore=shutil.ignore_patterns("depth", "matting", "elements", "inpaint", "sam"))
    ctx = BenchContext(root, torch.device("cpu"), torch.float32, "tiny", True, 2, Selection([]))
    ctx.__dict__["unet_config"] = {"sample_size": 8}  # the resolution read without the (absent) inpainting UNet
    ctx.__dict__["vae_config"] = {"block_out_channels": [1, 1, 1, 1]}
    assert seele_cases(ctx) == []
    assert any("no depth-estimator rows" in n for n in ctx.notes) and any("no matting rows" in n for n in ctx.notes)


def test_our_row_and_the_peer_compute_the_same_depth(tiny_weights):
    """The row's call (the pipeline's DepthEstimator) against the peer's call on the same photo: equal."""
    from editrt.bench.seele_cases import _depth_ours, _depth_transformers

    ctx = BenchContext(tiny_weights, torch.device("cpu"), torch.float32, "tiny", True, 2, suite.Selection([]))
    ours, peer = _depth_ours(ctx), _depth_transformers(ctx)
    np.testing.assert_array_equal(ours.call(ours.inputs[1]), peer.call(peer.inputs[1]).numpy())
    peer.close()
