"""The module builder: emits FX nodes, or computes at once when every input is a constant
(stored as buffers); and the view of one ONNX node the translations read.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from saliency_service.methods._utils.onnx_to_fx.data import MAX_BYTES, int_list
from saliency_service.methods._utils.onnx_to_fx.reasons import Problem

A = torch.ops.aten
Value = torch.Tensor | fx.Node


def _has_node(value: Any) -> bool:
    if isinstance(value, fx.Node):
        return True
    if isinstance(value, list | tuple):
        return any(_has_node(v) for v in value)
    if isinstance(value, dict):
        return any(_has_node(v) for v in value.values())
    return False


def _meta_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_meta_bytes(v) for v in value)
    return 0


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, list | tuple):
        return type(value)(_to_meta(v) for v in value)
    return value


def _fold(target: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Runs ``target`` on constants now, after checking its output size on meta tensors."""
    with torch.no_grad():
        if isinstance(target, torch._ops.OpOverload):
            try:
                shaped = target(*_to_meta(args), **_to_meta(kwargs))
            except Exception:
                shaped = None  # no meta kernel: the helpers check sizes themselves
            if _meta_bytes(shaped) > MAX_BYTES:
                raise Problem(f"folding {target} would make more than {MAX_BYTES} bytes")
        try:
            result = target(*args, **kwargs)
        except Problem:
            raise
        except Exception as exc:
            raise Problem(f"cannot compute on constants: {exc}") from exc
    if isinstance(result, torch.Tensor):
        return result.contiguous()
    if isinstance(result, list | tuple):
        return [r.contiguous() if isinstance(r, torch.Tensor) else r for r in result]
    return result


class Builder:
    """Emits FX nodes, or computes at once when every input is a constant."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self._constants: dict[int, fx.Node] = {}
        self._kept: list[torch.Tensor] = []

    def constant(self, tensor: torch.Tensor) -> fx.Node:
        node = self._constants.get(id(tensor))
        if node is None:
            name = f"onnx_const_{len(self._constants)}"
            self.root.register_buffer(name, tensor.detach().contiguous())
            self._kept.append(tensor)  # keeps id() unique while the builder lives
            node = self.graph.get_attr(name)
            self._constants[id(tensor)] = node
        return node

    def bind(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.constant(value)
        if isinstance(value, list | tuple):
            return type(value)(self.bind(v) for v in value)
        if isinstance(value, dict):
            return {k: self.bind(v) for k, v in value.items()}
        return value

    def call(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not _has_node((args, kwargs)):
            return _fold(target, args, kwargs)
        return self.graph.call_function(target, self.bind(args), self.bind(kwargs))

    def items(self, value: Any, count: int) -> list[Any]:
        if isinstance(value, fx.Node):
            return [self.graph.call_function(operator.getitem, (value, i)) for i in range(count)]
        return list(value)[:count]


@dataclass
class Op:
    """One ONNX node with its inputs resolved to constants or graph nodes."""

    op_type: str
    opset: int
    inputs: list[Value | None]
    shapes: list[tuple[int | None, ...] | None]
    dtypes: list[torch.dtype | None]
    attrs: dict[str, Any]
    used: list[bool]

    def input(self, i: int) -> Value | None:
        return self.inputs[i] if i < len(self.inputs) else None

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def shape(self, i: int) -> tuple[int | None, ...] | None:
        return self.shapes[i] if i < len(self.shapes) else None

    def rank(self, i: int) -> int | None:
        shape = self.shape(i)
        return len(shape) if shape is not None else None

    def dim(self, i: int, axis: int) -> int | None:
        shape = self.shape(i)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        return shape[axis]

    def dtype(self, i: int) -> torch.dtype | None:
        return self.dtypes[i] if i < len(self.dtypes) else None


def const(value: Value | None) -> torch.Tensor | None:
    """The value when it is a constant, else None."""
    return value if isinstance(value, torch.Tensor) else None


def const_ints(value: Value | None, what: str, required: bool = True) -> list[int] | None:
    """A constant's values as ints; one computed at run time is a problem when ``required``."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return int_list(value)
    if required:
        raise Problem(f"{what} computed at run time")
    return None


def scalar(value: Value | None) -> float | int | bool | None:
    """The one value of a constant (None for a graph node)."""
    if not isinstance(value, torch.Tensor):
        return None
    if value.numel() != 1:
        raise Problem(f"expected one value, got shape {list(value.shape)}")
    item = value.reshape(()).item()
    return item


def need(value: Value | None, what: str) -> Value:
    """``value``, or a problem naming the missing input."""
    if value is None:
        raise Problem(f"missing {what}")
    return value


def dim_of(b: Builder, op: Op, x: Value, axis: int) -> Any:
    """Input 0's size along ``axis``: a number when known, else read at run time."""
    static = op.dim(0, axis)
    return static if static is not None else b.call(A.sym_size.int, x, axis)


def axes_of(op: Op, index: int) -> list[int] | None:
    """The axes of a reduction or (un)squeeze: the attribute (older opsets), else input
    ``index``."""
    if "axes" in op.attrs:
        return list(op.attrs["axes"])
    return const_ints(op.input(index), "axes")


Translate = Callable[[Builder, Op], list[Any]]
