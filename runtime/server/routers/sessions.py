"""Interactive sessions: create from an image, select the subject, drag (WebSocket), release, undo.

This router only translates HTTP / WebSocket into the session's own calls (runtime/session.py):
a move request becomes the editor's typed edit (a SeeleEdit or an ElementsEdit, one translator per
editor in EDITORS), and preview / commit / undo run on the session, which owns its selection, its
history and what a drag changes.

Reposition: select (points / box / mask) -> mask; the drag loop sends previews; release commits
the final, which becomes the session's image (undo restores the previous one).
Elements: the partition on create (overlay + boxes in image pixels); edits, element drags with
previews (of the committed elements moved: a drag changes nothing until released), render. Moves
are in image pixels.

The WebSocket `/v1/sessions/{id}/drag` is latest-wins: positions that arrive while a preview
runs replace each other in one slot, so a stale position is dropped, never queued; `release`
replaces any pending drag and runs at FINAL priority, ahead of every queued preview.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from fastapi import APIRouter, Depends, Request, Response, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from editrt.errors import EditError
from editrt.runtime.edits import ElementsEdit, MoveElements, ResizeElements, SeeleEdit
from editrt.runtime.server import cost
from editrt.runtime.server.errors import APIError
from editrt.runtime.server.image_codecs import png_b64
from editrt.runtime.server.routers import common
from editrt.runtime.server.routers.elements_io import apply_ops, items
from editrt.runtime.server.schemas import (
    EditOp,
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
from editrt.runtime.server.work import FINAL, INTERACTIVE, PREVIEW, Stop
from editrt.runtime.session import ElementsSession, RepositionSession, open_session
from editrt.runtime.work_queue import BusyError

ERRORS = {s: {"model": ErrorBody} for s in (400, 401, 404, 409, 413, 415, 422, 503)}
router = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Depends(common.require_token)],
                   responses=ERRORS)


# ---------------------------------------------------------------------- move requests -> typed edits, per editor
# The library's field names (EditError.field: SeeleEdit / ElementsEdit attributes, session keywords) as a
# MoveRequest spells them.
SEELE_MOVE_FIELDS = {"move": "dx", "scale": "scale", "occlusion": "occlusion", "matting": "matting",
                     "trimap_band": "trimap_band", "new_shadow_region": "new_shadow_box", "selected": "selected",
                     "mask": "selected", "existing_shadow": "selected"}
ELEMENTS_MOVE_FIELDS = {"ids": "ids", "move": "dx", "dx": "dx", "dy": "dy", "scale": "scale", "ops": "ids",
                        "prompt": "prompt", "elements": "ids"}
SEELE_ONLY = ("occlusion", "matting", "trimap_band", "new_shadow_box")  # MoveRequest fields an elements session refuses
ELEMENTS_ONLY = ("ids",)  # MoveRequest fields a repositioning session refuses (refused, never silently ignored)


def _edit_error(e: EditError, fields: dict) -> APIError:
    return common.edit_error(e, fields)  # 422 on the mapped field; a session closed meanwhile: 404


def _translating(fn, fields: dict):
    """fn, with the library's EditError answered as 422 on the request field `fields` maps its field to."""
    def run():
        try:
            return fn()
        except EditError as e:
            raise _edit_error(e, fields) from None
    return run


def _seele_edit(live: Live, move: MoveRequest, settings, render_without_ids: bool) -> SeeleEdit:
    given = [name for name in ELEMENTS_ONLY if getattr(move, name) is not None]
    if given:
        raise APIError(422, given[0], f"{given[0]}: {getattr(move, given[0])!r} is an elements option; a "
                       "repositioning session moves its selected subject by dx, dy and scale")
    if live.session.subject is None:
        raise APIError(409, "selected", "selected: select the subject first (POST .../select)")
    box = None if move.new_shadow_box is None else tuple(move.new_shadow_box)
    return _translating(lambda: SeeleEdit(move=(move.dx, move.dy), scale=move.scale, occlusion=move.occlusion,
                                          matting=move.matting, trimap_band=move.trimap_band,
                                          new_shadow_region=box), SEELE_MOVE_FIELDS)()


