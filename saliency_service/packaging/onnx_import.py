"""``saliency import``: any ONNX image classifier, detector or segmenter → a model package
the server loads.

It reads the graph to find what a hand-written manifest would have to say, and checks it by
running the model:

* the image input: the one 4-D float input (the others must be none); its layout from the
  axis of size 1 or 3 beside the spatial ones (``--layout`` when both or neither fit);
* its size: fixed in the graph, or ``--input-shape C,H,W`` when height or width is free;
* a fixed batch size (the first dimension is a number), which the server then runs in
  chunks of that size;
* what the outputs are (``recognise``; ``--kind`` where they do not tell): one N×classes
  output (a classifier; ``--output-name`` when several are), one N×K×H×W at the input's
  size (a segmenter), one N×(5 + K)×S×S with S = H / stride (a raw grid head; the anchor
  is not in the graph: ``--anchor``), or boxes N×M×4, scores N×M and classes N×M (a
  detector with NMS inside; ``--labels`` gives its classes);
* what the scores are (``core.outputs``): a trailing Softmax → probabilities, Sigmoid →
  sigmoid (multi-label), anything else (LogSoftmax included) → logits, confirmed on random
  inputs (rows that sum to 1, values in [0, 1]); ``--output`` overrides, and is checked too.

Anything it cannot serve is refused with what to do about it (``ImportRefused``). The
package holds ``model.onnx``, the files its external data is kept in (``model.onnx.data``
as ``torch.onnx.export`` writes it; each must lie in the model's folder) and
``manifest.json``, so it offers the methods that need nothing but ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from saliency_service.core.dense import (
    DETECTION,
    DETECTION_RAW,
    SEGMENTATION,
    DenseSpec,
    InvalidDenseSpec,
)
from saliency_service.core.onnx_external import (
    ExternalDataRefused,
    check_files,
    external_data,
    inline,
)
from saliency_service.core.onnx_external import session as onnx_session
from saliency_service.core.outputs import LOGITS, OUTPUT_KINDS, PROBABILITIES, SIGMOID
from saliency_service.core.repository import (
    FORMAT_VERSION,
    LAYOUTS,
    MANIFEST,
    MAX_BATCH_VALUES,
    MAX_FIXED_BATCH,
    MAX_INPUT_PIXELS,
    ONNX_FILE,
    TORCH_FILE,
)
from saliency_service.packaging.package_files import staged_package, write_manifest

AUTO = "auto"
IMAGE_CHANNELS = (1, 3)
# Random inputs the output kind is confirmed on, and how far a row's sum may be from 1.
CHECK_INPUTS = 4
SUM_TOLERANCE = 1e-3
# Ops a classifier's final activation may be followed by without changing what it means.
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}
_GRAPH_KINDS = {"Softmax": PROBABILITIES, "Sigmoid": SIGMOID, "LogSoftmax": LOGITS}


class ImportRefused(ValueError):
    """The ONNX file cannot be served as it is; the message says what to change."""


@contextmanager
def _bounded_runs(seconds: float) -> Iterator[ort.RunOptions]:
    """Run options whose ``terminate`` is set ``seconds`` from now (0 = never), so a model
    run that never ends (e.g. a Loop of 2**63 - 1 trips) stops and is refused."""
    options = ort.RunOptions()
    options.log_severity_level = 4  # the refusal says it once
    timer = threading.Timer(seconds, setattr, (options, "terminate", True))
    timer.daemon = True
    if seconds > 0:
        timer.start()
    try:
        yield options
    finally:
        timer.cancel()


def _check_input_size(shape: tuple[int, int, int], batch: int | None) -> None:
    """The input must fit what a package may declare (``core.repository``'s bounds)."""
    channels, height, width = shape
    if height * width > MAX_INPUT_PIXELS:
        raise ImportRefused(f"the input {height}×{width} has more than {MAX_INPUT_PIXELS} "
                            "pixels (4096×4096); pass a smaller --input-shape")
    if batch and batch > MAX_FIXED_BATCH:
        raise ImportRefused(f"the graph fixes the batch size at {batch}; at most "
                            f"{MAX_FIXED_BATCH} can be served")
    if (batch or 1) * channels * height * width > MAX_BATCH_VALUES:
        raise ImportRefused(f"one batch of {batch or 1} {channels}×{height}×{width} inputs holds "
                            f"more than {MAX_BATCH_VALUES} values")


def _check_normalization(mean: Sequence[float] | None, std: Sequence[float] | None,
                         value_range: tuple[float, float]) -> None:
    """Finite numbers, std > 0 and a value range whose low end is below its high end."""
    for flag, values in (("--mean", mean), ("--std", std), ("--value-range", value_range)):
        if values is not None and not all(math.isfinite(float(v)) for v in values):
            raise ImportRefused(f"{flag} {list(values)} must be finite numbers")
    if std is not None and min(std, default=1.0) <= 0:
        raise ImportRefused(f"--std {list(std)} must be > 0 (pixels are divided by it)")
    if len(value_range) != 2 or not value_range[0] < value_range[1]:
        raise ImportRefused(f"--value-range {list(value_range)} must be LOW,HIGH with "
                            "LOW < HIGH")


@dataclass(frozen=True)
class ImportReport:
    """What import wrote and decided, each decision with the reason for it."""

    path: Path
    input_name: str
    layout: str
    shape: tuple[int, ...]  # the model's, in its layout; batch -1 when free
    output_name: str
    output_kind: str
    classes: int
    decisions: dict[str, str]
    scale_outputs: tuple[str, ...] = ()
    cam_output: str = ""
    seconds: float = 0.0
    labels: tuple[str, ...] = ()
    outputs: dict[str, Any] = field(default_factory=dict)  # the manifest's ``outputs``

    def lines(self) -> list[str]:
        return [f"wrote {self.path}",
                f"input: {self.input_name} {self.layout} {list(self.shape)}",
                f"kind: {self.model_kind()}",
                f"output: {self.output_name} ({self.classes} classes, {self.output_kind})"
                if self.output_kind not in (DETECTION_RAW, DETECTION, SEGMENTATION)
                else f"outputs: {self.dense_outputs()}",
                f"classes: {_listed(self.labels)}",
                *(f"  {key}: {why}" for key, why in self.decisions.items())]

    def model_kind(self) -> str:
        """The kind, as ``--kind`` names it, and a classifier's score kind."""
        if self.output_kind in (DETECTION_RAW, DETECTION, SEGMENTATION):
            return self.output_kind
        return f"{CLASSIFICATION} ({self.output_kind})"

    def dense_outputs(self) -> str:
        """A detector's or segmenter's outputs and their reading, on one line."""
        grid = self.outputs.get("detection") or {}
        if self.output_kind == DETECTION:
            return (f"boxes {self.outputs['boxes']}, scores {self.outputs['scores']}, "
                    f"classes {self.outputs['classes']} ({self.classes} classes, after NMS "
                    "inside the graph)")
        if self.output_kind == SEGMENTATION:
            return (f"{self.output_name} ({self.classes} classes per pixel, "
                    f"{self.outputs.get('scores', 'logits')})")
        return (f"{self.output_name} (grid head, {self.classes} classes; stride "
                f"{grid['stride']:g}, anchor {grid['anchor']:g}; the server keeps scores ≥ "
                f"{grid['score_threshold']:g}, NMS at IoU {grid['nms_iou']:g}, at most "
                f"{grid['max_detections']})")


def _listed(labels: Sequence[str], most: int = 12) -> str:
    """Labels comma-separated, the first ``most`` of a long list."""
    shown = ", ".join(labels[:most])
    return shown + (f", … ({len(labels)} in all)" if len(labels) > most else "")


@dataclass(frozen=True)
class GridHead:
    """How the server decodes a raw grid head (``core.detections``): the stride (pixels
    per cell; None = the input's size over the grid's), the anchor (pixels: the box side
    the log-size offsets scale; the graph does not say it), and what it keeps."""

    stride: float | None = None
    anchor: float | None = None
    score_threshold: float = 0.3
    nms_iou: float = 0.45
    max_detections: int = 100


@dataclass(frozen=True)
class _Input:
    name: str
    dims: tuple[int | None, ...]  # None where the graph leaves a dimension free


def _dims(value: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    shape = value.type.tensor_type.shape
    return tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                 for d in shape.dim)


def _shown(dims: Sequence[int | None]) -> str:
    return "×".join("?" if d is None else str(d) for d in dims)


def _image_input(model: onnx.ModelProto) -> _Input:
    """The graph's one 4-D float input (initializers listed as inputs are not inputs)."""
    weights = {init.name for init in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in weights]
    described = ", ".join(
        f"{v.name} ({onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)} "
        f"{_shown(_dims(v))})" for v in inputs) or "none"
    images = [v for v in inputs if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
              and len(v.type.tensor_type.shape.dim) == 4]
    if not images:
        raise ImportRefused(
            f"no image-like input: the server feeds one 4-D float32 tensor (N×C×H×W or "
            f"N×H×W×C); the model's inputs are {described}")
    if len(images) > 1:
        raise ImportRefused(
            f"several candidate image inputs ({', '.join(v.name for v in images)}): the "
            "server feeds one; export the model with a single image input")
    if len(inputs) > 1:
        raise ImportRefused(
            f"the model has inputs besides the image {images[0].name!r}: {described}; the "
            "server feeds the image alone (fold the others into the graph as constants)")
    return _Input(images[0].name, _dims(images[0]))


def _layout(dims: tuple[int | None, ...], requested: str) -> tuple[str, str]:
    """NCHW or NHWC with the reason: the axis of size 1 or 3 beside the spatial ones."""
    if requested != AUTO:
        if requested not in LAYOUTS:
            raise ImportRefused(f"--layout {requested} must be auto, NCHW or NHWC")
        return requested, "given by --layout"
    first, last = dims[1] in IMAGE_CHANNELS, dims[3] in IMAGE_CHANNELS
    if first and not last:
        return "NCHW", f"axis 1 has {dims[1]} channel(s)"
    if last and not first:
        return "NHWC", f"axis 3 has {dims[3]} channel(s)"
    raise ImportRefused(
        f"cannot tell the layout of input {_shown(dims)}: "
        + ("both axis 1 and axis 3 could hold the channels" if first else
           "neither axis 1 nor axis 3 has 1 or 3 channels")
        + "; pass --layout NCHW or --layout NHWC")


def _image_shape(dims: tuple[int | None, ...], layout: str,
                 given: tuple[int, int, int] | None) -> tuple[tuple[int, int, int], str]:
    """(C, H, W) from the graph, or from ``--input-shape`` where the graph leaves it free."""
    graph = (dims[3], dims[1], dims[2]) if layout == "NHWC" else (dims[1], dims[2], dims[3])
    if given is not None:
        clash = [f"{axis} {g} ≠ {m}" for axis, g, m in zip("CHW", given, graph, strict=True)
                 if m is not None and g != m]
        if clash:
            raise ImportRefused(f"--input-shape {','.join(map(str, given))} disagrees with "
                                f"the graph's fixed input ({'; '.join(clash)})")
        shape, why = given, "given by --input-shape"
    elif None in graph:
        free = ", ".join(axis for axis, m in zip(("channels", "height", "width"), graph,
                                                 strict=True) if m is None)
        raise ImportRefused(
            f"the input {_shown(dims)} leaves {free} free: pass --input-shape C,H,W (the size "
            "the server resizes images to, e.g. --input-shape 3,224,224)")
    else:
        shape, why = (int(graph[0]), int(graph[1]), int(graph[2])), "fixed in the graph"
    if shape[0] not in IMAGE_CHANNELS:
        raise ImportRefused(f"the input has {shape[0]} channels; images decode to 1 (grey) or "
                            "3 (RGB): pass --layout if the channels are on the other axis")
    return shape, why


def _producer(model: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if name in n.output), None)


