"""Any-topology, any-precision supernets: sub-nets of several widths and bit-widths that share one
set of latent weights and are switched at run time.

Seed 002's survey of weight sharing (SuperServe's SubNetAct: one weight-shared network whose
sub-nets are switched without reloading) and the slimmable/any-precision line of work: Yu et al.,
"Slimmable neural networks" (ICLR 2019) for channel slicing with per-width BatchNorm, and Yu et
al., "Any-precision deep neural networks" (AAAI 2021) for one set of float weights quantized at
run time to any of several bit-widths, each bit-width with its own BatchNorm.

A sub-net ``s`` has a width per *channel group* and one weight/activation bit-width pair. Every
convolution or linear layer of the float model keeps its first output channels and the input
channels its producer kept, and quantizes that slice of the shared latent weight::

    W_s = Q_{w_bits(s)}( W[:c_out(s), :c_in(s)] )        x_s = Q_{a_bits(s)}(x)
    y   = conv(x_s, W_s) + b[:c_out(s)]

Channel groups come from tracing the model (``torch.fx``): layers whose outputs are added
together (residual connections) must keep the same channels, so they form one group; a
depthwise convolution and BatchNorm pass their input's group through; the network's output group
never shrinks. A width rule ``{"layer2.*": 0.5}`` sets a group's fraction if it matches any member
layer of the group (later rules win, unmatched groups stay at 1.0); a single number is a uniform
width. Active channels are ``max(1, round(r * C))``. A linear layer after a flatten sees
``C x spatial`` features, sliced channel-major. ResNet's parameter-free option-A shortcut pads to
the active width of its output group.

Every sub-net has its own BatchNorm (per-choice BN, initialized from the float model's). Activation
quantizers (e.g. PACT's clip level) are per layer and per activation bit-width, shared by widths.
Weight quantizers must be stateless (DoReFa, binary, TWN ...): their output must depend on the
slice alone, so that a switched sub-net equals the extracted one. The layers named by
``keep_float`` (default the first and the last) stay full precision, as is usual for low-bit nets;
a bit-width of 32 means "not quantized".

Switching (:meth:`Supernet.set_subnet`) replaces one reference; in eval mode each layer quantizes
its weight slice once per sub-net and caches it (no re-quantizing on the hot path; ``train()``
and ``load_state_dict`` drop the caches). :meth:`Supernet.run` switches and runs under a lock, so
a batch is never computed by a half-switched model. :meth:`Supernet.extract` builds the sub-net
as an ordinary lowbit-quantized model whose outputs equal the switched supernet's bit for bit.
"""

from __future__ import annotations

import copy
import fnmatch
import operator
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.resnet import PadShortcut
from ..quant.base import ActivationQuantizer, WeightQuantizer
from ..quant.registry import create as build_quantizer
from .quantize import QuantizeError, quantize, quantized_layers

