"""The old import path of the names that moved to errors.py, settings.py, access_log.py and image_codecs.py.

Kept only for the modules other branches are rewriting (server/cli.py, ray_deployment.py, sessions.py,
routers/sessions.py); once they import from the new modules this file is deleted.
"""
from editrt.runtime.server.access_log import RedactQuery
from editrt.runtime.server.errors import APIError
from editrt.runtime.server.image_codecs import png_b64
from editrt.runtime.server.settings import Settings

__all__ = ["APIError", "RedactQuery", "Settings", "png_b64"]
