"""Files: reading weights with errors that name the file and what was expected, and writing any
output atomically (DESIGN.md contract 5: nothing on disk is left half-written).

The atomic writers: `write_atomic` for a file, `write_dir_atomic` for a new folder (both write a
temporary sibling, then rename it into place), `replace_dir` for a folder that may already exist and
`publish_folders` for several folders of one parent that must change together (both swap with one
atomic exchange where Linux has it).
"""
from __future__ import annotations

import ctypes
import errno
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


def replace_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into a temporary sibling, then put it in place of `path`, which may exist: one atomic
    exchange (Linux renameat2 RENAME_EXCHANGE), so a crash leaves the old folder or the new one, never none; the
    old tree is removed after. Without the exchange, the old folder is moved aside first (a crash between the
    two renames leaves it beside as `.NAME.old`). A failed write leaves `path` as it was. A linked `path` stays
    a link: the folder it points to is replaced."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()

    def fill(staged: Path) -> None:
        write(staged)
        os.chmod(staged, 0o755)

    _swap_in(_staged(path, fill), path)
    return path


def publish_folders(parent: Path, writers: dict) -> None:
    """Replace the folders `writers` names inside `parent` ({name: write(tmp)}) all together: a crash at any
    point leaves `parent` as it was or with every one of them new, never a mix and never without them.

    Two folders cannot be swapped in by one rename each (a crash between the renames leaves one new and one
    old), so `parent` itself is swapped: a sibling is staged with every other entry of `parent` hard-linked into
    it (no data copied; copied where the file system cannot link) and each named folder written fresh, then the
    sibling and `parent` are exchanged in one atomic step (Linux renameat2 RENAME_EXCHANGE), and the old tree,
    now the sibling, is removed. Without `parent` yet, the staged folder is renamed to it (one rename). Where the
    file system has no exchange, `parent` is moved aside and the staged one renamed in (a crash between those
    two renames leaves no `parent`, and the complete old tree beside it as `.NAME.old`). A failed write leaves
    `parent` as it was."""
    parent = Path(parent)
    if parent.is_symlink():  # a weights folder linked from elsewhere: publish where it points, keep the link
        parent = parent.resolve()

    def fill(staged: Path) -> None:
        if parent.exists():
            for entry in parent.iterdir():
                if entry.name not in writers:
                    _link_tree(entry, staged / entry.name)
            shutil.copystat(parent, staged)
        else:
            os.chmod(staged, 0o755)
        for name, write in writers.items():
            folder = staged / name
            folder.mkdir()
            write(folder)
            os.chmod(folder, 0o755)

    _swap_in(_staged(parent, fill), parent)


def _staged(path: Path, fill: Callable[[Path], None]) -> Path:
    """A temporary sibling of `path`, filled by `fill`; removed again if filling fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def _swap_in(staged: Path, path: Path) -> None:
    """Put the finished folder `staged` in place of `path` (see replace_dir), then remove the old tree. If the
    swap itself fails, `path` is as it was and the staged copy is removed (no full copy left beside it)."""
    try:
        if not path.exists():
            staged.rename(path)
            return
        if not _exchange(staged, path):  # the one step that publishes: before it the old tree, after it the new
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            try:
                staged.rename(path)
            except BaseException:
                old.rename(path)
                raise
            staged = old
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    shutil.rmtree(staged, ignore_errors=True)  # the old tree


def _link_tree(source: Path, target: Path) -> None:
    """`source` (a file, folder or symlink) at `target`: files hard-linked (copied where linking fails)."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        shutil.copytree(source, target, symlinks=True, copy_function=link)
    else:
        link(source, target)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap paths `a` and `b` atomically (Linux renameat2 with RENAME_EXCHANGE; folders may be non-empty).
    False where the C library or the file system has no such call; any other failure raises OSError."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap in the new folder: {os.strerror(err)}", str(a), None, str(b))