def _elements_edit(live: Live, move: MoveRequest, settings, render_without_ids: bool) -> ElementsEdit:
    """A move (and resize) of `ids` (without ids and `render_without_ids`: a render of the committed elements).
    Bounded like an edit: the ops' region pixels (cost.py)."""
    given = [name for name in SEELE_ONLY if getattr(move, name) not in (None, False, "none")]
    if move.scale == "auto":
        given.insert(0, "scale")
    if given:
        raise APIError(422, given[0], f"{given[0]}: {getattr(move, given[0])!r} is a repositioning option; an "
                       "elements session takes dx, dy, a numeric scale and ids")
    if not move.ids:
        if render_without_ids:
            return ElementsEdit()
        raise APIError(422, "ids", "ids: expected the elements to move")

    def build():
        ops = [MoveElements(ids=move.ids, dx=move.dx, dy=move.dy)]
        if move.scale != 1.0:
            ops.append(ResizeElements(ids=move.ids, scale=move.scale))
        elements = live.session.elements
        drawn = elements.region_pixels() + (elements.region_pixels(move.ids, move.scale) if len(ops) > 1 else 0)
        cost.check_region_pixels(settings, drawn, "ids")
        return ElementsEdit(ops=tuple(ops))
    return _translating(build, ELEMENTS_MOVE_FIELDS)()


@dataclass(frozen=True)
class Editor:
    """How the server speaks to one editor's sessions."""

    pipeline: str  # the pipeline (and work queue) name: st.reposition / st.elements
    edit_of: Callable  # (live, MoveRequest, settings, render_without_ids) -> the editor's edit; raises APIError
    move_fields: dict  # library field -> MoveRequest field


EDITORS = {RepositionSession: Editor("reposition", _seele_edit, SEELE_MOVE_FIELDS),
           ElementsSession: Editor("elements", _elements_edit, ELEMENTS_MOVE_FIELDS)}


def editor(live: Live) -> Editor:
    return EDITORS[type(live.session)]


def info(live: Live, st, image: bool = False, t=None) -> SessionInfo:
    s = live.session
    h, w = s.image.shape[:2]
    reposition = isinstance(s, RepositionSession)
    out = SessionInfo(id=live.id, kind=live.kind, width=w, height=h, steps=live.steps, preview_steps=live.preview_steps,
                      selected=reposition and s.subject is not None, shadow=reposition and s.shadow is not None,
                      undo=s.undo_depth, image=png_b64(s.image) if image else None, timing=t)
    if isinstance(s, ElementsSession):
        out.items = items(s.elements)
        out.overlay = png_b64(st.elements.render_overlay(s.elements, s.image))
    return out


def _require(live: Live, session_type: type, what: str) -> None:
    if not isinstance(live.session, session_type):
        kind = EDITORS[session_type].pipeline
        raise APIError(409, "session_id", f"session_id: {what} needs a {kind} session; this one is {live.kind}")


@router.post("", response_model=SessionInfo, openapi_extra=common.body_schema(SessionCreate, multipart=True))
async def create(request: Request):
    """Open a session on an image (JSON base64 or a multipart file); elements sessions partition it here."""
    t0 = common.t0_of(request)
    st = common.state(request)
    req = await common.parse_body(request, SessionCreate, ("image",))
    common.check_steps_cap(request, ("steps", req.steps), ("preview_steps", req.preview_steps))
    if req.kind not in st.queues:
        raise APIError(422, "kind", f"kind: this server has no {req.kind} pipeline loaded")
    rgb = await common.image(request, req.image, "image")
    steps, preview = req.steps or st.settings.final_steps, req.preview_steps or st.settings.preview_steps
    pipe = common.pipeline(request, req.kind)
    resolution = st.settings.resolution or pipe.default_resolution  # the server's, not the request's: the image counts
    cost.check_pass(st.settings, rgb.shape[:2], None, resolution, steps)
    cost.check_pass(st.settings, rgb.shape[:2], None, st.settings.preview_resolution or resolution, preview,
                    "preview_steps")
    crop = {k: getattr(req, k) for k in ("crop_padding", "crop_size") if getattr(req, k) is not None}
    if crop and req.kind != "reposition":  # an elements session renders the whole canvas: no pass to crop
        name = next(iter(crop))
        raise APIError(422, name, f"{name}: a repositioning option; an elements session renders the whole image")

    def open_():
        return open_session(rgb, pipe, steps=steps, preview_steps=preview, resolution=st.settings.resolution,
                            preview_resolution=st.settings.preview_resolution, seed=req.seed,
                            max_undo=st.settings.history, **crop)
    session, run_s, wait_s = await common.run(request, req.kind, open_, INTERACTIVE, "open",
                                              common.same_names("image", "crop_padding", "crop_size"))
    live = st.sessions.add(session, steps, preview)
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


