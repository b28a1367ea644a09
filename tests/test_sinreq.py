"""SinReQ / WaveQ: zero on the quantizer's grid, closed-form gradients, learned bits, training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _resume_worker import loaders
from torch import nn

import lowbit
from lowbit.nn.quantize import weight_quantizer
from lowbit.train import TrainConfig, Trainer
from lowbit.train.checkpoint import read_checkpoint
from lowbit.train.methods import build_methods
from lowbit.train.sinreq import SinReQ, WaveQ, grid_factor, layer_grid, sin_penalty

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _quantized(weight: dict, seed: int = 0) -> nn.Module:
    return lowbit.quantize(_net(seed), {"default": {"weight": weight}})


def _latent(layer: nn.Module) -> torch.Tensor:
    return layer.parametrizations.weight.original


WEIGHTS = [
    {"method": "uniform", "bits": 2},
    {"method": "uniform", "bits": 3, "per_channel": True},
    {"method": "uniform", "bits": 4, "scale": "mse"},
    {"method": "wrpn", "bits": 3},
    {"method": "wrpn", "bits": 2, "scale": "max", "per_channel": True},
    {"method": "lsq", "bits": 3},
]


@pytest.mark.parametrize("weight", WEIGHTS, ids=lambda w: "-".join(str(v) for v in w.values()))
def test_zero_exactly_on_the_quantizers_grid(weight: dict) -> None:
    """R(Q(w)) = 0 (to float rounding of sin(pi m)), R(w) > 0, and every layer uses its own grid."""
    model = _quantized(weight)
    for layer in lowbit.quantized_layers(model).values():
        layer.weight  # noqa: B018  (LSQ initializes its step from the first weights it sees)
    reg = SinReQ(model, weight=1.0, grid="quantizer")
    assert float(reg(model).detach()) > 1e-3
    with torch.no_grad():
        for layer in lowbit.quantized_layers(model).values():
            _latent(layer).copy_(layer.weight)  # the quantized weights, now latent
    assert float(reg(model).detach()) < 1e-9
    # the grid is the quantizer's: its step is the distance between neighbouring decoded levels
    layer = lowbit.quantized_layers(model)["2"]
    c = layer_grid(layer, _latent(layer), "quantizer")
    levels = torch.unique(layer.weight.detach()[0])
    step = c / grid_factor(weight["bits"], "quantizer")
    step0 = step if step.dim() == 0 else step[0]
    gaps = (levels[1:] - levels[:-1]) / step0
    assert torch.allclose(gaps, torch.round(gaps), atol=1e-4) and bool((torch.round(gaps) >= 1).all())


@pytest.mark.parametrize(("grid", "bits", "step"), [("paper", 2, 1 / 3), ("wrpn", 2, 1.0), ("wrpn", 4, 1 / 7),
                                                    ("paper", 3, 1 / 7)])
def test_fixed_grids(grid: str, bits: int, step: float) -> None:
    model = _net()
    reg = SinReQ(model, bits=bits, grid=grid)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randint(-5, 6, m.weight.shape) * step)
    assert float(reg(model).detach()) < 1e-9
    with torch.no_grad():
        model[0].weight.add_(step / 2)  # the worst point: half-way between levels
    # that layer's penalty is mean(sin^2(pi/2)) / 2^b = 1 / 2^b
    assert float(reg(model).detach()) == pytest.approx(1 / 2**bits, rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dorefa_grid_is_zero_on_dorefa_levels(bits: int) -> None:
    """grid 'dorefa': R = 0 exactly where DoReFa's normalised weight sits on its levels, i.e. on the
    weights DoReFa keeps unchanged; positive elsewhere, maximal half-way."""
    from lowbit.quant.dorefa import DoReFaWeight, dorefa_weight_normalize

    model = lowbit.quantize(_net(), {"default": {"weight": {"method": "dorefa", "bits": bits}}})
    reg = SinReQ(model, weight=1.0, grid="dorefa")
    assert reg.bits == {"0": bits, "2": bits, "4": bits}
    assert float(reg(model).detach()) > 1e-3
    n = 2**bits - 1
    with torch.no_grad():
        for layer in lowbit.quantized_layers(model).values():
            w = _latent(layer)
            t = torch.tanh(w)
            m = t.abs().max()
            x = torch.round((t / (2 * m) + 0.5) * n) / n  # DoReFa's levels of the normalised weight
            # the weight whose normalised value is exactly x (the max keeps its place: x = 0 or 1 there)
            w.copy_(torch.atanh(((x - 0.5) * 2 * m).clamp(-0.999999, 0.999999)))
            xn = dorefa_weight_normalize(w) * n
            assert torch.allclose(xn, torch.round(xn), atol=1e-3)
    assert float(reg(model).detach()) < 1e-5
    # on those weights DoReFa's quantizer is the identity on the normalised value
    q = DoReFaWeight(bits)
    w = _latent(lowbit.quantized_layers(model)["2"])
    torch.testing.assert_close(q(w.detach()), 2 * dorefa_weight_normalize(w.detach()) - 1, atol=2e-3, rtol=0)


def test_closed_form_gradient_and_descent_to_nearest_level() -> None:
    """dR/dw = lambda * pi / (Delta N 2^b) * sin(2 pi w / Delta); descending R alone moves every
    weight to its nearest level, never across a cut."""
    model = _net()
    lam, bits = 0.7, 3
    reg = SinReQ(model, weight=lam, bits=bits, grid="max", layers=["0"])
    w = model[0].weight
    delta = (w.detach().abs().max() / 3).item()
    r = reg(model)
    (g,) = torch.autograd.grad(r, w)
    expected = lam * math.pi / (delta * w.numel() * 2**bits) * torch.sin(2 * math.pi * w.detach() / delta)
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-9)

    nearest = torch.round(w.detach() / delta) * delta
    far = (w.detach() / delta - torch.round(w.detach() / delta)).abs() < 0.45  # not at a cut
    curvature = lam * 2 * math.pi**2 / (delta**2 * w.numel() * 2**bits)  # R'' at a level
    opt = torch.optim.SGD([w], lr=0.5 / curvature)
    for _ in range(100):
        opt.zero_grad()
        reg(model).backward()
        opt.step()
    # the largest weight is a level (the grid's range) and stays one, so Delta does not move
    assert (w.detach().abs().max() / 3).item() == pytest.approx(delta, rel=1e-6)
    err = (w.detach() - nearest).abs()
    assert float(err[far].max()) < 1e-3 * delta


def test_sin_penalty_reductions() -> None:
    w = torch.tensor([0.25, 0.5, 1.0])
    assert float(sin_penalty(w, 1.0, 1, "sum")) == pytest.approx((0.5 + 1.0 + 0.0) / 2)
    assert float(sin_penalty(w, 1.0, 1, "mean")) == pytest.approx((0.5 + 1.0 + 0.0) / 6)


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="rounds the weights to a uniform grid"):
        SinReQ(_quantized({"method": "binary", "bits": 1}), grid="quantizer")
    with pytest.raises(ValueError, match="give bits"):
        SinReQ(_net())
    with pytest.raises(ValueError, match="grid 'max'"):
        SinReQ(_net(), bits=2, grid="quantizer")
    with pytest.raises(ValueError, match="allowed: quantizer, max, wrpn, paper"):
        SinReQ(_net(), bits=2, grid="nearest")
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\]"):
        SinReQ(_net(), bits=1, grid="max")
    with pytest.raises(ValueError, match="no layer to regularize"):
        SinReQ(_net(), bits=2, grid="max", layers=["conv*"])
    with pytest.raises(ValueError, match="min_bits"):
        WaveQ(_net(), min_bits=5, max_bits=3)
    with pytest.raises(ValueError, match="init_bits"):
        WaveQ(_net(), init_bits=9)
    # through a recipe: unknown keys name the method's options
    with pytest.raises(ValueError, match="allowed keys for waveq"):
        build_methods([{"name": "waveq", "lambda": 1.0}], _net())


def test_waveq_beta_gradient_is_the_finite_difference() -> None:
    model = _net()
    wq = WaveQ(model, weight=1.0, beta_weight=0.01, init_bits=3.3, grid="max").double()
    model.double()
    r = wq(model)
    (g,) = torch.autograd.grad(r, wq.beta)
    eps = 1e-6
    for i in range(3):
        with torch.no_grad():
            wq.beta[i] += eps
            up = float(wq(model))
            wq.beta[i] -= 2 * eps
            down = float(wq(model))
            wq.beta[i] += eps
        assert float(g[i]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize(("beta_weight", "moves"), [(1.0, "down"), (0.0, "up")])
def test_waveq_bit_penalty_balances_the_grid(beta_weight: float, moves: str) -> None:
    """With a large bit charge beta falls to min_bits; with none, 1/2^beta lowers R as beta grows
    (until the sine term, whose period moves with beta, holds it in a local minimum)."""
    model = _net()
    wq = WaveQ(model, weight=1.0, beta_weight=beta_weight, init_bits=4.0, min_bits=2, max_bits=8)
    opt = torch.optim.Adam(wq.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        wq(model).backward()
        opt.step()
        wq.on_step_end(None, 0, {})
    bits = wq.learned_bits()
    if moves == "down":
        assert set(bits.values()) == {2}
    else:
        assert bool((wq.beta.detach() >= 4.0).all()) and float(wq.beta.detach().mean()) > 4.3
    assert all(2 <= float(b) <= 8 for b in wq.beta.detach())


def test_waveq_recipe_writes_learned_bits_and_keeps_float_layers() -> None:
    base = {"default": {"weight": {"method": "uniform", "bits": 8}},
            "rules": [{"match": "@first", "weight": None}]}
    model = lowbit.quantize(_net(), base)
    wq = WaveQ(model, grid="quantizer")
    assert wq.names == ["2", "4"]  # the float first layer is not regularized
    with torch.no_grad():
        wq.beta.copy_(torch.tensor([2.6, 4.4]))
    assert wq.learned_bits() == {"2": 3, "4": 4}
    recipe = wq.recipe(base)
    fresh = lowbit.quantize(_net(), recipe)
    qs = {n: weight_quantizer(m) for n, m in lowbit.quantized_layers(fresh).items()}
    assert "0" not in qs and qs["2"].bits == 3 and qs["4"].bits == 4


def test_waveq_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    """Through the Trainer: beta is optimized (an extra param group without decay), logged, written
    to waveq_bits.json, stored in the checkpoint, and restored on resume."""
    train, test = loaders()
    cfg = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", weight_decay=5e-4, seed=0, tensorboard=False)

    def run(epochs: int, resume: bool) -> tuple[WaveQ, Trainer]:
        model = lowbit.quantize(_net(), {"default": {"weight": {"method": "uniform", "bits": 4}}})
        hooks = build_methods([{"name": "waveq", "weight": 10.0, "beta_weight": 0.01, "grid": "quantizer"}],
                              model)
        tr = Trainer(model, train, test, cfg.model_copy(update={"epochs": epochs}), tmp_path,
                     regularizers=hooks.regularizers, callbacks=hooks.callbacks)
        tr.fit(resume=resume)
        return hooks.regularizers[0], tr

    wq, tr = run(1, False)
    groups = {g["name"]: g for g in tr.optimizer.param_groups}
    assert groups["regularizer/waveq"]["weight_decay"] == 0.0
    assert groups["regularizer/waveq"]["params"][0] is wq.beta
    assert not torch.equal(wq.beta.detach(), torch.full((3,), 4.0))  # it learned
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert line["reg/waveq"] > 0 and line["waveq/bits"] == wq.learned_bits()
    saved = json.loads((tmp_path / "waveq_bits.json").read_text())
    assert saved["bits"] == wq.learned_bits()
    _, tensors = read_checkpoint(tmp_path / "checkpoint.safetensors")
    assert any(torch.equal(t, wq.beta.detach()) for t in tensors.values())
    beta_after_1 = wq.beta.detach().clone()
    wq2, _ = run(2, True)  # resumes at epoch 1 with the saved beta, then trains one more epoch
    assert not torch.equal(wq2.beta.detach(), beta_after_1)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_waveq_beta_lr_is_its_param_groups_rate() -> None:
    """``beta_lr`` sets beta's own learning rate (the schedule scales it like the model's); under
    Adam, beta then moves about ``beta_lr`` per step where the model's rate moved it by ``lr``."""
    train, test = loaders()
    moved = {}
    for beta_lr in (None, 0.05):
        model = lowbit.quantize(_net(), {"default": {"weight": {"method": "uniform", "bits": 4}}})
        hooks = build_methods([{"name": "waveq", "weight": 1.0, "beta_weight": 10.0, "grid": "quantizer",
                                "beta_lr": beta_lr}], model)
        cfg = TrainConfig(epochs=1, lr=1e-3, optimizer="adam", schedule="constant", seed=0, tensorboard=False)
        tr = Trainer(model, train, test, cfg, regularizers=hooks.regularizers, callbacks=hooks.callbacks)
        group = next(g for g in tr.optimizer.param_groups if g["name"] == "regularizer/waveq")
        assert group["lr"] == (beta_lr or 1e-3) and group["weight_decay"] == 0.0
        tr.fit()
        moved[beta_lr] = float((4.0 - hooks.regularizers[0].beta.detach()).mean())
    steps = len(train)
    assert 0 < moved[None] <= 1.01e-3 * steps  # the bit charge pushes every beta down, lr per step
    assert moved[0.05] > 10 * moved[None]
    with pytest.raises(ValueError, match="beta_lr must be a number > 0"):
        WaveQ(_net(), beta_lr=0.0)


