"""Fused CPU kernels for the quantizers: one memory pass forward and one backward.

Why: an activation quantizer runs on the input of every quantized layer, i.e. on the largest
tensors of a training step (ResNet-20 at batch 128: 2M floats per layer-1 input, 24M per step).
Written as torch ops, PACT, LSQ, DoReFa, uniform and BCGD cost 8-15 elementwise passes forward
and as many backward, and autograd's ``where`` on a random boolean mask is about 25x slower than
a multiply on CPU; that made a W4A4 LSQ training step of ResNet-20 2.8x a float one. Here the
forward of each quantizer is one loop that reads ``x`` and writes the quantized value, and its
backward one loop that reads ``x`` and the incoming gradient, writes the input gradient and
accumulates the gradient of the learned parameter (PACT alpha, LSQ step, BCGD resolution) in
float64: about as fast as a ReLU forward and backward. Weights are small, so there the cost is
the number of torch ops: LSQ weights (per-tensor step) share the LSQ loops, and DoReFa weights
(k >= 2) are a few calls instead of some thirty ops.

Exactness: the loops repeat the torch formulas of the quantizer modules (``pact.py``,
``dorefa.py``, ``uniform.py``, ``lsq.py``, ``bcgd_relu.py``: the math lives there) operation by
operation in float32 without fastmath: the same products, true divisions, ``rint`` (round half to
even, as ``torch.round``), ``ceil`` and comparisons, so forward values are bit-identical (the sign
of zero included) and input gradients are identical (each is ``g`` or 0). The learned
parameter's gradient is the same sum in another order (float64 accumulator; only backward
reductions may be reassociated, so that they vectorise), equal to float rounding; so is the
share of the DoReFa weight gradient that flows through ``max|tanh w|``. ``tests/test_fused.py``
checks all of it against the torch formulas.

Signed activation grids (``signed=True``): LSQ's loops take the bounds ``-Q_N, Q_P`` as given, so
signed LSQ runs here too (checked in ``tests/test_uniform_lsq_wrpn.py``); the uniform and PACT
loops are unsigned only, and those quantizers take their torch formulas when signed.

When: CPU float32 tensors that are contiguous or channels-last contiguous (every loop here is
elementwise with per-tensor parameters, or a sum over all elements, so the loops walk memory in
storage order and the output and gradients take the input's layout), with numba installed.
Anything else (float64 as in gradcheck, CUDA, strided views, tensor subclasses, tracing/ONNX export,
``torch.compile``) takes the torch formula of the quantizer module, as does everything when
``LOWBIT_NUMBA=0`` (alias ``LOWBIT_FUSED=0``) or after ``set_enabled(False)``: the package's one
numba switch, cache and thread policy are in ``lowbit._numba``. numba is imported and the kernels
compiled (or loaded from the on-disk cache) on first use, not when lowbit is imported. The backward
is not itself differentiable (no double backward on the fast path), and the fast path saves the
quantizer's input for the backward (the torch formulas mostly saved masks), so modifying that
input in place before the backward is an autograd error here.

Threads (``lowbit._numba``'s policy: these loops may open numba parallel regions, the runtime's
may not): a tensor of at least ``PARALLEL_MIN_NUMEL`` elements is split over
``torch.get_num_threads()`` numba threads; smaller ones run on one thread (a parallel region costs
microseconds, more on a busy machine).

Alternatives measured (ResNet-20 layer-1 input, PACT forward + backward, one thread): the torch
formulas 12 ms; a custom autograd.Function of torch ops (clamp, in-place scale/round/scale,
``hardtanh_backward``, a dot product for alpha) 3.4 ms; these loops 0.9 ms, the same as
``torch.relu`` forward + backward. ``torch.compile`` (inductor, CPU) took 18 s to compile and its
code ran slower than the eager formulas, so it is not used.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _numba

log = logging.getLogger(__name__)

PARALLEL_MIN_NUMEL = 1 << 17

# Set to numba.prange by _load() before the kernels below are compiled (numba resolves globals at
# compile time); plain ``range`` keeps this module importable, and the loops readable, without numba.
prange = range

_F32 = np.float32
_ZERO = np.float32(0.0)

# Coarse-gradient kinds (ste.py): identity needs no kernel.
_STE = {"identity": 0, "relu": 1, "clipped_relu": 2}
# BCGD resolution-gradient modes (bcgd_relu.A_GRADS).
_A_GRAD = {"mean": 0, "ae": 1, "min": 2, "pact": 3}


# ---- loops (compiled by numba in _load) ---------------------------------------------------------
# Forward loops: ``x`` and ``out`` are 1-D float32; every scalar is a float32 computed by torch
# exactly as the module's formula computes it. ``+ 0`` where the module adds the straight-through
# term ``s - s.detach()`` (exactly 0): it turns a -0 into +0, as that addition does.
def _pact_fwd(x, out, alpha, factor, step):
    """round(where(x >= alpha, alpha, relu(x)) * factor) * step          (pact.py)"""
    for i in prange(x.size):
        v = x[i]
        y = alpha if v >= alpha else (_ZERO if v <= _ZERO else v)
        out[i] = np.rint(y * factor) * step


def _pact_fwd_ref(x, alpha, factor, step):
    """torch reference of ``_pact_fwd`` (returns ``out``)."""
    return torch.round(torch.where(x >= alpha, alpha, torch.relu(x)) * factor) * step


def _dorefa_fwd(x, out, n):
    """round(clamp(x, 0, 1) * n) / n                                    (dorefa.py)"""
    one = np.float32(1.0)
    for i in prange(x.size):
        v = x[i]
        c = _ZERO if v < _ZERO else (one if v > one else v)
        out[i] = np.rint(c * n) / n + _ZERO


def _dorefa_fwd_ref(x, n):
    """torch reference of ``_dorefa_fwd``."""
    return torch.round(torch.clamp(x, 0, 1) * n) / n + 0.0


def _uniform_fwd(x, out, s, levels):
    """clamp(round(x / s), 0, levels) * s                               (uniform.py)"""
    for i in prange(x.size):
        r = np.rint(x[i] / s)
        c = _ZERO if r < _ZERO else (levels if r > levels else r)
        out[i] = c * s + _ZERO


def _uniform_fwd_ref(x, s, levels):
    """torch reference of ``_uniform_fwd``."""
    return torch.clamp(torch.round(x / s), 0, float(levels)) * s + 0.0


def _lsq_fwd(x, out, s, lo, hi):
    """round(clamp(x / s, lo, hi)) * s,  lo = -Q_N, hi = Q_P            (lsq.py)"""
    for i in prange(x.size):
        v = x[i] / s
        c = lo if v < lo else (hi if v > hi else v)
        out[i] = np.rint(c) * s + _ZERO


def _lsq_fwd_ref(x, s, lo, hi):
    """torch reference of ``_lsq_fwd``."""
    return torch.round(torch.clamp(x / s, float(lo), float(hi))) * s + 0.0


def _bcgd_fwd(x, out, a, levels):
    """clamp(ceil(x / a), 0, levels) * a                                (bcgd_relu.py)"""
    for i in prange(x.size):
        r = np.ceil(x[i] / a)
        c = _ZERO if r < _ZERO else (levels if r > levels else r)
        out[i] = c * a


def _bcgd_fwd_ref(x, a, levels):
    """torch reference of ``_bcgd_fwd``."""
    return torch.clamp(torch.ceil(x / a), 0, float(levels)) * a


# Backward loops: ``g`` is the incoming gradient, ``gx`` receives the input gradient; those with a
# learned parameter return the float64 sum of its elementwise derivative times ``g``.
def _coarse_bwd(x, g, gx, kind, top):
    """g * mu'(x): kind 1 relu 1[x > 0], kind 2 clipped relu 1[0 < x <= top]      (ste.py)"""
    if kind == 1:
        for i in prange(x.size):
            gx[i] = _ZERO if x[i] <= _ZERO else g[i]
    else:
        for i in prange(x.size):
            v = x[i]
            gx[i] = g[i] if (v > _ZERO and v <= top) else _ZERO


