"""The training tests' dataset: 6 photographs from scikit-image, each with two object masks (an ellipse
and a box), written in the plain layout."""
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
SIZE = (40, 56)  # (H, W): small, not square, so the crop draws matter


def object_masks(size_hw, k: int) -> list[np.ndarray]:
    """An ellipse and a box that do not overlap, placed by the image number k."""
    h, w = size_hw
    y, x = np.ogrid[:h, :w]
    cy, cx = h // 3 + k % 3, w // 4 + k
    ellipse = ((y - cy) / 7.0) ** 2 + ((x - cx) / 9.0) ** 2 <= 1.0
    box = np.zeros((h, w), bool)
    box[h - 14 - k % 2: h - 4, w - 16: w - 5 + k % 3] = True
    return [ellipse, box]


def write_plain_dataset(folder: Path, size_hw=SIZE, photos=PHOTOS) -> Path:
    from skimage import data

    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for k, name in enumerate(photos):
        rgb = getattr(data, name)()
        image = Image.fromarray(rgb).convert("RGB").resize((size_hw[1], size_hw[0]), Image.LANCZOS)
        image.save(folder / "images" / f"{name}.{'png' if k % 2 else 'jpg'}")
        for j, m in enumerate(object_masks(size_hw, k)):
            Image.fromarray(m.astype(np.uint8) * 255).save(folder / "masks" / f"{name}_{j}.png")
    return folder


def write_iharmony_dataset(folder: Path, size_hw=SIZE, photos=PHOTOS[:4]) -> Path:
    """iHarmony4's layout: each photo is the real image; its composite has the ellipse's colours shifted."""
    from skimage import data

    for sub in ("composite_images", "masks", "real_images"):
        (folder / sub).mkdir(parents=True)
    names = []
    for k, name in enumerate(photos):
        rgb = np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB").resize((size_hw[1], size_hw[0])))
        mask = object_masks(size_hw, k)[0]
        composite = rgb.astype(np.int16)
        composite[mask] = np.clip(composite[mask] * np.array([1.3, 0.8, 0.6]) + 20, 0, 255)
        stem = name.replace("_", "")  # NAME_K_J with K = 1, J = 1
        Image.fromarray(rgb).save(folder / "real_images" / f"{stem}.jpg", quality=95)
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{stem}_1.png")
        Image.fromarray(composite.astype(np.uint8)).save(folder / "composite_images" / f"{stem}_1_1.jpg", quality=95)
        names.append(f"{stem}_1_1.jpg")
    (folder / "HTest_train.txt").write_text("\n".join(names) + "\n")
    return folder
