"""A package's differentiable program, translated from its own ONNX graph.

Gradient methods and Grad-CAM need autograd; a package holds only ``model.onnx``. The graph is
translated into a torch.fx module of aten ops (``onnx_to_fx``: plain data in, our code out),
its outputs reordered to the service's convention (class scores, then the manifest's scale and
token outputs), its input taken as N×C×H×W whatever the model's layout, and a model with a
fixed batch run in chunks of it. Before any method uses it, the translation runs beside ONNX
Runtime on seeded random inputs; if an operator is missing or an output differs beyond the
tolerance, the gradient methods are not offered and ``GetModel`` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from saliency_service.core import devices
from saliency_service.core.outputs import PROBABILITIES, SIGMOID
from saliency_service.core.repository import ModelHandle
from saliency_service.methods._utils.onnx_to_fx import (
    GraphProgram,
    UnsupportedGraph,
    first_difference,
    to_graph_module,
)

# Largest |translated − ONNX Runtime| accepted, relative to the output's largest magnitude
# (a manifest's ``verification.tolerance`` overrides it).
TOLERANCE = 1e-4
CHECK_SEED = 20260


@dataclass(frozen=True)
class Translation:
    """The package's program, or why there is none (``problem``)."""

    program: GraphProgram | None
    problem: str = ""


def translation(model: ModelHandle) -> Translation:
    """The package's translated and checked program (built once per load)."""
    return model.derived("translation", _translate)


def gradient_problem(model: ModelHandle) -> str:
    """Why gradient methods cannot run on ``model`` ("" when they can)."""
    return translation(model).problem


def _translate(model: ModelHandle) -> Translation:
    spec = model.spec()
    source = model.onnx_model()
    try:
        graph_module = to_graph_module(source)
    except UnsupportedGraph as exc:
        return Translation(None, f"its ONNX graph cannot be differentiated here: {exc}")
    names = [output.name for output in source.graph.output]
    del source
    wanted = [spec.logits_output, *spec.extra_outputs]
    missing = [name for name in wanted if name not in names]
    if missing:
        return Translation(None, f"the ONNX graph has no output {missing[0]!r}")
    _select_outputs(graph_module, [names.index(name) for name in wanted])
    if spec.input.layout == "NHWC":
        _take_channels_first(graph_module)
    program = GraphProgram(graph_module)
    problem = _compare_with_onnx_runtime(model, program.graph_module, wanted)
    return Translation(None, problem) if problem else Translation(program)


def _select_outputs(graph_module: fx.GraphModule, indices: list[int]) -> None:
    """The module returns the graph's outputs ``indices``, in that order."""
    graph = graph_module.graph
    output = next(node for node in graph.nodes if node.op == "output")
    results = output.args[0]
    results = list(results) if isinstance(results, tuple | list) else [results]
    output.args = (tuple(results[i] for i in indices),)
    graph.eliminate_dead_code()
    graph_module.recompile()


def _take_channels_first(graph_module: fx.GraphModule) -> None:
    """An NHWC graph takes the service's N×C×H×W input and turns it around itself."""
    graph = graph_module.graph
    placeholder = next(node for node in graph.nodes if node.op == "placeholder")
    with graph.inserting_after(placeholder):
        permuted = graph.call_function(torch.ops.aten.permute.default, (placeholder, [0, 2, 3, 1]))
    placeholder.replace_all_uses_with(permuted, delete_user_cb=lambda user: user is not permuted)
    graph_module.recompile()


def _compare_with_onnx_runtime(model: ModelHandle, graph_module: fx.GraphModule,
                               outputs: list[str]) -> str:
    """"" when the translation reproduces ONNX Runtime on seeded random inputs, else why not."""
    spec = model.spec()
    tolerance = float(spec.extra.get("verification", {}).get("tolerance", TOLERANCE))
    tolerance = max(tolerance, TOLERANCE)
    rows = spec.input.batch or 2
    channels, height, width = spec.input.channels, spec.input.height, spec.input.width
    generator = np.random.default_rng(CHECK_SEED)
    inputs = generator.normal(0.0, 1.0, (rows, channels, height, width)).astype(np.float32)
    with devices.requested("float32"):  # the reference, whatever engine serves
        expected = model.run(inputs, outputs)
    with torch.no_grad():
        actual = graph_module(torch.from_numpy(inputs))
    # Probabilities are compared on their 0…1 scale: ONNX Runtime's Sigmoid is exact to ~1e-7
    # absolute, not relative, so a model that finds nothing (every probability ~1e-5) would
    # otherwise fail on its rounding.
    kind = spec.dense.scores if spec.dense is not None else spec.output_kind
    floors = {spec.logits_output: 1.0} if kind in (PROBABILITIES, SIGMOID) else {}
    for name, want, got in zip(outputs, expected, actual, strict=True):
        got = got.detach().numpy()
        if got.shape != want.shape:
            return (f"the translated graph's output {name!r} has shape {list(got.shape)}, "
                    f"ONNX Runtime's {list(want.shape)}")
        scale = max(float(np.abs(want).max()), floors.get(name, 1e-12))
        error = float(np.abs(got - want).max()) / scale
        if not error <= tolerance:
            graph_inputs = inputs.transpose(0, 2, 3, 1) if spec.input.layout == "NHWC" else inputs
            where = first_difference(model.onnx_model(), graph_inputs, tolerance)
            return (f"the translated graph's output {name!r} differs from ONNX Runtime's by "
                    f"{error:.1e} of its scale (tolerance {tolerance:.0e})"
                    + (f"; {where}" if where else ""))
    return ""
