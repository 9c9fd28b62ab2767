"""The distribution: one top-level package; a client install without torch or ONNX Runtime
that explains against a running server; a server install without torch that serves the
ONNX methods and says which extra the others need."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest

from saliency_service import SaliencyClient
from saliency_service.serving.background import local_server

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo" / "1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=900,
                          **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "--quiet", "-w", str(out), str(ROOT)])
    assert built.returncode == 0, built.stderr
    return next(out.glob("*.whl"))


def fresh_venv(path: Path, requirement: str) -> Path:
    """A new virtual environment with ``requirement`` installed from the package index."""
    made = run([sys.executable, "-m", "venv", str(path)])
    assert made.returncode == 0, made.stderr
    python = path / "bin" / "python"
    installed = run([str(python), "-m", "pip", "install", "--quiet",
                     "--disable-pip-version-check", requirement])
    assert installed.returncode == 0, installed.stderr[-3000:]
    return python


def installed_names(python: Path) -> set[str]:
    listed = run([str(python), "-m", "pip", "list", "--format=freeze"])
    return {line.split("==")[0].lower() for line in listed.stdout.splitlines()}


def test_the_wheel_holds_one_top_level_package_with_its_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        "saliency_service", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "saliency_service/proto/explainer.proto" in names
    assert "saliency_service/protocol/explorer_files/index.html" in names


@pytest.fixture(scope="module")
def served_demo(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    repository = tmp_path_factory.mktemp("repository")
    shutil.copytree(DEMO, repository / "demo" / "1")
    with local_server(repository, http_port=-1) as running:
        yield running


def test_a_client_install_explains_without_torch(wheel: Path, served_demo: object,
                                                 tmp_path: Path) -> None:
    python = fresh_venv(tmp_path / "client", str(wheel))
    names = installed_names(python)
    assert "saliency-service" in names
    assert not names & {"torch", "onnxruntime", "onnx", "opencv-python-headless", "starlette",
                        "scipy", "matplotlib", "pillow"}, names
    address = served_demo.address  # type: ignore[attr-defined]
    script = textwrap.dedent(f"""
        import numpy as np
        from saliency_service import SaliencyClient
        client = SaliencyClient("{address}")
        result = client.explain("demo", "decam", tensor=np.zeros((1, 3, 128, 128), np.float32),
                                seed=1, population=8, generations=2)
        assert result.maps.shape == (1, 128, 128), result.maps.shape
        print("explained", result.response.cost.forward_passes)
    """)
    explained = run([str(python), "-c", script], cwd=tmp_path)
    assert explained.returncode == 0, explained.stderr
    assert explained.stdout.startswith("explained ")
    cli = tmp_path / "client" / "bin" / "saliency"
    models = run([str(cli), "models", "--server", address], cwd=tmp_path)
    assert models.returncode == 0 and "demo" in models.stdout, models.stderr
    serve = run([str(cli), "serve", "--models", str(tmp_path)], cwd=tmp_path)
    assert serve.returncode == 2
    assert "pip install 'saliency-service[server]'" in serve.stderr, serve.stderr
    assert "Traceback" not in serve.stderr


def test_a_server_install_without_torch_serves_the_onnx_methods(wheel: Path,
                                                                tmp_path: Path) -> None:
    python = fresh_venv(tmp_path / "server", f"{wheel}[server]")
    assert "torch" not in installed_names(python)
    repository = tmp_path / "models"
    shutil.copytree(DEMO, repository / "demo" / "1")
    port = free_port()
    server = subprocess.Popen(
        [str(tmp_path / "server" / "bin" / "saliency"), "serve", "--models", str(repository),
         "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
         "--http-port", "-1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": ""})
    try:
        client = SaliencyClient(f"127.0.0.1:{port}", timeout=120)
        grpc.channel_ready_future(client.channel).result(timeout=300)
        info = _ready_model(client)
        offered = {method.name for method in info.methods}
        assert {"decam", "rise", "occlusion", "smoe_scale"} <= offered, offered
        missing = {m.name: m.reason for m in info.unavailable_methods}
        assert "vanilla_gradient" in missing and "gradcam" in missing, missing
        assert "pip install 'saliency-service[torch]'" in missing["vanilla_gradient"]
        result = client.explain("demo", "rise", tensor=np.zeros((1, 3, 128, 128), np.float32),
                                seed=1, masks=64)
        assert result.maps.shape == (1, 128, 128)
        assert np.isfinite(result.maps).all()
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=60)
    assert "Traceback" not in output, output[-3000:]


def _ready_model(client: SaliencyClient):  # noqa: ANN202
    """GetModel once the model is ready (the server warms it up after it starts listening)."""
    import time  # noqa: PLC0415

    for _ in range(600):
        try:
            info = client.get_model("demo")
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                raise
        else:
            if info.status.ready:
                return info
        time.sleep(0.5)
    raise AssertionError("the model never became ready")
