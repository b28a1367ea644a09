"""Reproduction benchmark: Long, Yin, Xin, "Learning quantized neural nets by coarse gradient method
for non-linear classification" (Res. Math. Sci. 8:48, 2021; arXiv 2011.11256).

Usage::

    python benchmarks/ste_multiclass.py [--quick] [--seed S] [--out benchmarks/results] [--widths 16 32]
                                        [--stes relu clipped_relu osc:2 ...]

The paper's claim (abstract): for a two-linear-layer network with a quantized (staircase) ReLU
activation trained on non-linear multi-category data, coarse gradient descent with a class of
straight-through estimators (STEs) "with certain monotonicity" converges to a global minimum,
i.e. perfect classification of the training set. Only the abstract could be read; the data
model, the exact monotonicity condition, the loss and the step sizes below are our
reconstruction and are listed as such.

Model (reconstructed)
---------------------
Input ``x`` in R^n, augmented with a constant 1 (bias): ``x~ = (x, 1)`` in R^d, d = n + 1.
Hidden layer of ``m`` units with weights ``W`` (m x d), staircase activation, linear read-out
``V`` (K x m), one logit per class::

    sigma(t) = a * clip(ceil(t / a), 0, L),   L = 2^b - 1            (BCGD's quantized ReLU)
    f(x) = V sigma(W x~)                      in R^K,   predicted class argmax_k f_k(x)

``sigma`` has the levels 0, a, ..., L a, jumps at t = 0, a, ..., (L-1) a, and saturates at
``top = L a`` (we reuse ``lowbit.quant.bcgd_relu.bcgd_codes``; ``a`` is fixed here, not learned).

Loss: the multi-class hinge loss (Crammer-Singer), averaged over the N training points::

    l(f, y) = max(0, 1 + max_{k != y} f_k - f_y)

[R] The abstract does not name the loss. We chose a loss whose global minimum value 0 is
attained, exactly when every training point is classified with margin >= 1; so "global minimum"
and "perfect classification" are both measurable (loss == 0 implies zero training error), and a
run at zero loss is a fixed point of every coarse gradient (the loss gradient is exactly 0).

Data model (reconstructed)
--------------------------
[R] A random teacher of the same quantized form labels the points, so the classes are
non-linearly separated (unions of the cells cut out by the teacher's hyperplanes and its
staircase levels), and a zero-loss global minimum exists by construction:

    x ~ U[-1, 1]^n,   y = argmax_k (V* sigma(W* x~))_k
    W* rows ~ N(0, c^2 I_d), c = L a / sqrt(n/3 + 1) (teacher pre-activations have std ~ L a,
    so every level is used), V* entries ~ N(0, 1), teacher width m* <= m.

Points whose teacher margin (top logit minus runner-up) is below ``gamma`` are rejected, and the
classes are balanced (N / K points each). A student with m >= m* hidden units reaches zero loss:
copy (W*, V*) into m* of its units, zero the rest of V, and scale V by 1/gamma (the staircase is
positively homogeneous in V). A teacher is redrawn when some class cannot be filled (recorded).

Coarse gradient (the paper's algorithm)
---------------------------------------
Back-propagation with the a.e.-zero derivative sigma' replaced by a proxy mu' (the STE)::

    G = dl/df                  (N x K; for the hinge: +1 at the worst rival, -1 at y, if active)
    grad_V   = G^T sigma(W x~) / N                                         (exact)
    g_W      = [ (G V) (.) mu'(W x~) ]^T x~ / N                             (coarse)
    W <- W - lr g_W,   V <- V - lr grad_V        (full batch, constant lr)

STEs compared (``mu`` is the surrogate whose derivative is ``mu'``; "monotone" = mu
non-decreasing, i.e. mu' >= 0):

=================  ===========================================================  =========
name               mu'(t)                                                        monotone
=================  ===========================================================  =========
none               0 (the true a.e. gradient: only V learns; baseline)          n/a
identity           1                                                             yes (*)
relu               1[t > 0]                                                      yes
clipped_relu       1[0 < t <= top]                                               yes
tent               1[0 < t <= top] - 1[top < t <= 2 top]                        no
osc:c              (1 + c cos(2 pi t / a)) 1[t > 0]                              iff c <= 1
=================  ===========================================================  =========

identity, relu and clipped_relu are ``lowbit.quant.ste``'s estimators. (*) identity is monotone
but non-zero for t <= 0; [R] we guess the paper's class also asks mu' = 0 there (not confirmed).
``tent`` is clipped ReLU that falls back to zero above the clip (mu = relu(t) - 2 relu(t - top) +
relu(t - 2 top)). ``osc:c`` is ours [R], a one-parameter family that crosses the monotonicity
boundary: mu(t) = r + c a/(2 pi) sin(2 pi r / a), r = relu(t). c = 0 is the ReLU STE; c = 1 is a
smooth staircase (mu' = 0 mid-step, largest at the jumps), still monotone; c > 1 makes mu'
negative in the middle of every step. The paper's own counterexample (if any) is not known to
us, so these non-monotone estimators are ours.

Protocol
--------
For each student width in ``widths`` (2x and 4x the teacher's: how much over-parametrisation the
claim needs is not known to us), each of ``n_tasks`` data sets (teacher seeds) and ``starts``
random initialisations (W rows ~ N(0, c^2 I_d) like the teacher, V ~ N(0, 1/m)), shared by all
STEs (common random numbers), coarse gradient descent runs until the loss is exactly 0 or
``max_steps``. The step size is chosen per STE and width from ``lrs`` on a separate pilot data set
(its own teacher seed, the same step budget), by the fraction of pilot runs reaching zero loss
(ties: lower mean final loss), so no STE is judged at a step size that suits only another.
Training arithmetic is float32 (the hinge's zero is exact in any precision; the tests check the
gradients in float64). Reported per STE and width: the fraction of runs at zero training error
and at zero loss, steps to get there, whether unsolved runs were still improving (loss down by
> 10% over the last quarter of the steps), the final loss distribution, the mean loss curve, dead
hidden units (pre-activation <= 0 on every training point), |W|, and the error on fresh points
from the same teacher (evaluated once, at the end). The training error is what the claim is about.
Compute: about 5 min of one core for the full settings; finished (width, STE) pairs are cached in
``<out>/.ste_multiclass_cache.json``, so a killed run resumes; the cache is removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

try:  # the benchmark runs from a checkout: make ``src/`` importable without installing
    import lowbit  # noqa: F401
except ImportError:  # pragma: no cover - exercised only outside the venv
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
from common import run_meta, write_results

from lowbit._io import atomic_write_text
from lowbit.quant.base import straight_through
from lowbit.quant.bcgd_relu import bcgd_codes
from lowbit.quant.ste import COARSE_GRADIENTS, coarse_derivative
from lowbit.quant.ste import surrogate as lowbit_surrogate

DTYPE = torch.float64
STES: tuple[str, ...] = (
    "none",
    "identity",
    "relu",
    "clipped_relu",
    "tent",
    "osc:1",
    "osc:2",
)
LOSS_FLOOR = 1e-4  # log-scale plots only


# --------------------------------------------------------------------------------------------
# Staircase activation and STEs
# --------------------------------------------------------------------------------------------


def _check_staircase(a: float, bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits must be an integer >= 1, got {bits!r}")
    if isinstance(a, bool) or not isinstance(a, int | float) or not a > 0 or not math.isfinite(a):
        raise ValueError(f"resolution a must be a finite number > 0, got {a!r}")


def staircase(t: Tensor, a: float, bits: int) -> Tensor:
    """sigma(t) = a clip(ceil(t/a), 0, 2^bits - 1): BCGD's quantized ReLU with a fixed resolution."""
    _check_staircase(a, bits)
    return bcgd_codes(t, torch.as_tensor(a, dtype=t.dtype), bits) * a


