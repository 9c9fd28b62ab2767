"""Domain errors that the servicer maps to gRPC status codes.

The core (repository, handlers, explainer) raises these and knows nothing of
gRPC; one place in ``service.explainer`` turns them into statuses.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base class: a failure with a message a person can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(ServiceError):
    """The request is malformed or asks for something out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    """The named model, version or method does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    """The server is at capacity or the request exceeds a configured limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """The model exists but is not ready, or the server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    """The client cancelled the request."""

    code = grpc.StatusCode.CANCELLED


class FailedPrecondition(ServiceError):
    """The model package lacks what the method needs (e.g. no torch program)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
