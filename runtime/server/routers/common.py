"""What every router shares: body parsing (JSON or multipart), images, running pipeline work, timing."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping

import anyio
from fastapi import HTTPException, Request, Response
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import HTTPConnection

from editrt.errors import EditError
from editrt.runtime.server.errors import APIError
from editrt.runtime.server.image_codecs import b64decode, decode_image, png_bytes, sniff_format
from editrt.runtime.server.schemas import Timing
from editrt.runtime.server.work import Busy, Stop, Superseded
from editrt.runtime.work_queue import BusyError, Cancelled

MULTIPART = "multipart/form-data"
OFF_LOOP_BYTES = 64 * 1024  # larger JSON bodies are parsed on a worker thread


def state(conn: HTTPConnection):
    return conn.app.state.editrt


def pipeline(conn: HTTPConnection, name: str):
    """The loaded pipeline `name`; a server started without it answers 404 on its endpoints."""
    pipe = getattr(state(conn), name)
    if pipe is None:
        raise APIError(404, "path", f"path: this server has no {name} pipeline loaded (see --editors)")
    return pipe


# ---------------------------------------------------------------------- authentication
WS_PROTOCOL, WS_TOKEN_PREFIX = "editrt", "bearer."  # new WebSocket(url, ["editrt", "bearer." + token])


def token_ok(conn: HTTPConnection) -> bool:
    """The bearer token from the Authorization header or, on a WebSocket (a browser cannot set its headers),
    a `bearer.<token>` subprotocol: never from the URL, which access logs and browser histories keep."""
    expected = state(conn).settings.token
    if not expected:
        return True
    scheme, given = get_authorization_scheme_param(conn.headers.get("authorization"))
    if scheme.lower() != "bearer":
        given = ""
        if conn.scope["type"] == "websocket":
            given = next((p[len(WS_TOKEN_PREFIX):] for p in conn.scope.get("subprotocols", [])
                          if p.startswith(WS_TOKEN_PREFIX)), "")
    return hmac.compare_digest(given.encode(), expected.encode())


async def require_token(conn: HTTPConnection) -> None:
    """Every API route depends on this (the edge checked it already, before reading the body); the WebSocket
    route checks the same token itself, before it accepts."""
    if conn.scope["type"] == "websocket":
        return
    if not token_ok(conn):
        raise APIError(401, "authorization", "authorization: expected the header 'Authorization: Bearer <token>'",
                       headers={"WWW-Authenticate": "Bearer"})


# ---------------------------------------------------------------------- request bodies
BODY_MODELS: dict[str, type[BaseModel]] = {}  # request bodies parsed by parse_body: app.py adds their schemas


def body_schema(model: type[BaseModel], multipart: bool = False) -> dict:
    """OpenAPI `openapi_extra` for a body that parse_body reads (JSON; also multipart where image fields may
    be files)."""
    BODY_MODELS[model.__name__] = model
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    content = {"application/json": {"schema": schema}}
    if multipart:
        content[MULTIPART] = {"schema": schema}
    return {"requestBody": {"required": True, "content": content}}


def validation_error(e: ValidationError, prefix: tuple = ()) -> APIError:
    first = e.errors()[0]
    loc = [str(p) for p in (*prefix, *first["loc"])]
    field = ".".join(loc) or "body"
    return APIError(422, field, f"{field}: {first['msg']}")


async def parse_body(request: Request, model: type[BaseModel], image_fields: tuple[str, ...] = ()) -> BaseModel:
    """The request body as `model`: JSON, or multipart/form-data whose file parts are the image fields
    (sent as files) and whose other parts are the remaining fields (JSON values or plain text)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == MULTIPART:
        limits = state(request).settings
        try:
            form = await request.form(max_files=8, max_fields=64, max_part_size=limits.max_upload_bytes)
        except HTTPException as e:  # starlette's multipart parser: malformed body or too many parts
            raise APIError(400, "body", f"body: {e.detail}") from None
        data = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in image_fields:
                    raise APIError(422, key, f"{key}: a file was uploaded, but this field is not an image")
                raw = await value.read()
                if raw:
                    sniff_format(raw, key, (value.content_type or "").lower() or None)
                data[key] = base64.b64encode(raw).decode()
            elif key in image_fields:
                data[key] = value
            else:
                data[key] = _form_value(value, key)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
    if ctype not in ("application/json", ""):
        raise APIError(415, "content-type", f"content-type: expected application/json or {MULTIPART}, got {ctype}")
    body = await request.body()
    if not body:
        raise APIError(422, "body", "body: expected a JSON object")
    try:
        if len(body) <= OFF_LOOP_BYTES:
            return model.model_validate_json(body)
        return await anyio.to_thread.run_sync(model.model_validate_json, body)  # the event loop keeps serving
    except ValidationError as e:
        raise validation_error(e) from None


