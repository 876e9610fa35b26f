"""Triton autotune results that survive the process: one JSON file per kernel and GPU identity.

Triton's autotuner benchmarks every candidate config the first time it sees a tuning key (sizes
and dtypes) in a process; a server restart or each CLI run would pay that again. `persisted()`
wraps a launch: before it, the autotuner's in-memory table is seeded from the file; after it, new
winners are written back. The file lives in the user cache folder ($EDITRT_CACHE, else
~/.cache/editrt) under autotune/, never in the package folder, and its name hashes everything a
winner depends on: GPU name and compute capability, torch / Triton / CUDA versions, the kernel's
source (Triton's `cache_key`) and its candidate list. Writes are atomic (temp file + rename); a
corrupt or foreign file is ignored with a warning (the autotuner then simply benchmarks again).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

FORMAT = 1
_lock = threading.Lock()


def size_bucket(n: int) -> int:
    """A size as an autotune key sees it: the next power of two, at least 16.

    Kernels key their autotuning on these buckets, not on exact sizes, so a new element count or image
    size in a bucket that was tuned reuses its winner instead of benchmarking every config again. Every
    config is correct at every size (the kernels mask their tails), so only speed can differ, and sizes
    within a factor of two favour the same tiles. Always >= 16 and a power of two, so Triton sees the
    same integer specialization (divisible by 16) for every bucket: no extra compiles.
    """
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def cache_root() -> Path:
    root = os.environ.get("EDITRT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "editrt"


def device_identity(device: torch.device) -> dict:
    """What a tuning result depends on besides the kernel: the GPU and the software stack."""
    import triton

    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}",
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}


def _config_dict(config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": config.num_ctas, "maxnreg": config.maxnreg}


def cache_file(kernel_name: str, identity: dict, source_key: str, configs) -> Path:
    """The file for one kernel on one GPU identity; any change of the inputs gives another name."""
    material = json.dumps({"format": FORMAT, "identity": identity, "source": source_key,
                           "configs": [_config_dict(c) for c in configs]}, sort_keys=True)
    digest = hashlib.sha256(material.encode()).hexdigest()[:20]
    return cache_root() / "autotune" / f"{kernel_name}-{digest}.json"


def load(path: Path) -> list[tuple[tuple, dict]]:
    """(tuning key, config dict) pairs from `path`; [] (with a warning) if it is unreadable."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
            raise ValueError("not an editrt autotune file")
        entries = []
        for entry in data["entries"]:
            key, config = entry["key"], entry["config"]
            if not isinstance(key, list) or not isinstance(config, dict) or not isinstance(config.get("kwargs"), dict):
                raise ValueError("malformed entry")
            entries.append((tuple(key), config))
        return entries
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path}: ignoring the autotune cache ({e}); configs will be benchmarked again",
                      RuntimeWarning, stacklevel=2)
        return []


def save(path: Path, entries: list[tuple[tuple, dict]]) -> None:
    """Write `entries` atomically: a reader sees the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": FORMAT, "entries": [{"key": list(k), "config": c} for k, c in entries]}, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def seed(autotuner, path: Path) -> int:
    """Put the winners stored in `path` into `autotuner.cache`; only configs it still has. Returns how many."""
    by_dict = {json.dumps(_config_dict(c), sort_keys=True): c for c in autotuner.configs}
    seeded = 0
    for key, config in load(path):
        known = by_dict.get(json.dumps(config, sort_keys=True))
        if known is not None and key not in autotuner.cache:
            autotuner.cache[key] = known
            seeded += 1
    return seeded


def store(autotuner, path: Path) -> None:
    """Merge the autotuner's winners into `path` (entries from other processes are kept)."""
    entries = dict(load(path))
    entries.update({tuple(k): _config_dict(c) for k, c in autotuner.cache.items()})
    save(path, sorted(entries.items(), key=repr))


def _source_key(autotuner) -> str:
    """Triton's hash of the kernel's source and everything it calls; the plain source under the interpreter."""
    fn = autotuner.fn
    key = getattr(fn, "cache_key", None)
    if key is None:
        key = hashlib.sha256(inspect.getsource(fn.fn).encode()).hexdigest()
    return key


@contextmanager
def persisted(autotuner, kernel_name: str, device: torch.device):
    """Around one launch of `autotuner` on `device`: seed from disk first, store new winners after."""
    if device.type != "cuda" or len(autotuner.configs) < 2:
        yield
        return
    with _lock:
        seeded = autotuner.__dict__.setdefault("_editrt_cache_files", {})  # device -> the file it was seeded from
        path = seeded.get(str(device))
        if path is None:
            path = cache_file(kernel_name, device_identity(device), _source_key(autotuner), autotuner.configs)
            seed(autotuner, path)
            seeded[str(device)] = path
        before = len(autotuner.cache)
    yield
    with _lock:
        if len(autotuner.cache) != before:
            store(autotuner, path)
