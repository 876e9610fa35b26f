"""The server's refusal: an HTTP status, the request field it is about and a one-line message.

The app turns an `APIError` into the JSON error body (schemas.ErrorBody); routers translate the library's
`EditError.field` into their own field names (routers/common.run).
"""
from __future__ import annotations


class APIError(Exception):
    """A request the server refuses: HTTP `status`, the request `field` it is about, a one-line `message`."""

    def __init__(self, status: int, field: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}
