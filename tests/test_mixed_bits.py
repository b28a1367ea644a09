"""Differentiable bit-widths: the training mixture, the hard eval choice, theta's gradient, the
expected-bits penalty and its effect in training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.quant.mixed import MixedBitsWeight, chosen_bits, expected_bits
from lowbit.quant.uniform import symmetric_quantize
from lowbit.train import TrainConfig, Trainer
from lowbit.train.methods import build_methods


def _uniform_pc(w: torch.Tensor, b: int) -> torch.Tensor:
    q = 2 ** (b - 1) - 1
    s = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / q
    return symmetric_quantize(w, s, q)


def test_mixture_hard_choice_and_gradients() -> None:
    torch.manual_seed(0)
    w = (torch.randn(6, 10) * 0.1).requires_grad_(True)
    q = MixedBitsWeight(4, candidates=[2, 8])
    assert q.candidates == (2, 4, 8) and q.choice() == 4  # the recipe's bits join and lead
    with torch.no_grad():
        q.theta.copy_(torch.tensor([0.3, -0.2, 0.5]))
    p = torch.softmax(q.theta.detach(), 0)
    y = q(w)
    mix = sum(p[k] * _uniform_pc(w.detach(), b) for k, b in enumerate((2, 4, 8)))
    torch.testing.assert_close(y, mix)
    # d y / d theta_k = p_k (Q_k - y): check one coordinate against autograd
    (g,) = torch.autograd.grad(y[0, 0], q.theta, retain_graph=True)
    qs = torch.stack([_uniform_pc(w.detach(), b)[0, 0] for b in (2, 4, 8)])
    torch.testing.assert_close(g, p * (qs - mix[0, 0]))
    (gw,) = torch.autograd.grad(y.sum(), w)
    torch.testing.assert_close(gw, torch.ones_like(w))  # straight-through: the mixture weights sum to 1
    q.eval()
    assert q.choice() == 8 and torch.equal(q(w), _uniform_pc(w.detach(), 8))
    assert torch.equal(q(w), q.encode(w).decode()) and q.encode(w).bits == 8
    with pytest.raises(ValueError, match="bit-widths in"):
        MixedBitsWeight(4, candidates=[1, 4])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def test_expected_bits_is_the_weight_weighted_mean() -> None:
    model = lowbit.quantize(_net(), {"default": {"weight": {"method": "mixed", "bits": 4}}})
    qs = {n: m for n, m in model.named_modules() if isinstance(m, MixedBitsWeight)}
    assert len(qs) == 3
    sizes = [16 * 64, 64 * 64, 64 * 4]
    e = [float((q.probs().detach() * torch.tensor(q.candidates, dtype=torch.float32)).sum())
         for q in qs.values()]
    want = sum(s * x for s, x in zip(sizes, e, strict=True)) / sum(sizes)
    assert float(expected_bits(model).detach()) == pytest.approx(want)
    assert chosen_bits(model) == {"0": 4, "2": 4, "4": 4}
    with pytest.raises(ValueError, match="no layer quantized with method 'mixed'"):
        build_methods([{"name": "bits_penalty"}], _net())


@pytest.mark.parametrize(("weight", "direction"), [(0.0, "keep"), (0.5, "fewer")])
def test_penalty_moves_the_choice_to_fewer_bits(weight: float, direction: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4] > 0).long()
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    mixed = {"method": "mixed", "bits": 8, "candidates": [2, 4], "temperature": 0.2}
    model = lowbit.quantize(_net(), {"default": {"weight": mixed},
                                     "rules": [{"match": "@first", "weight": None},
                                               {"match": "@last", "weight": None}]})
    hooks = build_methods([{"name": "bits_penalty", "weight": weight}], model)
    cfg = TrainConfig(epochs=10, optimizer="adam", lr=1e-2, seed=0, tensorboard=False)
    Trainer(model, loader, loader, cfg, regularizers=hooks.regularizers).fit()
    bits = chosen_bits(model)["2"]
    if direction == "fewer":
        assert bits < 8 and float(expected_bits(model).detach()) < 5
    else:
        assert bits == 8 and float(expected_bits(model).detach()) > 5
    model.eval()
    with torch.no_grad():
        assert float((model(x).argmax(1) == y).double().mean()) > 0.8
