"""The architectures users bring, written small (torchvision and timm are not used).

Seeded random weights, small widths, 48–96 px inputs and one 224² model: each family's
defining pieces are there (residual sums with one shared ``nn.ReLU``, max-pool + flatten,
depthwise + squeeze-excitation + hardswish, SiLU, 7×7 depthwise + LayerNorm + GELU,
concatenation, class/register tokens with ``nn.TransformerEncoder`` or hand-written
attention, one channel on a non-square input). Every ReLU is an ``nn.ReLU`` module, so
Captum's Guided Backprop (which hooks modules) and ours (which rewrites every graph ReLU)
compute the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from saliency_service.zoo.tiny import Attention

CLASSES = 5


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout))


class ResidualBlock(nn.Module):
    """torchvision's BasicBlock: one ``nn.ReLU`` module called twice."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3)
        self.relu = nn.ReLU()
        self.down = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.down is None else self.down(x)
        return self.relu(self.conv2(self.relu(self.conv1(x))) + shortcut)


class ResNetStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2), nn.ReLU())
        self.layer1 = ResidualBlock(8, 8, 1)
        self.layer2 = ResidualBlock(8, 16, 2)
        self.layer3 = ResidualBlock(16, 32, 2)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class VGGStyle(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((3, 8), (8, 16), (16, 16)):
            layers += [*conv_bn(cin, cout, 3), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * (size // 8) ** 2, 32),
                                        nn.ReLU(), nn.Linear(32, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, gate: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(channels // 4, 4), 1)
        self.act = act
        self.expand = nn.Conv2d(max(channels // 4, 4), channels, 1)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))


class InvertedResidual(nn.Module):
    """MobileNetV3 / EfficientNet block: expand, depthwise (stride), SE, linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, act: Callable[[], nn.Module],
                 gate: Callable[[], nn.Module], kernel: int = 3) -> None:
        super().__init__()
        hidden = cin * 3
        self.expand = nn.Sequential(conv_bn(cin, hidden, 1), act())
        self.depthwise = nn.Sequential(conv_bn(hidden, hidden, kernel, stride, groups=hidden),
                                       act())
        self.se = SqueezeExcite(hidden, gate(), nn.ReLU() if isinstance(act(), nn.Hardswish)
                                else act())
        self.project = conv_bn(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return out + x if self.residual else out


class MobileNetV3Style(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2), nn.Hardswish())
        blocks = [(8, 8, 1), (8, 16, 2), (16, 16, 1), (16, 24, 2), (24, 32, 2), (32, 32, 2)]
        self.blocks = nn.Sequential(*[InvertedResidual(a, b, s, nn.Hardswish, nn.Hardsigmoid)
                                      for a, b, s in blocks])
        self.last = nn.Sequential(conv_bn(32, 48, 1), nn.Hardswish())
        self.head = nn.Sequential(nn.Linear(48, 32), nn.Hardswish(), nn.Linear(32, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.blocks(self.stem(x))).mean((2, 3)))


class EfficientNetStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2), nn.SiLU())
        blocks = [(8, 8, 1, 3), (8, 16, 2, 5), (16, 16, 1, 3), (16, 24, 2, 5)]
        self.blocks = nn.Sequential(*[InvertedResidual(a, b, s, nn.SiLU, nn.Sigmoid, k)
                                      for a, b, s, k in blocks])
        self.last = nn.Sequential(conv_bn(24, 40, 1), nn.SiLU())
        self.fc = nn.Linear(40, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.last(self.blocks(self.stem(x))).mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an N×C×H×W map (ConvNeXt's, via channels-last)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1, self.act, self.pw2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = (self.pw2(self.act(self.pw1(y))) * self.gamma).permute(0, 3, 1, 2)
        return x + y


class ConvNeXtStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        dims = (16, 24, 32)
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))
        stages: list[nn.Module] = []
        for index, dim in enumerate(dims):
            if index:
                stages.append(nn.Sequential(LayerNorm2d(dims[index - 1]),
                                            nn.Conv2d(dims[index - 1], dim, 2, 2)))
            stages.append(nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim)))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.fc = nn.Linear(dims[-1], CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.stages(self.stem(x)).mean((2, 3))))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, growth, 3,
                                                                           padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNetStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        growth, channels = 6, 12
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, 2, 1, bias=False)]
        for block in range(3):
            for _ in range(3):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            if block < 2:
                layers += [nn.BatchNorm2d(channels), nn.ReLU(),
                           nn.Conv2d(channels, channels // 2, 1, bias=False), nn.AvgPool2d(2)]
                channels //= 2
        layers += [nn.BatchNorm2d(channels), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class ViTEncoder(nn.Module):
    """Patch embedding, a class token expanded to the batch, ``nn.TransformerEncoder``
    (sequence-first, so the tokens are L×N×D), head on the class token."""

    def __init__(self, size: int, patch: int = 8, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.1)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1) + self.pos
        tokens = self.encoder(tokens.transpose(0, 1))
        return self.head(self.norm(tokens[0]))


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, 4)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTAttention(nn.Module):
    """Hand-written pre-norm blocks with a class token and one register token."""

    def __init__(self, size: int, patch: int = 8, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.prefix = nn.Parameter(torch.randn(1, 2, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.1)
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        tokens = torch.cat([self.prefix.expand(tokens.shape[0], -1, -1), tokens], 1)
        return self.head(self.norm(self.blocks(tokens))[:, 0])


class GrayNonSquare(nn.Module):
    """One input channel, 48×80 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(conv_bn(1, 8, 3), nn.ReLU())
        self.stage2 = nn.Sequential(conv_bn(8, 16, 3, 2), nn.ReLU())
        self.stage3 = nn.Sequential(conv_bn(16, 24, 3, 2), nn.ReLU())
        self.fc = nn.Linear(24, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage3(self.stage2(self.stage1(x))).mean((2, 3)))


@dataclass(frozen=True)
class Architecture:
    """One matrix entry: how to build it, its input, its GAP+linear head and CAM module."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]
    head: str | None = None
    tokens: bool = False
    prefix_tokens: int = 0


MATRIX = (
    Architecture("resnet", ResNetStyle, (3, 64, 64), head="fc"),
    Architecture("vgg", lambda: VGGStyle(64), (3, 64, 64)),
    Architecture("mobilenetv3", MobileNetV3Style, (3, 224, 224)),
    Architecture("efficientnet", EfficientNetStyle, (3, 64, 64), head="fc"),
    Architecture("convnext", ConvNeXtStyle, (3, 64, 64)),
    Architecture("densenet", DenseNetStyle, (3, 64, 64), head="fc"),
    Architecture("vit_encoder", lambda: ViTEncoder(64), (3, 64, 64), tokens=True,
                 prefix_tokens=1),
    Architecture("vit_attention", lambda: ViTAttention(64), (3, 64, 64), tokens=True,
                 prefix_tokens=2),
    Architecture("gray_nonsquare", GrayNonSquare, (1, 48, 80), head="fc"),
)


def build(architecture: Architecture, seed: int = 0) -> nn.Module:
    """The seeded model in eval mode, BatchNorm statistics made non-trivial."""
    torch.manual_seed(seed)
    model = architecture.build()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
