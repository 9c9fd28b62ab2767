"""``saliency import`` of detectors and segmenters, served for real, and Grad-CAM on them
against pytorch-grad-cam.

The scene models (``tests/detection_support.py``: a raw grid detector, the same with NMS in
its graph, a U-Net) are exported to ONNX and imported with the command line, which must
tell their kind from the outputs' shapes, find their CAM layers and refuse what it cannot
tell in one line naming the flag. A real server then explains a U-Net region and a grid
detection with METHOD_GRADCAM (and its variants) over gRPC; the maps must equal
pytorch-grad-cam's ``GradCAM`` with ``SemanticSegmentationTarget`` and
``FasterRCNNBoxScoreTarget`` on the PyTorch modules at the same layer, to 1e-4.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from saliency_service.core import detections as det
from saliency_service.evaluation.scenes import CLASSES, SceneConfig, generate
from saliency_service.methods._utils import dense_cam
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.serving.background import RunningServer
from saliency_service.zoo.detectors import ANCHOR, STRIDE, preprocess
from tests import detection_support as support
from tests.conftest import make_config, run_cli
from tests.test_detection_models import assert_same_cam, grad_cam_library, library_cam

pytestmark = pytest.mark.usefixtures("one_thread")

__all__ = ["grad_cam_library"]  # a fixture this module uses

SEGMENT_LABELS = ("background", *CLASSES)
NORMALIZATION = ("--mean", "0.5", "--std", "0.25")
CAM_METHODS = {"gradcam", "gradcam_plus_plus", "xgradcam", "guided_gradcam"}





@pytest.fixture(scope="module")
def imported(trained: support.Trained,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The grid detector, the NMS detector and both segmenters imported with ``saliency import``:
    (repository, what each import printed)."""
    root = tmp_path_factory.mktemp("models")
    flags = {"grid": ("--labels", ",".join(CLASSES), "--anchor", str(ANCHOR)),
             "nms": ("--labels", ",".join(CLASSES)),
             "unet": ("--labels", ",".join(SEGMENT_LABELS)),
             "dilated": ("--labels", ",".join(SEGMENT_LABELS))}
    printed = {}
    for name, extra in flags.items():
        code, out, err = run_cli("import", str(trained.onnx[name]), "--name", name,
                                 "--models", str(root), *NORMALIZATION, *extra)
        assert code == 0, err
        printed[name] = out
    return root, printed


@pytest.fixture(scope="module")
def stub(imported: tuple[Path, dict[str, str]]) -> Iterator[pb_grpc.ExplainerStub]:
    running = RunningServer(make_config(imported[0])).start(timeout=600)
    try:
        with grpc.insecure_channel(running.address) as channel:
            yield pb_grpc.ExplainerStub(channel)
    finally:
        running.stop()


@pytest.fixture(scope="module")
def scenes():  # noqa: ANN201 - the scene batch of the evaluation seed
    return generate(4, SceneConfig(seed=support.EVALUATION_SEED))


def tensor_input(x: torch.Tensor) -> pb.Input:
    return pb.Input(tensor=array_to_tensor(x.numpy().astype(np.float32)))


def explain(stub: pb_grpc.ExplainerStub, model: str, method: str, x: torch.Tensor,
            target: pb.Target) -> pb.ExplainResponse:
    request = pb.ExplainRequest(model=model, method=pb.Method.Value(f"METHOD_{method.upper()}"),
                                input=tensor_input(x), target=target)
    return stub.Explain(request, timeout=300)


# ---- what import recognises --------------------------------------------------------------


