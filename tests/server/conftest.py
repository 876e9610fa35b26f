"""Fixtures for the server tests; the server itself is started by serving.start_server."""
from __future__ import annotations

import pytest
from needs import need

need("fastapi", reason="the serve extra is not installed (pip install editrt[serve])")
need("uvicorn", reason="the serve extra is not installed (pip install editrt[serve])")
need("httpx", reason="httpx is not installed (pip install editrt[dev])")

from serving import small_photo, start_server  # noqa: E402


@pytest.fixture(scope="module")
def server(reposition, elements_pipe):
    with start_server(reposition, elements_pipe) as live:
        yield live


@pytest.fixture(scope="module")
def photo_small():
    return small_photo()