def _form_value(text: str, key: str):
    """A multipart text part: JSON when it parses as JSON (lists, numbers, booleans), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text
    except RecursionError:  # json's parser recurses per nesting level
        raise APIError(422, key, f"{key}: nested too deeply") from None


async def image(request: Request, text: str, name: str, mode: str = "RGB"):
    """base64 text -> uint8 array, decoded off the event loop (bounded by the size checks first)."""
    settings = state(request).settings
    data = b64decode(text, name)
    return await anyio.to_thread.run_sync(lambda: decode_image(data, name, settings, mode))


async def mask(request: Request, text: str, name: str):
    return (await image(request, text, name, mode="L")) > 127


# ---------------------------------------------------------------------- pipeline work
def request_field(e: EditError, fields: Mapping[str, str]) -> str:
    """The request field an EditError is about: its `field` (the library's keyword) as this route spells it,
    or "body" when it names none or one this route does not take. The message is never read."""
    return fields.get(e.field, "body") if e.field is not None else "body"


@contextlib.contextmanager
def edit_errors_as_422(fields: Mapping[str, str]):
    """Inside the block, an EditError (a typed edit refusing a value where it is built) is answered 422 on the
    request field `fields` maps its field to (request_field), as common.run does for a pipeline's."""
    try:
        yield
    except EditError as e:
        raise edit_error(e, fields) from None


def edit_error(e: EditError, fields) -> APIError:
    """The answer to a library's EditError: 422 on the request field its `field` maps to, or 404 on the
    session id when the session was closed (DELETE, TTL, eviction) while the request waited."""
    if e.field == "session":
        return APIError(404, "session_id", "session_id: the session was closed while this request waited")
    return APIError(422, request_field(e, fields), str(e))


def same_names(*names: str) -> dict[str, str]:
    """A route's field map where the request spells each library keyword the same way."""
    return {name: name for name in names}


async def run(request_or_ws, queue_name: str, fn, priority: int, stage: str,
              fields: Mapping[str, str] | Iterable[str] = (), future=None, stop: Stop | None = None):
    """Run `fn` as a job of the pipeline's work queue (or await `future`, a session's own job: a
    callable returning (future, cancel)); a full queue becomes 503, bad input (EditError) 422 naming the
    request field: `fields` maps the library's field names (EditError.field) to this route's (an iterable of
    names: each spelled the same way); one it does not map is "body".
    `stop`: the flag fn's pipeline call checks after each step (step_callback=stop.check); an HTTP
    client that disconnects sets it, so its job never starts or stops at its next step."""
    st = state(request_or_ws)
    pipeline(request_or_ws, queue_name)
    fields = fields if isinstance(fields, Mapping) else same_names(*fields)
    work = st.queues[queue_name]
    stop = stop or Stop()
    watcher = asyncio.create_task(_watch_disconnect(request_or_ws, stop)) if isinstance(request_or_ws, Request) \
        else None
    try:
        if future is not None:
            try:
                fut, cancel = future()
            except BusyError as e:
                raise Busy(str(e), work.retry_after) from None
            if watcher is not None:  # a session's own job reads no Stop: a client that went away cancels it
                watcher.add_done_callback(lambda _done: cancel() if stop.is_set() else None)
            return await work.wait(fut, cancel, stage)
        return await work.run(fn, priority, stage, stop)
    except Cancelled:
        raise APIError(499, "client", "client: went away; the job was stopped") from None
    except Busy as e:
        st.metrics.count("busy", (queue_name,))
        raise APIError(503, "queue", f"queue: {e}", headers={"Retry-After": str(e.retry_after)}) from None
    except Superseded as e:
        raise APIError(409, "session_id", f"session_id: {e}") from None
    except EditError as e:
        raise edit_error(e, fields) from None
    finally:
        if watcher is not None:
            watcher.cancel()


async def _watch_disconnect(request: Request, stop: Stop, every_s: float = 0.1) -> None:
    """Set `stop` when the client disconnects (uvicorn does not cancel a request whose client went away)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    stop.set()


def timing(request_or_ws, t0: float, run_s: float, queue_s: float = 0.0) -> Timing:
    return Timing(server_ms=round((time.perf_counter() - t0) * 1e3, 3), pipeline_ms=round(run_s * 1e3, 3),
                  queue_ms=round(queue_s * 1e3, 3))


async def png_response(image, t0: float, run_s: float, wait_s: float) -> Response:
    """A PNG body with the server-side timing in headers (the edge adds X-Server-Ms); encoded on a worker thread,
    so the event loop keeps serving while a large image is compressed."""
    data = await anyio.to_thread.run_sync(png_bytes, image)
    return Response(data, media_type="image/png",
                    headers={"X-Pipeline-Ms": f"{run_s * 1e3:.3f}", "X-Queue-Ms": f"{wait_s * 1e3:.3f}"})


def check_steps_cap(request, *values) -> None:
    """Each (field, steps) within the server's max_steps (the pipelines check that steps are positive)."""
    cap = state(request).settings.max_steps
    for name, v in values:
        if v is not None and v > cap:
            raise APIError(422, name, f"{name}: at most {cap} on this server, got {v}")




def steps_of(request, steps: int | None, name: str = "steps") -> int:
    """The request's steps, or the server's default; refused above the server's cap."""
    settings = state(request).settings
    steps = settings.final_steps if steps is None else steps
    check_steps_cap(request, (name, steps))
    return steps


def t0_of(request) -> float:
    return request.scope.get("editrt_t0", time.perf_counter())
