"""An empty batch flows through a quantized model as through the float one (shape (0, classes))."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.models import build_model


@pytest.mark.parametrize("recipe", ["lenet5-w1a4", "lenet5-w2a4", "lenet5-w4a4"])
def test_an_empty_batch_gives_an_empty_output(recipe):
    torch.manual_seed(0)
    model = build_model("lenet5")
    lowbit.quantize(model, lowbit.Recipe.from_yaml(f"recipes/{recipe}.yaml"))
    model.train()
    model(torch.randn(8, 1, 28, 28))  # data-initialised steps (LSQ) are set from a real batch
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(0, 1, 28, 28))
    assert out.shape == (0, 10)
