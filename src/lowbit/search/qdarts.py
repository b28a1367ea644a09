"""∇QDARTS: differentiable joint search of each layer's operation and its weight/activation bits.

Behnam, Kamal, Ganesh, Li, Jurado, Khare, Fedorov, Liu, Tumanov, "Gradient-based automated
quantization of neural architectures" (∇QDARTS), TMLR 2025; built on DARTS (Liu, Simonyan, Yang,
ICLR 2019) and the bit mixing of EdMIPS (Cai, Vasconcelos, CVPR 2020).

Search space. A small CIFAR cell network: a float stem (3x3 conv, BN, ReLU), ``L`` searchable
layers (stride 2 and doubled channels at ``reductions``), global average pooling and a float
classifier. Layer ``l`` chooses one operation ``o`` from ``ops`` (``conv3x3``, ``conv5x5``,
``sep3x3`` = depthwise 3x3 + pointwise 1x1, ``dil3x3`` = 3x3 with dilation 2, ``skip`` = identity,
offered only where input and output shapes agree) and, for that operation, weight bits ``b_w`` and
activation (input) bits ``b_a``. Every convolution is conv -> BN -> ReLU.

Relaxation (factorised, as the paper's code: softmax over operations, and per operation two
independent softmaxes over weight and activation bits, shared by the convolutions inside it)::

    p_l   = softmax(alpha_l)                   over the layer's operations
    q_lo  = softmax(gamma^w_lo),  r_lo = softmax(gamma^a_lo)        over w_bits / a_bits
    conv of operation o:  y = conv(sum_j r_lo,j Qa_{a_j}(x),  sum_k q_lo,k Qw_{w_k}(W))
    layer:                 x_{l+1} = sum_o p_l,o  o(x_l)

``Qw`` / ``Qa`` are lowbit's registered quantizers (default: symmetric per-channel ``uniform``
weights, ``pact`` activations) at each candidate bit-width, straight-through to ``W`` / ``x``.

Bit-operations, counted as ``lowbit report`` counts them (``BOPs = MACs * b_w * b_a``, MACs of
one sample from :func:`lowbit.models.layer_table`). The expected BOPs of the relaxed net is the
expectation under the factorised distribution, i.e. the closed form::

    E[BOPs] = sum_l sum_o p_l,o  sum_{c in o} MAC_c * E_q[b_w] * E_r[b_a]
            = sum_l sum_{o, k, j} p_l,o q_lo,k r_lo,j  BOPs_l(o, w_k, a_j)

The stem and the classifier stay float and outside the searched count (as in the paper); reports
give both the searched layers' BOPs and the whole network's.

Bilevel optimisation, first-order DARTS (the architecture gradient is taken at the current
weights, no unrolled step)::

    W     <- W     - eta_w  grad_W     CE(train batch; W, alpha, gamma)
    alpha, gamma <- Adam step on  CE(val batch; W, alpha, gamma) + lambda R(E[BOPs])
    R = max(0, E[BOPs] / B_target - 1)   with a target,   R = E[BOPs] / B_max   without

The validation batches are a split carved from the training data. The architecture starts after
``warmup_epochs`` of weight-only training. Derivation: ``o* = argmax alpha_l``, bits
``argmax gamma^w_lo*`` and ``argmax gamma^a_lo*`` (ties go to the first, cheapest candidate);
the discrete net (:class:`CellNet`) is quantized by the derived recipe and retrained from scratch.
``skip`` has no convolution, hence no bits (its gammas get no gradient; its derived bits are
the first candidates and mean nothing).

Differences from the paper, on purpose: one operation per layer instead of PC-DARTS cells of 14
edges with partial channels (a CPU-sized space); ``alpha`` and ``gamma`` both learn on the
validation split with CE + lambda R, and R weights each operation's bits by ``p_l,o`` (the paper
updates ``gamma`` on the training half with an R that ignores ``alpha``), so the BOPs term also
steers the operation choice; a hinge on a BOPs target is offered beside the paper's linear term.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import layer_table, register_model
from ..nn.quantize import quantize
from ..quant import registry

__all__ = ["OPS", "CellNet", "Choice", "MixedConv2d", "MixedLayer", "QDARTSConfig", "QDARTSResult",
           "SearchSpace", "SuperNet", "bops_penalty", "build_derived", "derive", "derived_recipe",
           "float_reference_bops", "qdarts_run", "qdarts_search", "searched_bops"]

log = logging.getLogger(__name__)

BITS_RANGE = (2, 8)


# ---- operations ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One conv -> BN -> ReLU of an operation."""

    c_in: int
    c_out: int
    kernel: int
    stride: int
    dilation: int = 1
    groups: int = 1

    @property
    def padding(self) -> int:
        return self.dilation * (self.kernel - 1) // 2


