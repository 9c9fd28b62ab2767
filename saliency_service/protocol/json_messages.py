"""The ``saliency.v1`` messages as JSON: the proto's JSON mapping with the proto field names.

Parsing also takes an enum value by its short lower-case name (``"gradcam"`` for
``METHOD_GRADCAM``, ``"blur"`` for ``BASELINE_BLUR``), the spelling ``GetModel``'s defaults
and the CLI use; a value that is neither is refused with the list of valid names.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from google.protobuf.message import Message

from saliency_service.core.errors import InvalidInput
from saliency_service.protocol.method_params import ParamError, params_field, params_message

M = TypeVar("M", bound=Message)


def enum_prefix(enum: EnumDescriptor) -> str:
    """``METHOD_`` for ``Method`` (the prefix its zero value carries)."""
    return enum.values[0].name.rsplit("_", 1)[0] + "_"


def short_name(enum: EnumDescriptor, name: str) -> str:
    """``METHOD_GRADCAM`` → ``gradcam``."""
    return name.removeprefix(enum_prefix(enum)).lower()


def enum_value_name(enum: EnumDescriptor, text: str, where: str) -> str:
    """The full value name for ``text``, a full or short name of one of ``enum``'s values."""
    if text in enum.values_by_name:
        return text
    full = enum_prefix(enum) + text.upper()
    if full in enum.values_by_name:
        return full
    valid = ", ".join(short_name(enum, v.name) for v in enum.values if v.number != 0)
    raise InvalidInput(f"{where}={text!r} is not a {enum.name} value; valid values: {valid}")


FieldPath = tuple[tuple[str, int | None], ...]  # field names (and list indices) from the root


def _strict_base64(text: str) -> bytes | None:
    """Standard base64 decoded, or None for anything else (URL-safe is left to the parser)."""
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        return None


def _prepared(descriptor: Descriptor, value: Any, where: str, at: FieldPath,
              decoded: list[tuple[FieldPath, bytes]]) -> Any:
    """``value`` (a JSON object for ``descriptor``) with short enum names made full, and
    standard-base64 bytes fields decoded into ``decoded`` (left empty for the parser, whose
    decoder takes several times as long on a tensor)."""
    if not isinstance(value, dict):
        return value
    out = dict(value)
    for key, item in value.items():
        field = descriptor.fields_by_name.get(key) or next(
            (f for f in descriptor.fields if f.json_name == key), None)
        if field is None:
            continue
        path = f"{where}.{field.name}" if where else field.name
        items = item if field.is_repeated and isinstance(item, list) else None
        if field.enum_type is not None:
            def convert(text: Any, enum: EnumDescriptor = field.enum_type,
                        path: str = path) -> Any:
                return enum_value_name(enum, text, path) if isinstance(text, str) else text

            out[key] = [convert(v) for v in items] if items is not None else convert(item)
        elif field.type == field.TYPE_BYTES:
            kept = []
            for index, text in enumerate(items if items is not None else [item]):
                data = _strict_base64(text) if isinstance(text, str) else None
                if data is not None:
                    decoded.append(((*at, (field.name, index if items is not None else None)),
                                    data))
                kept.append(text if data is None else "")
            out[key] = kept if items is not None else kept[0]
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if items is not None:
                out[key] = [_prepared(field.message_type, v, path, (*at, (field.name, i)),
                                      decoded) for i, v in enumerate(items)]
            else:
                out[key] = _prepared(field.message_type, item, path,
                                     (*at, (field.name, None)), decoded)
    return out


def _put(message: Message, path: FieldPath, data: bytes) -> None:
    target: Any = message
    for name, index in path[:-1]:
        target = getattr(target, name) if index is None else getattr(target, name)[index]
    name, index = path[-1]
    if index is None:
        setattr(target, name, data)
    else:
        getattr(target, name)[index] = data


def parse(value: Any, message_class: type[M]) -> M:
    """A message from its JSON form; a malformed one is the client's mistake (INVALID_ARGUMENT
    naming the field)."""
    if not isinstance(value, dict):
        raise InvalidInput(f"the body must be a JSON object ({message_class.DESCRIPTOR.name}), "
                           f"got {type(value).__name__}")
    message = message_class()
    decoded: list[tuple[FieldPath, bytes]] = []
    try:
        json_format.ParseDict(_prepared(message.DESCRIPTOR, value, "", (), decoded), message)
    except json_format.ParseError as exc:
        raise InvalidInput(f"invalid {message.DESCRIPTOR.name}: {_first_line(exc)}") from exc
    for path, data in decoded:
        _put(message, path, data)
    return message


def to_json(message: Message) -> dict[str, Any]:
    """A message's JSON form: proto field names, every field present (defaults included),
    64-bit integers as numbers while they fit a double exactly, bytes as base64."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True,
                                     unquote_int64_if_possible=True)


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0].replace('"', "'")


def set_plain_params(request: Any, values: Mapping[str, Any]) -> None:
    """Sets ``request``'s method parameters from plain values (``{"steps": 64, "baseline":
    "blur"}`` or text), through the parser the CLI's ``--param`` and the client use."""
    try:
        message = params_message(request.method, values)
    except ParamError as exc:
        raise InvalidInput(str(exc)) from exc
    if message is not None:
        field = params_field(request.method)
        getattr(request, field).MergeFrom(message)  # type: ignore[arg-type]
