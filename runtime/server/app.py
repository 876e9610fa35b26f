"""The FastAPI app, built by a factory from loaded pipelines (tests pass tiny ones).

    app = create_app(reposition=RepositionPipeline.from_pretrained(w), elements=ElementsPipeline.from_pretrained(w),
                     settings=Settings(token="..."))

Heavy objects are made by the caller (or `cli.run`) and shared through `app.state.editrt`; each
pipeline gets one work queue (work.py) that all its requests and sessions go through. The edge
middleware times every request, bounds the body size before it is read, and counts requests
per endpoint for /metrics. Every refusal is an ErrorBody with a 4xx status (503 when busy).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import torch
from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from editrt.errors import EditError
from editrt.runtime.server.errors import APIError
from editrt.runtime.server.metrics import Metrics
from editrt.runtime.server.routers import ops, sessions, stateless
from editrt.runtime.server.routers.common import edit_error as common_edit_error
from editrt.runtime.server.routers.common import require_token
from editrt.runtime.server.sessions import SessionStore
from editrt.runtime.server.settings import Settings
from editrt.runtime.server.work import INTERACTIVE, PipelineWork

log = logging.getLogger("editrt.serve")
CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
         408: "timeout", 409: "conflict", 410: "gone", 413: "too_large", 415: "unsupported_media_type", 422: "invalid",
         499: "client_closed", 503: "busy"}


@dataclass
class ServerState:
    settings: Settings
    reposition: object | None
    elements: object | None
    metrics: Metrics = field(default_factory=Metrics)
    queues: dict = field(default_factory=dict)
    sessions: SessionStore = None
    device: object = "cpu"
    warm: bool = False

    @property
    def ready(self) -> bool:
        return bool(self.queues) and (self.warm or not self.settings.warmup)


def error_body(status: int, field: str, message: str) -> dict:
    return {"error": CODES.get(status, "error"), "field": field, "message": message}


def _json_error(status: int, field: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, field, message), status_code=status, headers=headers)


PUBLIC = ("/", "/assets/photo.png", "/docs")  # pages: static, no data and no compute (and /static/, /docs-assets/)
DOCS_ASSETS = "/docs-assets"
DOCS_PAGE = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>editrt API</title>
<link rel="stylesheet" href="{DOCS_ASSETS}/swagger-ui.css"><link rel="icon" href="{DOCS_ASSETS}/favicon.png"></head>
<body><div id="swagger-ui"></div>
<script src="{DOCS_ASSETS}/swagger-ui-bundle.js"></script>
<script>
const token = new URLSearchParams(location.hash.slice(1)).get("token");
SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui",
  requestInterceptor: (request) => {{ if (token) request.headers.Authorization = "Bearer " + token; return request; }}}});
</script></body></html>
"""


def swagger_ui_assets() -> str:
    """Swagger UI's bundle, stylesheet and icon as the fastapi-offline package ships them (only its files are used)."""
    import fastapi_offline

    return str(resources.files(fastapi_offline).joinpath("static"))
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")


def _host_name(host: str) -> str:
    """'name:port' / '[v6]:port' -> the name (lower case)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def refusal(settings: Settings, scope) -> tuple[int, str, str] | None:
    """(status, field, message) when the connection must be refused before anything is read: a token that
    does not match (constant-time), a Host that is not this server's (DNS rebinding), an Origin that is not
    the page's (a cross-site request from any web page)."""
    headers = {k.lower(): v for k, v in scope["headers"]}
    host = headers.get(b"host", b"").decode("latin-1")
    allowed = settings.allowed_hosts if settings.allowed_hosts is not None else (
        None if settings.token else LOOPBACK_NAMES)
    if allowed is not None and _host_name(host) not in allowed:
        return 403, "host", f"host: {host[:80]!r} is not a name of this server (allowed: {', '.join(allowed)})"
    origin = headers.get(b"origin")
    if origin is not None:
        origin = origin.decode("latin-1")
        if origin.split("://", 1)[-1].lower() != host.lower() and origin not in settings.allowed_origins:
            return 403, "origin", f"origin: {origin[:80]!r} is not this server's page ({host[:80]})"
    path = scope["path"]
    if scope["type"] == "http" and (path in PUBLIC or path.startswith(("/static/", DOCS_ASSETS + "/"))):
        return None
    if settings.token and scope["type"] == "http" and not token_matches(settings.token, headers.get(b"authorization")):
        return 401, "authorization", "authorization: expected the header 'Authorization: Bearer <token>'"
    return None


def token_matches(expected: str, authorization: bytes | None) -> bool:
    scheme, _, given = (authorization or b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected.encode())