def _coarse_bwd_ref(x, g, kind, top):
    """torch reference of ``_coarse_bwd`` (returns ``gx``)."""
    if kind == 1:
        return torch.where(x <= 0, 0.0, g)
    return torch.where((x > 0) & (x <= top), g, 0.0)


def _pact_bwd(x, g, gx, alpha):
    """dx = g 1[0 < x < alpha];  dalpha = sum g 1[x >= alpha]"""
    acc = 0.0
    for i in prange(x.size):
        v = x[i]
        gi = g[i]
        gx[i] = _ZERO if (v <= _ZERO or v >= alpha) else gi  # NaN passes, as through relu
        acc += np.float64(gi) if v >= alpha else 0.0
    return acc


def _pact_bwd_ref(x, g, alpha):
    """torch reference of ``_pact_bwd`` (returns ``gx`` and the float64 sum)."""
    gx = torch.where((x <= 0) | (x >= alpha), 0.0, g)
    return gx, float(torch.where(x >= alpha, g, 0.0).double().sum())


def _lsq_bwd(x, g, gx, s, lo, hi):
    """dx = g 1[lo < x/s < hi];  ds = sum g (round(x/s) - x/s inside, lo below, hi above)"""
    acc = 0.0
    for i in prange(x.size):
        v = x[i] / s
        gi = g[i]
        inside = v > lo and v < hi
        gx[i] = gi if inside else _ZERO
        d = (np.rint(v) - v) if inside else (lo if v <= lo else hi)
        acc += np.float64(gi * d)
    return acc


