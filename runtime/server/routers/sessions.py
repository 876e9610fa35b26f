"""Interactive sessions: create from an image, select the subject, drag (WebSocket), release, undo.

Reposition: select (points / box / mask) -> mask; the drag loop sends previews; release runs the
final, which becomes the session's image (the previous one goes on the undo stack).
Elements: the partition on create (overlay + boxes in image pixels); edits, element drags with
previews, render. Moves are in image pixels.

The WebSocket `/v1/sessions/{id}/drag` is latest-wins: positions that arrive while a preview
runs replace each other in one slot, so a stale position is dropped, never queued; `release`
replaces any pending drag and runs at FINAL priority, ahead of every queued preview.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import anyio
import numpy as np
import torch
from fastapi import APIRouter, Depends, Request, Response, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from editrt.runtime.server import cost
from editrt.runtime.server.limits import APIError, png_b64
from editrt.runtime.server.routers import common
from editrt.runtime.server.routers.elements_io import apply_ops, items
from editrt.runtime.server.schemas import (
    ElementsSelect,
    ElementsSessionEdit,
    ErrorBody,
    IdsResponse,
    ImageResponse,
    MaskResponse,
    MoveRequest,
    SelectRequest,
    SessionCreate,
    SessionInfo,
    SessionRender,
)
from editrt.runtime.server.sessions import Live
from editrt.runtime.server.work import FINAL, INTERACTIVE, PREVIEW  # noqa: F401
from editrt.runtime.session import EditSession

ERRORS = {s: {"model": ErrorBody} for s in (400, 401, 404, 409, 413, 415, 422, 503)}
router = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Depends(common.require_token)],
                   responses=ERRORS)
MOVE_FIELDS = ("dx", "dy", "scale", "ids", "selected", *common.SEELE_FIELDS)


def _new_session(st, kind: str, rgb, steps: int, preview_steps: int, seed: int) -> EditSession:
    pipe = st.reposition if kind == "reposition" else st.elements
    with torch.no_grad():
        return EditSession(rgb, pipe, steps=steps, preview_steps=preview_steps, resolution=st.settings.resolution,
                           preview_resolution=st.settings.preview_resolution, seed=seed)


def info(live: Live, st, image: bool = False, t=None) -> SessionInfo:
    s = live.session
    h, w = live.image.shape[:2]
    out = SessionInfo(id=live.id, kind=live.kind, width=w, height=h, steps=live.steps, preview_steps=live.preview_steps,
                      selected=s.subject is not None, shadow=getattr(s, "shadow", None) is not None,
                      undo=len(live.history), image=png_b64(live.image) if image else None, timing=t)
    if live.kind == "elements":
        out.items = items(s.elements)
        out.overlay = png_b64(st.elements.render_overlay(s.elements, live.image))
    return out


def _kind(live: Live, kind: str, what: str) -> None:
    if live.kind != kind:
        raise APIError(409, "session_id", f"session_id: {what} needs a {kind} session; this one is {live.kind}")


@router.post("", response_model=SessionInfo, openapi_extra=common.body_schema(SessionCreate, multipart=True))
async def create(request: Request):
    """Open a session on an image (JSON base64 or a multipart file); elements sessions partition it here."""
    t0 = common.t0_of(request)
    st = common.state(request)
    req = await common.parse_body(request, SessionCreate, ("image",))
    common.check_steps(request, ("steps", req.steps), ("preview_steps", req.preview_steps))
    if req.kind not in st.queues:
        raise APIError(422, "kind", f"kind: this server has no {req.kind} pipeline loaded")
    rgb = await common.image(request, req.image, "image")
    steps, preview = req.steps or st.settings.final_steps, req.preview_steps or st.settings.preview_steps
    pipe = common.pipeline(request, req.kind)
    resolution = st.settings.resolution or pipe.default_resolution  # the server's, not the request's: the image counts
    cost.check_pass(st.settings, rgb.shape[:2], None, resolution, steps)
    cost.check_pass(st.settings, rgb.shape[:2], None, st.settings.preview_resolution or resolution, preview,
                    "preview_steps")
    session, run_s, wait_s = await common.run(request, req.kind, lambda: _new_session(st, req.kind, rgb, steps, preview,
                                                                                      req.seed), INTERACTIVE, "open")
    live = st.sessions.add(req.kind, session, steps, preview, req.seed)
    return await anyio.to_thread.run_sync(lambda: info(live, st, t=common.timing(request, t0, run_s, wait_s)))


@router.get("/{session_id}", response_model=SessionInfo)
async def get(request: Request, session_id: str, image: bool = False):
    st = common.state(request)
    live = st.sessions.get(session_id)
    return await anyio.to_thread.run_sync(lambda: info(live, st, image=image))


@router.delete("/{session_id}", status_code=204)
async def close(request: Request, session_id: str):
    st = common.state(request)
    st.sessions.get(session_id)
    st.sessions.close(session_id)
    return Response(status_code=204)


@router.post("/{session_id}/select", response_model=MaskResponse, openapi_extra=common.body_schema(SelectRequest))
async def select(request: Request, session_id: str):
    """The subject from points / box (SAM on the cached embedding) or a mask; target 'shadow': the selected
    subject's existing shadow, a second selection that moves with it."""
    req = await common.parse_body(request, SelectRequest)
    t0 = common.t0_of(request)
    st = common.state(request)
    live = st.sessions.get(session_id)
    _kind(live, "reposition", "select")
    mask = await common.mask(request, req.mask, "mask") if req.mask is not None else None
    if mask is None and req.points is None and req.box is None:
        raise APIError(422, "points", "points: expected at least one point, a box or a mask")
    if req.points is not None and req.labels is not None and len(req.labels) != len(req.points):
        raise APIError(422, "labels", f"labels: expected one per point ({len(req.points)}), got {len(req.labels)}")
    if req.target == "shadow" and live.session.subject is None:
        raise APIError(409, "selected", "selected: select the subject first (POST .../select)")
    select = live.session.select if req.target == "subject" else live.session.select_shadow
    async with live.lock:
        subject, run_s, wait_s = await common.run(
            request, "reposition", lambda: select(points=req.points, labels=req.labels, box=req.box, mask=mask),
            INTERACTIVE, "select", ("points", "labels", "box", "mask"))
    return MaskResponse(mask=png_b64(subject), area=int(subject.sum()), timing=common.timing(request, t0, run_s, wait_s))


