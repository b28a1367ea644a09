"""A load_packed into the caller's model that fails leaves that model as it was (not half quantized)."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.export.errors import FormatError
from lowbit.models import build_model


def test_a_failed_load_leaves_the_callers_model_unchanged(tmp_path):
    torch.manual_seed(0)
    m = build_model("lenet5")
    lowbit.quantize(m, lowbit.Recipe.from_yaml("recipes/lenet5-w1a4.yaml"))
    m.eval()
    lowbit.save_packed(m, tmp_path / "m.lowbit")
    other = build_model("lenet5", bn=False)  # biases the file does not hold
    state = {k: v.clone() for k, v in other.state_dict().items()}
    kinds = {n: type(x) for n, x in other.named_modules()}
    with pytest.raises(FormatError, match="lacks state entries"):
        lowbit.load_packed(tmp_path / "m.lowbit", model=other)
    assert lowbit.quantized_layers(other) == {}
    assert {n: type(x) for n, x in other.named_modules()} == kinds
    now = other.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="no lowbit_recipe"):
        lowbit.save_packed(other, tmp_path / "half.lowbit")  # still a float model
    fresh = build_model("lenet5")  # the right architecture still loads in place
    assert lowbit.load_packed(tmp_path / "m.lowbit", model=fresh) is fresh
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(fresh(x), m(x))
