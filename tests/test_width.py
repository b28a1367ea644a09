"""Width at equal weight storage: exact storage counts and the largest width that fits."""

from __future__ import annotations

import pytest
from torch import nn

from lowbit.models import build_model
from lowbit.search import model_weight_bits, width_for_budget


def test_storage_counts_quantized_and_float_parameters() -> None:
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    # first and last layer float: 32 bits for everything but the middle weight (20x30 at 2 bits)
    floats = (10 * 20 + 20) + 30 + (30 * 5 + 5)  # layer 1, the middle bias, layer 3
    assert model_weight_bits(net, 2) == 32 * floats + 2 * 20 * 30
    assert model_weight_bits(net, 4, keep_float=()) == 4 * (200 + 600 + 150) + 32 * (20 + 30 + 5)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_width_for_budget_is_the_largest_that_fits(bits: int) -> None:
    def build(m: float) -> nn.Module:
        return build_model("lenet5", width_mult=m)

    budget = model_weight_bits(build(1.0), 2)
    m, size = width_for_budget(build, bits, budget)
    assert size == model_weight_bits(build(m), bits) <= budget
    assert model_weight_bits(build(m * 1.03), bits) > budget  # 3% wider no longer fits
    assert (m >= 1.0) == (bits <= 2)  # the 2-bit width-1 model defined the budget


def test_budget_too_small() -> None:
    with pytest.raises(ValueError, match="more than the budget"):
        width_for_budget(lambda m: build_model("lenet5", width_mult=m), 8, 1000)
