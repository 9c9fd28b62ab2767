"""Transport security and authentication: TLS/mutual TLS credentials and bearer tokens.

Tokens travel in the ``authorization: Bearer <token>`` metadata (gRPC) or header (HTTP),
the same ones for both, and are compared in constant time. Health checks stay open so that
probes need no secret.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from saliency_service.serving.config import Config
from saliency_service.serving.metrics import Metrics

log = logging.getLogger(__name__)

# Method prefixes served without a token.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files; with ``tls_client_ca`` clients must present a
    certificate signed by it (mutual TLS). None when TLS is off."""
    if not config.tls:
        return None
    key = _read(config.tls_key, "tls_key")
    cert = _read(config.tls_cert, "tls_cert")
    client_ca = _read(config.tls_client_ca, "tls_client_ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read(path: str, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"cannot read {name} {path!r}: {exc}") from exc


def load_tokens(config: Config) -> tuple[str, ...]:
    """The accepted bearer tokens (empty = authentication off)."""
    tokens = [config.auth_token] if config.auth_token else []
    if config.auth_token_file:
        text = _read(config.auth_token_file, "auth_token_file").decode()
        tokens += [line.strip() for line in text.splitlines() if line.strip()]
    return tuple(tokens)


def bearer_token_valid(authorization: str | bytes, tokens: tuple[bytes, ...]) -> bool:
    """Whether an ``authorization`` value (metadata or HTTP header) is ``Bearer <token>``
    with an accepted token."""
    text = (authorization.decode(errors="replace") if isinstance(authorization, bytes)
            else str(authorization))
    scheme, _, token = text.partition(" ")
    if scheme.lower() != "bearer":
        return False
    candidate = token.strip().encode()
    # Compare against every token so timing does not reveal which one matched.
    matches = [hmac.compare_digest(candidate, known) for known in tokens]
    return any(matches)


def http_ssl_options(config: Config) -> dict[str, Any]:
    """uvicorn's TLS settings from the same PEM files as gRPC's (mutual TLS with a client
    CA); empty when TLS is off."""
    if not config.tls:
        return {}
    for path, name in ((config.tls_cert, "tls_cert"), (config.tls_key, "tls_key"),
                       (config.tls_client_ca, "tls_client_ca")):
        if path:
            _read(path, name)  # a clear exit for an unreadable file, as for gRPC
    options: dict[str, Any] = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
    if config.tls_client_ca:
        options |= {"ssl_ca_certs": config.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid bearer token with UNAUTHENTICATED."""

    def __init__(self, tokens: tuple[str, ...], metrics: Metrics) -> None:
        if not tokens:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self._tokens = tuple(token.encode() for token in tokens)
        self.metrics = metrics

    def _authorized(self, metadata: tuple[tuple[str, Any], ...] | None) -> bool:
        for key, value in metadata or ():
            if key.lower() == "authorization":
                return bearer_token_valid(value, self._tokens)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        self.metrics.rejected.labels("unauthenticated").inc()
        log.warning(
            "unauthenticated call refused", extra={"event": "unauthenticated", "method": method}
        )
        return _refusal(handler)


async def _abort(_request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'",
    )


async def _abort_stream(_request: Any, context: grpc.aio.ServicerContext) -> Any:
    await _abort(_request, context)
    yield  # pragma: no cover - abort raises; this makes the function a generator


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""
    deserializer = handler.request_deserializer
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_abort_stream, deserializer, serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_abort, deserializer, serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_abort_stream, deserializer, serializer)
    return grpc.unary_unary_rpc_method_handler(_abort, deserializer, serializer)