__all__ = ["SubnetSpec", "Supernet", "SupernetError", "parse_subnets"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_FLOAT = 32


class SupernetError(ValueError):
    """The model or the sub-net specification cannot make a supernet (the message says why)."""


@dataclass(frozen=True)
class SubnetSpec:
    """One sub-net: ``width`` (a fraction in (0, 1], or ordered ``(glob, fraction)`` rules) and
    weight/activation bits (1..8, or 32 for float)."""

    name: str
    width: float | tuple[tuple[str, float], ...] = 1.0
    w_bits: int = _FLOAT
    a_bits: int = _FLOAT

    def to_dict(self) -> dict[str, Any]:
        w = self.width if isinstance(self.width, float) else {g: r for g, r in self.width}
        return {"name": self.name, "width": w, "w_bits": self.w_bits, "a_bits": self.a_bits}


def parse_subnets(items: Sequence[Mapping[str, Any] | SubnetSpec]) -> list[SubnetSpec]:
    """Sub-net specs from dicts ``{"name", "width": r | {glob: r}, "bits": b | [w, a]}`` (or
    ``w_bits``/``a_bits``); names must be unique."""
    out: list[SubnetSpec] = []
    for i, it in enumerate(items):
        if isinstance(it, SubnetSpec):
            out.append(it)
            continue
        if not isinstance(it, Mapping) or not isinstance(it.get("name"), str) or not it["name"]:
            raise SupernetError(f"sub-net {i}: needs a dict with a non-empty 'name', got {it!r}")
        name = it["name"]
        unknown = set(it) - {"name", "width", "bits", "w_bits", "a_bits"}
        if unknown:
            raise SupernetError(f"sub-net {name!r}: unknown keys {sorted(unknown)}; allowed: name, width, "
                                "bits, w_bits, a_bits")
        width = it.get("width", 1.0)
        if isinstance(width, Mapping):
            rules = tuple((str(g), _fraction(name, r)) for g, r in width.items())
            w: float | tuple[tuple[str, float], ...] = rules
        else:
            w = _fraction(name, width)
        bits = it.get("bits", _FLOAT)
        wb, ab = (bits, bits) if not isinstance(bits, (list, tuple)) else tuple(bits)
        wb, ab = it.get("w_bits", wb), it.get("a_bits", ab)
        for kind, b in (("w_bits", wb), ("a_bits", ab)):
            if isinstance(b, bool) or not isinstance(b, int) or not (1 <= b <= 8 or b == _FLOAT):
                raise SupernetError(f"sub-net {name!r}: {kind}={b!r}; give an integer 1..8, or 32 for float")
        out.append(SubnetSpec(name, w, int(wb), int(ab)))
    names = [s.name for s in out]
    if not out or len(set(names)) != len(names):
        raise SupernetError(f"sub-nets need unique names, got {names}")
    return out


def _fraction(name: str, r: Any) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < float(r) <= 1:
        raise SupernetError(f"sub-net {name!r}: width {r!r} must be a fraction in (0, 1]")
    return float(r)


@dataclass
class _Plan:
    """What a sub-net means for every layer: active channels per group, bits, its index."""

    index: int
    spec: SubnetSpec
    channels: dict[int, int]
    macs: int = 0
    bops: int = 0
    weight_bits: int = 0


@dataclass
class _Switch:
    """The active plan, shared by every switchable layer: switching is one reference assignment."""

    plan: _Plan


@dataclass
class _Groups:
    """Union-find over channel groups traced from the model."""

    parent: list[int] = field(default_factory=list)
    full: list[int | None] = field(default_factory=list)
    members: list[list[str]] = field(default_factory=list)

    def new(self, full: int | None, member: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.full.append(full)
        self.members.append([member] if member else [])
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        fa, fb = self.full[a], self.full[b]
        if fa is not None and fb is not None and fa != fb:
            raise SupernetError(f"tensors with {fa} and {fb} channels are combined elementwise "
                                f"(layers {self.members[a]} and {self.members[b]})")
        self.parent[b] = a
        self.full[a] = fa if fa is not None else fb
        self.members[a] += self.members[b]
        return a


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PadShortcut) or super().is_leaf_module(m, qualname)


_NO_GROUP_FUNCS = {getattr, operator.getitem}
_CONCAT = {torch.cat, torch.stack, torch.concat, "cat", "stack"}


def _trace_groups(model: nn.Module) -> tuple[_Groups, dict[str, tuple[int | None, int]], set[int]]:
    """Channel groups: ``{module name: (input group, output group)}`` and the fixed groups."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many kinds; the user needs the reason
        raise SupernetError(f"supernet: cannot trace {type(model).__name__} with torch.fx ({e}); a "
                            "supernet needs a model whose forward has no data-dependent control flow") from e
    modules = dict(model.named_modules())
    groups = _Groups()
    of: dict[fx.Node, int | None] = {}
    io: dict[str, tuple[int | None, int]] = {}
    fixed: set[int] = set()

    def arg_groups(args: Any) -> list[int]:
        found: list[int] = []
        fx.node.map_arg(args, lambda n: found.append(of[n]) if of.get(n) is not None else None)
        return found

    for node in graph.nodes:
        if node.op == "placeholder":
            of[node] = groups.new(None)
            fixed.add(of[node])
        elif node.op == "call_module":
            m, name = modules[node.target], str(node.target)
            ins = arg_groups(node.args[:1])
            g_in = ins[0] if ins else None
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                grouped = isinstance(m, nn.Conv2d) and m.groups != 1
                if grouped and not (m.groups == m.in_channels == m.out_channels):
                    raise SupernetError(f"supernet: {name} is a grouped convolution (groups={m.groups}); "
                                        "only ordinary and depthwise convolutions can be sliced")
                if grouped:
                    of[node] = g_in
                else:
                    out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                    of[node] = groups.new(out, name)
                io[name] = (g_in, of[node])  # type: ignore[assignment]
            elif isinstance(m, _BN):
                of[node] = g_in
                io[name] = (g_in, g_in)  # type: ignore[assignment]
            elif isinstance(m, PadShortcut):
                of[node] = groups.new(m.out_channels, name)
                io[name] = (g_in, of[node])  # type: ignore[assignment]
            elif _has_state(m, recurse=False):
                raise SupernetError(f"supernet: cannot slice {name} ({type(m).__name__}); allowed: conv, "
                                    "linear, batch norm, option-A shortcuts and parameter-free modules")
            else:
                of[node] = g_in
        elif node.op in ("call_function", "call_method"):
            if node.target in _CONCAT:
                raise SupernetError(f"supernet: {node.name} concatenates tensors; channel slicing through "
                                    "a concatenation is not supported")
            gs = [] if node.target in _NO_GROUP_FUNCS else arg_groups((node.args, node.kwargs))
            g = gs[0] if gs else None
            for other in gs[1:]:
                g = groups.union(g, other)  # type: ignore[arg-type]
            of[node] = g
        elif node.op == "output":
            fixed.update(arg_groups(node.args))
        else:
            of[node] = None
    fixed = {groups.find(g) for g in fixed}
    resolved = {n: (None if i is None else groups.find(i), groups.find(o)) for n, (i, o) in io.items()}
    return groups, resolved, fixed


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


class _SwitchLayer(nn.Module):
    """A conv/linear layer of the supernet: slices, quantizes (cached in eval) and runs ``base``."""

    def __init__(self, base: nn.Module, switch: _Switch, sizes: list[tuple[int, int]], spatial: int | None,
                 full_in_channels: int | None, wq: dict[int, WeightQuantizer],
                 aq: dict[int, ActivationQuantizer]) -> None:
        super().__init__()
        self.base = base
        self._switch = switch
        self.sizes = sizes  # per plan: (c_out, c_in or active input channels)
        self.spatial, self.full_in = spatial, full_in_channels
        self.depthwise = isinstance(base, nn.Conv2d) and base.groups != 1
        self.wq = nn.ModuleDict({str(b): q for b, q in wq.items()})
        self.aq = nn.ModuleDict({str(b): q for b, q in aq.items()})
        self._cache: dict[int, Tensor] = {}

    def weight_slice(self, i: int) -> Tensor:
        """The latent float weight of plan ``i`` (contiguous, as the extracted layer stores it)."""
        w = self.base.weight
        c_out, c_in = self.sizes[i]
        if self.depthwise:
            return w[:c_out].contiguous()
        if self.spatial is not None and self.full_in is not None:  # linear after a flatten
            return w.view(w.shape[0], self.full_in, self.spatial)[:c_out, :c_in].reshape(c_out, -1)
        return w[:c_out, :c_in].contiguous()

    def quantized_weight(self, plan: _Plan) -> Tensor:
        i = plan.index
        cached = self._cache.get(i)
        if cached is not None and not self.training:
            return cached
        w = self.weight_slice(i)
        q = self.wq[str(plan.spec.w_bits)] if str(plan.spec.w_bits) in self.wq else None  # noqa: SIM401
        if q is not None:
            w = q(w)
        if not self.training:
            self._cache[i] = w.detach()
        return w

    def forward(self, x: Tensor) -> Tensor:
        plan = self._switch.plan
        key = str(plan.spec.a_bits)
        if key in self.aq:
            x = self.aq[key](x)
        w = self.quantized_weight(plan)
        c_out = self.sizes[plan.index][0]
        bias = self.base.bias[:c_out] if self.base.bias is not None else None
        m = self.base
        if isinstance(m, nn.Linear):
            return F.linear(x, w, bias)
        return F.conv2d(x, w, bias, m.stride, m.padding, m.dilation, c_out if self.depthwise else 1)

    def extract(self, i: int) -> nn.Module:
        m = self.base
        c_out, c_in = self.sizes[i]
        bias = m.bias is not None
        if isinstance(m, nn.Linear):
            new: nn.Module = nn.Linear(self.weight_slice(i).shape[1], c_out, bias=bias)
        else:
            c_in = c_out if self.depthwise else c_in
            new = nn.Conv2d(c_in, c_out, m.kernel_size, m.stride, m.padding, m.dilation,
                            groups=c_out if self.depthwise else 1, bias=bias)
        with torch.no_grad():
            new.weight.copy_(self.weight_slice(i))
            if bias:
                new.bias.copy_(m.bias[:c_out])
        return new


class _SwitchBN(nn.Module):
    """One BatchNorm per sub-net (sized to its active channels)."""

    def __init__(self, bns: list[nn.Module], switch: _Switch) -> None:
        super().__init__()
        self.bns = nn.ModuleList(bns)
        self._switch = switch

    def forward(self, x: Tensor) -> Tensor:
        return self.bns[self._switch.plan.index](x)


class _SwitchPad(nn.Module):
    """Option-A shortcut padded to the active width of its output group.

    With the base's ``front`` left to its default, every sub-net centres its input's channels in its
    own width (so a channel's position depends on the width). With an explicit ``front`` (a
    channel-ordered model, :mod:`lowbit.nn.channel_order`) they stay where the full width puts them,
    as far as the sub-net's width allows: ``min(front, c_out - c_in)`` zero channels in front."""

    def __init__(self, base: PadShortcut, switch: _Switch, sizes: list[tuple[int, int]]) -> None:
        super().__init__()
        self.base, self._switch, self.sizes = base, switch, sizes
        self._pads = [PadShortcut(c_in, c_out, base.stride,
                                  None if base.front is None else min(base.front, c_out - c_in))
                      for c_out, c_in in sizes]

    def forward(self, x: Tensor) -> Tensor:
        return self._pads[self._switch.plan.index](x)


class Supernet(nn.Module):
    """``model`` (a float model) as a weight-shared supernet of ``subnets``.

    Args:
        model: the float model, changed in place (its conv/linear/BN layers become switchable).
        subnets: sub-net specs (see :func:`parse_subnets`).
        input_shape: one sample's shape, e.g. ``(1, 28, 28)`` (for MACs/BOPs and serving).
        weight: weight quantizer ``{"method": ..., **kwargs}`` (bits come from each sub-net).
        activation: activation quantizer ``{"method": ..., **kwargs}``.
        keep_float: globs (and ``@first``/``@last``) of layers that stay full precision.
        order: ``"l1"`` sorts every channel group of ``model`` by importance first, so that the
            narrower sub-nets keep the channels that matter most
            (:func:`lowbit.nn.channel_order.order_channels`; the float function is unchanged);
            ``None`` keeps the model's order.
    """

    def __init__(self, model: nn.Module, subnets: Sequence[Mapping[str, Any] | SubnetSpec],
                 input_shape: Sequence[int], weight: Mapping[str, Any] | None = None,
                 activation: Mapping[str, Any] | None = None,
                 keep_float: Sequence[str] = ("@first", "@last"), order: str | None = None) -> None:
        super().__init__()
        if quantized_layers(model):
            raise SupernetError("supernet: give the float model; the supernet quantizes each sub-net itself")
        if order not in (None, "l1"):
            raise SupernetError(f"supernet: order={order!r}; give 'l1' (channels by importance) or None")
        self.specs = parse_subnets(subnets)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.order = order
        if order is not None:
            from .channel_order import order_channels  # it builds on this module's channel groups

            order_channels(model, self.input_shape)
        self.weight_cfg = dict(weight or {"method": "dorefa"})
        self.activation_cfg = dict(activation or {"method": "pact", "alpha_init": 4.0})
        self.keep_float_rules = tuple(keep_float)
        groups, io, fixed = _trace_groups(model)
        self.model = model
        self.info: dict[str, dict[str, Any]] = {s.name: {} for s in self.specs}
        modules = dict(model.named_modules())
        layers = [n for n, (_, _) in io.items() if isinstance(modules[n], (nn.Conv2d, nn.Linear))]
        order = {n: i for i, n in enumerate(modules)}
        layers.sort(key=order.__getitem__)
        self.layer_names = layers
        self.float_layers = {n for n in layers if self._keep_float(n, layers)}
        roots = sorted({g for _, g in io.values()} | {g for g, _ in io.values() if g is not None})
        self.plans = [_Plan(i, s, {g: self._active(groups, fixed, g, s) for g in roots})
                      for i, s in enumerate(self.specs)]
        self._switch = _Switch(self.plans[-1])
        self._lock = threading.RLock()
        w_bits = sorted({s.w_bits for s in self.specs} - {_FLOAT})
        a_bits = sorted({s.a_bits for s in self.specs} - {_FLOAT})

        def sizes(n: str) -> list[tuple[int, int]]:
            g_in, g_out = io[n]
            return [(p.channels[g_out], p.channels[g_in] if g_in is not None else -1) for p in self.plans]

        for n in sorted(io, key=order.__getitem__):
            m, (g_in, _) = modules[n], io[n]
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                q = n not in self.float_layers
                wq = {b: self._weight_quantizer(b) for b in w_bits} if q else {}
                aq = {b: build_quantizer("activation", self.activation_cfg["method"], b,
                                         **_kwargs(self.activation_cfg)) for b in a_bits} if q else {}
                spatial = full_in = None
                if isinstance(m, nn.Linear) and g_in is not None and g_in not in fixed:
                    full_in = groups.full[g_in]
                    spatial, rem = divmod(m.in_features, full_in or 1)
                    if rem:
                        raise SupernetError(f"supernet: {n} takes {m.in_features} features, not a "
                                            f"multiple of its input's {full_in} channels")
                s = sizes(n)
                if g_in is None or g_in in fixed:
                    full = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
                    s = [(o, full) for o, _ in s]
                _set_module(model, n, _SwitchLayer(m, self._switch, s, spatial, full_in, wq, aq))
            elif isinstance(m, _BN):
                bns = []
                for c, _ in sizes(n):
                    bn = copy.deepcopy(m)
                    _slice_bn(bn, c)
                    bns.append(bn)
                _set_module(model, n, _SwitchBN(bns, self._switch))
            elif isinstance(m, PadShortcut):
                _set_module(model, n, _SwitchPad(m, self._switch, sizes(n)))
        self._count_costs()

    # ---- construction helpers ----------------------------------------------------------------
    def _keep_float(self, name: str, layers: list[str]) -> bool:
        for rule in self.keep_float_rules:
            if (rule == "@first" and name == layers[0]) or (rule == "@last" and name == layers[-1]):
                return True
            if fnmatch.fnmatchcase(name, rule):
                return True
        return False

    @staticmethod
    def _active(groups: _Groups, fixed: set[int], g: int, spec: SubnetSpec) -> int:
        full = groups.full[g]
        if full is None:
            return -1
        if g in fixed:
            return full
        r = 1.0
        if isinstance(spec.width, float):
            r = spec.width
        else:
            for glob, frac in spec.width:
                if any(fnmatch.fnmatchcase(m, glob) for m in groups.members[g]):
                    r = frac
        return max(1, int(r * full + 0.5))

    def _weight_quantizer(self, bits: int) -> WeightQuantizer:
        q = build_quantizer("weight", self.weight_cfg["method"], bits, **_kwargs(self.weight_cfg))
        if _has_state(q):
            raise SupernetError(f"supernet: weight method {self.weight_cfg['method']!r} has learned state; "
                                "use a stateless one (dorefa, binary, twn, ...) so every width quantizes "
                                "its own slice")
        return q  # type: ignore[return-value]

    @torch.no_grad()
    def _count_costs(self) -> None:
        """MACs, BOPs (MACs x w_bits x a_bits) and weight bits of every sub-net, from one probe each."""
        mode = self.training
        self.eval()
        layers = self.switch_layers()
        try:
            for p in self.plans:
                macs: dict[str, int] = {}
                hs = [m.register_forward_hook(partial(_count_macs, macs=macs, name=n, index=p.index))
                      for n, m in layers.items()]
                self._switch.plan = p
                try:
                    self.model(torch.zeros((1, *self.input_shape)))
                finally:
                    for h in hs:
                        h.remove()
                p.macs = sum(macs.values())
                p.bops = p.weight_bits = 0
                for n, m in layers.items():
                    wb, ab = ((_FLOAT, _FLOAT) if n in self.float_layers else (p.spec.w_bits, p.spec.a_bits))
                    p.bops += macs[n] * wb * ab
                    p.weight_bits += m.weight_slice(p.index).numel() * wb
        finally:
            self._switch.plan = self.plans[-1]
            self._drop_caches()
            self.train(mode)

    # ---- switching -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def choices(self) -> list[str]:
        """Sub-net names from the cheapest to the most expensive (by BOPs, then MACs)."""
        return [p.spec.name for p in sorted(self.plans, key=lambda p: (p.bops, p.macs, p.index))]

    @property
    def subnet(self) -> str:
        return self._switch.plan.spec.name

    def plan(self, name: str) -> _Plan:
        for p in self.plans:
            if p.spec.name == name:
                return p
        raise SupernetError(f"supernet: no sub-net {name!r}; sub-nets: {self.names}")

    def set_subnet(self, name: str) -> None:
        """Make ``name`` the active sub-net (one reference assignment)."""
        p = self.plan(name)
        with self._lock:
            self._switch.plan = p

    set_choice = set_subnet  # the name SandwichLoss uses

    def cost(self, name: str) -> dict[str, int]:
        p = self.plan(name)
        return {"macs": p.macs, "bops": p.bops, "weight_bits": p.weight_bits}

    def forward(self, x: Tensor) -> Tensor:
        """The active sub-net on ``x``, under the supernet's lock: a :meth:`set_subnet` from another
        thread waits until the call ends, so every layer of one call sees the same sub-net (each
        layer reads the active sub-net when it runs). To run given sub-nets from several threads,
        use :meth:`run`."""
        with self._lock:
            return self.model(x)

    def run(self, x: Tensor, name: str) -> Tensor:
        """Switch to ``name`` and run ``x``, atomically with respect to other ``run`` calls."""
        p = self.plan(name)
        with self._lock:
            self._switch.plan = p
            return self.model(x)

    def switch_layers(self) -> dict[str, _SwitchLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, _SwitchLayer)}

    @torch.no_grad()
    def prepare(self) -> Supernet:
        """Eval mode with every sub-net's quantized weights computed once (cached)."""
        self.eval()
        for m in self.switch_layers().values():
            for p in self.plans:
                m.quantized_weight(p)
        return self

    def _drop_caches(self) -> None:
        for m in self.model.modules():
            if isinstance(m, _SwitchLayer):
                m._cache.clear()

    def train(self, mode: bool = True) -> Supernet:
        self._drop_caches()
        return super().train(mode)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        self._drop_caches()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ---- extraction ------------------------------------------------------------------------------
    @torch.no_grad()
    def sliced(self, name: str) -> nn.Module:
        """Sub-net ``name`` as a float model of its sizes (its weight slices, its own BatchNorm),
        not quantized; eval mode. :meth:`extract` quantizes it; a supernet file loads into it."""
        i = self.plan(name).index
        out = copy.deepcopy(self.model)
        for n, m in list(out.named_modules()):
            if isinstance(m, _SwitchLayer):
                _set_module(out, n, m.extract(i))
            elif isinstance(m, _SwitchBN):
                _set_module(out, n, copy.deepcopy(m.bns[i]))
            elif isinstance(m, _SwitchPad):
                _set_module(out, n, copy.deepcopy(m._pads[i]))
        if hasattr(out, "lowbit_spec"):
            del out.lowbit_spec  # its sizes are no longer the zoo's
        return out.eval()

    def recipe(self, name: str) -> dict[str, Any] | None:
        """The :func:`lowbit.quantize` recipe of sub-net ``name`` (None for a float sub-net)."""
        p = self.plan(name)
        wb, ab = p.spec.w_bits, p.spec.a_bits
        quantized = [n for n in self.layer_names if n not in self.float_layers]
        if not quantized or (wb == _FLOAT and ab == _FLOAT):
            return None
        w = None if wb == _FLOAT else {**self.weight_cfg, "bits": wb}
        a = None if ab == _FLOAT else {**self.activation_cfg, "bits": ab}
        return {"name": f"supernet-{name}", "default": {"weight": None, "activation": None},
                "rules": [{"match": n, "weight": w, "activation": a} for n in quantized]}

    @torch.no_grad()
    def extract(self, name: str) -> nn.Module:
        """Sub-net ``name`` alone: a float model of its sizes, quantized by :func:`lowbit.quantize`
        with the supernet's quantizers (their state copied), its own BatchNorm; eval mode."""
        p = self.plan(name)
        out = self.sliced(name)
        ab = p.spec.a_bits
        quantized = [n for n in self.layer_names if n not in self.float_layers]
        recipe = self.recipe(name)
        if recipe is not None:  # a float sub-net is a plain float model
            try:
                quantize(out, recipe, strict=True)
            except QuantizeError as e:  # pragma: no cover - the copy is fresh
                raise SupernetError(f"supernet: cannot quantize sub-net {name!r}: {e}") from e
            src = self.switch_layers()
            for n in quantized:
                if ab != _FLOAT:
                    out.get_submodule(n).input_quantizer.load_state_dict(src[n].aq[str(ab)].state_dict())
        return out.eval()

    # ---- description -------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """JSON description that rebuilds this supernet around the same float model."""
        out = {"subnets": [s.to_dict() for s in self.specs], "input_shape": list(self.input_shape),
               "weight": self.weight_cfg, "activation": self.activation_cfg,
               "keep_float": list(self.keep_float_rules), "info": self.info}
        if self.order is not None:  # rebuilding re-creates the ordered layout; the weights come after
            out["order"] = self.order
        return out

    def table(self) -> list[dict[str, Any]]:
        """One row per sub-net: name, widths, bits, MACs, BOPs, weight bits, and its ``info``."""
        return [{**p.spec.to_dict(), **self.cost(p.spec.name), **self.info.get(p.spec.name, {})}
                for p in self.plans]


def _has_state(m: nn.Module, recurse: bool = True) -> bool:
    return any(True for _ in m.parameters(recurse=recurse)) or any(True for _ in m.buffers(recurse=recurse))


def _count_macs(mod: _SwitchLayer, args: Any, out: Tensor, *, macs: dict[str, int], name: str,
                index: int) -> None:
    """Forward hook: MACs per sample = outputs per sample x weight row length."""
    w = mod.weight_slice(index)
    macs[name] = (out.numel() // out.shape[0]) * (w.numel() // w.shape[0])


def _kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in ("method", "bits")}


def _slice_bn(bn: nn.Module, c: int) -> None:
    """Keep the first ``c`` channels of a BatchNorm (in place)."""
    bn.num_features = c
    for attr in ("weight", "bias"):
        t = getattr(bn, attr, None)
        if isinstance(t, nn.Parameter):
            setattr(bn, attr, nn.Parameter(t.detach()[:c].clone()))
    for attr in ("running_mean", "running_var"):
        t = getattr(bn, attr, None)
        if isinstance(t, Tensor):
            setattr(bn, attr, t[:c].clone())
