"""Interactive edit sessions: keep what an edit does not change, preview while dragging, final on release.

    session = EditSession(image, RepositionPipeline.from_pretrained(...))
    session.select(points=[[x, y]])                # SAM: the image embedding is computed once
    future = session.preview(move=(dx, dy))        # non-blocking; a newer preview replaces a queued one
    result = session.final(move=(dx, dy))          # cancels previews in flight, then runs at full quality

    session = EditSession(image, ElementsPipeline.from_pretrained(...))   # partition + features once
    session.elements.move(ids, dx, dy)             # edit the session's elements
    session.preview(); session.final(prompt="...")

What is kept: the SAM image embedding (Segmenter cache), the subject mask, the REMOVE pass per
(subject, quality) (it does not depend on the move, so a drag costs paste + harmonize), the task
prompts' tensors (so their cross-attention K/V caches hold), the partition and content features,
and the denoising loops / CUDA graphs per shape (runtime/scheduler.py).

Previews run at `preview_steps` and a lower resolution on a background thread, latest-wins. A
final request cancels a preview that is queued and stops one that is running at its next
denoising step (eager loops; a captured preview graph is short and finishes first), then runs on
the caller's thread: a preview never blocks the final.
"""
from __future__ import annotations

import threading
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass

import numpy as np
import torch

from editrt.errors import InputError
from editrt.runtime.images import as_rgb
from editrt.runtime.scheduler import overlap


class _Cancelled(Exception):
    """Raised inside a preview's denoising loop when a final request supersedes it."""


@dataclass
class Quality:
    steps: int
    resolution: int | None  # None: the pipeline's default


class _Worker:
    """Previews run on one background thread, latest-wins; a final runs on the caller's thread.

    `busy` is held by whoever uses the pipeline, so it is never used by two threads at once. A
    final cancels the queued preview and asks a running one to stop at its next step, then takes
    `busy`: it waits at most one denoising step, never a whole preview. (Running finals on the
    caller's thread also keeps CPU inference off a second OpenMP thread team.)
    """

    def __init__(self):
        self.lock = threading.Condition()
        self.busy = threading.Lock()
        self.pending: tuple[Future, object] | None = None  # the newest preview not started yet
        self.running: Future | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="editrt-preview", daemon=True)
        self.thread.start()

    def preview(self, fn) -> Future:
        future = Future()
        future.cancel_requested = False
        with self.lock:
            if self.closed:
                raise RuntimeError("the session is closed")
            if self.pending is not None:
                self.pending[0].cancel()  # superseded by a newer drag position
            self.pending = (future, fn)
            self.lock.notify()
        return future

    def final(self, fn):
        with self.lock:
            if self.pending is not None:
                self.pending[0].cancel()
                self.pending = None
            if self.running is not None:
                self.running.cancel_requested = True
        with self.busy:
            return fn(None)

    def _loop(self):
        while True:
            with self.lock:
                while not self.closed and self.pending is None:
                    self.lock.wait()
                if self.closed:
                    return
                (future, fn), self.pending = self.pending, None
                if not future.set_running_or_notify_cancel():
                    continue
                self.running = future
            with self.busy:
                try:
                    if future.cancel_requested:
                        raise _Cancelled()
                    future.set_result(fn(future))
                except _Cancelled:
                    future.set_exception(CancelledError("superseded by a final request"))
                except BaseException as e:  # delivered to whoever waits on the future
                    future.set_exception(e)
                finally:
                    with self.lock:
                        self.running = None

    def close(self):
        with self.lock:
            self.closed = True
            if self.pending is not None:
                self.pending[0].cancel()
            self.lock.notify()
        self.thread.join()


class EditSession:
    def __init__(self, image, pipeline, steps: int = 20, preview_steps: int = 4, resolution: int | None = None,
                 preview_resolution: int | None = None, seed: int = 0):
        from editrt.runtime.elements_pipeline import ElementsPipeline
        from editrt.runtime.reposition import RepositionPipeline

        if not isinstance(pipeline, (RepositionPipeline, ElementsPipeline)):
            raise InputError(f"pipeline: expected a RepositionPipeline or an ElementsPipeline, got {type(pipeline).__name__}")
        self.rgb, self.pipeline, self.seed = as_rgb(image), pipeline, seed
        self.kind = "reposition" if isinstance(pipeline, RepositionPipeline) else "elements"
        full = resolution or pipeline.default_resolution
        low = preview_resolution or max(8, (full // 2) // 8 * 8)
        self.final_quality, self.preview_quality = Quality(steps, full), Quality(preview_steps, low)
        self.subject: np.ndarray | None = None
        self.cache: dict = {}  # the pipeline's memo of passes that an edit does not change
        self._worker = _Worker()
        # What every edit needs, computed once (on the worker, like all GPU work); independent parts
        # overlap on separate CUDA streams.
        if self.kind == "reposition":
            embeds = [lambda task=task: pipeline.prompt_embeds(task, False) for task in ("remove", "harmonize")]
            self._worker.final(lambda f: overlap(pipeline.device, lambda: pipeline.segmenter.embedding(self.rgb),
                                                 *embeds))
            self.elements = None
        else:
            results = self._worker.final(lambda f: overlap(pipeline.device,
                                                           lambda: pipeline.partition(self.rgb, resolution=full),
                                                           lambda: pipeline.prompt_embedding("")))
            self.elements, self.original = results[0], results[0].copy()

    # ------------------------------------------------------------------ reposition
    def select(self, points=None, labels=None, box=None, mask=None) -> np.ndarray:
        """The subject, from SAM prompts (cached embedding) or a mask."""
        if self.kind != "reposition":
            raise InputError("select: only a repositioning session has a subject")
        if mask is not None:
            from editrt.runtime.images import as_mask

            self.subject = as_mask(mask, self.rgb.shape[:2], "mask")
        else:
            self.subject = self._worker.final(
                lambda f: self.pipeline.segment(self.rgb, points=points, labels=labels, box=box))
        return self.subject

    # ------------------------------------------------------------------ both
    def _job(self, quality: Quality, edit: dict):
        def run(future: Future):
            def check(_step):
                if future is not None and future.cancel_requested:
                    raise _Cancelled()

            with torch.no_grad():
                if self.kind == "reposition":
                    if self.subject is None:
                        raise InputError("preview/final: select the subject first (select(points=...) or mask=)")
                    return self.pipeline(self.rgb, mask=self.subject, steps=quality.steps, resolution=quality.resolution,
                                         seed=self.seed, cache=self.cache, step_callback=check, **edit)
                h, w = self.elements.image_size
                scale = quality.resolution / min(h, w)
                size = (max(8, round(h * scale / 8) * 8), max(8, round(w * scale / 8) * 8))
                return self.pipeline.decode(self.elements, steps=quality.steps, seed=self.seed, size=size,
                                            step_callback=check, **edit)
        return run

    def preview(self, **edit) -> Future:
        """A fast, low-resolution result of `edit`, computed in the background; a newer preview replaces it."""
        return self._worker.preview(self._job(self.preview_quality, edit))

    def final(self, **edit):
        """The full-quality result of `edit`; previews in flight are dropped, so this never waits on one."""
        return self._worker.final(self._job(self.final_quality, edit))

    def reset(self) -> None:
        """Undo the elements edits (elements sessions)."""
        if self.elements is not None:
            self.elements = self.original.copy()

    def close(self) -> None:
        self._worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