def _graph_kind(model: onnx.ModelProto, output: str) -> tuple[str | None, str]:
    """What the op ending the output says its scores are (None when it says nothing)."""
    node = _producer(model, output)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = _producer(model, node.input[0])
    if node is None or node.op_type not in _GRAPH_KINDS:
        return None, f"the output ends in {node.op_type if node else 'no node'}"
    return _GRAPH_KINDS[node.op_type], f"the graph ends in {node.op_type}"


def _numeric_kind(rows: np.ndarray) -> tuple[bool, bool, str]:
    """(in [0, 1], rows sum to 1, summary) of the scores on random inputs."""
    unit = bool(np.isfinite(rows).all() and rows.min() >= 0.0 and rows.max() <= 1.0)
    sums = rows.astype(np.float64).sum(axis=1)
    normalized = unit and bool(np.abs(sums - 1.0).max() <= SUM_TOLERANCE)
    summary = (f"on {rows.shape[0]} random inputs scores lie in [{rows.min():.3g}, "
               f"{rows.max():.3g}] and rows sum to {sums.min():.4g}…{sums.max():.4g}")
    return unit, normalized, summary


def _output_kind(graph_kind: str | None, graph_why: str, rows: np.ndarray,
                 requested: str) -> tuple[str, str]:
    unit, normalized, numbers = _numeric_kind(rows)
    if requested != AUTO:
        if requested not in OUTPUT_KINDS:
            raise ImportRefused(f"--output {requested} must be auto or one of "
                                f"{', '.join(OUTPUT_KINDS)}")
        kind, why = requested, "given by --output"
    elif graph_kind is not None:
        kind, why = graph_kind, graph_why
    elif normalized:
        kind, why = PROBABILITIES, f"{graph_why}, but its rows sum to 1"
    elif unit:
        raise ImportRefused(
            f"cannot tell what the scores are: {graph_why}; {numbers}: pass --output sigmoid "
            "if each is a class's own probability, else --output logits")
    else:
        kind, why = LOGITS, graph_why
    if kind == PROBABILITIES and not normalized:
        raise ImportRefused(f"output kind probabilities ({why}) but {numbers}; pass --output "
                            "logits or --output sigmoid if that is what they are")
    if kind == SIGMOID and not unit:
        raise ImportRefused(f"output kind sigmoid ({why}) but {numbers}; pass --output logits")
    if kind == LOGITS and normalized:
        raise ImportRefused(f"output kind logits ({why}) but {numbers}: a softmax over "
                            "probabilities would flatten them; pass --output probabilities")
    return kind, f"{why}; {numbers}"


def _external_files(source: Path, model: onnx.ModelProto) -> dict[str, bytes]:
    """The files the model keeps tensor data in, by the name it gives them; each must be a
    regular file in the model's own folder (symlinks resolved) and not a package file."""
    folder = source.parent.resolve()
    files: dict[str, bytes] = {}
    try:
        needed = external_data(model)
    except ExternalDataRefused as exc:
        raise ImportRefused(f"{source.name}: {exc}; keep the data beside the model") from None
    for location in needed:
        path = (folder / location).resolve()
        if not path.is_relative_to(folder):
            raise ImportRefused(f"{source.name}: external data {location[:120]!r} lies outside "
                                "the model's folder; keep the data beside the model")
        if location in (ONNX_FILE, MANIFEST, TORCH_FILE) or not path.is_file():
            raise ImportRefused(f"{source.name}: external data {location[:120]!r} is not a "
                                "data file beside the model")
        files[location] = path.read_bytes()
    try:
        check_files(model, files)
    except ExternalDataRefused as exc:
        raise ImportRefused(f"{source.name}: {exc}") from None
    return files


