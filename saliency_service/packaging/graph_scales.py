"""Where a program's spatial scales end and where its patch tokens are, read off its graph.

Module hooks cannot tell a shared ``nn.ReLU`` called three times from three layers, and miss
functional activations and ``torch.cat`` blocks altogether; the exported FX graph names every
tensor once. A scale ends at the last tensor of its resolution that every path from the
input to the logits goes through (a dominator) and that is an activation, a concatenation or
a residual sum: the post-activation map SMOE Scale reads. A vision transformer's tokens are
the dominating N×L×D tensor that feeds the last attention, on the grid of the patch
embedding, with any class or register tokens first (pytorch-grad-cam's ``reshape_transform``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten

ACTIVATIONS = frozenset({
    aten.relu.default, aten.relu_.default, aten.relu6.default, aten.hardtanh.default,
    aten.hardtanh_.default, aten.gelu.default, aten.gelu_.default, aten.silu.default,
    aten.silu_.default, aten.hardswish.default, aten.hardswish_.default, aten.mish.default,
    aten.leaky_relu.default, aten.leaky_relu_.default, aten.elu.default, aten.elu_.default,
})
BLOCK_ENDS = frozenset({aten.cat.default, aten.add.Tensor, aten.add_.Tensor})
SPATIAL = frozenset({
    aten.conv2d.default, aten.convolution.default, aten.max_pool2d.default,
    aten.max_pool2d_with_indices.default, aten.avg_pool2d.default,
    aten.adaptive_avg_pool2d.default, aten.adaptive_max_pool2d.default,
})
CONVOLUTIONS = frozenset({aten.conv2d.default, aten.convolution.default})
# Ops that move values between positions: their 4-D output is not an N×C×H×W map of the input.
REARRANGING = frozenset({
    aten.permute.default, aten.transpose.int, aten.view.default, aten.reshape.default,
    aten.flatten.using_ints, aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim,
    aten.t.default, aten.expand.default, aten.pixel_shuffle.default,
})
ATTENTION = frozenset({
    aten.softmax.int, aten._softmax.default, aten.scaled_dot_product_attention.default,
    aten._safe_softmax.default,
})
MAX_PREFIX_TOKENS = 16


class GraphScaleError(ValueError):
    """The graph has no usable scale or a requested name does not name one tensor."""


@dataclass(frozen=True)
class GraphPoint:
    """One tensor of the graph: its node, what produced it and its shape without the batch."""

    node: fx.Node
    label: str  # the outermost module whose output it is, or the node name
    shape: tuple[int, ...]

    def record(self) -> dict[str, Any]:
        module = self.label if self.label != self.node.name else ""
        return {"node": self.node.name, "op": str(self.node.target), "module": module,
                "shape": list(self.shape)}


@dataclass(frozen=True)
class TokenGrid:
    """A token tensor and how it maps onto the patch grid."""

    point: GraphPoint
    grid: tuple[int, int]
    prefix_tokens: int
    batch_dim: int

    def record(self, output: str) -> dict[str, Any]:
        return {"output": output, **self.point.record(), "grid": list(self.grid),
                "prefix_tokens": self.prefix_tokens, "batch_dim": self.batch_dim}


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_tensor(node: Any) -> bool:
    return isinstance(_val(node), torch.Tensor)


def _carries_values(node: Any) -> bool:
    """A floating-point tensor, or the list of them a Split makes: one that carries the
    image's values (not a shape or index)."""
    value = _val(node)
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in values)


def _batch_dims(node: fx.Node, fixed_batch: int = 0) -> list[int]:
    """Dimensions whose size is symbolic: the exported dynamic batch (or, in a graph exported
    at a fixed batch, the leading dimension of that size)."""
    shape = _val(node).shape
    if fixed_batch:
        return [0] if len(shape) and shape[0] == fixed_batch else []
    return [i for i, d in enumerate(shape) if not isinstance(d, int)]


def _static_shape(node: fx.Node, fixed_batch: int = 0) -> tuple[int, ...]:
    shape = _val(node).shape
    if fixed_batch:
        return tuple(int(d) for d in shape[1:])
    return tuple(int(d) for d in shape if isinstance(d, int))


