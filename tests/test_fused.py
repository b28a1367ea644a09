"""The fused activation-quantizer kernels (lowbit.quant.fused) against the torch formulas they
replace: forward values bit for bit, input gradients exactly, learned-parameter gradients to
float rounding, on several shapes, both kernel variants (one thread and several), and the
fallback cases (non-contiguous, channels-last, float64) that must keep the torch formulas.

The reference implementations below are the quantizers' formulas as they were written before the
kernels existed (autograd through torch ops), copied here so that the comparison does not depend
on the code under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from lowbit.quant import fused
from lowbit.quant.bcgd_relu import A_GRADS, BCGDActivation
from lowbit.quant.dorefa import DoReFaActivation, DoReFaWeight
from lowbit.quant.lsq import LSQActivation, LSQWeight
from lowbit.quant.pact import PACTActivation
from lowbit.quant.uniform import UniformActivation

pytestmark = pytest.mark.skipif(not fused.available(), reason="fused kernels need numba")

STES = ("identity", "relu", "clipped_relu")
# (shape, layout): contiguous and channels-last shapes take the kernels (storage order); the others
# must fall back to torch ops.
# 64*16*16*16 = 262144 elements is above PARALLEL_MIN_NUMEL, so it runs the parallel variant
# when torch has more than one thread.
CASES = [
    ((7,), "contiguous"),
    ((3, 1), "contiguous"),
    ((4, 3, 5, 5), "contiguous"),
    ((64, 16, 16, 16), "contiguous"),
    ((4, 6, 5, 5), "transposed"),
    ((4, 6, 5, 5), "channels_last"),
    ((64, 16, 16, 16), "channels_last"),
    ((4, 3, 5, 5), "float64"),
]


# ---- old formulas ---------------------------------------------------------------------------
def _st(q: Tensor, s: Tensor) -> Tensor:
    return q.detach() + (s - s.detach())


def _surrogate(x: Tensor, ste: str, top: Tensor | float) -> Tensor:
    if ste == "identity":
        return x
    if ste == "relu":
        return torch.relu(x)
    top = top.detach() if isinstance(top, Tensor) else top
    return torch.clamp(torch.relu(x), max=top)


def ref_pact(x: Tensor, alpha_param: Tensor, bits: int) -> Tensor:
    alpha = alpha_param.abs().clamp_min(1e-4)
    y = torch.where(x >= alpha, alpha, torch.relu(x))
    step = (alpha / (2**bits - 1)).detach()
    q = torch.round(y.detach() * ((2**bits - 1) / alpha.detach())) * step
    return _st(q, y)


def ref_dorefa(x: Tensor, bits: int, ste: str) -> Tensor:
    n = 2**bits - 1
    q = torch.round(x.detach().clamp(0, 1) * n) / n
    return _st(q, _surrogate(x, ste, 1.0))


def ref_dorefa_weight(w: Tensor, bits: int) -> Tensor:
    t = torch.tanh(w)
    r = t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5
    n = 2**bits - 1
    q = 2 * (torch.round(r.detach() * n) / n) - 1
    return _st(q, 2 * r - 1)


def ref_uniform(x: Tensor, top: Tensor, levels: int, ste: str) -> Tensor:
    s = top / levels
    q = torch.clamp(torch.round(x.detach() / s), 0, levels) * s
    return _st(q, _surrogate(x, ste, top))


def ref_lsq(v: Tensor, s_param: Tensor, q_n: int, q_p: int, g: float) -> Tensor:
    s = s_param.abs().clamp_min(1e-8)
    s_d, v_d = s.detach(), v.detach()
    x = v_d / s_d
    q = torch.round(torch.clamp(x, -q_n, q_p)) * s_d
    inside = (x > -q_n) & (x < q_p)
    clipped = torch.where(x <= -q_n, torch.full_like(x, -q_n), torch.full_like(x, q_p))
    deriv = torch.where(inside, torch.round(x) - x, clipped)
    sg = s * g
    s_scaled = sg - sg.detach() + s.detach()
    return _st(q, torch.where(inside, v, torch.zeros_like(v)) + s_scaled * deriv)


class RefBCGD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, bits, ste, a_grad, rate_factor):  # type: ignore[no-untyped-def,override]
        a_c = a.detach().clamp(1e-3, 5.0)
        ctx.save_for_backward(x, a_c)
        ctx.conf = (bits, ste, a_grad, rate_factor)
        return torch.clamp(torch.ceil(x / a_c), 0, 2**bits - 1) * a_c

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def,override]
        x, a = ctx.saved_tensors
        bits, ste, mode, rate = ctx.conf
        L = 2**bits - 1
        top = a * L
        if ste == "identity":
            mu = torch.ones_like(x)
        elif ste == "relu":
            mu = (x > 0).to(x.dtype)
        else:
            mu = ((x > 0) & (x <= top)).to(x.dtype)
        d = _bcgd_d(x, a, bits, mode)
        return g * mu, torch.clamp(rate * (g * d).sum(), -1, 1).reshape(a.shape), None, None, None, None


def _bcgd_d(x: Tensor, a: Tensor, bits: int, mode: str) -> Tensor:
    L = 2**bits - 1
    above = x > a * L
    if mode == "ae":
        t = x > a * (L - 1)
        d = torch.where(t, float(L), torch.where((x > 0) & ~t, torch.ceil(x / a), 0.0))
    elif mode == "pact":
        d = torch.where(above, float(L), 0.0)
    else:
        inner = (L + 1) / 2 if mode == "mean" else 1.0
        d = torch.where(above, float(L), torch.where((x > 0) & ~above, inner, 0.0))
    return d.to(x.dtype)


# ---- inputs and comparison ----------------------------------------------------------------------
@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def _inputs(shape: tuple[int, ...], layout: str, scale: float, special: list[float], seed: int) -> Tensor:
    """Random values around the grid, with the boundary values (0, -0, clip levels, rounding
    ties) planted at the start; laid out as asked."""
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        base = torch.randn(shape[0], shape[2], shape[1], *shape[3:], generator=g) * scale
    else:
        base = torch.randn(shape, generator=g) * scale
    flat = base.view(-1)
    sp = torch.tensor(special, dtype=flat.dtype)[: flat.numel()]
    flat[: sp.numel()] = sp
    if layout == "transposed":
        x = base.transpose(1, 2)
    elif layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "float64":
        x = base.double()
    else:
        x = base
    return x


def _expect_fused(x: Tensor) -> bool:
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    return x.dtype == torch.float32 and dense


def _run(f: Callable[[Tensor], Tensor], x: Tensor, params: list[Tensor], up: Tensor
         ) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    xr = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    for p in params:
        p.grad = None
    y = f(xr)
    (y * up).sum().backward()
    return y.detach(), xr.grad, [None if p.grad is None else p.grad.clone() for p in params]


def _compare(fast: tuple, ref: tuple, exact: list[tuple[Tensor, Tensor]] | None = None) -> None:  # type: ignore[type-arg]
    """Forward bit for bit; input gradients exactly (each is ``g`` or 0); learned-parameter
    gradients against the old torch computation (a float32 sum: agreement to its rounding, a few
    1e-6 relative when terms cancel) and, with ``exact``, against the float64 sum of the old
    formula's float32 terms (to 1e-6 relative)."""
    (y, gx, gp), (y0, gx0, gp0) = fast, ref
    assert y.dtype == y0.dtype and y.shape == y0.shape
    assert torch.equal(_bits(y), _bits(y0))  # the sign of zero included
    assert torch.equal(_bits(gx), _bits(gx0))
    for i, (a, b) in enumerate(zip(gp, gp0, strict=True)):
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert torch.allclose(a, b, rtol=2e-5, atol=1e-7), (a, b)
        if exact is not None:
            value, scale = exact[i]
            assert torch.allclose(a.double(), value, rtol=1e-6, atol=1e-7 * float(scale)), (a, value)


