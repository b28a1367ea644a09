"""Bit-serial popcount GEMMs of activation bit planes with weight bit planes, rows and cols
layouts; see ``kernels.py`` for the notation."""

from __future__ import annotations

import numpy as np

from ._jit import (
    kernel,
    popcount64,
)
from .kernels_threads import num_threads, parallel_for, use_parallel

# ----------------------------------------------------------------------------------------------
# GEMM, rows layout: X (M, ka, Kw), W (O, J, Kw), out (M, O)
# ----------------------------------------------------------------------------------------------


def plane_weights_reference(W: np.ndarray, wshift: np.ndarray, wneg: np.ndarray, K: int) -> np.ndarray:
    """The integer weights ``q[o, r] = sum_j g_j bit_j[o, r]`` of bit planes ``W`` (O, J, Kw), int64."""
    bits = np.unpackbits(np.ascontiguousarray(W).view(np.uint8), axis=-1, bitorder="little")[..., :K]
    g = np.where(wneg, -1, 1) * (np.int64(1) << wshift.astype(np.int64))
    return np.einsum("ojr,j->or", bits.astype(np.int64), g)


def gemm_reference(codes: np.ndarray, W: np.ndarray, wshift: np.ndarray, wneg: np.ndarray, s0: np.ndarray,
                   s1: np.ndarray, s2: np.ndarray, relu: bool = False) -> np.ndarray:
    """NumPy reference of :func:`gemm_rows` / :func:`gemm_cols` on activation codes (M, K):
    ``s1*D + s2*A + s0`` with the exact integer ``D = codes @ q.T`` and ``A = sum_r codes``."""
    codes = np.asarray(codes).astype(np.int64)
    D = codes @ plane_weights_reference(W, wshift, wneg, codes.shape[1]).T
    y = s1 * D + s2 * codes.sum(1, keepdims=True) + s0
    return (np.maximum(y, 0.0) if relu else y).astype(np.float32)


@kernel
def _gemm_rows_range(X, A, W, wshift, wneg, s0, s1, s2, relu, out, o_lo, o_hi):
    M = X.shape[0]
    ka = X.shape[1]
    Kw = X.shape[2]
    J = W.shape[1]
    for o in range(o_lo, o_hi):
        a1 = s1[o]
        a2 = s2[o]
        a0 = s0[o]
        for m in range(M):
            acc = np.int64(0)
            for j in range(J):
                accj = np.int64(0)
                for b in range(ka):
                    s = np.int64(0)
                    for i in range(Kw):
                        s += np.int64(popcount64(W[o, j, i] & X[m, b, i]))
                    accj += s << b
                accj = accj << wshift[j]
                if wneg[j]:
                    acc -= accj
                else:
                    acc += accj
            v = a1 * np.float64(acc) + a2 * np.float64(A[m]) + a0
            if relu and v < 0.0:
                v = 0.0
            out[m, o] = v


def gemm_rows(X, A, W, wshift, wneg, s0, s1, s2, relu=False, out=None):
    """``out[m, o] = s1[o]*D[m, o] + s2[o]*A[m] + s0[o]`` (optionally ReLU), rows layout."""
    M, ka, Kw = X.shape
    O, J, _ = W.shape
    if out is None:
        out = np.empty((M, O), np.float32)
    work = M * O * J * ka * Kw
    parallel_for(_gemm_rows_range, O, X, A, W, wshift, wneg, s0, s1, s2, bool(relu), out,
                 parallel=O >= 64 and use_parallel(work), grain=32)
    return out


# ----------------------------------------------------------------------------------------------
# GEMM, cols layout: X (G, ka, Kw, M), A (G, M), W (G, Og, J, Kw), out (N, G*Og, L), M = N*L
# ----------------------------------------------------------------------------------------------


@kernel
def _gemm_cols_tile(X, A, W, wshift, wneg, s0, s1, s2, relu, out, g, m_lo, m_hi, o_lo, o_hi, D, V):
    """Rows m_lo..m_hi x outputs o_lo..o_hi of group g; D (int64) and V (float64) are scratch."""
    ka = X.shape[1]
    Kw = X.shape[2]
    Og = W.shape[1]
    J = W.shape[2]
    L = out.shape[2]
    T = m_hi - m_lo
    for o in range(o_lo, o_hi):
        for t in range(T):
            D[t] = 0
        for j in range(J):
            neg = wneg[j]
            for b in range(ka):
                sh = wshift[j] + b
                for i in range(Kw):
                    w = W[g, o, j, i]
                    if w == 0:
                        continue
                    xr = X[g, b, i, m_lo:m_hi]
                    if neg:
                        for t in range(T):
                            D[t] -= np.int64(popcount64(w & xr[t])) << sh
                    else:
                        for t in range(T):
                            D[t] += np.int64(popcount64(w & xr[t])) << sh
        oc = g * Og + o
        a1 = s1[oc]
        a2 = s2[oc]
        a0 = s0[oc]
        ar = A[g, m_lo:m_hi]
        for t in range(T):
            V[t] = a1 * np.float64(D[t]) + a2 * np.float64(ar[t]) + a0
        if relu:
            for t in range(T):
                V[t] = max(V[t], 0.0)
        n = m_lo // L
        l = m_lo - n * L
        t = 0
        while t < T:
            run = min(T - t, L - l)
            for k in range(run):
                out[n, oc, l + k] = V[t + k]
            t += run
            l = 0
            n += 1


@kernel
def _gemm_cols_tiles(X, A, W, wshift, wneg, s0, s1, s2, relu, out, TM, n_oc, t_lo, t_hi):
    """Tiles t_lo..t_hi of (group, TM rows, output chunk n_oc of Og)."""
    M = X.shape[3]
    Og = W.shape[1]
    n_mt = (M + TM - 1) // TM
    och = (Og + n_oc - 1) // n_oc
    D = np.empty(TM, np.int64)
    V = np.empty(TM, np.float64)
    for tile in range(t_lo, t_hi):
        g = tile // (n_mt * n_oc)
        rest = tile - g * (n_mt * n_oc)
        mt = rest // n_oc
        oc = rest - mt * n_oc
        m0 = mt * TM
        o0 = oc * och
        _gemm_cols_tile(
            X, A, W, wshift, wneg, s0, s1, s2, relu, out, g, m0, min(M, m0 + TM), o0, min(Og, o0 + och), D, V
        )


def gemm_cols(X, A, W, wshift, wneg, s0, s1, s2, out, relu=False):
    """Cols-layout GEMM + epilogue into ``out`` (N, G*Og, L) float32 (N*L = M)."""
    G, ka, Kw, M = X.shape
    _, Og, J, _ = W.shape
    TM = min(1024, M)
    work = G * Og * J * ka * Kw * M
    par = use_parallel(work)
    n_tiles = G * ((M + TM - 1) // TM)
    n_oc = 1
    while par and n_tiles * n_oc < 2 * num_threads() and n_oc * 2 <= Og:
        n_oc *= 2
    parallel_for(_gemm_cols_tiles, n_tiles * n_oc, X, A, W, wshift, wneg, s0, s1, s2, bool(relu), out,
                 np.int64(TM), np.int64(n_oc), parallel=par)
    return out
