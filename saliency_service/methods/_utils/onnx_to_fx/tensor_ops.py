"""Elementwise, activation, matrix and reduction ops."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from saliency_service.methods._utils.onnx_to_fx.builder import (
    A,
    Builder,
    Op,
    Translate,
    Value,
    axes_of,
    const,
    const_ints,
    need,
    scalar,
)
from saliency_service.methods._utils.onnx_to_fx.reasons import Problem
from saliency_service.methods._utils.onnx_to_fx.shapes import flatten_at


def _div_any(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ONNX Div on operands of unknown type: integers divide with truncation."""
    if a.is_floating_point() or b.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


def _softmax_2d(x: torch.Tensor, axis: int, log: bool) -> torch.Tensor:
    """Softmax before opset 13: over all dimensions from ``axis`` on, as one."""
    flat = flatten_at(x, axis)
    out = torch.log_softmax(flat, 1) if log else torch.softmax(flat, 1)
    return out.reshape(x.shape)


def _unary(target: Any, *extra: Any) -> Translate:
    def translate(b: Builder, op: Op) -> list[Any]:
        return [b.call(target, need(op.input(0), "input"), *extra)]
    return translate


def _binary(target: Any) -> Translate:
    def translate(b: Builder, op: Op) -> list[Any]:
        return [b.call(target, need(op.input(0), "A"), need(op.input(1), "B"))]
    return translate


def _variadic(target: Any, mean: bool = False) -> Translate:
    def translate(b: Builder, op: Op) -> list[Any]:
        values = [v for v in op.inputs if v is not None]
        out = need(values[0] if values else None, "input")
        for value in values[1:]:
            out = b.call(target, out, value)
        return [b.call(A.div.Tensor, out, torch.tensor(float(len(values))))
                if mean and len(values) > 1 else out]
    return translate


def _div_op(b: Builder, op: Op) -> list[Any]:
    x, y = need(op.input(0), "A"), need(op.input(1), "B")
    dtype = op.dtype(0)
    if dtype is not None and dtype.is_floating_point:
        return [b.call(A.div.Tensor, x, y)]
    if dtype is not None:
        return [b.call(A.div.Tensor_mode, x, y, rounding_mode="trunc")]
    return [b.call(_div_any, x, y)]


def _pow(b: Builder, op: Op) -> list[Any]:
    x, y = need(op.input(0), "X"), need(op.input(1), "Y")
    exponent = const(y)
    if exponent is not None and exponent.numel() == 1 and op.dtype(0) in (None, torch.float32):
        return [b.call(A.pow.Tensor_Scalar, x, scalar(exponent))]
    return [b.call(A.pow.Tensor_Tensor, x, y)]


def _mod(b: Builder, op: Op) -> list[Any]:
    target = A.fmod.Tensor if op.attr("fmod", 0) else A.remainder.Tensor
    return [b.call(target, need(op.input(0), "A"), need(op.input(1), "B"))]


def _leaky_relu(b: Builder, op: Op) -> list[Any]:
    return [b.call(A.leaky_relu.default, need(op.input(0), "X"), op.attr("alpha", 0.01))]


def _elu(b: Builder, op: Op) -> list[Any]:
    return [b.call(A.elu.default, need(op.input(0), "X"), op.attr("alpha", 1.0), 1.0, 1.0)]


def _selu(b: Builder, op: Op) -> list[Any]:
    alpha = op.attr("alpha", 1.67326319217681884765625)
    gamma = op.attr("gamma", 1.05070102214813232421875)
    return [b.call(A.elu.default, need(op.input(0), "X"), alpha, gamma, 1.0)]


def _celu(b: Builder, op: Op) -> list[Any]:
    return [b.call(A.celu.default, need(op.input(0), "X"), op.attr("alpha", 1.0))]


def _softplus(b: Builder, op: Op) -> list[Any]:
    return [b.call(A.softplus.default, need(op.input(0), "X"), 1.0, 20.0)]


def _softsign(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "input")
    return [b.call(A.div.Tensor, x, b.call(A.add.Scalar, b.call(A.abs.default, x), 1.0))]


def _hard_sigmoid(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "X")
    alpha, beta = op.attr("alpha", 0.2), op.attr("beta", 0.5)
    if abs(alpha - 1 / 6) < 1e-7 and beta == 0.5:
        return [b.call(A.hardsigmoid.default, x)]
    scaled = b.call(A.add.Scalar, b.call(A.mul.Scalar, x, alpha), beta)
    return [b.call(A.clamp.default, scaled, 0.0, 1.0)]


