"""Test dependencies (server, browser, deploy tests): skipped where absent, except in CI.

`.ci/run` (CI=true) installs every one of them (the dev extra, Debian's chromium), so there a
missing dependency is a broken install and must fail the run, never turn into a silent skip.
"""
from __future__ import annotations

import importlib
import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(module: str, reason: str):
    """The imported module; skips (outside CI) with `reason` when it is not installed."""
    if IN_CI:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason)


def need_file(path: str, reason: str) -> None:
    if os.path.exists(path):
        return
    if IN_CI:
        raise FileNotFoundError(f"{path}: {reason}; .ci/run installs it")
    pytest.skip(f"{path}: {reason}", allow_module_level=True)
