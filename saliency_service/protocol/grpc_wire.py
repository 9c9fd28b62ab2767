"""Registers a service's RPCs so that a request body that does not parse is INVALID_ARGUMENT.

The generated ``add_*Servicer_to_server`` deserializes with ``Message.FromString``, which
raises on corrupt bytes; gRPC then answers UNKNOWN "Unexpected DecodeError", as if the
server had failed. Here every RPC of the service descriptor gets a deserializer that never
raises and a behaviour that refuses such a request with INVALID_ARGUMENT before the
servicer sees it; well-formed requests reach the servicer's methods unchanged. A request
of more field occurrences or packed values than any request needs is refused the same way
before it is parsed, since parsing would inflate it up to 34-fold.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message

from saliency_service.serving.metrics import Metrics

log = logging.getLogger(__name__)


class Undecodable:
    """Stands in for a request whose bytes are not a valid message; says why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


# Most field occurrences, and most packed values, a request may hold. A parsed repeated
# value costs 4 to 34 bytes however few it took on the wire (one byte per packed int, two
# per empty image), so a 64 MiB message of them would take about 1 GiB; requests need
# tens. Occurrences are counted one by one, packed values by the run.
MAX_WIRE_FIELDS = 16384
MAX_WIRE_VALUES = 1 << 20
_FIXED_SIZES = {FieldDescriptor.TYPE_DOUBLE: 8, FieldDescriptor.TYPE_FIXED64: 8,
                FieldDescriptor.TYPE_SFIXED64: 8, FieldDescriptor.TYPE_FLOAT: 4,
                FieldDescriptor.TYPE_FIXED32: 4, FieldDescriptor.TYPE_SFIXED32: 4}


class TooManyValues(ValueError):
    """A request's wire bytes hold more fields or packed values than any request needs."""


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it (IndexError when cut short)."""
    value = shift = 0
    while True:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


class _Count:
    """Field occurrences and packed values counted so far, by field."""

    def __init__(self) -> None:
        self.totals = {"fields": 0, "packed values": 0}
        self.by_field: dict[tuple[str, str], int] = {}

    def add(self, kind: str, where: str, count: int) -> None:
        self.totals[kind] += count
        self.by_field[kind, where] = self.by_field.get((kind, where), 0) + count
        bound = MAX_WIRE_FIELDS if kind == "fields" else MAX_WIRE_VALUES
        if self.totals[kind] > bound:
            (_, field), most = max(((key, value) for key, value in self.by_field.items()
                                    if key[0] == kind), key=lambda item: item[1])
            raise TooManyValues(
                f"the request holds more than {bound} {kind} ({field} alone at least "
                f"{most}), far more than any request needs: one image or target per batch "
                "item, a 4-D shape, a few weights")


def _varints(packed: memoryview) -> int:
    """How many varints ``packed`` holds: one per byte below 0x80, at least one per 10
    bytes (enough to refuse a long run without reading it)."""
    if len(packed) > 10 * MAX_WIRE_VALUES:
        return -(-len(packed) // 10)
    return int(np.count_nonzero(np.frombuffer(packed, np.uint8) < 0x80))


def check_values(data: bytes, descriptor: Descriptor) -> None:
    """Counts the field occurrences and packed values in a message's wire bytes, without
    parsing it, and raises ``TooManyValues`` beyond ``MAX_WIRE_FIELDS`` or
    ``MAX_WIRE_VALUES``. Bytes that are not a valid message are left for the parser to
    refuse."""
    try:
        _scan(memoryview(data), 0, len(data), descriptor, "", _Count())
    except TooManyValues:
        raise
    except (IndexError, ValueError):
        pass  # not a valid message: the parser says why


def _scan(data: memoryview, start: int, end: int, descriptor: Descriptor, prefix: str,
          count: _Count) -> None:
    position = start
    while position < end:
        tag, position = _varint(data, position)
        number, wire_type = tag >> 3, tag & 7
        field = descriptor.fields_by_number.get(number)
        where = f"{prefix}{field.name if field is not None else f'field {number}'}"
        count.add("fields", where, 1)
        if wire_type == 0:
            _, position = _varint(data, position)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _varint(data, position)
            payload_end = position + length
            if payload_end > end:
                raise ValueError("length beyond the message")
            if field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
                _scan(data, position, payload_end, field.message_type, f"{where}.", count)
            elif field is not None and field.is_repeated and field.type in _FIXED_SIZES:
                count.add("packed values", where, length // _FIXED_SIZES[field.type])
            elif field is not None and field.is_repeated and field.type not in (
                    FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
                count.add("packed values", where, _varints(data[position:payload_end]))
            position = payload_end
        elif wire_type not in (3, 4):  # groups' fields are counted as they come
            raise ValueError(f"wire type {wire_type}")


def lenient_deserializer(message_class: type[Message]) -> Callable[[bytes], Any]:
    """``message_class.FromString``, returning an ``Undecodable`` where it would raise or
    where the message holds more fields or packed values than any request needs."""
    name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Message | Undecodable:
        try:
            check_values(data, message_class.DESCRIPTOR)
        except TooManyValues as exc:
            return Undecodable(str(exc))
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
