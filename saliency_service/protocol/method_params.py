"""A method's parameters from plain values, for people: the Python client's keyword
arguments (``steps=64, baseline="blur"``) and the CLI's ``--param steps=64``.

Names and values are checked against the method's params message in the proto, so a
mistake is a ``ParamError`` naming the valid choices before any request is sent; ranges and
server limits are checked by the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from saliency_service.proto import explainer_pb2 as pb

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ParamError(ValueError):
    """A method or parameter name or value that does not exist; the message lists the valid
    ones."""


def method_names() -> list[str]:
    """Every method's name as the CLI and the client take it (``integrated_gradients``)."""
    return [v.name.removeprefix("METHOD_").lower() for v in pb.Method.DESCRIPTOR.values
            if v.number != pb.METHOD_UNSPECIFIED]


def method_enum(method: str | int) -> int:
    """``"vanilla_gradient"`` / ``"METHOD_VANILLA_GRADIENT"`` / enum value → enum value."""
    if isinstance(method, int):
        return method
    name = method.strip().upper()
    value = pb.Method.DESCRIPTOR.values_by_name.get(
        name if name.startswith("METHOD_") else "METHOD_" + name)
    if value is None or value.number == pb.METHOD_UNSPECIFIED:
        raise ParamError(f"unknown method {method!r}; valid methods: {', '.join(method_names())}")
    return value.number


def params_field(method: int) -> str | None:
    """The params oneof field of a method: the method's own name (``METHOD_RISE`` → rise);
    None for a method without one (``auto``)."""
    name = pb.Method.Name(method).removeprefix("METHOD_").lower()
    return name if name in pb.ExplainRequest.DESCRIPTOR.fields_by_name else None


def parameter_names(method: int) -> list[str]:
    field = params_field(method)
    if field is None:
        return []
    return list(pb.ExplainRequest.DESCRIPTOR.fields_by_name[field].message_type.fields_by_name)


def _enum_choices(descriptor: FieldDescriptor) -> tuple[str, dict[str, int]]:
    enum = descriptor.enum_type
    prefix = enum.values[0].name.rsplit("_", 1)[0] + "_"
    return prefix, {v.name.removeprefix(prefix).lower(): v.number for v in enum.values
                    if not v.name.endswith("_UNSPECIFIED")}


def _scalar(where: str, descriptor: FieldDescriptor, value: Any) -> Any:
    """One value for a field, from its Python type or from text."""
    if descriptor.enum_type is not None:
        prefix, choices = _enum_choices(descriptor)
        if isinstance(value, int) and not isinstance(value, bool):
            if value in choices.values():
                return value
        elif isinstance(value, str):
            key = value.strip().lower().removeprefix(prefix.lower())
            if key in choices:
                return choices[key]
        raise ParamError(f"{where}={value!r} is not offered; valid values: {', '.join(choices)}")
    kind = descriptor.type
    if kind == FieldDescriptor.TYPE_BOOL:
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in _TRUE + _FALSE:
            return str(value).strip().lower() in _TRUE
        raise ParamError(f"{where}={value!r} is not a boolean; use true or false")
    if kind == FieldDescriptor.TYPE_STRING:
        return str(value)
    number = float if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE) else int
    try:
        if isinstance(value, bool) or (number is int and isinstance(value, float)):
            raise ValueError(value)
        return number(value)
    except (TypeError, ValueError):
        what = "an integer" if number is int else "a number"
        raise ParamError(f"{where}={value!r} is not {what}") from None


def params_message(method: str | int, values: Mapping[str, Any]) -> Message | None:
    """The method's params message with ``values`` set (None when there are none).

    Values may be Python values or text: ``steps=64`` or ``"64"``, ``baseline="blur"``,
    ``refine=False`` or ``"false"``, ``weights=[1, 2]`` or ``"1,2"``."""
    if not values:
        return None
    enum = method_enum(method)
    name = pb.Method.Name(enum).removeprefix("METHOD_").lower()
    field = params_field(enum)
    names = parameter_names(enum)
    unknown = [key for key in values if key not in names]
    if unknown:
        takes = f"it takes: {', '.join(names)}" if names else "it takes none"
        raise ParamError(f"{name} has no parameter {unknown[0]!r}; {takes}")
    message_type = pb.ExplainRequest.DESCRIPTOR.fields_by_name[field].message_type  # type: ignore[index]
    message = getattr(pb, message_type.name)()
    for key, value in values.items():
        descriptor = message_type.fields_by_name[key]
        where = f"{name}.{key}"
        if descriptor.is_repeated:
            items = value.split(",") if isinstance(value, str) else list(value)
            getattr(message, key).extend(
                [_scalar(where, descriptor, item) for item in items if str(item).strip()])
        else:
            setattr(message, key, _scalar(where, descriptor, value))
    return message


def parse_assignments(texts: list[str]) -> dict[str, str]:
    """``["steps=64", "baseline=blur"]`` → ``{"steps": "64", "baseline": "blur"}``."""
    values: dict[str, str] = {}
    for text in texts:
        key, equals, value = text.partition("=")
        if not equals or not key.strip():
            raise ParamError(f"--param {text!r} must look like name=value, e.g. steps=64")
        values[key.strip()] = value.strip()
    return values
