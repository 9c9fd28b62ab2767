"""PyTorch module → model package (``model.onnx``, ``manifest.json``).

The exporter runs ``torch.export`` on the module with a dynamic batch (a module whose forward
fixes its batch size is exported at batch 1, and served in chunks of it), finds the end of
each spatial scale and any patch-token tensor in the exported graph
(``packaging.graph_scales``), adds those tensors as extra outputs ``scale_0..scale_k`` and
``tokens_0`` beside ``logits``, exports that one graph to ONNX, checks ONNX Runtime against
PyTorch on random inputs and refuses to write a package that disagrees. Gradient methods
later run on the ONNX graph itself (``methods._utils.gradient_program``). ONNX nodes are named
by the modules they came from (``/layer3/layer3.1/conv2/Conv``, as a plain ``torch.onnx``
export names them), so tools reading the graph (the sanity checks' randomization) see the
model's modules.

A detector or segmenter whose forward returns tensors is exported with its ``kind``
(``docs/detection.md``): one grid head (``detection_raw``, with the anchor and NMS settings
the server decodes it with), post-NMS boxes, scores and classes (``detection``; no CAM layer,
as NMS passes no gradient to a box) or N×K×H×W class scores (``segmentation``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import fx, nn

from saliency_service.core import devices
from saliency_service.core.dense import (
    DETECTION,
    DETECTION_RAW,
    SEGMENTATION,
    DenseSpec,
    InvalidDenseSpec,
)
from saliency_service.core.repository import (
    FORMAT_VERSION,
    MANIFEST,
    ONNX_FILE,
    sha256_file,
)
from saliency_service.methods import registry
from saliency_service.packaging.graph_scales import (
    GraphPoint,
    GraphScaleError,
    ProgramGraph,
    TokenGrid,
    distinct,
)
from saliency_service.serving.onednn_cache import reserve_kernel_cache

log = logging.getLogger(__name__)

TOKENS_OUTPUT = "tokens_0"
CLASSIFICATION = "classification"
KINDS = (CLASSIFICATION, DETECTION_RAW, DETECTION, SEGMENTATION)
POST_NMS_OUTPUTS = ("boxes", "scores", "classes")


class ExportError(RuntimeError):
    """The module cannot be packaged, or ONNX Runtime disagrees with PyTorch."""


@dataclass(frozen=True)
class ExportReport:
    """What export wrote and how well ONNX Runtime matched PyTorch."""

    path: Path
    max_abs_diff: float
    scale_modules: tuple[str, ...]
    scale_shapes: tuple[tuple[int, ...], ...]
    scale_nodes: tuple[str, ...] = ()
    token_grid: dict[str, Any] | None = None
    export_seconds: float = 0.0
    kind: str = "classification"
    outputs: dict[str, Any] = field(default_factory=dict)  # the manifest's, scales aside
    labels: tuple[str, ...] = ()


@contextlib.contextmanager
def _exportable() -> Iterator[None]:
    """Turns off ``nn.MultiheadAttention``'s inference fast path while tracing: its fused
    kernel has no ONNX export and no backward, so a transformer would export only in parts."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1, max=4096)


def trace_program(model: nn.Module, example: torch.Tensor, free_batch: bool = True) -> Any:
    """``torch.export`` of ``model``, with a free batch dimension unless ``free_batch`` is
    False."""
    try:
        with _exportable():
            if not free_batch:
                return torch.export.export(model, (example,))
            return torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
    except Exception as exc:
        raise ExportError(f"torch.export failed: {exc}") from exc


