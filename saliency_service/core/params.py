"""Typed method parameters: a frozen dataclass per method, filled from its proto message.

A field declares its default, its range, its choices and the server limit (a ``Config``
attribute such as ``max_steps``) that bounds it; ``from_message`` applies all of them, so
a method's parameter knowledge lives in its dataclass alone and every refusal names the
field, the allowed values and, for a limit, the flag that raises it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from saliency_service.core.errors import InvalidInput, OverLimit

P = TypeVar("P")

# Most values a repeated parameter takes unless its field declares fewer (``max_items``):
# a handler's exact count (e.g. one weight per scale output) is checked once the model is
# known, so this only has to be small enough that converting the values costs nothing.
MAX_ITEMS = 64


def param(default: Any, *, low: float | None = None, high: float | None = None,
          low_open: bool = False, high_open: bool = False, limit: str = "",
          choices: tuple[str, ...] = (), max_items: int = MAX_ITEMS) -> Any:
    """A parameter field: ``default`` when unset; ``low``/``high`` bound it (``*_open``
    excludes the bound); ``limit`` names the server limit that caps it; ``choices`` are the
    allowed names of an enum field (its proto values without their prefix, lower case);
    ``max_items`` bounds a repeated field's length."""
    metadata = {"low": low, "high": high, "low_open": low_open, "high_open": high_open,
                "limit": limit, "choices": choices, "max_items": max_items}
    if isinstance(default, list | tuple):
        return dataclasses.field(default=tuple(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(limit: str) -> str:
    """``max_steps`` → ``--max-steps``."""
    return "--" + limit.replace("_", "-")


def enum_name(message: Any, name: str, value: int, label: str) -> str:
    """An enum field's value as its lower-case name without the enum's prefix
    (``BASELINE_UNIFORM_NOISE`` → ``uniform_noise``). A number the proto does not define is
    the client's mistake: INVALID_ARGUMENT naming the field (``label``) and its values."""
    enum = message.DESCRIPTOR.fields_by_name[name].enum_type
    known = enum.values_by_number.get(value)
    if known is None:
        valid = ", ".join(f"{v.name} ({v.number})" for v in enum.values)
        raise InvalidInput(f"{label}={value} is not a {enum.name} value; use one of {valid}")
    prefix = enum.values[0].name.rsplit("_", 1)[0] + "_"
    return known.name.removeprefix(prefix).lower()


def check_count(label: str, count: int, bound: int, why: str = "") -> None:
    """Refuses a repeated field of more than ``bound`` values, from its length alone (the
    values are not read, so a huge field costs nothing before it is refused)."""
    if count > bound:
        raise InvalidInput(f"{label} has {count} values; at most {bound} are accepted"
                           f"{f': {why}' if why else ''}")


def _given(message: Any, descriptor: Any, label: str,
           max_items: int = MAX_ITEMS) -> tuple[bool, Any]:
    """(whether the client set the field, its value) for one proto field; a repeated field
    is bounded by ``max_items`` before its values are converted."""
    name = descriptor.name
    if descriptor.is_repeated:
        field = getattr(message, name)
        check_count(label, len(field), max_items)
        values = tuple(field)
        return bool(values), values
    if descriptor.has_presence:
        return message.HasField(name), getattr(message, name)
    value = getattr(message, name)
    if descriptor.enum_type is not None:
        return value != 0, enum_name(message, name, value, label) if value else ""
    return bool(value), value


def _check(where: str, field: dataclasses.Field[Any], value: Any,
           limits: Mapping[str, float]) -> None:
    meta = field.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise InvalidInput(f"{where}={value!r} is not offered; valid values: "
                           f"{', '.join(meta['choices'])}")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    low, high = meta.get("low"), meta.get("high")
    if not math.isfinite(value):
        raise InvalidInput(f"{where} must be a finite number, got {value}")
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        bound = f"> {low:g}" if meta["low_open"] else f">= {low:g}"
        raise InvalidInput(f"{where} must be {bound}, got {value:g}")
    if high is not None and (value > high or (meta["high_open"] and value == high)):
        bound = f"< {high:g}" if meta["high_open"] else f"<= {high:g}"
        raise InvalidInput(f"{where} must be {bound}, got {value:g}")
    limit = meta.get("limit")
    if limit and limit in limits and value > limits[limit]:
        raise OverLimit(f"{where}={value:g} exceeds the server limit {limit}="
                        f"{limits[limit]:g} ({flag(limit)}); lower it or ask the operator "
                        "to raise the limit")


def from_message(cls: type[P], message: Any | None, limits: Mapping[str, float],
                 where: str, base: P | None = None) -> P:
    """An instance of the parameters dataclass ``cls``: the dataclass defaults overlaid
    with the fields the client set in ``message`` (a proto of the same field names), each
    checked against its declared range, choices and server limit. ``where`` prefixes
    messages (the request's params field, e.g. ``integrated_gradients``); ``base`` replaces
    the defaults (to check values set in code)."""
    values: dict[str, Any] = {}
    by_name = message.DESCRIPTOR.fields_by_name if message is not None else {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        descriptor = by_name.get(field.name)
        value = getattr(base, field.name) if base is not None else field.default
        if isinstance(value, list):
            value = tuple(value)
        if descriptor is not None:
            given, proto_value = _given(message, descriptor, f"{where}.{field.name}",
                                        field.metadata.get("max_items", MAX_ITEMS))
            if given:
                value = proto_value
        _check(f"{where}.{field.name}", field, value, limits)
        values[field.name] = value
    return cls(**values)


def defaults_of(cls: type[Any]) -> dict[str, Any]:
    """Field name → default of a parameters dataclass (what ``GetModel`` reports)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def limits_of(cls: type[Any]) -> dict[str, str]:
    """Field name → the server limit that caps it, for the fields that have one."""
    return {f.name: f.metadata["limit"] for f in dataclasses.fields(cls)
            if f.metadata.get("limit")}
