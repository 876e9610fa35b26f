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