SELECT_FIELDS = {"points": "points", "labels": "labels", "box": "box", "mask": "mask", "existing_shadow": "mask",
                 "selected": "selected"}


@router.post("/{session_id}/select", response_model=MaskResponse, openapi_extra=common.body_schema(SelectRequest))
async def select(request: Request, session_id: str):
    """The subject from points / box (SAM on the cached embedding) or a mask; target 'shadow': the selected
    subject's existing shadow, a second selection that moves with it."""
    req = await common.parse_body(request, SelectRequest)
    t0 = common.t0_of(request)
    st = common.state(request)
    live = st.sessions.get(session_id)
    _require(live, RepositionSession, "select")
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
            INTERACTIVE, "select", SELECT_FIELDS)
    return MaskResponse(mask=png_b64(subject), area=int(subject.sum()), timing=common.timing(request, t0, run_s, wait_s))


# ---------------------------------------------------------------------- previews and commits (shared with the WebSocket)
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


async def run_preview(conn, live: Live, move: MoveRequest, handle: dict | None = None):
    """The session's own preview of `move`. `handle` gets the preview's cancel function while it is queued or
    running (the drag loop's release uses it). The edit and the session's snapshot of it (an elements session
    copies its elements and applies the edit: long with many elements or large regions) are made off the event
    loop, one preview of the session at a time in arrival order (SessionStore.start_preview): latest still wins."""
    ed = editor(live)
    st = common.state(conn)

    def start():
        edit = ed.edit_of(live, move, st.settings, False)  # bad input raises here, before anything is queued
        future, cancel = _future_of(live.session, _translating(lambda: live.session.preview(edit), ed.move_fields)())
        if handle is not None:
            handle["cancel"] = cancel
        return future, cancel
    try:
        try:
            started = await st.sessions.start_preview(live, start, withdraw=lambda fc: fc[1]())
        except BusyError as e:  # the queue is full: common.run answers it (503, Retry-After) as it answers any job's
            started = e

        def submitted():
            if isinstance(started, BusyError):
                raise started
            return started
        image, run_s, wait_s = await common.run(conn, ed.pipeline, None, PREVIEW, "preview", ed.move_fields,
                                                future=submitted)
    finally:
        if handle is not None:
            handle.pop("cancel", None)
    return _result_image(image), run_s, wait_s


async def run_final(conn, live: Live, st, move: MoveRequest, render_without_ids: bool = True):
    """Commit `move`: its final becomes the session's state (undo restores the previous one). A client that goes
    away stops it at its next denoising step, and the session keeps its state."""
    ed = editor(live)
    edit = ed.edit_of(live, move, st.settings, render_without_ids)
    stop = Stop()
    commit = _translating(lambda: live.session.commit(edit, step_callback=stop.check), ed.move_fields)
    async with live.lock:
        result, run_s, wait_s = await common.run(conn, ed.pipeline, commit, FINAL, "final", ed.move_fields, stop=stop)
    st.sessions.sweep(keep=live.id)
    return _result_image(result), run_s, wait_s


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
    image, run_s, wait_s = await run_preview(request, live, req)
    return await anyio.to_thread.run_sync(lambda: _image_response(request, t0, image, run_s, wait_s))


@router.post("/{session_id}/final", response_model=ImageResponse, openapi_extra=common.body_schema(MoveRequest))
async def final(request: Request, session_id: str):
    """The final of a move; the result becomes the session's image (undo restores the previous one)."""
    req = await common.parse_body(request, MoveRequest)
    t0 = common.t0_of(request)
    st = common.state(request)
    live = st.sessions.get(session_id)
    image, run_s, wait_s = await run_final(request, live, st, req)
    return await anyio.to_thread.run_sync(lambda: _image_response(request, t0, image, run_s, wait_s))


@router.post("/{session_id}/undo", response_model=SessionInfo)
async def undo(request: Request, session_id: str):
    """Back to the state before the last final or edit."""
    t0 = common.t0_of(request)
    st = common.state(request)
    live = st.sessions.get(session_id)
    if not live.session.undo_depth:
        raise APIError(409, "undo", "undo: nothing to undo")
    async with live.lock:
        if not live.session.undo_depth:  # another request undid the last one while this waited for the lock
            raise APIError(409, "undo", "undo: nothing to undo")
        _, run_s, wait_s = await common.run(request, editor(live).pipeline, live.session.undo, INTERACTIVE, "undo",
                                            {"undo": "undo"})
    return await anyio.to_thread.run_sync(lambda: info(live, st, image=True, t=common.timing(request, t0, run_s, wait_s)))


