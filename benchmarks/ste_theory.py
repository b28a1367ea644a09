"""Reproduction benchmark: Yin et al., "Understanding Straight-Through Estimator in Training
Activation Quantized Neural Nets" (ICLR 2019, arXiv 1903.05662).

Usage::

    python benchmarks/ste_theory.py [--quick] [--seed S] [--out benchmarks/results]

Model and notation
------------------
One hidden layer of ``m`` binary units sharing the weight ``w`` (think of ``m`` non-overlapping
patches), a linear read-out ``v``::

    y(Z; v, w) = v^T sigma(Z w),   sigma(x) = 1[x > 0],   Z in R^{m x n}, Z_ij iid N(0, 1)

Teacher ``(v*, w*)``, ``y* = v*^T sigma(Z w*)``, population loss

    f(v, w) = E_Z[(y(Z; v, w) - y*)^2] / 2.

Write ``1`` for the all-ones m-vector, ``s = |w|``, ``w^ = w/|w|``, ``w*^ = w*/|w*|``,
``theta = angle(w, w*)`` in [0, pi], and, for theta in (0, pi), the unit vector
``e = (w*^ - cos(theta) w^) / sin(theta)`` (the direction of w* orthogonal to w).
``phi`` and ``Phi`` are the standard normal density and distribution function.

Closed-form population loss (derived here)
------------------------------------------
Rows ``z_i`` of Z are independent N(0, I_n). For one row, ``(z.w^, z.w*^)`` is a standard 2-D
Gaussian pair with correlation cos(theta); the event {z.w > 0, z.w* > 0} is a wedge of opening
pi - theta, so ``E[sigma(z.w) sigma(z.w*)] = (pi - theta) / (2 pi)`` and ``E[sigma(z.w)^2] = 1/2``.
Different rows are independent, so off-diagonal entries are 1/4::

    E[sigma(Zw) sigma(Zw)^T]  = (I + 11^T) / 4
    E[sigma(Zw) sigma(Zw*)^T] = ((1 - 2 theta/pi) I + 11^T) / 4

    f(v, w) = 1/8 [ v^T (I + 11^T) v - 2 v^T ((1 - 2 theta/pi) I + 11^T) v* + v*^T (I + 11^T) v* ]

f depends on w only through theta (it is scale invariant in w).

True (population) gradient
--------------------------
    grad_v f = 1/4 [ (I + 11^T) v - ((1 - 2 theta/pi) I + 11^T) v* ]

Only the cross term depends on w, through theta: d f / d theta = (v^T v*) / (2 pi), and
d theta / d w = -e / s (differentiate cos(theta) = w^.w*^). Hence, for theta in (0, pi),

    grad_w f = -(v^T v*) / (2 pi |w|) * e

(equivalently ``-(v^T v*)/(2 pi |w|) (I - w w^T/|w|^2) w* / |(I - w w^T/|w|^2) w*|``). At theta = 0
or pi the loss has a kink in w and the gradient is undefined; we report 0 there.

Critical points (as in the paper's analysis, re-derived here): the global minima (v = v*,
theta = 0); the spurious points theta = pi, v = v_spur = (I + 11^T)^{-1} (11^T - I) v*
= (2 (1^T v*)/(m+1)) 1 - v*, which are local minima when v_spur^T v* < 0, i.e.
(1^T v*)^2 < (m+1) |v*|^2 / 2 (f is strictly convex in v, and f grows linearly as theta leaves pi
because df/dtheta = v^T v*/(2 pi) < 0); and points with theta in (0, pi), v^T v* = 0 and
grad_v f = 0.

Coarse gradient and its expectation (derived here)
--------------------------------------------------
Back-propagating through sigma with its a.e.-zero derivative replaced by a surrogate ``mu'``
gives the coarse partial gradient in w, for one sample Z,

    g_w(Z) = Z^T (mu'(Z w) (.) v) (v^T sigma(Z w) - y*)

while the partial gradient in v, ``sigma(Zw) (v^T sigma(Zw) - y*)``, is exact and averages to
grad_v f. Expanding the product over rows i (STE factor) and j (residual), and using that rows
are independent, three one-row expectations appear (z ~ N(0, I_n)):

    A = E[z mu'(z.w)],   B = E[z mu'(z.w) sigma(z.w)],   C = E[z mu'(z.w) sigma(z.w*)]

    E[g_w] = |v|^2 B - (v^T v*) C + (A / 2) [ (1^T v)^2 - |v|^2 - (1^T v)(1^T v*) + v^T v* ].

With E[g; 0 < g <= a] = phi(0) - phi(a) for g ~ N(0, 1), and 2-D integrals in the (w^, e) plane:

* identity, mu' = 1:   A = 0,  B = w^/sqrt(2 pi),  C = w*^/sqrt(2 pi)

      E[g_id] = ( |v|^2 w^ - (v^T v*) w*^ ) / sqrt(2 pi)

* ReLU, mu' = 1[x > 0]:  A = B = w^/sqrt(2 pi),  C = (w^ + w*^) / (2 sqrt(2 pi))

      E[g_relu] = h(v, v*) / (2 sqrt(2 pi)) w^ - (v^T v*) (w^ + w*^) / (2 sqrt(2 pi)),
      h(v, v*) = |v|^2 + (1^T v)^2 - (1^T v)(1^T v*) + v^T v*

  (equivalently, with the unit bisector u = (w^ + w*^)/|w^ + w*^|: (w^ + w*^)/2 = cos(theta/2) u).

* clipped ReLU, mu' = 1[0 < x <= t] (t = 1 here), a = t/|w|:
      A = B = (1 - exp(-a^2/2)) / sqrt(2 pi) * w^
      C = [ 1/(2 sqrt(2 pi)) - phi(a) Phi(a cot theta) + cos(theta)/sqrt(2 pi) (Phi(a/sin theta) - 1/2) ] w^
          + sin(theta)/sqrt(2 pi) (Phi(a/sin theta) - 1/2) e
  (integrate g 1[0 < g <= a] and h 1[0 < g <= a] over the half plane g cos(theta) + h sin(theta) > 0;
  a -> infinity gives back the ReLU case).

Consequences checked by the benchmark and its test: the part of E[g_w] orthogonal to w is
``-(v^T v*) c(theta, |w|) e`` with c > 0 for all three estimators, so in expectation every one of
them has a non-negative inner product with grad_w f (which is along e); they differ by the
radial component (along w^), which changes |w| but not f. At a spurious minimum (theta = pi,
v = v_spur) h(v_spur, v*) = 0, so E[g_relu] = E[g_crelu] = 0 there, while
E[g_id] = (|v|^2 + v^T v*) w^/sqrt(2 pi) = 2 (1^T v*)^2 (m-1)/(m+1)^2 w^/sqrt(2 pi) != 0: the
identity STE's coarse gradient does not vanish at these local minima (the paper's "instability of
a poor STE near certain local minima", in this model). At the global minimum all three vanish.

Coarse gradient descent (the paper's algorithm):
``v <- v - lr * grad_v f``, ``w <- w - lr * E[g_w]`` (expected run), or with both replaced by
mini-batch Monte Carlo averages (stochastic run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

try:  # the benchmark runs from a checkout: make ``src/`` importable without installing
    import lowbit  # noqa: F401
except ImportError:  # pragma: no cover - exercised only outside the venv
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lowbit.provenance import git_state, machine, versions
from lowbit.quant.ste import apply_coarse, coarse_derivative

_ROOT = Path(__file__).resolve().parents[1]
ESTIMATORS: tuple[str, ...] = ("identity", "relu", "clipped_relu")
DTYPE = torch.float64
SQRT_2PI = math.sqrt(2.0 * math.pi)
MC_MIN_INFORMATIVE = 2000  # draws with a non-zero residual needed before a z-score is trusted


# --------------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------------


def geometry(w: Tensor, w_star: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Return ``(theta, |w|, w^, e, sin(theta))`` with e the unit direction of w* orthogonal to w.

    ``e`` is the zero vector when w and w* are (numerically) parallel or anti-parallel.
    """
    s = w.norm()
    w_hat = w / s
    ws_hat = w_star / w_star.norm()
    c = torch.dot(w_hat, ws_hat)
    r = ws_hat - c * w_hat
    sin = r.norm()
    theta = torch.atan2(sin, c)
    e = r / sin if float(sin) > 1e-300 else torch.zeros_like(w)
    return theta, s, w_hat, e, sin


