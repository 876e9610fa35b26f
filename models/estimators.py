"""The repositioning editor's optional estimators, depth (models/depth.py) and matting (models/matting.py),
as networks: which a weights folder has, the config their specs read, and their engine modules.

Published weights folders may lack `depth/` or `matting/`: a network is present when its folder has a
config.json. Everything that builds specs, engines or exports for them starts here.
"""
from __future__ import annotations

import torch

from editrt.models.files import read_json

# network name -> (the WeightsLayout attribute of its folder, its config section name in editrt/configs/*.json)
ESTIMATOR_FOLDERS = {"depth_estimator": ("depth", "depth"), "matting": ("matting", "matting")}


def estimator_networks_present(layout) -> list[str]:
    """Names of the estimator networks whose folder has a config.json."""
    return [n for n, (attr, _) in ESTIMATOR_FOLDERS.items() if (getattr(layout, attr) / "config.json").is_file()]


def estimator_network_config(layout, names=None) -> dict:
    """What export/specs.py needs of them, in the configs' shape: {"depth": {"model": <DPTConfig dict>},
    "matting": {"model": <VitMatteConfig dict>}}. `names`: these (WeightsError when missing) or, None, all present."""
    names = estimator_networks_present(layout) if names is None else names
    config = {}
    for name in names:
        attr, section = ESTIMATOR_FOLDERS[name]
        what = "the depth model's config (DPTForDepthEstimation)" if name == "depth_estimator" else \
            "the matting model's config (VitMatteForImageMatting)"
        config[section] = {"model": read_json(getattr(layout, attr) / "config.json", what)}
    return config


def estimator_networks(layout, names, device="cpu", dtype=torch.float32) -> dict[str, torch.nn.Module]:
    """name -> engine module (DepthNet / MattingNet over the loaded transformers model) for `names`."""
    from editrt.models.depth import DepthNet, load_depth_model
    from editrt.models.matting import MattingNet, load_matting_model

    nets = {}
    if "depth_estimator" in names:
        nets["depth_estimator"] = DepthNet(load_depth_model(layout.depth, dtype)).to(device)
    if "matting" in names:
        nets["matting"] = MattingNet(load_matting_model(layout.matting, dtype)).to(device)
    return nets
