"""Typed edit requests: what a user asks an editor to do, validated once, where it is built.

Every front end (the Python API, the CLI, the HTTP server, Triton) translates its own input into
these frozen dataclasses; the pipelines and sessions take nothing else. A bad value raises
`editrt.errors.InputError` whose `field` is the attribute's name below, so a front end maps the
field to its own spelling with one table instead of reading the message.

    edit = SeeleEdit(move=(40, 0), scale="auto", occlusion="auto", matting=True)
    result = RepositionPipeline.from_pretrained(weights)(image, edit, mask=subject, quality=Quality(steps=20))

    edit = ElementsEdit(ops=(MoveElements(ids=(3, 4), dx=12, dy=-5),), prompt="a red car")
    image = session.commit(edit)

Checks that need the image (a mask's size, a box inside the image, a move that leaves the subject
inside it) run where the image is known: in the pipeline, with the same `field`.

Two shadow concepts, two names everywhere: `existing_shadow` is the subject's shadow already in the
image (it moves and is removed with the subject); `new_shadow_region` is where a new shadow is cast
(harmonized by the LoRA harmonizer).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np

from editrt.errors import InputError

__all__ = ["DeleteElements", "ElementOp", "ElementsEdit", "InsertElements", "MoveElements", "Quality",
           "ResizeElements", "SeeleEdit", "frozen_array"]

SCALE_RANGE = (0.05, 20.0)  # an explicit subject / element scale factor
REMOVE_ORDERS = ("cached", "paper")  # SeeleEdit.remove_order


def frozen_array(value, field: str) -> np.ndarray:
    """A read-only numpy copy of a mask given as an array, a PIL image ('L') or a torch tensor."""
    from PIL import Image

    if isinstance(value, Image.Image):
        value = np.asarray(value.convert("L"))
    elif type(value).__module__.startswith("torch"):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise InputError(f"{field}: expected a mask (array or PIL image), got {type(value).__name__}", field=field)
    out = np.array(value, copy=True)
    out.setflags(write=False)
    return out


def _finite_numbers(value, count: int, field: str, what: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{field}: expected {what}, got {value!r}", field=field) from None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise InputError(f"{field}: expected {what} (finite numbers), got {value!r}", field=field)
    return numbers


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_scale(scale, field: str) -> float:
    if not _is_number(scale) or not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        raise InputError(f"{field}: expected a number in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}]"
                         f"{' or auto' if field == 'scale' else ''}, got {scale!r}", field=field)
    return float(scale)


@dataclass(frozen=True)
class Quality:
    """How a result is rendered (not what it shows): the denoising loop's length, noise and canvas."""

    steps: int = 50  # denoising steps per generative pass
    guidance: float | None = None  # classifier-free guidance scale; None: the editor's (SEELE 1.0 = off, EIE 3.0)
    seed: int = 0  # the initial noise's seed (each SEELE pass adds its stage number)
    resolution: int | None = None  # processing short side in pixels, a multiple of 8; None: the model's
    # a drag preview: decoded by the weights' tiny VAE (vae_tiny/) where the torch backend loaded one; finals never
    preview: bool = False
    # region crops (runtime/crop.py): each generative pass works on the box around what it regenerates, padded by
    # crop_padding pixels (None: the whole image); crop_size "native" (the default with a padding: the box at its own
    # resolution, at most the processing size) or "processing" (resized to the processing size, as diffusers does)
    crop_padding: int | None = None
    crop_size: Literal["processing", "native"] | None = None

    def __post_init__(self):
        if not isinstance(self.steps, (int, np.integer)) or isinstance(self.steps, bool) or self.steps < 1:
            raise InputError(f"steps: expected a positive integer, got {self.steps!r}", field="steps")
        if self.guidance is not None and (not _is_number(self.guidance) or not self.guidance >= 1.0):
            raise InputError(f"guidance: expected >= 1.0 (1.0 = no classifier-free guidance), got {self.guidance}",
                             field="guidance")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            raise InputError(f"seed: expected an integer >= 0, got {self.seed!r}", field="seed")
        if self.resolution is not None and (not isinstance(self.resolution, (int, np.integer))
                                            or self.resolution < 8 or self.resolution % 8):
            raise InputError(f"resolution: expected a positive multiple of 8, got {self.resolution}",
                             field="resolution")
        if not isinstance(self.preview, bool):
            raise InputError(f"preview: expected True or False, got {self.preview!r}", field="preview")
        if self.crop_padding is not None or self.crop_size is not None:
            from editrt.runtime.crop import check_crop

            object.__setattr__(self, "crop_size", check_crop(self.crop_padding, self.crop_size))  # None -> "native"

    def guidance_or(self, default: float) -> float:
        return default if self.guidance is None else float(self.guidance)


