"""Fast checks of benchmarks/ste_multiclass.py (Long, Yin, Xin 2021: monotone STEs, multi-class).

The staircase against its formula, every STE's closed-form mu' against autograd of its surrogate,
the monotone flag against a brute-force scan, the batched coarse gradient against autograd through
lowbit's straight-through construction, the data model's labels against its teacher (and a zero-loss
student built from the teacher), a short training run reaching zero error, and bad inputs.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "ste_multiclass.py"
_spec = importlib.util.spec_from_file_location("ste_multiclass", _PATH)
sm = importlib.util.module_from_spec(_spec)
sys.modules["ste_multiclass"] = sm
_spec.loader.exec_module(sm)

D = torch.float64
ALL_STES = (*sm.STES, "osc:0.5", "osc:1.5")


def _tiny_task(seed: int = 0, a: float = 1.0):
    return sm.make_task(n=4, classes=3, width=3, size=60, test_size=30, margin=0.3, a=a, bits=2, seed=seed)


def test_staircase_matches_formula():
    a, bits = 0.5, 2  # levels 0, 0.5, 1.0, 1.5; jumps at 0, 0.5, 1.0
    t = torch.tensor([-1.0, 0.0, 1e-9, 0.1, 0.5, 0.51, 1.0, 1.2, 1.5, 5.0], dtype=D)
    want = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 1.5], dtype=D)
    assert torch.equal(sm.staircase(t, a, bits), want)
    grid = torch.linspace(-2, 6, 2001, dtype=D)
    for bits in (1, 2, 3):
        L = 2**bits - 1
        brute = [0.7 * min(max(math.ceil(x / 0.7), 0), L) for x in grid.tolist()]
        assert torch.equal(sm.staircase(grid, 0.7, bits), torch.tensor(brute, dtype=D))


@pytest.mark.parametrize("name", ALL_STES)
def test_closed_form_derivative_is_autograd_of_surrogate(name):
    ste = sm.STE.parse(name)
    a, top = 0.5, 1.5
    # a fine grid plus the kinks (0, top, 2 top) and the jumps, where the interval ends matter
    special = torch.tensor([0.0, 0.5, 1.0, top, 2 * top, -1e-12, 1e-12], dtype=D)
    t = torch.cat([torch.linspace(-2, 4, 601, dtype=D), special]).requires_grad_(True)
    (grad,) = torch.autograd.grad(ste.surrogate(t, a, top).sum(), t)
    torch.testing.assert_close(grad, ste.derivative(t.detach(), a, top), rtol=0, atol=1e-12)


def test_closed_forms_by_hand():
    a, top = 1.0, 3.0
    t = torch.tensor([-1.0, 0.0, 0.5, 1.0, 3.0, 4.0, 6.0, 7.0], dtype=D)
    d = {k: sm.STE.parse(k).derivative(t, a, top).tolist() for k in ("relu", "clipped_relu", "tent", "osc:2")}
    assert d["relu"] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert d["clipped_relu"] == [0, 0, 1, 1, 1, 0, 0, 0]
    assert d["tent"] == [0, 0, 1, 1, 1, -1, -1, 0]
    # 1 + 2 cos(2 pi t): 3 at integers, -1 at half-integers
    assert d["osc:2"] == pytest.approx([0, 0, -1, 3, 3, 3, 3, 3])


@pytest.mark.parametrize("name", ALL_STES)
def test_monotone_flag_matches_brute_force(name):
    ste = sm.STE.parse(name)
    t = torch.linspace(-3, 9, 24001, dtype=D)
    steps = ste.surrogate(t, 1.0, 3.0).diff()
    if ste.monotone is None:
        assert torch.all(steps == 0)  # no STE: constant surrogate
    else:
        assert bool(torch.all(steps >= -1e-12)) == ste.monotone


@pytest.mark.parametrize("name", ALL_STES)
def test_batched_coarse_gradient_matches_autograd_through_straight_through(name):
    task = _tiny_task(1, a=0.5)
    W0, V0 = sm.random_starts(3, 6, 4, 3, 0.5, 2, seed=2)
    ste = sm.STE.parse(name)
    loss, err, gW, gV = sm.coarse_step_terms(task["X"], task["y"], W0, V0, ste, 0.5, 2)
    assert loss.shape == err.shape == (3,) and gW.shape == W0.shape and gV.shape == V0.shape
    assert float(loss.min()) > 0  # random starts: the check has something to compare
    for r in range(3):
        aW, aV = sm.autograd_coarse_gradient(task["X"], task["y"], W0[r], V0[r], ste, 0.5, 2)
        torch.testing.assert_close(gW[r], aW, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(gV[r], aV, rtol=1e-10, atol=1e-13)
    if name != "none":
        assert float(gW.abs().max()) > 0
    else:
        assert torch.equal(gW, torch.zeros_like(gW))


def test_hinge_by_hand():
    logits = torch.tensor([[[2.0, 0.0], [1.5, 0.2], [0.0, 3.0]]], dtype=D)  # (R=1, K=3, N=2)
    y = torch.tensor([0, 2])
    loss, G = sm.hinge(logits, y)
    # point 0: 1 + 1.5 - 2 = 0.5 (rival class 1); point 1: max(1 + 0 - 3, 1 + 0.2 - 3) < 0
    assert float(loss[0]) == pytest.approx(0.25)
    want = torch.tensor([[[-0.5, 0.0], [0.5, 0.0], [0.0, 0.0]]], dtype=D)
    assert torch.equal(G, want)


def test_data_labels_are_the_teacher_argmax_with_margin():
    task = _tiny_task(3)
    teacher, X, y = task["teacher"], task["X"], task["y"]
    assert X.shape == (60, 5) and torch.all(X[:, -1] == 1) and float(X[:, :-1].abs().max()) <= 1
    f = teacher.logits(X)
    assert torch.equal(f.argmax(1), y)
    top2 = f.topk(2, dim=1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) >= 0.3
    assert torch.bincount(y).tolist() == [20, 20, 20]
    assert torch.equal(teacher.logits(task["X_test"]).argmax(1), task["y_test"])


def test_teacher_copy_is_a_zero_loss_global_minimum():
    """Separable by construction: a student of width >= m* copying the teacher, V scaled by 1/margin,
    has hinge loss exactly 0, and every coarse gradient vanishes there (a fixed point)."""
    task = _tiny_task(4)
    t = task["teacher"]
    W = torch.cat([t.W, torch.randn(2, 5, dtype=D)])[None]
    V = torch.cat([t.V / 0.3, torch.zeros(3, 2, dtype=D)], dim=1)[None]
    for name in ("relu", "tent", "identity"):
        loss, err, gW, gV = sm.coarse_step_terms(task["X"], task["y"], W, V, sm.STE.parse(name), 1.0, 2)
        assert float(loss[0]) == 0.0 and float(err[0]) == 0.0
        assert torch.equal(gW, torch.zeros_like(gW)) and torch.equal(gV, torch.zeros_like(gV))


def test_short_monotone_run_reaches_zero_error():
    task = _tiny_task(5)
    W0, V0 = sm.random_starts(4, 12, 4, 3, 1.0, 2, seed=6)
    r = sm.train(task["X"], task["y"], W0, V0, "relu", 1.0, 2, lr=1.0, max_steps=1500, record_every=50)
    assert r["curves"]["loss"][0] > 0.5
    assert torch.all(r["loss"] == 0) and torch.all(r["error"] == 0)
    assert torch.all(r["steps_to_zero_loss"] >= r["steps_to_zero_error"])
    assert torch.all(r["steps_to_zero_error"] > 0)
    assert float(sm.error_rate(task["X"], task["y"], r["W"], r["V"], 1.0, 2).max()) == 0.0


def test_tiny_benchmark_pipeline(tmp_path):
    cfg = sm.Config(
        widths=(6,),
        n=3,
        classes=2,
        teacher_width=2,
        size=20,
        test_size=10,
        n_tasks=1,
        starts=2,
        max_steps=40,
        record_every=10,
        pilot_starts=1,
        stes=("none", "relu", "osc:2"),
    )
    res = sm.run_benchmark(cfg, tmp_path)
    assert set(res["summary"]["6"]) == {"none", "relu", "osc:2"}
    assert res["summary"]["6"]["relu"]["runs"] == 2
    assert (tmp_path / ".ste_multiclass_cache.json").exists()
    res["verdict"] = sm.verdict(res)
    res["notes"] = sm.notes(res)
    assert any("no STE" in n for n in res["notes"])
    res.update(command="x", torch=torch.__version__, wall_time_s=0.0)
    md = sm.markdown(res)
    assert "| relu | yes |" in md and "| osc:2 | **no** |" in md
    if importlib.util.find_spec("matplotlib") is not None:
        sm.plot(res, tmp_path / "plot.png")
        assert (tmp_path / "plot.png").stat().st_size > 10_000
    again = sm.run_benchmark(cfg, tmp_path)  # resumes from the cache: same numbers
    assert again["summary"] == res["summary"]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: sm.STE.parse("sign"), "unknown STE 'sign'"),
        (lambda: sm.STE.parse("osc:-1"), "c >= 0"),
        (lambda: sm.STE.parse("osc:abc"), "c >= 0"),
        (lambda: sm.staircase(torch.zeros(3), 0.0, 2), "resolution a"),
        (lambda: sm.staircase(torch.zeros(3), 1.0, 0), "bits"),
        (lambda: sm.make_teacher(4, 1, 3, 1.0, 2, torch.Generator()), "classes"),
        (
            lambda: sm.sample(
                sm.make_teacher(4, 3, 3, 1.0, 2, torch.Generator()), 10, 0.1, torch.Generator()
            ),
            "multiple of the number of classes 3",
        ),
        (lambda: sm.make_task(4, 3, 3, 9, 3, 1e9, 1.0, 2, 0), "lower the margin"),
    ],
)
def test_bad_inputs_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_training_inputs_rejected():
    task = _tiny_task(0)
    X, y = task["X"], task["y"]
    W0, V0 = sm.random_starts(2, 5, 4, 3, 1.0, 2, seed=0)
    with pytest.raises(ValueError, match="lr must be"):
        sm.train(X, y, W0, V0, "relu", 1.0, 2, lr=0.0, max_steps=5)
    with pytest.raises(ValueError, match="max_steps"):
        sm.train(X, y, W0, V0, "relu", 1.0, 2, lr=0.1, max_steps=-1)
    with pytest.raises(ValueError, match="shapes disagree"):
        sm.train(X[:, :-1], y, W0, V0, "relu", 1.0, 2, lr=0.1, max_steps=5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        sm.train(X, y + 1, W0, V0, "relu", 1.0, 2, lr=0.1, max_steps=5)
    with pytest.raises(ValueError, match="unknown STE"):
        sm.train(X, y, W0, V0, "straight", 1.0, 2, lr=0.1, max_steps=5)


def test_dead_points_and_units_by_hand():
    X = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [0.0, 1.0]], dtype=D)  # (x, 1)
    W = torch.tensor([[[1.0, -0.5], [2.0, -1.0]]], dtype=D)  # both units: t = c (x - 0.5)
    # every unit is off on the points x = -1 and x = 0, on none for x = 1; no unit is off everywhere
    assert sm.dead_points(X, W).tolist() == [2]
    assert sm.dead_units(X, W).tolist() == [0]
    assert sm.dead_units(X, -W).tolist() == [0] and sm.dead_points(X, -W).tolist() == [1]
    V = torch.randn(1, 3, 2, dtype=D)
    y = torch.tensor([0, 1, 2])
    loss, _, gW, gV = sm.coarse_step_terms(X[1:2], y[1:2], W, V, sm.STE.parse("relu"), 1.0, 2)
    assert float(loss[0]) == 1.0  # all logits 0 on a dead point
    assert torch.equal(gW, torch.zeros_like(gW)) and torch.equal(gV, torch.zeros_like(gV))
