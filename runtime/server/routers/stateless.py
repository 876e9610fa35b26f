"""One-shot endpoints mirroring the CLI: segment, inpaint, reposition, elements partition / edit / render.

Each takes JSON (images base64) or multipart (images as files) and runs on the pipeline's work
queue at ONE_SHOT priority; image results come back as PNG with X-Pipeline-Ms / X-Queue-Ms /
X-Server-Ms headers.
"""
from __future__ import annotations

import anyio
import torch
from fastapi import APIRouter, Depends, Request

from editrt.runtime.edits import Quality, SeeleEdit
from editrt.runtime.server import cost
from editrt.runtime.server.errors import APIError
from editrt.runtime.server.image_codecs import png_b64
from editrt.runtime.server.routers import common
from editrt.runtime.server.routers.elements_io import apply_ops, from_blob, items, to_blob
from editrt.runtime.server.schemas import (
    ElementsEditRequest,
    ElementsResponse,
    ErrorBody,
    InpaintRequest,
    PartitionRequest,
    RenderRequest,
    RepositionRequest,
    SegmentRequest,
)
from editrt.runtime.server.work import ONE_SHOT, Stop

ERRORS = {s: {"model": ErrorBody} for s in (400, 401, 413, 415, 422, 503)}
PNG = {200: {"content": {"image/png": {}}, "description": "PNG image"}}


def body(model, *images):
    """OpenAPI: the same model as JSON or as multipart form (image fields as files)."""
    return common.body_schema(model, multipart=True)


router = APIRouter(prefix="/v1", tags=["stateless"], dependencies=[Depends(common.require_token)], responses=ERRORS)


def _prompt(req, h: int, w: int) -> dict:
    if req.points is None and req.box is None:
        raise APIError(422, "points", "points: expected at least one point or a box")
    labels = req.labels
    if req.points is not None and labels is not None and len(labels) != len(req.points):
        raise APIError(422, "labels", f"labels: expected one per point ({len(req.points)}), got {len(labels)}")
    return dict(points=req.points, labels=labels, box=req.box)


# each route's field map: the pipeline call's keyword (EditError.field) -> the request field that carried it
SEGMENT_FIELDS = common.same_names("image", "points", "labels", "box")
INPAINT_FIELDS = common.same_names("image", "mask", "task", "steps", "guidance", "seed", "resolution", "crop_padding",
                                   "crop_size")
REPOSITION_FIELDS = common.same_names("image", "mask", "points", "labels", "box", "move", "scale", "matting",
                                      "trimap_band", "harmonize", "complete_mask", "steps", "guidance", "seed",
                                      "resolution", "crop_padding",
                                      "crop_size")  # + the SeeleEdit attributes the request spells otherwise
PARTITION_FIELDS = common.same_names("image", "resolution", "grid", "beta", "iterations")
RENDER_FIELDS = common.same_names("elements", "prompt", "guidance", "steps", "seed")


@router.post("/segment", responses=PNG, openapi_extra=body(SegmentRequest, "image"))
async def segment(request: Request):
    """The subject mask (PNG, 255 inside) from points and/or a box."""
    t0 = common.t0_of(request)
    req = await common.parse_body(request, SegmentRequest, ("image",))
    rgb = await common.image(request, req.image, "image")
    prompt = _prompt(req, *rgb.shape[:2])
    pipe = common.pipeline(request, "reposition")
    mask, run_s, wait_s = await common.run(request, "reposition", lambda: pipe.segment(rgb, **prompt), ONE_SHOT,
                                           "segment", SEGMENT_FIELDS)
    return await common.png_response(mask, t0, run_s, wait_s)


@router.post("/inpaint", responses=PNG, openapi_extra=body(InpaintRequest, "image", "mask"))
async def inpaint(request: Request):
    """One prompt-guided inpainting pass (remove / complete) inside the mask; outside it the input bytes."""
    t0 = common.t0_of(request)
    req = await common.parse_body(request, InpaintRequest, ("image", "mask"))
    steps = common.steps_of(request, req.steps)
    rgb = await common.image(request, req.image, "image")
    mask = await common.mask(request, req.mask, "mask")
    pipe = common.pipeline(request, "reposition")
    cost.check_pass(common.state(request).settings, rgb.shape[:2], req.resolution, pipe.default_resolution, steps)

    def job():
        with torch.no_grad():
            return pipe.inpaint(rgb, mask, task=req.task, steps=steps, guidance=req.guidance, seed=req.seed,
                                resolution=req.resolution, crop_padding=req.crop_padding, crop_size=req.crop_size)
    out, run_s, wait_s = await common.run(request, "reposition", job, ONE_SHOT, "inpaint", INPAINT_FIELDS)
    return await common.png_response(out, t0, run_s, wait_s)


REPOSITION_MASKS = ("mask", "complete_mask", "occluder_mask", "existing_shadow_mask", "new_shadow_region")