@dataclass(frozen=True)
class STE:
    """A straight-through estimator: ``name`` in :data:`STES` (``osc:c`` with any c >= 0)."""

    name: str
    c: float = 0.0

    @classmethod
    def parse(cls, name: str) -> STE:
        if name in ("none", "tent") or name in COARSE_GRADIENTS:
            return cls(name)
        if name.startswith("osc:"):
            try:
                c = float(name[4:])
            except ValueError:
                c = float("nan")
            if not (math.isfinite(c) and c >= 0):
                raise ValueError(f"STE {name!r}: osc:c needs a finite number c >= 0, e.g. 'osc:1.5'")
            return cls(name, c)
        raise ValueError(
            f"unknown STE {name!r}; allowed: none, identity, relu, clipped_relu, tent, osc:c (c >= 0)"
        )

    @property
    def kind(self) -> str:
        return self.name.split(":")[0]

    @property
    def monotone(self) -> bool | None:
        """Whether the surrogate mu is non-decreasing (None for the no-gradient baseline)."""
        if self.kind == "none":
            return None
        if self.kind == "tent":
            return False
        if self.kind == "osc":
            return self.c <= 1.0
        return True

    def surrogate(self, t: Tensor, a: float, top: float) -> Tensor:
        """mu(t); its autograd derivative is :meth:`derivative` (checked by the tests)."""
        if self.kind == "none":
            return 0.0 * t  # constant, but in the graph so that autograd gives mu' = 0
        if self.kind in COARSE_GRADIENTS:
            return lowbit_surrogate(t, self.kind, top)  # type: ignore[arg-type]
        r = torch.relu(t)
        if self.kind == "tent":
            return r - 2.0 * torch.relu(t - top) + torch.relu(t - 2.0 * top)
        return r + self.c * a / (2.0 * math.pi) * torch.sin(2.0 * math.pi * r / a)

    def derivative(self, t: Tensor, a: float, top: float) -> Tensor:
        """mu'(t) in closed form (right-closed intervals, as autograd's relu'(0) = 0 gives)."""
        if self.kind == "none":
            return torch.zeros_like(t)
        if self.kind in COARSE_GRADIENTS:
            return coarse_derivative(t, self.kind, top)  # type: ignore[arg-type]
        pos = (t > 0).to(t.dtype)
        if self.kind == "tent":
            return ((t > 0) & (t <= top)).to(t.dtype) - ((t > top) & (t <= 2.0 * top)).to(t.dtype)
        return (1.0 + self.c * torch.cos(2.0 * math.pi * t / a)) * pos


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


