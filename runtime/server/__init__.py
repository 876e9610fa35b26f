"""`editrt serve`: the FastAPI server and browser editor over the editing pipelines (see app.py)."""
from editrt.runtime.server.app import create_app
from editrt.runtime.server.settings import Settings

__all__ = ["create_app", "Settings"]
