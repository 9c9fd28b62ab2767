"""The score a gradient method differentiates, per row: a classifier's target logit; through
``core.dense.TargetedModel``, a segmenter's class logit summed over the target's region
(Seg-Grad-CAM, arXiv 2002.11434) or a raw grid detector's box score at the detection's cell,
objectness × class probability (pytorch-grad-cam's detection targets score a box the same
way)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from saliency_service.core.dense import SEGMENTATION, TargetedModel
from saliency_service.core.request import Job

Head = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def selected_scores(job: Job, outputs: Sequence[torch.Tensor],
                    targets: torch.Tensor) -> torch.Tensor:
    """Each row's score from the program's ``outputs`` (its first output holds the class
    scores, or the detector's head, or the segmenter's maps); ``targets`` holds each row's
    class (classifiers) or target index (``TargetedModel``). Rows past ``len(targets)`` (a
    fixed-batch graph's padding) are dropped."""
    first = outputs[0][: targets.shape[0]]
    targets = targets.view(-1).to(torch.int64)
    model = job.model
    if not isinstance(model, TargetedModel):
        return first.gather(1, targets.view(-1, 1)).view(-1)
    head: Head = model.derived("target_head", _head)
    return head(first, targets)


def _head(model: TargetedModel) -> Head:
    labels = torch.tensor([t.label for t in model.targets], dtype=torch.int64)
    if model.dense.kind == SEGMENTATION:
        regions = torch.from_numpy(np.stack([t.region for t in model.targets]).astype(np.float32))

        def region_sum(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            rows = torch.arange(scores.shape[0])
            return (scores[rows, labels[targets]] * regions[targets].to(scores)).sum((1, 2))
        return region_sum
    stride = model.dense.stride
    centres = np.stack([(t.box[:2] + t.box[2:]) / 2 for t in model.targets])
    cells = torch.from_numpy(np.floor(centres / stride).astype(np.int64))  # T×(column, row)

    def box_score(raw: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(raw.shape[0])
        column = cells[targets, 0].clamp(0, raw.shape[3] - 1)
        row = cells[targets, 1].clamp(0, raw.shape[2] - 1)
        at = raw[rows, :, row, column]  # rows×(5 + K)
        probability = torch.softmax(at[:, 5:], dim=1)[rows, labels[targets]]
        return torch.sigmoid(at[:, 0]) * probability
    return box_score
