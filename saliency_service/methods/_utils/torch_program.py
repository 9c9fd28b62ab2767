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
- ``trunk``: ``fast`` without its first layer, when that layer is a convolution of the input
  alone (:class:`LinearStem`); it takes the convolution's output. The stem is affine, so
  methods that sum gradients over points on a line (Integrated Gradients) run it twice per
  image instead of once per point, and its input-gradient pass once per image.

Every variant runs on the process's torch device (``--device``, ``core.devices``): inputs are
moved there and outputs come back on the CPU in float32. With ``--precision bfloat16`` (or
``auto`` on a CPU with bfloat16 units) a model's variants run under ``torch.autocast`` once its
vanilla gradient in bfloat16 matched float32 on seeded inputs (:func:`model_precision`).
Autocast casts frozen weights again on every pass; the variant keeps bfloat16 copies of the
tensors only autocast's bfloat16 operators read (:func:`bfloat16_graph`), which changes no
result and leaves float32 requests on the float32 weights.

Folding only rewrites the float arithmetic (w·γ/σ instead of BN after conv), so results agree
with the original program to float32 rounding; ``tests/test_torch_program.py`` checks it.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

from saliency_service.core import devices
from saliency_service.core.errors import FailedPrecondition
from saliency_service.core.repository import ModelHandle
from saliency_service.methods._utils.gradient_program import gradient_problem, translation

FAST = "fast"
GUIDED = "guided"
CUT_PREFIX = "cut:"
TRUNK = "trunk"
# The bfloat16 check: the least Pearson correlation of each image's vanilla gradient with
# float32's (a manifest's ``verification.bfloat16_min_pearson`` overrides it); the top-1
# classes must agree too.
MIN_BF16_PEARSON = 0.98
PRECISION_SEED = 0
PRECISION_ROWS = 4

_RELU_TARGETS = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
# Operators CPU autocast runs in bfloat16, casting every float argument: a weight read by
# these alone may be kept in bfloat16 without changing a result.
_BFLOAT16_OPERATORS = frozenset(
    getattr(torch.ops.aten, name) for name in (
        "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
        "conv_transpose3d", "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm"))
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
    """Cuts the graph: the layers before run without autograd, gradients stop here (a
    float32 leaf, so its gradient is float32 under autocast too)."""
    return x.detach().float().requires_grad_(True)


