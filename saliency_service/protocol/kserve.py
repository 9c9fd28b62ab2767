"""KServe's V1 inference protocol over the service's messages, so its clients can switch.

``POST /v1/models/{name}:predict`` and ``:explain`` take ``{"instances": [...]}``; an
instance is an encoded image (a base64 string, ``{"b64": …}``, TensorFlow Serving's
``{"image_bytes": {"b64": …}}`` or TorchServe's ``{"data": …}``) or a nested list of numbers
(one C×H×W float tensor, normalized as the model's manifest says). ``:explain`` also takes
any ``ExplainRequest`` field beside ``instances`` (``method``, ``auto`` when not given, its
params, ``target`` — a class index or the message — ``seed``, ``return_overlay``, …), and
``parameters``: the method's parameters as plain values (``{"steps": 64, "baseline":
"blur"}``).

Health as KServe's V1 servers answer it: ``GET /v1/models`` lists the names, and
``GET /v1/models/{name}`` is ``{"name", "ready": true}`` (503 with ``"ready": false`` while
the model is not ready, 404 for an unknown name); the server's liveness ``GET /`` is
``{"status": "alive"}`` for clients that do not ask for HTML (``LIVENESS``).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import warnings
from typing import Any

import numpy as np

from saliency_service.core.errors import InvalidInput
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.json_messages import (
    BodyTooLarge,
    checked_int,
    loads_json,
    parse,
    set_plain_params,
    shown,
    to_json,
)

IMAGE_KEYS = ("b64", "data")
LIVENESS = {"status": "alive"}  # KServe V1's answer to GET /
# Nested lists of numbers are read without a Python object per number (see parse_body).
_INSTANCES = re.compile(rb'"instances"\s*:\s*(?=\[)')
_NUMERIC_RUN = re.compile(rb"[-+0-9.eE,\s\[\]]*")
_NUMBER_CHARACTERS = b"0123456789.eE+- \t\r\n"
_PLACEHOLDER = b'"\\u0000instances"'  # JSON text no client sends: stands for the array
_CHUNK_BYTES = 1 << 20  # numbers parsed per call: the GIL is let go between calls
MAX_DIMENSIONS = 8
# numpy warns before it raises on text it cannot read to the end; the count check refuses it.
warnings.filterwarnings("ignore", message="string or file could not be read to its end",
                        category=DeprecationWarning)


def parse_body(data: bytes | bytearray, max_tensor_bytes: int) -> Any:
    """A V1 body as JSON values; ``instances`` that are one regular nested list of numbers
    come as a float32 array, read straight from the text (JSON's decoder would hold ~40
    bytes of Python objects per number: 60 MB of numbers took 700 MiB), and refused
    (BodyTooLarge) before they are read when that array would exceed ``max_tensor_bytes``,
    as gRPC refuses the same tensor."""
    found = _numeric_instances(data, max_tensor_bytes) if _PLACEHOLDER not in data else None
    if found is None:
        return loads_json(data)
    start, end, array = found
    rest = loads_json(data[:start] + _PLACEHOLDER + data[end:])
    if not (isinstance(rest, dict) and rest.get("instances") == "\0instances"):
        return loads_json(data)  # the array was not the body's own "instances"
    rest["instances"] = array
    return rest


def _numeric_instances(data: bytes | bytearray,
                       max_tensor_bytes: int) -> tuple[int, int, np.ndarray] | None:
    """Where the first ``"instances": [...]`` of ``data`` lies and its numbers as an array,
    when it is a regular nested list of numbers; None for anything else (left to JSON's
    decoder, which names the mistake)."""
    match = _INSTANCES.search(data)
    if match is None:
        return None
    start = run_end = match.end()
    while True:  # in pieces, so the GIL is let go between them
        run = _NUMERIC_RUN.match(data, run_end, run_end + _CHUNK_BYTES)
        run_end = run.end() if run else run_end
        if not run or run_end < min(run.endpos, len(data)):
            break
    end = data.rfind(b"]", start, run_end) + 1
    if end <= start:
        return None
    pieces = _pieces(data, start, end)
    shape = _regular_shape(b"".join(  # with the comma that ends each piece but the last
        data[a:min(b + 1, end)].translate(None, _NUMBER_CHARACTERS) for a, b in pieces))
    if shape is None:
        return None
    if math.prod(shape) * 4 > max_tensor_bytes:
        raise BodyTooLarge(
            f"instances of shape {list(shape)} make a float32 tensor of "
            f"{math.prod(shape) * 4} bytes, over the limit max_message_bytes="
            f"{max_tensor_bytes} (--max-message-bytes)")
    numbers = _numbers(data, pieces, math.prod(shape))
    return None if numbers is None else (start, end, numbers.reshape(shape))


def _pieces(data: bytes | bytearray, start: int, end: int) -> list[tuple[int, int]]:
    """``data[start:end]`` cut at commas into pieces of about ``_CHUNK_BYTES`` (a piece ends
    before the comma that ends it)."""
    pieces = []
    while start < end:
        cut = data.find(b",", min(start + _CHUNK_BYTES, end), end)
        cut = end if cut < 0 else cut
        pieces.append((start, cut))
        start = cut + 1
    return pieces


def _regular_shape(skeleton: bytes) -> tuple[int, ...] | None:
    """The shape of a nested list from its brackets and commas alone (``[[,,],[,,]]`` is
    2×3), or None when they do not form a regular array."""
    dimensions = len(skeleton) - len(skeleton.lstrip(b"["))
    if not 1 <= dimensions <= MAX_DIMENSIONS:
        return None
    lengths = []  # the length of the first list at each depth, in skeleton characters
    for depth in range(1, dimensions + 1):
        closing = dimensions - depth + 1
        found = skeleton.find(b"]" * closing)
        if found < 0:
            return None
        lengths.append(found + closing - depth + 1)
    shape = [lengths[-1] - 1]
    for length, inner in zip(lengths[-2::-1], lengths[:0:-1], strict=True):
        count, remainder = divmod(length - 1, inner + 1)
        if remainder or count < 1:
            return None
        shape.insert(0, count)
    if shape[-1] < 1:
        return None
    expected = b"[" + b"," * (shape[-1] - 1) + b"]"
    for count in reversed(shape[:-1]):
        expected = b"[" + b",".join([expected] * count) + b"]"
    return tuple(shape) if expected == skeleton else None


def _numbers(data: bytes | bytearray, pieces: list[tuple[int, int]],
             total: int) -> np.ndarray | None:
    """The ``total`` numbers of a nested list's text as float32 (rounded from float64, as
    a list of Python floats would be), or None unless every slot holds exactly one."""
    out = np.empty(total, np.float32)
    filled = 0
    for start, end in pieces:
        piece = bytes(data[start:end].translate(None, b"[]"))
        compact = piece.translate(None, b" \t\r\n")  # numpy reads "1, ,2" as three numbers
        if not compact or compact[:1] == b"," or compact[-1:] == b"," or b",," in compact:
            return None
        try:
            values = np.fromstring(piece, dtype=np.float64, sep=",")
        except ValueError:
            return None
        if values.size != piece.count(b",") + 1 or filled + values.size > total:
            return None
        out[filled:filled + values.size] = values
        filled += values.size
    return out if filled == total else None


def _image_bytes(instance: Any, index: int) -> bytes | None:
    """The encoded image an instance carries, or None when it is not an image instance."""
    if isinstance(instance, dict) and isinstance(instance.get("image_bytes"), dict):
        instance = instance["image_bytes"]
    if isinstance(instance, dict):
        text = next((instance[key] for key in IMAGE_KEYS if isinstance(instance.get(key), str)),
                    None)
        if text is None:
            raise InvalidInput(
                f"instances[{index}] is an object without an image: give "
                '{"b64": "<base64 PNG or JPEG>"} (or "image_bytes" / "data"), or a nested '
                "list of numbers")
    elif isinstance(instance, str):
        text = instance
    else:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"instances[{index}] is not valid base64: {exc}") from exc


def input_of(body: Any) -> pb.Input:
    """The model input from a V1 body's ``instances``: all images or all tensors."""
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list | np.ndarray):
        raise InvalidInput('the body must be a JSON object {"instances": [...]} (KServe V1)')
    instances = body["instances"]
    if isinstance(instances, np.ndarray):
        return _tensor_input(instances)
    if not instances:
        raise InvalidInput("instances is empty: give at least one image or tensor")
    images = [_image_bytes(instance, i) for i, instance in enumerate(instances)]
    if all(image is not None for image in images):
        return pb.Input(images=pb.EncodedImages(images=images))  # type: ignore[arg-type]
    if any(image is not None for image in images):
        raise InvalidInput("instances mix images and tensors; send one kind per request")
    try:
        array = np.asarray(instances, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"instances are not a regular nested list of numbers: {exc}") from exc
    return _tensor_input(array)