def _lsq_bwd_ref(x, g, s, lo, hi):
    """torch reference of ``_lsq_bwd``."""
    v = x / s
    inside = (v > lo) & (v < hi)
    d = torch.where(inside, torch.round(v) - v, torch.where(v <= lo, lo, hi))
    return torch.where(inside, g, 0.0), float((g * d).double().sum())


def _bcgd_bwd(x, g, gx, kind, top, a, levels, mode, inner_val):
    """dx = g * mu'(x) (kind 0 identity, 1 relu 1[x > 0], 2 clipped relu 1[0 < x <= top], top = L a;
    a product, as in the module);  da = sum g d(x) with d of ``bcgd_a_derivative`` (mode 0/2
    'mean'/'min' with its inner value, 1 'ae', 3 'pact')."""
    acc = 0.0
    one = np.float32(1.0)
    above_at = a * levels
    top_at = a * (levels - one)
    for i in prange(x.size):
        v = x[i]
        gi = g[i]
        if kind == 0:
            mu = one
        elif kind == 1:
            mu = one if v > _ZERO else _ZERO
        else:
            mu = one if (v > _ZERO and v <= top) else _ZERO
        gx[i] = gi * mu
        if mode == 1:
            d = levels if v > top_at else (np.ceil(v / a) if v > _ZERO else _ZERO)
        elif mode == 3:
            d = levels if v > above_at else _ZERO
        else:
            d = levels if v > above_at else (inner_val if v > _ZERO else _ZERO)
        acc += np.float64(gi * d)
    return acc


def _bcgd_bwd_ref(x, g, kind, top, a, levels, mode, inner_val):
    """torch reference of ``_bcgd_bwd``."""
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    mu = one if kind == 0 else torch.where(x > 0 if kind == 1 else (x > 0) & (x <= top), one, zero)
    above_at, top_at = a * levels, a * (levels - 1)
    if mode == 1:
        d = torch.where(x > top_at, levels, torch.where(x > 0, torch.ceil(x / a), 0.0))
    elif mode == 3:
        d = torch.where(x > above_at, levels, 0.0)
    else:
        d = torch.where(x > above_at, levels, torch.where(x > 0, inner_val, 0.0))
    return g * mu, float((g * d).double().sum())


# DoReFa weights (k >= 2): two passes each way over a small tensor, on one thread. ``t = tanh(w)``
# comes from torch (numba's tanh is not torch's to the last bit).
def _dorefa_weight_fwd(t, out, n):
    """out = 2 round((t / d + 1/2) n) / n - 1 (+ 0),  d = 2 max(max|t|, 1e-12); returns (max|t|, d)
    (``dorefa_weight_normalize`` and ``DoReFaWeight.forward``)"""
    m = _ZERO
    for i in range(t.size):
        a = abs(t[i])
        if a > m or a != a:  # NaN propagates, as in torch.max
            m = a
    eps = np.float32(1e-12)
    two = np.float32(2.0)
    one = np.float32(1.0)
    half = np.float32(0.5)
    d = two * (eps if m < eps else m)
    for i in range(t.size):
        r = t[i] / d + half
        out[i] = (np.rint(r * n) / n) * two - one + _ZERO
    return m, d


def _dorefa_weight_fwd_ref(t, n):
    """torch reference of ``_dorefa_weight_fwd`` (returns ``out``, ``m``, ``d``)."""
    m = t.abs().max()
    d = 2 * torch.clamp_min(m, 1e-12)
    return (torch.round((t / d + 0.5) * n) / n) * 2 - 1 + 0.0, m, d


