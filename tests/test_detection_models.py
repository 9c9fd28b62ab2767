"""The scene detectors and segmenters (``zoo.detectors``, ``zoo.segmenters``): their exports,
their accuracy, Grad-CAM on a box's or a region's score against pytorch-grad-cam, and D-RISE
against the ground truth of the generated scenes.

The models are the shipped weights (``tests/fixtures/make_detection_models.py`` trains them);
each is exported to ONNX once per session.
"""

from __future__ import annotations

import copy
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from saliency_service.core import detections as det
from saliency_service.evaluation.scenes import CLASSES, SceneConfig, generate
from saliency_service.methods._utils import dense_cam
from saliency_service.methods._utils.drise import DetectionTarget, drise
from saliency_service.zoo.detectors import detector_map, preprocess, train_detector
from saliency_service.zoo.segmenters import segmenter_miou, train_segmenter
from tests import detection_support as support
from tests.peer_grad_cam import import_pytorch_grad_cam

pytestmark = pytest.mark.usefixtures("one_thread")

CAM_TOLERANCE = 1e-4
DRISE_SCENES = 30
DRISE_MASKS = 300




@pytest.fixture(scope="module")
def held_out():
    return generate(200, SceneConfig(seed=1))


@pytest.fixture(scope="module")
def evaluation_scenes():
    return generate(DRISE_SCENES, SceneConfig(seed=support.EVALUATION_SEED))


@pytest.fixture(scope="module")
def targets(trained: support.Trained, evaluation_scenes) -> list[support.BoxTarget]:
    return support.box_targets(trained.grid, evaluation_scenes)


