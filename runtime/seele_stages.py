"""SEELE's non-generative pre/post-processing rules (paper 000, Sec. 3 and App. A.3), as pure numpy.

The networks (DPT depth, ViTMatte alpha) live in runtime/estimators.py; this module holds only the
rules the pipeline applies to their outputs, so each rule can be checked against hand-made scenes.

Depth. DPT / MiDaS predict *relative inverse depth*: larger = nearer, known only up to an unknown
scale and shift. Every rule here is therefore stated so that it needs no metric depth:

* Occlusion (App. A.3 i). The depth map is min-max normalised over the image to [0, 1]
  (`normalized_depth`: invariant to the unknown scale and shift). The subject's depth is the median
  of that map over the subject at its ORIGINAL location (robust to SAM edge pixels that touch the
  background). A pixel occludes the moved subject where
      normalized_depth > subject_depth + OCCLUSION_MARGIN        (margin 0.05 of the image's depth range)
  and the pixel is not the subject itself (nor its shadow, which moves with it). The margin keeps
  depth noise on a surface at the subject's own depth (the ground it stands on) from cutting holes.
  The subject keeps its depth when moved: moving it "behind" something means onto pixels nearer than
  it was.
* Perspective (App. A.3 ii). The footpoint is the bottom of the subject's mask (its lowest rows: the
  bottom FOOT_BAND of its height, at least one row), where it stands on the ground. Under a pinhole
  camera the image size of an object is proportional to its inverse depth, so moving the footpoint
  from inverse depth d_old to d_new scales the subject by d_new / d_old (medians over the footpoint
  pixels, sampled in the original depth map at the old and the moved positions), clamped to
  SCALE_RANGE = [0.25, 4]. A small epsilon (1e-3 of the image's largest inverse depth) keeps the ratio
  finite where DPT's final ReLU outputs 0. The unknown shift of relative depth makes this an
  approximation, as in the paper. The scaled subject keeps its footpoint where it was dropped
  (`footpoint_anchor_dy`), rather than its box centre.

Matting (App. A.3 iii). The trimap comes from the SAM mask (estimators.trimap_from_mask: eroded mask
= foreground, a band of `trimap_band` pixels on either side of the edge = unknown). ViTMatte's alpha is
forced to the trimap's known values (0 outside, 1 inside: they are known) and moved with the subject.
Compositing: out = alpha * subject + (1 - alpha) * background in float32, rounded half up
(floor(x + 0.5)) to uint8. The REMOVE void follows alpha > 0 (then dilated as without matting), so
the halo of old background that SAM's hard mask carries is removed, not moved.

Shadows (App. A.3 iv) are regions: an existing shadow (`existing_shadow`, original coordinates) is
united with the subject for moving and removing, and its moved copy is regenerated with the complete
prompt; a region where a new shadow is cast (`new_shadow_region`, output coordinates; a mask or a box
clipped to the image) is harmonized with the LoRA harmonizer. `as_region` validates either form.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from editrt.errors import InputError
from editrt.runtime.images import as_mask

OCCLUSION_MARGIN = 0.05  # of the image's normalised inverse-depth range
SCALE_RANGE = (0.25, 4.0)  # perspective scale clamp
FOOT_BAND = 0.05  # fraction of the subject's height that counts as its footpoint
DEPTH_EPS = 1e-3  # of the image's largest inverse depth: keeps the footpoint ratio finite


def default_trimap_band(size_hw: tuple[int, int], subject: np.ndarray | None = None) -> int:
    """Unknown band half-width in pixels: 2% of the short side, at least 2 (6 px on a 300 px photo).

    With `subject`, no wider than what leaves it a foreground (a thin subject: a thinner band; >= 1), so
    the default never fails where the user gave no band; an explicit band too large stays an error."""
    band = max(2, round(0.02 * min(size_hw)))
    if subject is not None and subject.any():
        # erosion by the (2b + 1)^2 square keeps the pixels farther than b (chessboard) from the background;
        # the frame is not an edge (trimap_from_mask's rule): pad with foreground
        padded = np.pad(subject, band + 1, constant_values=True)
        if not padded.all():
            inner = ndimage.distance_transform_cdt(padded, metric="chessboard")[band + 1:-band - 1, band + 1:-band - 1]
            deepest = int(inner[subject].max())
            band = max(1, min(band, deepest - 1))
    return band


# ---------------------------------------------------------------------- depth: occlusion
def normalized_depth(inv_depth: np.ndarray) -> np.ndarray:
    """float32 [H, W] in [0, 1]: min-max normalised relative inverse depth (1 = nearest); 0 where flat."""
    d = np.asarray(inv_depth, dtype=np.float32)
    if d.ndim != 2 or not np.isfinite(d).all():
        raise InputError(f"depth: expected a finite 2-D map, got shape {list(d.shape)}", field="depth")
    lo, hi = float(d.min()), float(d.max())
    if hi - lo <= 0:
        return np.zeros_like(d)
    return (d - lo) / (hi - lo)


def subject_depth(norm_depth: np.ndarray, subject: np.ndarray) -> float:
    """The subject's depth: the median of the normalised map over the subject (original location)."""
    return float(np.median(norm_depth[subject]))


