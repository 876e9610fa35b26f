"""Depth (DPT / MiDaS v3) and matting (ViTMatte) around their engines: numpy in, numpy out.

The engines (`depth_estimator`, `matting`: export/specs.py) see exactly the tensors transformers'
own processors give the models, so a folder runs the same here and in `transformers.pipeline`:

DepthEstimator  DPTImageProcessor (transformers 5, torchvision backend): the uint8 image resized to
                S x S, bicubic with antialias, as uint8 (torchvision's native uint8 kernel on CPU),
                then (x - 127.5) / 127.5 in float32 (rescale 1/255 fused with mean = std = 0.5).
                The depth comes back at S x S and is resized to H x W, bicubic, align_corners=False
                (post_process_depth_estimation). The resize runs on the CPU on every device, as the
                processor does: torchvision resizes uint8 natively only there (elsewhere through
                float32, rounded), and only the small S x S image is then uploaded.
Matter          VitMatteImageProcessor: the image (x - 127.5) / 127.5, the trimap x * (1/255), concatenated
                to 4 channels and zero-padded at the bottom/right to multiples of 32; the alpha is cropped
                back to H x W.

`trimap_from_mask` turns a SAM subject mask into the trimap ViTMatte expects.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from editrt.errors import InputError

TRIMAP_BACKGROUND, TRIMAP_UNKNOWN, TRIMAP_FOREGROUND = 0, 128, 255
MATTING_SIZE_DIVISOR = 32  # VitMatteImageProcessor's size_divisor: the ViTMatte input side is padded to a multiple of it


def _check_rgb(rgb, what: str = "image") -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = f"{rgb.dtype} {list(rgb.shape)}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise InputError(f"{what}: expected a uint8 RGB array [H, W, 3], got {got}", field=what)
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise InputError(f"{what}: expected a non-empty image, got {list(rgb.shape)}", field=what)
    return rgb


def _normalize_rgb(image_uint8: torch.Tensor) -> torch.Tensor:
    """[1, 3, h, w] uint8 -> (x - 127.5) / 127.5 float32: transformers' fused rescale(1/255) + normalize(0.5, 0.5)."""
    half = torch.tensor(0.5 * 255.0, dtype=torch.float32, device=image_uint8.device)  # mean * (1 / rescale_factor)
    return image_uint8.to(torch.float32).sub_(half).div_(half)


