"""BCGD: the quantized ReLU with learned resolution, the blended optimizer, and BinaryRelax."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn import weight_quantizer
from lowbit.quant import registry
from lowbit.quant.bcgd_relu import (
    A_MAX,
    A_MIN,
    DERIVED_A_INIT,
    REFERENCE_A_INIT,
    BCGDActivation,
    half_gaussian_uniform_step,
)
from lowbit.quant.binary import BinaryWeight
from lowbit.quant.ste import coarse_derivative
from lowbit.train.bcgd import BCGD
from lowbit.train.binary_relax import BinaryRelax, RelaxedWeight, apply_binary_relax, remove_binary_relax


# ---- the quantized ReLU ------------------------------------------------------------------
def _bcgd_forward_loop(x: torch.Tensor, a: float, bits: int) -> torch.Tensor:
    """The reference's piecewise definition, element by element."""
    L = 2**bits - 1
    out = []
    for v in x.tolist():
        if v <= 0:
            out.append(0.0)
        elif v <= (L - 1) * a:
            out.append(a * math.ceil(v / a))
        else:
            out.append(L * a)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_bcgd_forward_is_ceil_quantizer_on_grid(bits: int) -> None:
    torch.manual_seed(bits)
    q = BCGDActivation(bits)
    assert registry.get("activation", "bcgd") is BCGDActivation
    a = float(q.a.detach())
    L = 2**bits - 1
    x = torch.cat([torch.randn(500) * L * a, torch.tensor([0.0, a, 0.5 * a, (L - 1) * a + 1e-3, 10 * L * a])])
    x = x.double()
    y = q(x)
    expect = _bcgd_forward_loop(x, float(torch.tensor(a, dtype=torch.float32)), bits)
    assert torch.allclose(y, expect, rtol=0, atol=1e-6)
    enc = q.encode(x)
    assert torch.equal(y, enc.decode())
    assert enc.num_levels == 2**bits and torch.equal(enc.levels, torch.arange(L + 1, dtype=x.dtype))
    assert y.unique().numel() <= 2**bits
    # ceil, not round: just above a code boundary goes up (round would give 0)
    assert float(q(torch.tensor([0.01 * a])).detach()) == pytest.approx(a)


def test_bcgd_init_table_and_derived_values() -> None:
    assert REFERENCE_A_INIT == {1: 1.2221, 2: 0.6511, 4: 0.1946}
    for b, a in REFERENCE_A_INIT.items():
        assert float(BCGDActivation(b).a.detach()) == pytest.approx(a)
        # the derivation rule reproduces the reference's values within 1%
        assert half_gaussian_uniform_step(b) == pytest.approx(a, rel=1e-2)
    for b, a in DERIVED_A_INIT.items():
        assert half_gaussian_uniform_step(b) == pytest.approx(a, rel=1e-3)
        assert float(BCGDActivation(b).a.detach()) == pytest.approx(a)


@pytest.mark.parametrize("ste", ["identity", "relu", "clipped_relu"])
@pytest.mark.parametrize("a_grad", ["mean", "ae", "min", "pact"])
def test_bcgd_gradients_match_reference_formulas(ste: str, a_grad: str) -> None:
    torch.manual_seed(0)
    bits, L, rate = 2, 3, 0.01
    q = BCGDActivation(bits, ste=ste, a_grad=a_grad, rate_factor=rate, a_init=0.5)
    x = (torch.randn(300) * 1.5).requires_grad_(True)
    g = torch.randn(300) * 0.1
    (q(x) * g).sum().backward()
    xd, a = x.detach(), 0.5
    assert torch.equal(x.grad, g * coarse_derivative(xd, ste, a * L))
    inr = (xd > 0) & (xd <= a * L)
    above = xd > a * L
    if a_grad == "mean":
        d = torch.where(inr, (L + 1) / 2, 0.0) + torch.where(above, float(L), 0.0)
    elif a_grad == "min":
        d = torch.where(inr, 1.0, 0.0) + torch.where(above, float(L), 0.0)
    elif a_grad == "pact":
        d = torch.where(above, float(L), 0.0)
    else:  # 'ae': ceil(x/a) on (0, (L-1)a], L above
        inr2 = (xd > 0) & (xd <= a * (L - 1))
        d = torch.where(inr2, torch.ceil(xd / a), 0.0) + torch.where(xd > a * (L - 1), float(L), 0.0)
    expect = torch.clamp(rate * (g * d).sum(), -1, 1)
    assert torch.allclose(q.a.grad, expect, rtol=1e-5, atol=1e-7)
    # the resolution's gradient is clamped to [-1, 1]
    q.a.grad = None
    (q(x) * g * 1e4).sum().backward()
    assert abs(float(q.a.grad)) == 1.0