def _conv(k: int, dilation: int = 1) -> Callable[[int, int, int], list[Unit]]:
    return lambda c_in, c_out, s: [Unit(c_in, c_out, k, s, dilation)]


def _sep3x3(c_in: int, c_out: int, s: int) -> list[Unit]:
    return [Unit(c_in, c_in, 3, s, 1, c_in), Unit(c_in, c_out, 1, 1)]


def _skip(c_in: int, c_out: int, s: int) -> list[Unit]:
    return []


OPS: dict[str, Callable[[int, int, int], list[Unit]]] = {
    "conv3x3": _conv(3),
    "conv5x5": _conv(5),
    "sep3x3": _sep3x3,
    "dil3x3": _conv(3, dilation=2),
    "skip": _skip,
}


def _check_bits(bits: Sequence[int], what: str) -> tuple[int, ...]:
    if isinstance(bits, str | int) or not len(bits):
        raise ValueError(f"qdarts: {what} must be a non-empty list of bit-widths, got {bits!r}")
    lo, hi = BITS_RANGE
    if any(isinstance(b, bool) or not isinstance(b, int) or not lo <= b <= hi for b in bits):
        raise ValueError(f"qdarts: {what} must be integers in [{lo}, {hi}], got {list(bits)!r}")
    return tuple(sorted(set(bits)))


@dataclass(frozen=True)
class SearchSpace:
    """Operations, bit-widths and the network skeleton; validated on construction."""

    ops: tuple[str, ...] = ("conv3x3", "conv5x5", "sep3x3", "dil3x3", "skip")
    w_bits: tuple[int, ...] = (2, 4)
    a_bits: tuple[int, ...] = (2, 4)
    channels: int = 16
    layers: int = 6
    reductions: tuple[int, ...] = (2, 4)
    num_classes: int = 10
    in_channels: int = 3
    input_size: int = 32
    weight: dict[str, Any] = field(default_factory=lambda: {"method": "uniform", "per_channel": True})
    activation: dict[str, Any] = field(default_factory=lambda: {"method": "pact", "alpha_init": 3.0})

    def __post_init__(self) -> None:
        if isinstance(self.ops, str) or not len(self.ops):
            raise ValueError(f"qdarts: ops must be a non-empty list of operation names; allowed: {list(OPS)}")
        unknown = [o for o in self.ops if o not in OPS]
        if unknown:
            raise ValueError(f"qdarts: unknown operation(s) {unknown}; allowed: {list(OPS)}")
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"qdarts: ops must not repeat, got {list(self.ops)}")
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "w_bits", _check_bits(self.w_bits, "w_bits"))
        object.__setattr__(self, "a_bits", _check_bits(self.a_bits, "a_bits"))
        for name in ("channels", "layers", "num_classes", "in_channels", "input_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"qdarts: {name} must be an integer >= 1, got {v!r}")
        red = tuple(self.reductions)
        if any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < self.layers for r in red):
            raise ValueError(f"qdarts: reductions must be layer indices in [0, {self.layers - 1}], got {red}")
        object.__setattr__(self, "reductions", tuple(sorted(set(red))))
        for kind in ("weight", "activation"):
            spec = dict(getattr(self, kind))
            if "bits" in spec or "method" not in spec:
                raise ValueError(f"qdarts: {kind} must be a quantizer spec with 'method' and no 'bits' "
                                 f"(bits are searched), got {spec!r}")
            registry.get(kind, spec["method"])  # KeyError naming the allowed methods
            object.__setattr__(self, kind, spec)
        for l in range(self.layers):
            if not self.candidates(l):
                raise ValueError(f"qdarts: layer {l} changes shape and only 'skip' was offered; "
                                 "add a convolution to ops")

    def shapes(self) -> list[tuple[int, int, int]]:
        """``(c_in, c_out, stride)`` of each searchable layer."""
        out, c = [], self.channels
        for l in range(self.layers):
            s = 2 if l in self.reductions else 1
            c_out = 2 * c if s == 2 else c
            out.append((c, c_out, s))
            c = c_out
        return out

    def candidates(self, l: int) -> tuple[str, ...]:
        """Operations offered at layer ``l`` (``skip`` only where the shape is unchanged)."""
        c_in, c_out, s = self.shapes()[l]
        return tuple(o for o in self.ops if o != "skip" or (s == 1 and c_in == c_out))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ---- the relaxed network -------------------------------------------------------------------
