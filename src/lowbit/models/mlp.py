"""Multi-layer perceptron (flattens its input)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn as nn

from ._common import Chain, check_common, init_weights, scaled


class MLP(Chain):
    """``flatten -> [fc_i -> (bn_i) -> relu_i] * len(hidden) -> fc_{L+1}``.

    Layer names: ``fc1, bn1, relu1, fc2, ...``; the last Linear is ``fc{len(hidden)+1}``.
    Hidden sizes are multiplied by ``width_mult``; ``in_features`` and ``num_classes`` are
    not. With ``bn=True`` the Linear layers before a BatchNorm have no bias (BN absorbs it).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_features: int = 784,
        width_mult: float = 1.0,
        hidden: Sequence[int] = (512, 512),
        bn: bool = False,
    ) -> None:
        check_common(num_classes, in_features, width_mult)
        if isinstance(hidden, int | str) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden
        ):
            raise ValueError(f"hidden must be a sequence of positive ints, got {hidden!r}")
        sizes = [scaled(h, width_mult) for h in hidden]
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten(1))
        prev = in_features
        for i, h in enumerate(sizes, start=1):
            layers[f"fc{i}"] = nn.Linear(prev, h, bias=not bn)
            if bn:
                layers[f"bn{i}"] = nn.BatchNorm1d(h)
            layers[f"relu{i}"] = nn.ReLU()
            prev = h
        layers[f"fc{len(sizes) + 1}"] = nn.Linear(prev, num_classes)
        super().__init__(layers)
        self.num_classes = num_classes
        self.in_features = in_features
        self.width_mult = width_mult
        self.hidden = tuple(sizes)
        init_weights(self)
