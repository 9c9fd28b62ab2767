"""The HTTP/JSON API over a real server on loopback, called with a real HTTP client (httpx):
every route, the same answers as gRPC, uploads, server-sent events, KServe V1, errors as
HTTP statuses with a JSON body, request ids, the transport metric label, cancellation,
bearer tokens, TLS, and the drain."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image

from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.json_messages import to_json
from saliency_service.protocol.kserve import tensor_array
from saliency_service.protocol.openapi import spec
from tests.conftest import TINY_LABELS, RunningServer, make_config
from tests.production_support import scrape, tiny_request, value
from tests.test_production_security import pki  # noqa: F401 - the certificates fixture

MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def web(repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(make_config(repository, http_port=0,
                                        max_message_bytes=MAX_BODY)).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(web: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{web.server.http_port}", timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_stub(web: RunningServer) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(web.address) as channel:
        yield pb_grpc.ExplainerStub(channel)


def png(seed: int = 0, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def as_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def assert_error(response: httpx.Response, http_status: int, grpc_status: str,
                 words: str = "") -> str:
    """The response is ``http_status`` with the API's JSON error body; returns its message."""
    assert response.status_code == http_status, response.text
    error = response.json()["error"]
    assert error["code"] == http_status
    assert error["status"] == grpc_status
    assert error["message"] and words.lower() in error["message"].lower(), error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    return str(error["message"])


# ---- the native API answers as gRPC does --------------------------------------------------


