"""--device, --onnx-providers and --precision: refusals at start-up, the setting reaching every
ONNX Runtime session and torch program, and bfloat16 gradients checked against float32."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch

from saliency_service.core import devices, onnx_external
from saliency_service.evaluation.metrics import OnnxClassifier
from saliency_service.methods._utils.torch_program import (
    FAST,
    TRUNK,
    bfloat16_check,
    prepared_module,
)
from saliency_service.packaging import export
from saliency_service.packaging.export import export_package
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.serving.background import RunningServer
from saliency_service.serving.config import Config
from tests.models import TinyCNN

SHAPE = (3, 32, 32)
LABELS = ("alpha", "beta", "gamma", "delta")
# A provider every onnxruntime wheel has beside the CPU's, so a non-default list is visible.
PROVIDERS = "AzureExecutionProvider,CPUExecutionProvider"


@pytest.fixture(autouse=True)
def default_placement() -> Iterator[None]:
    """The placement is the process's: each test leaves the default behind."""
    yield
    devices.configure()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, and a copy whose manifest asks a bfloat16 check it cannot pass."""
    root = tmp_path_factory.mktemp("placement")
    export_package(TinyCNN(len(LABELS)), name="tiny", version=1, input_shape=SHAPE,
                   mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], class_labels=LABELS,
                   repository=root, head="fc")
    strict = root / "strict" / "1"
    shutil.copytree(root / "tiny" / "1", strict)
    manifest = json.loads((strict / "manifest.json").read_text())
    manifest["name"] = "strict"
    manifest.setdefault("verification", {})["bfloat16_min_pearson"] = 1.0
    (strict / "manifest.json").write_text(json.dumps(manifest))
    return root


def serve(models: Path, **settings: object) -> RunningServer:
    return RunningServer(Config(models=models, host="127.0.0.1", port=0, metrics_port=0,
                                log_level="WARNING", **settings))  # type: ignore[arg-type]


@pytest.mark.parametrize(("flags", "named", "status"), [
    (["--device", "cuda"], "--device cuda", 2),
    (["--device", "cuda:1"], "--device cuda:1", 2),
    (["--device", "gpu"], "--device", 2),
    (["--onnx-providers", "TensorrtExecutionProvider"], "TensorrtExecutionProvider", 2),
    (["--onnx-providers", "NoSuchExecutionProvider"], "not a provider name", 2),
    (["--precision", "float8"], "precision", 1),  # as every invalid configuration value
])
def test_what_the_machine_lacks_is_refused_in_one_line(tmp_path: Path, flags: list[str],
                                                       named: str, status: int) -> None:
    done = subprocess.run([sys.executable, "-m", "saliency_service", "serve", "--models",
                           str(tmp_path), "--port", "0", *flags],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_the_device_sets_the_default_providers() -> None:
    assert devices.placement("cpu").providers == ("CPUExecutionProvider",)
    assert devices.placement("cpu", "AzureExecutionProvider, CPUExecutionProvider"
                             ).providers == ("AzureExecutionProvider", "CPUExecutionProvider")
    with pytest.raises(devices.PlacementRefused, match="--device cuda"):
        devices.placement("cuda")  # no CUDA device on a CPU test machine
    cuda = devices.Placement("cuda:1", ("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert cuda.session_providers() == [("CUDAExecutionProvider", {"device_id": 1}),
                                        "CPUExecutionProvider"]


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    with_amx = tmp_path / "amx"
    with_amx.write_text("processor : 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    without = tmp_path / "plain"
    without.write_text("processor : 0\nflags\t\t: fpu sse avx2\n")
    assert devices.cpu_has_bf16(with_amx) and not devices.cpu_has_bf16(without)


def test_the_providers_reach_every_session(models: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    with serve(models, onnx_providers=PROVIDERS) as running:
        handle = running.server.repository.get("tiny")
        assert handle.session.get_providers() == PROVIDERS.split(",")
        module = prepared_module(handle, FAST)  # the torch device follows --device
        assert module.device == torch.device(devices.torch_device()) == torch.device("cpu")
        assert all(p.device == module.device for p in module.graph_module.parameters())
    package = models / "tiny" / "1"
    # Import's test runs and randomized packages go through onnx_external.session.
    model_bytes = (package / "model.onnx").read_bytes()
    assert onnx_external.session(model_bytes, {}).get_providers() == PROVIDERS.split(",")
    assert OnnxClassifier.from_package(package).session.get_providers() == PROVIDERS.split(",")
    created: list[list[str]] = []
    real = ort.InferenceSession

    def recording(*args: object, **kwargs: object) -> ort.InferenceSession:
        session = real(*args, **kwargs)  # type: ignore[arg-type]
        created.append(session.get_providers())
        return session

    monkeypatch.setattr(export.ort, "InferenceSession", recording)
    export_package(TinyCNN(len(LABELS)), name="again", version=1, input_shape=SHAPE,
                   mean=[0.5] * 3, std=[0.25] * 3, class_labels=LABELS,
                   repository=models.parent / "again", head="fc")
    assert created and all(providers == PROVIDERS.split(",") for providers in created)


def explain(stub: pb_grpc.ExplainerStub, model: str, method: int,
            **params: object) -> pb.ExplainResponse:
    x = np.random.default_rng(3).normal(size=(2, *SHAPE)).astype(np.float32)
    request = pb.ExplainRequest(model=model, method=method, return_raw=True, seed=5,
                                input=pb.Input(tensor=array_to_tensor(x)), **params)
    return stub.Explain(request, timeout=120)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_bfloat16_gradients_agree_with_float32_and_say_so(models: Path) -> None:
    integrated = {"integrated_gradients": pb.IntegratedGradientsParams(steps=8)}
    replies = {}
    for precision in ("float32", "bfloat16"):
        with serve(models, precision=precision) as running, \
                grpc.insecure_channel(running.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            replies[precision] = (explain(stub, "tiny", pb.METHOD_VANILLA_GRADIENT),
                                  explain(stub, "tiny", pb.METHOD_INTEGRATED_GRADIENTS,
                                          **integrated),
                                  explain(stub, "tiny", pb.METHOD_GRADCAM),
                                  stub.GetModel(pb.GetModelRequest(model="tiny"), timeout=30))
    for full, half in zip(replies["float32"][:3], replies["bfloat16"][:3], strict=True):
        assert full.diagnostics["precision_bits"] == 32
        assert half.diagnostics["precision_bits"] == 16
        assert pearson(tensor_to_array(full.raw), tensor_to_array(half.raw)) >= 0.98
        raw = tensor_to_array(half.raw)
        assert raw.dtype == np.float32 and np.isfinite(raw).all()
    assert replies["float32"][3].metadata["precision"] == "float32"
    assert replies["bfloat16"][3].metadata["precision"].startswith("bfloat16 (pearson")


def test_a_model_that_fails_the_check_stays_float32(models: Path) -> None:
    with serve(models, precision="bfloat16") as running, \
            grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        reply = explain(stub, "strict", pb.METHOD_VANILLA_GRADIENT)
        info = stub.GetModel(pb.GetModelRequest(model="strict"), timeout=30)
        assert reply.diagnostics["precision_bits"] == 32
        assert info.metadata["precision"].startswith(
            "float32 (bfloat16 failed its check: pearson 0.")
        handle = running.server.repository.get("strict")
        assert not prepared_module(handle, FAST).bfloat16
        assert explain(stub, "tiny", pb.METHOD_VANILLA_GRADIENT).diagnostics[
            "precision_bits"] == 16
        assert prepared_module(running.server.repository.get("tiny"), TRUNK).bfloat16


def test_the_check_compares_gradients_and_classes(models: Path) -> None:
    with serve(models) as running:
        module = prepared_module(running.server.repository.get("tiny"), FAST)
        inputs = torch.from_numpy(np.random.default_rng(1).normal(
            size=(3, *SHAPE)).astype(np.float32))
        passed, summary = bfloat16_check(module, inputs)
        assert passed and summary.endswith("top-1 3/3"), summary
        assert not bfloat16_check(module, inputs, min_pearson=1.0)[0]


def output_and_gradient(run: Callable[[torch.Tensor], Any], inputs: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first output of ``run`` and the input gradient of its first column's sum."""
    leaf = inputs.clone().requires_grad_(True)
    out = run(leaf)
    logits = (out[0] if isinstance(out, tuple | list) else out).float()
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), leaf)
    return logits.detach(), grad