class ProgramGraph:
    """The tensor nodes of one exported module's graph, with dominators and NCHW maps."""

    def __init__(self, graph_module: fx.GraphModule, fixed_batch: int = 0) -> None:
        self.fixed_batch = fixed_batch
        self.graph = graph_module.graph
        self.nodes = list(self.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder" and _is_tensor(n)]
        if len(placeholders) != 1:
            raise GraphScaleError("the program must take exactly one input tensor")
        self.input = placeholders[0]
        self.output = next(n for n in self.nodes if n.op == "output")
        self._dominators = self._find_dominators()
        self._nchw = self._find_nchw()
        self._after_conv = self._find_after_conv()

    def _tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if _is_tensor(a) and a.op != "get_attr"]

    def _find_dominators(self) -> set[fx.Node]:
        """Nodes every input → output path of values goes through (exact path counts, big
        integers). Paths through integer tensors (a Shape feeding a Resize's sizes, a
        Reshape's target) carry no values of the image, so they do not count."""
        into: dict[fx.Node, int] = {}
        for node in self.nodes:
            if node is self.input:
                into[node] = 1
            elif node is self.output or (node.op == "call_function" and _carries_values(node)):
                into[node] = sum(into.get(a, 0) for a in node.all_input_nodes
                                 if node is self.output or _carries_values(a))
        out: dict[fx.Node, int] = {self.output: 1}
        for node in reversed(self.nodes):
            if node is not self.output and _carries_values(node):
                out[node] = sum(out.get(u, 0) for u in node.users)
        total = into.get(self.output, 0)
        return {n for n in self.nodes if total and into.get(n, 0) * out.get(n, 0) == total}

    def _find_nchw(self) -> set[fx.Node]:
        """4-D nodes laid out N×C×H×W: the input, spatial ops, and ops that keep the
        spatial size of an N×C×H×W operand without rearranging it."""
        found = {self.input} if len(_val(self.input).shape) == 4 else set()
        channels_last: set[fx.Node] = set()  # N×H×W×C views of a map (ConvNeXt's norms)
        for node in self.nodes:
            if node.op != "call_function" or not _is_tensor(node) or _val(node).dim() != 4:
                continue
            source = node.args[0] if node.args else None
            if node.target == aten.permute.default:
                dims = list(node.args[1])
                if source in found and dims == [0, 2, 3, 1]:
                    channels_last.add(node)
                elif source in channels_last and dims == [0, 3, 1, 2]:
                    found.add(node)
            elif node.target in SPATIAL:
                found.add(node)
            elif (node.target not in REARRANGING and source in channels_last
                  and tuple(_val(source).shape[1:3]) == tuple(_val(node).shape[1:3])):
                channels_last.add(node)
            elif node.target not in REARRANGING:
                size = tuple(_val(node).shape[2:])
                if any(a in found and tuple(_val(a).shape[2:]) == size
                       for a in self._tensor_inputs(node)):
                    found.add(node)
        return found

    def _find_after_conv(self) -> set[fx.Node]:
        found: set[fx.Node] = set()
        for node in self.nodes:
            if node.op == "call_function" and (
                    node.target in CONVOLUTIONS or any(a in found for a in node.all_input_nodes)):
                found.add(node)
        return found

    # ---- names ---------------------------------------------------------------------------

    def _calls(self) -> dict[str, tuple[str, list[fx.Node]]]:
        """Module call key → (module path, nodes computed inside that call)."""
        calls: dict[str, tuple[str, list[fx.Node]]] = {}
        for node in self.nodes:
            for key, (path, _type) in (node.meta.get("nn_module_stack") or {}).items():
                if path:
                    calls.setdefault(key, (path, []))[1].append(node)
        return calls

    def _call_outputs(self, nodes: list[fx.Node]) -> list[fx.Node]:
        inside = set(nodes)
        return [n for n in nodes if _is_tensor(n)
                and any(u not in inside for u in n.users)]

    def label(self, node: fx.Node) -> str:
        """The outermost module called once whose one output is ``node``, else its name."""
        calls = self._calls()
        paths = [path for path, _ in calls.values()]
        for key in node.meta.get("nn_module_stack") or {}:
            if key not in calls:
                continue
            path, nodes = calls[key]
            if paths.count(path) == 1 and self._call_outputs(nodes) == [node]:
                return path
        return node.name

    def point(self, node: fx.Node) -> GraphPoint:
        return GraphPoint(node, self.label(node), _static_shape(node, self.fixed_batch))

    def find(self, name: str) -> fx.Node:
        """The node a user names: a module called exactly once, or a graph node name."""
        matches = [(key, nodes) for key, (path, nodes) in self._calls().items() if path == name]
        by_name = {n.name: n for n in self.nodes if _is_tensor(n)}
        if not matches and name in by_name:
            return by_name[name]
        if not matches:
            raise GraphScaleError(f"{name!r} is neither a submodule run in forward nor a node "
                                  "of the exported graph")
        if len(matches) > 1:
            nodes = [self._call_outputs(n)[-1].name for _, n in matches if self._call_outputs(n)]
            raise GraphScaleError(
                f"module {name!r} runs {len(matches)} times in forward, so it has no single "
                f"output; name one graph node instead: {nodes}")
        outputs = self._call_outputs(matches[0][1])
        if not outputs:
            raise GraphScaleError(f"module {name!r} produces no tensor used later")
        return outputs[-1]

    # ---- scales and tokens -----------------------------------------------------------------

    def resolution(self, node: fx.Node) -> tuple[int, int]:
        shape = _val(node).shape
        return int(shape[2]), int(shape[3])

    def scale_ends(self) -> list[GraphPoint]:
        """One post-activation tensor per spatial resolution, finest first."""
        by_resolution: dict[tuple[int, int], fx.Node] = {}
        for node in self.nodes:
            if (node in self._nchw and node in self._dominators and node in self._after_conv
                    and _batch_dims(node, self.fixed_batch) == [0]
                    and (node.target in ACTIVATIONS or node.target in BLOCK_ENDS)):
                size = self.resolution(node)
                if size != (1, 1):
                    by_resolution[size] = node  # the latest wins
        ordered = sorted(by_resolution.items(), key=lambda item: -item[0][0] * item[0][1])
        return [self.point(node) for _, node in ordered]

    def patch_grid(self) -> tuple[int, int] | None:
        """The resolution of the last N×C×H×W map made by a convolution."""
        maps = [n for n in self.nodes if n in self._nchw and n in self._after_conv]
        return self.resolution(maps[-1]) if maps else None

    def token_grid(self) -> TokenGrid | None:
        """The tokens that feed the last attention, when the model has attention over a
        patch grid."""
        grid = self.patch_grid()
        attention = [n for n in self.nodes if n.op == "call_function" and n.target in ATTENTION]
        if grid is None or not attention:
            return None
        last_attention = self.order[attention[-1]]
        patches = grid[0] * grid[1]
        candidates = []
        for node in self.nodes:
            if (self.order[node] >= last_attention or node not in self._dominators
                    or not _is_tensor(node) or _val(node).dim() != 3):
                continue
            batch = _batch_dims(node, self.fixed_batch)
            if batch not in ([0], [1]):
                continue
            tokens = int(_val(node).shape[1 - batch[0]])
            if 0 <= tokens - patches <= MAX_PREFIX_TOKENS:
                candidates.append((node, tokens - patches, batch[0]))
        if not candidates:
            return None
        node, prefix, batch_dim = candidates[-1]
        return TokenGrid(self.point(node), grid, prefix, batch_dim)

    def token_point(self, node: fx.Node) -> TokenGrid:
        """The token grid of a 3-D node the user named as the CAM layer."""
        grid = self.patch_grid()
        batch = _batch_dims(node, self.fixed_batch)
        if grid is None or _val(node).dim() != 3 or batch not in ([0], [1]):
            raise GraphScaleError(f"{node.name} is not an N×L×D token tensor of a patch grid")
        tokens = int(_val(node).shape[1 - batch[0]])
        prefix = tokens - grid[0] * grid[1]
        if not 0 <= prefix <= MAX_PREFIX_TOKENS:
            raise GraphScaleError(f"{node.name} has {tokens} tokens, which do not fit the "
                                  f"{grid[0]}×{grid[1]} patch grid")
        return TokenGrid(self.point(node), grid, prefix, batch[0])

    def named_scales(self, names: Sequence[str]) -> list[GraphPoint]:
        """The scale tensors a user named (modules or nodes); each must be a 4-D map."""
        points = []
        for name in names:
            node = self.find(name)
            if node not in self._nchw or _batch_dims(node, self.fixed_batch) != [0]:
                raise GraphScaleError(f"scale {name!r} ({node.name}) is not an N×C×H×W map")
            points.append(GraphPoint(node, name, _static_shape(node, self.fixed_batch)))
        return points


def distinct(points: Iterable[GraphPoint]) -> list[GraphPoint]:
    """Refuses two scales that are one tensor: their multi-scale maps would repeat a layer."""
    seen: dict[fx.Node, str] = {}
    kept = []
    for point in points:
        if point.node in seen:
            raise GraphScaleError(
                f"scales {seen[point.node]!r} and {point.label!r} are the same tensor "
                f"({point.node.name}); give each scale once")
        seen[point.node] = point.label
        kept.append(point)
    return kept
