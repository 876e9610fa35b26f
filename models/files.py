"""Files: reading weights with errors that name the file and what was expected, and writing any
output atomically (DESIGN.md contract 5: nothing on disk is left half-written).

The one atomic writer: `write_atomic` for a file, `write_dir_atomic` for a folder (both write a
temporary sibling, then rename it into place).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from editrt.errors import InputError, WeightsError


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise WeightsError(f"{path}: missing; expected {what}", field="weights")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})", field="weights") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object ({what})", field="weights")
    return data


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"{path}: missing; expected {what}", field="weights")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})", field="weights") from None


def load_diffusers(cls, folder: Path, what: str, dtype: torch.dtype = torch.float32):
    """`cls.from_pretrained(folder)` for a diffusers model folder (config.json + safetensors), offline."""
    folder = Path(folder)
    read_json(folder / "config.json", f"the diffusers config of the {what}")
    if not any(folder.glob("diffusion_pytorch_model*.safetensors")) and not any(folder.glob("diffusion_pytorch_model*.bin")):
        raise WeightsError(f"{folder}: no diffusion_pytorch_model.safetensors; expected the {what} weights", field="weights")
    try:
        return cls.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, SafetensorError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{folder}: cannot load the {what} ({first})", field="weights") from None


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it over `path` (0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_dir_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary sibling folder of `path`, then rename it to `path`.

    `path` must not exist or be an empty folder (which is replaced); on any failure the temporary
    folder is removed and `path` is left as it was.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"{path}: already exists and is not empty; choose a new directory", field="path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if path.exists():
            path.rmdir()
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
