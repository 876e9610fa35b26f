"""How routes run pipeline work: as jobs of the pipeline's one work queue (runtime/work_queue.py).

The event loop never runs pipeline code. A route hands its job to a small thread pool whose
thread calls `pipeline.work.run(fn, priority)`: it waits for the pipeline's turn there, in the
queue's priority order (FINAL, then a session's clicks, then previews and stateless requests, by
arrival), so HTTP
requests, sessions and anything else using the same pipeline are ordered in one place. (Finals
must wait as `run` callers, not as submitted jobs: the queue's one worker thread serves submitted
previews, and a final submitted behind a preview could not overtake it.) The queue is bounded:
beyond its bound — or beyond this pool's threads — a job is refused at once with `Busy` and the
route answers 503 with Retry-After. A job that raises delivers the exception to its awaiting
route; the pool and the queue keep running.

Previews of an EditSession are the session's own submitted jobs (`session.preview()` returns a
future at once); routes await those futures. A preview that a newer preview or a final of the
same session cancels raises `Superseded`.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from editrt.runtime.work_queue import FINAL as _FINAL
from editrt.runtime.work_queue import PREVIEW as _PREVIEW
from editrt.runtime.work_queue import BusyError, Cancelled, WorkQueue

FINAL, PREVIEW = _FINAL, _PREVIEW
INTERACTIVE = (FINAL + PREVIEW) // 2  # a session's clicks (open, select, undo): after finals, before previews
ONE_SHOT = PREVIEW  # stateless requests rank with previews, first come first served: batch traffic cannot starve a drag


class Busy(Exception):
    """The pipeline's queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Superseded(Exception):
    """A session's preview was cancelled by a newer preview or a final of the same session."""


class Stop:
    """A job's stop flag: set when its client goes away or the server shuts down; the job's pipeline call
    checks it after every denoising step (`step_callback=stop.check`) and before it starts."""

    def __init__(self):
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self, _step=None) -> None:
        if self._event.is_set():
            raise Cancelled("its client went away")


class PipelineWork:
    """The server's handle on one pipeline's work queue, with per-stage timing for /metrics."""

    def __init__(self, name: str, pipeline, retry_after: int = 1, max_waiting: int = 64, observe=None):
        self.name, self.retry_after = name, retry_after
        queue = getattr(pipeline, "work", None)
        if not isinstance(queue, WorkQueue):  # a pipeline without its own queue: give it one, used by all
            queue = WorkQueue(max_waiting, name=f"editrt-{name}")
            pipeline.work = queue
        self.queue = queue
        self.observe = observe or (lambda stage, wait_s, run_s: None)
        # one thread per job that may wait for the turn, plus the one holding it
        self.threads = queue.max_waiting + 1
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"editrt-serve-{name}")
        self.in_flight = 0
        self.closed = asyncio.Event()  # set at shutdown: every waiting request answers 503 at once
        self.stops: set[Stop] = set()  # the running jobs' stop flags, set at shutdown

    @property
    def depth(self) -> int:
        return self.queue.waiting

    async def run(self, fn, priority: int, stage: str, stop: Stop | None = None):
        """Await fn() run holding the pipeline's turn: returns (result, run seconds, queue-wait seconds).
        `stop`: fn's own stop flag (it passes stop.check to the pipeline); set when this await is cancelled
        (the client went away) or the server shuts down, so the job stops at its next step."""
        if self.closed.is_set():
            raise Busy(f"{self.name}: the server is shutting down", self.retry_after)
        if self.in_flight >= self.threads:
            raise Busy(f"{self.name}: {self.in_flight} requests in flight; retry later", self.retry_after)
        queued = time.perf_counter()
        started = {}

        stop = stop or Stop()

        def job():
            started["t"] = time.perf_counter()
            stop.check()  # nobody waits for it any more: it never starts
            return fn()

        def blocking():
            try:
                return self.queue.run(job, priority)
            except BusyError as e:
                raise Busy(str(e), self.retry_after) from None

        self.in_flight += 1
        self.stops.add(stop)
        try:
            future = self.pool.submit(blocking)
            return await self._wait(future, lambda: (stop.set(), future.cancel()), queued, started, stage)
        finally:
            self.in_flight -= 1
            self.stops.discard(stop)

    def close(self) -> None:
        """Shutdown: waiting requests answer 503 at once, running jobs stop at their next step."""
        self.closed.set()
        for stop in list(self.stops):
            stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def wait(self, future, cancel, stage: str, queued: float | None = None):
        """Await a future some session method returned (its own job on this queue). The queue does not
        report when that job starts, so a watcher notes when the future turns running (5 ms resolution)."""
        started: dict = {}
        watcher = asyncio.create_task(_watch_start(future, started))
        try:
            return await self._wait(future, cancel, queued or time.perf_counter(), started, stage)
        finally:
            watcher.cancel()

    async def _wait(self, future, cancel, queued: float, started: dict, stage: str):
        wrapped = asyncio.wrap_future(future)
        closing = asyncio.ensure_future(self.closed.wait())
        try:
            await asyncio.wait({wrapped, closing}, return_when=asyncio.FIRST_COMPLETED)
            if not wrapped.done():  # the server is shutting down: answer now, stop the job
                cancel()
                raise Busy(f"{self.name}: the server is shutting down", self.retry_after)
            result = wrapped.result()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and not task.cancelling():  # the job was cancelled, not this await:
                raise Superseded(f"{self.name}: superseded by a newer request of the same session") from None
            cancel()  # the client went away: a waiting job never runs, a running one is asked to stop
            raise
        finally:
            closing.cancel()
        end = time.perf_counter()
        start = started.get("t", queued)
        self.observe(stage, start - queued, end - start)
        return result, end - start, start - queued


async def _watch_start(future, started: dict) -> None:
    while not future.done():
        if future.running():
            started["t"] = time.perf_counter()
            return
        await asyncio.sleep(0.005)
