"""Which ONNX tensors a layer name means: a tensor's name, the name of the node that makes it,
or a PyTorch module path read off the nodes' scopes.

``torch.onnx.export`` (and ``saliency export``) names each node after the modules it ran in,
``/layer2/layer2.1/conv1/Conv``: each scope is the module's name from its last non-numeric
atom onwards, and a module called again gets ``_1``, ``_2`` … (``/layer1/layer1.0/relu_1/Relu``).
The ``torch.export``-based exporter keeps the module paths in each node's
``pkg.torch.onnx.name_scopes`` metadata instead. Plain data only: names are compared, never run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import onnx

# Longest layer name looked up (tf2onnx's scoped names run to a few hundred characters).
MAX_LAYER_CHARS = 1024
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_CALL_SUFFIX = r"_\d+"


class LayerNameError(ValueError):
    """The name means no tensor of the graph, or more than one; the message says which."""


@dataclass(frozen=True)
class GraphNames:
    """The graph's node names, outputs and module paths, in node order."""

    node_names: tuple[str, ...]
    node_outputs: tuple[tuple[str, ...], ...]
    module_paths: tuple[str, ...]  # the innermost module each node ran in ('' = none known)
    inputs: frozenset[str]
    producers: dict[str, int]  # tensor → the index of the node that makes it


def graph_names(model: onnx.ModelProto) -> GraphNames:
    """The names of ``model``'s nodes, what each makes and the module it ran in."""
    graph = model.graph
    producers = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    return GraphNames(
        node_names=tuple(node.name for node in graph.node),
        node_outputs=tuple(tuple(o for o in node.output if o) for node in graph.node),
        module_paths=tuple(module_path(node) for node in graph.node),
        inputs=frozenset(v.name for v in graph.input) | {t.name for t in graph.initializer},
        producers=producers)


def module_path(node: onnx.NodeProto) -> str:
    """The module path a node ran in: from ``name_scopes`` metadata when present, else from a
    ``/scope/…/Op`` node name (a repeated call keeps its ``_k`` suffix); '' when neither."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            scopes = _quoted(prop.value)
            return scopes[-2] if len(scopes) >= 3 else ""
    if not node.name.startswith("/"):
        return ""
    atoms: list[str] = []  # the path's dot-separated atoms
    for scope in node.name.split("/")[1:-1]:
        # The tail from the last non-numeric atom, searched back only while it is shorter
        # than the scope (a longer one cannot start it): one pass over the name in all.
        start, width = len(atoms), -1
        while start > 0 and width < len(scope):
            start -= 1
            width += len(atoms[start]) + 1
            if not atoms[start].isnumeric():
                break
        if atoms and width < len(scope) and scope.startswith(".".join(atoms[start:]) + "."):
            del atoms[start:]
        if atoms or scope:
            atoms.extend(scope.split("."))
    return ".".join(atoms)


def _quoted(text: str) -> list[str]:
    """The quoted strings of a list's text (``['', 'layer2', 'layer2.bn']``), backslash
    escapes kept, in one pass: an unterminated one ends the list."""
    found = []
    opening = -1  # where the string being read opens; -1 between strings
    index = 0
    while index < len(text):
        char = text[index]
        if opening < 0:
            opening = index if char in "'\"" else -1
        elif char == "\\":
            index += 1
        elif char == text[opening]:
            found.append(text[opening + 1:index])
            opening = -1
        index += 1
    return found


def _inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def tensors_named(names: GraphNames, layer: str) -> tuple[tuple[str, ...], str]:
    """The tensors ``layer`` may mean, most likely last, and what it named ("tensor", "node"
    or "module"): a tensor is itself; a node, its outputs; a module, the outputs of the last
    node run inside it. Raises :class:`LayerNameError` when it names nothing, a graph input,
    several nodes, or a module called more than once."""
    if len(layer) > MAX_LAYER_CHARS:
        raise LayerNameError(f"the layer name has {len(layer)} characters; at most "
                             f"{MAX_LAYER_CHARS} are looked up")
    if layer in names.producers:
        return (layer,), "tensor"
    if layer in names.inputs:
        raise LayerNameError(f"{shown(layer)} is an input or weight of the graph, not a layer")
    nodes = [i for i, name in enumerate(names.node_names) if name == layer]
    if len(nodes) > 1:
        raise LayerNameError(f"{len(nodes)} nodes are named {shown(layer)}; name one of "
                             f"their output tensors: {_listed(names.node_outputs[nodes[-1]])}")
    if nodes:
        return names.node_outputs[nodes[0]], "node"
    inside = [i for i, path in enumerate(names.module_paths) if path and _inside(path, layer)]
    if not inside:
        return (), ""
    again = re.compile(re.escape(layer) + _CALL_SUFFIX + r"(\.|$)")
    calls = [i for i, path in enumerate(names.module_paths) if again.match(path)]
    if calls:
        last = [names.node_names[inside[-1]], names.node_names[calls[-1]]]
        raise LayerNameError(f"module {shown(layer)} runs more than once in the graph, so it "
                             f"has no single output; name a node instead, e.g. {_listed(last)}")
    return names.node_outputs[inside[-1]], "module"


def shown(name: str, most: int = 80) -> str:
    """A name in a message: quoted, control characters escaped, at most ``most`` long."""
    return repr(name if len(name) <= most else name[: most - 1] + "…")


def _listed(names: Sequence[str]) -> str:
    return ", ".join(shown(n) for n in names)