def test_waveq_ramp_raises_the_sine_weight_with_the_runs_steps() -> None:
    """``ramp``: the sine term's weight rises linearly from 0 over that fraction of the run's steps
    (the bit charge alone acts at the first step), then stays at ``weight``; logged per epoch."""
    model = _net()
    wq = WaveQ(model, weight=5.0, beta_weight=0.5, init_bits=4.0, ramp=0.5)
    charge = 0.5 * float(wq.beta.detach().sum())
    assert wq.sine_scale() == 0.0 and wq(model).item() == pytest.approx(charge)
    wq.progress = 0.25
    full = WaveQ(model, weight=5.0, beta_weight=0.5, init_bits=4.0)
    assert wq(model).item() == pytest.approx(charge + 0.5 * (full(model).item() - charge))
    train, test = loaders()
    qmodel = lowbit.quantize(_net(), {"default": {"weight": {"method": "uniform", "bits": 4}}})
    hooks = build_methods([{"name": "waveq", "weight": 1.0, "grid": "quantizer", "ramp": 0.5}], qmodel)
    cfg = TrainConfig(epochs=4, lr=1e-3, optimizer="adam", schedule="constant", seed=0, tensorboard=False)
    tr = Trainer(qmodel, train, test, cfg, regularizers=hooks.regularizers, callbacks=hooks.callbacks)
    tr.fit()
    scales = [h["waveq/sine_scale"] for h in tr.history]
    assert scales == pytest.approx([0.5, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="ramp must be a fraction"):
        WaveQ(_net(), ramp=1.5)
