"""Clean-up of the elements partition's label map: 3x3 opening, then each element's largest piece.

Contract (``clean_labels_reference``, the scipy path; paper 001 Algorithm 2, last step). For labels
[H, W] with element ids in [0, N) and -1 for "no element", every element n separately:

    region = labels[box_n] == n                       box_n: n's bounding box (ndimage.find_objects)
    region = binary_opening(region, 3x3 square, opening iterations)     border_value = 0
    pieces = ndimage.label(region, 4-connectivity)
    keep the largest piece (ties: the lowest piece number = first in raster order); the rest -> -1

Native op (``torch.ops.editrt_native.cleanup_labels``, kernels/csrc/, built by CMakeLists.txt through
setup.py). All elements in one pass over the image, on the labels' device, exactly equal to the
contract: the crop only adds background around an element, and every eroded and re-dilated set
stays inside its element, so a label-aware opening of the whole image (pixels outside the image
are background) gives each element's opened set; 4-connected pieces come from union-find whose
roots are each piece's first pixel in raster order, the order ndimage.label numbers pieces in.
The op also returns per-element statistics of the result, (count, sum of columns, sum of rows,
x0, y0, x1, y1), from which ``cleanup`` builds counts, centroids and boxes with the same formula
as ``slic.element_stats``. Launches are recorded as ``cleanup_labels_cpu`` / ``cleanup_labels_cuda``.
Byte floor: read the int64 labels once and write the result once, 16 * H * W bytes (4 MiB at 512^2);
both implementations re-read byte masks (H * W each) per opening iteration on top of that.

Dispatch (``cleanup``): the native op for the labels' device when its library is loaded and has a
kernel for that device; otherwise the scipy path (on the host) with a one-line warning the first
time. ``EDITRT_NATIVE=0`` (read at call time) forces the scipy path, without a warning. The
library is ``kernels/_editrt_native*.so``, written there by ``pip install -e .`` or
``python setup.py build_native`` with ``_editrt_native.built_with.json`` beside it (the torch it was built
against; a library built for another torch is reported, not loaded). Bad input raises ValueError naming the input and what was
expected (kernels import nothing of editrt; the runtime turns it into InputError).
"""
from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from . import launches

ENV_VAR = "EDITRT_NATIVE"
LIBRARY_GLOB = "_editrt_native*.so"  # in this folder (setup.py's build step puts it here)
OP_NAME = "editrt_native::cleanup_labels"

_lock = threading.Lock()
_loaded: dict = {}  # filled once by _load(): {"ok": bool, "error": str | None, "path": str | None}
_warned: set[str] = set()


@dataclass
class Cleaned:
    labels: torch.Tensor  # int64 [H, W]: element id, or -1 (dropped)
    counts: torch.Tensor  # int64 [N] pixels per element
    centroids: torch.Tensor  # float32 [N, 2] (x, y) in [0, 1]; NaN for an element without pixels
    boxes: torch.Tensor  # int64 [N, 4] (x0, y0, x1, y1) inclusive; -1 for an element without pixels


# --------------------------------------------------------------------------------------------
# Reference (the contract)
# --------------------------------------------------------------------------------------------


def clean_labels_reference(labels: np.ndarray, num_elements: int, opening: int = 1) -> np.ndarray:
    """Morphological opening of each element, then keep its largest connected piece; the rest -> -1."""
    out = np.full_like(labels, -1)
    square = np.ones((3, 3), bool)  # opening by a 3x3 square: removes 1-2 px slivers, keeps boxes whole
    cross = ndimage.generate_binary_structure(2, 1)  # 4-connectivity: an element must be one 4-connected piece
    for n, box in enumerate(ndimage.find_objects(labels + 1, max_label=num_elements)):
        if box is None:
            continue
        region = labels[box] == n
        if opening > 0:
            region = ndimage.binary_opening(region, structure=square, iterations=opening)
        pieces, count = ndimage.label(region, structure=cross)
        if count == 0:
            continue
        largest = 1 + int(np.argmax(ndimage.sum_labels(region, pieces, index=np.arange(1, count + 1))))
        out[box][pieces == largest] = n
    return out


