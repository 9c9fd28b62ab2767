"""``node.meta["val"]``: fake tensors whose batch size is a symbol when it is free, found
by running the translated graph at two batch sizes.
"""

from __future__ import annotations

from typing import Any

import onnx
import torch
from torch import fx

from saliency_service.methods._utils.onnx_to_fx.reasons import UnsupportedGraph


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


def annotate(module: fx.GraphModule, source: onnx.ValueInfoProto) -> None:
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
