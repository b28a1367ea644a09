"""RVSM: the three proximal maps against brute-force minimization, the splitting gradient, and
sparse training through a recipe."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.train import TrainConfig, Trainer
from lowbit.train.methods import build_methods
from lowbit.train.rvsm import RVSM, prox


def _penalty(x: torch.Tensor, penalty: str, a: float) -> torch.Tensor:
    if penalty == "l1":
        return x.abs()
    if penalty == "l0":
        return (x != 0).double()
    return (a + 1) * x.abs() / (a + x.abs())


CASES = [(p, tau, 1.0) for p in ("l1", "l0") for tau in (0.05, 0.3, 1.5)] + [
    ("tl1", tau, a) for tau in (0.05, 0.3, 1.5) for a in (0.5, 1.0, 3.0)  # both threshold branches
]


@pytest.mark.parametrize(("penalty", "tau", "a"), CASES)
def test_prox_is_the_minimizer(penalty: str, tau: float, a: float) -> None:
    """prox(y) minimizes (1/2)(x - y)^2 + tau P(x): compare with a fine grid search over x."""
    y = torch.linspace(-4, 4, 81, dtype=torch.float64)
    got = prox(y, tau, penalty, a)
    xs = torch.cat([torch.linspace(-5, 5, 20001, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    for yi, gi in zip(y.tolist(), got.tolist(), strict=True):
        obj = 0.5 * (xs - yi) ** 2 + tau * _penalty(xs, penalty, a)
        best = float(obj.min())
        pen = float(_penalty(torch.tensor([gi], dtype=torch.float64), penalty, a)[0])
        mine = 0.5 * (gi - yi) ** 2 + tau * pen
        assert mine <= best + 1e-9, (penalty, tau, a, yi, gi, float(xs[obj.argmin()]))


def test_thresholds() -> None:
    y = torch.tensor([-1.0, -0.31, -0.29, 0.0, 0.29, 0.31, 1.0])
    assert torch.equal(prox(y, 0.3, "l1") == 0, torch.tensor([False, False, True, True, True, False, False]))
    t0 = math.sqrt(2 * 0.045)  # 0.3
    assert torch.equal(prox(y, 0.045, "l0"), torch.where(y.abs() > t0, y, torch.zeros_like(y)))
    # transformed L1, small tau: threshold tau (a + 1) / a
    tau, a = 0.1, 1.0
    t = tau * (a + 1) / a
    z = prox(torch.tensor([t - 1e-4, t + 1e-3]), tau, "tl1", a)
    assert z[0] == 0 and z[1] != 0


def test_splitting_gradient_and_sparse_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    r = RVSM(model, lam=0.02, beta=2.0, penalty="l1")
    w = model[0].weight
    (g,) = torch.autograd.grad(r(model), w)
    torch.testing.assert_close(g, 2.0 * (w.detach() - prox(w.detach(), 0.01, "l1")))
    with pytest.raises(ValueError, match="allowed: l1, l0, tl1"):
        RVSM(model, penalty="l2")
    with pytest.raises(ValueError, match="lam must be a number > 0"):
        RVSM(model, lam=0)


@pytest.mark.parametrize("penalty", ["l1", "l0", "tl1"])
def test_rvsm_through_a_recipe_makes_sparse_quantized_weights(penalty: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 20)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0).long()  # labels use 4 of 20 inputs
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
    lowbit.quantize(model, {"default": {"weight": {"method": "uniform", "bits": 4}}})
    hooks = build_methods([{"name": "rvsm", "lam": 3e-3, "beta": 1.0, "penalty": penalty}], model)
    cfg = TrainConfig(epochs=15, optimizer="adam", lr=1e-2, seed=0, tensorboard=False)
    history = Trainer(model, loader, loader, cfg, regularizers=hooks.regularizers,
                      callbacks=hooks.callbacks).fit()
    assert history[-1]["rvsm/sparsity"] > 0.5
    latent = model[0].parametrizations.weight.original
    zero = latent == 0  # finalized: w <- u
    assert float(zero.double().mean()) > 0.5
    assert bool((model[0].weight[zero] == 0).all())  # zeros survive the 4-bit grid
    if penalty != "l0":  # the shrinking penalties zero the inputs the labels ignore first
        assert float(zero[:, 4:].double().mean()) > float(zero[:, :4].double().mean()) + 0.2
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    assert acc > 0.8  # chance: 0.375
