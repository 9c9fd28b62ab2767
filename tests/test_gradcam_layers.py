"""Grad-CAM at a layer the client names (pytorch-grad-cam's ``target_layers``): any N×C×H×W
tensor of the package's ONNX graph, by tensor name, producing node or PyTorch module path.

A real server explains a package made by ``saliency export`` and an ONNX file brought in with
``saliency import``; Grad-CAM and Grad-CAM++ at layers that are neither the default nor a scale
must equal pytorch-grad-cam on the same PyTorch module to 1e-4 after dividing each by its
maximum. The exporter folds each BatchNorm into the convolution before it, so a convolution's
node holds what that BatchNorm's module returns.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import pytest
import torch
from google.protobuf import json_format
from torch import nn

from saliency_service.methods._utils import layer_program
from saliency_service.methods._utils.layer_program import MAX_LAYER_MODULES, layer_modules
from saliency_service.packaging.export import export_package
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.serving.background import RunningServer
from tests.conftest import make_config, run_cli
from tests.models import BasicBlock, TinyCNN
from tests.peer_grad_cam import import_pytorch_grad_cam

CAM_TOLERANCE = 1e-4
SIZE = 16
LABELS = ("a", "b", "c", "d")


class ResNet(nn.Module):
    """Stem, one block at 16×16, two at 8×8, global average pool, linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1, shared_relu=True))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2, shared_relu=True),
                                    BasicBlock(16, 16, 1, shared_relu=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, len(LABELS))
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layer2(self.layer1(self.stem(x)))).flatten(1))


class WithAux(nn.Module):
    """TinyCNN with a second, auxiliary output the class scores do not depend on."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN(num_classes=len(LABELS))
        self.aux = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.net
        middle = net.layer2(net.layer1(x))
        logits = net.fc(net.pool(net.layer3(middle)).flatten(1))
        return logits, self.aux(middle)


class SplitNet(nn.Module):
    """One convolution's channels split in two (an ONNX Split: a node with two outputs)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 8, 3, 2, 1)
        self.fc = nn.Linear(8, len(LABELS))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.relu(self.conv1(x)).split([4, 4], dim=1)
        return self.fc(torch.relu(self.conv2(left * right.sigmoid())).mean((2, 3)))


def onnx_file(module: nn.Module, path: Path, outputs: list[str], dynamo: bool = False) -> Path:
    """``module`` as a plain ``torch.onnx.export`` writes it (another tool's file): node names
    carry the module scopes, or (``dynamo``, batch fixed at 1) each node's metadata does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, (torch.randn(1, 3, SIZE, SIZE),), str(path),
                              input_names=["image"], output_names=outputs, opset_version=18,
                              dynamo=True, external_data=False, verbose=False)
        else:
            torch.onnx.export(module, (torch.randn(1, 3, SIZE, SIZE),), str(path),
                              input_names=["image"], output_names=outputs,
                              dynamic_axes={"image": {0: "n"}, **{o: {0: "n"} for o in outputs}},
                              opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared machine: a second torch thread only waits on the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {"resnet": ResNet(), "tiny": TinyCNN(num_classes=len(LABELS)), "aux": WithAux(),
            "split": SplitNet()}


@pytest.fixture(scope="module")
def repository(models: dict[str, nn.Module], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layers")
    export_package(models["resnet"], name="resnet", version=1, input_shape=(3, SIZE, SIZE),
                   mean=[0.5] * 3, std=[0.25] * 3, class_labels=LABELS, repository=root)
    files = tmp_path_factory.mktemp("onnx")
    tiny = onnx_file(models["tiny"], files / "tiny.onnx", ["scores"])
    aux = onnx_file(models["aux"], files / "aux.onnx", ["scores", "aux"])
    scoped = onnx_file(models["tiny"], files / "scoped.onnx", ["scores"], dynamo=True)
    split = onnx_file(models["split"], files / "split.onnx", ["scores"])
    for name, source, extra in (
            ("tiny", tiny, ()), ("tiny_cam", tiny, ("--cam-layer", "/layer2/conv/Conv")),
            ("scoped", scoped, ("--cam-layer", "layer2.bn")),
            ("aux", aux, ("--output-name", "scores")), ("split", split, ())):
        code, _, err = run_cli("import", str(source), "--name", name, "--models", str(root),
                               "--labels", ",".join(LABELS), "--output", "logits", *extra)
        assert code == 0, err
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(make_config(repository, http_port=0)).start(timeout=600)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ExplainerStub(channel)


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(3).normal(
        size=(2, 3, SIZE, SIZE)).astype(np.float32))


@pytest.fixture(scope="module")
def library():  # noqa: ANN201 - the pytorch_grad_cam module and its target class
    return import_pytorch_grad_cam()


def request(model: str, method: str, x: torch.Tensor, layer: str,
            targets: list[int]) -> pb.ExplainRequest:
    message = pb.ExplainRequest(model=model, method=pb.Method.Value(f"METHOD_{method.upper()}"),
                                input=pb.Input(tensor=array_to_tensor(x.numpy())),
                                target=pb.Target(per_item=pb.ClassIndices(indices=targets)))
    getattr(message, method).layer = layer
    return message


def served(stub: pb_grpc.ExplainerStub, model: str, method: str, x: torch.Tensor, layer: str,
           targets: list[int]) -> np.ndarray:
    reply = stub.Explain(request(model, method, x, layer, targets), timeout=300)
    return tensor_to_array(reply.saliency)


def peer(library, module: nn.Module, method: str, layer: str,  # noqa: ANN001
         x: torch.Tensor, targets: list[int]) -> np.ndarray:
    """pytorch-grad-cam at ``module``'s submodule ``layer``."""
    cams, target_class = library
    kind = {"gradcam": cams.GradCAM, "gradcam_plus_plus": cams.GradCAMPlusPlus}[method]
    module = copy.deepcopy(module)  # its backward fills the parameters' .grad
    with kind(model=module, target_layers=[module.get_submodule(layer)]) as cam:
        return cam(input_tensor=x, targets=[target_class(t) for t in targets])