def _gelu(b: Builder, op: Op) -> list[Any]:
    approximate = op.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise Problem(f"Gelu approximate={approximate!r}")
    return [b.call(A.gelu.default, need(op.input(0), "X"),
                   approximate="tanh" if approximate == "tanh" else "none")]


def _prelu(b: Builder, op: Op) -> list[Any]:
    x, slope = need(op.input(0), "X"), need(op.input(1), "slope")
    positive = b.call(A.gt.Scalar, x, 0.0)
    return [b.call(A.where.self, positive, x, b.call(A.mul.Tensor, x, slope))]


def _thresholded_relu(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "X")
    above = b.call(A.gt.Scalar, x, op.attr("alpha", 1.0))
    return [b.call(A.mul.Tensor, x, b.call(A._to_copy.default, above, dtype=torch.float32))]


def _clip(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "input")
    if op.opset < 11:
        low, high = op.attr("min"), op.attr("max")
    else:
        low, high = op.input(1), op.input(2)
        if isinstance(low, fx.Node) or isinstance(high, fx.Node):
            return [b.call(A.clamp.Tensor, x, low, high)]
        low, high = scalar(low), scalar(high)
    if low is None and high is None:
        return [x]
    return [b.call(A.clamp.default, x, low, high)]


def _softmax(log: bool) -> Translate:
    def translate(b: Builder, op: Op) -> list[Any]:
        x = need(op.input(0), "input")
        axis = op.attr("axis", -1 if op.opset >= 13 else 1)
        rank = op.rank(0)
        if op.opset < 13 and (rank is None or axis % rank != rank - 1):
            return [b.call(_softmax_2d, x, axis, log)]
        target = A._log_softmax.default if log else A._softmax.default
        return [b.call(target, x, axis, False)]
    return translate


def _matmul(b: Builder, op: Op) -> list[Any]:
    return [b.call(A.matmul.default, need(op.input(0), "A"), need(op.input(1), "B"))]


def _gemm(b: Builder, op: Op) -> list[Any]:
    a, w, c = need(op.input(0), "A"), need(op.input(1), "B"), op.input(2)
    alpha, beta = op.attr("alpha", 1.0), op.attr("beta", 1.0)
    trans_a, trans_b = op.attr("transA", 0), op.attr("transB", 0)
    c_shape = op.shape(2)
    if (not trans_a and trans_b and alpha == 1.0 and beta == 1.0
            and (c is None or (c_shape is not None and len(c_shape) == 1))):
        return [b.call(A.linear.default, a, w, c)]
    if trans_a:
        a = b.call(A.t.default, a)
    if trans_b:
        w = b.call(A.t.default, w)
    out = b.call(A.mm.default, a, w)
    if alpha != 1.0:
        out = b.call(A.mul.Scalar, out, alpha)
    if c is not None:
        out = b.call(A.add.Tensor, out, c if beta == 1.0 else b.call(A.mul.Scalar, c, beta))
    return [out]


def _einsum(b: Builder, op: Op) -> list[Any]:
    equation = op.attr("equation", "")
    if not re.fullmatch(r"[A-Za-z,.\->\s]*", equation):
        raise Problem("Einsum equation with characters other than letters, ',', '->', '...'")
    return [b.call(A.einsum.default, equation, [v for v in op.inputs if v is not None])]


def _where(b: Builder, op: Op) -> list[Any]:
    return [b.call(A.where.self, *(need(op.input(i), "Where input") for i in range(3)))]


def _arg(target: Any) -> Translate:
    def translate(b: Builder, op: Op) -> list[Any]:
        if op.attr("select_last_index", 0):
            raise Problem(f"{op.op_type} select_last_index=1")
        return [b.call(target, need(op.input(0), "data"), op.attr("axis", 0),
                       bool(op.attr("keepdims", 1)))]
    return translate


def _cumsum(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "x")
    axis = const_ints(op.input(1), "axis")
    if not axis:
        raise Problem("CumSum without axis")
    if op.attr("reverse", 0):
        x = b.call(A.flip.default, x, axis[:1])
    y = b.call(A.cumsum.default, x, axis[0])
    if op.attr("exclusive", 0):
        y = b.call(A.sub.Tensor, y, x)
    return [b.call(A.flip.default, y, axis[:1]) if op.attr("reverse", 0) else y]