def augment(x: Tensor) -> Tensor:
    """(x, 1): the constant input that plays the bias."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def init_scale(n: int, a: float, bits: int) -> float:
    """c = L a / sqrt(n/3 + 1): a N(0, c^2 I) row gives pre-activations of std ~ L a on U[-1,1]^n."""
    return (2**bits - 1) * a / math.sqrt(n / 3 + 1)


@dataclass
class Teacher:
    W: Tensor  # (m*, d)
    V: Tensor  # (K, m*)
    a: float
    bits: int

    @property
    def classes(self) -> int:
        return self.V.shape[0]

    @property
    def n(self) -> int:
        return self.W.shape[1] - 1

    def logits(self, xa: Tensor) -> Tensor:
        return staircase(xa @ self.W.T, self.a, self.bits) @ self.V.T


def make_teacher(
    n: int, classes: int, width: int, a: float, bits: int, generator: torch.Generator
) -> Teacher:
    """W* rows ~ N(0, c^2 I_{n+1}) (:func:`init_scale`), V* entries ~ N(0, 1)."""
    _check_staircase(a, bits)
    for name, val, lo in (("n", n, 1), ("classes", classes, 2), ("teacher width", width, 1)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}")
    W = torch.randn(width, n + 1, dtype=DTYPE, generator=generator) * init_scale(n, a, bits)
    V = torch.randn(classes, width, dtype=DTYPE, generator=generator)
    return Teacher(W, V, float(a), bits)


def sample(
    teacher: Teacher, size: int, margin: float, generator: torch.Generator, max_draws: int = 200
) -> tuple[Tensor, Tensor]:
    """``size`` points (x~, y), ``size // K`` per class, each with teacher margin >= ``margin``.

    Draws x ~ U[-1, 1]^n in chunks of 20 * size, up to ``max_draws`` chunks; raises ValueError if a
    class cannot be filled (that teacher almost never picks it).
    """
    K = teacher.classes
    if isinstance(size, bool) or not isinstance(size, int) or size < K or size % K:
        raise ValueError(f"size must be a positive multiple of the number of classes {K}, got {size!r}")
    if not (isinstance(margin, int | float) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    quota = size // K
    picked: list[list[Tensor]] = [[] for _ in range(K)]
    have = [0] * K
    for _ in range(max_draws):
        xa = augment(torch.rand(20 * size, teacher.n, dtype=DTYPE, generator=generator) * 2 - 1)
        f = teacher.logits(xa)
        top2 = f.topk(2, dim=1).values
        y = f.argmax(1)
        ok = top2[:, 0] - top2[:, 1] >= margin
        for k in range(K):
            idx = torch.nonzero(ok & (y == k)).flatten()[: quota - have[k]]
            picked[k].append(xa[idx])
            have[k] += idx.numel()
        if min(have) == quota:
            X = torch.cat([torch.cat(p) for p in picked])
            return X, torch.arange(K).repeat_interleave(quota)
    raise ValueError(
        f"the teacher gives too few points with margin >= {margin} in some class (have {have}, need "
        f"{quota} each): lower the margin or draw another teacher"
    )


def make_task(
    n: int, classes: int, width: int, size: int, test_size: int, margin: float, a: float, bits: int, seed: int
) -> dict:
    """Teacher plus train and test sets; redraws the teacher (up to 50 times) if a class is too rare."""
    g = torch.Generator().manual_seed(seed)
    for redraw in range(50):
        teacher = make_teacher(n, classes, width, a, bits, g)
        try:
            X, y = sample(teacher, size, margin, g, max_draws=20)
            Xt, yt = sample(teacher, test_size, margin, g, max_draws=20)
        except ValueError:
            continue
        return {"teacher": teacher, "X": X, "y": y, "X_test": Xt, "y_test": yt, "redraws": redraw}
    raise ValueError(f"no teacher in 50 draws fills every class with margin >= {margin}; lower the margin")


# --------------------------------------------------------------------------------------------
# Model, loss and coarse gradients (batched over independent runs)
# --------------------------------------------------------------------------------------------


def hinge(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Crammer-Singer hinge on logits (R, K, N): per-run mean loss (R,) and dl/dlogits / N (R, K, N)."""
    _, K, N = logits.shape
    classes = torch.arange(K)[:, None]
    onehot = classes == y  # (K, N)
    fy = logits[:, y, torch.arange(N)][:, None, :]
    worst, k = (1.0 + logits - fy).masked_fill(onehot, -math.inf).max(1)  # (R, N)
    active = (worst > 0).to(logits.dtype)[:, None, :] / N
    G = ((classes == k[:, None, :]).to(logits.dtype) - onehot.to(logits.dtype)) * active
    return worst.clamp_min(0).mean(1), G


def check_inputs(X: Tensor, y: Tensor, W: Tensor, V: Tensor) -> None:
    """Shapes: X (N, d), y (N,) int in [0, K), W (R, m, d), V (R, K, m)."""
    if X.dim() != 2 or W.dim() != 3 or V.dim() != 3:
        raise ValueError(
            f"expected X (N, d), W (runs, m, d), V (runs, K, m); got {tuple(X.shape)}, {tuple(W.shape)}, "
            f"{tuple(V.shape)}"
        )
    N, d = X.shape
    R, m, d2 = W.shape
    if d2 != d or V.shape[0] != R or V.shape[2] != m:
        raise ValueError(
            f"shapes disagree: X {tuple(X.shape)}, W {tuple(W.shape)}, V {tuple(V.shape)} "
            "(need W (R, m, d) with d = X.shape[1] and V (R, K, m))"
        )
    if y.shape != (N,) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"y must be an integer tensor of shape ({N},), got {y.dtype} {tuple(y.shape)}")
    if N and (int(y.min()) < 0 or int(y.max()) >= V.shape[1]):
        raise ValueError(f"labels must lie in [0, {V.shape[1]}), got range [{int(y.min())}, {int(y.max())}]")


