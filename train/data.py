"""Training images with object masks, from local folders only (issue 24: no downloads).

Two layouts give the same records (`ObjectImage`: an image and its object masks):

* plain:  DIR/images/NAME.{jpg,jpeg,png} + DIR/masks/NAME_K.png (one binary mask per object, K = 0, 1, ...;
          nonzero = inside, as `editrt inpaint` reads masks)
* COCO:   --coco ANNOTATIONS.json --images DIR (MSCOCO instance annotations, the paper's data, App. A.2);
          polygons and RLE are decoded with pycocotools, the format's own library. Crowd regions and objects
          under `min_object_fraction` of the image are never picked, but still count as occupied (not
          background) when the remove generator looks for background.

`check_*` read every header (and the plain layout's masks) before any training starts: a bad dataset
(no images, missing masks, unreadable files, sizes that disagree, malformed annotations) is one
`InputError` naming the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from editrt.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class CocoObject:
    segmentation: object  # polygons [[x, y, ...], ...] or an RLE {"counts", "size"}
    pickable: bool  # not crowd, and large enough to be moved or completed


@dataclass
class ObjectImage:
    """One image and its objects: mask files (plain layout) or COCO annotations, decoded on demand."""
    path: Path
    size: tuple[int, int]  # (H, W)
    mask_paths: list[Path] = field(default_factory=list)
    coco_objects: list[CocoObject] = field(default_factory=list)

    def load_rgb(self) -> np.ndarray:
        with Image.open(self.path) as im:
            return np.asarray(im.convert("RGB"))

    def load_masks(self) -> tuple[list[np.ndarray], list[bool]]:
        """(every object's bool [H, W] mask, whether each may be picked)."""
        if self.mask_paths:
            return [_read_mask(p) for p in self.mask_paths], [True] * len(self.mask_paths)
        masks = [decode_segmentation(o.segmentation, self.size) for o in self.coco_objects]
        return masks, [o.pickable for o in self.coco_objects]


def _open_size(path: Path, what: str) -> tuple[int, int]:
    """(H, W) from the file's header, or an InputError naming it."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except FileNotFoundError:
        raise InputError(f"{path}: missing; expected {what}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read it as an image ({type(e).__name__}); expected {what}") from None


def _read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def check_plain(folder: str | Path) -> list[ObjectImage]:
    """The plain layout's images, each with at least one non-empty mask of its own size."""
    folder = Path(folder)
    images_dir, masks_dir = folder / "images", folder / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise InputError(f"{d}: missing; expected DIR/images/NAME.jpg|png and DIR/masks/NAME_K.png")
    images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if not images:
        raise InputError(f"{images_dir}: holds no .jpg or .png images")
    masks: dict[str, list[tuple[int, Path]]] = {name: [] for name in images}
    for p in sorted(masks_dir.iterdir()):
        name, sep, k = p.stem.rpartition("_")
        if p.suffix.lower() != ".png" or not sep or not k.isdigit():
            raise InputError(f"{p}: expected a mask named NAME_K.png (K a number) for images/NAME.jpg|png")
        if name not in masks:
            raise InputError(f"{p}: no image {images_dir / name}.jpg|png for this mask")
        masks[name].append((int(k), p))
    records = []
    for name, path in images.items():
        if not masks[name]:
            raise InputError(f"{path}: has no masks; expected at least one {masks_dir / name}_K.png")
        size = _open_size(path, "a training image")
        paths = [p for _, p in sorted(masks[name])]
        for p in paths:
            if _open_size(p, "a binary object mask") != size:
                h, w = _open_size(p, "a binary object mask")
                raise InputError(f"{p}: size {w}x{h} differs from its image {path.name} ({size[1]}x{size[0]})")
            if not _read_mask(p).any():
                raise InputError(f"{p}: is empty; expected an object mask (pixels > 127 inside)")
        records.append(ObjectImage(path, size, mask_paths=paths))
    return records


def _coco_segmentation_ok(seg) -> bool:
    if isinstance(seg, list):
        return len(seg) > 0 and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg)
    return isinstance(seg, dict) and "counts" in seg and "size" in seg