class Edge:
    """Pure ASGI: the token, Host and Origin checks before any body is read, request timing (X-Server-Ms),
    the body-size bound, per-endpoint metrics; at shutdown, 503 to requests still waiting."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            refused = refusal(self.state.settings, scope)
            if refused is not None:  # before accept: the handshake gets a 403
                await send({"type": "websocket.close", "code": 1008, "reason": refused[2][:120]})
                return
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = scope["editrt_t0"] = time.perf_counter()
        limit = self.state.settings.max_upload_bytes
        status = {"code": 500}
        length = dict(scope["headers"]).get(b"content-length")
        refused = refusal(self.state.settings, scope)
        if refused is None and length is not None and (not length.isdigit() or int(length) > limit):
            refused = (413 if length.isdigit() else 400, "content-length",
                       f"content-length: the body is larger than the limit ({limit} bytes)"
                       if length.isdigit() else "content-length: expected a number")
        if refused is not None:  # answered without reading the body
            headers = {"WWW-Authenticate": "Bearer"} if refused[0] == 401 else {}
            if length not in (None, b"0") or b"chunked" in dict(scope["headers"]).get(b"transfer-encoding", b""):
                # a body we will not read: close the connection, so the event loop does not go on receiving it
                # (uvicorn would read and drop it to parse the next request; with 4 senders of 12 MB bodies that
                # doubled /healthz's median on the 2-core dev machine, tests/server/test_edge_load.py)
                headers["Connection"] = "close"
            response = _json_error(*refused, headers=headers)
            await response(scope, receive, send)
            self._record(scope, response.status_code, t0)
            return
        seen, body_done = 0, False
        timeout_s = self.state.settings.read_timeout_s

        async def bounded_receive():
            """The body, bounded in bytes (a chunked body has no content-length) and in time while it arrives."""
            nonlocal seen, body_done
            if body_done:  # after the body: waiting for a disconnect, unbounded
                return await receive()
            try:
                async with asyncio.timeout(timeout_s):
                    message = await receive()
            except TimeoutError:
                raise APIError(408, "body", f"body: did not arrive within {timeout_s:g} s") from None
            seen += len(message.get("body", b""))
            body_done = not message.get("more_body", False)
            if seen > limit:
                raise APIError(413, "body", f"body: larger than the limit ({limit} bytes)")
            return message

        async def timed_send(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                headers = list(message.get("headers", []))
                headers.append((b"x-server-ms", f"{(time.perf_counter() - t0) * 1e3:.3f}".encode()))
                message = dict(message, headers=headers)
            await send(message)

        try:
            await self.app(scope, bounded_receive, timed_send)
        except asyncio.CancelledError:  # uvicorn's graceful-shutdown timeout cancels requests still running
            if "started" not in status:
                with contextlib.suppress(Exception):
                    await _json_error(503, "server", "server: shutting down; retry later",
                                      {"Retry-After": str(self.state.settings.retry_after_s)})(scope, receive, send)
                    status["code"] = 503
            raise
        finally:
            self._record(scope, status["code"], t0)

    def _record(self, scope, status: int, t0: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "unmatched")
        self.state.metrics.request(endpoint, scope["method"], status, time.perf_counter() - t0)


def _warm_up(state: ServerState) -> None:
    """One small request through each pipeline (and their loops), so the first user does not pay for it."""
    with Image.open(resources.files("editrt").joinpath("assets", "chelsea.png")) as photo:
        rgb = np.asarray(photo.convert("RGB").resize((64, 48)))
    with torch.no_grad():
        if state.reposition is not None:
            mask = state.reposition.segment(rgb, points=[[32, 24]])
            state.reposition(rgb, mask=mask, move=(4, 0), steps=1)
        if state.elements is not None:
            state.elements.decode(state.elements.partition(rgb, grid=4), steps=1)


def create_app(reposition=None, elements=None, settings: Settings | None = None,
               session_store: SessionStore | None = None) -> FastAPI:
    """The app over loaded pipelines (either may be None: its endpoints then answer 422 / are absent).
    `session_store`: the session store (default: one from the settings' limits; the Ray Serve deployment
    passes its replica's store, whose ids name the replica)."""
    if reposition is None and elements is None:
        raise EditError("create_app: expected at least one pipeline (reposition= or elements=)")  # neither alone: no field
    settings = settings or Settings.from_env()
    state = ServerState(settings, reposition, elements)
    state.sessions = session_store if session_store is not None else SessionStore(  # (an empty store is falsy: len 0)
        settings.max_sessions, settings.session_ttl_s, settings.session_bytes)
    state.device = (reposition or elements).device

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        observe = lambda name: (lambda stage, wait_s, run_s: state.metrics.stage_time(name, stage, wait_s, run_s))
        for name, pipe in (("reposition", reposition), ("elements", elements)):
            if pipe is not None:
                state.queues[name] = PipelineWork(name, pipe, settings.retry_after_s, settings.queue_size, observe(name))
        sweeper = asyncio.create_task(_sweep(state))
        warm = asyncio.create_task(_warm(state)) if settings.warmup else None
        try:
            yield
        finally:
            sweeper.cancel()
            if warm is not None:
                warm.cancel()
            for work in state.queues.values():  # first: waiting requests answer 503, running jobs stop
                work.close()
            await asyncio.to_thread(state.sessions.close_all)
            state.queues.clear()

    app = FastAPI(title="editrt", version="0.1.0", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None,
                  description="Interactive diffusion-based spatial image editing: subject repositioning and image "
                              "elements. Every error is an ErrorBody naming the field.")
    app.state.editrt = state
    _metrics_gauges(state)
    _with_body_schemas(app)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _json_error(e.status, e.field, e.message, e.headers)

    @app.exception_handler(EditError)
    async def edit_error(request, e: EditError):  # bad input outside common.run, which knows the route's field names
        answer = common_edit_error(e, {})  # no field map here: 422 on the body (404 for a closed session)
        return _json_error(answer.status, answer.field, answer.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": ("body",), "msg": "invalid request"}
        loc = [str(p) for p in first["loc"]]
        if len(loc) > 1 and loc[0] in ("body", "query", "path"):
            loc = loc[1:]
        field = ".".join(loc) or "body"
        return _json_error(422, field, f"{field}: {first['msg']}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _json_error(e.status_code, "path" if e.status_code in (404, 405) else "body", str(e.detail),
                           getattr(e, "headers", None))

    @app.exception_handler(json.JSONDecodeError)
    async def bad_json(request, e):
        return _json_error(400, "body", f"body: not valid JSON ({e.msg})")

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_token)])
    async def openapi():
        return JSONResponse(app.openapi())

    # Swagger UI from the server itself (an air-gapped browser has no CDN); the page is public, the schema is not:
    # like the editor page, it takes the token from #token=... and sends it as a header.
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_assets()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return HTMLResponse(DOCS_PAGE)

    app.include_router(ops.router)
    app.include_router(ops.page)
    app.include_router(stateless.router)
    app.include_router(sessions.router)
    app.mount("/static", StaticFiles(packages=[("editrt.runtime.server", "static")]), name="static")
    app.add_middleware(Edge, state=state)
    return app