def _session(data: bytes, files: dict[str, bytes]) -> ort.InferenceSession:
    try:
        return onnx_session(data, files)
    except Exception as exc:  # noqa: BLE001 - any load failure is a refusal to import
        raise ImportRefused(f"ONNX Runtime cannot load the model: {exc}") from exc


def _random_inputs(batch: int, shape: tuple[int, int, int], layout: str,
                   rng: np.random.Generator) -> np.ndarray:
    channels, height, width = shape
    dims = (height, width, channels) if layout == "NHWC" else shape
    return rng.normal(size=(batch, *dims)).astype(np.float32)


def _timed_out(seconds: float) -> ImportRefused:
    return ImportRefused(f"the model did not finish its test run within {seconds:g} s "
                         "(--timeout): a model run that never ends cannot be served; raise "
                         "--timeout if it is just slow")


def _run_outputs(session: ort.InferenceSession, input_name: str, inputs: np.ndarray,
                 options: ort.RunOptions | None = None,
                 timeout: float = 0.0) -> dict[str, Any]:
    """Every output of the model on ``inputs``, by name."""
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, {input_name: inputs}, options)
    except Exception as exc:  # noqa: BLE001 - a model that fails on its own input shape
        if options is not None and options.terminate:
            raise _timed_out(timeout) from None
        raise ImportRefused(
            f"the model fails on a {_shown(inputs.shape)} input: {exc}; check --input-shape "
            "and --layout") from exc
    return dict(zip(names, values, strict=True))


def _shapes(values: dict[str, Any]) -> str:
    return ", ".join(f"{n} {list(np.shape(v))}" for n, v in values.items())


def _class_output(values: dict[str, Any], batch: int,
                  wanted: str | None) -> tuple[str, np.ndarray]:
    """The output that is N×classes on these inputs (``wanted`` names it when several are)."""
    fits = _class_candidates(values, batch)
    shapes = _shapes(values)
    if wanted is not None:
        if wanted not in values:
            raise ImportRefused(f"--output-name {wanted!r} is not an output; outputs: {shapes}")
        if wanted not in fits:
            raise ImportRefused(f"output {wanted!r} is not N×classes float32 for a batch of "
                                f"{batch}: outputs are {shapes}")
        return wanted, fits[wanted]
    if not fits:
        raise ImportRefused(f"no output is N×classes float32 for a batch of {batch}: outputs "
                            f"are {shapes}; pass --kind for a detector or segmenter")
    if len(fits) > 1:
        raise ImportRefused(f"several outputs are N×classes ({', '.join(fits)}): pass "
                            "--output-name to choose the class scores")
    ((name, scores),) = fits.items()
    return name, scores


def _class_candidates(values: dict[str, Any], batch: int) -> dict[str, np.ndarray]:
    return {n: v for n, v in values.items()
            if isinstance(v, np.ndarray) and v.ndim == 2 and v.shape[0] == batch
            and v.dtype == np.float32}


# ---- what the outputs are: a classifier's, a detector's or a segmenter's ---------------------

CLASSIFICATION = "classification"
MODEL_KINDS = (CLASSIFICATION, DETECTION_RAW, DETECTION, SEGMENTATION)
# Fewest cells per side of a grid head (a 1×1 "grid" is a classifier's N×K×1×1 output).
MIN_GRID_CELLS = 2
_ROLE_HINTS = {"boxes": ("box",), "scores": ("score", "conf"), "classes": ("class", "label")}


@dataclass(frozen=True)
class Recognised:
    """What the outputs were read as: the kind, the outputs it reads (a classifier's or
    segmenter's scores, a grid head, or post-NMS boxes, scores and classes), why, the classes
    the outputs imply (0: they do not say) and a grid head's stride."""

    kind: str
    outputs: tuple[str, ...]
    why: str
    classes: int = 0
    stride: float = 0.0


def _float_maps(values: dict[str, Any], batch: int) -> dict[str, np.ndarray]:
    return {n: v for n, v in values.items() if isinstance(v, np.ndarray) and v.ndim == 4
            and v.shape[0] == batch and v.dtype == np.float32}


def _segmentation_candidates(values: dict[str, Any], batch: int,
                             size: tuple[int, int]) -> dict[str, Recognised]:
    return {n: Recognised(SEGMENTATION, (n,), f"{n} is N×{v.shape[1]}×{size[0]}×{size[1]}: "
                          "class scores per pixel at the input's size", int(v.shape[1]))
            for n, v in _float_maps(values, batch).items()
            if tuple(v.shape[2:]) == size and v.shape[1] >= 2}


def _grid_candidates(values: dict[str, Any], batch: int, size: tuple[int, int],
                     stride: float | None) -> dict[str, Recognised]:
    found = {}
    height, width = size
    for name, value in _float_maps(values, batch).items():
        channels, rows, columns = (int(d) for d in value.shape[1:])
        if channels < 6 or min(rows, columns) < MIN_GRID_CELLS or rows >= height \
                or height % rows or width % columns or height // rows != width // columns:
            continue
        inferred = height // rows
        if stride is not None and stride != inferred:
            raise ImportRefused(f"--stride {stride:g} disagrees with the grid head {name} "
                                f"N×{channels}×{rows}×{columns}: a {height}×{width} input "
                                f"on a {rows}×{columns} grid has stride {inferred}")
        found[name] = Recognised(
            DETECTION_RAW, (name,), f"{name} is N×(5 + {channels - 5})×{rows}×{columns}: a "
            f"grid head with stride {inferred} (the input's {height} pixels over {rows} "
            f"cells{', as --stride says' if stride is not None else ''})", channels - 5,
            float(inferred))
    return found


def _post_nms(values: dict[str, Any], batch: int) -> Recognised | None:
    """Boxes N×M×4, scores N×M and classes N×M, each role told by the output's name (box,
    score, class or label), else the classes as the integer output."""
    boxes = [n for n, v in values.items() if isinstance(v, np.ndarray) and v.ndim == 3
             and v.shape[0] == batch and v.shape[2] == 4 and v.dtype.kind == "f"]
    if len(boxes) != 1:
        return None
    rows = values[boxes[0]].shape[1]
    pairs = [n for n, v in values.items() if isinstance(v, np.ndarray)
             and v.shape == (batch, rows) and v.dtype.kind in "fiu"]
    if len(pairs) != 2:
        return None
    named = {role: [n for n in pairs if any(h in n.lower() for h in hints)]
             for role, hints in _ROLE_HINTS.items() if role != "boxes"}
    if len(named["scores"]) == 1 and len(named["classes"]) == 1 \
            and named["scores"] != named["classes"]:
        scores, classes = named["scores"][0], named["classes"][0]
        how = "by their names"
    else:
        integers = [n for n in pairs if values[n].dtype.kind in "iu"]
        if len(integers) != 1:
            raise ImportRefused(
                f"{pairs[0]} and {pairs[1]} are both N×{rows} beside the boxes {boxes[0]}: "
                "cannot tell which holds the scores; name the outputs …scores and …classes "
                "(or give the classes an integer type) when exporting")
        classes = integers[0]
        scores = next(n for n in pairs if n != classes)
        how = "the integer one as the classes"
    return Recognised(DETECTION, (boxes[0], scores, classes),
                      f"{boxes[0]} N×{rows}×4, {scores} N×{rows} and {classes} N×{rows}: "
                      f"post-NMS boxes, scores and classes ({how})")