def _tensor_input(array: np.ndarray) -> pb.Input:
    """Tensor instances (N×C×H×W float32) as the model input."""
    if array.ndim != 4:
        raise InvalidInput(f"tensor instances must each be C×H×W (instances N×C×H×W), got "
                           f"{array.ndim - 1} dimension(s) per instance")
    return pb.Input(tensor=pb.Tensor(shape=list(array.shape), dtype=pb.DTYPE_FLOAT32,
                                     data=np.asarray(array, "<f4").tobytes()))


def predict_request(name: str, body: Any) -> pb.PredictRequest:
    top_k = body.get("top_k", 0) if isinstance(body, dict) else 0
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise InvalidInput(f"top_k must be an integer, got {shown(top_k)}")
    checked_int(pb.PredictRequest.DESCRIPTOR.fields_by_name["top_k"], top_k, "top_k")
    return pb.PredictRequest(model=name, input=input_of(body), top_k=top_k)


def explain_request(name: str, body: Any) -> pb.ExplainRequest:
    source = input_of(body)
    fields = {key: value for key, value in body.items()
              if key not in ("instances", "model", "parameters")}
    if fields.get("method") is None:
        fields["method"] = "auto"  # KServe's clients name no method: the server picks one
    target = fields.get("target")
    if isinstance(target, int) and not isinstance(target, bool):
        fields["target"] = {"class_index": target}
    request = parse(fields, pb.ExplainRequest)
    request.model = name
    request.input.CopyFrom(source)
    parameters = body.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise InvalidInput('parameters must be an object of the method\'s parameters, e.g. '
                               '{"steps": 64, "baseline": "blur"}')
        set_plain_params(request, parameters)
    return request


