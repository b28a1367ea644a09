"""Uniform, LSQ and WRPN quantizers: grids, closed forms, gradients, state, and training."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.quant import registry
from lowbit.quant.base import Encoded
from lowbit.quant.dorefa import DoReFaActivation
from lowbit.quant.lsq import LSQActivation, LSQWeight, lsq_grad_scale
from lowbit.quant.ste import coarse_derivative
from lowbit.quant.uniform import UniformActivation, UniformWeight, mse_clip, symmetric_quantize
from lowbit.quant.wrpn import WRPNWeight

WEIGHTS = [(UniformWeight, b) for b in UniformWeight.bits_allowed] + [
    (LSQWeight, b) for b in LSQWeight.bits_allowed
] + [(WRPNWeight, b) for b in WRPNWeight.bits_allowed]
ACTS = [(UniformActivation, b) for b in UniformActivation.bits_allowed] + [
    (LSQActivation, b) for b in LSQActivation.bits_allowed
]


def _grid_check(y: torch.Tensor, enc: Encoded) -> None:
    assert torch.equal(y, enc.decode())
    assert enc.num_levels <= 2**enc.bits
    assert int(enc.codes.min()) >= 0 and int(enc.codes.max()) < enc.num_levels
    if enc.scale.dim() == 0:
        assert y.unique().numel() <= 2**enc.bits


# ---- registry and grids ------------------------------------------------------------------
def test_registered_names() -> None:
    assert registry.get("weight", "uniform") is UniformWeight
    assert registry.get("weight", "lsq") is LSQWeight
    assert registry.get("weight", "wrpn") is WRPNWeight
    assert registry.get("activation", "uniform") is UniformActivation
    assert registry.get("activation", "lsq") is LSQActivation
    # WRPN activations are DoReFa's: no separate method.
    assert "wrpn" not in registry.names("activation")


_OPTS = [{}, {"per_channel": True}, {"scale": "mse"}, {"per_channel": True, "scale": "mse"},
         {"per_channel": True, "scale": "max"}]


def _valid(cls: type, opts: dict) -> bool:
    if set(opts) - set(registry.options(cls)):
        return False
    # WRPN's default unit range has no scale to share per channel (refused, tested below)
    return not (cls is WRPNWeight and opts == {"per_channel": True})


@pytest.mark.parametrize(
    ("cls", "bits", "opts"), [(c, b, o) for c, b in WEIGHTS for o in _OPTS if _valid(c, o)]
)
@pytest.mark.parametrize("shape", [(7, 5), (6, 3, 3, 3), (4, 1, 3, 3)])
def test_weight_forward_is_encoding(cls: type, bits: int, shape: tuple[int, ...], opts: dict) -> None:
    torch.manual_seed(bits)
    q = cls(bits, **opts)
    w = torch.randn(shape) * 0.3
    q.initialize(w)
    y = q(w)
    assert y.shape == w.shape and y.dtype == w.dtype
    _grid_check(y, q.encode(w))
    if opts.get("per_channel"):
        for c in range(shape[0]):
            assert y[c].unique().numel() <= 2**bits


@pytest.mark.parametrize(("cls", "bits"), ACTS)
def test_activation_forward_is_encoding(cls: type, bits: int) -> None:
    torch.manual_seed(bits)
    q = cls(bits)
    x = torch.randn(4, 3, 5, 5) * 2
    q.train()
    y = q(x)
    _grid_check(y, q.encode(x))
    q.eval()
    y = q(x * 1.5)
    _grid_check(y, q.encode(x * 1.5))
    assert y.min() >= 0


def test_bits_allowed() -> None:
    for cls in (UniformWeight, LSQWeight, WRPNWeight):
        with pytest.raises(ValueError, match="allowed"):
            cls(1)  # 1-bit symmetric grids are degenerate (Q_P = 0 / n = 0)
    with pytest.raises(ValueError, match="scale"):
        UniformWeight(4, scale="median")
    with pytest.raises(ValueError, match="grad_scale"):
        LSQWeight(4, grad_scale=-1.0)
    with pytest.raises(lowbit.RecipeError, match="wrpn"):
        lowbit.Recipe.from_dict({"default": {"activation": {"method": "wrpn", "bits": 2}}})


# ---- uniform -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_weight_max_closed_form_and_identity_ste(bits: int) -> None:
    torch.manual_seed(0)
    w = (torch.randn(6, 4, 3, 3) * 0.2).requires_grad_(True)
    Q = 2 ** (bits - 1) - 1
    y = UniformWeight(bits)(w)
    s = w.detach().abs().max() / Q
    assert torch.equal(y, torch.clamp(torch.round(w.detach() / s), -Q, Q) * s)
    assert y.unique().numel() <= 2 * Q + 1
    yc = UniformWeight(bits, per_channel=True)(w)
    sc = w.detach().abs().amax(dim=(1, 2, 3), keepdim=True) / Q
    assert torch.equal(yc, torch.clamp(torch.round(w.detach() / sc), -Q, Q) * sc)
    g = torch.randn_like(w)
    (y * g).sum().backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("per_channel", [False, True])
def test_uniform_mse_scale_matches_brute_force(per_channel: bool) -> None:
    torch.manual_seed(1)
    w = torch.randn(5, 40) * torch.tensor([0.1, 0.5, 1.0, 2.0, 0.3])[:, None]
    w[0, 0] = 3.0  # an outlier: the mse clip is well below max|w|
    bits, Q, grid = 3, 3, 50
    clip = mse_clip(w, Q, grid, per_channel)
    rows = [w[c] for c in range(5)] if per_channel else [w]
    for i, r in enumerate(rows):
        m = r.abs().max()
        errs = [((r - symmetric_quantize(r, m * (k / grid) / Q, Q)) ** 2).sum() for k in range(1, grid + 1)]
        best = min(range(grid), key=lambda k: (float(errs[k]), -k))  # ties: larger clip
        c = clip.reshape(-1)[i]
        assert torch.equal(c, m * ((best + 1) / grid))
    q_mse, q_max = UniformWeight(bits, per_channel, scale="mse"), UniformWeight(bits, per_channel)
    err_mse = ((q_mse(w) - w) ** 2).sum()
    err_max = ((q_max(w) - w) ** 2).sum()
    assert err_mse < err_max
    assert (clip.reshape(-1) < (w.abs().amax(1) if per_channel else w.abs().max())).any()


def test_uniform_activation_running_max_and_state() -> None:
    torch.manual_seed(0)
    q = UniformActivation(4, momentum=0.25)
    x1, x2 = torch.rand(8, 10) * 2, torch.rand(8, 10) * 4
    q.eval()
    q(x1)  # eval before training: batch statistics, nothing stored
    assert not bool(q.initialized) and float(q.running_max) == 0.0
    q.train()
    q(x1)
    assert bool(q.initialized) and torch.equal(q.running_max, x1.max())
    q(x2)
    expect = x1.max() * 0.75 + x2.max() * 0.25
    assert torch.allclose(q.running_max, expect)
    q.eval()
    before = q.running_max.clone()
    y = q(x2 * 10)
    assert torch.equal(q.running_max, before)  # eval does not update
    s = before / 15
    assert torch.equal(y, torch.clamp(torch.round(x2 * 10 / s), 0, 15) * s)
    # state_dict round trip
    q2 = UniformActivation(4, momentum=0.25)
    q2.load_state_dict(q.state_dict())
    q2.eval()
    assert bool(q2.initialized) and torch.equal(q2(x1), q(x1))


@pytest.mark.parametrize("ste", ["identity", "relu", "clipped_relu"])
def test_uniform_activation_clip_and_coarse_gradient(ste: str) -> None:
    x = torch.linspace(-1.0, 3.0, 401).requires_grad_(True)
    q = UniformActivation(2, ste=ste, clip=2.0)
    y = q(x)
    assert torch.equal(y, torch.clamp(torch.round(x.detach() / (2.0 / 3)), 0, 3) * (2.0 / 3))
    assert float(q.running_max) == 0.0  # a fixed clip keeps no statistics
    y.sum().backward()
    assert torch.equal(x.grad, coarse_derivative(x.detach(), ste, 2.0))


# ---- LSQ ---------------------------------------------------------------------------------
def _lsq_reference(v: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> tuple[torch.Tensor, ...]:
    """v_hat, d v_hat/dv and d v_hat/ds elementwise, straight from the paper's equations."""
    x = v / s
    vhat = torch.round(torch.clamp(x, -qn, qp)) * s
    inside = (x > -qn) & (x < qp)
    dv = inside.to(v.dtype)
    ds = torch.where(inside, torch.round(x) - x, torch.where(x <= -qn, float(-qn), float(qp)))
    return vhat, dv, ds


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_weight_forward_and_gradients_closed_form(bits: int) -> None:
    torch.manual_seed(bits)
    q = LSQWeight(bits)
    w = torch.randn(8, 3, 3, 3) * 0.2
    q.initialize(w)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    s0 = 2 * w.abs().mean() / math.sqrt(qp)
    assert torch.allclose(q.s.detach(), s0)
    w.requires_grad_(True)
    c = torch.randn_like(w)  # loss = sum(c * v_hat): d/dv_hat = c
    y = q(w)
    (y * c).sum().backward()
    vhat, dv, ds = _lsq_reference(w.detach(), q.s.detach(), qn, qp)
    assert torch.equal(y, vhat)
    assert torch.equal(w.grad, c * dv)  # the indicator, exactly
    g = 1 / math.sqrt(w.numel() * qp)
    assert math.isclose(q.g(w), g)
    expect_s = g * (c * ds).sum()
    assert torch.allclose(q.s.grad, expect_s, rtol=1e-5, atol=1e-7)
    assert y.unique().numel() <= 2**bits


