"""--forward-engine openvino: forward passes in bfloat16 on OpenVINO's runtime, checked against
float32 per model; the request's own precision; Cost.precision over gRPC and HTTP; refusals
at start-up and per request."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from saliency_service.core import devices, forward_engine
from saliency_service.evaluation.cells import TEST_CONFIG, generate
from saliency_service.packaging.export import export_package
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.serving.background import RunningServer
from saliency_service.serving.config import Config
from tests.models import TinyCNN

pytest.importorskip("openvino", reason="the [openvino] extra is not installed")

DEMO = Path(__file__).resolve().parents[1] / "models"  # the shipped demo package

SHAPE = (3, 32, 32)
LABELS = ("alpha", "beta", "gamma", "delta")
BFLOAT16 = {"precision": "bfloat16", "forward_engine": "openvino"}
# Every forward-only method, at parameters a test can afford.
FORWARD_METHODS: dict[int, dict[str, Any]] = {
    pb.METHOD_RISE: {"rise": pb.RiseParams(masks=200)},
    pb.METHOD_OCCLUSION: {"occlusion": pb.OcclusionParams(window=16, stride=8)},
    pb.METHOD_DECAM: {"decam": pb.DecamParams(population=16, generations=8)},
    pb.METHOD_SMOE_SCALE: {},
    pb.METHOD_FASTCAM: {},
    pb.METHOD_LOVI: {},
}


@pytest.fixture(autouse=True)
def default_placement() -> Iterator[None]:
    """The placement is the process's: each test leaves the default behind."""
    yield
    devices.configure()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model, the tiny one, and a tiny copy whose manifest allows no logit error
    (so its bfloat16 check fails)."""
    root = tmp_path_factory.mktemp("forward")
    shutil.copytree(DEMO / "demo" / "1", root / "demo" / "1")
    export_package(TinyCNN(len(LABELS)), name="tiny", version=1, input_shape=SHAPE,
                   mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], class_labels=LABELS,
                   repository=root, head="fc")
    strict = root / "strict" / "1"
    shutil.copytree(root / "tiny" / "1", strict)
    manifest = json.loads((strict / "manifest.json").read_text())
    manifest["name"] = "strict"
    manifest.setdefault("verification", {})["bfloat16_max_logit_error"] = 0.0
    (strict / "manifest.json").write_text(json.dumps(manifest))
    return root


def serve(models: Path, **settings: object) -> RunningServer:
    return RunningServer(Config(models=models, host="127.0.0.1", port=0, metrics_port=0,
                                log_level="WARNING", **settings))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def bf16_server(models: Path) -> Iterator[RunningServer]:
    with serve(models, http_port=0, **BFLOAT16) as running:
        yield running
    devices.configure()


@pytest.fixture
def server(bf16_server: RunningServer) -> RunningServer:
    """The bfloat16 server, its placement the process's again (other tests start others)."""
    devices.configure(**BFLOAT16)  # type: ignore[arg-type]
    return bf16_server


@pytest.fixture
def stub(server: RunningServer) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ExplainerStub(channel)


def tiny_input(rows: int = 2) -> pb.Input:
    x = np.random.default_rng(3).normal(size=(rows, *SHAPE)).astype(np.float32)
    return pb.Input(tensor=array_to_tensor(x))


def demo_cells(models: Path, count: int = 4) -> np.ndarray:
    """Demo cells as the demo model takes them (normalized N×C×H×W float32)."""
    manifest = json.loads((models / "demo" / "1" / "manifest.json").read_text())
    size = manifest["input"]["shape"][2]
    images = generate(count, dataclasses.replace(TEST_CONFIG, size=size)).images
    pixels = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    mean = np.asarray(manifest["input"]["mean"], np.float32)[:, None, None]
    std = np.asarray(manifest["input"]["std"], np.float32)[:, None, None]
    return np.ascontiguousarray((pixels - mean) / std, dtype=np.float32)


# ---- start-up ---------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "blocked", "named"), [
    (["--forward-engine", "openvino"], False, "--precision bfloat16 or auto"),
    (["--forward-engine", "tensorflow"], False, "--forward-engine must be one of"),
    (["--forward-engine", "openvino", "--precision", "bfloat16"], True,
     "pip install 'saliency-service[openvino]'"),
])
def test_the_engine_is_refused_at_start_up_in_one_line(tmp_path: Path, flags: list[str],
                                                       blocked: bool, named: str) -> None:
    """What the engine cannot do, or an install without OpenVINO, stops the server before it
    binds, in one line naming the flag or the extra."""
    block = "sys.modules['openvino'] = None; " if blocked else ""
    program = (f"import sys; {block}from saliency_service.cli import main; "
               f"sys.exit(main({['serve', '--models', str(tmp_path), '--port', '0', *flags]!r}))")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert "Traceback" not in done.stderr