_REDUCE: dict[str, Callable[[Builder, Value, list[int] | None, bool], Any]] = {
    "ReduceMean": lambda b, x, axes, keep: b.call(A.mean.dim, x, axes, keep),
    "ReduceSum": lambda b, x, axes, keep: b.call(A.sum.dim_IntList, x, axes, keep),
    "ReduceMax": lambda b, x, axes, keep: b.call(A.amax.default, x, axes or [], keep),
    "ReduceMin": lambda b, x, axes, keep: b.call(A.amin.default, x, axes or [], keep),
    "ReduceL1": lambda b, x, axes, keep: b.call(A.linalg_vector_norm.default, x, 1.0, axes,
                                                 keep),
    "ReduceL2": lambda b, x, axes, keep: b.call(A.linalg_vector_norm.default, x, 2.0, axes,
                                                 keep),
    "ReduceSumSquare": lambda b, x, axes, keep: b.call(
        A.sum.dim_IntList, b.call(A.mul.Tensor, x, x), axes, keep),
}


def _reduce(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "data")
    axes = axes_of(op, 1)
    keep = bool(op.attr("keepdims", 1))
    if not axes:
        if op.attr("noop_with_empty_axes", 0):
            return [x]
        axes = None
    if op.op_type in _REDUCE:
        return [_REDUCE[op.op_type](b, x, axes, keep)]
    if axes is None:
        rank = op.rank(0)
        if rank is None:
            raise Problem(f"{op.op_type} over all axes of an input of unknown rank")
        axes = list(range(rank))
    if op.op_type == "ReduceLogSumExp":
        return [b.call(A.logsumexp.default, x, axes, keep)]
    rank = op.rank(0)
    if rank is None and any(a < 0 for a in axes):
        raise Problem("ReduceProd with negative axes on an input of unknown rank")
    for axis in sorted((a % rank if rank else a for a in axes), reverse=True):
        x = b.call(A.prod.dim_int, x, axis, keep)
    return [x]


OPS: dict[str, Translate] = {
    "Relu": _unary(A.relu.default),
    "Sigmoid": _unary(A.sigmoid.default),
    "Tanh": _unary(A.tanh.default),
    "Exp": _unary(A.exp.default),
    "Log": _unary(A.log.default),
    "Sqrt": _unary(A.sqrt.default),
    "Neg": _unary(A.neg.default),
    "Abs": _unary(A.abs.default),
    "Reciprocal": _unary(A.reciprocal.default),
    "Erf": _unary(A.erf.default),
    "Floor": _unary(A.floor.default),
    "Ceil": _unary(A.ceil.default),
    "Round": _unary(A.round.default),
    "Sign": _unary(A.sign.default),
    "Sin": _unary(A.sin.default),
    "Cos": _unary(A.cos.default),
    "Tan": _unary(A.tan.default),
    "Asin": _unary(A.asin.default),
    "Acos": _unary(A.acos.default),
    "Atan": _unary(A.atan.default),
    "Sinh": _unary(A.sinh.default),
    "Cosh": _unary(A.cosh.default),
    "Not": _unary(A.logical_not.default),
    "IsNaN": _unary(A.isnan.default),
    "HardSwish": _unary(A.hardswish.default),
    "Mish": _unary(A.mish.default),
    "Softplus": _softplus,
    "Softsign": _softsign,
    "LeakyRelu": _leaky_relu,
    "Elu": _elu,
    "Selu": _selu,
    "Celu": _celu,
    "HardSigmoid": _hard_sigmoid,
    "Gelu": _gelu,
    "PRelu": _prelu,
    "ThresholdedRelu": _thresholded_relu,
    "Clip": _clip,
    "Softmax": _softmax(log=False),
    "LogSoftmax": _softmax(log=True),
    "Add": _binary(A.add.Tensor),
    "Sub": _binary(A.sub.Tensor),
    "Mul": _binary(A.mul.Tensor),
    "Div": _div_op,
    "Pow": _pow,
    "Mod": _mod,
    "Equal": _binary(A.eq.Tensor),
    "Greater": _binary(A.gt.Tensor),
    "Less": _binary(A.lt.Tensor),
    "GreaterOrEqual": _binary(A.ge.Tensor),
    "LessOrEqual": _binary(A.le.Tensor),
    "And": _binary(A.logical_and.default),
    "Or": _binary(A.logical_or.default),
    "Xor": _binary(A.logical_xor.default),
    "Max": _variadic(A.maximum.default),
    "Min": _variadic(A.minimum.default),
    "Sum": _variadic(A.add.Tensor),
    "Mean": _variadic(A.add.Tensor, mean=True),
    "Where": _where,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Einsum": _einsum,
    "ArgMax": _arg(A.argmax.default),
    "ArgMin": _arg(A.argmin.default),
    "CumSum": _cumsum,
    **{name: _reduce for name in (*_REDUCE, "ReduceLogSumExp", "ReduceProd")},
}
