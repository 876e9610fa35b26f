"""Editable image elements: the data a user edits, its edits, its file format and its overlay.

An element is (content feature, x, y, w, h): centroid and bounding-box size, normalised to the
canvas (paper 001 Sec. 3.2). Each element also keeps its region (a mask cropped to its original
bounding box) so that edits can be drawn and collisions found: after a move, resize or insert,
every other element that the edited ones now cover is deleted, so each pixel is covered by at
most one element (paper, "Supporting editing operations"). A deleted element keeps its slot: the
decoder still sees N tokens, the deleted ones all zero.

Files: `NAME.json` (human-readable: canvas size, and per element id, alive, x, y, w, h, scale)
beside `NAME.npz` (features, region masks, anchors); the JSON records the npz's SHA-256, so a
mismatched pair is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from editrt.errors import ElementsError
from editrt.models.files import write_bytes_atomic

FORMAT, VERSION = "editrt.elements", 1


@dataclass
class Elements:
    image_size: tuple[int, int]  # (H, W) of the canvas the elements live on
    features: np.ndarray  # float32 [N, F] content features
    centroids: np.ndarray  # float32 [N, 2] (x, y) in [0, 1]
    sizes: np.ndarray  # float32 [N, 2] (w, h) bounding-box size in [0, 1]
    alive: np.ndarray  # bool [N]
    masks: list[np.ndarray]  # N bool crops of each region at scale 1 (empty [0, 0] if none)
    anchors: np.ndarray  # float32 [N, 2] centroid position inside its mask crop, pixels (x, y)
    scales: np.ndarray = None  # float32 [N] current region scale relative to its mask crop
    info: dict = field(default_factory=dict)  # e.g. dropped_fraction, source image size

    def __post_init__(self):
        if self.scales is None:
            self.scales = np.ones(len(self.features), np.float32)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.features)

    @property
    def alive_ids(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.alive)]

    def copy(self) -> Elements:
        return Elements(self.image_size, self.features.copy(), self.centroids.copy(), self.sizes.copy(),
                        self.alive.copy(), [m.copy() for m in self.masks], self.anchors.copy(), self.scales.copy(),
                        dict(self.info))

    def boxes(self) -> np.ndarray:
        """[N, 4] (x, y, w, h) for the decoder's position embedding."""
        return np.concatenate([self.centroids, self.sizes], axis=1).astype(np.float32)

    def _check_ids(self, ids, op: str) -> list[int]:
        ids = [ids] if isinstance(ids, (int, np.integer)) else list(ids)
        if not ids:
            raise ElementsError(f"{op}: expected at least one element id")
        for i in ids:
            if not isinstance(i, (int, np.integer)) or not 0 <= i < len(self):
                raise ElementsError(f"{op}: no element {i!r}; ids are 0..{len(self) - 1}")
            if not self.alive[i]:
                raise ElementsError(f"{op}: element {i} was deleted")
        return [int(i) for i in ids]

    # ------------------------------------------------------------------ regions
    def region(self, i: int) -> tuple[int, int, np.ndarray]:
        """(top, left, mask) of element i's current region on the canvas (mask may extend past it)."""
        mask, s = self.masks[i], float(self.scales[i])
        if s != 1.0 and mask.size:
            h, w = max(1, round(mask.shape[0] * s)), max(1, round(mask.shape[1] * s))
            mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
        H, W = self.image_size
        left = round(float(self.centroids[i, 0]) * W - float(self.anchors[i, 0]) * s)
        top = round(float(self.centroids[i, 1]) * H - float(self.anchors[i, 1]) * s)
        return top, left, mask

    def paint(self, ids=None) -> np.ndarray:
        """Label map int64 [H, W] of the current regions (-1 = no element); later ids paint over earlier."""
        H, W = self.image_size
        out = np.full((H, W), -1, np.int64)
        for i in self.alive_ids if ids is None else ids:
            top, left, mask = self.region(i)
            y0, x0 = max(top, 0), max(left, 0)
            y1, x1 = min(top + mask.shape[0], H), min(left + mask.shape[1], W)
            if y0 < y1 and x0 < x1:
                crop = mask[y0 - top:y1 - top, x0 - left:x1 - left]
                out[y0:y1, x0:x1][crop] = i
        return out

    def _delete_covered(self, edited: list[int]) -> list[int]:
        """Delete every other alive element whose region overlaps the edited ones'; returns their ids."""
        covered = self.paint(edited) >= 0
        others = [i for i in self.alive_ids if i not in edited]
        hit = np.unique(self.paint(others)[covered])
        deleted = [int(i) for i in hit if i >= 0]
        self.alive[deleted] = False
        return deleted

    # ------------------------------------------------------------------ edits (in place; each returns ids deleted by collision)
    def move(self, ids, dx: float, dy: float) -> list[int]:
        """Move elements by (dx, dy) canvas pixels."""
        ids = self._check_ids(ids, "move")
        H, W = self.image_size
        new = self.centroids[ids] + np.array([dx / W, dy / H], np.float32)
        bad = [i for i, c in zip(ids, new) if not (0 <= c[0] <= 1 and 0 <= c[1] <= 1)]
        if bad:
            raise ElementsError(f"move ({dx:g}, {dy:g}): puts the centre of element {bad[0]} outside the image ({W}x{H})")
        self.centroids[ids] = new
        return self._delete_covered(ids)

    def resize(self, ids, scale: float) -> list[int]:
        """Scale elements' regions (and their w, h) about their centroids."""
        ids = self._check_ids(ids, "resize")
        if not (isinstance(scale, (int, float)) and 0.05 <= scale <= 20):
            raise ElementsError(f"resize: scale expected in [0.05, 20], got {scale!r}")
        self.scales[ids] *= scale
        self.sizes[ids] = np.minimum(self.sizes[ids] * scale, 1.0)
        return self._delete_covered(ids)

    def delete(self, ids) -> list[int]:
        ids = self._check_ids(ids, "delete")
        self.alive[ids] = False
        return ids

    def insert(self, other: Elements, ids, at: tuple[float, float]) -> tuple[list[int], list[int]]:
        """Compose: copy elements `ids` of `other` here, their joint centroid at canvas pixel `at`.

        Sizes keep their pixel size. Reuses deleted slots first, then appends. Returns (new ids, deleted ids).
        """
        ids = other._check_ids(ids, "insert")
        if other.features.shape[1] != self.features.shape[1]:
            raise ElementsError(f"insert: feature size {other.features.shape[1]} differs from {self.features.shape[1]}")
        H, W = self.image_size
        oh, ow = other.image_size
        if not (0 <= at[0] < W and 0 <= at[1] < H):
            raise ElementsError(f"insert: position ({at[0]:g}, {at[1]:g}) is outside the image ({W}x{H})")
        pixels = other.centroids[ids] * np.array([ow, oh], np.float32)  # (k, 2) in the other canvas
        offsets = pixels - pixels.mean(axis=0)
        free = [i for i in range(len(self)) if not self.alive[i]]
        new_ids = []
        for k, j in enumerate(ids):
            slot = free.pop(0) if free else len(self)
            if slot == len(self):
                self._append_empty()
            self.features[slot] = other.features[j]
            self.centroids[slot] = np.clip((np.asarray(at, np.float32) + offsets[k]) / np.array([W, H], np.float32), 0, 1)
            self.sizes[slot] = np.minimum(other.sizes[j] * np.array([ow / W, oh / H], np.float32), 1.0)
            self.masks[slot], self.anchors[slot], self.scales[slot] = other.masks[j].copy(), other.anchors[j], other.scales[j]
            self.alive[slot] = True
            new_ids.append(slot)
        return new_ids, self._delete_covered(new_ids)

    def _append_empty(self) -> None:
        self.features = np.concatenate([self.features, np.zeros((1, self.features.shape[1]), np.float32)])
        self.centroids = np.concatenate([self.centroids, np.zeros((1, 2), np.float32)])
        self.sizes = np.concatenate([self.sizes, np.zeros((1, 2), np.float32)])
        self.anchors = np.concatenate([self.anchors, np.zeros((1, 2), np.float32)])
        self.scales = np.concatenate([self.scales, np.ones(1, np.float32)])
        self.alive = np.concatenate([self.alive, [False]])
        self.masks.append(np.zeros((0, 0), bool))

    # ------------------------------------------------------------------ selection
    def select(self, point=None, box=None) -> list[int]:
        """Ids of the element under canvas pixel `point` (x, y), or of those whose centre is in `box`."""
        H, W = self.image_size
        if point is not None:
            x, y = point
            if not (0 <= x < W and 0 <= y < H):
                raise ElementsError(f"select: point ({x:g}, {y:g}) is outside the image ({W}x{H})")
            i = int(self.paint()[int(y), int(x)])
            return [] if i < 0 else [i]
        if box is not None:
            x0, y0, x1, y1 = box
            c = self.centroids * np.array([W, H], np.float32)
            inside = (c[:, 0] >= x0) & (c[:, 0] <= x1) & (c[:, 1] >= y0) & (c[:, 1] <= y1) & self.alive
            return [int(i) for i in np.flatnonzero(inside)]
        raise ElementsError("select: expected a point or a box")

    # ------------------------------------------------------------------ files
    def _npz_bytes(self) -> bytes:
        shapes = np.array([m.shape for m in self.masks], np.int64).reshape(-1, 2)
        bits = np.concatenate([m.reshape(-1) for m in self.masks]) if self.masks else np.zeros(0, bool)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, features=self.features.astype(np.float32), anchors=self.anchors.astype(np.float32),
                            mask_shapes=shapes, mask_bits=np.packbits(bits))
        return buffer.getvalue()

    def save(self, path: str | Path) -> Path:
        """Write NAME.json + NAME.npz, each atomically (temp file + rename; the JSON last)."""
        path = Path(path)
        if path.suffix != ".json":
            raise ElementsError(f"{path}: expected a .json file name for the elements")
        npz_path = path.with_suffix(".npz")
        data = self._npz_bytes()
        H, W = self.image_size
        doc = {
            "format": FORMAT, "version": VERSION, "image_size": [H, W], "num_elements": len(self),
            "feature_dim": int(self.features.shape[1]), "data": npz_path.name,
            "data_sha256": hashlib.sha256(data).hexdigest(), "info": self.info,
            "elements": [
                {"id": i, "alive": bool(self.alive[i]), "x": float(self.centroids[i, 0]), "y": float(self.centroids[i, 1]),
                 "w": float(self.sizes[i, 0]), "h": float(self.sizes[i, 1]), "scale": float(self.scales[i])}
                for i in range(len(self))
            ],
        }
        write_bytes_atomic(npz_path, data)
        write_bytes_atomic(path, (json.dumps(doc, indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Elements:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ElementsError(f"{path}: no such elements file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ElementsError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise ElementsError(f"{path}: not an editrt elements file (expected format {FORMAT!r} version {VERSION})")
        npz_path = path.parent / str(doc.get("data", ""))
        try:
            data = npz_path.read_bytes()
        except OSError:
            raise ElementsError(f"{path}: its data file {npz_path} is missing") from None
        if hashlib.sha256(data).hexdigest() != doc.get("data_sha256"):
            raise ElementsError(f"{path}: its data file {npz_path.name} does not match it (SHA-256 differs); "
                                "keep each .json with the .npz written beside it")
        try:
            arrays = np.load(io.BytesIO(data))
            features, anchors = arrays["features"], arrays["anchors"]
            shapes, bits = arrays["mask_shapes"], np.unpackbits(arrays["mask_bits"]).astype(bool)
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
            elements = cls((H, W), features.astype(np.float32), np.stack([col("x"), col("y")], 1),
                           np.stack([col("w"), col("h")], 1), np.array([bool(r["alive"]) for r in rows]),
                           masks, anchors.astype(np.float32), col("scale"), dict(doc.get("info", {})))
        except (KeyError, ValueError, TypeError, OSError) as e:
            raise ElementsError(f"{path}: malformed elements file ({e})") from None
        return elements


def render_overlay(elements: Elements, image=None, ids: bool = False) -> Image.Image:
    """Element boundaries and centroids over `image` (or a grey canvas), as in the paper's Fig. 4."""
    H, W = elements.image_size
    canvas = np.full((H, W, 3), 128, np.uint8) if image is None else np.array(image.convert("RGB") if isinstance(image, Image.Image) else image, np.uint8)
    if canvas.shape[:2] != (H, W):
        raise ElementsError(f"overlay: image is {canvas.shape[1]}x{canvas.shape[0]}, the elements' canvas is {W}x{H}")
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
        x, y = elements.centroids[i] * np.array([W, H])
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 40, 40))
        if ids:
            draw.text((x + radius + 1, y - radius), str(i), fill=(255, 255, 0))
    return out
