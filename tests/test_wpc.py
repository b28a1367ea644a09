"""Group lasso with Weight Penalty Clipping and structured sparsity: groups tile the weight,
closed-form penalty and gradient, clipping protects the ternary scale, pruning zeroes groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.prune import prune_small_groups, structured_sparsity
from lowbit.prune.structured import _ungroup
from lowbit.quant.twn import TWNWeight
from lowbit.train import TrainConfig, Trainer
from lowbit.train.methods import build_methods
from lowbit.train.wpc import GroupLassoWPC, group_view, wpc_threshold


@pytest.mark.parametrize("shape", [(6, 10, 3, 3), (6, 8, 1, 1), (5, 7)])
@pytest.mark.parametrize(("group", "pe_in"), [("filter", 4), ("kernel", 4), ("pe", 4), ("pe", 3), ("pe", 16)])
def test_groups_tile_the_weight(shape, group, pe_in) -> None:
    w = torch.randn(shape)
    g = group_view(w, group, pe_in)
    assert torch.allclose(g.square().sum(), w.square().sum())  # every weight once (padding is 0)
    assert torch.equal(_ungroup(g, w.shape, group, pe_in), w)
    if group == "pe" and len(shape) == 4:
        assert g.shape == (shape[0] * math.ceil(shape[1] / pe_in), pe_in * shape[2] * shape[3])
        # group (o, b) holds input channels b*pe_in .. b*pe_in + pe_in - 1 of output channel o
        blk = g[1 * math.ceil(shape[1] / pe_in) + 1]  # o = 1, b = 1
        want = w[1, pe_in:2 * pe_in].reshape(-1)
        assert torch.equal(blk[:want.numel()], want)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def test_penalty_and_gradient_closed_form() -> None:
    model = _net()
    reg = GroupLassoWPC(model, lam=0.1, group="filter", wpc=False, layers=["0"])
    w = model[0].weight
    norms = w.detach().reshape(8, -1).norm(dim=1)
    n = w[0].numel()
    assert float(reg(model).detach()) == pytest.approx(0.1 * math.sqrt(n) * float(norms.sum()), rel=1e-5)
    (g,) = torch.autograd.grad(reg(model), w)
    expected = 0.1 * math.sqrt(n) * w.detach() / norms.reshape(8, 1, 1, 1)
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-7)
    # with clipping, weights beyond t = 0.7 mean|w| get no gradient; the others the clipped form
    reg = GroupLassoWPC(model, lam=0.1, group="filter", wpc=True, layers=["0"])
    (g,) = torch.autograd.grad(reg(model), w)
    t = float(wpc_threshold(w))
    big = w.detach().abs() > t
    assert bool((g[big] == 0).all()) and bool((g[~big] != 0).all())
    c = w.detach().clamp(-t, t)
    cn = c.reshape(8, -1).norm(dim=1).reshape(8, 1, 1, 1)
    torch.testing.assert_close(g[~big], (0.1 * math.sqrt(n) * c / cn)[~big], rtol=1e-4, atol=1e-7)


def test_clipping_protects_the_ternary_scale() -> None:
    """Descending the penalty alone: without clipping the TWN scale alpha collapses with the
    weights; with clipping the large weights (and alpha) stay, the small ones go to zero."""
    alphas = {}
    for wpc in (False, True):
        model = _net()
        lowbit.quantize(model, {"default": {"weight": {"method": "twn", "bits": 2}}})
        reg = GroupLassoWPC(model, lam=1.0, group="kernel", wpc=wpc, layers=["0"])
        latent = model[0].parametrizations.weight.original
        q = TWNWeight(2)
        alpha0 = float(q(latent.detach()).abs().max())
        opt = torch.optim.SGD([latent], lr=1e-3)
        for _ in range(200):
            opt.zero_grad()
            reg(model).backward()
            opt.step()
        alphas[wpc] = float(q(latent.detach()).abs().max()) / alpha0
    assert alphas[True] > 0.9 and alphas[False] < 0.5


def test_structured_sparsity_and_pruning() -> None:
    model = _net()
    lowbit.quantize(model, {"default": {"weight": {"method": "twn", "bits": 2}}})
    latent = model[0].parametrizations.weight.original
    with torch.no_grad():
        latent[2].mul_(1e-3)  # output channel 2: a tiny filter
    before = {r.layer: r for r in structured_sparsity(model, "filter")}
    assert before["0"].zero_groups == 1 and before["0"].groups == 8  # TWN already zeroes it
    with torch.no_grad():
        latent[5, :2].mul_(1e-4)
    n = prune_small_groups(model, 0.01, group="pe", pe_in=2)
    assert n >= 2  # filter 2's groups and the first input block of filter 5
    assert bool((latent[2] == 0).all()) and bool((latent[5, :2] == 0).all())
    assert bool((latent[5, 2:] != 0).any())
    sp = {r.layer: r for r in structured_sparsity(model, "pe", 2)}["0"]
    assert sp.zero_groups >= 2 and 0 < sp.fraction < 1
    with pytest.raises(ValueError, match="rel_threshold"):
        prune_small_groups(model, 1.5)
    with pytest.raises(ValueError, match="no quantized layer"):
        structured_sparsity(_net())


def test_wpc_through_a_recipe() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    model = _net()
    lowbit.quantize(model, {"default": {"weight": {"method": "twn", "bits": 2}}})
    hooks = build_methods([{"name": "wpc", "lam": 1e-3, "group": "kernel"}], model)
    cfg = TrainConfig(epochs=8, optimizer="adam", lr=1e-2, seed=0, tensorboard=False)
    trainer = Trainer(model, loader, loader, cfg, regularizers=hooks.regularizers, callbacks=hooks.callbacks)
    hist = trainer.fit()
    assert hist[-1]["reg/wpc"] > 0 and 0 <= hist[-1]["wpc/small_groups"] <= 1
    assert hist[-1]["wpc/small_groups"] > hist[0]["wpc/small_groups"]
    with pytest.raises(ValueError, match="allowed: filter, kernel, pe"):
        build_methods([{"name": "wpc", "group": "row"}], model)