# ---- exports and accuracy --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["grid", "nms", "unet", "dilated"])
def test_exports_are_one_self_contained_file_that_runs_like_torch(
        trained: support.Trained, held_out, name: str) -> None:
    path: Path = trained.onnx[name]
    model = onnx.load(str(path), load_external_data=False)
    assert model.opset_import[0].version == 17
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert [p.name for p in path.parent.iterdir() if p.suffix != ".onnx"] == []
    inputs = preprocess(held_out.images[:7])
    module = getattr(trained, name)
    with torch.no_grad():
        expected = module(inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    outputs = support.session(path).run(None, {"input": inputs.numpy()})
    for mine, theirs in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(mine, theirs.numpy(), atol=2e-4, rtol=1e-4)


def test_nms_in_the_graph_reports_what_the_service_would(trained: support.Trained,
                                                         held_out) -> None:
    """The post-NMS export's detections equal decoding + NMS of the raw export's head."""
    inputs = preprocess(held_out.images[:40]).numpy()
    (raw,) = support.session(trained.onnx["grid"]).run(None, {"input": inputs})
    boxes, scores, classes = support.session(trained.onnx["nms"]).run(None, {"input": inputs})
    expected, _ = support.reported(raw)
    found = det.from_post_nms(boxes, scores, classes, len(CLASSES))
    assert sum(len(item) for item in found) > 40
    for mine, theirs in zip(found, expected, strict=True):
        np.testing.assert_array_equal(mine.classes, theirs.classes)
        np.testing.assert_allclose(mine.boxes, theirs.boxes, atol=1e-3)
        np.testing.assert_allclose(mine.scores, theirs.scores, atol=1e-5)


def test_the_shipped_models_are_accurate_on_held_out_scenes(trained: support.Trained,
                                                            held_out) -> None:
    assert detector_map(trained.grid, held_out) >= 0.85
    assert detector_map(trained.nms, held_out) >= 0.85
    assert segmenter_miou(trained.unet, held_out) >= 0.7
    assert segmenter_miou(trained.dilated, held_out) >= 0.7


def test_training_is_deterministic_from_its_seed() -> None:
    scenes = generate(64, SceneConfig(seed=5))
    first, second = (train_detector(scenes, seed=3, epochs=4) for _ in range(2))
    other = train_detector(scenes, seed=4, epochs=4)
    for key, value in first.state_dict().items():
        torch.testing.assert_close(value, second.state_dict()[key], rtol=0, atol=0)
    assert not torch.equal(first.head.weight, other.head.weight)
    segmenters = [train_segmenter("dilated", scenes, seed=3, epochs=4)
                  for _ in range(2)]
    for key, value in segmenters[0].state_dict().items():
        torch.testing.assert_close(value, segmenters[1].state_dict()[key], rtol=0, atol=0)


# ---- Grad-CAM against pytorch-grad-cam -------------------------------------------------------


@pytest.fixture(scope="module")
def grad_cam_library():
    """pytorch-grad-cam with the one torchvision function its detection target calls."""
    library, _ = import_pytorch_grad_cam()
    from pytorch_grad_cam.utils import model_targets  # noqa: PLC0415

    saved = model_targets.torchvision
    model_targets.torchvision = types.SimpleNamespace(
        ops=types.SimpleNamespace(box_iou=support.torch_box_iou))
    yield library, model_targets
    model_targets.torchvision = saved


def library_cam(library, module: torch.nn.Module, layer: str, inputs: torch.Tensor,
                targets: list) -> np.ndarray:
    # The library's backward fills the parameters' .grad: it gets its own copy.
    module = copy.deepcopy(module)
    with library.GradCAM(model=module, target_layers=[module.get_submodule(layer)]) as cam:
        return cam(input_tensor=inputs, targets=targets)


def assert_same_cam(mine: np.ndarray, theirs: np.ndarray) -> None:
    """Equal to ``CAM_TOLERANCE`` once each is divided by its maximum. The library scales
    the layer's map by ``max + 1e-7`` before upsampling it and again after: where a score is
    saturated the raw map spans about 1e-4, and that floor alone shrinks its peak by 1e-3."""
    assert theirs.max() > 0 and mine.max() > 0
    np.testing.assert_allclose(mine / mine.max(), theirs / theirs.max(), atol=CAM_TOLERANCE,
                               rtol=0)


def test_grad_cam_on_a_raw_head_box_score_matches_pytorch_grad_cam(
        trained: support.Trained, evaluation_scenes, targets, grad_cam_library) -> None:
    library, model_targets = grad_cam_library
    inputs = preprocess(evaluation_scenes.images)
    wrapper = support.ReportedGrid(trained.grid).eval()
    for target in targets[:12]:
        image = inputs[target.scene:target.scene + 1]
        label = int(target.target.vector.argmax())
        mine = dense_cam.grad_cam(trained.grid, trained.grid.cam_layer, image,
                                  dense_cam.grid_box_score(torch.tensor([target.cell]),
                                                           torch.tensor([label])))
        box = evaluation_scenes.scenes[target.scene].boxes[target.obj]
        theirs = library_cam(library, wrapper, "grid." + trained.grid.cam_layer, image,
                             [model_targets.FasterRCNNBoxScoreTarget([label], [box])])
        assert_same_cam(mine, theirs)


def test_grad_cam_on_a_post_nms_box_score_matches_pytorch_grad_cam(
        trained: support.Trained, evaluation_scenes, grad_cam_library) -> None:
    library, model_targets = grad_cam_library
    inputs = preprocess(evaluation_scenes.images[:6])
    with torch.no_grad():
        boxes, scores, classes = (v.numpy() for v in trained.nms(inputs))
    found = det.from_post_nms(boxes, scores, classes, len(CLASSES))
    wrapper = support.ReportedNms(trained.nms).eval()
    compared = 0
    for index, scene in enumerate(evaluation_scenes.scenes[:6]):
        for box, label in zip(scene.boxes, scene.classes, strict=True):
            row = det.match_detection(found[index], box, int(label), CLASSES)
            image = inputs[index:index + 1]
            mine = dense_cam.grad_cam(trained.nms, trained.nms.cam_layer, image,
                                      dense_cam.post_nms_score(torch.tensor([row])))
            theirs = library_cam(library, wrapper, "nms." + trained.nms.cam_layer, image,
                                 [model_targets.FasterRCNNBoxScoreTarget([int(label)], [box])])
            assert_same_cam(mine, theirs)
            compared += 1
    assert compared >= 8


@pytest.mark.parametrize("name", ["unet", "dilated"])
def test_seg_grad_cam_matches_pytorch_grad_cam(trained: support.Trained, evaluation_scenes,
                                               grad_cam_library, name: str) -> None:
    library, model_targets = grad_cam_library
    module = getattr(trained, name)
    inputs = preprocess(evaluation_scenes.images[:4])
    with torch.no_grad():
        logits = module(inputs).numpy()
    for index, scene in enumerate(evaluation_scenes.scenes[:4]):
        label = int(scene.classes[0]) + 1
        regions = [det.region_from_box(scene.boxes[0], support.SIZE, support.SIZE),
                   det.predicted_region(logits[index], label, ("background", *CLASSES))]
        for region in regions:
            image = inputs[index:index + 1]
            mine = dense_cam.grad_cam(module, module.cam_layer, image, dense_cam.region_score(
                torch.tensor([label]), torch.from_numpy(region)[None]))
            target = model_targets.SemanticSegmentationTarget(label, region.astype(np.float32))
            theirs = library_cam(library, module, module.cam_layer, image, [target])
            assert_same_cam(mine, theirs)


def test_grad_cam_leaves_the_module_as_it_was(trained: support.Trained, held_out) -> None:
    module = trained.unet
    before = {key: value.clone() for key, value in module.state_dict().items()}
    everywhere = torch.ones(2, support.SIZE, support.SIZE, dtype=torch.bool)
    dense_cam.grad_cam(module, module.cam_layer, preprocess(held_out.images[:2]),
                       dense_cam.region_score(torch.tensor([1, 2]), everywhere))
    assert not module._forward_hooks and not module.decoder2._forward_hooks
    assert all(p.grad is None for p in module.parameters())
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


# ---- D-RISE against the ground truth ---------------------------------------------------------


def test_drise_puts_relevance_on_the_target_object(trained: support.Trained, evaluation_scenes,
                                                   targets) -> None:
    """Over 30 scenes, one map per matched box: the relevance mass on the target's object
    beats the uniform map's (the object's area share) with a bootstrap interval above 0 and
    by twice on average, and the map's peak lies on the object."""
    assert len(targets) >= 60
    forward = support.onnx_forward(trained.onnx["grid"], "grid")
    scores = support.drise_scores(forward, evaluation_scenes, targets, DRISE_MASKS)
    low, _ = scores.gain_interval()
    assert low > 0
    assert np.mean(scores.mass) > 2 * np.mean(scores.uniform)
    assert np.mean(scores.pointing) >= 0.9


def test_drise_explains_a_post_nms_detector(trained: support.Trained, evaluation_scenes,
                                            targets) -> None:
    chosen = [t for t in targets if t.scene < 10]
    forward = support.onnx_forward(trained.onnx["nms"], "nms")
    scores = support.drise_scores(forward, evaluation_scenes, chosen, DRISE_MASKS)
    assert np.mean(scores.mass) > 2 * np.mean(scores.uniform)
    assert np.mean(scores.pointing) >= 0.9


def test_drise_maps_differ_per_box_and_do_not_depend_on_the_chunking(
        trained: support.Trained, evaluation_scenes, targets) -> None:
    scene = next(t.scene for t in targets
                 if sum(u.scene == t.scene for u in targets) >= 2)
    mine = [t.target for t in targets if t.scene == scene]
    forward = support.onnx_forward(trained.onnx["grid"], "grid")
    image = preprocess(evaluation_scenes.images[scene:scene + 1]).numpy()[0]
    maps = drise(image, mine, forward, np.random.default_rng(0), masks=96, batch_size=64)
    rechunked = drise(image, mine, forward, np.random.default_rng(0), masks=96, batch_size=7)
    np.testing.assert_allclose(maps, rechunked, rtol=1e-5, atol=1e-6)
    assert np.abs(maps[0] - maps[1]).max() > 0.1 * maps.max()
    single = drise(image, mine[:1], forward, np.random.default_rng(0), masks=96)
    np.testing.assert_allclose(single[0], maps[0], rtol=1e-6)


def test_drise_of_a_target_nothing_resembles_is_zero(trained: support.Trained,
                                                     evaluation_scenes) -> None:
    forward = support.onnx_forward(trained.onnx["grid"], "grid")
    image = preprocess(evaluation_scenes.images[:1]).numpy()[0]
    far = DetectionTarget(np.array([-50, -50, -40, -40], np.float32), np.array([1.0, 0, 0]))
    assert not drise(image, [far], forward, np.random.default_rng(0), masks=16).any()
    with pytest.raises(ValueError, match="at least one target"):
        drise(image, [], forward, np.random.default_rng(0), masks=16)

