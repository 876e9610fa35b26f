"""Pydantic models for every request and response body, and the one error body.

Static bounds live here (they show in the OpenAPI schema); limits that depend on the server's
settings (pixel counts, upload bytes, step caps) are checked in cost.py, image_codecs.py and the routers.
Images travel as base64 text (a `data:image/png;base64,` prefix is allowed); a multipart upload
of the same field is turned into the same text before validation (routers/common.py).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

MAX_POINTS = 64
MAX_IDS = 1024
MAX_OPS = 256
COORD = 1e5  # pixels: far beyond any allowed image side, so only nonsense is refused here

ImageB64 = Annotated[str, Field(min_length=1, description="PNG or JPEG, base64 (a data: URL is accepted)")]
Coord = Annotated[float, Field(ge=-COORD, le=COORD)]
Point = Annotated[list[Coord], Field(min_length=2, max_length=2, description="(x, y) in image pixels")]
Box = Annotated[list[Coord], Field(min_length=4, max_length=4, description="(x0, y0, x1, y1) in image pixels")]
Steps = Annotated[int, Field(ge=1, le=1000, description="denoising steps (capped by the server's max_steps)")]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]
Guidance = Annotated[float, Field(ge=1.0, le=30.0)]
Resolution = Annotated[int, Field(ge=8, le=4096, multiple_of=8, description="processing short side")]
Scale = Annotated[float, Field(ge=0.05, le=20.0)]
CropPadding = Annotated[int, Field(ge=0, le=int(COORD), description="regenerate only the box around what the edit "
                                                                    "changes, padded by this many pixels (region crop)")]
CropSize = Annotated[Literal["processing", "native"], Field(description="with crop_padding: 'native' (default) the "
                                                                        "box at its own resolution (at most the "
                                                                        "processing size); 'processing' resized to it")]


def _one_scale_error(value, handler):
    """One error for the number-or-'auto' union (pydantic would report each member, under tagged locations)."""
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError("scale", "expected a number in [0.05, 20] or 'auto'") from None


ScaleOrAuto = Annotated[Scale | Literal["auto"], WrapValidator(_one_scale_error),
                        Field(description="a factor, or 'auto': perspective from depth (footpoint inverse-depth ratio, "
                                          "clamped to [0.25, 4])")]
Occlusion = Annotated[Literal["none", "auto"], Field(description="'auto': destination pixels nearer than the subject "
                                                                 "(depth) hide it")]
TrimapBand = Annotated[int, Field(ge=1, le=256, description="matting: unknown band in pixels (default 2% of the short side)")]
Ids = Annotated[list[Annotated[int, Field(ge=0, le=100_000)]], Field(min_length=1, max_length=MAX_IDS)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------------- errors and operations
class ErrorBody(Body):
    error: str = Field(description="a short code: bad_request, unauthorized, not_found, too_large, "
                                   "unsupported_media_type, invalid, busy")
    field: str = Field(description="the request field (or header, or path parameter) the error is about")
    message: str


class Health(Body):
    status: Literal["ok"] = "ok"


class Ready(Body):
    ready: bool
    weights: str
    pipelines: list[str]
    warm: bool
    device: str


class Timing(Body):
    server_ms: float = Field(description="arrival of the request to the response, on the server")
    pipeline_ms: float = Field(description="time the pipeline ran for this request")
    queue_ms: float = Field(description="time the job waited in the work queue")


# ---------------------------------------------------------------------- stateless editing
class Prompt(Body):
    points: list[Point] | None = Field(None, max_length=MAX_POINTS)
    labels: list[Literal[0, 1]] | None = Field(None, max_length=MAX_POINTS,
                                               description="1 foreground, 0 background; one per point")
    box: Box | None = None


class SegmentRequest(Prompt):
    image: ImageB64


class InpaintRequest(Body):
    image: ImageB64
    mask: ImageB64 = Field(description="PNG/JPEG; > 127 is inside; the image's size")
    task: Literal["remove", "complete"] = "remove"
    steps: Steps | None = Field(None, description="denoising steps (default: the server's --steps)")
    guidance: Guidance = 1.0
    seed: Seed = 0
    resolution: Resolution | None = None
    crop_padding: CropPadding | None = None
    crop_size: CropSize | None = None


class SeeleOptions(Body):
    """SEELE's pre/post-processing (runtime/seele_stages.py): occlusion, perspective, matting, a new shadow."""

    scale: ScaleOrAuto = 1.0
    occlusion: Occlusion = "none"
    matting: bool = Field(False, description="composite the subject with its ViTMatte alpha")
    trimap_band: TrimapBand | None = None
    new_shadow_box: Box | None = Field(None, description="where a new shadow is cast (x0, y0, x1, y1), output "
                                                         "pixels: harmonized (or new_shadow_region, a mask)")


