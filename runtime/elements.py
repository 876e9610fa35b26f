"""Editable image elements: the data a user edits, its edits, its file format and its overlay.

Elements live in the user's image: every coordinate here is in the input image's pixels, and the
label map, the overlay and the rendered image have the input image's size. An element is (content
feature, x, y, w, h): centroid and bounding-box size in image pixels (paper 001 Sec. 3.2; the
decoder sees them normalised by the image size, `boxes()`). The partition and the decoder run at
a working resolution (multiples of 8, `working_size`) that stays internal, as the repositioning
editor pastes back at the original size.

Each element also keeps its region (a mask cropped to its bounding box, in image pixels) so that
edits can be drawn and collisions found: after a move, resize or insert, every other element that
the edited ones now cover is deleted, so each pixel is covered by at most one element (paper,
"Supporting editing operations"). A deleted element keeps its slot: the decoder still sees N
tokens, the deleted ones all zero.

Files: `NAME.json` (human-readable: image size, and per element id, alive, x, y, w, h in image
pixels, scale) beside `NAME.npz` (features, region masks, anchors); the JSON records the npz's
SHA-256, so a mismatched pair is refused. Version 1 files (coordinates normalised to the working
canvas) still load: their canvas becomes the image.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from editrt.errors import ElementsError
from editrt.models.files import write_bytes_atomic

FORMAT, VERSION = "editrt.elements", 2
UNITS = "image pixels"  # what x, y, w, h in the JSON are
MAX_DATA_BYTES = 1 << 30  # an npz's members together, uncompressed (Elements.load; a server passes its own bound)


def multiple_of_8(size_hw: tuple[int, int]) -> tuple[int, int]:
    return tuple(max(8, round(s / 8) * 8) for s in size_hw)


def resize_labels(labels: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map, sampling at pixel centres.

    Upsampling maps each source pixel to a non-empty rectangle of target pixels, so every element
    keeps its pixels and its 4-connectivity; downsampling can lose thin parts (see `Elements.from_labels`).
    """
    h, w = labels.shape
    H, W = size_hw
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


