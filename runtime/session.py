"""Interactive edit sessions: keep what an edit does not change, preview while dragging, final on release.

    session = EditSession(image, RepositionPipeline.from_pretrained(...))
    session.select(points=[[x, y]])                # SAM: the image embedding is computed once
    session.select_shadow(box=[x0, y0, x1, y1])    # optional: its existing shadow moves with it
    session.preview(move=(dx, dy), occlusion="auto", scale="auto", matting=True)   # SEELE's stages, cached
    future = session.preview(move=(dx, dy))        # non-blocking; a newer preview replaces a queued one
    result = session.final(move=(dx, dy))          # cancels this session's previews, then runs at full quality

    session = EditSession(image, ElementsPipeline.from_pretrained(...))   # partition + features once
    session.elements.move(ids, dx, dy)             # edit the session's elements
    session.preview(); session.final(prompt="...")

What is kept: the SAM image embedding (the pipeline's Segmenter cache, keyed by the pixels,
hashed once when the session opens), the subject mask (and its shadow, `select_shadow`), the REMOVE
pass per (subject, quality) (it does not depend on the move, so a drag costs paste + harmonize; in
the pipeline's bounded `remove_passes` cache), the depth map per image (`depth_maps`, keyed by the
pixels like the SAM embedding: occlusion="auto", scale="auto") and the subject's trimap + alpha per
selection (`alphas`: matting=True), the task
prompts' tensors (so their cross-attention K/V caches hold), the partition and content features,
and the denoising loops / CUDA graphs per shape (runtime/scheduler.py). Every one of those
caches has a byte budget (runtime/caches.py); close() drops this session's REMOVE passes.

Threads. A session holds only its own state and owns no thread:
* the caller's thread runs the constructor, select(), final(), reset() and close(); it owns the
  session's fields (`subject`, `elements`) and may change them at any time;
* previews run on the pipeline's work-queue worker thread (runtime/work_queue.py). preview()
  snapshots everything the render reads (subject, elements, the edit's arrays, quality, seed)
  when it is called, so the worker never reads a field the caller is changing;
* all device work (constructor, select, final, previews) goes through the pipeline's one work
  queue, so many sessions on one pipeline run one job at a time, finals before previews.
Latest wins: a new preview cancels this session's previous one (never another session's). A final
or close() cancels a queued preview and stops a running one at its next denoising step (eager
loops) or, under CUDA graphs, once the replay of its current stage's loop is queued (a replay runs
no Python; no later stage starts); then the final runs on the caller's thread at FINAL priority,
so a preview never blocks it for more than one step (one short preview loop under graphs).
"""
from __future__ import annotations

import itertools
from concurrent.futures import CancelledError, Future
from contextlib import suppress
from dataclasses import dataclass

import numpy as np
import torch

from editrt.errors import InputError
from editrt.runtime.images import as_mask, as_rgb
from editrt.runtime.scheduler import overlap
from editrt.runtime.segmenter import pixel_key
from editrt.runtime.work_queue import FINAL, PREVIEW, Job

_TOKENS = itertools.count()


@dataclass(frozen=True)
class Quality:
    steps: int
    resolution: int | None  # None: the pipeline's default


@dataclass(frozen=True)
class _Request:
    """Everything one render reads, captured on the caller's thread when the render is requested."""

    quality: Quality
    edit: dict
    subject: np.ndarray | None = None  # reposition
    cache_key: tuple | None = None  # (session token, selection number): names image + subject
    elements: object = None  # elements: a copy of the session's Elements


def _frozen_copy(value):
    if isinstance(value, np.ndarray):
        value = value.copy()
        value.setflags(write=False)
    return value


