"""SVHN networks.

- ``svhn_cnn``: the 8-layer SVHN net of ReLeQ (Elthakeb et al., arXiv 1811.01704;
  he-actlab/releq ``models/svhn/svhn.py``): seven 3x3 convs (32, 32, M, 64, 64, M, 128,
  128, M, 256 unpadded, M) each followed by BN, ReLU and dropout, then fc10.
- ``dorefa_svhn``: the SVHN model of DoReFa-Net (Zhou et al., arXiv 1606.06160; tensorpack
  ``examples/DoReFa-Net/svhn-digit-dorefa.py``) for 40x40 input.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn as nn

from ._common import (
    Chain,
    check_common,
    check_spatial,
    conv_out,
    init_weights,
    pair,
    pool_out,
    scaled,
)


class SVHNCNN(Chain):
    """ReLeQ's SVHN network.

    ``conv_i -> bn_i -> relu_i -> (drop_i)`` for i = 1..7 with 32, 32, 64, 64, 128, 128,
    256 channels (3x3; padding 1 except conv7 which is unpadded), ``pool1..pool4`` (2x2 max)
    after conv2, conv4, conv6 and conv7, then ``flatten -> fc``.

    At 32x32 the features end at 256x1x1 (the reference); ``input_size`` sets the flatten
    size for other inputs (also 1x1 at 40x40). The reference uses non-affine BN, conv biases
    and dropout 0.3 after every conv; here BN is affine, convs before BN have no bias, and
    ``dropout`` (default 0.3, 0 removes the dropout modules) is kept.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        dropout: float = 0.3,
        input_size: int | Sequence[int] = 32,
    ) -> None:
        check_common(num_classes, in_channels, width_mult)
        if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        size = pair(input_size)
        chans = [scaled(c, width_mult) for c in (32, 32, 64, 64, 128, 128, 256)]
        pool_after = {2: 1, 4: 2, 6: 3, 7: 4}
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        h, w = size
        sizes = []
        prev = in_channels
        for i, c in enumerate(chans, start=1):
            pad = 0 if i == 7 else 1
            layers[f"conv{i}"] = nn.Conv2d(prev, c, 3, padding=pad, bias=False)
            layers[f"bn{i}"] = nn.BatchNorm2d(c)
            layers[f"relu{i}"] = nn.ReLU()
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            h, w = conv_out(h, 3, 1, pad), conv_out(w, 3, 1, pad)
            sizes.append((h, w))
            if i in pool_after:
                layers[f"pool{pool_after[i]}"] = nn.MaxPool2d(2)
                h, w = pool_out(h), pool_out(w)
                sizes.append((h, w))
            prev = c
        check_spatial("svhn_cnn", size, *sizes)
        layers["flatten"] = nn.Flatten(1)
        layers["fc"] = nn.Linear(prev * h * w, num_classes)
        super().__init__(layers)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width_mult = width_mult
        init_weights(self)


class DoReFaSVHN(Chain):
    """DoReFa-Net's SVHN model (tensorpack ``svhn-digit-dorefa.py``), sizes at 40x40:

    ``conv1 48@5x5 valid (+bias, no BN) 36 -> pool1 18 -> relu1 -> conv2 64@3x3 same ->
    bn2 -> relu2 -> conv3 64@3x3 same -> bn3 -> pool2 9 -> relu3 -> conv4 128@3x3 valid 7
    -> bn4 -> relu4 -> conv5 128@3x3 same -> bn5 -> relu5 -> conv6 128@3x3 valid 5 -> bn6
    -> relu6 -> drop (0.5) -> pool3 -> conv7 512@5x5 valid 1 -> bn7 -> relu7 -> flatten ->
    fc``.

    Pooling is 'SAME' (ceil mode). ``pool3`` is an adaptive average pool to 5x5 before the
    5x5 "classifier" conv7: the identity at 40x40 (the reference), and what makes the model
    run at 32x32 (3x3 -> 5x5) or larger inputs without changing any parameter shape.
    The reference ends with ``clip(|x|, 0, 1)`` / ReLU before fc; here a ReLU module
    (``relu7``), which quantization may swap. BN eps is 1e-4 as in the reference.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        dropout: float = 0.5,
    ) -> None:
        check_common(num_classes, in_channels, width_mult)
        if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        c48, c64, c128, c512 = (scaled(c, width_mult) for c in (48, 64, 128, 512))
        eps = 1e-4
        L: OrderedDict[str, nn.Module] = OrderedDict()
        L["conv1"] = nn.Conv2d(in_channels, c48, 5, padding=0, bias=True)
        L["pool1"] = nn.MaxPool2d(2, ceil_mode=True)
        L["relu1"] = nn.ReLU()
        L["conv2"] = nn.Conv2d(c48, c64, 3, padding=1, bias=False)
        L["bn2"] = nn.BatchNorm2d(c64, eps=eps)
        L["relu2"] = nn.ReLU()
        L["conv3"] = nn.Conv2d(c64, c64, 3, padding=1, bias=False)
        L["bn3"] = nn.BatchNorm2d(c64, eps=eps)
        L["pool2"] = nn.MaxPool2d(2, ceil_mode=True)
        L["relu3"] = nn.ReLU()
        L["conv4"] = nn.Conv2d(c64, c128, 3, padding=0, bias=False)
        L["bn4"] = nn.BatchNorm2d(c128, eps=eps)
        L["relu4"] = nn.ReLU()
        L["conv5"] = nn.Conv2d(c128, c128, 3, padding=1, bias=False)
        L["bn5"] = nn.BatchNorm2d(c128, eps=eps)
        L["relu5"] = nn.ReLU()
        L["conv6"] = nn.Conv2d(c128, c128, 3, padding=0, bias=False)
        L["bn6"] = nn.BatchNorm2d(c128, eps=eps)
        L["relu6"] = nn.ReLU()
        if dropout > 0:
            L["drop"] = nn.Dropout(dropout)
        L["pool3"] = nn.AdaptiveAvgPool2d(5)
        L["conv7"] = nn.Conv2d(c128, c512, 5, padding=0, bias=False)
        L["bn7"] = nn.BatchNorm2d(c512, eps=eps)
        L["relu7"] = nn.ReLU()
        L["flatten"] = nn.Flatten(1)
        L["fc"] = nn.Linear(c512, num_classes)
        super().__init__(L)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width_mult = width_mult
        init_weights(self)