# ---------------------------------------------------------------------- previews and finals (shared with the WebSocket)
def _check_move(live: Live, move: MoveRequest) -> None:
    if live.kind == "reposition":
        if live.session.subject is None:
            raise APIError(409, "selected", "selected: select the subject first (POST .../select)")
        return
    if not move.ids:
        raise APIError(422, "ids", "ids: expected the elements to move")
    _check_elements_move(move)


def _check_elements_move(move: MoveRequest) -> None:
    """An elements session refuses the repositioning options (they would mean nothing there)."""
    reposition_only = {"scale": move.scale == "auto", "occlusion": move.occlusion != "none", "matting": move.matting,
                       "trimap_band": move.trimap_band is not None, "shadow_box": move.shadow_box is not None}
    for name, given in reposition_only.items():
        if given:
            raise APIError(422, name, f"{name}: {getattr(move, name)!r} is a repositioning option; an elements "
                           "session takes dx, dy, a numeric scale and ids")


def _reposition_edit(move: MoveRequest) -> dict:
    return dict(move=(move.dx, move.dy), **common.seele_options(move))


def _moved_elements(live: Live, move: MoveRequest, settings):
    """A copy of the drag's base elements with the move (image pixels) applied."""
    from editrt.runtime.server.schemas import EditOp

    base = live.drag_base if live.drag_base is not None else live.session.elements
    el = base.copy()
    ops = [EditOp(op="move", ids=move.ids, dx=move.dx, dy=move.dy)]
    if move.scale != 1.0:
        ops.append(EditOp(op="resize", ids=move.ids, scale=move.scale))
    apply_ops(el, ops, settings, field="ids")
    return base, el


def _result_image(result):
    return getattr(result, "image", result)  # reposition: a RepositionResult; elements: the image


def _future_of(session, future):
    """(future, cancel) of what session.preview returned. Cancelling must reach the work-queue Job, not just
    its Future (a Future the worker already took cannot be cancelled); only this preview's own Job, never a
    newer one of the same session."""
    job = session.preview_job
    if job is not None and job.future is future:
        return future, job.cancel
    return future, future.cancel


