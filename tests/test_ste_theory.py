"""Fast checks of the math in benchmarks/ste_theory.py (Yin et al., ICLR 2019 STE theory).

Closed-form population loss vs Monte Carlo, closed-form true gradient vs finite differences,
closed-form expected coarse gradients vs Monte Carlo, the batch formula vs autograd through
lowbit's STE, and the sign / stationarity claims on a tiny case with a fixed seed.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "ste_theory.py"
_spec = importlib.util.spec_from_file_location("ste_theory", _PATH)
st = importlib.util.module_from_spec(_spec)
sys.modules["ste_theory"] = st
_spec.loader.exec_module(st)

D = st.DTYPE
M, N = 3, 5


def _point(seed: int, m: int = M, n: int = N, w_scale: float = 0.8):
    g = torch.Generator().manual_seed(seed)
    v_star = torch.randn(m, dtype=D, generator=g)
    w_star = torch.randn(n, dtype=D, generator=g)
    v = torch.randn(m, dtype=D, generator=g)
    w = w_scale * torch.randn(n, dtype=D, generator=g)
    return v, w, v_star, w_star


@pytest.fixture(scope="module")
def mc_case():
    """One Monte Carlo run (shared by the tests below) at a fixed tiny point."""
    v, w, v_star, w_star = _point(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batched ops: one thread is faster, and robust on a busy box
    try:
        res = st.monte_carlo([(v, w)], v_star, w_star, 60_000, torch.Generator().manual_seed(1), chunk=20_000)
    finally:
        torch.set_num_threads(threads)
    return (v, w, v_star, w_star), res[0]


def test_loss_closed_form_matches_monte_carlo(mc_case):
    (v, w, v_star, w_star), res = mc_case
    mean, se = res["loss"]
    closed = st.population_loss(v, w, v_star, w_star)
    assert abs(float(mean - closed)) < 5 * float(se)
    assert float(se) < 0.02 * float(closed)  # the check has teeth


def test_grad_v_closed_form_matches_monte_carlo(mc_case):
    (v, w, v_star, w_star), res = mc_case
    mean, se = res["grad_v"]
    gv, _ = st.true_gradient(v, w, v_star, w_star)
    assert torch.all((mean - gv).abs() < 5 * se)


@pytest.mark.parametrize("kind", st.ESTIMATORS)
def test_expected_coarse_gradient_matches_monte_carlo(mc_case, kind):
    (v, w, v_star, w_star), res = mc_case
    mean, se = res[kind]
    closed = st.expected_coarse_gradient_w(v, w, v_star, w_star, kind)
    assert closed.shape == (N,)
    assert torch.all((mean - closed).abs() < 5 * se), (mean, closed, se)
    assert float(se.max()) < 0.2 * float(closed.norm())


def test_true_gradient_matches_finite_differences():
    v, w, v_star, w_star = _point(3)
    gv, gw = st.true_gradient(v, w, v_star, w_star)
    h = 1e-6
    f = st.population_loss
    fd_v = torch.stack(
        [
            (f(v + h * e, w, v_star, w_star) - f(v - h * e, w, v_star, w_star)) / (2 * h)
            for e in torch.eye(M, dtype=D)
        ]
    )
    fd_w = torch.stack(
        [
            (f(v, w + h * e, v_star, w_star) - f(v, w - h * e, v_star, w_star)) / (2 * h)
            for e in torch.eye(N, dtype=D)
        ]
    )
    torch.testing.assert_close(gv, fd_v, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gw, fd_w, rtol=1e-6, atol=1e-8)
    # f is scale invariant in w, so grad_w f is orthogonal to w
    assert abs(float(torch.dot(gw, w))) < 1e-12


def test_batch_formula_matches_autograd_through_lowbit_ste():
    v, w, v_star, w_star = _point(4)
    Z = st.sample_z(64, M, N, torch.Generator().manual_seed(5))
    _, g_v, g_w = st.batch_gradients(Z, v, w, v_star, w_star)
    assert g_v.shape == (64, M) and g_w.shape == (64, len(st.ESTIMATORS), N)
    for j, kind in enumerate(st.ESTIMATORS):
        gv_auto, gw_auto = st.autograd_coarse_gradient(Z, v, w, v_star, w_star, kind)
        torch.testing.assert_close(g_v.mean(0), gv_auto, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_w[:, j].mean(0), gw_auto, rtol=1e-12, atol=1e-12)


def test_sign_claim_tiny_case(mc_case):
    """ReLU and clipped-ReLU expected coarse gradients correlate positively with grad_w f
    (closed form and Monte Carlo); the joint (v, w) direction is a descent direction."""
    (v, w, v_star, w_star), res = mc_case
    gv, gw = st.true_gradient(v, w, v_star, w_star)
    for kind in ("relu", "clipped_relu"):
        closed = st.expected_coarse_gradient_w(v, w, v_star, w_star, kind)
        assert st.cosine(closed, gw) > 0.1
        assert st.cosine(res[kind][0], gw) > 0.1
        assert float(torch.dot(gv, gv) + torch.dot(closed, gw)) > 0


def test_orthogonal_part_is_aligned_with_true_gradient_for_all_estimators():
    """Derived structure: E[g_w] minus its component along w is a positive multiple of grad_w f."""
    for seed in range(20):
        v, w, v_star, w_star = _point(100 + seed, m=6, n=9, w_scale=0.3 + 0.2 * seed)
        _, gw = st.true_gradient(v, w, v_star, w_star)
        w_hat = w / w.norm()
        for kind in st.ESTIMATORS:
            eg = st.expected_coarse_gradient_w(v, w, v_star, w_star, kind)
            tang = eg - torch.dot(eg, w_hat) * w_hat
            assert st.cosine(tang, gw) > 1 - 1e-9
            assert float(torch.dot(eg, gw)) > 0


def test_stationarity_at_global_and_spurious_minima():
    g = torch.Generator().manual_seed(7)
    m, n = 6, 9
    v_star = torch.randn(m, dtype=D, generator=g)
    v_star = v_star - v_star.mean() + 0.1  # small 1^T v* so that the spurious point is a local min
    w_star = torch.randn(n, dtype=D, generator=g)
    v_spur, is_min = st.spurious_minimum(v_star)
    assert is_min
    # v_spur minimises f(., w) at theta = pi
    gv, _ = st.true_gradient(v_spur, -w_star, v_star, w_star)
    assert float(gv.norm()) < 1e-12
    for kind in st.ESTIMATORS:
        at_global = st.expected_coarse_gradient_w(v_star, 2.0 * w_star, v_star, w_star, kind)
        assert float(at_global.norm()) < 1e-12
        at_spur = st.expected_coarse_gradient_w(v_spur, -0.7 * w_star, v_star, w_star, kind)
        if kind == "identity":  # the identity STE's coarse gradient does not vanish there
            ss = float(v_star.sum())
            predicted = 2 * ss**2 * (m - 1) / (m + 1) ** 2 / math.sqrt(2 * math.pi)
            assert float(at_spur.norm()) == pytest.approx(predicted, rel=1e-9)
        else:
            assert float(at_spur.norm()) < 1e-12
    assert st.classify(v_star, 3.0 * w_star, st.Teacher(v_star, w_star)) == "global"
    assert st.classify(v_spur, -w_star, st.Teacher(v_star, w_star)) == "spurious"


def test_clipped_relu_tends_to_relu_for_small_weights():
    v, w, v_star, w_star = _point(9)
    relu = st.expected_coarse_gradient_w(v, w, v_star, w_star, "relu")
    crelu = st.expected_coarse_gradient_w(v, 1e-4 * w / w.norm(), v_star, w_star, "clipped_relu")
    relu_small = st.expected_coarse_gradient_w(v, 1e-4 * w / w.norm(), v_star, w_star, "relu")
    torch.testing.assert_close(relu, relu_small)  # the ReLU form depends on w only through w/|w|
    torch.testing.assert_close(crelu, relu_small, rtol=1e-9, atol=1e-12)


def test_short_expected_run_decreases_loss():
    v, w, v_star, w_star = _point(11, m=4, n=10)
    teacher = st.Teacher(v_star, w_star)
    for kind in st.ESTIMATORS:
        r = st.run_expected(v, w, teacher, kind, lr=0.05, steps=40, record_every=10)
        assert r["curves"]["step"] == [0, 10, 20, 30, 40]
        assert r["final"]["loss"] < r["curves"]["loss"][0]


def test_batch_mean_gradients_match_per_sample_means():
    v, w, v_star, w_star = _point(12)
    Z = st.sample_z(32, M, N, torch.Generator().manual_seed(13))
    _, g_v, g_w = st.batch_gradients(Z, v, w, v_star, w_star)
    for j, kind in enumerate(st.ESTIMATORS):
        gv_m, gw_m = st.batch_mean_gradients(Z, v, w, v_star, w_star, kind)
        torch.testing.assert_close(gv_m, g_v.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gw_m, g_w[:, j].mean(0), rtol=1e-12, atol=1e-12)


def test_results_name_their_commit():
    sha = "0123456789abcdef" * 2 + "01234567"
    assert st._commit({"provenance": {"git": {"commit": sha, "dirty": False}}}) == "commit 0123456789ab"
    assert st._commit({"provenance": {"git": {"commit": sha, "dirty": True}}}).endswith("with local changes")
    assert st._commit({}) == "commit unknown"
