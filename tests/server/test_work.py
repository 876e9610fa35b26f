"""PipelineWork (runtime/server/work.py): routes' jobs go through the pipeline's one work queue and are awaited
as futures. No model: a pipeline here is only its work queue (all PipelineWork touches); events hold a job
inside the turn so orders and times are observed exactly, never by sleeping."""
import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from editrt.runtime.server.work import FINAL, PREVIEW, Busy, PipelineWork, Stop
from editrt.runtime.work_queue import WorkQueue


def _pipeline(max_waiting=64):
    return SimpleNamespace(work=WorkQueue(max_waiting, name="editrt-test"))


async def _until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def _holding(work, release: threading.Event):
    """A route's job that holds the turn until `release` is set."""
    inside = threading.Event()
    task = asyncio.create_task(work.run(lambda: (inside.set(), release.wait(10))[1], FINAL, "hold"))
    await _until(inside.is_set)
    return task


def test_waiting_requests_use_no_threads():
    """32 requests wait for the turn: the only thread beyond the test's own is the queue's worker."""
    async def main():
        work = PipelineWork("reposition", _pipeline())
        release = threading.Event()
        before = threading.active_count()
        holder = await _holding(work, release)
        waiters = [asyncio.create_task(work.run(lambda i=i: i, PREVIEW, "stateless")) for i in range(32)]
        await _until(lambda: work.depth == 32)
        during = threading.active_count()
        release.set()
        results = [r for r, _, _ in await asyncio.gather(*waiters)]
        await holder
        return before, during, results

    before, during, results = asyncio.run(main())
    assert during <= before + 1, f"{during - before} threads for 33 requests"
    assert results == list(range(32))


def test_wait_and_run_times_are_exact():
    """The wait ends when the worker starts the job and the run when it ends, as the queue recorded them."""
    async def main():
        work = PipelineWork("reposition", _pipeline())
        release, seen = threading.Event(), {}
        holder = await _holding(work, release)

        def job():
            seen["in"] = time.perf_counter()
            seen["out"] = time.perf_counter()
            return "done"

        before = time.perf_counter()
        task = asyncio.create_task(work.run(job, PREVIEW, "stateless"))
        await _until(lambda: work.depth == 1)
        queued_by = time.perf_counter()
        released = time.perf_counter()
        release.set()
        result, run_s, wait_s = await task
        await holder
        return result, run_s, wait_s, before, queued_by, released, seen

    result, run_s, wait_s, before, queued_by, released, seen = asyncio.run(main())
    assert result == "done"
    # queued in [before, queued_by]; started in [released, seen["in"]]; ended at or after seen["out"]
    assert released - queued_by <= wait_s <= seen["in"] - before
    assert run_s >= seen["out"] - seen["in"] and wait_s + run_s >= seen["out"] - queued_by


def test_a_final_overtakes_waiting_previews_and_nested_calls_run_inline():
    """Route priorities are the queue's: a FINAL submitted after two waiting previews runs first; a pipeline
    method the final's job calls (its own priority PREVIEW) runs inline on the worker's turn."""
    async def main():
        pipe = _pipeline()
        work, order = PipelineWork("reposition", pipe), []
        release = threading.Event()
        holder = await _holding(work, release)
        previews = [asyncio.create_task(work.run(lambda i=i: order.append(f"p{i}"), PREVIEW, "preview"))
                    for i in range(2)]
        await _until(lambda: work.depth == 2)

        def final():
            order.append("final")
            pipe.work.run(lambda: order.append(("nested", pipe.work.holds_turn, pipe.work.waiting)), PREVIEW)

        finished = asyncio.create_task(work.run(final, FINAL, "final"))
        await _until(lambda: work.depth == 3)
        release.set()
        await asyncio.gather(holder, finished, *previews)
        return order

    assert asyncio.run(main()) == ["final", ("nested", True, 2), "p0", "p1"]


async def _close_with_a_running_job_and_three_waiting(work: PipelineWork, stop: Stop):
    """A FINAL job that runs until its stop flag is set, three previews waiting behind it, then close():
    returns (their outcomes, the steps the running job made, the previews that ran)."""
    started, steps, ran = threading.Event(), [], []

    def long_job():
        started.set()
        for i in range(2000):
            stop.check(i)  # the denoising loop's step callback
            steps.append(i)
            time.sleep(0.005)

    running = asyncio.create_task(work.run(long_job, FINAL, "final", stop))
    await _until(started.is_set)
    waiting = [asyncio.create_task(work.run(lambda: ran.append(1), PREVIEW, "preview")) for _ in range(3)]
    await _until(lambda: work.depth == 3)
    work.close()
    return await asyncio.gather(running, *waiting, return_exceptions=True), steps, ran


def test_shutdown_answers_waiters_and_stops_the_running_job():
    async def main():
        work = PipelineWork("reposition", _pipeline())
        outcomes, steps, ran = await _close_with_a_running_job_and_three_waiting(work, Stop())
        with pytest.raises(Busy, match="shutting down"):
            await work.run(lambda: ran.append(1), FINAL, "final")
        assert await asyncio.to_thread(work.queue.run, lambda: "free") == "free"  # the turn was released
        return outcomes, steps, ran

    outcomes, steps, ran = asyncio.run(main())
    assert all(isinstance(o, Busy) for o in outcomes), outcomes
    assert len(steps) < 2000 and ran == []  # the running job stopped; no waiting job ran


def test_a_job_the_worker_reaches_while_shutdown_is_underway_never_runs():
    """The worker may reach a waiting job while close() is still underway (CI saw two waiting jobs run after
    close() had stopped the running job but before it cancelled them). The running job's stop flag here holds
    close() until the worker has taken every live waiting job off the queue: none of them may run. This guards
    close()'s order (waiting jobs cancelled before the running one is stopped); the worker's shutdown flag is the
    second line of defence for a job it reaches mid-close() by any other path, and has no test of its own."""
    async def main():
        work = PipelineWork("reposition", _pipeline())

        class SlowStop(Stop):
            def set(self):  # close() is held here, after the running job's flag is set
                super().set()
                deadline = time.monotonic() + 5
                while work.queue.waiting and time.monotonic() < deadline:
                    time.sleep(0.005)

        outcomes, _, ran = await _close_with_a_running_job_and_three_waiting(work, SlowStop())
        return outcomes, ran

    outcomes, ran = asyncio.run(main())
    assert ran == [] and all(isinstance(o, Busy) for o in outcomes), (ran, outcomes)


def test_a_full_queue_answers_busy():
    async def main():
        work = PipelineWork("reposition", _pipeline(max_waiting=2))
        release = threading.Event()
        holder = await _holding(work, release)
        waiters = [asyncio.create_task(work.run(lambda: None, PREVIEW, "preview")) for _ in range(2)]
        await _until(lambda: work.depth == 2)
        with pytest.raises(Busy, match="retry later"):
            await work.run(lambda: None, PREVIEW, "preview")
        release.set()
        await asyncio.gather(holder, *waiters)
        return (await work.run(lambda: "free again", PREVIEW, "preview"))[0]

    assert asyncio.run(main()) == "free again"
