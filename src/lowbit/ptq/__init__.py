"""Post-training quantization: quantize a trained float model without training it."""

from .multipoint import LayerAllocation, allocate_points, multipoint_ptq

__all__ = ["LayerAllocation", "allocate_points", "multipoint_ptq"]
