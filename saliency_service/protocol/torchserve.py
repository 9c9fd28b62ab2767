"""A TorchServe handler that serves a saliency model package through ``protocol.codec.Core``.

TorchServe is archived upstream (no longer maintained); our own gRPC server is the primary
path. This adapter lets an existing TorchServe deployment call every method of the service:
the ``.mar`` carries the package files (``model.onnx``, ``manifest.json`` and the
external-data files it lists) and this file as its handler (``make mar``). It follows
TorchServe's custom handler contract (https://pytorch.org/serve/custom_service.html): a
module with exactly one class offering ``initialize(context)`` and ``handle(data, context)``;
``/predictions/<model>`` predicts and ``/explanations/<model>`` (request header
``explain: True``) explains. TorchServe itself is never imported, so the module loads
without it.

A request body is either an encoded image (PNG/JPEG; the default method runs) or JSON:
``{"image": <base64 PNG/JPEG>} | {"tensor": {"shape": [...], "data": <base64 float32>}}``
plus optional ``"method"`` (e.g. ``"vanilla_gradient"``), ``"params"`` (the method's params
message as JSON, e.g. ``{"steps": 16}``), ``"target"`` (class index), ``"seed"``, ``"top_k"``.
The response holds the maps as base64 little-endian float32 with their shape, the targets,
the prediction, the cost and the diagnostics: the same numbers the gRPC ``Explain`` returns.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from saliency_service.core.errors import InvalidInput, ServiceError
from saliency_service.core.repository import MANIFEST, Repository
from saliency_service.core.request import CostCounter, RequestState
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.codec import Core, method_name
from saliency_service.protocol.images import tensor_to_array
from saliency_service.protocol.status import http_status_of, status_of
from saliency_service.serving import config as config_module
from saliency_service.serving.metrics import Metrics

DEFAULT_METHOD_ENV = "SALIENCY_TORCHSERVE_METHOD"
# gRPC status → HTTP status for per-request errors.


def _body(row: Any) -> Any:
    """TorchServe gives each request as ``{"data"|"body": bytes | dict}``."""
    if isinstance(row, dict):
        for key in ("data", "body"):
            if row.get(key) is not None:
                return row[key]
    return row


def _as_request_dict(body: Any) -> dict[str, Any]:
    """Raw image bytes, JSON bytes or already-parsed JSON → the request as a dict."""
    if isinstance(body, (bytes, bytearray)):
        text = bytes(body)
        if text[:1] in (b"{", b"["):
            try:
                return dict(json.loads(text.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass
        return {"image_bytes": text}
    if isinstance(body, str):
        return dict(json.loads(body))
    if isinstance(body, dict):
        return dict(body)
    raise ValueError(f"unsupported request body of type {type(body).__name__}")


class SaliencyTorchServeHandler:
    """Explains with the package inside the ``.mar`` (one Core, one model, in-process)."""

    def __init__(self) -> None:
        self.core: Core | None = None
        self.model_name = ""
        self.version = 0
        self.initialized = False
        self.default_method = os.environ.get(DEFAULT_METHOD_ENV,
                                             method_name(pb.METHOD_VANILLA_GRADIENT))
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    # ---- TorchServe contract --------------------------------------------------------------

    def initialize(self, context: Any) -> None:
        """Loads the package from the extracted ``.mar`` folder (``model_dir``)."""
        model_dir = Path(context.system_properties["model_dir"])
        self.load(model_dir)

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        explain = bool(
            context is not None and str(context.get_request_header(0, "explain")) == "True"
        )
        return (
            self.explain_handle(None, data, context)
            if explain
            else self._predict_rows(data, context)
        )

    def explain_handle(
        self, data_preprocess: Any, raw_data: list[Any], context: Any = None
    ) -> list[Any]:
        """One explanation per request row (TorchServe may batch several rows)."""
        del data_preprocess  # the core decodes and preprocesses per the manifest
        return [
            self._guard(index, context, self._explain_row, row)
            for index, row in enumerate(raw_data)
        ]

    # ---- the work -------------------------------------------------------------------------

    def load(self, model_dir: Path) -> None:
        """A one-package repository ``<tmp>/<name>/<version> → model_dir`` behind a Core."""
        manifest = json.loads((Path(model_dir) / MANIFEST).read_text())
        self.model_name, self.version = str(manifest["name"]), int(manifest["version"])
        self._workdir = tempfile.TemporaryDirectory(prefix="saliency-ts-")
        link = Path(self._workdir.name) / self.model_name / str(self.version)
        link.parent.mkdir(parents=True)
        link.symlink_to(Path(model_dir).resolve(), target_is_directory=True)
        config = config_module.from_sources(None, models=Path(self._workdir.name))
        repository = Repository(config.models, config.intra_op_threads)
        from saliency_service.methods import registry  # noqa: PLC0415 - registers the built-in methods

        registry.load_builtin()
        repository.load_all()
        handle = repository.find(self.model_name, self.version)
        if not handle.ready:
            raise RuntimeError(f"model package {model_dir} failed to load: {handle.error}")
        self.core = Core(repository, config, Metrics())
        self.initialized = True

    def _input(self, request: dict[str, Any]) -> pb.Input:
        if "image_bytes" in request:
            return pb.Input(images=pb.EncodedImages(images=[request["image_bytes"]]))
        if "image" in request:
            return pb.Input(images=pb.EncodedImages(images=[base64.b64decode(request["image"])]))
        if "tensor" in request:
            tensor = request["tensor"]
            data = tensor["data"]
            array = (
                np.frombuffer(base64.b64decode(data), "<f4")
                if isinstance(data, str)
                else np.asarray(data, np.float32)
            ).reshape(tensor["shape"])
            return pb.Input(
                tensor=pb.Tensor(
                    shape=list(array.shape),
                    dtype=pb.DTYPE_FLOAT32,
                    data=array.astype("<f4").tobytes(),
                )
            )
        raise InvalidInput(
            "the request needs an image (raw body or base64 'image') or a 'tensor' {shape, data}"
        )

    def _explain_request(self, request: dict[str, Any]) -> pb.ExplainRequest:
        name = str(request.get("method") or self.default_method).lower()
        name = name.removeprefix("method_")
        try:
            method = pb.Method.Value("METHOD_" + name.upper())
        except ValueError:
            raise InvalidInput(f"unknown method {name!r}") from None
        message = pb.ExplainRequest(
            model=self.model_name,
            version=self.version,
            input=self._input(request),
            method=method,
            seed=int(request.get("seed", 0)),
            top_k=int(request.get("top_k", 0)),
        )
        if request.get("target") is not None:
            message.target.class_index = int(request["target"])
        if request.get("params"):
            field = name
            if field not in pb.ExplainRequest.DESCRIPTOR.fields_by_name:
                raise InvalidInput(f"method {name} takes no params")
            try:
                json_format.ParseDict(request["params"], getattr(message, field))
            except json_format.ParseError as exc:
                raise InvalidInput(f"params for {name}: {exc}") from exc
        return message

    def _explain_row(self, row: Any) -> dict[str, Any]:
        assert self.core is not None
        request = self._explain_request(_as_request_dict(_body(row)))
        response = self.core.explain(request, RequestState(None), CostCounter())
        maps = tensor_to_array(response.saliency).astype("<f4")
        return {
            "model": response.model,
            "version": response.version,
            "method": method_name(response.cost.method),
            "shape": list(maps.shape),
            "dtype": "float32",
            "saliency": base64.b64encode(maps.tobytes()).decode("ascii"),
            "targets": list(response.targets),
            "predictions": [
                [{"index": c.index, "label": c.label, "probability": c.probability} for c in p.top]
                for p in response.predictions
            ],
            "cost": {
                "forward_passes": response.cost.forward_passes,
                "backward_passes": response.cost.backward_passes,
                "wall_seconds": response.cost.wall_seconds,
                "cpu_seconds": response.cost.cpu_seconds,
                "truncated": response.cost.truncated,
            },
            "diagnostics": dict(response.diagnostics),
        }

    def _predict_rows(self, data: list[Any], context: Any) -> list[Any]:
        def predict(row: Any) -> dict[str, Any]:
            assert self.core is not None
            request = _as_request_dict(_body(row))
            reply = self.core.predict(
                pb.PredictRequest(
                    model=self.model_name,
                    version=self.version,
                    input=self._input(request),
                    top_k=int(request.get("top_k", 0)),
                ),
                CostCounter(),
            )
            return {
                "predictions": [
                    [
                        {"index": c.index, "label": c.label, "probability": c.probability}
                        for c in p.top
                    ]
                    for p in reply.predictions
                ]
            }

        return [self._guard(index, context, predict, row) for index, row in enumerate(data)]

    @staticmethod
    def _guard(index: int, context: Any, work: Any, row: Any) -> Any:
        """Runs one row; a domain error becomes that row's HTTP status and message."""
        try:
            return work(row)
        except (ServiceError, ValueError) as exc:
            code = (status_of(exc) if isinstance(exc, ServiceError)
                    else grpc.StatusCode.INVALID_ARGUMENT)
            if context is not None and hasattr(context, "set_response_status"):
                context.set_response_status(http_status_of(code), str(exc), idx=index)
            return {"error": str(exc), "code": code.name}