def fill_dropped(labels: torch.Tensor, fillable: torch.Tensor | None = None) -> torch.Tensor:
    """Give each dropped pixel (-1) to a neighbouring element, on the labels' device (any device, same result).

    Grows the elements into the dropped pixels one 4-neighbour ring at a time: a dropped pixel with
    labelled 4-neighbours takes the lowest of their ids. Each filled pixel touches a pixel of its element
    filled before it, so an element that was one 4-connected piece stays one. `fillable` (bool [H, W],
    default: every pixel) limits which dropped pixels are filled; the others stay -1 and are not grown
    through. Dropped pixels that no element can reach stay -1 (a map without any element stays as it is).
    Rounds: the largest 4-connected distance from a dropped pixel to an element (1-2 after the 3x3 opening's
    slivers; larger where a dropped piece was wide).
    """
    out = labels.clone()
    todo = out < 0 if fillable is None else (out < 0) & fillable.to(out.device, torch.bool)
    none = torch.iinfo(torch.int64).max  # "no element" in the min below
    while bool(todo.any()):
        keyed = torch.full((out.shape[0] + 2, out.shape[1] + 2), none, dtype=torch.int64, device=out.device)
        keyed[1:-1, 1:-1] = torch.where(out >= 0, out, none)
        lowest = torch.minimum(torch.minimum(keyed[:-2, 1:-1], keyed[2:, 1:-1]),
                               torch.minimum(keyed[1:-1, :-2], keyed[1:-1, 2:]))
        grow = todo & (lowest != none)
        if not bool(grow.any()):
            break
        out = torch.where(grow, lowest, out)
        todo &= ~grow
    return out


# --------------------------------------------------------------------------------------------
# The native library
# --------------------------------------------------------------------------------------------


def native_disabled() -> bool:
    """True when EDITRT_NATIVE=0 switches the native ops off."""
    return os.environ.get(ENV_VAR, "1").strip() in ("0", "false", "False", "off")


def library_path() -> Path | None:
    """The built library in this folder (the newest, should stale builds remain), or None."""
    found = sorted(Path(__file__).parent.glob(LIBRARY_GLOB), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def built_with(path: Path) -> dict | None:
    """What setup.py recorded beside the library: {"torch": version it was built against}, or None."""
    record = path.with_name(path.name.split(".")[0] + ".built_with.json")
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):
        return None


def _load() -> dict:
    with _lock:
        if not _loaded:
            path = library_path()
            record = built_with(path) if path is not None else None
            if path is None:
                _loaded.update(ok=False, path=None, error=f"no native library built (kernels/{LIBRARY_GLOB}; "
                               "`pip install -e .` or `python setup.py build_native` builds it)")
            elif record is None or record.get("torch") != torch.__version__:
                # A custom-op library built against another torch can crash the process when loaded.
                found = "no record of the torch it was built against" if record is None else \
                    f"it was built against torch {record.get('torch')}"
                _loaded.update(ok=False, path=str(path), error=f"{path.name} not loaded: {found}, this is torch "
                               f"{torch.__version__}; `pip install -e .` or `python setup.py build_native` "
                               "rebuilds it")
            else:
                try:
                    torch.ops.load_library(str(path))
                    _loaded.update(ok=True, path=str(path), error=None)
                except (OSError, RuntimeError) as e:  # a foreign build: reported, the scipy path runs
                    first = (str(e).strip().splitlines() or [""])[0]
                    _loaded.update(ok=False, path=str(path), error=f"loading {path.name} failed: {first}")
        return _loaded


def _has_kernel(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key)


def native_status() -> dict:
    """{"cpu": CPU op loaded, "cuda": CUDA op loaded, "error": why not (None when loaded)} (`editrt doctor`)."""
    if native_disabled():
        return {"cpu": False, "cuda": False, "error": f"disabled by {ENV_VAR}=0"}
    state = _load()
    if not state["ok"]:
        return {"cpu": False, "cuda": False, "error": state["error"]}
    cuda = _has_kernel("cuda")
    return {"cpu": _has_kernel("cpu"), "cuda": cuda,
            "error": None if cuda else "the library was built without CUDA (no nvcc at build time)"}


