"""Tensors and attributes read from the ONNX protobuf as plain data: each type mapped to the
dtype the service computes in, sizes checked before anything is allocated, attributes
checked against the type the translations read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from onnx import AttributeProto, TensorProto, numpy_helper

from saliency_service.methods._utils.onnx_to_fx.reasons import Problem

MAX_BYTES = 2**31  # refuse constants (and runtime shape-made tensors) larger than this
INT_MAX = 2**63 - 1


DTYPES: dict[int, torch.dtype] = {
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


def torch_dtype(elem_type: int) -> torch.dtype:
    """The dtype the service computes an ONNX element type in."""
    if elem_type not in DTYPES:
        name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() \
            else str(elem_type)
        raise Problem(f"tensor type {name}")
    return DTYPES[elem_type]


def read_tensor(proto: TensorProto, what: str) -> torch.Tensor:
    """A tensor from its protobuf, refusing external files, strings and absurd sizes."""
    if proto.data_location == TensorProto.EXTERNAL or proto.external_data:
        raise Problem(f"{what} keeps its data in an external file (load the model with it)")
    if proto.HasField("segment"):
        raise Problem(f"{what} is a segmented tensor")
    dtype = torch_dtype(proto.data_type)
    dims = [int(d) for d in proto.dims]
    if any(d < 0 for d in dims):
        raise Problem(f"{what} has a negative dimension")
    if math.prod(dims) * _ITEM_BYTES.get(proto.data_type, 4) > MAX_BYTES:
        raise Problem(f"{what} is larger than {MAX_BYTES} bytes")
    try:
        array = numpy_helper.to_array(proto)
    except Exception as exc:  # malformed data: wrong length, unknown encoding
        raise Problem(f"{what} cannot be read: {exc}") from exc
    if array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)
    elif array.dtype in (np.uint16, np.uint32, np.uint64):
        array = array.astype(np.int64)
    return torch.from_numpy(np.array(array, copy=True)).to(dtype)


def check_bytes(shape: Sequence[int], dtype: torch.dtype) -> None:
    """Refuses a tensor of ``shape`` larger than ``MAX_BYTES`` before it is made."""
    if any(int(d) < 0 for d in shape):
        raise ValueError(f"negative size in shape {list(shape)}")
    size = math.prod(int(d) for d in shape) * torch.empty((), dtype=dtype).element_size()
    if size > MAX_BYTES:
        raise ValueError(f"a tensor of shape {list(shape)} is larger than {MAX_BYTES} bytes")


def int_list(value: Any) -> list[int]:
    """A tensor's or a sequence's values as a flat list of ints."""
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


@dataclass(frozen=True)
class _Subgraph:
    """Marks a graph-valued attribute (Loop, If, Scan bodies): never translated."""


def attribute_value(attr: AttributeProto) -> Any:
    """An attribute as a plain value (a tensor stays a protobuf until it is read)."""
    kind = attr.type
    if kind == AttributeProto.FLOAT:
        return float(attr.f)
    if kind == AttributeProto.INT:
        return int(attr.i)
    if kind == AttributeProto.STRING:
        return attr.s.decode("utf-8", "replace")
    if kind == AttributeProto.TENSOR:
        return attr.t  # decoded on use, with the size checks of read_tensor
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


def checked_attribute(name: str, value: Any) -> Any:
    """``value`` if it has the type ``name`` must have (ints read as floats where needed)."""
    kind = _ATTRIBUTE_KINDS.get(name)
    if not _FITS[kind](value):
        raise Problem(f"attribute {name} of the wrong type")
    return float(value) if kind == "float" else value
