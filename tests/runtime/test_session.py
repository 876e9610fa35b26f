"""EditSession: cached work is not redone, previews are latest-wins and never block the final."""
import threading
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
        assert calls.count("harmonize") == 2 * 3  # two finals, one harmonize loop of steps=3 each
        assert first.image.size == second.image.size == (451, 300)
        direct = pipe(photo, mask=session.subject, move=(40, -5), steps=3, resolution=64)
        np.testing.assert_array_equal(np.asarray(second.image), np.asarray(direct.image))  # cache changes nothing
        preview = session.preview(move=(10, 0)).result(timeout=60)
        assert preview.image.size == (451, 300)


class _Gate:
    """Holds the first UNet call of a job until released: the test then knows exactly where the job is."""

    def __init__(self):
        self.entered, self.release, self.calls = threading.Event(), threading.Event(), 0

    def __call__(self):
        self.calls += 1
        self.entered.set()
        assert self.release.wait(60), "the test never released the gate"


def _when(predicate, then):
    """On a helper thread: wait (events only, no sleeps deciding the outcome) until predicate(), then run `then`."""
    def watch():
        done = threading.Event()
        while not predicate():
            done.wait(0.005)
        then()
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_previews_are_latest_wins_and_the_final_cancels_them(tiny_weights, photo):
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights)
    subject = np.pad(np.ones((80, 80), bool), ((100, 120), (150, 221)))
    gate = _Gate()
    real = pipe.engines["inpaint_unet"]
    with EditSession(photo, pipe, steps=2, preview_steps=8, resolution=64) as session:
        session.select(mask=subject)
        pipe.engines["inpaint_unet"] = _Counting(real, [], "gated", before=lambda: gate() if gate.calls == 0 else None)
        running = session.preview(move=(5, 0))
        assert gate.entered.wait(60)  # the first preview is inside its first denoising step
        queued = session.preview(move=(6, 0))  # supersedes the running one: it stops at its next step
        newest = session.preview(move=(7, 0))
        assert queued.cancelled()  # superseded before it ran
        # release the running preview only once the final below is waiting for the turn
        # (the final cancels `newest`, then waits: the one waiter left; cancelled jobs are not waiting)
        releaser = _when(lambda: newest.cancelled() and pipe.work.waiting == 1, gate.release.set)
        result = session.final(move=(8, 0))
        releaser.join(10)
        assert newest.cancelled()  # the final dropped it before it ran
        with pytest.raises(CancelledError):
            running.result(timeout=60)
        pipe.engines["inpaint_unet"] = real
        calls_by_preview = gate.calls
    # the running preview stopped after the step it was in (8 preview steps were asked for)
    assert calls_by_preview < 8
    direct = pipe(photo, mask=subject, move=(8, 0), steps=2, resolution=64)
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(direct.image))


def test_a_preview_renders_the_state_when_it_was_requested(tiny_weights, photo):
    """The caller changes the subject while the preview waits: the preview still renders the old one."""
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights)
    first = np.pad(np.ones((80, 80), bool), ((100, 120), (150, 221)))
    second = np.pad(np.ones((60, 90), bool), ((30, 210), (40, 321)))
    hold, inside = threading.Event(), threading.Event()
    with EditSession(photo, pipe, steps=2, preview_steps=2, resolution=64) as session:
        session.select(mask=first)
        move = np.array([5.0, 3.0])
        blocker = threading.Thread(target=pipe.work.run, args=(lambda: (inside.set(), hold.wait(60)),))
        blocker.start()
        assert inside.wait(60)  # the pipeline is busy: the preview below waits in the queue
        future = session.preview(move=move)
        session.select(mask=second)  # the caller goes on editing ...
        move[:] = (40.0, 40.0)  # ... including the very array it passed
        hold.set()
        blocker.join(60)
        preview = future.result(timeout=120)
    expected = pipe(photo, mask=first, move=(5.0, 3.0), quality=session.preview_quality)
    np.testing.assert_array_equal(np.asarray(preview.image), np.asarray(expected.image))


