"""Structured logs: one JSON object per line, so a log pipeline can index requests.

Request lines carry ``request_id``, ``model``, ``method``, ``code`` and
``latency_ms`` (never payloads: no tensors, images or tokens); failures carry the
traceback in ``traceback``.

Lines are formatted and written by a background thread: the event loop only queues the
record. Moving the per-request line off the loop took ``Predict``'s service-added time from
0.48 to 0.33–0.35 ms (``python -m benchmarks.latency``), and a stalled stderr (a log
collector that stops reading the pipe) would otherwise stall every call and the health
checks with it. The queue is bounded; when stderr cannot keep up, lines are dropped and
counted, and the next line that gets through says how many.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from typing import Any

QUEUE_LINES = 10_000
BATCH_LINES = 1_000
BATCH_SECONDS = 0.02
STOP_SECONDS = 5.0

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
        elif record.exc_text:  # rendered before the record crossed threads
            entry["traceback"] = record.exc_text
        return json.dumps(entry, default=str)


class QueueingHandler(logging.handlers.QueueHandler):
    """Queues records for the writer thread, with their message and traceback rendered now
    (arguments and tracebacks belong to the caller's frame); a full queue drops and counts."""

    def __init__(self, lines: queue.Queue[Any]) -> None:
        super().__init__(lines)
        self.dropped = 0
        self._lock = threading.Lock()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.args:  # rendering in place changes nothing another handler would see
            record.msg, record.args = record.getMessage(), None
        if record.exc_info:  # a copy: other handlers may still want the live traceback
            record = copy.copy(record)
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        with self._lock:
            try:
                self._put_dropped(None)
                self.queue.put_nowait(record)
            except queue.Full:
                self.dropped += 1

    def put_dropped(self, timeout: float) -> None:
        """Queues the count of dropped lines, waiting up to ``timeout`` for room (at stop,
        when no later line will carry it)."""
        with self._lock:
            self._put_dropped(timeout)

    def _put_dropped(self, timeout: float | None) -> None:
        """A warning with the count of the lines dropped so far, if any (no wait when
        ``timeout`` is None; raises queue.Full when there is no room)."""
        if self.dropped:
            self.queue.put(logging.LogRecord(
                "service.logging", logging.WARNING, __file__, 0,
                f"{self.dropped} log lines dropped: stderr did not keep up", None, None),
                block=timeout is not None, timeout=timeout)
            self.dropped = 0


class Writer:
    """The writer thread of ``queueing``'s lines: it writes what has gathered in one go, then
    rests ``BATCH_SECONDS``, so under load one wake-up and one write serve many lines (waking
    once a line took the GIL from the event loop once a request: the fast path's capacity was
    373–378 against 384–397 requests/s written inline, in one ad hoc A/B run). Stopping waits
    at most ``STOP_SECONDS`` for a stalled stderr, so an exit is never held up for good.
    """

    _STOP = object()

    def __init__(self, queueing: QueueingHandler, handler: logging.StreamHandler[Any]) -> None:
        self.lines = queueing.queue
        self.queueing = queueing
        self.handler = handler
        self.thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            batch = [self.lines.get()]
            while len(batch) < BATCH_LINES:
                try:
                    batch.append(self.lines.get_nowait())
                except queue.Empty:
                    break
            records = [record for record in batch if record is not self._STOP]
            if records:
                self.write(records)
            if len(records) < len(batch):
                return
            time.sleep(BATCH_SECONDS)

    def write(self, records: list[logging.LogRecord]) -> None:
        handler = self.handler
        try:
            text = "".join(handler.format(record) + handler.terminator for record in records)
            handler.acquire()
            try:
                handler.stream.write(text)
                handler.flush()
            finally:
                handler.release()
        except Exception:  # noqa: BLE001 - logging reports its own failures, never raises
            handler.handleError(records[0])

    def stop(self) -> None:
        """Writes what is queued (and the count of dropped lines), then ends the thread."""
        try:
            self.queueing.put_dropped(STOP_SECONDS)
            self.lines.put(self._STOP, timeout=STOP_SECONDS)
        except queue.Full:
            return
        self.thread.join(STOP_SECONDS)


_writer: Writer | None = None


def configure(level: str = "INFO", log_format: str = "json",
              queue_lines: int = QUEUE_LINES) -> None:
    """Sends the root logger to stderr in the chosen format through the writer thread
    (replacing earlier handlers; the lines still queued are written at exit)."""
    global _writer
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    stop_writer()
    queueing = QueueingHandler(queue.Queue(queue_lines))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(queueing)
    root.setLevel(level.upper())
    _writer = Writer(queueing, handler)


def stop_writer() -> None:
    """Writes the queued lines and stops the writer thread (at exit, or before reconfiguring)."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None


atexit.register(stop_writer)
