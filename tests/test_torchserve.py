"""The TorchServe adapter: in-process, and inside a real TorchServe 0.12 on loopback ports,
whose ``/explanations`` maps must equal the gRPC server's for the same input and seed."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import TorchServeProcess, archive_package, torchserve_missing
from saliency_service.methods import registry
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.protocol.torchserve import SaliencyTorchServeHandler
from tests.conftest import TINY_SHAPE

SEED = 7


def _inputs() -> np.ndarray:
    return np.random.default_rng(11).normal(size=(1, *TINY_SHAPE)).astype(np.float32)


def _body(method: str, params: dict | None = None) -> dict:
    inputs = _inputs()
    body: dict = {
        "tensor": {
            "shape": list(inputs.shape),
            "data": base64.b64encode(inputs.tobytes()).decode(),
        },
        "method": method,
        "seed": SEED,
    }
    if params:
        body["params"] = params
    return body


def _decode(reply: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(reply["saliency"]), "<f4").reshape(reply["shape"])


def _grpc_maps(stub, method: str, params: object = None) -> np.ndarray:
    request = pb.ExplainRequest(
        model="tiny",
        method=pb.Method.Value("METHOD_" + method.upper()),
        input=pb.Input(tensor=array_to_tensor(_inputs())),
        seed=SEED,
    )
    if params is not None:
        getattr(request, method).CopyFrom(params)
    return tensor_to_array(stub.Explain(request, timeout=120).saliency)


def _registered(method: str) -> bool:
    return any(h.name == method for h in registry.handlers())


# Methods checked end to end; DE-CAM with small params so the test stays fast.
CASES = [
    ("vanilla_gradient", None, None),
    (
        "decam",
        {"population": 6, "generations": 3, "grid": 4},
        pb.DecamParams(population=6, generations=3, grid=4),
    ),
]


@pytest.fixture(scope="module")
def in_process(repository: Path) -> SaliencyTorchServeHandler:
    handler = SaliencyTorchServeHandler()
    handler.load(repository / "tiny" / "1")
    return handler


def test_handler_module_defines_exactly_one_class() -> None:
    """TorchServe instantiates the single class a handler module defines."""
    import inspect  # noqa: PLC0415

    import saliency_service.protocol.torchserve as module  # noqa: PLC0415

    classes = [
        c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__
    ]
    assert classes == [SaliencyTorchServeHandler]


def test_in_process_explain_equals_grpc(in_process, stub) -> None:
    (reply,) = in_process.explain_handle(None, [{"body": _body("vanilla_gradient")}])
    assert reply["method"] == "vanilla_gradient" and reply["shape"] == [1, 32, 32]
    np.testing.assert_allclose(_decode(reply), _grpc_maps(stub, "vanilla_gradient"), atol=1e-6)


def test_in_process_bad_method_is_an_error_row(in_process) -> None:
    class Context:
        def __init__(self) -> None:
            self.statuses: list[tuple[int, str, int]] = []

        def get_request_header(self, idx: int, key: str) -> str:
            return "True"

        def set_response_status(self, code: int, phrase: str, idx: int = 0) -> None:
            self.statuses.append((code, phrase, idx))

    context = Context()
    good, bad = in_process.handle(
        [{"body": _body("vanilla_gradient")}, {"body": _body("no_such_method")}], context
    )
    assert "saliency" in good
    assert bad["code"] == "INVALID_ARGUMENT" and "no_such_method" in bad["error"]
    assert context.statuses == [(400, bad["error"], 1)]


@pytest.fixture(scope="module")
def torchserve(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TorchServeProcess]:
    missing = torchserve_missing()
    if missing:
        pytest.skip(f"TorchServe cannot start here: {missing}")
    workdir = tmp_path_factory.mktemp("torchserve")
    store = workdir / "store"
    mar = archive_package(repository / "tiny" / "1", store)
    assert mar.is_file()
    with TorchServeProcess(store, "tiny=tiny.mar", workdir) as process:
        yield process


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.mark.parametrize(("method", "params", "message"), CASES, ids=[c[0] for c in CASES])
def test_torchserve_explanations_equal_grpc(torchserve, stub, method, params, message) -> None:
    if not _registered(method):
        pytest.skip(f"the {method} handler is not registered in this build")
    status, reply = _post(f"{torchserve.inference_url}/explanations/tiny", _body(method, params))
    assert status == 200, reply
    assert reply["method"] == method
    ours = _grpc_maps(stub, method, message)
    np.testing.assert_allclose(_decode(reply), ours, atol=1e-5)
    assert reply["cost"]["forward_passes"] >= 1


def test_torchserve_predictions_and_errors(torchserve, stub) -> None:
    status, reply = _post(f"{torchserve.inference_url}/predictions/tiny", _body("vanilla_gradient"))
    assert status == 200, reply
    expected = stub.Predict(
        pb.PredictRequest(model="tiny", input=pb.Input(tensor=array_to_tensor(_inputs()))),
        timeout=30,
    )
    assert reply["predictions"][0][0]["index"] == expected.predictions[0].top[0].index
    status, reply = _post(f"{torchserve.inference_url}/explanations/tiny", _body("no_such_method"))
    assert status == 400
    assert "no_such_method" in json.dumps(reply)
