"""A pytest plugin that appends one JSON line per finished test to a file, as the run goes.

    python -m pytest tests -m gpu -p editrt.bench.pytest_stream --stream-jsonl OUT/pytest-gpu.jsonl

pytest's junit XML is written only when the session ends, so a run killed by its time limit (or by the end
of a GPU lease) leaves none; this file keeps every test finished before the kill, and a "start" line names
the test that was running. bench/gpu_validate.sh passes it with `-p` (no conftest.py change).

Lines (one JSON object each, appended with one write() and flushed):

    {"event": "start", "nodeid": ...}
    {"event": "test", "nodeid", "outcome": passed|failed|skipped|error, "when": setup|call|teardown,
     "seconds", "message": first line of the failure or the skip reason, "exception": its type name or null,
     "missing": the absent module or file, or null}
    {"event": "collect", "nodeid": the file, "outcome": "error", "message", "exception", "missing"}
    {"event": "end", "exitstatus": ...}

`missing` is filled where a test or a test file could not run because a dependency is absent: a
ModuleNotFoundError for a module outside editrt, a FileNotFoundError (tests/needs.py `need_file`), or a skip
whose reason says so (pytest.importorskip: "could not import ...", a reason saying "not installed", or an
onnxruntime without the CUDAExecutionProvider).
"""
from __future__ import annotations

import json
import os
import re

import pytest

MISSING_SKIP = re.compile(r"could not import '([\w.]+)'|No module named '([\w.]+)'|(\S+) (?:is )?not installed"
                          r"|(?:without|no) (CUDAExecutionProvider)")
MISSING_ERROR = re.compile(r"(ModuleNotFoundError|FileNotFoundError): (.*)")
NO_MODULE = re.compile(r"No module named '([\w.]+)'")


def pytest_addoption(parser):
    parser.addoption("--stream-jsonl", metavar="PATH", default=None,
                     help="append one JSON line per finished test to PATH as the run goes (editrt.bench.pytest_stream)")


def pytest_configure(config):
    path = config.getoption("--stream-jsonl")
    if path:
        config.pluginmanager.register(StreamWriter(path), "editrt-stream-jsonl")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def missing_from_skip(reason: str) -> str | None:
    found = MISSING_SKIP.search(reason)
    return next((g for g in found.groups() if g), None) if found else None


def missing_from_error(text: str) -> tuple[str | None, str | None]:
    """(exception type, the absent module or file) from a failure's text; a missing editrt module is a bug, not
    an absent dependency."""
    found = MISSING_ERROR.findall(text)
    if not found:
        return None, None
    kind, message = found[-1][0], found[-1][1].strip()  # the last: the exception that ended the traceback
    if kind == "ModuleNotFoundError":
        module = NO_MODULE.search(message)
        name = module.group(1) if module else None
        return kind, None if name is None or name.split(".")[0] == "editrt" else name
    return kind, message.split(":", 1)[0]


class StreamWriter:
    def __init__(self, path: str):
        self.path = path
        self.outcomes: dict[str, dict] = {}

    def write(self, record: dict) -> None:
        with open(self.path, "ab", buffering=0) as f:  # unbuffered: the line is one write() system call
            f.write((json.dumps(record) + "\n").encode())

    def pytest_runtest_logstart(self, nodeid, location):
        self.write({"event": "start", "nodeid": nodeid, "pid": os.getpid()})

    def pytest_runtest_logreport(self, report):
        record = self.outcomes.setdefault(report.nodeid, {
            "event": "test", "nodeid": report.nodeid, "outcome": "passed", "when": "call", "seconds": 0.0,
            "message": None, "exception": None, "missing": None})
        record["seconds"] = round(record["seconds"] + report.duration, 3)
        if report.skipped and record["outcome"] == "passed":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            reason = reason.removeprefix("Skipped: ")
            record.update(outcome="skipped", when=report.when, message=reason, missing=missing_from_skip(reason))
        elif report.failed and record["outcome"] in ("passed", "skipped"):
            text = str(report.longrepr)
            kind, missing = missing_from_error(text)
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else _first_line(text)
            record.update(outcome="failed" if report.when == "call" else "error", when=report.when,
                          message=_first_line(message), exception=kind, missing=missing)

    def pytest_runtest_logfinish(self, nodeid, location):
        record = self.outcomes.pop(nodeid, None)
        if record is not None:
            self.write(record)

    def pytest_collectreport(self, report):
        if report.failed:
            text = str(report.longrepr)
            kind, missing = missing_from_error(text)
            self.write({"event": "collect", "nodeid": report.nodeid, "outcome": "error",
                        "message": _first_line(text.splitlines()[-1] if text else ""), "exception": kind,
                        "missing": missing})

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        self.write({"event": "end", "exitstatus": int(exitstatus)})
