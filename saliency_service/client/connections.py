"""How connections between clients and replicas are kept, aged and balanced.

gRPC keeps one long-lived HTTP/2 connection per client and server, so without these a
client sends every call to the replica it first reached, and replicas added later get no
traffic from it. The server ages connections out (``max_connection_age``: a GOAWAY, after
which the client reconnects, re-resolves its target and may land elsewhere) and accepts the
clients' keepalive pings; the client balances over every address its target resolves to
(``round_robin``) and retries, on another replica, the calls refused as UNAVAILABLE or
RESOURCE_EXHAUSTED (or cancelled by a stopping replica before they ran). Retrying is safe
because every method is a pure function of its request and seed.
"""

from __future__ import annotations

import json
from typing import Any

from saliency_service.proto import explainer_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Explainer"].full_name
# gRPC caps attempts at 5 (the first call and four retries).
MAX_ATTEMPTS = 5
# CANCELLED too: a call that reached a stopping replica's transport but not yet its handler
# is cancelled by gRPC's shutdown, never run; the client's own cancellation is never retried.
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED")
# A request is kept for retrying up to this size (gRPC's default, 256 KiB, is smaller than a
# few PNG images; a larger request is sent but not retried): the server's default message
# limit.
RETRY_BUFFER_BYTES = 64 * 1024 * 1024
# Client keepalive: a ping every 30 s, the connection dropped when one is not answered within
# 10 s, so calls leave a replica that vanished (node lost) instead of waiting for the
# deadline. The server accepts pings this often (``keepalive_min_ping_interval_seconds``).
CLIENT_KEEPALIVE_MS = 30_000
CLIENT_KEEPALIVE_TIMEOUT_MS = 10_000


def retry_policy(max_attempts: int = MAX_ATTEMPTS, initial_backoff: float = 0.1,
                 max_backoff: float = 2.0) -> dict[str, Any]:
    """gRPC's retry policy: each retry after a random delay up to ``initial_backoff`` ×
    2^(retry − 1), at most ``max_backoff`` seconds; within the call's own deadline."""
    return {
        "maxAttempts": max_attempts,
        "initialBackoff": f"{initial_backoff:g}s",
        "maxBackoff": f"{max_backoff:g}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": list(RETRYABLE),
    }


def service_config(load_balancing: str = "round_robin", max_attempts: int = MAX_ATTEMPTS,
                   initial_backoff: float = 0.1, max_backoff: float = 2.0) -> str:
    """The client's gRPC service config (JSON): the balancing policy over every address the
    target resolves to, and the retry policy for the Explainer's methods (``max_attempts``
    1 = no retries). Retry throttling stops retrying while more attempts fail than succeed
    (each failure takes one of 20 tokens, each success gives one back; at 10 or fewer no
    retries), so a service overloaded everywhere is not sent up to five times its load."""
    method: dict[str, Any] = {"name": [{"service": SERVICE_NAME}]}
    if max_attempts > 1:
        method["retryPolicy"] = retry_policy(max_attempts, initial_backoff, max_backoff)
    config: dict[str, Any] = {
        "loadBalancingConfig": [{load_balancing: {}}],
        "methodConfig": [method],
    }
    if max_attempts > 1:
        config["retryThrottling"] = {"maxTokens": 20, "tokenRatio": 1}
    return json.dumps(config)


def client_options(load_balancing: str = "round_robin",
                   max_attempts: int = MAX_ATTEMPTS) -> list[tuple[str, Any]]:
    """Channel arguments of a client: service config, retry buffer, keepalive."""
    return [
        ("grpc.service_config", service_config(load_balancing, max_attempts)),
        ("grpc.enable_retries", 1 if max_attempts > 1 else 0),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(max_connection_age_seconds: float, max_connection_age_grace_seconds: float,
                   keepalive_time_seconds: float, keepalive_timeout_seconds: float,
                   keepalive_min_ping_interval_seconds: float) -> list[tuple[str, int]]:
    """Channel arguments of the server: connection age and its grace (0 = unset: connections
    live for ever; calls in flight after the GOAWAY always finish), the server's own
    keepalive pings (0 = gRPC's default, every 2 hours) and how often it lets clients ping
    (idle or not) before answering too_many_pings."""
    options = [
        ("grpc.keepalive_timeout_ms", round(keepalive_timeout_seconds * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms",
         round(keepalive_min_ping_interval_seconds * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if max_connection_age_seconds > 0:
        options.append(("grpc.max_connection_age_ms", round(max_connection_age_seconds * 1000)))
    if max_connection_age_grace_seconds > 0:
        options.append(("grpc.max_connection_age_grace_ms",
                        round(max_connection_age_grace_seconds * 1000)))
    if keepalive_time_seconds > 0:
        options.append(("grpc.keepalive_time_ms", round(keepalive_time_seconds * 1000)))
    return options
