"""Residual networks (He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016).

- CIFAR ResNet-20/32/44/56 (paper section 4.2): 3x3 conv 16, three stages of n basic
  blocks with 16, 32, 64 channels, global average pool, fc; depth = 6n + 2. Shortcut
  option A (parameter-free: stride-2 subsampling plus zero-padded extra channels; the paper's
  CIFAR choice and that of most CIFAR quantization papers, 0.27M parameters for ResNet-20)
  or option B (1x1 conv + BN projection when the shape changes).
- ImageNet ResNet-18 (paper table 1), with state-dict keys identical to torchvision's
  ``resnet18`` so its float weights load directly; ``cifar_stem=True`` swaps the 7x7/2 stem
  and max pool for a 3x3/1 conv (the usual 32x32 variant).

Names: ``conv1, bn1, relu, layer{s}.{b}.conv1/bn1/relu1/conv2/bn2/relu2[/downsample], fc``.
Every ReLU is its own module so quantizers can swap activation modules one use at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import check_common, init_weights, scaled

SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::s, ::s]`` with zero channels padded up to ``out_channels``:
    ``front`` zero channels in front (default ``(out - in) // 2``), the rest behind. No parameters.

    An explicit ``front`` is what a channel-ordered supernet sets (:mod:`lowbit.nn.channel_order`):
    it fixes where the input's channels land, so that a narrower sub-net keeps them in place."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, front: int | None = None) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("option-A shortcut cannot reduce channels")
        if front is not None and not 0 <= front <= out_channels - in_channels:
            raise ValueError(f"option-A shortcut: front={front} must lie in [0, "
                             f"{out_channels - in_channels}] ({in_channels} -> {out_channels} channels)")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.front = front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            front = extra // 2 if self.front is None else self.front
            x = F.pad(x, (0, 0, 0, 0, front, extra - front))
        return x

    def extra_repr(self) -> str:
        front = "" if self.front is None else f", front={self.front}"
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}{front}"


class BasicBlock(nn.Module):
    """``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convs."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            if shortcut == "A":
                self.downsample = PadShortcut(in_channels, channels, stride)
            else:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                    nn.BatchNorm2d(channels),
                )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


def _check_shortcut(shortcut: str) -> str:
    if not isinstance(shortcut, str) or shortcut.upper() not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {list(SHORTCUTS)}, got {shortcut!r}")
    return shortcut.upper()


class ResNetCifar(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` (20, 32, 44, 56, 110, ...)."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        check_common(num_classes, in_channels, width_mult)
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, ...), got {depth!r}")
        shortcut = _check_shortcut(shortcut)
        n = (depth - 2) // 6
        widths = [scaled(c, width_mult) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        prev = widths[0]
        for s, (c, stride) in enumerate(zip(widths, (1, 2, 2), strict=True), start=1):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(prev, c, stride if b == 0 else 1, shortcut))
                prev = c
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        self.depth = depth
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width_mult = width_mult
        self.shortcut = shortcut
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def dcq_sections(self) -> list[nn.Module]:
        """Stem, the three stages and the head: their composition is ``forward`` (for DCQ)."""
        stem = nn.Sequential(self.conv1, self.bn1, self.relu)
        head = nn.Sequential(self.avgpool, nn.Flatten(1), self.fc)
        return [stem, self.layer1, self.layer2, self.layer3, head]


def resnet20(
    num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, shortcut: str = "A"
) -> ResNetCifar:
    return ResNetCifar(20, num_classes, in_channels, width_mult, shortcut)


def resnet32(
    num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, shortcut: str = "A"
) -> ResNetCifar:
    return ResNetCifar(32, num_classes, in_channels, width_mult, shortcut)


def resnet44(
    num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, shortcut: str = "A"
) -> ResNetCifar:
    return ResNetCifar(44, num_classes, in_channels, width_mult, shortcut)


def resnet56(
    num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0, shortcut: str = "A"
) -> ResNetCifar:
    return ResNetCifar(56, num_classes, in_channels, width_mult, shortcut)


class ResNet(nn.Module):
    """ImageNet-style ResNet with basic blocks (ResNet-18: ``blocks=(2, 2, 2, 2)``) and
    projection (option B) shortcuts, as in torchvision."""

    def __init__(
        self,
        blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 1000,
        in_channels: int = 3,
        width_mult: float = 1.0,
        cifar_stem: bool = False,
    ) -> None:
        super().__init__()
        check_common(num_classes, in_channels, width_mult)
        widths = [scaled(c, width_mult) for c in (64, 128, 256, 512)]
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
        prev = widths[0]
        for s, (c, n, stride) in enumerate(zip(widths, blocks, (1, 2, 2, 2), strict=True), 1):
            layer = []
            for b in range(n):
                layer.append(BasicBlock(prev, c, stride if b == 0 else 1, "B"))
                prev = c
            setattr(self, f"layer{s}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width_mult = width_mult
        self.cifar_stem = cifar_stem
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(
    num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0, cifar_stem: bool = False
) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width_mult, cifar_stem)
