"""A TorchServe handler that answers the class scores of a batch of input tensors: the
contract of the ``torchserve`` remote protocol (docs/remote-models.md), for an ONNX file as
the archive's serialized file, run by ONNX Runtime. Nothing is unpickled: a TorchScript or
pickled file is refused at load (write your own handler to the same contract for one).

A request is ``POST /predictions/<model>`` with a JSON tensor in the model's own layout
and preprocessing::

    {"name": "input", "shape": [N, C, H, W], "datatype": "FP32",
     "data": [N·C·H·W numbers] | "<base64 of little-endian float32>"}

and its answer the N×K scores in the same form (``data`` base64 when the request's was)::

    {"name": "logits", "shape": [N, K], "datatype": "FP32", "data": ...}

Several requests that TorchServe batches (a model registered with ``batch_size`` > 1) run
as one model call. A malformed request is answered 400 with the reason; the others in its
batch are still answered. Self-contained: copy it beside your model and archive it with
``torch-model-archiver --handler scores_handler.py --serialized-file model.onnx``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np


class TensorScoresHandler:
    """Runs the archived model on JSON tensors and answers their class scores."""

    def __init__(self) -> None:
        self.initialized = False
        self.input_name = "input"
        self.output_name = "logits"
        self.fixed_batch = 0  # the model's batch size when its graph fixes one
        self._run: Any = None

    def initialize(self, context: Any) -> None:
        """Loads the serialized ``.onnx`` file into an ONNX Runtime session."""
        import onnxruntime as ort  # noqa: PLC0415 - TorchServe's worker imports this file

        model_dir = Path(context.system_properties["model_dir"])
        path = model_dir / context.manifest["model"]["serializedFile"]
        if path.suffix != ".onnx":
            raise ValueError(f"{path.name}: this handler serves ONNX files only (export the "
                             f"model with torch.onnx.export or saliency export)")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        graph_input = session.get_inputs()[0]
        self.input_name = graph_input.name
        self.output_name = session.get_outputs()[0].name
        first = graph_input.shape[0] if graph_input.shape else None
        self.fixed_batch = first if isinstance(first, int) else 0

        def run(batch: np.ndarray) -> np.ndarray:
            return session.run([self.output_name], {self.input_name: batch})[0]

        self._run = run
        self.initialized = True

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        """One answer per request of TorchServe's batch, in its order."""
        tensors: list[tuple[int, np.ndarray, bool]] = []
        answers: list[Any] = [None] * len(data)
        for index, row in enumerate(data):
            try:
                tensor, binary = _tensor(row)
            except (KeyError, TypeError, ValueError) as exc:
                answers[index] = json.dumps({"error": f"{type(exc).__name__}: {exc}"})
                context.set_response_status(400, str(exc)[:200], idx=index)
                continue
            tensors.append((index, tensor, binary))
        if tensors:
            batches = [t for _, t, _ in tensors]
            if self.fixed_batch:  # the graph takes exactly its batch size: one call each
                scores = [np.asarray(self._run(t), np.float32) for t in batches]
            else:
                every = np.asarray(self._run(np.concatenate(batches)), np.float32)
                bounds = np.cumsum([t.shape[0] for t in batches])[:-1]
                scores = np.split(every, bounds)
            for (index, _, binary), part in zip(tensors, scores, strict=True):
                answers[index] = json.dumps(_encode(self.output_name, part, binary))
                context.set_response_content_type(index, "application/json")
        return answers


def _tensor(row: Any) -> tuple[np.ndarray, bool]:
    """A request's float32 tensor and whether its data came as base64."""
    body = row.get("body") if isinstance(row, dict) else None
    if body is None and isinstance(row, dict):
        body = row.get("data")
    if isinstance(body, bytes | bytearray | str):
        body = json.loads(body)
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object {shape, data}")
    shape = [int(size) for size in body["shape"]]
    data = body["data"]
    binary = isinstance(data, str)
    values = (np.frombuffer(base64.b64decode(data), "<f4") if binary
              else np.asarray(data, dtype=np.float32))
    if values.size != int(np.prod(shape)):
        raise ValueError(f"data holds {values.size} values; shape {shape} needs "
                         f"{int(np.prod(shape))}")
    return values.reshape(shape).astype(np.float32, copy=False), binary


def _encode(name: str, scores: np.ndarray, binary: bool) -> dict[str, Any]:
    """The scores as a JSON tensor: base64 float32, or numbers (exact for float32)."""
    data: Any = (base64.b64encode(scores.astype("<f4").tobytes()).decode("ascii") if binary
                 else scores.reshape(-1).tolist())
    return {"name": name, "shape": list(scores.shape), "datatype": "FP32", "data": data}
