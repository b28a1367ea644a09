"""A 3-D / hybrid 3-D-2-D CNN for hyperspectral patches ``(bands, p, p)``.

``add_channel -> conv3d_1..3 (kernels 7x3x3, 5x3x3, 3x3x3 over bands x height x width, no
padding) -> [fold bands into channels -> conv2d 3x3] -> flatten -> fc1 -> fc2 -> fc3``, each hidden
layer followed by (BN and) ReLU. With ``hybrid=True`` it is the 3-D/2-D layout of HybridSN (Roy,
Krishna, Dubey, Chaudhuri, IEEE GRSL 17(2), 2020), the CNN that ACE-SNN (Datta, Kundu, Beerel,
Front. Neurosci. 16:815258, 2022) turns into a quantized spiking network; ``hybrid=False`` keeps
only 3-D convolutions. ``in_channels`` is the number of bands (after PCA: 30 for Indian Pines,
15 for the others in :mod:`lowbit.data.hyperspectral`), ``input_size`` the patch side.
Default channels are HybridSN's (8, 16, 32 3-D; 64 2-D; 256, 128 fully connected), scaled by
``width_mult``. The reshapes are plain modules marked ``snn_passthrough`` so
:func:`lowbit.snn.convert` applies them unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn as nn
from torch import Tensor

from ._common import Chain, check_common, check_spatial, init_weights, pair, scaled

DEPTH_KERNELS = (7, 5, 3)


def _counts(v: object) -> bool:
    """A list of integers >= 1."""
    return isinstance(v, Sequence) and not isinstance(v, str) and all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in v)


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


class HSICNN3d(Chain):
    """3-D (``hybrid=False``) or 3-D/2-D hybrid CNN for ``(bands, p, p)`` hyperspectral patches
    (module docstring). Needs at least 13 bands (band kernels 7, 5, 3) and patches of at least
    7 (9 with ``hybrid``) pixels."""

    def __init__(self, num_classes: int = 16, in_channels: int = 30, width_mult: float = 1.0,
                 input_size: int | Sequence[int] = 11, channels3d: Sequence[int] = (8, 16, 32),
                 channels2d: int = 64, hidden: Sequence[int] = (256, 128), hybrid: bool = True,
                 bn: bool = True) -> None:
        check_common(num_classes, in_channels, width_mult)
        h, w = pair(input_size)
        if not _counts(channels3d) or len(channels3d) != 3:
            raise ValueError(f"HSICNN3d: channels3d must be 3 integers >= 1, got {channels3d!r}")
        if not _counts(hidden):
            raise ValueError(f"HSICNN3d: hidden must be a list of integers >= 1, got {hidden!r}")
        if not _counts([channels2d]):
            raise ValueError(f"HSICNN3d: channels2d must be an integer >= 1, got {channels2d!r}")
        d = in_channels - sum(k - 1 for k in DEPTH_KERNELS)
        if d < 1:
            raise ValueError(f"HSICNN3d: {in_channels} bands (in_channels) are too few for band kernels "
                             f"{', '.join(map(str, DEPTH_KERNELS))} (need at least 13)")
        h3, w3 = h - 6, w - 6
        h2, w2 = (h3 - 2, w3 - 2) if hybrid else (h3, w3)
        check_spatial("HSICNN3d", (h, w), (h3, w3), (h2, w2))
        layers: OrderedDict[str, nn.Module] = OrderedDict(add_channel=AddChannel())
        prev = 1
        for i, (c, k) in enumerate(zip(channels3d, DEPTH_KERNELS, strict=True), start=1):
            c = scaled(c, width_mult)
            layers[f"conv3d_{i}"] = nn.Conv3d(prev, c, (k, 3, 3), bias=not bn)
            if bn:
                layers[f"bn3d_{i}"] = nn.BatchNorm3d(c)
            layers[f"relu3d_{i}"] = nn.ReLU()
            prev = c
        if hybrid:
            c2 = scaled(channels2d, width_mult)
            layers["fold_depth"] = FoldDepth()
            layers["conv2d"] = nn.Conv2d(prev * d, c2, 3, bias=not bn)
            if bn:
                layers["bn2d"] = nn.BatchNorm2d(c2)
            layers["relu2d"] = nn.ReLU()
            flat = c2 * h2 * w2
        else:
            flat = prev * d * h2 * w2
        layers["flatten"] = nn.Flatten(1)
        for i, f in enumerate(hidden, start=1):
            f = scaled(f, width_mult)
            layers[f"fc{i}"] = nn.Linear(flat, f, bias=not bn)
            if bn:
                layers[f"bn_fc{i}"] = nn.BatchNorm1d(f)
            layers[f"relu_fc{i}"] = nn.ReLU()
            flat = f
        layers[f"fc{len(hidden) + 1}"] = nn.Linear(flat, num_classes)
        super().__init__(layers)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width_mult = width_mult
        init_weights(self)
