"""``saliency import``: any ONNX image classifier → a model package the server loads.

It reads the graph to find what a hand-written manifest would have to say, and checks it by
running the model:

* the image input: the one 4-D float input (the others must be none); its layout from the
  axis of size 1 or 3 beside the spatial ones (``--layout`` when both or neither fit);
* its size: fixed in the graph, or ``--input-shape C,H,W`` when height or width is free;
* a fixed batch size (the first dimension is a number), which the server then runs in
  chunks of that size;
* the class output: the one N×classes output (``--output-name`` when several are);
* what the scores are (``core.outputs``): a trailing Softmax → probabilities, Sigmoid →
  sigmoid (multi-label), anything else (LogSoftmax included) → logits, confirmed on random
  inputs (rows that sum to 1, values in [0, 1]); ``--output`` overrides, and is checked too.

Anything it cannot serve is refused with what to do about it (``ImportRefused``). The
package holds ``model.onnx``, the files its external data is kept in (``model.onnx.data``
as ``torch.onnx.export`` writes it; each must lie in the model's folder) and
``manifest.json``, so it offers the methods that need nothing but ONNX Runtime.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from saliency_service.core.onnx_external import ExternalDataRefused, check_files, external_data
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

    def lines(self) -> list[str]:
        return [f"wrote {self.path}",
                f"input: {self.input_name} {self.layout} {list(self.shape)}",
                f"output: {self.output_name} ({self.classes} classes, {self.output_kind})",
                *(f"  {key}: {why}" for key, why in self.decisions.items())]


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


def _class_output(session: ort.InferenceSession, input_name: str, inputs: np.ndarray,
                  wanted: str | None, options: ort.RunOptions | None = None,
                  timeout: float = 0.0) -> tuple[str, np.ndarray]:
    """The output that is N×classes on these inputs (``wanted`` names it when several are)."""
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, {input_name: inputs}, options)
    except Exception as exc:  # noqa: BLE001 - a model that fails on its own input shape
        if options is not None and options.terminate:
            raise _timed_out(timeout) from None
        raise ImportRefused(
            f"the model fails on a {_shown(inputs.shape)} input: {exc}; check --input-shape "
            "and --layout") from exc
    batch = inputs.shape[0]
    fits = {n: v for n, v in zip(names, values, strict=True)
            if isinstance(v, np.ndarray) and v.ndim == 2 and v.shape[0] == batch
            and v.dtype == np.float32}
    shapes = ", ".join(f"{n} {list(np.shape(v))}" for n, v in zip(names, values, strict=True))
    if wanted is not None:
        if wanted not in names:
            raise ImportRefused(f"--output-name {wanted!r} is not an output; outputs: {shapes}")
        if wanted not in fits:
            raise ImportRefused(f"output {wanted!r} is not N×classes float32 for a batch of "
                                f"{batch}: outputs are {shapes}")
        return wanted, fits[wanted]
    if not fits:
        raise ImportRefused(f"no output is N×classes float32 for a batch of {batch}: outputs "
                            f"are {shapes}; the server explains classifiers")
    if len(fits) > 1:
        raise ImportRefused(f"several outputs are N×classes ({', '.join(fits)}): pass "
                            "--output-name to choose the class scores")
    ((name, scores),) = fits.items()
    return name, scores


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
    overwrite: bool = False,
    seed: int = 0,
    timeout: float = 120.0,
) -> ImportReport:
    """Inspects ``source``, runs it on random inputs and writes ``repository/name/version``.

    ``mean``/``std`` (one value, or one per channel; default 0 and 1) normalize pixels taken
    in ``value_range``, as the model was trained. The test runs on random inputs take at
    most ``timeout`` seconds in all (0 = no bound). Raises ImportRefused for what cannot be
    served, with the flag or change that fixes it; ``labels_source`` (e.g. the labels file)
    is named when the labels do not match the classes.
    """
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
        output_name, scores = _class_output(session, image.name, first, output_name, options,
                                            timeout)
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
    kind, kind_why = _output_kind(graph_kind, graph_why, np.concatenate(rows), output)
    decisions["output"] = f"{output_name}: N×{classes}"
    decisions["kind"] = kind_why
    labels = list(class_labels) or [str(i) for i in range(classes)]
    if len(labels) != classes:
        read = f" read from {labels_source}" if labels_source else ""
        raise ImportRefused(f"{len(labels)} class labels{read} for the model's {classes} "
                            "classes (one label per line in a file, or comma-separated)")
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
        "outputs": {"logits": output_name, "kind": kind},
        "class_labels": labels,
        "exporter": {"tool": "saliency import", "source": source.name,
                     "producer": f"{model.producer_name} {model.producer_version}".strip(),
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "opset": _opset(model),
                     **{f"decided.{key}": why for key, why in decisions.items()}},
    }
    with staged_package(Path(repository), target) as staging:
        (staging / ONNX_FILE).write_bytes(data)
        for location, contents in external.items():
            (staging / location).parent.mkdir(parents=True, exist_ok=True)
            (staging / location).write_bytes(contents)
        write_manifest(staging, manifest, [ONNX_FILE, *external])
    return ImportReport(target, image.name, chosen_layout, model_shape, output_name, kind,
                        classes, decisions)


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