# ---------------------------------------------------------------------- subject repositioning (SEELE)
@dataclass(frozen=True)
class SeeleEdit:
    """One repositioning of the selected subject (SEELE, paper 000; runtime/seele_stages.py states each rule)."""

    move: tuple[float, float] = (0.0, 0.0)  # (dx, dy) in pixels
    scale: float | Literal["auto"] = 1.0  # a factor in [0.05, 20], or "auto": perspective from depth
    occlusion: Literal["none", "auto"] | np.ndarray = "none"  # "auto": nearer pixels (depth) hide it; or an occluder mask
    matting: bool = False  # composite the subject with its ViTMatte alpha
    trimap_band: int | None = None  # matting: unknown band in pixels (None: 2% of the short side)
    harmonize: bool = True  # harmonize the pasted subject (and the new shadow) with the LoRA harmonizer
    complete_mask: np.ndarray | None = None  # completion: the occluded / cut-off part to complete (output pixels)
    dilation: int | None = None  # completion: px the REMOVE void and harmonize area grow by (None: 1% of the short side)
    existing_shadow: np.ndarray | None = None  # the subject's shadow already in the image: moves and is removed with it
    new_shadow_region: np.ndarray | tuple[float, float, float, float] | None = None  # mask or box where a new shadow is cast
    # "cached": REMOVE on the unmoved image, paste after (a drag reuses the REMOVE pass); "paper": SEELE's order,
    # the subject pasted first and REMOVE run with it in view (the void minus the moved subject; not memoized)
    remove_order: Literal["cached", "paper"] = "cached"

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "move", _finite_numbers(self.move, 2, "move", "(dx, dy) in pixels"))
        if not (isinstance(self.scale, str) and self.scale == "auto"):
            set_(self, "scale", _check_scale(self.scale, "scale"))
        if isinstance(self.occlusion, str):
            if self.occlusion not in ("none", "auto"):
                raise InputError(f"occlusion: expected 'none', 'auto' or a mask, got {self.occlusion!r}",
                                 field="occlusion")
        elif self.occlusion is None:
            set_(self, "occlusion", "none")
        else:
            set_(self, "occlusion", frozen_array(self.occlusion, "occlusion"))
        for name in ("matting", "harmonize"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InputError(f"{name}: expected true or false, got {getattr(self, name)!r}", field=name)
        if self.trimap_band is not None:
            if not self.matting:
                raise InputError("trimap_band: only with matting on", field="trimap_band")
            if not isinstance(self.trimap_band, (int, np.integer)) or isinstance(self.trimap_band, bool) \
                    or self.trimap_band < 1:
                raise InputError(f"trimap_band: expected a positive integer (pixels), got {self.trimap_band!r}",
                                 field="trimap_band")
        if self.dilation is not None and (not isinstance(self.dilation, (int, np.integer)) or self.dilation < 0):
            raise InputError(f"dilation: expected an integer >= 0 (pixels), got {self.dilation!r}", field="dilation")
        if self.remove_order not in REMOVE_ORDERS:
            raise InputError(f"remove_order: expected one of {', '.join(REMOVE_ORDERS)}, got {self.remove_order!r}",
                             field="remove_order")
        for name in ("complete_mask", "existing_shadow"):
            if getattr(self, name) is not None:
                set_(self, name, frozen_array(getattr(self, name), name))
        region = self.new_shadow_region
        if region is not None:
            if not self.harmonize:
                raise InputError("new_shadow_region: the shadow is generated by the harmonizer; it needs harmonize on",
                                 field="new_shadow_region")
            if isinstance(region, (list, tuple)):
                set_(self, "new_shadow_region", _finite_numbers(region, 4, "new_shadow_region",
                                                                "a mask or a box (x0, y0, x1, y1)"))
            else:
                set_(self, "new_shadow_region", frozen_array(region, "new_shadow_region"))

    @property
    def auto_scale(self) -> bool:
        return isinstance(self.scale, str)

    @property
    def auto_occlusion(self) -> bool:
        return isinstance(self.occlusion, str) and self.occlusion == "auto"

    @property
    def occluder_mask(self) -> np.ndarray | None:
        """The occluder given as a mask (None for "none" / "auto")."""
        return None if isinstance(self.occlusion, str) else self.occlusion

    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray))


