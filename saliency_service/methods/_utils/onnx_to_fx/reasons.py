"""Why a graph cannot be translated: the error gradient methods report in ``GetModel``,
and the per-node problem the walker collects into it.
"""

from __future__ import annotations

import onnx


class UnsupportedGraph(ValueError):
    """The ONNX graph uses operators, attributes or data this translator does not handle."""


class Problem(Exception):
    """One node cannot be translated; collected into :class:`UnsupportedGraph`."""


DEFAULT_DOMAINS = ("", "ai.onnx")


def op_label(node: onnx.NodeProto) -> str:
    """The node's op type, prefixed with its domain when that is not ONNX's own."""
    if node.domain in DEFAULT_DOMAINS:
        return node.op_type
    return f"{node.domain}.{node.op_type}"
