"""The scene detector and segmenters the detection tests share, and their ground-truth scores.

Run as a module for the ground-truth table of ``docs/detection.md`` (more scenes and masks than
the tests use)::

    nice -n 10 .venv/bin/python -m tests.detection_support --scenes 100 --masks 1000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from saliency_service.core import detections as det
from saliency_service.core.errors import InvalidInput
from saliency_service.evaluation import metrics
from saliency_service.evaluation.scenes import CLASSES, SceneBatch, SceneConfig, generate
from saliency_service.methods._utils import dense_cam
from saliency_service.methods._utils.drise import (
    DetectionTarget,
    DetectorForward,
    drise,
    grid_forward,
    post_nms_forward,
    to_maps,
)
from saliency_service.methods.perturbation import RiseMasks
from saliency_service.zoo.detectors import (
    ANCHOR,
    MAX_DETECTIONS,
    NMS_IOU,
    SCORE_THRESHOLD,
    STRIDE,
    GridDetector,
    NmsDetector,
    decode_torch,
    export_onnx,
    preprocess,
)
from saliency_service.zoo.segmenters import DilatedSegmenter, UNetSegmenter
from tests.fixtures.make_detection_models import FOLDER, load

SIZE = 64
EVALUATION_SEED = 2  # scenes neither the training (0) nor the accuracy check (1) used
POST_NMS_OUTPUTS = ["boxes", "scores", "classes"]


@dataclass
class Trained:
    """The shipped models as PyTorch modules and as exported ONNX files."""

    grid: GridDetector
    nms: NmsDetector
    unet: UNetSegmenter
    dilated: DilatedSegmenter
    onnx: dict[str, Path] = field(default_factory=dict)


def load_trained(folder: Path) -> Trained:
    """Loads the shipped weights and exports each model to ``folder``."""
    grid = load(GridDetector(), FOLDER / "grid_detector.npz")
    assert isinstance(grid, GridDetector)
    trained = Trained(grid, NmsDetector(grid).eval(),
                      load(UNetSegmenter(), FOLDER / "unet_segmenter.npz"),  # type: ignore[arg-type]
                      load(DilatedSegmenter(), FOLDER / "dilated_segmenter.npz"))  # type: ignore[arg-type]
    for name, module, outputs in (("grid", trained.grid, ["raw"]),
                                  ("nms", trained.nms, POST_NMS_OUTPUTS),
                                  ("unet", trained.unet, ["logits"]),
                                  ("dilated", trained.dilated, ["logits"])):
        trained.onnx[name] = export_onnx(module, folder / f"{name}.onnx", SIZE, outputs)
    return trained


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_forward(path: Path, kind: str) -> DetectorForward:
    """D-RISE's forward over an exported detector (``kind``: "grid" or "nms")."""
    running = session(path)
    if kind == "grid":
        return grid_forward(lambda batch: running.run(None, {"input": batch})[0], STRIDE,
                            ANCHOR)
    return post_nms_forward(lambda batch: running.run(None, {"input": batch}), len(CLASSES))


def reported(raw: np.ndarray) -> tuple[list[det.Detections], list[np.ndarray]]:
    """Per image the detections the service would report for a raw grid head, and their
    cells (indices into the proposals)."""
    found, cells = [], []
    for proposals in det.decode_grid(raw, STRIDE, ANCHOR):
        chosen = det.select_indices(proposals, SCORE_THRESHOLD, NMS_IOU, MAX_DETECTIONS)
        found.append(proposals.take(chosen))
        cells.append(chosen)
    return found, cells


@dataclass(frozen=True)
class BoxTarget:
    """One ground-truth object explained as a detection: the scene, the object, the matched
    detection's row and cell, and the target D-RISE uses."""

    scene: int
    obj: int
    row: int
    cell: int
    target: DetectionTarget


def box_targets(grid: GridDetector, scenes: SceneBatch) -> list[BoxTarget]:
    """Every ground-truth object a client would name (its box and class) that matches one of
    the detector's detections; objects the detector misses are left out."""
    with torch.no_grad():
        raw = grid(preprocess(scenes.images)).numpy()
    found, cells = reported(raw)
    targets = []
    for index, scene in enumerate(scenes.scenes):
        for obj, (box, label) in enumerate(zip(scene.boxes, scene.classes, strict=True)):
            try:
                row = det.match_detection(found[index], det.check_box(box, SIZE, SIZE),
                                          int(label), CLASSES)
            except InvalidInput:
                continue
            targets.append(BoxTarget(index, obj, row, int(cells[index][row]),
                                     DetectionTarget.of(found[index].boxes[row], int(label),
                                                        len(CLASSES))))
    return targets


