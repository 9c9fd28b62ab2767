"""Detectors and segmenters served for real: packages of the scene models (a raw grid head, the
same detector with NMS inside its graph, a U-Net segmenter), Predict and Explain over gRPC and
HTTP on a running server, one map per detection or region, and clear refusals of bad targets.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest

from saliency_service.core import detections as det
from saliency_service.core.repository import MANIFEST, ONNX_FILE, sha256_file
from saliency_service.evaluation.scenes import CLASSES, SceneConfig, generate
from saliency_service.proto import explainer_pb2 as pb
from saliency_service.proto import explainer_pb2_grpc as pb_grpc
from saliency_service.protocol.images import array_to_tensor, tensor_to_array
from saliency_service.serving.background import RunningServer
from saliency_service.zoo.detectors import (
    ANCHOR,
    MAX_DETECTIONS,
    MEAN,
    NMS_IOU,
    SCORE_THRESHOLD,
    STRIDE,
    preprocess,
)
from tests.conftest import make_config
from tests.detection_support import EVALUATION_SEED, SIZE, load_trained

SEGMENT_LABELS = ("background", *CLASSES)
CHEAP = {"rise": pb.RiseParams(masks=200), "drise": pb.RiseParams(masks=200),
         "decam": pb.DecamParams(population=8, generations=3),
         "occlusion": pb.OcclusionParams(window=16, stride=8)}


def write(folder: Path, onnx_path: Path, outputs: dict, labels: tuple[str, ...]) -> None:
    package = folder / "1"
    package.mkdir(parents=True)
    (package / ONNX_FILE).write_bytes(onnx_path.read_bytes())
    manifest = {
        "format": 1, "name": folder.name, "version": 1,
        "input": {"name": "input", "shape": [-1, 3, SIZE, SIZE], "mean": list(MEAN),
                  "std": [0.25, 0.25, 0.25], "value_range": [0.0, 1.0], "layout": "NCHW",
                  "dtype": "float32"},
        "class_labels": list(labels), "outputs": outputs,
        "files": {ONNX_FILE: {"sha256": sha256_file(package / ONNX_FILE)}},
    }
    (package / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dense")
    trained = load_trained(root / "onnx")
    models = root / "models"
    write(models / "grid", trained.onnx["grid"],
          {"kind": "detection_raw", "logits": "raw",
           "detection": {"stride": STRIDE, "anchor": ANCHOR, "score_threshold": SCORE_THRESHOLD,
                         "nms_iou": NMS_IOU, "max_detections": MAX_DETECTIONS}}, CLASSES)
    write(models / "nms", trained.onnx["nms"], {"kind": "detection", "boxes": "boxes",
                                                 "scores": "scores", "classes": "classes"},
          CLASSES)
    write(models / "unet", trained.onnx["unet"], {"kind": "segmentation", "logits": "logits"},
          SEGMENT_LABELS)
    return models


@pytest.fixture(scope="module")
def web(repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(make_config(repository, http_port=0)).start(timeout=600)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(web: RunningServer) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(web.address) as channel:
        yield pb_grpc.ExplainerStub(channel)


@pytest.fixture(scope="module")
def http(web: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{web.server.http_port}", timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def scenes():  # noqa: ANN201 - the scene batch of the evaluation seed
    return generate(6, SceneConfig(seed=EVALUATION_SEED))


def inputs_of(scenes, items: list[int]) -> np.ndarray:  # noqa: ANN001
    return preprocess(scenes.images[items]).numpy()


def tensor_input(x: np.ndarray) -> pb.Input:
    return pb.Input(tensor=array_to_tensor(x.astype(np.float32)))


def explain(stub: pb_grpc.ExplainerStub, model: str, method: int, x: np.ndarray,
            target: pb.Target | None = None, **extra: object) -> pb.ExplainResponse:
    name = pb.Method.Name(method).removeprefix("METHOD_").lower()
    params = {name: CHEAP[name]} if name in CHEAP else {}
    request = pb.ExplainRequest(model=model, method=method, input=tensor_input(x), seed=3,
                                target=target, **params, **extra)  # type: ignore[arg-type]
    return stub.Explain(request, timeout=300)


def refused(call) -> str:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details()


# ---- what is offered ----------------------------------------------------------------------


@pytest.mark.parametrize(("model", "kind", "offered"), [
    ("grid", "detection_raw", {"occlusion", "rise", "decam", "drise"}),
    ("nms", "detection", {"occlusion", "rise", "decam", "drise"}),
    ("unet", "segmentation", {"occlusion", "rise", "decam"})])
def test_get_model_offers_the_black_box_methods_and_says_why_not_the_others(
        stub: pb_grpc.ExplainerStub, model: str, kind: str, offered: set[str]) -> None:
    info = stub.GetModel(pb.GetModelRequest(model=model), timeout=30)
    assert info.status.ready, info.status.error
    assert info.output_kind == kind
    assert {m.name for m in info.methods} >= offered
    reasons = {m.name: m.reason for m in info.unavailable_methods}
    assert "needs scale outputs" in reasons["smoe_scale"] and "fastcam" in reasons
    if model == "unet":
        assert reasons["drise"] == "it explains detectors; this model is a segmentation model"


# ---- Predict ------------------------------------------------------------------------------


def test_predict_returns_the_detections_onnx_runtime_and_the_decoder_give(
        stub: pb_grpc.ExplainerStub, repository: Path, scenes) -> None:  # noqa: ANN001
    x = inputs_of(scenes, [0, 1, 2])
    session = ort.InferenceSession(str(repository / "grid" / "1" / ONNX_FILE))
    (raw,) = session.run(["raw"], {"input": x})
    expected = [det.select(p, SCORE_THRESHOLD, NMS_IOU, MAX_DETECTIONS)
                for p in det.decode_grid(raw, STRIDE, ANCHOR)]
    reply = stub.Predict(pb.PredictRequest(model="grid", input=tensor_input(x)), timeout=60)
    assert len(reply.detections) == 3 and not reply.predictions
    for found, want in zip(reply.detections, expected, strict=True):
        boxes = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in found.detections])
        assert len(found.detections) == len(want) > 0
        np.testing.assert_allclose(boxes, want.boxes, atol=1e-4)
        assert [d.class_index for d in found.detections] == want.classes.tolist()
        assert [d.label for d in found.detections] == [CLASSES[c] for c in want.classes]
    nms = stub.Predict(pb.PredictRequest(model="nms", input=tensor_input(x)), timeout=60)
    for grid_found, nms_found in zip(reply.detections, nms.detections, strict=True):
        assert len(nms_found.detections) >= 1
        assert {d.class_index for d in nms_found.detections} <= {
            d.class_index for d in grid_found.detections} | set(range(len(CLASSES)))


def test_predict_of_a_segmenter_is_its_class_map(stub: pb_grpc.ExplainerStub, repository: Path,
                                                 scenes) -> None:  # noqa: ANN001
    x = inputs_of(scenes, [0, 1])
    session = ort.InferenceSession(str(repository / "unet" / "1" / ONNX_FILE))
    (logits,) = session.run(["logits"], {"input": x})
    reply = stub.Predict(pb.PredictRequest(model="unet", input=tensor_input(x)), timeout=60)
    classes = tensor_to_array(reply.class_map)
    assert classes.shape == (2, SIZE, SIZE)
    np.testing.assert_array_equal(classes, logits.argmax(axis=1))
    truth = scenes.class_maps[[0, 1]]
    assert (classes == truth).mean() > 0.8  # the trained segmenter mostly agrees


# ---- Explain --------------------------------------------------------------------------------


def first_detection(stub: pb_grpc.ExplainerStub, model: str, x: np.ndarray) -> pb.Detection:
    reply = stub.Predict(pb.PredictRequest(model=model, input=tensor_input(x)), timeout=60)
    return reply.detections[0].detections[0]


@pytest.mark.parametrize("model", ["grid", "nms"])
def test_drise_explains_one_detection_where_its_object_is(
        stub: pb_grpc.ExplainerStub, scenes, model: str) -> None:  # noqa: ANN001
    x = inputs_of(scenes, [0])
    found = first_detection(stub, model, x)
    target = pb.Target(detection=pb.DetectionTarget(box=found.box, label=found.label))
    reply = explain(stub, model, pb.METHOD_DRISE, x, target)
    maps = tensor_to_array(reply.saliency)
    assert maps.shape == (1, SIZE, SIZE) and len(reply.explained) == 1
    explained = reply.explained[0]
    assert explained.label == found.label and explained.item == 0
    assert abs(explained.box.x1 - found.box.x1) < 1e-4 and explained.score > 0
    assert reply.cost.method == pb.METHOD_DRISE and reply.cost.forward_passes == 1 + 200
    # The map's mass sits on the detected object: its ground-truth mask, found by IoU.
    box = np.array([found.box.x1, found.box.y1, found.box.x2, found.box.y2])
    objects = scenes.scenes[0]
    best = int(np.argmax(det.box_iou(box[None], objects.boxes)[0]))
    mask = objects.masks[best]
    assert maps[0][mask].mean() > 1.5 * maps[0][~mask].mean()


def test_rise_on_a_detector_is_drise_with_rises_grid(stub: pb_grpc.ExplainerStub,
                                                     scenes) -> None:  # noqa: ANN001
    x = inputs_of(scenes, [1])
    found = first_detection(stub, "grid", x)
    target = pb.Target(detection=pb.DetectionTarget(box=found.box, class_index=found.class_index))
    rise = explain(stub, "grid", pb.METHOD_RISE, x, target)
    drise = stub.Explain(pb.ExplainRequest(
        model="grid", method=pb.METHOD_DRISE, input=tensor_input(x), seed=3, target=target,
        drise=pb.RiseParams(masks=200, cells=7)), timeout=300)
    np.testing.assert_allclose(tensor_to_array(rise.saliency), tensor_to_array(drise.saliency),
                               atol=1e-6)


def test_the_default_target_is_every_detection_one_map_each(stub: pb_grpc.ExplainerStub,
                                                            scenes) -> None:  # noqa: ANN001
    x = inputs_of(scenes, [0, 2])
    predicted = stub.Predict(pb.PredictRequest(model="grid", input=tensor_input(x)), timeout=60)
    counts = [len(d.detections) for d in predicted.detections]
    reply = explain(stub, "grid", pb.METHOD_OCCLUSION, x)
    assert tensor_to_array(reply.saliency).shape == (sum(counts), SIZE, SIZE)
    assert [e.item for e in reply.explained] == [i for i, n in enumerate(counts)
                                                 for _ in range(n)]
    assert list(reply.targets) == [e.class_index for e in reply.explained]
    best = max(d.score for d in predicted.detections[0].detections)
    above = explain(stub, "grid", pb.METHOD_OCCLUSION, x[:1],
                    pb.Target(min_score=best - 1e-6))
    assert len(above.explained) == 1 and abs(above.explained[0].score - best) < 1e-5


def test_a_segmenter_explains_a_region_of_one_class(stub: pb_grpc.ExplainerStub,
                                                    scenes) -> None:  # noqa: ANN001
    x = inputs_of(scenes, [0])
    predicted = tensor_to_array(stub.Predict(pb.PredictRequest(
        model="unet", input=tensor_input(x)), timeout=60).class_map)[0]
    label = int(np.bincount(predicted[predicted > 0].ravel()).argmax())
    reply = explain(stub, "unet", pb.METHOD_RISE, x,
                    pb.Target(region=pb.RegionTarget(label=SEGMENT_LABELS[label])))
    assert len(reply.explained) == 1
    assert reply.explained[0].region_pixels == int((predicted == label).sum())
    maps = tensor_to_array(reply.saliency)[0]
    region = predicted == label
    assert maps[region].mean() > maps[~region].mean()
    default = explain(stub, "unet", pb.METHOD_OCCLUSION, x)
    present = sorted(int(c) for c in np.unique(predicted) if c > 0)
    assert [e.class_index for e in default.explained] == present
    boxed = explain(stub, "unet", pb.METHOD_OCCLUSION, x, pb.Target(region=pb.RegionTarget(
        class_index=label, box=pb.Box(x1=0, y1=0, x2=32, y2=32))))
    assert boxed.explained[0].region_pixels == 32 * 32


# ---- refusals ---------------------------------------------------------------------------------


def test_bad_targets_are_invalid_argument_naming_what_to_change(
        stub: pb_grpc.ExplainerStub, scenes) -> None:  # noqa: ANN001
    x = inputs_of(scenes, [0])
    found = first_detection(stub, "grid", x)
    outside = pb.Target(detection=pb.DetectionTarget(box=pb.Box(x1=10, y1=10, x2=90, y2=20),
                                                     label=found.label))
    assert "lies outside the 64×64 model input" in refused(
        lambda: explain(stub, "grid", pb.METHOD_DRISE, x, outside))
    lacking = pb.Target(detection=pb.DetectionTarget(box=found.box, label="car"))
    assert "has no class 'car'" in refused(
        lambda: explain(stub, "grid", pb.METHOD_DRISE, x, lacking))
    far = pb.Target(detection=pb.DetectionTarget(box=pb.Box(x1=0, y1=0, x2=2, y2=2),
                                                 label=found.label))
    assert "Use a box and class from Predict's detections" in refused(
        lambda: explain(stub, "grid", pb.METHOD_DRISE, x, far))
    assert "explains regions" in refused(lambda: explain(
        stub, "unet", pb.METHOD_RISE, x, pb.Target(per_item=pb.ClassIndices(indices=[1]))))
    assert "not offered" in _not_found(lambda: explain(stub, "unet", pb.METHOD_DRISE, x))
    assert "min_score" in refused(lambda: explain(stub, "grid", pb.METHOD_RISE, x,
                                                  pb.Target(min_score=0.9999)))


def _not_found(call) -> str:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    return caught.value.details()


def test_over_http_detections_and_refusals_are_json(http: httpx.Client,
                                                   scenes) -> None:  # noqa: ANN001
    x = inputs_of(scenes, [0])
    tensor = {"shape": list(x.shape), "dtype": "DTYPE_FLOAT32",
              "data": base64.b64encode(array_to_tensor(x).data).decode()}
    predicted = http.post("/api/v1/predict", json={"model": "grid", "input": {"tensor": tensor}})
    assert predicted.status_code == 200, predicted.text
    detection = predicted.json()["detections"][0]["detections"][0]
    body = {"model": "grid", "method": "METHOD_DRISE", "input": {"tensor": tensor},
            "drise": {"masks": 100},
            "target": {"detection": {"box": detection["box"], "label": detection["label"]}}}
    reply = http.post("/api/v1/explain", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["explained"][0]["label"] == detection["label"]
    body["target"] = {"detection": {"box": {"x1": 0, "y1": 0, "x2": 99, "y2": 9},
                                    "label": detection["label"]}}
    bad = http.post("/api/v1/explain", json=body)
    assert bad.status_code == 400 and "outside" in bad.json()["error"]["message"]


# ---- gradients on a target's score ---------------------------------------------------------


def test_gradient_methods_are_offered_where_the_graph_translates(
        stub: pb_grpc.ExplainerStub) -> None:
    for model in ("grid", "unet"):
        info = stub.GetModel(pb.GetModelRequest(model=model), timeout=60)
        names = {m.name for m in info.methods}
        assert {"vanilla_gradient", "integrated_gradients", "smoothgrad"} <= names
        reasons = {m.name: m.reason for m in info.unavailable_methods}
        assert "needs scale outputs" in reasons["fastcam"]
    nms = stub.GetModel(pb.GetModelRequest(model="nms"), timeout=60)
    reasons = {m.name: m.reason for m in nms.unavailable_methods}
    assert "NMS inside its graph" in reasons["vanilla_gradient"]


def test_gradients_of_a_detection_point_at_its_object(stub: pb_grpc.ExplainerStub,
                                                      scenes) -> None:  # noqa: ANN001
    x = inputs_of(scenes, [0])
    found = first_detection(stub, "grid", x)
    target = pb.Target(detection=pb.DetectionTarget(box=found.box, label=found.label))
    for method in (pb.METHOD_VANILLA_GRADIENT, pb.METHOD_INTEGRATED_GRADIENTS):
        reply = explain(stub, "grid", method, x, target)
        maps = tensor_to_array(reply.saliency)
        assert maps.shape == (1, SIZE, SIZE) and reply.cost.backward_passes >= 1
        box = np.array([found.box.x1, found.box.y1, found.box.x2, found.box.y2])
        best = int(np.argmax(det.box_iou(box[None], scenes.scenes[0].boxes)[0]))
        mask = scenes.scenes[0].masks[best]
        assert maps[0][mask].mean() > maps[0][~mask].mean(), pb.Method.Name(method)


def test_overlays_are_one_per_target_with_its_box_outlined(stub: pb_grpc.ExplainerStub,
                                                           scenes) -> None:  # noqa: ANN001
    from saliency_service.render.drawing import outlined  # noqa: PLC0415

    x = inputs_of(scenes, [0])
    reply = explain(stub, "grid", pb.METHOD_OCCLUSION, x, return_overlay=True)
    assert len(reply.overlays) == len(reply.explained) >= 1
    assert all(png.startswith(b"\x89PNG") for png in reply.overlays)
    grey = np.full((20, 20, 3), 128, np.uint8)
    drawn = outlined(grey, np.array([4, 4, 12, 12], np.float32))
    assert (drawn[4, 4:12] == 0).all() and (drawn[4:12, 11] == 0).all()  # the black edge
    assert (drawn[5, 5:11] == 255).all()  # the white line inside it
    assert (drawn[8, 8] == 128).all() and (drawn[0, 0] == 128).all()


def test_boxes_of_one_image_share_drises_masks_and_passes(stub: pb_grpc.ExplainerStub,
                                                          scenes) -> None:  # noqa: ANN001
    """Every box of an image is explained from the same masked images: one pass per mask
    however many boxes, and each box's map is the one it gets alone."""
    predicted = stub.Predict(pb.PredictRequest(
        model="grid", input=tensor_input(inputs_of(scenes, list(range(6))))), timeout=60)
    item = next(i for i, d in enumerate(predicted.detections) if len(d.detections) >= 2)
    x = inputs_of(scenes, [item])
    found = predicted.detections[item].detections
    every = explain(stub, "grid", pb.METHOD_DRISE, x)
    assert len(every.explained) == len(found) >= 2
    assert every.cost.forward_passes == 1 + 200  # the prediction, then one pass per mask
    maps = tensor_to_array(every.saliency)
    for index, detection in enumerate(found[:2]):
        alone = explain(stub, "grid", pb.METHOD_DRISE, x, pb.Target(
            detection=pb.DetectionTarget(box=detection.box, label=detection.label)))
        np.testing.assert_allclose(tensor_to_array(alone.saliency)[0], maps[index], atol=1e-5)


