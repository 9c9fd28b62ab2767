"""Prepared copies of a package's ``torch.export`` program for gradient methods.

The user's program is never changed: each variant is a fresh ``program.module()`` whose FX
graph is rewritten once per model and cached beside the handle (thread-safe):

- ``fast``: eval-mode BatchNorm folded into the preceding convolution and the weights in
  channels-last layout; parameters never need gradients, only the input does. This cuts one
  input-gradient pass to about two thirds of eager PyTorch on a 2-core CPU.
- ``guided``: ``fast`` with every ``aten.relu`` calling :class:`GuidedReLU`, whose backward
  passes only positive gradients of positive inputs (Springenberg et al., arXiv 1412.6806).
- ``cut:<scale output>``: ``fast`` with that scale output turned into a fresh leaf that requires
  grad, so the layers before it run without autograd and a backward stops there (Grad-CAM).

Folding only rewrites the float arithmetic (w·γ/σ instead of BN after conv), so results agree
with the original program to float32 rounding; ``tests/test_torch_program.py`` checks it.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import fx

from service.repository import ModelHandle

FAST = "fast"
GUIDED = "guided"
CUT_PREFIX = "cut:"

_RELU_TARGETS = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
_BATCH_NORM_TARGETS = (
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
)


class GuidedReLU(torch.autograd.Function):
    """ReLU whose backward keeps a gradient only where both it and the input are positive."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        # ReLU's own backward (zero where the output is 0), then keep positive gradients.
        return torch.ops.aten.threshold_backward.default(grad, out, 0.0).clamp_min_(0.0)


def guided_relu(x: torch.Tensor) -> torch.Tensor:
    return GuidedReLU.apply(x)


def as_leaf(x: torch.Tensor) -> torch.Tensor:
    """Cuts the graph: the layers before run without autograd, gradients stop here."""
    return x.detach().requires_grad_(True)


class PreparedModule(torch.nn.Module):
    """Wraps a rewritten graph: inputs go in channels-last, outputs come back as a tuple."""

    def __init__(self, graph_module: fx.GraphModule, channels_last: bool) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        outputs = self.graph_module(x)
        return tuple(outputs) if isinstance(outputs, tuple | list) else (outputs,)


