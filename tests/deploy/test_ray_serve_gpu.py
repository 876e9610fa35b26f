"""The Ray Serve deployment on a GPU: a replica given `gpus_per_replica=1` runs its pipelines on the
GPU Ray assigns it (seen as cuda inside the replica) and answers what the same pipelines answer
in this process on that GPU. Skipped without CUDA (tests/conftest.py)."""
from __future__ import annotations

import socket

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

from needs import need  # noqa: E402

need("ray.serve", "the deploy extra is not installed (pip install editrt[deploy])")
import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from test_ray_serve import SETTINGS, b64png, small_photo  # noqa: E402

from editrt.runtime.server import Settings  # noqa: E402
from editrt.runtime.server.loading import ServeConfig  # noqa: E402
from editrt.runtime.server.ray_deployment import RayOptions, build_app  # noqa: E402


@pytest.fixture(scope="module")
def gpu_cluster(tiny_weights):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = RayOptions(replicas=1, gpus_per_replica=1, cpus_per_replica=1)
        serve.run(build_app(options, ServeConfig(weights=str(tiny_weights), editors=("reposition",)), Settings(**SETTINGS)),
                  name="editrt", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_a_gpu_replica_runs_on_its_gpu_and_matches_this_process(gpu_cluster, tiny_weights):
    from io import BytesIO

    from PIL import Image

    from editrt.runtime.reposition import RepositionPipeline

    photo = small_photo()
    with httpx.Client(base_url=gpu_cluster, timeout=300) as client:
        ready = client.get("/readyz").json()
        assert ready["device"].startswith("cuda"), ready
        r = client.post("/v1/segment", json={"image": b64png(photo), "points": [[48, 30]]})
        assert r.status_code == 200, r.text
    local = RepositionPipeline.from_pretrained(tiny_weights, device="cuda", dtype="fp16")  # `editrt serve`'s default
    expected = local.segment(photo, points=[[48, 30]])
    got = np.asarray(Image.open(BytesIO(r.content)).convert("L")) > 127
    # Same weights, same GPU kind, same dtype: the same mask (a mask is a threshold of logits, so
    # allow the few border pixels a different kernel choice may flip).
    assert (got != expected).mean() <= 0.002, (got != expected).mean()