def test_kserve_v1_answers_detections_and_one_explanation_per_target(
        http: httpx.Client, stub: pb_grpc.ExplainerStub, scenes) -> None:  # noqa: ANN001
    x = inputs_of(scenes, [0])
    predicted = http.post("/v1/models/grid:predict", json={"instances": x.tolist()})
    assert predicted.status_code == 200, predicted.text
    detections = predicted.json()["predictions"][0]["detections"]
    grpc_found = stub.Predict(pb.PredictRequest(model="grid", input=tensor_input(x)),
                              timeout=60).detections[0].detections
    assert [d["label"] for d in detections] == [d.label for d in grpc_found]
    explained = http.post("/v1/models/grid:explain", json={
        "instances": x.tolist(), "method": "occlusion"}).json()
    assert len(explained["explanations"]) == len(detections)
    first = explained["explanations"][0]
    assert first["item"] == 0 and first["label"] == detections[0]["label"]
    assert np.asarray(first["saliency"]).shape == (SIZE, SIZE)
    segmented = http.post("/v1/models/unet:predict", json={"instances": x.tolist()}).json()
    assert np.asarray(segmented["predictions"][0]["class_map"]).shape == (SIZE, SIZE)


def test_all_targets_similarities_equal_drises_one_at_a_time(repository: Path,
                                                              scenes) -> None:  # noqa: ANN001
    from saliency_service.core.dense import DenseTarget, similarities  # noqa: PLC0415

    session = ort.InferenceSession(str(repository / "grid" / "1" / ONNX_FILE))
    (raw,) = session.run(["raw"], {"input": inputs_of(scenes, [0, 1, 2, 3])})
    found = det.decode_grid(raw, STRIDE, ANCHOR)
    reported = det.select(found[0], SCORE_THRESHOLD, NMS_IOU, MAX_DETECTIONS)
    targets = [DenseTarget(0, int(reported.classes[i]), reported.boxes[i], 0.0,
                           reported.class_probabilities[i]) for i in range(len(reported))]
    together = similarities(found, targets)
    for index, target in enumerate(targets):
        alone = det.drise_similarity(target.box, target.vector, found)
        np.testing.assert_allclose(together[:, index], alone, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("model", "target", "expected"), [
    ("grid", pb.Target(detection=pb.DetectionTarget(
        box=pb.Box(x1=float("nan"), y1=0, x2=9, y2=9), label="disc")), "4 finite numbers"),
    ("grid", pb.Target(detection=pb.DetectionTarget(
        box=pb.Box(x1=0, y1=0, x2=9, y2=9), label="<b>" * 20000)), "has no class"),
    ("grid", pb.Target(min_score=float("inf")), "must be in [0, 1]"),
    ("grid", pb.Target(min_score=float("nan")), "must be in [0, 1]"),
    ("unet", pb.Target(region=pb.RegionTarget(class_index=1, mask=array_to_tensor(
        np.ones((3, SIZE, SIZE), np.float32)))), "a region mask is 64×64"),
    ("unet", pb.Target(region=pb.RegionTarget(class_index=1, mask=array_to_tensor(
        np.zeros((SIZE, SIZE), np.float32)))), "selects no pixel"),
    ("unet", pb.Target(region=pb.RegionTarget(class_index=10**6)), "is not one of"),
])
def test_hostile_targets_are_refused_in_a_short_message(
        stub: pb_grpc.ExplainerStub, scenes, model: str, target: pb.Target,  # noqa: ANN001
        expected: str) -> None:
    details = refused(lambda: explain(stub, model, pb.METHOD_OCCLUSION, inputs_of(scenes, [0]),
                                      target))
    assert expected in details and len(details) < 2000, details[:300]