def test_import_tells_each_kind_from_the_outputs_and_prints_it(
        imported: tuple[Path, dict[str, str]]) -> None:
    root, printed = imported
    assert "kind: detection_raw" in printed["grid"]
    assert "outputs: raw (grid head, 3 classes; stride 8, anchor 16;" in printed["grid"]
    assert "classes: disc, checks, stripes" in printed["grid"]
    assert "kind: detection\n" in printed["nms"]
    assert "outputs: boxes boxes, scores scores, classes classes" in printed["nms"]
    assert "kind: segmentation" in printed["unet"]
    assert "classes: background, disc, checks, stripes" in printed["unet"]
    grid = json.loads((root / "grid" / "1" / "manifest.json").read_text())
    assert grid["outputs"]["kind"] == "detection_raw" and grid["outputs"]["logits"] == "raw"
    assert grid["outputs"]["detection"] == {"stride": STRIDE, "anchor": ANCHOR,
                                            "score_threshold": 0.3, "nms_iou": 0.45,
                                            "max_detections": 100}
    # The CAM layer is the grid's last map, the layer GridDetector.cam_layer names.
    assert grid["cam_layer"].startswith("/features/") and grid["cam_output"] == "scale_3"
    unet = json.loads((root / "unet" / "1" / "manifest.json").read_text())
    assert unet["outputs"]["kind"] == "segmentation" and unet["cam_layer"].startswith(
        "/decoder1/")
    # A Shape → Resize path beside the maps (the dilated segmenter's upsampling to the input's
    # size) carries no image values: its context block is still the CAM layer.
    dilated = json.loads((root / "dilated" / "1" / "manifest.json").read_text())
    assert dilated["cam_layer"].startswith("/context/"), printed["dilated"]
    nms = json.loads((root / "nms" / "1" / "manifest.json").read_text())
    assert {k: nms["outputs"][k] for k in ("kind", "boxes", "scores", "classes")} == {
        "kind": "detection", "boxes": "boxes", "scores": "scores", "classes": "classes"}
    assert nms["outputs"]["scales"] == []


