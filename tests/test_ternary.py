"""Ternary and power-of-two weight quantizers: ternary_stat (+ residual expansion), TTQ, TGA, LBW.

Closed forms, brute force, Monte Carlo and finite differences; every quantizer's forward is its
decoded encoding bit for bit, and each trains through ``lowbit.quantize``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import Recipe, RecipeError
from lowbit.nn import weight_quantizer
from lowbit.quant import registry
from lowbit.quant.base import Encoded
from lowbit.quant.lbw import (  # importing the four modules registers them
    DEFAULT_C,
    LBWWeight,
    optimal_ternary_rows,
    pow2_codes,
    pow2_count,
    pow2_cuts,
    pow2_levels,
    ternary_objective,
)
from lowbit.quant.ternary_stat import TernaryStatWeight, stat_ternary_branch, stat_ternary_expansion
from lowbit.quant.tga import TGAWeight, tga_codes, truncated_normal_mean, weight_stats
from lowbit.quant.ttq import TTQWeight, ttq_quantize

SHAPES = [(10, 20), (8, 4, 3, 3), (6, 1, 3, 3), (4, 3, 5)]

CONFIGS = [  # (method, bits, options)
    ("ternary_stat", 2, {}),
    ("ternary_stat", 2, {"per_channel": True}),
    ("ternary_stat", 2, {"expansion": [0.05, 0.1]}),
    ("ternary_stat", 2, {"expansion": [0.05, 0.1, 0.2, 0.4], "per_channel": True}),
    ("ttq", 2, {}),
    ("ttq", 2, {"init": "mean"}),
    ("tga", 2, {}),
    ("tga", 2, {"per_channel": True}),
    *[("lbw", b, {}) for b in range(2, 9)],
    *[("lbw", b, {"per_channel": True}) for b in (2, 3, 4, 6)],
]


def _ids(cfg: tuple) -> str:
    m, b, o = cfg
    return f"{m}-w{b}" + "".join(f"-{k}={v}" for k, v in o.items())


def _make(method: str, bits: int, opts: dict, w: torch.Tensor) -> torch.nn.Module:
    q = registry.create("weight", method, bits, **opts)
    q.initialize(w)
    return q


def _check_grid(y: torch.Tensor, enc: Encoded, per_channel: bool) -> None:
    assert torch.equal(y, enc.decode())
    for e in (enc, *enc.branches):
        assert e.bits == enc.bits
        assert e.num_levels <= 2**e.bits
        assert e.codes.dtype == torch.uint8
        assert int(e.codes.min()) >= 0 and int(e.codes.max()) < e.num_levels
        assert e.codes.shape == y.shape
    m = 1 + len(enc.branches)
    rows = y.reshape(y.shape[0], -1) if per_channel else y.reshape(1, -1)
    for r in rows:  # per branch at most num_levels values, so at most prod over branches in the sum
        assert r.unique().numel() <= enc.num_levels**m


# ---- shared contract ---------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_is_decoded_encoding(cfg: tuple, shape: tuple[int, ...]) -> None:
    method, bits, opts = cfg
    for seed in range(3):
        torch.manual_seed(seed)
        w = torch.randn(shape) * 0.1
        q = _make(method, bits, opts, w)
        y = q(w)
        assert y.shape == w.shape and y.dtype == w.dtype
        _check_grid(y, q.encode(w), bool(opts.get("per_channel")))


@pytest.mark.parametrize("method", ["ternary_stat", "ttq", "tga", "lbw"])
def test_registered_and_options(method: str) -> None:
    assert method in registry.names("weight")
    cls = registry.get("weight", method)
    assert "per_channel" in registry.options(cls)
    assert cls.kind == "weight"


# ---- ternary_stat --------------------------------------------------------------------------------


def test_ternary_stat_closed_form() -> None:
    w = torch.tensor([1.0, -0.05, 0.05, 0.01, -0.3, 0.6, -0.049, 0.0])
    delta = 0.05 * 1.0  # 0.05 * max|w|; |w| >= Delta is kept (reference: ge)
    keep = w.abs() >= delta
    alpha = w.abs()[keep].mean()
    expected = torch.sign(w) * keep * alpha
    q = TernaryStatWeight()
    assert torch.allclose(q(w), expected, rtol=1e-6, atol=0)
    assert q.encode(w).codes.tolist() == [2, 0, 2, 1, 0, 2, 1, 1]
    # Threshold factor option and per-channel statistics.
    w2 = torch.randn(5, 12)
    y = TernaryStatWeight(threshold=0.3, per_channel=True)(w2)
    for c in range(5):
        row = w2[c]
        k = row.abs() >= 0.3 * row.abs().max()
        assert torch.allclose(y[c], torch.sign(row) * k * row.abs()[k].mean())


def test_ternary_stat_gradient_clip() -> None:
    torch.manual_seed(0)
    w = (torch.randn(6, 5, 3, 3) * 0.8).requires_grad_(True)
    assert bool((w.abs() >= 1).any())
    g = torch.randn_like(w)
    (TernaryStatWeight()(w) * g).sum().backward()
    assert torch.equal(w.grad, g * (w.detach().abs() < 1.0))
    for opts in ({"clip_grad": None}, {"clip_grad": None, "expansion": [0.05, 0.1, 0.3]}):
        w2 = w.detach().clone().requires_grad_(True)
        (TernaryStatWeight(**opts)(w2) * g).sum().backward()
        assert torch.equal(w2.grad, g)  # identity STE, also for the residual sum
    w3 = w.detach().clone().requires_grad_(True)
    (TernaryStatWeight(clip_grad=0.5, expansion=[0.05, 0.1])(w3) * g).sum().backward()
    assert torch.equal(w3.grad, g * (w3.detach().abs() < 0.5))


@pytest.mark.parametrize("per_channel", [False, True])
def test_residual_expansion_never_increases_error(per_channel: bool) -> None:
    factors = [0.05, 0.1, 0.2, 0.3, 0.5]
    for seed in range(20):
        torch.manual_seed(seed)
        shape = [(16, 8, 3, 3), (32, 64), (4, 1, 5, 5)][seed % 3]
        w = torch.randn(shape, dtype=torch.float64) * (0.05 + 0.1 * seed)
        if seed % 2:
            w = w**3  # heavy tails
        errs = [w.norm()]
        for m in range(1, len(factors) + 1):
            q = TernaryStatWeight(expansion=factors[:m], per_channel=per_channel)
            errs.append((w - q(w)).norm())
        for a, b in itertools.pairwise(errs):
            assert b <= a + 1e-12
        assert errs[2] < errs[1]  # a second branch does help on generic weights
        if not per_channel:  # the reference's parallel sum T_0.05(w) + T_0.1(w) is worse
            par = TernaryStatWeight(threshold=0.05)(w) + TernaryStatWeight(threshold=0.1)(w)
            assert errs[2] < (w - par).norm()


def test_residual_branches_definition() -> None:
    torch.manual_seed(1)
    w = torch.randn(8, 3, 3, 3)
    q = TernaryStatWeight(expansion=[0.05, 0.1])
    enc = q.encode(w)
    assert len(enc.branches) == 1 and q.n_branches == 2 and q.effective_bits == 4
    c1, a1 = stat_ternary_branch(w, 0.05, False)
    b1 = (c1.to(w.dtype) - 1) * a1
    c2, a2 = stat_ternary_branch(w - b1, 0.1, False)
    assert torch.equal(enc.codes, c1) and torch.equal(enc.scale, a1)
    assert torch.equal(enc.branches[0].codes, c2) and torch.equal(enc.branches[0].scale, a2)
    assert torch.allclose(q(w), b1 + (c2.to(w.dtype) - 1) * a2)
    assert len(stat_ternary_expansion(w, [0.05, 0.1, 0.2, 0.4], False)) == 4
    assert TernaryStatWeight(expansion=[0.05, 0.1, 0.2, 0.4]).effective_bits == 8
    assert TernaryStatWeight().effective_bits == 2
    # Up to 3^m distinct values for m branches, more than a single ternary.
    assert 3 < q(w).unique().numel() <= 9


def test_ternary_stat_bad_options() -> None:
    for bad in ({"expansion": []}, {"expansion": [0.0, 0.1]}, {"expansion": "tex2"}, {"threshold": 0},
                {"clip_grad": -1.0}, {"expansion": [0.05, 2.0]}):
        with pytest.raises(ValueError, match="ternary_stat"):
            TernaryStatWeight(**bad)
    with pytest.raises(RecipeError, match="expansion"):
        Recipe.from_dict({"default": {"weight": {"method": "ternary_stat", "bits": 2, "expansion": [-1]}}})


# ---- TTQ -----------------------------------------------------------------------------------------


def test_ttq_forward_and_gradients_closed_form() -> None:
    torch.manual_seed(0)
    w = (torch.randn(6, 4, 3, 3, dtype=torch.float64) * 0.2).requires_grad_(True)
    q = TTQWeight().double()
    with torch.no_grad():
        q.w_p.fill_(1.3)
        q.w_n.fill_(0.7)
    y = q(w)
    wd = w.detach()
    delta = 0.05 * wd.abs().max()
    ip, in_ = wd > delta, wd < -delta
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert torch.equal(y, torch.where(ip, f64(1.3), torch.where(in_, f64(-0.7), f64(0.0))))
    g = torch.randn_like(wd)
    (y * g).sum().backward()
    assert torch.allclose(q.w_p.grad, g[ip].sum())
    assert torch.allclose(q.w_n.grad, -g[in_].sum())  # level is -W_n
    assert torch.equal(w.grad, g * torch.where(ip, f64(1.3), torch.where(in_, f64(0.7), f64(1.0))))
    enc = q.encode(wd)
    assert enc.levels.tolist() == [-0.7, 0.0, 1.3] and float(enc.scale) == 1.0


def test_ttq_gradcheck_scales() -> None:
    torch.manual_seed(2)
    w = torch.randn(5, 7, dtype=torch.float64)
    delta = 0.05 * w.abs().max()
    wp = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    wn = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ttq_quantize(w, a, b, delta), (wp, wn))


def test_ttq_init_and_state() -> None:
    torch.manual_seed(3)
    w = torch.randn(8, 4, 3, 3) * 0.1 + 0.01
    q = TTQWeight(init="mean")
    q.initialize(w)
    delta = 0.05 * w.abs().max()
    assert torch.allclose(q.w_p.detach(), w[w > delta].mean())
    assert torch.allclose(q.w_n.detach(), w[w < -delta].abs().mean())
    assert float(TTQWeight().w_p.detach()) == 1.0 and float(TTQWeight(init=0.5).w_n.detach()) == 0.5
    sd = q.state_dict()
    assert {"w_p", "w_n", "initialized"} <= set(sd)
    q2 = TTQWeight(init="mean")
    q2.load_state_dict(sd)
    assert torch.equal(q2(w), q(w))
    # Lazy: without initialize(), the first forward initialises from the data.
    q3 = TTQWeight(init="mean")
    assert torch.equal(q3(w), q(w))


def test_ttq_rejects_per_channel_and_bad_init() -> None:
    with pytest.raises(ValueError, match="per_channel"):
        TTQWeight(per_channel=True)
    with pytest.raises(ValueError, match="init"):
        TTQWeight(init="zeros")
    with pytest.raises(ValueError, match="init"):
        TTQWeight(init=-1.0)
    with pytest.raises(RecipeError, match="per_channel"):
        Recipe.from_dict({"default": {"weight": {"method": "ttq", "bits": 2, "per_channel": True}}})


# ---- TGA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mu", "sigma", "delta"), [(0.0, 0.1, 0.005), (0.01, 0.1, 0.05), (-0.02, 0.05, 0.1),
                                                    (0.003, 0.2, 0.3)])
def test_tga_alpha_is_truncated_normal_mean(mu: float, sigma: float, delta: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x = mu + sigma * torch.randn(10**6, generator=gen, dtype=torch.float64)
    tail = x[x > mu + delta]
    mc = tail.mean()
    se = tail.std() / math.sqrt(tail.numel())
    f64 = torch.float64
    alpha = truncated_normal_mean(torch.tensor(mu, dtype=f64), torch.tensor(sigma, dtype=f64),
                                  torch.tensor(delta, dtype=f64))
    assert abs(float(alpha - mc)) < 1e-3  # three decimals
    assert abs(float(alpha - mc)) < 5 * float(se)


def test_tga_quantizer_scale_matches_weights_tail() -> None:
    # On Gaussian weights the scale is the empirical mean of the weights above mu + delta.
    torch.manual_seed(0)
    w = torch.randn(256, 256, 3, 3, dtype=torch.float64) * 0.05 + 0.002
    q = TGAWeight().double()
    q.initialize(w)
    with torch.no_grad():
        mu, delta_c, alpha = q.params(w)
    assert float(delta_c) == pytest.approx(0.05 * float(w.abs().max()))
    assert float(alpha) == pytest.approx(float(w[w > mu + delta_c].mean()), rel=2e-3)
    y = q(w)
    assert set(y.unique().tolist()) <= {-float(alpha), 0.0, float(alpha)}
    assert torch.equal(q.encode(w).codes, tga_codes(w, mu, delta_c))


def test_tga_gradients() -> None:
    torch.manual_seed(4)
    w = (torch.randn(8, 4, 3, 3, dtype=torch.float64) * 0.1).requires_grad_(True)
    g = torch.randn_like(w)
    q = TGAWeight().double()
    q.initialize(w.detach())
    with torch.no_grad():
        q.delta.fill_(0.061)
    (q(w) * g).sum().backward()
    assert torch.equal(w.grad, g)  # identity STE on the weight path

    # delta's gradient equals a finite difference of the loss (pattern unchanged at delta +- h).
    def loss(d: float) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            q.delta.fill_(d)
            return float((q(w.detach()) * g).sum()), q.encode(w.detach()).codes

    h = 1e-7
    lp, cp = loss(0.061 + h)
    lm, cm = loss(0.061 - h)
    assert torch.equal(cp, cm)
    fd = (lp - lm) / (2 * h)
    assert float(q.delta.grad) == pytest.approx(fd, rel=1e-5)
    # ... and the closed form  sum(g t) * lambda(d) (lambda(d) - d).
    _, sigma = weight_stats(w.detach(), False)
    d = 0.061 / sigma
    lam = torch.exp(-0.5 * d * d) / math.sqrt(2 * math.pi) / (0.5 * torch.special.erfc(d / math.sqrt(2)))
    t = cp.to(torch.float64) - 1
    assert float(q.delta.grad) == pytest.approx(float((g * t).sum() * lam * (lam - d)), rel=1e-9)
    # Smooth in (mu, sigma, delta): gradcheck of the scale formula.
    args = tuple(torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.01, 0.2, 0.13))
    assert torch.autograd.gradcheck(truncated_normal_mean, args)


def test_tga_clip_and_negative_delta() -> None:
    torch.manual_seed(5)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64) * 0.1
    q = TGAWeight().double()
    q.initialize(w)
    _, sigma = weight_stats(w, False)
    with torch.no_grad():
        q.delta.fill_(10.0)
    y = q(w)
    _, delta_c, _ = q.params(w)
    assert torch.allclose(delta_c, 3 * sigma)
    y.sum().backward()
    assert float(q.delta.grad) == 0.0  # clipped: no gradient
    with torch.no_grad():
        q.delta.fill_(0.02)
        y_pos = q(w)
        q.delta.fill_(-0.02)  # |delta| is used, as in the reference
        y_neg = q(w)
    assert torch.equal(y_pos, y_neg)
    with torch.no_grad():
        _, dc, _ = q.params(w)
    assert float(dc) == pytest.approx(0.02)


def test_tga_per_channel_state() -> None:
    torch.manual_seed(6)
    w = torch.randn(8, 4, 3, 3) * 0.1
    q = TGAWeight(per_channel=True)
    q.initialize(w)
    assert q.delta.shape == (8,)
    assert torch.allclose(q.delta.detach(), 0.05 * w.abs().amax(dim=(1, 2, 3)))
    y = q(w)
    for c in range(8):
        assert y[c].unique().numel() <= 3
    g = torch.randn_like(w)
    (y * g).sum().backward()
    assert q.delta.grad.shape == (8,) and bool((q.delta.grad != 0).any())
    # A fresh (uninitialised) module takes the per-channel shape from the state dict.
    q2 = TGAWeight(per_channel=True)
    q2.load_state_dict(q.state_dict())
    assert bool(q2.initialized) and torch.equal(q2(w), q(w))


# ---- LBW -----------------------------------------------------------------------------------------


def _brute_force_ternary(w: torch.Tensor) -> float:
    n = w.numel()
    pats = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=n)), dtype=w.dtype)
    nq = (pats * pats).sum(1)
    dot = pats @ w
    obj = (w * w).sum() - torch.where(nq > 0, dot * dot / nq.clamp_min(1), torch.zeros_like(dot))
    return float(obj.min())


def test_lbw_ternary_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    cases = 0
    for n in range(1, 9):
        for seed in range(30 if n < 8 else 12):
            w = torch.randn(n, generator=gen, dtype=torch.float64) * (0.1 + seed)
            if seed % 5 == 1:  # ties and zeros
                w = torch.round(w * 2) / 2
            if seed % 5 == 2:
                w = torch.randn(n, generator=gen, dtype=torch.float64) ** 5
            codes, alpha = optimal_ternary_rows(w[None])
            qv = codes[0].to(w.dtype) - 1
            ours = float(ternary_objective(w, alpha[0], qv))
            assert ours == pytest.approx(_brute_force_ternary(w), abs=1e-6, rel=1e-9)
            # alpha is the mean magnitude of the support, and the support is a top-k of |w|.
            sup = qv != 0
            if bool(sup.any()):
                assert float(alpha[0]) == pytest.approx(float(w.abs()[sup].mean()))
                rest = w.abs()[~sup]
                assert float(w.abs()[sup].min()) >= (float(rest.max()) if rest.numel() else 0.0)
            cases += 1
    assert cases > 200


def test_lbw_ternary_per_channel_matches_rows_and_module() -> None:
    torch.manual_seed(7)
    w = torch.randn(6, 4, 3, 3)
    enc = LBWWeight(2, per_channel=True).encode(w)
    assert enc.scale.shape == (6, 1, 1, 1)
    for c in range(6):
        codes_c, alpha_c = optimal_ternary_rows(w[c].reshape(1, -1))
        assert torch.equal(enc.codes[c].reshape(-1), codes_c[0])
        assert torch.equal(enc.scale[c].reshape(()), alpha_c[0])
    whole = LBWWeight(2).encode(w)
    codes, alpha = optimal_ternary_rows(w.reshape(1, -1))
    assert torch.equal(whole.codes.reshape(-1), codes[0]) and torch.equal(whole.scale, alpha[0])
    assert whole.scale.dim() == 0


def test_lbw_ternary_large_n_is_optimal() -> None:
    torch.manual_seed(8)
    w = torch.randn(1, 10**6, dtype=torch.float64)
    codes, alpha = optimal_ternary_rows(w)  # O(N log N): one sort
    a = float(alpha[0])
    sup = codes[0] != 1
    # Optimality conditions: the support is exactly the weights with |w| >= alpha/2 (up to one tie).
    assert float(w[0].abs()[sup].min()) >= a / 2 - 1e-9
    assert float(w[0].abs()[~sup].max()) <= a / 2 + 1e-9
    # For N(0, 1) the optimal threshold t solves t = E[|w| | |w| > t] / 2, t ~ 0.612, alpha ~ 1.224.
    assert a == pytest.approx(1.224, abs=0.01)
    # Better than TWN's 0.7*mean|w| approximation.
    delta = 0.7 * w.abs().mean()
    twn_q = torch.sign(w) * (w.abs() > delta) * w.abs()[w.abs() > delta].mean()
    assert float(ternary_objective(w, alpha[0], codes.to(w.dtype) - 1)) <= float(((w - twn_q) ** 2).sum())


@pytest.mark.parametrize("bits", range(3, 9))
def test_lbw_pow2_nearest_level(bits: int) -> None:
    n = pow2_count(bits)
    levels = pow2_levels(n, torch.float64)
    assert levels.numel() == 2 * n + 1 <= 2**bits
    assert levels.numel() == 2 ** (bits - 1) + 1
    mags = levels[n:]
    assert mags[0] == 0 and torch.equal(mags[1:], torch.tensor([2.0**-j for j in range(n - 1, -1, -1)],
                                                                dtype=torch.float64))
    torch.manual_seed(bits)
    for per_channel in (False, True):
        spread = torch.logspace(-4, 0, 8, dtype=torch.float64).reshape(8, 1, 1, 1)
        w = torch.randn(8, 5, 3, 3, dtype=torch.float64) * spread
        q = LBWWeight(bits, per_channel=per_channel)
        enc = q.encode(w)
        alpha = enc.scale
        expected_alpha = DEFAULT_C[bits] * (w.abs().amax(dim=(1, 2, 3), keepdim=True) if per_channel
                                            else w.abs().max())
        assert torch.equal(alpha, expected_alpha)
        x = (w / alpha).reshape(-1, 1)
        nearest = (x - levels[None, :]).abs().argmin(dim=1)
        assert torch.equal(enc.codes.reshape(-1).long(), nearest)
        assert torch.equal(q(w), levels[nearest].reshape(w.shape) * alpha)
    # Exactly on a cut: the larger magnitude; just below: the smaller.
    cuts = pow2_cuts(n, torch.float64)
    for i, cut in enumerate(cuts.tolist()):
        w = torch.tensor([cut, math.nextafter(cut, 0.0), -cut], dtype=torch.float64)
        c = pow2_codes(w, torch.tensor(1.0, dtype=torch.float64), n)
        assert c.tolist() == [n + i + 1, n + i, n - i - 1]
    assert float(cuts[0]) == 2.0**-n  # midpoint between zero and the smallest level 2^-(n-1)
    # Saturation above alpha.
    assert pow2_codes(torch.tensor([5.0, -5.0]), torch.tensor(1.0), n).tolist() == [2 * n, 0]


def test_lbw_default_c_near_optimal() -> None:
    # The default c is (close to) the minimiser of the relative error on Gaussian weights.
    torch.manual_seed(9)
    w = torch.randn(64, 64, 3, 3)
    for bits in (3, 4):
        n = pow2_count(bits)
        lev = pow2_levels(n)

        def rel_err(c: float, bits: int = bits, n: int = n, lev: torch.Tensor = lev) -> float:
            a = c * w.abs().max()
            return float((w - lev[pow2_codes(w, a, n).long()] * a).norm() / w.norm())

        best = min(rel_err(0.2 + 0.01 * i) for i in range(81))
        assert rel_err(DEFAULT_C[bits]) <= best + 0.005


def test_lbw_identity_ste_and_options() -> None:
    for bits in (2, 3, 5):
        w = torch.randn(7, 3, requires_grad=True)
        g = torch.randn(7, 3)
        (LBWWeight(bits)(w) * g).sum().backward()
        assert torch.equal(w.grad, g)
    assert LBWWeight(4, c=0.5).c == 0.5
    with pytest.raises(ValueError, match="c"):
        LBWWeight(4, c=-1.0)
    with pytest.raises(ValueError, match="allowed"):
        LBWWeight(1)
    with pytest.raises(RecipeError, match="bits"):
        Recipe.from_dict({"default": {"weight": {"method": "lbw", "bits": 9}}})


# ---- through lowbit.quantize ---------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn(self.dw(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.fc(x.flatten(1))


def _learned(q: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in q.named_parameters()}


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] != "lbw" or c[1] in (2, 4)], ids=_ids)
def test_trains_through_quantize(cfg: tuple) -> None:
    method, bits, opts = cfg
    torch.manual_seed(0)
    recipe = {"default": {"weight": {"method": method, "bits": bits, **opts}}}
    model = lowbit.quantize(_Net(), recipe)
    layers = lowbit.quantized_layers(model)
    assert set(layers) == {"conv1", "dw", "fc"}
    before = {n: _learned(weight_quantizer(m)) for n, m in layers.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(6):
        loss = nn.functional.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for layer in layers.values():
        wq = weight_quantizer(layer)
        latent = layer.parametrizations.weight.original
        assert torch.isfinite(latent).all()
        _check_grid(layer.weight, wq.encode(latent), bool(opts.get("per_channel")))
    after = {n: _learned(weight_quantizer(m)) for n, m in layers.items()}
    for n in layers:
        for k in before[n]:  # learned quantizer state (TTQ scales, TGA delta) does train
            assert not torch.equal(before[n][k], after[n][k]), (n, k)

    # The state dict carries the learned quantizer state: a fresh model + same recipe reproduces it.
    sd = model.state_dict()
    if method == "ttq":
        assert "fc.parametrizations.weight.0.w_p" in sd and "fc.parametrizations.weight.0.w_n" in sd
    if method == "tga":
        assert "conv1.parametrizations.weight.0.delta" in sd
    torch.manual_seed(123)
    model2 = lowbit.quantize(_Net(), recipe)
    model2.load_state_dict(sd)
    model.eval()
    model2.eval()
    assert torch.equal(model(x), model2(x))