def assert_same_cam(mine: np.ndarray, theirs: np.ndarray) -> None:
    """Equal to 1e-4 once each image's map is divided by its maximum."""
    assert mine.shape == theirs.shape
    for ours, peers in zip(mine, theirs, strict=True):
        assert ours.max() > 0 and peers.max() > 0
        np.testing.assert_allclose(ours / ours.max(), peers / peers.max(),
                                   atol=CAM_TOLERANCE, rtol=0)


# ---- the layer a client names equals pytorch-grad-cam's target layer -----------------------


EXPORTED = [  # (layer as the client names it, the PyTorch submodule it is)
    ("layer2.0", "layer2.0"),  # a module path: its last node is the block's second ReLU
    ("stem", "stem"),  # the stem's ReLU, at the scale layer1 ends
    ("/layer2/layer2.1/conv1/Conv", "layer2.1.bn1"),  # a node: the folded BatchNorm's output
    ("/layer1/layer1.0/relu/Relu_output_0", "layer1.0.relu"),  # a tensor: the first call
]


@pytest.mark.parametrize("method", ["gradcam", "gradcam_plus_plus"])
@pytest.mark.parametrize(("layer", "module"), EXPORTED)
def test_exported_package_at_a_named_layer_equals_pytorch_grad_cam(
        stub: pb_grpc.ExplainerStub, models: dict[str, nn.Module], inputs: torch.Tensor,
        library, layer: str, module: str, method: str) -> None:  # noqa: ANN001
    info = stub.GetModel(pb.GetModelRequest(model="resnet"), timeout=60)
    assert layer not in (info.cam_layer, *info.scale_outputs)
    targets = [0, 2]
    assert_same_cam(served(stub, "resnet", method, inputs, layer, targets),
                    peer(library, models["resnet"], method, module, inputs, targets))


@pytest.mark.parametrize("method", ["gradcam", "gradcam_plus_plus"])
@pytest.mark.parametrize(("layer", "module"), [("/layer2/conv/Conv", "layer2.bn"),
                                               ("layer3.conv", "layer3.bn"),
                                               ("layer1", "layer1")])
def test_imported_onnx_at_a_named_layer_equals_pytorch_grad_cam(
        stub: pb_grpc.ExplainerStub, models: dict[str, nn.Module], inputs: torch.Tensor,
        library, layer: str, module: str, method: str) -> None:  # noqa: ANN001
    targets = [1, 3]
    assert_same_cam(served(stub, "tiny", method, inputs, layer, targets),
                    peer(library, models["tiny"], method, module, inputs, targets))


