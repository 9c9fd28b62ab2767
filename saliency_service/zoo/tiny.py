"""Four tiny classifiers of different families for the ground-truth benchmark
(``evaluation.groundtruth``): a plain CNN, a residual network, a depthwise-separable network
and a vision transformer. Small enough to train in a minute on two CPU cores at 48×48; every
ReLU is its own module (Guided Backprop rewrites them one by one).

Each class names its spatial scales (``scale_modules()``, finest first), its Grad-CAM layer
(``cam_layer``; for the transformer, None: the exporter finds the tokens feeding the last
attention) and its global-average-pool + linear head (``head``, or None).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from saliency_service.zoo.architectures import FashionResNet, init_weights


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1,
                  groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups,
                     bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU())


class PlainCNN(nn.Module):
    """Three stages of two 3×3 convolutions, max-pooling between them; GAP + ``fc``."""

    SCALE_MODULES: ClassVar[tuple[str, ...]] = ("stage1", "stage2", "stage3")
    cam_layer: ClassVar[str | None] = "stage3"
    head: ClassVar[str | None] = "fc"

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(_conv_bn_relu(3, width), _conv_bn_relu(width, width))
        self.pool1 = nn.MaxPool2d(2)
        self.stage2 = nn.Sequential(_conv_bn_relu(width, 2 * width),
                                    _conv_bn_relu(2 * width, 2 * width))
        self.pool2 = nn.MaxPool2d(2)
        self.stage3 = nn.Sequential(_conv_bn_relu(2 * width, 4 * width),
                                    _conv_bn_relu(4 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        init_weights(self)

    @classmethod
    def scale_modules(cls) -> list[str]:
        return list(cls.SCALE_MODULES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.pool2(self.stage2(self.pool1(self.stage1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyResNet(FashionResNet):
    """Stem then three residual stages (BasicBlock), the last two halving; GAP + ``fc``: the
    Fashion-MNIST model's design on RGB images."""

    head: ClassVar[str | None] = "fc"

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__(num_classes, width, in_channels=3)


class DepthwiseCNN(nn.Module):
    """MobileNet-v1 style: a stem, then depthwise 3×3 + pointwise 1×1 blocks; GAP + ``fc``."""

    SCALE_MODULES: ClassVar[tuple[str, ...]] = ("stage1", "stage2", "stage3")
    cam_layer: ClassVar[str | None] = "stage3"
    head: ClassVar[str | None] = "fc"

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()

        def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(_conv_bn_relu(cin, cin, 3, stride, groups=cin),
                                 _conv_bn_relu(cin, cout, 1))

        self.stage1 = nn.Sequential(_conv_bn_relu(3, width), separable(width, width, 1))
        self.stage2 = nn.Sequential(separable(width, 2 * width, 2),
                                    separable(2 * width, 2 * width, 1))
        self.stage3 = nn.Sequential(separable(2 * width, 4 * width, 2),
                                    separable(4 * width, 4 * width, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        init_weights(self)

    @classmethod
    def scale_modules(cls) -> list[str]:
        return list(cls.SCALE_MODULES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Attention(nn.Module):
    """Multi-head self-attention, written out (timm's ``Attention``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding (``patch``-pixel patches), a class token, pre-norm attention blocks,
    the head on the mean of the patch tokens (trains faster than the class token alone on
    small data)."""

    cam_layer: ClassVar[str | None] = None
    head: ClassVar[str | None] = None

    def __init__(self, num_classes: int, size: int = 48, patch: int = 6, dim: int = 48,
                 depth: int = 3, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    @classmethod
    def scale_modules(cls) -> list[str] | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], 1)
        tokens = self.norm(self.blocks(tokens))
        return self.fc(tokens[:, 1:].mean(1))


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "plain": PlainCNN, "residual": TinyResNet, "depthwise": DepthwiseCNN, "vit": TinyViT,
}