class MixedConv2d(nn.Conv2d):
    """A convolution whose weight and input are softmax mixtures of quantized copies.

    ``forward(x, pw, pa)``: ``conv(sum_j pa_j Qa_j(x), sum_k pw_k Qw_k(W))``; being an ``nn.Conv2d``
    it is counted by :func:`lowbit.models.layer_table` exactly like the derived layer."""

    def __init__(self, unit: Unit, space: SearchSpace) -> None:
        super().__init__(unit.c_in, unit.c_out, unit.kernel, unit.stride, unit.padding, unit.dilation,
                         unit.groups, bias=False)
        w_opts = {k: v for k, v in space.weight.items() if k != "method"}
        a_opts = {k: v for k, v in space.activation.items() if k != "method"}
        self.wq = nn.ModuleList(registry.create("weight", space.weight["method"], b, **w_opts)
                                for b in space.w_bits)
        self.aq = nn.ModuleList(registry.create("activation", space.activation["method"], b, **a_opts)
                                for b in space.a_bits)

    def forward(self, x: Tensor, pw: Tensor, pa: Tensor) -> Tensor:  # type: ignore[override]
        a = sum(pa[j] * q(x) for j, q in enumerate(self.aq))
        w = sum(pw[k] * q(self.weight) for k, q in enumerate(self.wq))
        return self._conv_forward(a, w, None)  # type: ignore[arg-type]


class _SearchOp(nn.Module):
    def __init__(self, units: list[Unit], space: SearchSpace) -> None:
        super().__init__()
        self.convs = nn.ModuleList(MixedConv2d(u, space) for u in units)
        self.bns = nn.ModuleList(nn.BatchNorm2d(u.c_out) for u in units)

    def forward(self, x: Tensor, pw: Tensor, pa: Tensor) -> Tensor:
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = F.relu(bn(conv(x, pw, pa)))
        return x


class MixedLayer(nn.Module):
    """One searchable layer: ``sum_o softmax(alpha)_o o(x)``, each ``o`` bit-mixed by its gammas."""

    def __init__(self, c_in: int, c_out: int, stride: int, ops: Sequence[str], space: SearchSpace) -> None:
        super().__init__()
        self.names = tuple(ops)
        self.ops = nn.ModuleList(_SearchOp(OPS[o](c_in, c_out, stride), space) for o in ops)
        self.alpha = nn.Parameter(torch.zeros(len(ops)))
        self.gamma_w = nn.Parameter(torch.zeros(len(ops), len(space.w_bits)))
        self.gamma_a = nn.Parameter(torch.zeros(len(ops), len(space.a_bits)))

    def probs(self) -> tuple[Tensor, Tensor, Tensor]:
        """``softmax(alpha)``, row-wise ``softmax(gamma_w)`` and ``softmax(gamma_a)``."""
        return (torch.softmax(self.alpha, 0), torch.softmax(self.gamma_w, 1), torch.softmax(self.gamma_a, 1))

    def forward(self, x: Tensor) -> Tensor:
        p, q, r = self.probs()
        return sum(p[i] * op(x, q[i], r[i]) for i, op in enumerate(self.ops))  # type: ignore[return-value]


