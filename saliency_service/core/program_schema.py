"""An allow-list for the JSON inside a ``torch.export`` archive, checked before torch reads it.

``torch.export.load`` and ``ExportedProgram.module()`` turn parts of ``models/model.json``
into code: ``guards_code`` goes to ``exec``; every ``expr_str`` to ``sympy.sympify`` (which
evaluates Python); node and input names into the Python source FX generates and compiles;
a pytree context's ``__enum__`` entry to ``importlib.import_module``; node targets and
``source_fn_stack`` entries to ``getattr`` walks over ``torch``, ``math`` and ``operator``,
whose results the graph then calls. So the JSON is walked against torch's own schema
dataclasses (``torch._export.serde.schema``), unknown fields refused, and each of those
strings held to a grammar that cannot name anything else: identifiers for names, ATen
operators for targets, plain integer/symbol arithmetic for expressions, no ``guards_code``,
no custom objects, subgraphs or enums.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import keyword
import re
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

MAX_DEPTH = 64
MAX_STRING = 1 << 16
MAX_EXPRESSION = 4096
MAX_EXPRESSION_DEPTH = 32
MAX_INTEGER_DIGITS = 20

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_FQN = re.compile(r"(?:[A-Za-z0-9_]{1,200}(?:\.[A-Za-z0-9_]{1,200}){0,63})?")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}(?:\.[A-Za-z_][A-Za-z0-9_]{0,199}){0,15}")
# Symbols torch names: s (sizes), u (unbacked ints), zf/zuf (floats), ps (precomputed sizes).
_SYMBOL = re.compile(r"(?:s|u|zf|zuf|ps)\d{1,9}")
_ATEN_TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z_][A-Za-z0-9_]{0,99})\."
                          r"([A-Za-z_][A-Za-z0-9_]{0,99})")
# ATen operators that touch files or the console rather than compute.
_ATEN_REFUSED = frozenset({"from_file", "save", "_print", "warn"})
# The Python operators and torch functions torch writes for symbolic-size arithmetic.
_SYMBOLIC_TARGETS = frozenset(
    [f"_operator.{name}" for name in (
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "neg", "abs", "eq",
        "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")]
    + [f"torch.sym_{name}" for name in ("int", "float", "max", "min", "not", "ite", "sum")]
    + [f"math.{name}" for name in ("ceil", "floor", "trunc")])
_VERIFIERS = frozenset({"", "ATEN", "TRAINING"})
_DEVICES = frozenset({"cpu"})
_METADATA = frozenset({"stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn",
                       "from_node"})
# Characters Python (or FX's generated source) could read as a line break, and controls.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict",
                             "collections.OrderedDict"})

# Expressions: what ``sympy.srepr`` writes for torch's symbolic sizes, and infix arithmetic.
_FUNCTIONS = frozenset({
    "Add", "Mul", "Max", "Min", "Abs", "FloorDiv", "Mod", "PythonMod", "CeilToInt",
    "FloorToInt", "TruncToInt", "RoundToInt", "CleanDiv", "CeilDiv", "IntTrueDiv",
    "FloatTrueDiv", "ToFloat", "TruncToFloat", "Identity", "ModularIndexing", "Where",
    "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan",
    "GreaterThan", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not"})
_CONSTANTS = frozenset({"True", "False", "true", "false"})
_ASSUMPTIONS = frozenset({"integer", "positive", "nonnegative", "negative", "nonpositive",
                          "real", "finite", "nonzero", "extended_real", "rational"})
_TOKEN = re.compile(r"\s*(?:(?P<number>\d+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                    r"|(?P<quoted>'[^'\\]*')|(?P<op>//|\*\*|[-+*%(),=])|(?P<bad>\S))")
_QUOTED_NUMBER = re.compile(r"-?\d{1,30}(?:\.\d{1,30})?(?:e[-+]?\d{1,4})?")


class UnsafeProgram(ValueError):
    """The program's JSON holds something torch would run as code, or that it does not
    define."""


def check_program(document: Any) -> None:
    """Raises UnsafeProgram unless ``document`` (the parsed ``models/model.json``) fits
    torch's ``ExportedProgram`` schema and the grammars above."""
    from torch._export.serde import schema  # noqa: PLC0415 - torch only for programs

    _walk(document, schema.ExportedProgram, "", 0)


