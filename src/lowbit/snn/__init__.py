"""lowbit.snn: spiking twins of CNNs.

Leaky integrate-and-fire neurons with a learned leak and threshold per layer, trained through
a surrogate gradient (:mod:`.lif`); conversion of a sequential CNN with BatchNorm folded and
thresholds set from its activations, analog input straight into the first layer
(:mod:`.convert`); spike rates and a compute-energy estimate against the CNN (:mod:`.energy`).
The twin is an ordinary module: ``lowbit.quantize(snn, recipe)`` quantizes its weights and
``lowbit.train.Trainer`` trains weights, leaks and thresholds through time.

    >>> from lowbit.snn import convert, spike_energy
    >>> snn = convert(cnn, timesteps=5, calibration=calib_batches)
    >>> lowbit.quantize(snn, lowbit.load_recipe("snn-w6"))       # 6-bit weights
    >>> spike_energy(snn, test_batches)["energy_ratio"]

Follows ACE-SNN (Datta et al., Front. Neurosci. 16:815258, 2022) and DIET-SNN (Rathi & Roy,
arXiv 2008.03658).
"""

from .convert import ConversionError, SpikingNet, convert, fold_bn, relu_percentiles
from .energy import ENERGY_MODELS, FP32_45NM, INT32_45NM, EnergyModel, SpikeRecorder, spike_energy
from .lif import LIF, lif_step, spike, surrogate_grad
from .models import HSICNN3d, LeNet5Avg

__all__ = [
    "ENERGY_MODELS",
    "FP32_45NM",
    "INT32_45NM",
    "LIF",
    "ConversionError",
    "EnergyModel",
    "HSICNN3d",
    "LeNet5Avg",
    "SpikeRecorder",
    "SpikingNet",
    "convert",
    "fold_bn",
    "lif_step",
    "relu_percentiles",
    "spike",
    "spike_energy",
    "surrogate_grad",
]
