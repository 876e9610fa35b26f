"""One session class per editor: commit makes the result the session's state, undo restores the previous one
exactly, a step_callback stops a commit (which then changes nothing), history is counted in nbytes()."""
import numpy as np
import pytest
from skimage import data

from editrt.errors import InputError
from editrt.runtime.edits import DeleteElements, ElementsEdit, MoveElements, SeeleEdit
from editrt.runtime.session import EditSession, ElementsSession, RepositionSession, open_session


class _Stop(Exception):
    pass


@pytest.fixture
def photo():
    return np.ascontiguousarray(data.chelsea()[::3, ::3])  # 100 x 151


def _subject(photo):
    mask = np.zeros(photo.shape[:2], bool)
    mask[30:70, 40:80] = True
    return mask


def test_reposition_commit_then_undo_restores_the_original_bytes(reposition, photo):
    with open_session(photo, reposition, steps=1, preview_steps=1, resolution=64, max_undo=4) as session:
        assert type(session) is RepositionSession and session.undo_depth == 0
        before = session.nbytes()
        session.select(mask=_subject(photo))
        result = session.commit(SeeleEdit(move=(20, 5)))
        committed = np.asarray(result.image)
        assert not np.array_equal(committed, photo)
        np.testing.assert_array_equal(session.image, committed)  # the result is the session's image
        assert session.subject is None and session.undo_depth == 1  # a new image: select again
        assert session.nbytes() == before + photo.nbytes  # the history's image counts
        session.undo()
        assert np.array_equal(session.image, photo) and session.image.dtype == photo.dtype
        assert session.undo_depth == 0 and session.nbytes() == before
        with pytest.raises(InputError, match="undo: nothing to undo") as e:
            session.undo()
        assert e.value.field == "undo"


def test_reposition_history_is_bounded_and_undone_in_order(reposition, photo):
    with open_session(photo, reposition, steps=1, preview_steps=1, resolution=64, max_undo=2) as session:
        images = [session.image]
        for dx in (10, 20, 30):
            session.select(mask=_subject(session.image))
            session.commit(move=(dx, 0))  # the keyword form
            images.append(session.image)
        assert session.undo_depth == 2  # max_undo: the oldest entry was dropped
        session.undo()
        np.testing.assert_array_equal(session.image, images[2])
        session.undo()
        np.testing.assert_array_equal(session.image, images[1])
        assert session.undo_depth == 0


def test_a_step_callback_stops_a_commit_at_its_next_step_and_changes_nothing(reposition, photo):
    steps_seen = []

    def stop_at_second(i):
        steps_seen.append(i)
        if len(steps_seen) == 2:
            raise _Stop

    with open_session(photo, reposition, steps=5, preview_steps=1, resolution=64) as session:
        session.select(mask=_subject(photo))
        with pytest.raises(_Stop):
            session.commit(SeeleEdit(move=(20, 5)), step_callback=stop_at_second)
        assert len(steps_seen) == 2  # stopped at the step that raised, not after the pass's 5
        assert np.array_equal(session.image, photo) and session.undo_depth == 0 and session.subject is not None
        counted = []
        session.commit(SeeleEdit(move=(20, 5), harmonize=False), step_callback=counted.append)
        assert len(counted) == 5  # one REMOVE pass of 5 steps, each reported


def test_elements_commit_then_undo_restores_the_elements(tiny_weights, photo):
    from editrt.runtime.elements_pipeline import ElementsPipeline

    pipe = ElementsPipeline.from_pretrained(tiny_weights)
    with EditSession(photo, pipe, steps=1, preview_steps=1, resolution=64) as session:
        assert type(session) is ElementsSession
        original = session.elements.copy()
        alive = original.alive_ids
        before = session.nbytes()
        edit = ElementsEdit(ops=(MoveElements(ids=(alive[0],), dx=6, dy=0), DeleteElements(ids=alive[-1])),
                            prompt="a cat")
        session.preview(edit).result(timeout=120)
        _assert_same_elements(session.elements, original)  # a preview renders a copy: nothing changed
        image = session.commit(edit)
        assert image.size == (photo.shape[1], photo.shape[0])
        assert not session.elements.alive[alive[-1]] and session.undo_depth == 1
        assert session.nbytes() > before  # the previous elements are held for undo
        session.commit(prompt="a dog")  # no ops: a render, not an edit
        assert session.undo_depth == 1
        session.undo()
        _assert_same_elements(session.elements, original)
        with pytest.raises(InputError) as e:
            session.undo()
        assert e.value.field == "undo"


def _assert_same_elements(a, b):
    for name in ("features", "centroids", "sizes", "alive", "anchors", "scales"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert len(a.masks) == len(b.masks) and all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))


def test_session_edits_refuse_what_belongs_elsewhere(reposition, photo):
    with open_session(photo, reposition, steps=1, resolution=64) as session:
        with pytest.raises(InputError) as e:
            session.preview(move=(1, 1))
        assert e.value.field == "selected"
        session.select(mask=_subject(photo))
        with pytest.raises(InputError) as e:
            session.preview(SeeleEdit(move=(1, 1)), scale=2.0)
        assert e.value.field == "scale"
        with pytest.raises(InputError) as e:
            session.final(move=(1, 1), steps=3)
        assert e.value.field == "steps"
        with pytest.raises(InputError) as e:
            session.commit(ElementsEdit())
        assert e.value.field == "edit"
        assert session.undo_depth == 0


def test_a_commit_or_undo_that_fails_while_preparing_the_new_image_changes_nothing(reposition, photo, monkeypatch):
    """Adopting a result computes the new image's SAM embedding; if that fails (out of memory, an engine
    error), the session keeps its image, its selection and its history: nothing half-applied."""
    with open_session(photo, reposition, steps=1, preview_steps=1, resolution=64) as session:
        subject = session.select(mask=_subject(photo))
        embedding = reposition.segmenter.embedding

        def failing(rgb, key):
            if not np.array_equal(rgb, photo):  # the committed image, not the session's own
                raise _Stop("no memory for the new image's embedding")
            return embedding(rgb, key)

        monkeypatch.setattr(reposition.segmenter, "embedding", failing)
        with pytest.raises(_Stop):
            session.commit(SeeleEdit(move=(20, 5)))
        assert np.array_equal(session.image, photo) and session.undo_depth == 0
        assert session.subject is subject  # the selection too: a preview still works on it
        session.preview(SeeleEdit(move=(5, 0))).result(timeout=120)

        monkeypatch.setattr(reposition.segmenter, "embedding", embedding)
        committed = session.commit(SeeleEdit(move=(20, 5))).image
        monkeypatch.setattr(reposition.segmenter, "embedding",
                            lambda rgb, key: (_ for _ in ()).throw(_Stop("no memory")))
        with pytest.raises(_Stop):
            session.undo()
        np.testing.assert_array_equal(session.image, np.asarray(committed))  # the undo entry is kept
        assert session.undo_depth == 1
        monkeypatch.setattr(reposition.segmenter, "embedding", embedding)
        session.undo()
        assert np.array_equal(session.image, photo)
