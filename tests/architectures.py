"""Architectures only the tests and benchmarks use: a VGG-like network without shortcuts
(a head that depends on the input size) and the ResNet-50 shape (for cost benchmarks).

Built from the zoo's blocks, with the same conventions (every ReLU its own module, nothing in
place, ``scale_modules()`` finest first, ``cam_layer`` the coarsest scale).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from saliency_service.zoo.architectures import conv_bn, init_weights


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride), 1×1 expand ×4: the ResNet-50 v1.5 block."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1, self.bn1 = conv_bn(in_channels, width, 1)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(width, width, 3, stride)
        self.relu2 = nn.ReLU()
        self.conv3, self.bn3 = conv_bn(width, out_channels, 1)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            conv, bn = conv_bn(in_channels, out_channels, 1, stride)
            self.shortcut = nn.Sequential(conv, bn)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class VGGStyle(nn.Module):
    """A plain VGG-like network: no shortcuts, max-pooling between stages, flatten + MLP head.

    The head depends on the input size fixed at construction (``input_size``, a multiple of 16),
    so this is the case where Grad-CAM cannot be read off a linear layer over pooled features.
    """

    SCALE_MODULES: ClassVar[tuple[str, ...]] = ("stage1", "stage2", "stage3", "stage4")
    cam_layer: ClassVar[str] = "stage4"

    def __init__(self, num_classes: int = 10, input_size: int = 64, width: int = 16) -> None:
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size {input_size} must be a multiple of 16")
        self.input_size = input_size
        channels = (3, width, 2 * width, 4 * width, 4 * width)
        for stage in range(1, 5):
            layers: list[nn.Module] = []
            for in_channels in (channels[stage - 1], channels[stage]):
                conv, bn = conv_bn(in_channels, channels[stage], 3)
                layers += [conv, bn, nn.ReLU()]
            self.add_module(f"stage{stage}", nn.Sequential(*layers))
            self.add_module(f"pool{stage}", nn.MaxPool2d(2))
        pooled = input_size // 16
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels[-1] * pooled * pooled, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
        init_weights(self)

    @classmethod
    def scale_modules(cls) -> list[str]:
        """The last ReLU block of each stage (before its pooling), finest first."""
        return list(cls.SCALE_MODULES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.stage1(x))
        x = self.pool2(self.stage2(x))
        x = self.pool3(self.stage3(x))
        x = self.pool4(self.stage4(x))
        return self.classifier(x)


class ResNet50Shape(nn.Module):
    """The ResNet-50 architecture (v1.5, bottlenecks [3, 4, 6, 3]) with random weights.

    For cost benchmarks only: the same layers, FLOPs and memory as the ImageNet model without
    downloading it. A 224×224 input gives scales of 112 (stem), 56, 28, 14 and 7 pixels.
    """

    SCALE_MODULES: ClassVar[tuple[str, ...]] = ("relu", "layer1", "layer2", "layer3", "layer4")
    cam_layer: ClassVar[str] = "layer4"

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for index, (blocks, width, stride) in enumerate(
            [(3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)], start=1
        ):
            stage: list[nn.Module] = []
            for block in range(blocks):
                stage.append(Bottleneck(in_channels, width, stride if block == 0 else 1))
                in_channels = width * Bottleneck.expansion
            self.add_module(f"layer{index}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self)

    @classmethod
    def scale_modules(cls) -> list[str]:
        """The stem's ReLU (before max-pooling) and the four stages, finest first."""
        return list(cls.SCALE_MODULES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
