"""Image-quality metrics from the well-kept libraries: scikit-image (PSNR, SSIM, MSE), lpips (LPIPS) and
torchmetrics on torch-fidelity's Inception (FID). Nothing here reimplements a metric.

Conventions (every eval row says which were used, `metric_settings()`):
* images are uint8 RGB [H, W, 3]; PSNR and MSE on the 0..255 scale (data range 255), as iHarmony4 and
  most inpainting papers report (EIE's Table 2 MSE is on 0..1: divide ours by 255^2);
* SSIM with Wang et al.'s settings (Gaussian window, sigma 1.5, population covariance), per channel, averaged;
* a region (bool [H, W]) restricts PSNR and MSE to its pixels and averages the SSIM map over it (fMSE of
  iHarmony4 is the MSE over the foreground);
* LPIPS v0.1 on AlexNet, inputs scaled to [-1, 1], whole image: the linear layers ship in the lpips wheel,
  the AlexNet backbone is read from a local file (torchvision's `alexnet-owt-7be5be79.pth`);
* FID on the 2048-d pool features of torch-fidelity's Inception (its `weights-inception-2015-12-05` file),
  resized to 299 with the original TF1 bilinear resize (torchmetrics `antialias=False`), over image sets.

Without weights a metric is skipped, never guessed: `skipped` maps its name to the reason.
"""
from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from editrt.errors import InputError, WeightsError

LPIPS_BACKBONE_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet, as torch.hub caches it
FID_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's, as torch.hub caches it
SSIM_SETTINGS = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def metric_settings() -> dict:
    return {"data_range": 255, "ssim": {"window": "gaussian", "sigma": 1.5, "sample_covariance": False},
            "lpips": {"net": "alex", "version": "0.1"}, "fid": {"features": 2048, "resize": "tf1-bilinear"}}


def hub_file(name: str) -> Path:
    """Where torch.hub keeps a downloaded checkpoint (the libraries' own cache; nothing is downloaded here)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / name


def resolve_weights(given: str | None, cached_name: str, option: str) -> tuple[Path | None, str | None]:
    """(the weights file, None) or (None, why the metric is skipped). A given path must exist."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise InputError(f"{option} {given}: no such file; expected a PyTorch state dict", field=option)
        return path, None
    cached = hub_file(cached_name)
    if cached.is_file():
        return cached, None
    return None, f"no weights: give {option} FILE (or place {cached_name} in {cached.parent})"


def _check_pair(pred: np.ndarray, target: np.ndarray, region: np.ndarray | None) -> None:
    if pred.shape != target.shape or pred.ndim != 3 or pred.shape[2] != 3 or pred.dtype != np.uint8 \
            or target.dtype != np.uint8:  # the metrics' data range is 255: a float image would be scored wrong
        raise InputError(f"prediction {list(pred.shape)} {pred.dtype} and target {list(target.shape)} {target.dtype}: expected two uint8 "
                         "RGB images of one size", field="prediction")
    if region is not None and (region.shape != pred.shape[:2] or not region.any()):
        raise InputError(f"region {list(region.shape)}: expected a non-empty mask of the image size "
                         f"{list(pred.shape[:2])}", field="region")


def pixel_metrics(pred: np.ndarray, target: np.ndarray, region: np.ndarray | None = None) -> dict:
    """{'psnr', 'ssim', 'mse'} of uint8 RGB images, over the whole image or the pixels of `region`."""
    from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

    _check_pair(pred, target, region)
    if region is None:
        ssim = structural_similarity(target, pred, channel_axis=2, data_range=255, **SSIM_SETTINGS)
        a, b = target, pred
    else:
        _, ssim_map = structural_similarity(target, pred, channel_axis=2, data_range=255, full=True,
                                            **SSIM_SETTINGS)
        ssim = ssim_map[region].mean()
        a, b = target[region], pred[region]
    mse = mean_squared_error(a, b)
    # identical images: skimage returns inf (and warns); JSON has no inf, so the row says it in words
    psnr = peak_signal_noise_ratio(a, b, data_range=255) if mse > 0 else float("inf")
    return {"psnr": float(psnr), "ssim": float(ssim), "mse": float(mse)}


def _read_state_dict(path: Path, option: str):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, struct.error) as e:
        raise WeightsError(f"{option} {path}: cannot read it as a PyTorch state dict ({type(e).__name__})",
                           field=option.lstrip("-").replace("-", "_")) from None