def _stem(space: SearchSpace) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(space.in_channels, space.channels, 3, 1, 1, bias=False),
                                     bn=nn.BatchNorm2d(space.channels), relu=nn.ReLU()))


class SuperNet(nn.Module):
    """The relaxed network of a :class:`SearchSpace`; ``arch_parameters()`` are alpha and gamma."""

    def __init__(self, space: SearchSpace) -> None:
        super().__init__()
        self.space = space
        self.stem = _stem(space)
        self.cells = nn.ModuleList(MixedLayer(ci, co, s, space.candidates(l), space)
                                   for l, (ci, co, s) in enumerate(space.shapes()))
        self.fc = nn.Linear(space.shapes()[-1][1], space.num_classes)
        self._macs: list[list[list[int]]] | None = None

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [p for c in self.cells for p in (c.alpha, c.gamma_w, c.gamma_a)]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def macs(self) -> list[list[list[int]]]:
        """``macs()[l][o]``: MACs per sample of each convolution of operation ``o`` of layer ``l``,
        from :func:`lowbit.models.layer_table` (the counting of ``lowbit report``)."""
        if self._macs is None:
            s = self.space
            table = {r.name: r.macs for r in layer_table(self, (s.in_channels, s.input_size, s.input_size))}
            self._macs = [[[table[f"cells.{l}.ops.{o}.convs.{c}"] for c in range(len(op.convs))]
                           for o, op in enumerate(cell.ops)] for l, cell in enumerate(self.cells)]
        return self._macs

    def layer_bops(self) -> list[Tensor]:
        """Expected BOPs of each searchable layer (differentiable in alpha and gamma)."""
        wb = torch.tensor(self.space.w_bits, dtype=torch.float64)
        ab = torch.tensor(self.space.a_bits, dtype=torch.float64)
        out = []
        for cell, macs in zip(self.cells, self.macs(), strict=True):
            p, q, r = (torch.softmax(t.double(), -1) for t in (cell.alpha, cell.gamma_w, cell.gamma_a))
            per_op = torch.tensor([float(sum(m)) for m in macs], dtype=torch.float64) * (q @ wb) * (r @ ab)
            out.append((p * per_op).sum())
        return out

    def expected_bops(self) -> Tensor:
        """``E[BOPs]`` of the searchable layers (float64, differentiable)."""
        return torch.stack(self.layer_bops()).sum()

    def bops_range(self) -> tuple[float, float]:
        """The fewest and most BOPs any discrete choice of the searchable layers has."""
        lo = hi = 0.0
        wb, ab = self.space.w_bits, self.space.a_bits
        for macs in self.macs():
            per = [float(sum(m)) for m in macs]
            lo += min(per) * wb[0] * ab[0]
            hi += max(per) * wb[-1] * ab[-1]
        return lo, hi


def bops_penalty(expected: Tensor, target: float | None, reference: float) -> Tensor:
    """``max(0, E/target - 1)`` with a target, else the paper's linear ``E / reference``."""
    if target is None:
        return expected / reference
    return torch.relu(expected / target - 1.0)


# ---- derivation ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    op: str
    w_bits: int
    a_bits: int


def derive(net: SuperNet) -> list[Choice]:
    """The discrete architecture: argmax operation per layer, then argmax bits of that operation
    (``torch.argmax`` returns the first maximum, so ties go to the earlier, cheaper candidate)."""
    out = []
    with torch.no_grad():
        for cell in net.cells:
            o = int(torch.argmax(cell.alpha))
            out.append(Choice(cell.names[o], net.space.w_bits[int(torch.argmax(cell.gamma_w[o]))],
                              net.space.a_bits[int(torch.argmax(cell.gamma_a[o]))]))
    return out