def graph_run(graph_module: torch.nn.Module, bfloat16: bool) -> Callable[[torch.Tensor], Any]:
    """``graph_module`` on channels-last inputs, under bfloat16 autocast or not."""
    def run(leaf: torch.Tensor) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            return graph_module(leaf.contiguous(memory_format=torch.channels_last))
    return run


def test_bfloat16_weights_are_cast_once_and_change_no_result(models: Path) -> None:
    """The bfloat16 variant keeps bfloat16 copies of the weights only autocast's bfloat16
    operators read: its outputs and input gradients equal autocast over the float32 weights
    exactly, a float32 request still runs on the float32 weights, and the trunk (which
    shares the fast variant's weights with its float32 stem) keeps the stem float32."""
    with serve(models, precision="bfloat16") as running:
        handle = running.server.repository.get("tiny")
        inputs = torch.from_numpy(np.random.default_rng(2).normal(
            size=(3, *SHAPE)).astype(np.float32))
        for variant in (FAST, TRUNK):
            module = prepared_module(handle, variant)
            x = module.stem(inputs) if variant == TRUNK else inputs
            assert module.bfloat16
            half = module.bfloat16_module()
            assert torch.bfloat16 in {t.dtype for t in half.state_dict().values()}
            assert {t.dtype for t in module.graph_module.state_dict().values()} == {
                torch.float32}
            expected = output_and_gradient(graph_run(module.graph_module, True), x)
            got = output_and_gradient(module, x)
            assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
            with devices.requested("float32"):
                full = output_and_gradient(module, x)
            assert not torch.equal(full[0], got[0])
            reference = output_and_gradient(graph_run(module.graph_module, False), x)
            assert torch.equal(full[0], reference[0]) and torch.equal(full[1], reference[1])
        stem = prepared_module(handle, TRUNK).stem
        assert stem is not None and stem.weight.dtype == torch.float32
        # The trunk runs on the fast variant's weights, and on its bfloat16 copies too.
        fast_copies = {t.data_ptr() for t in prepared_module(handle, FAST).bfloat16_module()
                       .state_dict().values() if t.dtype == torch.bfloat16}
        trunk_copies = {t.data_ptr() for t in prepared_module(handle, TRUNK).bfloat16_module()
                        .state_dict().values() if t.dtype == torch.bfloat16}
        assert trunk_copies and trunk_copies <= fast_copies


