"""Channel ordering for weight-shared width supernets: the most important channels first.

A width sub-net keeps each layer's *first* channels (:mod:`lowbit.nn.supernet`). Taken from a
network trained at full width, those are an arbitrary slice. Once-for-all (Cai et al., "Once for
All: Train One Network and Specialize it for Efficient Deployment", ICLR 2020, section 3.2)
sorts the channels by importance before the narrower sub-nets are trained, so that every width
starts from the channels that matter most. Here a channel's importance is the L1 norm of the
weights that produce it, each producing layer's norms divided by their mean (a residual group has
several producers)::

    imp(c) = sum_{layer l producing the group} ||W_l[c]||_1 / mean_c' ||W_l[c']||_1

:func:`order_channels` permutes every channel group of a float model by descending importance
(producers' output channels, BatchNorm, consumers' input channels, a linear layer's channel-major
features after a flatten): the function computed stays the same (checked on a probe input). The
model's input and output groups keep their order.

ResNet's option-A shortcut (:class:`lowbit.models.resnet.PadShortcut`) copies its input's
channels into a slice of its output group: those channels cannot move on their own. Its output
group keeps them together, in the input group's new order, at the shortcut's zero-channel offset
``front = (out - in) // 2``, and sorts only the other channels around them (the most important
ones into the ``front`` slots). The shortcut's ``front`` is then set explicitly, which tells the
supernet to keep the copied channels at that offset in every sub-net that has room for them
(``min(front, c_out - c_in)``; halving every stage keeps them exactly where the full width has
them) instead of centring them in each width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..models.resnet import PadShortcut
from .supernet import _BN, SupernetError, _trace_groups

__all__ = ["order_channels"]


@torch.no_grad()
def order_channels(model: nn.Module, input_shape: Sequence[int],
                   shortcut: str = "keep") -> dict[int, list[int]]:
    """Sort every channel group of the float ``model`` (in place) by descending importance; returns
    ``{group: old channel index of each new position}``. ``shortcut``: where an option-A shortcut's
    copied channels go, ``"keep"`` (at its zero-channel offset) or ``"first"`` (front = 0: every
    width keeps them in place, the narrow ones then hold only copied channels). Raises
    :class:`SupernetError` (and leaves the model as it was) for a model whose function the
    permutation would change."""
    if shortcut not in ("keep", "first"):
        raise SupernetError(f"order_channels: shortcut={shortcut!r}; give 'keep' or 'first'")
    groups, io, fixed = _trace_groups(model)
    modules = dict(model.named_modules())
    fronts = {n: m.front for n, m in modules.items() if isinstance(m, PadShortcut)}
    producers: dict[int, list[str]] = {}
    pads: dict[int, str] = {}
    for n, (_, g_out) in io.items():
        m = modules[n]
        if isinstance(m, PadShortcut):
            if g_out in pads:
                raise SupernetError(f"order_channels: {pads[g_out]} and {n} both copy channels into one "
                                    "group")
            pads[g_out] = n
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and not _depthwise(m):
            producers.setdefault(g_out, []).append(n)
    todo = sorted({g for _, g in io.values()} | {g for g, _ in io.values() if g is not None})
    todo = [g for g in todo if g not in fixed and groups.full[g] is not None]
    probe = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    mode = model.training
    model.eval()
    before = model(probe)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    perms: dict[int, list[int]] = {}
    try:
        while todo:
            ready = [g for g in todo if g not in pads or io[pads[g]][0] in perms or io[pads[g]][0] in fixed]
            if not ready:
                raise SupernetError("order_channels: option-A shortcuts form a cycle")
            for g in ready:
                perms[g] = _group_order(groups.full[g], producers.get(g, []), pads.get(g), io, modules, perms,
                                        shortcut)
                todo.remove(g)
        _apply(io, modules, perms)
        after = model(probe)
        scale = before.abs().max().clamp_min(1e-12)
        if after.shape != before.shape or ((after - before).abs().max() / scale) > 1e-4:
            raise SupernetError("order_channels: permuting the channel groups changed the model's output; "
                                "its forward mixes channels in a way the channel groups do not describe")
    except BaseException:
        model.load_state_dict(saved)
        for n, f in fronts.items():
            modules[n].front = f
        raise
    finally:
        model.train(mode)
    return perms


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups != 1


def _importance(names: list[str], modules: dict[str, nn.Module], full: int) -> Tensor:
    imp = torch.zeros(full, dtype=torch.float64)
    for n in names:
        w = modules[n].weight.detach().double()
        norm = w.reshape(w.shape[0], -1).abs().sum(1)
        imp += norm / norm.mean().clamp_min(1e-12)
    return imp


def _group_order(full: int, producers: list[str], pad: str | None, io: dict[str, tuple[int | None, int]],
                 modules: dict[str, nn.Module], perms: dict[int, list[int]], shortcut: str) -> list[int]:
    imp = _importance(producers, modules, full)
    free = sorted(range(full), key=lambda c: (-float(imp[c]), c))
    if pad is None:
        return free
    m = modules[pad]
    front = (m.out_channels - m.in_channels) // 2 if m.front is None else m.front
    g_in = io[pad][0]
    src = perms.get(g_in, list(range(m.in_channels)))  # a fixed input group keeps its order
    carried = [front + c for c in src]
    free = [c for c in free if not front <= c < front + m.in_channels]
    m.front = front if shortcut == "keep" else 0
    return free[:m.front] + carried + free[m.front:]


def _apply(io: dict[str, tuple[int | None, int]], modules: dict[str, nn.Module],
           perms: dict[int, list[int]]) -> None:
    for n, (g_in, g_out) in io.items():
        m = modules[n]
        p_out = torch.tensor(perms[g_out]) if g_out in perms else None
        p_in = torch.tensor(perms[g_in]) if g_in in perms else None
        if isinstance(m, _BN):
            if p_out is not None:
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(m, attr, None)
                    if isinstance(t, Tensor):
                        t.copy_(t[p_out])
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight
            if p_out is not None:
                w.copy_(w[p_out])
                if m.bias is not None:
                    m.bias.copy_(m.bias[p_out])
            if p_in is not None and not _depthwise(m):
                if isinstance(m, nn.Linear) and w.shape[1] != len(p_in):  # channel-major after a flatten
                    spatial = w.shape[1] // len(p_in)
                    w.copy_(w.view(w.shape[0], len(p_in), spatial)[:, p_in].reshape(w.shape))
                else:
                    w.copy_(w[:, p_in])