# Keyword spellings older releases took, and the SeeleEdit attribute each means (RepositionPipeline's keyword form).
LEGACY_SEELE_KEYWORDS = {"occluder_mask": "occlusion", "shadow_mask": "existing_shadow",
                         "shadow_region": "new_shadow_region"}
QUALITY_KEYWORDS = ("steps", "guidance", "seed", "resolution", "crop_padding", "crop_size")


def seele_request(edit: SeeleEdit | None, quality: Quality | None, keywords: dict) -> tuple[SeeleEdit, Quality]:
    """The one place where the keyword form of a SEELE call becomes (SeeleEdit, Quality).

    `keywords` are SeeleEdit attributes, Quality attributes, or the legacy names above; giving an edit
    (or a quality) and keywords for it is an error, as is naming one concept twice."""
    quality_kw = {k: keywords.pop(k) for k in QUALITY_KEYWORDS if k in keywords}
    if quality is not None and quality_kw:
        raise InputError(f"{next(iter(quality_kw))}: give quality=Quality(...) or the keyword, not both",
                         field=next(iter(quality_kw)))
    quality = quality if quality is not None else Quality(**quality_kw)
    names = {f.name for f in fields(SeeleEdit)}
    edit_kw = {}
    for key, value in keywords.items():
        name = LEGACY_SEELE_KEYWORDS.get(key, key)
        if name not in names:
            raise TypeError(f"unexpected keyword argument {key!r}")
        if key != name and value is None:  # an older spelling left at its default
            continue
        if key != name:
            warnings.warn(f"{key}= is the older spelling of {name}=; it will be removed", DeprecationWarning,
                          stacklevel=3)
        if name in edit_kw and not (name == "occlusion" and _is_none_occlusion(edit_kw[name])):
            raise InputError(f"{name}: given twice ({key} is the older spelling of {name})", field=name)
        if name == "occlusion" and _is_none_occlusion(value) and name in edit_kw:
            continue  # occlusion="none" beside occluder_mask=M: the mask
        edit_kw[name] = value
    if edit is not None and edit_kw:
        raise InputError(f"{next(iter(edit_kw))}: give the edit as a SeeleEdit or as keywords, not both",
                         field=next(iter(edit_kw)))
    return (edit if edit is not None else SeeleEdit(**edit_kw)), quality


def _is_none_occlusion(value) -> bool:
    return value is None or (isinstance(value, str) and value == "none")


# ---------------------------------------------------------------------- editable image elements
def _ids(ids, field: str = "ids") -> tuple[int, ...]:
    ids = (ids,) if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool) else ids
    try:
        out = tuple(ids)
    except TypeError:
        raise InputError(f"{field}: expected element ids, got {ids!r}", field=field) from None
    if not out or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in out):
        raise InputError(f"{field}: expected at least one element id (integers >= 0), got {ids!r}", field=field)
    return tuple(int(i) for i in out)


