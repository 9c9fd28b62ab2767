"""Domain errors with messages a person can act on; transports map them to statuses.

Nothing here knows a transport: ``saliency_service.protocol.status`` holds the one table from these
classes to gRPC status codes.
"""

from __future__ import annotations

# Longest message, in UTF-8 bytes. gRPC carries it in a trailer, percent-encoding every byte
# outside printable ASCII, and clients refuse trailers over 8 to 16 KiB (RESOURCE_EXHAUSTED
# in place of the real status): a message that echoes a client's value stays well below.
MAX_MESSAGE_BYTES = 1024


def shorten(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``text`` when its UTF-8 form has at most ``limit`` bytes, else its start and end
    around a note of how much was left out (at most ``limit`` bytes in all)."""
    if len(text) * 4 <= limit or len(text.encode()) <= limit:
        return text
    budget = max(limit - len(f" …[{len(text)} characters left out]… ".encode()), 0)
    head_bytes, tail_bytes = budget - budget // 3, budget // 3
    head = text[:head_bytes].encode()[:head_bytes].decode(errors="ignore")
    tail = (text[len(text) - tail_bytes:].encode()[-tail_bytes:].decode(errors="ignore")
            if tail_bytes else "")
    omitted = len(text) - len(head) - len(tail)
    return f"{head} …[{omitted} characters left out]… {tail}"


class ServiceError(Exception):
    """Base class: a failure the caller can act on."""

    def __init__(self, message: str = "") -> None:
        super().__init__(shorten(str(message)))


class InvalidInput(ServiceError):
    """The request is malformed or asks for something out of range."""


class OverLimit(InvalidInput):
    """The request asks for more work than a server limit (a ``--max-…`` flag) allows."""


class NotFound(ServiceError):
    """The named model, version or method does not exist."""


class ResourceExhausted(ServiceError):
    """The server is at capacity or the request exceeds a configured limit."""


class Unavailable(ServiceError):
    """The model exists but is not ready, or the server is shutting down."""


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before the work finished."""


class Cancelled(ServiceError):
    """The client cancelled the request."""


class FailedPrecondition(ServiceError):
    """The model package lacks what the method needs (e.g. no torch program)."""


class Internal(ServiceError):
    """A fault of the server, not of the request; the message names the request's id."""