def test_predict_over_json_equals_grpc(http: httpx.Client,
                                       grpc_stub: pb_grpc.ExplainerStub) -> None:
    source = tiny_request(pb.METHOD_UNSPECIFIED, batch=2).input
    expected = grpc_stub.Predict(pb.PredictRequest(model="tiny", input=source, top_k=3))
    response = http.post("/api/v1/predict", json={"model": "tiny", "input": as_json(source),
                                                   "top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [[s["label"] for s in p["top"]] for p in body["predictions"]] == \
        [[s.label for s in p.top] for p in expected.predictions]
    logits = json_format.ParseDict(body["logits"], pb.Tensor())
    assert logits.data == expected.logits.data  # the same bytes: one code path
    assert body["cost"]["forward_passes"] == expected.cost.forward_passes == 2


def test_explain_over_json_equals_grpc(http: httpx.Client,
                                       grpc_stub: pb_grpc.ExplainerStub) -> None:
    request = tiny_request(pb.METHOD_SMOOTHGRAD)
    request.seed = 7
    request.smoothgrad.samples = 4
    expected = grpc_stub.Explain(request)
    response = http.post("/api/v1/explain", json=as_json(request))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["saliency"]["data"] == b64(expected.saliency.data)
    assert body["cost"]["method"] == "METHOD_SMOOTHGRAD"
    assert body["cost"]["forward_passes"] == expected.cost.forward_passes
    assert body["request_id"] == response.headers["x-request-id"]


def test_models_and_model_info_are_grpc_messages(http: httpx.Client,
                                                 grpc_stub: pb_grpc.ExplainerStub) -> None:
    listed = http.get("/api/v1/models").json()
    assert listed == to_json(grpc_stub.ListModels(pb.ListModelsRequest()))
    broken = next(m for m in listed["models"] if m["name"] == "broken")
    assert not broken["ready"] and broken["error"]
    info = http.get("/api/v1/models/tiny", params={"version": 1}).json()
    assert info["class_labels"] == list(TINY_LABELS)
    expected = grpc_stub.GetModel(pb.GetModelRequest(model="tiny"))
    assert [m["name"] for m in info["methods"]] == [m.name for m in expected.methods]
    assert [m["defaults"] for m in info["methods"]] == [dict(m.defaults) for m in expected.methods]


def test_short_enum_names_and_camel_case_fields_are_accepted(http: httpx.Client) -> None:
    source = as_json(tiny_request(pb.METHOD_UNSPECIFIED).input)
    response = http.post("/api/v1/explain", json={
        "model": "tiny", "method": "integrated_gradients", "input": source,
        "integratedGradients": {"steps": 4, "baseline": "blur"}})
    assert response.status_code == 200, response.text
    assert response.json()["cost"]["method"] == "METHOD_INTEGRATED_GRADIENTS"
    assert response.json()["cost"]["forward_passes"] == 2 + 4 + 1 - 1  # steps + baseline + 1


def test_bytes_in_either_base64_alphabet(http: httpx.Client) -> None:
    """The JSON mapping's bytes are standard or URL-safe base64; both give the same input."""
    rng = np.random.default_rng(11)
    data = rng.normal(size=(1, 3, 32, 32)).astype(np.float32).tobytes()
    answers = []
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        text = encode(data).decode()
        tensor = {"shape": [1, 3, 32, 32], "dtype": "DTYPE_FLOAT32", "data": text}
        response = http.post("/api/v1/predict", json={"model": "tiny", "input": {"tensor": tensor}})
        assert response.status_code == 200, response.text
        answers.append(response.json()["logits"]["data"])
    assert "-" in text or "_" in text  # the URL-safe spelling differs for these bytes
    assert answers[0] == answers[1]


def test_multipart_upload_equals_base64_json(http: httpx.Client) -> None:
    images = [png(1), png(2)]
    uploaded = http.post(
        "/api/v1/explain",
        files=[("image", ("a.png", images[0], "image/png")),
               ("image", ("b.png", images[1], "image/png"))],
        data={"model": "tiny", "method": "gradcam", "return_overlay": "true",
              "request": json.dumps({"top_k": 2, "target": {"class_index": 1}})})
    assert uploaded.status_code == 200, uploaded.text
    as_base64 = http.post("/api/v1/explain", json={
        "model": "tiny", "method": "METHOD_GRADCAM", "return_overlay": True, "top_k": 2,
        "target": {"class_index": 1}, "input": {"images": {"images": [b64(i) for i in images]}}})
    first, second = uploaded.json(), as_base64.json()
    assert first["saliency"] == second["saliency"]
    assert first["targets"] == [1, 1]
    assert len(first["overlays"]) == 2
    assert base64.b64decode(first["overlays"][0]).startswith(b"\x89PNG")
    assert all(len(p["top"]) == 2 for p in first["predictions"])
    predicted = http.post("/api/v1/predict", files=[("image", ("a.png", images[0], "image/png"))],
                          data={"model": "tiny"})
    assert predicted.status_code == 200 and len(predicted.json()["predictions"]) == 1


# ---- server-sent events -------------------------------------------------------------------


def sse(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    events, name = [], ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


def decam_body(generations: int = 6, population: int = 8) -> dict[str, Any]:
    return {"model": "tiny", "method": "decam", "seed": 3,
            "input": as_json(tiny_request(pb.METHOD_UNSPECIFIED).input),
            "decam": {"generations": generations, "population": population, "patience": 0,
                      "refine": False, "grid": 4}}


def test_stream_sends_progress_then_the_result(http: httpx.Client,
                                               grpc_stub: pb_grpc.ExplainerStub) -> None:
    with http.stream("POST", "/api/v1/explain/stream", json=decam_body()) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)
    names = [name for name, _ in events]
    assert names[-1] == "result" and set(names[:-1]) == {"progress"} and len(names) > 3
    steps = [int(data["step"]) for name, data in events if name == "progress"]
    assert steps == sorted(steps) and steps[-1] == int(events[-2][1]["total_steps"])
    assert any(data.get("saliency", {}).get("data") for _, data in events[:-1])
    expected = grpc_stub.Explain(json_format.ParseDict(
        {**decam_body(), "method": "METHOD_DECAM"}, pb.ExplainRequest()))
    assert events[-1][1]["saliency"]["data"] == b64(expected.saliency.data)


def test_stream_refused_before_it_starts_answers_with_the_status(http: httpx.Client) -> None:
    body = {**decam_body(), "model": "missing"}
    assert_error(http.post("/api/v1/explain/stream", json=body), 404, "NOT_FOUND", "missing")


# ---- KServe V1 ----------------------------------------------------------------------------


def test_kserve_v1_models_and_readiness(http: httpx.Client) -> None:
    assert http.get("/v1/models").json() == {"models": ["broken", "tiny"]}
    assert http.get("/v1/models/tiny").json() == {"name": "tiny", "ready": True}
    broken = http.get("/v1/models/broken")
    assert broken.status_code == 503 and broken.json() == {"name": "broken", "ready": False}
    assert_error(http.get("/v1/models/absent"), 404, "NOT_FOUND", "absent")


def test_kserve_v1_predict_takes_images_in_every_spelling_and_tensors(
        http: httpx.Client, grpc_stub: pb_grpc.ExplainerStub) -> None:
    image = b64(png(4))
    expected = grpc_stub.Predict(pb.PredictRequest(
        model="tiny", input=pb.Input(images=pb.EncodedImages(images=[png(4)]))))
    label = expected.predictions[0].top[0].label
    for instance in (image, {"b64": image}, {"image_bytes": {"b64": image}}, {"data": image}):
        response = http.post("/v1/models/tiny:predict", json={"instances": [instance, instance]})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert [p["label"] for p in predictions] == [label, label]
        assert predictions[0]["probability"] == pytest.approx(
            expected.predictions[0].top[0].probability, rel=1e-6)
    tensor = tiny_request(pb.METHOD_UNSPECIFIED, batch=2)
    array = tensor_array(tensor.input.tensor)
    response = http.post("/v1/models/tiny:predict", json={"instances": array.tolist()})
    from_grpc = grpc_stub.Predict(pb.PredictRequest(model="tiny", input=tensor.input))
    assert [p["class_index"] for p in response.json()["predictions"]] == \
        [p.top[0].index for p in from_grpc.predictions]


def test_kserve_v1_explain(http: httpx.Client, grpc_stub: pb_grpc.ExplainerStub) -> None:
    image = png(5)
    response = http.post("/v1/models/tiny:explain", json={
        "instances": [{"b64": b64(image)}], "method": "gradcam", "target": 2,
        "return_overlay": True})
    assert response.status_code == 200, response.text
    body = response.json()
    explanation = body["explanations"][0]
    saliency = np.asarray(explanation["saliency"])
    assert saliency.shape == (32, 32) and 0.0 <= saliency.min() <= saliency.max() <= 1.0
    assert explanation["target"] == 2
    assert base64.b64decode(explanation["overlay"]["b64"]).startswith(b"\x89PNG")
    expected = grpc_stub.Explain(pb.ExplainRequest(
        model="tiny", method=pb.METHOD_GRADCAM, target=pb.Target(class_index=2),
        input=pb.Input(images=pb.EncodedImages(images=[image]))))
    np.testing.assert_allclose(saliency, tensor_array(expected.saliency)[0], atol=1e-6)
    assert body["cost"]["method"] == "METHOD_GRADCAM"


# ---- client mistakes: HTTP status and JSON body -------------------------------------------


TENSOR = {"tensor": {"shape": [1, 3, 32, 32], "dtype": "DTYPE_FLOAT32",
                     "data": b64(np.zeros((1, 3, 32, 32), np.float32).tobytes())}}
MISTAKES = [
    ("unknown model", "/api/v1/explain", {"model": "nope", "method": "gradcam", "input": TENSOR},
     404, "NOT_FOUND", "nope"),
    ("unknown method", "/api/v1/explain", {"model": "tiny", "method": "shap", "input": TENSOR},
     400, "INVALID_ARGUMENT", "valid values: auto"),
    ("unknown field", "/api/v1/explain", {"model": "tiny", "colour": 1}, 400,
     "INVALID_ARGUMENT", "no field named"),
    ("wrong type", "/api/v1/predict", {"model": "tiny", "top_k": "many"}, 400,
     "INVALID_ARGUMENT", "top_k"),
    ("not an object", "/api/v1/predict", [1, 2], 400, "INVALID_ARGUMENT", "JSON object"),
    ("model not ready", "/api/v1/predict", {"model": "broken", "input": TENSOR}, 503,
     "UNAVAILABLE", "not ready"),
    ("no input", "/api/v1/explain", {"model": "tiny", "method": "gradcam"}, 400,
     "INVALID_ARGUMENT", ""),
    ("batch over the limit", "/api/v1/predict",
     {"model": "tiny", "input": {"images": {"images": [b64(png())] * 9}}}, 400,
     "INVALID_ARGUMENT", "max_batch"),
    ("parameter over its limit", "/api/v1/explain",
     {"model": "tiny", "method": "smoothgrad", "input": TENSOR, "smoothgrad": {"samples": 100000}},
     400, "INVALID_ARGUMENT", "--max-samples"),
    ("undecodable image", "/api/v1/predict",
     {"model": "tiny", "input": {"images": {"images": [b64(b"not an image")]}}}, 400,
     "INVALID_ARGUMENT", ""),
    ("KServe without instances", "/v1/models/tiny:predict", {"inputs": []}, 400,
     "INVALID_ARGUMENT", "instances"),
    ("KServe bad base64", "/v1/models/tiny:predict", {"instances": ["@@not base64@@"]}, 400,
     "INVALID_ARGUMENT", "base64"),
    ("KServe mixed instances", "/v1/models/tiny:predict",
     {"instances": [b64(png()), [[[0.0]]]]}, 400, "INVALID_ARGUMENT", "mix"),
    ("KServe ragged tensor", "/v1/models/tiny:predict", {"instances": [[[1.0], [1.0, 2.0]]]},
     400, "INVALID_ARGUMENT", "nested list"),
    ("KServe unknown model", "/v1/models/nope:explain",
     {"instances": [b64(png())], "method": "gradcam"}, 404, "NOT_FOUND", "nope"),
]


@pytest.mark.parametrize(("path", "body", "http_status", "grpc_status", "words"),
                         [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_client_mistakes_get_their_status_and_a_json_body(
        http: httpx.Client, path: str, body: Any, http_status: int, grpc_status: str,
        words: str) -> None:
    assert_error(http.post(path, json=body), http_status, grpc_status, words)


def test_framing_mistakes(http: httpx.Client) -> None:
    assert_error(http.post("/api/v1/predict", content=b"{not json",
                           headers={"content-type": "application/json"}),
                 400, "INVALID_ARGUMENT", "not JSON")
    assert_error(http.post("/api/v1/predict", content=b"x" * (MAX_BODY + 1)), 413,
                 "RESOURCE_EXHAUSTED", "--max-message-bytes")
    assert_error(http.post("/api/v1/predict", json={"model": "tiny"},
                           headers={"x-timeout-ms": "soon"}), 400, "INVALID_ARGUMENT",
                 "x-timeout-ms")
    assert_error(http.post("/api/v1/explain", files=[("picture", ("a.png", png(), "image/png"))],
                           data={"model": "tiny"}), 400, "INVALID_ARGUMENT", "'image'")
    assert_error(http.get("/api/v1/models/tiny", params={"version": "latest"}), 400,
                 "INVALID_ARGUMENT", "version")
    assert_error(http.get("/no/such/route"), 404, "NOT_FOUND", "/openapi.json")
    assert_error(http.get("/api/v1/explain"), 405, "UNIMPLEMENTED", "no route GET")


HOSTILE_JSON = [
    ("integer of 5,000 digits", "/api/v1/predict",
     '{"model": "tiny", "top_k": ' + "9" * 5000 + "}", "4300 digits"),
    ("nesting 5,000 deep", "/api/v1/explain", '{"model": "tiny", "seed": ' + "[" * 5000
     + "]" * 5000 + "}", "levels deep"),
    ("nesting 100 deep", "/v1/models/tiny:predict", '{"instances": ' + "[" * 100 + "]" * 100
     + "}", "levels deep"),
    ("KServe top_k 2**40", "/v1/models/tiny:predict",
     json.dumps({"instances": [b64(png())], "top_k": 2**40}), "top_k=1099511627776"),
    ("KServe top_k -2**40", "/v1/models/tiny:predict",
     json.dumps({"instances": [b64(png())], "top_k": -(2**40)}), "int32 field takes"),
    ("method number with parameters", "/v1/models/tiny:explain",
     json.dumps({"instances": [b64(png())], "method": 12345, "parameters": {"steps": 4}}),
     "method=12345 is not a Method value"),
    ("steps 1e20", "/v1/models/tiny:explain", json.dumps({
        "instances": [b64(png())], "method": "integrated_gradients",
        "parameters": {"steps": 1e20}}), "integrated_gradients.steps=1e+20 is out of range"),
    ("weights a number", "/v1/models/tiny:explain", json.dumps({
        "instances": [b64(png())], "method": "fastcam", "parameters": {"weights": 5}}),
     "fastcam.weights=5 is one value: it takes a list"),
    ("weights null", "/v1/models/tiny:explain", json.dumps({
        "instances": [b64(png())], "method": "fastcam", "parameters": {"weights": None}}),
     "fastcam.weights=None is not a value"),
    ("seed 10**30", "/api/v1/explain", json.dumps({"model": "tiny", "seed": 10**30}),
     "seed=1000000000000000000000000000000 is out of range: a uint64"),
]


@pytest.mark.parametrize(("path", "text", "words"), [h[1:] for h in HOSTILE_JSON],
                         ids=[h[0] for h in HOSTILE_JSON])
def test_hostile_json_is_a_400_naming_the_field(http: httpx.Client, path: str, text: str,
                                                words: str) -> None:
    response = http.post(path, content=text.encode(),
                         headers={"content-type": "application/json"})
    assert_error(response, 400, "INVALID_ARGUMENT", words)


def test_hostile_form_fields_and_query_parameters_are_400s(http: httpx.Client) -> None:
    deep = "[" * 5000 + "]" * 5000
    for data in ({"model": "tiny", "request": deep}, {"model": "tiny", "seed": "1",
                                                      "input": deep}):
        response = http.post("/api/v1/explain", data=data,
                             files=[("image", ("a.png", png(), "image/png"))])
        assert_error(response, 400, "INVALID_ARGUMENT", "levels deep")
    response = http.get("/api/v1/models/tiny", params={"version": "9" * 23})
    assert_error(response, 400, "INVALID_ARGUMENT", "version=")
    assert "an int64 field takes" in response.json()["error"]["message"]


def test_deadline_from_the_timeout_header(http: httpx.Client) -> None:
    response = http.post("/api/v1/explain", json=decam_body(generations=400, population=64),
                         headers={"x-timeout-ms": "150"})
    assert_error(response, 504, "DEADLINE_EXCEEDED")


# ---- framing, metrics and cancellation ----------------------------------------------------


def test_request_id_is_echoed_and_calls_are_counted_by_transport(
        web: RunningServer, http: httpx.Client, grpc_stub: pb_grpc.ExplainerStub) -> None:
    before = scrape(web.server.metrics_port)
    body = {"model": "tiny", "method": "gradcam",
            "input": as_json(tiny_request(pb.METHOD_UNSPECIFIED).input)}
    response = http.post("/api/v1/explain", json=body, headers={"x-request-id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    assert response.json()["request_id"] == "trace-42"
    unsafe = http.post("/api/v1/explain", json=body, headers={"x-request-id": "not/a token"})
    assert unsafe.headers["x-request-id"] not in ("", "not/a token")
    http.post("/api/v1/explain", json={**body, "model": "nope"})
    grpc_stub.Explain(json_format.ParseDict({**body, "method": "METHOD_GRADCAM"},
                                            pb.ExplainRequest()))
    after = scrape(web.server.metrics_port)

    def added(**labels: str) -> float:
        name = "saliency_transport_requests_total"
        return value(after, name, **labels) - value(before, name, **labels)

    assert added(transport="http", code="OK") == 2
    assert added(transport="http", code="NOT_FOUND") == 1
    assert added(transport="grpc", code="OK") == 1


def test_a_client_that_goes_away_cancels_its_call(web: RunningServer) -> None:
    name = "saliency_transport_requests_total"
    before = value(scrape(web.server.metrics_port), name, transport="http", code="CANCELLED")
    url = f"http://127.0.0.1:{web.server.http_port}/api/v1/explain"
    with httpx.Client(timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post(url, json=decam_body(generations=400, population=64))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = value(scrape(web.server.metrics_port), name, transport="http", code="CANCELLED")
        if now > before:
            break
        time.sleep(0.1)
    assert now == before + 1


def test_a_stream_whose_client_goes_away_cancels_its_call(web: RunningServer) -> None:
    name = "saliency_transport_requests_total"
    before = value(scrape(web.server.metrics_port), name, transport="http", code="CANCELLED")
    url = f"http://127.0.0.1:{web.server.http_port}/api/v1/explain/stream"
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", url, json=decam_body(generations=400, population=64)) as response:
        lines = response.iter_lines()
        assert next(lines) == "event: progress"  # running; then the client leaves
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = value(scrape(web.server.metrics_port), name, transport="http", code="CANCELLED")
        if now > before:
            break
        time.sleep(0.1)
    assert now == before + 1


def test_health_and_readiness(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "SERVING"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "SERVING"}


def test_the_description_covers_every_route(web: RunningServer, http: httpx.Client) -> None:
    described = http.get("/openapi.json").json()
    assert described == spec()
    schemas = described["components"]["schemas"]
    assert set(pb.DESCRIPTOR.message_types_by_name) <= set(schemas)
    text = json.dumps(described)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}:
        assert ref in schemas, ref
    app = web.server.http.server.config.app.app  # type: ignore[union-attr] # in its limit
    served = {route.path for route in app.routes
              if route.path.startswith(("/api/", "/v1/", "/healthz", "/readyz"))}
    assert served == set(described["paths"])
    assert set(schemas["ExplainRequest"]["properties"]) == \
        {f.name for f in pb.ExplainRequest.DESCRIPTOR.fields}


# ---- bearer tokens and TLS ----------------------------------------------------------------


def test_bearer_token_is_required_except_for_health_and_the_explorer(repository: Path) -> None:
    running = RunningServer(make_config(repository, http_port=0, auth_token="s3cret")).start()
    try:
        base = f"http://127.0.0.1:{running.server.http_port}"
        with httpx.Client(base_url=base, timeout=30) as client:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
                response = client.get("/api/v1/models", headers=headers)
                assert_error(response, 401, "UNAUTHENTICATED", "Authorization: Bearer")
                assert response.headers["www-authenticate"] == "Bearer"
            assert client.post("/v1/models/tiny:predict", json={}).status_code == 401
            ok = client.get("/api/v1/models", headers={"authorization": "Bearer s3cret"})
            assert ok.status_code == 200
            for open_path in ("/healthz", "/readyz", "/openapi.json", "/",
                              "/explorer/explorer.js"):
                assert client.get(open_path).status_code == 200, open_path
        rejected = value(scrape(running.server.metrics_port), "saliency_rejected_total",
                         reason="unauthenticated")
        assert rejected == 4
    finally:
        running.stop()


def test_https_with_the_grpc_certificate_and_mutual_tls(repository: Path,
                                                        pki: dict[str, Path]) -> None:  # noqa: F811
    config = make_config(repository, http_port=0, tls_cert=str(pki["server.pem"]),
                         tls_key=str(pki["server.key"]), tls_client_ca=str(pki["ca.pem"]))
    running = RunningServer(config).start()
    try:
        url = f"https://127.0.0.1:{running.server.http_port}/api/v1/models"
        client_cert = (str(pki["client.pem"]), str(pki["client.key"]))
        import ssl  # noqa: PLC0415

        context = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        context.load_cert_chain(*client_cert)
        with httpx.Client(verify=context, timeout=30) as client:
            assert client.get(url).json()["models"][0]["name"] in ("broken", "tiny")
        anonymous = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        with httpx.Client(verify=anonymous, timeout=30) as client, \
                pytest.raises(httpx.TransportError):
            client.get(url)
        with httpx.Client(timeout=30) as client, pytest.raises(httpx.TransportError):
            client.get(url.replace("https://", "http://"))
    finally:
        running.stop()


# ---- the drain ----------------------------------------------------------------------------


def test_the_drain_answers_http_calls_in_flight_and_refuses_new_ones(repository: Path) -> None:
    running = RunningServer(make_config(repository, http_port=0)).start()
    port = running.server.http_port
    url = f"http://127.0.0.1:{port}/api/v1/explain"
    answers: list[httpx.Response] = []

    def call() -> None:
        with httpx.Client(timeout=60) as client:
            answers.append(client.post(url, json=decam_body(generations=60, population=32)))

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)  # the call is running
    running.stop(grace=30)
    caller.join(60)
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert answers[0].json()["cost"]["method"] == "METHOD_DECAM"
    with httpx.Client(timeout=5) as client, pytest.raises(httpx.ConnectError):
        client.get(f"http://127.0.0.1:{port}/healthz")


# ---- the explorer's routes ----------------------------------------------------------------


def test_explorer_routes(http: httpx.Client) -> None:
    from saliency_service.evaluation.cells import CLASS_NAMES, TEST_CONFIG, CellConfig, generate  # noqa: PLC0415

    page = http.get("/explorer/")
    assert page.status_code == 200 and "saliency explorer" in page.text
    assert "drawMap" in http.get("/explorer/explorer.js").text
    cell = http.get("/explorer/cell", params={"index": 3, "size": 48}).json()
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(cell["image"]))))
    expected = generate(1, CellConfig(size=48, backgrounds=TEST_CONFIG.backgrounds,
                                      seed=TEST_CONFIG.seed), start=3)
    np.testing.assert_array_equal(pixels, expected.images[0])
    assert cell["label"] == CLASS_NAMES[int(expected.labels[0])] == CLASS_NAMES[cell["class_index"]]
    truth = np.asarray(Image.open(io.BytesIO(base64.b64decode(cell["ground_truth"]))))
    assert truth.shape == (48, 48) and set(np.unique(truth)) <= {0, 113, 255}
    for params in ({"size": 8}, {"index": -1}, {"index": "first"}):
        response = http.get("/explorer/cell", params=params)
        assert response.status_code == 400
        assert response.json()["error"]["status"] == "INVALID_ARGUMENT"
    report = http.get("/explorer/evaluation").json()
    assert len(report["rows"]) > 5 and any(row["front"] for row in report["rows"])
    assert all(row["p50_ms"] > 0 and 0 <= row["rcap"] <= 1 for row in report["rows"])
    assert "| method |" in http.get(report["report"]).text


def test_plain_parameters_in_a_form_and_in_kserve_parameters(http: httpx.Client) -> None:
    """``param=steps=4`` fields and KServe's ``parameters`` go through the CLI's parser and
    give the same request as the typed params message."""
    image = png(6)
    typed = http.post("/api/v1/explain", json={
        "model": "tiny", "method": "integrated_gradients", "input": {
            "images": {"images": [b64(image)]}},
        "integrated_gradients": {"steps": 4, "baseline": "BASELINE_BLUR"}}).json()
    form = http.post("/api/v1/explain", files=[("image", ("a.png", image, "image/png"))],
                     data={"model": "tiny", "method": "integrated_gradients",
                           "param": ["steps=4", "baseline=blur"]})
    assert form.status_code == 200, form.text
    assert form.json()["saliency"] == typed["saliency"]
    assert form.json()["cost"]["forward_passes"] == typed["cost"]["forward_passes"]
    kserve = http.post("/v1/models/tiny:explain", json={
        "instances": [b64(image)], "method": "integrated_gradients",
        "parameters": {"steps": 4, "baseline": "blur"}})
    assert kserve.status_code == 200, kserve.text
    np.testing.assert_allclose(
        kserve.json()["explanations"][0]["saliency"],
        tensor_array(json_format.ParseDict(typed["saliency"], pb.Tensor()))[0], atol=1e-6)
    wrong = http.post("/api/v1/explain", files=[("image", ("a.png", image, "image/png"))],
                      data={"model": "tiny", "method": "integrated_gradients",
                            "param": "stepz=4"})
    assert_error(wrong, 400, "INVALID_ARGUMENT", "it takes: steps")
    malformed = http.post("/api/v1/explain", files=[("image", ("a.png", image, "image/png"))],
                          data={"model": "tiny", "method": "gradcam", "param": "steps"})
    assert_error(malformed, 400, "INVALID_ARGUMENT", "name=value")
    assert_error(http.post("/v1/models/tiny:explain", json={
        "instances": [b64(image)], "method": "rise", "parameters": {"masks": "many"}}),
        400, "INVALID_ARGUMENT", "masks")