def check_payload_config(document: Any, record_bytes: Callable[[str], int | None]) -> None:
    """Raises UnsafeProgram unless ``document`` (a weights or constants config) lists plain
    tensors, each inside the bytes of its own record (``record_bytes(path_name)``), so no
    payload is unpickled and none allocates more than the archive holds."""
    from torch._export.serde import schema  # noqa: PLC0415

    _walk(document, schema.PayloadConfig, "", 0)
    for key, payload in document.get("config", {}).items():
        shown = key[:200]
        if payload.get("use_pickle"):
            raise UnsafeProgram(f"payload {shown!r} is pickled")
        path = str(payload.get("path_name", ""))
        if not re.fullmatch(r"(?:weight|tensor)_\d{1,9}", path):
            raise UnsafeProgram(f"payload {shown!r} is not a tensor")
        meta = payload.get("tensor_meta")
        if meta is None:
            raise UnsafeProgram(f"payload {shown!r} has no tensor metadata")
        needed = _storage_bytes(meta)
        available = record_bytes(path)
        if available is None or needed > available:
            raise UnsafeProgram(f"payload {shown!r} needs {needed} bytes but its record "
                                f"holds {available or 0}")


def check_expression(text: str) -> None:
    """Raises UnsafeProgram unless ``text`` is integer/symbol arithmetic: integers, torch's
    symbols (``s0``, ``u3``), ``+ - * // %``, parentheses, sympy's ``Symbol('s0',
    integer=True)``/``Integer(2)`` forms and the functions torch writes (``Max``,
    ``FloorDiv``, ``Mod`` ...). No attribute access, indexing, strings or other names."""
    if len(text) > MAX_EXPRESSION:
        raise UnsafeProgram(f"expression of {len(text)} characters (at most {MAX_EXPRESSION})")
    parser = _ExpressionParser(text)
    parser.expression(0)
    if parser.peek() is not None:
        raise UnsafeProgram(f"expression {text[:80]!r}: unexpected {parser.peek()[1]!r}")


def _storage_bytes(meta: dict[str, Any]) -> int:
    """Bytes a strided tensor reaches into its storage (0 when it has no elements)."""
    import torch  # noqa: PLC0415
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE  # noqa: PLC0415

    def ints(values: list[dict[str, Any]]) -> list[int]:
        if not all(set(v) == {"as_int"} for v in values):
            raise UnsafeProgram("payload sizes must be integers")
        return [int(v["as_int"]) for v in values]

    sizes, strides = ints(meta.get("sizes", [])), ints(meta.get("strides", []))
    (offset,) = ints([meta.get("storage_offset", {"as_int": 0})])
    if len(sizes) != len(strides) or min([offset, *sizes, *strides], default=0) < 0:
        raise UnsafeProgram("payload sizes and strides must be non-negative and match")
    if 0 in sizes:
        return 0
    dtype = _SERIALIZE_TO_TORCH_DTYPE.get(meta.get("dtype"))
    if dtype is None:
        raise UnsafeProgram(f"payload dtype {meta.get('dtype')!r} is unknown")
    last = offset + sum((size - 1) * stride for size, stride in zip(sizes, strides,
                                                                    strict=True))
    return (last + 1) * torch._utils._element_size(dtype)


