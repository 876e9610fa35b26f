"""One place that orders all of a pipeline's device work (DESIGN.md contract 6).

A pipeline owns one `WorkQueue`. Every public method that runs an engine (segment, inpaint,
harmonize, __call__, partition, decode, ...) runs as one *job* holding the queue's turn, so at
most one job touches the pipeline's engines, static loop buffers, CUDA graphs and caches at a time.
Everything that waits for the turn — submitted jobs and blocking `run` callers alike — waits in ONE
heap, served by priority (FINAL before PREVIEW), then in arrival order; the number waiting is
bounded, and a request beyond the bound raises `BusyError` at once (a server answers 503) instead
of queueing without limit.

    job = pipe.work.submit(fn, priority=PREVIEW)   # returns at once; fn(job) runs on the queue's worker thread
    job.future.result()                     # a JobFuture (a concurrent.futures.Future) with queued/started/ended times
    job.cancel()                            # waiting: never runs; running: job.cancel_requested becomes True
    pipe.work.run(fn, priority=FINAL)       # library callers: blocks; fn() runs on the CALLER's thread

Submitted jobs need no thread while they wait: the queue's one worker thread is handed the turn
with the best job when it is that job's turn, so a server awaits futures instead of parking a
thread per request. A job records when it was queued, started and ended on its future
(`JobFuture.started_at` ...), so nobody polls to learn that it started.

Re-entrant: a job that calls another public method of the same pipeline (``__call__`` calls
``segment``; a server's job calls ``session.final``) runs it inline on the same turn: the nested
call's own `priority` is not used (it already holds the turn the outer job's priority won), and it
never queues behind anyone. A running job is never pre-empted: a final waits for the running job
to finish or, for a preview whose owner cancels it, for its next denoising step.
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


class JobFuture(Future):
    """A job's Future that records its own times (time.perf_counter): `queued_at` when the job was submitted,
    `started_at` when the worker started it (None if it never ran), `ended_at` when its result or error
    was set. Whoever holds only the future (a server route) reads how long the job waited and ran."""

    def __init__(self):
        super().__init__()
        self.queued_at = time.perf_counter()
        self.started_at: float | None = None
        self.ended_at: float | None = None

    def set_running_or_notify_cancel(self) -> bool:
        running = super().set_running_or_notify_cancel()
        if running:
            self.started_at = time.perf_counter()
        return running

    def set_result(self, result) -> None:
        self.ended_at = time.perf_counter()
        super().set_result(result)

    def set_exception(self, exception) -> None:
        self.ended_at = time.perf_counter()
        super().set_exception(exception)


class Job:
    """A submitted job: its Future, and the cancellation its function can check between steps."""

    def __init__(self, fn, priority: int):
        self.fn, self.priority = fn, priority
        self.future = JobFuture()
        self._cancel = threading.Event()

    @property
    def started_at(self) -> float | None:
        """time.perf_counter() when the worker started it; None while it waits (or if it never ran)."""
        return self.future.started_at

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
    """A blocking `run` caller's place in the heap."""
    __slots__ = ("granted",)

    def __init__(self):
        self.granted = False


_RESERVED = -1  # the turn is handed to a granted waiter that has not woken yet


class WorkQueue:
    """Priority-ordered, bounded, re-entrant turn-taking for one pipeline's device work."""

    def __init__(self, max_waiting: int = 64, name: str = "editrt-gpu"):
        if max_waiting < 1:
            raise ValueError("max_waiting: expected >= 1")
        self.max_waiting, self.name = max_waiting, name
        self._lock = threading.Condition(threading.Lock())
        self._heap: list[tuple[int, int, _Ticket | Job]] = []  # everything waiting for the turn
        self._arrival = itertools.count()
        self._owner: int | None = None  # thread id holding the turn, _RESERVED, or None
        self._depth = 0  # re-entrant holds by the owner
        self._next_job: Job | None = None  # the job the worker has been handed the turn for
        self._worker: threading.Thread | None = None
        self.jobs_run = 0

    # ------------------------------------------------------------------ the turn
    def _admit(self) -> None:
        """Holds _lock: refuse a new waiter when max_waiting already wait (cancelled jobs do not count)."""
        if len(self._heap) >= self.max_waiting:
            self._drop_cancelled()
        if len(self._heap) >= self.max_waiting:
            raise BusyError(f"{self.name}: {len(self._heap)} requests already waiting (max_waiting="
                            f"{self.max_waiting}); retry later")

    def _hand_over(self) -> None:
        """Holds _lock, the turn is free: give it to the best waiter (a ticket's thread or the worker)."""
        if self._owner is not None or not self._heap:
            return
        entry = heapq.heappop(self._heap)[2]
        if isinstance(entry, Job):
            self._next_job = entry
            self._ensure_worker()
        else:
            entry.granted = True
        self._owner = _RESERVED
        self._lock.notify_all()

    def _acquire(self, priority: int) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._owner == me:  # nested inside a job: inline, on the turn the outer job won
                self._depth += 1
                return
            if self._owner is None and not self._heap:
                self._owner, self._depth = me, 1
                return
            self._admit()
            ticket = _Ticket()
            heapq.heappush(self._heap, (priority, next(self._arrival), ticket))
            while not ticket.granted:
                self._lock.wait()
            self._owner, self._depth = me, 1

    def _release(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth:
                return
            self._owner = None
            self._hand_over()

    def run(self, fn, priority: int = FINAL):
        """Run fn() on this thread holding the turn; returns its result (or raises its exception).
        Called inside a job (this thread holds the turn): runs fn() at once, `priority` unused."""
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
        """Jobs and callers waiting for the turn (not the one holding it; not jobs cancelled while waiting,
        which never run)."""
        with self._lock:
            return sum(1 for _, _, entry in self._heap if not (isinstance(entry, Job) and entry.future.cancelled()))

    # ------------------------------------------------------------------ submitted jobs
    def submit(self, fn, priority: int = PREVIEW) -> Job:
        """Queue fn(job) for the worker thread; raises BusyError when max_waiting jobs already wait."""
        job = Job(fn, priority)
        with self._lock:
            self._admit()
            heapq.heappush(self._heap, (priority, next(self._arrival), job))
            self._hand_over()
        return job

    def _drop_cancelled(self) -> None:
        """Forget submitted jobs cancelled while waiting (they would count toward max_waiting). Holds _lock."""
        live = [entry for entry in self._heap if not (isinstance(entry[2], Job) and entry[2].future.cancelled())]
        if len(live) != len(self._heap):
            heapq.heapify(live)
            self._heap = live

    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name=f"{self.name}-worker", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        """The worker thread: sleeps until it is handed the turn with a job, runs it, passes the turn on."""
        me = threading.get_ident()
        while True:
            with self._lock:
                while self._next_job is None:
                    self._lock.wait()
                job, self._next_job = self._next_job, None
                self._owner, self._depth = me, 1
            try:
                if job.future.set_running_or_notify_cancel():  # a job cancelled while waiting never runs
                    self._execute(job)
            finally:
                job.fn = None  # the function's closure (e.g. a session) is not kept alive by a finished job
                del job  # nor by this loop's variable while it waits for the next one
                self._release()

    def _execute(self, job: Job) -> None:
        try:
            job.raise_if_cancelled()
            result = job.fn(job)
        except Cancelled as e:  # stopped by its owner: the future reads as cancelled work
            job.future.set_exception(CancelledError(str(e)))
        except BaseException as e:  # delivered to whoever waits on the future
            job.future.set_exception(e)
        else:
            job.future.set_result(result)
        finally:
            self.jobs_run += 1