def occluder_from_depth(inv_depth: np.ndarray, subject: np.ndarray, moves_with=None,
                        margin: float = OCCLUSION_MARGIN) -> np.ndarray:
    """bool [H, W]: pixels nearer than the subject by more than `margin`, outside the subject itself
    and outside `moves_with` (its shadow). Where the moved subject lands on them, they hide it."""
    norm = normalized_depth(inv_depth)
    nearer = norm > subject_depth(norm, subject) + margin
    nearer &= ~subject
    if moves_with is not None:
        nearer &= ~moves_with
    return nearer


def depth_png(inv_depth: np.ndarray) -> np.ndarray:
    """uint16 [H, W] for a 16-bit greyscale PNG: normalised inverse depth x 65535, rounded (white = near)."""
    return np.floor(normalized_depth(inv_depth) * 65535.0 + 0.5).astype(np.uint16)


# ---------------------------------------------------------------------- depth: perspective
def footpoint(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the mask's footpoint: its pixels in the bottom FOOT_BAND of its height (>= 1 row)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise InputError("mask: is empty; expected at least one masked pixel", field="mask")
    bottom = rows.max()
    band = max(1, round(FOOT_BAND * (bottom - rows.min() + 1)))
    keep = rows > bottom - band
    return rows[keep], cols[keep]


def perspective_scale(inv_depth: np.ndarray, subject: np.ndarray, dx: float, dy: float,
                      scale_range: tuple[float, float] = SCALE_RANGE, carried: np.ndarray | None = None) -> float:
    """The subject's scale after moving its footpoint by (dx, dy): d_new / d_old of relative inverse
    depth at the footpoints (medians), clamped to `scale_range`. Footpoint pixels moved outside the
    image are not sampled; all of them outside is an InputError, except for a subject cut by the image's
    bottom edge moved down: its feet are out of frame, and the lowest visible row is its footpoint.

    A new footpoint on the moved pixels themselves (`carried`: the subject and its shadow, default the
    subject; e.g. a subject dragged up by less than its height) would read the subject's own depth, not
    the ground's: there the row's median over the pixels not carried stands in for the hidden ground
    (a ground plane's inverse depth is about constant along a row)."""
    d = np.clip(np.asarray(inv_depth, dtype=np.float32), 0.0, None)  # inverse depth is >= 0
    h, w = d.shape
    rows, cols = footpoint(subject)
    new_r, new_c = np.round(rows + dy).astype(int), np.round(cols + dx).astype(int)
    inside = (new_r >= 0) & (new_r < h) & (new_c >= 0) & (new_c < w)
    if not inside.any() and rows.max() == h - 1 and dy > 0:
        # cut by the bottom edge and moved down: its feet are out of frame before and after the move, so its
        # lowest visible row (the image's last) stands for the footpoint at the new place as at the old one
        new_r = np.minimum(new_r, h - 1)
        inside = (new_c >= 0) & (new_c < w)
    if not inside.any():
        x, y = float(np.mean(cols) + dx), float(rows.max() + dy)
        raise InputError(f"scale auto: the moved subject's footpoint ({x:.0f}, {y:.0f}) is outside the image "
                         f"({w}x{h}); give an explicit scale", field="scale")
    eps = DEPTH_EPS * float(d.max()) or 1e-12
    old = float(np.median(d[rows, cols])) + eps
    nr, nc = new_r[inside], new_c[inside]
    values = d[nr, nc]
    carried = subject if carried is None else carried
    on_carried = carried[nr, nc]
    for r in np.unique(nr[on_carried]):
        free = ~carried[r]
        if free.any():  # a row entirely carried keeps what it reads
            values[(nr == r) & on_carried] = np.median(d[r][free])
    new = float(np.median(values)) + eps
    lo, hi = scale_range
    return float(np.clip(new / old, lo, hi))


def footpoint_anchor_dy(subject: np.ndarray, scale: float, centre_of: np.ndarray | None = None) -> float:
    """Extra vertical move so that scaling about the box centre of `centre_of` (default: the subject; the
    mask images.shift_or_warp scales about) keeps the subject's bottom edge where the plain move puts it:
    (bottom - centre) * (1 - scale)."""
    rows = np.nonzero(subject)[0]
    centre_rows = rows if centre_of is None else np.nonzero(centre_of)[0]
    bottom = rows.max() + 1  # pixel edges, like shift_or_warp's centre
    centre = (centre_rows.min() + centre_rows.max() + 1) / 2
    return (bottom - centre) * (1.0 - scale)


# ---------------------------------------------------------------------- matting and compositing
def refine_alpha(alpha: np.ndarray, trimap: np.ndarray) -> np.ndarray:
    """float32 alpha in [0, 1] with the trimap's known regions imposed (0 = background, 255 = foreground)."""
    a = np.clip(np.asarray(alpha, dtype=np.float32), 0.0, 1.0)
    a[trimap == 0] = 0.0
    a[trimap == 255] = 1.0
    return a


def move_values(values: np.ndarray, subject: np.ndarray, dx: float, dy: float, scale: float) -> np.ndarray:
    """A float map moved exactly like images.shift_or_warp moves the subject's pixels (same centre, same
    affine; an integer move at scale 1 is an exact shift, zeros fill what comes in)."""
    values = np.asarray(values, dtype=np.float32)
    h, w = values.shape
    if scale == 1.0 and float(dx).is_integer() and float(dy).is_integer():
        dx, dy = int(dx), int(dy)
        out = np.zeros_like(values)
        ys, yd = slice(max(0, -dy), min(h, h - dy)), slice(max(0, dy), min(h, h + dy))
        xs, xd = slice(max(0, -dx), min(w, w - dx)), slice(max(0, dx), min(w, w + dx))
        if ys.start < ys.stop and xs.start < xs.stop:
            out[yd, xd] = values[ys, xs]
        return out
    rows, cols = np.nonzero(subject)
    cx, cy = (cols.min() + cols.max() + 1) / 2, (rows.min() + rows.max() + 1) / 2
    inv = 1.0 / scale
    coeffs = (inv, 0.0, cx - (cx + dx) * inv, 0.0, inv, cy - (cy + dy) * inv)
    moved = Image.fromarray(values, mode="F").transform((w, h), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    return np.clip(np.asarray(moved, dtype=np.float32), 0.0, 1.0)


def composite(subject_rgb: np.ndarray, background: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 alpha * subject + (1 - alpha) * background, float32, rounded half up."""
    a = np.asarray(alpha, dtype=np.float32)[:, :, None]
    blend = a * subject_rgb.astype(np.float32) + (1.0 - a) * background.astype(np.float32)
    return np.clip(np.floor(blend + 0.5), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------- shadows and regions
def as_region(region, size_hw: tuple[int, int], name: str) -> np.ndarray:
    """bool [H, W] from a mask (the image's size) or a box (x0, y0, x1, y1) in pixels, clipped to the image.
    Empty (after clipping) is an InputError: the region would do nothing."""
    h, w = size_hw
    if isinstance(region, (list, tuple)):
        try:
            x0, y0, x1, y1 = (float(v) for v in region)
        except (TypeError, ValueError):
            raise InputError(f"{name}: expected a mask or a box (x0, y0, x1, y1), got {region!r}", field=name) from None
        if not all(np.isfinite(v) for v in (x0, y0, x1, y1)):
            raise InputError(f"{name} box {tuple(region)!r}: expected finite pixel coordinates", field=name)
        c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        c1, r1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
        if c1 <= c0 or r1 <= r0:
            raise InputError(f"{name} box ({x0:g}, {y0:g}, {x1:g}, {y1:g}): empty after clipping to the image "
                             f"({w}x{h})", field=name)
        mask = np.zeros((h, w), bool)
        mask[r0:r1, c0:c1] = True
        return mask
    return as_mask(region, size_hw, name)
