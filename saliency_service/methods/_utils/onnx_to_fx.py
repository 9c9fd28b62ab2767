"""Translates an ONNX graph into a differentiable ``torch.fx`` GraphModule of aten ops.

Gradient methods need a torch graph; ONNX files from any exporter can give one without a
``torch.export`` archive. The file is read as plain data: each node's op type is looked up in
a fixed table of translation functions written here, attributes are numbers, strings and
tensors, and nothing from the file is ever run as code (no eval, exec, pickle or attribute
lookup by a name from the file; node and buffer names in the FX graph are our own).

The graph uses the aten overloads that :mod:`torch_program`'s passes rewrite (``conv2d``,
``batch_norm``, ``relu``, ``add.Tensor``), so BatchNorm folding, guided ReLUs, Grad-CAM cuts,
the stem split and channels-last weights work on it as on a ``torch.export`` program.

Nodes whose inputs are all constants are computed once here and stored as buffers. Shape
arithmetic on the input's runtime shape (``Shape → Gather → Concat → Reshape``) stays in the
graph as small int64 computations, so the batch dimension stays free. ``node.meta["val"]``
holds a fake tensor with a symbolic batch size when the input's other dimensions are fixed.

Use: ``torch_program.build_variant(GraphProgram(to_graph_module(onnx.load(path))), variant)``.
"""

from __future__ import annotations

import copy
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import AttributeProto, TensorProto, numpy_helper
from torch import fx

__all__ = ["MAX_BYTES", "GraphProgram", "UnsupportedGraph", "to_graph_module",
           "unsupported_operators"]

A = torch.ops.aten
Value = torch.Tensor | fx.Node
MAX_BYTES = 2**31  # refuse constants (and runtime shape-made tensors) larger than this
_DEFAULT_DOMAINS = ("", "ai.onnx")
_INT_MAX = 2**63 - 1


class UnsupportedGraph(ValueError):
    """The ONNX graph uses operators, attributes or data this translator does not handle."""


class _Problem(Exception):
    """One node cannot be translated; collected into :class:`UnsupportedGraph`."""


# --------------------------------------------------------------------------- data types

_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float32,  # the service computes in float32
    TensorProto.FLOAT16: torch.float32,
    TensorProto.BFLOAT16: torch.float32,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT8: torch.int8,
    TensorProto.INT16: torch.int16,
    TensorProto.UINT16: torch.int32,
    TensorProto.INT32: torch.int32,
    TensorProto.UINT32: torch.int64,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}
_ITEM_BYTES = {TensorProto.DOUBLE: 8, TensorProto.INT64: 8, TensorProto.UINT64: 8,
               TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.INT16: 2,
               TensorProto.UINT16: 2, TensorProto.UINT8: 1, TensorProto.INT8: 1,
               TensorProto.BOOL: 1}


def _torch_dtype(elem_type: int) -> torch.dtype:
    if elem_type not in _DTYPES:
        name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() \
            else str(elem_type)
        raise _Problem(f"tensor type {name}")
    return _DTYPES[elem_type]


def _tensor(proto: TensorProto, what: str) -> torch.Tensor:
    """A tensor from its protobuf, refusing external files, strings and absurd sizes."""
    if proto.data_location == TensorProto.EXTERNAL or proto.external_data:
        raise _Problem(f"{what} keeps its data in an external file (load the model with it)")
    if proto.HasField("segment"):
        raise _Problem(f"{what} is a segmented tensor")
    dtype = _torch_dtype(proto.data_type)
    dims = [int(d) for d in proto.dims]
    if any(d < 0 for d in dims):
        raise _Problem(f"{what} has a negative dimension")
    if math.prod(dims) * _ITEM_BYTES.get(proto.data_type, 4) > MAX_BYTES:
        raise _Problem(f"{what} is larger than {MAX_BYTES} bytes")
    try:
        array = numpy_helper.to_array(proto)
    except Exception as exc:  # malformed data: wrong length, unknown encoding
        raise _Problem(f"{what} cannot be read: {exc}") from exc
    if array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)
    elif array.dtype in (np.uint16, np.uint32, np.uint64):
        array = array.astype(np.int64)
    return torch.from_numpy(np.array(array, copy=True)).to(dtype)


def _check_bytes(shape: Sequence[int], dtype: torch.dtype) -> None:
    if any(int(d) < 0 for d in shape):
        raise ValueError(f"negative size in shape {list(shape)}")
    size = math.prod(int(d) for d in shape) * torch.empty((), dtype=dtype).element_size()
    if size > MAX_BYTES:
        raise ValueError(f"a tensor of shape {list(shape)} is larger than {MAX_BYTES} bytes")


# --------------------------------------------------------------------------- attributes

@dataclass(frozen=True)
class _Subgraph:
    """Marks a graph-valued attribute (Loop, If, Scan bodies): never translated."""


def _attribute(attr: AttributeProto) -> Any:
    kind = attr.type
    if kind == AttributeProto.FLOAT:
        return float(attr.f)
    if kind == AttributeProto.INT:
        return int(attr.i)
    if kind == AttributeProto.STRING:
        return attr.s.decode("utf-8", "replace")
    if kind == AttributeProto.TENSOR:
        return attr.t  # decoded on use, with the size checks of _tensor
    if kind == AttributeProto.FLOATS:
        return [float(v) for v in attr.floats]
    if kind == AttributeProto.INTS:
        return [int(v) for v in attr.ints]
    if kind == AttributeProto.STRINGS:
        return [s.decode("utf-8", "replace") for s in attr.strings]
    if kind in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
        return _Subgraph()
    return None  # sparse tensors, type protos: only ever rejected by the op that reads them


# The type each attribute the translations read must have ("value" differs between ops).
_ATTRIBUTE_KINDS: dict[str, str] = {
    **dict.fromkeys(("axis", "group", "keepdims", "transA", "transB", "ceil_mode",
                     "count_include_pad", "allowzero", "blocksize", "num_outputs",
                     "select_last_index", "reverse", "exclusive", "noop_with_empty_axes",
                     "exclude_outside", "antialias", "training_mode", "fmod", "size",
                     "num_groups", "start", "end", "to", "p", "value_int"), "int"),
    **dict.fromkeys(("alpha", "beta", "gamma", "epsilon", "momentum", "bias", "min", "max",
                     "cubic_coeff_a", "value_float"), "float"),
    **dict.fromkeys(("auto_pad", "mode", "approximate", "coordinate_transformation_mode",
                     "nearest_mode", "keep_aspect_ratio_policy", "equation"), "str"),
    **dict.fromkeys(("kernel_shape", "strides", "dilations", "pads", "perm", "axes", "split",
                     "output_shape", "output_padding", "starts", "ends", "value_ints"), "ints"),
    **dict.fromkeys(("scales", "value_floats"), "floats"),
}


_FITS: dict[str | None, Callable[[Any], bool]] = {
    None: lambda v: True,
    "int": lambda v: isinstance(v, int),
    "float": lambda v: isinstance(v, int | float),
    "str": lambda v: isinstance(v, str),
    "ints": lambda v: isinstance(v, list) and all(isinstance(i, int) for i in v),
    "floats": lambda v: isinstance(v, list) and all(isinstance(i, int | float) for i in v),
}


def _checked(name: str, value: Any) -> Any:
    """``value`` if it has the type ``name`` must have (ints read as floats where needed)."""
    kind = _ATTRIBUTE_KINDS.get(name)
    if not _FITS[kind](value):
        raise _Problem(f"attribute {name} of the wrong type")
    return float(value) if kind == "float" else value


# --------------------------------------------------------------------------- runtime helpers
# Called from the generated graph on shapes only known at run time (and when folding).


def _ints(value: Any) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def _shape(x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """ONNX Shape: the dimensions ``start:end`` as an int64 vector."""
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


def _size(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64)


def _reshape(x: torch.Tensor, shape: torch.Tensor, allowzero: int = 0) -> torch.Tensor:
    """ONNX Reshape with a shape computed at run time (0 copies the input's dimension)."""
    dims = _ints(shape)
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _expand(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """ONNX Expand: broadcasts both ways (a 1 in ``shape`` keeps the input's dimension)."""
    target = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))
    _check_bytes(target, x.dtype)
    return x.expand(target)


