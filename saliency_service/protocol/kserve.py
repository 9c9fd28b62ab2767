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
from typing import Any

import numpy as np

from saliency_service.core.errors import InvalidInput
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.json_messages import (
    checked_int,
    parse,
    set_plain_params,
    shown,
    to_json,
)

IMAGE_KEYS = ("b64", "data")
LIVENESS = {"status": "alive"}  # KServe V1's answer to GET /


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
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list):
        raise InvalidInput('the body must be a JSON object {"instances": [...]} (KServe V1)')
    instances = body["instances"]
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
    if array.ndim != 4:
        raise InvalidInput(f"tensor instances must each be C×H×W (instances N×C×H×W), got "
                           f"{array.ndim - 1} dimension(s) per instance")
    return pb.Input(tensor=pb.Tensor(shape=list(array.shape), dtype=pb.DTYPE_FLOAT32,
                                     data=array.astype("<f4").tobytes()))


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


def predict_response(response: pb.PredictResponse) -> dict[str, Any]:
    return {"predictions": [_prediction(p) for p in response.predictions],
            "model": response.model, "version": response.version,
            "cost": to_json(response.cost)}


def tensor_array(tensor: pb.Tensor) -> np.ndarray:
    """A float32 response tensor as an array."""
    return np.frombuffer(tensor.data, dtype="<f4").reshape(tuple(tensor.shape))


def explain_response(response: pb.ExplainResponse) -> dict[str, Any]:
    """One explanation per instance: the map (H×W, in [0, 1]), its class, the prediction and,
    when asked for, the overlay PNG."""
    maps = tensor_array(response.saliency)
    explanations = []
    for index, prediction in enumerate(response.predictions):
        item: dict[str, Any] = {
            "saliency": np.round(maps[index].astype(np.float64), 6).tolist(),
            "target": response.targets[index] if index < len(response.targets) else 0,
            "prediction": _prediction(prediction),
        }
        if index < len(response.overlays):
            item["overlay"] = {"b64": base64.b64encode(response.overlays[index]).decode()}
        explanations.append(item)
    return {"explanations": explanations, "model": response.model,
            "version": response.version, "cost": to_json(response.cost),
            "diagnostics": dict(response.diagnostics), "request_id": response.request_id}