def test_lsq_grad_scale_one_and_per_channel() -> None:
    torch.manual_seed(0)
    bits, qn, qp = 3, 4, 3
    w = torch.randn(5, 4, 3, 3) * 0.3
    q = LSQWeight(bits, per_channel=True, grad_scale=1.0)
    q.initialize(w)
    assert q.s.shape == (5, 1, 1, 1)
    assert torch.allclose(q.s.detach(), 2 * w.abs().mean((1, 2, 3), keepdim=True) / math.sqrt(qp))
    with torch.no_grad():  # make some values clip on both sides
        q.s.mul_(torch.tensor([0.3, 0.6, 1.0, 1.5, 2.0]).view(5, 1, 1, 1))
    c = torch.randn_like(w)
    (q(w) * c).sum().backward()
    vhat, _, ds = _lsq_reference(w, q.s.detach(), qn, qp)
    assert torch.equal(q(w), vhat)
    assert torch.allclose(q.s.grad, (c * ds).sum((1, 2, 3), keepdim=True), rtol=1e-5, atol=1e-6)
    assert (ds == -qn).any() and (ds == qp).any()
    # The default scale is 1/sqrt(N_channel * Q_P) per channel.
    assert math.isclose(LSQWeight(bits, per_channel=True).g(w), lsq_grad_scale(4 * 9, qp))