@dataclass
class Elements:
    image_size: tuple[int, int]  # (H, W) of the input image: all coordinates below are its pixels
    features: np.ndarray  # float32 [N, F] content features
    centroids: np.ndarray  # float32 [N, 2] (x, y) image pixels (pixel j spans [j, j + 1))
    sizes: np.ndarray  # float32 [N, 2] (w, h) bounding-box size in image pixels
    alive: np.ndarray  # bool [N]
    masks: list[np.ndarray]  # N bool crops of each region at scale 1, image pixels (empty [0, 0] if none)
    anchors: np.ndarray  # float32 [N, 2] centroid position inside its mask crop, pixels (x, y)
    scales: np.ndarray = None  # float32 [N] current region scale relative to its mask crop
    info: dict = field(default_factory=dict)  # e.g. dropped_fraction, partition settings
    working_size: tuple[int, int] | None = None  # (h, w) the decoder renders at (multiples of 8); internal

    def __post_init__(self):
        self.image_size = tuple(int(v) for v in self.image_size)
        if self.scales is None:
            self.scales = np.ones(len(self.features), np.float32)
        self.working_size = multiple_of_8(self.image_size) if self.working_size is None else \
            tuple(int(v) for v in self.working_size)

    @classmethod
    def from_labels(cls, labels: np.ndarray, features: np.ndarray, image_size: tuple[int, int],
                    info: dict | None = None) -> Elements:
        """Elements from a working-resolution label map (-1 = no element) and each element's feature.

        The label map is resized to the image (nearest, pixel centres); regions, centroids and sizes
        are measured there. Where the image is smaller than the working canvas, each element keeps
        its largest 4-connected piece of the resized map (downsampling can split thin elements), the
        other pieces go to a neighbouring element (no pixel that had an element loses it), and an
        element left without pixels is not alive.
        """
        from editrt.runtime.partition import clean_labels

        working_size, n = tuple(labels.shape), len(features)
        labels = resize_labels(labels, image_size)
        if image_size[0] < working_size[0] or image_size[1] < working_size[1]:
            labels = clean_labels(labels, n, opening=0, fill=True)
        H, W = labels.shape
        flat = labels.reshape(-1)
        where = np.flatnonzero(flat >= 0)
        ids = flat[where]
        counts = np.bincount(ids, minlength=n)
        sum_x = np.bincount(ids, weights=where % W + 0.5, minlength=n)
        sum_y = np.bincount(ids, weights=where // W + 0.5, minlength=n)
        alive = counts > 0
        centroids = np.zeros((n, 2), np.float32)
        centroids[alive] = np.stack([sum_x[alive], sum_y[alive]], 1) / counts[alive, None]
        masks, anchors, sizes = [], np.zeros((n, 2), np.float32), np.zeros((n, 2), np.float32)
        for i, box in enumerate(ndimage.find_objects(labels + 1, max_label=n)):
            if box is None:
                masks.append(np.zeros((0, 0), bool))
                continue
            masks.append(labels[box] == i)
            anchors[i] = centroids[i] - (box[1].start, box[0].start)
            sizes[i] = (box[1].stop - box[1].start, box[0].stop - box[0].start)
        info = dict(info or {}, dropped_fraction=float((labels < 0).mean()))
        return cls((H, W), np.asarray(features, np.float32), centroids, sizes, alive, masks, anchors, info=info,
                   working_size=multiple_of_8(working_size))

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.features)

    @property
    def alive_ids(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.alive)]

    def copy(self) -> Elements:
        return Elements(self.image_size, self.features.copy(), self.centroids.copy(), self.sizes.copy(),
                        self.alive.copy(), [m.copy() for m in self.masks], self.anchors.copy(), self.scales.copy(),
                        dict(self.info), self.working_size)

    def boxes(self) -> np.ndarray:
        """[N, 4] (x, y, w, h) normalised by the image size: the decoder's position embedding input."""
        H, W = self.image_size
        scale = np.array([W, H, W, H], np.float32)
        return (np.concatenate([self.centroids, self.sizes], axis=1) / scale).astype(np.float32)

    def _check_ids(self, ids, op: str) -> list[int]:
        ids = [ids] if isinstance(ids, (int, np.integer)) else list(ids)
        if not ids:
            raise ElementsError(f"{op}: expected at least one element id", field="ids")
        for i in ids:
            if not isinstance(i, (int, np.integer)) or not 0 <= i < len(self):
                raise ElementsError(f"{op}: no element {i!r}; ids are 0..{len(self) - 1}", field="ids")
            if not self.alive[i]:
                raise ElementsError(f"{op}: element {i} was deleted", field="ids")
        return [int(i) for i in ids]

    # ------------------------------------------------------------------ regions
    def fit_scale(self, i: int, scale: float) -> float:
        """`scale` for element i's region, clamped so that the scaled region is no larger than the image."""
        mh, mw = self.masks[i].shape
        H, W = self.image_size
        return min(float(scale), H / mh, W / mw) if mh and mw else float(scale)

    def region_pixels(self, ids=(), scale: float = 1.0) -> int:
        """Pixels of all alive elements' regions (what an edit draws to find collisions), with elements `ids`
        scaled by `scale` more: a caller bounds an edit's cost with it before making the edit."""
        scaled = set(self._check_ids(ids, "resize")) if len(ids) else set()
        total = 0
        for i in self.alive_ids:
            s = self.fit_scale(i, self.scales[i] * (scale if i in scaled else 1.0))
            mh, mw = self.masks[i].shape
            total += max(1, round(mh * s)) * max(1, round(mw * s)) if mh and mw else 0
        return total

    def region(self, i: int) -> tuple[int, int, np.ndarray]:
        """(top, left, mask) of element i's current region in the image (the mask may extend past it; its
        scale is clamped so that it is never larger than the image)."""
        mask, s = self.masks[i], self.fit_scale(i, self.scales[i])
        if s != 1.0 and mask.size:
            h, w = max(1, round(mask.shape[0] * s)), max(1, round(mask.shape[1] * s))
            mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
        left = round(float(self.centroids[i, 0]) - float(self.anchors[i, 0]) * s)
        top = round(float(self.centroids[i, 1]) - float(self.anchors[i, 1]) * s)
        return top, left, mask

    def _visible(self, i: int) -> tuple[int, int, np.ndarray] | None:
        """(top, left, crop) of the part of element i's region inside the image, or None."""
        top, left, mask = self.region(i)
        H, W = self.image_size
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + mask.shape[0], H), min(left + mask.shape[1], W)
        if y0 >= y1 or x0 >= x1:
            return None
        return y0, x0, mask[y0 - top:y1 - top, x0 - left:x1 - left]

    def paint(self, ids=None) -> np.ndarray:
        """Label map int64 [H, W] of the current regions at the image's size (-1 = no element);
        later ids paint over earlier."""
        out = np.full(self.image_size, -1, np.int64)
        for i in self.alive_ids if ids is None else ids:
            visible = self._visible(i)
            if visible is not None:
                y0, x0, crop = visible
                out[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]][crop] = i
        return out

    def _delete_covered(self, edited: list[int]) -> list[int]:
        """Delete every other alive element whose region overlaps the edited ones'; returns their ids.

        Compares region crops where their boxes meet, so an edit costs no full-size label map.
        """
        regions = [r for r in (self._visible(i) for i in edited) if r is not None]
        deleted = []
        for j in self.alive_ids:
            if j in edited or not regions:
                continue
            other = self._visible(j)
            if other is not None and any(_overlap(r, other) for r in regions):
                deleted.append(j)
        self.alive[deleted] = False
        return deleted

    # ------------------------------------------------------------------ edits (in place; each returns ids deleted by collision)
    def move(self, ids, dx: float, dy: float) -> list[int]:
        """Move elements by (dx, dy) image pixels; each centre must stay inside the image."""
        ids = self._check_ids(ids, "move")
        H, W = self.image_size
        new = self.centroids[ids] + np.array([dx, dy], np.float32)
        bad = [i for i, c in zip(ids, new) if not (0 <= c[0] <= W and 0 <= c[1] <= H)]
        if bad:
            raise ElementsError(f"move ({dx:g}, {dy:g}): puts the centre of element {bad[0]} outside the image ({W}x{H})",
                                field="dx" if not 0 <= new[ids.index(bad[0]), 0] <= W else "dy")
        self.centroids[ids] = new
        return self._delete_covered(ids)

    def resize(self, ids, scale: float) -> list[int]:
        """Scale elements' regions (and their w, h, at most the image's) about their centroids."""
        ids = self._check_ids(ids, "resize")
        if not (isinstance(scale, (int, float)) and 0.05 <= scale <= 20):
            raise ElementsError(f"resize: scale expected in [0.05, 20], got {scale!r}", field="scale")
        H, W = self.image_size
        self.scales[ids] = [self.fit_scale(i, self.scales[i] * scale) for i in ids]  # never beyond the image
        self.sizes[ids] = np.minimum(self.sizes[ids] * scale, np.array([W, H], np.float32))
        return self._delete_covered(ids)

    def delete(self, ids) -> list[int]:
        ids = self._check_ids(ids, "delete")
        self.alive[ids] = False
        return ids

    def insert(self, other: Elements, ids, at: tuple[float, float]) -> tuple[list[int], list[int]]:
        """Compose: copy elements `ids` of `other` here, their joint centroid at image pixel `at`.

        Elements keep their size in pixels. N stays the partition's size (paper 001 keeps N fixed): each
        inserted element takes a deleted element's slot, lowest id first, and an insert needing more slots
        than are free is refused before anything changes. Returns (new ids, deleted ids).
        """
        ids = other._check_ids(ids, "insert")
        if other.features.shape[1] != self.features.shape[1]:
            raise ElementsError(f"insert: feature size {other.features.shape[1]} differs from {self.features.shape[1]}",
                                field="other")
        H, W = self.image_size
        if not (0 <= at[0] < W and 0 <= at[1] < H):
            raise ElementsError(f"insert: position ({at[0]:g}, {at[1]:g}) is outside the image ({W}x{H})", field="at")
        offsets = other.centroids[ids] - other.centroids[ids].mean(axis=0)  # (k, 2) pixels
        limit = np.array([W, H], np.float32)
        free = [i for i in range(len(self)) if not self.alive[i]]
        if len(ids) > len(free):
            raise ElementsError(f"insert: {len(ids)} element(s) need free slots, {len(free)} of {len(self)} are free "
                                "(the element count stays fixed; delete elements first)", field="ids")
        new_ids = []
        for k, (j, slot) in enumerate(zip(ids, free)):
            self.features[slot] = other.features[j]
            self.centroids[slot] = np.clip(np.asarray(at, np.float32) + offsets[k], 0, limit)
            self.sizes[slot] = np.minimum(other.sizes[j], limit)
            self.masks[slot], self.anchors[slot], self.scales[slot] = other.masks[j].copy(), other.anchors[j], other.scales[j]
            self.alive[slot] = True
            new_ids.append(slot)
        return new_ids, self._delete_covered(new_ids)

    # ------------------------------------------------------------------ selection
    def select(self, point=None, box=None) -> list[int]:
        """Ids of the element under image pixel `point` (x, y), or of those whose centre is in `box`."""
        H, W = self.image_size
        if point is not None:
            x, y = point
            if not (0 <= x < W and 0 <= y < H):
                raise ElementsError(f"select: point ({x:g}, {y:g}) is outside the image ({W}x{H})", field="point")
            row, col = int(y), int(x)
            for i in reversed(self.alive_ids):  # the topmost: later ids paint over earlier
                visible = self._visible(i)
                if visible is None:
                    continue
                y0, x0, crop = visible
                if 0 <= row - y0 < crop.shape[0] and 0 <= col - x0 < crop.shape[1] and crop[row - y0, col - x0]:
                    return [i]
            return []
        if box is not None:
            x0, y0, x1, y1 = box
            c = self.centroids
            inside = (c[:, 0] >= x0) & (c[:, 0] <= x1) & (c[:, 1] >= y0) & (c[:, 1] <= y1) & self.alive
            return [int(i) for i in np.flatnonzero(inside)]
        raise ElementsError("select: expected a point or a box", field="point")

    # ------------------------------------------------------------------ files
    def _npz_bytes(self) -> bytes:
        shapes = np.array([m.shape for m in self.masks], np.int64).reshape(-1, 2)
        bits = np.concatenate([m.reshape(-1) for m in self.masks]) if self.masks else np.zeros(0, bool)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, features=self.features.astype(np.float32), anchors=self.anchors.astype(np.float32),
                            mask_shapes=shapes, mask_bits=np.packbits(bits))
        return buffer.getvalue()

    def to_document(self, data_name: str = "elements.npz") -> tuple[dict, bytes]:
        """The file pair in memory: the JSON document (naming its data file `data_name`) and the npz bytes."""
        data = self._npz_bytes()
        doc = {
            "format": FORMAT, "version": VERSION, "image_size": list(self.image_size), "units": UNITS,
            "working_size": list(self.working_size), "num_elements": len(self),
            "feature_dim": int(self.features.shape[1]), "data": data_name,
            "data_sha256": hashlib.sha256(data).hexdigest(), "info": self.info,
            "elements": [
                {"id": i, "alive": bool(self.alive[i]), "x": float(self.centroids[i, 0]), "y": float(self.centroids[i, 1]),
                 "w": float(self.sizes[i, 0]), "h": float(self.sizes[i, 1]), "scale": float(self.scales[i])}
                for i in range(len(self))
            ],
        }
        return doc, data

    def save(self, path: str | Path) -> Path:
        """Write NAME.json + NAME.npz, each atomically (temp file + rename; the JSON last)."""
        path = Path(path)
        if path.suffix != ".json":
            raise ElementsError(f"{path}: expected a .json file name for the elements", field="path")
        npz_path = path.with_suffix(".npz")
        doc, data = self.to_document(npz_path.name)
        write_bytes_atomic(npz_path, data)
        write_bytes_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | Path, max_data_bytes: int = MAX_DATA_BYTES) -> Elements:
        """Read NAME.json + NAME.npz (see from_document). Every error names `path` (field "path")."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ElementsError(f"{path}: no such elements file", field="path") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ElementsError(f"{path}: not valid JSON ({e})", field="path") from None
        _check_format(doc, str(path), "path")
        npz_path = path.parent / str(doc.get("data", ""))
        try:
            data = npz_path.read_bytes()
        except OSError:
            raise ElementsError(f"{path}: its data file {npz_path} is missing", field="path") from None
        return cls._parse(doc, data, max_data_bytes, str(path), "path", "path")

    @classmethod
    def from_document(cls, doc: dict, data: bytes, max_data_bytes: int = MAX_DATA_BYTES,
                      source: str = "elements") -> Elements:
        """The file pair from memory: the JSON document and the npz bytes (the document's own `data` name is not
        used). The npz must match the document's SHA-256; its members are checked from their declared sizes (zip
        and .npy headers) before any is read: together at most `max_data_bytes` uncompressed, each exactly as
        large as its header says, so a small file cannot expand into a large allocation. Messages start with
        `source`; the error's field is "doc" or "data", whichever is at fault."""
        _check_format(doc, source, "doc")
        return cls._parse(doc, data, max_data_bytes, source, "doc", "data")

    @classmethod
    def _parse(cls, doc: dict, data: bytes, max_data_bytes: int, source: str, doc_field: str,
               data_field: str) -> Elements:
        if hashlib.sha256(data).hexdigest() != doc.get("data_sha256"):
            raise ElementsError(f"{source}: its data file does not match it (SHA-256 differs); "
                                "keep each .json with the .npz written beside it", field=data_field)
        try:
            _check_npz(data, max_data_bytes)
            arrays = np.load(io.BytesIO(data), allow_pickle=False)
            features, anchors = arrays["features"], arrays["anchors"]
            shapes, bits = arrays["mask_shapes"], np.unpackbits(arrays["mask_bits"]).astype(bool)
        except (KeyError, ValueError, TypeError, OSError, IndexError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ElementsError(f"{source}: malformed elements data ({e})", field=data_field) from None
        try:
            rows = doc["elements"]
            n = int(doc["num_elements"])
            H, W = (int(v) for v in doc["image_size"])
            if len(rows) != n or features.shape != (n, int(doc["feature_dim"])) or len(shapes) != n:
                raise ValueError("element counts differ")
            masks, offset = [], 0
            for h, w in shapes:
                masks.append(bits[offset:offset + h * w].reshape(h, w))
                offset += h * w
            col = lambda key: np.array([float(r[key]) for r in rows], np.float32)  # noqa: E731
            if [int(r["id"]) for r in rows] != list(range(n)):
                raise ValueError("ids must be 0..N-1 in order")
            # version 1: x, y, w, h normalised to a canvas that was also the working size
            unit = np.array([W, H], np.float32) if doc["version"] == 1 else np.ones(2, np.float32)
            working = doc.get("working_size") or multiple_of_8((H, W))
            elements = cls((H, W), features.astype(np.float32), np.stack([col("x"), col("y")], 1) * unit,
                           np.stack([col("w"), col("h")], 1) * unit, np.array([bool(r["alive"]) for r in rows]),
                           masks, anchors.astype(np.float32), col("scale"), dict(doc.get("info", {})),
                           (int(working[0]), int(working[1])))
            if min(elements.working_size) < 8 or any(v % 8 for v in elements.working_size):
                raise ValueError(f"working_size {list(elements.working_size)} is not a multiple of 8")
            if H < 1 or W < 1:
                raise ValueError(f"image_size {[H, W]} has no pixels")
            geometry = np.concatenate([elements.centroids.ravel(), elements.sizes.ravel(), elements.anchors.ravel()])
            if not np.isfinite(geometry).all() or not (np.isfinite(elements.scales) & (elements.scales > 0)).all():
                raise ValueError("x, y, w, h, anchors must be finite and scale finite and > 0")
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise ElementsError(f"{source}: malformed elements file ({e})", field=doc_field) from None
        return elements


def _check_format(doc, source: str, field: str) -> None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") not in (1, VERSION):
        raise ElementsError(f"{source}: not an editrt elements file (expected format {FORMAT!r} version 1 or {VERSION})",
                            field=field)


def _check_npz(data: bytes, max_bytes: int) -> None:
    """Refuse an npz from its headers alone: a member whose .npy header declares more (or less) data than the
    member holds, or members together larger than `max_bytes` uncompressed (ValueError)."""
    total = 0
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for member in archive.infolist():
            total += member.file_size
            if total > max_bytes:
                raise ValueError(f"its data is larger than {max_bytes} bytes uncompressed")
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
                if dtype.hasobject:
                    raise ValueError(f"{member.filename}: object arrays are not elements data")
                declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if declared != member.file_size - f.tell():
                    raise ValueError(f"{member.filename}: its header declares {declared} bytes, it holds "
                                     f"{member.file_size - f.tell()}")


def _overlap(a: tuple[int, int, np.ndarray], b: tuple[int, int, np.ndarray]) -> bool:
    """Do two visible regions (top, left, crop) share a pixel?"""
    (ay, ax, am), (by, bx, bm) = a, b
    y0, x0 = max(ay, by), max(ax, bx)
    y1, x1 = min(ay + am.shape[0], by + bm.shape[0]), min(ax + am.shape[1], bx + bm.shape[1])
    if y0 >= y1 or x0 >= x1:
        return False
    return bool((am[y0 - ay:y1 - ay, x0 - ax:x1 - ax] & bm[y0 - by:y1 - by, x0 - bx:x1 - bx]).any())


def render_overlay(elements: Elements, image=None, ids: bool = False) -> Image.Image:
    """Element boundaries and centroids over `image` (the input image, or a grey one), as in the paper's Fig. 4."""
    H, W = elements.image_size
    canvas = np.full((H, W, 3), 128, np.uint8) if image is None else np.array(image.convert("RGB") if isinstance(image, Image.Image) else image, np.uint8)
    if canvas.shape[:2] != (H, W):
        raise ElementsError(f"overlay: image is {canvas.shape[1]}x{canvas.shape[0]}, the elements' image is {W}x{H}",
                            field="image")
    labels = elements.paint()
    edge = np.zeros((H, W), bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    canvas[edge] = (255, 255, 255)
    canvas[labels < 0] = canvas[labels < 0] // 3  # dropped pixels / empty canvas: darkened
    out = Image.fromarray(canvas)
    draw = ImageDraw.Draw(out)
    radius = max(1, min(H, W) // 200)
    for i in elements.alive_ids:
        x, y = elements.centroids[i]
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 40, 40))
        if ids:
            draw.text((x + radius + 1, y - radius), str(i), fill=(255, 255, 0))
    return out