def test_module_paths_from_node_metadata_equal_pytorch_grad_cam(
        stub: pb_grpc.ExplainerStub, repository: Path, models: dict[str, nn.Module],
        inputs: torch.Tensor, library) -> None:  # noqa: ANN001
    """The ``torch.export``-based exporter names nodes ``node_Conv_55`` and keeps the module
    paths in ``pkg.torch.onnx.name_scopes``; its BatchNorm folds into the convolution too."""
    graph = onnx.load(str(repository / "scoped" / "1" / "model.onnx")).graph
    assert not any(node.name.startswith("/") for node in graph.node)
    manifest = json.loads((repository / "scoped" / "1" / "manifest.json").read_text())
    node = next(n for n in graph.node if n.name == manifest["cam_layer"])
    assert "'layer2.bn'" in next(p.value for p in node.metadata_props
                                 if p.key == "pkg.torch.onnx.name_scopes")
    for layer in ("", "layer3.bn"):  # the imported default, and one named here
        for index in range(2):  # the graph takes one image at a time
            assert_same_cam(
                served(stub, "scoped", "gradcam", inputs[index:index + 1], layer, [3]),
                peer(library, models["tiny"], "gradcam", layer or "layer2.bn",
                     inputs[index:index + 1], [3]))


@pytest.mark.parametrize("layer", ["conv1", "/relu/Relu"])
def test_a_layer_before_a_split_equals_pytorch_grad_cam(
        stub: pb_grpc.ExplainerStub, repository: Path, models: dict[str, nn.Module],
        inputs: torch.Tensor, library, layer: str) -> None:  # noqa: ANN001
    """The scores reach the convolution through both outputs of one Split node."""
    graph = onnx.load(str(repository / "split" / "1" / "model.onnx")).graph
    assert "Split" in {node.op_type for node in graph.node}
    module = {"conv1": "conv1", "/relu/Relu": "relu"}[layer]
    assert_same_cam(served(stub, "split", "gradcam", inputs, layer, [1, 2]),
                    peer(library, models["split"], "gradcam", module, inputs, [1, 2]))


@pytest.mark.parametrize("method", ["xgradcam", "guided_gradcam"])
def test_every_cam_method_takes_a_named_layer(stub: pb_grpc.ExplainerStub,
                                              inputs: torch.Tensor, method: str) -> None:
    at_layer = served(stub, "resnet", method, inputs, "layer2.0", [0, 2])
    default = served(stub, "resnet", method, inputs, "", [0, 2])
    assert at_layer.shape == default.shape and at_layer.max() > 0
    assert not np.allclose(at_layer, default)


def test_a_scale_named_by_its_node_is_that_scale(stub: pb_grpc.ExplainerStub,
                                                 inputs: torch.Tensor) -> None:
    info = stub.GetModel(pb.GetModelRequest(model="resnet"), timeout=60)
    by_module = served(stub, "resnet", "gradcam", inputs, "layer2", [1, 1])
    by_output = served(stub, "resnet", "gradcam", inputs, info.scale_outputs[-1], [1, 1])
    by_node = served(stub, "resnet", "gradcam", inputs, "/layer2/layer2.1/relu_1/Relu", [1, 1])
    np.testing.assert_array_equal(by_module, by_output)
    np.testing.assert_array_equal(by_node, by_output)


def test_import_cam_layer_is_the_default_layer(
        stub: pb_grpc.ExplainerStub, repository: Path, models: dict[str, nn.Module],
        inputs: torch.Tensor, library) -> None:  # noqa: ANN001
    manifest = json.loads((repository / "tiny_cam" / "1" / "manifest.json").read_text())
    assert manifest["cam_layer"] == "/layer2/conv/Conv"
    assert manifest["cam_output"] in manifest["outputs"]["scales"]
    plain = json.loads((repository / "tiny" / "1" / "manifest.json").read_text())
    assert plain["cam_layer"] == "/layer3/relu/Relu"
    info = stub.GetModel(pb.GetModelRequest(model="tiny_cam"), timeout=60)
    assert info.cam_layer == "/layer2/conv/Conv"
    assert_same_cam(served(stub, "tiny_cam", "gradcam", inputs, "", [0, 3]),
                    peer(library, models["tiny"], "gradcam", "layer2.bn", inputs, [0, 3]))


