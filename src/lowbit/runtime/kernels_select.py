"""Float activations times weight bit planes: sums of selected inputs (add / subtract only)."""

from __future__ import annotations

import numpy as np

from ._jit import kernel
from .kernels_popcount import plane_weights_reference
from .kernels_threads import parallel_for, use_parallel

# ----------------------------------------------------------------------------------------------
# float activations x plane weights: sums of selected inputs (add / subtract only)
# ----------------------------------------------------------------------------------------------


@kernel
def _select_sum_range(x, W, wshift, wneg, s0, s1, s2, relu, out, o_lo, o_hi):
    """x (M, Kw*64) float32 (zero padded), W (O, J, Kw): D = sum_j g_j sum_{bit_j} x."""
    M = x.shape[0]
    Kw = W.shape[2]
    J = W.shape[1]
    for m in range(M):
        sx = np.float64(0.0)
        for r in range(x.shape[1]):
            sx += np.float64(x[m, r])
        for o in range(o_lo, o_hi):
            acc = np.float64(0.0)
            for j in range(J):
                sj = np.float64(0.0)
                for i in range(Kw):
                    w = W[o, j, i]
                    if w == 0:
                        continue
                    base = i * 64
                    for t in range(64):
                        if (w >> np.uint64(t)) & np.uint64(1):
                            sj += np.float64(x[m, base + t])
                sj *= np.float64(np.int64(1) << wshift[j])
                if wneg[j]:
                    acc -= sj
                else:
                    acc += sj
            v = s1[o] * acc + s2[o] * sx + s0[o]
            if relu and v < 0.0:
                v = 0.0
            out[m, o] = v


def select_sum_reference(x: np.ndarray, W: np.ndarray, wshift: np.ndarray, wneg: np.ndarray, s0: np.ndarray,
                         s1: np.ndarray, s2: np.ndarray, relu: bool = False) -> np.ndarray:
    """NumPy reference of :func:`select_sum` (float64 sums)."""
    x = np.asarray(x, np.float64)
    y = s1 * (x @ plane_weights_reference(W, wshift, wneg, x.shape[1]).T) + s2 * x.sum(1, keepdims=True) + s0
    return (np.maximum(y, 0.0) if relu else y).astype(np.float32)


def select_sum(x, W, wshift, wneg, s0, s1, s2, relu=False, out=None):
    """Float rows ``x`` (M, K) times plane weights ``W`` (O, J, Kw) using only additions:
    ``out = s1*D + s2*sum(x) + s0`` with ``D = sum_j g_j sum_{r: bit_j[o,r]} x[m, r]``."""
    M, K = x.shape
    O, J, Kw = W.shape
    xp = np.zeros((M, Kw * 64), np.float32)
    xp[:, :K] = x
    if out is None:
        out = np.empty((M, O), np.float32)
    work = M * O * J * Kw * 64
    parallel_for(_select_sum_range, O, xp, W, wshift, wneg, s0, s1, s2, bool(relu), out,
                 parallel=O >= 32 and use_parallel(work // 16), grain=16)
    return out