def test_lsq_activation_lazy_init_and_state_round_trip() -> None:
    torch.manual_seed(0)
    bits, qp = 2, 3
    q = LSQActivation(bits)
    x = torch.relu(torch.randn(16, 6, 4, 4)) * 1.3
    q.eval()
    y0 = q(x)  # never trained: the initial step of this batch, not stored
    assert not bool(q.initialized) and float(q.s.detach()) == 1.0
    q.train()
    xr = x.clone().requires_grad_(True)
    y = q(xr)
    s0 = 2 * x.abs().mean() / math.sqrt(qp)
    assert bool(q.initialized) and torch.allclose(q.s.detach(), s0)
    assert torch.equal(y, y0)
    c = torch.randn_like(x)
    (y * c).sum().backward()
    vhat, dv, ds = _lsq_reference(x, q.s.detach(), 0, qp)
    assert torch.equal(y, vhat)
    assert torch.equal(xr.grad, c * dv)
    g = 1 / math.sqrt(x[0].numel() * qp)
    assert torch.allclose(q.s.grad, g * (c * ds).sum(), rtol=1e-5)
    # round trip: the new module is initialized and does not re-initialize on a new batch
    with torch.no_grad():
        q.s.fill_(0.37)
    q2 = LSQActivation(bits)
    q2.load_state_dict(q.state_dict())
    q2.train()
    assert bool(q2.initialized)
    assert torch.equal(q2(x * 3), q(x * 3))
    assert float(q2.s.detach()) == pytest.approx(0.37)


