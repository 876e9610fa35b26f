"""One pipeline, many threads: results bit-equal to running the same edits one by one (DESIGN.md contract 6).

Each editor gets one pipeline and 8 threads, each running a different edit (tasks, seeds, moves,
LoRA scales, prompts, element edits, sessions). All threads start together at a barrier, so their
calls really overlap; every result must equal, byte for byte, the result of the same call made
serially on the same pipeline. What could break it: two jobs sharing a loop's static buffers,
a LoRA switch for one request leaking into another's UNet steps, the K/V caches or the SAM
embedding cache answering for the wrong request, a session reading another's state.
"""
import threading

import numpy as np
import pytest
from skimage import data

from editrt.runtime.session import EditSession

THREADS = 8
RES = 32  # tiny weights: the smallest working size keeps 16 passes per editor within a minute


def _run_threads(jobs):
    """Run each job on its own thread, all released at once; returns results in job order (re-raises)."""
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def worker(i, job):
        barrier.wait()
        try:
            results[i] = job()
        except BaseException as e:  # collected and re-raised on the test's thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread never finished (deadlock?)"
    if errors:
        raise errors[0]
    return results


def _partition_summary(elements):
    """Everything a partition decides, as one array (features, centroids, sizes, which are alive)."""
    return np.concatenate([elements.features.ravel(), elements.centroids.ravel(), elements.sizes.ravel(),
                           elements.alive.astype(np.float32)])


def _pixels(result):
    image = getattr(result, "image", result)  # RepositionResult or PIL image
    return np.asarray(image)


@pytest.fixture(scope="module")
def scene():
    rgb = data.astronaut()[::8, ::8][:48, :64].copy()  # 64x48 photo
    subject = np.zeros(rgb.shape[:2], bool)
    subject[10:34, 20:40] = True
    return rgb, subject


def test_reposition_threads_equal_serial(tiny_weights, scene):
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights)
    rgb, subject = scene
    other = np.ascontiguousarray(rgb[:, ::-1])  # a second image, so SAM embeddings differ per request

    def session_final(move):
        with EditSession(rgb, pipe, steps=2, resolution=RES) as s:
            s.select(mask=subject)
            return s.final(move=move)

    jobs = [
        lambda: pipe.inpaint(rgb, subject, steps=2, seed=1, resolution=RES),
        lambda: pipe.inpaint(other, subject, task="complete", steps=2, guidance=3.0, seed=2, resolution=RES),
        lambda: pipe.harmonize(rgb, subject, steps=2, seed=3, resolution=RES),
        lambda: pipe.harmonize(rgb, subject, steps=2, seed=3, resolution=RES, lora_scale=0.5),
        lambda: pipe(rgb, mask=subject, move=(6, 2), steps=2, seed=4, resolution=RES),
        lambda: pipe(other, points=[[30, 20]], move=(-5, 3), steps=2, seed=5, resolution=RES, harmonize=False),
        lambda: session_final((4, -3)),
        lambda: session_final((-7, 1)),
    ]
    assert len(jobs) >= THREADS
    serial = [_pixels(job()) for job in jobs]
    threaded = [_pixels(r) for r in _run_threads(jobs)]
    for i, (a, b) in enumerate(zip(serial, threaded)):
        np.testing.assert_array_equal(b, a, err_msg=f"job {i}")
    assert not np.array_equal(serial[2], serial[3])  # the LoRA scale changed the result: the switch was live


def test_elements_threads_equal_serial(tiny_weights, scene):
    from editrt.runtime.elements_pipeline import ElementsPipeline

    pipe = ElementsPipeline.from_pretrained(tiny_weights)
    rgb, _ = scene
    base = pipe.partition(rgb, resolution=RES)

    def central(e, k=0):
        """The k-th alive element nearest the image centre (moves of a few pixels keep it inside)."""
        h, w = e.image_size
        return sorted(e.alive_ids, key=lambda i: float(np.abs(e.centroids[i] - (w / 2, h / 2)).sum()))[k]

    def edited(fn):
        e = base.copy()
        fn(e)
        return e

    moved = edited(lambda e: e.move(central(e), 5, 0))
    deleted = edited(lambda e: e.delete([central(e, 1), central(e, 2)]))
    resized = edited(lambda e: e.resize(central(e, 3), 1.3))

    def session_final(prompt):
        with EditSession(rgb, pipe, steps=2, resolution=RES) as s:
            s.elements.move(central(s.elements), -4, 2)
            return s.final(prompt=prompt)

    jobs = [
        lambda: pipe.decode(base, steps=2, seed=1, resolution=RES),
        lambda: pipe.decode(base, prompt="a cat", steps=2, seed=1, resolution=RES),
        lambda: pipe.decode(moved, steps=2, seed=2, guidance=1.0, resolution=RES),
        lambda: pipe.decode(deleted, prompt="a dog", steps=2, seed=3, resolution=RES),
        lambda: pipe.decode(resized, steps=2, seed=4, guidance=5.0, resolution=RES),
        lambda: _partition_summary(pipe.partition(np.ascontiguousarray(rgb[::-1]), resolution=RES)),
        lambda: session_final(""),
        lambda: session_final("a red house"),
    ]
    assert len(jobs) >= THREADS
    serial = [_pixels(job()) for job in jobs]
    threaded = [_pixels(r) for r in _run_threads(jobs)]
    for i, (a, b) in enumerate(zip(serial, threaded)):
        np.testing.assert_array_equal(b, a, err_msg=f"job {i}")