def preview_future(live: Live, move: MoveRequest, settings):
    """Start the session's own preview job (on the event loop: it only enqueues); returns (future, cancel)."""
    s = live.session
    if live.kind == "reposition":
        return _future_of(s, s.preview(**_reposition_edit(move)))
    base, el = _moved_elements(live, move, settings)  # bad ids / moves raise here, before anything is queued
    live.drag_base, s.elements = base, el
    return _future_of(s, s.preview())


async def run_preview(conn, live: Live, move: MoveRequest, handle: dict | None = None):
    """`handle` gets the preview's cancel function while it is queued or running (the drag loop's release uses it)."""
    def start():
        future, cancel = preview_future(live, move, common.state(conn).settings)
        if handle is not None:
            handle["cancel"] = cancel
        return future, cancel
    try:
        image, run_s, wait_s = await common.run(conn, live.kind, None, PREVIEW, "preview", MOVE_FIELDS, future=start)
    finally:
        if handle is not None:
            handle.pop("cancel", None)
    return _result_image(image), run_s, wait_s


def final_job(live: Live, st, move: MoveRequest):
    """The full-quality result; it becomes the session's state (previous state on the undo stack).
    Returns (image, the replaced EditSession to close outside the job, or None)."""
    s = live.session

    def job():
        with torch.no_grad():
            if live.kind == "reposition":
                result = _result_image(s.final(**_reposition_edit(move)))
                live.session = _new_session(st, "reposition", np.asarray(result), live.steps, live.preview_steps,
                                            live.seed)
                _push(live, st, s.rgb)
                return result, s
            base, el = _moved_elements(live, move, st.settings) if move.ids else (s.elements, s.elements)
            s.elements = el
            live.drag_base = None
            if el is not base:
                _push(live, st, base)
            return _result_image(s.final()), None
    return job


async def run_final(conn, live: Live, st, move: MoveRequest):
    async with live.lock:
        (image, old), run_s, wait_s = await common.run(conn, live.kind, final_job(live, st, move), FINAL, "final",
                                                       MOVE_FIELDS)
    if old is not None:  # closing waits for the pipeline's turn (it drops cache entries): not on the response's path
        _close_later(old)
    st.sessions.sweep(keep=live.id)
    return image, run_s, wait_s


def _close_later(session: EditSession) -> None:
    threading.Thread(target=session.close, name="editrt-session-close", daemon=True).start()


def _push(live: Live, st, item) -> None:
    live.history.append(item)
    del live.history[:-st.settings.history]


def _image_response(request_or_ws, t0, image, run_s, wait_s) -> ImageResponse:
    return ImageResponse(image=png_b64(image), width=image.width, height=image.height,
                         timing=common.timing(request_or_ws, t0, run_s, wait_s))


@router.post("/{session_id}/preview", response_model=ImageResponse, openapi_extra=common.body_schema(MoveRequest))
async def preview(request: Request, session_id: str):
    """One low-step preview of a move (the WebSocket is the streaming way)."""
    req = await common.parse_body(request, MoveRequest)
    t0 = common.t0_of(request)
    st = common.state(request)
    live = st.sessions.get(session_id)
    _check_move(live, req)
    image, run_s, wait_s = await run_preview(request, live, req)
    return await anyio.to_thread.run_sync(lambda: _image_response(request, t0, image, run_s, wait_s))


@router.post("/{session_id}/final", response_model=ImageResponse, openapi_extra=common.body_schema(MoveRequest))
async def final(request: Request, session_id: str):
    """The final of a move; the result becomes the session's image (undo restores the previous one)."""
    req = await common.parse_body(request, MoveRequest)
    t0 = common.t0_of(request)
    st = common.state(request)
    live = st.sessions.get(session_id)
    if live.kind == "reposition":
        _check_move(live, req)
    else:
        _check_elements_move(req)
    image, run_s, wait_s = await run_final(request, live, st, req)
    return await anyio.to_thread.run_sync(lambda: _image_response(request, t0, image, run_s, wait_s))