@dataclass(frozen=True)
class LinearStem:
    """A program's first layer when it is a 2-D convolution of the input alone.

    Being affine, it maps x' + α(x − x') to stem(x') + α·(stem(x) − stem(x')), and the input
    gradient of a weighted sum of points is the transposed convolution of the weighted sum of
    their output gradients: both exact up to float32 rounding.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def __call__(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        x = x.to(self.weight.device).contiguous(memory_format=torch.channels_last)
        bias = self.bias if with_bias else None
        return torch.conv2d(x, self.weight, bias, self.stride, self.padding, self.dilation,
                            self.groups).cpu()

    def input_gradient(self, grad: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        """∂(Σ grad ⊙ stem(x)) / ∂x for an input of ``input_shape`` (no autograd graph)."""
        device = self.weight.device
        shape_source = torch.empty(input_shape, dtype=grad.dtype, device=device).contiguous(
            memory_format=torch.channels_last)
        (result, _, _) = torch.ops.aten.convolution_backward.default(
            grad.to(device).contiguous(memory_format=torch.channels_last), shape_source,
            self.weight, None, list(self.stride), list(self.padding), list(self.dilation),
            False, [0, 0], self.groups, [True, False, False])
        return result.cpu()


class PreparedModule(torch.nn.Module):
    """Wraps a rewritten graph: inputs go in channels-last, outputs come back as a tuple.

    ``stem`` is set on the ``trunk`` variant: the first layer it leaves out. A graph with a
    fixed batch (``fixed_batch`` k) takes at most k inputs, padded to k by repeating the last;
    its outputs keep all k rows (callers read the first rows they gave), so a cut output
    stays the leaf a backward reaches.

    Inputs move to the module's device; outputs come back to the CPU in float32, except a
    cut output, which stays the (float32) leaf on the device. ``bfloat16`` runs the graph
    under ``torch.autocast``: its convolutions and products in bfloat16, while the input, its
    gradient and the outputs stay float32."""

    def __init__(self, graph_module: fx.GraphModule, channels_last: bool,
                 stem: LinearStem | None = None, fixed_batch: int = 0) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.channels_last = channels_last
        self.stem = stem
        self.fixed_batch = fixed_batch
        self.device = torch.device("cpu")
        self.bfloat16 = False
        self._bfloat16_graph: fx.GraphModule | None = None
        # bfloat16 copies by source tensor, shared with variants on the same weights (trunk).
        self._bfloat16_copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def to_device(self, device: str) -> PreparedModule:
        """Moves the weights (and the stem's) to ``device``; returns self."""
        self.device = torch.device(device)
        self.graph_module.to(self.device)
        self._bfloat16_graph = None
        self._bfloat16_copies.clear()
        if self.stem is not None and self.stem.weight.device != self.device:
            bias = self.stem.bias.to(self.device) if self.stem.bias is not None else None
            self.stem = dataclasses.replace(self.stem, weight=self.stem.weight.to(self.device),
                                            bias=bias)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fixed_batch:
            if x.shape[0] > self.fixed_batch:
                raise ValueError(f"the graph takes at most {self.fixed_batch} inputs at once, "
                                 f"got {x.shape[0]}")
            missing = self.fixed_batch - x.shape[0]
            if missing:
                x = torch.cat([x, x[-1:].expand(missing, *x.shape[1:])])
        x = x.to(self.device)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.bfloat16 and devices.requested_precision() != "float32":
            graph_module = self.bfloat16_module()
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                outputs = graph_module(x)
        else:
            outputs = self.graph_module(x)
        outputs = tuple(outputs) if isinstance(outputs, tuple | list) else (outputs,)
        return tuple(_for_caller(output) for output in outputs)


    def bfloat16_module(self) -> fx.GraphModule:
        """The graph on bfloat16 copies of its autocast-only weights (built once)."""
        with self._lock:
            if self._bfloat16_graph is None:
                self._bfloat16_graph = bfloat16_graph(self.graph_module,
                                                      self._bfloat16_copies)
            return self._bfloat16_graph


def bfloat16_graph(graph_module: fx.GraphModule,
                   copies: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
                   ) -> fx.GraphModule:
    """A copy of ``graph_module`` whose float32 tensors read only by operators autocast runs
    in bfloat16 are bfloat16 copies; every other attribute is shared. Under autocast it
    computes exactly what ``graph_module`` does (autocast would cast those tensors to the
    same values on every pass). A graph that calls submodules is returned as it is.
    ``copies`` (source tensor's id → source, copy) reuses the copies of another variant on
    the same weights, and records the new ones."""
    copies = {} if copies is None else copies
    if any(node.op == "call_module" for node in graph_module.graph.nodes):
        return graph_module
    graph = fx.Graph()
    graph.output(graph.graph_copy(graph_module.graph, {}))
    readers: dict[str, list[fx.Node]] = {}  # every reader of each attribute, over all its nodes
    for node in graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(str(node.target), []).extend(node.users)
    root: dict[str, Any] = {}
    for target, users in readers.items():
        value = _attribute(graph_module, target)
        autocast_only = bool(users) and all(
            user.op == "call_function"
            and getattr(user.target, "overloadpacket", None) in _BFLOAT16_OPERATORS
            for user in users)
        if autocast_only and isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            known = copies.get(id(value))
            if known is None or known[0] is not value:
                known = copies[id(value)] = (value, value.to(torch.bfloat16))
            value = known[1]
        root[target] = value
    return fx.GraphModule(root, graph)


def _for_caller(output: torch.Tensor) -> torch.Tensor:
    if output.requires_grad and output.is_leaf:  # a cut output: the leaf a backward reaches
        return output
    return output.float().cpu()


@dataclass(frozen=True)
class Precision:
    """The precision a model's gradient programs run in, and why (GetModel's metadata)."""

    bfloat16: bool
    note: str

    @property
    def bits(self) -> int:
        return 16 if self.bfloat16 else 32


def model_precision(model: ModelHandle) -> Precision:
    """The precision of ``model``'s gradient programs under ``--precision`` (checked once)."""
    return model.derived("precision", _choose_precision)


def _choose_precision(model: ModelHandle) -> Precision:
    placement = devices.current()
    if placement.precision == "float32":
        return Precision(False, "float32")
    if (placement.precision == "auto" and placement.device_type == "cpu"
            and not devices.cpu_has_bf16()):
        return Precision(False, "float32 (auto: this CPU has no bfloat16 units)")
    fast = model.derived(f"program:{FAST}", lambda m: _build_cached(m, FAST))
    spec = model.spec()
    rows = spec.input.batch or PRECISION_ROWS
    inputs = np.random.default_rng(PRECISION_SEED).normal(
        size=(rows, spec.input.channels, spec.input.height, spec.input.width))
    min_pearson = float(spec.extra.get("verification", {}).get("bfloat16_min_pearson",
                                                                 MIN_BF16_PEARSON))
    passed, summary = bfloat16_check(fast, torch.from_numpy(inputs.astype(np.float32)),
                                     min_pearson)
    if passed:
        return Precision(True, f"bfloat16 ({summary})")
    return Precision(False, f"float32 (bfloat16 failed its check: {summary})")


def bfloat16_check(module: PreparedModule, inputs: torch.Tensor,
                   min_pearson: float = MIN_BF16_PEARSON) -> tuple[bool, str]:
    """Whether ``module``'s vanilla gradient of the top-1 logit under bfloat16 autocast
    matches float32 on ``inputs`` (the least per-image Pearson ≥ ``min_pearson`` and the
    same top-1 classes), and the figures as one phrase."""
    results = []
    for bfloat16 in (False, True):
        leaf = inputs.clone().requires_grad_(True)
        if bfloat16:
            with torch.autocast(module.device.type, dtype=torch.bfloat16):
                logits = module.graph_module(leaf.to(module.device).contiguous(
                    memory_format=torch.channels_last))
            logits = (logits[0] if isinstance(logits, tuple | list) else logits).float()
        else:
            logits = module(leaf)[0]
        logits = logits.cpu()[: inputs.shape[0]]
        if not results:
            targets = logits.argmax(dim=1, keepdim=True)
        (grad,) = torch.autograd.grad(logits.gather(1, targets).sum(), leaf)
        results.append((logits.detach().argmax(dim=1), grad.detach().double()))
    (top_32, grad_32), (top_16, grad_16) = results
    pearson = min(_pearson(a, b) for a, b in zip(grad_32, grad_16, strict=True))
    agree = int((top_32 == top_16).sum())
    passed = pearson >= min_pearson and agree == inputs.shape[0]
    return passed, f"pearson {pearson:.3f}, top-1 {agree}/{inputs.shape[0]}"


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    denominator = float(a.norm() * b.norm())
    value = float(a @ b) / denominator if denominator > 0 else 1.0
    return value if math.isfinite(value) else 0.0


def prepared_module(model: ModelHandle, variant: str = FAST) -> PreparedModule:
    """The cached prepared copy of ``model``'s program (built on first use, once)."""
    module = _cached_variant(model, variant)
    if module is None:
        raise ValueError(f"the program has no {variant!r} variant")
    return module


def trunk_after_stem(model: ModelHandle) -> PreparedModule | None:
    """The cached ``trunk`` variant of ``model``'s program, or None when its input does not
    go through a convolution alone first."""
    return _cached_variant(model, TRUNK)


def linear_stem(model: ModelHandle) -> LinearStem | None:
    """The stem the cached ``trunk`` variant leaves out, or None when there is none."""
    trunk = trunk_after_stem(model)
    return trunk.stem if trunk is not None else None


def _cached_variant(model: ModelHandle, variant: str) -> PreparedModule | None:
    problem = gradient_problem(model)
    if problem:
        raise FailedPrecondition(f"gradient methods are not available for model "
                                 f"{model.name}: {problem}")
    module = model.derived(f"program:{variant}", lambda m: _build_cached(m, variant))
    if module is not None:
        module.bfloat16 = model_precision(model).bfloat16
    return module


def _build_cached(model: ModelHandle, variant: str) -> PreparedModule | None:
    try:
        if variant == TRUNK:  # shares the fast variant's folded weights
            fast = _cached_variant(model, FAST)
            return trunk_of(fast) if fast is not None else None
        prepared = build_variant(translation(model).program, variant,
                                 model.spec().extra_outputs)
    except NoStemError:
        return None
    prepared.fixed_batch = model.spec().input.batch
    return prepared.to_device(devices.torch_device())


def warm_up_variants(model: ModelHandle, inputs: np.ndarray, backward_rows: list[int],
                     forward_rows: list[int], max_batch: int) -> list[str]:
    """Runs every variant built so far the way the methods run it, once per chunk length
    (and the ``trunk``'s stem, which runs on whole requests, once per image count up to
    ``max_batch``), so that no request meets a batch shape for the first time: oneDNN
    builds its kernels per shape. ``inputs`` is one image (1×C×H×W); returns the variants."""
    image = torch.from_numpy(np.ascontiguousarray(inputs[:1], dtype=np.float32))
    bfloat16 = model_precision(model).bfloat16

    def rows_of(count: int) -> torch.Tensor:
        return image.expand(count, *image.shape[1:]).clone()

    variants = []
    for key, module in model.derived_items("program:"):
        if module is None:
            continue
        variant = key[len("program:"):]
        module.bfloat16 = bfloat16
        variants.append(variant)
        for rows in backward_rows:
            x = rows_of(rows)
            if variant == TRUNK:
                with torch.no_grad():
                    stemmed = module.stem(x)
                leaf = stemmed.requires_grad_(True)
                torch.autograd.grad(module(leaf)[0][:, 0].sum(), leaf)
            elif variant.startswith(CUT_PREFIX):
                outputs = module(x)
                leaves = [out for out in outputs[1:] if out.requires_grad and out.is_leaf]
                torch.autograd.grad(outputs[0][:, 0].sum(), leaves)
            else:
                leaf = x.requires_grad_(True)
                torch.autograd.grad(module(leaf)[0][:, 0].sum(), leaf)
        if variant == FAST:
            for rows in forward_rows if not module.fixed_batch else ():
                with torch.no_grad():
                    module(rows_of(rows))
        if variant == TRUNK:
            for count in range(1, max(max_batch, 1) + 1):
                x = rows_of(count)
                with torch.no_grad():
                    module.stem(x, with_bias=False)
                    module.stem.input_gradient(module.stem(x), x.shape)
    return variants


def build_variant(program: Any, variant: str,
                  outputs: tuple[str, ...] | None = None) -> PreparedModule:
    """A new prepared module of ``program`` (anything whose ``module()`` gives a fresh FX
    graph module of aten ops: a translated ONNX graph); does not touch ``program``.

    ``outputs`` names the program's outputs after the logits (the manifest's scale and token
    outputs); without it only ``scale_<k>`` names can be cut."""
    if variant == TRUNK:
        return trunk_of(build_variant(program, FAST))
    graph_module = program.module()
    for parameter in graph_module.parameters():
        parameter.requires_grad_(False)
    fold_batch_norms(graph_module)
    if variant == GUIDED:
        replace_relus(graph_module)
    elif variant.startswith(CUT_PREFIX):
        cut_at_output(graph_module, variant[len(CUT_PREFIX) :], outputs)
    elif variant != FAST:
        raise ValueError(f"unknown program variant {variant!r}")
    compute_in_place(graph_module)
    to_channels_last(graph_module)
    return PreparedModule(_finished(graph_module), channels_last=True)


def trunk_of(fast: PreparedModule) -> PreparedModule:
    """The ``fast`` module without its stem, on the same (folded, channels-last) weights;
    raises :class:`NoStemError` when the program has no stem to split off."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(fast.graph_module.graph, {}))
    trunk, stem = split_at_stem(fx.GraphModule(fast.graph_module, graph))
    prepared = PreparedModule(_finished(trunk), channels_last=True, stem=stem,
                              fixed_batch=fast.fixed_batch)
    prepared.device = fast.device
    prepared._bfloat16_copies = fast._bfloat16_copies  # the same weights: one bfloat16 copy
    return prepared


def _finished(graph_module: fx.GraphModule) -> fx.GraphModule:
    graph_module.graph.eliminate_dead_code()
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module


def _attr(graph_module: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return _attribute(graph_module, str(node.target))
    return None


def _attribute(graph_module: fx.GraphModule, target: str) -> Any:
    """The attribute a ``get_attr`` target ("a.b.c") names."""
    value: Any = graph_module
    for part in target.split("."):
        value = getattr(value, part)
    return value


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
        new_conv.meta = dict(node.meta)  # the folded output has the BatchNorm's shape
        node.replace_all_uses_with(new_conv)
        graph.erase_node(node)
        graph.erase_node(conv)
        folded += 1
    return folded


_IN_PLACE = {torch.ops.aten.relu.default: torch.ops.aten.relu_.default,
             torch.ops.aten.add.Tensor: torch.ops.aten.add_.Tensor}
_OUT_OF_PLACE = {in_place: plain for plain, in_place in _IN_PLACE.items()}


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    if va is None or vb is None or va.dtype != vb.dtype:
        return False
    return [str(d) for d in va.shape] == [str(d) for d in vb.shape]


def compute_in_place(graph_module: fx.GraphModule) -> int:
    """ReLUs and residual adds write into the convolution output they consume when nothing
    else reads it (a convolution's backward keeps its input, not its output), and a ReLU into
    the add it follows; returns the count. Saves a fresh tensor and its memory traffic per op
    (``python -m benchmarks.rewrites``); results are identical."""
    graph = graph_module.graph
    rewritten: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _IN_PLACE or not node.args:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or len(source.users) != 1 or node.kwargs:
            continue
        fresh = source.op == "call_function" and source.target == torch.ops.aten.conv2d.default
        after_add = source in rewritten and source.target == torch.ops.aten.add_.Tensor
        relu = node.target == torch.ops.aten.relu.default
        if (fresh or (relu and after_add)) and _same_shape(source, node):
            node.target = _IN_PLACE[node.target]
            rewritten.add(node)
    return len(rewritten)


class NoStemError(ValueError):
    """The program's input feeds something other than one convolution."""


def split_at_stem(graph_module: fx.GraphModule) -> tuple[fx.GraphModule, LinearStem]:
    """A new graph module that takes the output of the first convolution instead of the
    input, and that convolution; raises :class:`NoStemError` when the input has other uses
    (a skip connection, a normalization before the convolution)."""
    graph = graph_module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise NoStemError("the program takes more than one input")
    (source,) = placeholders
    # torch.export's shape guard module reads the input; it does not feed the result.
    users = [u for u in source.users if not (u.op == "call_module" and not u.users)]
    if len(users) != 1:
        raise NoStemError("the input feeds more than one node")
    (conv,) = users
    args = list(conv.args) + [None] * (7 - len(conv.args))
    weight_node, bias_node, stride, padding, dilation, groups = args[1:7]
    weight = _attr(graph_module, weight_node)
    bias = _attr(graph_module, bias_node) if bias_node is not None else None
    if (conv.op != "call_function" or conv.target != torch.ops.aten.conv2d.default
            or conv.kwargs or args[0] is not source or weight is None
            or (bias_node is not None and bias is None)
            or any(isinstance(a, fx.Node) for a in (stride, padding, dilation, groups))):
        raise NoStemError("the input's only user is not a convolution with constant weights")
    stem = LinearStem(weight, bias, tuple(stride or (1, 1)), tuple(padding or (0, 0)),
                      tuple(dilation or (1, 1)), int(groups or 1))
    for guard in [u for u in source.users if u is not conv]:
        graph.erase_node(guard)
    for user in conv.users:  # the trunk's input is a leaf that requires grad
        user.target = _OUT_OF_PLACE.get(user.target, user.target)
    conv.replace_all_uses_with(source)
    graph.erase_node(conv)
    graph._codegen = fx.graph.CodeGen()  # a plain signature: no input spec to check
    return fx.GraphModule(graph_module, graph), stem


def replace_relus(graph_module: fx.GraphModule) -> int:
    """Routes every ReLU through :class:`GuidedReLU`; returns the count."""
    count = 0
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in _RELU_TARGETS:
            node.target = guided_relu
            count += 1
    return count


def cut_at_output(graph_module: fx.GraphModule, output_name: str,
                  outputs: tuple[str, ...] | None = None) -> None:
    """Makes output ``output_name`` (a scale or token output) a leaf tensor that requires
    grad; ``outputs`` lists the outputs after the logits (default: ``scale_<k>`` is k + 1)."""
    if outputs is not None and output_name in outputs:
        index = outputs.index(output_name) + 1
    elif output_name.startswith("scale_") and output_name[6:].isdigit():
        index = int(output_name[6:]) + 1
    else:
        raise ValueError(f"not a scale or token output name: {output_name!r}")
    graph = graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    results = output.args[0]
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
