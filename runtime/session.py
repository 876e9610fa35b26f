"""Interactive edit sessions, one class per editor: keep what an edit does not change, preview while
dragging, commit on release, undo.

    session = open_session(image, RepositionPipeline.from_pretrained(...))   # a RepositionSession
    session.select(points=[[x, y]])                       # SAM: the image embedding is computed once
    session.select_shadow(box=[x0, y0, x1, y1])           # optional: its existing shadow moves with it
    future = session.preview(SeeleEdit(move=(dx, dy), occlusion="auto", scale="auto", matting=True))
    result = session.commit(SeeleEdit(move=(dx, dy)))      # full quality; the result becomes session.image
    session.undo()                                        # session.image is the previous image again

    session = open_session(image, ElementsPipeline.from_pretrained(...))     # an ElementsSession
    session.preview(ElementsEdit(ops=(MoveElements(ids, dx, dy),)))          # the committed elements + the edit
    image = session.commit(ElementsEdit(ops=(MoveElements(ids, dx, dy),), prompt="..."))
    session.undo()                                        # session.elements are the previous elements again

`preview`, `final` and `commit` take the edit as a SeeleEdit / ElementsEdit (runtime/edits.py) or as
its keywords (`session.preview(move=(dx, dy))`). `final` renders at full quality without changing
the session; `commit` is a final whose result becomes the session's state, the previous state
going on the undo history (`max_undo` deep; its bytes count in `nbytes()`).

What is kept: the SAM image embedding (the pipeline's Segmenter cache, keyed by the pixels,
hashed once per image), the subject mask and its existing shadow (`select_shadow`), the REMOVE
pass per (subject, quality) (it does not depend on the move, so a drag costs paste + harmonize;
in the pipeline's bounded `remove_passes` cache), the depth map per image (`depth_maps`:
occlusion="auto", scale="auto") and the subject's trimap + alpha per selection (`alphas`:
matting=True), the task prompts' tensors (so their cross-attention K/V caches hold), the
partition and content features, and the denoising loops / CUDA graphs per shape
(runtime/scheduler.py). Every one of those caches has a byte budget (runtime/caches.py); a commit
and close() drop this session's REMOVE passes and alphas.

Threads. A session holds only its own state and owns no thread:
* the caller's thread runs the constructor, select(), final(), commit(), undo() and close(); it
  owns the session's fields (`image`, `subject`, `elements`) and may change them at any time;
* previews run on the pipeline's work-queue worker thread (runtime/work_queue.py). preview()
  snapshots everything the render reads (image, subject, elements, the edit, quality) when it is
  called, so the worker never reads a field the caller is changing;
* all device work (constructor, select, final, commit, undo, previews) goes through the pipeline's
  one work queue, so many sessions on one pipeline run one job at a time, finals before previews.
Latest wins: a new preview cancels this session's previous one (never another session's). A final,
commit, undo or close() cancels a queued preview and stops a running one at its next denoising
step (eager loops) or, under CUDA graphs, once the replay of its current stage's loop is queued
(a replay runs no Python; no later stage starts); then the final runs on the caller's thread at
FINAL priority, so a preview never blocks it for more than one step (one short preview loop
under graphs). `step_callback(i)` of final / commit runs after each denoising step of the final
and may raise to stop it (a server passes its client-disconnected check); a stopped commit
changes nothing.
"""
from __future__ import annotations

import dataclasses
import itertools
import threading
from abc import ABC, abstractmethod
from concurrent.futures import CancelledError, Future
from contextlib import suppress
from dataclasses import dataclass

import numpy as np
import torch

from editrt.errors import InputError
from editrt.runtime.edits import (
    LEGACY_SEELE_KEYWORDS,
    QUALITY_KEYWORDS,
    ElementsEdit,
    Quality,
    SeeleEdit,
    seele_request,
)
from editrt.runtime.images import as_mask, as_rgb
from editrt.runtime.scheduler import overlap
from editrt.runtime.segmenter import pixel_key
from editrt.runtime.work_queue import FINAL, PREVIEW, Job

__all__ = ["EditSession", "ElementsSession", "RepositionSession", "open_session"]
_TOKENS = itertools.count()


def _read_only(rgb: np.ndarray) -> np.ndarray:
    rgb = np.array(rgb, copy=True)
    rgb.setflags(write=False)  # our own copy, read by preview jobs: nobody writes it
    return rgb


