"""Small semantic segmenters for the generated scenes (``evaluation.scenes``): their forward
returns N×K×H×W class logits at the input's resolution (K = background + the scene classes).

- ``UNetSegmenter``: a two-level U-Net (encoder, bottleneck, decoder with skip connections);
- ``DilatedSegmenter``: one stride-2 stem, then dilated 3×3 convolutions (rates 1, 2, 4, 8)
  that widen the receptive field without pooling, and a bilinear upsampling back.

Each names its Grad-CAM layer (``cam_layer``). Training is deterministic from a seed for a
given thread count (``detectors.train_dense``); export as ``detectors.export_onnx``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from saliency_service.evaluation.scenes import CLASSES, SceneBatch, mean_iou
from saliency_service.zoo.detectors import conv_bn_relu, preprocess, train_dense

SEGMENT_CLASSES = len(CLASSES) + 1  # background first


class UNetSegmenter(nn.Module):
    """Encoder 64² → 32² → 16², decoder back with the encoder's maps concatenated."""

    cam_layer: ClassVar[str] = "decoder2"

    def __init__(self, classes: int = SEGMENT_CLASSES, width: int = 8) -> None:
        super().__init__()
        self.encoder1 = nn.Sequential(conv_bn_relu(3, width), conv_bn_relu(width, width))
        self.encoder2 = nn.Sequential(conv_bn_relu(width, 2 * width, stride=2),
                                      conv_bn_relu(2 * width, 2 * width))
        self.bottleneck = nn.Sequential(conv_bn_relu(2 * width, 4 * width, stride=2),
                                        conv_bn_relu(4 * width, 4 * width, dilation=2))
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.decoder2 = conv_bn_relu(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.decoder1 = conv_bn_relu(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.encoder1(x)
        second = self.encoder2(first)
        deep = self.bottleneck(second)
        second = self.decoder2(torch.cat([self.up2(deep), second], dim=1))
        return self.head(self.decoder1(torch.cat([self.up1(second), first], dim=1)))


class DilatedSegmenter(nn.Module):
    """Stride-2 stem, dilated context (``context``), 1×1 classifier, ×2 bilinear upsampling."""

    cam_layer: ClassVar[str] = "context"

    def __init__(self, classes: int = SEGMENT_CLASSES, width: int = 24) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(3, width // 2), conv_bn_relu(width // 2, width,
                                                                            stride=2))
        self.context = nn.Sequential(*(conv_bn_relu(width, width, dilation=rate)
                                       for rate in (1, 2, 4, 8)))
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.context(self.stem(x)))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


SEGMENTERS: dict[str, type[nn.Module]] = {"unet": UNetSegmenter, "dilated": DilatedSegmenter}


def train_segmenter(family: str, scenes: SceneBatch, *, seed: int = 0, epochs: int = 6,
                    threads: int = 1) -> nn.Module:
    """A segmenter of ``family`` (a key of ``SEGMENTERS``) trained with per-pixel
    cross-entropy on ``scenes``' class maps; deterministic from ``seed`` and ``threads``."""
    if family not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {family!r}; choose from {', '.join(SEGMENTERS)}")
    inputs = preprocess(scenes.images)
    targets = torch.from_numpy(scenes.class_maps)

    def loss(model: nn.Module, index: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inputs[index]), targets[index])

    return train_dense(SEGMENTERS[family], inputs, loss, seed=seed, epochs=epochs,
                       threads=threads)


def segment(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """Per-pixel predicted class (int64 N×H×W) for uint8 N×H×W×3 images."""
    with torch.no_grad():
        return model(preprocess(images)).argmax(dim=1).numpy()


def segmenter_miou(model: nn.Module, scenes: SceneBatch) -> float:
    """Mean IoU over background and the scene classes on ``scenes``."""
    return mean_iou(segment(model, scenes.images), scenes.class_maps)
