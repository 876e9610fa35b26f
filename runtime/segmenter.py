"""SAM through engines: the image embedding once per image, prompts decoded against it.

`Segmenter.masks` reproduces `segment_anything.SamPredictor` (set_image + predict with multimask
output, best predicted IoU): the same preprocessing (ResizeLongestSide, normalise, pad) and the
prompt encoding of segment-anything's own SamOnnxModel, which embeds points, the padding point
and box corners exactly as the predictor's PromptEncoder does. `Segmenter.grid_logits` decodes
many single-point queries in one batched call (the elements partition's 16x16 grid).
"""
from __future__ import annotations

import contextlib
import hashlib
import threading

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from editrt.errors import InputError
from editrt.runtime.caches import ByteLRU

# segment-anything's Sam.pixel_mean / pixel_std / mask_threshold
PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
MASK_THRESHOLD = 0.0
EMBEDDING_BUDGET = 256 << 20  # bytes of cached SAM image embeddings (ViT-B fp32: 4 MiB each)


def pixel_key(rgb: np.ndarray) -> tuple:
    """A name for an image from its pixels (when the caller gives none): shape + blake2b digest."""
    return ("pixels", rgb.shape, hashlib.blake2b(np.ascontiguousarray(rgb).data, digest_size=16).digest())


_TF32_LOCK = threading.Lock()
_tf32 = {"users": 0, "saved": None}  # threads inside tf32_matmuls, and the precision the first of them found
def _fp32_precision() -> tuple:
    """The fp32 precision of CUDA matmuls and cuDNN convolutions, as `_restore` puts it back exactly: through
    the legacy allow_tf32 flags, or, on torch >= 2.9 after the process chose it with the `fp32_precision` API
    (the legacy getters then raise rather than answer), through that API."""
    try:
        return "allow_tf32", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    except RuntimeError:  # "you have used mix of the legacy and new APIs": the process is on the new API
        return "fp32_precision", torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


def _restore(saved: tuple) -> None:
    api, matmul, conv = saved
    if api == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv
    else:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv


@contextlib.contextmanager
def tf32_matmuls(device: torch.device):
    """TF32 for fp32 matmuls and convolutions on CUDA, for the duration only (restored after).

    SAM runs in fp32 on every backend (its published checkpoints are fp32). On Ampere and later,
    TF32 runs those matmuls on tensor cores with a 10-bit mantissa: ~1e-3 relative error in the
    embedding, which the mask threshold tolerates. No effect on the CPU.

    The flags are process-global, also in torch 2.14's `fp32_precision` API (there is no per-thread
    form), so while an encoder runs they also apply to other threads' fp32 CUDA matmuls (the pipelines'
    UNets run in fp16 on CUDA by default; `Segmenter(tf32=False)` keeps SAM exact). Two editors' queues may
    run their encoders at once: a per-call save/restore would then let the first to leave turn TF32 off
    under the second, and the second restore the first's True for good. One process-wide count under a
    lock instead: the first to enter saves and sets, the last to leave restores what it found, through
    whichever precision API the process uses.
    """
    if device.type != "cuda":
        yield
        return
    with _TF32_LOCK:
        if _tf32["users"] == 0:
            _tf32["saved"] = _fp32_precision()
            # the legacy setters work under either API, and leave the legacy getters readable inside
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        _tf32["users"] += 1
    try:
        yield
    finally:
        with _TF32_LOCK:
            _tf32["users"] -= 1
            if _tf32["users"] == 0:
                _restore(_tf32["saved"])