@register_model("qdarts_cellnet", "∇QDARTS-derived cell network: float stem, one op per layer, float fc")
class CellNet(nn.Module):
    """The derived (discrete, float) network: ``ops[l]`` at layer ``l``, same skeleton as the search."""

    def __init__(self, ops: Sequence[str] = ("conv3x3",) * 6, channels: int = 16,
                 reductions: Sequence[int] = (2, 4), num_classes: int = 10, in_channels: int = 3,
                 width_mult: float = 1.0) -> None:
        super().__init__()
        # the zoo's common attributes (the default ops are the all-conv3x3 float reference)
        self.num_classes, self.in_channels, self.width_mult = num_classes, in_channels, width_mult
        channels = max(1, round(channels * width_mult))
        unknown = [o for o in ops if o not in OPS]
        if isinstance(ops, str) or not len(ops) or unknown:
            raise ValueError(f"qdarts: ops must be a non-empty list of operation names, got {ops!r}; "
                             f"allowed: {list(OPS)}")
        space = SearchSpace(ops=tuple(OPS), layers=len(ops), channels=channels, reductions=tuple(reductions),
                            num_classes=num_classes, in_channels=in_channels)
        self.stem = _stem(space)
        cells = []
        for l, (ci, co, s) in enumerate(space.shapes()):
            if ops[l] not in space.candidates(l):
                raise ValueError(f"qdarts: operation {ops[l]!r} cannot change shape at layer {l}; "
                                 f"allowed there: {list(space.candidates(l))}")
            mods: OrderedDict[str, nn.Module] = OrderedDict()
            for i, u in enumerate(OPS[ops[l]](ci, co, s)):
                mods[f"conv{i}"] = nn.Conv2d(u.c_in, u.c_out, u.kernel, u.stride, u.padding, u.dilation,
                                             u.groups, bias=False)
                mods[f"bn{i}"] = nn.BatchNorm2d(u.c_out)
                mods[f"relu{i}"] = nn.ReLU()
            cells.append(nn.Sequential(mods) if mods else nn.Identity())
        self.cells = nn.ModuleList(cells)
        self.fc = nn.Linear(space.shapes()[-1][1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def searched_layer_names(genotype: Sequence[Choice]) -> list[str]:
    """Names of the derived net's searched convolutions, in order."""
    return [f"cells.{l}.conv{i}" for l, c in enumerate(genotype) for i in range(len(OPS[c.op](1, 1, 1)))]


def derived_recipe(space: SearchSpace, genotype: Sequence[Choice], name: str = "qdarts") -> dict[str, Any]:
    """The lowbit recipe of a derived net: each searched conv at its chosen bits, stem and fc float."""
    if len(genotype) != space.layers:
        raise ValueError(f"qdarts: {len(genotype)} choices for {space.layers} layers")
    rules = []
    for l, c in enumerate(genotype):
        for i in range(len(OPS[c.op](1, 1, 1))):
            rules.append({"match": f"cells.{l}.conv{i}", "weight": {**space.weight, "bits": c.w_bits},
                          "activation": {**space.activation, "bits": c.a_bits}})
    desc = "∇QDARTS-derived: " + ", ".join(f"{c.op} W{c.w_bits}A{c.a_bits}" for c in genotype)
    return {"name": name, "description": desc, "default": {"weight": None, "activation": None},
            "rules": rules}


def build_derived(space: SearchSpace, genotype: Sequence[Choice], quantized: bool = True) -> nn.Module:
    """A fresh (randomly initialised) derived net, quantized by :func:`derived_recipe` (all float
    with ``quantized=False``); a zoo model (``qdarts_cellnet``), so packed files rebuild it."""
    from ..models import build_model

    net = build_model("qdarts_cellnet", ops=[c.op for c in genotype], channels=space.channels,
                      reductions=list(space.reductions), num_classes=space.num_classes,
                      in_channels=space.in_channels)
    if quantized and any(OPS[c.op](1, 1, 1) for c in genotype):
        quantize(net, derived_recipe(space, genotype), strict=True)
    else:  # an all-float recipe: nothing changes, but the net can be packed and reported
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "quantized none of the layers" is the point here
            quantize(net, {"name": "float", "default": {"weight": None, "activation": None}})
    return net


def searched_bops(model: nn.Module, genotype: Sequence[Choice], input_shape: Sequence[int]) -> dict[str, int]:
    """``{"searched": BOPs of the searched convs, "total": whole net}`` from ``lowbit report``'s
    :func:`lowbit.export.model_report` (float layers count 32 x 32 bits there)."""
    from ..export import model_report

    rows = {r.name: r for r in model_report(model, input_shape).rows}
    names = searched_layer_names(genotype)
    return {"searched": int(sum(rows[n].bops or 0 for n in names)),
            "total": int(sum(r.bops or 0 for r in rows.values()))}


# ---- the search ----------------------------------------------------------------------------
@dataclass
class QDARTSConfig:
    epochs: int = 10
    warmup_epochs: int = 2  # weight-only epochs before the architecture moves
    w_lr: float = 0.05
    w_momentum: float = 0.9
    w_weight_decay: float = 3e-4
    arch_lr: float = 3e-3
    arch_weight_decay: float = 1e-3
    bops_weight: float = 1.0  # lambda
    bops_target: float | None = None  # BOPs of the searchable layers; None: linear term
    grad_clip: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"qdarts: need epochs >= 1 and 0 <= warmup_epochs < epochs, "
                             f"got {self.epochs}, {self.warmup_epochs}")
        if self.bops_weight < 0:
            raise ValueError(f"qdarts: bops_weight must be >= 0, got {self.bops_weight}")
        if self.bops_target is not None and not self.bops_target > 0:
            raise ValueError(f"qdarts: bops_target must be > 0 BOPs or None, got {self.bops_target}")


@dataclass
class QDARTSResult:
    genotype: list[Choice]
    expected_bops: float
    history: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"genotype": [asdict(c) for c in self.genotype], "expected_bops": self.expected_bops,
                "history": self.history}


