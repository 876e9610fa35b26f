"""SAM on the PyTorch backend: the image embedding once per image, prompts decoded against it.

`Segmenter.masks` reproduces `segment_anything.SamPredictor` (set_image + predict) op for op;
`Segmenter.grid_logits` decodes many single-point queries in one batched mask-decoder call (the
elements partition uses it for its 16x16 grid).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from editrt.errors import InputError


class Segmenter:
    def __init__(self, sam: Sam, device: torch.device):
        self.sam, self.device = sam, torch.device(device)
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self._cache: tuple[str, torch.Tensor, tuple, tuple] | None = None

    def embedding(self, rgb: np.ndarray):
        """(image embedding [1, C, h, w], input size before padding, original size); cached for the last image."""
        key = hashlib.sha1(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()
        if self._cache is None or self._cache[0] != key:
            resized = self.transform.apply_image(rgb)  # longest side = img_size, as SamPredictor.set_image
            x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]  # (1, 3, h, w)
            with torch.no_grad():
                features = self.sam.image_encoder(self.sam.preprocess(x))
            self._cache = (key, features, tuple(x.shape[-2:]), rgb.shape[:2])
        return self._cache[1:]

    def _decode(self, features, sparse, dense):
        return self.sam.mask_decoder(
            image_embeddings=features, image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
        )

    @torch.no_grad()
    def masks(self, rgb: np.ndarray, points=None, labels=None, box=None) -> np.ndarray:
        """Best-IoU mask (bool [H, W]) of SAM's multimask output for points (x, y) + labels and/or a box."""
        h, w = rgb.shape[:2]
        if points is None and box is None:
            raise InputError("segment: expected at least one point or a box")
        features, input_size, original_size = self.embedding(rgb)
        coords = labels_t = box_t = None
        if points is not None:
            pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
            for x, y in pts:
                if not (0 <= x < w and 0 <= y < h):
                    raise InputError(f"point ({x:g}, {y:g}): outside the image ({w}x{h}); expected 0 <= x < {w}, 0 <= y < {h}")
            lab = np.ones(len(pts), dtype=np.int64) if labels is None else np.asarray(labels).reshape(-1)
            if len(lab) != len(pts) or not np.isin(lab, (0, 1)).all():
                raise InputError(f"labels: expected one label per point, each 0 (background) or 1 (foreground), got {lab.tolist()}")
            coords = torch.as_tensor(self.transform.apply_coords(pts, original_size), dtype=torch.float, device=self.device)[None]
            labels_t = torch.as_tensor(lab, dtype=torch.int, device=self.device)[None]
        if box is not None:
            b = np.asarray(box, dtype=np.float64).reshape(-1)
            if b.shape != (4,) or not (0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h):
                raise InputError(f"box {b.tolist()}: expected x0 < x1, y0 < y1 inside the image ({w}x{h})")
            box_t = torch.as_tensor(self.transform.apply_boxes(b, original_size), dtype=torch.float, device=self.device)
        sparse, dense = self.sam.prompt_encoder(points=None if coords is None else (coords, labels_t), boxes=box_t, masks=None)
        low_res, iou = self._decode(features, sparse, dense)
        masks = self.sam.postprocess_masks(low_res, input_size, original_size) > self.sam.mask_threshold
        mask = masks[0, int(torch.argmax(iou[0]))].cpu().numpy()
        if not mask.any():
            raise InputError("segment: SAM found no subject at the given point/box; try another point or a box")
        return mask

    @torch.no_grad()
    def grid_logits(self, rgb: np.ndarray, points_xy: np.ndarray, chunk: int = 64) -> torch.Tensor:
        """Low-resolution mask logits [N, h, w] for N single foreground points (pixel x, y), one query each.

        Each query keeps its best-IoU mask of the multimask output (as `masks` does). The logits are
        cropped to the image's part of SAM's padded square, so they span exactly the image.
        Chunks of `chunk` queries bound the memory of the batched decoder (it repeats the embedding).
        """
        features, input_size, original_size = self.embedding(rgb)
        coords = torch.as_tensor(self.transform.apply_coords(np.asarray(points_xy, np.float64), original_size),
                                 dtype=torch.float, device=self.device)[:, None, :]  # (N, 1, 2)
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=self.device)  # (N, 1)
        best = []
        for start in range(0, len(coords), chunk):
            sparse, dense = self.sam.prompt_encoder(points=(coords[start:start + chunk], labels[start:start + chunk]),
                                                    boxes=None, masks=None)
            low_res, iou = self._decode(features, sparse, dense)  # (n, 3, 4h, 4w), (n, 3)
            best.append(low_res[torch.arange(len(iou)), iou.argmax(dim=1)])
        logits = torch.cat(best)  # (N, 4h, 4w) over the padded square
        scale = logits.shape[-1] / self.sam.image_encoder.img_size
        valid_h, valid_w = round(input_size[0] * scale), round(input_size[1] * scale)
        return logits[:, :valid_h, :valid_w].float()