class Segmenter:
    """SAM prompts -> masks over one pipeline's engines; image embeddings cached by bytes, LRU.

    Runs inside its pipeline's work-queue jobs (the cache is not otherwise guarded against a
    second thread computing the same embedding).
    """

    def __init__(self, engines: dict, image_size: int, device, budget_bytes: int = EMBEDDING_BUDGET, tf32: bool = True):
        """`tf32`: run the fp32 image encoder with TF32 on CUDA (see tf32_matmuls); False: exact fp32."""
        self.engines, self.image_size, self.device, self.tf32 = engines, image_size, torch.device(device), tf32
        self.transform = ResizeLongestSide(image_size)
        self.cache = ByteLRU("sam embeddings", budget_bytes)

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """SamPredictor.set_image + Sam.preprocess: resize the long side, normalise, pad to a square."""
        resized = self.transform.apply_image(rgb)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]  # (1, 3, h, w)
        x = (x - PIXEL_MEAN.to(self.device)) / PIXEL_STD.to(self.device)
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h)), (h, w)

    def embedding(self, rgb: np.ndarray, image_key=None):
        """(image embeddings [1, C, e, e], input size before padding, original size), cached by image.

        `image_key`: the caller's name for this image (an EditSession computes `pixel_key` once when
        it opens); it must name the same pixels every time. None: `pixel_key(rgb)` (hashes the image).
        """
        key = pixel_key(rgb) if image_key is None else image_key
        entry = self.cache.get(key)
        if entry is None:
            x, input_size = self.preprocess(rgb)
            with tf32_matmuls(self.device) if self.tf32 else contextlib.nullcontext():
                features = self.engines["sam_image_encoder"](image=x)["image_embeddings"]
            entry = (features, input_size, tuple(rgb.shape[:2]))
            self.cache.put(key, entry)
        return entry

    def forget(self, image_key) -> int:
        return self.cache.discard(lambda k: k == image_key)

    def masks(self, rgb: np.ndarray, points=None, labels=None, box=None, image_key=None) -> np.ndarray:
        """Best-IoU mask (bool [H, W]) of SAM's multimask output for points (x, y) + labels and/or a box."""
        h, w = rgb.shape[:2]
        if points is None and box is None:
            raise InputError("segment: expected at least one point or a box", field="points")
        coords, codes = np.zeros((0, 2)), np.zeros(0)
        if points is not None:
            pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
            for x, y in pts:
                if not (0 <= x < w and 0 <= y < h):
                    raise InputError(f"point ({x:g}, {y:g}): outside the image ({w}x{h}); expected 0 <= x < {w}, 0 <= y < {h}", field="points")
            lab = np.ones(len(pts), dtype=np.int64) if labels is None else np.asarray(labels).reshape(-1)
            if len(lab) != len(pts) or not np.isin(lab, (0, 1)).all():
                raise InputError(f"labels: expected one label per point, each 0 (background) or 1 (foreground), got {lab.tolist()}", field="labels")
            coords, codes = self.transform.apply_coords(pts, (h, w)), lab
        if box is not None:
            b = np.asarray(box, dtype=np.float64).reshape(-1)
            if b.shape != (4,) or not (0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h):
                raise InputError(f"box {b.tolist()}: expected x0 < x1, y0 < y1 inside the image ({w}x{h})", field="box")
            corners = self.transform.apply_boxes(b, (h, w)).reshape(2, 2)
            coords, codes = np.concatenate([coords, corners]), np.concatenate([codes, [2, 3]])
        else:  # without a box SamPredictor's prompt encoder appends a padding point
            coords, codes = np.concatenate([coords, [[0.0, 0.0]]]), np.concatenate([codes, [-1]])

        features, _, original_size = self.embedding(rgb, image_key)
        low = 4 * features.shape[-1]
        out = self.engines["sam_mask_decoder"](
            image_embeddings=features,
            point_coords=torch.as_tensor(coords, dtype=torch.float32, device=self.device)[None],
            point_labels=torch.as_tensor(codes, dtype=torch.float32, device=self.device)[None],
            mask_input=torch.zeros(1, 1, low, low, device=self.device),
            has_mask_input=torch.zeros(1, device=self.device),
            orig_im_size=torch.tensor(original_size, dtype=torch.float32, device=self.device),
        )
        best = 1 + int(torch.argmax(out["iou_predictions"][0, 1:]))  # multimask: tokens 1..3
        mask = (out["masks"][0, best] > MASK_THRESHOLD).cpu().numpy()
        if not mask.any():
            raise InputError("segment: SAM found no subject at the given point/box; try another point or a box", field="points" if points is not None else "box")
        return mask

    def grid_logits(self, rgb: np.ndarray, points_xy: np.ndarray, image_key=None) -> torch.Tensor:
        """Low-resolution mask logits [N, h, w] for N single foreground points (pixel x, y), in one call.

        Each query keeps its best-IoU multimask logits. They are cropped to the image's part of
        SAM's padded square, so they span exactly the image.
        """
        features, input_size, original_size = self.embedding(rgb, image_key)
        coords = self.transform.apply_coords(np.asarray(points_xy, np.float64), original_size)
        logits = self.engines["sam_mask_decoder_grid"](
            image_embeddings=features, point_coords=torch.as_tensor(coords, dtype=torch.float32, device=self.device),
        )["low_res_logits"]  # (N, 4e, 4e) over the padded square
        scale = logits.shape[-1] / self.image_size
        # at least one row and column: a very thin image (a 400x2 strip) spans less than one low-res logit
        valid_h, valid_w = max(1, round(input_size[0] * scale)), max(1, round(input_size[1] * scale))
        return logits[:, :valid_h, :valid_w].float()