def _keeps_module_state(function: Callable[..., Any]) -> Callable[..., Any]:
    """Runs ``function(model, ...)`` and then gives ``model`` back its training mode and its
    parameters' ``requires_grad``: exporting freezes the module, the caller's stays as it was."""

    @functools.wraps(function)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        modes = [(module, module.training) for module in model.modules()]
        grads = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
        try:
            return function(model, *args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training
            for parameter, requires_grad in grads:
                parameter.requires_grad_(requires_grad)

    return wrapper


def graph_of(model: nn.Module, example: torch.Tensor, free_batch: bool = True
             ) -> tuple[fx.GraphModule, ProgramGraph]:
    """The exported graph module of ``model`` (eval mode, no parameter gradients) and its
    analysis. The module shares ``model``'s parameters, so ``model`` stays frozen too."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    module = trace_program(model, example, free_batch).module()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    try:
        return module, ProgramGraph(module, 0 if free_batch else int(example.shape[0]))
    except GraphScaleError as exc:
        raise ExportError(str(exc)) from exc


@_keeps_module_state
def find_scale_modules(module: nn.Module, example: torch.Tensor) -> list[str]:
    """Labels (outermost module, else graph node) of the tensors that end each scale."""
    _, graph = graph_of(module, example.expand(2, *example.shape[1:]).contiguous())
    return [point.label for point in graph.scale_ends()]


def with_outputs(graph_module: fx.GraphModule, extra: Sequence[fx.Node],
                 returns: int = 1) -> fx.GraphModule:
    """``graph_module`` returning ``(*its results, *extra)`` with a plain ``forward(x)``
    signature; it must return ``returns`` tensors (the logits, or a post-NMS detector's
    boxes, scores and classes)."""
    graph = graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    results = output.args[0]
    values = list(results) if isinstance(results, tuple | list) else [results]
    if len(values) != returns:
        wanted = "the logits alone" if returns == 1 else f"{returns} tensors"
        raise ExportError(f"the model returns {len(values)} values; it must return {wanted}")
    output.args = ((*values, *extra),)
    for node in [n for n in graph.nodes if n.op == "call_module" and not n.users]:
        graph.erase_node(node)  # the exported input guard: re-export checks shapes again
    graph._codegen = fx.graph.CodeGen()
    graph.eliminate_dead_code()
    graph_module.recompile()
    return graph_module


def module_path(node: fx.Node) -> list[tuple[str, str]]:
    """(qualified name, class name) of each module ``node`` was computed in, outermost
    first (the model itself left out)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(str(path), str(kind)) for path, kind in stack.values() if path]


def scope_name(path: str, kind: str) -> str:
    """torch.onnx's scope for a submodule: its class and its name's last non-numeric atom
    onwards, so nodes are named ``/layer3/layer3.1/conv2/Conv`` as for a plain export."""
    atoms = path.split(".")
    start = next((i for i in reversed(range(len(atoms))) if not atoms[i].isnumeric()), 0)
    return torch._C._jit_onnx_create_full_scope_name(kind, ".".join(atoms[start:]))


class _ScopedRun(fx.Interpreter):
    """Runs a graph module under the ONNX tracer inside the scopes of the modules each node
    came from: the graph itself is flat, and without them every ONNX node would be named
    after its operator alone (``/Conv_7``), hiding the model's modules from Grad-CAM's
    layer names and the sanity checks' randomization."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__(graph_module)
        self._open: list[tuple[str, str]] = []

    def run_node(self, n: fx.Node) -> Any:
        state = torch._C._get_tracing_state()
        if state is not None and n.op == "call_function":
            wanted = module_path(n)
            shared = 0
            while (shared < min(len(wanted), len(self._open))
                   and wanted[shared] == self._open[shared]):
                shared += 1
            for _ in range(len(self._open) - shared):
                state.pop_scope()
                self._open.pop()
            for path, kind in wanted[shared:]:
                state.push_scope(scope_name(path, kind))
                self._open.append((path, kind))
        return super().run_node(n)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().run(*args, **kwargs)
        finally:
            state = torch._C._get_tracing_state()
            while self._open:
                self._open.pop()
                if state is not None:
                    state.pop_scope()


class _Traced(nn.Module):
    """Holds a graph module for ONNX tracing without exposing it to ``train()``, which an
    exported module refuses; while traced, its nodes run in their modules' scopes."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__()
        object.__setattr__(self, "graph_module", graph_module)

    def train(self, mode: bool = True) -> _Traced:
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if torch._C._get_tracing_state() is not None:
            return tuple(_ScopedRun(self.graph_module).run(x))
        return tuple(self.graph_module(x))


def _choose(graph: ProgramGraph, scale_modules: Sequence[str] | None,
            cam_layer: str | None) -> tuple[list[GraphPoint], TokenGrid | None, str]:
    """Scale tensors, the token grid (if any) and the CAM layer's output name."""
    try:
        scales = distinct(graph.named_scales(scale_modules) if scale_modules
                          else graph.scale_ends())
        tokens: TokenGrid | None = None
        if cam_layer:
            node = graph.find(cam_layer)
            if len(node.meta["val"].shape) == 3:
                tokens = graph.token_point(node)
            elif all(p.node is not node for p in scales):
                scales = distinct([*scales, *graph.named_scales([cam_layer])])
        else:
            tokens = graph.token_grid()
    except GraphScaleError as exc:
        raise ExportError(str(exc)) from exc
    if tokens is not None:
        return scales, tokens, TOKENS_OUTPUT
    if not scales:
        raise ExportError("found no feature maps that end a spatial scale (an activation, "
                          "concatenation or residual sum of N×C×H×W maps) and no patch tokens "
                          "feeding attention: is this an image model?")
    if cam_layer:
        node = graph.find(cam_layer)
        index = next(i for i, p in enumerate(scales) if p.node is node)
    else:
        index = len(scales) - 1
    return scales, None, f"scale_{index}"


