"""SessionStore.start_preview: a session's preview starts (its snapshot) on the store's threads, never on the event
loop, one at a time per session in arrival order (so the newest preview is the one submitted last: latest wins),
and a start whose awaiting request went away withdraws what it submitted."""
from __future__ import annotations

import asyncio
import threading
import time

from editrt.runtime.server.sessions import Live, SessionStore


def _store() -> SessionStore:
    return SessionStore(max_sessions=4, ttl_s=60, budget_bytes=1 << 20)


def test_previews_of_one_session_start_in_arrival_order_off_the_loop():
    store, order, threads = _store(), [], []
    first_running, release_first = threading.Event(), threading.Event()

    def start(n):
        def run():
            threads.append(threading.current_thread())
            if n == 1:
                first_running.set()
                assert release_first.wait(30), "the test never released the first start"
            order.append(n)
            return n
        return run

    async def main():
        live = Live("s", object(), 1, 1)
        first = asyncio.create_task(store.start_preview(live, start(1), withdraw=lambda n: None))
        await asyncio.to_thread(first_running.wait, 30)  # the first is inside its (long) snapshot
        later = [asyncio.create_task(store.start_preview(live, start(n), withdraw=lambda n: None)) for n in (2, 3)]
        await asyncio.sleep(0.2)  # free threads are there: only the session's order holds the later two back
        release_first.set()
        return await asyncio.gather(first, *later), threading.current_thread()

    try:
        results, loop_thread = asyncio.run(main())
    finally:
        release_first.set()
        store.close_all()
    assert results == [1, 2, 3] and order == [1, 2, 3]
    assert loop_thread not in threads


def test_a_start_whose_request_went_away_withdraws_what_it_submitted():
    store, withdrawn = _store(), []
    running, release = threading.Event(), threading.Event()

    def start():
        running.set()
        assert release.wait(30), "the test never released the start"
        return "the submitted preview"

    async def main():
        task = asyncio.create_task(store.start_preview(Live("s", object(), 1, 1), start, withdraw=withdrawn.append))
        await asyncio.to_thread(running.wait, 30)
        task.cancel()  # its socket closed while the snapshot was being made
        await asyncio.gather(task, return_exceptions=True)
        release.set()

    try:
        asyncio.run(main())
        for _ in range(300):  # the withdrawal runs on the start's thread once start returns
            if withdrawn:
                break
            time.sleep(0.01)
    finally:
        release.set()
        store.close_all()
    assert withdrawn == ["the submitted preview"]


def test_a_start_whose_request_went_away_still_holds_the_session_until_it_returns():
    """A start cancelled while it runs keeps its place: the session's next start begins only after it returned
    (else the two snapshots interleave and the older one can cancel the newer preview)."""
    store, events = _store(), []
    running, release = threading.Event(), threading.Event()

    def first():
        running.set()
        assert release.wait(30), "the test never released the first start"
        events.append("first returned")
        return 1

    def second():
        events.append("second started")
        return 2

    async def main():
        live = Live("s", object(), 1, 1)
        task = asyncio.create_task(store.start_preview(live, first, withdraw=lambda n: None))
        await asyncio.to_thread(running.wait, 30)
        task.cancel()  # its socket closed while the snapshot was being made
        await asyncio.gather(task, return_exceptions=True)
        later = asyncio.create_task(store.start_preview(live, second, withdraw=lambda n: None))
        await asyncio.sleep(0.2)  # free threads are there: only the session's order holds the second back
        release.set()
        return await later

    try:
        assert asyncio.run(main()) == 2
    finally:
        release.set()
        store.close_all()
    assert events == ["first returned", "second started"]
