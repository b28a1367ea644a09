"""VGG networks for 32x32 inputs.

- ``vgg_small``: the VGG-Small of LQ-Nets (Zhang et al., ECCV 2018) and the BCGD family:
  ``2x128C3 - MP2 - 2x256C3 - MP2 - 2x512C3 - MP2 - FC10``, BN after every conv.
- ``vgg11``: CIFAR VGG-11 with BN (Simonyan & Zisserman 2015, configuration A, with the
  single 512 -> num_classes classifier used by BCGD / "Understanding STE" / SinReQ):
  ``64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M``.

Names: ``conv{i}, bn{i}, relu{i}`` per conv, ``pool{j}`` per max pool, then ``flatten, fc``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn as nn

from ._common import Chain, check_common, check_spatial, init_weights, pair, pool_out, scaled

M = "M"


def _features(
    model_name: str,
    cfg: Sequence[int | str],
    in_channels: int,
    width_mult: float,
    input_size: tuple[int, int],
) -> tuple[OrderedDict[str, nn.Module], int, tuple[int, int]]:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    prev, h, w = in_channels, *input_size
    sizes = []
    i = j = 0
    for v in cfg:
        if v == M:
            j += 1
            layers[f"pool{j}"] = nn.MaxPool2d(2)
            h, w = pool_out(h), pool_out(w)
            sizes.append((h, w))
        else:
            i += 1
            c = scaled(int(v), width_mult)
            layers[f"conv{i}"] = nn.Conv2d(prev, c, 3, padding=1, bias=False)
            layers[f"bn{i}"] = nn.BatchNorm2d(c)
            layers[f"relu{i}"] = nn.ReLU()
            prev = c
    check_spatial(model_name, input_size, *sizes)
    return layers, prev, (h, w)


class VGGSmall(Chain):
    """VGG-Small (LQ-Nets): 6 convs and one fc; ``input_size`` (default 32) sets the flatten
    size, 512*4*4 at 32x32."""

    cfg = (128, 128, M, 256, 256, M, 512, 512, M)

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        input_size: int | Sequence[int] = 32,
    ) -> None:
        check_common(num_classes, in_channels, width_mult)
        size = pair(input_size)
        layers, c, (h, w) = _features("vgg_small", self.cfg, in_channels, width_mult, size)
        layers["flatten"] = nn.Flatten(1)
        layers["fc"] = nn.Linear(c * h * w, num_classes)
        super().__init__(layers)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width_mult = width_mult
        init_weights(self)


class VGG11(Chain):
    """CIFAR VGG-11 with BN: 8 convs, 5 max pools, global average pool (the identity on
    the 1x1 map a 32x32 input leaves), ``fc`` 512 -> num_classes."""

    cfg = (64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M)

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
    ) -> None:
        check_common(num_classes, in_channels, width_mult)
        layers, c, _ = _features("vgg11", self.cfg, in_channels, width_mult, (32, 32))
        layers["avgpool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten(1)
        layers["fc"] = nn.Linear(c, num_classes)
        super().__init__(layers)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width_mult = width_mult
        init_weights(self)
