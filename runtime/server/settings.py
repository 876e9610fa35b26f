"""The server's settings: every limit that bounds the memory or time a single request can take, and its defaults."""
from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class Settings:
    """Limits and defaults. Every limit bounds memory or time a single request can take."""

    token: str | None = None  # bearer token; None = no authentication (only safe on loopback)
    max_upload_bytes: int = 16 * 1024 * 1024  # a whole request body
    max_pixels: int = 4096 * 4096  # width x height of any image, checked from the header before decoding
    max_side: int = 8192
    max_points: int = 64
    max_steps: int = 100
    # the cost model (cost.py): what a request's declared sizes may make the server do, checked before any work
    max_resolution: int = 2048  # processing short side a request may ask for (`resolution`)
    max_work_pixels: int = 2048 * 2048  # the processing canvas (H x W) of a denoising pass or a partition
    max_pixel_steps: int = 1024 * 1024 * 50  # canvas pixels x denoising steps of one pass
    max_elements: int = 4096  # elements in an elements blob
    max_elements_bytes: int = 64 * 1024 * 1024  # an elements blob's npz, uncompressed (its members' declared sizes)
    max_region_pixels: int = 64 * 1024 * 1024  # all alive elements' (scaled) regions together, pixels
    ws_per_session: int = 4  # drag WebSockets open on one session at a time
    read_timeout_s: float = 30.0  # a request body must arrive within this (408 after)
    # Host names a request may name (None: loopback names when there is no token, any with one) and page
    # origins besides the server's own (Origin must equal the Host, else 403)
    allowed_hosts: tuple[str, ...] | None = None
    allowed_origins: tuple[str, ...] = ()
    max_sessions: int = 16  # LRU cap: the least recently used session is closed beyond it
    session_ttl_s: float = 15 * 60  # idle sessions are closed after this
    session_bytes: int = 1024 * 1024 * 1024  # byte budget of all sessions together (images, masks, caches)
    history: int = 8  # undo depth per session
    queue_size: int = 32  # jobs waiting per pipeline before the server answers 503
    retry_after_s: int = 1
    final_steps: int = 20  # session defaults (a request may ask for fewer or more, up to max_steps)
    preview_steps: int = 4
    resolution: int | None = None  # session processing resolution (None: the model's)
    preview_resolution: int | None = None
    warmup: bool = True  # run one small request through each pipeline before /readyz says ready
    weights: str = ""  # shown by /readyz
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, **overrides) -> Settings:
        settings = cls(**overrides)
        if settings.token is None and os.environ.get("EDITRT_TOKEN"):
            settings.token = os.environ["EDITRT_TOKEN"]
        return settings