class EditSession:
    def __init__(self, image, pipeline, steps: int = 20, preview_steps: int = 4, resolution: int | None = None,
                 preview_resolution: int | None = None, seed: int = 0):
        from editrt.runtime.elements_pipeline import ElementsPipeline
        from editrt.runtime.reposition import RepositionPipeline

        if not isinstance(pipeline, (RepositionPipeline, ElementsPipeline)):
            raise InputError(f"pipeline: expected a RepositionPipeline or an ElementsPipeline, got {type(pipeline).__name__}", field="pipeline")
        self.rgb, self.pipeline, self.seed = as_rgb(image).copy(), pipeline, seed
        self.rgb.setflags(write=False)  # our own copy, read by preview jobs: nobody writes it
        self.kind = "reposition" if isinstance(pipeline, RepositionPipeline) else "elements"
        self.token = ("session", next(_TOKENS))  # names this session's REMOVE passes in the pipeline's cache
        # the SAM embedding is keyed by the pixels, hashed once here: sessions on the same image share it
        self.image_key = pixel_key(self.rgb)
        full = resolution or pipeline.default_resolution
        low = preview_resolution or max(8, (full // 2) // 8 * 8)
        self.final_quality, self.preview_quality = Quality(steps, full), Quality(preview_steps, low)
        self.subject: np.ndarray | None = None
        self.shadow: np.ndarray | None = None  # the subject's existing shadow (select_shadow)
        self._selection = 0  # bumped by every select(): part of the REMOVE pass's cache key
        self._preview: Job | None = None  # this session's latest preview
        self._closed = False
        work = pipeline.work
        # What every edit needs, computed once as one job; independent parts overlap on CUDA streams.
        if self.kind == "reposition":
            embeds = [lambda task=task: pipeline.prompt_embeds(task, False) for task in ("remove", "harmonize")]
            work.run(lambda: overlap(pipeline.device, lambda: pipeline.segmenter.embedding(self.rgb, self.image_key),
                                     *embeds))
            self.elements = None
        else:
            results = work.run(lambda: overlap(pipeline.device, lambda: pipeline.partition(self.rgb, resolution=full),
                                               lambda: pipeline.prompt_embedding("")))
            self.elements, self.original = results[0], results[0].copy()

    # ------------------------------------------------------------------ reposition
    def select(self, points=None, labels=None, box=None, mask=None) -> np.ndarray:
        """The subject, from SAM prompts (cached embedding) or a mask."""
        self._check_open()
        if self.kind != "reposition":
            raise InputError("select: only a repositioning session has a subject")
        if mask is not None:
            subject = as_mask(mask, self.rgb.shape[:2], "mask")
        else:
            subject = self.pipeline.segment(self.rgb, points=points, labels=labels, box=box, image_key=self.image_key)
        subject.setflags(write=False)  # a preview snapshot may hold it; select() replaces, never edits it
        self.subject, self.shadow, self._selection = subject, None, self._selection + 1  # a new subject: no shadow
        return subject

    def select_shadow(self, points=None, labels=None, box=None, mask=None) -> np.ndarray | None:
        """The selected subject's existing shadow (a second selection: SAM prompts or a mask); it moves and is
        removed with the subject, and is regenerated at its new place with the complete prompt (SEELE App. A.3).
        All of points, box and mask None: forget the shadow."""
        self._check_open()
        if self.kind != "reposition" or self.subject is None:
            raise InputError("select_shadow: select the subject first (select(points=...) or mask=)")
        if mask is None and points is None and box is None:
            shadow = None
        elif mask is not None:
            shadow = as_mask(mask, self.rgb.shape[:2], "shadow_mask")
        else:
            shadow = self.pipeline.segment(self.rgb, points=points, labels=labels, box=box, image_key=self.image_key)
        if shadow is not None:
            shadow.setflags(write=False)
        self.shadow, self._selection = shadow, self._selection + 1  # part of the cached subject: a new cache key
        return shadow

    # ------------------------------------------------------------------ both
    def _request(self, quality: Quality, edit: dict) -> _Request:
        """Caller's thread: snapshot the state a render reads."""
        edit = {k: _frozen_copy(v) for k, v in edit.items()}
        if self.kind == "reposition":
            if self.subject is None:
                raise InputError("preview/final: select the subject first (select(points=...) or mask=)")
            if "shadow_mask" in edit:  # it shapes the cached REMOVE pass and alpha: a selection, not an edit
                raise InputError("shadow_mask: select the shadow with select_shadow(...), not per preview/final", field="shadow_mask")
            if self.shadow is not None:
                edit["shadow_mask"] = self.shadow
            return _Request(quality, edit, self.subject, (self.token, self._selection))
        return _Request(quality, edit, elements=self.elements.copy())

    def _render(self, request: _Request, job: Job | None):
        """Inside a work-queue job: the worker thread (preview) or the caller's thread (final)."""
        check = None if job is None else (lambda _step: job.raise_if_cancelled())
        q = request.quality
        with torch.no_grad():
            if self.kind == "reposition":
                return self.pipeline(self.rgb, mask=request.subject, steps=q.steps, resolution=q.resolution,
                                     seed=self.seed, cache_key=request.cache_key, image_key=self.image_key,
                                     step_callback=check, **request.edit)
            return self.pipeline.decode(request.elements, steps=q.steps, seed=self.seed, resolution=q.resolution,
                                        step_callback=check, **request.edit)

    def preview(self, **edit) -> Future:
        """A fast, low-resolution result of `edit`, computed in the background; a newer preview replaces it.

        The returned Future raises concurrent.futures.CancelledError when a newer preview, a final or
        close() supersedes it.
        """
        self._check_open()
        request = self._request(self.preview_quality, edit)
        self._cancel_preview()
        self._preview = self.pipeline.work.submit(lambda job: self._render(request, job), PREVIEW)
        return self._preview.future

    @property
    def preview_job(self) -> Job | None:
        """This session's latest preview Job (its `started_at` tells how long it waited), None after a final."""
        return self._preview

    def final(self, **edit):
        """The full-quality result of `edit`, on this thread; this session's previews are dropped first."""
        self._check_open()
        request = self._request(self.final_quality, edit)
        self._cancel_preview()
        return self.pipeline.work.run(lambda: self._render(request, None), FINAL)

    def _cancel_preview(self) -> None:
        if self._preview is not None:
            self._preview.cancel()  # queued: never runs; running: stops at its next denoising step
            self._preview = None

    def reset(self) -> None:
        """Undo the elements edits (elements sessions)."""
        if self.elements is not None:
            self.elements = self.original.copy()

    def _check_open(self) -> None:
        if self._closed:
            raise InputError("session: closed; open a new EditSession")

    def close(self, timeout: float | None = 60.0) -> None:
        """Cancel this session's preview (queued or running; waits up to `timeout` s for a running one to
        stop) and drop its REMOVE passes from the pipeline's cache (the SAM embedding stays: other sessions
        may share it; the cache's byte budget bounds it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        preview, self._preview = self._preview, None
        if preview is not None:
            preview.cancel()
            with suppress(CancelledError):  # cancelled before it started: nothing runs, nothing to wait for
                preview.future.exception(timeout=timeout)  # returns once it has stopped
        if self.kind == "reposition":
            self.pipeline.forget(self.token)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