@router.post("/{session_id}/undo", response_model=SessionInfo)
async def undo(request: Request, session_id: str):
    """Back to the state before the last final or edit."""
    t0 = common.t0_of(request)
    st = common.state(request)
    live = st.sessions.get(session_id)
    if not live.history:
        raise APIError(409, "undo", "undo: nothing to undo")
    async with live.lock:
        if not live.history:  # another request undid the last one while this waited for the lock
            raise APIError(409, "undo", "undo: nothing to undo")
        previous = live.history[-1]  # popped only once the undo happened: a refused one (503) keeps it
        if live.kind == "reposition":
            old = live.session
            live.session, run_s, wait_s = await common.run(
                request, "reposition", lambda: _new_session(st, "reposition", previous, live.steps, live.preview_steps,
                                                            live.seed), INTERACTIVE, "open")
            _close_later(old)
        else:
            live.session.elements, live.drag_base, run_s, wait_s = previous, None, 0.0, 0.0
        live.history.pop()
    return await anyio.to_thread.run_sync(lambda: info(live, st, image=True, t=common.timing(request, t0, run_s, wait_s)))


# ---------------------------------------------------------------------- elements sessions
@router.post("/{session_id}/elements/select", response_model=IdsResponse, openapi_extra=common.body_schema(ElementsSelect))
async def elements_select(request: Request, session_id: str):
    """The element under a point, or those centred in a box (image pixels)."""
    req = await common.parse_body(request, ElementsSelect)
    live = common.state(request).sessions.get(session_id)
    _kind(live, "elements", "elements/select")
    if (req.point is None) == (req.box is None):
        raise APIError(422, "point", "point: expected a point or a box (one of them)")
    el = live.session.elements
    h, w = el.image_size
    if req.point is not None and not (0 <= req.point[0] < w and 0 <= req.point[1] < h):
        raise APIError(422, "point", f"point ({req.point[0]:g}, {req.point[1]:g}): outside the image ({w}x{h})")
    return IdsResponse(ids=el.select(point=req.point, box=req.box))


@router.post("/{session_id}/elements/edit", response_model=SessionInfo, openapi_extra=common.body_schema(ElementsSessionEdit))
async def elements_edit(request: Request, session_id: str):
    """Move (image pixels) / resize / delete elements; the overlay after the edit."""
    req = await common.parse_body(request, ElementsSessionEdit)
    st = common.state(request)
    live = st.sessions.get(session_id)
    _kind(live, "elements", "elements/edit")
    async with live.lock:
        el = live.session.elements.copy()
        await anyio.to_thread.run_sync(lambda: apply_ops(el, req.ops, st.settings))
        _push(live, st, live.session.elements)
        live.session.elements, live.drag_base = el, None
    return await anyio.to_thread.run_sync(lambda: info(live, st))


@router.post("/{session_id}/render", response_model=ImageResponse, openapi_extra=common.body_schema(SessionRender))
async def render(request: Request, session_id: str):
    """Render the session's elements at full quality."""
    req = await common.parse_body(request, SessionRender)
    t0 = common.t0_of(request)
    st = common.state(request)
    live = st.sessions.get(session_id)
    _kind(live, "elements", "render")
    image, run_s, wait_s = await common.run(request, "elements", lambda: _result_image(live.session.final(
        prompt=req.prompt)), FINAL, "render", ("prompt",))
    return await anyio.to_thread.run_sync(lambda: _image_response(request, t0, image, run_s, wait_s))


