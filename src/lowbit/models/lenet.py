"""LeNet-style networks: LeNet-5 (with optional BN), its average-pooling twin, and the two small
nets of ReLeQ.

- LeNet-5: LeCun et al., "Gradient-based learning applied to document recognition",
  Proc. IEEE 1998, with the common modern changes (ReLU, max pooling, padding 2 on conv1
  so 28x28 MNIST works) and BatchNorm after every hidden layer, which lets binary and
  ternary weights (whose scale is fixed by the quantizer) train well.
- ``lenet5_avg``: the same LeNet-5 with *average* pooling, the spiking-friendly variant
  (:mod:`lowbit.snn` converts average pools exactly in rate; max pools of spikes are not).
- ``releq_lenet`` / ``releq_simplenet``: the MNIST "Caffe LeNet" and the CIFAR-10
  "SimpleNet" used by ReLeQ (Elthakeb et al., arXiv 1811.01704; he-actlab/releq
  ``models/mnist/lenet_mnist.py``, ``models/cifar10/simplenet_cifar.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn as nn

from ._common import Chain, check_common, check_spatial, init_weights, pair, pool_out, scaled


def _conv_pool_stack(
    name: str,
    in_channels: int,
    channels: Sequence[int],
    kernel: int,
    padding: Sequence[int],
    bn: bool,
    input_size: tuple[int, int],
    pool: type[nn.Module] = nn.MaxPool2d,
) -> tuple[OrderedDict[str, nn.Module], int, tuple[int, int]]:
    """``[conv_i -> (bn_i) -> relu_i -> pool_i]`` for each channel count (``pool``: a 2x2
    max or average pool); returns the layers, the last channel count and the output size."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    h, w = input_size
    sizes = []
    prev = in_channels
    for i, (c, p) in enumerate(zip(channels, padding, strict=True), start=1):
        layers[f"conv{i}"] = nn.Conv2d(prev, c, kernel, padding=p, bias=not bn)
        if bn:
            layers[f"bn{i}"] = nn.BatchNorm2d(c)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"pool{i}"] = pool(2)
        h = pool_out(h + 2 * p - kernel + 1)
        w = pool_out(w + 2 * p - kernel + 1)
        sizes.append((h, w))
        prev = c
    check_spatial(name, input_size, *sizes)
    return layers, prev, (h, w)


def _fc_stack(
    layers: OrderedDict[str, nn.Module],
    in_features: int,
    hidden: Sequence[int],
    num_classes: int,
    bn: bool,
    relu_start: int,
) -> None:
    """Append ``flatten, fc1 -> (bn) -> relu, ..., fc_last`` to ``layers``."""
    layers["flatten"] = nn.Flatten(1)
    prev = in_features
    k = relu_start
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(prev, h, bias=not bn)
        if bn:
            layers[f"bn{k}"] = nn.BatchNorm1d(h)
        layers[f"relu{k}"] = nn.ReLU()
        prev = h
        k += 1
    layers[f"fc{len(hidden) + 1}"] = nn.Linear(prev, num_classes)


class LeNet5(Chain):
    """LeNet-5.

    ``conv1 (in->6, 5x5, pad 2) -> bn1 -> relu1 -> pool1 -> conv2 (6->16, 5x5) -> bn2 ->
    relu2 -> pool2 -> flatten -> fc1 (16*5*5->120) -> bn3 -> relu3 -> fc2 (120->84) -> bn4
    -> relu4 -> fc3 (84->num_classes)``.

    ``input_size`` (default 28) sets the flatten size: 16*5*5 at 28x28, 16*6*6 at 32x32.
    ``width_mult`` scales 6, 16, 120 and 84. With ``bn=True`` the layers before a
    BatchNorm have no bias.
    """

    _name, _pool = "lenet5", nn.MaxPool2d  # the stack's name in errors; its pooling layer

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width_mult: float = 1.0,
        bn: bool = True,
        input_size: int | Sequence[int] = 28,
    ) -> None:
        check_common(num_classes, in_channels, width_mult)
        size = pair(input_size)
        c1, c2 = scaled(6, width_mult), scaled(16, width_mult)
        f1, f2 = scaled(120, width_mult), scaled(84, width_mult)
        layers, c, (h, w) = _conv_pool_stack(self._name, in_channels, (c1, c2), 5, (2, 0), bn, size,
                                             pool=self._pool)
        _fc_stack(layers, c * h * w, (f1, f2), num_classes, bn, relu_start=3)
        super().__init__(layers)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width_mult = width_mult
        init_weights(self)


class LeNet5Avg(LeNet5):
    """:class:`LeNet5` with 2x2 *average* pooling (same layers, names and arguments): the CNN whose
    spiking twin (:func:`lowbit.snn.convert`) is exact in rate at the pools."""

    _name, _pool = "lenet5_avg", nn.AvgPool2d


class ReLeQLeNet(Chain):
    """ReLeQ's MNIST LeNet (the Caffe LeNet): ``conv1 20@5x5 -> relu1 -> pool1 -> conv2
    50@5x5 -> relu2 -> pool2 -> fc1 800->500 -> relu3 -> fc2 500->num_classes``.

    No BatchNorm by default, as in the reference; ``bn=True`` adds it after conv1, conv2 and
    fc1. ``input_size`` (default 28) sets the flatten size (50*4*4 = 800 at 28x28).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width_mult: float = 1.0,
        bn: bool = False,
        input_size: int | Sequence[int] = 28,
    ) -> None:
        check_common(num_classes, in_channels, width_mult)
        size = pair(input_size)
        c1, c2, f1 = scaled(20, width_mult), scaled(50, width_mult), scaled(500, width_mult)
        layers, c, (h, w) = _conv_pool_stack("releq_lenet", in_channels, (c1, c2), 5, (0, 0), bn, size)
        _fc_stack(layers, c * h * w, (f1,), num_classes, bn, relu_start=3)
        super().__init__(layers)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width_mult = width_mult
        init_weights(self)


class ReLeQSimpleNet(Chain):
    """ReLeQ's CIFAR-10 "SimpleNet" (the PyTorch tutorial CNN): ``conv1 6@5x5 -> relu1 ->
    pool1 -> conv2 16@5x5 -> relu2 -> pool2 -> fc1 400->120 -> relu3 -> fc2 120->84 ->
    relu4 -> fc3 84->num_classes`` for 32x32x3 input.

    No BatchNorm by default, as in the reference; ``bn=True`` adds it.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        bn: bool = False,
        input_size: int | Sequence[int] = 32,
    ) -> None:
        check_common(num_classes, in_channels, width_mult)
        size = pair(input_size)
        c1, c2 = scaled(6, width_mult), scaled(16, width_mult)
        f1, f2 = scaled(120, width_mult), scaled(84, width_mult)
        layers, c, (h, w) = _conv_pool_stack("releq_simplenet", in_channels, (c1, c2), 5, (0, 0), bn, size)
        _fc_stack(layers, c * h * w, (f1, f2), num_classes, bn, relu_start=3)
        super().__init__(layers)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width_mult = width_mult
        init_weights(self)
