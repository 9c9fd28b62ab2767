"""``saliency export`` of PyTorch detectors and segmenters whose forward returns tensors.

The zoo's grid detector and U-Net are exported with the command line (``--kind``, the grid
head's ``--anchor``), the detector with NMS inside through ``export_package``; a real server
then predicts what the PyTorch modules predict and explains with Grad-CAM at the exported
CAM layer, equal to Grad-CAM on the PyTorch module (``methods._utils.dense_cam``, itself
checked against pytorch-grad-cam). What cannot be exported is refused in one line.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from saliency_service.core import detections as det
from saliency_service.evaluation.scenes import CLASSES, SceneConfig, generate
from saliency_service.methods._utils import dense_cam
from saliency_service.packaging.export import ExportError, export_package
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.serving.background import RunningServer
from saliency_service.zoo.detectors import ANCHOR, MEAN, STD, STRIDE, NmsDetector, preprocess
from saliency_service.zoo.segmenters import UNetSegmenter
from tests import detection_support as support
from tests.conftest import make_config, run_cli
from tests.fixtures.make_detection_models import FOLDER

pytestmark = pytest.mark.usefixtures("one_thread")

SEGMENT_LABELS = ("background", *CLASSES)
COMMON = ("--input-shape", "3,64,64", "--mean", ",".join(map(str, MEAN)),
          "--std", ",".join(map(str, STD)))
CAM_TOLERANCE = 1e-4





@pytest.fixture(scope="module")
def exported(trained: support.Trained,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The grid detector and the U-Net exported with ``saliency export``, the NMS detector
    with ``export_package``: (repository, what each export printed)."""
    root = tmp_path_factory.mktemp("models")
    printed = {}
    for name, factory, weights, extra in (
            ("grid", "saliency_service.zoo.detectors:GridDetector", "grid_detector.npz",
             ("--kind", "detection_raw", "--anchor", str(ANCHOR), "--labels",
              ",".join(CLASSES))),
            ("unet", "saliency_service.zoo.segmenters:UNetSegmenter", "unet_segmenter.npz",
             ("--kind", "segmentation", "--cam-layer", UNetSegmenter.cam_layer, "--labels",
              ",".join(SEGMENT_LABELS)))):
        code, out, err = run_cli("export", "--module", factory, "--state-dict",
                                 str(FOLDER / weights), "--name", name, "--models", str(root),
                                 *COMMON, *extra)
        assert code == 0, err
        printed[name] = out
    # Export freezes the module's parameters: it gets its own copy.
    export_package(NmsDetector(copy.deepcopy(trained.grid)), name="nms", version=1,
                   input_shape=(3, support.SIZE, support.SIZE), mean=MEAN, std=STD,
                   class_labels=CLASSES, repository=root, kind="detection")
    return root, printed


@pytest.fixture(scope="module")
def stub(exported: tuple[Path, dict[str, str]]) -> Iterator[pb_grpc.ExplainerStub]:
    running = RunningServer(make_config(exported[0])).start(timeout=600)
    try:
        with grpc.insecure_channel(running.address) as channel:
            yield pb_grpc.ExplainerStub(channel)
    finally:
        running.stop()


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return preprocess(generate(3, SceneConfig(seed=support.EVALUATION_SEED)).images)


def tensor_input(x: torch.Tensor) -> pb.Input:
    return pb.Input(tensor=array_to_tensor(x.numpy().astype(np.float32)))


def test_export_writes_each_kinds_outputs_and_prints_them(
        exported: tuple[Path, dict[str, str]]) -> None:
    root, printed = exported
    assert "kind: detection_raw; outputs: logits logits, stride 8, anchor 16" in printed["grid"]
    assert "classes: disc, checks, stripes" in printed["grid"]
    assert "kind: segmentation; outputs: logits logits" in printed["unet"]
    grid = json.loads((root / "grid" / "1" / "manifest.json").read_text())
    assert grid["outputs"]["kind"] == "detection_raw"
    assert grid["outputs"]["detection"] == {"stride": STRIDE, "anchor": ANCHOR,
                                            "score_threshold": 0.3, "nms_iou": 0.45,
                                            "max_detections": 100}
    assert grid["cam_layer"] == "features" and grid["class_labels"] == list(CLASSES)
    unet = json.loads((root / "unet" / "1" / "manifest.json").read_text())
    assert unet["outputs"]["kind"] == "segmentation" and unet["cam_layer"] == "decoder2"
    nms = json.loads((root / "nms" / "1" / "manifest.json").read_text())
    assert {k: nms["outputs"][k] for k in ("kind", "boxes", "scores", "classes")} == {
        "kind": "detection", "boxes": "boxes", "scores": "scores", "classes": "classes"}
    assert nms["outputs"]["scales"] == [] and nms["cam_output"] == ""


