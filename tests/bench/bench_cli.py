"""`editrt bench` in-process for the bench tests: few repeats, and its exit code and stderr."""
from __future__ import annotations

import contextlib
import io

from editrt.bench.cli import main

FAST = ["--repeats", "2", "--warmup", "1", "--steps", "2", "--quiet"]


def run_cli(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()