def _bits(t: Tensor) -> Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _sum64(terms: Tensor) -> tuple[Tensor, Tensor]:
    """The float64 sum of float32 terms, and the sum of their magnitudes (the rounding scale)."""
    t = terms.double()
    return t.sum(), t.abs().sum()


def _lsq_exact(x: Tensor, s: float, qp: int, g: float, up: Tensor) -> tuple[Tensor, Tensor]:
    v = x / torch.tensor(s, dtype=torch.float32).to(x.dtype)  # the float32 parameter
    inside = (v > 0) & (v < qp)
    d = torch.where(inside, torch.round(v) - v, torch.where(v <= 0, 0.0, float(qp)).to(x.dtype))
    total, scale = _sum64(up * d)
    return total * g, scale * g


def _upstream(x: Tensor, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(x.shape, generator=g, dtype=x.dtype)


# ---- the quantizers -----------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "layout"), CASES)
@pytest.mark.parametrize("bits", [1, 4])
def test_pact(shape: tuple[int, ...], layout: str, bits: int, threads: int) -> None:
    q = PACTActivation(bits, alpha_init=2.0)
    step = 2.0 / (2**bits - 1)
    special = [0.0, -0.0, 2.0, 2.0 + 1e-7, -1.0, 0.5 * step, 1.5 * step, step, 100.0]
    x = _inputs(shape, layout, 1.5, special, seed=bits)
    up = _upstream(x, bits)
    fast = _run(q, x, [q.alpha], up)
    alpha_ref = q.alpha.detach().clone().requires_grad_(True)
    ref = _run(lambda t: ref_pact(t, alpha_ref, bits), x, [alpha_ref], up)
    _compare(fast, ref, [_sum64(up * (x >= 2.0))])
    y = q(x)
    assert (type(y.grad_fn).__name__ == "_PACTBackward") == _expect_fused(x)


@pytest.mark.parametrize(("shape", "layout"), CASES)
@pytest.mark.parametrize("ste", STES)
def test_dorefa(shape: tuple[int, ...], layout: str, ste: str, threads: int) -> None:
    bits = 3
    q = DoReFaActivation(bits, ste=ste)
    special = [0.0, -0.0, 1.0, 1.0 + 1e-7, 1.0 - 1e-7, 0.5 / 7, 1.5 / 7, -2.0, 7.0]
    x = _inputs(shape, layout, 0.8, special, seed=3)
    up = _upstream(x, 3)
    _compare(_run(q, x, [], up), _run(lambda t: ref_dorefa(t, bits, ste), x, [], up))


@pytest.mark.parametrize(("shape", "layout"), CASES)
@pytest.mark.parametrize("ste", STES)
@pytest.mark.parametrize("clip", [None, 1.7])
def test_uniform(shape: tuple[int, ...], layout: str, ste: str, clip: float | None, threads: int) -> None:
    bits = 2
    q = UniformActivation(bits, ste=ste, clip=clip)
    x = _inputs(shape, layout, 1.0, [0.0, -0.0, 1.7, 1.7 + 1e-7, 0.85 / 3, -1.0], seed=5)
    up = _upstream(x, 5)
    q.train()
    fast = _run(q, x, [], up)  # updates the running maximum, then quantizes with it
    top = q.top(x)
    _compare(fast, _run(lambda t: ref_uniform(t, top, 3, ste), x, [], up))


@pytest.mark.parametrize(("shape", "layout"), CASES)
@pytest.mark.parametrize("bits", [2, 4])
def test_lsq_activation(shape: tuple[int, ...], layout: str, bits: int, threads: int) -> None:
    q = LSQActivation(bits)
    with torch.no_grad():
        q.s.fill_(0.3)
        q.initialized.fill_(True)
    qp = 2**bits - 1
    special = [0.0, -0.0, 0.15, 0.45, 0.3 * qp, 0.3 * qp + 1e-6, 0.3 * (qp - 0.5), -0.3, 50.0]
    x = _inputs(shape, layout, 1.0, special, seed=bits)
    up = _upstream(x, bits)
    fast = _run(q, x, [q.s], up)
    s_ref = q.s.detach().clone().requires_grad_(True)
    g = q.g(x)
    ref = _run(lambda t: ref_lsq(t, s_ref, 0, qp, g), x, [s_ref], up)
    _compare(fast, ref, [_lsq_exact(x, 0.3, qp, g, up)])
    assert (type(q(x).grad_fn).__name__ == "_LSQBackward") == _expect_fused(x)


@pytest.mark.parametrize(("shape", "layout"), [((16, 3, 3, 3), "contiguous"), ((10, 64), "contiguous"),
                                               ((8, 6, 3, 3), "transposed"), ((8, 3, 3, 3), "float64")])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_weight(shape: tuple[int, ...], layout: str, bits: int, per_channel: bool) -> None:
    q_n, q_p = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    w = _inputs(shape, layout, 0.2, [0.0, -0.0, 0.05, -0.05, 1.0, -1.0], seed=bits)
    q = LSQWeight(bits, per_channel=per_channel)
    q.initialize(w.detach())
    up = _upstream(w, bits)
    fast = _run(q, w, [q.s], up)
    s_ref = q.s.detach().clone().requires_grad_(True)
    g = q.g(w)
    _compare(fast, _run(lambda t: ref_lsq(t, s_ref, q_n, q_p, g), w, [s_ref], up))
    expect = _expect_fused(w) and not per_channel  # per-channel steps keep the torch formula
    assert (type(q(w).grad_fn).__name__ == "_LSQBackward") == expect


@pytest.mark.parametrize(("shape", "layout"), [((16, 3, 3, 3), "contiguous"), ((10, 84), "contiguous"),
                                               ((8, 6, 3, 3), "transposed"), ((8, 3, 3, 3), "float64")])
@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("tie", [False, True])
def test_dorefa_weight(shape: tuple[int, ...], layout: str, bits: int, tie: bool) -> None:
    # tie: two weights share max|tanh w| (the max's gradient is split between them)
    special = [4.0, -4.0, 0.0, -0.0] if tie else [0.0, -0.0]
    w = _inputs(shape, layout, 0.3, special, seed=bits)
    up = _upstream(w, bits)
    y, gw, _ = _run(DoReFaWeight(bits), w, [], up)
    y0, gw0, _ = _run(lambda t: ref_dorefa_weight(t, bits), w, [], up)
    assert torch.equal(_bits(y), _bits(y0))
    t = torch.tanh(w)
    at_max = t.abs() == t.abs().max()
    # Off the max the gradient is (2 g / d)(1 - t^2) exactly as before; at the max it adds a share of
    # a sum over all elements (float32 in torch, float64 here): equal to its rounding.
    assert torch.equal(_bits(gw[~at_max]), _bits(gw0[~at_max]))
    assert torch.allclose(gw[at_max], gw0[at_max], rtol=2e-5, atol=0)
    if not _expect_fused(w):
        assert torch.equal(_bits(gw), _bits(gw0))  # the torch formula itself
        return
    d = 2 * t.abs().max()
    share = 2 * float((-(2 * up) * t / (d * d)).double().sum()) / int(at_max.sum())
    exact = torch.ops.aten.tanh_backward((2 * up / d + share * torch.sign(t)).double(), t.double())
    assert torch.allclose(gw[at_max].double(), exact[at_max], rtol=1e-6, atol=0)
    y = DoReFaWeight(bits)(w.detach().requires_grad_(True))
    assert type(y.grad_fn).__name__ == "_DoReFaWeightBackward"


@pytest.mark.parametrize(("shape", "layout"), CASES)
@pytest.mark.parametrize("ste", STES)
@pytest.mark.parametrize("a_grad", A_GRADS)
def test_bcgd(shape: tuple[int, ...], layout: str, ste: str, a_grad: str, threads: int) -> None:
    bits, a0, rate = 2, 0.4, 1e-4  # small rate: the resolution's gradient stays inside the clamp
    q = BCGDActivation(bits, ste=ste, a_grad=a_grad, a_init=a0, rate_factor=rate)
    special = [0.0, -0.0, 0.4, 0.8, 1.2, 1.2 + 1e-7, 0.8 + 1e-7, 0.2, -0.5, 9.0]
    x = _inputs(shape, layout, 0.8, special, seed=7)
    up = _upstream(x, 7)
    q.train()
    fast = _run(q, x, [q.a], up)
    a_ref = q.a.detach().clone().requires_grad_(True)
    total, scale = _sum64(up * _bcgd_d(x, torch.tensor(a0), bits, a_grad))
    exact = [(torch.clamp(rate * total, -1, 1), rate * scale)]
    _compare(fast, _run(lambda t: RefBCGD.apply(t, a_ref, bits, ste, a_grad, rate), x, [a_ref], up), exact)


# ---- switches and guards ------------------------------------------------------------------------
def test_switch_off_gives_the_torch_formulas() -> None:
    q = PACTActivation(4, alpha_init=1.0)
    x = torch.randn(2, 3, 4, 4)
    assert type(q(x.requires_grad_(True)).grad_fn).__name__ == "_PACTBackward"
    fused.set_enabled(False)
    try:
        assert not fused.supported(x)
        assert type(q(x).grad_fn).__name__ != "_PACTBackward"
    finally:
        fused.set_enabled(True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_no_fast_path_while_tracing() -> None:
    q = DoReFaActivation(2)
    x = torch.rand(2, 5)
    traced = torch.jit.trace(q, x)  # would fail on a Python autograd.Function holding numpy code
    assert torch.equal(traced(x), q(x))


def test_large_tensor_gradients_of_learned_parameters(threads: int) -> None:
    # A sum over a million elements: the float64 accumulator against torch's float32 sum.
    x = torch.randn(16, 64, 32, 32).abs_() * 0.8
    up = _upstream(x, 11)
    q = LSQActivation(4)
    with torch.no_grad():
        q.s.fill_(0.05)
        q.initialized.fill_(True)
    s_ref = q.s.detach().clone().requires_grad_(True)
    g = q.g(x)
    _compare(_run(q, x, [q.s], up), _run(lambda t: ref_lsq(t, s_ref, 0, 15, g), x, [s_ref], up),
             [_lsq_exact(x, 0.05, 15, g, up)])
    p = PACTActivation(4, alpha_init=1.0)
    a_ref = p.alpha.detach().clone().requires_grad_(True)
    _compare(_run(p, x, [p.alpha], up), _run(lambda t: ref_pact(t, a_ref, 4), x, [a_ref], up),
             [_sum64(up * (x >= 1.0))])


def test_env_switch_disables_kernels() -> None:
    code = ("from lowbit.quant import fused; import torch; "
            "print(fused.available(), fused.supported(torch.ones(3)))")
    env = dict(os.environ, LOWBIT_FUSED="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_nan_and_infinite_upstream_gradients_as_before() -> None:
    # NaN inputs and non-finite upstream gradients go where the torch formulas send them.
    x = torch.tensor([float("nan"), -1.0, 0.0, 0.3, 0.7, 1.0, 2.0, 3.0, float("nan"), 0.5])
    up = torch.tensor([1.0, 2.0, float("inf"), -3.0, float("nan"), 4.0, -5.0, 6.0, float("-inf"), 7.0])

    def same(fast: tuple, ref: tuple) -> None:  # type: ignore[type-arg]
        for a, b in zip(fast[:2], ref[:2], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)

    p = PACTActivation(3, alpha_init=1.0)
    a_ref = p.alpha.detach().clone().requires_grad_(True)
    same(_run(p, x, [p.alpha], up), _run(lambda t: ref_pact(t, a_ref, 3), x, [a_ref], up))
    for ste in STES:
        ref = _run(lambda t: ref_dorefa(t, 2, ste), x, [], up)  # noqa: B023
        same(_run(DoReFaActivation(2, ste=ste), x, [], up), ref)
        top = torch.tensor(1.5)
        u = UniformActivation(2, ste=ste, clip=1.5)
        same(_run(u, x, [], up), _run(lambda t: ref_uniform(t, top, 3, ste), x, [], up))  # noqa: B023
        for a_grad in A_GRADS:
            b = BCGDActivation(2, ste=ste, a_grad=a_grad, a_init=0.4)
            a_ref = b.a.detach().clone().requires_grad_(True)
            same(_run(b, x, [b.a], up),
                 _run(lambda t: RefBCGD.apply(t, a_ref, 2, ste, a_grad, 0.01), x, [a_ref], up))  # noqa: B023
    q = LSQActivation(2)
    with torch.no_grad():
        q.s.fill_(0.3)
        q.initialized.fill_(True)
    s_ref = q.s.detach().clone().requires_grad_(True)
    same(_run(q, x, [q.s], up), _run(lambda t: ref_lsq(t, s_ref, 0, 3, q.g(x)), x, [s_ref], up))