def bootstrap_interval(values: Sequence[float], samples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean."""
    array = np.asarray(values, np.float64)
    means = array[np.random.default_rng(seed).integers(0, len(array),
                                                       (samples, len(array)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class Scores:
    """Per target: relevance mass and pointing of the method's map, and of a uniform map."""

    mass: list[float] = field(default_factory=list)
    pointing: list[float] = field(default_factory=list)
    uniform: list[float] = field(default_factory=list)

    def add(self, saliency: np.ndarray, mask: np.ndarray) -> None:
        self.mass.append(float(metrics.relevance_mass(saliency[None], mask[None])[0]))
        self.pointing.append(float(metrics.pointing_game(saliency[None], mask[None])[0]))
        # A constant map: its mass and its expected pointing hit are the object's area share.
        self.uniform.append(float(mask.mean()))

    def gain_interval(self) -> tuple[float, float]:
        """Bootstrap interval of the mean of mass − uniform over targets."""
        return bootstrap_interval(np.subtract(self.mass, self.uniform))


def drise_scores(forward: DetectorForward, scenes: SceneBatch, targets: list[BoxTarget],
                 masks: int, cells: int = 8) -> Scores:
    """D-RISE maps (one call per scene, a map per target box) scored against each target
    object's mask."""
    scores = Scores()
    inputs = preprocess(scenes.images).numpy()
    for index in sorted({t.scene for t in targets}):
        mine = [t for t in targets if t.scene == index]
        maps = to_maps(drise(inputs[index], [t.target for t in mine], forward,
                             np.random.default_rng(index), masks=masks, cells=cells))
        for target, saliency in zip(mine, maps, strict=True):
            scores.add(saliency, scenes.scenes[index].masks[target.obj])
    return scores


def grad_cam_scores(grid: GridDetector, scenes: SceneBatch, targets: list[BoxTarget]) -> Scores:
    """Grad-CAM on each target's box score, scored against its object's mask."""
    scores = Scores()
    inputs = preprocess(scenes.images)
    for target in targets:
        saliency = dense_cam.grad_cam(
            grid, grid.cam_layer, inputs[target.scene:target.scene + 1],
            dense_cam.grid_box_score(torch.tensor([target.cell]),
                                     torch.tensor([int(target.target.vector.argmax())])))
        scores.add(saliency[0], scenes.scenes[target.scene].masks[target.obj])
    return scores


def seg_grad_cam_scores(model: nn.Module, scenes: SceneBatch) -> Scores:
    """Seg-Grad-CAM for each object's class over the object's box, scored against its mask."""
    scores = Scores()
    inputs = preprocess(scenes.images)
    for index, scene in enumerate(scenes.scenes):
        for box, label, mask in zip(scene.boxes, scene.classes, scene.masks, strict=True):
            region = torch.from_numpy(det.region_from_box(box, SIZE, SIZE))[None]
            saliency = dense_cam.grad_cam(
                model, model.cam_layer, inputs[index:index + 1],
                dense_cam.region_score(torch.tensor([int(label) + 1]), region))
            scores.add(saliency[0], mask)
    return scores


# ---- wrappers in torchvision's detection output format, for pytorch-grad-cam ----------------


def torch_box_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``torchvision.ops.box_iou``, which pytorch-grad-cam's detection target calls."""
    low = torch.maximum(first[:, None, :2], second[None, :, :2])
    high = torch.minimum(first[:, None, 2:], second[None, :, 2:])
    intersection = (high - low).clamp(min=0).prod(dim=2)
    area_first = (first[:, 2:] - first[:, :2]).prod(dim=1)
    area_second = (second[:, 2:] - second[:, :2]).prod(dim=1)
    return intersection / (area_first[:, None] + area_second[None, :] - intersection)


class ReportedGrid(nn.Module):
    """The grid detector reporting, per image, its post-NMS detections as torchvision's
    detectors do (a dict of boxes, scores, labels). Boxes are detached: the target score is
    the box score × class probability, and the IoU only chooses the box."""

    def __init__(self, grid: GridDetector) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        raw = self.grid(x)
        boxes, objectness, probabilities = decode_torch(raw, STRIDE, ANCHOR)
        best, labels = probabilities.max(dim=2)
        scores = objectness * best
        _, cells = reported(raw.detach().numpy())
        return [{"boxes": boxes[n, chosen].detach(), "scores": scores[n, chosen],
                 "labels": labels[n, chosen]}
                for n, chosen in enumerate(torch.from_numpy(c) for c in cells)]


class ReportedNms(nn.Module):
    """The post-NMS detector's outputs as torchvision's detection dicts (padding dropped)."""

    def __init__(self, nms: NmsDetector) -> None:
        super().__init__()
        self.nms = nms

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        boxes, scores, classes = self.nms(x)
        kept = [scores[n] > 0 for n in range(len(x))]
        return [{"boxes": boxes[n, keep].detach(), "scores": scores[n, keep],
                 "labels": classes[n, keep]} for n, keep in enumerate(kept)]


# ---- the ground-truth table ------------------------------------------------------------------


def _row(name: str, scores: Scores, seconds: float) -> str:
    low, high = scores.gain_interval()
    return (f"| {name} | {len(scores.mass)} | {np.mean(scores.mass):.3f} | "
            f"{np.mean(scores.uniform):.3f} | {low:+.3f} … {high:+.3f} | "
            f"{np.mean(scores.pointing):.2f} | {seconds / len(scores.mass):.3f} |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--masks", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/detection-models"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    trained = load_trained(args.out)
    scenes = generate(args.scenes, SceneConfig(seed=EVALUATION_SEED))
    targets = box_targets(trained.grid, scenes)
    objects = sum(len(scene.classes) for scene in scenes.scenes)
    print(f"{len(targets)} of {objects} objects matched a detection; D-RISE with "
          f"{args.masks} masks, 8 cells")
    print("| method | targets | mass | uniform | mass − uniform (95 % CI) | pointing | "
          "CPU s per target |")
    print("|---|---|---|---|---|---|---|")
    runs: list[tuple[str, Callable[[], Scores]]] = [
        ("D-RISE, raw grid head", lambda: drise_scores(
            onnx_forward(trained.onnx["grid"], "grid"), scenes, targets, args.masks)),
        ("D-RISE, NMS in the graph", lambda: drise_scores(
            onnx_forward(trained.onnx["nms"], "nms"), scenes, targets, args.masks)),
        ("Grad-CAM, box score", lambda: grad_cam_scores(trained.grid, scenes, targets)),
        ("Seg-Grad-CAM, U-Net", lambda: seg_grad_cam_scores(trained.unet, scenes)),
        ("Seg-Grad-CAM, dilated", lambda: seg_grad_cam_scores(trained.dilated, scenes)),
    ]
    for name, run in runs:
        started = time.process_time()
        scores = run()
        print(_row(name, scores, time.process_time() - started), flush=True)
    print(rise_cost(trained, args.masks))


def rise_cost(trained: Trained, masks: int) -> str:
    """CPU seconds of one D-RISE call (all of a scene's boxes) against a classifier-style
    RISE pass at equal masks (the same masks and forward passes, one weight per mask)."""
    image = preprocess(generate(1, SceneConfig(seed=EVALUATION_SEED)).images).numpy()[0]
    forward = onnx_forward(trained.onnx["grid"], "grid")
    target = DetectionTarget.of(np.array([8, 8, 24, 24], np.float32), 0, len(CLASSES))
    timings = {}
    for boxes in (1, 4):
        started = time.process_time()
        drise(image, [target] * boxes, forward, np.random.default_rng(0), masks=masks)
        timings[boxes] = time.process_time() - started
    running = session(trained.onnx["grid"])
    drawn = RiseMasks(np.random.default_rng(0), masks, 8, 0.5, SIZE, SIZE)
    saliency = np.zeros((SIZE, SIZE))
    started = time.process_time()
    for start in range(0, masks, 64):
        rendered = drawn.render(slice(start, min(start + 64, masks)))
        (raw,) = running.run(None, {"input": image[None] * rendered[:, None]})
        weights = 1.0 / (1.0 + np.exp(-raw[:, 0].reshape(len(raw), -1).max(axis=1)))
        saliency += np.tensordot(weights, rendered, axes=1)
    plain = time.process_time() - started
    return (f"D-RISE, {masks} masks: {timings[1]:.2f} CPU s for 1 box, {timings[4]:.2f} for 4 "
            f"boxes ({timings[4] / 4:.2f} per box); RISE's work at equal masks on the same "
            f"network (one score per mask): {plain:.2f}")


if __name__ == "__main__":
    main()