def test_a_weight_read_outside_autocasts_operators_stays_float32() -> None:
    """Two get_attr nodes of one weight, one read by ``mm`` and one by ``add``: the weight
    stays float32 (the add would otherwise change), and a graph calling a submodule is left
    as it is."""
    from torch import fx  # noqa: PLC0415

    from saliency_service.methods._utils.torch_program import bfloat16_graph  # noqa: PLC0415

    root = torch.nn.Module()
    root.weight = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    root.other = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
    graph = fx.Graph()
    x = graph.placeholder("x")
    first, second = graph.get_attr("weight"), graph.get_attr("weight")
    other = graph.get_attr("other")
    shifted = graph.call_function(torch.ops.aten.add.Tensor, (x, first))
    product = graph.call_function(torch.ops.aten.mm.default, (x, second))
    graph.output((graph.call_function(torch.ops.aten.mm.default, (product, other)), shifted))
    module = fx.GraphModule(root, graph)
    half = bfloat16_graph(module)
    assert half.weight.dtype == torch.float32 and half.other.dtype == torch.bfloat16
    inputs = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = module(inputs), half(inputs)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    traced = fx.symbolic_trace(Wrapped())
    assert bfloat16_graph(traced) is traced


def autocast_cases() -> dict[str, Callable[[Callable[[torch.Tensor], torch.Tensor]], Any]]:
    """Each operator whose weights are kept in bfloat16, called with the weight passed
    through the given function."""
    aten = torch.ops.aten
    image, volume, line = torch.randn(1, 2, 5, 5), torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 5)
    rows, stacked = torch.randn(2, 4), torch.randn(2, 2, 4)
    return {
        "conv1d": lambda w: aten.conv1d.default(line, w(torch.randn(3, 2, 3))),
        "conv2d": lambda w: aten.conv2d.default(image, w(torch.randn(3, 2, 3, 3))),
        "conv3d": lambda w: aten.conv3d.default(volume, w(torch.randn(3, 2, 2, 2, 2))),
        "conv_transpose1d": lambda w: aten.conv_transpose1d.default(line,
                                                                    w(torch.randn(2, 3, 3))),
        "conv_transpose2d": lambda w: aten.conv_transpose2d.input(image,
                                                                  w(torch.randn(2, 3, 3, 3))),
        "conv_transpose3d": lambda w: aten.conv_transpose3d.input(volume,
                                                                  w(torch.randn(2, 3, 2, 2, 2))),
        "linear": lambda w: aten.linear.default(rows, w(torch.randn(3, 4))),
        "matmul": lambda w: aten.matmul.default(rows, w(torch.randn(4, 3))),
        "mm": lambda w: aten.mm.default(rows, w(torch.randn(4, 3))),
        "bmm": lambda w: aten.bmm.default(stacked, w(torch.randn(2, 4, 3))),
        "addmm": lambda w: aten.addmm.default(torch.randn(3), rows, w(torch.randn(4, 3))),
        "baddbmm": lambda w: aten.baddbmm.default(torch.randn(2, 2, 3), stacked,
                                                  w(torch.randn(2, 4, 3))),
        "addbmm": lambda w: aten.addbmm.default(torch.randn(2, 3), stacked,
                                                w(torch.randn(2, 4, 3))),
    }


def test_every_operator_given_bfloat16_weights_is_one_autocast_casts() -> None:
    """A listed operator that CPU autocast left in float32 would fail on a bfloat16 weight
    (as ``aten.convolution`` does): each one, given its weight in bfloat16, computes in
    bfloat16 exactly what autocast computes from the float32 weight."""
    from saliency_service.methods._utils.torch_program import (  # noqa: PLC0415
        _BFLOAT16_OPERATORS,
    )

    cases = autocast_cases()
    assert {packet.__name__ for packet in _BFLOAT16_OPERATORS} == set(cases)
    for name, call in cases.items():
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = call(lambda weight: weight)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call(lambda weight: weight.to(torch.bfloat16))
        assert got.dtype == torch.bfloat16 and torch.equal(expected, got), name
