"""Typed method parameters: a frozen dataclass per method, filled from plain values.

A field declares its default, its range, its choices and the server limit (a ``Config``
attribute such as ``max_steps``) that bounds it; ``from_values`` applies all of them, so
a method's parameter knowledge lives in its dataclass alone and every refusal names the
field, the allowed values and, for a limit, the flag that raises it. The values come from
the protocol layer (``protocol.codec`` reads the client's params message into a dict), so
nothing here knows a wire format.
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


def check_count(label: str, count: int, bound: int, why: str = "") -> None:
    """Refuses a repeated field of more than ``bound`` values, from its length alone (the
    values are not read, so a huge field costs nothing before it is refused)."""
    if count > bound:
        raise InvalidInput(f"{label} has {count} values; at most {bound} are accepted"
                           f"{f': {why}' if why else ''}")


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


def from_values(cls: type[P], given: Mapping[str, Any] | None, limits: Mapping[str, float],
                where: str, base: P | None = None) -> P:
    """An instance of the parameters dataclass ``cls``: the dataclass defaults (or ``base``,
    to check values set in code) overlaid with the values the client set in ``given``
    (field name → value; enum fields by their lower-case names), each checked against its
    declared range, choices, length and server limit. ``where`` prefixes messages (the
    request's params field, e.g. ``integrated_gradients``). A name the dataclass lacks is
    refused with the names it takes."""
    given = dict(given or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(given) - set(fields))
    if unknown:
        takes = ", ".join(fields) or "none"
        raise InvalidInput(f"{where} has no parameter {unknown[0]!r}; it takes: {takes}")
    values: dict[str, Any] = {}
    for name, field in fields.items():
        value = getattr(base, name) if base is not None else field.default
        if name in given:
            value = given[name]
            if isinstance(value, list | tuple):
                check_count(f"{where}.{name}", len(value),
                            field.metadata.get("max_items", MAX_ITEMS))
        if isinstance(value, list):
            value = tuple(value)
        _check(f"{where}.{name}", field, value, limits)
        values[name] = value
    return cls(**values)


def defaults_of(cls: type[Any]) -> dict[str, Any]:
    """Field name → default of a parameters dataclass (what ``GetModel`` reports)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def limits_of(cls: type[Any]) -> dict[str, str]:
    """Field name → the server limit that caps it, for the fields that have one."""
    return {f.name: f.metadata["limit"] for f in dataclasses.fields(cls)
            if f.metadata.get("limit")}
