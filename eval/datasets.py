"""Evaluation datasets from local folders, each in its release's own layout. A bad layout is one InputError
naming the file (field "root"), raised before any network runs.

* ReS (SEELE's benchmark, github.com/Yikai-Wang/ReS): ROOT/p{i}_1.jpg, p{i}_2.jpg (the two views of pair i),
  p{i}_{1,2}_mask.png (the visible subject) and, where the subject is occluded, p{i}_{1,2}_amodal.png (the
  whole subject). Masks may be stored smaller than their image (long side <= 1024) and are resized to it
  (nearest). Each pair gives a task in each direction, except that an occluded view (amodal != visible)
  is only ever a source. The move is the difference of the subject centres (the source's amodal centre
  when occluded: where the whole subject is); the completion mask is the source's amodal mask moved to the
  target minus the moved visible mask.
* iHarmony4 test set: ROOT (or each sub-dataset folder under it) with composite_images/NAME_K_J.jpg,
  masks/NAME_K.png, real_images/NAME.jpg and a *_test.txt listing the composites.
* Places2-style inpainting: ROOT/images/*.{jpg,png} with masks from ROOT/masks/NAME.png (`files`) or a
  centred box (`center`, a quarter of the area).
* plain images: every .jpg/.jpeg/.png in a folder, by name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from editrt.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ---------------------------------------------------------------------- files
def _bad(path: Path, expected: str) -> InputError:
    return InputError(f"{path}: {expected}", field="root")


def read_rgb(path: Path) -> np.ndarray:
    """uint8 RGB, turned upright by its EXIF orientation (phone photos, as the ReS loader does)."""
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except FileNotFoundError:
        raise _bad(path, "missing; expected an image") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise _bad(path, f"cannot read it as an image ({type(e).__name__})") from None


def upright_size(path: Path) -> tuple[int, int]:
    """(W, H) as `read_rgb` returns the image, from its header (EXIF orientations 5-8 swap the sides)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise _bad(path, f"cannot read it as an image ({type(e).__name__})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def read_mask(path: Path, size_hw: tuple[int, int]) -> np.ndarray:
    """bool [H, W] (> 127 inside), resized (nearest) to `size_hw` when stored at another size of the same shape."""
    try:
        with Image.open(path) as im:
            grey = im.convert("L")
    except FileNotFoundError:
        raise _bad(path, "missing; expected a mask image") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise _bad(path, f"cannot read it as a mask image ({type(e).__name__})") from None
    w, h = grey.size
    if (h, w) != tuple(size_hw):
        if abs(w / h - size_hw[1] / size_hw[0]) > 0.02:  # a smaller copy keeps the aspect; another image does not
            raise _bad(path, f"size {w}x{h} does not have the aspect of its image ({size_hw[1]}x{size_hw[0]})")
        grey = grey.resize((size_hw[1], size_hw[0]), Image.NEAREST)
    mask = np.asarray(grey) > 127
    if not mask.any():
        raise _bad(path, "is empty; expected the subject's pixels")
    return mask


def resize_short_side(rgb: np.ndarray, short_side: int | None) -> np.ndarray:
    """Short side = `short_side` (the other side truncated, bicubic, as the ReS loader); None keeps the size."""
    if short_side is None:
        return rgb
    h, w = rgb.shape[:2]
    factor = short_side / min(h, w)
    size = (int(w * factor), int(h * factor))
    return rgb if size == (w, h) else np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))


def image_files(folder: Path, what: str = "images") -> dict[str, Path]:
    """name (stem) -> file of every image in `folder`."""
    if not folder.is_dir():
        raise _bad(folder, f"missing; expected a folder of {what}")
    files = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in files:
                raise _bad(path, f"a second image named {path.stem!r} ({files[path.stem].name}); expected one per name")
            files[path.stem] = path
    if not files:
        raise _bad(folder, f"no .jpg/.jpeg/.png files; expected {what}")
    return files


# ---------------------------------------------------------------------- ReS
@dataclass
class ResView:
    """One view of a ReS pair at the evaluation size."""
    rgb: np.ndarray
    visible: np.ndarray  # bool [H, W]
    amodal: np.ndarray  # the whole subject; == visible when not occluded

    @property
    def occluded(self) -> bool:
        return bool((self.amodal != self.visible).any())


@dataclass
class ResTask:
    """One repositioning task: move the subject of `source` to where it is in `target`."""
    sample: str  # "p3"
    direction: str  # "1to2"
    source: np.ndarray
    subject: np.ndarray  # the source's visible subject mask
    move: tuple[int, int]  # (dx, dy) pixels
    complete: np.ndarray  # bool [H, W]; empty when nothing is to be completed
    target: np.ndarray