_KIND_SHAPES = {
    CLASSIFICATION: "N×classes",
    SEGMENTATION: "N×K×H×W at the input's H×W",
    DETECTION_RAW: "a grid head N×(5 + K)×S×S with S = H / stride",
    DETECTION: "boxes N×M×4, scores N×M and classes N×M",
}


def recognise(values: dict[str, Any], batch: int, size: tuple[int, int], kind: str = AUTO,
              output_name: str | None = None, stride: float | None = None) -> Recognised:
    """What the model's outputs on a batch of ``batch`` inputs of ``size`` (H, W) are:
    the one kind that fits (``kind`` when given, ``output_name`` the output it reads), or
    ImportRefused naming ``--kind`` where several or none fit."""
    if kind != AUTO and kind not in MODEL_KINDS:
        raise ImportRefused(f"--kind {kind} must be auto or one of {', '.join(MODEL_KINDS)}")
    if output_name is not None and output_name not in values:
        raise ImportRefused(f"--output-name {output_name!r} is not an output; outputs: "
                            f"{_shapes(values)}")
    triple = _post_nms(values, batch)
    claimed = set(triple.outputs) if triple else set()
    candidates: dict[str, list[Recognised]] = {
        CLASSIFICATION: [Recognised(CLASSIFICATION, (n,), "", int(v.shape[1]))
                         for n, v in _class_candidates(values, batch).items()
                         if n not in claimed],
        SEGMENTATION: list(_segmentation_candidates(values, batch, size).values()),
        DETECTION_RAW: list(_grid_candidates(values, batch, size, stride).values()),
        DETECTION: [triple] if triple else [],
    }
    if output_name is not None:
        candidates = {k: [r for r in found if output_name in r.outputs]
                      for k, found in candidates.items()}
    fitting = [k for k, found in candidates.items() if found]
    if kind == AUTO:
        if not fitting:
            raise ImportRefused(
                f"cannot tell what the outputs are ({_shapes(values)}): none is a classifier's "
                f"N×classes, a segmenter's N×K×{size[0]}×{size[1]}, a grid head "
                "N×(5 + K)×S×S or post-NMS boxes, scores and classes; pass --kind (and "
                "--output-name) if one of them is")
        if len(fitting) > 1:
            described = "; ".join(f"{k}: {', '.join(r.outputs[0] for r in candidates[k])}"
                                  for k in fitting)
            raise ImportRefused(f"the outputs fit several kinds ({described}): pass --kind "
                                f"{' or --kind '.join(fitting)}")
        kind = fitting[0]
    found = candidates[kind]
    if not found:
        raise ImportRefused(f"--kind {kind} needs {_KIND_SHAPES[kind]}; outputs are "
                            f"{_shapes(values)}")
    if len(found) > 1:
        raise ImportRefused(f"several outputs fit --kind {kind} "
                            f"({', '.join(r.outputs[0] for r in found)}): pass --output-name")
    return found[0]


_NMS_INSIDE = ("the detector's scores come out of NMS inside its graph, which passes no "
               "gradient to a box (D-RISE and the black-box methods explain it)")
_NO_CLASS_HEAD = "a detector or segmenter has no class head (FastCAM reads a classifier's)"
_GRID_FLAGS = {"stride": "--stride", "anchor": "--anchor", "score_threshold": "--score-threshold",
               "nms_iou": "--nms-iou", "max_detections": "--max-detections"}


def _manifest_outputs(found: Recognised, model_kind: str,
                      grid: GridHead | None) -> dict[str, Any]:
    """The manifest's ``outputs`` for what was recognised (scales are added later)."""
    if found.kind == CLASSIFICATION:
        return {"logits": found.outputs[0], "kind": model_kind}
    if found.kind == SEGMENTATION:
        return {"kind": SEGMENTATION, "logits": found.outputs[0]}
    if found.kind == DETECTION:
        return {"kind": DETECTION, **dict(zip(("boxes", "scores", "classes"), found.outputs,
                                              strict=True))}
    grid = grid or GridHead()
    if grid.anchor is None:
        raise ImportRefused(
            f"the grid head {found.outputs[0]} (stride {found.stride:g}) does not say its "
            "anchor: pass --anchor PIXELS, the box side its size offsets scale "
            "(width = anchor × exp(tw))")
    outputs = {"kind": DETECTION_RAW, "logits": found.outputs[0], "detection": {
        "stride": found.stride, "anchor": grid.anchor, "score_threshold": grid.score_threshold,
        "nms_iou": grid.nms_iou, "max_detections": grid.max_detections}}
    try:
        DenseSpec.from_outputs(DETECTION_RAW, outputs)
    except InvalidDenseSpec as exc:
        message = str(exc)
        for key, flag in _GRID_FLAGS.items():
            message = message.replace(f"manifest outputs.detection.{key}", flag)
        raise ImportRefused(message) from None
    return outputs


def _post_nms_classes(values: dict[str, Any], found: Recognised, labels: Sequence[str],
                      given: Sequence[str]) -> int:
    """A post-NMS detector's class count: its outputs do not say it, the labels do."""
    if not given:
        raise ImportRefused(f"a post-NMS detector's outputs ({', '.join(found.outputs)}) do "
                            "not say how many classes it has: pass --labels with its class "
                            "names in class-index order")
    classes = np.asarray(values[found.outputs[2]])
    scores = np.asarray(values[found.outputs[1]])
    reported = classes[(scores > 0) & (classes >= 0)]
    if reported.size and int(reported.max()) >= len(labels):
        raise ImportRefused(f"the detector reports class {int(reported.max())} but --labels "
                            f"names {len(labels)} classes: give a label for every class")
    return len(labels)