def _dorefa_weight_bwd(t, g, gt, m, d):
    """The gradient for ``t`` of ``2 r - 1``, ``r = t / d + 1/2``, directly and through the max in
    ``d`` (shared evenly by the elements where ``|t|`` is the max, as torch.max does)."""
    two = np.float32(2.0)
    dd = d * d
    acc = 0.0
    count = 0
    for i in range(t.size):
        acc += np.float64((-(g[i] * two) * t[i]) / dd)  # d/dd of (2g) * t / d
        if abs(t[i]) == m:
            count += 1
    gm = np.float32(acc) * two if m >= np.float32(1e-12) else _ZERO  # through 2 * clamp_min(max)
    share = gm / np.float32(max(count, 1))
    for i in range(t.size):
        gi = (g[i] * two) / d
        if abs(t[i]) == m:
            gi += share * np.sign(t[i])
        gt[i] = gi


def _dorefa_weight_bwd_ref(t, g, m, d):
    """torch reference of ``_dorefa_weight_bwd`` (returns ``gt``)."""
    at_max = t.abs() == m
    acc = ((-(g * 2) * t) / (d * d)).double().sum().float()
    gm = acc * 2 if m >= 1e-12 else torch.zeros(())
    share = gm / max(int(at_max.sum()), 1)
    gi = (g * 2) / d
    return torch.where(at_max, gi + share * torch.sign(t), gi)


_FORWARD = ("_pact_fwd", "_dorefa_fwd", "_uniform_fwd", "_lsq_fwd", "_bcgd_fwd")
_BACKWARD = ("_coarse_bwd", "_pact_bwd", "_lsq_bwd", "_bcgd_bwd")
_SERIAL_ONLY = ("_dorefa_weight_fwd", "_dorefa_weight_bwd")
#: each loop's torch reference, defined beside it: the same formula in torch ops on float32 tensors
#: (0-d float32 tensors for the scalars); ``tests/test_kernel_references.py`` compares them
REFERENCES = {
    "_pact_fwd": _pact_fwd_ref,
    "_dorefa_fwd": _dorefa_fwd_ref,
    "_uniform_fwd": _uniform_fwd_ref,
    "_lsq_fwd": _lsq_fwd_ref,
    "_bcgd_fwd": _bcgd_fwd_ref,
    "_coarse_bwd": _coarse_bwd_ref,
    "_pact_bwd": _pact_bwd_ref,
    "_lsq_bwd": _lsq_bwd_ref,
    "_bcgd_bwd": _bcgd_bwd_ref,
    "_dorefa_weight_fwd": _dorefa_weight_fwd_ref,
    "_dorefa_weight_bwd": _dorefa_weight_bwd_ref,
}


# ---- loading ------------------------------------------------------------------------------------
class _Kernels:
    """The compiled loops: ``serial[name]`` and ``parallel[name]``."""

    def __init__(self, numba: Any) -> None:
        self.numba = numba
        self.max_threads = int(numba.config.NUMBA_NUM_THREADS)
        self.serial: dict[str, Any] = {}
        self.parallel: dict[str, Any] = {}
        self.parallel_ok: bool | None = None  # known after the first parallel call
        g = globals()
        for name in _FORWARD + _BACKWARD + _SERIAL_ONLY:
            # Only the backward reductions may be reassociated (vectorised sums); the elementwise
            # math keeps IEEE float32 semantics.
            fm = {"reassoc"} if name in _BACKWARD else False
            # error_model="numpy": IEEE division (no zero-division branch, which would stop
            # vectorisation).
            self.serial[name] = _numba.jit(g[name], fastmath=fm, error_model="numpy")
            if name not in _SERIAL_ONLY:
                self.parallel[name] = _numba.jit(g[name], parallel=True, fastmath=fm, error_model="numpy")


_KERNELS: _Kernels | None = None
_LOAD_FAILED = False


def _load() -> _Kernels | None:
    global _KERNELS, _LOAD_FAILED, prange
    if _KERNELS is not None or _LOAD_FAILED:
        return _KERNELS
    numba = _numba.import_numba()
    if numba is None:  # switched off by the environment, or numba missing
        _LOAD_FAILED = True
        return None
    try:
        prange = numba.prange
        _KERNELS = _Kernels(numba)
    except Exception as e:  # numba broken: the torch formulas stay in use
        log.info("lowbit.quant.fused: fused kernels unavailable (%s); using torch ops", e)
        _LOAD_FAILED = True
    return _KERNELS