def native_available(device: torch.device | str) -> bool:
    """Whether `cleanup` runs the native op for tensors on `device` (honours EDITRT_NATIVE=0)."""
    if native_disabled() or not _load()["ok"]:
        return False
    return _has_kernel(torch.device(device).type)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


def _check_inputs(labels, num_elements, opening) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels: expected a torch.Tensor label map, got {type(labels).__name__}")
    if labels.dim() != 2:
        raise ValueError(f"labels: expected a 2-D [H, W] label map, got shape {list(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels: expected int64 element ids (-1 = none), got {labels.dtype}")
    if isinstance(num_elements, bool) or not isinstance(num_elements, (int, np.integer)) or num_elements < 0:
        raise ValueError(f"num_elements: expected an int >= 0, got {num_elements!r}")
    if isinstance(opening, bool) or not isinstance(opening, (int, np.integer)) or opening < 0:
        raise ValueError(f"opening: expected an int >= 0 (3x3 iterations), got {opening!r}")


def _check_range(labels: np.ndarray, num_elements: int) -> None:
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < -1 or high >= num_elements:
            raise ValueError(f"labels: expected ids in [-1, num_elements = {num_elements}), found values from "
                             f"{low} to {high}")


def _finalize(labels: torch.Tensor, stats: torch.Tensor) -> Cleaned:
    from .slic import _finalize_stats  # the formula of slic.element_stats, so both give equal statistics

    H, W = labels.shape
    counts, sum_x, sum_y, x0, y0, x1, y1 = stats.unbind(1)  # each [N]
    counts, centroids, boxes = _finalize_stats(counts, sum_x, sum_y, x0, y0, x1, y1, H, W)
    return Cleaned(labels, counts, centroids, boxes)


def cleanup_reference(labels: torch.Tensor, num_elements: int, opening: int = 1) -> Cleaned:
    """`cleanup` through scipy on the host (the result goes back to the labels' device)."""
    from .slic import element_stats_reference

    _check_inputs(labels, num_elements, opening)
    host = labels.detach().cpu().numpy()
    _check_range(host, int(num_elements))
    cleaned = torch.from_numpy(clean_labels_reference(host, int(num_elements), int(opening)))
    counts, centroids, boxes = element_stats_reference(cleaned, int(num_elements))
    device = labels.device
    return Cleaned(cleaned.to(device), counts.to(device), centroids.to(device), boxes.to(device))


def cleanup_native(labels: torch.Tensor, num_elements: int, opening: int = 1) -> Cleaned:
    """`cleanup` through the native op on the labels' device (raises if it is not available there)."""
    _check_inputs(labels, num_elements, opening)
    if not native_available(labels.device):
        status = native_status()
        raise RuntimeError(f"cleanup_labels: no native kernel for {labels.device.type} ({status['error']})")
    launches.record(f"cleanup_labels_{labels.device.type}")
    cleaned, stats = torch.ops.editrt_native.cleanup_labels(labels, int(num_elements), int(opening))
    return _finalize(cleaned, stats)


def cleanup(labels: torch.Tensor, num_elements: int, opening: int = 1) -> Cleaned:
    """Opening + each element's largest 4-connected piece, and the result's statistics, on labels' device.

    labels: int64 [H, W], ids in [-1, num_elements). Native op when available, else the scipy path.
    """
    _check_inputs(labels, num_elements, opening)
    if native_available(labels.device):
        return cleanup_native(labels, num_elements, opening)
    if not native_disabled():
        reason = native_status()["error"] if labels.device.type == "cpu" else (
            f"no native kernel for {labels.device.type}: {native_status()['error']}")
        _warn_once(labels.device.type, f"editrt: partition clean-up runs the slow scipy path on the host ({reason})")
    return cleanup_reference(labels, num_elements, opening)
