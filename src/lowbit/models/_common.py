"""Small building blocks shared by the zoo models (no lowbit imports)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn as nn


def scaled(channels: int, width_mult: float) -> int:
    """``channels * width_mult`` rounded half up, at least 1."""
    return max(1, int(channels * width_mult + 0.5))


def check_common(num_classes: int, in_channels: int, width_mult: float) -> None:
    """Reject impossible values of the arguments every zoo model takes."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}")
    if isinstance(width_mult, bool) or not isinstance(width_mult, int | float) or width_mult <= 0:
        raise ValueError(f"width_mult must be a number > 0, got {width_mult!r}")


def pair(size: int | Sequence[int], what: str = "input_size") -> tuple[int, int]:
    """``28 -> (28, 28)``; ``(40, 32) -> (40, 32)``."""
    if isinstance(size, int) and not isinstance(size, bool):
        h = w = size
    elif isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, int) for s in size):
        h, w = size
    else:
        raise ValueError(f"{what} must be an int or a pair of ints (H, W), got {size!r}")
    if h < 1 or w < 1:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return int(h), int(w)


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution / pooling along one axis (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


def pool_out(size: int, kernel: int = 2, ceil: bool = False) -> int:
    """Output length of a non-overlapping max pool (stride = kernel)."""
    return -(-size // kernel) if ceil else size // kernel


def check_spatial(model_name: str, input_size: tuple[int, int], *sizes: tuple[int, int]) -> None:
    """Raise a ValueError when an input is too small for the network."""
    for h, w in sizes:
        if h < 1 or w < 1:
            raise ValueError(
                f"{model_name}: input_size {input_size} is too small for this network "
                "(a feature map shrinks to nothing)"
            )


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions (fan-out for dense, fan-in for grouped/depthwise ones,
    which keeps the variance sane when each filter sees one channel), zero conv biases,
    BatchNorm weight 1 / bias 0. Linear layers keep PyTorch's default (Kaiming-uniform)."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            mode = "fan_out" if m.groups == 1 else "fan_in"
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Chain(nn.Sequential):
    """A feed-forward network whose layers are named attributes (``conv1``, ``bn1``,
    ``relu1``, ``fc``...), so module names read well in recipes and reports and an
    activation module can be swapped per use with ``setattr(model, "relu1", new)``."""

    def __init__(self, layers: OrderedDict[str, nn.Module]) -> None:
        super().__init__(layers)