@router.post("/reposition", responses=PNG, openapi_extra=body(RepositionRequest, *REPOSITION_MASKS))
async def reposition(request: Request):
    """The SEELE flow: move (and scale) the subject, remove, complete, harmonize; occlusion, perspective,
    matting and shadows as options; PNG result."""
    t0 = common.t0_of(request)
    req = await common.parse_body(request, RepositionRequest, ("image", *REPOSITION_MASKS))
    steps = common.steps_of(request, req.steps)
    rgb = await common.image(request, req.image, "image")
    masks = {}
    for name in REPOSITION_MASKS:
        if getattr(req, name) is not None:
            masks[name] = await common.mask(request, getattr(req, name), name)
    if req.new_shadow_region is not None and req.new_shadow_box is not None:
        raise APIError(422, "new_shadow_box", "new_shadow_box: give the new shadow as new_shadow_region (a mask) or "
                       "new_shadow_box, not both")
    if req.occluder_mask is not None and req.occlusion == "auto":
        raise APIError(422, "occluder_mask", "occluder_mask: occlusion 'auto' computes the occluder from depth; "
                       "give one or the other")
    subject = masks.pop("mask", None)
    prompt = {} if subject is not None else _prompt(req, *rgb.shape[:2])
    pipe = common.pipeline(request, "reposition")
    cost.check_pass(common.state(request).settings, rgb.shape[:2], req.resolution, pipe.default_resolution, steps)
    region = masks.get("new_shadow_region", tuple(req.new_shadow_box) if req.new_shadow_box is not None else None)
    occlusion = masks.get("occluder_mask", req.occlusion)
    # the request's spelling of each SeeleEdit attribute, where it differs (the mask or box form: whichever came)
    fields = {**REPOSITION_FIELDS, "occlusion": "occluder_mask" if "occluder_mask" in masks else "occlusion",
              "existing_shadow": "existing_shadow_mask",
              "new_shadow_region": "new_shadow_region" if "new_shadow_region" in masks else "new_shadow_box"}

    with common.edit_errors_as_422(fields):  # validated once, before the job takes a place in the queue
        edit = SeeleEdit(move=tuple(req.move), scale=req.scale, occlusion=occlusion, matting=req.matting,
                         trimap_band=req.trimap_band, harmonize=req.harmonize, complete_mask=masks.get("complete_mask"),
                         existing_shadow=masks.get("existing_shadow_mask"), new_shadow_region=region)
        quality = Quality(steps=steps, guidance=req.guidance, seed=req.seed, resolution=req.resolution,
                          crop_padding=req.crop_padding, crop_size=req.crop_size)
    stop = Stop()  # set when the client goes away: the job stops at its next denoising step

    def job():
        with torch.no_grad():
            return pipe(rgb, edit, mask=subject, **prompt, quality=quality, step_callback=stop.check).image
    out, run_s, wait_s = await common.run(request, "reposition", job, ONE_SHOT, "reposition", fields, stop=stop)
    return await common.png_response(out, t0, run_s, wait_s)


@router.post("/elements/partition", response_model=ElementsResponse, openapi_extra=body(PartitionRequest, "image"))
async def partition(request: Request):
    """Split the image into elements; the elements file pair, their boxes (image pixels) and the overlay."""
    t0 = common.t0_of(request)
    req = await common.parse_body(request, PartitionRequest, ("image",))
    rgb = await common.image(request, req.image, "image")
    pipe = common.pipeline(request, "elements")
    cost.check_pass(common.state(request).settings, rgb.shape[:2], req.resolution, pipe.default_resolution, None)

    def job():
        with torch.no_grad():
            el = pipe.partition(rgb, resolution=req.resolution, grid=req.grid, beta=req.beta, iterations=req.iterations)
        return el, png_b64(pipe.render_overlay(el, rgb))
    (el, overlay), run_s, wait_s = await common.run(request, "elements", job, ONE_SHOT, "partition", PARTITION_FIELDS)
    blob = await anyio.to_thread.run_sync(to_blob, el)  # compressing the npz: off the event loop
    return ElementsResponse(elements=blob, items=items(el), overlay=overlay,
                            canvas=list(el.image_size), timing=common.timing(request, t0, run_s, wait_s))


@router.post("/elements/edit", response_model=ElementsResponse, openapi_extra=common.body_schema(ElementsEditRequest))
async def edit(request: Request):
    """Move (image pixels) / resize / delete elements, in order; elements an edit covers are deleted."""
    req = await common.parse_body(request, ElementsEditRequest)
    t0 = common.t0_of(request)
    pipe = common.pipeline(request, "elements")
    settings = common.state(request).settings

    def edit_elements():  # no device work: file round trips and drawing, on a worker thread
        el = from_blob(req.elements, settings)
        deleted = apply_ops(el, req.ops, settings)
        return ElementsResponse(elements=to_blob(el), items=items(el), deleted=deleted,
                                overlay=png_b64(pipe.render_overlay(el)), canvas=list(el.image_size),
                                timing=common.timing(request, t0, 0.0))
    return await anyio.to_thread.run_sync(edit_elements)


@router.post("/elements/render", responses=PNG, openapi_extra=common.body_schema(RenderRequest))
async def render(request: Request):
    """Render the (edited) elements with the decoder; PNG on the elements' canvas."""
    req = await common.parse_body(request, RenderRequest)
    t0 = common.t0_of(request)
    steps = common.steps_of(request, req.steps)
    pipe = common.pipeline(request, "elements")
    settings = common.state(request).settings
    el = await anyio.to_thread.run_sync(from_blob, req.elements, settings)
    cost.check_canvas_steps(settings, el.working_size, steps)
    stop = Stop()
    out, run_s, wait_s = await common.run(
        request, "elements", lambda: pipe.decode(el, prompt=req.prompt, guidance=req.guidance, steps=steps,
                                                 seed=req.seed, step_callback=stop.check), ONE_SHOT, "render",
        RENDER_FIELDS, stop=stop)
    return await common.png_response(out, t0, run_s, wait_s)