def test_lsq_per_channel_state_loads_into_fresh_quantizer() -> None:
    w = torch.randn(4, 6)
    a = LSQWeight(4, per_channel=True)
    a.initialize(w)
    b = LSQWeight(4, per_channel=True)  # not initialized: scalar step
    b.load_state_dict(a.state_dict())
    assert b.s.shape == (4, 1) and torch.equal(b(w), a(w))


# ---- WRPN --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_wrpn_formula_levels_and_gradient(bits: int) -> None:
    n = 2 ** (bits - 1) - 1
    w = torch.linspace(-1.6, 1.6, 641).requires_grad_(True)
    y = WRPNWeight(bits)(w)
    assert torch.equal(y, torch.round(n * w.detach().clamp(-1, 1)) / n)
    assert y.unique().numel() == 2 * n + 1 <= 2**bits
    y.sum().backward()
    assert torch.equal(w.grad, (w.detach().abs() <= 1).float())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_wrpn_scaled_range(bits: int, per_channel: bool) -> None:
    """scale="max"/"mse": the unit-range formula applied to w / c, c the uniform quantizer's clip;
    the same values as ``uniform`` and the WRPN clip gradient 1[|w| <= c]."""
    n = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(6, 40, generator=g) * 0.05).requires_grad_(True)
    for scale in ("max", "mse"):
        q = WRPNWeight(bits, scale=scale, per_channel=per_channel)
        c = q.clip(w)
        if scale == "max":
            ref_c = w.detach().abs().amax(1, keepdim=True) if per_channel else w.detach().abs().max()
            assert torch.equal(c, ref_c)
        else:
            assert torch.equal(c, mse_clip(w, n, 100, per_channel))
        y = q(w)
        expected = c * (torch.round(n * torch.clamp(w.detach() / c, -1, 1)) / n)
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-7)
        uni = UniformWeight(bits, per_channel=per_channel, scale=scale)
        assert torch.equal(y, uni(w))
        _grid_check(y, q.encode(w))
        w.grad = None
        y.sum().backward()
        assert torch.equal(w.grad, (w.detach().abs() <= c).float())
        if scale == "mse" and bits <= 3:  # the mse clip cuts the tails: some weights get no gradient
            assert (w.grad == 0).any()
    # the unit range zeroes these small weights: the failure the option exists for
    assert torch.count_nonzero(WRPNWeight(2)(w)) == 0


def test_wrpn_options_refused() -> None:
    with pytest.raises(ValueError, match="per_channel=true needs scale"):
        WRPNWeight(2, per_channel=True)
    with pytest.raises(ValueError, match="allowed: unit, max, mse"):
        WRPNWeight(2, scale="minmax")
    with pytest.raises(lowbit.RecipeError, match="scale"):
        lowbit.Recipe.from_dict({"default": {"weight": {"method": "wrpn", "bits": 2, "scale": "nope"}}})


def test_wrpn_activation_is_dorefa() -> None:
    x = torch.linspace(-0.5, 1.5, 201)
    for k in (1, 2, 4):
        n = 2**k - 1
        assert torch.equal(DoReFaActivation(k)(x), torch.round(n * x.clamp(0, 1)) / n)


# ---- through lowbit.quantize -------------------------------------------------------------
class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0).long()
    return x, y


