"""Post-training quantization: quantize a trained float model without training it."""

from .multipoint import LayerAllocation, allocate_points, calibration_batches, multipoint_ptq

__all__ = ["LayerAllocation", "allocate_points", "calibration_batches", "multipoint_ptq"]