def import_onnx(
    source: Path,
    *,
    name: str,
    repository: Path,
    version: int = 1,
    class_labels: Sequence[str] = (),
    labels_source: str = "",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    input_shape: tuple[int, int, int] | None = None,
    layout: str = AUTO,
    output: str = AUTO,
    output_name: str | None = None,
    kind: str = AUTO,
    grid: GridHead | None = None,
    cam_layer: str = "",
    overwrite: bool = False,
    seed: int = 0,
    timeout: float = 120.0,
) -> ImportReport:
    """Inspects ``source``, runs it on random inputs and writes ``repository/name/version``.

    ``mean``/``std`` (one value, or one per channel; default 0 and 1) normalize pixels taken
    in ``value_range``, as the model was trained. The test runs on random inputs take at
    most ``timeout`` seconds in all (0 = no bound). Raises ImportRefused for what cannot be
    served, with the flag or change that fixes it; ``labels_source`` (e.g. the labels file)
    is named when the labels do not match the classes. ``kind`` says what the outputs are
    where they do not tell (``recognise``); ``grid`` is a raw grid head's decoding;
    ``cam_layer`` names Grad-CAM's default layer (a tensor, node or module path), added as
    one more scale output when it ends none.
    """
    started = time.perf_counter()
    _check_normalization(mean, std, value_range)
    if input_shape is not None and (len(input_shape) != 3 or min(input_shape) < 1):
        raise ImportRefused(f"--input-shape {list(input_shape)} must be three positive "
                            "integers C,H,W")
    source = Path(source)
    if not source.is_file():
        raise ImportRefused(f"{source} is not a file")
    target = Path(repository) / name / str(version)
    if target.exists() and not overwrite:
        raise ImportRefused(f"{target} exists; pass --force to replace it")
    data = source.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
        external = _external_files(source, model)
        onnx.checker.check_model(str(source) if external else model)
    except ImportRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - a file that is not a valid ONNX model
        raise ImportRefused(f"{source} is not a valid self-contained ONNX model: {exc}") from exc
    image = _image_input(model)
    chosen_layout, layout_why = _layout(image.dims, layout)
    shape, shape_why = _image_shape(image.dims, chosen_layout, input_shape)
    batch = image.dims[0]
    _check_input_size(shape, batch)
    decisions = {"input": f"{image.name}: the only 4-D float input", "layout": layout_why,
                 "size": f"C,H,W {','.join(map(str, shape))} {shape_why}",
                 "batch": (f"fixed at {batch}: run in chunks of {batch}" if batch
                           else "free")}
    session = _session(data, external)
    rng = np.random.default_rng(seed)
    first = _random_inputs(batch or 2, shape, chosen_layout, rng)
    with _bounded_runs(timeout) as options:
        values = _run_outputs(session, image.name, first, options, timeout)
        found = recognise(values, first.shape[0], (shape[1], shape[2]), kind, output_name,
                          grid.stride if grid else None)
        if found.kind == CLASSIFICATION:
            output_name, scores = _class_output(values, first.shape[0], found.outputs[0])
            rows = [scores]
            for _ in range(CHECK_INPUTS - 1):
                try:
                    (more,) = session.run([output_name], {image.name: _random_inputs(
                        batch or 1, shape, chosen_layout, rng)}, options)
                except Exception as exc:  # noqa: BLE001 - only a stopped run is expected here
                    if options.terminate:
                        raise _timed_out(timeout) from None
                    raise ImportRefused(f"the model fails on a random input: {exc}") from exc
                rows.append(more)
            classes = int(scores.shape[1])
            graph_kind, graph_why = _graph_kind(model, output_name)
            model_kind, kind_why = _output_kind(graph_kind, graph_why, np.concatenate(rows),
                                                output)
            decisions["output"] = f"{output_name}: N×{classes}"
            decisions["kind"] = kind_why
        else:
            if output != AUTO and found.kind != SEGMENTATION:
                raise ImportRefused(f"--output {output} is for class scores; a {found.kind} "
                                    "model's outputs are read as documented")
            output_name, model_kind, classes = found.outputs[0], found.kind, found.classes
            decisions["kind"] = found.why + (" (given by --kind)" if kind != AUTO else "")
    outputs = _manifest_outputs(found, model_kind, grid)
    if found.kind == SEGMENTATION:  # per pixel, the class scores read as a classifier's
        pixels = np.moveaxis(values[output_name], 1, -1).reshape(-1, classes)
        graph_kind, graph_why = _graph_kind(model, output_name)
        outputs["scores"], why = _output_kind(graph_kind, graph_why, pixels, output)
        decisions["scores"] = why.replace(f"on {len(pixels)} random inputs scores",
                                          f"on the {len(pixels)} pixels of "
                                          f"{len(values[output_name])} random inputs scores")
    labels = list(class_labels) or [str(i) for i in range(classes)]
    if found.kind == DETECTION:
        classes = _post_nms_classes(values, found, labels, class_labels)
    if len(labels) != classes:
        read = f" read from {labels_source}" if labels_source else ""
        raise ImportRefused(f"{len(labels)} class labels{read} for the model's {classes} "
                            "classes (one label per line in a file, or comma-separated)")
    if found.kind == DETECTION:
        if cam_layer:
            raise ImportRefused(f"--cam-layer: {_NMS_INSIDE}, so Grad-CAM has no layer")
        features = Features(scales_missing=_NMS_INSIDE, gradients_missing=_NMS_INSIDE,
                            head_why=_NO_CLASS_HEAD)
        served = model
    else:
        features, served = find_features(model, external, image, chosen_layout, shape,
                                         batch or 0, output_name, model_kind, rng, timeout,
                                         cam_layer)
        if found.kind != CLASSIFICATION:
            features = dataclasses.replace(features, head={"type": "unknown"},
                                           head_why=_NO_CLASS_HEAD)
    decisions.update(features.decisions())
    channels = shape[0]
    mean_values = _per_channel(mean, 0.0, channels, "--mean")
    std_values = _per_channel(std, 1.0, channels, "--std")
    if min(std_values) <= 0:
        raise ImportRefused("--std values must be positive")
    model_shape = ((batch or -1, shape[1], shape[2], channels) if chosen_layout == "NHWC"
                   else (batch or -1, *shape))
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "name": name,
        "version": version,
        "input": {"name": image.name, "shape": list(model_shape), "dtype": "float32",
                  "layout": chosen_layout, "mean": mean_values, "std": std_values,
                  "value_range": list(value_range)},
        "outputs": {**outputs, "scales": [s.output for s in features.scales],
                    **({"tokens": [features.tokens.output]} if features.tokens else {})},
        **features.manifest(),
        "class_labels": labels,
        "activation_bytes": features.activation_bytes,
        "exporter": {"tool": "saliency import", "source": source.name,
                     "producer": f"{model.producer_name} {model.producer_version}".strip(),
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "opset": _opset(model),
                     **({"scales_missing": features.scales_missing}
                        if features.scales_missing else {}),
                     **{f"decided.{key}": why for key, why in decisions.items()}},
        "verification": {"inputs": 1, "max_abs_diff": features.max_difference,
                         "tolerance": FEATURE_TOLERANCE},
    }
    if not features.activation_bytes:
        del manifest["activation_bytes"]
    with staged_package(Path(repository), target) as staging:
        (staging / ONNX_FILE).write_bytes(data if served is model else
                                          served.SerializeToString())
        for location, contents in external.items():
            (staging / location).parent.mkdir(parents=True, exist_ok=True)
            (staging / location).write_bytes(contents)
        write_manifest(staging, manifest, [ONNX_FILE, *external])
    return ImportReport(target, image.name, chosen_layout, model_shape, output_name,
                        model_kind, classes, decisions, tuple(s.output for s in features.scales),
                        features.cam.output if features.cam else "",
                        time.perf_counter() - started, tuple(labels), outputs)


def _per_channel(values: Sequence[float] | None, default: float, channels: int,
                 flag: str) -> list[float]:
    if not values:
        return [default] * channels
    if len(values) == 1:
        return [float(values[0])] * channels
    if len(values) != channels:
        raise ImportRefused(f"{flag} has {len(values)} values for {channels} channels")
    return [float(v) for v in values]


def _opset(model: onnx.ModelProto) -> int:
    return int(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0))


# ---- feature maps and tokens: what the fast path and Grad-CAM read --------------------------

SCALE_PREFIX = "scale_"
TOKENS_OUTPUT = "tokens_0"
# Largest |translated − ONNX Runtime| of a chosen tensor, relative to its largest magnitude.
FEATURE_TOLERANCE = 1e-4
# Ops between a linear head's input and the pooled map that keep its values.
_HEAD_PASS_THROUGH = {"Identity", "Flatten", "Reshape", "Squeeze"}
_MAX_LABEL = 200


@dataclass(frozen=True)
class FeatureTensor:
    """One ONNX tensor added as an output (``scale_i`` or ``tokens_0``)."""

    output: str
    tensor: str  # the ONNX tensor it copies
    node: str  # the ONNX node producing it
    op: str
    shape: tuple[int, ...]  # without the batch

    @property
    def label(self) -> str:
        """What a client may name it by (``GradCamParams.layer``): the ONNX node's name."""
        for name in (self.node, self.tensor):
            if 0 < len(name) <= _MAX_LABEL:
                return name
        return self.output

    def record(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "tensor": self.tensor, "module": "",
                "shape": list(self.shape)}