def available() -> bool:
    """Whether the fused kernels can run here (numba importable, ``LOWBIT_NUMBA`` / ``LOWBIT_FUSED``
    not 0)."""
    return _load() is not None


def is_enabled() -> bool:
    """``lowbit._numba.enabled()``: the package's switch for its optional numba loops."""
    return _numba.enabled()


def set_enabled(flag: bool) -> None:
    """Switch the fused kernels on or off for this process (tests and benchmarks compare both);
    the same switch as ``lowbit._numba.set_enabled``."""
    _numba.set_enabled(flag)


_PLAIN = (Tensor, torch.nn.Parameter)  # not subclasses with their own dispatch (fake, functional, ...)


def supported(x: Tensor) -> bool:
    """Whether the fused path handles ``x``: a plain float32 CPU tensor (or parameter), contiguous
    or channels-last contiguous, outside tracing and compilation, with numba available."""
    if not _numba.enabled() or type(x) not in _PLAIN:
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if x.dtype != torch.float32 or x.device.type != "cpu" or _layout(x) is None or x.numel() == 0:
        return False
    return not _is_functorch(x) and _load() is not None


def _is_functorch(x: Tensor) -> bool:
    f = getattr(torch._C, "_functorch", None)
    return f is not None and bool(f.is_functorch_wrapped_tensor(x))


def _call(name: str, n: int, *args: Any) -> Any:
    """Run loop ``name`` over ``n`` elements: the parallel variant on ``torch.get_num_threads()``
    numba threads for large tensors, else the serial one."""
    k = _KERNELS
    assert k is not None
    threads = min(torch.get_num_threads(), k.max_threads)
    if n < PARALLEL_MIN_NUMEL or threads <= 1 or k.parallel_ok is False:
        return k.serial[name](*args)
    if k.numba.get_num_threads() != threads:
        k.numba.set_num_threads(threads)
    out = k.parallel[name](*args)
    if k.parallel_ok is None:
        # numba's fallback "workqueue" threading layer aborts the process when two Python threads
        # launch parallel loops at once; with it, stay serial (OpenMP and TBB are safe).
        k.parallel_ok = k.numba.threading_layer() != "workqueue"
    return out


def _layout(t: Tensor) -> torch.memory_format | None:
    """The dense memory format of ``t`` (contiguous first), or None for any other strides."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _flat(t: Tensor) -> np.ndarray:
    """The elements of a dense tensor in storage order (a view, no copy)."""
    t = t.detach()
    if not t.is_contiguous():  # channels-last: NHWC order is the storage order
        t = t.permute(0, 2, 3, 1)
    return t.reshape(-1).numpy()


def _like(g: Tensor, x: Tensor) -> Tensor:
    """``g`` in the memory layout of ``x`` (incoming gradients may come in either)."""
    fmt = _layout(x)
    return g.contiguous(memory_format=fmt) if fmt is not None else g.contiguous()


def _f32(v: Tensor | float) -> np.float32:
    return _F32(float(v))


def _run_forward(name: str, x: Tensor, *scalars: Any) -> Tensor:
    out = torch.empty_like(x)  # keeps the layout of x, so both walk storage in the same order
    _call(name, x.numel(), _flat(x), _flat(out), *scalars)
    return out


def _run_backward(name: str, x: Tensor, g: Tensor, *scalars: Any) -> tuple[Tensor, float]:
    g = _like(g, x)
    gx = torch.empty_like(g)
    acc = _call(name, x.numel(), _flat(x), _flat(g), _flat(gx), *scalars)
    return gx, acc


# ---- autograd functions -------------------------------------------------------------------------
class _PACT(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: Tensor, factor: Tensor, step: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, alpha)
        return _run_forward("_pact_fwd", x, _f32(alpha), _f32(factor), _f32(step))

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, alpha = ctx.saved_tensors
        gx, acc = _run_backward("_pact_bwd", x, g, _f32(alpha))
        return gx, torch.tensor(acc, dtype=alpha.dtype).reshape(alpha.shape), None, None


def pact(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """PACT's forward and gradients (``pact.PACTActivation.forward``) for a 0-d ``alpha`` > 0."""
    n = 2**bits - 1
    a = alpha.detach()
    return _PACT.apply(x, alpha, n / a, a / n)


