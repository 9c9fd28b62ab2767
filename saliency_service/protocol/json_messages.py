"""The ``saliency.v1`` messages as JSON: the proto's JSON mapping with the proto field names.

Parsing also takes an enum value by its short lower-case name (``"gradcam"`` for
``METHOD_GRADCAM``, ``"blur"`` for ``BASELINE_BLUR``), the spelling ``GetModel``'s defaults
and the CLI use; a value that is neither is refused with the list of valid names.

Everything a client sends is checked here before protobuf sees it, so a mistake is an
``InvalidInput`` naming the field and what it takes: JSON nested too deeply or holding an
integer too long to convert (``loads_json``), integers outside their field's type
(``checked_int``), and plain parameters that are null, objects or lists where one value goes.
"""

from __future__ import annotations

import binascii
import json
import math
import re
import sys
from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from saliency_service.core.errors import InvalidInput, ResourceExhausted
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.method_params import ParamError, params_field, params_message

M = TypeVar("M", bound=Message)
# No request nests deeper than ~8 levels (a KServe tensor instance: 6).
MAX_JSON_DEPTH = 32
# Arrays and objects hold at most this many items in all (a tensor travels as base64, KServe's
# nested lists of numbers apart): JSON's Python objects take ~40 bytes per item.
MAX_JSON_ITEMS = 1_000_000
_INTEGER_TEXT = re.compile(r"\s*[-+]?\d+\s*")
_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_ENUM: ("enum (int32)", -(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: ("uint32", 0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: ("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: ("uint64", 0, 2**64 - 1),
}
_FLOAT_TYPES = (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE)


class BodyTooLarge(ResourceExhausted):
    """A request body, or the tensor it holds, over ``--max-message-bytes`` (HTTP 413)."""


def shown(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages that quote a value."""
    if isinstance(value, list | dict) and len(value) > limit:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**limit else "…"
    return text if len(text) <= limit else text[:limit - 1] + "…"


def loads_json(data: bytes | bytearray | str, where: str = "the body") -> Any:
    """JSON text as Python values; anything the decoder refuses is the client's mistake
    (InvalidInput), including nesting beyond ``MAX_JSON_DEPTH``, more than
    ``MAX_JSON_ITEMS`` items (counted from the commas before decoding, which bounds the
    memory the decoded values take) and integers longer than Python converts
    (``sys.get_int_max_str_digits()``)."""
    commas = data.count("," if isinstance(data, str) else b",")
    if commas >= MAX_JSON_ITEMS:
        raise InvalidInput(
            f"{where} holds more than {MAX_JSON_ITEMS} JSON items; send a tensor as base64 "
            "(input.tensor.data), or KServe instances as one regular nested list of numbers")
    try:
        value = json.loads(data)
    except RecursionError:
        value = None
        too_deep = True
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{where} is not JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{where} is not JSON: not UTF-8 text ({exc.reason})") from None
    except ValueError:  # an integer literal beyond the conversion limit
        raise InvalidInput(
            f"{where} holds an integer of more than {sys.get_int_max_str_digits()} digits; no "
            "field takes one that large") from None
    else:
        too_deep = _depth_exceeds(value, MAX_JSON_DEPTH)
    if too_deep:
        raise InvalidInput(f"{where} nests arrays and objects more than {MAX_JSON_DEPTH} "
                           "levels deep; no request needs more than 8")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests arrays and objects deeper than ``limit`` (iteratively:
    a deep value must not hit the recursion limit here either)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def checked_int(field: FieldDescriptor, value: Any, where: str) -> Any:
    """``value`` for integer ``field`` unchanged, or InvalidInput naming ``where`` and the
    field type's range when it is an integer (a JSON number or integer text) outside it.
    Other values are left to the caller's parser, which names what it takes."""
    kind = _INT_RANGES.get(field.cpp_type)
    if kind is None or isinstance(value, bool):
        return value
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, float) and math.isinf(value):
        number = 2**64 if value > 0 else -(2**64)
    elif isinstance(value, str) and _INTEGER_TEXT.fullmatch(value):
        digits = value.strip().lstrip("+-")
        number = int(value) if len(digits) <= 30 else (-1 if "-" in value else 1) * 10**30
    if number is None:
        return value
    name, low, high = kind
    if not low <= number <= high:
        raise InvalidInput(f"{where}={shown(value)} is out of range: {_article(name)} {name} "
                           f"field takes {low} to {high}")
    return value


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
        for index, each in enumerate(items if items is not None else [item]):
            checked_int(field, each, path if items is None else f"{path}[{index}]")
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
    "blur"}`` or text), through the parser the CLI's ``--param`` and the client use.

    Values as JSON gives them are checked first: a known method, no nulls or objects, a list
    for a repeated parameter and only for one (text stays text: ``"1,2"`` as ``--param``
    takes it), and integers within the parameter's type.
    """
    method = request.method
    if method not in pb.Method.values():
        valid = ", ".join(short_name(pb.Method.DESCRIPTOR, v.name)
                          for v in pb.Method.DESCRIPTOR.values if v.number != 0)
        raise InvalidInput(f"method={shown(method)} is not a Method value; valid values: "
                           f"{valid}")
    field = params_field(method)
    fields = (pb.ExplainRequest.DESCRIPTOR.fields_by_name[field].message_type.fields_by_name
              if field is not None else {})
    plain: dict[str, Any] = {}
    for key, value in values.items():
        descriptor = fields.get(key)
        if descriptor is None:
            plain[key] = value  # refused by params_message with the names it takes
            continue
        plain[key] = _plain_value(descriptor, value, f"{field}.{key}")
    try:
        message = params_message(method, plain)
    except ParamError as exc:
        raise InvalidInput(str(exc)) from exc
    if message is not None:
        field = params_field(request.method)
        getattr(request, field).MergeFrom(message)  # type: ignore[arg-type]


def _plain_value(field: FieldDescriptor, value: Any, where: str) -> Any:
    """A plain parameter value checked against its field: InvalidInput for what the field
    cannot hold."""
    takes = ("a list of numbers or texts, e.g. [1, 2]" if field.is_repeated else
             "one number or text")
    if value is None or isinstance(value, dict):
        raise InvalidInput(f"{where}={shown(value)} is not a value: it takes {takes}")
    if isinstance(value, list) != field.is_repeated and not isinstance(value, str):
        given = "one value" if field.is_repeated else "a list"
        raise InvalidInput(f"{where}={shown(value)} is {given}: it takes {takes}")
    items = value if isinstance(value, list) else [value]
    for index, item in enumerate(items):
        at = f"{where}[{index}]" if isinstance(value, list) else where
        if item is None or isinstance(item, dict | list):
            raise InvalidInput(f"{at}={shown(item)} is not a value: it takes {takes}")
        checked_int(field, item, at)
        if (field.cpp_type in _FLOAT_TYPES and isinstance(item, int)
                and not isinstance(item, bool) and abs(item) > 1e38):
            raise InvalidInput(f"{at}={shown(item)} is out of range for a float parameter")
    return value


def _article(word: str) -> str:
    return "an" if word[:1] in ("a", "e", "i", "o") or word.startswith("int") else "a"
