"""Open edit sessions: ids, TTL, an LRU cap and a byte budget.

A `Live` wraps one editor session (runtime/session.py: a RepositionSession or an ElementsSession, which own
their selection, drag state, commit and undo history) and what only the server keeps beside it: its id,
last use, the lock that orders its state changes (select, final, undo) between its REST calls and its
WebSocket, and the drag sockets open on it. All its pipeline work runs on the pipeline's work queue.

Starting a preview is not free: the session snapshots what the render reads, and an elements session's
snapshot is a copy of its elements with the edit applied (every region drawn to find collisions), which grows
with the elements and their regions. `SessionStore.start_preview` runs it on the store's few threads, never on
the event loop, one at a time per session in arrival order, so the newest preview is still the one submitted
last (latest wins).
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from editrt.runtime.server.errors import APIError
from editrt.runtime.session import ElementsSession, RepositionSession
from editrt.runtime.work_queue import BusyError

KINDS = {RepositionSession: "reposition", ElementsSession: "elements"}  # the wire's `kind` of each session class
PREVIEW_START_THREADS = 4  # previews of different sessions start side by side; the render itself is the queue's


@dataclass
class Live:
    id: str
    session: RepositionSession | ElementsSession
    steps: int
    preview_steps: int
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    sockets: int = 0  # drag WebSockets open on it (capped by Settings.ws_per_session)
    starting: asyncio.Lock = field(default_factory=asyncio.Lock)  # its previews start one at a time, FIFO
    # held by the store's thread while a start runs: a start whose request went away releases `starting` at
    # once, but the next start of this session still waits here until the abandoned one has returned
    start_running: threading.Lock = field(default_factory=threading.Lock)

    @property
    def kind(self) -> str:
        """The editor's name on the wire ('reposition' | 'elements')."""
        return KINDS[type(self.session)]

    def nbytes(self) -> int:
        """What this session holds in host memory (image, selection, elements, undo history; the pipeline's
        caches have their own byte budgets and show in /metrics)."""
        return self.session.nbytes()


def close_quietly(session) -> None:
    """Close a session off the event loop. Dropping its cache entries is a job on the pipeline's queue; with
    the queue full that job is refused (BusyError) and the entries stay until the caches' byte budgets evict
    them, which bounds them: a full queue must not leave a traceback per closed session."""
    with contextlib.suppress(BusyError):
        session.close()


class SessionStore:
    """`id_prefix` starts every session id (a Ray Serve replica puts its own id there, so that a
    request naming the session can be routed to the replica that holds it)."""

    def __init__(self, max_sessions: int, ttl_s: float, budget_bytes: int, id_prefix: str = ""):
        self.max_sessions, self.ttl_s, self.budget = max_sessions, ttl_s, budget_bytes
        self.id_prefix = id_prefix
        self._live: dict[str, Live] = {}  # insertion order = LRU order (touch moves to the end)
        self.evicted = {"ttl": 0, "lru": 0, "bytes": 0}
        # where previews start (their snapshots): bounded, and apart from the event loop and the work queue
        self._starts = ThreadPoolExecutor(PREVIEW_START_THREADS, thread_name_prefix="editrt-preview-start")

    def __len__(self) -> int:
        return len(self._live)

    def bytes(self) -> int:
        return sum(s.nbytes() for s in self._live.values())

    def has(self, sid: str) -> bool:
        """Whether `sid` is open here (without marking it used)."""
        live = self._live.get(sid)
        return live is not None and not live.closed

    def get(self, sid: str) -> Live:
        live = self._live.get(sid)
        if live is None or live.closed:
            raise APIError(404, "session_id", f"session_id {sid[:64]!r}: no such session (closed or expired)")
        live.last_used = time.monotonic()
        self._live[sid] = self._live.pop(sid)  # most recently used last
        return live

    def add(self, session: RepositionSession | ElementsSession, steps: int, preview_steps: int) -> Live:
        live = Live(self.id_prefix + secrets.token_urlsafe(16), session, steps, preview_steps)
        if live.nbytes() > self.budget:  # refused before it makes room: no other session is evicted for it
            threading.Thread(target=close_quietly, args=(session,), name="editrt-session-close", daemon=True).start()
            raise APIError(413, "image", "image: this session alone is larger than the server's session budget")
        self._live[live.id] = live
        self.sweep(keep=live.id)
        return live

    def sweep(self, keep: str | None = None) -> None:
        """Close expired sessions, then the least recently used beyond the cap or the byte budget."""
        now = time.monotonic()
        for sid, live in list(self._live.items()):  # an open drag socket keeps its session alive, idle or not
            if now - live.last_used > self.ttl_s and sid != keep and not live.sockets:
                self.close(sid, "ttl")
        while len(self._live) > self.max_sessions:
            self.close(next(s for s in self._live if s != keep), "lru")
        while self._live and self.bytes() > self.budget:
            victims = [s for s in self._live if s != keep] or list(self._live)
            self.close(victims[0], "bytes")

    def close(self, sid: str, why: str | None = None) -> None:
        live = self._live.pop(sid, None)
        if live is None:
            return
        live.closed = True
        if why:
            self.evicted[why] += 1
        # the session's close joins its preview thread (at most one short preview): off the event loop
        threading.Thread(target=close_quietly, args=(live.session,), name="editrt-session-close", daemon=True).start()

    async def start_preview(self, live: Live, start: Callable, withdraw: Callable) -> object:
        """What `start()` returns, run on one of the store's threads (never on the event loop): `start` calls the
        session's preview, whose snapshot may be long. Previews of one session start one at a time, in the order
        they arrived (asyncio.Lock is FIFO), so the newest is submitted last and wins. If this await is cancelled
        (its socket closed) while `start` runs, `withdraw(what start returned)` cancels it once it returns:
        nobody is left to wait for that preview."""
        async with live.starting:
            if live.closed:  # closed (or the store shut down) while this waited for its turn
                raise APIError(404, "session_id", f"session_id {live.id[:64]!r}: no such session (closed or expired)")
            def run():
                with live.start_running:
                    return start()

            started = self._starts.submit(run)
            try:
                return await asyncio.wrap_future(started)
            except asyncio.CancelledError:  # not yet running: wrap_future cancels it; running: withdrawn when done
                started.add_done_callback(
                    lambda done: withdraw(done.result()) if not done.cancelled() and done.exception() is None else None)
                raise

    def close_all(self) -> None:
        """At shutdown, after the work queues closed: a session whose cache cleanup finds its queue full is
        closed all the same (its caches go with the process)."""
        for sid in list(self._live):
            live = self._live.pop(sid)
            live.closed = True
            with contextlib.suppress(BusyError):
                live.session.close()
        self._starts.shutdown(wait=False, cancel_futures=True)