def resize_uint8_bicubic(image_uint8: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's resize of a uint8 [N, C, h, w] CPU image (bicubic, antialias): its native uint8 kernel."""
    if tuple(image_uint8.shape[-2:]) == tuple(size):
        return image_uint8  # torchvision returns the image unchanged
    return F.interpolate(image_uint8, size=list(size), mode="bicubic", align_corners=False, antialias=True)



def _owned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous, writable view or copy: torch.from_numpy warns on read-only arrays (PIL-backed images,
    a session's frozen copies) though nothing here writes into them."""
    return a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C")

class CapturedCall:
    """`engine(pixel_values=x)` replayed from one CUDA graph at one fixed input shape (DPT's S x S).

    As the scheduler's loops (runtime/scheduler.py): a warm-up on a side stream (allocations, cuDNN and
    inductor autotuning), `before_capture()`, then one capture (thread_local: another thread's CUDA work
    does not invalidate it). A call copies its input into the static buffer, puts the engine's weights in
    place (`prepare()`), replays, and returns the static outputs: the caller reads them before the next
    call (DepthEstimator resizes them at once). Callers serialise calls (the pipeline's work queue).
    """

    def __init__(self, engine, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype):
        self.engine, self.device = engine, device
        self.static_input = torch.zeros(shape, device=device, dtype=dtype)
        self.graph, self.outputs = None, None

    def _capture(self) -> None:
        main, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                self.engine(pixel_values=self.static_input)
        main.wait_stream(side)
        self.engine.before_capture()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), torch.no_grad():
            self.outputs = self.engine(pixel_values=self.static_input)

    def __call__(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        self.static_input.copy_(pixel_values)
        self.engine.prepare()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.outputs


class DepthEstimator:
    """uint8 RGB [H, W, 3] -> relative inverse depth float32 [H, W] (MiDaS / DPT: larger = nearer).

    `cuda_graph`: replay the engine from one CUDA graph (its input is always S x S), where the engine
    supports capture (torch on CUDA); elsewhere it runs eagerly. The graph is captured on the first call.
    """

    def __init__(self, engine, image_size: int, device, dtype, cuda_graph: bool = False):
        self.engine, self.image_size = engine, int(image_size)
        self.device, self.dtype = torch.device(device), dtype
        self.captured = None
        if cuda_graph and getattr(engine, "supports_cuda_graph", False):
            self.captured = CapturedCall(engine, (1, 3, self.image_size, self.image_size), self.device, dtype)

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """The engine's `pixel_values` [1, 3, S, S] (DPTImageProcessor's, then cast to the engine dtype)."""
        rgb = _check_rgb(rgb)
        image = torch.from_numpy(_owned(rgb)).permute(2, 0, 1)[None].contiguous()
        image = resize_uint8_bicubic(image, (self.image_size, self.image_size))
        return _normalize_rgb(image.to(self.device)).to(self.dtype)

    def postprocess(self, predicted_depth: torch.Tensor, height: int, width: int) -> np.ndarray:
        """[1, S, S] -> [H, W]: post_process_depth_estimation's bicubic resize (align_corners=False)."""
        depth = F.interpolate(predicted_depth.to(torch.float32)[:, None], size=(height, width), mode="bicubic",
                              align_corners=False)
        return depth[0, 0].cpu().numpy()

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        pixel_values = self.preprocess(rgb)
        run = self.captured if self.captured is not None else (lambda x: self.engine(pixel_values=x))
        predicted = run(pixel_values)["predicted_depth"]
        return self.postprocess(predicted, rgb.shape[0], rgb.shape[1])


class Matter:
    """uint8 RGB [H, W, 3] + uint8 trimap [H, W] (0 / 128 / 255) -> alpha float32 [H, W] in [0, 1]."""

    def __init__(self, engine, device, dtype):
        self.engine, self.device, self.dtype = engine, torch.device(device), dtype

    def preprocess(self, rgb: np.ndarray, trimap: np.ndarray) -> torch.Tensor:
        """The engine's `pixel_values` [1, 4, H', W'] (VitMatteImageProcessor's, then cast to the engine dtype)."""
        rgb = _check_rgb(rgb)
        if not isinstance(trimap, np.ndarray) or trimap.dtype != np.uint8 or trimap.shape != rgb.shape[:2]:
            got = f"{trimap.dtype} {list(trimap.shape)}" if isinstance(trimap, np.ndarray) else type(trimap).__name__
            raise InputError(f"trimap: expected uint8 [{rgb.shape[0]}, {rgb.shape[1]}] (0 background, 128 unknown, "
                             f"255 foreground) matching the image, got {got}", field="trimap")
        image = torch.from_numpy(_owned(rgb)).to(self.device).permute(2, 0, 1)[None]
        tri = torch.from_numpy(_owned(trimap)).to(self.device)[None, None]
        x = torch.cat([_normalize_rgb(image), tri * (1 / 255)], dim=1)  # uint8 * float: float32, as the processor
        height, width = rgb.shape[:2]
        pad_h, pad_w = (-height) % MATTING_SIZE_DIVISOR, (-width) % MATTING_SIZE_DIVISOR
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # zeros at the bottom and right, as tvF.pad(0, 0, pad_w, pad_h)
        return x.to(self.dtype)

    def __call__(self, rgb: np.ndarray, trimap: np.ndarray) -> np.ndarray:
        pixel_values = self.preprocess(rgb, trimap)
        alphas = self.engine(pixel_values=pixel_values)["alphas"]
        height, width = rgb.shape[:2]
        return alphas[0, 0, :height, :width].to(torch.float32).cpu().numpy()


def _dilate(mask: torch.Tensor, band: int) -> torch.Tensor:
    """Binary dilation by a (2 band + 1)^2 square; outside the image counts as background."""
    k = 2 * band + 1
    # separable: a square window is a row window after a column window
    x = F.max_pool2d(mask, (k, 1), stride=1, padding=(band, 0))
    return F.max_pool2d(x, (1, k), stride=1, padding=(0, band))


def trimap_from_mask(mask: np.ndarray, band: int) -> np.ndarray:
    """bool [H, W] subject mask -> uint8 trimap for matting, `band` pixels wide on each side of the edge.

    Geometry: with S the (2 band + 1) x (2 band + 1) square, foreground (255) = the mask eroded by S,
    unknown (128) = the mask dilated by S minus the eroded mask, background (0) = the rest. The image
    edge is not an edge of the subject: erosion treats pixels outside the image as foreground
    (a subject cut by the frame stays foreground there), dilation treats them as background.
    So the unknown band is 2 band pixels wide across each edge of the subject (band inside, band outside).
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype != np.bool_:
        got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise InputError(f"mask: expected a bool array [H, W], got {got}", field="mask")
    if isinstance(band, bool) or not isinstance(band, (int, np.integer)) or band < 1:
        raise InputError(f"trimap band {band!r}: expected a whole number of pixels >= 1", field="trimap_band")
    band = int(band)
    if not mask.any():
        raise InputError("mask: empty (no subject pixel); expected the subject's mask", field="mask")
    m = torch.from_numpy(_owned(mask)).to(torch.float32)[None, None]
    dilated = _dilate(m, band)[0, 0] > 0
    eroded = ~(_dilate(1 - m, band)[0, 0] > 0)  # erosion = complement of the background's dilation
    if not eroded.any():
        raise InputError(f"trimap band {band}: larger than the subject (eroding the {int(mask.sum())}-pixel mask by "
                         f"{band} px leaves no foreground); use a smaller band", field="trimap_band")
    trimap = torch.full(mask.shape, TRIMAP_BACKGROUND, dtype=torch.uint8)
    trimap[dilated] = TRIMAP_UNKNOWN
    trimap[eroded] = TRIMAP_FOREGROUND
    return trimap.numpy()


def estimators_from_engines(engines: dict, device, dtype,
                            cuda_graphs: bool = False) -> tuple[DepthEstimator | None, Matter | None]:
    """(DepthEstimator, Matter) for `build_engines`' engines; None where the weights folder lacks the model.

    `cuda_graphs` (the built editor's resolved option): the depth estimator replays a CUDA graph where its
    engine supports it. Matting runs eagerly: its input size follows the image (one graph per size would
    hold one activation pool per size).
    """
    depth = engines.get("depth_estimator")
    matting = engines.get("matting")
    estimator = None
    if depth is not None:
        size = depth.spec.input("pixel_values").axes[-1]  # fixed S x S (export/specs.py)
        estimator = DepthEstimator(depth, size, device, dtype, cuda_graph=cuda_graphs)
    return estimator, (Matter(matting, device, dtype) if matting is not None else None)
