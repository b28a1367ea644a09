"""torch.compile of quantized models: no graph breaks in the quantizers, and ``--compile``
training equals eager training.

Dynamo runs with the ``aot_eager`` backend here (graph capture and AOT autograd, no C++ code
generation), which checks what ``--compile`` changes about the computation in seconds rather
than the minutes inductor spends compiling on a CPU.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

from lowbit.data import BatchLoader
from lowbit.nn import quantize
from lowbit.quant import fused
from lowbit.quant.base import Quantizer
from lowbit.recipe import load_recipe
from lowbit.train import TrainConfig, Trainer
from lowbit.train.distributed import init_from_batch


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))


# LSQ weights + PACT (data-initialised steps), TTQ and TGA (initialised from the first weights),
# BCGD's ReLU quantizer, uniform with a running range.
RECIPES = ["lenet5-w2a4", "ttq-w2", "tga-w2", "bcgd-w1a4",
           {"default": {"weight": {"method": "uniform", "bits": 4},
                        "activation": {"method": "uniform", "bits": 4}}}]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r if isinstance(r, str) else "uniform-w4a4")
def test_quantized_training_forward_has_no_graph_breaks(recipe, one_thread):
    torch.manual_seed(0)
    model = quantize(_net(), load_recipe(recipe) if isinstance(recipe, str) else recipe)
    model.train()
    x = torch.randn(4, 1, 8, 8)
    init_from_batch(model, x)  # what the Trainer does before torch.compile
    dynamo.reset()
    ex = dynamo.explain(model)(x)
    assert ex.graph_break_count == 0, [str(r.reason)[:200] for r in ex.break_reasons]
    assert ex.graph_count == 1


def test_initialised_flag_follows_a_loaded_state_dict():
    recipe = {"default": {"weight": {"method": "lsq", "bits": 4}, "activation": {"method": "lsq", "bits": 4}}}

    def initialised(model: nn.Module) -> list[bool]:
        # activation quantizers: initialised by the first training batch (weights: by quantize())
        return [m.is_initialized() for m in model.modules()
                if isinstance(m, Quantizer) and m.kind == "activation" and hasattr(m, "initialized")]

    fresh = quantize(_net(), recipe)
    blank = copy.deepcopy(fresh.state_dict())
    assert initialised(fresh) and not any(initialised(fresh))
    fresh.train()
    fresh(torch.randn(4, 1, 8, 8))
    assert all(initialised(fresh))
    trained = copy.deepcopy(fresh.state_dict())
    fresh.load_state_dict(blank)  # the flag must not outlive the buffer it mirrors
    assert not any(initialised(fresh))
    other = quantize(_net(), recipe)
    other.load_state_dict(trained)
    assert all(initialised(other))


def test_compiled_training_equals_eager(monkeypatch, one_thread):
    """Compiled training runs the quantizers' torch formulas (the numba fast path is eager-only),
    so it must equal eager training with that fast path off."""
    recipe = {"default": {"weight": {"method": "lsq", "bits": 2},
                          "activation": {"method": "pact", "bits": 4}},
              "rules": [{"match": "@first", "activation": None}]}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)

    def fit(compile_: bool) -> nn.Module:
        torch.manual_seed(0)
        model = quantize(_net(), recipe)
        cfg = TrainConfig(epochs=2, optimizer="adam", lr=1e-2, compile=compile_, tensorboard=False, seed=0)
        Trainer(model, BatchLoader(x, y, batch_size=16, shuffle=True, seed=0), None, cfg).fit()
        return model

    monkeypatch.setattr(fused, "supported", lambda x: False)
    eager = fit(False)
    calls = []
    real = torch.compile

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", functools.wraps(real)(spy))
    dynamo.reset()
    compiled = fit(True)
    assert calls == [1]
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7), name
    torch.manual_seed(0)
    assert not torch.equal(eager[0].weight, quantize(_net(), recipe)[0].weight)  # it did train
