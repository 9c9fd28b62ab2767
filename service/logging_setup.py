"""Structured logs: one JSON object per line, so a log pipeline can index requests.

Request lines carry ``request_id``, ``model``, ``method``, ``code`` and
``latency_ms`` (never payloads: no tensors, images or tokens); failures carry the
traceback in ``traceback``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Fields a log call may attach with ``extra=``; anything else is dropped, so a
# careless ``extra`` cannot leak a payload into the logs.
FIELDS = (
    "event",
    "request_id",
    "model",
    "version",
    "method",
    "code",
    "latency_ms",
    "queue_ms",
    "forward_passes",
    "backward_passes",
    "peer",
    "reason",
    "port",
    "metrics_port",
    "models_ready",
    "error",
)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line with a fixed set of fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", log_format: str = "json") -> None:
    """Sends the root logger to stderr in the chosen format (replacing earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
