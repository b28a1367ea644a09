"""Parameter and MAC accounting for any model (the input of size / BOPs reports).

MACs are multiply-accumulates of one input sample (bias additions not counted):

- convolution: ``out_elements * (in_channels / groups) * prod(kernel_size)``, so a
  depthwise 3x3 conv costs ``C * H_out * W_out * 9``;
- transposed convolution: ``in_elements * (out_channels / groups) * prod(kernel_size)``;
- linear: ``out_elements * in_features`` (extra leading dimensions included).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class LayerInfo:
    """One conv/linear layer of :func:`layer_table`.

    ``type`` is the torch.nn class name (``Conv2d``, ``Linear``...), also for layers whose
    weight is parametrized by a quantizer. ``params`` counts weight + bias. ``macs`` is per
    input sample and summed over calls; ``calls`` is how many times the layer ran in the
    probe forward (0: unused, ``macs`` 0). Shapes exclude the batch dimension.
    """

    name: str
    type: str
    weight_shape: tuple[int, ...]
    params: int
    macs: int
    groups: int
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    calls: int

    def as_dict(self) -> dict:
        return asdict(self)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor once); latent weights of parametrized
    layers count once, as stored."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _torch_type_name(module: nn.Module) -> str:
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn.modules"):
            return cls.__name__
    return type(module).__name__


def _stored_weight(module: nn.Module) -> torch.Tensor:
    """The weight as stored, without running a weight parametrization (quantizer)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """MACs of one call on the whole batch."""
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    k = math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return inp.numel() * (module.out_channels // module.groups) * k
    return out.numel() * (module.in_channels // module.groups) * k


def layer_table(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
) -> list[LayerInfo]:
    """Per conv/linear layer: name, type, weight shape, parameters and MACs for one input of
    ``input_shape`` (without the batch dimension, e.g. ``(3, 32, 32)``).

    Runs one forward pass of a zero batch in eval mode under ``torch.no_grad()`` with
    forward hooks, then restores every module's train/eval flag. Layers are listed in
    ``named_modules`` order.
    """
    shape = tuple(int(s) for s in input_shape)
    layers = {name: m for name, m in model.named_modules() if name and isinstance(m, LAYER_TYPES)}
    stats: dict[str, dict] = {n: {"macs": 0, "calls": 0, "in": None, "out": None} for n in layers}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            inp = args[0] if args else out
            s = stats[name]
            s["macs"] += _macs(module, inp, out)
            s["calls"] += 1
            if s["in"] is None:
                s["in"] = tuple(inp.shape[1:])
                s["out"] = tuple(out.shape[1:])

        return hook

    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers.items()]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((batch_size, *shape), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    table = []
    for name, m in layers.items():
        w = _stored_weight(m)
        bias = getattr(m, "bias", None)
        s = stats[name]
        table.append(
            LayerInfo(
                name=name,
                type=_torch_type_name(m),
                weight_shape=tuple(w.shape),
                params=w.numel() + (bias.numel() if bias is not None else 0),
                macs=int(s["macs"]) // batch_size,
                groups=int(getattr(m, "groups", 1)),
                input_shape=s["in"],
                output_shape=s["out"],
                calls=s["calls"],
            )
        )
    return table
