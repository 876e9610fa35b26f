"""A byte-budgeted LRU cache: every cache of the runtime is one of these (DESIGN.md contract 6).

    cache = ByteLRU("sam embeddings", budget_bytes=256 << 20)
    value = cache.get(key)                 # None when absent; a hit becomes the most recently used
    cache.put(key, value, nbytes)          # evicts least recently used entries until within budget
    cache.discard(lambda key: key[0] == token)   # drop a closed session's entries

An entry larger than the whole budget is not stored (it would evict everything and then itself).
Thread-safe on its own, although the pipelines also touch their caches only while holding their
work queue's turn.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch


def nbytes_of(value) -> int:
    """Bytes held by tensors / arrays in `value` (nested tuples, lists, dicts); other objects count 0."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (tuple, list)):
        return sum(nbytes_of(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes_of(v) for v in value.values())
    return 0


class ByteLRU:
    def __init__(self, name: str, budget_bytes: int, on_evict=None):
        if budget_bytes < 0:
            raise ValueError(f"{name}: budget_bytes must be >= 0")
        self.name, self.budget_bytes, self.on_evict = name, int(budget_bytes), on_evict
        self._entries: OrderedDict = OrderedDict()  # key -> (value, nbytes)
        self._lock = threading.RLock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def get(self, key, default=None):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return default
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key, value, nbytes: int | None = None) -> bool:
        """Store `value` (nbytes measured with nbytes_of when not given); False if it exceeds the budget."""
        nbytes = nbytes_of(value) if nbytes is None else int(nbytes)
        with self._lock:
            self._pop(key)
            if nbytes > self.budget_bytes:
                return False
            self._entries[key] = (value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.budget_bytes:
                self._evict(next(iter(self._entries)))
            return True

    def _pop(self, key):
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]
        return entry

    def _evict(self, key) -> None:
        entry = self._pop(key)
        self.evictions += 1
        if self.on_evict is not None and entry is not None:
            self.on_evict(key, entry[0])

    def discard(self, where) -> int:
        """Drop every entry whose key satisfies `where(key)`; returns how many."""
        with self._lock:
            keys = [k for k in self._entries if where(k)]
            for k in keys:
                self._pop(k)
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def values(self) -> list:
        with self._lock:
            return [v for v, _ in self._entries.values()]

    def stats(self) -> dict:
        return {"name": self.name, "entries": len(self._entries), "bytes": self.bytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