# ---- the setting reaches every run ---------------------------------------------------------


class Recording:
    """Counts the runs of a session (its ``run`` replaced by one that counts, then runs)."""

    def __init__(self, session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.runs = 0
        real = session.run

        def run(*args: Any) -> Any:
            self.runs += 1
            return real(*args)

        monkeypatch.setattr(session, "run", run)


@pytest.mark.parametrize("method", [pb.METHOD_UNSPECIFIED, *FORWARD_METHODS])
def test_every_forward_pass_runs_on_the_precision_asked(server: RunningServer,
                                                        stub: pb_grpc.ExplainerStub,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        method: int) -> None:
    """Under --forward-engine openvino every run of a request goes to OpenVINO's bfloat16
    session (none to ONNX Runtime), and a request asking for float32 runs on ONNX Runtime
    alone; Cost.precision says which (METHOD_UNSPECIFIED: Predict)."""
    handle = server.server.repository.get("demo")
    choice = forward_engine.forward_precision(handle)
    assert choice.bfloat16 and isinstance(choice.session, forward_engine.OpenVinoSession)
    onnxruntime = Recording(handle.session, monkeypatch)
    openvino = Recording(choice.session, monkeypatch)
    x = demo_cells(server.server.config.models, 2)
    for precision, used, unused in (("", openvino, onnxruntime),
                                    ("float32", onnxruntime, openvino)):
        used.runs = unused.runs = 0
        request_input = pb.Input(tensor=array_to_tensor(x))
        if method == pb.METHOD_UNSPECIFIED:
            cost = stub.Predict(pb.PredictRequest(model="demo", input=request_input,
                                                  precision=precision), timeout=120).cost
        else:
            reply = stub.Explain(pb.ExplainRequest(
                model="demo", method=method, input=request_input, precision=precision,
                **FORWARD_METHODS[method]), timeout=300)
            cost = reply.cost
            assert reply.diagnostics["precision_bits"] == (16 if used is openvino else 32)
        assert used.runs >= 1 and unused.runs == 0, (precision, used.runs, unused.runs)
        assert cost.precision == ("bfloat16" if used is openvino else "float32")


def test_get_model_says_why_each_model_runs_as_it_does(stub: pb_grpc.ExplainerStub) -> None:
    demo = stub.GetModel(pb.GetModelRequest(model="demo"), timeout=30).metadata
    assert demo["forward_precision"].startswith("bfloat16 on OpenVINO 20"), demo
    assert "top-1 4/4" in demo["forward_precision"] and "map pearson" in demo[
        "forward_precision"]
    strict = stub.GetModel(pb.GetModelRequest(model="strict"), timeout=30).metadata
    assert strict["forward_precision"].startswith(
        "float32 (bfloat16 failed its check: top-1 "), strict


def test_a_model_that_fails_the_check_stays_float32(stub: pb_grpc.ExplainerStub) -> None:
    reply = stub.Predict(pb.PredictRequest(model="strict", input=tiny_input()), timeout=60)
    assert reply.cost.precision == "float32"
    assert stub.Predict(pb.PredictRequest(model="tiny", input=tiny_input()),
                        timeout=60).cost.precision == "bfloat16"
    with pytest.raises(grpc.RpcError) as refused:
        stub.Predict(pb.PredictRequest(model="strict", input=tiny_input(),
                                       precision="bfloat16"), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'strict' stays float32 (bfloat16 failed its check" in refused.value.details()


# ---- agreement ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(FORWARD_METHODS))
def test_bfloat16_maps_agree_with_float32_on_demo_cells(server: RunningServer,
                                                        stub: pb_grpc.ExplainerStub,
                                                        method: int) -> None:
    """The same request at bfloat16 (the server's setting) and float32 (the request's): the
    maps' Pearson correlation is at least 0.99 per image, the predictions agree. DE-CAM's
    search is an evolution whose selections flip where two fitnesses differ by less than
    bfloat16's rounding, and from there it follows another path (as another seed would): its
    median image must agree at 0.99, every image positively."""
    x = demo_cells(server.server.config.models, 4)
    replies = {precision: stub.Explain(pb.ExplainRequest(
        model="demo", method=method, seed=11, input=pb.Input(tensor=array_to_tensor(x)),
        precision=precision, **FORWARD_METHODS[method]), timeout=600)
        for precision in ("float32", "")}
    full, half = replies["float32"], replies[""]
    assert (full.cost.precision, half.cost.precision) == ("float32", "bfloat16")
    assert list(full.targets) == list(half.targets)
    correlations = []
    for a, b in zip(tensor_to_array(full.saliency), tensor_to_array(half.saliency),
                    strict=True):
        assert np.isfinite(b).all()
        if a.std() == 0 and b.std() == 0:  # a flat map (nothing moved the score) both ways
            continue
        correlations.append(float(np.corrcoef(a.ravel(), b.ravel())[0, 1]))
    if method == pb.METHOD_DECAM:
        assert np.median(correlations) >= 0.99 and min(correlations) > 0.5, correlations
    else:
        assert min(correlations) >= 0.99, correlations


def test_the_check_compares_logits_maps_and_scales(server: RunningServer) -> None:
    handle = server.server.repository.get("demo")
    session = forward_engine.forward_precision(handle).session
    passed, summary = forward_engine.bfloat16_check(handle, session)
    assert passed and "scale pearson" in summary, summary

    class Shifted:
        """OpenVINO's session with its logits reversed for half the classes."""

        def run(self, names: list[str], feeds: Any, options: Any = None) -> list[np.ndarray]:
            outputs = session.run(names, feeds, options)  # type: ignore[union-attr]
            outputs[0] = outputs[0][:, ::-1].copy()
            return outputs

    passed, summary = forward_engine.bfloat16_check(handle, Shifted())
    assert not passed and "top-1 " in summary, summary


# ---- the request's precision ----------------------------------------------------------------


def test_a_requested_precision_the_server_lacks_is_refused(models: Path) -> None:
    """INVALID_ARGUMENT naming the flag: bfloat16 forward passes on a float32 server or on
    ONNX Runtime; an unknown value. Gradient methods still take bfloat16 where enabled."""
    for settings, method, flag in (({}, pb.METHOD_UNSPECIFIED, "--precision bfloat16"),
                                   ({"precision": "bfloat16"}, pb.METHOD_RISE,
                                    "--forward-engine openvino"),
                                   ({"precision": "bfloat16"}, pb.METHOD_UNSPECIFIED,
                                    "--forward-engine openvino")):
        with serve(models, **settings) as running, \
                grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                if method == pb.METHOD_UNSPECIFIED:
                    stub.Predict(pb.PredictRequest(model="tiny", input=tiny_input(),
                                                   precision="bfloat16"), timeout=60)
                else:
                    stub.Explain(pb.ExplainRequest(model="tiny", method=method,
                                                   input=tiny_input(), precision="bfloat16"),
                                 timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert flag in refused.value.details(), refused.value.details()
            if settings:
                gradient = stub.Explain(pb.ExplainRequest(
                    model="tiny", method=pb.METHOD_VANILLA_GRADIENT, input=tiny_input(),
                    precision="bfloat16"), timeout=120)
                assert gradient.cost.precision == "bfloat16"
                forced = stub.Explain(pb.ExplainRequest(
                    model="tiny", method=pb.METHOD_VANILLA_GRADIENT, input=tiny_input(),
                    precision="float32"), timeout=120)
                assert forced.cost.precision == "float32"
                assert forced.diagnostics["precision_bits"] == 32
            with pytest.raises(grpc.RpcError) as unknown:
                stub.Predict(pb.PredictRequest(model="tiny", input=tiny_input(),
                                               precision="half"), timeout=60)
            assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "'float32', 'bfloat16' or empty" in unknown.value.details()


def test_http_json_shows_the_precision_and_refuses_clearly(server: RunningServer) -> None:
    x = np.random.default_rng(5).normal(size=(1, *SHAPE)).astype(np.float32)
    source = {"tensor": {"shape": list(x.shape), "dtype": "DTYPE_FLOAT32",
                         "data": base64.b64encode(x.tobytes()).decode()}}
    with httpx.Client(base_url=f"http://127.0.0.1:{server.server.http_port}",
                      timeout=120) as client:
        for precision, expected in (("", "bfloat16"), ("float32", "float32")):
            response = client.post("/api/v1/predict", json={"model": "tiny", "input": source,
                                                             "precision": precision})
            assert response.status_code == 200, response.text
            assert response.json()["cost"]["precision"] == expected
        response = client.post("/api/v1/explain", json={
            "model": "tiny", "method": "METHOD_RISE", "input": source,
            "rise": {"masks": 50}})
        assert response.status_code == 200, response.text
        assert response.json()["cost"]["precision"] == "bfloat16"
        refused = client.post("/api/v1/predict", json={"model": "strict", "input": source,
                                                        "precision": "bfloat16"})
        assert refused.status_code == 400, refused.text
        assert "stays float32" in refused.json()["error"]["message"]