def _graph(outputs: dict[str, tuple[int, list[int | str]]],
           nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "outputs", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                         ["N", 3, 16, 16])],
        [helper.make_tensor_value_info(n, t, d) for n, (t, d) in outputs.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _maps(channels: int, size: int, name: str) -> list[onnx.NodeProto]:
    """``input`` pooled to ``size``×``size`` and tiled to ``channels`` channels as ``name``."""
    kernel = 16 // size
    return [helper.make_node("AveragePool", ["input"], [f"{name}_pooled"],
                             kernel_shape=[kernel, kernel], strides=[kernel, kernel]),
            helper.make_node("Constant", [], [f"{name}_repeats"], value=helper.make_tensor(
                f"{name}_repeats", TensorProto.INT64, [4], [1, -(-channels // 3), 1, 1])),
            helper.make_node("Tile", [f"{name}_pooled", f"{name}_repeats"], [f"{name}_tiled"]),
            helper.make_node("Constant", [], [f"{name}_ends"], value=helper.make_tensor(
                f"{name}_ends", TensorProto.INT64, [1], [channels])),
            helper.make_node("Constant", [], [f"{name}_starts"], value=helper.make_tensor(
                f"{name}_starts", TensorProto.INT64, [1], [0])),
            helper.make_node("Constant", [], [f"{name}_axes"], value=helper.make_tensor(
                f"{name}_axes", TensorProto.INT64, [1], [1])),
            helper.make_node("Slice", [f"{name}_tiled", f"{name}_starts", f"{name}_ends",
                                       f"{name}_axes"], [name])]


def _class_scores(name: str) -> list[onnx.NodeProto]:
    return [helper.make_node("ReduceMean", ["input"], [name], axes=[2, 3], keepdims=0)]


UNTELLABLE = {
    "a low-resolution map of too few channels": (
        lambda: _graph({"maps": (TensorProto.FLOAT, ["N", 3, 4, 4])}, _maps(3, 4, "maps")),
        (), "cannot tell what the outputs are"),
    "class scores beside a per-pixel map": (
        lambda: _graph({"scores": (TensorProto.FLOAT, ["N", 3]),
                        "maps": (TensorProto.FLOAT, ["N", 3, 16, 16])},
                       [*_class_scores("scores"), helper.make_node("Relu", ["input"],
                                                                   ["maps"])]),
        (), "pass --kind classification or --kind segmentation"),
    "a grid head without its anchor": (
        lambda: _graph({"head": (TensorProto.FLOAT, ["N", 7, 4, 4])}, _maps(7, 4, "head")),
        (), "pass --anchor PIXELS"),
    "a stride the grid disagrees with": (
        lambda: _graph({"head": (TensorProto.FLOAT, ["N", 7, 4, 4])}, _maps(7, 4, "head")),
        ("--anchor", "8", "--stride", "8"), "has stride 4"),
    "a kind the outputs do not fit": (
        lambda: _graph({"scores": (TensorProto.FLOAT, ["N", 3])}, _class_scores("scores")),
        ("--kind", "segmentation"), "--kind segmentation needs N×K×H×W"),
    "post-NMS outputs without labels": (
        lambda: _graph({"boxes": (TensorProto.FLOAT, ["N", 3, 4]),
                        "scores": (TensorProto.FLOAT, ["N", 3]),
                        "classes": (TensorProto.INT64, ["N", 3])},
                       [*_maps(3, 1, "pooled_boxes"),
                        helper.make_node("Constant", [], ["shape"], value=helper.make_tensor(
                            "shape", TensorProto.INT64, [3], [0, 3, 1])),
                        helper.make_node("Reshape", ["pooled_boxes", "shape"], ["column"]),
                        helper.make_node("Concat", ["column"] * 4, ["boxes"], axis=2),
                        helper.make_node("Constant", [], ["shape2"], value=helper.make_tensor(
                            "shape2", TensorProto.INT64, [2], [0, 3])),
                        helper.make_node("Reshape", ["column", "shape2"], ["scores"]),
                        helper.make_node("Cast", ["scores"], ["classes"],
                                         to=TensorProto.INT64)]),
        (), "pass --labels"),
}


@pytest.mark.parametrize("case", list(UNTELLABLE))
def test_import_refuses_what_it_cannot_tell_in_one_line_naming_the_flag(
        case: str, tmp_path: Path) -> None:
    build, flags, message = UNTELLABLE[case]
    source = tmp_path / "model.onnx"
    onnx.save(build(), str(source))
    code, out, err = run_cli("import", str(source), "--name", "refused",
                             "--models", str(tmp_path / "models"), *flags)
    assert code == 2 and out == "", out
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "models" / "refused").exists()


def test_kind_overrides_what_the_shapes_say(trained: support.Trained, tmp_path: Path) -> None:
    """The U-Net's output read as a grid head is refused: a grid is coarser than the input."""
    code, _, err = run_cli("import", str(trained.onnx["unet"]), "--name", "unet",
                           "--models", str(tmp_path), "--kind", "detection_raw")
    assert code == 2 and "--kind detection_raw needs a grid head" in err, err


def _pixel_scores(activation: str) -> onnx.ModelProto:
    """A 1×1 convolution to 4 classes per pixel, ending in ``activation`` ("" = none)."""
    weight = numpy_helper.from_array(
        np.random.default_rng(0).normal(size=(4, 3, 1, 1)).astype(np.float32), "weight")
    nodes = [helper.make_node("Conv", ["input", "weight"], ["maps" if activation else "scores"])]
    if activation:
        nodes.append(helper.make_node(activation, ["maps"], ["scores"],
                                      **({"axis": 1} if activation == "Softmax" else {})))
    model = _graph({"scores": (TensorProto.FLOAT, ["N", 4, 16, 16])}, nodes)
    model.graph.initializer.append(weight)
    return model


@pytest.mark.parametrize(("activation", "scores"), [("", "logits"), ("Softmax", "probabilities"),
                                                    ("Sigmoid", "sigmoid")])
def test_a_segmenters_pixel_scores_are_read_as_a_classifiers_are(
        tmp_path: Path, activation: str, scores: str) -> None:
    source = tmp_path / "segmenter.onnx"
    onnx.save(_pixel_scores(activation), str(source))
    code, out, err = run_cli("import", str(source), "--name", "pixels", "--models",
                             str(tmp_path / "models"))
    assert code == 0, err
    assert f"outputs: scores (4 classes per pixel, {scores})" in out
    manifest = json.loads((tmp_path / "models" / "pixels" / "1" / "manifest.json").read_text())
    assert manifest["outputs"]["kind"] == "segmentation"
    assert manifest["outputs"]["scores"] == scores


# ---- served: the CAM methods on imported detectors and segmenters -------------------------


def test_cam_methods_are_offered_on_imported_grid_detectors_and_segmenters(
        stub: pb_grpc.ExplainerStub) -> None:
    for model in ("grid", "unet", "dilated"):
        info = stub.GetModel(pb.GetModelRequest(model=model), timeout=60)
        assert info.status.ready, info.status.error
        offered = {m.name for m in info.methods}
        reasons = {m.name: m.reason for m in info.unavailable_methods}
        assert offered >= CAM_METHODS, reasons
    nms = stub.GetModel(pb.GetModelRequest(model="nms"), timeout=60)
    assert nms.output_kind == "detection"
    reasons = {m.name: m.reason for m in nms.unavailable_methods}
    assert "NMS inside its graph" in reasons["gradcam"]
    assert "drise" in {m.name for m in nms.methods}


@pytest.mark.parametrize(("model", "layer"), [("unet", "decoder1"), ("dilated", "context")])
def test_served_grad_cam_of_a_segmenter_region_is_pytorch_grad_cams_segmentation_target(
        stub: pb_grpc.ExplainerStub, trained: support.Trained, scenes,  # noqa: ANN001
        grad_cam_library, model: str, layer: str) -> None:  # noqa: ANN001
    library, model_targets = grad_cam_library
    inputs = preprocess(scenes.images)
    module = getattr(trained, model)
    with torch.no_grad():
        logits = module(inputs).numpy()
    compared = 0
    for index, scene in enumerate(scenes.scenes[:3]):
        label = int(scene.classes[0]) + 1
        image = inputs[index:index + 1]
        box = scene.boxes[0]
        for region, target in (
                (det.predicted_region(logits[index], label, SEGMENT_LABELS),
                 pb.RegionTarget(label=SEGMENT_LABELS[label])),
                (det.region_from_box(box, support.SIZE, support.SIZE),
                 pb.RegionTarget(class_index=label, box=pb.Box(
                     x1=float(box[0]), y1=float(box[1]), x2=float(box[2]), y2=float(box[3]))))):
            reply = explain(stub, model, "gradcam", image, pb.Target(region=target))
            assert reply.explained[0].region_pixels == int(region.sum())
            served = tensor_to_array(reply.saliency)
            peer = model_targets.SemanticSegmentationTarget(label, region.astype(np.float32))
            theirs = library_cam(library, module, layer, image, [peer])
            assert_same_cam(served, theirs)
            compared += 1
    assert compared == 6


def test_served_grad_cam_of_a_grid_detection_is_pytorch_grad_cams_box_score_target(
        stub: pb_grpc.ExplainerStub, trained: support.Trained, scenes,  # noqa: ANN001
        grad_cam_library) -> None:  # noqa: ANN001
    library, model_targets = grad_cam_library
    inputs = preprocess(scenes.images)
    wrapper = support.ReportedGrid(trained.grid).eval()
    with torch.no_grad():
        found, cells = support.reported(trained.grid(inputs).numpy())
    compared = 0
    for index in range(3):
        image = inputs[index:index + 1]
        predicted = stub.Predict(pb.PredictRequest(model="grid", input=tensor_input(image)),
                                 timeout=60).detections[0].detections
        assert len(predicted) == len(found[index]) > 0
        for row, detection in enumerate(predicted[:2]):
            target = pb.Target(detection=pb.DetectionTarget(box=detection.box,
                                                            label=detection.label))
            reply = explain(stub, "grid", "gradcam", image, target)
            served = tensor_to_array(reply.saliency)
            box = np.array([detection.box.x1, detection.box.y1, detection.box.x2,
                            detection.box.y2], np.float32)
            theirs = library_cam(library, wrapper, "grid.features", image,
                                 [model_targets.FasterRCNNBoxScoreTarget(
                                     [detection.class_index], [box])])
            assert_same_cam(served, theirs)
            # The same target through the H3 utility on the PyTorch module.
            mine = dense_cam.grad_cam(trained.grid, "features", image, dense_cam.grid_box_score(
                torch.tensor([int(cells[index][row])]), torch.tensor([detection.class_index])))
            assert_same_cam(served, mine)
            compared += 1
    assert compared >= 4


@pytest.mark.parametrize("method", ["gradcam_plus_plus", "xgradcam"])
def test_served_cam_variants_on_a_region_match_pytorch_grad_cam(
        stub: pb_grpc.ExplainerStub, trained: support.Trained, scenes,  # noqa: ANN001
        grad_cam_library, method: str) -> None:  # noqa: ANN001
    library, model_targets = grad_cam_library
    peers = {"gradcam_plus_plus": library.GradCAMPlusPlus, "xgradcam": library.XGradCAM}
    image = preprocess(scenes.images[:1])
    label = int(scenes.scenes[0].classes[0]) + 1
    box = scenes.scenes[0].boxes[0]
    region = det.region_from_box(box, support.SIZE, support.SIZE)
    reply = explain(stub, "unet", method, image, pb.Target(region=pb.RegionTarget(
        class_index=label, box=pb.Box(x1=float(box[0]), y1=float(box[1]), x2=float(box[2]),
                                      y2=float(box[3])))))
    module = copy.deepcopy(trained.unet)  # the library's backward fills .grad
    with peers[method](model=module, target_layers=[module.decoder1]) as cam:
        theirs = cam(input_tensor=image, targets=[
            model_targets.SemanticSegmentationTarget(label, region.astype(np.float32))])
    assert_same_cam(tensor_to_array(reply.saliency), theirs)


def test_guided_grad_cam_of_a_detection_lies_on_its_object(
        stub: pb_grpc.ExplainerStub, scenes) -> None:  # noqa: ANN001
    image = preprocess(scenes.images[:1])
    detection = stub.Predict(pb.PredictRequest(model="grid", input=tensor_input(image)),
                             timeout=60).detections[0].detections[0]
    reply = explain(stub, "grid", "guided_gradcam", image, pb.Target(
        detection=pb.DetectionTarget(box=detection.box, label=detection.label)))
    maps = tensor_to_array(reply.saliency)
    assert maps.shape == (1, support.SIZE, support.SIZE)
    assert reply.explained[0].label == detection.label
    box = np.array([detection.box.x1, detection.box.y1, detection.box.x2, detection.box.y2])
    best = int(np.argmax(det.box_iou(box[None], scenes.scenes[0].boxes)[0]))
    mask = scenes.scenes[0].masks[best]
    assert maps[0][mask].mean() > maps[0][~mask].mean()


def test_the_fast_path_explains_imported_detectors_and_segmenters(
        stub: pb_grpc.ExplainerStub, scenes) -> None:  # noqa: ANN001
    """With the scale outputs import found: SMOE Scale (the features alone, the same map for
    every target of an image) and FastCAM (SMOE × the target's Grad-CAM) from the prediction's
    own pass; on the post-NMS graph SMOE still serves, FastCAM not."""
    image = preprocess(scenes.images[:1])
    for model in ("grid", "unet"):
        info = stub.GetModel(pb.GetModelRequest(model=model), timeout=60)
        assert {"smoe_scale", "fastcam", "lovi"} <= {m.name for m in info.methods}, model
    smoe = explain(stub, "grid", "smoe_scale", image, pb.Target())
    maps = tensor_to_array(smoe.saliency)
    assert len(smoe.explained) >= 2 and smoe.cost.forward_passes == 1
    np.testing.assert_array_equal(maps[0], maps[1])  # target-free
    fast = explain(stub, "grid", "fastcam", image, pb.Target())
    fast_maps = tensor_to_array(fast.saliency)
    assert fast_maps.shape == maps.shape and not np.allclose(fast_maps[0], fast_maps[1])
    for index, explained in enumerate(fast.explained):  # each on its own object
        box = np.array([explained.box.x1, explained.box.y1, explained.box.x2, explained.box.y2])
        best = int(np.argmax(det.box_iou(box[None], scenes.scenes[0].boxes)[0]))
        mask = scenes.scenes[0].masks[best]
        assert fast_maps[index][mask].mean() > fast_maps[index][~mask].mean()
    region = explain(stub, "unet", "fastcam", image, pb.Target())
    assert len(region.explained) >= 1 and np.isfinite(tensor_to_array(region.saliency)).all()
    nms = stub.GetModel(pb.GetModelRequest(model="nms"), timeout=60)
    reasons = {m.name: m.reason for m in nms.unavailable_methods}
    assert "fastcam" in reasons
