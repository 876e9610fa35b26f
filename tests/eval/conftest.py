"""Synthetic datasets in each release's exact layout, written by the tests, and random metric backbones saved
where the libraries' own loaders find them (torch.hub's cache under a temporary TORCH_HOME)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_layouts import RES_SIZE, write_res_view
from PIL import Image


@pytest.fixture(scope="session")
def res_photo():
    from skimage import data

    return np.asarray(Image.fromarray(data.coffee()).resize(RES_SIZE[::-1], Image.BICUBIC))


@pytest.fixture
def res_root(tmp_path, res_photo):
    """Two pairs, no occluded view: 4 tasks."""
    root = tmp_path / "ReS"
    root.mkdir()
    write_res_view(root, 1, 1, res_photo, (24, 50, 24, 44))
    write_res_view(root, 1, 2, res_photo, (34, 60, 74, 94))
    write_res_view(root, 2, 1, res_photo, (74, 100, 100, 120))
    write_res_view(root, 2, 2, res_photo, (64, 90, 50, 70))
    return root


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch.hub cache: whatever a test puts in hub/checkpoints is what the libraries load."""
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home / "hub" / "checkpoints"


@pytest.fixture(scope="session")
def alexnet_file(tmp_path_factory):
    """A random torchvision AlexNet state dict, saved under the name torchvision downloads it as: He-scaled
    normal convolutions (what LPIPS reads), zero classifier (never read; zeros keep the fixture fast)."""
    from torchvision.models import alexnet

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in alexnet(weights=None).state_dict().items()}
    generator = torch.Generator().manual_seed(3)
    state = {}
    for key, shape in shapes.items():
        if key.startswith("features.") and key.endswith(".weight"):
            state[key] = torch.randn(shape, generator=generator) * (2.0 / shape[1:].numel()) ** 0.5
        elif key.startswith("features."):
            state[key] = torch.randn(shape, generator=generator) * 0.1
        else:
            state[key] = torch.zeros(shape)
    path = tmp_path_factory.mktemp("lpips") / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """A randomly initialised torch-fidelity Inception (the module FID runs), saved as torch-fidelity names it.

    Its constructor always loads weights (download or file): here it is built without loading any, once."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    class Fresh(tfi.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialisation
            return None

    original = tfi.load_state_dict_from_url
    tfi.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(4)
        module = Fresh("inception-v3-compat", ["2048"])
    finally:
        tfi.load_state_dict_from_url = original
    path = tmp_path_factory.mktemp("fid") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(module.state_dict(), path)
    return path