def test_export_cam_layer_may_be_a_module_inside_a_scale(tmp_path: Path) -> None:
    export_package(ResNet(), name="inner", version=1, input_shape=(3, SIZE, SIZE),
                   mean=[0.5] * 3, std=[0.25] * 3, class_labels=LABELS, repository=tmp_path,
                   cam_layer="layer2.0")
    manifest = json.loads((tmp_path / "inner" / "1" / "manifest.json").read_text())
    assert manifest["cam_layer"] == "layer2.0"
    assert manifest["scale_modules"][-1] == "layer2.0"
    assert manifest["cam_output"] == manifest["outputs"]["scales"][-1]


def test_named_layers_keep_a_bounded_number_of_modules(
        stub: pb_grpc.ExplainerStub, server: RunningServer, inputs: torch.Tensor) -> None:
    layers = ["stem", "layer1.0.conv1", "/layer1/layer1.0/conv2/Conv", "layer2.0.conv1",
              "/layer2/layer2.0/conv2/Conv", "layer2.0.down", "layer2.1.conv1", "layer2.0"]
    for layer in layers:
        served(stub, "resnet", "gradcam", inputs[:1], layer, [0])
    handle = server.server.repository.get("resnet")
    assert len(layer_modules(handle)) == MAX_LAYER_MODULES < len(layers)