@dataclass(frozen=True)
class Features:
    """The scale ends and tokens found in the graph, the CAM layer, the head and, for each
    family that cannot run, why (``""`` when it can)."""

    scales: tuple[FeatureTensor, ...] = ()
    tokens: FeatureTensor | None = None
    grid: tuple[int, int] = (0, 0)
    prefix_tokens: int = 0
    token_batch_dim: int = 0
    head: dict[str, Any] = field(default_factory=lambda: {"type": "unknown"})
    activation_bytes: int = 0
    max_difference: float = 0.0
    scales_missing: str = ""
    gradients_missing: str = ""
    gradients_checked: bool = True
    head_why: str = ""
    chosen_cam: str = ""  # the output --cam-layer named

    @property
    def cam(self) -> FeatureTensor | None:
        chosen = [s for s in self.scales if s.output == self.chosen_cam]
        return chosen[0] if chosen else self.tokens or (self.scales[-1] if self.scales else None)

    def manifest(self) -> dict[str, Any]:
        """The manifest fields the exporter writes for the same findings."""
        cam = self.cam
        tokens = self.tokens
        return {
            "scale_modules": [s.label for s in self.scales],
            "scale_nodes": [s.record() for s in self.scales],
            "scale_shapes": [list(s.shape) for s in self.scales],
            "cam_layer": cam.label if cam else "",
            "cam_output": cam.output if cam else "",
            "token_grid": ({"output": tokens.output, **tokens.record(), "grid": list(self.grid),
                            "prefix_tokens": self.prefix_tokens,
                            "batch_dim": self.token_batch_dim} if tokens else {}),
            "head": self.head,
        }

    def decisions(self) -> dict[str, str]:
        shown = "; ".join(f"{s.output} = {s.op} {s.label!r} {_shown(s.shape)}"
                          for s in self.scales)
        found = {"scales": shown or f"none: {self.scales_missing}"}
        if self.tokens:
            found["tokens"] = (f"{self.tokens.output} = {self.tokens.op} {self.tokens.label!r} "
                               f"{_shown(self.tokens.shape)} on a {self.grid[0]}×{self.grid[1]} "
                               f"patch grid after {self.prefix_tokens} prefix token(s)")
        cam = self.cam
        why = ("layer given by --cam-layer" if cam is not None and cam.output == self.chosen_cam
               else "tokens feeding the last attention" if cam is self.tokens else "last scale")
        found["cam"] = (f"{cam.output} ({cam.label}), the {why}" if cam
                        else "none: no scale or token outputs")
        found["head"] = (f"gap_linear ({self.head.get('linear')}, {self.head.get('features')} "
                         "features): FastCAM needs no backward pass"
                         if self.head.get("type") == "gap_linear" else f"unknown: {self.head_why}")
        if not self.gradients_checked:
            found["gradients"] = "not checked here (the server checks the graph's translation)"
        elif self.gradients_missing:
            found["gradients"] = f"unavailable: {self.gradients_missing}"
        else:
            found["gradients"] = ("the graph translates to torch and matches ONNX Runtime "
                                  f"(max difference {self.max_difference:.1e} of scale)")
        return found


