"""A trained CNN's spiking twin: BatchNorm folded, each ReLU replaced by LIF neurons, thresholds
initialised from the CNN's activations; analog input applied directly to the first layer.

**The twin.** The CNN must be a feed-forward ``nn.Sequential`` (nested Sequentials are
flattened) of Conv1d/2d/3d and Linear layers (*synapses*), BatchNorm right after a synapse,
ReLU, pooling (average or max), Flatten, Identity and Dropout; a module that only reshapes may
declare ``snn_passthrough = True``. Every hidden synapse is followed by a ReLU, which becomes
a :class:`~lowbit.snn.lif.LIF` layer; the last synapse is the output layer, which integrates
without spiking. Module names are kept (BN dropped, ``relu3`` -> ``lif3``; inside nested
Sequentials joined by ``_``: ``features.0`` -> ``features_0``), so one recipe quantizes the CNN
and its twin alike.

**BatchNorm folding** (exact in eval mode), per output channel ``c``::

    a_c = gamma_c / sqrt(var_c + eps)
    W'_c = a_c * W_c,    b'_c = a_c * (b_c - mean_c) + beta_c

**Forward over T time steps** (direct input encoding, DIET-SNN, Rathi & Roy, arXiv
2008.03658): the analog input ``x`` enters the first synapse at every step; since ``x`` is the
same at every step, everything before the first LIF is computed once and its current reused
(bit-identical to recomputing it). Then, per step, synapses feed LIF layers (pooling, flatten
in between act on the spikes ``th * o``), and the output layer's currents are averaged::

    logits = (1 / T) * sum_t  W_L s_{L-1}[t] + b_L

Dropout is dropped from the twin (DIET-SNN keeps one mask for all steps; not needed here).
Max pooling of spikes passes a spike where any input spiked, which over-counts the rate of
the max: average pooling converts exactly in expectation, max pooling only approximately.

**Threshold initialisation** ("robust normalisation", Rueckauer et al., Front. Neurosci.
11:682, 2017): ``th_l = scale * P_p(ReLU_l activations of the CNN)``, the ``p``-th percentile
(default 99.9) of layer ``l``'s ReLU outputs over calibration batches; ``p = 100`` is the
maximum (Diehl et al., IJCNN 2015). Because spikes carry the amplitude ``th_l`` (see
:mod:`lowbit.snn.lif`), the weights stay as trained. DIET-SNN instead takes the 99.7th
percentile of each SNN layer's input current and multiplies by a ``scaling_factor`` of 0.2-0.3
for T = 5; ``scale`` plays that role here (a lower threshold makes more spikes at small T).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .lif import DEFAULT_GAMMA, LIF

log = logging.getLogger(__name__)

SYNAPSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BN = nn.modules.batchnorm._BatchNorm
_POOLS = (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd,
          nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_DROPOUT = nn.modules.dropout._DropoutNd
_ALLOWED = ("Conv1d/2d/3d, Linear, BatchNorm after a synapse, ReLU, Avg/MaxPool, AdaptiveAvg/MaxPool, "
            "Flatten, Identity, Dropout, or a module with snn_passthrough = True")


class ConversionError(ValueError):
    """The CNN cannot be turned into a spiking twin (names the module and what is allowed)."""


# ---- pure functions ------------------------------------------------------------------------
def fold_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` (Conv/Linear) with the eval-mode BatchNorm ``bn`` folded in (see above)."""
    if not isinstance(layer, SYNAPSES):
        raise ConversionError(f"fold_bn: expected Conv1d/2d/3d or Linear, got {type(layer).__name__}")
    if not isinstance(bn, _BN) or bn.running_mean is None:
        raise ConversionError("fold_bn: expected a BatchNorm with running statistics "
                              f"(track_running_stats=True), got {type(bn).__name__}")
    if bn.num_features != layer.weight.shape[0]:
        raise ConversionError(f"fold_bn: BatchNorm has {bn.num_features} features but the layer has "
                              f"{layer.weight.shape[0]} output channels")
    out = copy.deepcopy(layer)
    with torch.no_grad():
        a = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.affine:
            a = a * bn.weight.double()
        beta = bn.bias.double() if bn.affine else torch.zeros_like(a)
        b = layer.bias.double() if layer.bias is not None else torch.zeros_like(a)
        w = layer.weight.double() * a.reshape(-1, *([1] * (layer.weight.dim() - 1)))
        out.weight = nn.Parameter(w.to(layer.weight.dtype))
        out.bias = nn.Parameter((a * (b - bn.running_mean.double()) + beta).to(layer.weight.dtype))
    return out


def percentile(x: Tensor, p: float, max_values: int = 1 << 22, seed: int = 0) -> float:
    """The ``p``-th percentile of ``x`` (exact maximum for ``p = 100``; above ``max_values``
    values, the percentile of a seeded random sample of that many)."""
    flat = x.detach().reshape(-1).float()
    if p >= 100:
        return float(flat.max())
    if flat.numel() > max_values:
        g = torch.Generator().manual_seed(seed)
        flat = flat[torch.randint(0, flat.numel(), (max_values,), generator=g)]
    return float(torch.quantile(flat, p / 100.0))