def test_bcgd_resolution_clamp_and_fixed_resolution() -> None:
    q = BCGDActivation(4, a_init=1.0)
    with torch.no_grad():
        q.a.fill_(9.0)
    q.eval()
    x = torch.linspace(-1, 200, 1001)
    assert torch.equal(q(x), q.encode(x).decode())
    assert float(q(x).detach().max()) == 15 * A_MAX  # the forward uses a.clamp(1e-3, 5)
    assert float(q.a.detach()) == 9.0  # eval does not write the parameter
    q.train()
    q(x)
    assert float(q.a.detach()) == A_MAX  # training mode clamps it in place, as the reference
    with torch.no_grad():
        q.a.fill_(-1.0)
    q.clamp_()
    assert float(q.a.detach()) == pytest.approx(A_MIN)
    # learn_a=False: a = max|x| / L at every training step, no gradient
    f = BCGDActivation(2, learn_a=False)
    f.train()
    x = (torch.rand(50) * 3).requires_grad_(True)
    f(x).sum().backward()
    assert float(f.a.detach()) == pytest.approx(float(x.detach().abs().max()) / 3)
    assert f.a.grad is None and x.grad is not None
    with pytest.raises(ValueError, match="a_grad"):
        BCGDActivation(2, a_grad="median")  # type: ignore[arg-type]


# ---- models and data ---------------------------------------------------------------------
class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


W1A4 = {
    "default": {"weight": {"method": "binary", "bits": 1}, "activation": {"method": "bcgd", "bits": 4}},
    "rules": [{"match": "@first", "activation": None}, {"match": "@last", "weight": None}],
}


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0).long()
    return x, y


def _model(recipe: dict = W1A4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return lowbit.quantize(SmallNet(), recipe)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, sched=None, cb=None) -> list[float]:
    x, y = _data()
    losses = []
    for i in range(steps):
        if cb is not None and i % 4 == 0:
            cb.on_epoch_start(None, i // 4)
        xb, yb = x[(i % 4) * 16:(i % 4 + 1) * 16], y[(i % 4) * 16:(i % 4 + 1) * 16]
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if cb is not None:
            cb.on_step_end(None, i + 1, {})
        losses.append(loss.item())
    return losses


def _sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.95, weight_decay=1e-4)


# ---- BCGD optimizer ----------------------------------------------------------------------
def test_bcgd_rho_zero_is_plain_sgd_bit_for_bit() -> None:
    m1, m2 = _model(), _model()
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values(),
                                                    strict=True))
    l1 = _train(m1, _sgd(m1), 12)
    l2 = _train(m2, BCGD(_sgd(m2), m2, rho=0.0), 12)
    assert l1 == l2
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_bcgd_one_step_closed_form() -> None:
    rho, lr = 0.1, 0.05
    model = _model()
    latent = {n: layer.parametrizations.weight.original for n, layer in lowbit.quantized_layers(model).items()
              if weight_quantizer(layer) is not None}
    before = {n: w.detach().clone() for n, w in latent.items()}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if "original" not in n}
    opt = BCGD(torch.optim.SGD(model.parameters(), lr=lr), model, rho=rho)
    x, y = _data()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {n: w.grad.clone() for n, w in latent.items()}
    other_grads = {n: p.grad.clone() for n, p in model.named_parameters() if "original" not in n}
    opt.step()
    for n, w in latent.items():
        w0 = before[n]
        qw = w0.abs().mean() * torch.where(w0 >= 0, 1.0, -1.0)  # binary Q(w_t)
        expect = ((1 - rho) * w0 + rho * qw) - lr * grads[n]
        assert torch.allclose(w.detach(), expect, rtol=0, atol=1e-7), n
    for n, p in model.named_parameters():  # other parameters: a plain SGD step
        if "original" not in n:
            assert torch.allclose(p.detach(), others[n] - lr * other_grads[n], rtol=0, atol=1e-7), n


