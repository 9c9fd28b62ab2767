"""Small self-contained image classifiers: the demo model and shapes for tests and benchmarks.

Written without torchvision so the service has no extra dependency. Every ReLU is its own
``nn.ReLU`` module and nothing runs in place, so a hook or a rewrite of the exported graph can
change one ReLU's backward (Guided Backprop) without touching the others. There is no
data-dependent control flow: all models export with ``torch.export`` and to ONNX.

Each class names the submodules whose outputs end its spatial scales (``scale_modules()``,
finest first, each half the resolution of the one before) and its Grad-CAM layer
(``cam_layer``, the coarsest scale).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


def _conv_bn(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1
) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A bias-free convolution (BatchNorm supplies the shift) and its BatchNorm."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False
    )
    return conv, nn.BatchNorm2d(out_channels)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with an identity (or 1×1 projection) shortcut, as in ResNet-18."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, out_channels, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(out_channels, out_channels, 3)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            conv, bn = _conv_bn(in_channels, out_channels, 1, stride)
            self.shortcut = nn.Sequential(conv, bn)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride), 1×1 expand ×4: the ResNet-50 v1.5 block."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(in_channels, width, 1)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.relu2 = nn.ReLU()
        self.conv3, self.bn3 = _conv_bn(width, out_channels, 1)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            conv, bn = _conv_bn(in_channels, out_channels, 1, stride)
            self.shortcut = nn.Sequential(conv, bn)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


def _init_weights(model: nn.Module) -> None:
    """He initialisation, BatchNorm at identity: the usual start for ReLU networks."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class DemoResNet(nn.Module):
    """A ResNet-10-like classifier with four scales, small enough to train on two CPU cores.

    Stem (3×3, stride 2) then four stages of one BasicBlock each, widths ``width`` ×1/2/4/8,
    every stage after the first halving the resolution; global average pool and ``fc``.
    A 128×128 input gives scales of 64, 32, 16 and 8 pixels. Fully convolutional up to the
    pool, so it accepts any input size that is a multiple of 16.
    """

    SCALE_MODULES: ClassVar[tuple[str, ...]] = ("layer1", "layer2", "layer3", "layer4")
    cam_layer: ClassVar[str] = "layer4"

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        conv, bn = _conv_bn(3, width, 3, stride=2)
        self.stem = nn.Sequential(conv, bn, nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, stride=2))
        self.layer4 = nn.Sequential(BasicBlock(4 * width, 8 * width, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        _init_weights(self)

    @classmethod
    def scale_modules(cls) -> list[str]:
        """Submodules whose (post-ReLU) outputs end each spatial scale, finest first."""
        return list(cls.SCALE_MODULES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


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
                conv, bn = _conv_bn(in_channels, channels[stage], 3)
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
        _init_weights(self)

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
        _init_weights(self)

    @classmethod
    def scale_modules(cls) -> list[str]:
        """The stem's ReLU (before max-pooling) and the four stages, finest first."""
        return list(cls.SCALE_MODULES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class FashionResNet(nn.Module):
    """The demo's residual design for 1×28×28 grayscale images, with three scales.

    Stem (3×3, stride 1) then three stages of one BasicBlock each, widths ``width`` ×1/2/4,
    the second and third halving the resolution: scales of 28, 14 and 7 pixels; global
    average pool and ``fc`` (the linear head FastCAM reads without a backward pass).
    """

    SCALE_MODULES: ClassVar[tuple[str, ...]] = ("layer1", "layer2", "layer3")
    cam_layer: ClassVar[str] = "layer3"

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        conv, bn = _conv_bn(in_channels, width, 3)
        self.stem = nn.Sequential(conv, bn, nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        _init_weights(self)

    @classmethod
    def scale_modules(cls) -> list[str]:
        """Submodules whose (post-ReLU) outputs end each spatial scale, finest first."""
        return list(cls.SCALE_MODULES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