@pytest.mark.parametrize(
    ("weight", "act"),
    [
        ({"method": "uniform", "bits": 4}, {"method": "uniform", "bits": 4}),
        ({"method": "uniform", "bits": 3, "scale": "mse", "per_channel": True},
         {"method": "uniform", "bits": 2, "clip": 2.0, "ste": "relu"}),
        ({"method": "lsq", "bits": 2}, {"method": "lsq", "bits": 2}),
        ({"method": "lsq", "bits": 4, "per_channel": True}, {"method": "lsq", "bits": 3}),
        ({"method": "wrpn", "bits": 2}, {"method": "dorefa", "bits": 2}),
        ({"method": "wrpn", "bits": 2, "scale": "mse", "per_channel": True}, {"method": "dorefa", "bits": 4}),
    ],
)
def test_quantize_and_train_small_model(weight: dict, act: dict) -> None:
    torch.manual_seed(0)
    recipe = {"default": {"weight": weight, "activation": act},
              "rules": [{"match": "@first", "activation": None}]}
    model = lowbit.quantize(SmallNet(), recipe)
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-4:]) < losses[0]
    model.eval()
    for name, layer in lowbit.quantized_layers(model).items():
        wq = lowbit.nn.weight_quantizer(layer)
        latent = layer.parametrizations.weight.original
        assert torch.equal(layer.weight, wq.encode(latent).decode()), name
        aq = lowbit.nn.input_quantizer(layer)
        if aq is not None:
            inp = torch.relu(torch.randn(2, *([8, 8, 8] if name == "conv2" else [128])))
            _grid_check(aq(inp), aq.encode(inp))


# ---- signed activation grids (issue 8, defect 2) ------------------------------------------
from lowbit.quant import fused  # noqa: E402
from lowbit.quant.base import NegativeInputWarning  # noqa: E402
from lowbit.quant.lsq import lsq_quantize  # noqa: E402
from lowbit.quant.pact import PACTActivation  # noqa: E402

SIGNED = [(cls, b) for cls in (LSQActivation, UniformActivation, PACTActivation) for b in (2, 3, 4, 8)]


@pytest.mark.parametrize("cls,bits", SIGNED)
@pytest.mark.parametrize("training", [True, False])
def test_signed_activation_grid_and_encoding(cls: type, bits: int, training: bool) -> None:
    torch.manual_seed(bits)
    q = cls(bits, signed=True) if cls is not PACTActivation else cls(bits, alpha_init=2.0, signed=True)
    assert q.signed is True and cls(bits).signed is False
    q.train(training)
    x = torch.randn(4, 33) * 1.5
    x[0, :2] = torch.tensor([100.0, -100.0])  # beyond the clip on both sides
    y = q(x).detach()
    enc = q.encode(x)
    assert torch.equal(y, enc.decode())  # encode().decode() == forward, bit for bit
    top = 2 ** (bits - 1) - 1
    assert torch.equal(enc.levels, torch.arange(-top, top + 1, dtype=x.dtype))
    k = enc.levels[enc.codes.long()]  # y = k * step (checked above), k integer in -top..top
    assert int(k.min()) == -top and int(k.max()) == top  # both ends of the grid are used
    assert bool((y < 0).any())  # negative inputs keep their sign
    # Nearest grid point inside the clip range: error at most half a step.
    s = enc.scale
    inside = x.abs() <= top * s
    assert float((y - x)[inside].abs().max()) <= float(s) / 2 * (1 + 1e-6)


def test_signed_grid_beats_unsigned_on_signed_inputs() -> None:
    """Inputs half negative (as in transformers): a signed 4-bit grid keeps them, unsigned zeroes half."""
    torch.manual_seed(0)
    x = torch.randn(64, 128)
    w = torch.randn(32, 128) / 128**0.5
    ref = x @ w.t()
    errs = {}
    for signed in (False, True):
        q = LSQActivation(4, signed=signed)
        q.train()
        with pytest.warns(NegativeInputWarning) if not signed else _no_warning():
            xq = q(x)
        errs[signed] = float((xq.detach() @ w.t() - ref).norm() / ref.norm())
    assert errs[True] < 0.2 < errs[False]


@contextlib.contextmanager
def _no_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", NegativeInputWarning)
        yield


