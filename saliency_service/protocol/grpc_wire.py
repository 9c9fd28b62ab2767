"""Registers a service's RPCs so that a request body that does not parse is INVALID_ARGUMENT.

The generated ``add_*Servicer_to_server`` deserializes with ``Message.FromString``, which
raises on corrupt bytes; gRPC then answers UNKNOWN "Unexpected DecodeError", as if the
server had failed. Here every RPC of the service descriptor gets a deserializer that never
raises and a behaviour that refuses such a request with INVALID_ARGUMENT before the
servicer sees it; well-formed requests reach the servicer's methods unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from saliency_service.serving.metrics import Metrics

log = logging.getLogger(__name__)


class Undecodable:
    """Stands in for a request whose bytes are not a valid message; says why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def lenient_deserializer(message_class: type[Message]) -> Callable[[bytes], Any]:
    """``message_class.FromString``, returning an ``Undecodable`` where it would raise."""
    name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Message | Undecodable:
        try:
            return message_class.FromString(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is in the client's bytes
            detail = str(exc).rsplit(": ", 1)[-1] or type(exc).__name__
            return Undecodable(
                f"the request body is not a valid {name} message ({detail}); send a "
                "message serialized from saliency_service/proto/explainer.proto"
            )

    return deserialize


def _guarded_unary(
    behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
    refuse: Callable[[Undecodable, grpc.aio.ServicerContext], Awaitable[None]],
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await refuse(request, context)
        return await behaviour(request, context)

    return call


def _guarded_stream(
    behaviour: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
    refuse: Callable[[Undecodable, grpc.aio.ServicerContext], Awaitable[None]],
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await refuse(request, context)
        # aclosing: when the call ends early, the servicer's generator runs its cleanup now.
        async with contextlib.aclosing(behaviour(request, context)) as replies:
            async for reply in replies:
                yield reply

    return call


def add_service(
    servicer: object, server: grpc.aio.Server, service: ServiceDescriptor, metrics: Metrics
) -> None:
    """Registers every RPC of ``service`` (unary requests) on ``server``, served by the
    servicer's method of the same name; undecodable requests are refused and counted in
    ``saliency_rejected_total{reason="undecodable"}``."""

    def refusal(method: MethodDescriptor) -> Callable[
            [Undecodable, grpc.aio.ServicerContext], Awaitable[None]]:
        async def refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
            metrics.rejected.labels("undecodable").inc()
            log.info("undecodable %s request refused", method.name,
                     extra={"event": "undecodable_request", "rpc": method.name,
                            "code": grpc.StatusCode.INVALID_ARGUMENT.name})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)

        return refuse

    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: streamed requests are not supported here")
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        options = {
            "request_deserializer": lenient_deserializer(request_class),
            "response_serializer": response_class.SerializeToString,
        }
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _guarded_stream(behaviour, refusal(method)), **options)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _guarded_unary(behaviour, refusal(method)), **options)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