def check_coco(annotations: str | Path, images: str | Path, min_object_fraction: float = 0.01,
               log=lambda what: None) -> list[ObjectImage]:
    """COCO instance annotations: the images with at least one pickable object (others are skipped, logged)."""
    annotations, images = Path(annotations), Path(images)
    if not images.is_dir():
        raise InputError(f"--images {images}: no such folder; expected the folder of the annotated images")
    try:
        data = json.loads(annotations.read_text())
    except FileNotFoundError:
        raise InputError(f"--coco {annotations}: no such file; expected COCO instance annotations (JSON)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--coco {annotations}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise InputError(f"--coco {annotations}: expected COCO instance annotations (lists 'images' and 'annotations')")
    infos = {}
    for info in data["images"]:
        if not isinstance(info, dict) or not {"id", "file_name", "width", "height"} <= info.keys():
            raise InputError(f"--coco {annotations}: an image entry lacks id, file_name, width or height: {info!r:.80}")
        infos[info["id"]] = info
    objects: dict[object, list[CocoObject]] = {}
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or ann.get("image_id") not in infos \
                or not _coco_segmentation_ok(ann.get("segmentation")):
            ident = ann.get("id") if isinstance(ann, dict) else ann
            raise InputError(f"--coco {annotations}: annotation {ident!r} has no known image_id or no polygon/RLE "
                             "segmentation")
        info = infos[ann["image_id"]]
        area = float(ann.get("area", 0.0))
        pickable = not ann.get("iscrowd", 0) and area >= min_object_fraction * info["width"] * info["height"]
        objects.setdefault(ann["image_id"], []).append(CocoObject(ann["segmentation"], bool(pickable)))
    records, skipped = [], 0
    for image_id, info in infos.items():
        objs = objects.get(image_id, [])
        if not any(o.pickable for o in objs):
            skipped += 1
            continue
        path = images / info["file_name"]
        size = _open_size(path, f"the image of COCO image id {image_id}")
        if size != (info["height"], info["width"]):
            raise InputError(f"{path}: size {size[1]}x{size[0]} differs from {annotations.name}'s "
                             f"{info['width']}x{info['height']}")
        records.append(ObjectImage(path, size, coco_objects=objs))
    if skipped:
        log(f"{annotations}: {skipped} of {len(infos)} images have no object to pick (not crowd, at least "
            f"{min_object_fraction:g} of the image); skipped")
    if not records:
        raise InputError(f"--coco {annotations}: no image has an object to pick (not crowd, at least "
                         f"{min_object_fraction:g} of the image)")
    return records


def decode_segmentation(seg, size_hw: tuple[int, int]) -> np.ndarray:
    """A COCO polygon list or RLE (compressed or not) as bool [H, W], decoded by pycocotools."""
    from pycocotools import mask as coco_mask

    h, w = size_hw
    if isinstance(seg, list):
        rle = coco_mask.merge(coco_mask.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = coco_mask.frPyObjects(seg, h, w)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]}
    return coco_mask.decode(rle).astype(bool)


def split_train_val(records: list[ObjectImage], val_fraction: float, seed: int) -> tuple[list, list]:
    """A held-out validation set (the paper picks checkpoints by its loss): a seeded choice of whole images."""
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction {val_fraction}: expected a number in [0, 1)")
    n_val = 0 if val_fraction == 0 or len(records) < 2 else max(1, round(val_fraction * len(records)))
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5A11])).permutation(len(records))
    val = sorted(order[:n_val].tolist())
    chosen = set(val)
    return [r for i, r in enumerate(records) if i not in chosen], [records[i] for i in val]


@dataclass(frozen=True)
class HarmonyPair:
    """One iHarmony4 training pair: the composite (inharmonious), its foreground mask, the real image."""
    composite: Path
    mask: Path
    real: Path
    size: tuple[int, int]  # (H, W)

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(composite RGB, real RGB, bool mask)."""
        with Image.open(self.composite) as a, Image.open(self.real) as b:
            return np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")), _read_mask(self.mask)


def check_iharmony(folder: str | Path) -> list[HarmonyPair]:
    """iHarmony4 layout: DIR/*_train.txt list composites NAME_K_J.jpg; DIR/composite_images/NAME_K_J.jpg,
    DIR/masks/NAME_K.png and DIR/real_images/NAME.jpg, all of one size."""
    folder = Path(folder)
    for sub in ("composite_images", "masks", "real_images"):
        if not (folder / sub).is_dir():
            raise InputError(f"{folder / sub}: missing; expected the iHarmony4 layout (composite_images/, masks/, "
                             "real_images/, *_train.txt)")
    lists = sorted(folder.glob("*_train.txt"))
    if not lists:
        raise InputError(f"{folder}: no *_train.txt list; expected iHarmony4's NAME_train.txt of composite images")
    pairs = []
    for listing in lists:
        lines = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        for line in lines:
            composite = folder / "composite_images" / Path(line).name
            name, k, j = (Path(line).stem.rsplit("_", 2) + ["", ""])[:3]
            if not (k.isdigit() and j.isdigit()):
                raise InputError(f"{listing}: line {line!r}: expected a composite named NAME_K_J.jpg")
            real = next((p for p in (folder / "real_images" / f"{name}{s}" for s in IMAGE_SUFFIXES) if p.is_file()),
                        folder / "real_images" / f"{name}.jpg")
            mask = folder / "masks" / f"{name}_{k}.png"
            size = _open_size(composite, f"a composite listed in {listing.name}")
            for path, what in ((mask, "its foreground mask"), (real, "its real image")):
                if _open_size(path, f"{what} (for {composite.name})") != size:
                    h, w = _open_size(path, what)
                    raise InputError(f"{path}: size {w}x{h} differs from its composite {composite.name} "
                                     f"({size[1]}x{size[0]})")
            pairs.append(HarmonyPair(composite, mask, real, size))
    if not pairs:
        raise InputError(f"{', '.join(str(p) for p in lists)}: empty; expected composite image names, one a line")
    return pairs
