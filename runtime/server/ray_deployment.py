"""`editrt serve --ray`: the same FastAPI app as a Ray Serve deployment, one pipeline pair per replica.

    app = build_app(RayOptions(replicas=2, sessions_per_replica=8), ServeConfig(weights="/w"), settings=Settings())
    serve.run(app, name="editrt", route_prefix="/")

Sessions are state that lives in one replica (its EditSession, the pipeline cache entries keyed
by its token), so every request about a session must reach that replica:

* Ids name their replica: `<replica id>.<random token>` (the replica's store has that prefix).
* Routing from the id alone: the deployment's request router (`SessionAffinityRouter`) reads the
  session id from the request's path (`/v1/sessions/{id}/...`, the drag WebSocket included) and
  sends the request to that replica only, waiting while it is busy, never to another one. A
  client needs no header, so the browser page and every existing client work unchanged; a request
  that carries Ray Serve's `serve_multiplexed_model_id` header (e.g. GET /metrics of the replica
  holding a session) is routed by the header's id the same way. New sessions go round robin over
  the replicas; one-shot requests to the least busy.
* Inside a replica the sessions are Ray Serve multiplexed models (`serve.multiplexed`, the session
  id as the model id, `max_num_models_per_replica` = sessions per replica): each use of a session
  marks it recently used, opening one more than the replica may hold evicts the least recently
  used, and eviction closes it (EditSession.close, which drops its pipeline cache entries). The
  multiplexers report the ids they hold to the controller (the router breaks placement ties with it).
* A session id this replica does not hold (evicted, expired, closed, or its replica is gone)
  answers 410 Gone naming the session (a WebSocket is closed with 1008 and that message).

Every response carries `X-Editrt-Replica` (the replica id, the prefix of the ids it hands out).
"""
from __future__ import annotations

import asyncio
import hmac
import os
import pickle
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from editrt.errors import InputError
from editrt.runtime.server.errors import APIError
from editrt.runtime.server.loading import ServeConfig, load_pipelines
from editrt.runtime.server.sessions import SessionStore
from editrt.runtime.server.settings import Settings

REPLICA_HEADER = "x-editrt-replica"
SESSION_PATH = re.compile(r"/v1/sessions/([^/?#]+)")
CREATE_PATH = "/v1/sessions"


