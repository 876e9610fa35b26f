"""The metrics equal the libraries' own on the same inputs: scikit-image (PSNR, SSIM), lpips.LPIPS loading
its backbone through torchvision's own path, torchmetrics' FID loading its Inception through torch-fidelity's
own path; both on random backbones saved where those loaders look (a temporary torch.hub cache)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from editrt.errors import EditError
from editrt.eval.metrics import ImageMetrics, SetFid, pixel_metrics


@pytest.fixture(scope="module")
def pair():
    """A real photo and a degraded copy (blur, noise, a shifted patch)."""
    from scipy import ndimage

    target = data.astronaut()[100:260, 120:320]
    rng = np.random.default_rng(0)
    pred = ndimage.uniform_filter(target.astype(np.float32), size=(3, 3, 1)) + rng.normal(0, 6, target.shape)
    pred[40:80, 50:110] = target[45:85, 40:100]
    return np.clip(pred, 0, 255).round().astype(np.uint8), target


def test_psnr_ssim_mse_equal_scikit_image_and_the_definitions(pair):
    pred, target = pair
    m = pixel_metrics(pred, target)
    mse = np.mean((pred.astype(np.float64) - target.astype(np.float64)) ** 2)
    assert m["mse"] == pytest.approx(mse, rel=1e-12)
    assert m["psnr"] == pytest.approx(10 * np.log10(255.0 ** 2 / mse), rel=1e-12)
    assert m["psnr"] == pytest.approx(peak_signal_noise_ratio(target, pred, data_range=255), rel=1e-12)
    # Wang et al.'s settings (what the module documents), per channel
    ssim = structural_similarity(target, pred, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    assert m["ssim"] == pytest.approx(ssim, rel=1e-12)


def test_region_metrics_are_over_the_mask_pixels_only(pair):
    pred, target = pair
    region = np.zeros(target.shape[:2], bool)
    region[30:90, 40:120] = True
    m = pixel_metrics(pred, target, region)
    diff = (pred.astype(np.float64) - target.astype(np.float64))[region]
    assert m["mse"] == pytest.approx(np.mean(diff ** 2), rel=1e-12)
    assert m["psnr"] == pytest.approx(10 * np.log10(255.0 ** 2 / np.mean(diff ** 2)), rel=1e-12)
    _, ssim_map = structural_similarity(target, pred, channel_axis=2, data_range=255, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False, full=True)
    assert m["ssim"] == pytest.approx(ssim_map[30:90, 40:120].mean(), rel=1e-12)
    # pixels outside the region do not count for PSNR and MSE (SSIM's windows reach across the border)
    changed = pred.copy()
    changed[~region] = 0
    outside_changed = pixel_metrics(changed, target, region)
    assert (outside_changed["psnr"], outside_changed["mse"]) == (m["psnr"], m["mse"])


def test_identical_images_psnr_is_inf_and_mismatches_are_one_line(pair):
    _, target = pair
    assert pixel_metrics(target, target) == {"psnr": float("inf"), "ssim": pytest.approx(1.0), "mse": 0.0}
    with pytest.raises(EditError, match="expected two uint8 RGB images of one size"):
        pixel_metrics(target[:-1], target)
    with pytest.raises(EditError, match="expected a non-empty mask"):
        pixel_metrics(target, target, np.zeros(target.shape[:2], bool))


def test_lpips_equals_lpips_package_with_torchvision_loading_the_same_backbone(pair, alexnet_file, torch_home):
    import lpips

    pred, target = pair
    # the library's own path: lpips.LPIPS() -> torchvision alexnet(pretrained) -> torch.hub's cached file
    shutil.copy(alexnet_file, torch_home / alexnet_file.name)
    oracle = lpips.LPIPS(net="alex", version="0.1", verbose=False)
    to = lambda rgb: torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    expected = oracle(to(pred), to(target)).item()
    ours = ImageMetrics.create(str(alexnet_file))(pred, target)["lpips"]
    assert ours == pytest.approx(expected, rel=1e-6, abs=1e-7)
    # without an explicit file, the hub cache is where it looks
    assert ImageMetrics.create(None)(pred, target)["lpips"] == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_without_weights_lpips_and_fid_are_skipped_and_say_why(pair, torch_home):
    pred, target = pair
    metrics = ImageMetrics.create(None)
    assert "lpips" not in metrics(pred, target)
    assert "--lpips-weights" in metrics.skipped["lpips"]
    fid = SetFid(None)
    fid.add(pred, target)
    assert fid.result() is None and "--fid-weights" in fid.skipped


def test_bad_weights_files_are_one_line_naming_them(tmp_path, torch_home):
    bad = tmp_path / "alexnet.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(EditError, match=r"--lpips-weights .*alexnet.pth: not a torchvision AlexNet state dict"):
        ImageMetrics.create(str(bad))
    with pytest.raises(EditError, match=r"--lpips-weights .*nothing.pth: no such file"):
        ImageMetrics.create(str(tmp_path / "nothing.pth"))
    junk = tmp_path / "inception.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(EditError, match=r"--fid-weights .*inception.pth: cannot read it as a PyTorch state dict"):
        SetFid(str(junk))
    torch.save({"fc.weight": torch.zeros(1)}, junk)
    with pytest.raises(EditError, match=r"--fid-weights .*inception.pth: not torch-fidelity's Inception state dict"):
        SetFid(str(junk))


def test_fid_equals_torchmetrics_with_torch_fidelity_loading_the_same_inception(inception_file, torch_home):
    from torchmetrics.image.fid import FrechetInceptionDistance

    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    targets = [np.ascontiguousarray(p[:120, :160]) for p in photos]
    preds = [np.ascontiguousarray(p[40:160, 60:220]) for p in photos]
    # the first block's 64 features: the same code path as the standard 2048 at a 50th of the CPU time
    ours = SetFid(str(inception_file), features=64)
    for p, t in zip(preds, targets):
        ours.add(p, t)
    value = ours.result()
    # the library's own path: no weights path -> torch-fidelity's download location, i.e. the hub cache
    shutil.copy(inception_file, torch_home / inception_file.name)
    oracle = FrechetInceptionDistance(feature=64, antialias=False)
    oracle.update(torch.from_numpy(np.stack(targets)).permute(0, 3, 1, 2), real=True)
    oracle.update(torch.from_numpy(np.stack(preds)).permute(0, 3, 1, 2), real=False)
    expected = oracle.compute().item()
    assert np.isfinite(expected) and expected > 0
    assert value == pytest.approx(expected, rel=1e-4)


def test_pixel_metrics_refuse_what_they_would_score_wrong(pair):
    """The data range is 255: a float image (in [0, 1] or not) is refused naming the prediction, as are a size
    mismatch and an empty region."""
    pred, target = pair[:2]
    for bad_pred, bad_target in ((pred.astype(np.float32) / 255, target), (pred, target.astype(np.float64)),
                                 (pred[:-1], target)):
        with pytest.raises(EditError) as e:
            pixel_metrics(bad_pred, bad_target)
        assert e.value.field == "prediction"
    with pytest.raises(EditError) as e:
        pixel_metrics(pred, target, np.zeros(pred.shape[:2], bool))
    assert e.value.field == "region"