def test_close_cancels_a_running_preview(tiny_weights, photo):
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights)
    gate = _Gate()
    real = pipe.engines["inpaint_unet"]
    session = EditSession(photo, pipe, steps=2, preview_steps=8, resolution=64)
    session.select(mask=np.pad(np.ones((80, 80), bool), ((100, 120), (150, 221))))
    pipe.engines["inpaint_unet"] = _Counting(real, [], "gated", before=gate)
    future = session.preview(move=(5, 0))
    assert gate.entered.wait(60)
    closer = threading.Thread(target=session.close)
    closer.start()
    _when(lambda: session._closed, gate.release.set).join(10)
    closer.join(60)
    assert not closer.is_alive()  # close() returned once the preview stopped
    with pytest.raises(CancelledError):
        future.result(timeout=0)  # already settled when close() returned
    assert gate.calls < 8  # stopped at its next step, not after all 8
    with pytest.raises(InputError, match="session: closed"):
        session.preview(move=(1, 0))


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
        assert not hasattr(session, "select")  # an elements session has no subject


def test_depth_per_image_and_alpha_per_subject_are_computed_once(tiny_weights, photo):
    """SEELE's options pass through preview/final; depth (DPT) runs once per image, matting once per selection."""
    from editrt.runtime.reposition import RepositionPipeline

    pipe = RepositionPipeline.from_pretrained(tiny_weights)
    calls = []
    pipe.depth_estimator.engine = _Counting(pipe.depth_estimator.engine, calls, "depth")
    pipe.matter.engine = _Counting(pipe.matter.engine, calls, "matting")
    subject = np.pad(np.ones((80, 80), bool), ((100, 120), (150, 221)))
    shadow = np.pad(np.ones((10, 100), bool), ((180, 110), (150, 201)))
    edit = dict(scale="auto", matting=True, trimap_band=4, harmonize=False)
    with EditSession(photo, pipe, steps=2, preview_steps=1, resolution=64) as session:
        session.select(mask=subject)
        first = session.final(move=(20, 5), **edit)
        session.preview(move=(25, 5), **edit).result(timeout=120)
        second = session.final(move=(30, 5), **edit)
        assert calls == ["depth", "matting"]  # the drag changed only paste (+ harmonize)
        assert "alpha" in first.stages and 0.25 <= second.scale <= 4.0
        direct = pipe(photo, mask=subject, move=(30, 5), steps=2, resolution=64, **edit)
        np.testing.assert_array_equal(np.asarray(second.image), np.asarray(direct.image))  # caches change nothing
        calls.clear()
        session.select_shadow(mask=shadow)  # part of the subject: a new alpha, the same depth
        shadowed = session.final(move=(30, 5), **edit)
        assert calls == ["matting"] and shadowed.stages["existing_shadow"].mask.sum() == shadow.sum()
        with pytest.raises(InputError, match="existing_shadow: select the shadow with select_shadow"):
            session.final(move=(1, 1), existing_shadow=shadow)
        n_alphas = len(pipe.alphas)
    assert len(pipe.alphas) == 0 < n_alphas  # close() dropped this session's alphas


def test_select_shadow_needs_a_subject(reposition, photo):
    with EditSession(photo, reposition, steps=1, resolution=64) as session:
        with pytest.raises(InputError, match="select_shadow: select the subject first"):
            session.select_shadow(box=[10, 10, 50, 50])


def test_a_reposition_session_with_a_crop_renders_previews_and_finals_in_it(reposition, photo):
    """crop_padding / crop_size are session options: both qualities carry them, and a preview and a final equal the
    pipeline's result at that quality (a box around the move, the rest of the photo byte-identical)."""
    subject = np.zeros(photo.shape[:2], bool)
    subject[120:180, 100:170] = True
    with EditSession(photo, reposition, steps=2, preview_steps=1, resolution=64, crop_padding=8) as session:
        session.select(mask=subject)
        final = session.final(move=(60, 10))
        preview = session.preview(move=(60, 10)).result(timeout=120)
        with pytest.raises(InputError) as e:  # set when the session opens, not per edit
            session.final(move=(60, 10), crop_padding=4)
        assert e.value.field == "crop_padding"
        qualities = (session.final_quality, session.preview_quality)
    for result, quality in zip((final, preview), qualities):
        assert (quality.crop_padding, quality.crop_size) == (8, "native")
        expected = reposition(photo, mask=subject, move=(60, 10), quality=quality)
        np.testing.assert_array_equal(np.asarray(result.image), np.asarray(expected.image))
        x1, y1, x2, y2 = result.crop_box
        outside = np.ones(subject.shape, bool)
        outside[y1:y2, x1:x2] = False
        assert outside.any()
        np.testing.assert_array_equal(np.asarray(result.image)[outside], photo[outside])
    with pytest.raises(InputError) as e:
        EditSession(photo, reposition, crop_size="processing")
    assert e.value.field == "crop_size"
