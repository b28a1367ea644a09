"""Switchable-width sub-nets sharing one set of weights (slimmable networks).

Yu, Yang, Xu, Yang, Huang, "Slimmable neural networks" (ICLR 2019) and Yu and Huang, "Universally
slimmable networks and improved training techniques" (ICCV 2019); the seed paper on switchable
sub-nets builds its sub-nets by channel selection inside one network the same way. At width
``r`` every hidden layer uses its first ``round(r * C_out)`` output channels and the input
channels the previous layer produced; the image channels and the classes never change::

    y = W[:c_out(r), :c_in(r)] x + b[:c_out(r)]

BatchNorm statistics differ per width, so each width has its own BatchNorm (switchable BN).
Because the weight sliced is the *quantized* weight (``layer.weight`` of a layer that
:func:`lowbit.quantize` changed), one quantized supernet serves every width: per-output-channel
scales are exact for every sub-net; per-tensor scales are those of the full weight. Activation
quantizers (``input_quantizer``) are shared by all widths.

:class:`SlimmableChain` wraps an ``nn.Sequential`` of convolutions (``groups=1``), linear layers,
BatchNorms and parameter-free modules (activations, pooling, flatten, dropout); a linear layer
after ``Flatten`` sees ``channels x spatial`` features, sliced channel-major. Train it with
:class:`lowbit.train.sandwich.SandwichLoss`; :meth:`SlimmableChain.extract` copies one width out as
an ordinary float ``nn.Sequential`` (latent weights, that width's BatchNorm) to quantize and
export like any model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantize import input_quantizer, latent_weight

__all__ = ["SlimmableChain"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_PLAIN = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.MaxPool2d, nn.AvgPool2d,
          nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)



class SlimmableChain(nn.Module):
    """``net`` (an ``nn.Sequential``) runnable at any of ``widths`` (fractions in (0, 1]); the
    widest is the original network. ``set_width(r)`` picks the active width."""

    def __init__(self, net: nn.Sequential, widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0)) -> None:
        super().__init__()
        if not isinstance(net, nn.Sequential):
            raise ValueError(f"slimmable: needs an nn.Sequential, got {type(net).__name__}")
        ws = sorted({float(w) for w in widths})
        if not ws or ws[0] <= 0 or ws[-1] > 1:
            raise ValueError(f"slimmable: widths must be fractions in (0, 1], got {list(widths)!r}")
        self.net, self.widths = net, ws
        names = [n for n, m in net.named_children()]
        weighted = [n for n, m in net.named_children() if isinstance(m, nn.Conv2d | nn.Linear)]
        if len(weighted) < 2:
            raise ValueError("slimmable: the network needs at least two conv/linear layers")
        for n, m in net.named_children():
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise ValueError(f"slimmable: {n} is a grouped convolution (groups={m.groups}); "
                                 "not supported")
            if not isinstance(m, (nn.Conv2d, nn.Linear, *_BN, *_PLAIN)):
                raise ValueError(f"slimmable: cannot slice {n} ({type(m).__name__}); allowed: conv, linear, "
                                 "batch norm and parameter-free layers")
        self._names, self._last = names, weighted[-1]
        self.plans = [self._plan(w) for w in ws]
        # one BatchNorm per width (the widest is the network's own)
        self.bns = nn.ModuleDict()
        for n, m in net.named_children():
            if isinstance(m, _BN):
                per_width = []
                for plan in self.plans[:-1]:
                    bn = type(m)(plan[n], eps=m.eps, momentum=m.momentum, affine=m.affine,
                                 track_running_stats=m.track_running_stats)
                    with torch.no_grad():
                        if m.affine:
                            bn.weight.copy_(m.weight[: plan[n]])
                            bn.bias.copy_(m.bias[: plan[n]])
                        if m.track_running_stats:
                            bn.running_mean.copy_(m.running_mean[: plan[n]])
                            bn.running_var.copy_(m.running_var[: plan[n]])
                    per_width.append(bn)
                self.bns[n] = nn.ModuleList(per_width)
        self.width_index = len(ws) - 1

    def _plan(self, r: float) -> dict[str, int]:
        """Active channels (or features) of every conv/linear/BN child at width ``r``."""
        plan: dict[str, int] = {}
        prev_full = prev_active = None
        for n, m in self.net.named_children():
            if isinstance(m, nn.Conv2d | nn.Linear):
                out_full = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                plan[n] = out_full if n == self._last else max(1, int(r * out_full + 0.5))
                in_full = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
                if prev_full is None:
                    plan[n + ".in"] = in_full
                else:
                    spatial, rem = divmod(in_full, prev_full)
                    if rem:
                        raise ValueError(f"slimmable: {n} takes {in_full} inputs, not a multiple of the "
                                         f"previous layer's {prev_full} channels")
                    plan[n + ".in"] = prev_active * spatial
                prev_full, prev_active = out_full, plan[n]
            elif isinstance(m, _BN):
                plan[n] = prev_active
        return plan

    @property
    def width(self) -> float:
        return self.widths[self.width_index]

    def set_width(self, r: float) -> None:
        if float(r) not in self.widths:
            raise ValueError(f"slimmable: width {r!r} is not one of {self.widths}")
        self.width_index = self.widths.index(float(r))

    @property
    def choices(self) -> list[float]:
        """The widths, narrowest first (the interface :class:`~lowbit.train.sandwich.SandwichLoss` uses)."""
        return list(self.widths)

    def set_choice(self, r: float) -> None:
        self.set_width(r)

    def active_channels(self, r: float | None = None) -> dict[str, int]:
        """Output channels of every conv/linear child at width ``r`` (default: the active one)."""
        plan = self.plans[self.widths.index(float(r)) if r is not None else self.width_index]
        return {n: c for n, c in plan.items() if not n.endswith(".in") and n in self._weighted()}

    def _weighted(self) -> set[str]:
        return {n for n, m in self.net.named_children() if isinstance(m, nn.Conv2d | nn.Linear)}

    def forward(self, x: Tensor) -> Tensor:
        i = self.width_index
        full = i == len(self.widths) - 1
        plan = self.plans[i]
        for n, m in self.net.named_children():
            if full:
                x = m(x)
            elif isinstance(m, nn.Conv2d | nn.Linear):
                iq = input_quantizer(m)
                if iq is not None:
                    x = iq(x)
                out, inp = plan[n], plan[n + ".in"]
                w = m.weight[:out, :inp]
                b = m.bias[:out] if m.bias is not None else None
                if isinstance(m, nn.Conv2d):
                    x = F.conv2d(x, w, b, m.stride, m.padding, m.dilation)
                else:
                    x = F.linear(x, w, b)
            elif isinstance(m, _BN):
                x = self.bns[n][i](x)
            else:
                x = m(x)
        return x

    @torch.no_grad()
    def extract(self, r: float) -> nn.Sequential:
        """Width ``r`` as a plain float ``nn.Sequential`` (latent weights, its own BatchNorm)."""
        i = self.widths.index(float(r)) if float(r) in self.widths else None
        if i is None:
            raise ValueError(f"slimmable: width {r!r} is not one of {self.widths}")
        plan = self.plans[i]
        out = nn.Sequential()
        for n, m in self.net.named_children():
            if isinstance(m, nn.Conv2d | nn.Linear):
                c_out, c_in = plan[n], plan[n + ".in"]
                if isinstance(m, nn.Conv2d):
                    new: nn.Module = nn.Conv2d(c_in, c_out, m.kernel_size, m.stride, m.padding, m.dilation,
                                               bias=m.bias is not None)
                else:
                    new = nn.Linear(c_in, c_out, bias=m.bias is not None)
                new.weight.copy_(latent_weight(m)[:c_out, :c_in])
                if m.bias is not None:
                    new.bias.copy_(m.bias[:c_out])
            elif isinstance(m, _BN):
                new = copy.deepcopy(m if i == len(self.widths) - 1 else self.bns[n][i])
            else:
                new = copy.deepcopy(m)
            out.add_module(n, new)
        return out
