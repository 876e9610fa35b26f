"""EditSession: cached work is not redone, previews are latest-wins and never block the final."""
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest
from runtime_doubles import CountingEngine as _Counting
from skimage import data

from editrt.errors import InputError
from editrt.runtime.session import EditSession


@pytest.fixture
def photo():
    return data.chelsea()


def test_reposition_session_recomputes_only_what_the_drag_changes(tiny_weights, photo):
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights)
    calls = []
    pipe.engines["sam_image_encoder"] = _Counting(pipe.engines["sam_image_encoder"], calls, "sam")
    pipe.engines["inpaint_unet"] = _Counting(pipe.engines["inpaint_unet"], calls, "inpaint")
    pipe.engines["harmonizer_unet"] = _Counting(pipe.engines["harmonizer_unet"], calls, "harmonize")
    with EditSession(photo, pipe, steps=3, preview_steps=2, resolution=64) as session:
        assert calls.count("sam") == 1  # embedding computed at start
        session.select(points=[[200, 150]])
        session.select(points=[[100, 100]])
        assert calls.count("sam") == 1  # new clicks reuse it
        first = session.final(move=(20, 5))
        n_inpaint = calls.count("inpaint")
        second = session.final(move=(40, -5))
        assert calls.count("inpaint") == n_inpaint  # REMOVE reused: the drag changed only paste + harmonize
        assert calls.count("harmonize") == 6  # 3 steps per final
        assert first.image.size == second.image.size == (451, 300)
        direct = pipe(photo, mask=session.subject, move=(40, -5), steps=3, resolution=64)
        np.testing.assert_array_equal(np.asarray(second.image), np.asarray(direct.image))  # cache changes nothing
        preview = session.preview(move=(10, 0)).result(timeout=60)
        assert preview.image.size == (451, 300)


def test_previews_are_latest_wins_and_the_final_cancels_them(tiny_weights, photo):
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights)
    started, release = threading.Event(), threading.Event()
    real = pipe.engines["inpaint_unet"]

    class Slow(_Counting):
        def __call__(self, **inputs):
            started.set()
            release.wait(5)
            return real(**inputs)

    with EditSession(photo, pipe, steps=2, preview_steps=8, resolution=64) as session:
        session.select(mask=np.pad(np.ones((80, 80), bool), ((100, 120), (150, 221))))
        pipe.engines["inpaint_unet"] = Slow(real, [], "slow")
        running = session.preview(move=(5, 0))
        assert started.wait(5)  # the first preview is inside its loop
        queued = session.preview(move=(6, 0))
        newest = session.preview(move=(7, 0))
        assert queued.cancelled()  # superseded before it ran
        release.set()
        start = time.perf_counter()
        result = session.final(move=(8, 0))  # stops the running preview at its next step
        assert time.perf_counter() - start < 30
        assert newest.cancelled()
        with pytest.raises(CancelledError):
            running.result(timeout=5)
        assert result.image.size == (451, 300)


def test_elements_session(tiny_weights, photo):
    from editrt.runtime.elements_pipeline import ElementsPipeline

    pipe = ElementsPipeline.from_pretrained(tiny_weights)
    shapes = []
    real_unet = pipe.engines["element_unet"]
    with EditSession(photo, pipe, steps=2, preview_steps=1) as session:
        calls = []
        pipe.engines["sam_image_encoder"] = _Counting(pipe.engines["sam_image_encoder"], calls, "sam")
        pipe.engines["content_encoder"] = _Counting(pipe.engines["content_encoder"], calls, "content")
        pipe.engines["element_unet"] = _Counting(real_unet, shapes, "unet")
        alive = session.elements.alive_ids
        session.elements.move(alive[0], 6, 0)
        session.elements.delete(alive[-2:])  # far from the moved one
        final = session.final(prompt="a cat")
        preview = session.preview().result(timeout=60)
        assert calls == []  # SAM and content features ran once, at the start: edits do not re-run them
        assert shapes == ["unet"] * 3  # 2 final steps + 1 preview step
        assert final.size == preview.size == (photo.shape[1], photo.shape[0])  # both in the user's image
        session.reset()
        assert session.elements.alive[alive[-1]]
        with pytest.raises(InputError, match="only a repositioning session"):
            session.select(points=[[1, 1]])
