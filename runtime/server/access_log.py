"""The access log's redaction: request lines are logged without their query strings."""
from __future__ import annotations

import logging


class RedactQuery(logging.Filter):
    """An access-log filter: the request line without its query string (a token given as ?token= never
    reaches a log line). uvicorn's access records carry (client, method, path?query, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?<redacted>", *args[3:])
        return True
