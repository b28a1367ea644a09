"""CNNs built to convert cleanly into spiking twins (:mod:`lowbit.snn`): plain feed-forward
chains of Conv/Linear, BatchNorm (folded at conversion), ReLU and *average* pooling (exact in
rate, unlike max pooling of spikes).

Not in the model zoo (``lowbit.models``); build them directly. Both are ``nn.Sequential``
chains, so :func:`lowbit.snn.convert` takes them as they are.

- :class:`LeNet5Avg`: LeNet-5 (LeCun et al., Proc. IEEE 1998) with ReLU, average pooling and BN:
  ``conv1 6@5x5 pad 2 -> pool -> conv2 16@5x5 -> pool -> fc 120 -> fc 84 -> fc classes``.
- :class:`HSICNN3d`: a hyperspectral-patch classifier, input ``(bands, p, p)``: three 3-D
  convolutions (kernels 7x3x3, 5x3x3, 3x3x3 over bands x height x width, no padding) then,
  with ``hybrid=True``, the bands folded into channels and one 3x3 2-D convolution (the 3-D/2-D
  hybrid layout of HybridSN, Roy et al., IEEE GRSL 2020, used by ACE-SNN, Datta et al., Front.
  Neurosci. 16:815258, 2022), then fully connected layers. Channel counts are arguments (the
  defaults are HybridSN's 8, 16, 32, 64 and 256, 128).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from ..models._common import Chain, check_common, check_spatial, init_weights, pair, scaled


class AddChannel(nn.Module):
    """``(N, D, H, W) -> (N, 1, D, H, W)``: a band stack becomes one 3-D volume."""

    snn_passthrough = True  # a reshape: a spiking twin applies it unchanged

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)


class FoldDepth(nn.Module):
    """``(N, C, D, H, W) -> (N, C*D, H, W)``: 3-D feature maps become 2-D channels."""

    snn_passthrough = True

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1, 2)


class LeNet5Avg(Chain):
    """LeNet-5 with average pooling; layer names as :class:`~lowbit.models.lenet.LeNet5`."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width_mult: float = 1.0, bn: bool = True,
                 input_size: int | Sequence[int] = 28) -> None:
        check_common(num_classes, in_channels, width_mult)
        h, w = pair(input_size)
        c1, c2 = scaled(6, width_mult), scaled(16, width_mult)
        f1, f2 = scaled(120, width_mult), scaled(84, width_mult)
        h2, w2 = ((h // 2) - 4) // 2, ((w // 2) - 4) // 2
        check_spatial("LeNet5Avg", (h, w), (h2, w2))
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (cin, cout, pad) in enumerate(((in_channels, c1, 2), (c1, c2, 0)), start=1):
            layers[f"conv{i}"] = nn.Conv2d(cin, cout, 5, padding=pad, bias=not bn)
            if bn:
                layers[f"bn{i}"] = nn.BatchNorm2d(cout)
            layers[f"relu{i}"] = nn.ReLU()
            layers[f"pool{i}"] = nn.AvgPool2d(2)
        layers["flatten"] = nn.Flatten(1)
        prev = c2 * h2 * w2
        for i, f in enumerate((f1, f2), start=1):
            layers[f"fc{i}"] = nn.Linear(prev, f, bias=not bn)
            if bn:
                layers[f"bn{i + 2}"] = nn.BatchNorm1d(f)
            layers[f"relu{i + 2}"] = nn.ReLU()
            prev = f
        layers["fc3"] = nn.Linear(prev, num_classes)
        super().__init__(layers)
        self.num_classes = num_classes
        init_weights(self)


class HSICNN3d(Chain):
    """3-D (``hybrid=False``) or 3-D/2-D hybrid CNN for ``(bands, p, p)`` hyperspectral patches.

    ``conv3d_1..3 -> [fold bands into channels -> conv2d] -> flatten -> fc1 -> fc2 -> fc3``,
    each hidden layer followed by (BN and) ReLU. ``in_channels`` is the number of bands,
    ``input_size`` the patch side.
    """

    def __init__(self, num_classes: int = 16, in_channels: int = 30, input_size: int = 11,
                 channels3d: Sequence[int] = (8, 16, 32), channels2d: int = 64,
                 hidden: Sequence[int] = (256, 128), hybrid: bool = True, bn: bool = True) -> None:
        check_common(num_classes, in_channels, 1.0)
        h, w = pair(input_size)
        if len(channels3d) != 3:
            raise ValueError(f"HSICNN3d: channels3d must have 3 entries, got {channels3d!r}")
        depth_k = (7, 5, 3)
        d = in_channels - sum(k - 1 for k in depth_k)
        h3, w3 = h - 6, w - 6
        h2, w2 = (h3 - 2, w3 - 2) if hybrid else (h3, w3)
        if d < 1:
            raise ValueError(f"HSICNN3d: {in_channels} bands are too few for band kernels 7, 5, 3 "
                             "(need at least 13)")
        check_spatial("HSICNN3d", (h, w), (h2, w2))
        layers: OrderedDict[str, nn.Module] = OrderedDict(add_channel=AddChannel())
        prev = 1
        for i, (c, k) in enumerate(zip(channels3d, depth_k, strict=True), start=1):
            layers[f"conv3d_{i}"] = nn.Conv3d(prev, c, (k, 3, 3), bias=not bn)
            if bn:
                layers[f"bn3d_{i}"] = nn.BatchNorm3d(c)
            layers[f"relu3d_{i}"] = nn.ReLU()
            prev = c
        if hybrid:
            layers["fold_depth"] = FoldDepth()
            layers["conv2d"] = nn.Conv2d(prev * d, channels2d, 3, bias=not bn)
            if bn:
                layers["bn2d"] = nn.BatchNorm2d(channels2d)
            layers["relu2d"] = nn.ReLU()
            flat = channels2d * h2 * w2
        else:
            flat = prev * d * h2 * w2
        layers["flatten"] = nn.Flatten(1)
        for i, f in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(flat, f, bias=not bn)
            if bn:
                layers[f"bn_fc{i}"] = nn.BatchNorm1d(f)
            layers[f"relu_fc{i}"] = nn.ReLU()
            flat = f
        layers[f"fc{len(hidden) + 1}"] = nn.Linear(flat, num_classes)
        super().__init__(layers)
        self.num_classes = num_classes
        init_weights(self)
