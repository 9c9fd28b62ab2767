"""Small one-stage detectors for the generated scenes (``evaluation.scenes``).

- ``GridDetector``: YOLO-style, one anchor per cell of a stride-8 grid; its forward returns
  the raw head N×(5 + K)×S×S (``core.detections`` documents the layout and decodes it), so the
  service does the decoding and NMS.
- ``NmsDetector``: the same network with decoding and class-aware greedy NMS inside the graph;
  its forward returns post-NMS ``boxes`` N×M×4, ``scores`` N×M and ``classes`` N×M (rows past
  the detections found have score 0 and class −1).

Both export to one self-contained ONNX file (opset 17, weights embedded). Training is
deterministic from a seed for a given thread count and leaves the caller's thread count and
global RNG state as they were. Every ReLU is its own module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from saliency_service.core.detections import decode_grid, select
from saliency_service.evaluation.scenes import CLASSES, SceneBatch, mean_average_precision

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
OPSET = 17
STRIDE = 8
ANCHOR = 16.0  # pixels: the middle of the scenes' object sides (10 to 22 at 64×64)
SCORE_THRESHOLD = 0.3
NMS_IOU = 0.45
MAX_DETECTIONS = 8


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 → the normalized float N×3×H×W tensor the models take."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1,
                 dilation: int = 1) -> nn.Sequential:
    """3×3 convolution (padding keeps the size at stride 1), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, dilation, dilation, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU())


class GridDetector(nn.Module):
    """Three stride-2 stages to a stride-8 grid, a dilated context block (``features``, the
    Grad-CAM layer) and a 1×1 head of objectness, box offsets and class logits."""

    cam_layer: ClassVar[str] = "features"
    stride: ClassVar[int] = STRIDE
    anchor: ClassVar[float] = ANCHOR

    def __init__(self, classes: int = len(CLASSES), width: int = 16) -> None:
        super().__init__()
        self.classes = classes
        self.backbone = nn.Sequential(
            conv_bn_relu(3, width), conv_bn_relu(width, width, stride=2),
            conv_bn_relu(width, 2 * width), conv_bn_relu(2 * width, 2 * width, stride=2),
            conv_bn_relu(2 * width, 2 * width), conv_bn_relu(2 * width, 3 * width, stride=2))
        self.features = nn.Sequential(conv_bn_relu(3 * width, 3 * width, dilation=2),
                                      conv_bn_relu(3 * width, 3 * width))
        self.head = nn.Conv2d(3 * width, 5 + classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.backbone(x)))