@pytest.mark.parametrize(("factory", "flags", "message"), [
    ("saliency_service.zoo.detectors:GridDetector", ("--kind", "detection_raw"),
     "pass --anchor PIXELS"),
    ("saliency_service.zoo.detectors:GridDetector", ("--kind", "segmentation"),
     "a segmenter returns N×K×64×64"),
    ("saliency_service.zoo.segmenters:UNetSegmenter", (), "pass --kind for a detector"),
    ("saliency_service.zoo.segmenters:UNetSegmenter", ("--kind", "detection"),
     "give its class labels (--labels)"),
])
def test_export_refuses_a_kind_the_forward_does_not_return_in_one_line(
        tmp_path: Path, factory: str, flags: tuple[str, ...], message: str) -> None:
    code, _, err = run_cli("export", "--module", factory, "--name", "refused",
                           "--models", str(tmp_path), *COMMON, *flags)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "refused").exists()


def test_a_forward_returning_several_tensors_needs_the_detection_kind(tmp_path: Path,
                                                                    trained) -> None:  # noqa: ANN001
    with pytest.raises(ExportError, match="returns 3 values; it must return the logits alone"):
        export_package(NmsDetector(copy.deepcopy(trained.grid)), name="nms", version=1,
                       input_shape=(3, support.SIZE, support.SIZE), mean=MEAN, std=STD,
                       class_labels=CLASSES, repository=tmp_path)


def test_served_exports_predict_what_the_pytorch_modules_predict(
        stub: pb_grpc.ExplainerStub, trained: support.Trained, inputs: torch.Tensor) -> None:
    with torch.no_grad():
        found, _ = support.reported(trained.grid(inputs).numpy())
        classes = trained.unet(inputs).argmax(dim=1).numpy()
        boxes, scores, labels = (v.numpy() for v in trained.nms(inputs))
    grid = stub.Predict(pb.PredictRequest(model="grid", input=tensor_input(inputs)), timeout=60)
    for served, want in zip(grid.detections, found, strict=True):
        got = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in served.detections])
        assert len(served.detections) == len(want) > 0
        np.testing.assert_allclose(got, want.boxes, atol=1e-3)
        assert [d.label for d in served.detections] == [CLASSES[c] for c in want.classes]
    unet = stub.Predict(pb.PredictRequest(model="unet", input=tensor_input(inputs)), timeout=60)
    assert (tensor_to_array(unet.class_map) == classes).mean() > 0.999
    nms = stub.Predict(pb.PredictRequest(model="nms", input=tensor_input(inputs)), timeout=60)
    for served, want in zip(nms.detections, det.from_post_nms(boxes, scores, labels,
                                                              len(CLASSES)), strict=True):
        assert sorted(d.score for d in served.detections) == pytest.approx(
            sorted(want.scores.tolist()), abs=1e-4)


def test_served_grad_cam_of_exports_is_grad_cam_on_the_modules(
        stub: pb_grpc.ExplainerStub, trained: support.Trained, inputs: torch.Tensor) -> None:
    image = inputs[:1]
    with torch.no_grad():
        found, cells = support.reported(trained.grid(image).numpy())
        logits = trained.unet(image).numpy()[0]
    detection = found[0]
    label = int(detection.classes[0])
    box = pb.Box(x1=float(detection.boxes[0][0]), y1=float(detection.boxes[0][1]),
                 x2=float(detection.boxes[0][2]), y2=float(detection.boxes[0][3]))
    reply = stub.Explain(pb.ExplainRequest(
        model="grid", method=pb.METHOD_GRADCAM, input=tensor_input(image),
        target=pb.Target(detection=pb.DetectionTarget(box=box, class_index=label))), timeout=300)
    mine = dense_cam.grad_cam(trained.grid, "features", image, dense_cam.grid_box_score(
        torch.tensor([int(cells[0][0])]), torch.tensor([label])))
    assert_same(tensor_to_array(reply.saliency), mine)
    present = int(np.bincount(logits.argmax(axis=0)[logits.argmax(axis=0) > 0]).argmax())
    region = det.predicted_region(logits, present, SEGMENT_LABELS)
    reply = stub.Explain(pb.ExplainRequest(
        model="unet", method=pb.METHOD_GRADCAM, input=tensor_input(image),
        target=pb.Target(region=pb.RegionTarget(class_index=present))), timeout=300)
    mine = dense_cam.grad_cam(trained.unet, UNetSegmenter.cam_layer, image,
                              dense_cam.region_score(torch.tensor([present]),
                                                     torch.from_numpy(region)[None]))
    assert_same(tensor_to_array(reply.saliency), mine)


def assert_same(served: np.ndarray, module: np.ndarray) -> None:
    assert served.max() > 0 and module.max() > 0
    np.testing.assert_allclose(served / served.max(), module / module.max(),
                               atol=CAM_TOLERANCE, rtol=0)
