"""A real server for the tests: the app over the tiny pipelines, on uvicorn, on a free loopback port.

`start_server(...)` runs uvicorn in a background thread with a socket bound to 127.0.0.1:0 and
stops it (lifespan shutdown: sessions closed) when the `with` block ends, even on failure.
"""
from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from dataclasses import dataclass
from importlib import resources

import numpy as np
import uvicorn
from PIL import Image

from editrt.runtime.server import Settings, create_app

TEST_SETTINGS = dict(final_steps=2, preview_steps=1, warmup=False, max_upload_bytes=2 << 20, max_pixels=1 << 20)


@dataclass
class LiveServer:
    url: str
    app: object
    thread: threading.Thread
    server: object = None

    def stop(self, timeout: float = 30) -> None:
        """uvicorn's graceful shutdown (what SIGTERM does), waiting until it is done."""
        self.server.should_exit = True
        self.thread.join(timeout=timeout)

    @property
    def state(self):
        return self.app.state.editrt

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http"):]


@contextlib.contextmanager
def start_server(reposition=None, elements=None, graceful_s: float | None = None, access_log: bool = False,
                 **settings):
    """`graceful_s`: uvicorn's timeout_graceful_shutdown (None: wait for every request, uvicorn's default).
    `access_log`: uvicorn configured as `editrt serve` configures it (access log on, query strings redacted)."""
    app = create_app(reposition=reposition, elements=elements, settings=Settings(**{**TEST_SETTINGS, **settings}))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if access_log:
        from editrt.runtime.server.cli import uvicorn_config

        config = uvicorn_config(app, "127.0.0.1", port, quiet=False, settings=app.state.editrt.settings)
        config.timeout_graceful_shutdown = graceful_s
    else:
        config = uvicorn.Config(app, log_level="warning", lifespan="on", ws_max_size=2 << 20,
                                timeout_graceful_shutdown=graceful_s)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield LiveServer(f"http://127.0.0.1:{port}", app, thread, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the test server did not stop"


def small_photo(width: int = 120, height: int = 80) -> np.ndarray:
    """The bundled photograph (editrt/assets/chelsea.png), resized: a real photo, small enough for CPU."""
    with resources.as_file(resources.files("editrt").joinpath("assets", "chelsea.png")) as path:
        return np.asarray(Image.open(path).convert("RGB").resize((width, height), Image.BILINEAR))


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def b64png(array: np.ndarray) -> str:
    return base64.b64encode(png(array)).decode()


def decode(data: bytes | str, mode: str = "RGB") -> np.ndarray:
    if isinstance(data, str):
        data = base64.b64decode(data)
    return np.asarray(Image.open(io.BytesIO(data)).convert(mode))