@pytest.mark.parametrize("bits", [2, 4])
def test_signed_lsq_gradients_and_fused_loop(bits: int) -> None:
    torch.manual_seed(0)
    q = LSQActivation(bits, signed=True)
    assert (q.q_n, q.q_p) == (2 ** (bits - 1) - 1, 2 ** (bits - 1) - 1)
    x = (torch.randn(3, 50) * 2).requires_grad_()
    s = torch.tensor(0.4, requires_grad=True)
    g = q.g(x)
    y = lsq_quantize(x, s, q.q_n, q.q_p, g)
    gy = torch.randn_like(y)
    gx, gs = torch.autograd.grad(y, (x, s), gy)
    v = x.detach() / 0.4
    inside = (v > -q.q_n) & (v < q.q_p)
    assert torch.equal(gx, gy * inside)
    d = torch.where(inside, torch.round(v) - v, torch.where(v <= -q.q_n, -float(q.q_n), float(q.q_p)))
    torch.testing.assert_close(gs, (gy * d).sum() * g)
    if not fused.available():
        pytest.skip("numba not installed: the fused loop is not used")
    yf = fused.lsq(x, s, q.q_n, q.q_p, g)  # the fused loop takes the signed bounds as they are
    gxf, gsf = torch.autograd.grad(yf, (x, s), gy)
    assert torch.equal(yf, y) and torch.equal(gxf, gx)
    torch.testing.assert_close(gsf, gs)


@pytest.mark.parametrize("ste", ["identity", "clipped_relu"])
def test_signed_uniform_running_abs_max_and_gradient(ste: str) -> None:
    q = UniformActivation(4, ste=ste, signed=True)
    q.train()
    x = torch.tensor([[-3.0, -1.0, 0.2, 2.0]], requires_grad=True)
    q(x)
    assert float(q.running_max) == 3.0  # max |x|
    q.eval()
    x2 = torch.tensor([[-5.0, -1.0, 0.2, 4.0]], requires_grad=True)
    y = q(x2)
    assert float(y.detach().min()) == -3.0 and float(y.detach().max()) == 3.0  # clipped to +-c, c = 3
    (g,) = torch.autograd.grad(y.sum(), x2)
    want = [1.0, 1.0, 1.0, 1.0] if ste == "identity" else [0.0, 1.0, 1.0, 0.0]
    assert g.tolist() == [want]


def test_signed_pact_gradients() -> None:
    q = PACTActivation(4, alpha_init=1.0, signed=True)  # Q = 7, step 1/7
    x = torch.tensor([-2.0, -3.0, -0.5, 0.3, 1.5], requires_grad=True)
    y = q(x)
    assert y.detach().tolist() == pytest.approx([-1.0, -1.0, -4 / 7, 2 / 7, 1.0])  # round(-3.5) = -4
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert float(q.alpha.grad) == -1.0  # sum of 1[x >= alpha] - 1[x <= -alpha]


@pytest.mark.parametrize("raw,hint", [
    ({"method": "lsq", "bits": 1, "signed": True}, "bits >= 2"),
    ({"method": "uniform", "bits": 4, "signed": True, "ste": "relu"}, "ste='relu'"),
    ({"method": "dorefa", "bits": 4, "signed": True}, "signed"),
    ({"method": "lsq", "bits": 4, "signed": "yes"}, "true or false"),
])
def test_signed_option_refused_where_meaningless(raw: dict, hint: str) -> None:
    with pytest.raises(lowbit.RecipeError, match=hint):
        lowbit.Recipe.from_dict({"default": {"activation": raw}})


@pytest.mark.parametrize("method", ["lsq", "uniform", "pact", "dorefa", "bcgd"])
def test_unsigned_quantizer_warns_once_naming_the_layer(method: str) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    lowbit.quantize(model, {"default": {"activation": {"method": method, "bits": 4}},
                            "rules": [{"match": "0", "activation": None}]})
    model.train()
    x = torch.randn(64, 8)
    with pytest.warns(NegativeInputWarning, match=r"layer '1'.*of its inputs are negative") as rec:
        model(x)
        model(x)
    assert len([w for w in rec if issubclass(w.category, NegativeInputWarning)]) == 1
    if method in ("lsq", "uniform", "pact"):
        signed = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
        lowbit.quantize(signed, {"default": {"activation": {"method": method, "bits": 4, "signed": True}},
                                 "rules": [{"match": "0", "activation": None}]})
        signed.train()
        with _no_warning():
            signed(x)
