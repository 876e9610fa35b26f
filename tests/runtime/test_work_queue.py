"""The work queue: one job at a time, finals before previews, bounded, re-entrant, cancellable; submitted
jobs wait in the same heap as blocking callers and record when they started and ended.

Pure threading tests (no model): events hold a job inside the turn so the order of the others is
observed exactly, never by timing.
"""
import threading
import time
from concurrent.futures import CancelledError

import pytest

from editrt.runtime.work_queue import FINAL, PREVIEW, BusyError, WorkQueue


def _hold(queue):
    """Occupy the turn on a helper thread until the returned event is set."""
    inside, release = threading.Event(), threading.Event()
    t = threading.Thread(target=queue.run, args=(lambda: (inside.set(), release.wait(10)),))
    t.start()
    assert inside.wait(10)
    return release, t


def _wait_until(predicate, timeout=10.0):
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError("condition not reached")


def test_one_job_at_a_time_and_finals_before_previews():
    queue, order, active, overlap = WorkQueue(), [], [0], []

    def job(name):
        def fn(*_):
            active[0] += 1
            overlap.append(active[0])
            order.append(name)
            active[0] -= 1
            return name
        return fn

    release, holder = _hold(queue)
    previews = [queue.submit(job(f"p{i}"), PREVIEW) for i in range(2)]
    assert queue.waiting == 2
    final_job = queue.submit(job("f0"), FINAL)  # a submitted final, behind two waiting previews
    final_caller = threading.Thread(target=queue.run, args=(job("f1"),))  # a blocking final caller
    final_caller.start()
    _wait_until(lambda: queue.waiting == 4)
    release.set()
    holder.join(10)
    final_caller.join(10)
    assert [p.future.result(10) for p in previews] == ["p0", "p1"] and final_job.future.result(10) == "f0"
    # the previews were queued first, yet both finals ran first, in arrival order
    assert order == ["f0", "f1", "p0", "p1"]
    assert max(overlap) == 1


def test_a_nested_run_inside_a_job_runs_inline_at_the_outer_priority():
    """A preview job calls a pipeline method whose own priority is FINAL while a FINAL waits: the nested call
    runs at once on the job's thread and turn (it does not queue, nor jump the waiting final's place as a new
    job would), and the waiting final runs after the whole preview."""
    queue, order = WorkQueue(), []
    inside, go_on = threading.Event(), threading.Event()

    def nested():
        order.append(("nested", threading.get_ident(), queue.waiting))
        return "inner"

    def preview(job):
        me = threading.get_ident()
        order.append(("preview starts", me))
        inside.set()
        assert go_on.wait(10)
        inner = queue.run(nested, FINAL)
        order.append(("preview ends", me))
        return inner

    outer = queue.submit(preview, PREVIEW)
    assert inside.wait(10)
    waiting_final = queue.submit(lambda job: order.append(("final",)), FINAL)
    assert queue.waiting == 1
    go_on.set()
    assert outer.future.result(10) == "inner"
    waiting_final.future.result(10)
    worker = order[0][1]
    assert order == [("preview starts", worker), ("nested", worker, 1), ("preview ends", worker), ("final",)]


def test_a_job_records_when_it_started_and_ended():
    """The times are set by the worker as it starts and finishes the job: exact, nobody polls for them."""
    queue = WorkQueue()
    release, holder = _hold(queue)
    before = time.perf_counter()
    seen = {}

    def fn(job):
        seen["in"] = time.perf_counter()
        seen["out"] = time.perf_counter()
        return "done"

    job = queue.submit(fn)
    submitted = time.perf_counter()
    assert job.future.started_at is None and before <= job.future.queued_at <= submitted
    released = time.perf_counter()
    release.set()
    holder.join(10)
    assert job.future.result(10) == "done"
    got = time.perf_counter()
    f = job.future
    assert released <= f.started_at <= seen["in"] and seen["out"] <= f.ended_at <= got
    assert job.started_at == f.started_at

    release, holder = _hold(queue)
    never = queue.submit(lambda job: "never")
    never.cancel()
    release.set()
    holder.join(10)
    assert queue.run(lambda: "after") == "after"
    assert never.future.cancelled() and never.started_at is None  # a job that never ran has no start time


def test_reentrant_calls_run_inline_on_the_same_turn():
    queue = WorkQueue()
    assert queue.run(lambda: queue.run(lambda: queue.holds_turn)) is True
    assert not queue.holds_turn


def test_a_full_queue_raises_busy_at_once():
    queue = WorkQueue(max_waiting=2)
    release, holder = _hold(queue)
    waiters = [threading.Thread(target=queue.run, args=(lambda: None,)) for _ in range(2)]
    for t in waiters:
        t.start()
    _wait_until(lambda: queue.waiting == 2)
    with pytest.raises(BusyError, match="max_waiting=2"):
        queue.run(lambda: None)
    with pytest.raises(BusyError, match="retry later"):
        queue.submit(lambda job: None)
    release.set()
    for t in [holder, *waiters]:
        t.join(10)
    assert queue.run(lambda: "free again") == "free again"


def test_cancel_a_waiting_job_and_stop_a_running_one():
    queue = WorkQueue()
    release, holder = _hold(queue)
    waiting = queue.submit(lambda job: "never")
    waiting.cancel()
    release.set()
    holder.join(10)
    assert waiting.future.cancelled()

    started, steps = threading.Event(), []

    def long_job(job):
        started.set()
        for i in range(1000):
            job.raise_if_cancelled()  # the denoising loop's per-step check
            steps.append(i)
            threading.Event().wait(0.005)
        return "finished"

    running = queue.submit(long_job)
    assert started.wait(10)
    running.cancel()
    with pytest.raises(CancelledError):
        running.future.result(10)
    assert len(steps) < 1000
    assert queue.run(lambda: "after") == "after"  # the turn was released


def test_errors_reach_the_caller_and_free_the_turn():
    queue = WorkQueue()

    def bad():
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        queue.run(bad)
    job = queue.submit(lambda job: bad())
    with pytest.raises(KeyError, match="boom"):
        job.future.result(10)
    assert queue.run(lambda: FINAL) == FINAL


def test_cancelled_waiting_jobs_do_not_count_toward_the_bound():
    """A drag cancels previews faster than the worker pops them: those must not make the queue 'busy'."""
    queue = WorkQueue(max_waiting=3)
    release, holder = _hold(queue)
    live = queue.submit(lambda job: "live")
    for _ in range(10):  # each superseded at once, never run
        queue.submit(lambda job: "stale").cancel()
    assert queue.waiting == 1  # the live one: cancelled jobs are not waiting for anything
    newest = queue.submit(lambda job: "newest")  # would be the 12th waiting if cancelled ones counted
    release.set()
    holder.join(10)
    assert live.future.result(10) == "live" and newest.future.result(10) == "newest"
    assert live.started_at is not None and newest.started_at >= live.started_at