def test_bcgd_works_with_lr_scheduler_and_state_dict() -> None:
    model = _model()
    inner = _sgd(model)
    opt = BCGD(inner, model, rho=1e-3)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    lrs = []
    for _ in range(3):
        _train(model, opt, 1, sched)
        lrs.append(inner.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 10)) / 2 for k in (1, 2, 3)])
    sd = opt.state_dict()
    assert sd["bcgd"] == {"rho": 1e-3} and sd["state"]  # momentum buffers are there
    # resume: a fresh wrapper loaded from the state continues exactly like the original
    model2 = copy.deepcopy(model)
    opt2 = BCGD(_sgd(model2), model2, rho=0.5)
    opt2.load_state_dict(copy.deepcopy(sd))  # a copy: state_dict() shares the momentum tensors
    assert opt2.rho == 1e-3 and opt2.param_groups[0]["lr"] == inner.param_groups[0]["lr"]
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    sched2.load_state_dict(sched.state_dict())
    _train(model, opt, 2, sched)
    _train(model2, opt2, 2, sched2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bcgd_errors_and_pairs() -> None:
    with pytest.raises(ValueError, match="no quantized weight"):
        BCGD(torch.optim.SGD(SmallNet().parameters(), lr=0.1), SmallNet())
    model = _model()
    with pytest.raises(ValueError, match="not parameters of the wrapped optimizer"):
        BCGD(torch.optim.SGD(model.fc.parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="rho"):
        BCGD(_sgd(model), model, rho=2.0)
    # explicit (weight, Q) pairs
    w = nn.Parameter(torch.randn(10))
    opt = BCGD(torch.optim.SGD([w], lr=0.0), [(w, BinaryWeight())], rho=0.5)
    w0 = w.detach().clone()
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.allclose(w.detach(), 0.5 * w0 + 0.5 * BinaryWeight()(w0))


def test_bcgd_trains_w1a4_model() -> None:
    model = _model()
    opt = BCGD(_sgd(model), model, rho=1e-3)
    losses = _train(model, opt, 24)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) < sum(losses[:4])
    acts = [m for m in model.modules() if isinstance(m, BCGDActivation)]
    assert acts and any(float(m.a.detach()) != 0.1946 for m in acts)  # the resolution learned


# ---- BinaryRelax -------------------------------------------------------------------------
def test_relaxed_forward_formula_and_hard_switch() -> None:
    torch.manual_seed(0)
    inner = BinaryWeight()
    r = RelaxedWeight(inner, eta=2.5)
    w = torch.randn(6, 5).requires_grad_(True)
    y = r(w)
    q = inner(w.detach())
    assert torch.equal(y, (2.5 * q + w.detach()) / (1 + 2.5))
    y.sum().backward()
    assert torch.allclose(w.grad, torch.ones_like(w))  # identity STE of binary, as in the reference
    r.eval()
    assert torch.equal(r(w), q)  # evaluation uses hard Q by default
    assert torch.equal(r(w), r.encode(w).decode())
    r.train()
    r.set_hard(True)
    assert torch.equal(r(w), q)
    assert torch.equal(r(w), r.encode(w).decode())


def _reference_etas(eta: float, rate: float, n_batches: int, divs: int, epochs: int, m_epochs: int):
    """eta used at each step by the reference loop (train_alm1_eta_alpha)."""
    eta_step = math.ceil(n_batches / divs)
    out = []
    for epoch in range(epochs):
        if epoch == m_epochs:
            eta = 0
        for step in range(n_batches):
            if epoch < m_epochs and step % eta_step == 0:
                eta = rate * eta
            out.append(eta)
    return out


@pytest.mark.parametrize("n_batches", [7, 8, 1])
def test_binary_relax_schedule_matches_reference(n_batches: int) -> None:
    model = _model()
    cb = BinaryRelax(model, eta0=1.0, growth=1.02, per_epoch=2, steps_per_epoch=n_batches, hard_epoch=3)
    wrappers = [weight_quantizer(layer) for layer in lowbit.quantized_layers(model).values()]
    wrappers = [w for w in wrappers if w is not None]
    assert wrappers and all(isinstance(w, RelaxedWeight) for w in wrappers)
    ref = _reference_etas(1.0, 1.02, n_batches, 2, 5, 3)
    seen, hard = [], []
    step = 0
    for epoch in range(5):
        cb.on_epoch_start(None, epoch)
        for _ in range(n_batches):
            seen.append(cb.eta)
            hard.append(cb.hard)
            assert all(float(w.eta) == cb.eta and bool(w.hard) == cb.hard for w in wrappers)
            step += 1
            cb.on_step_end(None, step, {})
    relaxed_steps = 3 * n_batches
    assert seen[:relaxed_steps] == ref[:relaxed_steps]  # bit for bit: same multiplications
    assert not any(hard[:relaxed_steps]) and all(hard[relaxed_steps:])  # eta = 0 there = hard Q
    growths = 3 * math.ceil(n_batches / math.ceil(n_batches / 2))
    assert cb.eta == pytest.approx(1.02**growths)


def test_binary_relax_every_steps_and_resume() -> None:
    model = _model()
    cb = BinaryRelax(model, eta0=0.5, growth=2.0, every_steps=3, hard_epoch=None)
    etas = []
    for epoch in range(2):
        cb.on_epoch_start(None, epoch)
        for _ in range(6):  # epoch length a multiple of every_steps: no double growth
            etas.append(cb.eta)
            cb.on_step_end(None)
    assert etas == [0.5 * 2.0 ** (t // 3 + 1) for t in range(12)]
    # resume at an epoch boundary
    state = cb.state_dict()
    model2 = _model()
    cb2 = BinaryRelax(model2, eta0=0.5, growth=2.0, every_steps=3, hard_epoch=None)
    cb2.load_state_dict(state)
    for c in (cb, cb2):
        c.on_epoch_start(None, 2)
    assert cb.eta == cb2.eta == 0.5 * 2.0**5
    assert all(float(w.eta) == cb.eta for w in cb2.modules)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        BinaryRelax(_model(), per_epoch=2).on_epoch_start(None, 0)


def test_binary_relax_with_bcgd_trains_then_goes_hard() -> None:
    model = _model()
    cb = BinaryRelax(model, eta0=1.0, growth=1.5, steps_per_epoch=4, hard_epoch=3)
    opt = BCGD(_sgd(model), model, rho=1e-3)
    losses = _train(model, opt, 16, cb=cb)
    assert all(math.isfinite(v) for v in losses)
    assert cb.hard
    model.train()
    for layer in lowbit.quantized_layers(model).values():
        wq = weight_quantizer(layer)
        if wq is not None:
            latent = layer.parametrizations.weight.original
            assert torch.equal(layer.weight, wq.inner(latent))  # exactly Q(w) after the switch
    assert len(apply_binary_relax(model)) == 2  # idempotent: wrappers kept
    assert remove_binary_relax(model) == 2
    assert all(isinstance(weight_quantizer(m), BinaryWeight) for m in lowbit.quantized_layers(model).values()
               if weight_quantizer(m) is not None)
