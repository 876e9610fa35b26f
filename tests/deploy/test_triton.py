"""The Triton model repository (`editrt export --format triton`) served by a REAL tritonserver.

One server (the nvidia-pytriton wheel's tritonserver with its Python backend, tests/deploy/
tritonserver.py) serves the repository the CLI wrote for tiny random weights. Each pipeline model
is queried over HTTP and gRPC with tritonclient and must answer exactly what the CLI writes for
the same inputs and seed: the same image bytes, the same mask pixels, the same elements. Every
seed, step count and option differs from the defaults, so a model that drops one goes red.

The bundle has no ONNX Runtime or TensorRT backend, so the engine models cannot run as written;
their configs are checked by Triton itself (loading one fails for the missing backend, not for
its config, while a broken config fails at parsing), by protobuf's ModelConfig schema, and by
serving each exported ONNX graph under its generated config through a Python-backend model that
runs ONNX Runtime: Triton then checks every request's names, data types and shapes against the
config's dims, at dynamic sizes away from the export's trace.

The server is stopped (its whole process group) in the fixture's finalizer, pass or fail.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from needs import IN_CI, need  # noqa: E402
from tritonserver import ServerUnavailable, TritonServer, server_bundle  # noqa: E402

PIPELINES = ["segment", "inpaint", "reposition", "elements_partition", "elements_render"]
ENGINES = ["vae_decoder", "sam_mask_decoder"]  # one batchable network, one with an int64 shape input
ORT_SUFFIX = "_via_python"


http = need("tritonclient.http", "pip install -e '.[deploy]'")
grpc = need("tritonclient.grpc", "pip install -e '.[deploy]'")
from tritonclient.utils import InferenceServerException  # noqa: E402

PROTOCOLS = {"http": http, "grpc": grpc}
ORT_MODEL_PY = '''"""Runs the engine model's ONNX graph with ONNX Runtime under the generated config (test only)."""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.session = ort.InferenceSession(str(Path(__file__).parent / "model.onnx"), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:  # through DLPack: see runtime/triton_models.py tensor_to_numpy
            feed = {n: np.from_dlpack(pb_utils.get_input_tensor_by_name(request, n)) for n in self.inputs}
            result = self.session.run(self.outputs, feed)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor.from_dlpack(n, np.ascontiguousarray(v)) for n, v in zip(self.outputs, result)]))
        return responses