class _ExpressionParser:
    """Recursive descent over the expression grammar; it builds nothing, only accepts."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = list(self._tokens(text))
        self.at = 0

    def _tokens(self, text: str) -> Iterator[tuple[str, str]]:
        for match in _TOKEN.finditer(text):
            kind = match.lastgroup
            if kind is None:
                continue
            value = match.group(kind)
            if kind == "bad" or value == "**":
                raise UnsafeProgram(f"expression {text[:80]!r}: {value!r} is not allowed")
            if kind == "number" and len(value) > MAX_INTEGER_DIGITS:
                raise UnsafeProgram(f"expression {text[:80]!r}: integer too long")
            yield kind, value

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, kind: str, value: str | None = None) -> str:
        token = self.peek()
        if token is None or token[0] != kind or (value is not None and token[1] != value):
            found = "the end" if token is None else repr(token[1])
            raise UnsafeProgram(f"expression {self.text[:80]!r}: expected "
                                f"{value or kind}, found {found}")
        self.at += 1
        return token[1]

    def accept(self, kind: str, value: str) -> bool:
        if self.peek() == (kind, value):
            self.at += 1
            return True
        return False

    def expression(self, depth: int) -> None:
        if depth > MAX_EXPRESSION_DEPTH:
            raise UnsafeProgram(f"expression {self.text[:80]!r} nests too deeply")
        self.term(depth)
        while self.peek() in (("op", "+"), ("op", "-")):
            self.at += 1
            self.term(depth)

    def term(self, depth: int) -> None:
        self.unary(depth)
        while self.peek() in (("op", "*"), ("op", "//"), ("op", "%")):
            self.at += 1
            self.unary(depth)

    def unary(self, depth: int) -> None:
        if self.accept("op", "-"):
            self.unary(depth + 1)
            return
        self.atom(depth)

    def atom(self, depth: int) -> None:
        token = self.peek()
        if token is None:
            raise UnsafeProgram(f"expression {self.text[:80]!r} ends early")
        kind, value = token
        if kind == "number":
            self.at += 1
        elif kind == "op" and value == "(":
            self.at += 1
            self.expression(depth + 1)
            self.take("op", ")")
        elif kind == "name" and (value in _CONSTANTS or _SYMBOL.fullmatch(value)):
            self.at += 1
        elif kind == "name" and value in ("Symbol", "Integer", "Rational", "Float"):
            self.at += 1
            self.take("op", "(")
            getattr(self, f"_{value.lower()}")()
            self.take("op", ")")
        elif kind == "name" and value in _FUNCTIONS:
            self.at += 1
            self.take("op", "(")
            self.expression(depth + 1)
            while self.accept("op", ","):
                self.expression(depth + 1)
            self.take("op", ")")
        else:
            raise UnsafeProgram(f"expression {self.text[:80]!r}: {value!r} is not allowed")

    def _symbol(self) -> None:
        name = self.take("quoted")[1:-1]
        if not _SYMBOL.fullmatch(name):
            raise UnsafeProgram(f"expression {self.text[:80]!r}: symbol {name[:40]!r} is "
                                "not one torch names")
        while self.accept("op", ","):
            assumption = self.take("name")
            if assumption not in _ASSUMPTIONS:
                raise UnsafeProgram(f"expression {self.text[:80]!r}: assumption "
                                    f"{assumption[:40]!r} is not allowed")
            self.take("op", "=")
            if self.take("name") not in ("True", "False"):
                raise UnsafeProgram(f"expression {self.text[:80]!r}: assumptions are "
                                    "True or False")

    def _signed(self) -> None:
        self.accept("op", "-")
        self.take("number")

    def _integer(self) -> None:
        self._signed()

    def _rational(self) -> None:
        self._signed()
        self.take("op", ",")
        self._signed()

    def _float(self) -> None:
        if not _QUOTED_NUMBER.fullmatch(self.take("quoted")[1:-1]):
            raise UnsafeProgram(f"expression {self.text[:80]!r}: Float takes a number")
        if self.accept("op", ","):
            self.take("name", "precision")
            self.take("op", "=")
            self.take("number")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    from torch._export.serde import schema  # noqa: PLC0415

    return typing.get_type_hints(cls, globalns=vars(schema))


def _walk(value: Any, hint: Any, where: str, depth: int) -> None:
    """Checks ``value`` against the schema type ``hint`` and the field rules below."""
    if depth > MAX_DEPTH:
        raise UnsafeProgram(f"{where}: nested more than {MAX_DEPTH} deep")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        _walk(value, inner, where, depth)
    elif origin is list:
        _expect(value, list, where)
        (inner,) = typing.get_args(hint)
        for index, item in enumerate(value):
            _walk(item, inner, f"{where}[{index}]", depth + 1)
    elif origin is dict:
        _expect(value, dict, where)
        inner = typing.get_args(hint)[1]
        for key, item in value.items():
            _walk(item, inner, f"{where}[{key[:40]!r}]", depth + 1)
    elif dataclasses.is_dataclass(hint):
        _walk_dataclass(value, hint, where, depth)
    elif isinstance(hint, type) and issubclass(hint, enum.IntEnum):
        if type(value) is not int or value not in {m.value for m in hint}:
            raise UnsafeProgram(f"{where}: {str(value)[:40]!r} is not a {hint.__name__}")
    elif hint is bool:
        _expect(value, bool, where)
    elif hint is int:
        if type(value) is not int:
            raise UnsafeProgram(f"{where}: expected an integer")
    elif hint is float:
        if type(value) not in (int, float):
            raise UnsafeProgram(f"{where}: expected a number")
    elif hint is str:
        _expect(value, str, where)
        if len(value) > MAX_STRING:
            raise UnsafeProgram(f"{where}: string of {len(value)} characters")
    else:
        raise UnsafeProgram(f"{where}: type {hint!r} is not expected in a program")


def _expect(value: Any, kind: type, where: str) -> None:
    if type(value) is not kind:
        raise UnsafeProgram(f"{where}: expected {kind.__name__}, found {type(value).__name__}")


def _walk_dataclass(value: Any, cls: type, where: str, depth: int) -> None:
    from torch._export.serde.union import _Union  # noqa: PLC0415

    _expect(value, dict, where)
    hints = _hints(cls)
    name = cls.__name__
    if issubclass(cls, _Union) and len(value) != 1:
        raise UnsafeProgram(f"{where}: a {name} holds exactly one of {sorted(hints)}")
    for field, item in value.items():
        if field not in hints:
            raise UnsafeProgram(f"{where}: {name} has no field {field[:40]!r}")
        path = f"{where}.{field}" if where else field
        rule = _RULES.get((name, field))
        if rule is not None:
            rule(item, path)
        _walk(item, hints[field], path, depth + 1)


def _identifier(value: Any, where: str) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value) or keyword.iskeyword(
            value):
        raise UnsafeProgram(f"{where}: {str(value)[:60]!r} is not a plain identifier")


def _identifiers(value: Any, where: str) -> None:
    for item in value or ():
        _identifier(item, where)


def _identifier_keys(value: Any, where: str) -> None:
    for key in value if isinstance(value, dict) else ():
        _identifier(key, f"{where} key")


def _fqn(value: Any, where: str) -> None:
    if not isinstance(value, str) or not _FQN.fullmatch(value):
        raise UnsafeProgram(f"{where}: {str(value)[:60]!r} is not a dotted module path")


def _fqn_keys(value: Any, where: str) -> None:
    for key in value if isinstance(value, dict) else ():
        _fqn(key, f"{where} key")


def _refused(what: str) -> Callable[[Any, str], None]:
    def rule(value: Any, where: str) -> None:
        if value:
            raise UnsafeProgram(f"{where}: {what} are refused")
    return rule


def _expression(value: Any, where: str) -> None:
    if isinstance(value, str):
        try:
            check_expression(value)
        except UnsafeProgram as exc:
            raise UnsafeProgram(f"{where}: {exc}") from None


def _symbols(value: Any, where: str) -> None:
    for key in value if isinstance(value, dict) else ():
        if not _SYMBOL.fullmatch(key):
            raise UnsafeProgram(f"{where}: {key[:60]!r} is not a symbol torch names")


def _target(value: Any, where: str) -> None:
    import torch  # noqa: PLC0415

    if value in _SYMBOLIC_TARGETS:
        return
    match = _ATEN_TARGET.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise UnsafeProgram(f"{where}: {str(value)[:80]!r} is not an ATen operator")
    operator, overload = match.groups()
    if operator in _ATEN_REFUSED:
        raise UnsafeProgram(f"{where}: aten.{operator} reads or writes files or the console")
    try:
        found = getattr(getattr(torch.ops.aten, operator), overload)
    except (AttributeError, RuntimeError):
        raise UnsafeProgram(f"{where}: aten.{operator}.{overload} is not an operator of "
                            "this torch") from None
    if not isinstance(found, torch._ops.OpOverload):
        raise UnsafeProgram(f"{where}: aten.{operator}.{overload} is not an operator")


def _metadata(value: Any, where: str) -> None:
    for key, text in (value.items() if isinstance(value, dict) else ()):
        if key not in _METADATA:
            raise UnsafeProgram(f"{where}: metadata {key[:40]!r} is not allowed")
        if not isinstance(text, str) or _UNPRINTABLE.search(text):
            raise UnsafeProgram(f"{where}.{key}: control characters are refused")
        if key == "source_fn_stack":
            for entry in text.split(";"):
                target = entry.partition(",")[2]
                if not _DOTTED.fullmatch(target):
                    raise UnsafeProgram(f"{where}.{key}: {target[:60]!r} is not a "
                                        "dotted name")
        if key == "from_node":
            _json(text, f"{where}.{key}")


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise UnsafeProgram(f"{where}: not valid JSON") from None


def _treespec(value: Any, where: str) -> None:
    document = _json(value, where) if isinstance(value, str) else None
    if not isinstance(document, list) or len(document) != 2 or type(document[0]) is not int:
        raise UnsafeProgram(f"{where}: not a pytree spec")
    _treespec_node(document[1], where, 0)


def _treespec_node(node: Any, where: str, depth: int) -> None:
    if depth > MAX_DEPTH or not isinstance(node, dict) or set(node) != {
            "type", "context", "children_spec"}:
        raise UnsafeProgram(f"{where}: not a pytree spec")
    if node["type"] not in _TREESPEC_TYPES:
        raise UnsafeProgram(f"{where}: pytree type {str(node['type'])[:60]!r} is refused")
    context = node["context"]
    if context is not None:
        if not isinstance(context, str):
            raise UnsafeProgram(f"{where}: pytree context must be JSON text")
        _plain_context(_json(context, where), where, 0)
    children = node["children_spec"]
    if not isinstance(children, list):
        raise UnsafeProgram(f"{where}: not a pytree spec")
    for child in children:
        _treespec_node(child, where, depth + 1)


def _plain_context(value: Any, where: str, depth: int) -> None:
    """Dict keys and field names only: no objects (torch imports ``__enum__`` ones)."""
    if isinstance(value, dict) or depth > MAX_DEPTH:
        raise UnsafeProgram(f"{where}: pytree contexts holding objects are refused")
    if isinstance(value, list):
        for item in value:
            _plain_context(item, where, depth + 1)


def _one_of(allowed: frozenset[str], what: str) -> Callable[[Any, str], None]:
    def rule(value: Any, where: str) -> None:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item not in allowed:
                raise UnsafeProgram(f"{where}: {what} {str(item)[:40]!r} is not allowed")
    return rule


def _version(value: Any, where: str) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.+<=-]{0,64}", value):
        raise UnsafeProgram(f"{where}: {str(value)[:60]!r} is not a version")


_RULES: dict[tuple[str, str], Callable[[Any, str], None]] = {
    ("ExportedProgram", "guards_code"): _refused("guards (code run on every call)"),
    ("ExportedProgram", "range_constraints"): _symbols,
    ("ExportedProgram", "verifiers"): _one_of(_VERIFIERS, "verifier"),
    ("ExportedProgram", "torch_version"): _version,
    ("ExportedProgram", "opset_version"): _identifier_keys,
    ("GraphModule", "metadata"): _refused("graph metadata entries"),
    ("GraphModule", "treespec_namedtuple_fields"): _refused("named tuple definitions"),
    ("Graph", "tensor_values"): _identifier_keys,
    ("Graph", "sym_int_values"): _identifier_keys,
    ("Graph", "sym_bool_values"): _identifier_keys,
    ("Graph", "sym_float_values"): _identifier_keys,
    ("Graph", "custom_obj_values"): _refused("custom objects"),
    ("Node", "target"): _target,
    ("Node", "name"): _identifier,
    ("Node", "metadata"): _metadata,
    ("NamedArgument", "name"): _identifier,
    ("TensorArgument", "name"): _identifier,
    ("TokenArgument", "name"): _identifier,
    ("SymIntArgument", "as_name"): _identifier,
    ("SymFloatArgument", "as_name"): _identifier,
    ("SymBoolArgument", "as_name"): _identifier,
    ("Argument", "as_graph"): _refused("subgraphs (higher-order operators)"),
    ("Argument", "as_custom_obj"): _refused("custom objects"),
    ("Argument", "as_operator"): _refused("operator arguments"),
    ("SymExpr", "expr_str"): _expression,
    ("Device", "type"): _one_of(_DEVICES, "device"),
    ("InputSpec", "custom_obj"): _refused("custom objects"),
    ("InputToConstantInputSpec", "name"): _identifier,
    ("InputToParameterSpec", "parameter_name"): _fqn,
    ("InputToBufferSpec", "buffer_name"): _fqn,
    ("InputToTensorConstantSpec", "tensor_constant_name"): _fqn,
    ("BufferMutationSpec", "buffer_name"): _fqn,
    ("ParameterMutationSpec", "parameter_name"): _fqn,
    ("GradientToParameterSpec", "parameter_name"): _fqn,
    ("GradientToUserInputSpec", "user_input_name"): _identifier,
    ("UserInputMutationSpec", "user_input_name"): _identifier,
    ("ModuleCallEntry", "fqn"): _fqn,
    ("ModuleCallSignature", "in_spec"): _treespec,
    ("ModuleCallSignature", "out_spec"): _treespec,
    ("ModuleCallSignature", "forward_arg_names"): _identifiers,
    ("PayloadConfig", "config"): _fqn_keys,
}