def decode_torch(raw: torch.Tensor, stride: float, anchor: float,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Differentiable twin of ``core.detections.decode_grid``: boxes N×S²×4, objectness N×S²
    and class probabilities N×S²×K (row-major cells)."""
    batch, channels, rows, columns = raw.shape
    cell_y = torch.arange(rows, dtype=raw.dtype).view(1, rows, 1).expand(1, rows, columns)
    cell_x = torch.arange(columns, dtype=raw.dtype).view(1, 1, columns).expand(1, rows, columns)
    centre_x = (cell_x + torch.sigmoid(raw[:, 1])) * stride
    centre_y = (cell_y + torch.sigmoid(raw[:, 2])) * stride
    half_w = 0.5 * anchor * torch.exp(raw[:, 3].clamp(-10, 10))
    half_h = 0.5 * anchor * torch.exp(raw[:, 4].clamp(-10, 10))
    boxes = torch.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w,
                         centre_y + half_h], dim=-1).reshape(batch, -1, 4)
    objectness = torch.sigmoid(raw[:, 0]).reshape(batch, -1)
    probabilities = torch.softmax(raw[:, 5:], dim=1).reshape(batch, channels - 5, -1)
    return boxes, objectness, probabilities.transpose(1, 2)


def _pairwise_iou(boxes: torch.Tensor) -> torch.Tensor:
    """N×C×C IoU of each image's C boxes with each other."""
    low = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
    high = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    intersection = (high - low).clamp(min=0).prod(dim=3)
    area = (boxes[:, :, 2:] - boxes[:, :, :2]).clamp(min=0).prod(dim=2)
    union = area[:, :, None] + area[:, None, :] - intersection
    return intersection / union.clamp(min=1e-9)


class NmsDetector(nn.Module):
    """A ``GridDetector`` with decoding and class-aware greedy NMS in the graph.

    NMS runs over the ``candidates`` best-scoring cells, unrolled so that the exported graph
    has static shapes and no loop: a candidate is kept when it scores at least
    ``score_threshold`` and no kept candidate of its class with a higher score overlaps it by
    more than ``iou_threshold``, as ``core.detections.select`` does.
    """

    cam_layer: ClassVar[str] = "grid.features"

    def __init__(self, grid: GridDetector, score_threshold: float = SCORE_THRESHOLD,
                 iou_threshold: float = NMS_IOU, candidates: int = 16,
                 max_detections: int = MAX_DETECTIONS) -> None:
        super().__init__()
        self.grid = grid
        self.score_threshold, self.iou_threshold = score_threshold, iou_threshold
        self.candidates, self.max_detections = candidates, max_detections

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes, objectness, probabilities = decode_torch(self.grid(x), self.grid.stride,
                                                        self.grid.anchor)
        best, classes = probabilities.max(dim=2)
        scores, order = (objectness * best).topk(self.candidates, dim=1)
        boxes = torch.gather(boxes, 1, order.unsqueeze(2).expand(-1, -1, 4))
        classes = torch.gather(classes, 1, order)
        suppresses = ((_pairwise_iou(boxes) > self.iou_threshold)
                      & (classes[:, :, None] == classes[:, None, :])).float()
        kept = [scores[:, 0] >= self.score_threshold]
        for index in range(1, self.candidates):
            earlier = torch.stack(kept, dim=1).float()
            blocked = (suppresses[:, index, :index] * earlier).amax(dim=1) > 0
            kept.append((scores[:, index] >= self.score_threshold) & ~blocked)
        kept_scores = scores * torch.stack(kept, dim=1).float()
        top_scores, top = kept_scores.topk(self.max_detections, dim=1)
        found = top_scores > 0
        top_boxes = torch.gather(boxes, 1, top.unsqueeze(2).expand(-1, -1, 4))
        top_boxes = top_boxes * found.unsqueeze(2).float()
        top_classes = torch.where(found, torch.gather(classes, 1, top),
                                  torch.full_like(top, -1))
        return top_boxes, top_scores, top_classes


# ---- training --------------------------------------------------------------------------------


def grid_targets(scenes: SceneBatch, size: int, stride: int = STRIDE, anchor: float = ANCHOR,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per cell: whether an object's centre falls in it (N×S×S), the box targets there
    (N×4×S×S: σ-offsets of the centre in the cell, log size over the anchor) and the class
    (N×S×S, −1 elsewhere)."""
    cells = size // stride
    count = len(scenes.scenes)
    positive = torch.zeros(count, cells, cells)
    boxes = torch.zeros(count, 4, cells, cells)
    classes = torch.full((count, cells, cells), -1, dtype=torch.int64)
    for item, scene in enumerate(scenes.scenes):
        for box, label in zip(scene.boxes, scene.classes, strict=True):
            centre_x, centre_y = (box[0] + box[2]) / 2 / stride, (box[1] + box[3]) / 2 / stride
            column, row = min(int(centre_x), cells - 1), min(int(centre_y), cells - 1)
            positive[item, row, column] = 1.0
            boxes[item, :, row, column] = torch.tensor([
                centre_x - column, centre_y - row, np.log((box[2] - box[0]) / anchor),
                np.log((box[3] - box[1]) / anchor)])
            classes[item, row, column] = int(label)
    return positive, boxes, classes


def detection_loss(raw: torch.Tensor, positive: torch.Tensor, boxes: torch.Tensor,
                   classes: torch.Tensor) -> torch.Tensor:
    """Objectness BCE over every cell; on object cells, BCE on the centre offsets, squared
    error on the log sizes and cross-entropy on the class."""
    objectness = F.binary_cross_entropy_with_logits(raw[:, 0], positive, reduction="sum")
    where = positive.bool()
    if not where.any():
        return objectness / len(raw)
    offsets = F.binary_cross_entropy_with_logits(
        raw[:, 1:3].permute(0, 2, 3, 1)[where], boxes[:, :2].permute(0, 2, 3, 1)[where],
        reduction="sum")
    sizes = F.mse_loss(raw[:, 3:5].permute(0, 2, 3, 1)[where],
                       boxes[:, 2:].permute(0, 2, 3, 1)[where], reduction="sum")
    labels = F.cross_entropy(raw[:, 5:].permute(0, 2, 3, 1)[where], classes[where],
                             reduction="sum")
    return (objectness + offsets + 2.0 * sizes + labels) / len(raw)


def train_dense(make_model: Callable[[], nn.Module], inputs: torch.Tensor,
                loss: Callable[[nn.Module, torch.Tensor], torch.Tensor], *, seed: int,
                epochs: int, batch_size: int = 32, learning_rate: float = 4e-3,
                threads: int = 1) -> nn.Module:
    """AdamW with a one-cycle schedule over ``inputs`` (no augmentation), the model built
    after seeding; ``loss(model, index)`` scores a batch of indices. Eval mode out."""
    steps_per_epoch = len(inputs) // batch_size
    if epochs * steps_per_epoch < 8:
        raise ValueError(f"{len(inputs)} images × {epochs} epochs in batches of {batch_size} "
                         "is fewer than the 8 steps the learning-rate schedule needs")
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make_model()
            optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate,
                                          weight_decay=5e-4)
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch,
                pct_start=0.2)
            order = torch.Generator().manual_seed(seed)
            model.train()
            for _ in range(epochs):
                permutation = torch.randperm(len(inputs), generator=order)
                for step in range(steps_per_epoch):
                    index = permutation[step * batch_size:(step + 1) * batch_size]
                    value = loss(model, index)
                    optimizer.zero_grad(set_to_none=True)
                    value.backward()
                    optimizer.step()
                    schedule.step()
    finally:
        torch.set_num_threads(caller_threads)
    return model.eval()


def train_detector(scenes: SceneBatch, *, seed: int = 0, epochs: int = 12,
                   threads: int = 1) -> GridDetector:
    """A ``GridDetector`` trained on ``scenes``; deterministic from ``seed`` and ``threads``."""
    size = scenes.images.shape[1]
    inputs = preprocess(scenes.images)
    positive, boxes, classes = grid_targets(scenes, size)

    def loss(model: nn.Module, index: torch.Tensor) -> torch.Tensor:
        return detection_loss(model(inputs[index]), positive[index], boxes[index],
                              classes[index])

    model = train_dense(GridDetector, inputs, loss, seed=seed, epochs=epochs, threads=threads)
    assert isinstance(model, GridDetector)
    return model


def detect(raw: np.ndarray, score_threshold: float = SCORE_THRESHOLD,
           iou_threshold: float = NMS_IOU, max_detections: int = MAX_DETECTIONS,
           ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(boxes, scores, classes) per image from a raw grid head, as the service would report."""
    found = [select(proposals, score_threshold, iou_threshold, max_detections)
             for proposals in decode_grid(raw, STRIDE, ANCHOR)]
    return [(item.boxes, item.scores, item.classes) for item in found]


def detector_map(model: nn.Module, scenes: SceneBatch) -> float:
    """mAP@0.5 of a ``GridDetector`` or ``NmsDetector`` on ``scenes``."""
    with torch.no_grad():
        outputs = model(preprocess(scenes.images))
    if isinstance(outputs, tuple):
        boxes, scores, classes = (value.numpy() for value in outputs)
        predictions = [(b[s > 0], s[s > 0], c[s > 0])
                       for b, s, c in zip(boxes, scores, classes, strict=True)]
    else:
        predictions = detect(outputs.numpy())
    return mean_average_precision(predictions, scenes.scenes)


# ---- export ----------------------------------------------------------------------------------


def export_onnx(model: nn.Module, path: Path, size: int, output_names: list[str]) -> Path:
    """Writes ``model`` (eval mode) as one ONNX file with its weights inside (opset 17, free
    batch dimension) taking the normalized N×3×size×size input ``input``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, size, size)
    axes = {name: {0: "batch"} for name in ["input", *output_names]}
    model.eval()
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(path), input_names=["input"],
                          output_names=output_names, dynamic_axes=axes, opset_version=OPSET,
                          dynamo=False)
    return path
