"""The shipped models' architectures (the demo and Fashion-MNIST networks) and their blocks.

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


def conv_bn(
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
        self.conv1, self.bn1 = conv_bn(in_channels, out_channels, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = conv_bn(out_channels, out_channels, 3)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            conv, bn = conv_bn(in_channels, out_channels, 1, stride)
            self.shortcut = nn.Sequential(conv, bn)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def init_weights(model: nn.Module) -> None:
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
        conv, bn = conv_bn(3, width, 3, stride=2)
        self.stem = nn.Sequential(conv, bn, nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, stride=2))
        self.layer4 = nn.Sequential(BasicBlock(4 * width, 8 * width, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        init_weights(self)

    @classmethod
    def scale_modules(cls) -> list[str]:
        """Submodules whose (post-ReLU) outputs end each spatial scale, finest first."""
        return list(cls.SCALE_MODULES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


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
        conv, bn = conv_bn(in_channels, width, 3)
        self.stem = nn.Sequential(conv, bn, nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        init_weights(self)

    @classmethod
    def scale_modules(cls) -> list[str]:
        """Submodules whose (post-ReLU) outputs end each spatial scale, finest first."""
        return list(cls.SCALE_MODULES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))
