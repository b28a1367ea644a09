"""A tiny MobileNet-style CNN (depthwise-separable convolutions, Howard et al. 2017) for
28x28 / 32x32 inputs. Its job in lowbit is to exercise grouped/depthwise convolutions in
quantization, export and MAC accounting."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from ._common import Chain, check_common, init_weights, scaled


class DepthwiseSeparable(Chain):
    """``dw (3x3, groups=C) -> bn1 -> relu1 -> pw (1x1) -> bn2 -> relu2``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            OrderedDict(
                dw=nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
                bn1=nn.BatchNorm2d(in_channels),
                relu1=nn.ReLU(),
                pw=nn.Conv2d(in_channels, out_channels, 1, bias=False),
                bn2=nn.BatchNorm2d(out_channels),
                relu2=nn.ReLU(),
            )
        )


class MobileNetTiny(nn.Module):
    """``conv1 (3x3, 32) -> bn1 -> relu1 -> block1 (32->64) -> block2 (64->128, /2) ->
    block3 (128->128) -> block4 (128->256, /2) -> avgpool -> fc``; block names
    ``block{i}.dw``, ``block{i}.pw``. Works for any input of at least 4x4."""

    plan = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2))

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
    ) -> None:
        super().__init__()
        check_common(num_classes, in_channels, width_mult)
        stem = scaled(32, width_mult)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu1 = nn.ReLU()
        prev = stem
        for i, (_, c, s) in enumerate(self.plan, start=1):
            out = scaled(c, width_mult)
            setattr(self, f"block{i}", DepthwiseSeparable(prev, out, s))
            prev = out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width_mult = width_mult
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