class _Both:
    """The two optimizers as one checkpointable object."""

    def __init__(self, w: torch.optim.Optimizer, a: torch.optim.Optimizer) -> None:
        self.w, self.a = w, a

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.state_dict(), "a": self.a.state_dict()}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.w.load_state_dict(s["w"])
        self.a.load_state_dict(s["a"])


def check_target(net: SuperNet, target: float | None) -> None:
    if target is None:
        return
    lo, hi = net.bops_range()
    if target < lo:
        raise ValueError(f"qdarts: bops_target {target:.4g} is infeasible: the cheapest choice of every "
                         f"searchable layer has {lo:.4g} BOPs (the costliest {hi:.4g})")


def qdarts_search(
    net: SuperNet,
    train: Iterable[tuple[Tensor, Tensor]],
    val: Iterable[tuple[Tensor, Tensor]],
    config: QDARTSConfig | None = None,
    checkpoint: str | Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> QDARTSResult:
    """First-order bilevel search (see the module docstring); returns the derived genotype.

    ``train`` / ``val``: loaders (``set_epoch`` is called when present); ``checkpoint``: a file
    written after every epoch, from which a killed search resumes."""
    from ..train.checkpoint import load_checkpoint, save_checkpoint

    cfg = config or QDARTSConfig()
    check_target(net, cfg.bops_target)
    torch.manual_seed(cfg.seed)
    _, b_max = net.bops_range()
    decay = [p for p in net.weight_parameters() if p.dim() > 1]
    no_decay = [p for p in net.weight_parameters() if p.dim() <= 1]
    w_opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.w_weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.w_lr, momentum=cfg.w_momentum)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=cfg.arch_lr, betas=(0.5, 0.999),
                             weight_decay=cfg.arch_weight_decay)
    opts = _Both(w_opt, a_opt)
    start, history = 0, []
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint, net, opts)
        start, history = state["epoch"], list(state["extra"]["history"])
        log.info("qdarts: resumed after epoch %d from %s", start, checkpoint)
    steps = len(train)  # type: ignore[arg-type]
    for epoch in range(start, cfg.epochs):
        for loader in (train, val):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
        net.train()
        val_iter = iter(val)
        tot = {"loss": 0.0, "val_loss": 0.0, "n": 0, "correct": 0, "val_correct": 0, "val_n": 0}
        for i, (x, y) in enumerate(train):
            lr = 0.5 * cfg.w_lr * (1 + math.cos(math.pi * (epoch * steps + i) / (cfg.epochs * steps)))
            for g in w_opt.param_groups:
                g["lr"] = lr
            if epoch >= cfg.warmup_epochs:  # architecture step on a validation batch
                try:
                    xv, yv = next(val_iter)
                except StopIteration:
                    val_iter = iter(val)
                    xv, yv = next(val_iter)
                out = net(xv)
                ce = F.cross_entropy(out, yv)
                reg = bops_penalty(net.expected_bops(), cfg.bops_target, b_max).float()
                loss = ce + cfg.bops_weight * reg
                a_opt.zero_grad(set_to_none=True)
                w_opt.zero_grad(set_to_none=True)
                loss.backward()
                a_opt.step()
                tot["val_loss"] += float(ce.detach()) * len(yv)
                tot["val_correct"] += int((out.argmax(1) == yv).sum())
                tot["val_n"] += len(yv)
            out = net(x)
            loss = F.cross_entropy(out, y)
            w_opt.zero_grad(set_to_none=True)
            a_opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.weight_parameters(), cfg.grad_clip)
            w_opt.step()
            tot["loss"] += float(loss.detach()) * len(y)
            tot["correct"] += int((out.argmax(1) == y).sum())
            tot["n"] += len(y)
        with torch.no_grad():
            e_bops = float(net.expected_bops())
        row = {"epoch": epoch + 1, "train_loss": tot["loss"] / tot["n"],
               "train_acc": tot["correct"] / tot["n"],
               "val_loss": tot["val_loss"] / tot["val_n"] if tot["val_n"] else None,
               "val_acc": tot["val_correct"] / tot["val_n"] if tot["val_n"] else None,
               "expected_bops": e_bops, "genotype": [asdict(c) for c in derive(net)],
               "alpha": [torch.softmax(c.alpha, 0).tolist() for c in net.cells]}
        history.append(row)
        log.info("qdarts epoch %d: train loss %.3f, val acc %s, E[BOPs] %.4g, %s", epoch + 1,
                 row["train_loss"], row["val_acc"], e_bops,
                 [f"{c['op']}:W{c['w_bits']}A{c['a_bits']}" for c in row["genotype"]])
        if checkpoint is not None:
            save_checkpoint(checkpoint, net, opts, epoch=epoch + 1, extra={"history": history})
        if progress:
            progress(row)
    with torch.no_grad():
        e_bops = float(net.expected_bops())
    return QDARTSResult(derive(net), e_bops, history)