# ---------------------------------------------------------------------- the drag loop
@router.websocket("/{session_id}/drag")
async def drag(ws: WebSocket, session_id: str):
    """Messages in: {"type": "drag" | "release" | "cancel", "dx", "dy", "scale", "ids", "seq"}.
    Out: {"type": "preview" | "final" | "error" | "busy", "seq", "image", "timing", ...}; errors keep the socket
    open; "busy": the queue was full and this preview was shed (the next position tries again)."""
    st = common.state(ws)
    if not common.token_ok(ws):
        await ws.close(code=1008, reason="authorization: expected a bearer token (header or subprotocol)")
        return
    try:
        live = st.sessions.get(session_id)
    except APIError as e:
        await ws.close(code=1008, reason=e.message[:120])
        return
    if live.sockets >= st.settings.ws_per_session:
        await ws.close(code=1008, reason=f"session_id: already {live.sockets} drag sockets open on this session")
        return
    offered = ws.scope.get("subprotocols", [])
    await ws.accept(subprotocol=common.WS_PROTOCOL if common.WS_PROTOCOL in offered else None)
    live.sockets += 1
    slot: dict = {}  # the one pending message: the newest drag, or a release (which replaces it)
    running: dict = {}  # "cancel": stops the preview in flight (queued: never runs; running: at its next step)
    wake = asyncio.Event()
    metrics = st.metrics

    async def send_error(seq, e: APIError):
        await ws.send_json({"type": "error", "seq": seq, "status": e.status, "field": e.field, "message": e.message})

    async def receive():
        while True:
            frame = await ws.receive()
            if frame["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(frame.get("code", 1000))
            received = time.perf_counter()
            metrics.count("ws_messages", ("received",))
            try:
                if frame.get("text") is None:
                    raise ValueError("a binary frame")
                msg = json.loads(frame["text"])
                if not isinstance(msg, dict):
                    raise ValueError
            except (ValueError, RecursionError):  # RecursionError: nested too deeply for json's parser
                await send_error(None, APIError(422, "message", "message: expected a JSON object"))
                continue
            kind, seq = msg.pop("type", None), msg.pop("seq", None)
            if kind not in ("drag", "release", "cancel") or not (seq is None or isinstance(seq, int)):
                await send_error(seq, APIError(422, "type", "type: expected 'drag', 'release' or 'cancel' "
                                                                 "(and seq an integer)"))
                continue
            try:
                move = MoveRequest.model_validate(msg)
            except ValidationError as e:
                await send_error(seq, common.validation_error(e))
                continue
            if "kind" in slot:
                metrics.count("ws_messages", ("dropped",))  # superseded before it started: never run
            if kind == "release" and "cancel" in running:
                running["cancel"]()  # the final must not wait for this socket's preview
            slot.update(kind=kind, seq=seq, move=move, received=received)
            wake.set()

    async def process():
        while True:
            await wake.wait()
            wake.clear()
            if "kind" not in slot:
                continue
            kind, seq, move, received = slot.pop("kind"), slot.pop("seq"), slot.pop("move"), slot.pop("received")
            behind = time.perf_counter() - received  # waited for this socket's previous job: queueing too
            try:
                live_ = st.sessions.get(session_id)
                if kind == "cancel":
                    if live_.drag_base is not None:
                        live_.session.elements, live_.drag_base = live_.drag_base, None
                    continue
                if kind == "release" and live_.kind == "elements" and not move.ids:
                    raise APIError(422, "ids", "ids: expected the elements to move")
                _check_move(live_, move)
                if kind == "drag":
                    image, run_s, wait_s = await run_preview(ws, live_, move, running)
                else:
                    image, run_s, wait_s = await run_final(ws, live_, st, move)
                out = await anyio.to_thread.run_sync(_image_response, ws, received, image, run_s, wait_s + behind)
                kind_out = "preview" if kind == "drag" else "final"
                await ws.send_json({"type": kind_out, "seq": seq, "image": out.image, "width": out.width,
                                    "height": out.height, "timing": out.timing.model_dump(),
                                    "undo": len(live_.history)})
                metrics.count("ws_messages", (kind_out,))
                metrics.request(f"{ws.scope['path_template']}#{kind_out}", "WS", 200, time.perf_counter() - received)
            except APIError as e:
                if e.status == 409 and "superseded" in e.message:
                    metrics.count("ws_messages", ("dropped",))  # a newer request of this session took over
                    continue
                if e.status == 503 and kind == "drag":  # previews are shed first when the queue is full:
                    metrics.count("ws_messages", ("shed",))  # the next position tries again
                    await ws.send_json({"type": "busy", "seq": seq, "retry_after": int(e.headers["Retry-After"])})
                    continue
                if e.status == 404:
                    await ws.close(code=1008, reason=e.message[:120])
                    return
                await send_error(seq, e)

    ws.scope["path_template"] = "/v1/sessions/{session_id}/drag"
    receiver, processor = asyncio.create_task(receive()), asyncio.create_task(process())
    try:
        done, _ = await asyncio.wait({receiver, processor}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() and not isinstance(task.exception(), WebSocketDisconnect):
                raise task.exception()
    finally:
        for task in (receiver, processor):
            task.cancel()
        await asyncio.gather(receiver, processor, return_exceptions=True)
        if live.drag_base is not None:  # a drag the client abandoned: the elements go back to where it started
            live.session.elements, live.drag_base = live.drag_base, None
        live.last_used = time.monotonic()
        live.sockets -= 1
