"""How routes run pipeline work: as jobs of the pipeline's one work queue (runtime/work_queue.py).

The event loop never runs pipeline code. A route submits its job to the pipeline's work queue
(`PipelineWork.run`) and awaits the job's future: the job runs on the queue's one worker thread,
holding the turn, in the queue's priority order (FINAL, then a session's clicks, then previews and
stateless requests, by arrival), so HTTP requests, sessions and anything else using the same pipeline
are ordered in one place, and a waiting request costs no thread. Pipeline methods the job calls
(`session.final`, `pipeline(...)`) run inline on its turn: the route's priority is the one that
counts. The queue is bounded: beyond its bound a job is refused at once with `Busy` and the route
answers 503 with Retry-After. A job that raises delivers the exception to its awaiting route; the
queue keeps running. The job's future records when it started and ended, so the queue wait and the
run time reported to /metrics are exact.

Previews of an EditSession are the session's own submitted jobs (`session.preview()` returns a
future at once); routes await those futures. A preview that a newer preview or a final of the
same session cancels raises `Superseded`.
"""
from __future__ import annotations

import asyncio
import threading
import time

from editrt.runtime.work_queue import FINAL as _FINAL
from editrt.runtime.work_queue import PREVIEW as _PREVIEW
from editrt.runtime.work_queue import BusyError, Cancelled, Job, JobFuture, WorkQueue

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
    """The server's handle on one pipeline's work queue, with per-stage timing for /metrics.

    A route's job is submitted to the queue (it runs on the queue's worker thread, holding the turn) and
    the route awaits its future: no thread waits for a request. The job's future records when it
    started and ended (work_queue.JobFuture), so the queue wait and run time are exact."""

    def __init__(self, name: str, pipeline, retry_after: int = 1, max_waiting: int = 64, observe=None):
        self.name, self.retry_after = name, retry_after
        queue = getattr(pipeline, "work", None)
        if not isinstance(queue, WorkQueue):  # a pipeline without its own queue: give it one, used by all
            queue = WorkQueue(max_waiting, name=f"editrt-{name}")
            pipeline.work = queue
        self.queue = queue
        self.observe = observe or (lambda stage, wait_s, run_s: None)
        self.max_in_flight = queue.max_waiting + 1  # the jobs that may wait for the turn, plus the one holding it
        self.in_flight = 0
        self.closed = asyncio.Event()  # set at shutdown: every waiting request answers 503 at once
        # The worker thread reads this one: a job it reaches once shutdown began never starts, even if close()
        # has not cancelled that job yet (the running job may stop, and the worker move on, mid-close()).
        self._shutting_down = threading.Event()
        self.running: dict[Job, Stop] = {}  # this server's jobs (waiting or running) and their stop flags

    @property
    def depth(self) -> int:
        return self.queue.waiting

    async def run(self, fn, priority: int, stage: str, stop: Stop | None = None):
        """Await fn() run holding the pipeline's turn: returns (result, run seconds, queue-wait seconds).
        fn runs on the queue's worker thread; pipeline methods it calls run inline on its turn.
        `stop`: fn's own stop flag (it passes stop.check to the pipeline); set when this await is cancelled
        (the client went away) or the server shuts down, so the job stops at its next step."""
        if self.closed.is_set():
            raise Busy(f"{self.name}: the server is shutting down", self.retry_after)
        if self.in_flight >= self.max_in_flight:
            raise Busy(f"{self.name}: {self.in_flight} requests in flight; retry later", self.retry_after)
        stop = stop or Stop()

        def job(_job):
            stop.check()  # nobody waits for it any more: it never starts
            if self._shutting_down.is_set():
                raise Cancelled("the server is shutting down")
            return fn()

        try:
            submitted = self.queue.submit(job, priority)
        except BusyError as e:
            raise Busy(str(e), self.retry_after) from None
        self.in_flight += 1
        self.running[submitted] = stop
        try:
            return await self._wait(submitted.future, lambda: (stop.set(), submitted.cancel()), stage, stop=stop)
        finally:
            self.in_flight -= 1
            self.running.pop(submitted, None)

    def close(self) -> None:
        """Shutdown: waiting requests answer 503 at once (their jobs never start), running jobs stop at their
        next step."""
        self._shutting_down.set()
        self.closed.set()
        jobs = list(self.running.items())
        for job, stop in sorted(jobs, key=lambda item: item[0].started_at is not None):  # waiting ones first
            stop.set()
            job.cancel()

    async def wait(self, future, cancel, stage: str, queued: float | None = None):
        """Await a job's future (one a session method returned): returns (result, run s, wait s).
        A work_queue.JobFuture carries its own queued/started/ended times; for any other future the wait
        counts from `queued` (default: now) and the run is the whole await."""
        return await self._wait(future, cancel, stage, queued)

    async def _wait(self, future, cancel, stage: str, queued: float | None = None, stop: Stop | None = None):
        if isinstance(future, JobFuture):
            queued = future.queued_at
        elif queued is None:
            queued = time.perf_counter()
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
                if self.closed.is_set():
                    raise Busy(f"{self.name}: the server is shutting down", self.retry_after) from None
                if stop is not None and stop.is_set():  # its own stop flag (the client went away)
                    raise Cancelled("its client went away") from None
                raise Superseded(f"{self.name}: superseded by a newer request of the same session") from None
            cancel()  # the client went away: a waiting job never runs, a running one is asked to stop
            raise
        finally:
            closing.cancel()
        if isinstance(future, JobFuture):
            start, end = future.started_at, future.ended_at
        else:
            start, end = queued, time.perf_counter()
        self.observe(stage, start - queued, end - start)
        return result, end - start, start - queued