def _leaves(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, m in model.named_children():
        full = f"{prefix}_{name}" if prefix else name
        if isinstance(m, nn.Sequential):
            out += _leaves(m, full)
        else:
            out.append((full, m))
    return out


def _lif_name(relu_name: str, taken: set[str]) -> str:
    name = relu_name.replace("relu", "lif") if "relu" in relu_name else f"{relu_name}_lif"
    while name in taken:
        name += "_"
    return name


def _avg_factor(m: nn.Module, x_in: Tensor, x_out: Tensor) -> float:
    """How many input spikes one unit of an average pool's output stands for (its divisor)."""
    if isinstance(m, nn.modules.pooling._AvgPoolNd):
        if getattr(m, "divisor_override", None):
            return float(m.divisor_override)
        k = m.kernel_size
        dims = x_in.dim() - 2
        ks = (k,) * dims if isinstance(k, int) else tuple(k)
        return float(torch.tensor(ks).prod())
    if isinstance(m, nn.modules.pooling._AdaptiveAvgPoolNd):
        return x_in[0, 0].numel() / x_out[0, 0].numel()
    return 1.0


# ---- the twin ------------------------------------------------------------------------------
class SpikingNet(nn.Module):
    """The spiking twin of a sequential CNN (build it with :func:`convert`).

    Children keep the CNN's names; ``plan`` lists ``(name, kind)`` in execution order with
    kind ``"synapse"``, ``"lif"`` or ``"pass"``. ``timesteps`` may be changed at any time
    (:meth:`set_timesteps`). ``recorder`` (see :class:`lowbit.snn.energy.SpikeRecorder`)
    receives spike and synaptic-event counts when set.
    """

    def __init__(self, modules: list[tuple[str, str, nn.Module]], timesteps: int) -> None:
        super().__init__()
        self.plan: list[tuple[str, str]] = []
        for name, kind, m in modules:
            self.add_module(name, m)
            self.plan.append((name, kind))
        kinds = [k for _, k in self.plan]
        self._first_lif = kinds.index("lif")
        self.set_timesteps(timesteps)
        self.recorder: Any = None

    def set_timesteps(self, timesteps: int) -> SpikingNet:
        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"timesteps must be an integer >= 1, got {timesteps!r}")
        self.timesteps = timesteps
        return self

    def lif_layers(self) -> dict[str, LIF]:
        return {n: getattr(self, n) for n, k in self.plan if k == "lif"}

    def synapses(self) -> dict[str, nn.Module]:
        return {n: getattr(self, n) for n, k in self.plan if k == "synapse"}

    def forward(self, x: Tensor) -> Tensor:
        rec = self.recorder
        for name, _ in self.plan[: self._first_lif]:  # constant over time: computed once
            m = getattr(self, name)
            y = m(x)
            if rec is not None and isinstance(m, SYNAPSES):
                rec.analog_synapse(name, m, y)
            x = y
        current = x
        states: dict[str, Tensor | None] = {}
        total: Tensor | None = None
        for _ in range(self.timesteps):
            h = current
            src, factor = None, 1.0  # the LIF whose spikes h carries, and how many spikes one unit is
            for name, kind in self.plan[self._first_lif:]:
                m = getattr(self, name)
                if kind == "lif":
                    h, states[name] = m(h, states.get(name))
                    if rec is not None:
                        rec.spikes(name, m.last_spikes)
                    src, factor = m, 1.0
                elif kind == "synapse":
                    y = m(h)
                    if rec is not None:
                        th = src.effective()[1].detach() if src is not None else 1.0
                        rec.spiking_synapse(name, m, h, y, factor / float(th))
                    h = y
                else:
                    y = m(h)
                    factor *= _avg_factor(m, h, y)
                    h = y
            total = h if total is None else total + h
        assert total is not None
        return total / self.timesteps

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}"