_CACHE: weakref.WeakKeyDictionary[ModelHandle, dict[str, Any]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def prepared_module(model: ModelHandle, variant: str = FAST) -> PreparedModule:
    """The cached prepared copy of ``model``'s program (built on first use, once)."""
    program = model.program
    if program is None:
        model.torch_module()  # raises FailedPrecondition with the actionable message
    with _LOCK:
        entry = _CACHE.get(model)
        if entry is None or entry["program"] is not program:
            entry = {"program": program, "variants": {}}
            _CACHE[model] = entry
        variants: dict[str, PreparedModule] = entry["variants"]
        if variant not in variants:
            variants[variant] = build_variant(program, variant)
        return variants[variant]


def build_variant(program: Any, variant: str) -> PreparedModule:
    """A new prepared module of ``program`` (an ExportedProgram); does not touch ``program``."""
    graph_module = program.module()
    for parameter in graph_module.parameters():
        parameter.requires_grad_(False)
    fold_batch_norms(graph_module)
    if variant == GUIDED:
        replace_relus(graph_module)
    elif variant.startswith(CUT_PREFIX):
        cut_at_output(graph_module, variant[len(CUT_PREFIX) :])
    elif variant != FAST:
        raise ValueError(f"unknown program variant {variant!r}")
    to_channels_last(graph_module)
    graph_module.graph.eliminate_dead_code()
    graph_module.graph.lint()
    graph_module.recompile()
    return PreparedModule(graph_module, channels_last=True)


def _attr(graph_module: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = graph_module
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value  # type: ignore[return-value]
    return None


def fold_batch_norms(graph_module: fx.GraphModule) -> int:
    """Folds eval-mode BatchNorm into the convolution feeding only it; returns the count."""
    graph = graph_module.graph
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _BATCH_NORM_TARGETS:
            continue
        conv = node.args[0]
        if (
            not isinstance(conv, fx.Node)
            or conv.op != "call_function"
            or conv.target != torch.ops.aten.conv2d.default
            or len(conv.users) != 1
        ):
            continue
        if node.target == torch.ops.aten.batch_norm.default:
            _, gamma_n, beta_n, mean_n, var_n, training, _, eps = node.args[:8]
            if training:
                continue
        else:
            _, gamma_n, beta_n, mean_n, var_n, _, eps = node.args[:7]
        weight = _attr(graph_module, conv.args[1])
        bias_node = conv.args[2] if len(conv.args) > 2 else None
        bias = _attr(graph_module, bias_node) if bias_node is not None else None
        mean, var = _attr(graph_module, mean_n), _attr(graph_module, var_n)
        gamma = _attr(graph_module, gamma_n) if gamma_n is not None else None
        beta = _attr(graph_module, beta_n) if beta_n is not None else None
        missing = (
            weight is None
            or mean is None
            or var is None
            or (bias_node is not None and bias is None)
            or (gamma_n is not None and gamma is None)
            or (beta_n is not None and beta is None)
        )
        if missing:
            continue
        with torch.no_grad():
            # Fold in float64 so the only rounding is the final cast back to float32.
            scale = torch.rsqrt(var.double() + float(eps))
            if gamma is not None:
                scale = scale * gamma.double()
            new_weight = (weight.double() * scale.reshape(-1, 1, 1, 1)).to(weight.dtype)
            shift = -mean.double() * scale
            if bias is not None:
                shift = shift + bias.double() * scale
            if beta is not None:
                shift = shift + beta.double()
            new_bias = shift.to(weight.dtype)
        weight_name, bias_name = f"_folded_{folded}_weight", f"_folded_{folded}_bias"
        graph_module.register_buffer(weight_name, new_weight.contiguous())
        graph_module.register_buffer(bias_name, new_bias.contiguous())
        with graph.inserting_before(conv):
            weight_attr = graph.get_attr(weight_name)
            bias_attr = graph.get_attr(bias_name)
        args = list(conv.args)
        while len(args) < 3:
            args.append(None)
        args[1], args[2] = weight_attr, bias_attr
        with graph.inserting_after(conv):
            new_conv = graph.call_function(
                torch.ops.aten.conv2d.default, tuple(args), dict(conv.kwargs)
            )
        node.replace_all_uses_with(new_conv)
        graph.erase_node(node)
        graph.erase_node(conv)
        folded += 1
    return folded


def replace_relus(graph_module: fx.GraphModule) -> int:
    """Routes every ReLU through :class:`GuidedReLU`; returns the count."""
    count = 0
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in _RELU_TARGETS:
            node.target = guided_relu
            count += 1
    return count


def cut_at_output(graph_module: fx.GraphModule, output_name: str) -> None:
    """Makes scale output ``scale_<k>`` a leaf tensor that requires grad."""
    if not output_name.startswith("scale_") or not output_name[6:].isdigit():
        raise ValueError(f"not a scale output name: {output_name!r}")
    graph = graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    results = output.args[0]
    index = int(output_name[6:]) + 1
    if not isinstance(results, tuple | list) or index >= len(results):
        raise ValueError(f"the program has no output {output_name!r}")
    source = results[index]
    with graph.inserting_after(source):
        leaf = graph.call_function(as_leaf, (source,))
    source.replace_all_uses_with(leaf, delete_user_cb=lambda user: user is not leaf)


def to_channels_last(graph_module: fx.GraphModule) -> None:
    """Stores 4-D weights channels-last so oneDNN convolutions skip layout conversions."""
    for name, buffer in list(graph_module.named_buffers()):
        if buffer.dim() == 4:
            _set(graph_module, name, buffer.contiguous(memory_format=torch.channels_last), False)
    for name, parameter in list(graph_module.named_parameters()):
        if parameter.dim() == 4:
            _set(
                graph_module,
                name,
                torch.nn.Parameter(
                    parameter.detach().contiguous(memory_format=torch.channels_last),
                    requires_grad=False,
                ),
                True,
            )


def _set(root: torch.nn.Module, name: str, value: torch.Tensor, is_parameter: bool) -> None:
    *path, leaf = name.split(".")
    owner = root
    for part in path:
        owner = getattr(owner, part)
    if is_parameter:
        owner.register_parameter(leaf, value)  # type: ignore[arg-type]
    else:
        owner.register_buffer(leaf, value)