def load_lpips(backbone_file: Path, device: str = "cpu"):
    """lpips.LPIPS (v0.1, AlexNet) with its linear layers from the wheel and the backbone from `backbone_file`
    (a torchvision AlexNet state dict): the same network `lpips.LPIPS()` builds after torchvision's download."""
    import warnings

    import lpips

    state = _read_state_dict(backbone_file, "--lpips-weights")
    with warnings.catch_warnings():  # lpips asks torchvision for `pretrained=False` in the deprecated spelling
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=True, net="alex", version="0.1", pnet_rand=True, verbose=False)
    # lpips' AlexNet keeps torchvision's `features.{i}` layers under their own index i inside slice1..slice5
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")} \
        if isinstance(state, dict) else {}
    backbone = {}
    for key in model.net.state_dict():
        layer = key.split(".", 1)[1]  # "slice2.3.weight" -> "3.weight"
        if layer not in features:
            raise WeightsError(f"--lpips-weights {backbone_file}: not a torchvision AlexNet state dict (no "
                               f"features.{layer})", field="lpips_weights")
        backbone[key] = features[layer]
    try:
        model.net.load_state_dict(backbone)
    except RuntimeError as e:
        raise WeightsError(f"--lpips-weights {backbone_file}: not a torchvision AlexNet state dict "
                           f"({' '.join(str(e).split())[:200]})", field="lpips_weights") from None
    return model.eval().to(device)


def lpips_distance(model, pred: np.ndarray, target: np.ndarray) -> float:
    import torch

    def tensor(rgb):
        return torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)

    device = next(model.parameters()).device
    with torch.no_grad():
        return float(model(tensor(pred).to(device), tensor(target).to(device)).item())


@dataclass
class ImageMetrics:
    """Per-pair metrics with the LPIPS network loaded once; `skipped` names what could not be computed."""
    lpips_model: object = None
    skipped: dict = field(default_factory=dict)

    @classmethod
    def create(cls, lpips_weights: str | None = None, device: str = "cpu") -> ImageMetrics:
        path, why = resolve_weights(lpips_weights, LPIPS_BACKBONE_FILE, "--lpips-weights")
        if path is None:
            return cls(None, {"lpips": why})
        return cls(load_lpips(path, device))

    def __call__(self, pred: np.ndarray, target: np.ndarray, region: np.ndarray | None = None) -> dict:
        values = pixel_metrics(pred, target, region)
        if self.lpips_model is not None:
            values["lpips"] = lpips_distance(self.lpips_model, pred, target)  # whole image, even with a region
        return values


class SetFid:
    """FID between the predictions and the targets of a whole run (torchmetrics; each image goes in alone, so
    any sizes mix), accumulated sample by sample; `skipped` says why there is none. `features`: the Inception
    layer (2048: the standard pool features; 64, 192, 768 are earlier, cheaper blocks)."""

    def __init__(self, fid_weights: str | None = None, device: str = "cpu", features: int = 2048):
        path, self.skipped = resolve_weights(fid_weights, FID_INCEPTION_FILE, "--fid-weights")
        self.metric, self.device, self.pairs = None, device, 0
        if path is not None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            # read here first: torch-fidelity's own loader reports junk with whatever its unpickler raises
            state = _read_state_dict(path, "--fid-weights")
            if not isinstance(state, dict) or "Conv2d_1a_3x3.conv.weight" not in state:
                raise WeightsError(f"--fid-weights {path}: not torch-fidelity's Inception state dict (no "
                                   "Conv2d_1a_3x3.conv.weight)", field="fid_weights")
            del state
            try:
                self.metric = FrechetInceptionDistance(feature=features, normalize=False, antialias=False,
                                                       feature_extractor_weights_path=str(path)).to(device)
            except RuntimeError as e:  # load_state_dict: missing or mis-shaped tensors
                raise WeightsError(f"--fid-weights {path}: not torch-fidelity's Inception state dict "
                                   f"({' '.join(str(e).split())[:200]})", field="fid_weights") from None

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        if self.metric is None:
            return
        import torch

        for rgb, real in ((target, True), (pred, False)):
            self.metric.update(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].to(self.device),
                               real=real)
        self.pairs += 1

    def result(self) -> float | None:
        """The FID, or None with `skipped` set (no weights, or fewer than 2 pairs: no covariance)."""
        if self.metric is None:
            return None
        if self.pairs < 2:
            self.skipped = f"needs at least 2 evaluated pairs, got {self.pairs}"
            return None
        return float(self.metric.compute().item())
