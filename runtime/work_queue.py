"""One place that orders all of a pipeline's device work (DESIGN.md contract 6).

A pipeline owns one `WorkQueue`. Every public method that runs an engine (segment, inpaint,
harmonize, __call__, partition, decode, ...) runs as one *job* holding the queue's turn, so at
most one job touches the pipeline's engines, static loop buffers, CUDA graphs and caches at a time.
Jobs waiting for the turn are served by priority (FINAL before PREVIEW), then in arrival order;
the number waiting is bounded, and a request beyond the bound raises `BusyError` at once (a
server answers 503) instead of queueing without limit.

    pipe.work.run(fn, priority=FINAL)       # blocks; fn() runs on the CALLER's thread, holding the turn
    job = pipe.work.submit(fn, priority=PREVIEW)   # returns at once; fn(job) runs on the queue's worker thread
    job.future.result()                     # a plain concurrent.futures.Future
    job.cancel()                            # waiting: never runs; running: job.cancel_requested becomes True

Re-entrant: a job that calls another public method of the same pipeline (``__call__`` calls
``segment``) runs it inline on the same turn. Why a turn and not one thread for everything:
finals run on the caller's thread, so exceptions and step callbacks stay on the thread that asked,
and CPU inference does not start a second OpenMP thread team; only submitted jobs (previews) use
the worker thread. A running job is never pre-empted: a final waits for the running job to
finish or, for a preview whose owner cancels it, for its next denoising step.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import CancelledError, Future

FINAL = 0  # served first
PREVIEW = 10


class BusyError(RuntimeError):
    """The pipeline's work queue is full: retry later (a server maps this to 503)."""


class Cancelled(Exception):
    """Raised inside a job whose owner cancelled it (e.g. a preview superseded by a final)."""


class Job:
    """A submitted job: its Future, and the cancellation its function can check between steps."""

    def __init__(self, fn, priority: int):
        self.fn, self.priority = fn, priority
        self.future: Future = Future()
        self.started_at: float | None = None  # time.perf_counter() when the worker started it
        self._cancel = threading.Event()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def raise_if_cancelled(self) -> None:
        """Called by the job's own function (any thread that runs it) at its safe points."""
        if self._cancel.is_set():
            raise Cancelled("cancelled by its owner")

    def cancel(self) -> None:
        """Any thread: a waiting job never runs (its future is cancelled); a running one is asked to stop."""
        self._cancel.set()
        self.future.cancel()  # no effect once running


class _Ticket:
    __slots__ = ("granted",)

    def __init__(self):
        self.granted = False


class WorkQueue:
    """Priority-ordered, bounded, re-entrant turn-taking for one pipeline's device work."""

    def __init__(self, max_waiting: int = 64, name: str = "editrt-gpu"):
        if max_waiting < 1:
            raise ValueError("max_waiting: expected >= 1")
        self.max_waiting, self.name = max_waiting, name
        self._lock = threading.Condition()
        self._waiting: list[tuple[int, int, _Ticket]] = []  # heap of (priority, arrival, ticket)
        self._arrival = itertools.count()
        self._owner: int | None = None  # thread id holding the turn
        self._depth = 0  # re-entrant holds by the owner
        self._jobs: list[tuple[int, int, Job]] = []  # submitted jobs not started (heap)
        self._worker: threading.Thread | None = None
        self.jobs_run = 0

    # ------------------------------------------------------------------ the turn
    def _acquire(self, priority: int) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._owner == me:
                self._depth += 1
                return
            if self._owner is None and not self._waiting:
                self._owner, self._depth = me, 1
                return
            if len(self._waiting) >= self.max_waiting:
                raise BusyError(f"{self.name}: {len(self._waiting)} requests already waiting (max_waiting="
                                f"{self.max_waiting}); retry later")
            ticket = _Ticket()
            heapq.heappush(self._waiting, (priority, next(self._arrival), ticket))
            while not ticket.granted:
                self._lock.wait()
            self._owner, self._depth = me, 1

    def _release(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth:
                return
            self._owner = None
            if self._waiting:  # hand the turn to the best waiting ticket
                heapq.heappop(self._waiting)[2].granted = True
                self._owner = -1  # reserved until the granted thread takes it
            self._lock.notify_all()

    def run(self, fn, priority: int = FINAL):
        """Run fn() on this thread holding the turn; returns its result (or raises its exception)."""
        self._acquire(priority)
        try:
            return fn()
        finally:
            self._release()

    @property
    def holds_turn(self) -> bool:
        """Whether the calling thread holds the turn (inside a job)."""
        return self._owner == threading.get_ident()

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._jobs)

    # ------------------------------------------------------------------ background jobs
    def submit(self, fn, priority: int = PREVIEW) -> Job:
        """Queue fn(job) for the worker thread; raises BusyError when max_waiting jobs already wait."""
        job = Job(fn, priority)
        with self._lock:
            if len(self._waiting) + len(self._jobs) >= self.max_waiting:
                self._drop_cancelled()
            if len(self._waiting) + len(self._jobs) >= self.max_waiting:
                raise BusyError(f"{self.name}: {len(self._waiting) + len(self._jobs)} requests already waiting "
                                f"(max_waiting={self.max_waiting}); retry later")
            heapq.heappush(self._jobs, (priority, next(self._arrival), job))
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name=f"{self.name}-worker", daemon=True)
                self._worker.start()
            self._lock.notify_all()
        return job

    def _drop_cancelled(self) -> None:
        """Forget submitted jobs cancelled while waiting (they would count toward max_waiting). Holds _lock."""
        live = [entry for entry in self._jobs if not entry[2].future.cancelled()]
        if len(live) != len(self._jobs):
            heapq.heapify(live)
            self._jobs = live

    def _work(self) -> None:
        """The worker thread: takes the best submitted job, then waits for the turn like any caller."""
        while True:
            with self._lock:
                while not self._jobs:
                    self._lock.wait()
                _, _, job = heapq.heappop(self._jobs)
            if job.future.set_running_or_notify_cancel():
                job.started_at = time.perf_counter()
                self._execute(job)
            job.fn = None  # the function's closure (e.g. a session) is not kept alive by a finished job
            del job  # nor by this loop's variable while it waits for the next one

    def _execute(self, job: Job) -> None:
        try:
            result = self.run(lambda: (job.raise_if_cancelled(), job.fn(job))[1], job.priority)
        except Cancelled as e:  # stopped by its owner: the future reads as cancelled work
            job.future.set_exception(CancelledError(str(e)))
        except BaseException as e:  # delivered to whoever waits on the future
            job.future.set_exception(e)
        else:
            job.future.set_result(result)
        finally:
            self.jobs_run += 1