# ---------------------------------------------------------------------- elements sessions
@router.post("/{session_id}/elements/select", response_model=IdsResponse, openapi_extra=common.body_schema(ElementsSelect))
async def elements_select(request: Request, session_id: str):
    """The element under a point, or those centred in a box (image pixels)."""
    req = await common.parse_body(request, ElementsSelect)
    live = common.state(request).sessions.get(session_id)
    _require(live, ElementsSession, "elements/select")
    if (req.point is None) == (req.box is None):
        raise APIError(422, "point", "point: expected a point or a box (one of them)")
    el = live.session.elements
    h, w = el.image_size
    if req.point is not None and not (0 <= req.point[0] < w and 0 <= req.point[1] < h):
        raise APIError(422, "point", f"point ({req.point[0]:g}, {req.point[1]:g}): outside the image ({w}x{h})")
    # a point's hit test draws the regions under it (scaled ones resized): off the event loop, as a preview's snapshot
    return IdsResponse(ids=await anyio.to_thread.run_sync(lambda: el.select(point=req.point, box=req.box)))


def _typed_ops(ops: list[EditOp]) -> tuple:
    """The request's ops as the library's typed element ops (already validated by the schema and apply_ops)."""
    typed = {"move": lambda op: MoveElements(ids=op.ids, dx=op.dx, dy=op.dy),
             "resize": lambda op: ResizeElements(ids=op.ids, scale=op.scale)}
    from editrt.runtime.edits import DeleteElements

    return tuple(typed.get(op.op, lambda op: DeleteElements(ids=op.ids))(op) for op in ops)


@router.post("/{session_id}/elements/edit", response_model=SessionInfo, openapi_extra=common.body_schema(ElementsSessionEdit))
async def elements_edit(request: Request, session_id: str):
    """Move (image pixels) / resize / delete elements; the overlay after the edit (undo takes it back)."""
    req = await common.parse_body(request, ElementsSessionEdit)
    st = common.state(request)
    live = st.sessions.get(session_id)
    _require(live, ElementsSession, "elements/edit")
    session = live.session

    def edit():
        # a dry run on a copy first: each op's region pixels bounded and its errors named `ops.K` (elements_io)
        apply_ops(session.elements.copy(), req.ops, st.settings)
        _translating(lambda: session.apply(ElementsEdit(ops=_typed_ops(req.ops))), {})()
    async with live.lock:
        await anyio.to_thread.run_sync(edit)
    return await anyio.to_thread.run_sync(lambda: info(live, st))


@router.post("/{session_id}/render", response_model=ImageResponse, openapi_extra=common.body_schema(SessionRender))
async def render(request: Request, session_id: str):
    """Render the session's elements at full quality."""
    req = await common.parse_body(request, SessionRender)
    t0 = common.t0_of(request)
    st = common.state(request)
    live = st.sessions.get(session_id)
    _require(live, ElementsSession, "render")
    stop = Stop()
    image, run_s, wait_s = await common.run(
        request, "elements", lambda: live.session.final(ElementsEdit(prompt=req.prompt), step_callback=stop.check),
        FINAL, "render", {"prompt": "prompt"}, stop=stop)
    return await anyio.to_thread.run_sync(lambda: _image_response(request, t0, image, run_s, wait_s))


# ---------------------------------------------------------------------- the drag loop
@dataclass
class _Pending:
    """The one message waiting in a drag socket's slot: the newest drag, or a release (which replaces it)."""

    kind: str  # "drag" | "release" | "cancel"
    seq: int | None
    move: MoveRequest
    received: float  # time.perf_counter() when it arrived