def population_loss(v: Tensor, w: Tensor, v_star: Tensor, w_star: Tensor) -> Tensor:
    """Closed-form f(v, w) = E[(v^T sigma(Zw) - v*^T sigma(Zw*))^2] / 2 (Gaussian Z)."""
    theta = geometry(w, w_star)[0]
    rho = 1.0 - 2.0 * theta / math.pi
    sv, ss = v.sum(), v_star.sum()
    quad = torch.dot(v, v) + sv * sv
    cross = rho * torch.dot(v, v_star) + sv * ss
    quad_s = torch.dot(v_star, v_star) + ss * ss
    return (quad - 2.0 * cross + quad_s) / 8.0


def true_gradient(v: Tensor, w: Tensor, v_star: Tensor, w_star: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form ``(grad_v f, grad_w f)``; grad_w f is 0 where theta is 0 or pi (kink)."""
    theta, s, _, e, _ = geometry(w, w_star)
    rho = 1.0 - 2.0 * theta / math.pi
    gv = (v + v.sum() - rho * v_star - v_star.sum()) / 4.0
    gw = -torch.dot(v, v_star) / (2.0 * math.pi * s) * e
    return gv, gw


def expected_coarse_gradient_w(
    v: Tensor, w: Tensor, v_star: Tensor, w_star: Tensor, kind: str, top: float = 1.0
) -> Tensor:
    """Closed-form E_Z[g_w] for the identity, ReLU or clipped-ReLU (clip at ``top``) STE."""
    theta, s, w_hat, e, sin = geometry(w, w_star)
    ws_hat = w_star / w_star.norm()
    if kind == "identity":
        A = torch.zeros_like(w)
        B = w_hat / SQRT_2PI
        C = ws_hat / SQRT_2PI
    elif kind == "relu":
        A = B = w_hat / SQRT_2PI
        C = (w_hat + ws_hat) / (2.0 * SQRT_2PI)
    elif kind == "clipped_relu":
        a = top / s
        A = B = (1.0 - torch.exp(-a * a / 2.0)) / SQRT_2PI * w_hat
        cos = torch.cos(theta)
        phi_a = torch.exp(-a * a / 2.0) / SQRT_2PI
        if float(sin) > 1e-300:
            big = torch.special.ndtr(a / sin) - 0.5
            cot_term = torch.special.ndtr(a * cos / sin)
        else:  # theta = 0 (w*-side half plane contains the slab) or pi (disjoint)
            big = torch.tensor(0.5, dtype=w.dtype)
            cot_term = torch.tensor(1.0 if float(cos) > 0 else 0.0, dtype=w.dtype)
        c_w = 1.0 / (2.0 * SQRT_2PI) - phi_a * cot_term + cos / SQRT_2PI * big
        c_e = sin / SQRT_2PI * big
        C = c_w * w_hat + c_e * e
    else:
        raise ValueError(f"unknown estimator {kind!r}; allowed: {', '.join(ESTIMATORS)}")
    vv = torch.dot(v, v)
    vvs = torch.dot(v, v_star)
    sv, ss = v.sum(), v_star.sum()
    return vv * B - vvs * C + A / 2.0 * (sv * sv - vv - sv * ss + vvs)


def spurious_minimum(v_star: Tensor) -> tuple[Tensor, bool]:
    """``v_spur = (I + 11^T)^{-1} (11^T - I) v*`` and whether (v_spur, theta = pi) is a local min."""
    m = v_star.numel()
    ss = v_star.sum()
    v_spur = 2.0 * ss / (m + 1) * torch.ones_like(v_star) - v_star
    is_min = bool(torch.dot(v_spur, v_star) < 0)
    return v_spur, is_min


def cosine(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float(torch.dot(a, b)) / (na * nb)


def gradient_defined(w: Tensor, w_star: Tensor, tol: float = 1e-6) -> bool:
    """grad_w f exists (theta away from the kinks at 0 and pi, in the sense sin(theta) > tol)."""
    return float(geometry(w, w_star)[4]) > tol


# --------------------------------------------------------------------------------------------
# Monte Carlo
# --------------------------------------------------------------------------------------------


def sample_z(n_samples: int, m: int, n: int, generator: torch.Generator) -> Tensor:
    """``n_samples`` i.i.d. Gaussian matrices Z (m x n) as float64.

    Drawn by ``torch.randn`` in float32 and cast: about 6x faster than float64 draws on CPU, and the
    2^-24 relative rounding of the draws is far below any Monte Carlo error here. All arithmetic on
    the draws is float64.
    """
    return torch.randn(n_samples, m, n, dtype=torch.float32, generator=generator).to(DTYPE)


def batch_gradients(
    Z: Tensor,
    v: Tensor,
    w: Tensor,
    v_star: Tensor,
    w_star: Tensor,
    kinds: tuple[str, ...] = ESTIMATORS,
    top: float = 1.0,
    y_star: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample quantities on a batch ``Z`` of shape (B, m, n).

    Returns ``(loss, g_v, g_w)``: loss (B,) = (y - y*)^2 / 2, g_v (B, m) the exact gradient in v,
    g_w (B, len(kinds), n) the coarse gradient ``Z^T (mu'(Zw) (.) v) (y - y*)`` per estimator,
    with ``mu'`` taken from ``lowbit.quant.ste.coarse_derivative``. ``y_star`` (B,) may be passed
    when several points share the batch.
    """
    if y_star is None:
        y_star = teacher_output(Z, v_star, w_star)
    pre = Z @ w  # (B, m)
    act = (pre > 0).to(Z.dtype)
    r = act @ v - y_star  # residual y - y*, (B,)
    g_v = act * r[:, None]
    x = torch.stack([coarse_derivative(pre, k, top) * v * r[:, None] for k in kinds], dim=1)  # (B, K, m)
    g_w = torch.bmm(x, Z)  # (B, K, n)
    return 0.5 * r * r, g_v, g_w


def batch_mean_gradients(
    Z: Tensor,
    v: Tensor,
    w: Tensor,
    v_star: Tensor,
    w_star: Tensor,
    kind: str,
    top: float = 1.0,
    y_star: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Batch means ``(g_v, g_w)`` of :func:`batch_gradients` for one estimator, without forming
    per-sample gradients (one matrix-vector product; used by the mini-batch runs)."""
    if y_star is None:
        y_star = teacher_output(Z, v_star, w_star)
    b, m, n = Z.shape
    pre = Z @ w
    act = (pre > 0).to(Z.dtype)
    r = act @ v - y_star
    g_v = (act * r[:, None]).mean(0)
    x = coarse_derivative(pre, kind, top) * v * r[:, None]  # (B, m)
    g_w = Z.reshape(b * m, n).T @ x.reshape(b * m) / b
    return g_v, g_w


def teacher_output(Z: Tensor, v_star: Tensor, w_star: Tensor) -> Tensor:
    """y* = v*^T sigma(Z w*) for a batch Z (B, m, n)."""
    return (Z @ w_star > 0).to(Z.dtype) @ v_star


def monte_carlo(
    points: list[tuple[Tensor, Tensor]],
    v_star: Tensor,
    w_star: Tensor,
    n_samples: int,
    generator: torch.Generator,
    kinds: tuple[str, ...] = ESTIMATORS,
    chunk: int = 5000,
    top: float = 1.0,
) -> list[dict[str, tuple[Tensor, Tensor]]]:
    """Monte Carlo means and standard errors at each point ``(v, w)``.

    One set of ``n_samples`` draws of Z is shared by all points and estimators (common random
    numbers). Each result maps ``"loss"``, ``"grad_v"`` and every estimator name to
    ``(mean, standard_error)``, and ``"informative"`` to the number of draws with a non-zero
    residual (only those carry gradient; with few of them the standard errors are unreliable).
    """
    m, n = v_star.numel(), w_star.numel()
    acc: list[dict[str, list[Tensor]]] = [{} for _ in points]
    informative = [0] * len(points)
    done = 0
    while done < n_samples:
        b = min(chunk, n_samples - done)
        Z = sample_z(b, m, n, generator)
        y_star = teacher_output(Z, v_star, w_star)
        for i, (v, w) in enumerate(points):
            loss, g_v, g_w = batch_gradients(Z, v, w, v_star, w_star, kinds, top, y_star)
            informative[i] += int((loss > 0).sum())
            items = {"loss": loss, "grad_v": g_v, **{k: g_w[:, j] for j, k in enumerate(kinds)}}
            for key, x in items.items():
                s1, s2 = x.sum(0), (x * x).sum(0)
                if key in acc[i]:
                    acc[i][key][0] += s1
                    acc[i][key][1] += s2
                else:
                    acc[i][key] = [s1, s2]
        done += b
    out = []
    for a, info in zip(acc, informative, strict=True):
        res: dict = {"informative": info}
        for key, (s1, s2) in a.items():
            mean = s1 / n_samples
            var = (s2 / n_samples - mean * mean).clamp_min(0.0) * n_samples / max(n_samples - 1, 1)
            res[key] = (mean, (var / n_samples).sqrt())
        out.append(res)
    return out


def autograd_coarse_gradient(
    Z: Tensor, v: Tensor, w: Tensor, v_star: Tensor, w_star: Tensor, kind: str, top: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Batch-mean ``(g_v, g_w)`` by autograd through lowbit's ``apply_coarse`` straight-through map.

    The same quantity as the mean of :func:`batch_gradients` (checked by the test): the library's
    STE and this benchmark's explicit formula agree.
    """
    v = v.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    pre = Z @ w
    act = apply_coarse((pre > 0).to(Z.dtype), pre, kind, top)
    y_star = (Z @ w_star > 0).to(Z.dtype) @ v_star
    loss = 0.5 * ((act @ v - y_star) ** 2).mean()
    gv, gw = torch.autograd.grad(loss, (v, w))
    return gv, gw


# --------------------------------------------------------------------------------------------
# Coarse gradient descent
# --------------------------------------------------------------------------------------------


@dataclass
class Teacher:
    v_star: Tensor
    w_star: Tensor

    @property
    def m(self) -> int:
        return self.v_star.numel()

    @property
    def n(self) -> int:
        return self.w_star.numel()


def make_teacher(m: int, n: int, generator: torch.Generator) -> Teacher:
    """v* ~ N(0, I_m / m) (so |v*| ~ 1), w* ~ uniform on the unit sphere (f ignores |w*|)."""
    v_star = torch.randn(m, dtype=DTYPE, generator=generator) / math.sqrt(m)
    w_star = torch.randn(n, dtype=DTYPE, generator=generator)
    return Teacher(v_star, w_star / w_star.norm())


def random_student(teacher: Teacher, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Same law as the teacher, independent of it: v ~ N(0, I_m/m), w uniform on the unit sphere."""
    v = torch.randn(teacher.m, dtype=DTYPE, generator=generator) / math.sqrt(teacher.m)
    w = torch.randn(teacher.n, dtype=DTYPE, generator=generator)
    return v, w / w.norm()


def near_student(v_c: Tensor, w_c: Tensor, noise: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(v_c, w_c)`` plus relative noise: w = w_c + noise |w_c| u (u uniform on the sphere, so the
    angle to w_c is about ``noise`` rad), v = v_c + noise N(0, I_m/m)."""
    m, n = v_c.numel(), w_c.numel()
    u = torch.randn(n, dtype=DTYPE, generator=generator)
    w = w_c + noise * w_c.norm() * u / u.norm()
    v = v_c + noise * torch.randn(m, dtype=DTYPE, generator=generator) / math.sqrt(m)
    return v, w


def _state_metrics(v: Tensor, w: Tensor, teacher: Teacher, kind: str, top: float) -> dict:
    vs, ws = teacher.v_star, teacher.w_star
    gv, gw = true_gradient(v, w, vs, ws)
    eg = expected_coarse_gradient_w(v, w, vs, ws, kind, top)
    defined = gradient_defined(w, ws)
    return {
        "loss": float(population_loss(v, w, vs, ws)),
        "cos_w": cosine(eg, gw) if defined else None,
        "cos_joint": cosine(torch.cat([gv, eg]), torch.cat([gv, gw])) if defined else None,
        "theta": float(geometry(w, ws)[0]),
        "w_norm": float(w.norm()),
        "v_err": float((v - vs).norm()),
        "coarse_norm": float(torch.cat([gv, eg]).norm()),
    }


def run_expected(
    v0: Tensor,
    w0: Tensor,
    teacher: Teacher,
    kind: str,
    lr: float,
    steps: int,
    record_every: int,
    keep_steps: tuple[int, ...] = (),
    top: float = 1.0,
) -> dict:
    """Coarse gradient descent with closed-form expectations: v -= lr grad_v f, w -= lr E[g_w].

    Returns ``{"curves": {metric: [...]}, "final": {...}, "states": {step: (v, w)}}``; ``states``
    holds the iterates at ``keep_steps`` (for the Monte Carlo cross-check).
    """
    vs, ws = teacher.v_star, teacher.w_star
    v, w = v0.clone(), w0.clone()
    curves: dict[str, list] = {"step": []}
    states = {}
    for t in range(steps + 1):
        if t % record_every == 0 or t == steps:
            curves["step"].append(t)
            for key, val in _state_metrics(v, w, teacher, kind, top).items():
                curves.setdefault(key, []).append(val)
        if t in keep_steps:
            states[t] = (v.clone(), w.clone())
        if t == steps:
            break
        gv, _ = true_gradient(v, w, vs, ws)
        eg = expected_coarse_gradient_w(v, w, vs, ws, kind, top)
        v, w = v - lr * gv, w - lr * eg
    final = _state_metrics(v, w, teacher, kind, top)
    final["endpoint"] = classify(v, w, teacher)
    return {"curves": curves, "final": final, "states": states, "v": v, "w": w}


def run_stochastic(
    v0: Tensor,
    w0: Tensor,
    teacher: Teacher,
    lr: float,
    steps: int,
    batch: int,
    generator: torch.Generator,
    record_every: int,
    kinds: tuple[str, ...] = ESTIMATORS,
    top: float = 1.0,
    lr_decay: float = 0.1,
    decay_at: tuple[float, ...] = (0.5, 0.75),
) -> dict[str, dict]:
    """Mini-batch coarse gradient descent, one trajectory per estimator, in lockstep: every step
    draws one batch of Z shared by all estimators. Both gradients are batch means (g_v exact on
    the batch, g_w coarse). The step size is multiplied by ``lr_decay`` at each fraction
    ``decay_at`` of the run. Loss and angles are recorded with the closed forms."""
    vs, ws = teacher.v_star, teacher.w_star
    state = {k: (v0.clone(), w0.clone()) for k in kinds}
    out = {k: {"curves": {"step": []}} for k in kinds}
    batch_cos: dict[str, list[float]] = {k: [] for k in kinds}
    for t in range(steps + 1):
        Z = sample_z(batch, teacher.m, teacher.n, generator) if t < steps else None
        y_star = teacher_output(Z, vs, ws) if Z is not None else None
        for k in kinds:
            v, w = state[k]
            if Z is not None:
                gv_b, gw_b = batch_mean_gradients(Z, v, w, vs, ws, k, top, y_star)
                if gradient_defined(w, ws):
                    batch_cos[k].append(cosine(gw_b, true_gradient(v, w, vs, ws)[1]))
            if t % record_every == 0 or t == steps:
                c = out[k]["curves"]
                c["step"].append(t)
                for key, val in _state_metrics(v, w, teacher, k, top).items():
                    c.setdefault(key, []).append(val)
                window = [x for x in batch_cos[k][-record_every:] if x == x]
                c.setdefault("cos_w_batch", []).append(sum(window) / len(window) if window else None)
            if Z is not None:
                lr_t = lr * lr_decay ** sum(t >= f * steps for f in decay_at)
                state[k] = (v - lr_t * gv_b, w - lr_t * gw_b)
    for k in kinds:
        v, w = state[k]
        final = _state_metrics(v, w, teacher, k, top)
        final["endpoint"] = classify(v, w, teacher)
        bc = [x for x in batch_cos[k] if x == x]
        final["batch_cos_mean"] = sum(bc) / len(bc) if bc else None
        final["batch_cos_frac_positive"] = sum(x > 0 for x in bc) / len(bc) if bc else None
        out[k]["final"] = final
    return out


def classify(v: Tensor, w: Tensor, teacher: Teacher, tol: float = 1e-2) -> str:
    """'global' (theta ~ 0, v ~ v*), 'spurious' (theta ~ pi, v ~ v_spur) or 'other'."""
    vs, ws = teacher.v_star, teacher.w_star
    theta = float(geometry(w, ws)[0])
    scale = float(vs.norm())
    if theta < tol and float((v - vs).norm()) < tol * scale:
        return "global"
    v_spur, _ = spurious_minimum(vs)
    if theta > math.pi - tol and float((v - v_spur).norm()) < tol * scale:
        return "spurious"
    return "other"


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    m: int = 20  # hidden units / patches sharing w
    n: int = 100  # input dimension
    lr: float = 0.1  # step size for both v and w (grad_v f has curvature <= (m+1)/4)
    steps: int = 3000  # coarse GD steps, expected (closed-form) runs
    record_every: int = 10
    stochastic_record_every: int = 30  # the mini-batch curves are noisy; coarser records suffice
    n_inits: int = 8  # random student initialisations
    top: float = 1.0  # clip level of the clipped-ReLU STE (1-bit activation, resolution 1)
    near_noise: float = 0.1  # relative perturbation for the near-minimum starts (~0.1 rad)
    near_steps: int = 6000  # longer: the identity STE's |w| drift at the spurious minimum is slow
    stochastic_steps: int = 3000
    stochastic_batch: int = 128
    stochastic_inits: int = 2  # the first k random starts are also run with mini-batch gradients
    mc_samples: int = 100_000  # Monte Carlo cross-check of the closed forms
    mc_checkpoints: tuple[int, ...] = (0, 50, 200)
    stochastic_lr_decay: float = 0.1  # mini-batch runs: lr x0.1 at 50% and at 75% of the steps
    seed: int = 0
    threads: int = 1  # torch intra-op threads (1 is fastest for these small ops on a shared 2-core box)
    quick: bool = False
    estimators: tuple[str, ...] = field(default_factory=lambda: ESTIMATORS)

    @classmethod
    def quick_config(cls, seed: int = 0) -> Config:
        return cls(
            steps=600,
            near_steps=1200,
            n_inits=3,
            stochastic_steps=300,
            stochastic_batch=64,
            stochastic_inits=1,
            mc_samples=20_000,
            mc_checkpoints=(0, 50, 200),
            seed=seed,
            quick=True,
        )


def _round(x, digits: int = 6):
    """JSON-friendly copy: tensors to lists, floats to ``digits`` significant digits, NaN to None."""
    if isinstance(x, Tensor):
        x = x.tolist()
    if isinstance(x, float):
        if x != x or x in (float("inf"), float("-inf")):
            return None
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {str(k): _round(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    return x


def _log(msg: str) -> None:
    print(msg, flush=True)


def _valid(xs) -> list[float]:
    return [x for x in xs if x is not None and x == x]


def run_benchmark(cfg: Config) -> dict:
    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    kinds = tuple(cfg.estimators)
    teacher = make_teacher(cfg.m, cfg.n, torch.Generator().manual_seed(cfg.seed))
    vs, ws = teacher.v_star, teacher.w_star
    v_spur, spur_is_min = spurious_minimum(vs)
    ss = float(vs.sum())
    spur_info = {
        "one_dot_v_star": ss,
        "v_star_norm": float(vs.norm()),
        "is_local_min": spur_is_min,
        "condition": "(1^T v*)^2 < (m+1)|v*|^2/2",
        "loss": float(population_loss(v_spur, -ws, vs, ws)),
        "expected_coarse_grad_norm": {
            k: float(expected_coarse_gradient_w(v_spur, -ws, vs, ws, k, cfg.top).norm()) for k in kinds
        },
        "identity_norm_predicted": 2 * ss**2 * (cfg.m - 1) / (cfg.m + 1) ** 2 / SQRT_2PI,
    }
    _log(
        f"teacher: m={cfg.m} n={cfg.n} |v*|={float(vs.norm()):.3f} 1^Tv*={ss:.3f}; spurious minimum "
        f"(theta=pi) is a local min: {spur_is_min}, f={spur_info['loss']:.3e}, |E g_w| there: "
        + ", ".join(f"{k}={v:.2e}" for k, v in spur_info["expected_coarse_grad_norm"].items())
    )
    gen_init = torch.Generator().manual_seed(cfg.seed + 1)
    keep = tuple(cfg.mc_checkpoints)

    # 1) random starts, closed-form expected coarse gradients
    inits = [random_student(teacher, gen_init) for _ in range(cfg.n_inits)]
    random_runs: dict[str, list[dict]] = {k: [] for k in kinds}
    mc_states: list[tuple[str, str, int, Tensor, Tensor]] = []
    for i, (v0, w0) in enumerate(inits):
        for k in kinds:
            r = run_expected(v0, w0, teacher, k, cfg.lr, cfg.steps, cfg.record_every, keep, cfg.top)
            random_runs[k].append({"init": i, "curves": r["curves"], "final": r["final"]})
            if i == 0:
                mc_states += [
                    ("random_0", k, t, v, w) for t, (v, w) in r["states"].items() if t > 0 or k == kinds[0]
                ]
        _log(
            f"random start {i}: theta0={float(geometry(w0, ws)[0]):.3f}  "
            + "  ".join(
                f"{k}: f={runs[-1]['final']['loss']:.2e} ({runs[-1]['final']['endpoint']})"
                for k, runs in random_runs.items()
            )
        )

    # 2) starts near the global minimum and near the spurious minimum
    near = {
        "near_global": near_student(vs, ws, cfg.near_noise, gen_init),
        "near_spurious": near_student(v_spur, -ws, cfg.near_noise, gen_init),
    }
    near_runs: dict[str, dict[str, dict]] = {}
    for name, (v0, w0) in near.items():
        near_runs[name] = {}
        for k in kinds:
            r = run_expected(v0, w0, teacher, k, cfg.lr, cfg.near_steps, cfg.record_every, keep, cfg.top)
            near_runs[name][k] = {"curves": r["curves"], "final": r["final"]}
            mc_states += [(name, k, t, v, w) for t, (v, w) in r["states"].items() if t > 0 or k == kinds[0]]
        _log(
            f"{name}: f0={float(population_loss(v0, w0, vs, ws)):.2e}  "
            + "  ".join(
                f"{k}: f={near_runs[name][k]['final']['loss']:.2e} |w| {float(w0.norm()):.3f}->"
                f"{near_runs[name][k]['final']['w_norm']:.3f} ({near_runs[name][k]['final']['endpoint']})"
                for k in kinds
            )
        )

    # 3) mini-batch (stochastic) coarse gradient descent
    gen_sto = torch.Generator().manual_seed(cfg.seed + 2)
    sto_starts = {f"random_{i}": inits[i] for i in range(min(cfg.stochastic_inits, len(inits)))}
    sto_starts.update(near)
    stochastic: dict[str, dict[str, dict]] = {}
    for name, (v0, w0) in sto_starts.items():
        t0 = time.time()
        stochastic[name] = run_stochastic(
            v0,
            w0,
            teacher,
            cfg.lr,
            cfg.stochastic_steps,
            cfg.stochastic_batch,
            gen_sto,
            cfg.stochastic_record_every,
            kinds,
            cfg.top,
            cfg.stochastic_lr_decay,
        )
        _log(
            f"stochastic {name} (batch {cfg.stochastic_batch}, {time.time() - t0:.1f}s): "
            + "  ".join(
                f"{k}: f={stochastic[name][k]['final']['loss']:.2e} "
                f"batch-cos mean={stochastic[name][k]['final']['batch_cos_mean']:.2f}"
                for k in kinds
            )
        )

    # 4) Monte Carlo cross-check of the closed forms at saved iterates
    t0 = time.time()
    mc = monte_carlo(
        [(v, w) for *_, v, w in mc_states],
        vs,
        ws,
        cfg.mc_samples,
        torch.Generator().manual_seed(cfg.seed + 3),
        kinds,
        top=cfg.top,
    )
    mc_points = []
    all_z: list[float] = []
    for (scen, k_run, t, v, w), res in zip(mc_states, mc, strict=True):
        gv, gw = true_gradient(v, w, vs, ws)
        counted = res["informative"] >= MC_MIN_INFORMATIVE
        rec = {
            "scenario": scen,
            "run_estimator": k_run,
            "step": t,
            "informative_samples": res["informative"],
            "in_z_summary": counted,
            "loss_closed": float(population_loss(v, w, vs, ws)),
        }
        checks = {"loss": population_loss(v, w, vs, ws).reshape(1), "grad_v": gv}
        checks.update({k: expected_coarse_gradient_w(v, w, vs, ws, k, cfg.top) for k in kinds})
        for key, closed in checks.items():
            mean, se = res[key]
            z = ((mean.reshape(-1) - closed) / (se.reshape(-1) + 1e-12)).abs()
            if counted:
                all_z += z.tolist()
            rec[key] = {
                "max_abs_z": float(z.max()),
                "rel_err": float((mean.reshape(-1) - closed).norm() / closed.norm().clamp_min(1e-300)),
            }
            if key in kinds and gradient_defined(w, ws):
                rec[key]["cos_closed"] = cosine(closed, gw)
                rec[key]["cos_mc"] = cosine(mean, gw)
        mc_points.append(rec)
    mc_summary = {
        "n_points": len(mc_points),
        "n_points_in_z_summary": sum(p["in_z_summary"] for p in mc_points),
        "min_informative_samples": MC_MIN_INFORMATIVE,
        "n_samples": cfg.mc_samples,
        "max_abs_z": max(all_z),
        "frac_abs_z_gt_3": sum(z > 3 for z in all_z) / len(all_z),
        "n_compared": len(all_z),
        "seconds": time.time() - t0,
    }
    _log(
        f"Monte Carlo check ({cfg.mc_samples} samples, {len(mc_points)} iterates, "
        f"{mc_summary['seconds']:.1f}s): max |z| = {mc_summary['max_abs_z']:.2f}, "
        f"fraction |z|>3 = {mc_summary['frac_abs_z_gt_3']:.4f} (Gaussian: 0.0027)"
    )

    summary = summarize(cfg, random_runs, near_runs, stochastic, spur_info)
    return {
        "benchmark": "ste_theory",
        "paper": "Yin, Lyu, Zhang, Osher, Qi, Xin. Understanding Straight-Through Estimator in Training "
        "Activation Quantized Neural Nets. ICLR 2019, arXiv 1903.05662",
        "command": "python benchmarks/ste_theory.py"
        + (" --quick" if cfg.quick else "")
        + f" --seed {cfg.seed}",
        "config": asdict(cfg),
        "setting": {
            "teacher": "v* ~ N(0, I_m/m), w* uniform on the unit sphere",
            "students": "v ~ N(0, I_m/m), w uniform on the unit sphere (|w0| = 1), "
            "independent of the teacher",
            "near_global": f"v = v* + {cfg.near_noise} N(0, I_m/m), w = w* + {cfg.near_noise} |w*| u",
            "near_spurious": f"v = v_spur + {cfg.near_noise} N(0, I_m/m), w = -w* + {cfg.near_noise} |w*| u",
            "update": "v -= lr grad_v f; w -= lr g_w (expected: closed-form E[g_w]; stochastic: batch mean)",
            "clip_level": cfg.top,
        },
        "teacher": {"v_star": vs.tolist(), "w_star_norm": float(ws.norm())},
        "spurious_minimum": spur_info,
        "summary": summary,
        "monte_carlo_check": {"summary": mc_summary, "points": mc_points},
        "runs": {"random": random_runs, "near": near_runs, "stochastic": stochastic},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        # the commit (and whether the tree was dirty), the CPU and library versions of this run
        "provenance": {
            "seeds": [cfg.seed], "git": git_state(_ROOT), "machine": machine(), "versions": versions(),
        },
        "seconds": time.time() - t_start,
    }


def summarize(cfg: Config, random_runs, near_runs, stochastic, spur_info) -> dict:
    """Per-estimator numbers and the verdicts on the paper's claims."""
    out: dict[str, dict] = {}
    for k, runs in random_runs.items():
        finals = [r["final"] for r in runs]
        cos_all = [c for r in runs for c in _valid(r["curves"]["cos_w"])]
        cosj_all = [c for r in runs for c in _valid(r["curves"]["cos_joint"])]
        losses = sorted(f["loss"] for f in finals)
        endpoints = [f["endpoint"] for f in finals]
        sto = [s[k]["final"] for name, s in stochastic.items() if name.startswith("random")]
        ng = near_runs["near_global"][k]
        ns = near_runs["near_spurious"][k]
        w0s, w1s = ns["curves"]["w_norm"][0], ns["final"]["w_norm"]
        stationary = [f["coarse_norm"] < 1e-6 for f in finals]
        out[k] = {
            "final_loss_median": losses[len(losses) // 2],
            "final_loss_max": losses[-1],
            "endpoints": {e: endpoints.count(e) for e in ("global", "spurious", "other")},
            "n_runs": len(runs),
            "n_stationary": sum(stationary),
            "cos_w_min": min(cos_all) if cos_all else None,
            "cos_w_mean": sum(cos_all) / len(cos_all) if cos_all else None,
            "cos_joint_min": min(cosj_all) if cosj_all else None,
            "stochastic_final_loss": [f["loss"] for f in sto],
            "stochastic_batch_cos_mean": _mean([f["batch_cos_mean"] for f in sto]),
            "stochastic_batch_cos_frac_positive": _mean([f["batch_cos_frac_positive"] for f in sto]),
            "near_global_final_loss": ng["final"]["loss"],
            "near_global_max_loss": max(ng["curves"]["loss"]),
            "near_global_initial_loss": ng["curves"]["loss"][0],
            "near_global_endpoint": ng["final"]["endpoint"],
            "near_global_stochastic_final_loss": stochastic["near_global"][k]["final"]["loss"],
            "near_spurious_endpoint": ns["final"]["endpoint"],
            "near_spurious_final_loss": ns["final"]["loss"],
            "near_spurious_w_norm": [w0s, w1s],
            "near_spurious_coarse_norm_final": ns["final"]["coarse_norm"],
            "near_spurious_loss_increases": loss_increases(ns["curves"]["loss"]),
            "near_spurious_w_norm_min": min(ns["curves"]["w_norm"]),
            "near_spurious_w_drift_per_step": _initial_drift(ns["curves"], cfg),
            "near_global_loss_increases": loss_increases(ng["curves"]["loss"]),
            "random_loss_increases": sum(loss_increases(r["curves"]["loss"]) for r in runs),
            "spurious_min_expected_coarse_grad_norm": spur_info["expected_coarse_grad_norm"][k],
            "near_spurious_stochastic_endpoint": stochastic["near_spurious"][k]["final"]["endpoint"],
        }
    claims: dict[str, dict] = {}
    for k in ("relu", "clipped_relu"):
        if k not in out:
            continue
        s = out[k]
        pos = s["cos_w_min"] is not None and s["cos_w_min"] > 0
        conv = s["n_stationary"] == s["n_runs"] and s["endpoints"]["other"] == 0
        fixed = s["spurious_min_expected_coarse_grad_norm"] < 1e-10
        settles = s["near_spurious_endpoint"] == "spurious" and s["near_spurious_coarse_norm_final"] < 1e-8
        claims[k] = {
            "positive_correlation": pos,
            "converges_to_critical_point": conv,
            "vanishes_at_spurious_minima": fixed,
            "settles_at_spurious_minimum": settles,
            "held": pos and conv,
        }
    if "identity" in out:
        s = out["identity"]
        nonzero = s["spurious_min_expected_coarse_grad_norm"] > 1e-10
        left = s["near_spurious_coarse_norm_final"] > 1e-8 or s["near_spurious_endpoint"] != "spurious"
        near_global_unstable = (
            s["near_global_endpoint"] != "global"
            or s["near_global_max_loss"] > 1.5 * s["near_global_initial_loss"]
        )
        claims["identity"] = {
            "nonzero_at_spurious_minima": nonzero,
            "does_not_settle_near_spurious_minimum": left,
            "unstable_near_global_minimum": near_global_unstable,
            "positive_correlation_anyway": s["cos_w_min"] is not None and s["cos_w_min"] > 0,
            "held": nonzero and left,
        }
    decreased = {
        f"{name}/{k}": r["final"]["loss"] < r["curves"]["loss"][0]
        for name, runs in stochastic.items()
        for k, r in runs.items()
    }
    return {"per_estimator": out, "claims": claims, "stochastic_decreased": decreased}


def loss_increases(losses: list[float], rel: float = 1e-3) -> int:
    """How many recorded points have a loss above the previous one by more than ``rel`` (relative)."""
    return sum(b > a * (1 + rel) + 1e-15 for a, b in itertools.pairwise(losses))


def _initial_drift(curves: dict, cfg: Config) -> float:
    """Average change of |w| per step over the first third of a run (after the first tenth)."""
    steps, wn = curves["step"], curves["w_norm"]
    i0, i1 = len(steps) // 10, len(steps) // 3
    return (wn[i1] - wn[i0]) / max(steps[i1] - steps[i0], 1)


def _mean(xs):
    xs = _valid(xs)
    return sum(xs) / len(xs) if xs else None


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

COLORS = {"identity": "tab:red", "relu": "tab:blue", "clipped_relu": "tab:green"}
LOSS_FLOOR = 1e-16
COS_PLOT_MIN_LOSS = 1e-12  # below this the run has converged to rounding level; cos is noise


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax_loss, ax_cos, ax_near = axes
    for k, rs in runs["random"].items():
        for i, r in enumerate(rs):
            c = r["curves"]
            ax_loss.plot(
                c["step"],
                [max(x, LOSS_FLOOR) for x in c["loss"]],
                color=COLORS[k],
                lw=0.9,
                alpha=0.7,
                label=f"{k} (expected)" if i == 0 else None,
            )
            cos = [
                float("nan") if x is None or f < COS_PLOT_MIN_LOSS else x
                for x, f in zip(c["cos_w"], c["loss"], strict=True)
            ]
            ax_cos.plot(c["step"], cos, color=COLORS[k], lw=0.9, alpha=0.7, label=k if i == 0 else None)
        for name, s in runs["stochastic"].items():
            if not name.startswith("random"):
                continue
            c = s[k]["curves"]
            ax_loss.plot(
                c["step"],
                [max(x, LOSS_FLOOR) for x in c["loss"]],
                color=COLORS[k],
                lw=1.2,
                ls=":",
                label=f"{k} (mini-batch)" if name == "random_0" else None,
            )
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("population loss f (closed form)")
    ax_loss.set_title("Random starts: loss")
    ax_loss.legend(fontsize=7)
    ax_cos.axhline(0.0, color="k", lw=0.6)
    ax_cos.set_ylim(-0.1, 1.05)
    ax_cos.set_xlabel("step")
    ax_cos.set_ylabel("cos(E[g_w], grad_w f)")
    ax_cos.set_title("Random starts: correlation of E[coarse grad] with true grad")
    ax_cos.legend(fontsize=7)
    for k in runs["near"]["near_global"]:
        for name, ls in (("near_global", "-"), ("near_spurious", "--")):
            c = runs["near"][name][k]["curves"]
            ax_near.plot(
                c["step"],
                [max(x, LOSS_FLOOR) for x in c["loss"]],
                color=COLORS[k],
                ls=ls,
                lw=1.2,
                label=f"{k}, {name.replace('_', ' ')}",
            )
    ax_near.set_yscale("log")
    ax_near.set_xlabel("step")
    ax_near.set_ylabel("population loss f")
    ax_near.set_title("Near the global (solid) / spurious (dashed) minimum; |w| dotted")
    ax_w = ax_near.twinx()
    for k in runs["near"]["near_spurious"]:
        c = runs["near"]["near_spurious"][k]["curves"]
        ax_w.plot(c["step"], c["w_norm"], color=COLORS[k], ls=":", lw=1.0)
    ax_w.set_ylabel("|w| (near-spurious runs, dotted)")
    ax_w.set_ylim(bottom=0.0)
    ax_near.legend(fontsize=7, loc="center right")
    fig.suptitle(
        f"STE theory (Yin et al. 2019): m={result['config']['m']}, n={result['config']['n']}, "
        f"lr={result['config']['lr']}, seed {result['config']['seed']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x, spec: str = ".2e") -> str:
    return "n/a" if x is None else format(x, spec)


def _commit(result: dict) -> str:
    git = result.get("provenance", {}).get("git", {})
    if not git.get("commit"):
        return "commit unknown"
    return f"commit {git['commit'][:12]}" + (" with local changes" if git.get("dirty") else "")


def markdown(result: dict) -> str:
    cfg = result["config"]
    summ = result["summary"]
    per, claims = summ["per_estimator"], summ["claims"]
    spur = result["spurious_minimum"]
    mc = result["monte_carlo_check"]["summary"]
    env = result["environment"]
    settings = "quick settings" if cfg["quick"] else "full settings"
    lines = [
        "# STE theory benchmark (Yin et al., ICLR 2019, arXiv 1903.05662)",
        "",
        f"Command: `{result['command']}` ({settings}; {result['seconds']:.0f} s on a shared 2-core CPU "
        f"box, torch {env['torch']}, {env['threads']} thread(s); {_commit(result)}). Data: "
        "`ste_theory.json`; plot: `ste_theory.png`.",
        "",
        "## Setting",
        "",
        f"- Model `y = v^T 1[Zw > 0]`, Z {cfg['m']}x{cfg['n']} i.i.d. N(0,1) (m hidden units sharing w); "
        "population loss and gradients in closed form (derivation in the docstring of "
        "`benchmarks/ste_theory.py`). We did not get the paper's own synthetic setting, so this one is ours.",
        "- Teacher v* ~ N(0, I/m), w* uniform on the unit sphere. "
        f"{cfg['n_inits']} random students drawn the same way (|w0| = 1).",
        f"- Coarse gradient descent `v -= lr grad_v f`, `w -= lr E[g_w]` with the closed-form expectations "
        f"(lr {cfg['lr']}, {cfg['steps']} steps; {cfg['near_steps']} steps for the near-minimum starts). "
        f"Mini-batch runs: batch {cfg['stochastic_batch']}, {cfg['stochastic_steps']} steps, lr x"
        f"{cfg['stochastic_lr_decay']} at 50% and 75%, one shared Z batch per step for all three estimators.",
        f"- STEs: identity (mu' = 1), ReLU (mu' = 1[x > 0]), clipped ReLU (mu' = 1[0 < x <= {cfg['top']}]), "
        "taken from `lowbit.quant.ste.coarse_derivative`.",
        f"- Near-minimum starts: (v*, w*) and (v_spur, -w*) perturbed by {cfg['near_noise']} (relative; "
        f"about {cfg['near_noise']} rad in angle).",
        "",
        "## Checks of the closed forms",
        "",
        f"- Monte Carlo ({mc['n_samples']} draws of Z, {mc['n_points']} iterates along the runs, "
        f"{mc['n_points_in_z_summary']} with at least {mc['min_informative_samples']} draws with a non-zero "
        "residual): loss, grad_v f and E[g_w] for all three STEs agree with the closed forms. Max |z| = "
        f"{mc['max_abs_z']:.2f}; |z| > 3 for {mc['frac_abs_z_gt_3']:.4f} of {mc['n_compared']} components "
        "(0.0027 expected for Gaussian errors).",
        "- Spurious minimum of this teacher (theta = pi, v = v_spur): local minimum = "
        f"{spur['is_local_min']}, f = {spur['loss']:.3e}. |E[g_w]| there: "
        + ", ".join(f"{k} {v:.2e}" for k, v in spur["expected_coarse_grad_norm"].items())
        + f". The closed form predicts {spur['identity_norm_predicted']:.2e} for identity.",
        "",
        "## Results per estimator",
        "",
        "| estimator | final f, random starts (median / max) | endpoints global / spurious / other "
        "| min cos | mean cos | mini-batch final f | mini-batch steps with cos > 0 | near-global final f "
        "| near-spurious: |w| start -> min -> end, loss increases, final |coarse grad| |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, s in per.items():
        e = s["endpoints"]
        w0, w1 = s["near_spurious_w_norm"]
        lines.append(
            f"| {k} | {_fmt(s['final_loss_median'])} / {_fmt(s['final_loss_max'])} "
            f"| {e['global']} / {e['spurious']} / {e['other']} | {_fmt(s['cos_w_min'], '.2g')} "
            f"| {_fmt(s['cos_w_mean'], '.3f')} | "
            + ", ".join(_fmt(x) for x in s["stochastic_final_loss"])
            + f" | {_fmt(s['stochastic_batch_cos_frac_positive'], '.2f')} "
            f"| {_fmt(s['near_global_final_loss'])} "
            f"| {w0:.3f} -> {s['near_spurious_w_norm_min']:.3f} -> {w1:.3f}, "
            f"{s['near_spurious_loss_increases']}, {_fmt(s['near_spurious_coarse_norm_final'])} |"
        )
    lines += [
        "",
        "- cos is cos(E[g_w], grad_w f) along the closed-form runs from random starts. Points are left out "
        "where theta is within 1e-6 of 0 or pi, because grad_w f is undefined there.",
        "- 'Endpoints': global = theta ~ 0 and v ~ v*; spurious = theta ~ pi and v ~ v_spur; other = neither "
        "(tolerance 1e-2).",
        "- 'Loss increases': recorded points (every "
        f"{cfg['record_every']} steps) where f went up by more than 0.1%.",
        "",
        "## The paper's claims (in our reading) and what happened here",
        "",
        "| claim | estimator | held in this run |",
        "|---|---|---|",
    ]
    for k in ("relu", "clipped_relu"):
        if k in claims:
            c = claims[k]
            lines += [
                f"| E[g_w] correlates positively with grad_w f (min cos > 0) | {k} "
                f"| {_yn(c['positive_correlation'])} |",
                f"| coarse GD converges to a critical point of f (every random start) | {k} "
                f"| {_yn(c['converges_to_critical_point'])} |",
                f"| E[g_w] = 0 at the spurious local minima (they are fixed points) | {k} "
                f"| {_yn(c['vanishes_at_spurious_minima'])} |",
                f"| ... and coarse GD started next to one settles there | {k} "
                f"| {_yn(c['settles_at_spurious_minimum'])} |",
            ]
    if "identity" in claims:
        c = claims["identity"]
        lines += [
            "| a poor STE is unstable near certain local minima: E[g_w] != 0 at the spurious minima "
            f"| identity | {_yn(c['nonzero_at_spurious_minima'])} |",
            "| ... and coarse GD started next to one never settles | identity "
            f"| {_yn(c['does_not_settle_near_spurious_minimum'])} |",
            "| (brief's test) unstable when started next to the global minimum | identity "
            f"| {_yn(c['unstable_near_global_minimum'])} |",
            "| (not claimed) E[g_w] correlates positively with grad_w f anyway | identity "
            f"| {_yn(c['positive_correlation_anyway'])} |",
        ]
    lines += ["", "## Notes", "", *[f"- {n}" for n in result.get("notes", [])]]
    return "\n".join(lines) + "\n"


def notes(result: dict) -> list[str]:
    """Plain-language reading of the numbers (generated, so it follows the run)."""
    cfg = result["config"]
    per = result["summary"]["per_estimator"]
    claims = result["summary"]["claims"]
    out = [
        "All three STEs correlate positively with the true gradient in this model, identity included. The "
        "part of E[g_w] orthogonal to w is a positive multiple of grad_w f (docstring; tested in "
        "tests/test_ste_theory.py). The STEs differ only in the radial part, along w. That part changes |w| "
        "but not f. So 'positive correlation' does not single out ReLU and clipped ReLU here. What sets them "
        "apart is whether E[g_w] vanishes at the critical points of f.",
    ]
    if "identity" in per:
        s = per["identity"]
        c = claims["identity"]
        spur = result["spurious_minimum"]
        predicted = -cfg["lr"] * spur["identity_norm_predicted"]
        w0, w_min = s["near_spurious_w_norm"][0], s["near_spurious_w_norm_min"]
        text = (
            "Identity STE near the spurious minimum: |w| drifts at "
            f"{s['near_spurious_w_drift_per_step']:.2e} per step (closed form at the minimum: "
            f"{predicted:.2e}). It falls from {w0:.3f} to {w_min:.3f}. "
        )
        if s["near_spurious_loss_increases"] > 0:
            text += (
                "Once |w| is about lr |v^T v*| / sqrt(2 pi), the angular step overshoots. The loss then "
                f"jumps ({s['near_spurious_loss_increases']} recorded increases), |w| is kicked back up, "
                "and the cycle repeats. "
            )
        else:
            text += (
                f"In {cfg['near_steps']} steps |w| did not get small enough for the overshoot seen in the "
                f"full run. At this rate it takes about {w0 / max(abs(predicted), 1e-300):.0f} steps. "
            )
        final_norm = s["near_spurious_coarse_norm_final"]
        text += f"After {cfg['near_steps']} steps |(grad_v f, E[g_w])| = {final_norm:.2e}"
        others = [k for k in ("relu", "clipped_relu") if k in per]
        if others:
            text += ", against " + " and ".join(
                f"{per[k]['near_spurious_coarse_norm_final']:.1e} for {k}" for k in others
            )
        text += (
            ". That matches the paper's 'instability near certain local minima' in this model: the "
            "spurious minimum is not a fixed point of identity-STE coarse GD"
        )
        if s["near_spurious_loss_increases"] > 0 and s["near_spurious_endpoint"] != "global":
            text += (
                ". The iterate does not escape to the global minimum either. It keeps cycling near the "
                "spurious one"
            )
        text += (
            f". From random starts the identity STE made {s['random_loss_increases']} recorded loss increases"
        )
        if others:
            text += " (" + ", ".join(f"{k} {per[k]['random_loss_increases']}" for k in others) + ")"
        out.append(text + ".")
        verdict = "was" if c["unstable_near_global_minimum"] else "was not"
        out.append(
            f"Identity STE near the global minimum {verdict} unstable: final f = "
            f"{s['near_global_final_loss']:.1e}, with {s['near_global_loss_increases']} loss increases. "
            "In this model E[g_w] = 0 at the global minimum for all three STEs"
            + (
                ", and all three runs returned to it. "
                if all(per[k]["near_global_endpoint"] == "global" for k in per)
                else ". "
            )
            + "The paper's evidence for instability near good minima comes from CIFAR-10 "
            "networks (started from a good minimum, then trained with a poor STE), and this toy model does "
            "not test it. We report it as not reproduced here.",
        )
    if all(k in per for k in ("relu", "clipped_relu")):
        r, cr = per["relu"], per["clipped_relu"]
        both = (
            claims["relu"]["converges_to_critical_point"]
            and claims["clipped_relu"]["converges_to_critical_point"]
        )
        head = (
            "From random starts, ReLU and clipped ReLU reach a critical point every time"
            if both
            else f"From random starts, not every ReLU / clipped-ReLU run is at a critical point after "
            f"{cfg['steps']} steps (stationary: ReLU {r['n_stationary']}, clipped ReLU {cr['n_stationary']} "
            f"of {r['n_runs']}{'; the quick settings stop early' if cfg['quick'] else ''})"
        )
        out.append(
            f"{head}. Global minimum: ReLU {r['endpoints']['global']}, clipped ReLU "
            f"{cr['endpoints']['global']}. Spurious minimum: ReLU {r['endpoints']['spurious']}, "
            f"clipped ReLU {cr['endpoints']['spurious']}. The theory "
            "promises a critical point, not the global minimum. Mean cos along the runs: "
            + ", ".join(f"{k} {per[k]['cos_w_mean']:.2f}" for k in per)
            + ".",
        )
        out.append(
            f"Mini-batch runs (batch {cfg['stochastic_batch']}): the batch coarse gradient has a positive "
            "inner product with grad_w f in "
            + ", ".join(f"{k} {per[k]['stochastic_batch_cos_frac_positive']:.0%}" for k in per)
            + " of the steps. Final losses sit at the gradient-noise level. "
            + (
                "Every mini-batch run ended below its starting loss."
                if all(result["summary"]["stochastic_decreased"].values())
                else "Runs that ended above their starting loss: "
                + ", ".join(k for k, ok in result["summary"]["stochastic_decreased"].items() if not ok)
                + "."
            ),
        )
    return out


def _yn(b: bool) -> str:
    return "yes" if b else "**no**"


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_round(result, 5), indent=1)
    # keep lists of numbers on one line (the curves), everything else indented
    text = re.sub(
        r"\[[-0-9.eE+,\snul]*\]", lambda mt: re.sub(r"\s+", "", mt.group(0)).replace(",", ", "), text
    )
    (out / "ste_theory.json").write_text(text + "\n")
    plot(result, out / "ste_theory.png")
    (out / "ste_theory.md").write_text(markdown(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small settings (seconds), for smoke tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args(argv)
    cfg = Config.quick_config(args.seed) if args.quick else Config(seed=args.seed)
    cfg.threads = args.threads
    result = run_benchmark(cfg)
    result["notes"] = notes(result)
    write_outputs(result, args.out)
    _log(f"wrote {args.out}/ste_theory.{{json,png,md}} in {result['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
