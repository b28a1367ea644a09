"""The math of lowbit: quantizers, their encodings and coarse gradients.

Importing this package registers every quantizer in ``lowbit.quant.registry``.
"""

from . import (
    bcgd_relu,
    binary,
    dorefa,
    lbw,
    lsq,
    mixed,
    multipoint,
    pact,
    registry,
    ste,
    ternary_stat,
    tga,
    ttq,
    twn,
    uniform,
    wrpn,
)
from .base import ActivationQuantizer, Encoded, Quantizer, WeightQuantizer, straight_through

__all__ = [
    "ActivationQuantizer",
    "Encoded",
    "Quantizer",
    "WeightQuantizer",
    "bcgd_relu",
    "binary",
    "dorefa",
    "lbw",
    "lsq",
    "mixed",
    "multipoint",
    "pact",
    "registry",
    "ste",
    "straight_through",
    "ternary_stat",
    "tga",
    "ttq",
    "twn",
    "uniform",
    "wrpn",
]
