"""How routes run pipeline work: as jobs of the pipeline's one work queue (runtime/work_queue.py).

The event loop never runs pipeline code. A route submits a job to `pipeline.work` and awaits its
future; the queue's worker runs it holding the pipeline's turn, so HTTP requests, sessions and
anything else using the same pipeline are ordered in one place: FINAL before INTERACTIVE before
PREVIEW, then arrival. The queue is bounded: a submit beyond its bound raises BusyError at once
and the route answers 503 with Retry-After. A job that raises delivers the exception to its
awaiting route; the worker keeps running.

Previews of an EditSession are the session's own jobs (`session.preview()` returns a future at
once); the routes await those futures too and never block a job on another job.
"""
from __future__ import annotations

import asyncio
import time

from editrt.runtime.work_queue import FINAL as _FINAL
from editrt.runtime.work_queue import PREVIEW as _PREVIEW
from editrt.runtime.work_queue import BusyError, WorkQueue

FINAL, PREVIEW = _FINAL, _PREVIEW
INTERACTIVE = (FINAL + PREVIEW) // 2  # clicks and one-shot requests: after finals, before previews


class Busy(Exception):
    """The pipeline's queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


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

    @property
    def depth(self) -> int:
        return self.queue.waiting

    async def run(self, fn, priority: int, stage: str):
        """Await fn() run as a job: returns (result, run seconds, queue-wait seconds)."""
        queued = time.perf_counter()
        started = {}

        def job(_job):
            started["t"] = time.perf_counter()
            return fn()
        try:
            submitted = self.queue.submit(job, priority)
        except BusyError as e:
            raise Busy(str(e), self.retry_after) from None
        return await self._wait(submitted.future, submitted.cancel, queued, started, stage)

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
        try:
            result = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancel()  # the client went away: a waiting job never runs, a running one is asked to stop
            raise
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
