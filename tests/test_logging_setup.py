"""The log writer thread: lines arrive whole and in order, a stalled stderr never blocks a
caller, and lines dropped meanwhile are counted in the log."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Iterator

import pytest

from saliency_service.serving import logging_setup


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Restores the root logger (pytest's own capture handlers) after ``configure``."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    logging_setup.stop_writer()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


class StalledStream(io.StringIO):
    """A stderr whose writes wait until ``release`` is set, like a pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(30)
        return super().write(text)


@pytest.fixture
def stalled(monkeypatch: pytest.MonkeyPatch, root_logging: None) -> StalledStream:
    """Logging configured onto a stalled stderr, with room for four queued lines."""
    stream = StalledStream()
    monkeypatch.setattr(sys, "stderr", stream)
    logging_setup.configure("INFO", "json", queue_lines=4)
    return stream


def messages_of(stream: io.StringIO) -> list[str]:
    return [json.loads(line)["message"] for line in stream.getvalue().splitlines()]


def test_lines_are_written_by_the_writer_thread_with_tracebacks(
    monkeypatch: pytest.MonkeyPatch, root_logging: None
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    logging_setup.configure("INFO", "json")
    log = logging.getLogger("service.test")
    arguments = ["predict"]
    log.info("request %s", arguments, extra={"event": "request", "model": "demo"})
    arguments.append("changed after the call")  # the line keeps what was logged
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.exception("failed %d", 3)
    log.debug("below the level")
    logging_setup.stop_writer()  # writes what is queued
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["request ['predict']", "failed 3"]
    assert lines[0]["event"] == "request" and lines[0]["model"] == "demo"
    assert "ZeroDivisionError: division by zero" in lines[1]["traceback"]


def test_a_stalled_stderr_drops_and_counts_lines_instead_of_blocking(
    stalled: StalledStream,
) -> None:
    stream = stalled
    log = logging.getLogger("service.test")
    caller = threading.Thread(target=lambda: [log.info("line %d", i) for i in range(50)])
    caller.start()
    caller.join(20)
    assert not caller.is_alive(), "logging blocked on a stalled stderr"
    assert stream.getvalue() == ""  # nothing could be written yet
    stream.release.set()
    logging_setup.stop_writer()  # writes the queued lines, then the count of the dropped
    messages = messages_of(stream)
    kept = [m for m in messages if m.startswith("line ")]
    assert 0 < len(kept) <= 8  # a batch being written (at most the four queued), four more
    assert kept == [f"line {i}" for i in range(len(kept))]
    assert messages[len(kept):] == [
        f"{50 - len(kept)} log lines dropped: stderr did not keep up"]


def test_the_first_line_after_a_stall_says_how_many_were_dropped(
    stalled: StalledStream,
) -> None:
    stream = stalled
    log = logging.getLogger("service.test")
    for i in range(20):
        log.info("line %d", i)
    stream.release.set()
    writer = logging_setup._writer
    assert writer is not None
    for _ in range(3000):  # until the writer has drained the queue (at most 30 s)
        if writer.lines.empty():
            break
        threading.Event().wait(0.01)
    log.info("after the stall")
    logging_setup.stop_writer()
    messages = messages_of(stream)
    kept = [m for m in messages if m.startswith("line ")]
    assert messages == [*kept, f"{20 - len(kept)} log lines dropped: stderr did not keep up",
                        "after the stall"]
