"""ONNX Resize and Upsample: the aten upsampling op where one is equal, else a separable
resampling with ONNX's coordinate transforms, nearest-rounding modes and cubic weights."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx

from saliency_service.methods._utils.onnx_to_fx.builder import (
    A,
    Builder,
    Op,
    Translate,
    Value,
    dim_of,
    need,
)
from saliency_service.methods._utils.onnx_to_fx.data import check_bytes, int_list
from saliency_service.methods._utils.onnx_to_fx.reasons import Problem


def _output_size(size: int, scale: float) -> int:
    """ONNX Runtime's output length: the float32 product, truncated (0.7f × 10 gives 7)."""
    return int(np.float32(scale) * np.float32(size))


def _sizes_scale(size: int, out: int) -> float:
    """The scale ONNX Runtime derives from a requested size: a float32 quotient."""
    return float(np.float32(out) / np.float32(size))


def _source_coordinates(size: int, out: int, scale: float, mode: str) -> torch.Tensor:
    """Where each output position of a Resize reads from: ONNX's coordinate transforms in
    ONNX Runtime's float32 arithmetic, so a position on a rounding boundary (1.5 / 0.6f is
    2.0 in float32, 1.99… in float64) picks the same pixel."""
    f32 = torch.float32
    i = torch.arange(out, dtype=f32)
    s = torch.tensor(scale, dtype=f32)
    if mode == "half_pixel":
        return (i + 0.5) / s - 0.5
    if mode == "pytorch_half_pixel":
        return (i + 0.5) / s - 0.5 if out > 1 else torch.zeros(out, dtype=f32)
    if mode == "align_corners":
        if out == 1:
            return torch.zeros(out, dtype=f32)
        return i * torch.tensor(size - 1, dtype=f32) / torch.tensor(out - 1, dtype=f32)
    if mode == "asymmetric":
        return i / s
    if mode == "tf_half_pixel_for_nn":
        return (i + 0.5) / s
    # half_pixel_symmetric: the offset in float32, the rest in double, as ONNX Runtime does
    adjustment = torch.tensor(out, dtype=f32) / (s * torch.tensor(size, dtype=f32))
    offset = torch.tensor(size / 2, dtype=f32) * (1 - adjustment)
    coords = offset.double() + (i.double() + 0.5) / s.double() - 0.5
    return coords.to(f32)


def _nearest_index(coords: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """ONNX Runtime's rounding (halves away from zero unless the mode prefers the floor),
    clamped into the input."""
    low = torch.floor(coords)
    fraction = coords - low
    if mode == "round_prefer_floor":
        index = torch.where(fraction > 0.5, low + 1, low)
    elif mode == "round_prefer_ceil":
        index = torch.where(fraction >= 0.5, low + 1, low)
    elif mode == "floor":
        index = low
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
    size_list = int_list(sizes) if sizes is not None else None
    plan = []
    for axis in range(x.dim()):
        size = x.shape[axis]
        if size_list is not None:
            out = size_list[axis]
            scale = 1.0 if out == size else _sizes_scale(size, out)
        else:
            scale = float(scale_list[axis])
            out = size if scale == 1.0 else _output_size(size, scale)
        plan.append((axis, size, out, scale))
    if all(out == size for _, size, out, _ in plan):
        return x  # ONNX Runtime copies an input whose shape the Resize keeps, whatever the scale
    for axis, size, out, scale in plan:
        if scale == 1.0:
            continue
        check_bytes([*x.shape[:axis], out, *x.shape[axis + 1:]], x.dtype)
        coords = _source_coordinates(size, out, scale, coordinate)
        x = _resample(x, axis, coords, size, mode, nearest, cubic_a, bool(exclude_outside))
    return x

_COORDINATES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                "tf_half_pixel_for_nn", "half_pixel_symmetric")


_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _full_rank(values: list[Any] | None, axes: list[int] | None, rank: int | None,
               fill: Callable[[int], Any]) -> list[Any] | None:
    if values is None or axes is None:
        return values
    if rank is None:
        raise Problem("Resize with axes on an input of unknown rank")
    full = [fill(i) for i in range(rank)]
    for value, axis in zip(values, axes, strict=True):
        full[axis % rank] = value
    return full


def _resize_op(b: Builder, op: Op) -> list[Any]:
    x = need(op.input(0), "X")
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
        raise Problem(f"{op.op_type} {', '.join(problems)}")
    if isinstance(scales_value, torch.Tensor) and scales_value.numel() == 0:
        scales_value = None
    if isinstance(sizes_value, torch.Tensor) and sizes_value.numel() == 0:
        sizes_value = None
    if scales_value is None and sizes_value is None:
        raise Problem(f"{op.op_type} without scales or sizes")
    if isinstance(scales_value, fx.Node) or isinstance(sizes_value, fx.Node):
        if op.attr("axes") is not None:
            raise Problem(f"{op.op_type} with axes and run-time scales or sizes")
        return [b.call(_resize, x, scales_value, sizes_value, mode, coordinate, nearest,
                       op.attr("cubic_coeff_a", -0.75), op.attr("exclude_outside", 0))]
    rank, axes = op.rank(0), op.attr("axes")
    scales = _full_rank(scales_value.tolist() if scales_value is not None else None, axes,
                        rank, lambda i: 1.0)
    sizes = _full_rank(int_list(sizes_value) if sizes_value is not None else None, axes, rank,
                       lambda i: dim_of(b, op, x, i))
    fast = _resize_aten(b, op, x, scales, sizes, mode, coordinate, nearest)
    if fast is not None:
        return [fast]
    return [b.call(_resize, x, scales, sizes, mode, coordinate, nearest,
                   op.attr("cubic_coeff_a", -0.75), op.attr("exclude_outside", 0))]


def _resize_aten(b: Builder, op: Op, x: Value, scales: list[float] | None,
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
    spatial = [op.dim(0, 2), op.dim(0, 3)]
    if mode == "nearest" and coordinate == "asymmetric" and nearest == "floor":
        if scale_hw is not None:
            factors: list[float | None] = list(scale_hw)
        else:
            factors = [o / d if d else None for o, d in zip(out_hw, spatial, strict=True)]
        if all(f is not None and _power_of_two(f) for f in factors):
            return b.call(A.upsample_nearest2d.vec, x, out_hw, scale_hw)
        return None  # aten's index arithmetic differs from ONNX Runtime's at other factors
    if mode != "linear" or coordinate not in ("half_pixel", "pytorch_half_pixel",
                                              "align_corners"):
        return None
    if scale_hw is not None and not all(
            float(s).is_integer() if d is None else _output_size(d, s) == math.floor(d * s)
            for d, s in zip(spatial, scale_hw, strict=True)):
        return None  # aten would size the output in float64, ONNX Runtime in float32
    if coordinate == "pytorch_half_pixel":
        known = out_hw or ([math.floor(d * s) for d, s in zip(spatial, scale_hw, strict=True)]
                           if None not in spatial else None)
        if known is None or min(known) <= 1:
            return None
    return b.call(A.upsample_bilinear2d.vec, x, out_hw, coordinate == "align_corners",
                  scale_hw)


def _power_of_two(factor: float) -> bool:
    """1, 2, 4, …: where aten's nearest indices equal ONNX Runtime's exactly."""
    return factor >= 1 and factor == 2.0 ** round(math.log2(factor))

OPS: dict[str, Translate] = {
    "Resize": _resize_op,
    "Upsample": _resize_op,
}