class _DragSocket:
    """One drag WebSocket on one session: `receive` parses messages into the one-message slot, `process` runs
    what is in it (a preview, a commit, a cancel) and answers; errors keep the socket open."""

    def __init__(self, ws: WebSocket, st, session_id: str):
        self.ws, self.st, self.session_id = ws, st, session_id
        self.pending: _Pending | None = None
        self.running: dict = {}  # "cancel": stops the preview in flight (queued: never runs; running: at its next step)
        self.wake = asyncio.Event()
        self.metrics = st.metrics

    async def send_error(self, seq, e: APIError):
        await self.ws.send_json({"type": "error", "seq": seq, "status": e.status, "field": e.field,
                                 "message": e.message})

    # ------------------------------------------------------------------ in
    async def receive(self):
        while True:
            frame = await self.ws.receive()
            if frame["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(frame.get("code", 1000))
            received = time.perf_counter()
            self.metrics.count("ws_messages", ("received",))
            message = await self.parse(frame)
            if message is None:
                continue
            if self.pending is not None:
                self.metrics.count("ws_messages", ("dropped",))  # superseded before it started: never run
            if message.kind in ("release", "cancel") and "cancel" in self.running:
                self.running["cancel"]()  # a final must not wait for this socket's preview; a cancel stops it
            message.received = received
            self.pending = message
            self.wake.set()

    async def parse(self, frame) -> _Pending | None:
        """The frame as a message, or None after answering an error."""
        try:
            if frame.get("text") is None:
                raise ValueError("a binary frame")
            msg = json.loads(frame["text"])
            if not isinstance(msg, dict):
                raise ValueError
        except (ValueError, RecursionError):  # RecursionError: nested too deeply for json's parser
            await self.send_error(None, APIError(422, "message", "message: expected a JSON object"))
            return None
        kind, seq = msg.pop("type", None), msg.pop("seq", None)
        if kind not in ("drag", "release", "cancel") or not (seq is None or isinstance(seq, int)):
            await self.send_error(seq, APIError(422, "type", "type: expected 'drag', 'release' or 'cancel' "
                                                             "(and seq an integer)"))
            return None
        try:
            return _Pending(kind, seq, MoveRequest.model_validate(msg), 0.0)
        except ValidationError as e:
            await self.send_error(seq, common.validation_error(e))
            return None

    # ------------------------------------------------------------------ out
    async def process(self):
        while True:
            await self.wake.wait()
            self.wake.clear()
            message, self.pending = self.pending, None
            if message is None:
                continue
            try:
                await self.answer(message)
            except APIError as e:
                if not await self.answer_error(message, e):
                    return

    async def answer(self, message: _Pending) -> None:
        behind = time.perf_counter() - message.received  # waited for this socket's previous job: queueing too
        live = self.st.sessions.get(self.session_id)
        if message.kind == "cancel":  # previews change nothing: the one in flight is superseded by the next
            return
        if message.kind == "drag":
            image, run_s, wait_s = await run_preview(self.ws, live, message.move, self.running)
        else:
            image, run_s, wait_s = await run_final(self.ws, live, self.st, message.move, render_without_ids=False)
        out = await anyio.to_thread.run_sync(_image_response, self.ws, message.received, image, run_s, wait_s + behind)
        kind_out = "preview" if message.kind == "drag" else "final"
        await self.ws.send_json({"type": kind_out, "seq": message.seq, "image": out.image, "width": out.width,
                                 "height": out.height, "timing": out.timing.model_dump(),
                                 "undo": live.session.undo_depth})
        self.metrics.count("ws_messages", (kind_out,))
        self.metrics.request(f"{self.ws.scope['path_template']}#{kind_out}", "WS", 200,
                             time.perf_counter() - message.received)

    async def answer_error(self, message: _Pending, e: APIError) -> bool:
        """Answer a refused message; False when the socket closed (its session is gone)."""
        if e.status == 409 and e.field == "session_id":
            self.metrics.count("ws_messages", ("dropped",))  # a newer request of this session took over
            return True
        if e.status == 503 and message.kind == "drag":  # previews are shed first when the queue is full:
            self.metrics.count("ws_messages", ("shed",))  # the next position tries again
            await self.ws.send_json({"type": "busy", "seq": message.seq, "retry_after": int(e.headers["Retry-After"])})
            return True
        if e.status == 404:
            await self.ws.close(code=1008, reason=e.message[:120])
            return False
        await self.send_error(message.seq, e)
        return True


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
    ws.scope["path_template"] = "/v1/sessions/{session_id}/drag"
    socket = _DragSocket(ws, st, session_id)
    receiver, processor = asyncio.create_task(socket.receive()), asyncio.create_task(socket.process())
    try:
        done, _ = await asyncio.wait({receiver, processor}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() and not isinstance(task.exception(), WebSocketDisconnect):
                raise task.exception()
    finally:
        for task in (receiver, processor):
            task.cancel()
        await asyncio.gather(receiver, processor, return_exceptions=True)
        live.last_used = time.monotonic()
        live.sockets -= 1
