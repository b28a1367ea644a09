"""Every shipped recipe parses, quantizes a LeNet-5 (no recipe names another model), trains a
step, and its weights encode to exactly what forward uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.models import build_model
from lowbit.nn import input_quantizer, weight_quantizers
from lowbit.recipe import Recipe, shipped_recipes
from lowbit.train.methods import build_methods

SHIPPED = shipped_recipes()


def test_recipes_are_shipped() -> None:
    assert len(SHIPPED) >= 20 and "lenet5-w1a4" in SHIPPED


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipe_builds_and_runs(name: str, one_thread: None) -> None:
    recipe = Recipe.from_yaml(SHIPPED[name])
    assert recipe.name == name  # the file's name is the recipe's name (what --recipe NAME finds)
    assert Recipe.from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()  # round trip
    torch.manual_seed(0)
    model = lowbit.quantize(build_model("lenet5"), recipe, strict=True)  # every rule matches a layer
    wq = weight_quantizers(model)
    layers = lowbit.quantized_layers(model)
    assert wq or any(input_quantizer(m) is not None for m in layers.values())
    hooks = build_methods(recipe.methods, model)  # the methods' options are accepted for real
    assert len(recipe.methods) == 0 or hooks.wrap_optimizer or hooks.callbacks or hooks.regularizers
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    model.train()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(m.parametrizations[p].original.grad is not None for m, p, _ in wq.values())
    model.eval()
    with torch.no_grad():
        for key, (m, p, q) in wq.items():
            latent = m.parametrizations[p].original
            assert torch.equal(q.encode(latent).decode(), getattr(m, p)), key  # bit for bit