def _analysis_model(model: onnx.ModelProto, image: _Input, layout: str,
                    shape: tuple[int, int, int], output_name: str) -> onnx.ModelProto:
    """A copy of the graph that computes the class output alone, with the image size fixed
    (the batch stays as it is) and node ``i`` named ``n{i}`` (names may be empty or
    repeated; the translation records the producing node's name on each tensor)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    values = (shape[1], shape[2], shape[0]) if layout == "NHWC" else shape
    source = next(v for v in graph.input if v.name == image.name)
    for dim, value in zip(source.type.tensor_type.shape.dim[1:], values, strict=True):
        dim.dim_value = value
    for index, node in enumerate(graph.node):
        node.name = f"n{index}"
    kept = [o for o in graph.output if o.name == output_name]
    del graph.output[:]
    graph.output.extend(kept)
    return copy


def _rewrite_activations(graph_module: Any) -> None:
    """Names the activations ONNX spells as other ops, so the scale rule sees them as
    PyTorch's exporter does: ``Clip(x, 0, max)`` is ReLU6's hardtanh (or ReLU without a
    max), ``x · Sigmoid(x)`` (Keras' swish) is SiLU. Only the analysis copy changes."""
    import torch  # noqa: PLC0415 - torch is optional for import

    aten = torch.ops.aten
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == aten.clamp.default and len(node.args) >= 2 and node.args[1] == 0:
            high = node.args[2] if len(node.args) > 2 else None
            if high is None:
                node.target, node.args = aten.relu.default, (node.args[0],)
            elif isinstance(high, int | float):
                node.target, node.args = aten.hardtanh.default, (node.args[0], 0.0, float(high))
        elif node.target == aten.mul.Tensor and len(node.args) == 2:
            left, right = node.args
            for x, gate in ((left, right), (right, left)):
                if getattr(gate, "target", None) == aten.sigmoid.default and gate.args[0] is x:
                    node.target, node.args = aten.silu.default, (x,)
                    break


def _channels_first_input(graph_module: Any) -> None:
    """An NHWC graph's analysis copy takes N×C×H×W and turns it around itself, so its own
    Transposes back to N×C×H×W (tf2onnx's, around each Conv) mark the maps the scale rule
    reads, and maps left N×H×W×C are not mistaken for N×C×H×W ones."""
    import torch  # noqa: PLC0415

    graph = graph_module.graph
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    original = placeholder.meta["val"]
    with graph.inserting_after(placeholder):
        permuted = graph.call_function(torch.ops.aten.permute.default, (placeholder, [0, 2, 3, 1]))
    placeholder.replace_all_uses_with(permuted, delete_user_cb=lambda user: user is not permuted)
    permuted.meta["val"] = original
    placeholder.meta["val"] = original.permute(0, 3, 1, 2)
    graph_module.recompile()


def _activation_bytes(graph_module: Any, batch: int) -> int:
    """Bytes of every float tensor the graph computes for one image: what a backward pass
    keeps, at most (the server sizes its chunks by it)."""
    import torch  # noqa: PLC0415

    total = 0
    for node in graph_module.graph.nodes:
        value = node.meta.get("val")
        if node.op != "call_function" or not isinstance(value, torch.Tensor) \
                or not value.is_floating_point():
            continue
        sizes = [int(d) for d in value.shape if isinstance(d, int)]
        count = math.prod(sizes) // (batch if batch and sizes and sizes[0] == batch else 1)
        total += count * value.element_size()
    return total


def _no_scales_reason(graph: Any, layout: str) -> str:
    """Why the scale rule found nothing, in the graph's terms."""
    import torch  # noqa: PLC0415

    from saliency_service.packaging.graph_scales import (  # noqa: PLC0415
        ACTIVATIONS,
        BLOCK_ENDS,
        CONVOLUTIONS,
        GraphScaleError,
    )

    nodes = list(graph.graph.nodes)
    if not any(n.target in CONVOLUTIONS for n in nodes):
        return "the graph has no convolution, so no feature maps"
    after: set[Any] = set()
    for node in nodes:
        if node.target in CONVOLUTIONS or any(a in after for a in node.all_input_nodes):
            after.add(node)
    maps = [n for n in nodes if n in after and (n.target in ACTIVATIONS or n.target in BLOCK_ENDS)
            and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() == 4]
    channels_last = []
    for node in maps:
        try:
            graph.named_scales([node.name])
        except GraphScaleError:
            channels_last.append(node)
    if layout == "NHWC" and maps and len(channels_last) == len(maps):
        return (f"its {len(maps)} activation(s) after convolutions act on N×H×W×C tensors only; "
                "the scale outputs read N×C×H×W maps (as ONNX's Conv makes them)")
    return ("no activation, concatenation or residual sum of N×C×H×W maps after a convolution "
            "lies on every path to the class output (SMOE Scale reads post-activation maps)")


def _array(tensor: onnx.TensorProto, external: dict[str, bytes]) -> np.ndarray:
    """A constant's values as float32, read from the model's external data if kept there."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
        holder = onnx.ModelProto()
        holder.graph.initializer.add().CopyFrom(tensor)
        tensor = inline(holder, external).graph.initializer[0]
    return onnx.numpy_helper.to_array(tensor).astype(np.float32)


def _gap_linear_head(model: onnx.ModelProto, external: dict[str, bytes], output_name: str,
                     kind: str, cam: FeatureTensor | None) -> tuple[dict[str, Any], str, Any]:
    """``(head, why, (weight, bias))``: a ``gap_linear`` head when the class output is
    Gemm (or MatMul + Add) of the globally averaged CAM map, read as the server reads it
    (``methods._utils.linear_head``); the weights are checked against the logits later."""
    if cam is None or len(cam.shape) != 3:  # tokens, or none
        return {"type": "unknown"}, "no scale output to pool", None
    if kind != LOGITS:
        return ({"type": "unknown"}, f"the class output holds {kind}, not a linear layer's "
                "logits", None)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
    node = producers.get(output_name)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    weight = bias = None
    features_input = ""
    if node is not None and node.op_type == "Gemm" and node.input[1] in constants:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if not attrs.get("transA", 0):
            matrix = _array(constants[node.input[1]], external)
            weight = (matrix if attrs.get("transB", 0) else matrix.T) * np.float32(
                attrs.get("alpha", 1.0))
            bias = np.zeros(weight.shape[0], np.float32)
            if len(node.input) > 2 and node.input[2] in constants:
                bias = np.broadcast_to(_array(constants[node.input[2]], external)
                                       * np.float32(attrs.get("beta", 1.0)),
                                       weight.shape[:1]).copy()
            features_input, linear = node.input[0], node
    elif node is not None and node.op_type == "Add":
        matmul = next((producers[i] for i in node.input if i in producers
                       and producers[i].op_type == "MatMul"), None)
        bias_name = next((i for i in node.input if i in constants), None)
        if matmul is not None and matmul.input[1] in constants:
            weight = _array(constants[matmul.input[1]], external).T
            bias = (_array(constants[bias_name], external) if bias_name
                    else np.zeros(weight.shape[0], np.float32))
            features_input, linear = matmul.input[0], matmul
    if weight is None or weight.ndim != 2:
        ends = node.op_type if node is not None else "no node"
        return {"type": "unknown"}, f"the class output comes from {ends}, not a linear layer", None
    pool = producers.get(features_input)
    while pool is not None and pool.op_type in _HEAD_PASS_THROUGH:
        pool = producers.get(pool.input[0])
    if pool is None or pool.op_type not in ("GlobalAveragePool", "ReduceMean") \
            or pool.input[0] != cam.tensor:
        return ({"type": "unknown"}, "the linear layer does not read the global average of the "
                f"CAM layer {cam.label!r}", None)
    head = {"type": "gap_linear", "linear": linear.name or linear.output[0],
            "features": int(weight.shape[1]), "scale_output": cam.output}
    return head, "", (weight, np.asarray(bias, np.float32).reshape(-1))


def _cam_layer_point(graph: Any, model: onnx.ModelProto, cam_layer: str) -> Any:
    """The analysis graph's tensor that ``--cam-layer`` names (a tensor, the node making it
    or a module path), as a scale point; ImportRefused when none is an N×C×H×W map the class
    output depends on."""
    from saliency_service.methods._utils.layer_names import (  # noqa: PLC0415
        LayerNameError,
        graph_names,
        tensors_named,
    )
    from saliency_service.packaging.graph_scales import GraphScaleError  # noqa: PLC0415

    try:
        tensors, _ = tensors_named(graph_names(model), cam_layer)
    except LayerNameError as exc:
        raise ImportRefused(f"--cam-layer: {exc}") from None
    if not tensors:
        raise ImportRefused(f"--cam-layer {cam_layer!r} names no tensor, node or module of the "
                            "graph (node names are listed by e.g. Netron)")
    held = {t: n for n in graph.nodes if n.op == "call_function"
            for t in n.meta.get("onnx_tensors", ())}
    nodes = [held[t] for t in tensors if t in held]
    if not nodes:
        raise ImportRefused(f"--cam-layer {cam_layer!r}: the class output does not depend on "
                            "it (or it is a constant)")
    problems = []
    for node in reversed(nodes):
        try:
            (point,) = graph.named_scales([node.name])
            return point
        except GraphScaleError:
            problems.append(node)
    shape = list(problems[0].meta["val"].shape) if "val" in problems[0].meta else "unknown"
    raise ImportRefused(f"--cam-layer {cam_layer!r} has shape {shape}: Grad-CAM reads an "
                        "N×C×H×W feature map")


def _candidates(node: Any, model: onnx.ModelProto) -> list[str]:
    """ONNX tensors that may hold ``node``'s value: the outputs of the ONNX node it was
    translated from, else (an op inside one node's translation) those of its users'
    nodes of the same shape (an Identity, Dropout or Cast after it); checked by value."""
    def outputs(of: Any) -> list[str]:
        label = str(of.meta.get("onnx_node", ""))
        if not (label.startswith("n") and label[1:].isdigit()):
            return []
        return [o for o in model.graph.node[int(label[1:])].output if o]

    found = outputs(node)
    if not found:
        shape = tuple(node.meta["val"].shape)
        for user in node.users:
            value = user.meta.get("val")
            if value is not None and tuple(getattr(value, "shape", ())) == shape:
                found += outputs(user)
    return list(dict.fromkeys(found))


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        return math.inf
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-12)
    return float(np.abs(got.astype(np.float64) - want).max(initial=0.0)) / scale


def _output_info(name: str, dims: Sequence[Any] | None) -> onnx.ValueInfoProto:
    """A float32 graph output: each dim a number, a symbol (the input's batch) or unknown
    (None); no shape at all when ``dims`` is None."""
    info = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    if dims is None:
        return info
    shape = info.type.tensor_type.shape
    shape.SetInParent()
    for dim in dims:
        entry = shape.dim.add()
        if isinstance(dim, int):
            entry.dim_value = dim
        elif isinstance(dim, str) and dim:
            entry.dim_param = dim
    return info


def _free_names(model: onnx.ModelProto, wanted: Sequence[str]) -> list[str]:
    """``wanted`` when no tensor of the graph has those names, else ``saliency_`` + each."""
    graph = model.graph
    used = {o for n in graph.node for o in n.output} | {v.name for v in graph.input} \
        | {t.name for t in graph.initializer} | {v.name for v in graph.output}
    if not used.intersection(wanted):
        return list(wanted)
    return [f"saliency_{name}" for name in wanted]


def find_features(model: onnx.ModelProto, external: dict[str, bytes], image: _Input,
                  layout: str, shape: tuple[int, int, int], batch: int, output_name: str,
                  kind: str, rng: np.random.Generator,
                  timeout: float = 0.0, cam_layer: str = "") -> tuple[Features, onnx.ModelProto]:
    """The scale ends and patch tokens of ``model`` (the PyTorch exporter's rule, on the
    graph translated to torch), each checked against ONNX Runtime, and ``model`` with them
    added as outputs ``scale_0..k`` / ``tokens_0`` (``model`` itself when none are).

    A graph the analysis fails on is still imported, for the methods that need no more;
    ``cam_layer`` (a tensor, node or module path) must then be an N×C×H×W map the class
    output depends on, else the import is refused."""
    try:
        return _find_features(model, external, image, layout, shape, batch, output_name, kind,
                              rng, timeout, cam_layer)
    except ImportRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - the extra outputs never stop an import
        why = f"the graph analysis failed ({type(exc).__name__}: {str(exc)[:300]})"
        if cam_layer:
            raise ImportRefused(f"--cam-layer cannot be honoured: {why}") from exc
        return Features(scales_missing=why, head_why=why, gradients_checked=False), model


def _find_features(model: onnx.ModelProto, external: dict[str, bytes], image: _Input,
                   layout: str, shape: tuple[int, int, int], batch: int, output_name: str,
                   kind: str, rng: np.random.Generator,
                   timeout: float, cam_layer: str) -> tuple[Features, onnx.ModelProto]:
    try:
        import torch  # noqa: PLC0415

        from saliency_service.methods._utils.onnx_to_fx import (  # noqa: PLC0415
            UnsupportedGraph,
            to_graph_module,
        )
        from saliency_service.packaging.graph_scales import (  # noqa: PLC0415
            GraphScaleError,
            ProgramGraph,
            distinct,
        )
    except ModuleNotFoundError:
        why = "needs PyTorch, which this install lacks: pip install 'saliency-service[torch]'"
        if cam_layer:
            raise ImportRefused(f"--cam-layer {why}") from None
        return Features(scales_missing=why, gradients_missing=why, head_why=why), model
    analysis = inline(_analysis_model(model, image, layout, shape, output_name), external)
    try:
        graph_module = to_graph_module(analysis)
    except UnsupportedGraph as exc:
        why = f"its ONNX graph cannot be translated to torch: {exc}"
        if cam_layer:
            raise ImportRefused(f"--cam-layer: {why}") from None
        return Features(scales_missing=why, gradients_missing=why, head_why=why), model
    del analysis
    if layout == "NHWC":
        _channels_first_input(graph_module)
    _rewrite_activations(graph_module)
    scales_missing = ""
    points, tokens, chosen_cam = [], None, None
    try:
        graph = ProgramGraph(graph_module, batch)
        points = distinct(graph.scale_ends())
        tokens = graph.token_grid()
        if not points:
            scales_missing = _no_scales_reason(graph, layout)
        if cam_layer:
            chosen_cam = _cam_layer_point(graph, model, cam_layer)
            if all(p.node is not chosen_cam.node for p in points):
                points.append(chosen_cam)
                scales_missing = ""
    except GraphScaleError as exc:
        if cam_layer:
            raise ImportRefused(f"--cam-layer {cam_layer!r}: {exc}") from None
        scales_missing = str(exc)
    chosen = [*(p.node for p in points), *([tokens.point.node] if tokens else [])]
    tensors = {node: _candidates(node, model) for node in chosen}
    names = list(dict.fromkeys([output_name, *(t for ts in tensors.values() for t in ts)]))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(_output_info(name, None) for name in names)
    inputs = _random_inputs(batch or 2, shape, layout, rng)
    try:
        probe_session = onnx_session(probe.SerializeToString(), external)
        with _bounded_runs(timeout) as options:
            try:
                values = probe_session.run(names, {image.name: inputs}, options)
            except Exception:
                if options.terminate:
                    raise _timed_out(timeout) from None
                raise
        runtime = dict(zip(names, values, strict=True))
    except ImportRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a chosen tensor that is not float32
        why = f"ONNX Runtime cannot return the chosen tensors: {exc}"
        return Features(scales_missing=why, head_why=why), model
    del probe
    interpreter = torch.fx.Interpreter(graph_module, garbage_collect_values=False)
    channels_first = inputs.transpose(0, 3, 1, 2) if layout == "NHWC" else inputs
    with torch.no_grad():
        (scores,) = interpreter.run(torch.from_numpy(np.ascontiguousarray(channels_first)))
    difference = _relative(scores.numpy(), runtime[output_name])
    gradients_missing = "" if difference <= FEATURE_TOLERANCE else (
        f"its translation to torch differs from ONNX Runtime by {difference:.1e} of the "
        f"class scores' scale (tolerance {FEATURE_TOLERANCE:.0e})")
    matched: dict[Any, str] = {}
    for node, names_for in tensors.items():
        value = interpreter.env[node].detach().numpy()
        for tensor in names_for:
            error = _relative(value, runtime[tensor])
            if error <= FEATURE_TOLERANCE:
                matched[node] = tensor
                difference = max(difference, error)
                break
    if chosen_cam is not None and chosen_cam.node not in matched:
        raise ImportRefused(f"--cam-layer {cam_layer!r} is computed inside an ONNX node and "
                            "has no tensor of its own to add as an output")
    dropped = [p for p in points if p.node not in matched]
    points = [p for p in points if p.node in matched]
    if dropped and not points:
        scales_missing = ("the scale ends found (" + ", ".join(
            f"{p.node.target} {_shown(p.shape)}" for p in dropped)
            + ") are computed inside ONNX nodes and have no tensor of their own")
    if tokens is not None and tokens.point.node not in matched:
        tokens = None
    scale_names = _free_names(model, [f"{SCALE_PREFIX}{i}" for i in range(len(points))]
                              + ([TOKENS_OUTPUT] if tokens else []))
    producers = {out: node for node in model.graph.node for out in node.output}

    def feature(name: str, point: Any) -> FeatureTensor:
        tensor = matched[point.node]
        node = producers[tensor]
        return FeatureTensor(name, tensor, node.name, node.op_type, tuple(point.shape))

    scales = tuple(feature(n, p) for n, p in zip(scale_names, points, strict=False))
    token = feature(scale_names[-1], tokens.point) if tokens else None
    cam = token or (scales[-1] if scales else None)
    if chosen_cam is not None:
        cam = next(s for s, p in zip(scales, points, strict=False) if p.node is chosen_cam.node)
    head, head_why, weights = _gap_linear_head(model, external, output_name, kind, cam)
    if weights is not None and cam is not None:
        maps = runtime[cam.tensor].astype(np.float64)
        logits = maps.mean(axis=(2, 3)) @ weights[0].T + weights[1]
        if maps.ndim != 4 or _relative(logits, runtime[output_name]) > FEATURE_TOLERANCE:
            head, head_why = {"type": "unknown"}, (
                "the linear layer's weights do not reproduce the logits from the pooled map")
    features = Features(
        scales=scales, tokens=token, grid=tokens.grid if tokens else (0, 0),
        prefix_tokens=tokens.prefix_tokens if tokens else 0,
        token_batch_dim=tokens.batch_dim if tokens else 0, head=head, head_why=head_why,
        activation_bytes=_activation_bytes(graph_module, batch), max_difference=difference,
        scales_missing=scales_missing, gradients_missing=gradients_missing,
        chosen_cam=cam.output if chosen_cam is not None and cam is not None else "")
    return features, _with_outputs(model, features, image)


def _with_outputs(model: onnx.ModelProto, features: Features,
                  image: _Input) -> onnx.ModelProto:
    """``model`` with an Identity copy of each chosen tensor as a graph output, its batch
    dimension the input's (free where the input's is; sizes unknown where the input's
    height or width is free)."""
    added = [*features.scales, *([features.tokens] if features.tokens else [])]
    if not added:
        return model
    source = next(v for v in model.graph.input if v.name == image.name)
    first = source.type.tensor_type.shape.dim[0]
    batch: Any = int(first.dim_value) if first.HasField("dim_value") else (
        first.dim_param or "batch")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for entry in added:
        result.graph.node.append(onnx.helper.make_node(
            "Identity", [entry.tensor], [entry.output], name=f"saliency/{entry.output}"))
        dims: list[Any] = list(entry.shape)
        if None in image.dims[1:]:
            dims = [dims[0], None, None] if entry is not features.tokens else [None, None]
        dims.insert(features.token_batch_dim if entry is features.tokens else 0, batch)
        result.graph.output.append(_output_info(entry.output, dims))
    return result