# ---- the whole job (what `lowbit search qdarts` runs) ---------------------------------------
def float_reference_bops(space: SearchSpace) -> int:
    """Searched-layer BOPs of the float all-conv3x3 network of ``space`` (32 x 32 bits)."""
    ref = [Choice("conv3x3", 32, 32)] * space.layers
    shape = (space.in_channels, space.input_size, space.input_size)
    return searched_bops(build_derived(space, ref, quantized=False), ref, shape)["searched"]


def _check_int(name: str, value: Any, lo: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"qdarts_run: {name} must be an integer >= {lo} ({what}), got {value!r}")


def _check_positive(name: str, value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"qdarts_run: {name} must be a finite number > 0 ({what}), got {value!r}")


def qdarts_run(
    dataset: str,
    out: str | Path,
    space: SearchSpace,
    config: QDARTSConfig,
    *,
    data_dir: str | None = None,
    subset: int | None = None,
    val: int = 2000,
    search_n: int | None = None,
    bops_ratio: float | None = None,
    retrain_epochs: int = 0,
    lr: float = 0.05,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Search on ``dataset``, derive, write ``out/qdarts.json`` and ``out/recipe.yaml``, and with
    ``retrain_epochs`` train the derived net from scratch (``out/retrain``), test set read once.

    ``val`` training images are held out for selection; the search reads ``search_n`` of the
    others (half for the weights, half as the architecture's validation split). ``bops_ratio``
    sets the target to the float all-conv3x3 network's BOPs / ratio. Reruns resume."""
    import dataclasses
    import json

    from .._io import atomic_write_text, claim_settings
    from ..data import load_dataset
    from ..recipe import Recipe
    from ..train import TrainConfig, Trainer, evaluate, load_checkpoint

    # bad options fail here, before the data are read or anything is written to ``out``
    if subset is not None:
        _check_int("subset", subset, 1, "training images used in all, or None: all of them")
    _check_int("val", val, 1, "held-out training images")
    if search_n is not None:
        _check_int("search_n", search_n, 1, "training images the search reads, or None: all the others")
    _check_int("retrain_epochs", retrain_epochs, 0, "0: no retraining")
    _check_int("batch_size", batch_size, 1, "images per batch")
    if bops_ratio is not None:
        _check_positive("bops_ratio", bops_ratio, "BOPs target = float all-conv3x3 net / ratio, or None")
    _check_positive("lr", lr, "the retraining's learning rate")
    out = Path(out)
    data = load_dataset(dataset, data_dir=data_dir, batch_size=batch_size, seed=config.seed)
    if len(data.in_shape) != 3 or data.in_shape[1] != data.in_shape[2]:
        raise ValueError(f"qdarts: needs square images (C, H, H), {dataset} serves {data.in_shape}")
    space = dataclasses.replace(space, in_channels=data.in_shape[0], input_size=data.in_shape[1],
                                num_classes=data.num_classes)
    pool = data.train.subset(subset, seed=config.seed) if subset else data.train
    sel_val, rest = pool.split(val, seed=config.seed)
    sel_val = sel_val.replace(augment=None, shuffle=False)
    s_pool = rest.subset(search_n, seed=config.seed + 1) if search_n else rest
    s_train, s_val = s_pool.split(s_pool.num_samples // 2, seed=config.seed + 1)
    if bops_ratio is not None:
        config = dataclasses.replace(config, bops_target=float_reference_bops(space) / bops_ratio)
    settings = {"dataset": dataset, "space": space.to_dict(), "config": asdict(config), "subset": subset,
                "val": val, "search_n": search_n, "batch_size": batch_size}
    out.mkdir(parents=True, exist_ok=True)
    claim_settings(out / "search.safetensors", out / "search_settings.json", settings)
    torch.manual_seed(config.seed)
    net = SuperNet(space)
    res = qdarts_search(net, s_train, s_val.replace(augment=None), config,
                        checkpoint=out / "search.safetensors")
    recipe = derived_recipe(space, res.genotype)
    atomic_write_text(out / "recipe.yaml", Recipe.from_dict(recipe).to_yaml())
    shape = (space.in_channels, space.input_size, space.input_size)
    payload: dict[str, Any] = {"dataset": dataset, "space": space.to_dict(), "config": asdict(config),
                               **res.to_json(), "float_reference_bops": float_reference_bops(space)}
    model = build_derived(space, res.genotype)
    payload["bops"] = searched_bops(model, res.genotype, shape)
    if retrain_epochs > 0:
        cfg = TrainConfig(epochs=retrain_epochs, optimizer="sgd", lr=lr, momentum=0.9, weight_decay=5e-4,
                          schedule="cosine", seed=config.seed, tensorboard=False)
        claim_settings(out / "retrain" / "checkpoint.safetensors", out / "retrain_settings.json",
               {"genotype": [asdict(c) for c in res.genotype], "lr": lr, "search": settings})
        Trainer(model, rest, sel_val, cfg, out / "retrain").fit(resume=True)
        load_checkpoint(out / "retrain" / "best.safetensors", model)
        payload["retrain"] = {"epochs": retrain_epochs, "val_acc": float(evaluate(model, sel_val)["acc"]),
                              "test_acc": float(evaluate(model, data.test)["acc"])}
    atomic_write_text(out / "qdarts.json", json.dumps(payload, indent=1) + "\n")
    return payload