def _tile(x: torch.Tensor, repeats: torch.Tensor) -> torch.Tensor:
    times = _ints(repeats)
    _check_bytes([d * t for d, t in zip(x.shape, times, strict=False)], x.dtype)
    return x.repeat(times)


def _constant_of_shape(shape: torch.Tensor, value: float | int | bool,
                       dtype: torch.dtype) -> torch.Tensor:
    dims = _ints(shape)
    _check_bytes(dims, dtype)
    return torch.full(dims, value, dtype=dtype)


def _range(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    first, last, step = start.item(), limit.item(), delta.item()
    if step == 0:
        raise ValueError("Range with a step of 0")
    count = max(math.ceil((last - first) / step), 0)
    _check_bytes([count], start.dtype)
    return torch.arange(count, dtype=start.dtype) * step + first if count else \
        torch.zeros(0, dtype=start.dtype)


def _slice_one(x: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    """One axis of ONNX Slice (negative steps read the axis backwards)."""
    if step > 0:
        return torch.ops.aten.slice.Tensor(x, axis, start, min(end, _INT_MAX), step)
    size = x.shape[axis]
    start = min(max(start + size if start < 0 else start, 0), size - 1)
    end = min(max(end + size if end < 0 else end, -1), size - 1)
    return torch.ops.aten.slice.Tensor(x.flip(axis), axis, size - 1 - start, size - 1 - end,
                                       -step)


def _slice(x: torch.Tensor, starts: Any, ends: Any, axes: Any, steps: Any) -> torch.Tensor:
    """ONNX Slice with starts, ends, axes or steps computed at run time."""
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        x = _slice_one(x, axis, start, end, step)
    return x


def _split(x: torch.Tensor, sizes: Any, axis: int) -> list[torch.Tensor]:
    return list(torch.split(x, _ints(sizes), axis))


def _split_equal(x: torch.Tensor, parts: int, axis: int) -> list[torch.Tensor]:
    return list(torch.split(x, math.ceil(x.shape[axis] / parts), axis))


def _unsqueeze(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _flatten(x: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis % (x.dim() + 1) if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _global_pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    dims = list(range(2, x.dim()))
    return x.mean(dims, keepdim=True) if kind == "avg" else x.amax(dims, keepdim=True)


def _softmax_2d(x: torch.Tensor, axis: int, log: bool) -> torch.Tensor:
    """Softmax before opset 13: over all dimensions from ``axis`` on, as one."""
    flat = _flatten(x, axis)
    out = torch.log_softmax(flat, 1) if log else torch.softmax(flat, 1)
    return out.reshape(x.shape)


def _layer_norm(x: torch.Tensor, axis: int, weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    dims = list(range(axis % x.dim(), x.dim()))
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    out = centered * torch.rsqrt(centered.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out + bias if bias is not None else out


def _pad(x: torch.Tensor, pads: Any, value: Any, mode: str, axes: Any) -> torch.Tensor:
    """ONNX Pad with pads computed at run time."""
    amounts = _ints(pads)
    count = len(amounts) // 2
    axes_list = _ints(axes) if axes is not None else list(range(count))
    begin, end = [0] * x.dim(), [0] * x.dim()
    for i, axis in enumerate(axes_list):
        begin[axis], end[axis] = amounts[i], amounts[i + count]
    torch_pads = _torch_pads(begin, end)
    fill = float(value.item()) if isinstance(value, torch.Tensor) else float(value or 0.0)
    if mode == "constant":
        return torch.constant_pad_nd(x, torch_pads, fill)
    return torch.nn.functional.pad(x, torch_pads, mode=_PAD_MODES[mode])


def _depth_to_space(x: torch.Tensor, block: int) -> torch.Tensor:
    """DepthToSpace in DCR mode (CRD mode is ``pixel_shuffle``)."""
    n, c, h, w = x.shape
    y = x.reshape(n, block, block, c // (block * block), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (block * block), h * block, w * block)


def _space_to_depth(x: torch.Tensor, block: int) -> torch.Tensor:
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * block * block, h // block, w // block)


def _gather_elements(x: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    index = index.long()
    return torch.gather(x, axis, torch.where(index < 0, index + x.shape[axis], index))


def _div_any(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ONNX Div on operands of unknown type: integers divide with truncation."""
    if a.is_floating_point() or b.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


def _source_coordinates(size: int, out: int, scale: float, mode: str) -> torch.Tensor:
    """Where each output position of a Resize reads from (ONNX's coordinate transforms)."""
    i = torch.arange(out, dtype=torch.float64)
    if mode == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (i + 0.5) / scale - 0.5 if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "align_corners":
        return i * (size - 1) / (out - 1) if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "asymmetric":
        return i / scale
    if mode == "tf_half_pixel_for_nn":
        return (i + 0.5) / scale
    # half_pixel_symmetric
    adjustment = out / (scale * size)
    return size / 2 * (1 - adjustment) + (i + 0.5) / scale - 0.5


def _nearest_index(coords: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if mode == "round_prefer_floor":
        index = torch.ceil(coords - 0.5)
    elif mode == "round_prefer_ceil":
        index = torch.floor(coords + 0.5)
    elif mode == "floor":
        index = torch.floor(coords)
    else:
        index = torch.ceil(coords)
    return index.clamp(0, size - 1).long()


def _cubic_weights(t: torch.Tensor, a: float) -> list[torch.Tensor]:
    def near(s: torch.Tensor) -> torch.Tensor:
        return ((a + 2) * s - (a + 3)) * s * s + 1

    def far(s: torch.Tensor) -> torch.Tensor:
        return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _along(weights: torch.Tensor, axis: int, x: torch.Tensor) -> torch.Tensor:
    return weights.to(x.dtype).reshape([-1] + [1] * (x.dim() - axis - 1))


def _resample(x: torch.Tensor, axis: int, coords: torch.Tensor, size: int, mode: str,
              nearest: str, cubic_a: float, exclude_outside: bool) -> torch.Tensor:
    if mode == "nearest":
        return x.index_select(axis, _nearest_index(coords, size, nearest))
    if mode == "linear":
        coords = coords.clamp(0, size - 1)
        low = coords.floor()
        high = (low + 1).clamp(max=size - 1).long()
        w = _along(coords - low, axis, x)
        return x.index_select(axis, low.long()) * (1 - w) + x.index_select(axis, high) * w
    base = coords.floor()
    weights = _cubic_weights(coords - base, cubic_a)
    taps = [base + k for k in (-1, 0, 1, 2)]
    if exclude_outside:
        weights = [w * ((t >= 0) & (t <= size - 1)) for w, t in zip(weights, taps, strict=True)]
        total = sum(weights)
        weights = [w / total for w in weights]
    out = None
    for w, t in zip(weights, taps, strict=True):
        term = x.index_select(axis, t.clamp(0, size - 1).long()) * _along(w, axis, x)
        out = term if out is None else out + term
    return out


def _resize(x: torch.Tensor, scales: Any, sizes: Any, mode: str, coordinate: str,
            nearest: str, cubic_a: float, exclude_outside: int) -> torch.Tensor:
    """ONNX Resize, one axis after the other (nearest, linear and cubic are separable)."""
    scale_list = x.new_tensor(scales).tolist() if scales is not None else None
    size_list = _ints(sizes) if sizes is not None else None
    for axis in range(x.dim()):
        size = x.shape[axis]
        if size_list is not None:
            out = size_list[axis]
            scale = out / size
        else:
            scale = float(scale_list[axis])
            out = math.floor(size * scale)
        if out == size and scale == 1.0:
            continue
        _check_bytes([*x.shape[:axis], out, *x.shape[axis + 1:]], x.dtype)
        coords = _source_coordinates(size, out, scale, coordinate)
        x = _resample(x, axis, coords, size, mode, nearest, cubic_a, bool(exclude_outside))
    return x


def _lrn(x: torch.Tensor, size: int, alpha: float, beta: float, bias: float) -> torch.Tensor:
    return torch.nn.functional.local_response_norm(x, size, alpha, beta, bias)


_PAD_MODES = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _torch_pads(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX's per-axis begins and ends as torch's pad list (last axis first)."""
    pads: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        pads += [int(b), int(e)]
    while len(pads) > 2 and pads[-1] == 0 and pads[-2] == 0:
        pads = pads[:-2]
    return pads


# --------------------------------------------------------------------------- builder


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
                raise _Problem(f"folding {target} would make more than {MAX_BYTES} bytes")
        try:
            result = target(*args, **kwargs)
        except _Problem:
            raise
        except Exception as exc:
            raise _Problem(f"cannot compute on constants: {exc}") from exc
    if isinstance(result, torch.Tensor):
        return result.contiguous()
    if isinstance(result, list | tuple):
        return [r.contiguous() if isinstance(r, torch.Tensor) else r for r in result]
    return result


class _Builder:
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
class _Op:
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


def _const(value: Value | None) -> torch.Tensor | None:
    return value if isinstance(value, torch.Tensor) else None


def _const_ints(value: Value | None, what: str, required: bool = True) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return _ints(value)
    if required:
        raise _Problem(f"{what} computed at run time")
    return None


def _scalar(value: Value | None) -> float | int | bool | None:
    if not isinstance(value, torch.Tensor):
        return None
    if value.numel() != 1:
        raise _Problem(f"expected one value, got shape {list(value.shape)}")
    item = value.reshape(()).item()
    return item


def _need(value: Value | None, what: str) -> Value:
    if value is None:
        raise _Problem(f"missing {what}")
    return value


# --------------------------------------------------------------------------- translations

_Translate = Callable[[_Builder, _Op], list[Any]]


def _unary(target: Any, *extra: Any) -> _Translate:
    def translate(b: _Builder, op: _Op) -> list[Any]:
        return [b.call(target, _need(op.input(0), "input"), *extra)]
    return translate


def _binary(target: Any) -> _Translate:
    def translate(b: _Builder, op: _Op) -> list[Any]:
        return [b.call(target, _need(op.input(0), "A"), _need(op.input(1), "B"))]
    return translate


def _variadic(target: Any, mean: bool = False) -> _Translate:
    def translate(b: _Builder, op: _Op) -> list[Any]:
        values = [v for v in op.inputs if v is not None]
        out = _need(values[0] if values else None, "input")
        for value in values[1:]:
            out = b.call(target, out, value)
        return [b.call(A.div.Tensor, out, torch.tensor(float(len(values))))
                if mean and len(values) > 1 else out]
    return translate


def _div_op(b: _Builder, op: _Op) -> list[Any]:
    x, y = _need(op.input(0), "A"), _need(op.input(1), "B")
    dtype = op.dtype(0)
    if dtype is not None and dtype.is_floating_point:
        return [b.call(A.div.Tensor, x, y)]
    if dtype is not None:
        return [b.call(A.div.Tensor_mode, x, y, rounding_mode="trunc")]
    return [b.call(_div_any, x, y)]


def _pow(b: _Builder, op: _Op) -> list[Any]:
    x, y = _need(op.input(0), "X"), _need(op.input(1), "Y")
    exponent = _const(y)
    if exponent is not None and exponent.numel() == 1 and op.dtype(0) in (None, torch.float32):
        return [b.call(A.pow.Tensor_Scalar, x, _scalar(exponent))]
    return [b.call(A.pow.Tensor_Tensor, x, y)]


def _mod(b: _Builder, op: _Op) -> list[Any]:
    target = A.fmod.Tensor if op.attr("fmod", 0) else A.remainder.Tensor
    return [b.call(target, _need(op.input(0), "A"), _need(op.input(1), "B"))]


def _leaky_relu(b: _Builder, op: _Op) -> list[Any]:
    return [b.call(A.leaky_relu.default, _need(op.input(0), "X"), op.attr("alpha", 0.01))]


def _elu(b: _Builder, op: _Op) -> list[Any]:
    return [b.call(A.elu.default, _need(op.input(0), "X"), op.attr("alpha", 1.0), 1.0, 1.0)]


def _selu(b: _Builder, op: _Op) -> list[Any]:
    alpha = op.attr("alpha", 1.67326319217681884765625)
    gamma = op.attr("gamma", 1.05070102214813232421875)
    return [b.call(A.elu.default, _need(op.input(0), "X"), alpha, gamma, 1.0)]


def _celu(b: _Builder, op: _Op) -> list[Any]:
    return [b.call(A.celu.default, _need(op.input(0), "X"), op.attr("alpha", 1.0))]


def _softplus(b: _Builder, op: _Op) -> list[Any]:
    return [b.call(A.softplus.default, _need(op.input(0), "X"), 1.0, 20.0)]


def _softsign(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "input")
    return [b.call(A.div.Tensor, x, b.call(A.add.Scalar, b.call(A.abs.default, x), 1.0))]


def _hard_sigmoid(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "X")
    alpha, beta = op.attr("alpha", 0.2), op.attr("beta", 0.5)
    if abs(alpha - 1 / 6) < 1e-7 and beta == 0.5:
        return [b.call(A.hardsigmoid.default, x)]
    scaled = b.call(A.add.Scalar, b.call(A.mul.Scalar, x, alpha), beta)
    return [b.call(A.clamp.default, scaled, 0.0, 1.0)]


def _gelu(b: _Builder, op: _Op) -> list[Any]:
    approximate = op.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise _Problem(f"Gelu approximate={approximate!r}")
    return [b.call(A.gelu.default, _need(op.input(0), "X"),
                   approximate="tanh" if approximate == "tanh" else "none")]


def _prelu(b: _Builder, op: _Op) -> list[Any]:
    x, slope = _need(op.input(0), "X"), _need(op.input(1), "slope")
    positive = b.call(A.gt.Scalar, x, 0.0)
    return [b.call(A.where.self, positive, x, b.call(A.mul.Tensor, x, slope))]


def _thresholded_relu(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "X")
    above = b.call(A.gt.Scalar, x, op.attr("alpha", 1.0))
    return [b.call(A.mul.Tensor, x, b.call(A._to_copy.default, above, dtype=torch.float32))]


def _clip(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "input")
    if op.opset < 11:
        low, high = op.attr("min"), op.attr("max")
    else:
        low, high = op.input(1), op.input(2)
        if isinstance(low, fx.Node) or isinstance(high, fx.Node):
            return [b.call(A.clamp.Tensor, x, low, high)]
        low, high = _scalar(low), _scalar(high)
    if low is None and high is None:
        return [x]
    return [b.call(A.clamp.default, x, low, high)]


def _softmax(log: bool) -> _Translate:
    def translate(b: _Builder, op: _Op) -> list[Any]:
        x = _need(op.input(0), "input")
        axis = op.attr("axis", -1 if op.opset >= 13 else 1)
        rank = op.rank(0)
        if op.opset < 13 and (rank is None or axis % rank != rank - 1):
            return [b.call(_softmax_2d, x, axis, log)]
        target = A._log_softmax.default if log else A._softmax.default
        return [b.call(target, x, axis, False)]
    return translate


def _matmul(b: _Builder, op: _Op) -> list[Any]:
    return [b.call(A.matmul.default, _need(op.input(0), "A"), _need(op.input(1), "B"))]


def _gemm(b: _Builder, op: _Op) -> list[Any]:
    a, w, c = _need(op.input(0), "A"), _need(op.input(1), "B"), op.input(2)
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


def _einsum(b: _Builder, op: _Op) -> list[Any]:
    equation = op.attr("equation", "")
    if not re.fullmatch(r"[A-Za-z,.\->\s]*", equation):
        raise _Problem("Einsum equation with characters other than letters, ',', '->', '...'")
    return [b.call(A.einsum.default, equation, [v for v in op.inputs if v is not None])]


# ---- convolution and pooling


def _auto_pads(op: _Op, kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """Begin and end pads of a Conv or pool from ``pads`` or ``auto_pad``."""
    nd = len(kernel)
    auto = op.attr("auto_pad", "NOTSET")
    if auto == "VALID":
        return [0] * nd, [0] * nd
    if auto in ("NOTSET", ""):
        pads = op.attr("pads", [0] * 2 * nd)
        if len(pads) != 2 * nd:
            raise _Problem(f"{op.op_type} pads of length {len(pads)} for {nd} axes")
        return list(pads[:nd]), list(pads[nd:])
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise _Problem(f"{op.op_type} auto_pad={auto!r}")
    begin, end = [], []
    for axis in range(nd):
        span = (kernel[axis] - 1) * dilations[axis] + 1
        size = op.dim(0, axis + 2)
        if strides[axis] == 1:
            total = span - 1
        elif size is None:
            raise _Problem(f"{op.op_type} auto_pad={auto} with stride > 1 on an input of "
                           "unknown size")
        else:
            out = -(-size // strides[axis])
            total = max((out - 1) * strides[axis] + span - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin, end


def _pad_apart(b: _Builder, x: Value, begin: list[int], end: list[int], fill: float,
               limits: Sequence[int] | None = None) -> tuple[Value, list[int]]:
    """Keeps the symmetric part of the pads for the op (at most ``limits``), and pads the
    rest explicitly; returns the padded input and the op's own padding."""
    common = [min(p, q) for p, q in zip(begin, end, strict=True)]
    if limits is not None and any(c > lim for c, lim in zip(common, limits, strict=True)):
        common = [0] * len(common)
    extra_begin = [p - c for p, c in zip(begin, common, strict=True)]
    extra_end = [q - c for q, c in zip(end, common, strict=True)]
    if any(extra_begin) or any(extra_end):
        x = b.call(A.constant_pad_nd.default, x, _torch_pads(extra_begin, extra_end), fill)
    return x, common


_CONV = {1: A.conv1d.default, 2: A.conv2d.default, 3: A.conv3d.default}
_CONV_T = {1: A.conv_transpose1d.default, 2: A.conv_transpose2d.input,
           3: A.conv_transpose3d.input}


def _kernel(op: _Op, weight_index: int | None) -> list[int]:
    kernel = op.attr("kernel_shape")
    if kernel is None and weight_index is not None:
        shape = op.shape(weight_index)
        kernel = list(shape[2:]) if shape is not None else None
    if kernel is None or any(k is None for k in kernel) or len(kernel) not in (1, 2, 3):
        raise _Problem(f"{op.op_type} with a kernel of unknown size or rank")
    return [int(k) for k in kernel]


def _conv(b: _Builder, op: _Op) -> list[Any]:
    x, w = _need(op.input(0), "X"), _need(op.input(1), "W")
    kernel = _kernel(op, 1)
    nd = len(kernel)
    strides = op.attr("strides", [1] * nd)
    dilations = op.attr("dilations", [1] * nd)
    begin, end = _auto_pads(op, kernel, strides, dilations)
    x, padding = _pad_apart(b, x, begin, end, 0.0)
    return [b.call(_CONV[nd], x, w, op.input(2), list(strides), padding, list(dilations),
                   op.attr("group", 1))]


def _conv_transpose(b: _Builder, op: _Op) -> list[Any]:
    x, w = _need(op.input(0), "X"), _need(op.input(1), "W")
    kernel = _kernel(op, 1)
    nd = len(kernel)
    strides = op.attr("strides", [1] * nd)
    dilations = op.attr("dilations", [1] * nd)
    out_pad = op.attr("output_padding", [0] * nd)
    if op.attr("auto_pad", "NOTSET") not in ("NOTSET", "", "VALID"):
        raise _Problem(f"ConvTranspose auto_pad={op.attr('auto_pad')!r}")
    begin, end = _auto_pads(op, kernel, strides, dilations)
    if op.attr("output_shape") is not None:
        begin, end = [], []
        for axis, target in enumerate(op.attr("output_shape")[-nd:]):
            size = op.dim(0, axis + 2)
            if size is None:
                raise _Problem("ConvTranspose output_shape on an input of unknown size")
            full = strides[axis] * (size - 1) + out_pad[axis] + (kernel[axis] - 1) * \
                dilations[axis] + 1
            total = full - target
            begin.append(total // 2)
            end.append(total - total // 2)
    target = _CONV_T[nd]
    args = [x, w, op.input(2), list(strides), [0] * nd, list(out_pad), op.attr("group", 1),
            list(dilations)]
    y = b.call(target, *args)
    for axis in range(nd):
        if begin[axis] or end[axis]:
            stop = -end[axis] if end[axis] else _INT_MAX
            y = b.call(A.slice.Tensor, y, axis + 2, begin[axis], stop, 1)
    return [y]


_MAX_POOL = {1: A.max_pool1d.default, 2: A.max_pool2d.default, 3: A.max_pool3d.default}
_AVG_POOL = {1: A.avg_pool1d.default, 2: A.avg_pool2d.default, 3: A.avg_pool3d.default}


def _pool_setup(op: _Op) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    kernel = _kernel(op, None)
    nd = len(kernel)
    strides = list(op.attr("strides", [1] * nd))
    dilations = list(op.attr("dilations", [1] * nd))
    begin, end = _auto_pads(op, kernel, strides, dilations)
    return kernel, strides, dilations, begin, end


def _max_pool(b: _Builder, op: _Op) -> list[Any]:
    if len(op.used) > 1 and op.used[1]:
        raise _Problem("MaxPool's Indices output")
    x = _need(op.input(0), "X")
    kernel, strides, dilations, begin, end = _pool_setup(op)
    limits = [((k - 1) * d + 1) // 2 for k, d in zip(kernel, dilations, strict=True)]
    x, padding = _pad_apart(b, x, begin, end, -math.inf, limits)
    return [b.call(_MAX_POOL[len(kernel)], x, kernel, strides, padding, dilations,
                   bool(op.attr("ceil_mode", 0)))]


def _avg_pool(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "X")
    kernel, strides, dilations, begin, end = _pool_setup(op)
    if any(d != 1 for d in dilations):
        raise _Problem("AveragePool with dilations")
    nd, ceil = len(kernel), bool(op.attr("ceil_mode", 0))
    include = bool(op.attr("count_include_pad", 0))
    limits = [k // 2 for k in kernel]
    symmetric = begin == end and all(p <= lim for p, lim in zip(begin, limits, strict=True))
    target = _AVG_POOL[nd]

    def pool(value: Value, padding: list[int], count_pad: bool) -> Any:
        return b.call(target, value, kernel, strides, padding, ceil, count_pad)

    if symmetric:
        return [pool(x, begin, include)]
    padded, _ = _pad_apart(b, x, begin, end, 0.0, [0] * nd)
    summed = pool(padded, [0] * nd, True)
    if include:
        return [summed]
    spatial = op.shape(0)[2:] if op.shape(0) is not None else None
    if spatial is not None and all(s is not None for s in spatial):
        ones = torch.ones([1, 1, *spatial])
    else:
        ones = b.call(A.ones_like.default, x)
    ones, _ = _pad_apart(b, ones, begin, end, 0.0, [0] * nd)
    return [b.call(A.div.Tensor, summed, pool(ones, [0] * nd, True))]


def _global_pool_op(kind: str) -> _Translate:
    def translate(b: _Builder, op: _Op) -> list[Any]:
        x = _need(op.input(0), "X")
        rank = op.rank(0)
        if rank is None:
            return [b.call(_global_pool, x, kind)]
        dims = list(range(2, rank))
        if kind == "avg":
            return [b.call(A.mean.dim, x, dims, True)]
        return [b.call(A.amax.default, x, dims, True)]
    return translate


def _lrn_op(b: _Builder, op: _Op) -> list[Any]:
    size = op.attr("size")
    if size is None or size % 2 == 0:
        raise _Problem("LRN with an even size")
    return [b.call(_lrn, _need(op.input(0), "X"), size, op.attr("alpha", 1e-4),
                   op.attr("beta", 0.75), op.attr("bias", 1.0))]


# ---- normalization


def _batch_norm(b: _Builder, op: _Op) -> list[Any]:
    if op.attr("training_mode", 0) or any(op.used[1:]):
        raise _Problem("BatchNormalization in training mode")
    x, scale, bias, mean, var = (op.input(i) for i in range(5))
    momentum = op.attr("momentum", 0.9)
    return [b.call(A.batch_norm.default, _need(x, "X"), scale, bias, _need(mean, "mean"),
                   _need(var, "var"), False, 1.0 - momentum, op.attr("epsilon", 1e-5), False)]


def _instance_norm(b: _Builder, op: _Op) -> list[Any]:
    return [b.call(A.instance_norm.default, _need(op.input(0), "input"), op.input(1),
                   op.input(2), None, None, True, 0.0, op.attr("epsilon", 1e-5), False)]


def _layer_norm_op(b: _Builder, op: _Op) -> list[Any]:
    if any(op.used[1:]):
        raise _Problem("LayerNormalization's Mean or InvStdDev output")
    x, scale, bias = _need(op.input(0), "X"), op.input(1), op.input(2)
    axis, eps = op.attr("axis", -1), op.attr("epsilon", 1e-5)
    shape = op.shape(0)
    normalized: list[int] | None = None
    if shape is not None and all(d is not None for d in shape[axis % len(shape):]):
        normalized = [int(d) for d in shape[axis % len(shape):]]  # type: ignore[arg-type]
    elif axis < 0 and op.shape(1) is not None and len(op.shape(1)) == -axis:
        normalized = [int(d) for d in op.shape(1)]  # type: ignore[arg-type]
    fits = normalized is not None and all(
        v is None or (op.shape(i) is not None and list(op.shape(i)) == normalized)
        for i, v in ((1, scale), (2, bias)))
    if not fits:
        return [b.call(_layer_norm, x, axis, scale, bias, eps)]
    return [b.call(A.layer_norm.default, x, normalized, scale, bias, eps, False)]


def _group_norm(b: _Builder, op: _Op) -> list[Any]:
    x, scale, bias = _need(op.input(0), "X"), op.input(1), op.input(2)
    groups, channels = op.attr("num_groups"), op.dim(0, 1)
    if groups is None or channels is None:
        raise _Problem("GroupNormalization on an input of unknown channel count")
    if op.opset < 21 and op.shape(1) is not None and op.shape(1)[0] == groups:
        scale = b.call(A.repeat_interleave.self_int, scale, channels // groups)
        bias = b.call(A.repeat_interleave.self_int, bias, channels // groups)
    return [b.call(A.group_norm.default, x, groups, scale, bias, op.attr("epsilon", 1e-5),
                   False)]


def _lp_norm(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "input")
    norm = b.call(A.linalg_vector_norm.default, x, float(op.attr("p", 2)),
                  [op.attr("axis", -1)], True)
    return [b.call(A.div.Tensor, x, norm)]


# ---- shapes


def _reshape_op(b: _Builder, op: _Op) -> list[Any]:
    x, shape = _need(op.input(0), "data"), _need(op.input(1), "shape")
    allowzero = op.attr("allowzero", 0)
    dims = _const_ints(shape, "shape", required=False)
    if dims is None:
        return [b.call(_reshape, x, shape, allowzero)]
    if not allowzero:
        dims = [_dim_of(b, op, x, i) if d == 0 else d for i, d in enumerate(dims)]
    return [b.call(A.reshape.default, x, dims)]


def _dim_of(b: _Builder, op: _Op, x: Value, axis: int) -> Any:
    static = op.dim(0, axis)
    return static if static is not None else b.call(A.sym_size.int, x, axis)


def _flatten_op(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "input")
    axis, rank = op.attr("axis", 1), op.rank(0)
    if axis < 0 and rank is not None:
        axis += rank
    if axis < 0 or (rank is not None and axis >= rank):
        return [b.call(_flatten, x, axis)]
    if axis == 0:
        return [b.call(A.reshape.default, x, [1, -1])]
    y = b.call(A.flatten.using_ints, x, axis, -1)
    return [b.call(A.flatten.using_ints, y, 0, axis - 1) if axis > 1 else y]


def _transpose(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "data")
    perm = op.attr("perm")
    if perm is None:
        rank = op.rank(0)
        if rank is None:
            raise _Problem("Transpose without perm on an input of unknown rank")
        perm = list(reversed(range(rank)))
    return [b.call(A.permute.default, x, list(perm))]


def _concat(b: _Builder, op: _Op) -> list[Any]:
    values = [v for v in op.inputs if v is not None]
    return [b.call(A.cat.default, values, op.attr("axis", 0))]


def _split_op(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "input")
    axis, count = op.attr("axis", 0), len(op.used)
    sizes = op.attr("split")
    if sizes is None and op.input(1) is not None:
        sizes = _const_ints(op.input(1), "split", required=False)
        if sizes is None:
            return b.items(b.call(_split, x, op.input(1), axis), count)
    if sizes is not None:
        return b.items(b.call(A.split_with_sizes.default, x, list(sizes), axis), count)
    parts, size = op.attr("num_outputs", count), op.dim(0, axis)
    if size is None:
        return b.items(b.call(_split_equal, x, parts, axis), count)
    return b.items(b.call(A.split.Tensor, x, -(-size // parts), axis), count)


def _slice_op(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "data")
    if op.opset < 10:
        starts, ends = op.attr("starts"), op.attr("ends")
        axes, steps = op.attr("axes"), None
    else:
        raw = [op.input(i) for i in range(1, 5)]
        if any(isinstance(v, fx.Node) for v in raw):
            return [b.call(_slice, x, *raw)]
        starts, ends, axes, steps = (_const_ints(v, "Slice argument") for v in raw)
    if starts is None or ends is None:
        raise _Problem("Slice without starts or ends")
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        if step == 0:
            raise _Problem("Slice with a step of 0")
        if step > 0:
            x = b.call(A.slice.Tensor, x, axis, start, min(end, _INT_MAX), step)
        else:
            x = b.call(_slice_one, x, axis, start, end, step)
    return [x]


def _gather(b: _Builder, op: _Op) -> list[Any]:
    x, index = _need(op.input(0), "data"), _need(op.input(1), "indices")
    axis, rank = op.attr("axis", 0), op.rank(0)
    if axis < 0:
        if rank is None:
            raise _Problem("Gather with a negative axis on an input of unknown rank")
        axis += rank
    constant = _const(index)
    if constant is not None and constant.dim() == 0:
        return [b.call(A.select.int, x, axis, int(constant))]
    if constant is not None:
        index = constant.long()
    elif op.dtype(1) != torch.int64:
        index = b.call(A._to_copy.default, index, dtype=torch.int64)
    return [b.call(A.index.Tensor, x, [None] * axis + [index])]


def _gather_elements_op(b: _Builder, op: _Op) -> list[Any]:
    return [b.call(_gather_elements, _need(op.input(0), "data"), _need(op.input(1), "indices"),
                   op.attr("axis", 0))]


def _axes(op: _Op, index: int) -> list[int] | None:
    if "axes" in op.attrs:
        return list(op.attrs["axes"])
    return _const_ints(op.input(index), "axes")


def _squeeze(b: _Builder, op: _Op) -> list[Any]:
    x, axes = _need(op.input(0), "data"), _axes(op, 1)
    if axes is None:
        return [b.call(A.squeeze.default, x)]
    return [b.call(A.squeeze.dims, x, axes)]


def _unsqueeze_op(b: _Builder, op: _Op) -> list[Any]:
    x, axes = _need(op.input(0), "data"), _axes(op, 1)
    if not axes:
        raise _Problem("Unsqueeze without axes")
    rank = op.rank(0)
    if any(a < 0 for a in axes):
        if rank is None:
            return [b.call(_unsqueeze, x, axes)]
        axes = [a % (rank + len(axes)) for a in axes]
    for axis in sorted(axes):
        x = b.call(A.unsqueeze.default, x, axis)
    return [x]


def _expand_op(b: _Builder, op: _Op) -> list[Any]:
    x, shape = _need(op.input(0), "input"), _need(op.input(1), "shape")
    dims, rank = _const_ints(shape, "shape", required=False), op.rank(0)
    if dims is None or rank is None:
        return [b.call(_expand, x, shape)]
    target = [-1] * (rank - len(dims)) + list(dims)
    offset = len(target) - rank
    target = [-1 if (i >= offset and d == 1) else d for i, d in enumerate(target)]
    return [b.call(A.expand.default, x, target)]


def _tile_op(b: _Builder, op: _Op) -> list[Any]:
    x, repeats = _need(op.input(0), "input"), _need(op.input(1), "repeats")
    times = _const_ints(repeats, "repeats", required=False)
    if times is None or isinstance(x, torch.Tensor):
        return [b.call(_tile, x, repeats)]
    return [b.call(A.repeat.default, x, times)]


def _shape_op(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "data")
    start, end = op.attr("start", 0), op.attr("end")
    shape = op.shape(0)
    if shape is not None:
        part = shape[start:end]
        if all(d is not None for d in part):
            return [torch.tensor(part, dtype=torch.int64)]
    return [b.call(_shape, x, start, end)]


def _size_op(b: _Builder, op: _Op) -> list[Any]:
    shape = op.shape(0)
    if shape is not None and all(d is not None for d in shape):
        return [torch.tensor(math.prod(shape), dtype=torch.int64)]  # type: ignore[arg-type]
    return [b.call(_size, _need(op.input(0), "data"))]


def _fill_value(op: _Op) -> tuple[float | int | bool, torch.dtype]:
    proto = op.attr("value")
    if proto is None:
        return 0.0, torch.float32
    value = _tensor(proto, "ConstantOfShape value")
    return value.reshape(-1)[0].item(), value.dtype


def _constant_of_shape_op(b: _Builder, op: _Op) -> list[Any]:
    value, dtype = _fill_value(op)
    return [b.call(_constant_of_shape, _need(op.input(0), "input"), value, dtype)]


def _constant(b: _Builder, op: _Op) -> list[Any]:
    if "value" in op.attrs and isinstance(op.attrs["value"], TensorProto):
        return [_tensor(op.attrs["value"], "Constant value")]
    simple = {"value_float": torch.float32, "value_floats": torch.float32,
              "value_int": torch.int64, "value_ints": torch.int64}
    for name, dtype in simple.items():
        if name in op.attrs:
            return [torch.tensor(op.attrs[name], dtype=dtype)]
    raise _Problem(f"Constant with attributes {sorted(op.attrs)}")


def _identity(b: _Builder, op: _Op) -> list[Any]:
    return [_need(op.input(0), "input")]


def _dropout(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "data")
    training = _scalar(_const(op.input(2))) if op.input(2) is not None else 0
    if isinstance(op.input(2), fx.Node) or training:
        raise _Problem("Dropout in training mode")
    outputs = [x]
    if len(op.used) > 1 and op.used[1]:
        outputs.append(b.call(A.ones_like.default, x, dtype=torch.bool))
    return outputs


def _cast_to(b: _Builder, x: Value, dtype: torch.dtype, current: torch.dtype | None) -> Any:
    if current == dtype:
        return x
    return b.call(A._to_copy.default, x, dtype=dtype)


def _cast(b: _Builder, op: _Op) -> list[Any]:
    dtype = _torch_dtype(op.attr("to", TensorProto.FLOAT))
    return [_cast_to(b, _need(op.input(0), "input"), dtype, op.dtype(0))]


def _cast_like(b: _Builder, op: _Op) -> list[Any]:
    dtype = op.dtype(1)
    if dtype is None:
        raise _Problem("CastLike to a type not known before running")
    return [_cast_to(b, _need(op.input(0), "input"), dtype, op.dtype(0))]


def _pad_op(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "data")
    mode = op.attr("mode", "constant")
    if mode not in ("constant", *_PAD_MODES):
        raise _Problem(f"Pad mode={mode!r}")
    if op.opset < 11:
        pads, value, axes = op.attr("pads"), op.attr("value", 0.0), None
    else:
        raw = [op.input(i) for i in (1, 2, 3)]
        if any(isinstance(v, fx.Node) for v in raw):
            return [b.call(_pad, x, raw[0], raw[1], mode, raw[2])]
        pads, axes = _const_ints(raw[0], "pads"), _const_ints(raw[2], "axes")
        value = _scalar(raw[1]) if raw[1] is not None and raw[1].numel() else 0.0
    if pads is None:
        raise _Problem("Pad without pads")
    count = len(pads) // 2
    rank = op.rank(0) if axes is not None else count
    if rank is None:
        return [b.call(_pad, x, torch.tensor(pads), value, mode, torch.tensor(axes))]
    begin, end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes if axes is not None else range(count)):
        begin[axis], end[axis] = pads[i], pads[i + count]
    torch_pads = _torch_pads(begin, end)
    if mode == "constant":
        return [b.call(A.constant_pad_nd.default, x, torch_pads, float(value or 0.0))]
    if len(torch_pads) > 6 or min(torch_pads) < 0:
        raise _Problem(f"Pad mode={mode!r} on more than 3 axes or with negative pads")
    return [b.call(A.pad.default, x, torch_pads, _PAD_MODES[mode], None)]


def _range_op(b: _Builder, op: _Op) -> list[Any]:
    return [b.call(_range, *(_need(op.input(i), "Range input") for i in range(3)))]


def _where(b: _Builder, op: _Op) -> list[Any]:
    return [b.call(A.where.self, *(_need(op.input(i), "Where input") for i in range(3)))]


def _arg(target: Any) -> _Translate:
    def translate(b: _Builder, op: _Op) -> list[Any]:
        if op.attr("select_last_index", 0):
            raise _Problem(f"{op.op_type} select_last_index=1")
        return [b.call(target, _need(op.input(0), "data"), op.attr("axis", 0),
                       bool(op.attr("keepdims", 1)))]
    return translate


def _cumsum(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "x")
    axis = _const_ints(op.input(1), "axis")
    if not axis:
        raise _Problem("CumSum without axis")
    if op.attr("reverse", 0):
        x = b.call(A.flip.default, x, axis[:1])
    y = b.call(A.cumsum.default, x, axis[0])
    if op.attr("exclusive", 0):
        y = b.call(A.sub.Tensor, y, x)
    return [b.call(A.flip.default, y, axis[:1]) if op.attr("reverse", 0) else y]


def _depth_to_space_op(b: _Builder, op: _Op) -> list[Any]:
    x, block = _need(op.input(0), "input"), op.attr("blocksize", 1)
    if op.attr("mode", "DCR") == "CRD":
        return [b.call(A.pixel_shuffle.default, x, block)]
    return [b.call(_depth_to_space, x, block)]


def _space_to_depth_op(b: _Builder, op: _Op) -> list[Any]:
    return [b.call(_space_to_depth, _need(op.input(0), "input"), op.attr("blocksize", 1))]


# ---- reductions

_REDUCE: dict[str, Callable[[_Builder, Value, list[int] | None, bool], Any]] = {
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


def _reduce(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "data")
    axes = _axes(op, 1)
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
            raise _Problem(f"{op.op_type} over all axes of an input of unknown rank")
        axes = list(range(rank))
    if op.op_type == "ReduceLogSumExp":
        return [b.call(A.logsumexp.default, x, axes, keep)]
    rank = op.rank(0)
    if rank is None and any(a < 0 for a in axes):
        raise _Problem("ReduceProd with negative axes on an input of unknown rank")
    for axis in sorted((a % rank if rank else a for a in axes), reverse=True):
        x = b.call(A.prod.dim_int, x, axis, keep)
    return [x]


# ---- resize

_COORDINATES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                "tf_half_pixel_for_nn", "half_pixel_symmetric")
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _full_rank(values: list[Any] | None, axes: list[int] | None, rank: int | None,
               fill: Callable[[int], Any]) -> list[Any] | None:
    if values is None or axes is None:
        return values
    if rank is None:
        raise _Problem("Resize with axes on an input of unknown rank")
    full = [fill(i) for i in range(rank)]
    for value, axis in zip(values, axes, strict=True):
        full[axis % rank] = value
    return full


def _resize_op(b: _Builder, op: _Op) -> list[Any]:
    x = _need(op.input(0), "X")
    mode = op.attr("mode", "nearest")
    mode = "linear" if mode == "bilinear" else mode
    if op.op_type == "Upsample" or op.opset < 11:
        coordinate, nearest = "asymmetric", "floor"
        scales_value = op.input(1) if op.input(1) is not None else torch.tensor(
            op.attr("scales") or [], dtype=torch.float32)
        sizes_value = None
    else:
        coordinate = op.attr("coordinate_transformation_mode", "half_pixel")
        nearest = op.attr("nearest_mode", "round_prefer_floor")
        scales_value, sizes_value = op.input(2), op.input(3)
    problems = []
    if mode not in ("nearest", "linear", "cubic"):
        problems.append(f"mode={mode!r}")
    if coordinate not in _COORDINATES:
        problems.append(f"coordinate_transformation_mode={coordinate!r}")
    if mode == "nearest" and nearest not in _NEAREST:
        problems.append(f"nearest_mode={nearest!r}")
    if op.attr("antialias", 0):
        problems.append("antialias=1")
    if op.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        problems.append(f"keep_aspect_ratio_policy={op.attr('keep_aspect_ratio_policy')!r}")
    if problems:
        raise _Problem(f"{op.op_type} {', '.join(problems)}")
    if isinstance(scales_value, torch.Tensor) and scales_value.numel() == 0:
        scales_value = None
    if isinstance(sizes_value, torch.Tensor) and sizes_value.numel() == 0:
        sizes_value = None
    if scales_value is None and sizes_value is None:
        raise _Problem(f"{op.op_type} without scales or sizes")
    if isinstance(scales_value, fx.Node) or isinstance(sizes_value, fx.Node):
        if op.attr("axes") is not None:
            raise _Problem(f"{op.op_type} with axes and run-time scales or sizes")
        return [b.call(_resize, x, scales_value, sizes_value, mode, coordinate, nearest,
                       op.attr("cubic_coeff_a", -0.75), op.attr("exclude_outside", 0))]
    rank, axes = op.rank(0), op.attr("axes")
    scales = _full_rank(scales_value.tolist() if scales_value is not None else None, axes,
                        rank, lambda i: 1.0)
    sizes = _full_rank(_ints(sizes_value) if sizes_value is not None else None, axes, rank,
                       lambda i: _dim_of(b, op, x, i))
    fast = _resize_aten(b, op, x, scales, sizes, mode, coordinate, nearest)
    if fast is not None:
        return [fast]
    return [b.call(_resize, x, scales, sizes, mode, coordinate, nearest,
                   op.attr("cubic_coeff_a", -0.75), op.attr("exclude_outside", 0))]


def _resize_aten(b: _Builder, op: _Op, x: Value, scales: list[float] | None,
                 sizes: list[Any] | None, mode: str, coordinate: str, nearest: str) -> Any:
    """The aten upsampling op equal to this Resize, when there is one (4-D, spatial only)."""
    if op.rank(0) != 4:
        return None
    if scales is not None and (len(scales) != 4 or scales[0] != 1.0 or scales[1] != 1.0):
        return None
    if sizes is not None and (len(sizes) != 4 or any(
            not isinstance(sizes[i], fx.Node) and sizes[i] != op.dim(0, i) for i in (0, 1))):
        return None
    if sizes is not None and any(isinstance(s, fx.Node) for s in sizes[2:]):
        return None
    out_hw = [int(s) for s in sizes[2:]] if sizes is not None else None
    scale_hw = [float(s) for s in scales[2:]] if scales is not None and sizes is None else None
    if mode == "nearest" and coordinate == "asymmetric" and nearest == "floor":
        return b.call(A.upsample_nearest2d.vec, x, out_hw, scale_hw)
    if mode != "linear" or coordinate not in ("half_pixel", "pytorch_half_pixel",
                                              "align_corners"):
        return None
    if coordinate == "pytorch_half_pixel":
        spatial = [op.dim(0, 2), op.dim(0, 3)]
        known = out_hw or ([math.floor(d * s) for d, s in zip(spatial, scale_hw, strict=True)]
                           if None not in spatial else None)
        if known is None or min(known) <= 1:
            return None
    return b.call(A.upsample_bilinear2d.vec, x, out_hw, coordinate == "align_corners",
                  scale_hw)


# --------------------------------------------------------------------------- op table

_OPS: dict[str, _Translate] = {
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
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "MaxPool": _max_pool,
    "AveragePool": _avg_pool,
    "GlobalAveragePool": _global_pool_op("avg"),
    "GlobalMaxPool": _global_pool_op("max"),
    "LRN": _lrn_op,
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm_op,
    "GroupNormalization": _group_norm,
    "LpNormalization": _lp_norm,
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
    "Pad": _pad_op,
    "Range": _range_op,
    "ArgMax": _arg(A.argmax.default),
    "ArgMin": _arg(A.argmin.default),
    "CumSum": _cumsum,
    "DepthToSpace": _depth_to_space_op,
    "SpaceToDepth": _space_to_depth_op,
    "Resize": _resize_op,
    "Upsample": _resize_op,
    **{name: _reduce for name in (*_REDUCE, "ReduceLogSumExp", "ReduceProd")},
}


# --------------------------------------------------------------------------- public API


def _op_label(node: onnx.NodeProto) -> str:
    if node.domain in _DEFAULT_DOMAINS:
        return node.op_type
    return f"{node.domain}.{node.op_type}"


def unsupported_operators(model: onnx.ModelProto) -> list[str]:
    """The op types of ``model`` that cannot be translated, sorted ([] when all can)."""
    found = set()
    for node in model.graph.node:
        subgraph = any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS)
                       for a in node.attribute)
        if node.domain not in _DEFAULT_DOMAINS or node.op_type not in _OPS or subgraph:
            found.add(_op_label(node))
    return sorted(found)


def _opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    return int(versions[0]) if versions else 21


_SMALL_INITIALIZER = 4096  # elements: shape arithmetic's constants, kept for inference


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph without the file's value_info, output shapes or large weights (declared as
    inputs instead): what shape inference needs, without copying the weights."""
    skeleton = onnx.ModelProto(ir_version=max(model.ir_version, 4))
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph, source = skeleton.graph, model.graph
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    for output in graph.output:
        output.type.tensor_type.ClearField("shape")
    declared = {i.name for i in source.input}
    for tensor in source.initializer:
        if math.prod(tensor.dims) <= _SMALL_INITIALIZER and \
                tensor.data_location != TensorProto.EXTERNAL:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    return skeleton


def _static_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types found by ONNX's shape inference, ignoring the file's own value_info."""
    skeleton = _skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False,
                                                     data_prop=True)
    except Exception:
        inferred = skeleton
    graph = inferred.graph
    return {v.name: v.type for v in (*graph.value_info, *graph.input, *graph.output)}


def _type_facts(value_type: onnx.TypeProto | None) -> tuple[tuple | None, torch.dtype | None]:
    if value_type is None or not value_type.HasField("tensor_type"):
        return None, None
    tensor_type = value_type.tensor_type
    dtype = _DTYPES.get(tensor_type.elem_type)
    if not tensor_type.HasField("shape"):
        return None, dtype
    dims = tuple(int(d.dim_value) if d.HasField("dim_value") else None
                 for d in tensor_type.shape.dim)
    return dims, dtype


class _Translation:
    """One pass over the ONNX graph, in its (topological) node order."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = _opset(model)
        self.builder = _Builder()
        self.values: dict[str, Value] = {}
        self.failed: set[str] = set()
        self.problems: list[str] = []
        self.types = _static_types(model)

    def run(self) -> tuple[fx.GraphModule, onnx.ValueInfoProto]:
        source = self._inputs()
        used = {name for node in self.graph.node for name in node.input}
        used |= {o.name for o in self.graph.output}
        for node in self.graph.node:
            self._node(node, used)
        outputs = [self._output(o.name) for o in self.graph.output]
        if self.problems:
            raise UnsupportedGraph("; ".join(dict.fromkeys(self.problems)))
        self.builder.graph.output(tuple(outputs))
        module = fx.GraphModule(self.builder.root, self.builder.graph)
        module.graph.eliminate_dead_code()
        module.recompile()
        return module, source

    def _inputs(self) -> onnx.ValueInfoProto:
        initializers = {t.name for t in self.graph.initializer}
        for tensor in self.graph.initializer:
            try:
                self.values[tensor.name] = _tensor(tensor, f"initializer {tensor.name!r}")
            except _Problem as exc:
                self.problems.append(str(exc))
                self.failed.add(tensor.name)
        if len(self.graph.sparse_initializer):
            self.problems.append("sparse initializers")
        sources = [i for i in self.graph.input if i.name not in initializers]
        if len(sources) != 1:
            raise UnsupportedGraph(f"the graph must take one input tensor, it takes "
                                   f"{len(sources)}")
        elem = sources[0].type.tensor_type.elem_type
        if elem not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            raise UnsupportedGraph("the graph's input is not a float tensor")
        self.values[sources[0].name] = self.builder.graph.placeholder("x")
        return sources[0]

    def _facts(self, name: str) -> tuple[tuple | None, torch.dtype | None]:
        value = self.values.get(name)
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), value.dtype
        return _type_facts(self.types.get(name))

    def _node(self, node: onnx.NodeProto, used: set[str]) -> None:
        label = _op_label(node)
        names = list(node.input)
        if any(n in self.failed for n in names if n):
            self.failed.update(node.output)
            return
        missing = [n for n in names if n and n not in self.values]
        if missing:
            self.problems.append(f"{label} reads {missing[0]!r} before it is computed")
            self.failed.update(node.output)
            return
        facts = [self._facts(n) if n else (None, None) for n in names]
        op = _Op(op_type=node.op_type, opset=self.opset,
                 inputs=[self.values[n] if n else None for n in names],
                 shapes=[f[0] for f in facts], dtypes=[f[1] for f in facts],
                 attrs={},
                 used=[bool(o) and o in used for o in node.output])
        try:
            op.attrs = {a.name: _checked(a.name, _attribute(a)) for a in node.attribute}
            results = _OPS[node.op_type](self.builder, op)
        except _Problem as exc:
            self.problems.append(f"{label}: {exc}")
            self.failed.update(node.output)
            return
        except Exception as exc:  # never let a malformed graph escape as another error
            self.problems.append(f"{label}: {type(exc).__name__}: {exc}")
            self.failed.update(node.output)
            return
        for name, value in zip(node.output, results, strict=False):
            if name:
                if isinstance(value, fx.Node):
                    value.meta["onnx_node"] = node.name
                    value.meta["onnx_op"] = node.op_type
                self.values[name] = value
        for name, is_used in zip(node.output[len(results):], op.used[len(results):],
                                 strict=False):
            if is_used:
                self.problems.append(f"{label}: output {name!r} is not computed")

    def _output(self, name: str) -> Any:
        value = self.values.get(name)
        if value is None:
            if name not in self.failed:
                self.problems.append(f"graph output {name!r} is never computed")
            return None
        if isinstance(value, torch.Tensor):
            return self.builder.constant(value)
        if not isinstance(value, fx.Node):
            return self.builder.constant(torch.tensor(value))
        return value


def to_graph_module(model: onnx.ModelProto) -> fx.GraphModule:
    """The ONNX graph as a GraphModule of aten ops: ``forward(x)`` takes the graph's one
    input (float32, any batch size) and returns a tuple of its outputs in order.

    Raises :class:`UnsupportedGraph` naming every operator, attribute or tensor it cannot
    translate, and when the translated graph fails on an example input of the declared
    shape (checked when all of the input's dimensions but the batch are fixed)."""
    unsupported = unsupported_operators(model)
    if unsupported:
        raise UnsupportedGraph(
            f"operators not supported for gradients: {', '.join(unsupported)}")
    try:
        module, source = _Translation(model).run()
        _annotate(module, source)
    except UnsupportedGraph:
        raise
    except Exception as exc:  # a malformed graph never escapes as another error
        raise UnsupportedGraph(f"cannot translate the graph: {type(exc).__name__}: {exc}"
                               ) from exc
    return module


@dataclass(frozen=True)
class GraphProgram:
    """Stands in for a ``torch.export.ExportedProgram`` where only ``module()`` is used
    (``torch_program.build_variant``): each call returns a fresh copy to rewrite."""

    graph_module: fx.GraphModule

    def module(self) -> fx.GraphModule:
        return copy.deepcopy(self.graph_module)


# --------------------------------------------------------------------------- node.meta["val"]


def _summary(value: Any) -> Any:
    """What ``node.meta["val"]`` needs of a result: shapes and dtypes, not the data."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, list | tuple):
        return [_summary(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


class _Recorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.seen: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.seen[n] = _summary(result)
        return result


def _record(module: fx.GraphModule, shape: list[int]) -> dict[fx.Node, Any]:
    generator = torch.Generator().manual_seed(0)
    recorder = _Recorder(module)
    with torch.no_grad():
        recorder.run(torch.rand(shape, generator=generator))
    return recorder.seen


def _example_runs(module: fx.GraphModule, rest: list[int],
                  fixed: int | None) -> tuple[list[dict[fx.Node, Any]], bool]:
    """Results at batch 2 and 3 (free batch), else at the one batch the graph runs with;
    raises :class:`UnsupportedGraph` when it runs with none."""
    try:
        if fixed is None:
            return [_record(module, [batch, *rest]) for batch in (2, 3)], True
    except Exception:  # the graph may fix its batch at 1, in a Reshape for instance
        pass
    try:
        return [_record(module, [fixed or 1, *rest])], False
    except Exception as exc:
        raise UnsupportedGraph(f"the translated graph does not run on an input of shape "
                               f"{[fixed or 1, *rest]}: {type(exc).__name__}: {exc}") from exc


def _annotate(module: fx.GraphModule, source: onnx.ValueInfoProto) -> None:
    """Sets ``node.meta["val"]``: fake tensors whose batch size is a symbol when it is free.

    Found by running the graph at two batch sizes, so only when all the input's other
    dimensions are fixed; a dimension that grows with the batch is ``k * batch``."""
    dims = source.type.tensor_type.shape.dim
    if not dims or any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims[1:]):
        return
    rest = [int(d.dim_value) for d in dims[1:]]
    fixed = int(dims[0].dim_value) if dims[0].HasField("dim_value") else None
    runs, free = _example_runs(module, rest, fixed or None)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    mode = FakeTensorMode(shape_env=ShapeEnv())
    symbol = None
    if free:
        context = StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
        symbol = mode.from_tensor(torch.empty(2, 1), symbolic_context=context).shape[0]
    for node in module.graph.nodes:
        if node.op == "output" or node not in runs[0]:
            continue
        val = _fake([run[node] for run in runs], mode, symbol)
        if val is not None:
            node.meta["val"] = val


def _size_of(values: list[int], symbol: Any) -> Any:
    if len(set(values)) == 1:
        return values[0]
    first, second = values
    if symbol is not None and first % 2 == 0 and first * 3 == second * 2:
        return symbol * (first // 2) if first != 2 else symbol
    return None


def _fake(values: list[Any], mode: Any, symbol: Any) -> Any:
    first = values[0]
    if isinstance(first, tuple):
        shape = [_size_of([v[0][i] for v in values], symbol) for i in range(len(first[0]))]
        if any(d is None for d in shape):
            return None
        with mode:
            return torch.empty(shape, dtype=first[1])
    if isinstance(first, list) and first:
        parts = [_fake([v[i] for v in values], mode, symbol) for i in range(len(first))]
        return None if any(p is None for p in parts) else parts
    if isinstance(first, int):
        return _size_of(values, symbol)
    return None