class RepositionRequest(Prompt, SeeleOptions):
    image: ImageB64
    mask: ImageB64 | None = Field(None, description="the subject; or give points / box")
    move: Annotated[list[Coord], Field(min_length=2, max_length=2)] = Field(description="(dx, dy) in pixels")
    harmonize: bool = True
    complete_mask: ImageB64 | None = Field(None, description="the part to complete (output coordinates)")
    occluder_mask: ImageB64 | None = Field(None, description="pixels in front of the moved subject (instead of "
                                                             "occlusion 'auto')")
    existing_shadow_mask: ImageB64 | None = Field(None, description="the subject's existing shadow: moved with it, "
                                                                    "regenerated with the complete prompt")
    new_shadow_region: ImageB64 | None = Field(None, description="where a new shadow is cast, as a mask (or "
                                                                 "new_shadow_box)")
    steps: Steps | None = Field(None, description="denoising steps (default: the server's --steps)")
    guidance: Guidance = 1.0
    seed: Seed = 0
    resolution: Resolution | None = None
    crop_padding: CropPadding | None = None
    crop_size: CropSize | None = None


class ElementsBlob(Body):
    """An elements file pair as `editrt elements partition` writes it: the JSON document and the .npz."""

    doc: dict = Field(description="the NAME.json document")
    data: str = Field(min_length=1, description="the NAME.npz file, base64")


class ElementInfo(Body):
    id: int
    x: float = Field(description="centroid, image pixels")
    y: float
    w: float = Field(description="bounding-box size, image pixels")
    h: float


class PartitionRequest(Body):
    image: ImageB64
    grid: Annotated[int, Field(ge=1, le=32)] = 16
    beta: Annotated[float, Field(ge=0, le=1000)] = 64.0
    iterations: Annotated[int, Field(ge=1, le=10)] = 1
    resolution: Resolution | None = None


class EditOp(Body):
    op: Literal["move", "resize", "delete"]
    ids: Ids
    dx: Coord = 0.0
    dy: Coord = 0.0
    scale: Scale = 1.0


class ElementsEditRequest(Body):
    elements: ElementsBlob
    ops: list[EditOp] = Field(min_length=1, max_length=MAX_OPS)


class RenderRequest(Body):
    elements: ElementsBlob
    prompt: str = Field("", max_length=1000)
    guidance: Guidance = 3.0
    steps: Steps | None = Field(None, description="denoising steps (default: the server's --steps)")
    seed: Seed = 0


class ElementsResponse(Body):
    elements: ElementsBlob
    items: list[ElementInfo] = Field(description="the alive elements")
    deleted: list[int] = Field(default_factory=list, description="ids deleted by the edits (and by collision)")
    overlay: str = Field(description="boundaries and centroids over the image, PNG base64")
    canvas: list[int] = Field(description="(height, width) of the elements' canvas")
    timing: Timing


# ---------------------------------------------------------------------- sessions
class SessionCreate(Body):
    image: ImageB64
    kind: Literal["reposition", "elements"] = "reposition"
    steps: Steps | None = Field(None, description="final steps (default: the server's)")
    preview_steps: Steps | None = None
    seed: Seed = 0
    crop_padding: CropPadding | None = Field(None, description="reposition: previews and finals work in the box "
                                                               "around what each move changes, padded by this many "
                                                               "pixels (region crop)")
    crop_size: CropSize | None = None


class SessionInfo(Body):
    id: str
    kind: Literal["reposition", "elements"]
    width: int
    height: int
    steps: int
    preview_steps: int
    selected: bool = Field(description="reposition: a subject is selected")
    shadow: bool = Field(False, description="reposition: the subject's shadow is selected")
    undo: int = Field(description="how many edits can be undone")
    image: str | None = Field(None, description="the session's current image, PNG base64 (after create/undo)")
    items: list[ElementInfo] | None = None
    overlay: str | None = None
    timing: Timing | None = None


class SelectRequest(Prompt):
    mask: ImageB64 | None = Field(None, description="the subject as a mask, instead of points / box")
    target: Literal["subject", "shadow"] = Field("subject", description="'shadow': the selected subject's existing "
                                                 "shadow (a second selection; moves with it)")


class MaskResponse(Body):
    mask: str = Field(description="PNG base64, 255 inside")
    area: int = Field(description="pixels inside the mask")
    timing: Timing


class MoveRequest(Body):
    """A drag position or its release (runtime/edits.py: a SeeleEdit for a repositioning session, a move and
    resize of `ids` for an elements session, which refuses the SEELE-only options)."""

    dx: Coord = 0.0
    dy: Coord = 0.0
    scale: ScaleOrAuto = 1.0
    occlusion: Occlusion = "none"
    matting: bool = Field(False, description="composite the subject with its ViTMatte alpha")
    trimap_band: TrimapBand | None = None
    new_shadow_box: Box | None = Field(None, description="where a new shadow is cast (x0, y0, x1, y1), output "
                                                         "pixels: harmonized (the subject's existing shadow is a "
                                                         "selection: select target 'shadow')")
    ids: Ids | None = Field(None, description="elements sessions: the elements to move")


class ImageResponse(Body):
    image: str = Field(description="PNG base64")
    width: int
    height: int
    timing: Timing


class ElementsSelect(Body):
    point: Point | None = None
    box: Box | None = None


class IdsResponse(Body):
    ids: list[int]


class ElementsSessionEdit(Body):
    ops: list[EditOp] = Field(min_length=1, max_length=MAX_OPS)


class SessionRender(Body):
    prompt: str = Field("", max_length=1000)
