"""Stage 2 publishes `unet/` and `element_adapter/` together (models/files.publish_folders): a crash at
any step leaves the folder with both old or both new, never one of each and never without them.

A crash is simulated for real, at every step in turn: from the k-th file-system change the publish makes
(rename, exchange, link, removal, seen through Python's audit hooks) on, every change fails, its clean-up
included, as if the process had died there. What is on disk is then read back.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from editrt.models import files
from editrt.models.files import _exchange, publish_folders, replace_dir

# the audit events of the calls that change what a reader of the folder sees (os.replace raises "os.rename";
# os.unlink "os.remove"; the exchange is a ctypes call)
CHANGES = {"os.rename", "os.remove", "os.rmdir", "os.link", "os.symlink", "shutil.rmtree", "ctypes.call_function"}


class Crash(BaseException):
    """The simulated death of the process (a BaseException: no `except Exception` handles it)."""


class _Crasher:
    """One audit hook for the whole test session (a hook cannot be removed); armed, it counts the changes the
    arming thread makes and fails the k-th and every one after it (clean-ups too, as after a real crash)."""

    def __init__(self):
        self.thread, self.at, self.seen = None, None, 0
        sys.addaudithook(self.hook)

    def arm(self, at: int) -> None:
        self.thread, self.at, self.seen = threading.get_ident(), at, 0

    def disarm(self) -> None:
        self.thread = None

    def hook(self, event, args):
        if self.thread is None or event not in CHANGES or threading.get_ident() != self.thread:
            return
        self.seen += 1
        if self.seen >= self.at:
            raise Crash(f"crashed at change {self.at} ({event})")


_CRASHER = None


def crasher() -> _Crasher:
    global _CRASHER
    if _CRASHER is None:
        _CRASHER = _Crasher()
    return _CRASHER


def old_tree(root: Path) -> Path:
    parent = root / "elements"
    for name in ("unet", "element_adapter"):
        (parent / name).mkdir(parents=True)
        (parent / name / "version.txt").write_text("old")
    (parent / "vae").mkdir()
    (parent / "vae" / "weights.bin").write_bytes(b"frozen vae")
    (parent / "scheduler.json").write_text("{}")
    return parent


def writer(name: str):
    def write(folder: Path) -> None:
        (folder / "version.txt").write_text("new")
        (folder / f"{name}.bin").write_bytes(name.encode())
    return write


WRITERS = {"unet": writer("unet"), "element_adapter": writer("element_adapter")}


def pair(parent: Path) -> tuple:
    return tuple((parent / name / "version.txt").read_text() if (parent / name / "version.txt").is_file() else None
                 for name in ("unet", "element_adapter"))


def exchange_supported(tmp_path: Path) -> bool:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir(), b.mkdir()
    try:
        return _exchange(a, b)
    finally:
        a.rmdir(), b.rmdir()


def crash_at_each_step(tmp_path: Path, prepare, publish, check) -> tuple[Path, bool]:
    """For k = 1, 2, ...: prepare(root) in a fresh root, publish(what prepare returned) crashing at the k-th
    change, check(it, k) what is on disk; until a publish finishes. Returns (the last root, whether it crashed)."""
    if not exchange_supported(tmp_path):
        pytest.skip(f"{tmp_path}: this file system has no renameat2 RENAME_EXCHANGE (the two-rename fallback runs)")
    for at in range(1, 100):
        root = tmp_path / f"crash-{at}"
        target = prepare(root)
        crasher().arm(at)
        try:
            publish(target)
            crashed = False
        except Crash:
            crashed = True
        finally:
            crasher().disarm()
        check(target, at)
        if not crashed:
            break
    return root, crashed


def test_a_crash_at_any_step_leaves_both_folders_old_or_both_new(tmp_path):
    outcomes = []

    def check(parent: Path, at: int) -> None:
        outcomes.append(pair(parent))
        assert pair(parent) in (("old", "old"), ("new", "new")), (at, pair(parent))
        assert (parent / "vae" / "weights.bin").read_bytes() == b"frozen vae"  # the other entries, as they were
        assert (parent / "scheduler.json").read_text() == "{}"

    root, crashed = crash_at_each_step(tmp_path, old_tree, lambda parent: publish_folders(parent, WRITERS), check)
    assert outcomes[-1] == ("new", "new") and not crashed, "the publish never finished"
    assert ("old", "old") in outcomes and outcomes.count(("new", "new")) >= 2  # crashes before and after the swap
    assert sorted(p.name for p in root.iterdir()) == ["elements"]  # finished: nothing staged is left


def test_the_other_entries_are_linked_not_copied_a_first_publish_creates_the_folder_and_a_link_stays(tmp_path):
    parent = old_tree(tmp_path)
    vae = os.stat(parent / "vae" / "weights.bin")
    publish_folders(parent, WRITERS)
    assert pair(parent) == ("new", "new") and (parent / "unet" / "unet.bin").read_bytes() == b"unet"
    assert not (parent / "unet" / "element_adapter.bin").exists()
    assert os.stat(parent / "vae" / "weights.bin").st_ino == vae.st_ino  # the frozen weights: no data copied
    fresh = tmp_path / "fresh" / "elements"
    publish_folders(fresh, WRITERS)
    assert pair(fresh) == ("new", "new") and sorted(p.name for p in fresh.parent.iterdir()) == ["elements"]
    linked = tmp_path / "linked"
    linked.symlink_to(old_tree(tmp_path / "elsewhere"))  # a weights folder linked from another disk stays a link
    publish_folders(linked, WRITERS)
    assert linked.is_symlink() and pair(tmp_path / "elsewhere" / "elements") == ("new", "new")


def test_a_failing_writer_leaves_the_old_folders_and_nothing_staged(tmp_path):
    parent = old_tree(tmp_path)

    def not_a_folder(folder: Path) -> None:  # a real failure: the file to write is a folder
        (folder / "config.json").mkdir()
        (folder / "config.json").write_text("{}")

    with pytest.raises(IsADirectoryError):
        publish_folders(parent, {"unet": WRITERS["unet"], "element_adapter": not_a_folder})
    assert pair(parent) == ("old", "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elements"]


def test_without_the_exchange_the_old_folder_is_moved_aside_and_removed(tmp_path, monkeypatch):
    """A file system without RENAME_EXCHANGE: `parent` is moved aside, the staged one renamed in, the old removed."""
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # the platform's answer, not the publish
    parent = old_tree(tmp_path)
    publish_folders(parent, WRITERS)
    assert pair(parent) == ("new", "new") and (parent / "vae" / "weights.bin").read_bytes() == b"frozen vae"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elements"]


def test_replace_dir_crashed_at_any_step_leaves_the_old_folder_or_the_new_never_none(tmp_path):
    """Stage 1's content encoder folder (models/files.replace_dir): one folder that already exists."""
    seen = []

    def prepare(root: Path) -> Path:
        (root / "content_encoder").mkdir(parents=True)
        (root / "content_encoder" / "version.txt").write_text("old")
        return root / "content_encoder"

    def check(folder: Path, at: int) -> None:
        assert (folder / "version.txt").is_file(), (at, sorted(p.name for p in folder.parent.iterdir()))
        seen.append((folder / "version.txt").read_text())

    root, crashed = crash_at_each_step(tmp_path, prepare, lambda folder: replace_dir(folder, writer("content_encoder")),
                                       check)
    # (the exchange itself is a ctypes call no audit hook sees: every crash counted here comes after it or
    # in the two-rename fallback, which the assertion above catches: the folder moved aside, none in place)
    assert seen[-1] == "new" and not crashed
    assert sorted(p.name for p in root.iterdir()) == ["content_encoder"]


def test_replace_dir_keeps_a_link_and_a_failed_swap_leaves_no_staged_copy(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere" / "content_encoder"
    target.mkdir(parents=True)
    (target / "version.txt").write_text("old")
    link = tmp_path / "weights" / "content_encoder"
    link.parent.mkdir()
    link.symlink_to(target)  # a folder linked from another disk stays a link; the folder it points to is replaced
    replace_dir(link, writer("content_encoder"))
    assert link.is_symlink() and (target / "version.txt").read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["content_encoder"]

    def refused(a, b):  # the kernel refusing the exchange (the platform's answer, not the code under test)
        raise OSError(13, "Permission denied", str(a), None, str(b))

    monkeypatch.setattr(files, "_exchange", refused)
    with pytest.raises(OSError):
        replace_dir(target, writer("content_encoder"))
    assert (target / "version.txt").read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["content_encoder"]  # no staged copy left beside it