def _gap_linear_head(model: nn.Module, cam_output: str, head_name: str | None) -> dict[str, Any]:
    """Describes the head when it is global-average-pool + linear (FastCAM needs no backward)."""
    if head_name is None or not cam_output.startswith("scale_"):
        return {"type": "unknown"}
    head = model.get_submodule(head_name)
    if not isinstance(head, nn.Linear):
        return {"type": "unknown"}
    return {"type": "gap_linear", "linear": head_name, "features": head.in_features,
            "scale_output": cam_output}


def _kind_outputs(kind: str, reference: Sequence[torch.Tensor],
                  input_shape: tuple[int, int, int], labels: int,
                  detection: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
    """The class count and the manifest's ``outputs`` (scales aside) for what the module's
    forward returned on the example (``reference``), checked against ``kind``."""
    first = reference[0]
    shape = list(first.shape)
    height, width = input_shape[1:]
    if kind == CLASSIFICATION:
        if first.dim() != 2:
            raise ExportError(f"forward returns {shape}; a classifier returns N×classes "
                              "logits (pass --kind for a detector or segmenter)")
        return int(shape[1]), {"logits": "logits"}
    if kind == SEGMENTATION:
        if first.dim() != 4 or tuple(shape[2:]) != (height, width) or shape[1] < 2:
            raise ExportError(f"forward returns {shape}; a segmenter returns N×K×{height}×"
                              f"{width} class scores (K ≥ 2) at the input's size")
        return int(shape[1]), {"kind": SEGMENTATION, "logits": "logits"}
    if kind == DETECTION:
        boxes, scores, classes = (list(t.shape) for t in reference[:3])
        if len(boxes) != 3 or boxes[2] != 4 or scores != boxes[:2] or classes != boxes[:2]:
            raise ExportError(f"forward returns {boxes}, {scores} and {classes}; a post-NMS "
                              "detector returns boxes N×M×4, scores N×M and classes N×M")
        return labels, {"kind": DETECTION, **{n: n for n in POST_NMS_OUTPUTS}}
    grid = dict(detection or {})
    if first.dim() != 4 or shape[1] < 6:
        raise ExportError(f"forward returns {shape}; a grid head is N×(5 + K)×S×S")
    rows, columns = shape[2:]
    stride = grid.pop("stride", None) or height / rows
    if rows * stride != height or columns * stride != width:
        raise ExportError(f"a {rows}×{columns} grid at stride {stride:g} does not cover the "
                          f"{height}×{width} input: check --stride and --input-shape")
    if grid.get("anchor") is None:
        raise ExportError(f"the grid head (stride {stride:g}) does not say its anchor: pass "
                          "--anchor PIXELS, the box side its size offsets scale")
    outputs = {"kind": DETECTION_RAW, "logits": "logits",
               "detection": {"stride": stride, **{k: v for k, v in grid.items()
                                                  if v is not None}}}
    try:
        DenseSpec.from_outputs(DETECTION_RAW, outputs)
    except InvalidDenseSpec as exc:
        raise ExportError(str(exc).replace("manifest outputs.detection.", "detection ")) from None
    return int(shape[1]) - 5, outputs


@_keeps_module_state
def export_package(
    model: nn.Module,
    *,
    name: str,
    version: int,
    input_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    class_labels: Sequence[str],
    repository: Path,
    value_range: tuple[float, float] = (0.0, 1.0),
    scale_modules: Sequence[str] | None = None,
    cam_layer: str | None = None,
    head: str | None = None,
    kind: str = CLASSIFICATION,
    detection: dict[str, Any] | None = None,
    verify_inputs: int = 4,
    tolerance: float = 1e-3,
    seed: int = 0,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> ExportReport:
    """Exports ``model`` (eval mode) as ``repository/name/version``.

    Args:
        input_shape: C×H×W of one image; the batch dimension stays dynamic.
        scale_modules: submodules (called once) or graph nodes ending each scale (found in
            the exported graph when None).
        cam_layer: module or graph node for Grad-CAM: a feature map, or N×L×D tokens of a
            vision transformer (default: the tokens feeding the last attention, else the
            last scale).
        head: name of a final ``nn.Linear`` applied after global average pooling, if any.
        kind: what forward returns (``docs/detection.md``): ``classification`` (N×classes
            logits), ``detection_raw`` (one grid head N×(5 + K)×S×S), ``detection`` (boxes
            N×M×4, scores N×M, classes N×M after NMS) or ``segmentation`` (N×K×H×W at the
            input's size).
        detection: a grid head's ``anchor`` (pixels, required), ``stride`` (default: the
            input's size over the grid's), ``score_threshold``, ``nms_iou`` and
            ``max_detections`` (``core.dense.DenseSpec``'s defaults).
        metadata: free-form facts stored in the manifest (e.g. training accuracy).
        tolerance: largest acceptable |ONNX Runtime − PyTorch| over all outputs, relative to
            the outputs' magnitude (max(1, max |torch output|)).

    Raises:
        ExportError: when ONNX Runtime disagrees with PyTorch, the model cannot be traced,
            or two scales are the same tensor.
    """
    started = time.perf_counter()
    if kind not in KINDS:
        raise ExportError(f"kind {kind!r} must be one of {', '.join(KINDS)}")
    if kind == DETECTION and not class_labels:
        raise ExportError("a post-NMS detector's outputs do not say how many classes it has: "
                          "give its class labels (--labels) in class-index order")
    reserve_kernel_cache()  # before its first convolution, for a server in this process
    model = model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(2, *input_shape, generator=generator)
    target = Path(repository) / name / str(version)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} exists; pass overwrite=True (--force) to replace it")
    try:
        graph_module, graph = graph_of(model, example)
        batch = 0
    except ExportError as free:
        # A forward that fixes its batch size (a literal batch in a reshape or expand) still
        # exports at batch 1; the server then runs requests one image at a time.
        try:
            graph_module, graph = graph_of(model, example[:1], free_batch=False)
        except ExportError:
            raise free from None
        log.warning("%s: the batch cannot stay free (%s); exported at batch 1", name,
                    str(free).splitlines()[0][:200])
        example, batch = example[:1], 1
    if kind == DETECTION:  # NMS passes no gradient to a box: no CAM layer to read
        scales, tokens, cam_output = [], None, ""
    else:
        scales, tokens, cam_output = _choose(graph, scale_modules, cam_layer)
    for index, point in enumerate(scales):
        log.info("scale_%d: node %s (%s) %s, shape %s", index, point.node.name,
                 point.label, point.node.target, list(point.shape))
    extra = [p.node for p in scales] + ([tokens.point.node] if tokens else [])
    model_outputs = list(POST_NMS_OUTPUTS) if kind == DETECTION else ["logits"]
    graph_module = with_outputs(graph_module, extra, len(model_outputs))
    with torch.no_grad():
        reference = graph_module(example)
    num_classes, outputs = _kind_outputs(kind, reference, input_shape, len(class_labels),
                                         detection)
    if class_labels and len(class_labels) != num_classes:
        raise ExportError(f"{len(class_labels)} class labels for {num_classes} "
                          + ("logits" if kind == CLASSIFICATION else f"classes of the {kind} "
                             "outputs"))
    labels = list(class_labels) or [str(i) for i in range(num_classes)]
    scale_names = [f"scale_{i}" for i in range(len(scales))]
    token_names = [TOKENS_OUTPUT] if tokens else []
    output_names = [*model_outputs, *scale_names, *token_names]
    batch_axes = {n: 0 for n in output_names}
    if tokens:
        batch_axes[TOKENS_OUTPUT] = tokens.batch_dim
    program = trace_program(graph_module, example, free_batch=not batch)

    with tempfile.TemporaryDirectory(dir=Path(repository).parent if Path(repository).exists()
                                     else None) as staging:
        staging_dir = Path(staging)
        onnx_path = staging_dir / ONNX_FILE
        _export_onnx(graph_module, program, example, onnx_path, output_names,
                     batch_axes if not batch else {})
        max_diff = _verify(graph_module, onnx_path, input_shape, output_names, verify_inputs,
                           tolerance, generator, batch)
        activation_bytes = _activation_bytes(model, example[:1])
        scale_shapes = [list(p.shape) for p in scales]
        cam_label = (tokens.point.label if tokens else
                     scales[int(cam_output[6:])].label if cam_output else "")
        manifest = {
            "format": FORMAT_VERSION,
            "name": name,
            "version": version,
            "input": {"name": "input", "shape": [batch or -1, *input_shape], "dtype": "float32",
                      "layout": "NCHW", "mean": list(map(float, mean)),
                      "std": list(map(float, std)), "value_range": list(value_range)},
            "outputs": {**outputs, "scales": scale_names,
                        **({"tokens": token_names} if token_names else {})},
            "scale_modules": [p.label for p in scales],
            "scale_nodes": [p.record() for p in scales],
            "scale_shapes": scale_shapes,
            "cam_layer": cam_label,
            "cam_output": cam_output,
            "token_grid": tokens.record(TOKENS_OUTPUT) if tokens else {},
            "class_labels": labels,
            "head": (_gap_linear_head(model, cam_output, head) if kind == CLASSIFICATION
                     else {"type": "unknown"}),
            "methods": [h.name for h in registry.handlers()],
            "activation_bytes": activation_bytes,
            "exporter": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": ort.__version__, "opset": _opset(onnx_path)},
            "metadata": dict(metadata or {}),
            "verification": {"inputs": verify_inputs, "max_abs_diff": max_diff,
                             "tolerance": tolerance},
            "files": {f: {"sha256": sha256_file(staging_dir / f),
                          "bytes": (staging_dir / f).stat().st_size}
                      for f in (ONNX_FILE,)},
        }
        (staging_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging_dir, target)
        target.chmod(0o755)
    seconds = time.perf_counter() - started
    log.info("exported %s in %.1f s (max |ORT − torch| = %.3g)", target, seconds, max_diff)
    return ExportReport(target, max_diff, tuple(p.label for p in scales),
                        tuple(tuple(s) for s in scale_shapes),
                        tuple(p.node.name for p in scales),
                        tokens.record(TOKENS_OUTPUT) if tokens else None, seconds, kind,
                        outputs, tuple(labels))


def _reads_sizes(graph_module: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target == torch.ops.aten.sym_size.int
               for n in graph_module.graph.nodes)


def _export_onnx(graph_module: fx.GraphModule, program: Any, example: torch.Tensor,
                 path: Path, output_names: list[str], batch_axes: dict[str, int]) -> None:
    """ONNX with a dynamic batch axis, as one self-contained file.

    The TorchScript-based exporter (deterministic, fast, exact for convolutional networks)
    traces the graph module; a graph that reads its batch size (a class token expanded to
    the batch) goes through the ``torch.export``-based exporter, which keeps that size
    symbolic where the tracer would freeze it."""
    try:
        with warnings.catch_warnings(), _exportable():
            warnings.simplefilter("ignore", DeprecationWarning)
            if _reads_sizes(graph_module) and batch_axes:
                torch.onnx.export(program, (example,), str(path), input_names=["input"],
                                  output_names=output_names, opset_version=18, dynamo=True,
                                  external_data=False, verbose=False)
            else:
                torch.onnx.export(
                    _Traced(graph_module), (example,), str(path), input_names=["input"],
                    output_names=output_names,
                    dynamic_axes={"input": {0: "batch"},
                                  **{n: {axis: "batch"} for n, axis in batch_axes.items()}}
                    if batch_axes else None,
                    opset_version=17, dynamo=False,
                )
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {exc}") from exc
    onnx.checker.check_model(str(path))


def _opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def _verify(program: Callable[[torch.Tensor], Sequence[torch.Tensor]], onnx_path: Path,
            input_shape: tuple[int, int, int], output_names: list[str], count: int,
            tolerance: float, generator: torch.Generator, fixed_batch: int = 0) -> float:
    """Max |ORT − torch| over ``count`` random inputs (batch sizes 1 and 3, or the fixed
    batch); raises if too big."""
    session = ort.InferenceSession(str(onnx_path), providers=devices.session_providers())
    worst = 0.0
    for index in range(count):
        batch = fixed_batch or (1 if index % 2 == 0 else 3)
        x = torch.randn(batch, *input_shape, generator=generator)
        with torch.no_grad():
            expected = [t.numpy() for t in program(x)]
        actual = session.run(output_names, {"input": x.numpy()})
        for name, e, a in zip(output_names, expected, actual, strict=True):
            if e.shape != a.shape:
                raise ExportError(f"output {name}: ONNX shape {a.shape} != torch {e.shape}")
            scale = max(1.0, float(np.abs(e).max()))
            diff = float(np.abs(e - a).max())
            worst = max(worst, diff)
            if diff > tolerance * scale:
                raise ExportError(f"ONNX Runtime disagrees with PyTorch on {name}: max abs diff "
                                  f"{diff:.3g} > tolerance {tolerance} × {scale:.3g}")
    return worst


def _activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of all leaf-module outputs for one image: what a backward pass must keep."""
    total = 0
    handles = []

    def hook(_m: nn.Module, _i: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output[:1].numel() * output.element_size()

    for sub in model.modules():
        if not list(sub.children()):
            handles.append(sub.register_forward_hook(hook))
    try:
        with torch.no_grad(), _exportable():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return total