# ---- METHOD_AUTO and ExplainStream, as for classifiers -----------------------------------------


@pytest.mark.parametrize("model", ["grid", "nms", "unet"])
def test_auto_and_the_stream_explain_every_target(stub: pb_grpc.ExplainerStub, scenes,  # noqa: ANN001
                                                   model: str) -> None:
    """METHOD_AUTO picks a method the model offers and answers a map per target, echoed; a
    DE-CAM stream reports progress and ends in the same maps as Explain."""
    x = inputs_of(scenes, [0])
    reply = stub.Explain(pb.ExplainRequest(model=model, method=pb.METHOD_AUTO,
                                           input=tensor_input(x), seed=1), timeout=300)
    assert reply.cost.method not in (pb.METHOD_AUTO, pb.METHOD_UNSPECIFIED)
    assert reply.saliency.shape[0] == len(reply.explained) >= 1
    request = pb.ExplainRequest(model=model, method=pb.METHOD_DECAM, input=tensor_input(x),
                                seed=1, decam=pb.DecamParams(population=8, generations=3))
    updates = list(stub.ExplainStream(request, timeout=300))
    kinds = [update.WhichOneof("update") for update in updates]
    assert kinds[-1] == "result" and "progress" in kinds[:-1]
    final = updates[-1].result
    direct = stub.Explain(request, timeout=300)
    np.testing.assert_array_equal(tensor_to_array(final.saliency), tensor_to_array(direct.saliency))
    assert [t.box for t in final.explained] == [t.box for t in direct.explained]
