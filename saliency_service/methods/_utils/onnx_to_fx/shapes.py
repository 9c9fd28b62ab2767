"""Shape arithmetic and layout ops (Shape, Gather, Concat, Reshape, Slice, Expand, Cast, …).

With constant arguments they become aten ops; arguments computed from the input's
runtime shape go to the helpers here, called from the generated graph (and when
folding), so the batch dimension stays free.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from onnx import TensorProto
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
    dim_of,
    need,
    scalar,
)
from saliency_service.methods._utils.onnx_to_fx.data import (
    INT_MAX,
    check_bytes,
    int_list,
    read_tensor,
    torch_dtype,
)
from saliency_service.methods._utils.onnx_to_fx.reasons import Problem


def _shape(x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """ONNX Shape: the dimensions ``start:end`` as an int64 vector."""
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


def _size(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64)


def _reshape(x: torch.Tensor, shape: torch.Tensor, allowzero: int = 0) -> torch.Tensor:
    """ONNX Reshape with a shape computed at run time (0 copies the input's dimension)."""
    dims = int_list(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _expand(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """ONNX Expand: broadcasts both ways (a 1 in ``shape`` keeps the input's dimension)."""
    target = torch.broadcast_shapes(tuple(x.shape), tuple(int_list(shape)))
    check_bytes(target, x.dtype)
    return x.expand(target)


def _tile(x: torch.Tensor, repeats: torch.Tensor) -> torch.Tensor:
    times = int_list(repeats)
    check_bytes([d * t for d, t in zip(x.shape, times, strict=False)], x.dtype)
    return x.repeat(times)


def _constant_of_shape(shape: torch.Tensor, value: float | int | bool,
                       dtype: torch.dtype) -> torch.Tensor:
    dims = int_list(shape)
    check_bytes(dims, dtype)
    return torch.full(dims, value, dtype=dtype)


def _range(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    first, last, step = start.item(), limit.item(), delta.item()
    if step == 0:
        raise ValueError("Range with a step of 0")
    count = max(math.ceil((last - first) / step), 0)
    check_bytes([count], start.dtype)
    return torch.arange(count, dtype=start.dtype) * step + first if count else \
        torch.zeros(0, dtype=start.dtype)


def _slice_one(x: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    """One axis of ONNX Slice (negative steps read the axis backwards)."""
    if step > 0:
        return torch.ops.aten.slice.Tensor(x, axis, start, min(end, INT_MAX), step)
    size = x.shape[axis]
    start = min(max(start + size if start < 0 else start, 0), size - 1)
    end = min(max(end + size if end < 0 else end, -1), size - 1)
    return torch.ops.aten.slice.Tensor(x.flip(axis), axis, size - 1 - start, size - 1 - end,
                                       -step)


def _slice(x: torch.Tensor, starts: Any, ends: Any, axes: Any, steps: Any) -> torch.Tensor:
    """ONNX Slice with starts, ends, axes or steps computed at run time."""
    starts, ends = int_list(starts), int_list(ends)
    axes = int_list(axes) if axes is not None else list(range(len(starts)))
    steps = int_list(steps) if steps is not None else [1] * len(starts)
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        x = _slice_one(x, axis, start, end, step)
    return x


def _split(x: torch.Tensor, sizes: Any, axis: int) -> list[torch.Tensor]:
    return list(torch.split(x, int_list(sizes), axis))


def _split_equal(x: torch.Tensor, parts: int, axis: int) -> list[torch.Tensor]:
    return list(torch.split(x, math.ceil(x.shape[axis] / parts), axis))


def _unsqueeze(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def flatten_at(x: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX Flatten: the dimensions before ``axis`` as one, those from it as another."""
    axis = axis % (x.dim() + 1) if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _gather_elements(x: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    index = index.long()
    return torch.gather(x, axis, torch.where(index < 0, index + x.shape[axis], index))


def _depth_to_space(x: torch.Tensor, block: int) -> torch.Tensor:
    """DepthToSpace in DCR mode (CRD mode is ``pixel_shuffle``)."""
    n, c, h, w = x.shape
    y = x.reshape(n, block, block, c // (block * block), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (block * block), h * block, w * block)


def _space_to_depth(x: torch.Tensor, block: int) -> torch.Tensor:
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * block * block, h // block, w // block)


def _reshape_op(b: Builder, op: Op) -> list[Any]:
    x, shape = need(op.input(0), "data"), need(op.input(1), "shape")
    allowzero = op.attr("allowzero", 0)
    dims = const_ints(shape, "shape", required=False)
    if dims is None:
        return [b.call(_reshape, x, shape, allowzero)]
    if not allowzero:
        dims = [dim_of(b, op, x, i) if d == 0 else d for i, d in enumerate(dims)]
    return [b.call(A.reshape.default, x, dims)]


def _flatten_op(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "input")
    axis, rank = op.attr("axis", 1), op.rank(0)
    if axis < 0 and rank is not None:
        axis += rank
    if axis < 0 or (rank is not None and axis >= rank):
        return [b.call(flatten_at, x, axis)]
    if axis == 0:
        return [b.call(A.reshape.default, x, [1, -1])]
    y = b.call(A.flatten.using_ints, x, axis, -1)
    return [b.call(A.flatten.using_ints, y, 0, axis - 1) if axis > 1 else y]


def _transpose(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "data")
    perm = op.attr("perm")
    if perm is None:
        rank = op.rank(0)
        if rank is None:
            raise Problem("Transpose without perm on an input of unknown rank")
        perm = list(reversed(range(rank)))
    return [b.call(A.permute.default, x, list(perm))]


def _concat(b: Builder, op: Op) -> list[Any]:
    values = [v for v in op.inputs if v is not None]
    return [b.call(A.cat.default, values, op.attr("axis", 0))]


def _split_op(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "input")
    axis, count = op.attr("axis", 0), len(op.used)
    sizes = op.attr("split")
    if sizes is None and op.input(1) is not None:
        sizes = const_ints(op.input(1), "split", required=False)
        if sizes is None:
            return b.items(b.call(_split, x, op.input(1), axis), count)
    if sizes is not None:
        return b.items(b.call(A.split_with_sizes.default, x, list(sizes), axis), count)
    parts, size = op.attr("num_outputs", count), op.dim(0, axis)
    if size is None:
        return b.items(b.call(_split_equal, x, parts, axis), count)
    return b.items(b.call(A.split.Tensor, x, -(-size // parts), axis), count)


def _slice_op(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "data")
    if op.opset < 10:
        starts, ends = op.attr("starts"), op.attr("ends")
        axes, steps = op.attr("axes"), None
    else:
        raw = [op.input(i) for i in range(1, 5)]
        if any(isinstance(v, fx.Node) for v in raw):
            return [b.call(_slice, x, *raw)]
        starts, ends, axes, steps = (const_ints(v, "Slice argument") for v in raw)
    if starts is None or ends is None:
        raise Problem("Slice without starts or ends")
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        if step == 0:
            raise Problem("Slice with a step of 0")
        if step > 0:
            x = b.call(A.slice.Tensor, x, axis, start, min(end, INT_MAX), step)
        else:
            x = b.call(_slice_one, x, axis, start, end, step)
    return [x]


def _gather(b: Builder, op: Op) -> list[Any]:
    x, index = need(op.input(0), "data"), need(op.input(1), "indices")
    axis, rank = op.attr("axis", 0), op.rank(0)
    if axis < 0:
        if rank is None:
            raise Problem("Gather with a negative axis on an input of unknown rank")
        axis += rank
    constant = const(index)
    if constant is not None and constant.dim() == 0:
        return [b.call(A.select.int, x, axis, int(constant))]
    if constant is not None:
        index = constant.long()
    elif op.dtype(1) != torch.int64:
        index = b.call(A._to_copy.default, index, dtype=torch.int64)
    return [b.call(A.index.Tensor, x, [None] * axis + [index])]


def _gather_elements_op(b: Builder, op: Op) -> list[Any]:
    return [b.call(_gather_elements, need(op.input(0), "data"), need(op.input(1), "indices"),
                   op.attr("axis", 0))]


def _squeeze(b: Builder, op: Op) -> list[Any]:
    x, axes = need(op.input(0), "data"), axes_of(op, 1)
    if axes is None:
        return [b.call(A.squeeze.default, x)]
    return [b.call(A.squeeze.dims, x, axes)]


def _unsqueeze_op(b: Builder, op: Op) -> list[Any]:
    x, axes = need(op.input(0), "data"), axes_of(op, 1)
    if not axes:
        raise Problem("Unsqueeze without axes")
    rank = op.rank(0)
    if any(a < 0 for a in axes):
        if rank is None:
            return [b.call(_unsqueeze, x, axes)]
        axes = [a % (rank + len(axes)) for a in axes]
    for axis in sorted(axes):
        x = b.call(A.unsqueeze.default, x, axis)
    return [x]


def _expand_op(b: Builder, op: Op) -> list[Any]:
    x, shape = need(op.input(0), "input"), need(op.input(1), "shape")
    dims, rank = const_ints(shape, "shape", required=False), op.rank(0)
    if dims is None or rank is None:
        return [b.call(_expand, x, shape)]
    target = [-1] * (rank - len(dims)) + list(dims)
    offset = len(target) - rank
    target = [-1 if (i >= offset and d == 1) else d for i, d in enumerate(target)]
    return [b.call(A.expand.default, x, target)]


def _tile_op(b: Builder, op: Op) -> list[Any]:
    x, repeats = need(op.input(0), "input"), need(op.input(1), "repeats")
    times = const_ints(repeats, "repeats", required=False)
    if times is None or isinstance(x, torch.Tensor):
        return [b.call(_tile, x, repeats)]
    return [b.call(A.repeat.default, x, times)]


def _shape_op(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "data")
    start, end = op.attr("start", 0), op.attr("end")
    shape = op.shape(0)
    if shape is not None:
        part = shape[start:end]
        if all(d is not None for d in part):
            return [torch.tensor(part, dtype=torch.int64)]
    return [b.call(_shape, x, start, end)]


def _size_op(b: Builder, op: Op) -> list[Any]:
    shape = op.shape(0)
    if shape is not None and all(d is not None for d in shape):
        return [torch.tensor(math.prod(shape), dtype=torch.int64)]  # type: ignore[arg-type]
    return [b.call(_size, need(op.input(0), "data"))]


def _fill_value(op: Op) -> tuple[float | int | bool, torch.dtype]:
    proto = op.attr("value")
    if proto is None:
        return 0.0, torch.float32
    value = read_tensor(proto, "ConstantOfShape value")
    return value.reshape(-1)[0].item(), value.dtype


def _constant_of_shape_op(b: Builder, op: Op) -> list[Any]:
    value, dtype = _fill_value(op)
    return [b.call(_constant_of_shape, need(op.input(0), "input"), value, dtype)]


def _constant(b: Builder, op: Op) -> list[Any]:
    if "value" in op.attrs and isinstance(op.attrs["value"], TensorProto):
        return [read_tensor(op.attrs["value"], "Constant value")]
    simple = {"value_float": torch.float32, "value_floats": torch.float32,
              "value_int": torch.int64, "value_ints": torch.int64}
    for name, dtype in simple.items():
        if name in op.attrs:
            return [torch.tensor(op.attrs[name], dtype=dtype)]
    raise Problem(f"Constant with attributes {sorted(op.attrs)}")


def _identity(b: Builder, op: Op) -> list[Any]:
    return [need(op.input(0), "input")]


def _dropout(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "data")
    training = scalar(const(op.input(2))) if op.input(2) is not None else 0
    if isinstance(op.input(2), fx.Node) or training:
        raise Problem("Dropout in training mode")
    outputs = [x]
    if len(op.used) > 1 and op.used[1]:
        outputs.append(b.call(A.ones_like.default, x, dtype=torch.bool))
    return outputs


def _cast_to(b: Builder, x: Value, dtype: torch.dtype, current: torch.dtype | None) -> Any:
    if current == dtype:
        return x
    return b.call(A._to_copy.default, x, dtype=dtype)


def _cast(b: Builder, op: Op) -> list[Any]:
    dtype = torch_dtype(op.attr("to", TensorProto.FLOAT))
    return [_cast_to(b, need(op.input(0), "input"), dtype, op.dtype(0))]


def _cast_like(b: Builder, op: Op) -> list[Any]:
    dtype = op.dtype(1)
    if dtype is None:
        raise Problem("CastLike to a type not known before running")
    return [_cast_to(b, need(op.input(0), "input"), dtype, op.dtype(0))]


def _range_op(b: Builder, op: Op) -> list[Any]:
    return [b.call(_range, *(need(op.input(i), "Range input") for i in range(3)))]


def _depth_to_space_op(b: Builder, op: Op) -> list[Any]:
    x, block = need(op.input(0), "input"), op.attr("blocksize", 1)
    if op.attr("mode", "DCR") == "CRD":
        return [b.call(A.pixel_shuffle.default, x, block)]
    return [b.call(_depth_to_space, x, block)]


def _space_to_depth_op(b: Builder, op: Op) -> list[Any]:
    return [b.call(_space_to_depth, need(op.input(0), "input"), op.attr("blocksize", 1))]


OPS: dict[str, Translate] = {
    "Reshape": _reshape_op,
    "Flatten": _flatten_op,
    "Transpose": _transpose,
    "Concat": _concat,
    "Split": _split_op,
    "Slice": _slice_op,
    "Gather": _gather,
    "GatherElements": _gather_elements_op,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze_op,
    "Expand": _expand_op,
    "Tile": _tile_op,
    "Shape": _shape_op,
    "Size": _size_op,
    "ConstantOfShape": _constant_of_shape_op,
    "Constant": _constant,
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Range": _range_op,
    "DepthToSpace": _depth_to_space_op,
    "SpaceToDepth": _space_to_depth_op,
}
