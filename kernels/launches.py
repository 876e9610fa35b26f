"""Which editrt kernels actually ran: every launcher records its launches here.

The bench uses it to fill a row's `kernels` column with what executed, not what was asked for
(a launcher that falls back to its PyTorch reference records nothing):

    with launches.track() as seen:
        pipe(...)
    seen.names  # e.g. ["dual_attention", "slic_assign"]

Launchers call `record(name)` right where they launch (Triton kernel, native op). Counting is
process-wide and thread-safe; `track()` reports the launches between entering and leaving it.
"""
from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

_lock = threading.Lock()
_counts: Counter = Counter()


def record(name: str) -> None:
    """Count one launch of the kernel `name` (call it where the kernel is really launched)."""
    with _lock:
        _counts[name] += 1


def counts() -> dict[str, int]:
    with _lock:
        return dict(_counts)


@dataclass
class Seen:
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sorted(name for name, n in self.counts.items() if n > 0)


@contextmanager
def track():
    """Yields a `Seen` whose counts are filled, on exit, with the launches made inside the block."""
    before = counts()
    seen = Seen()
    try:
        yield seen
    finally:
        after = counts()
        seen.counts = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0) > 0}
