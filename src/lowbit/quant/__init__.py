"""The math of lowbit: quantizers, their encodings and coarse gradients.

Importing this package registers every quantizer in ``lowbit.quant.registry``.
"""

from . import binary, dorefa, pact, registry, ste, twn
from .base import ActivationQuantizer, Encoded, Quantizer, WeightQuantizer, straight_through

__all__ = [
    "ActivationQuantizer",
    "Encoded",
    "Quantizer",
    "WeightQuantizer",
    "binary",
    "dorefa",
    "pact",
    "registry",
    "ste",
    "straight_through",
    "twn",
]
