"""Attach quantizers to models: ``quantize(model, recipe)``."""

from .quantize import (
    QuantizeError,
    SkippedQuantizationWarning,
    UnmatchedRuleWarning,
    default_channel_axis,
    input_quantizer,
    latent_weight,
    quantizable_layers,
    quantizable_weights,
    quantize,
    quantized_layers,
    weight_quantizer,
    weight_quantizers,
)

__all__ = [
    "QuantizeError",
    "SkippedQuantizationWarning",
    "UnmatchedRuleWarning",
    "default_channel_axis",
    "input_quantizer",
    "latent_weight",
    "quantizable_layers",
    "quantizable_weights",
    "quantize",
    "quantized_layers",
    "weight_quantizer",
    "weight_quantizers",
]
