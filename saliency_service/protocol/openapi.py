"""The OpenAPI 3.1 description of the HTTP API, its schemas read from the proto itself.

Every ``saliency.v1`` message and enum becomes a schema in the proto's JSON mapping (proto
field names; 64-bit integers as numbers or strings; bytes as base64; enums by name), so the
description cannot drift from the messages the routes parse.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.json_messages import short_name

REF = "#/components/schemas/"
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "uint32"},
    FieldDescriptor.TYPE_INT64: {"type": ["integer", "string"], "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": ["integer", "string"], "format": "uint64"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}


def _value_schema(field: FieldDescriptor) -> dict[str, Any]:
    if field.message_type is not None:
        return {"$ref": REF + field.message_type.name}
    if field.enum_type is not None:
        return {"$ref": REF + field.enum_type.name}
    return dict(_SCALARS[field.type])


def _field_schema(field: FieldDescriptor) -> dict[str, Any]:
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        return {"type": "object",
                "additionalProperties": _value_schema(message.fields_by_name["value"])}
    if field.is_repeated:
        return {"type": "array", "items": _value_schema(field)}
    return _value_schema(field)


def message_schema(message: Descriptor) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {field.name: _field_schema(field) for field in message.fields},
        "additionalProperties": False,
    }
    oneofs = [o for o in message.oneofs if not o.name.startswith("_")]  # not proto3 optional
    if oneofs:
        schema["description"] = "; ".join(
            f"at most one of {', '.join(f.name for f in o.fields)} ({o.name})" for o in oneofs)
    return schema


def enum_schema(enum: EnumDescriptor) -> dict[str, Any]:
    names = [value.name for value in enum.values]
    short = [short_name(enum, value.name) for value in enum.values if value.number != 0]
    return {"type": "string", "enum": names + short,
            "description": f"by name; the short lower-case names ({', '.join(short)}) too"}


def schemas() -> dict[str, Any]:
    file = pb.DESCRIPTOR
    out: dict[str, Any] = {name: enum_schema(e) for name, e in file.enum_types_by_name.items()}
    out |= {name: message_schema(m) for name, m in file.message_types_by_name.items()}
    out["Error"] = {"type": "object", "properties": {"error": {"type": "object", "properties": {
        "code": {"type": "integer", "description": "the HTTP status"},
        "status": {"type": "string", "description": "the gRPC status name"},
        "message": {"type": "string"}, "request_id": {"type": "string"}}}}}
    out["KServeV1Request"] = {"type": "object", "required": ["instances"], "properties": {
        "instances": {"type": "array", "items": {}, "description":
                      'base64 strings, {"b64": …}, {"image_bytes": {"b64": …}}, {"data": …}, '
                      "or C×H×W nested lists of numbers"}},
        "additionalProperties": True,
        "description": ":explain also takes ExplainRequest fields beside instances (method "
                       "auto when none is named) and parameters, the method's parameters as "
                       "plain values"}
    return out


def _json_body(name: str, multipart: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": REF + name}}}
    if multipart:
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": {
            "request": {"type": "string", "description": f"{name} as JSON, without input"},
            "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "PNG or JPEG files, one batch item each"}},
            "additionalProperties": {"type": "string",
                                     "description": f"any {name} field as text"}}}
    return {"required": True, "content": content}


def _answers(name: str | None, media: str = "application/json") -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "OK"}
    if name is not None:
        ok["content"] = {media: {"schema": {"$ref": REF + name} if media == "application/json"
                                 else {"type": "string"}}}
    error = {"description": "the call's gRPC status as HTTP (400 INVALID_ARGUMENT and "
             "FAILED_PRECONDITION, 401, 404, 413, 429 RESOURCE_EXHAUSTED, 499 CANCELLED, "
             "500, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED)",
             "content": {"application/json": {"schema": {"$ref": REF + "Error"}}}}
    return {"200": ok, "default": error}


def _operation(summary: str, answer: str | None, body: str | None = None,
               multipart: bool = False, media: str = "application/json",
               parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": _answers(answer, media),
                                 "parameters": [*(parameters or []), *_HEADERS]}
    if body is not None:
        operation["requestBody"] = _json_body(body, multipart)
    return operation


_HEADERS = [
    {"name": "x-request-id", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "echoed back; a fresh one when absent or not [A-Za-z0-9._-]{1,64}"},
    {"name": "x-timeout-ms", "in": "header", "required": False, "schema": {"type": "number"},
     "description": "the call's deadline in milliseconds (DEADLINE_EXCEEDED → 504)"},
]


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def spec() -> dict[str, Any]:
    """The whole description, served at ``/openapi.json``."""
    model = [_path("model"), {"name": "version", "in": "query", "required": False,
                              "schema": {"type": "integer"}, "description": "0 = latest"}]
    name = [_path("name")]
    return {
        "openapi": "3.1.0",
        "info": {"title": "saliency", "version": "v1", "description":
                 "Saliency maps of image models: the saliency.v1.Explainer gRPC service as "
                 "JSON (the proto's JSON mapping), KServe V1 routes and health."},
        "components": {"schemas": schemas(), "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "when the server has tokens (--auth-token)"}}},
        "security": [{"bearer": []}, {}],
        "paths": {
            "/api/v1/explain": {"post": _operation("Explain", "ExplainResponse",
                                                   "ExplainRequest", multipart=True)},
            "/api/v1/explain/stream": {"post": _operation(
                "ExplainStream as server-sent events: 'progress' (Progress), then 'result' "
                "(ExplainResponse) or 'error' (Error)", "ExplainUpdate", "ExplainRequest",
                multipart=True, media="text/event-stream")},
            "/api/v1/predict": {"post": _operation("Predict", "PredictResponse",
                                                   "PredictRequest", multipart=True)},
            "/api/v1/models": {"get": _operation("ListModels", "ListModelsResponse")},
            "/api/v1/models/{model}": {"get": _operation("GetModel", "ModelInfo",
                                                         parameters=model)},
            "/v1/models": {"get": _operation("KServe V1: model names", None)},
            "/v1/models/{name}": {"get": _operation("KServe V1: readiness", None,
                                                    parameters=name)},
            "/v1/models/{name}:predict": {"post": _operation(
                "KServe V1 predict: {predictions: [{class_index, label, probability, top}]}",
                None, "KServeV1Request", parameters=name)},
            "/v1/models/{name}:explain": {"post": _operation(
                "KServe V1 explain: {predictions: [...], explanations: [{saliency (H×W), "
                "target, prediction, overlay}], cost}", None, "KServeV1Request", parameters=name)},
            "/healthz": {"get": {"summary": "live", "security": [{}],
                                 "responses": {"200": {"description": "serving"}}}},
            "/readyz": {"get": {"summary": "ready: a model is loaded and the server is not "
                                "draining", "security": [{}],
                                "responses": {"200": {"description": "ready"},
                                              "503": {"description": "not ready"}}}},
        },
    }