# ---------------------------------------------------------------------- options
@dataclass
class RayOptions:
    """How the deployment scales. Autoscaling is on when min_replicas / max_replicas allow a range."""

    replicas: int = 1  # replicas at start (the fixed count when not autoscaling)
    gpus_per_replica: float = 0.0  # Ray's num_gpus per replica (fractions share a GPU)
    cpus_per_replica: float = 1.0
    min_replicas: int | None = None
    max_replicas: int | None = None
    # Ongoing requests per replica the autoscaler aims at. An open drag WebSocket is one ongoing
    # request for as long as it is open: 2 = two people dragging per pipeline before a replica is added.
    target_ongoing_requests: float = 2.0
    sessions_per_replica: int = 8  # open sessions a replica holds before the least recently used closes
    max_ongoing_requests: int = 16  # per replica (drag sockets included); more wait in the proxy
    # Scaling down stops a replica and closes its sessions: wait long before doing it.
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 600.0
    name: str = "editrt"
    # PROMETHEUS_MULTIPROC_DIR of every replica: their counters and histograms are summed in any replica's
    # /metrics (None: each replica reports only its own)
    metrics_dir: str | None = None

    @property
    def cpu_threads(self) -> int:
        """PyTorch's intra-op threads in a replica: its CPUs (at least one), so that replicas sharing
        a machine do not oversubscribe it. CPU results depend on this count in their last bits: a
        single-process server with as many threads gives the same bytes."""
        return max(1, int(self.cpus_per_replica))

    @property
    def low(self) -> int:
        """Fewest replicas: 1 unless --min-replicas says (0 = scale to zero: the next user waits for a
        replica to load its weights)."""
        return 1 if self.min_replicas is None else self.min_replicas

    @property
    def autoscaling(self) -> bool:
        return (self.min_replicas, self.max_replicas) != (None, None)

    def check(self) -> RayOptions:
        def positive(name: str, value, zero_ok: bool = False) -> None:
            if value is not None and (value < 0 or (value == 0 and not zero_ok)):
                raise InputError(f"--{name.replace('_', '-')}: expected a {'non-negative' if zero_ok else 'positive'} "
                                 f"number, got {value}")
        for name in ("replicas", "cpus_per_replica", "target_ongoing_requests", "sessions_per_replica",
                     "max_ongoing_requests"):
            positive(name, getattr(self, name))
        positive("gpus_per_replica", self.gpus_per_replica, zero_ok=True)
        positive("min_replicas", self.min_replicas, zero_ok=True)
        positive("max_replicas", self.max_replicas)
        low = self.low
        high = self.max_replicas if self.max_replicas is not None else max(self.replicas, low)
        if not low <= self.replicas <= high:
            raise InputError(f"--replicas {self.replicas}: expected between --min-replicas ({low}) and "
                             f"--max-replicas ({high})")
        if self.max_ongoing_requests <= self.target_ongoing_requests:
            raise InputError(f"--target-ongoing-requests {self.target_ongoing_requests:g}: expected less than the "
                             f"{self.max_ongoing_requests} requests a replica takes at once")
        return self

    def deployment_options(self) -> dict:
        """Keyword arguments of serve.deployment."""
        actor = {"num_cpus": self.cpus_per_replica}
        if self.metrics_dir:
            actor["runtime_env"] = {"env_vars": {"PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}}
        if self.gpus_per_replica:
            actor["num_gpus"] = self.gpus_per_replica
        out = dict(name=self.name, ray_actor_options=actor, max_ongoing_requests=self.max_ongoing_requests,
                   request_router_config={"request_router_class": SessionAffinityRouter})
        if self.autoscaling:
            out["autoscaling_config"] = {
                "min_replicas": self.low,
                "initial_replicas": self.replicas,
                "max_replicas": self.max_replicas if self.max_replicas is not None else self.replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s}
        else:
            out["num_replicas"] = self.replicas
        return out


def build_app(options: RayOptions, config: ServeConfig, settings: Settings):
    """The Serve application: `config` is what each replica loads (loading.load_pipelines; resolve it first,
    in the driver: `config.resolved()`, so replicas do not each make cached weights); `settings` are the
    app's limits."""
    options.check()
    deployment = serve.deployment(**options.deployment_options())(EditrtReplica)
    return deployment.bind(config, settings, options.sessions_per_replica, options.cpu_threads)


# ---------------------------------------------------------------------- routing (runs in the proxy)
def _scope_of(pending: PendingRequest) -> dict:
    """The ASGI scope of a request the HTTP proxy sends (it passes the scope pickled as the one
    argument); {} for any other caller."""
    arg = pending.args[0] if pending.args else None
    if isinstance(arg, (bytes, bytearray)):
        return getattr(pickle.loads(arg), "asgi_scope", None) or {}
    return {}


def session_of(path: str) -> str | None:
    match = SESSION_PATH.match(path)
    return match.group(1) if match else None


def replica_of(session_id: str) -> str:
    """The replica named by a session id (its prefix before the first '.')."""
    return session_id.split(".", 1)[0]


class SessionAffinityRouter(RequestRouter):
    """Requests about a session go to the replica its id names, and nowhere else (a busy replica
    is waited for); when that replica no longer exists, any replica answers (410). Opening a
    session goes round robin; everything else to the least busy."""

    def initialize_state(self, **kwargs):
        self.opened = Counter()  # sessions this router has sent to be opened, per replica id (ties)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        # Back off between attempts when the chosen replica is full (without it the router spins).
        pending_request.routing_context.should_backoff = True
        scope = _scope_of(pending_request)
        path = scope.get("path", "")
        session = session_of(path) or pending_request.metadata.multiplexed_model_id or None
        if session is not None:
            owner = [r for r in candidate_replicas if r.replica_id.unique_id == replica_of(session)]
            if owner:
                return [owner]
        elif scope.get("method") == "POST" and path.rstrip("/") == CREATE_PATH:
            # Round robin over the replicas by the opens this router sent them (the multiplexers' reports
            # of what each holds lag behind by a broadcast, so they only break ties); a replica seen
            # for the first time starts level with the others instead of taking every open for a while.
            start = min(self.opened.values(), default=0)
            for r in candidate_replicas:
                self.opened.setdefault(r.replica_id.unique_id, start)
            order = sorted(candidate_replicas, key=lambda r: (self.opened[r.replica_id.unique_id],
                                                              len(r.multiplexed_model_ids), r.replica_id.unique_id))
            self.opened[order[0].replica_id.unique_id] += 1
            return [[r] for r in order]
        # The least busy of all (ties broken at random, so idle replicas share the one-shot requests).
        return [random.sample(candidate_replicas, len(candidate_replicas))]


# ---------------------------------------------------------------------- the replica
class ReplicaSessions(SessionStore):
    """A replica's sessions: ids start with the replica id; the multiplexer caps how many are open
    (this store still closes idle ones after the TTL and the least recently used beyond the byte
    budget). `opened` lists ids opened since the replica last registered them with the multiplexer."""

    def __init__(self, settings: Settings, replica: str, on_close):
        super().__init__(sys.maxsize, settings.session_ttl_s, settings.session_bytes, id_prefix=f"{replica}.")
        self.opened: list[str] = []
        self.on_close = on_close

    def add(self, *args, **kwargs):
        live = super().add(*args, **kwargs)
        self.opened.append(live.id)
        return live

    def close(self, sid: str, why: str | None = None) -> None:
        held = self.has(sid)
        super().close(sid, why)
        if held:
            self.on_close(sid)


class SessionLease:
    """What the multiplexer holds for one session. Ray calls `__del__` when it evicts the session
    (in a worker thread): that closes the session on the replica's event loop. Python calls it again
    when the lease is collected; by then the session is closed and closing again does nothing."""

    def __init__(self, session_id: str, sessions: ReplicaSessions, loop: asyncio.AbstractEventLoop):
        self.id, self.sessions, self.loop = session_id, sessions, loop

    def __del__(self):
        if self.loop.is_closed():  # the replica stopped: its app's shutdown closed every session
            return
        self.loop.call_soon_threadsafe(self.sessions.close, self.id, "lru")


def gone_message(session_id: str) -> str:
    return (f"session_id {session_id[:64]!r}: not open on this server (closed, expired, or evicted to make room "
            "for newer sessions); open a new session")


def _authorized(scope: dict, token: str | None) -> bool:
    """The app's own token rule (routers/common.token_ok): a bearer header, or a `bearer.<token>`
    subprotocol on a WebSocket (never the URL)."""
    if not token:
        return True
    headers = dict(scope.get("headers") or [])
    scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() != "bearer":
        given = ""
        if scope["type"] == "websocket":
            given = next((p[len("bearer."):] for p in scope.get("subprotocols", []) if p.startswith("bearer.")), "")
    return hmac.compare_digest(given.encode(), token.encode())


class SessionRouting:
    """Pure ASGI, outside the app: a request naming a session this replica does not hold answers
    410; one naming a session it holds marks it used in the multiplexer; sessions a request opened
    join the multiplexer before the response (which tells the client the id) starts; every
    response gets X-Editrt-Replica."""

    def __init__(self, app, replica: EditrtReplica):
        self.app, self.replica = app, replica

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        replica = self.replica
        tag = (REPLICA_HEADER.encode(), replica.replica_id.encode())
        session = session_of(scope["path"])
        # Without the token the app answers 401 itself; an unauthenticated request neither learns
        # nor touches what this replica holds.
        if session is not None and _authorized(scope, replica.settings.token) and not await replica.hold(session):
            message = gone_message(session)
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            body = {"error": "gone", "field": "session_id", "message": message}
            return await JSONResponse(body, status_code=410, headers={REPLICA_HEADER: replica.replica_id})(scope, receive, send)

        async def tagged_send(message):
            if message["type"] in ("http.response.start", "websocket.accept"):
                await replica.register_opened()
                message = {**message, "headers": [*message.get("headers", []), tag]}
            await send(message)

        await self.app(scope, receive, tagged_send)


@serve.ingress()  # late-bound app: __serve_build_asgi_app__ returns the app this replica built
class EditrtReplica:
    """One replica: its own pipelines (loading.load_pipelines, as `editrt serve` loads them), the app
    over them, and its sessions as multiplexed models."""

    def __init__(self, config: ServeConfig, settings: Settings, sessions_per_replica: int, cpu_threads: int = 1):
        import torch

        from editrt.runtime.server.app import create_app

        torch.set_num_threads(cpu_threads)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # RayOptions.metrics_dir; on another node it may not exist
            os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.settings = settings
        config = config.resolved()
        if not settings.weights:  # shown by /readyz
            settings.weights = config.weights
        pipelines = load_pipelines(config)
        self.sessions = ReplicaSessions(settings, self.replica_id, on_close=self._unload)

        async def load_session(session_id: str) -> SessionLease:
            # Only reached for an id this store holds (`hold` checks first: loading makes room by
            # evicting, which must never happen for an id that is not a session here).
            if not self.sessions.has(session_id):
                raise APIError(410, "session_id", gone_message(session_id))
            return SessionLease(session_id, self.sessions, asyncio.get_running_loop())

        self._load_session = load_session
        self._multiplexed = serve.multiplexed(max_num_models_per_replica=sessions_per_replica)(load_session)
        self.http_app = create_app(**pipelines, settings=settings, session_store=self.sessions)
        self.http_app.add_middleware(SessionRouting, replica=self)

    async def __serve_build_asgi_app__(self):
        return self.http_app  # (`app` is the wrapper's own property)

    async def hold(self, session_id: str) -> bool:
        """Mark the session used in the multiplexer; False when this replica does not hold it."""
        if not self.sessions.has(session_id):
            return False
        await self._multiplexed(session_id)
        return self.sessions.has(session_id)

    async def register_opened(self) -> None:
        """Load the sessions opened since the last call into the multiplexer (evicting the least
        recently used beyond sessions_per_replica), so it reports them and counts them."""
        while self.sessions.opened:
            session_id = self.sessions.opened.pop(0)
            if self.sessions.has(session_id):
                await self._multiplexed(session_id)

    def _unload(self, session_id: str) -> None:
        """A session the store closed (DELETE, TTL, byte budget) leaves the multiplexer too, so it
        does not keep a slot. Ray has no public unload: this drops it from the multiplexer's table."""
        multiplexer = getattr(self._load_session, "__serve_multiplex_wrapper", None)
        if multiplexer is not None and multiplexer.models.pop(session_id, None) is not None:
            multiplexer._push_multiplexed_replica_info = True  # report the change to the controller