def subject_centre(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid of the largest 8-connected piece (the ReS loader takes its largest contour's)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = ndimage.sum_labels(mask, labels, index=range(1, count + 1))
    ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    return float(xs.mean()), float(ys.mean())


def shift_mask(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`mask` translated by (dx, dy) pixels; what leaves the image is dropped."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    ys, xs = ys + dy, xs + dx
    keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out[ys[keep], xs[keep]] = True
    return out


def _res_view(root: Path, i: int, v: int, short_side: int | None) -> ResView:
    rgb = resize_short_side(read_rgb(root / f"p{i}_{v}.jpg"), short_side)
    visible = read_mask(root / f"p{i}_{v}_mask.png", rgb.shape[:2])
    amodal_file = root / f"p{i}_{v}_amodal.png"
    amodal = read_mask(amodal_file, rgb.shape[:2]) | visible if amodal_file.exists() else visible
    return ResView(rgb, visible, amodal)


def res_task(sample: str, direction: str, source: ResView, target: ResView) -> ResTask:
    if source.rgb.shape != target.rgb.shape:
        raise InputError(f"{sample}: its two views differ in size ({source.rgb.shape[1]}x{source.rgb.shape[0]} and "
                         f"{target.rgb.shape[1]}x{target.rgb.shape[0]}); expected one size per pair", field="root")
    (sx, sy), (tx, ty) = subject_centre(source.amodal), subject_centre(target.visible)
    dx, dy = round(tx - sx), round(ty - sy)
    complete = shift_mask(source.amodal, dx, dy) & ~shift_mask(source.visible, dx, dy)
    return ResTask(sample, direction, source.rgb, source.visible, (dx, dy), complete, target.rgb)


def res_pair_numbers(root: Path) -> list[int]:
    """The pair numbers i of ROOT/p{i}_1.jpg, ascending; each must have its second view."""
    if not root.is_dir():
        raise _bad(root, "missing; expected the ReS folder (p{i}_1.jpg, p{i}_2.jpg, p{i}_{1,2}_mask.png)")
    numbers = sorted(int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"p(\d+)_1\.jpg", p.name)))
    if not numbers:
        raise _bad(root, "no p{i}_1.jpg; expected the ReS layout (p{i}_1.jpg, p{i}_2.jpg, p{i}_{1,2}_mask.png)")
    for i in numbers:
        if not (root / f"p{i}_2.jpg").is_file():
            raise _bad(root / f"p{i}_2.jpg", f"missing; expected the second view of pair p{i}")
    return numbers


def res_tasks(root: str | Path, short_side: int | None = 512, limit: int | None = None, log=None):
    """Yield the ReS tasks (pair order, 1to2 before 2to1), reading each pair when its turn comes; every
    file name is checked first. `log(line)` hears which views are occluded (and so only sources)."""
    root = Path(root)
    numbers = res_pair_numbers(root)
    for i in numbers:
        for v in (1, 2):
            if not (root / f"p{i}_{v}_mask.png").is_file():
                raise _bad(root / f"p{i}_{v}_mask.png", f"missing; expected the visible subject mask of p{i}_{v}.jpg")
    made = 0
    for i in numbers:
        views = {v: _res_view(root, i, v, short_side) for v in (1, 2)}
        for s, t in ((1, 2), (2, 1)):
            if limit is not None and made >= limit:
                return
            if views[t].occluded:
                if log:
                    log(f"p{i}_{t}: occluded subject; used only as a source (no {s}to{t} task)")
                continue
            made += 1
            yield res_task(f"p{i}", f"{s}to{t}", views[s], views[t])


# ---------------------------------------------------------------------- iHarmony4
@dataclass(frozen=True)
class HarmonySample:
    subset: str  # HAdobe5k, HCOCO, ... (the folder's name)
    composite: Path
    mask: Path
    real: Path


def iharmony_samples(root: str | Path) -> list[HarmonySample]:
    """The test composites of ROOT, or of every sub-dataset folder under it, in list order."""
    root = Path(root)
    folders = [root] if (root / "composite_images").is_dir() else \
        sorted(p for p in root.iterdir() if (p / "composite_images").is_dir()) if root.is_dir() else []
    if not folders:
        raise _bad(root, "no composite_images/ in it or its sub-folders; expected the iHarmony4 layout "
                   "(composite_images/, masks/, real_images/, *_test.txt)")
    samples = []
    for folder in folders:
        lists = sorted(folder.glob("*_test.txt"))
        if not lists:
            raise _bad(folder, "no *_test.txt; expected iHarmony4's list of test composites")
        for listing in lists:
            for line in filter(None, (s.strip() for s in listing.read_text().splitlines())):
                name = Path(line).name
                parts = Path(name).stem.rsplit("_", 2)
                if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
                    raise _bad(listing, f"line {line!r}: expected a composite named NAME_K_J.jpg")
                real = next((p for p in (folder / "real_images" / f"{parts[0]}{s}" for s in IMAGE_SUFFIXES)
                             if p.is_file()), folder / "real_images" / f"{parts[0]}.jpg")
                sample = HarmonySample(folder.name, folder / "composite_images" / name,
                                       folder / "masks" / f"{parts[0]}_{parts[1]}.png", real)
                for path in (sample.composite, sample.mask, sample.real):
                    if not path.is_file():
                        raise _bad(path, f"missing; listed (as {name}) in {listing.name}")
                samples.append(sample)
    if not samples:
        raise _bad(root, "the *_test.txt lists are empty; expected composite names, one a line")
    return samples


# ---------------------------------------------------------------------- Places2-style inpainting
MASK_PROTOCOLS = ("files", "center")


def inpaint_samples(root: str | Path, protocol: str) -> list[tuple[str, Path, Path | None]]:
    """(name, image, mask file or None) for ROOT/images/*; `files` needs ROOT/masks/NAME.png for each."""
    root = Path(root)
    if protocol not in MASK_PROTOCOLS:
        raise InputError(f"--mask-protocol {protocol!r}: expected one of {', '.join(MASK_PROTOCOLS)}",
                         field="mask_protocol")
    images = image_files(root / "images")
    if protocol == "center":
        return [(name, path, None) for name, path in images.items()]
    masks = root / "masks"
    if not masks.is_dir():
        raise _bad(masks, "missing; --mask-protocol files expects a mask NAME.png per image in it")
    samples = []
    for name, path in images.items():
        if not (masks / f"{name}.png").is_file():
            raise _bad(masks / f"{name}.png", f"missing; expected the mask of {path.name}")
        samples.append((name, path, masks / f"{name}.png"))
    return samples


def center_box(size_hw: tuple[int, int]) -> np.ndarray:
    """The centred box of half the height and half the width (a quarter of the area)."""
    h, w = size_hw
    mask = np.zeros((h, w), bool)
    mask[h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = True
    return mask