def test_a_cached_layer_is_served_while_another_is_built(
        stub: pb_grpc.ExplainerStub, server: RunningServer, inputs: torch.Tensor,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A build holds back other builds only: a cached layer answers meanwhile, and a request
    waiting for the build ends at its deadline with DEADLINE_EXCEEDED."""
    served(stub, "resnet", "gradcam", inputs[:1], "layer1.0.conv1", [0])
    registry = server.server.metrics.registry

    def deadlines() -> float:
        return sum(sample.value for metric in registry.collect()
                   if metric.name == "saliency_requests" for sample in metric.samples
                   if sample.labels.get("code") == "DEADLINE_EXCEEDED"
                   and sample.name.endswith("_total"))

    before = deadlines()
    started, release = threading.Event(), threading.Event()
    build = layer_program._build_module

    def slow_build(model: object, node: str) -> object:
        started.set()
        release.wait(60)
        return build(model, node)

    monkeypatch.setattr(layer_program, "_build_module", slow_build)
    slow = threading.Thread(target=served, args=(stub, "resnet", "gradcam", inputs[:1],
                                                 "/layer1/layer1.0/conv2/Conv", [0]))
    slow.start()
    try:
        assert started.wait(30)
        served(stub, "resnet", "gradcam", inputs[:1], "layer1.0.conv1", [0])
        request = pb.ExplainRequest(model="resnet", method=pb.METHOD_GRADCAM,
                                    gradcam=pb.GradCamParams(layer="stem"),
                                    input=pb.Input(tensor=array_to_tensor(inputs[:1].numpy())))
        with pytest.raises(grpc.RpcError) as waited:
            stub.Explain(request, timeout=1.0)
        assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server gave up waiting too, while the build still runs.
        for _ in range(200):
            if deadlines() > before:
                break
            time.sleep(0.05)
        assert deadlines() > before and not release.is_set()
    finally:
        release.set()
        slow.join(60)
    assert not slow.is_alive()


# ---- refusals ------------------------------------------------------------------------------


def refusal(stub: pb_grpc.ExplainerStub, model: str, layer: str) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(request(model, "gradcam", torch.zeros(1, 3, SIZE, SIZE), layer, [0]),
                     timeout=120)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return str(caught.value.details())


def test_an_unknown_layer_is_refused_with_candidates(stub: pb_grpc.ExplainerStub) -> None:
    message = refusal(stub, "resnet", "layer9")
    assert "'layer9' names no tensor, node or module" in message
    assert "scale_0 (layer1)" in message and "scale_1 (layer2)" in message
    assert "'/layer2/layer2.1/Add'" in message  # among the last maps before the head


def test_a_layer_that_is_not_a_feature_map_is_refused(stub: pb_grpc.ExplainerStub) -> None:
    message = refusal(stub, "resnet", "/Flatten")
    assert "is 2-D (N×16)" in message and "N×C×H×W" in message
    assert "is an input" in refusal(stub, "resnet", "input")


def test_a_layer_the_scores_do_not_depend_on_is_refused(stub: pb_grpc.ExplainerStub) -> None:
    message = refusal(stub, "aux", "/aux/Conv")
    assert "do not depend on layer '/aux/Conv'" in message


def test_a_module_called_twice_is_refused(stub: pb_grpc.ExplainerStub) -> None:
    message = refusal(stub, "resnet", "layer1.0.relu")
    assert "runs more than once" in message and "'/layer1/layer1.0/relu_1/Relu'" in message


def test_an_overlong_layer_name_is_refused(stub: pb_grpc.ExplainerStub) -> None:
    assert "characters" in refusal(stub, "resnet", "x" * 5000)


def test_import_refuses_an_unknown_cam_layer(tmp_path: Path,
                                             models: dict[str, nn.Module]) -> None:
    source = onnx_file(models["tiny"], tmp_path / "tiny.onnx", ["scores"])
    code, _, err = run_cli("import", str(source), "--name", "bad", "--models", str(tmp_path),
                           "--labels", ",".join(LABELS), "--output", "logits",
                           "--cam-layer", "/Flatten")
    assert code != 0 and "--cam-layer" in err and "N×C×H×W" in err
    assert not (tmp_path / "bad").exists()
    graph = onnx.load(str(source)).graph
    assert "/Flatten" in {node.name for node in graph.node}


def test_import_reads_module_paths_of_very_deep_node_names(
        tmp_path: Path, models: dict[str, nn.Module]) -> None:
    """A node name of 300,000 scopes (numeric ones, each making the module path search back
    over all before it) is read in one pass: the import finishes and finds the layer."""
    graph_model = onnx.load(str(onnx_file(models["tiny"], tmp_path / "tiny.onnx", ["scores"])))
    flatten = next(node for node in graph_model.graph.node if node.name == "/Flatten")
    flatten.name = "/" + "0/" * 300_000 + "Flatten"
    onnx.save(graph_model, str(tmp_path / "deep.onnx"))
    code, out, err = run_cli("import", str(tmp_path / "deep.onnx"), "--name", "deep",
                             "--models", str(tmp_path / "models"), "--labels",
                             ",".join(LABELS), "--output", "logits", "--cam-layer", "layer2.conv")
    assert code == 0, err
    assert "(/layer2/conv/Conv), the layer given by --cam-layer" in out
    code, _, err = run_cli("import", str(tmp_path / "deep.onnx"), "--name", "deeper",
                           "--models", str(tmp_path / "models"), "--labels",
                           ",".join(LABELS), "--output", "logits", "--cam-layer", "0.0")
    assert code != 0 and "--cam-layer" in err


def test_import_reads_unterminated_name_scopes_in_one_pass(
        tmp_path: Path, models: dict[str, nn.Module]) -> None:
    """A node's ``name_scopes`` metadata of 200,000 escaped quotes that never close (each one
    a place a quoted string could start) is read in one pass."""
    graph_model = onnx.load(str(onnx_file(models["tiny"], tmp_path / "tiny.onnx", ["scores"])))
    flatten = next(node for node in graph_model.graph.node if node.name == "/Flatten")
    scopes = "'" + "\\'" * 200_000
    onnx.helper.set_metadata_props(flatten, {"pkg.torch.onnx.name_scopes": scopes})
    onnx.save(graph_model, str(tmp_path / "quotes.onnx"))
    code, out, err = run_cli("import", str(tmp_path / "quotes.onnx"), "--name", "quotes",
                             "--models", str(tmp_path / "models"), "--labels",
                             ",".join(LABELS), "--output", "logits", "--cam-layer", "layer2.conv")
    assert code == 0, err
    assert "(/layer2/conv/Conv), the layer given by --cam-layer" in out


# ---- HTTP/JSON ---------------------------------------------------------------------------


def test_a_named_layer_over_json_equals_grpc(stub: pb_grpc.ExplainerStub, server: RunningServer,
                                             inputs: torch.Tensor) -> None:
    message = request("resnet", "gradcam", inputs, "layer2.0", [1, 2])
    expected = stub.Explain(message, timeout=300)
    body = json_format.MessageToDict(message, preserving_proto_field_name=True)
    assert body["gradcam"] == {"layer": "layer2.0"}
    base = f"http://127.0.0.1:{server.server.http_port}"
    with httpx.Client(base_url=base, timeout=300) as client:
        answer = client.post("/api/v1/explain", json=body)
        assert answer.status_code == 200, answer.text
        got = json_format.ParseDict(answer.json()["saliency"], pb.Tensor())
        assert got.data == expected.saliency.data
        body["gradcam"]["layer"] = "layer9"
        refused = client.post("/api/v1/explain", json=body)
    assert refused.status_code == 400
    assert refused.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert "names no tensor" in refused.json()["error"]["message"]
