"""The KServe explainer contract: ``saliency serve`` started with the arguments KServe's
controller appends to a custom ``explainer:`` container explains the InferenceService's
predictor (KServe's own ModelServer here, serving an ONNX file over V1 REST, V2 REST and
V2 gRPC) at ``POST /v1/models/{name}:explain``, equal to the local explanation of the same
ONNX file with the same seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from saliency_service.cli import build_parser
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.serving import config as config_module
from tests.conftest import RunningServer, make_config
from tests.kserve_env import run_in_kserve
from tests.onnx_models import small_cnn, write_package
from tests.test_remote_models import free_port, start_predictor, stop

SIZE = 32
NAME = "flowers"  # the InferenceService's name: the model's name on the predictor too
LABELS = ("daisy", "rose", "tulip")
DECAM = {"grid": 4, "population": 8, "generations": 3}
SEED = 7
# What the InferenceService's container spec says (the protocol) and what the controller
# appends after it (``explainer_custom.go``: --model_name, --predictor_host, --http_port,
# --workers), by the predictor's protocol.
PROTOCOL_ARGS = {"v1": ["--predictor_input_shape", f"3,{SIZE},{SIZE}"],
                 "v2": ["--predictor_protocol", "v2"],
                 "grpc-v2": ["--predictor_protocol", "grpc-v2"]}


def controller_args(host: str, http_port: int) -> list[str]:
    return ["--model_name", NAME, "--predictor_host", host, "--http_port", str(http_port),
            "--workers", "2"]


class Explainer:
    """``saliency serve`` in its own process, as KServe's explainer container runs it:
    ``args`` from the container spec, then what the controller appends."""

    def __init__(self, args: list[str], host: str, log: Path, models: Path) -> None:
        self.http_port = free_port()
        self.log = log
        self.url = f"http://127.0.0.1:{self.http_port}"
        env = {**os.environ, "SALIENCY_HOST": "127.0.0.1", "SALIENCY_PORT": "0",
               "SALIENCY_METRICS_PORT": "-1", "SALIENCY_MODELS": str(models),
               "SALIENCY_LOG_FORMAT": "text"}
        with log.open("w") as output:  # a file, not a pipe: nothing reads it meanwhile
            self.process = subprocess.Popen(
                [sys.executable, "-m", "saliency_service", "serve", *args,
                 *controller_args(host, self.http_port)],
                stdout=output, stderr=output, env=env)

    def wait_ready(self, timeout: float = 180) -> None:
        """Until KServe's readiness route says the model is ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the explainer exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models/{NAME}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the explainer was not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        stop(self.process)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """KServe's ModelServer serving the ONNX file, and a local server with the same file."""
    folder = tmp_path_factory.mktemp("kserve_explainer")
    model = small_cnn(classes=len(LABELS), size=SIZE)
    local = write_package(model, folder / "models", NAME, mean=(0.0,) * 3, std=(1.0,) * 3,
                          labels=LABELS)
    predictor, urls = start_predictor(local / "model.onnx", NAME)
    running = RunningServer(make_config(folder / "models")).start()
    yield {"folder": folder, "urls": urls, "local": running}
    running.stop()
    stop(predictor)


def instances(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(3).normal(size=(batch, 3, SIZE, SIZE)).astype(np.float32)


def local_maps(server: RunningServer, batch: np.ndarray) -> tuple[np.ndarray, list[int]]:
    with grpc.insecure_channel(server.address) as channel:
        answer = pb_grpc.ExplainerStub(channel).Explain(pb.ExplainRequest(
            model=NAME, input=pb.Input(tensor=array_to_tensor(batch)), seed=SEED,
            method=pb.METHOD_DECAM, decam=pb.DecamParams(**DECAM)), timeout=120)
    return tensor_to_array(answer.saliency), list(answer.targets)


def start_explainer(setup: dict[str, Any], protocol: str) -> Explainer:
    """The explainer of the predictor over ``protocol``, once ready."""
    urls = setup["urls"]
    host = urls["grpc"] if protocol == "grpc-v2" else urls["http"].removeprefix("http://")
    explainer = Explainer([*PROTOCOL_ARGS[protocol], "--predictor_labels", ",".join(LABELS)],
                          host, setup["folder"] / f"explainer-{protocol}.log",
                          setup["folder"] / "none")
    explainer.wait_ready()
    return explainer


@pytest.mark.parametrize("protocol", sorted(PROTOCOL_ARGS))
def test_explainer_explains_the_predictor_as_the_local_model(setup: dict[str, Any],
                                                             protocol: str) -> None:
    batch = instances()
    expected, targets = local_maps(setup["local"], batch)
    explainer = start_explainer(setup, protocol)
    try:
        assert httpx.get(explainer.url + "/", headers={"accept": "application/json"},
                         timeout=10).json() == {"status": "alive"}
        answer = httpx.post(
            f"{explainer.url}/v1/models/{NAME}:explain",
            json={"instances": batch.tolist(), "method": "decam", "parameters": DECAM,
                  "seed": SEED}, timeout=120)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        maps = np.asarray([e["saliency"] for e in body["explanations"]], dtype=np.float32)
        assert maps.shape == expected.shape
        assert np.abs(maps - expected).max() <= 1e-5
        assert [e["target"] for e in body["explanations"]] == targets
        assert [p["label"] for p in body["predictions"]] == [LABELS[t] for t in targets]
        assert body["cost"]["method"] == "METHOD_DECAM"
    finally:
        explainer.stop()


def test_kserve_sdk_calls_the_explainer(setup: dict[str, Any]) -> None:
    """KServe's own REST client: readiness, then ``explain`` with the instances alone (the
    server picks the method)."""
    explainer = start_explainer(setup, "v2")
    try:
        result = run_in_kserve(f"""
            import asyncio, json
            from kserve import InferenceRESTClient
            async def main():
                client = InferenceRESTClient()
                ready = await client.is_model_ready({explainer.url!r}, {NAME!r})
                answer = await client.explain({explainer.url!r}, {NAME!r},
                                              {{"instances": {instances(1).tolist()!r}}},
                                              timeout=120)
                print(json.dumps({{"ready": ready, "answer": answer}}))
            asyncio.run(main())
            """)
        assert result.returncode == 0, result.stderr[-2000:]
        out = json.loads(result.stdout.strip().splitlines()[-1])
        assert out["ready"] is True
        (explanation,) = out["answer"]["explanations"]
        assert np.asarray(explanation["saliency"]).shape == (SIZE, SIZE)
        assert out["answer"]["predictions"][0]["label"] in LABELS
    finally:
        explainer.stop()


def parsed(*args: str) -> config_module.Config:
    return config_module.from_sources(build_parser().parse_args(["serve", *args]), environ={})


def test_kserve_flags_map_onto_settings() -> None:
    config = parsed("--model_name", "m", "--predictor_host", "m-predictor.default",
                    "--http_port", "8080", "--workers", "3", "--grpc_port", "9000",
                    "--predictor_protocol", "grpc-v2", "--predictor_use_ssl", "true",
                    "--enable_docs_url", "false", "--enable_predictor_health_check",
                    "--max_threads", "4")
    assert (config.http_port, config.max_inflight, config.port) == (8080, 3, 9000)
    assert config.predictor_use_ssl and config.predictor_protocol == "grpc-v2"
    assert config.extra["kserve_ignored"] == ["--enable_docs_url false",
                                              "--enable_predictor_health_check",
                                              "--max_threads 4"]
    from saliency_service.serving.kserve_explainer import remote_spec  # noqa: PLC0415

    spec = remote_spec(config)
    assert (spec.url, spec.secure, spec.model) == ("m-predictor.default:443", True, "m")
    assert remote_spec(parsed("--model_name", "m", "--predictor_host", "p.ns",
                              "--predictor_protocol", "v2")).url == "http://p.ns"


def test_v1_predictor_without_a_shape_is_a_start_up_error_naming_the_flag() -> None:
    with pytest.raises(SystemExit, match="add --predictor_input_shape C,H,W"):
        parsed("--model_name", "m", "--predictor_host", "p.ns", "--http_port", "8080")
    with pytest.raises(SystemExit, match="predictor_protocol must be one of v1, v2, grpc-v2"):
        parsed("--model_name", "m", "--predictor_host", "p.ns", "--predictor_protocol", "v3")


def test_zero_workers_names_kserves_flag() -> None:
    """``containerConcurrency: 0`` reaches the server as ``--workers 0``: the message says
    where the value came from."""
    with pytest.raises(SystemExit, match="KServe's --workers, from containerConcurrency"):
        parsed("--workers", "0")
