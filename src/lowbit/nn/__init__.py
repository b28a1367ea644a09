"""Attach quantizers to models: ``quantize(model, recipe)``."""

from .quantize import (
    QuantizeError,
    UnmatchedRuleWarning,
    input_quantizer,
    latent_weight,
    quantizable_layers,
    quantize,
    quantized_layers,
    weight_quantizer,
)

__all__ = [
    "QuantizeError",
    "UnmatchedRuleWarning",
    "input_quantizer",
    "latent_weight",
    "quantizable_layers",
    "quantize",
    "quantized_layers",
    "weight_quantizer",
]