def _prediction(prediction: pb.Prediction) -> dict[str, Any]:
    top = [to_json(score) for score in prediction.top]
    best = prediction.top[0] if prediction.top else pb.ClassScore()
    return {"class_index": best.index, "label": best.label,
            "probability": best.probability, "top": top}


def _dense_predictions(response: pb.PredictResponse) -> list[dict[str, Any]]:
    """A detector's detections, or a segmenter's class map (H×W class indices), per
    instance."""
    if response.detections:
        return [{"detections": [to_json(d) for d in found.detections]}
                for found in response.detections]
    classes = np.frombuffer(response.class_map.data, np.uint8).reshape(
        tuple(response.class_map.shape))
    return [{"class_map": item.tolist()} for item in classes]


def predict_response(response: pb.PredictResponse) -> dict[str, Any]:
    dense = bool(response.detections) or response.HasField("class_map")
    return {"predictions": (_dense_predictions(response) if dense else
                            [_prediction(p) for p in response.predictions]),
            "model": response.model, "version": response.version,
            "cost": to_json(response.cost)}


def tensor_array(tensor: pb.Tensor) -> np.ndarray:
    """A float32 response tensor as an array."""
    return np.frombuffer(tensor.data, dtype="<f4").reshape(tuple(tensor.shape))


def explain_response(response: pb.ExplainResponse) -> dict[str, Any]:
    """One prediction and one explanation per instance: the map (H×W, in [0, 1]), its class,
    the prediction and, when asked for, the overlay PNG; for a detector or segmenter, one
    explanation per target (its map, instance ``item``, class, box, score)."""
    maps = tensor_array(response.saliency)
    explanations = []
    for index, target in enumerate(response.explained):  # a detector's or segmenter's
        entry: dict[str, Any] = {"saliency": np.round(maps[index].astype(np.float64),
                                                      6).tolist(), **to_json(target)}
        if index < len(response.overlays):
            entry["overlay"] = {"b64": base64.b64encode(response.overlays[index]).decode()}
        explanations.append(entry)
    for index, prediction in enumerate(response.predictions):
        item: dict[str, Any] = {
            "saliency": np.round(maps[index].astype(np.float64), 6).tolist(),
            "target": response.targets[index] if index < len(response.targets) else 0,
            "prediction": _prediction(prediction),
        }
        if index < len(response.overlays):
            item["overlay"] = {"b64": base64.b64encode(response.overlays[index]).decode()}
        explanations.append(item)
    # KServe's explainer answer: the predictions beside their explanations.
    return {"predictions": [_prediction(p) for p in response.predictions],
            "explanations": explanations, "model": response.model,
            "version": response.version, "cost": to_json(response.cost),
            "diagnostics": dict(response.diagnostics), "request_id": response.request_id}
