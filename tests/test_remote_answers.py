"""Remote models whose predictor answers badly: a V2 REST predictor (a small HTTP server here,
listing the binary tensor extension as Triton does) sends malformed, endless or oversized
answers, and a real server explaining through it answers UNAVAILABLE with the reason (or
DEADLINE_EXCEEDED at the request's deadline), never INTERNAL."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from saliency_service.core import remote
from saliency_service.core.repository import ModelHandle
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from tests.conftest import RunningServer, make_config
from tests.onnx_models import small_cnn, write_package
from tests.test_remote_models import write_remote

SIZE = 16
# What the predictor answers each inference: (body, extra headers), or a function that
# answers by itself.
ANSWER: dict[str, Any] = {}
# The predictor's port, once it listens.
PORT: dict[str, int] = {}
# Set once the server has closed a trickled answer's connection.
GAVE_UP = threading.Event()


class Predictor(BaseHTTPRequestHandler):
    """V2 REST metadata and readiness of model ``plain``; inference answers ``ANSWER``."""

    def log_message(self, *args: Any) -> None:  # noqa: ANN401 - quiet
        pass

    def _send(self, body: bytes, headers: list[tuple[str, str]] | None = None) -> None:
        self.send_response(200)
        for key, value in headers or []:
            self.send_header(key, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/v2/models/slow":
            trickle(self)
        elif self.path == "/v2":
            self._send(json.dumps({"extensions": ["binary_tensor_data"]}).encode())
        elif self.path.endswith("/ready"):
            self._send(b"")
        else:
            self._send(json.dumps({"name": "plain", "inputs": [{"name": "input"}],
                                   "outputs": [{"name": "logits"}]}).encode())

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        if callable(ANSWER.get("now")):
            ANSWER["now"](self)
            return
        if "now" in ANSWER:
            self._send(*ANSWER["now"])
            return
        # Until a test sets an answer (the warm-up): ``ANSWER["score"]`` (0) for each input
        # and class, in JSON.
        length = int(self.headers.get("inference-header-content-length", len(body)))
        rows = json.loads(body[:length])["inputs"][0]["shape"][0]
        data = [ANSWER.get("score", 0.0)] * rows * 3
        self._send(json.dumps(output(shape=[rows, 3], data=data)).encode())


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.ExplainerStub]:
    predictor = ThreadingHTTPServer(("127.0.0.1", 0), Predictor)
    PORT["predictor"] = predictor.server_port
    threading.Thread(target=predictor.serve_forever, daemon=True).start()
    root = tmp_path_factory.mktemp("remote_answers")
    local = write_package(small_cnn(classes=3, size=SIZE), root / "files", "plain")
    write_remote(local, root / "models", "remote",
                 {"protocol": "v2-rest", "model": "plain", "retries": 0,
                  "url": f"http://127.0.0.1:{predictor.server_port}"})
    running = RunningServer(make_config(root / "models")).start()
    with grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        (status,) = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
        assert status.ready, status.error
        yield stub
    running.stop()
    predictor.shutdown()


def binary(header: Any, raw: bytes = b"") -> tuple[bytes, list[tuple[str, str]]]:  # noqa: ANN401
    """An answer in the binary tensor extension: the JSON ``header``, then ``raw``."""
    text = json.dumps(header).encode()
    return text + raw, [("inference-header-content-length", str(len(text)))]


def output(**fields: Any) -> dict[str, Any]:  # noqa: ANN401
    return {"outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 3], **fields}]}


BROKEN = {
    "header_not_json": (b"{not json" + bytes(12), [("inference-header-content-length", "9")]),
    "header_not_an_object": binary([1, 2]),
    "header_length_not_ascii": (b"{}", [("inference-header-content-length", "\u00b2")]),
    "size_not_whole_floats": binary(output(parameters={"binary_data_size": 11}), bytes(11)),
    "parameters_not_an_object": binary(output(parameters=[12]), bytes(12)),
    "size_of_an_earlier_output_not_a_number": binary(
        {"outputs": [{"name": "other", "parameters": {"binary_data_size": "x"}},
                     *output(parameters={"binary_data_size": 12})["outputs"]]}, bytes(12)),
    "shape_of_strings": (json.dumps(output(shape=["a", "b"], data=[1.0, 2.0, 3.0])).encode(),
                         []),
    "gzip_that_is_not": (b"not gzip", [("content-encoding", "gzip")]),
    "shape_too_large": (json.dumps(output(shape=[10 ** 30, 0], data=[])).encode(), []),
}


def explain(stub: pb_grpc.ExplainerStub, timeout: float = 60) -> pb.ExplainResponse:
    """Occlusion of one image: its first call to the predictor is the prediction."""
    batch = np.zeros((1, 3, SIZE, SIZE), np.float32)
    return stub.Explain(pb.ExplainRequest(model="remote", input=pb.Input(
        tensor=array_to_tensor(batch)), method=pb.METHOD_OCCLUSION,
        occlusion=pb.OcclusionParams(window=8, stride=8)), timeout=timeout)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_malformed_answer_is_unavailable(stub: pb_grpc.ExplainerStub, case: str) -> None:
    ANSWER["now"] = BROKEN[case]
    with pytest.raises(grpc.RpcError) as caught:
        explain(stub)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert "predictor 'plain'" in caught.value.details()


# The request's deadline in the trickle tests: far longer than reaching the predictor takes
# on a slow machine, far shorter than the 50 s the answer trickles.
TRICKLE_DEADLINE = 5.0


def trickle(handler: Predictor) -> None:
    """A valid-looking answer one byte every 0.1 s for 50 s, until the server hangs up."""
    handler.send_response(200)
    handler.send_header("content-length", "500")
    handler.end_headers()
    try:
        for _ in range(500):
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.1)
    except OSError:
        GAVE_UP.set()


def test_a_trickled_answer_ends_at_the_deadline(stub: pb_grpc.ExplainerStub) -> None:
    """Each byte comes well within the read timeout, but the answer never ends: the call
    stops at the request's deadline (the client's DEADLINE_EXCEEDED comes at its own)."""
    ANSWER["now"] = trickle
    GAVE_UP.clear()
    with pytest.raises(grpc.RpcError) as caught:
        explain(stub, timeout=TRICKLE_DEADLINE)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert GAVE_UP.wait(30), "the server still reads an answer its request gave up on"


def test_a_trickled_prediction_ends_at_the_deadline(stub: pb_grpc.ExplainerStub) -> None:
    """Predict is bounded by its deadline as Explain is."""
    ANSWER["now"] = trickle
    GAVE_UP.clear()
    batch = np.zeros((1, 3, SIZE, SIZE), np.float32)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(pb.PredictRequest(model="remote", input=pb.Input(
            tensor=array_to_tensor(batch))), timeout=TRICKLE_DEADLINE)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert GAVE_UP.wait(30), "the server still reads an answer its request gave up on"


def test_trickled_metadata_ends_at_the_probes_bound(stub: pb_grpc.ExplainerStub,
                                                     tmp_path: Path) -> None:
    """Loading asks for the model's metadata; an answer that never ends makes the model not
    ready within the probe's bound (here remote.timeout_seconds, 1 s) with that reason."""
    GAVE_UP.clear()
    local = write_package(small_cnn(classes=3, size=SIZE), tmp_path / "files", "plain")
    url = f"http://127.0.0.1:{PORT['predictor']}"
    handle = ModelHandle("slow", 1, write_remote(local, tmp_path, "slow", {
        "protocol": "v2-rest", "model": "slow", "url": url, "timeout_seconds": 1}))
    handle.load()
    assert not handle.ready and "did not end in time" in handle.error, handle.error
    assert GAVE_UP.wait(30), "the server still reads an answer it gave up on"