class _Coarse(torch.autograd.Function):
    """Fixed-grid quantizers (DoReFa, uniform): forward loop ``name``, backward the coarse
    gradient ``kind`` (0 identity, 1 relu, 2 clipped relu with clip level ``top``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, name: str, scalars: tuple[Any, ...], kind: int, top: float) -> Tensor:  # type: ignore[override]
        ctx.kind, ctx.top = kind, top
        if kind:
            ctx.save_for_backward(x)
        return _run_forward(name, x, *scalars)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.kind:
            (x,) = ctx.saved_tensors
            g, _ = _run_backward("_coarse_bwd", x, g, ctx.kind, _F32(ctx.top))
        return g, None, None, None, None


def dorefa_activation(x: Tensor, bits: int, ste: str) -> Tensor:
    """``dorefa.DoReFaActivation.forward``: clip to [0, 1], ``2^bits`` levels, coarse gradient."""
    return _Coarse.apply(x, "_dorefa_fwd", (_F32(2**bits - 1),), _STE[ste], 1.0)


def uniform_activation(x: Tensor, s: Tensor, top: Tensor, levels: int, ste: str) -> Tensor:
    """``uniform.UniformActivation.forward`` for its step ``s = top / levels`` (0-d, detached)."""
    return _Coarse.apply(x, "_uniform_fwd", (_f32(s), _F32(levels)), _STE[ste], float(top))


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, s: Tensor, lo: int, hi: int, g: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, s)
        ctx.bounds = (_F32(lo), _F32(hi))
        ctx.g = g
        return _run_forward("_lsq_fwd", x, _f32(s), *ctx.bounds)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, s = ctx.saved_tensors
        gx, acc = _run_backward("_lsq_bwd", x, grad, _f32(s), *ctx.bounds)
        # lsq_quantize applies the step as scale_grad(s, g) = s*g - (s*g).detach() + s.detach():
        # its backward multiplies the summed gradient by g, in the step's dtype.
        gs = torch.tensor(acc, dtype=s.dtype).reshape(s.shape) * ctx.g
        return gx, gs, None, None, None


def lsq(x: Tensor, s: Tensor, q_n: int, q_p: int, g: float) -> Tensor:
    """``lsq.lsq_quantize(x, s, q_n, q_p, g)`` for a 0-d step ``s``."""
    return _LSQ.apply(x, s, -q_n, q_p, g)


def bcgd_forward(x: Tensor, a: Tensor, levels: int) -> Tensor:
    """``clamp(ceil(x / a), 0, levels) * a`` for the clamped resolution ``a`` (0-d)."""
    return _run_forward("_bcgd_fwd", x, _f32(a), _F32(levels))


def bcgd_backward(
    x: Tensor, g: Tensor, a: Tensor, levels: int, ste: str, a_grad: str
) -> tuple[Tensor, float]:
    """``(g mu'(x), sum g d(x))`` of ``bcgd_relu.BCGDReLUFunction.backward`` (``d`` by ``a_grad``)."""
    top = a * levels
    inner_val = (levels + 1) / 2 if a_grad == "mean" else 1.0
    return _run_backward("_bcgd_bwd", x, g, _STE[ste], _f32(top), _f32(a), _F32(levels),
                         _A_GRAD[a_grad], _F32(inner_val))


class _DoReFaWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: Tensor, bits: int) -> Tensor:  # type: ignore[override]
        t = torch.tanh(w)
        out = torch.empty_like(t)
        k = _KERNELS
        assert k is not None
        ctx.m, ctx.d = k.serial["_dorefa_weight_fwd"](_flat(t), _flat(out), _F32(2**bits - 1))
        ctx.save_for_backward(t)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (t,) = ctx.saved_tensors
        g = _like(g, t)
        gt = torch.empty_like(g)
        k = _KERNELS
        assert k is not None
        k.serial["_dorefa_weight_bwd"](_flat(t), _flat(g), _flat(gt), ctx.m, ctx.d)
        return torch.ops.aten.tanh_backward(gt, t), None  # torch's own tanh derivative


def dorefa_weight(w: Tensor, bits: int) -> Tensor:
    """``dorefa.DoReFaWeight.forward`` for ``bits >= 2``: the same values, gradients to float
    rounding, in a few calls instead of some thirty small torch ops."""
    return _DoReFaWeight.apply(w, bits)
