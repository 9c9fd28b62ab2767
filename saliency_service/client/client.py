"""A small Python client for the saliency service.

    with SaliencyClient("localhost:50051") as client:
        result = client.explain("demo", "integrated_gradients", images=[png_bytes],
                                steps=64, baseline="blur")
        result.maps  # float32 N×H×W in [0, 1]
"""

from __future__ import annotations

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
                seed: int = 0, params: Any = None, **fields: Any) -> pb.ExplainRequest:
        """Builds an ExplainRequest. ``fields`` are its other fields (``return_overlay=True``,
        ``top_k=3``, ``resize="center_crop"``, ``budget=pb.Budget(...)``) and the method's
        parameters by name
        (``steps=64, baseline="blur"``: ``protocol.method_params``); ``params`` is the
        method's params message instead. A wrong method or parameter raises ParamError
        (a ValueError) listing the valid ones."""
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
        if params is not None:
            field = params_field(request.method)
            if field is None:
                raise ParamError(f"{pb.Method.Name(request.method)} takes no parameters")
            getattr(request, field).CopyFrom(params)
        return request

    def explain(self, model: str, method: str | int, **kwargs: Any) -> Explanation:
        """One Explain call; ``kwargs`` as ``request`` takes them (images=, target=, seed=,
        return_overlay=, resize=, the method's parameters by name, …)."""
        request = self.request(model, method, **kwargs)
        response = self.stub.Explain(request, timeout=self.timeout, metadata=self.metadata)
        return Explanation(tensor_to_array(response.saliency), list(response.targets), response)


def read_images(paths: list[Path]) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]
