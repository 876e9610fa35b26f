"""Memory stays flat over 1,000 sessions opened and closed on one pipeline (DESIGN.md contract 6).

What is measured: the bytes every byte-budgeted cache of the pipeline tracks (SAM embeddings,
REMOVE passes, denoising loops), the process's resident memory, the number of live threads, and
that closed sessions are garbage (nothing of the pipeline keeps them alive).

Sessions cycle over a few images (a new image every 100 sessions, so the SAM cache keeps
evicting), a few run a final (REMOVE pass cached, then dropped by close) or leave a preview
behind at close. Tiny weights; SAM runs once per new image, so 1,000 sessions take about a
minute on 2 cores.
"""
import gc
import threading
import weakref

import numpy as np

from editrt.runtime.caches import nbytes_of
from editrt.runtime.session import EditSession

SESSIONS = 1000


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_flat_over_1000_sessions(tiny_weights):
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights)
    rng = np.random.default_rng(0)
    one = nbytes_of(pipe.segmenter.embedding(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)))
    pipe.segmenter.cache.budget_bytes = 3 * one  # room for three embeddings: ten images force evictions
    subject = np.zeros((48, 64), bool)
    subject[12:30, 16:40] = True
    image = None
    closed, rss, tracked = [], {}, {}
    threads = threading.active_count()
    for i in range(SESSIONS):
        if i % 100 == 0:
            image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        session = EditSession(image, pipe, steps=1, preview_steps=1, resolution=16, preview_resolution=16)
        session.select(mask=subject)
        if i in (10, 500, 990):
            session.final(move=(3, 2))
            assert len(pipe.remove_passes) == 1  # the session's REMOVE pass, until close
        if i in (20, 700):
            session.preview(move=(1, 1))  # left running or queued: close() cancels it
        session.close()
        closed.append(weakref.ref(session))
        del session
        assert len(pipe.remove_passes) == 0  # close dropped it
        if i in (100, SESSIONS - 1):
            gc.collect()
            rss[i] = _rss_bytes()
            tracked[i] = sum(c.bytes for c in pipe.caches())
    for cache in pipe.caches():
        assert cache.bytes <= cache.budget_bytes, cache.stats()
    assert pipe.segmenter.cache.evictions >= SESSIONS // 100 - 3  # the SAM cache really was bounded
    assert tracked[SESSIONS - 1] <= tracked[100]  # no cache grows with the number of sessions
    gc.collect()
    assert sum(ref() is not None for ref in closed) == 0  # nothing keeps a closed session alive
    assert threading.active_count() <= threads + 1  # no thread per session (the queue's one worker)
    growth = rss[SESSIONS - 1] - rss[100]
    # 900 sessions later: allocator noise only. A leak of one 48x64 image + mask per session alone
    # would be 900 * 12 KB = 11 MB; of a SAM embedding per session far more (`one` is printed on failure).
    assert growth < 8 << 20, (f"resident memory grew by {growth / 2**20:.1f} MiB over "
                                 f"{SESSIONS - 100} sessions (one embedding: {one} bytes)")