'''


def _bundle_or_skip():
    try:
        return server_bundle()
    except ServerUnavailable as e:
        if IN_CI:
            raise
        pytest.skip(str(e))


def cli(*argv: str) -> None:
    from editrt.cli import main

    code = main([*argv, "--quiet"])
    assert code == 0, f"editrt {' '.join(argv)} exited {code}"


@pytest.fixture(scope="module")
def photo_small(tmp_path_factory):
    """scikit-image's Chelsea at 120x180: a real photograph, small enough for the tiny models."""
    from skimage import data

    rgb = np.asarray(Image.fromarray(data.chelsea()).resize((180, 120), Image.LANCZOS))
    path = tmp_path_factory.mktemp("photo") / "chelsea.png"
    Image.fromarray(rgb).save(path)
    return rgb, path


@pytest.fixture(scope="module")
def repository(tiny_weights, tmp_path_factory):
    """What `editrt export --format triton` writes: the pipeline models, running every network in-process."""
    repo = tmp_path_factory.mktemp("triton") / "repo"
    cli("export", "--format", "triton", "--weights", str(tiny_weights), "-o", str(repo))
    return repo


@pytest.fixture(scope="module")
def engines_repository(tiny_weights, tmp_path_factory):
    """What `editrt export --format triton --engines ENGINES` writes for two engines and `segment` (which
    then calls them by BLS), plus the test's own models: each engine config served over its graph by
    ONNX Runtime in a Python model, `segment_bls` routed to those, and a config Triton cannot parse."""
    from editrt.export.components import export_components

    root = tmp_path_factory.mktemp("triton-engines")
    export_components(tiny_weights, ENGINES, root / "engines", check=False)
    repo = root / "repo"
    cli("export", "--format", "triton", "--weights", str(tiny_weights), "-o", str(repo), "--engines",
        str(root / "engines"), "--component", ",".join([*ENGINES, "segment"]))
    for name in ENGINES:  # the generated engine config, served by a Python model that runs ONNX Runtime
        served = repo / f"{name}{ORT_SUFFIX}"
        shutil.copytree(repo / name, served)
        config = (served / "config.pbtxt").read_text()
        assert 'platform: "onnxruntime_onnx"' in config
        config = config.replace('platform: "onnxruntime_onnx"', 'backend: "python"')
        (served / "config.pbtxt").write_text(config.replace(f'name: "{name}"', f'name: "{name}{ORT_SUFFIX}"'))
        (served / "1" / "model.py").write_text(ORT_MODEL_PY)
    config = (repo / "segment" / "config.pbtxt").read_text()
    written = 'key: "bls"\n  value: { string_value: "sam_mask_decoder,vae_decoder" }'
    assert written in config, "segment must call the engine models the repository serves"
    routed = ",".join(f"{n}={n}{ORT_SUFFIX}" for n in ENGINES)
    (repo / "segment").rename(repo / "segment_bls")
    (repo / "segment_bls" / "config.pbtxt").write_text(
        config.replace('name: "segment"', 'name: "segment_bls"').replace(written, written.replace(
            "sam_mask_decoder,vae_decoder", routed)))
    broken = repo / "broken_config"  # the control: what Triton says about a config it cannot parse
    shutil.copytree(repo / "vae_decoder", broken)
    text = (broken / "config.pbtxt").read_text().replace("TYPE_FP32", "TYPE_FP33").replace('"vae_decoder"', '"broken_config"')
    (broken / "config.pbtxt").write_text(text)
    return repo


@pytest.fixture(scope="module")
def server(repository, engines_repository, tmp_path_factory):
    _bundle_or_skip()
    started = TritonServer([repository, engines_repository],
                           PIPELINES + [f"{n}{ORT_SUFFIX}" for n in ENGINES] + ["segment_bls"],
                           tmp_path_factory.mktemp("triton-log") / "tritonserver.log")
    try:
        yield started.start()
    finally:
        started.stop()


@pytest.fixture(scope="module")
def clients(server):
    made = {"http": http.InferenceServerClient(server.http_url), "grpc": grpc.InferenceServerClient(server.grpc_url)}
    yield made
    for client in made.values():
        client.close()


def infer(clients, protocol: str, model: str, inputs: dict[str, np.ndarray], parameters=None) -> dict[str, np.ndarray]:
    """One request: named numpy inputs, optional request parameters; returns every output."""
    module = PROTOCOLS[protocol]
    tensors = []
    for name, value in inputs.items():
        value = np.asarray(value)
        datatype = {
            np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32",
            np.dtype(np.int64): "INT64"}[value.dtype]
        tensor = module.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    result = clients[protocol].infer(model, tensors, parameters=parameters)
    response = result.get_response()
    names = [o["name"] for o in response["outputs"]] if isinstance(response, dict) else [o.name for o in response.outputs]
    return {n: result.as_numpy(n) for n in names}


def scalar(value, dtype) -> np.ndarray:
    return np.array([value], dtype)


def png_pixels(path: Path, mode: str = "RGB") -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert(mode))


# ---------------------------------------------------------------------- pipeline models == CLI
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_segment_equals_cli(clients, protocol, photo_small, tiny_weights, tmp_path):
    rgb, path = photo_small
    cli("segment", str(path), "--point", "60,50", "--point", "150,20,0", "--box", "30,20,120,110", "-o",
        str(tmp_path / "mask.png"), "--weights", str(tiny_weights))
    out = infer(clients, protocol, "segment", {
        "IMAGE": rgb, "POINTS": np.array([[60, 50], [150, 20]], np.float32), "LABELS": np.array([1, 0], np.int32),
        "BOX": np.array([30, 20, 120, 110], np.float32)})
    expected = png_pixels(tmp_path / "mask.png", "L")
    assert out["MASK"].dtype == np.uint8 and out["MASK"].shape == rgb.shape[:2]
    assert 0 < (expected > 0).sum() < expected.size, "a degenerate reference mask proves nothing"
    np.testing.assert_array_equal(out["MASK"], expected)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_inpaint_equals_cli(clients, protocol, photo_small, tiny_weights, tmp_path):
    rgb, path = photo_small
    mask = np.zeros(rgb.shape[:2], np.uint8)
    mask[30:90, 50:120] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    cli("inpaint", str(path), str(tmp_path / "mask.png"), "--task", "complete", "--steps", "2", "--guidance", "2.5",
        "--seed", "7", "--resolution", "64", "-o", str(tmp_path / "out.png"), "--weights", str(tiny_weights))
    if protocol == "http":  # options as input tensors
        out = infer(clients, protocol, "inpaint", {
            "IMAGE": rgb, "MASK": mask, "STEPS": scalar(2, np.int32), "GUIDANCE": scalar(2.5, np.float32),
            "SEED": scalar(7, np.int64), "RESOLUTION": scalar(64, np.int32)}, parameters={"task": "complete"})
    else:  # options as request parameters
        out = infer(clients, protocol, "inpaint", {"IMAGE": rgb, "MASK": mask}, parameters={
            "task": "complete", "steps": 2, "guidance": 2.5, "seed": 7, "resolution": 64})
    expected = png_pixels(tmp_path / "out.png")
    assert not np.array_equal(expected, rgb), "the reference must have regenerated something"
    np.testing.assert_array_equal(out["IMAGE"], expected)


def test_reposition_equals_cli(clients, photo_small, tiny_weights, tmp_path):
    rgb, path = photo_small
    subject = np.zeros(rgb.shape[:2], np.uint8)
    subject[40:80, 60:100] = 255
    Image.fromarray(subject).save(tmp_path / "subject.png")
    cli("reposition", str(path), "--mask", str(tmp_path / "subject.png"), "--move", "25,-10", "--scale", "1.2",
        "--steps", "2", "--seed", "5", "--save-stages", str(tmp_path / "stages"), "-o", str(tmp_path / "out.png"),
        "--weights", str(tiny_weights))
    out = infer(clients, "grpc", "reposition", {
        "IMAGE": rgb, "MASK": subject, "MOVE": np.array([25, -10], np.float32), "SCALE": scalar(1.2, np.float32),
        "STEPS": scalar(2, np.int32), "SEED": scalar(5, np.int64)})
    np.testing.assert_array_equal(out["IMAGE"], png_pixels(tmp_path / "out.png"))
    region = next((tmp_path / "stages").glob("*_output_mask.png"))
    np.testing.assert_array_equal(out["REGION"], png_pixels(region, "L"))


def test_crops_equal_cli_and_bad_crops_name_their_input(clients, photo_small, tiny_weights, tmp_path):
    """CROP_PADDING (an input) and crop_size (a request parameter) reach the pass as `--crop-padding` /
    `--crop-size` do: the CLI's bytes, for reposition (native) and inpaint (processing)."""
    rgb, path = photo_small
    subject = np.zeros(rgb.shape[:2], np.uint8)
    subject[40:80, 60:100] = 255
    Image.fromarray(subject).save(tmp_path / "subject.png")
    cli("reposition", str(path), "--mask", str(tmp_path / "subject.png"), "--move", "25,-10", "--crop-padding", "6",
        "--steps", "2", "--seed", "5", "-o", str(tmp_path / "moved.png"), "--weights", str(tiny_weights))
    moved = infer(clients, "grpc", "reposition", {
        "IMAGE": rgb, "MASK": subject, "MOVE": np.array([25, -10], np.float32), "CROP_PADDING": scalar(6, np.int32),
        "STEPS": scalar(2, np.int32), "SEED": scalar(5, np.int64)})
    np.testing.assert_array_equal(moved["IMAGE"], png_pixels(tmp_path / "moved.png"))
    whole = infer(clients, "grpc", "reposition", {
        "IMAGE": rgb, "MASK": subject, "MOVE": np.array([25, -10], np.float32), "STEPS": scalar(2, np.int32),
        "SEED": scalar(5, np.int64)})
    assert not np.array_equal(whole["IMAGE"], moved["IMAGE"])  # the crop changed the work
    cli("inpaint", str(path), str(tmp_path / "subject.png"), "--crop-padding", "8", "--crop-size", "processing",
        "--steps", "2", "--seed", "7", "-o", str(tmp_path / "filled.png"), "--weights", str(tiny_weights))
    filled = infer(clients, "http", "inpaint", {"IMAGE": rgb, "MASK": subject, "STEPS": scalar(2, np.int32),
                                                "SEED": scalar(7, np.int64)},
                   parameters={"crop_padding": 8, "crop_size": "processing"})
    np.testing.assert_array_equal(filled["IMAGE"], png_pixels(tmp_path / "filled.png"))
    for model, inputs in (("reposition", {"MASK": subject, "MOVE": np.array([5, 0], np.float32)}),
                          ("inpaint", {"MASK": subject})):
        assert "CROP_PADDING" in _error(clients, "http", model, {"IMAGE": rgb, **inputs,
                                                                 "CROP_PADDING": scalar(-1, np.int32)})
        assert "crop_size" in _error(clients, "http", model, {"IMAGE": rgb, **inputs, "CROP_PADDING": scalar(4, np.int32)},
                                     {"crop_size": "tiny"})


def test_reposition_seele_stages_equal_cli(clients, photo_small, tiny_weights, tmp_path):
    """Depth occlusion, perspective scale, matting and a shadow region through Triton: the CLI's bytes."""
    rgb, path = photo_small
    subject = np.zeros(rgb.shape[:2], np.uint8)
    subject[40:80, 60:100] = 255
    region = np.zeros(rgb.shape[:2], np.uint8)
    region[85:95, 80:130] = 255
    Image.fromarray(subject).save(tmp_path / "subject.png")
    Image.fromarray(region).save(tmp_path / "region.png")
    cli("reposition", str(path), "--mask", str(tmp_path / "subject.png"), "--move", "30,8", "--scale", "auto",
        "--occlusion", "auto", "--matting", "on", "--trimap-band", "3", "--shadow-region", str(tmp_path / "region.png"),
        "--steps", "2", "--seed", "3", "--save-stages", str(tmp_path / "stages"), "-o", str(tmp_path / "out.png"),
        "--weights", str(tiny_weights))
    out = infer(clients, "http", "reposition", {
        "IMAGE": rgb, "MASK": subject, "MOVE": np.array([30, 8], np.float32), "MATTING": scalar(1, np.uint8),
        "TRIMAP_BAND": scalar(3, np.int32), "NEW_SHADOW_REGION": region, "STEPS": scalar(2, np.int32),
        "SEED": scalar(3, np.int64)}, parameters={"scale": "auto", "occlusion": "auto"})
    np.testing.assert_array_equal(out["IMAGE"], png_pixels(tmp_path / "out.png"))
    np.testing.assert_array_equal(out["REGION"], png_pixels(next((tmp_path / "stages").glob("*_output_mask.png")), "L"))
    plain = infer(clients, "http", "reposition", {
        "IMAGE": rgb, "MASK": subject, "MOVE": np.array([30, 8], np.float32), "STEPS": scalar(2, np.int32),
        "SEED": scalar(3, np.int64)})
    assert not np.array_equal(plain["IMAGE"], out["IMAGE"])  # the stages really ran
    off = infer(clients, "http", "reposition", {
        "IMAGE": rgb, "MASK": subject, "MOVE": np.array([30, 8], np.float32), "STEPS": scalar(2, np.int32),
        "SEED": scalar(3, np.int64)}, parameters={"matting": "0", "harmonize": "1"})  # text parameters read as numbers
    np.testing.assert_array_equal(off["IMAGE"], plain["IMAGE"])
    assert "MATTING: expected an integer" in _error(clients, "http", "reposition", {
        "IMAGE": rgb, "MASK": subject, "MOVE": np.array([30, 8], np.float32)}, {"matting": "on"})


def test_elements_partition_and_render_equal_cli(clients, photo_small, tiny_weights, tmp_path):
    from editrt.runtime.elements import Elements
    from editrt.runtime.images import load_labels_png

    rgb, path = photo_small
    weights = ("--weights", str(tiny_weights))
    cli("elements", "partition", str(path), "--grid", "4", "--beta", "32", "-o", str(tmp_path / "e.json"), "--labels",
        str(tmp_path / "labels.png"), *weights)
    parts = infer(clients, "http", "elements_partition", {"IMAGE": rgb, "GRID": scalar(4, np.int32),
                                                           "BETA": scalar(32.0, np.float32)})
    np.testing.assert_array_equal(parts["LABELS"], load_labels_png(tmp_path / "labels.png"))
    saved = Elements.load(tmp_path / "e.json")
    assert len(saved.alive_ids) > 2
    for name, value in (("FEATURES", saved.features), ("CENTROIDS", saved.centroids), ("SIZES", saved.sizes),
                        ("ALIVE", saved.alive.astype(np.uint8)), ("IMAGE_SIZE", saved.image_size),
                        ("WORKING_SIZE", saved.working_size)):
        np.testing.assert_array_equal(parts[name], np.asarray(value), err_msg=name)

    # unedited, then with one element deleted: the edit is the client clearing ALIVE
    deleted = saved.alive_ids[1]
    cli("elements", "edit", str(tmp_path / "e.json"), "--delete", str(deleted), "-o", str(tmp_path / "edited.json"))
    render = ("--steps", "2", "--seed", "4", "--prompt", "a cat")
    cli("elements", "render", str(tmp_path / "e.json"), *render, "-o", str(tmp_path / "r.png"), *weights)
    cli("elements", "render", str(tmp_path / "edited.json"), *render, "-o", str(tmp_path / "r_edited.png"), *weights)
    request = {k: parts[k] for k in ("FEATURES", "CENTROIDS", "SIZES", "ALIVE", "IMAGE_SIZE", "WORKING_SIZE")}
    request.update(STEPS=scalar(2, np.int32), SEED=scalar(4, np.int64))
    image = infer(clients, "http", "elements_render", request, parameters={"prompt": "a cat"})["IMAGE"]
    np.testing.assert_array_equal(image, png_pixels(tmp_path / "r.png"))
    request["ALIVE"] = request["ALIVE"].copy()
    request["ALIVE"][deleted] = 0
    edited = infer(clients, "grpc", "elements_render", request, parameters={"prompt": "a cat"})["IMAGE"]
    np.testing.assert_array_equal(edited, png_pixels(tmp_path / "r_edited.png"))
    assert not np.array_equal(edited, image)


# ---------------------------------------------------------------------- bad requests
def _error(clients, protocol, model, inputs, parameters=None) -> str:
    with pytest.raises(InferenceServerException) as e:
        infer(clients, protocol, model, inputs, parameters)
    return str(e.value)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_triton_errors_and_the_server_serves_on(clients, protocol, server, photo_small):
    rgb, _ = photo_small
    point = np.array([[60, 50]], np.float32)
    assert "IMAGE" in _error(clients, protocol, "segment", {"POINTS": point})  # a missing input
    wrong_shape = np.zeros((*rgb.shape[:2], 4), np.uint8)
    message = _error(clients, protocol, "segment", {"IMAGE": wrong_shape, "POINTS": point})
    assert "IMAGE" in message and "shape" in message
    message = _error(clients, protocol, "segment", {"IMAGE": rgb.astype(np.float32), "POINTS": point})
    assert "IMAGE" in message and "FP32" in message  # a wrong data type
    # rejected by editrt itself: its one-line message comes back
    assert "point" in _error(clients, protocol, "segment", {"IMAGE": rgb, "POINTS": np.array([[900, 5]], np.float32)})
    assert "POINTS and/or BOX" in _error(clients, protocol, "segment", {"IMAGE": rgb})
    image_mask = {"IMAGE": rgb, "MASK": np.ones(rgb.shape[:2], np.uint8)}
    assert "task" in _error(clients, protocol, "inpaint", image_mask, {"task": "paint", "steps": 1})
    assert "'stpes'" in _error(clients, protocol, "inpaint", image_mask, {"stpes": 1})
    assert "STEPS" in _error(clients, protocol, "inpaint", {**image_mask, "STEPS": scalar(1, np.int32)}, {"steps": 1})
    message = _error(clients, protocol, "elements_render", {
        "FEATURES": np.zeros((3, 32), np.float32), "CENTROIDS": np.zeros((2, 2), np.float32),
        "SIZES": np.zeros((3, 2), np.float32), "ALIVE": np.ones(3, np.uint8), "IMAGE_SIZE": np.array([64, 64], np.int32)})
    assert "CENTROIDS" in message
    assert server.alive() and server.ready()
    mask = infer(clients, protocol, "segment", {"IMAGE": rgb, "POINTS": point})["MASK"]
    assert mask.shape == rgb.shape[:2]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_requests_over_the_bounds_are_invalid_arg(clients, protocol, server, photo_small):
    """Every request's work is bounded from its declared sizes (runtime/triton_models.LIMITS), before any work:
    INVALID_ARG naming the input; non-finite numbers are refused, not rendered."""
    rgb, _ = photo_small
    image_mask = {"IMAGE": rgb, "MASK": np.ones(rgb.shape[:2], np.uint8)}
    cases = [
        ("elements_partition", {"IMAGE": rgb, "GRID": scalar(256, np.int32)}, None, "GRID"),  # 23 GB in-process
        ("elements_partition", {"IMAGE": rgb, "BETA": scalar(np.nan, np.float32)}, None, "BETA"),
        ("elements_partition", {"IMAGE": rgb}, {"resolution": 4096}, "RESOLUTION"),
        ("segment", {"IMAGE": np.zeros((9000, 1, 3), np.uint8), "POINTS": np.zeros((1, 2), np.float32)}, None, "IMAGE"),
        ("segment", {"IMAGE": rgb, "POINTS": np.ones((65, 2), np.float32)}, None, "POINTS"),
        ("inpaint", {**image_mask, "GUIDANCE": scalar(np.nan, np.float32)}, {"steps": 1}, "GUIDANCE"),
        ("inpaint", {**image_mask, "GUIDANCE": scalar(np.inf, np.float32)}, {"steps": 1}, "GUIDANCE"),
        ("inpaint", image_mask, {"steps": 1000}, "STEPS"),
        ("inpaint", image_mask, {"steps": 1, "resolution": 2048}, "RESOLUTION"),  # a 3072x2048 canvas
        ("reposition", {**image_mask, "MOVE": np.array([np.nan, 0], np.float32)}, {"steps": 1}, "MOVE"),
    ]
    render = {"FEATURES": np.zeros((3, 32), np.float32), "CENTROIDS": np.full((3, 2), 8, np.float32),
              "SIZES": np.full((3, 2), 4, np.float32), "ALIVE": np.ones(3, np.uint8)}
    cases += [
        ("elements_render", {**render, "IMAGE_SIZE": np.array([100_000, 100_000], np.int32)}, {"steps": 1},
         "IMAGE_SIZE"),
        ("elements_render", {**render, "IMAGE_SIZE": np.array([64, 64], np.int32),
                             "WORKING_SIZE": np.array([4096, 4096], np.int32)}, {"steps": 1}, "WORKING_SIZE"),
        ("elements_render", {**render, "IMAGE_SIZE": np.array([64, 64], np.int32),
                             "CENTROIDS": np.full((3, 2), np.nan, np.float32)}, {"steps": 1}, "CENTROIDS"),
    ]
    for model, inputs, parameters, name in cases:
        t0 = time.perf_counter()
        message = _error(clients, protocol, model, inputs, parameters)
        assert name in message and "internal error" not in message, (model, name, message)
        assert time.perf_counter() - t0 < 5.0, (model, name)
    assert server.alive() and server.ready()


# ---------------------------------------------------------------------- engine models
def test_engine_configs_load_until_the_missing_backend(clients, engines_repository):
    """Triton parses each generated config and resolves its platform to the onnxruntime backend; only the
    backend library is missing from this bundle. A config it cannot parse fails earlier, differently."""
    for name in ENGINES:
        with pytest.raises(InferenceServerException) as e:
            clients["http"].load_model(name)
        assert "unable to find backend library for backend 'onnxruntime'" in str(e.value), (name, str(e.value))
    with pytest.raises(InferenceServerException) as e:
        clients["http"].load_model("broken_config")
    assert "onnxruntime" not in str(e.value) and "broken_config" in str(e.value)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_engine_configs_serve_the_exported_graphs(clients, protocol, engines_repository):
    """Each engine's generated config, served over its exported graph (ONNX Runtime in a Python model):
    Triton accepts requests at dynamic sizes other than the trace's and the results are ONNX Runtime's."""
    import onnxruntime as ort

    rng = np.random.default_rng(11)
    cases = {
        # batch 2 (Triton's batch dimension) at a latent size the export did not trace
        "vae_decoder": {"latent": rng.standard_normal((2, 4, 6, 10)).astype(np.float32)},
        "sam_mask_decoder": {
            "image_embeddings": rng.standard_normal((1, 32, 16, 16)).astype(np.float32),
            "point_coords": (rng.random((1, 3, 2)) * 200).astype(np.float32),
            "point_labels": np.array([[1, 0, 1]], np.float32), "mask_input": np.zeros((1, 1, 64, 64), np.float32),
            "has_mask_input": np.zeros(1, np.float32), "orig_im_size": np.array([90, 140], np.int64)},
    }
    for name, feed in cases.items():
        session = ort.InferenceSession(str(engines_repository / name / "1" / "model.onnx"),
                                       providers=["CPUExecutionProvider"])
        expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        served = infer(clients, protocol, f"{name}{ORT_SUFFIX}", feed)
        assert set(served) == set(expected), name
        for key, value in expected.items():
            assert served[key].shape == value.shape, (name, key)
            # the same graph run by the same ONNX Runtime on the same CPU: equal up to threading order
            np.testing.assert_allclose(served[key], value, rtol=1e-5, atol=1e-5, err_msg=f"{name}.{key}")
    # a shape the spec does not allow is refused by Triton from the config alone
    bad = {"latent": rng.standard_normal((1, 3, 6, 10)).astype(np.float32)}
    assert "latent" in _error(clients, protocol, f"vae_decoder{ORT_SUFFIX}", bad)


def test_engine_configs_match_the_exported_graphs(engines_repository):
    """The exported ONNX graph is the oracle for its config: names, element types, static sizes, -1 where
    the graph has a symbolic axis (after Triton's batch dimension, when there is one)."""
    import onnx
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    from tritonclient.utils import np_to_triton_dtype

    for name in ENGINES:
        cfg = text_format.Parse((engines_repository / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        graph = onnx.load(engines_repository / name / "1" / "model.onnx", load_external_data=False).graph
        skip = 1 if cfg.max_batch_size else 0
        for declared, values in ((cfg.input, graph.input), (cfg.output, graph.output)):
            by_name = {v.name: v.type.tensor_type for v in values}
            assert [t.name for t in declared] == [v.name for v in values if v.name in by_name]
            for t in declared:
                dims = by_name[t.name].shape.dim
                if skip:
                    assert not dims[0].HasField("dim_value"), (name, t.name)  # the batch axis is symbolic
                graph_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in dims[skip:]] or [1]
                if declared is cfg.input:  # what a request must look like: exactly the graph's
                    assert list(t.dims) == graph_dims, (name, t.name)
                else:  # the exporter may leave output sizes symbolic that the spec knows (SAM's 4 masks)
                    assert len(t.dims) == len(graph_dims), (name, t.name)
                    assert all(g in (-1, d) for d, g in zip(t.dims, graph_dims)), (name, t.name, list(t.dims))
                np_type = onnx.helper.tensor_dtype_to_np_dtype(by_name[t.name].elem_type)
                assert model_config_pb2.DataType.Name(t.data_type) == "TYPE_" + np_to_triton_dtype(np_type)


def test_bls_segment_calls_the_served_engine(clients, engines_repository, tiny_weights, photo_small):
    """segment_bls runs SAM's mask decoder as a BLS request to the served engine model: its mask equals the
    same mix in-process (torch image encoder, ONNX Runtime decoder), and the engine model counts the call."""
    from editrt.runtime.engines import OrtEngine
    from editrt.runtime.reposition import RepositionPipeline

    rgb, _ = photo_small
    pipe = RepositionPipeline.from_pretrained(tiny_weights)
    decoder = engines_repository / "sam_mask_decoder" / "1" / "model.onnx"
    pipe.engines["sam_mask_decoder"] = OrtEngine(pipe.engines["sam_mask_decoder"].spec, decoder)
    points = np.array([[60, 50], [150, 20]], np.float32)
    expected = pipe.segment(rgb, points=points.tolist(), labels=[1, 0])

    def calls():
        stats = clients["http"].get_inference_statistics(f"sam_mask_decoder{ORT_SUFFIX}")
        return stats["model_stats"][0]["inference_count"]

    before = calls()
    out = infer(clients, "grpc", "segment_bls", {"IMAGE": rgb, "POINTS": points, "LABELS": np.array([1, 0], np.int32)})
    assert calls() == before + 1
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(out["MASK"], np.where(expected, 255, 0).astype(np.uint8))


def _group_members(pgid: int) -> list[int]:
    """Live processes of a process group (from /proc: pid, then pgrp as the 5th field of stat)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_stop_ends_the_server_and_its_model_stubs(engines_repository, tmp_path):
    _bundle_or_skip()
    one = TritonServer([engines_repository], [f"vae_decoder{ORT_SUFFIX}"], tmp_path / "tritonserver.log")
    try:
        one.start()
        pgid = os.getpgid(one.process.pid)
        assert len(_group_members(pgid)) >= 2, "the server and its model's stub"
    finally:
        one.stop()
    assert _group_members(pgid) == [] and not one.alive()


@pytest.mark.gpu
def test_cuda_repository_serves_on_the_gpu(tiny_weights, photo_small, tmp_path):
    """Exported with device cuda: the segment model runs on a KIND_GPU instance (cuda:0, fp16 by default)
    and answers what the same pipeline on cuda:0 computes in this process."""
    from editrt.export.triton import write_model_repository
    from editrt.runtime.reposition import RepositionPipeline

    _bundle_or_skip()
    rgb, _ = photo_small
    repo = write_model_repository(tiny_weights, tmp_path / "repo", components="segment", device="cuda")
    points = np.array([[60, 50]], np.float32)
    expected = RepositionPipeline.from_pretrained(tiny_weights, device="cuda:0", dtype="fp16").segment(
        rgb, points=points.tolist())
    one = TritonServer([repo], ["segment"], tmp_path / "tritonserver.log")
    try:
        one.start()
        client = grpc.InferenceServerClient(one.grpc_url)
        out = infer({"grpc": client}, "grpc", "segment", {"IMAGE": rgb, "POINTS": points})
        client.close()
    finally:
        one.stop()
    assert "(GPU device 0)" in one.log_path.read_text(errors="replace")
    np.testing.assert_array_equal(out["MASK"], np.where(expected, 255, 0).astype(np.uint8))


def test_repository_layout_and_readme(repository, engines_repository, tiny_weights):
    meta = json.loads((repository / "editrt_repository.json").read_text())
    assert meta["pipeline_models"] == PIPELINES and meta["engine_models"] == [] and not meta["bls"]
    assert json.loads((engines_repository / "editrt_repository.json").read_text())["engine_models"] == ENGINES
    readme = (repository / "README.md").read_text()
    for name in PIPELINES:
        assert f"`{name}`" in readme
    for name in ENGINES:
        assert f"`{name}`" in (engines_repository / "README.md").read_text()
        assert (engines_repository / name / "1" / "model.onnx").is_file()
    assert "bls" not in (repository / "segment" / "config.pbtxt").read_text()
    assert str(Path(tiny_weights).resolve()) in (repository / "segment" / "config.pbtxt").read_text()
