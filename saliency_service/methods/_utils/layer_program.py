"""Grad-CAM at any N×C×H×W tensor of a package's graph, as pytorch-grad-cam's ``target_layers``.

The tensor becomes one more output of the translated program (``gradient_program``), which
is then cut there as a scale output is (``torch_program.cut_at_output``). Each such module
holds a copy of the weights, so at most ``MAX_LAYER_MODULES`` per model are kept, the least
recently used dropped first: naming many layers costs time, not memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from saliency_service.core import devices
from saliency_service.core.errors import FailedPrecondition, InvalidInput
from saliency_service.core.repository import ModelHandle
from saliency_service.core.request import RequestState
from saliency_service.methods._utils.gradient_program import gradient_problem, translation
from saliency_service.methods._utils.layer_names import (
    MAX_LAYER_CHARS,
    GraphNames,
    LayerNameError,
    graph_names,
    shown,
    tensors_named,
)
from saliency_service.methods._utils.torch_program import (
    CUT_PREFIX,
    PreparedModule,
    build_variant,
    model_precision,
)

MAX_LAYER_MODULES = 4
# How often a request waiting for another request's layer build checks its deadline.
BUILD_WAIT_SECONDS = 0.05
# The 4-D tensors an unknown name's refusal suggests, besides the manifest's scales.
SUGGESTED = 3
SHAPE_SEED = 0
# The added output's name inside the module (never a manifest output: those have no NUL).
_LAYER_OUTPUT = "\0layer"


@dataclass(frozen=True)
class LayerIndex:
    """What the translated program computes, by ONNX name: read once per model."""

    names: GraphNames
    nodes: dict[str, str]  # ONNX tensor → the program's node holding it
    shapes: dict[str, tuple[int, ...]]  # program node → shape, float tensors only
    batch_first: frozenset[str]  # program nodes whose first dimension is the batch
    scored: frozenset[str]  # program nodes the class scores depend on through float values
    outputs: dict[str, str]  # program node → the manifest's extra output it is
    labels: dict[str, str]  # program node → its ONNX tensor's producing node (or tensor)


def layer_index(model: ModelHandle) -> LayerIndex:
    """The cached index of ``model``'s translated program (gradient methods must run)."""
    return model.derived("layer_index", _build_index)


def find_layer(model: ModelHandle, layer: str) -> str:
    """The ONNX tensor (or the manifest's extra output) Grad-CAM reads for ``layer``: a
    tensor, node or module name. Raises :class:`InvalidInput` saying why none fits."""
    if len(layer) > MAX_LAYER_CHARS:
        raise InvalidInput(f"layer has {len(layer)} characters; at most {MAX_LAYER_CHARS} "
                           "(a tensor, node or module name of the graph)")
    index = layer_index(model)
    try:
        tensors, kind = tensors_named(index.names, layer)
    except LayerNameError as exc:
        raise InvalidInput(f"layer: {exc}") from None
    if not tensors:
        raise InvalidInput(f"layer {shown(layer)} names no tensor, node or module of the "
                           f"graph of model {model.spec().name!r}; N×C×H×W layers include "
                           f"{suggestions(model)}")
    held = [t for t in tensors if t in index.nodes]
    maps = [t for t in held if _is_map(index, index.nodes[t])]
    if len(maps) > 1 and kind == "node":
        raise InvalidInput(f"node {shown(layer)} makes {len(maps)} N×C×H×W tensors; name one: "
                           f"{', '.join(shown(t) for t in maps)}")
    if not maps:
        raise InvalidInput(_not_a_map(model, index, layer, tensors[-1]))
    node = index.nodes[maps[-1]]
    if node not in index.scored:
        raise InvalidInput(f"the class scores of model {model.spec().name!r} do not depend "
                           f"on layer {shown(layer)} (tensor {shown(maps[-1])}): its "
                           f"gradient is zero; choose one of {suggestions(model)}")
    return index.outputs.get(node, maps[-1])


def suggestions(model: ModelHandle) -> str:
    """The manifest's scales and the last few N×C×H×W tensors before the head."""
    spec = model.spec()
    choices = [f"{o} ({m})" for o, m in zip(spec.scale_outputs, spec.scale_modules,
                                             strict=False)]
    if spec.token_grid:
        choices.append(f"{spec.token_grid['output']} ({spec.cam_layer})")
    index = layer_index(model)
    maps = [node for node in index.shapes if node in index.scored and _is_map(index, node)
            and node not in index.outputs and index.shapes[node][2:] != (1, 1)]
    choices += [shown(index.labels[node]) for node in maps[-SUGGESTED:]]
    return ", ".join(choices) or "none"


def _is_map(index: LayerIndex, node: str) -> bool:
    return len(index.shapes.get(node, ())) == 4 and node in index.batch_first


def _not_a_map(model: ModelHandle, index: LayerIndex, layer: str, tensor: str) -> str:
    node = index.nodes.get(tensor)
    if node is None:
        return (f"the class scores of model {model.spec().name!r} do not depend on layer "
                f"{shown(layer)} (tensor {shown(tensor)}: a constant, or it feeds only other "
                f"outputs); choose one of {suggestions(model)}")
    shape = index.shapes.get(node)
    dims = ("×".join(["N", *map(str, shape[1:])]) if shape and node in index.batch_first
             else list(shape or ()))
    if shape is None:
        why = "is not a float tensor"
    elif len(shape) != 4:
        why = f"is {len(shape)}-D ({dims})"
    else:
        why = f"has shape {dims}, whose first dimension is not the batch"
    return (f"layer {shown(layer)} (tensor {shown(tensor)}) {why}; Grad-CAM reads an "
            f"N×C×H×W feature map, e.g. {suggestions(model)}")