def coarse_step_terms(
    X: Tensor, y: Tensor, W: Tensor, V: Tensor, ste: STE, a: float, bits: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per run: loss (R,), training error (R,), coarse g_W (R, m, d), exact grad_V (R, K, m).

    Hidden activations are laid out (R, m, N) so that every product is a plain batched matmul."""
    pre = W @ X.T  # (R, m, N)
    h = staircase(pre, a, bits)
    logits = V @ h  # (R, K, N)
    loss, G = hinge(logits, y)
    err = (logits.argmax(1) != y).to(X.dtype).mean(1)
    g_V = G @ h.transpose(1, 2)
    back = (V.transpose(1, 2) @ G) * ste.derivative(pre, a, (2**bits - 1) * a)
    g_W = back @ X
    return loss, err, g_W, g_V


def autograd_coarse_gradient(
    X: Tensor, y: Tensor, W: Tensor, V: Tensor, ste: STE, a: float, bits: int
) -> tuple[Tensor, Tensor]:
    """One run's ``(g_W, grad_V)`` by autograd: forward the staircase exactly, backward mu' via
    ``lowbit.quant.base.straight_through`` (the library's STE construction). Used by the tests."""
    W = W.detach().clone().requires_grad_(True)
    V = V.detach().clone().requires_grad_(True)
    pre = X @ W.T
    h = straight_through(staircase(pre, a, bits), ste.surrogate(pre, a, (2**bits - 1) * a))
    logits = h @ V.T
    rival = (1.0 + logits - logits.gather(1, y[:, None])).scatter(1, y[:, None], -math.inf)
    loss = rival.max(1).values.clamp_min(0).mean()
    gW, gV = torch.autograd.grad(loss, (W, V))
    return gW, gV


def dead_units(X: Tensor, W: Tensor) -> Tensor:
    """Per run, the number of hidden units with pre-activation <= 0 on every training point."""
    return (torch.einsum("nd,rmd->rnm", X, W) <= 0).all(1).sum(1)


def dead_points(X: Tensor, W: Tensor) -> Tensor:
    """Per run, the number of training points on which every hidden unit is off (pre-activation <= 0).

    There all logits are 0, so the hinge loss is exactly 1, and an STE with mu' = 0 for t <= 0 sends
    no gradient from the point to W (nor to V: sigma = 0): the point stays misclassified for good.
    """
    return (torch.einsum("nd,rmd->rnm", X, W) <= 0).all(2).sum(1)


def train(
    X: Tensor,
    y: Tensor,
    W0: Tensor,
    V0: Tensor,
    ste: STE | str,
    a: float,
    bits: int,
    lr: float,
    max_steps: int,
    record_every: int = 50,
) -> dict:
    """Full-batch coarse gradient descent on R runs at once, each stopped at exactly zero loss.

    A run at zero loss is a fixed point (every gradient term is multiplied by dl/df = 0), so it is
    taken out of the batch; its recorded loss is 0 from then on. Returns final ``W``, ``V``,
    ``loss``, ``error`` (R,), ``steps_to_zero_error`` / ``steps_to_zero_loss`` (R,; -1 = never)
    ``curves`` (``step``, mean ``loss`` and ``error`` over runs) and ``loss_runs`` (recorded steps x R).
    Arithmetic in W0's floating dtype.
    """
    ste = STE.parse(ste) if isinstance(ste, str) else ste
    check_inputs(X, y, W0, V0)
    _check_staircase(a, bits)
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"max_steps must be an integer >= 0, got {max_steps!r}")
    if isinstance(record_every, bool) or not isinstance(record_every, int) or record_every < 1:
        raise ValueError(f"record_every must be an integer >= 1, got {record_every!r}")
    if not W0.is_floating_point():
        raise ValueError(f"W0 must be a floating tensor, got {W0.dtype}")
    W, V = W0.clone(), V0.clone().to(W0.dtype)
    X = X.to(W0.dtype)
    R = W.shape[0]
    loss_all = torch.full((R,), math.nan, dtype=W0.dtype)
    err_all = torch.full((R,), math.nan, dtype=W0.dtype)
    to_err = torch.full((R,), -1, dtype=torch.long)
    to_loss = torch.full((R,), -1, dtype=torch.long)
    alive = torch.arange(R)
    Wa, Va = W, V
    curves: dict[str, list[float]] = {"step": [], "loss": [], "error": []}
    loss_runs = []
    for step in range(max_steps + 1):
        loss, err, gW, gV = coarse_step_terms(X, y, Wa, Va, ste, a, bits)
        loss_all[alive], err_all[alive] = loss, err
        newly = alive[(err == 0) & (to_err[alive] < 0)]
        to_err[newly] = step
        done = loss == 0
        if step % record_every == 0 or step == max_steps or bool(done.all()):
            curves["step"].append(step)
            curves["loss"].append(float(loss_all.mean()))
            curves["error"].append(float(err_all.mean()))
            loss_runs.append(loss_all.clone())
        if bool(done.any()):
            to_loss[alive[done]] = step
            W[alive[done]], V[alive[done]] = Wa[done], Va[done]
            keep = ~done
            alive, Wa, Va, gW, gV = alive[keep], Wa[keep], Va[keep], gW[keep], gV[keep]
        if step == max_steps or alive.numel() == 0:
            break
        Wa = Wa - lr * gW
        Va = Va - lr * gV
    W[alive], V[alive] = Wa, Va
    return {
        "W": W,
        "V": V,
        "loss": loss_all,
        "error": err_all,
        "steps_to_zero_error": to_err,
        "steps_to_zero_loss": to_loss,
        "curves": curves,
        "loss_runs": torch.stack(loss_runs),
    }


def error_rate(X: Tensor, y: Tensor, W: Tensor, V: Tensor, a: float, bits: int) -> Tensor:
    """Per-run classification error of the quantized network on (X, y)."""
    logits = torch.einsum("rnm,rkm->rnk", staircase(torch.einsum("nd,rmd->rnm", X, W), a, bits), V)
    return (logits.argmax(2) != y).to(X.dtype).mean(1)


def random_starts(
    runs: int, width: int, n: int, classes: int, a: float, bits: int, seed: int
) -> tuple[Tensor, Tensor]:
    """W rows ~ N(0, c^2 I) like the teacher (:func:`init_scale`), V entries ~ N(0, 1/m)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(runs, width, n + 1, dtype=DTYPE, generator=g) * init_scale(n, a, bits)
    V = torch.randn(runs, classes, width, dtype=DTYPE, generator=g) / math.sqrt(width)
    return W, V


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    n: int = 10  # input dimension (plus the bias input)
    classes: int = 4
    teacher_width: int = 8
    widths: tuple[int, ...] = (16, 32)  # student hidden units: 2x and 4x the teacher
    bits: int = 2  # staircase levels 0, a, 2a, 3a
    a: float = 1.0
    size: int = 400  # training points (balanced)
    test_size: int = 2000
    margin: float = 0.5  # teacher margin of every point
    n_tasks: int = 5  # data sets (teachers)
    starts: int = 10  # random starts per data set, shared by every STE
    max_steps: int = 4000
    record_every: int = 50
    lrs: tuple[float, ...] = (0.3, 1.0)
    pilot_starts: int = 3  # pilot runs use the full max_steps, so the lr suits the whole budget
    stes: tuple[str, ...] = STES
    dtype: str = "float32"  # training arithmetic (data are drawn in float64)
    seed: int = 0
    threads: int = 1
    quick: bool = False

    @classmethod
    def quick_config(cls, seed: int = 0) -> Config:
        return cls(
            widths=(16,),
            n_tasks=2,
            starts=4,
            max_steps=1500,
            pilot_starts=3,
            stes=("none", "identity", "relu", "clipped_relu", "tent", "osc:1", "osc:2"),
            seed=seed,
            quick=True,
        )


def _log(msg: str) -> None:
    print(msg, flush=True)


def _task_seed(cfg: Config, t: int) -> int:
    return 1000 * cfg.seed + t


def _pilot_seed(cfg: Config) -> int:
    return 1000 * cfg.seed + 999  # never a main task's seed (n_tasks < 999)


def _starts(cfg: Config, runs: int, width: int, seed: int) -> tuple[Tensor, Tensor]:
    dt = getattr(torch, cfg.dtype)
    W0, V0 = random_starts(runs, width, cfg.n, cfg.classes, cfg.a, cfg.bits, seed)
    return W0.to(dt), V0.to(dt)


def pick_lr(cfg: Config, ste: STE, width: int) -> tuple[float, dict]:
    """Step size with most pilot runs at zero loss (ties: lower mean final loss), on a pilot data
    set that no reported run uses."""
    task = make_task(
        cfg.n,
        cfg.classes,
        cfg.teacher_width,
        cfg.size,
        cfg.classes,
        cfg.margin,
        cfg.a,
        cfg.bits,
        _pilot_seed(cfg),
    )
    W0, V0 = _starts(cfg, cfg.pilot_starts, width, _pilot_seed(cfg) + 1)
    table = {}
    for lr in cfg.lrs:
        r = train(task["X"], task["y"], W0, V0, ste, cfg.a, cfg.bits, lr, cfg.max_steps, cfg.max_steps)
        table[str(lr)] = {
            "zero_loss": float((r["loss"] == 0).double().mean()),
            "mean_loss": float(r["loss"].mean()),
        }
    best = max(cfg.lrs, key=lambda lr: (table[str(lr)]["zero_loss"], -table[str(lr)]["mean_loss"]))
    return best, table


RUN_FIELDS = (
    "task", "loss", "loss_at_3q", "error", "steps_to_zero_error", "steps_to_zero_loss", "test_error",
    "dead_units", "dead_points", "W_norm", "V_norm",
)  # fmt: skip


def run_ste(cfg: Config, name: str, width: int, tasks: list[dict]) -> dict:
    """All runs of one STE at one width; per-run results as columns (lists over runs, task-major)."""
    ste = STE.parse(name)
    lr, pilot = pick_lr(cfg, ste, width)
    cols: dict[str, list] = {f: [] for f in RUN_FIELDS}
    curves = []
    for t, task in enumerate(tasks):
        W0, V0 = _starts(cfg, cfg.starts, width, _task_seed(cfg, t) + 500)
        r = train(task["X"], task["y"], W0, V0, ste, cfg.a, cfg.bits, lr, cfg.max_steps, cfg.record_every)
        q3 = max(i for i, st in enumerate(r["curves"]["step"]) if st <= 0.75 * cfg.max_steps)
        W, V, X = r["W"].double(), r["V"].double(), task["X"]
        cols["task"] += [t] * cfg.starts
        for f in ("loss", "error", "steps_to_zero_error", "steps_to_zero_loss"):
            cols[f] += r[f].tolist()
        cols["loss_at_3q"] += r["loss_runs"][q3].tolist()
        cols["test_error"] += error_rate(task["X_test"], task["y_test"], W, V, cfg.a, cfg.bits).tolist()
        cols["dead_units"] += dead_units(X, W).tolist()
        cols["dead_points"] += dead_points(X, W).tolist()
        cols["W_norm"] += W.flatten(1).norm(dim=1).tolist()
        cols["V_norm"] += V.flatten(1).norm(dim=1).tolist()
        curves.append(r["curves"])
    return {
        "lr": lr,
        "pilot": pilot,
        "monotone": ste.monotone,
        "runs": cols,
        "curves": _mean_curve(curves, cfg),
    }


def _mean_curve(curves: list[dict], cfg: Config) -> dict:
    """Average the per-task mean curves on the common grid; a task that stopped early (all runs at
    zero loss) stays at its last values (exactly: those runs are fixed points)."""
    grid = list(range(0, cfg.max_steps + 1, cfg.record_every))
    if grid[-1] != cfg.max_steps:
        grid.append(cfg.max_steps)
    out: dict[str, list] = {"step": grid, "loss": [], "error": []}
    for key in ("loss", "error"):
        for s in grid:
            vals = [c[key][max(i for i, st in enumerate(c["step"]) if st <= s)] for c in curves]
            out[key].append(sum(vals) / len(vals))
    return out


def _quantiles(xs: list[float]) -> dict:
    t = torch.tensor(xs, dtype=DTYPE)
    q = torch.quantile(t, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=DTYPE)).tolist()
    return dict(zip(("min", "q25", "median", "q75", "max"), q, strict=True))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(res: dict) -> dict:
    c = res["runs"]
    n = len(c["loss"])
    solved = [lo == 0 for lo in c["loss"]]
    to_err = [s for s in c["steps_to_zero_error"] if s >= 0]
    to_loss = [s for s in c["steps_to_zero_loss"] if s >= 0]
    # an unsolved run is "still falling" if its loss dropped by > 10% over the last quarter of the steps
    falling = [lo < 0.9 * l3 for lo, l3, s in zip(c["loss"], c["loss_at_3q"], solved, strict=True) if not s]
    return {
        "runs": n,
        "lr": res["lr"],
        "monotone": res["monotone"],
        "frac_zero_error": sum(e == 0 for e in c["error"]) / n,
        "frac_zero_loss": sum(solved) / n,
        "unsolved_still_falling": sum(falling),
        "unsolved_with_dead_point": sum(
            d > 0 for d, s in zip(c["dead_points"], solved, strict=True) if not s
        ),
        "unsolved": n - sum(solved),
        "median_steps_to_zero_error": _quantiles(to_err)["median"] if to_err else None,
        "median_steps_to_zero_loss": _quantiles(to_loss)["median"] if to_loss else None,
        "final_loss": _quantiles(c["loss"]),
        "final_error": _quantiles(c["error"]),
        "test_error_mean": _mean(c["test_error"]),
        "dead_units_mean": _mean(c["dead_units"]),
        "W_norm_mean_solved": _mean([w for w, s in zip(c["W_norm"], solved, strict=True) if s]),
        "W_norm_mean_unsolved": _mean([w for w, s in zip(c["W_norm"], solved, strict=True) if not s]),
    }


def _cache_key(cfg: Config) -> str:
    d = asdict(cfg)
    for k in ("threads", "stes", "widths"):
        d.pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def run_benchmark(cfg: Config, out: Path) -> dict:
    """Every width x STE; finished ones are cached in ``out`` so a killed run resumes."""
    torch.set_num_threads(cfg.threads)
    cache_path = out / ".ste_multiclass_cache.json"
    key = _cache_key(cfg)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if cache.get("key") != key:
        cache = {"key": key, "runs": {}}
    tasks = [
        make_task(
            cfg.n,
            cfg.classes,
            cfg.teacher_width,
            cfg.size,
            cfg.test_size,
            cfg.margin,
            cfg.a,
            cfg.bits,
            _task_seed(cfg, t),
        )
        for t in range(cfg.n_tasks)
    ]
    per: dict[str, dict[str, dict]] = {}
    for width in cfg.widths:
        per[str(width)] = {}
        for name in cfg.stes:
            ck = f"{width}/{name}"
            if ck not in cache["runs"]:
                t0 = time.process_time()
                cache["runs"][ck] = run_ste(cfg, name, width, tasks)
                cache["runs"][ck]["cpu_seconds"] = round(time.process_time() - t0, 1)
                out.mkdir(parents=True, exist_ok=True)
                atomic_write_text(cache_path, json.dumps(cache))
            per[str(width)][name] = cache["runs"][ck]
            s = summarize(per[str(width)][name])
            _log(
                f"width {width} {name:13s} lr={s['lr']:<4} zero error {s['frac_zero_error']:.2f}  "
                f"zero loss {s['frac_zero_loss']:.2f}  median final loss {s['final_loss']['median']:.3g}  "
                f"({per[str(width)][name]['cpu_seconds']:.0f} s cpu)"
            )
    return {
        "config": asdict(cfg),
        "tasks": [
            {
                "seed": _task_seed(cfg, t),
                "teacher_redraws": tk["redraws"],
                "class_counts": torch.bincount(tk["y"]).tolist(),
            }
            for t, tk in enumerate(tasks)
        ],
        "summary": {w: {k: summarize(v) for k, v in d.items()} for w, d in per.items()},
        "per_ste": per,
    }


def _pct(summary: dict, keys: list[str]) -> str:
    return ", ".join(f"{k} {summary[k]['frac_zero_error']:.0%}" for k in keys)


def verdict(result: dict) -> list[dict]:
    """The paper's claims next to ours, per student width."""
    rows = []
    for w, summ in result["summary"].items():
        mono = [k for k, s in summ.items() if s["monotone"] and k != "identity"]
        non = [k for k, s in summ.items() if s["monotone"] is False]
        if mono:
            worst = min(summ[k]["frac_zero_error"] for k in mono)
            falling = sum(summ[k]["unsolved_still_falling"] for k in mono)
            dead = sum(summ[k]["unsolved_with_dead_point"] for k in mono)
            unsolved = sum(summ[k]["unsolved"] for k in mono)
            v = "reproduced" if worst == 1.0 else ("partly reproduced" if worst >= 0.5 else "not reproduced")
            rows.append(
                {
                    "width": w,
                    "claim": "monotone STEs (ReLU, clipped ReLU; here also osc:c, c <= 1) reach a global "
                    "minimum, i.e. perfect classification",
                    "ours": f"{_pct(summ, mono)} of runs at zero training error"
                    + (
                        f"; of the {unsolved} unsolved runs, {falling} were still falling and {dead} had a "
                        "dead point"
                        if unsolved
                        else ""
                    ),
                    "verdict": v,
                }
            )
        if non and mono:
            floor = min(summ[k]["frac_zero_error"] for k in mono) - 0.1  # 5 of 50 runs below the worst
            worse = [k for k in non if summ[k]["frac_zero_error"] < floor]
            rows.append(
                {
                    "width": w,
                    "claim": "(implied) without monotonicity the guarantee can fail",
                    "ours": _pct(summ, non),
                    "verdict": f"failures seen: {', '.join(worse)} more than 10 points below the worst "
                    "monotone STE"
                    if worse
                    else "no failure seen: each non-monotone STE within 10 points of the monotone ones",
                }
            )
        if "identity" in summ:
            rows.append(
                {
                    "width": w,
                    "claim": "[R] the class also needs mu' = 0 for t <= 0 (identity: monotone, not that)",
                    "ours": _pct(summ, ["identity"]),
                    "verdict": "consistent (identity fails)"
                    if summ["identity"]["frac_zero_error"] < 0.5
                    else "identity works here too",
                }
            )
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ, per, cfg = result["summary"], result["per_ste"], result["config"]
    widths = list(summ)
    names = list(summ[widths[0]])
    narrow = widths[0]

    def color(k: str) -> str:
        m = summ[narrow][k]["monotone"]
        if m is None:
            return "tab:gray"
        return "tab:red" if not m else ("tab:cyan" if k == "identity" else "tab:blue")

    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    ax = axes[0, 0]
    bw = 0.8 / len(widths)
    for j, w in enumerate(widths):
        xs = [i + (j - (len(widths) - 1) / 2) * bw for i in range(len(names))]
        ax.bar(
            xs,
            [summ[w][k]["frac_zero_error"] for k in names],
            width=bw,
            color=[color(k) for k in names],
            alpha=1.0 if j == 0 else 0.5,
            edgecolor="k",
            lw=0.5,
        )
    ax.set_xticks(range(len(names)), names, rotation=45)
    ax.set_ylabel("fraction of runs at zero training error")
    ax.set_ylim(0, 1.05)
    ax.set_title(
        f"{summ[narrow][names[0]]['runs']} runs per bar; widths {', '.join(widths)} (left to right; "
        "pale = wider). Blue monotone, cyan identity, red non-monotone, gray no STE",
        fontsize=8,
    )
    ax = axes[0, 1]
    cmap = plt.get_cmap("tab10")
    for i, k in enumerate(names):
        c = per[narrow][k]["curves"]
        ax.plot(
            c["step"],
            [max(x, LOSS_FLOOR) for x in c["loss"]],
            color=cmap(i % 10),
            lw=1.2,
            ls="-" if summ[narrow][k]["monotone"] else "--",
            label=f"{k} (lr {summ[narrow][k]['lr']})",
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"mean training hinge loss (floor {LOSS_FLOOR:g})")
    ax.set_title(f"Loss curves, width {narrow} (mean over runs; dashed: non-monotone / no STE)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1, 0]
    for w in widths:
        osc = sorted((STE.parse(k).c, k) for k in names if k.startswith("osc:"))
        if "relu" in names:
            osc = [(0.0, "relu"), *osc]  # osc:0 is the ReLU STE
        ax.plot(
            [c for c, _ in osc], [summ[w][k]["frac_zero_error"] for _, k in osc], "o-", label=f"width {w}"
        )
    ax.axvline(1.0, color="k", lw=0.8, ls=":")
    ax.text(1.03, 0.05, "monotone | non-monotone", fontsize=8)
    ax.set_xlabel("c in mu'(t) = (1 + c cos(2 pi t / a)) 1[t > 0]   (c = 0: ReLU STE)")
    ax.set_ylabel("fraction of runs at zero training error")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("osc:c family: crossing the monotonicity boundary at c = 1", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    for i, k in enumerate(names):
        ls = [max(x, LOSS_FLOOR) for x in per[narrow][k]["runs"]["loss"]]
        ax.scatter(
            [i + 0.3 * ((j * 0.618) % 1 - 0.5) for j in range(len(ls))], ls, s=8, color=color(k), alpha=0.7
        )
    ax.set_xticks(range(len(names)), names, rotation=45)
    ax.set_yscale("log")
    ax.set_ylabel(f"final training loss (0 drawn at {LOSS_FLOOR:g})")
    ax.set_title(f"Final loss of every run, width {narrow}", fontsize=9)
    fig.suptitle(
        f"Monotone STEs, multi-class (Long, Yin, Xin 2021): n={cfg['n']}, K={cfg['classes']}, teacher width "
        f"{cfg['teacher_width']}, {cfg['bits']}-bit staircase, N={cfg['size']}, seed {cfg['seed']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _f(x, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    cfg = result["config"]
    cpu = sum(v.get("cpu_seconds", 0.0) for d in result["per_ste"].values() for v in d.values())
    lines = [
        "# Monotone STEs, multi-class (Long, Yin, Xin, Res. Math. Sci. 2021, arXiv 2011.11256)",
        "",
        f"Command: `{result['command']}` ({'quick' if cfg['quick'] else 'full'} settings; "
        f"{cpu:.0f} s of one core in all, pilots included, {cfg['threads']} thread, torch {result['torch']}; "
        "finished (width, STE) pairs are kept in a resume cache, so the wall time of the last call says "
        "little). Data: `ste_multiclass.json`; plot: `ste_multiclass.png`.",
        "",
        "## Setting (reconstructed from the abstract; details in `benchmarks/ste_multiclass.py`)",
        "",
        f"- Network `f(x) = V sigma(W [x; 1])`, sigma = {cfg['bits']}-bit staircase ReLU "
        f"`a clip(ceil(t/a), 0, {2 ** cfg['bits'] - 1})`, a = {cfg['a']}; student widths "
        f"{', '.join(map(str, cfg['widths']))}; {cfg['classes']} classes; multi-class hinge loss "
        "(0 exactly at margin-1 perfect classification).",
        f"- Data: x ~ U[-1,1]^{cfg['n']}, labels from a random teacher of the same form with "
        f"{cfg['teacher_width']} hidden units; points with teacher margin < {cfg['margin']} rejected; "
        f"{cfg['size'] // cfg['classes']} points per class. {cfg['n_tasks']} data sets x {cfg['starts']} "
        f"random starts = {cfg['n_tasks'] * cfg['starts']} runs per STE and width (same starts for "
        "every STE).",
        f"- Full-batch coarse gradient descent ({cfg['dtype']}), up to {cfg['max_steps']} steps, stopped "
        f"at zero loss (a fixed point). Step size per STE and width from {list(cfg['lrs'])}, picked on a "
        f"separate pilot data set ({cfg['pilot_starts']} starts, same step budget).",
        "",
        "## Results",
    ]
    for w, summ in result["summary"].items():
        lines += [
            "",
            f"### Student width {w}",
            "",
            "| STE | monotone | lr | zero train error | zero loss | unsolved | unsolved: still falling / "
            "with a dead point | median steps to zero error | final loss median / q75 / max | test error "
            "(mean) | mean W norm: solved / unsolved |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k, s in summ.items():
            mono = {None: "no STE", True: "yes", False: "**no**"}[s["monotone"]]
            fl = s["final_loss"]
            lines.append(
                f"| {k} | {mono} | {s['lr']} | {s['frac_zero_error']:.0%} | {s['frac_zero_loss']:.0%} | "
                f"{s['unsolved']} | {s['unsolved_still_falling']} / {s['unsolved_with_dead_point']} | "
                f"{_f(s['median_steps_to_zero_error'], '.0f')} | "
                f"{fl['median']:.3g} / {fl['q75']:.3g} / {fl['max']:.3g} | {s['test_error_mean']:.3f} | "
                f"{_f(s['W_norm_mean_solved'], '.1f')} / {_f(s['W_norm_mean_unsolved'], '.1f')} |"
            )
    lines += [
        "",
        "- 'Still falling': an unsolved run whose loss dropped by more than 10% over the last quarter of the "
        "steps. 'Dead point': a training point on which every hidden unit is off, so all logits are 0 (loss "
        "exactly 1) and no STE with mu' = 0 for t <= 0 can move it. Dead hidden units are in the JSON.",
        "",
        "## The paper's claim beside ours",
        "",
        "| width | claim | ours | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['width']} | {r['claim']} | {r['ours']} | {r['verdict']} |" for r in result["verdict"]]
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def notes(result: dict) -> list[str]:
    """Plain statements of what the numbers show (every number from this run)."""
    out = []
    summ = result["summary"]
    ws = list(summ)
    for w in ws:
        s = summ[w]
        mono = [k for k in s if s[k]["monotone"] and k != "identity"]
        non = [k for k in s if s[k]["monotone"] is False]
        unsolved = {
            k: f"{s[k]['unsolved_still_falling']}/{s[k]['unsolved']}" for k in mono + non if s[k]["unsolved"]
        }
        out.append(
            f"Width {w}: zero training error in {_pct(s, mono + non)}. "
            + (
                "Unsolved runs still falling at the end (falling/unsolved): "
                + ", ".join(f"{k} {v}" for k, v in unsolved.items())
                + "."
                if unsolved
                else "Every monotone and non-monotone run solved."
            )
        )
        dead = {k: s[k]["unsolved_with_dead_point"] for k in mono + non if s[k]["unsolved_with_dead_point"]}
        if dead:
            out.append(
                f"Width {w}: unsolved runs left with at least one dead point (every hidden unit off there: "
                "logits 0, loss 1, and no gradient from it under an STE with mu' = 0 for t <= 0): "
                + ", ".join(f"{k} {v} of {s[k]['unsolved']}" for k, v in dead.items())
                + ". No gradient comes from such a point; it is fixed only if updates driven by other points "
                "happen to switch a unit on there."
            )
        if "identity" in s and s["identity"]["unsolved"]:
            idn = s["identity"]
            ref = [k for k in mono if s[k]["W_norm_mean_solved"] is not None]
            out.append(
                f"Width {w}, identity STE (monotone, but mu' = 1 also for t <= 0: it moves units "
                f"on points where they are off): median final loss {idn['final_loss']['median']:.3g}, "
                f"{idn['unsolved_still_falling']} of {idn['unsolved']} unsolved runs still falling; mean |W| "
                f"at the end {_f(idn['W_norm_mean_unsolved'], '.1f')}, against "
                + ", ".join(f"{k} {s[k]['W_norm_mean_solved']:.1f}" for k in ref)
                + " for the solved runs of the monotone STEs (same starts)."
            )
        if "none" in s:
            out.append(
                f"Width {w}, no STE (only V trained, W frozen at its start): "
                f"{s['none']['frac_zero_error']:.0%} at zero error, median final loss "
                f"{s['none']['final_loss']['median']:.3g}: the hidden layer must learn, and the STE is what "
                "moves it."
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small settings (about a minute), for smoke tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--widths", type=int, nargs="+", help="student widths (default: the config's)")
    p.add_argument("--stes", nargs="+", help=f"STEs (default: {' '.join(STES)}; also osc:c for any c >= 0)")
    args = p.parse_args(argv)
    t0 = time.time()
    cfg = Config.quick_config(args.seed) if args.quick else Config(seed=args.seed)
    cfg.threads = args.threads
    if args.widths:
        if min(args.widths) < 1:
            p.error(f"--widths must be positive integers, got {args.widths}")
        cfg.widths = tuple(args.widths)
    if args.stes:
        for name in args.stes:
            try:
                STE.parse(name)
            except ValueError as e:
                p.error(str(e))
        cfg.stes = tuple(args.stes)
    result = run_benchmark(cfg, args.out)
    result["verdict"] = verdict(result)
    result["notes"] = notes(result)
    # every task's, start's and pilot's seed derives from --seed (_task_seed, _pilot_seed)
    result = {**run_meta(__file__, argv, t0, seeds=[cfg.seed]), **result}
    write_results(args.out, "ste_multiclass", result, markdown(result))
    plot(result, args.out / "ste_multiclass.png")
    (args.out / ".ste_multiclass_cache.json").unlink(missing_ok=True)
    _log(f"wrote {args.out}/ste_multiclass.{{json,md,png}} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