def _with_body_schemas(app: FastAPI) -> None:
    """The OpenAPI document with the request bodies routes read themselves (routers/common.parse_body:
    JSON off the event loop, or multipart) in its components, where their $refs point."""
    from editrt.runtime.server.routers.common import BODY_MODELS

    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in BODY_MODELS.items():
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for def_name, definition in body.pop("$defs", {}).items():
                    components.setdefault(def_name, definition)
                components.setdefault(name, body)
        return app.openapi_schema
    app.openapi = openapi


async def _warm(state: ServerState) -> None:
    """Warm-up as a job of the first pipeline's queue; /readyz turns 200 when it is done."""
    name = next(iter(state.queues))
    try:
        await state.queues[name].run(lambda: _warm_up(state), INTERACTIVE, "warmup")
    except Exception:  # noqa: BLE001 - logged with its traceback; /readyz stays 503, naming no field
        log.exception("warm-up failed; /readyz stays not ready")
        return
    state.warm = True


async def _sweep(state: ServerState) -> None:
    while True:
        await asyncio.sleep(min(5.0, max(0.05, state.settings.session_ttl_s / 4)))
        state.sessions.sweep()


def _metrics_gauges(state: ServerState) -> None:
    m = state.metrics
    m.gauge("editrt_queue_depth", "Jobs waiting in each pipeline's work queue.",
            lambda: {(("queue",), (n,)): q.depth for n, q in state.queues.items()})
    m.gauge("editrt_sessions_open", "Open edit sessions.", lambda: len(state.sessions))
    m.gauge("editrt_session_bytes", "Host bytes held by open sessions (images, masks, caches, undo).",
            lambda: state.sessions.bytes())
    m.gauge("editrt_sessions_evicted_total", "Sessions closed by TTL, the LRU cap or the byte budget.",
            lambda: {(("reason",), (k,)): v for k, v in state.sessions.evicted.items()})
    m.gauge("editrt_cache_bytes", "Bytes held by each of the pipelines' bounded caches (SAM embeddings, REMOVE "
            "passes, prompts, denoising loops).", lambda: _cache_bytes(state))
    m.gauge("editrt_ready", "1 when weights are loaded and warm.", lambda: int(state.ready))
    if torch.device(state.device).type == "cuda":
        m.gauge("editrt_cuda_memory_bytes", "CUDA memory allocated / reserved by PyTorch.",
                lambda: {(("kind",), ("allocated",)): torch.cuda.memory_allocated(state.device),
                         (("kind",), ("reserved",)): torch.cuda.memory_reserved(state.device)})


def _cache_bytes(state: ServerState) -> dict:
    out = {}
    for name, pipe in (("reposition", state.reposition), ("elements", state.elements)):
        for cache in pipe.caches() if pipe is not None else ():
            out[(("pipeline", "cache"), (name, cache.name))] = cache.stats()["bytes"]
    return out
