"""A small Python client for the saliency service.

    with SaliencyClient("localhost:50051") as client:
        result = client.explain("demo", "integrated_gradients", images=[png_bytes],
                                steps=64, baseline="blur")
        result.maps  # float32 N×H×W in [0, 1]

Detectors and segmenters (``docs/detection.md``): ``predict`` returns detections or a class
map (``detections_of``, ``class_counts``); ``explain`` takes a detection (``box=`` and
``label=``), ``min_score=``, or a region (``region_class=``, with ``box=`` or ``mask=``), and
returns one map per target with ``Explanation.explained`` saying what each explains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from saliency_service.client.connections import MAX_ATTEMPTS, client_options
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.protocol.method_params import (
    ParamError,
    method_enum,
    params_field,
    params_message,
)


def make_input(images: list[bytes] | None = None, tensor: np.ndarray | None = None) -> pb.Input:
    """Encoded PNG/JPEG images, or a preprocessed N×C×H×W float tensor."""
    if (images is None) == (tensor is None):
        raise ValueError("give exactly one of images= or tensor=")
    if images is not None:
        return pb.Input(images=pb.EncodedImages(images=list(images)))
    return pb.Input(tensor=array_to_tensor(np.asarray(tensor)))


@dataclass
class Explanation:
    """An ExplainResponse with its tensors decoded."""

    maps: np.ndarray
    targets: list[int]
    response: pb.ExplainResponse

    @property
    def cost(self) -> pb.Cost:
        return self.response.cost

    @property
    def overlays(self) -> list[bytes]:
        return list(self.response.overlays)

    @property
    def explained(self) -> list[pb.ExplainedTarget]:
        """A detector's or segmenter's targets, one per map (empty for a classifier)."""
        return list(self.response.explained)


Label = int | str
"""A class by index or by label."""


@dataclass(frozen=True)
class FoundDetection:
    """One detection a detector reported: its box (x1, y1, x2, y2 in pixels of the model
    input), class and score."""

    box: tuple[float, float, float, float]
    class_index: int
    label: str
    score: float


def detections_of(response: pb.PredictResponse) -> list[list[FoundDetection]]:
    """A detector's Predict answer: each item's detections, highest score first."""
    return [[FoundDetection((d.box.x1, d.box.y1, d.box.x2, d.box.y2), d.class_index, d.label,
                            d.score) for d in item.detections]
            for item in response.detections]


def class_counts(response: pb.PredictResponse,
                 labels: Sequence[str] = ()) -> list[dict[str, int]]:
    """A segmenter's Predict answer: each item's pixels per predicted class (by label when
    ``labels`` are given, e.g. ``GetModel``'s), most first."""
    counts = []
    for item in tensor_to_array(response.class_map).astype(np.int64):
        found = np.bincount(item.ravel())
        order = np.argsort(-found, kind="stable")
        counts.append({(labels[c] if c < len(labels) else str(c)): int(found[c])
                       for c in order if found[c]})
    return counts


def dense_target(box: Sequence[float] | None = None, label: Label | None = None,
                 min_score: float | None = None, region_class: Label | None = None,
                 mask: np.ndarray | None = None) -> pb.Target | None:
    """The Target for a detector or segmenter: a detection (``box`` and ``label``), every
    detection scoring at least ``min_score``, or ``region_class`` in a region (``box`` or
    ``mask``; neither = the pixels predicted as that class). None when nothing is given.
    Raises ParamError (a ValueError) for a combination that names no one target."""
    if region_class is not None:
        if label is not None or min_score is not None:
            raise ParamError("give region_class= (a segmenter's region) or label=/min_score= "
                             "(a detector's detections), not both")
        if box is not None and mask is not None:
            raise ParamError("a region is a box or a mask, not both")
        region = pb.RegionTarget()
        _set_class(region, region_class)
        if box is not None:
            region.box.CopyFrom(_box(box))
        if mask is not None:
            values = np.asarray(mask)
            region.mask.CopyFrom(array_to_tensor(
                values.astype(np.uint8) if values.dtype == bool else values))
        return pb.Target(region=region)
    if mask is not None:
        raise ParamError("mask= is a region: give region_class= with it")
    if label is not None or box is not None:
        if min_score is not None:
            raise ParamError("give a detection (box= and label=) or min_score=, not both")
        if label is None or box is None:
            raise ParamError("a detection target needs box= (x1, y1, x2, y2 in pixels of the "
                             "model input) and label= (a class label or index)")
        detection = pb.DetectionTarget(box=_box(box))
        _set_class(detection, label)
        return pb.Target(detection=detection)
    if min_score is not None:
        return pb.Target(min_score=float(min_score))
    return None


def _box(values: Sequence[float]) -> pb.Box:
    numbers = [float(v) for v in values]
    if len(numbers) != 4:
        raise ParamError(f"a box is x1, y1, x2, y2: four numbers, got {len(numbers)}")
    return pb.Box(x1=numbers[0], y1=numbers[1], x2=numbers[2], y2=numbers[3])


def _set_class(message: pb.DetectionTarget | pb.RegionTarget, label: Label) -> None:
    if isinstance(label, str):
        message.label = label
    else:
        message.class_index = int(label)


class SaliencyClient:
    """Blocking client; one channel, reused.

    ``target`` is any gRPC target: ``host:port``, or ``dns:///name:port`` of a headless
    Service, whose every address gets a connection and calls in turn (``round_robin``).
    Calls refused with UNAVAILABLE or RESOURCE_EXHAUSTED are retried after a backoff, on
    another replica when there is one, up to ``max_attempts`` in all within ``timeout``
    (1 = no retries); see ``client.connections``. ``options`` adds channel arguments.
    """

    def __init__(self, target: str, timeout: float = 60.0,
                 credentials: grpc.ChannelCredentials | None = None,
                 metadata: list[tuple[str, str]] | None = None,
                 load_balancing: str = "round_robin", max_attempts: int = MAX_ATTEMPTS,
                 options: list[tuple[str, Any]] | None = None) -> None:
        options = [("grpc.max_receive_message_length", 256 * 1024 * 1024),
                   ("grpc.max_send_message_length", 256 * 1024 * 1024),
                   *client_options(load_balancing, max_attempts), *(options or [])]
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.ExplainerStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self.metadata = metadata

    def __enter__(self) -> SaliencyClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def health(self, service: str = "") -> str:
        """"SERVING", "NOT_SERVING", … for ``service`` ("" = the server itself)."""
        reply = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                       timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def list_models(self) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout,
                                    metadata=self.metadata)

    def get_model(self, model: str, version: int = 0) -> pb.ModelInfo:
        return self.stub.GetModel(pb.GetModelRequest(model=model, version=version),
                                  timeout=self.timeout, metadata=self.metadata)

    def predict(self, model: str, images: list[bytes] | None = None,
                tensor: np.ndarray | None = None, top_k: int = 5,
                resize: str = "") -> pb.PredictResponse:
        """Runs the model alone; ``resize`` fits images to its input: "stretch",
        "center_crop" or "letterbox" ("" = the model's default)."""
        request = pb.PredictRequest(model=model, input=make_input(images, tensor), top_k=top_k,
                                    resize=resize)
        return self.stub.Predict(request, timeout=self.timeout, metadata=self.metadata)

    def request(self, model: str, method: str | int, images: list[bytes] | None = None,
                tensor: np.ndarray | None = None, target: int | list[int] | None = None,
                seed: int = 0, params: Any = None, *, box: Sequence[float] | None = None,
                label: Label | None = None, min_score: float | None = None,
                region_class: Label | None = None, mask: np.ndarray | None = None,
                **fields: Any) -> pb.ExplainRequest:
        """Builds an ExplainRequest. ``fields`` are its other fields (``return_overlay=True``,
        ``top_k=3``, ``resize="center_crop"``, ``budget=pb.Budget(...)``) and the method's
        parameters by name
        (``steps=64, baseline="blur"``: ``protocol.method_params``); ``params`` is the
        method's params message instead. A detector's or segmenter's target is ``box`` and
        ``label``, ``min_score`` or ``region_class`` (``dense_target``). A wrong method,
        parameter or target raises ParamError (a ValueError) saying what is valid."""
        dense = dense_target(box, label, min_score, region_class, mask)
        if dense is not None and target is not None:
            raise ParamError("target= is a classifier's class; give it or a detector's or "
                             "segmenter's target, not both")
        names = pb.ExplainRequest.DESCRIPTOR.fields_by_name
        given = {key: value for key, value in fields.items() if key not in names}
        fields = {key: value for key, value in fields.items() if key in names}
        if given:
            if params is not None:
                raise ParamError("give the method's parameters by name or as params=, not both")
            params = params_message(method, given)
        request = pb.ExplainRequest(model=model, method=method_enum(method),
                                    input=make_input(images, tensor), seed=seed, **fields)
        if isinstance(target, int):
            request.target.class_index = target
        elif target is not None:
            request.target.per_item.indices.extend(target)
        elif dense is not None:
            request.target.CopyFrom(dense)
        if params is not None:
            field = params_field(request.method)
            if field is None:
                raise ParamError(f"{pb.Method.Name(request.method)} takes no parameters")
            getattr(request, field).CopyFrom(params)
        return request

    def explain(self, model: str, method: str | int, **kwargs: Any) -> Explanation:
        """One Explain call; ``kwargs`` as ``request`` takes them (images=, target=, seed=,
        return_overlay=, resize=, box= and label=, min_score=, region_class=, the method's
        parameters by name, …)."""
        request = self.request(model, method, **kwargs)
        response = self.stub.Explain(request, timeout=self.timeout, metadata=self.metadata)
        return Explanation(tensor_to_array(response.saliency), list(response.targets), response)


def read_images(paths: list[Path]) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]
