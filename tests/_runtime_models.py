"""Models the runtime tests share (imported by the test files beside this one)."""

from __future__ import annotations

import torch
from torch import nn

import lowbit
from lowbit.models import build_model

# every layer with a fused input quantizer: the whole graph runs in the flat executor
FLAT = {"default": {"weight": {"method": "binary", "bits": 1},
                    "activation": {"method": "pact", "bits": 4, "alpha_init": 3.0}}}


def quantized_lenet(recipe: str | dict) -> nn.Module:
    """LeNet-5 (seed 0) quantized by ``recipe`` (a shipped name or path, or a dict), in eval mode."""
    torch.manual_seed(0)
    r = lowbit.load_recipe(recipe) if isinstance(recipe, str) else recipe
    return lowbit.quantize(build_model("lenet5"), r).eval()


def calibrated_lenet(weight: dict) -> nn.Module:
    """LeNet-5 (seed 0) with ``weight`` quantization and 4-bit PACT activations, its batch norm
    statistics from one training-mode batch (not the identity), in eval mode."""
    torch.manual_seed(0)
    act = {"method": "pact", "bits": 4, "alpha_init": 3.0}
    q = lowbit.quantize(build_model("lenet5").eval(), {"default": {"weight": weight, "activation": act}})
    with torch.no_grad():
        q.train()(torch.rand(16, 1, 28, 28))
    return q.eval()