@dataclass(frozen=True)
class MoveElements:
    """Move elements by (dx, dy) image pixels; elements their regions then cover are deleted."""

    ids: tuple[int, ...]  # the elements to move
    dx: float = 0.0  # pixels, + right
    dy: float = 0.0  # pixels, + down

    def __post_init__(self):
        object.__setattr__(self, "ids", _ids(self.ids))
        dx, dy = _finite_numbers((self.dx, self.dy), 2, "move", "(dx, dy) in pixels")
        object.__setattr__(self, "dx", dx)
        object.__setattr__(self, "dy", dy)

    def apply(self, elements) -> list[int]:
        return elements.move(list(self.ids), self.dx, self.dy)


@dataclass(frozen=True)
class ResizeElements:
    """Scale elements about their centroids; elements their regions then cover are deleted."""

    ids: tuple[int, ...]  # the elements to resize
    scale: float = 1.0  # factor in [0.05, 20]

    def __post_init__(self):
        object.__setattr__(self, "ids", _ids(self.ids))
        object.__setattr__(self, "scale", _check_scale(self.scale, "scale"))

    def apply(self, elements) -> list[int]:
        return elements.resize(list(self.ids), self.scale)


@dataclass(frozen=True)
class DeleteElements:
    """Delete elements (the decoder sees all-zero tokens for them)."""

    ids: tuple[int, ...]  # the elements to delete

    def __post_init__(self):
        object.__setattr__(self, "ids", _ids(self.ids))

    def apply(self, elements) -> list[int]:
        return elements.delete(list(self.ids))


@dataclass(frozen=True)
class InsertElements:
    """Copy elements of another Elements (another image's partition) here, their joint centroid at `at`."""

    source: object  # the Elements to copy from (a snapshot is taken)
    ids: tuple[int, ...]  # ids in `source`
    at: tuple[float, float]  # (x, y) image pixels of the inserted group's centroid

    def __post_init__(self):
        from editrt.runtime.elements import Elements

        if not isinstance(self.source, Elements):
            raise InputError(f"source: expected Elements, got {type(self.source).__name__}", field="source")
        object.__setattr__(self, "source", self.source.copy())
        object.__setattr__(self, "ids", _ids(self.ids))
        object.__setattr__(self, "at", _finite_numbers(self.at, 2, "at", "(x, y) in pixels"))

    def apply(self, elements) -> list[int]:
        return elements.insert(self.source, list(self.ids), self.at)[1]


ElementOp = MoveElements | ResizeElements | DeleteElements | InsertElements
ELEMENT_OPS = (MoveElements, ResizeElements, DeleteElements, InsertElements)


@dataclass(frozen=True)
class ElementsEdit:
    """Edits of an image's elements (EIE, paper 001), applied in order, and the text the decoder renders with."""

    ops: tuple[ElementOp, ...] = ()  # MoveElements / ResizeElements / DeleteElements / InsertElements, in order
    prompt: str = ""  # the text condition C (empty: only the elements condition)

    def __post_init__(self):
        ops = tuple(self.ops) if isinstance(self.ops, (list, tuple)) else None
        if ops is None or not all(isinstance(op, ELEMENT_OPS) for op in ops):
            raise InputError(f"ops: expected a sequence of MoveElements / ResizeElements / DeleteElements / "
                             f"InsertElements, got {self.ops!r}", field="ops")
        object.__setattr__(self, "ops", ops)
        if not isinstance(self.prompt, str):
            raise InputError(f"prompt: expected text, got {type(self.prompt).__name__}", field="prompt")

    def apply(self, elements) -> list[int]:
        """Apply the ops to `elements` in place; returns every id deleted (sorted). An op the elements refuse
        raises ElementsError naming the op's field (ids, dx, dy, scale, at), or 'ops' where Elements names none."""
        from editrt.errors import ElementsError

        deleted: list[int] = []
        for op in self.ops:
            try:
                deleted += op.apply(elements)
            except ElementsError as e:
                if e.field is not None:
                    raise
                raise ElementsError(str(e), field="ops") from None
        return sorted(set(deleted))