def test_an_oversized_answer_is_unavailable(stub: pb_grpc.ExplainerStub,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A valid answer padded past the bound (lowered here to 1 MiB) is not read whole."""
    monkeypatch.setattr(remote, "MAX_ANSWER_BYTES", 1 << 20)
    answer = {**output(data=[0.0, 1.0, 2.0]), "padding": " " * (4 << 20)}
    ANSWER["now"] = (json.dumps(answer).encode(), [])
    batch = np.zeros((1, 3, SIZE, SIZE), np.float32)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(pb.PredictRequest(model="remote", input=pb.Input(
            tensor=array_to_tensor(batch))), timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert "MiB" in caught.value.details()


def test_nan_scores_are_unavailable(stub: pb_grpc.ExplainerStub) -> None:
    """Scores of the right shape, every one NaN: no map or prediction is made of them."""
    ANSWER.pop("now", None)
    ANSWER["score"] = float("nan")
    try:
        with pytest.raises(grpc.RpcError) as caught:
            explain(stub)
    finally:
        del ANSWER["score"]
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert "NaN" in caught.value.details()


def test_a_stacked_content_encoding_is_not_decoded(stub: pb_grpc.ExplainerStub,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """gzip inside gzip: each layer multiplies the size by up to a thousand in one step, so
    such an answer is refused before it is decoded (64 MiB here; a 64 kB body can be 64 GB)."""
    monkeypatch.setattr(remote, "MAX_ANSWER_BYTES", 1 << 20)
    body = gzip.compress(gzip.compress(bytes(64 << 20), 9), 9)
    ANSWER["now"] = (body, [("content-encoding", "gzip, gzip")])
    with pytest.raises(grpc.RpcError) as caught:
        explain(stub)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert "'gzip, gzip'" in caught.value.details()


def test_a_gzip_answer_is_read(stub: pb_grpc.ExplainerStub) -> None:
    """One content coding (a proxy's gzip) is decoded as before."""
    ANSWER["now"] = (gzip.compress(json.dumps(output(data=[0.5, 2.0, -1.0])).encode()),
                     [("content-encoding", "gzip")])
    batch = np.zeros((1, 3, SIZE, SIZE), np.float32)
    reply = stub.Predict(pb.PredictRequest(model="remote", input=pb.Input(
        tensor=array_to_tensor(batch))), timeout=60)
    np.testing.assert_array_equal(tensor_to_array(reply.logits), [[0.5, 2.0, -1.0]])


def test_a_wellformed_binary_answer_is_read(stub: pb_grpc.ExplainerStub) -> None:
    """The same predictor answering properly: the set-up itself is sound."""
    scores = np.array([[0.5, 2.0, -1.0]], "<f4")
    ANSWER["now"] = binary(output(parameters={"binary_data_size": 12}), scores.tobytes())
    batch = np.zeros((1, 3, SIZE, SIZE), np.float32)
    reply = stub.Predict(pb.PredictRequest(model="remote", input=pb.Input(
        tensor=array_to_tensor(batch))), timeout=60)
    np.testing.assert_array_equal(tensor_to_array(reply.logits), scores)
