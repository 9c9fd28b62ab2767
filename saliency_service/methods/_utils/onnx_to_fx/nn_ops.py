"""Convolution, pooling, normalization and padding, with ONNX's padding rules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from saliency_service.methods._utils.onnx_to_fx.builder import (
    A,
    Builder,
    Op,
    Translate,
    Value,
    const_ints,
    need,
    scalar,
)
from saliency_service.methods._utils.onnx_to_fx.data import INT_MAX, int_list
from saliency_service.methods._utils.onnx_to_fx.reasons import Problem


def _global_pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    dims = list(range(2, x.dim()))
    return x.mean(dims, keepdim=True) if kind == "avg" else x.amax(dims, keepdim=True)


def _layer_norm(x: torch.Tensor, axis: int, weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    dims = list(range(axis % x.dim(), x.dim()))
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    out = centered * torch.rsqrt(centered.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out + bias if bias is not None else out


_PAD_MODES = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _torch_pads(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """ONNX's per-axis begins and ends as torch's pad list (last axis first)."""
    pads: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        pads += [int(b), int(e)]
    while len(pads) > 2 and pads[-1] == 0 and pads[-2] == 0:
        pads = pads[:-2]
    return pads


def _pad(x: torch.Tensor, pads: Any, value: Any, mode: str, axes: Any) -> torch.Tensor:
    """ONNX Pad with pads computed at run time."""
    amounts = int_list(pads)
    count = len(amounts) // 2
    axes_list = int_list(axes) if axes is not None else list(range(count))
    begin, end = [0] * x.dim(), [0] * x.dim()
    for i, axis in enumerate(axes_list):
        begin[axis], end[axis] = amounts[i], amounts[i + count]
    if mode != "constant":
        return _pad_by_mode(x, begin, end, mode)
    fill = float(value.item()) if isinstance(value, torch.Tensor) else float(value or 0.0)
    return torch.constant_pad_nd(x, _torch_pads(begin, end), fill)


def _mode_axes(rank: int, begin: Sequence[int], end: Sequence[int]) -> int | None:
    """How many trailing axes torch's reflect/replicate/circular pad must be given to pad
    these (it takes 1…3 axes, and one or two leading axes left alone), or None."""
    padded = [a for a in range(rank) if begin[a] > 0 or end[a] > 0]
    needed = max(1, rank - padded[0]) if padded else 1
    for count in (1, 2, 3):
        if count >= needed and rank - count in (1, 2):
            return count
    return None


def _pad_by_mode(x: torch.Tensor, begin: Sequence[int], end: Sequence[int],
                 mode: str) -> torch.Tensor:
    """ONNX Pad reflect/edge/wrap: negative pads crop first (as ONNX Runtime does), then
    torch pads the trailing axes that need it."""
    crop_begin, crop_end = [min(p, 0) for p in begin], [min(q, 0) for q in end]
    if any(crop_begin) or any(crop_end):
        x = torch.constant_pad_nd(x, _torch_pads(crop_begin, crop_end), 0.0)
    grow_begin, grow_end = [max(p, 0) for p in begin], [max(q, 0) for q in end]
    count = _mode_axes(x.dim(), grow_begin, grow_end)
    if count is None:
        raise ValueError(f"Pad mode={mode!r} on these axes of a rank-{x.dim()} tensor")
    if not any(grow_begin) and not any(grow_end):
        return x
    pads: list[int] = []
    for axis in range(x.dim() - 1, x.dim() - 1 - count, -1):
        pads += [grow_begin[axis], grow_end[axis]]
    return torch.nn.functional.pad(x, pads, mode=_PAD_MODES[mode])


def _lrn(x: torch.Tensor, size: int, alpha: float, beta: float, bias: float) -> torch.Tensor:
    return torch.nn.functional.local_response_norm(x, size, alpha, beta, bias)


def _auto_pads(op: Op, kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """Begin and end pads of a Conv or pool from ``pads`` or ``auto_pad``."""
    nd = len(kernel)
    auto = op.attr("auto_pad", "NOTSET")
    if auto == "VALID":
        return [0] * nd, [0] * nd
    if auto in ("NOTSET", ""):
        pads = op.attr("pads", [0] * 2 * nd)
        if len(pads) != 2 * nd:
            raise Problem(f"{op.op_type} pads of length {len(pads)} for {nd} axes")
        return list(pads[:nd]), list(pads[nd:])
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise Problem(f"{op.op_type} auto_pad={auto!r}")
    begin, end = [], []
    for axis in range(nd):
        span = (kernel[axis] - 1) * dilations[axis] + 1
        size = op.dim(0, axis + 2)
        if strides[axis] == 1:
            total = span - 1
        elif size is None:
            raise Problem(f"{op.op_type} auto_pad={auto} with stride > 1 on an input of "
                           "unknown size")
        else:
            out = -(-size // strides[axis])
            total = max((out - 1) * strides[axis] + span - size, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin, end


def _pad_apart(b: Builder, x: Value, begin: list[int], end: list[int], fill: float,
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


def _kernel(op: Op, weight_index: int | None) -> list[int]:
    kernel = op.attr("kernel_shape")
    if kernel is None and weight_index is not None:
        shape = op.shape(weight_index)
        kernel = list(shape[2:]) if shape is not None else None
    if kernel is None or any(k is None for k in kernel) or len(kernel) not in (1, 2, 3):
        raise Problem(f"{op.op_type} with a kernel of unknown size or rank")
    return [int(k) for k in kernel]


def _conv(b: Builder, op: Op) -> list[Any]:
    x, w = need(op.input(0), "X"), need(op.input(1), "W")
    kernel = _kernel(op, 1)
    nd = len(kernel)
    strides = op.attr("strides", [1] * nd)
    dilations = op.attr("dilations", [1] * nd)
    begin, end = _auto_pads(op, kernel, strides, dilations)
    x, padding = _pad_apart(b, x, begin, end, 0.0)
    return [b.call(_CONV[nd], x, w, op.input(2), list(strides), padding, list(dilations),
                   op.attr("group", 1))]


def _conv_transpose(b: Builder, op: Op) -> list[Any]:
    x, w = need(op.input(0), "X"), need(op.input(1), "W")
    kernel = _kernel(op, 1)
    nd = len(kernel)
    strides = op.attr("strides", [1] * nd)
    dilations = op.attr("dilations", [1] * nd)
    out_pad = op.attr("output_padding", [0] * nd)
    if op.attr("auto_pad", "NOTSET") not in ("NOTSET", "", "VALID"):
        raise Problem(f"ConvTranspose auto_pad={op.attr('auto_pad')!r}")
    begin, end = _auto_pads(op, kernel, strides, dilations)
    if op.attr("output_shape") is not None:
        begin, end = [], []
        for axis, target in enumerate(op.attr("output_shape")[-nd:]):
            size = op.dim(0, axis + 2)
            if size is None:
                raise Problem("ConvTranspose output_shape on an input of unknown size")
            full = strides[axis] * (size - 1) + out_pad[axis] + (kernel[axis] - 1) * \
                dilations[axis] + 1
            total = full - target  # < 0: the output is longer than the full result
            begin.append(total - total // 2)
            end.append(total // 2)
    bias = op.input(2)
    longer = any(p < 0 for p in (*begin, *end))
    args = [x, w, None if longer else bias, list(strides), [0] * nd, list(out_pad),
            op.attr("group", 1), list(dilations)]
    y = b.call(_CONV_T[nd], *args)
    if longer:  # ONNX Runtime's extra rows hold the bias, like the others
        y = b.call(A.constant_pad_nd.default, y, _torch_pads([-p for p in begin],
                                                             [-q for q in end]), 0.0)
        if bias is not None:
            y = b.call(A.add.Tensor, y, b.call(A.view.default, bias, [-1] + [1] * nd))
        return [y]
    for axis in range(nd):
        if begin[axis] or end[axis]:
            stop = -end[axis] if end[axis] else INT_MAX
            y = b.call(A.slice.Tensor, y, axis + 2, begin[axis], stop, 1)
    return [y]


_MAX_POOL = {1: A.max_pool1d.default, 2: A.max_pool2d.default, 3: A.max_pool3d.default}


_AVG_POOL = {1: A.avg_pool1d.default, 2: A.avg_pool2d.default, 3: A.avg_pool3d.default}


def _pool_setup(op: Op) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    kernel = _kernel(op, None)
    nd = len(kernel)
    strides = list(op.attr("strides", [1] * nd))
    dilations = list(op.attr("dilations", [1] * nd))
    begin, end = _auto_pads(op, kernel, strides, dilations)
    return kernel, strides, dilations, begin, end


def _max_pool(b: Builder, op: Op) -> list[Any]:
    if len(op.used) > 1 and op.used[1]:
        raise Problem("MaxPool's Indices output")
    x = need(op.input(0), "X")
    kernel, strides, dilations, begin, end = _pool_setup(op)
    limits = [((k - 1) * d + 1) // 2 for k, d in zip(kernel, dilations, strict=True)]
    x, padding = _pad_apart(b, x, begin, end, -math.inf, limits)
    return [b.call(_MAX_POOL[len(kernel)], x, kernel, strides, padding, dilations,
                   bool(op.attr("ceil_mode", 0)))]


def _avg_pool(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "X")
    kernel, strides, dilations, begin, end = _pool_setup(op)
    if any(d != 1 for d in dilations):
        raise Problem("AveragePool with dilations")
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


def _global_pool_op(kind: str) -> Translate:
    def translate(b: Builder, op: Op) -> list[Any]:
        x = need(op.input(0), "X")
        rank = op.rank(0)
        if rank is None:
            return [b.call(_global_pool, x, kind)]
        dims = list(range(2, rank))
        if kind == "avg":
            return [b.call(A.mean.dim, x, dims, True)]
        return [b.call(A.amax.default, x, dims, True)]
    return translate


def _lrn_op(b: Builder, op: Op) -> list[Any]:
    size = op.attr("size")
    if size is None or size % 2 == 0:
        raise Problem("LRN with an even size")
    return [b.call(_lrn, need(op.input(0), "X"), size, op.attr("alpha", 1e-4),
                   op.attr("beta", 0.75), op.attr("bias", 1.0))]


def _batch_norm(b: Builder, op: Op) -> list[Any]:
    if op.attr("training_mode", 0) or any(op.used[1:]):
        raise Problem("BatchNormalization in training mode")
    x, scale, bias, mean, var = (op.input(i) for i in range(5))
    momentum = op.attr("momentum", 0.9)
    return [b.call(A.batch_norm.default, need(x, "X"), scale, bias, need(mean, "mean"),
                   need(var, "var"), False, 1.0 - momentum, op.attr("epsilon", 1e-5), False)]


def _instance_norm(b: Builder, op: Op) -> list[Any]:
    return [b.call(A.instance_norm.default, need(op.input(0), "input"), op.input(1),
                   op.input(2), None, None, True, 0.0, op.attr("epsilon", 1e-5), False)]


def _layer_norm_op(b: Builder, op: Op) -> list[Any]:
    if any(op.used[1:]):
        raise Problem("LayerNormalization's Mean or InvStdDev output")
    x, scale, bias = need(op.input(0), "X"), op.input(1), op.input(2)
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


def _group_norm(b: Builder, op: Op) -> list[Any]:
    x, scale, bias = need(op.input(0), "X"), op.input(1), op.input(2)
    groups, channels = op.attr("num_groups"), op.dim(0, 1)
    if groups is None or channels is None:
        raise Problem("GroupNormalization on an input of unknown channel count")
    if op.opset < 21 and op.shape(1) is not None and op.shape(1)[0] == groups:
        scale = b.call(A.repeat_interleave.self_int, scale, channels // groups)
        bias = b.call(A.repeat_interleave.self_int, bias, channels // groups)
    return [b.call(A.group_norm.default, x, groups, scale, bias, op.attr("epsilon", 1e-5),
                   False)]


def _lp_norm(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "input")
    norm = b.call(A.linalg_vector_norm.default, x, float(op.attr("p", 2)),
                  [op.attr("axis", -1)], True)
    return [b.call(A.div.Tensor, x, norm)]


def _pad_op(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "data")
    mode = op.attr("mode", "constant")
    if mode not in ("constant", *_PAD_MODES):
        raise Problem(f"Pad mode={mode!r}")
    if op.opset < 11:
        pads, value, axes = op.attr("pads"), op.attr("value", 0.0), None
    else:
        raw = [op.input(i) for i in (1, 2, 3)]
        if any(isinstance(v, fx.Node) for v in raw):
            return [b.call(_pad, x, raw[0], raw[1], mode, raw[2])]
        pads, axes = const_ints(raw[0], "pads"), const_ints(raw[2], "axes")
        value = scalar(raw[1]) if raw[1] is not None and raw[1].numel() else 0.0
    if pads is None:
        raise Problem("Pad without pads")
    count = len(pads) // 2
    rank = op.rank(0) if axes is not None else count
    if rank is None:
        return [b.call(_pad, x, torch.tensor(pads), value, mode, torch.tensor(axes))]
    begin, end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes if axes is not None else range(count)):
        begin[axis], end[axis] = pads[i], pads[i + count]
    if mode != "constant":
        if _mode_axes(rank, [max(p, 0) for p in begin], [max(q, 0) for q in end]) is None:
            raise Problem(f"Pad mode={mode!r} on the first axes of a rank-{rank} tensor")
        return [b.call(_pad_by_mode, x, begin, end, mode)]
    return [b.call(A.constant_pad_nd.default, x, _torch_pads(begin, end), float(value or 0.0))]

OPS: dict[str, Translate] = {
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
    "Pad": _pad_op,
}