class _Session(ABC):
    """What both editors share: qualities, the latest-wins preview, final / commit on the caller's thread,
    the undo history and close(). Subclasses say what a render reads (`_snapshot`), how it runs (`_render`)
    and what the session's state is (`_state` / `_restore`)."""

    edit_type: type = object
    guidance: float | None = None  # the editor's default guidance when the session is given none

    def __init__(self, image, pipeline, steps: int = 20, preview_steps: int = 4, resolution: int | None = None,
                 preview_resolution: int | None = None, seed: int = 0, guidance: float | None = None,
                 max_undo: int | None = None):
        if max_undo is not None and (not isinstance(max_undo, int) or max_undo < 0):
            raise InputError(f"max_undo: expected an integer >= 0 or None, got {max_undo!r}", field="max_undo")
        self.pipeline, self.seed, self.max_undo = pipeline, seed, max_undo
        self.token = ("session", next(_TOKENS))  # names this session's entries in the pipeline's caches
        full = resolution or pipeline.default_resolution
        low = preview_resolution or max(8, (full // 2) // 8 * 8)
        guidance = self.guidance if guidance is None else guidance
        self.final_quality = Quality(steps, guidance, seed, full)
        self.preview_quality = Quality(preview_steps, guidance, seed, low, preview=True)
        self._history: list = []  # previous states, oldest first (see _state)
        self._preview: Job | None = None  # this session's latest preview
        self._closed = False
        self._set_image(as_rgb(image))

    def _set_image(self, rgb: np.ndarray) -> None:
        self.rgb = _read_only(rgb)
        # the SAM embedding is keyed by the pixels, hashed once here: sessions on the same image share it
        self.image_key = pixel_key(self.rgb)

    @property
    def image(self) -> np.ndarray:
        """The session's current image (uint8 [H, W, 3], read-only): the input, or the last commit's result."""
        return self.rgb

    @property
    def undo_depth(self) -> int:
        """How many commits (and edits) undo() can take back."""
        return len(self._history)

    # ------------------------------------------------------------------ edits in, results out
    def _edit(self, edit, keywords: dict):
        """`edit` as the editor's edit type, from the object or its keywords (one of the two)."""
        if keywords:
            if edit is not None:
                name = next(iter(keywords))
                raise InputError(f"{name}: give the edit as a {self.edit_type.__name__} or as keywords, not both",
                                 field=name)
            quality = [k for k in keywords if k in QUALITY_KEYWORDS]
            if quality:
                raise InputError(f"{quality[0]}: a session's quality is set when it opens (steps, preview_steps, "
                                 "resolution, seed, crop_padding, crop_size)", field=quality[0])
            edit = self._edit_from_keywords(keywords)
        edit = self.edit_type() if edit is None else edit
        if not isinstance(edit, self.edit_type):
            raise InputError(f"edit: expected a {self.edit_type.__name__}, got {type(edit).__name__}", field="edit")
        return edit

    def _edit_from_keywords(self, keywords: dict):
        return self.edit_type(**keywords)

    def preview(self, edit=None, **keywords) -> Future:
        """A fast, low-resolution result of `edit`, computed in the background; a newer preview replaces it.

        The returned Future raises concurrent.futures.CancelledError when a newer preview, a final, a commit,
        an undo or close() supersedes it.
        """
        self._check_open()
        request = self._snapshot(self.preview_quality, self._edit(edit, keywords))
        self._cancel_preview()
        self._preview = self.pipeline.work.submit(
            lambda job: self._render(request, lambda _step: job.raise_if_cancelled()), PREVIEW)
        return self._preview.future

    @property
    def preview_job(self) -> Job | None:
        """This session's latest preview Job (its `started_at` tells how long it waited), None after a final."""
        return self._preview

    def final(self, edit=None, *, step_callback=None, **keywords):
        """The full-quality result of `edit`, on this thread; the session's state does not change."""
        self._check_open()
        request = self._snapshot(self.final_quality, self._edit(edit, keywords))
        self._cancel_preview()
        return self.pipeline.work.run(lambda: self._render(request, step_callback), FINAL)

    def commit(self, edit=None, *, step_callback=None, **keywords):
        """The final of `edit`; its result becomes the session's state (the previous state goes on the undo
        history). Returns what final() returns. A final stopped by `step_callback` (or failing) changes nothing."""
        self._check_open()
        edit = self._edit(edit, keywords)
        request = self._snapshot(self.final_quality, edit)
        self._cancel_preview()

        def job():
            result = self._render(request, step_callback)
            if self._changes_state(edit):
                previous = self._state()
                self._adopt(request, result)
                self._push(previous)
            return result
        return self.pipeline.work.run(job, FINAL)

    def undo(self) -> None:
        """Back to the state before the last commit (or edit): the image / elements exactly as they were.
        Nothing to undo raises InputError(field='undo')."""
        self._check_open()
        if not self._history:
            raise InputError("undo: nothing to undo", field="undo")
        self._cancel_preview()

        def job():
            self._restore(self._history[-1])
            self._history.pop()  # only once restored: a refused or failed undo keeps its entry
        self.pipeline.work.run(job)

    def _push(self, state) -> None:
        self._history.append(state)
        if self.max_undo is not None:
            del self._history[:len(self._history) - self.max_undo]

    def nbytes(self) -> int:
        """Host memory this session holds: its image, selection / elements and undo history (the pipeline's
        caches have their own byte budgets)."""
        return self.rgb.nbytes + sum(self._state_bytes(s) for s in self._history)

    # ------------------------------------------------------------------ lifecycle
    def _cancel_preview(self) -> None:
        if self._preview is not None:
            self._preview.cancel()  # queued: never runs; running: stops at its next denoising step
            self._preview = None

    def _check_open(self) -> None:
        if self._closed:
            raise InputError("session: closed; open a new session", field="session")

    def close(self, timeout: float | None = 60.0) -> None:
        """Cancel this session's preview (queued or running; waits up to `timeout` s for a running one to
        stop) and drop its entries from the pipeline's caches (the SAM embedding stays: other sessions
        may share it; the cache's byte budget bounds it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        preview, self._preview = self._preview, None
        if preview is not None:
            preview.cancel()
            with suppress(CancelledError):  # cancelled before it started: nothing runs, nothing to wait for
                preview.future.exception(timeout=timeout)  # returns once it has stopped
        self._forget()

    @abstractmethod
    def _forget(self) -> None:
        """Drop this session's entries from the pipeline's caches (close)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ per editor
    @abstractmethod
    def _snapshot(self, quality: Quality, edit):
        """Caller's thread: everything a render of `edit` reads, captured now."""

    @abstractmethod
    def _render(self, request, step_callback):
        """Inside a work-queue job: the render of a snapshot."""

    @abstractmethod
    def _state(self):
        """What undo restores (an image, an Elements)."""

    @abstractmethod
    def _restore(self, state) -> None:
        """Make `state` (one _state() returned) the session's again."""

    @abstractmethod
    def _adopt(self, request, result) -> None:
        """Make a committed render's result the session's state."""

    @abstractmethod
    def _state_bytes(self, state) -> int:
        """Host bytes one history entry holds."""

    def _changes_state(self, edit) -> bool:
        return True


# ---------------------------------------------------------------------- subject repositioning
@dataclass(frozen=True)
class _SeeleRequest:
    """Everything one SEELE render reads, captured on the caller's thread when the render is requested."""

    quality: Quality
    edit: SeeleEdit  # with the session's existing shadow
    rgb: np.ndarray
    image_key: str
    subject: np.ndarray
    cache_key: tuple  # (session token, selection number): names image + subject + shadow


class RepositionSession(_Session):
    """A SEELE session on one RepositionPipeline: select the subject (and its existing shadow), drag it
    (previews), commit the move (the result becomes the image), undo.

    `crop_padding` / `crop_size` (Quality's region crops): previews and finals alike work in the padded box around
    what the edit changes, each at its own resolution (a preview's processing size caps its crop's)."""

    edit_type = SeeleEdit
    guidance = 1.0

    def __init__(self, image, pipeline, crop_padding: int | None = None, crop_size: str | None = None, **options):
        crop = Quality(crop_padding=crop_padding, crop_size=crop_size)  # checked before anything runs
        self.subject: np.ndarray | None = None
        self.shadow: np.ndarray | None = None  # the subject's existing shadow (select_shadow)
        self._selection = 0  # bumped by every selection change: part of the REMOVE pass's cache key
        # image, key, subject, shadow and selection number change together (select on the queue's worker, a
        # commit, an undo) while a preview's snapshot may read them on another thread: one lock for both sides,
        # so a snapshot never pairs an old subject with a new selection number (a poisoned REMOVE-pass key)
        self._fields = threading.Lock()
        super().__init__(image, pipeline, **options)
        self.final_quality, self.preview_quality = (
            dataclasses.replace(q, crop_padding=crop.crop_padding, crop_size=crop.crop_size)
            for q in (self.final_quality, self.preview_quality))
        self._warm(self.rgb, self.image_key)

    def _warm(self, rgb: np.ndarray, key) -> None:
        """What every edit of `rgb` needs, computed once as one job; independent parts overlap on CUDA streams."""
        pipe = self.pipeline
        embeds = [lambda task=task: pipe.prompt_embeds(task, False) for task in ("remove", "harmonize")]
        with torch.no_grad():
            pipe.work.run(lambda: overlap(pipe.device, lambda: pipe.segmenter.embedding(rgb, key), *embeds))

    def _edit_from_keywords(self, keywords: dict) -> SeeleEdit:
        names = {LEGACY_SEELE_KEYWORDS.get(k, k) for k in keywords}
        if "existing_shadow" in names:
            self._refuse_shadow()
        return seele_request(None, None, dict(keywords))[0]

    @staticmethod
    def _refuse_shadow():
        raise InputError("existing_shadow: select the shadow with select_shadow(...), not per preview/commit",
                         field="existing_shadow")

    def _clear_selection(self) -> None:
        self.subject, self.shadow, self._selection = None, None, self._selection + 1

    def select(self, points=None, labels=None, box=None, mask=None) -> np.ndarray:
        """The subject, from SAM prompts (cached embedding) or a mask; a new subject has no shadow."""
        self._check_open()
        if mask is not None:
            subject = as_mask(mask, self.rgb.shape[:2], "mask")
        else:
            with torch.no_grad():
                subject = self.pipeline.segment(self.rgb, points=points, labels=labels, box=box,
                                                image_key=self.image_key)
        subject.setflags(write=False)  # a preview snapshot may hold it; select() replaces, never edits it
        with self._fields:
            self._clear_selection()
            self.subject = subject
        return subject

    def select_shadow(self, points=None, labels=None, box=None, mask=None) -> np.ndarray | None:
        """The selected subject's existing shadow (a second selection: SAM prompts or a mask); it moves and is
        removed with the subject, and is regenerated at its new place with the complete prompt (SEELE App. A.3).
        All of points, box and mask None: forget the shadow."""
        self._check_open()
        if self.subject is None:
            raise InputError("select_shadow: select the subject first (select(points=...) or mask=)", field="selected")
        if mask is None and points is None and box is None:
            shadow = None
        elif mask is not None:
            shadow = as_mask(mask, self.rgb.shape[:2], "existing_shadow")
        else:
            with torch.no_grad():
                shadow = self.pipeline.segment(self.rgb, points=points, labels=labels, box=box,
                                               image_key=self.image_key)
        if shadow is not None:
            shadow.setflags(write=False)
        with self._fields:
            self.shadow, self._selection = shadow, self._selection + 1  # part of the cached subject: a new key
        return shadow

    def _snapshot(self, quality: Quality, edit: SeeleEdit) -> _SeeleRequest:
        if edit.existing_shadow is not None:  # it shapes the cached REMOVE pass and alpha: a selection, not an edit
            self._refuse_shadow()
        with self._fields:
            rgb, key, subject, shadow, selection = self.rgb, self.image_key, self.subject, self.shadow, self._selection
        if subject is None:
            raise InputError("selected: select the subject first (select(points=...) or mask=)", field="selected")
        if shadow is not None:
            edit = dataclasses.replace(edit, existing_shadow=shadow)
        return _SeeleRequest(quality, edit, rgb, key, subject, (self.token, selection))

    def _render(self, request: _SeeleRequest, step_callback):
        with torch.no_grad():
            return self.pipeline(request.rgb, request.edit, mask=request.subject, quality=request.quality,
                                 cache_key=request.cache_key, image_key=request.image_key,
                                 step_callback=step_callback)

    def _state(self):
        return self.rgb  # the selection is not restored: undo clears it (select again)

    def _adopt(self, request, result) -> None:
        self._restore(np.asarray(result.image))
        self.pipeline.forget(self.token)  # the REMOVE passes and alphas of the replaced image

    def _restore(self, rgb: np.ndarray) -> None:
        rgb = _read_only(rgb)
        key = pixel_key(rgb)
        self._warm(rgb, key)  # first: if it fails (out of memory, an engine error) the session is as it was
        with self._fields:
            self._clear_selection()
            self.rgb, self.image_key = rgb, key

    def _state_bytes(self, rgb) -> int:
        return rgb.nbytes

    def nbytes(self) -> int:
        extra = sum(m.nbytes for m in (self.subject, self.shadow) if m is not None)
        return super().nbytes() + extra

    def _forget(self) -> None:
        self.pipeline.forget(self.token)


# ---------------------------------------------------------------------- editable image elements
@dataclass(frozen=True)
class _ElementsRequest:
    quality: Quality
    prompt: str
    elements: object  # a copy of the session's Elements with the edit applied


def elements_bytes(elements) -> int:
    """Host bytes of an Elements (features, region masks, positions)."""
    return int(elements.features.nbytes + sum(m.nbytes for m in elements.masks) + elements.centroids.nbytes * 4)


class ElementsSession(_Session):
    """An editable-image-elements session on one ElementsPipeline: the partition and content features are
    computed once; edits (ElementsEdit) are previewed on the committed elements, committed, undone."""

    edit_type = ElementsEdit
    guidance = 3.0

    def __init__(self, image, pipeline, **options):
        super().__init__(image, pipeline, **options)
        full, pipe = self.final_quality.resolution, pipeline
        with torch.no_grad():
            results = pipe.work.run(lambda: overlap(pipe.device, lambda: pipe.partition(self.rgb, resolution=full),
                                                    lambda: pipe.prompt_embedding("")))
        self.elements, self.original = results[0], results[0].copy()

    def edited(self, edit: ElementsEdit):
        """A copy of the session's elements with `edit`'s ops applied (the session does not change)."""
        elements = self.elements.copy()
        edit.apply(elements)
        return elements

    def apply(self, edit=None, **keywords) -> list[int]:
        """Apply `edit`'s ops to the session's elements without rendering (undo takes them back); returns the
        ids deleted by them (and by collision)."""
        self._check_open()
        edit = self._edit(edit, keywords)
        elements = self.elements.copy()
        deleted = edit.apply(elements)
        self._push(self.elements)
        self.elements = elements
        return deleted

    def reset(self) -> None:
        """Back to the partition's elements (undo takes the reset back)."""
        self._check_open()
        self._push(self.elements)
        self.elements = self.original.copy()

    def _snapshot(self, quality: Quality, edit: ElementsEdit) -> _ElementsRequest:
        return _ElementsRequest(quality, edit.prompt, self.edited(edit))

    def _render(self, request: _ElementsRequest, step_callback):
        q = request.quality
        with torch.no_grad():
            return self.pipeline.decode(request.elements, prompt=request.prompt, guidance=q.guidance_or(3.0),
                                        steps=q.steps, seed=q.seed, resolution=q.resolution,
                                        step_callback=step_callback, preview=q.preview)

    def _state(self):
        return self.elements

    def _changes_state(self, edit: ElementsEdit) -> bool:
        return bool(edit.ops)  # a render of unchanged elements is not an edit: nothing to undo

    def _adopt(self, request: _ElementsRequest, result) -> None:
        self.elements = request.elements.copy()  # the snapshot the final rendered (the caller may not hold it)

    def _restore(self, elements) -> None:
        self.elements = elements

    def _state_bytes(self, elements) -> int:
        return elements_bytes(elements)

    def nbytes(self) -> int:
        return super().nbytes() + elements_bytes(self.elements) + elements_bytes(self.original)

    def _forget(self) -> None:
        return None  # nothing per session: prompt embeddings and loops are shared, keyed by their content


# ---------------------------------------------------------------------- by the pipeline's type
def _session_class(pipeline) -> type[_Session]:
    from editrt.runtime.elements_pipeline import ElementsPipeline
    from editrt.runtime.reposition import RepositionPipeline

    for pipeline_type, session_type in ((RepositionPipeline, RepositionSession), (ElementsPipeline, ElementsSession)):
        if isinstance(pipeline, pipeline_type):
            return session_type
    raise InputError(f"pipeline: expected a RepositionPipeline or an ElementsPipeline, got {type(pipeline).__name__}",
                     field="pipeline")


def open_session(image, pipeline, **options) -> RepositionSession | ElementsSession:
    """The session class for `pipeline`'s editor (a RepositionSession or an ElementsSession) on `image`.
    `options`: steps, preview_steps, resolution, preview_resolution, seed, guidance, max_undo; a RepositionSession
    also crop_padding, crop_size."""
    return _session_class(pipeline)(image, pipeline, **options)


EditSession = open_session  # the older name: a factory now, returning the editor's session class