def _plan_modules(cnn: nn.Module, leak: float, gamma: float, learn_threshold: bool,
                  learn_leak: bool) -> tuple[list[tuple[str, str, nn.Module]], dict[str, str]]:
    """The twin's modules ``(name, kind, module)`` and the map ReLU name -> LIF name."""
    if not isinstance(cnn, nn.Sequential):
        raise ConversionError(
            f"convert needs a feed-forward nn.Sequential (e.g. the zoo's lenet5_avg, hsi_cnn3d, lenet5 or "
            f"mlp), got {type(cnn).__name__}; models with skip connections are not supported")
    from ..nn.quantize import quantized_layers

    if quantized_layers(cnn):
        raise ConversionError("convert a float CNN: this one is quantized already; quantize the spiking "
                              "twin instead (lowbit.quantize(snn, recipe))")
    leaves = _leaves(cnn)
    out: list[tuple[str, str, nn.Module]] = []
    relu_to_lif: dict[str, str] = {}
    taken = {n for n, _ in leaves}
    pending: str | None = None  # a synapse waiting for its ReLU
    i = 0
    while i < len(leaves):
        name, m = leaves[i]
        if isinstance(m, SYNAPSES):
            if pending is not None:
                raise ConversionError(f"layer {pending!r} is followed by {name!r} without a ReLU: every "
                                      "hidden Conv/Linear needs a ReLU (its spiking neurons)")
            layer = copy.deepcopy(m)
            if i + 1 < len(leaves) and isinstance(leaves[i + 1][1], _BN):
                layer = fold_bn(m, leaves[i + 1][1])
                i += 1
            out.append((name, "synapse", layer))
            pending = name
        elif isinstance(m, _BN):
            raise ConversionError(f"BatchNorm {name!r} does not directly follow a Conv/Linear layer, so it "
                                  "cannot be folded")
        elif isinstance(m, nn.ReLU):
            if pending is None:
                raise ConversionError(f"ReLU {name!r} has no Conv/Linear layer before it (since the last "
                                      "ReLU)")
            lif_name = _lif_name(name, taken)
            taken.add(lif_name)
            relu_to_lif[name] = lif_name
            out.append((lif_name, "lif", LIF(1.0, leak, gamma, learn_threshold, learn_leak)))
            pending = None
        elif isinstance(m, _DROPOUT):
            log.debug("convert: dropping %s (%s) from the spiking twin", name, type(m).__name__)
        elif isinstance(m, (*_POOLS, nn.Flatten, nn.Identity)) or getattr(m, "snn_passthrough", False):
            out.append((name, "pass", copy.deepcopy(m)))
        else:
            raise ConversionError(f"cannot convert module {name!r} ({type(m).__name__}); allowed: {_ALLOWED}")
        i += 1
    if not relu_to_lif:
        raise ConversionError("the CNN has no ReLU: nothing to turn into spiking neurons")
    if pending is None:
        raise ConversionError("the CNN ends with a ReLU; the last layer must be a Conv/Linear (the output "
                              "layer integrates its input without spiking)")
    return out, relu_to_lif


@torch.no_grad()
def relu_percentiles(cnn: nn.Module, batches: Iterable[Any], p: float = 99.9) -> dict[str, float]:
    """ReLU module name -> the ``p``-th percentile of its outputs over ``batches`` (inputs, or
    ``(x, y)`` pairs), the CNN in eval mode."""
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p!r}")
    acts: dict[str, list[Tensor]] = {}
    hooks = []
    for name, m in _leaves(cnn):
        if isinstance(m, nn.ReLU):
            hooks.append(m.register_forward_hook(
                lambda _m, _a, out, n=name: acts.setdefault(n, []).append(out.detach().reshape(-1))))
    was = cnn.training
    cnn.eval()
    try:
        for b in batches:
            cnn(b[0] if isinstance(b, tuple | list) else b)
    finally:
        cnn.train(was)
        for h in hooks:
            h.remove()
    if not acts:
        raise ValueError("no calibration batch was given (or the CNN has no ReLU)")
    return {n: percentile(torch.cat(v), p) for n, v in acts.items()}


def convert(
    cnn: nn.Module,
    timesteps: int,
    calibration: Iterable[Any] | None = None,
    *,
    percentile: float = 99.9,
    threshold_scale: float = 1.0,
    leak: float = 1.0,
    gamma: float = DEFAULT_GAMMA,
    learn_threshold: bool = True,
    learn_leak: bool = True,
) -> SpikingNet:
    """The spiking twin of the float, sequential ``cnn`` (unchanged), in eval mode.

    Thresholds: ``threshold_scale * percentile``-th percentile of each ReLU's outputs on the
    ``calibration`` batches (training images, never test images); without calibration they are
    all 1.0. ``leak`` starts every layer's leak (1.0: integrate-and-fire), ``gamma`` is the
    surrogate's height.
    """
    if not threshold_scale > 0:
        raise ValueError(f"threshold_scale must be > 0, got {threshold_scale!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    modules, relu_to_lif = _plan_modules(cnn, leak, gamma, learn_threshold, learn_leak)
    snn = SpikingNet(modules, timesteps)
    if calibration is not None:
        ths = relu_percentiles(cnn, calibration, percentile)
        with torch.no_grad():
            for relu, lif in relu_to_lif.items():
                th = ths[relu] * threshold_scale
                if not th > 0:  # a dead layer: any positive threshold keeps it silent
                    log.warning("convert: ReLU %s never fired on the calibration data; threshold 1.0", relu)
                    th = 1.0
                getattr(snn, lif).threshold.fill_(th)
    snn.lowbit_snn = {"timesteps": timesteps, "percentile": percentile, "threshold_scale": threshold_scale,
                      "leak": leak, "gamma": gamma, "source_spec": getattr(cnn, "lowbit_spec", None)}
    return snn.eval()