class _Shapes(fx.Interpreter):
    """Runs the program once, keeping each float tensor's shape (values are freed) and the
    nodes that make a list of them (a Split), which the scores' values pass through too."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__(graph_module)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.lists: set[str] = set()

    def run_node(self, n: fx.Node) -> object:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor) and result.is_floating_point():
            self.shapes[n.name] = tuple(result.shape)
        elif isinstance(result, (list, tuple)) and any(
                isinstance(r, torch.Tensor) and r.is_floating_point() for r in result):
            self.lists.add(n.name)
        return result


def _build_index(model: ModelHandle) -> LayerIndex:
    problem = gradient_problem(model)
    if problem:
        raise FailedPrecondition(f"Grad-CAM is not available for model {model.name}: {problem}")
    graph_module = translation(model).program.graph_module
    spec = model.spec()
    rows = spec.input.batch or 2
    inputs = np.random.default_rng(SHAPE_SEED).normal(
        size=(rows, spec.input.channels, spec.input.height, spec.input.width))
    reader = _Shapes(graph_module)
    with torch.no_grad():
        reader.run(torch.from_numpy(inputs.astype(np.float32)))
    shapes = reader.shapes
    nodes: dict[str, str] = {}
    labels: dict[str, str] = {}
    batch_first = set()
    names = graph_names(model.onnx_model())
    for node in graph_module.graph.nodes:
        if node.op != "call_function":  # the input, and constants
            continue
        tensors = node.meta.get("onnx_tensors") or []
        for tensor in tensors:
            nodes.setdefault(tensor, node.name)
        if tensors:
            producer = names.producers.get(tensors[0])
            label = names.node_names[producer] if producer is not None else ""
            labels[node.name] = label or tensors[0]
        shape = shapes.get(node.name)
        value = node.meta.get("val")
        if not shape:
            continue
        if isinstance(value, torch.Tensor) and value.dim() == len(shape) and not spec.input.batch:
            first_is_batch = not isinstance(value.shape[0], int)  # the symbolic batch
        else:
            first_is_batch = shape[0] == rows
        if first_is_batch:
            batch_first.add(node.name)
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    results = list(output.args[0])
    outputs = {node.name: name for node, name in zip(results[1:], spec.extra_outputs,
                                                      strict=False) if isinstance(node, fx.Node)}
    scored: set[str] = set()
    seen: set[str] = set()
    pending = [results[0]]
    while pending:
        node = pending.pop()
        if not isinstance(node, fx.Node) or node.name in seen:
            continue
        seen.add(node.name)
        if node.name in shapes:
            scored.add(node.name)
        elif node.name not in reader.lists:
            continue
        pending.extend(node.all_input_nodes)
    return LayerIndex(names, nodes, shapes, frozenset(batch_first), frozenset(scored), outputs,
                      labels)


class _Once:
    """A program whose ``module()`` is a graph module already copied (one copy, not two)."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        self.graph_module = graph_module

    def module(self) -> fx.GraphModule:
        return self.graph_module


class _LayerModules:
    """At most ``MAX_LAYER_MODULES`` prepared modules, least recently used dropped first;
    built one at a time, so concurrent requests never hold more. A cached layer is served
    while another is being built; a request waiting for a build gives up at its deadline or
    cancellation (``state``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the dictionary; held for lookups only
        self._building = threading.Lock()  # one build at a time
        self._modules: OrderedDict[str, PreparedModule] = OrderedDict()

    def _cached(self, node: str) -> PreparedModule | None:
        with self._lock:
            module = self._modules.get(node)
            if module is not None:
                self._modules.move_to_end(node)
            return module

    def get(self, model: ModelHandle, node: str,
            state: RequestState | None = None) -> PreparedModule:
        module = self._cached(node)
        if module is not None:
            return module
        while not self._building.acquire(timeout=BUILD_WAIT_SECONDS):
            if state is not None:
                state.check()
        try:
            module = self._cached(node)  # built while this request waited
            if module is None:
                module = _build_module(model, node)
                with self._lock:
                    self._modules[node] = module
                    while len(self._modules) > MAX_LAYER_MODULES:
                        self._modules.popitem(last=False)
            return module
        finally:
            self._building.release()

    def __len__(self) -> int:
        return len(self._modules)


def layer_modules(model: ModelHandle) -> _LayerModules:
    """The model's bounded cache of modules cut at a client's layer."""
    return model.derived("layer_modules", lambda _m: _LayerModules())


def layer_module(model: ModelHandle, tensor: str, state: RequestState | None = None,
                 ) -> tuple[PreparedModule, int]:
    """The module cut at ONNX tensor ``tensor`` (from :func:`find_layer`) and the index of
    that tensor among its outputs; ``state`` ends a wait for another request's build."""
    node = layer_index(model).nodes[tensor]
    module = layer_modules(model).get(model, node, state)
    module.bfloat16 = model_precision(model).bfloat16
    return module, len(model.spec().extra_outputs) + 1


def _build_module(model: ModelHandle, node_name: str) -> PreparedModule:
    graph_module = translation(model).program.module()
    graph = graph_module.graph
    node = next(n for n in graph.nodes if n.name == node_name)
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((*output.args[0], node),)
    graph_module.recompile()
    outputs = (*model.spec().extra_outputs, _LAYER_OUTPUT)
    prepared = build_variant(_Once(graph_module), CUT_PREFIX + _LAYER_OUTPUT, outputs)
    prepared.fixed_batch = model.spec().input.batch
    return prepared.to_device(devices.torch_device())
