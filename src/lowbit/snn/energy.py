"""Spike rates (activation sparsity) and a compute-energy estimate of a spiking twin against its CNN.

Per sample, layer ``l`` with dense multiply-accumulates ``F_l`` (``out positions x fan-in``, the
count of ``lowbit report``)::

    E_CNN = sum_l F_l * E_MAC
    E_SNN = F_1 * E_MAC * k  +  sum_{l >= 2} SOP_l * E_AC
    SOP_l = sum_t sum_{spikes j into layer l at step t} fanout_l(j)     (synaptic operations)

The first layer receives the analog input (direct encoding), so it multiplies: ``k = 1`` when
its current is computed once and reused at every step, as :class:`~lowbit.snn.convert.SpikingNet`
does, and ``k = T`` when hardware recomputes it each step (both are reported). Every later
synapse only accumulates a weight per incoming spike. ``SOP_l`` is counted exactly, by running
the layer with all-one weights on the spikes it receives; a spike that reaches the layer
through an average pool is counted once per path (the pool's divisor), through a max pool
once. Neuron updates (leak, compare) and memory traffic are left out, as in the papers this
follows (DIET-SNN, Rathi & Roy, arXiv 2008.03658; ACE-SNN, Datta et al., Front. Neurosci.
16:815258, 2022).

Energy per operation, 45 nm CMOS at 0.9 V (Horowitz, "Computing's energy problem (and what we
can do about it)", ISSCC 2014): 32-bit float add 0.9 pJ, multiply 3.7 pJ (MAC 4.6 pJ, AC
0.9 pJ); 32-bit integer add 0.1 pJ, multiply 3.1 pJ (MAC 3.2 pJ, AC 0.1 pJ).

``energy_ratio_spiking_layers`` leaves the first layer out of both sides: what spiking saves
where it applies.

The spike rate of a layer is spikes per neuron per time step; ``spikes_per_neuron`` (the
papers' ``zeta``) is its sum over the ``T`` steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class EnergyModel:
    """Energy of one multiply-accumulate and of one accumulate, in picojoules."""

    name: str
    mac_pj: float
    ac_pj: float
    source: str = "Horowitz, ISSCC 2014, 45 nm, 0.9 V"


FP32_45NM = EnergyModel("fp32_45nm", mac_pj=3.7 + 0.9, ac_pj=0.9)
INT32_45NM = EnergyModel("int32_45nm", mac_pj=3.1 + 0.1, ac_pj=0.1)
ENERGY_MODELS = {m.name: m for m in (FP32_45NM, INT32_45NM)}


def dense_macs(layer: nn.Module, out: Tensor) -> int:
    """Multiply-accumulates of ``layer`` (Conv/Linear) per sample: output positions x fan-in."""
    return int(out[0].numel()) * int(layer.weight[0].numel())


def synaptic_events(layer: nn.Module, x: Tensor) -> float:
    """``sum_j x_j * fanout(j)`` over the whole batch: the accumulates ``layer`` does on input
    ``x`` when each unit of ``x`` is one event (``x`` = spike counts)."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        return float(x.double().sum()) * w.shape[0]
    if isinstance(layer, nn.modules.conv._ConvNd):
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
        ones = torch.ones((layer.groups, *w.shape[1:]), dtype=x.dtype, device=x.device)
        counts = conv(x, ones, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return float(counts.double().sum()) * (w.shape[0] // layer.groups)
    raise TypeError(f"synaptic_events: expected Conv or Linear, got {type(layer).__name__}")


class SpikeRecorder:
    """Accumulates, over the batches a :class:`SpikingNet` runs while it is attached, spikes per
    LIF layer and MACs / synaptic operations per synapse."""

    def __init__(self) -> None:
        self.samples = 0
        self.macs: dict[str, int] = {}
        self.analog: set[str] = set()
        self.sops: dict[str, float] = {}
        self.spike_sum: dict[str, float] = {}
        self.neurons: dict[str, int] = {}
        self._steps: dict[str, int] = {}

    def analog_synapse(self, name: str, layer: nn.Module, out: Tensor) -> None:
        self.samples += out.shape[0]
        self.analog.add(name)
        self.macs[name] = dense_macs(layer, out)

    def spiking_synapse(self, name: str, layer: nn.Module, x: Tensor, out: Tensor,
                        events_per_unit: float) -> None:
        self.macs[name] = dense_macs(layer, out)
        self.sops[name] = self.sops.get(name, 0.0) + synaptic_events(layer, x.detach()) * events_per_unit

    def spikes(self, name: str, o: Tensor | None) -> None:
        if o is None:
            raise RuntimeError(f"LIF {name!r} recorded no spikes (its record flag is off)")
        self.spike_sum[name] = self.spike_sum.get(name, 0.0) + float(o.double().sum())
        self.neurons[name] = int(o[0].numel())
        self._steps[name] = self._steps.get(name, 0) + o.shape[0]

    def rates(self) -> dict[str, float]:
        """LIF name -> spikes per neuron per time step."""
        return {n: s / (self.neurons[n] * self._steps[n]) for n, s in self.spike_sum.items()}


@torch.no_grad()
def spike_energy(snn: nn.Module, batches: Iterable[Any], model: EnergyModel = FP32_45NM,
                 max_batches: int | None = None) -> dict[str, Any]:
    """Run ``snn`` (eval mode) over ``batches`` (inputs or ``(x, y)``) and return per-layer spike
    rates, MACs, SOPs and the energy estimate of the module docstring (per sample)."""
    from .convert import SpikingNet

    if not isinstance(snn, SpikingNet):
        raise TypeError(f"spike_energy needs a SpikingNet (lowbit.snn.convert), got {type(snn).__name__}")
    rec = SpikeRecorder()
    lifs = snn.lif_layers().values()
    was = snn.training
    snn.eval()
    snn.recorder = rec
    for m in lifs:
        m.record = True
    try:
        for i, b in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            snn(b[0] if isinstance(b, tuple | list) else b)
    finally:
        snn.recorder = None
        for m in lifs:
            m.record, m.last_spikes = False, None
        snn.train(was)
    if rec.samples == 0:
        raise ValueError("spike_energy: no batch was given")
    T, n = snn.timesteps, rec.samples
    rates = rec.rates()
    layers = []
    for name in snn.synapses():
        row: dict[str, Any] = {"layer": name, "macs": rec.macs[name]}
        if name in rec.analog:
            row.update(sops=None, input="analog")
        else:
            row.update(sops=rec.sops[name] / n, input="spikes")
        layers.append(row)
    lif_rows = [{"layer": k, "neurons": rec.neurons[k], "spike_rate": r, "spikes_per_neuron": r * T}
                for k, r in rates.items()]
    macs_total = sum(r["macs"] for r in layers)
    analog_macs = sum(r["macs"] for r in layers if r["sops"] is None)
    sops_total = sum(r["sops"] for r in layers if r["sops"] is not None)
    e_cnn = macs_total * model.mac_pj
    e_snn = analog_macs * model.mac_pj + sops_total * model.ac_pj
    e_snn_t = analog_macs * model.mac_pj * T + sops_total * model.ac_pj
    total_spikes = sum(rec.spike_sum.values()) / n
    total_neurons = sum(rec.neurons.values())
    return {
        "timesteps": T, "samples": n, "energy_model": model.name, "mac_pj": model.mac_pj,
        "ac_pj": model.ac_pj,
        "layers": layers, "lif": lif_rows,
        "mean_spike_rate": total_spikes / (total_neurons * T),
        "cnn_macs": macs_total, "snn_first_layer_macs": analog_macs, "snn_sops": sops_total,
        "cnn_energy_pj": e_cnn, "snn_energy_pj": e_snn, "snn_energy_first_layer_xT_pj": e_snn_t,
        "energy_ratio": e_cnn / e_snn, "energy_ratio_first_layer_xT": e_cnn / e_snn_t,
        "energy_ratio_spiking_layers": (macs_total - analog_macs) * model.mac_pj / (sops_total * model.ac_pj),
    }
