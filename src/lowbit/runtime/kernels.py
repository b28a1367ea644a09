"""Packed low-bit GEMM kernels (numba): bit-serial popcount products of k-bit activation codes
with weights given as a few bit planes.

Notation (one layer, one group):

- activation codes ``a[m, r]`` in ``[0, 2**ka)`` for row ``m`` (a sample, or an output pixel of a
  convolution after im2col) and reduction index ``r`` (``K`` of them); the activation value is
  ``sx * (a - ma)``.
- weights ``w[o, r] = sw[o] * (l0 + u * sum_j g_j * bit_j[o, r])`` with ``J`` bit planes
  ``bit_j`` and integer plane coefficients ``g_j = (-1)**neg_j * 2**shift_j``: binary weights are
  one plane (``l0=-1, u=2``: ``w = sw*(2*bit - 1)``), ternary weights two planes ``+``/``-``
  (``l0=0``), ``k``-bit uniform weights the ``k`` bit planes of their code.
- the integer products computed by the kernels are exact (int64)::

      D[m, o] = sum_j g_j sum_b 2**b popcount(W_j[o] & X_b[m])   = sum_r (sum_j g_j bit_j[o,r]) a[m,r]
      A[m]    = sum_r a[m, r]

  and the float epilogue gives ``y = s1[o]*D + s2[o]*A + s0[o]`` (then an optional ReLU), with
  ``s1 = alpha*u``, ``s2 = alpha*l0``, ``s0 = beta - alpha*ma*(l0*K + u*C[o])``,
  ``alpha = sw*sx*(bn scale)``, ``C[o] = sum_r sum_j g_j bit_j[o, r]`` (see ``layers.py``).

Bits are packed along the reduction dimension into uint64 words: element ``r`` is bit ``r % 64``
of word ``r // 64``; padding bits are zero in both operands.

Two layouts:

- *rows* (``X[m, b, i]``): for few rows (a Linear layer at batch 1). The inner loop runs over the
  words of one weight row and one activation row and vectorises to ``vpopcntq``.
- *cols* (``X[b, i, m]``): for many rows (convolutions, large batches). The inner loop runs over
  rows ``m`` with one weight word broadcast, so short reductions (3x3x16 = 144 bits) still
  vectorise.

Every driver exists twice: serial and ``parallel=True`` (``prange`` over tiles); the Python
wrappers choose by the amount of work, because a parallel region costs a few microseconds.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ._jit import kernel, popcount64

# Below this many word-operations (about 100-200 us of one core) a kernel runs on one thread:
# a numba parallel region costs microseconds on an idle machine and can cost milliseconds on an
# oversubscribed one (OpenMP barriers spin), so only clearly large work is split.
PARALLEL_MIN_WORK = 1 << 21


def use_parallel(work: int, min_work: int | None = None) -> bool:
    """Run the parallel variant: enough work and more than one numba thread."""
    return work >= (PARALLEL_MIN_WORK if min_work is None else min_work) and numba.get_num_threads() > 1


def num_words(k: int) -> int:
    return (int(k) + 63) // 64


# ----------------------------------------------------------------------------------------------
# activation quantization (fused): code = rint(min(max(x, 0), hi) * mult) in float32
# ----------------------------------------------------------------------------------------------


@kernel
def _qcode(v, mode, hi, mult):
    """mode 0: clip quantizer (PACT / DoReFa formula, float32 ops); mode 1: ``v`` is the code."""
    if mode == 1:
        return np.int64(v)
    t = min(max(v, np.float32(0.0)), hi)
    return np.int64(np.rint(t * mult))


@kernel
def _quantize_serial(x, mode, hi, mult, out):
    for i in range(x.size):
        out[i] = np.uint8(_qcode(x[i], mode, hi, mult))


@kernel(parallel=True)
def _quantize_parallel(x, mode, hi, mult, out):
    n = x.size
    chunk = 16384
    for c in prange((n + chunk - 1) // chunk):
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            out[i] = np.uint8(_qcode(x[i], mode, hi, mult))


def quantize_codes(x: np.ndarray, hi: float, mult: float, mode: int = 0) -> np.ndarray:
    """uint8 codes of float32 ``x`` (any shape): ``rint(clip(x, 0, hi) * mult)``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.uint8)
    f = _quantize_parallel if use_parallel(x.size * 16) else _quantize_serial
    f(x.reshape(-1), np.int64(mode), np.float32(hi), np.float32(mult), out.reshape(-1))
    return out


# ----------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean array along its last axis into uint64 words (bit ``r % 64`` of word
    ``r // 64``); the last word is zero-padded."""
    bits = np.asarray(bits, dtype=bool)
    k = bits.shape[-1]
    kw = num_words(k)
    pad = kw * 64 - k
    if pad:
        bits = np.concatenate([bits, np.zeros((*bits.shape[:-1], pad), bool)], axis=-1)
    by = np.packbits(bits, axis=-1, bitorder="little")
    return np.ascontiguousarray(by).view("<u8").astype(np.uint64, copy=False).reshape(*bits.shape[:-1], kw)


@kernel
def _pack_rows_range(x, mode, hi, mult, ka, X, A, m_lo, m_hi):
    """x (M, K) float32 -> X (M, ka, Kw) bit planes (zeros on entry), A (M,) code sums."""
    K = x.shape[1]
    Kw = X.shape[2]
    buf = np.zeros(Kw * 64, np.uint8)
    for m in range(m_lo, m_hi):
        s = np.int64(0)
        if mode == 1:
            for r in range(K):
                buf[r] = np.uint8(x[m, r])
        else:
            for r in range(K):
                t = min(max(x[m, r], np.float32(0.0)), hi)
                buf[r] = np.uint8(np.rint(t * mult))
        for r in range(K):
            s += np.int64(buf[r])
        A[m] = s
        for b in range(ka):
            for i in range(Kw):
                word = np.uint64(0)
                for t in range(64):
                    word |= np.uint64((buf[i * 64 + t] >> b) & 1) << np.uint64(t)
                X[m, b, i] = word


@kernel
def _pack_rows_serial(x, mode, hi, mult, ka, X, A):
    _pack_rows_range(x, mode, hi, mult, ka, X, A, 0, x.shape[0])


@kernel(parallel=True)
def _pack_rows_parallel(x, mode, hi, mult, ka, X, A):
    M = x.shape[0]
    chunk = 8
    for c in prange((M + chunk - 1) // chunk):
        _pack_rows_range(x, mode, hi, mult, ka, X, A, c * chunk, min(M, (c + 1) * chunk))


def pack_rows(x: np.ndarray, ka: int, hi: float = 0.0, mult: float = 0.0, mode: int = 1):
    """Quantize (mode 0) or take as codes (mode 1) the rows of ``x`` (M, K) and bit-pack them.

    Returns ``X`` (M, ka, Kw) uint64 and ``A`` (M,) int64 (sum of codes of each row)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    M, K = x.shape
    X = np.empty((M, ka, num_words(K)), np.uint64)
    A = np.empty(M, np.int64)
    par = M >= 16 and use_parallel(M * K * ka // 4)
    f = _pack_rows_parallel if par else _pack_rows_serial
    f(x, np.int64(mode), np.float32(hi), np.float32(mult), np.int64(ka), X, A)
    return X, A


@kernel
def _pixel_pack_range(x, mode, hi, mult, ma, ph, pw, P, S, n_lo, n_hi):
    """Quantize x (N, C, H, W) and pack each pixel's channels: P (N, G, ka, Hp, Wp, CWp) bit
    planes (channel c of a group -> bit c % 64 of word c // 64), S (N, G, Hp, Wp) code sums.

    P and S are zero on entry; the border of width (ph, pw) holds the zero-padding code ``ma``."""
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    G = P.shape[1]
    ka = P.shape[2]
    Hp = P.shape[3]
    Wp = P.shape[4]
    CWp = P.shape[5]
    Cg = C // G
    mab = np.int64(ma)
    for n in range(n_lo, n_hi):
        for g in range(G):
            if mab != 0:
                # padding pixels: every channel has code ma
                for hh in range(Hp):
                    for ww in range(Wp):
                        if hh >= ph and hh < ph + H and ww >= pw and ww < pw + W:
                            continue
                        S[n, g, hh, ww] = mab * Cg
                        for cw in range(CWp):
                            nb = min(64, Cg - cw * 64)
                            ones = np.uint64(0xFFFFFFFFFFFFFFFF)
                            if nb < 64:
                                ones = (np.uint64(1) << np.uint64(nb)) - np.uint64(1)
                            for b in range(ka):
                                if (mab >> b) & 1:
                                    P[n, g, b, hh, ww, cw] = ones
            buf = np.empty(W, np.int64)
            for c in range(Cg):
                cc = g * Cg + c
                cw = c >> 6
                bit = np.uint64(c & 63)
                for h in range(H):
                    xr = x[n, cc, h, :]
                    if mode == 1:
                        for w in range(W):
                            buf[w] = np.int64(xr[w])
                    else:
                        for w in range(W):
                            t = min(max(xr[w], np.float32(0.0)), hi)
                            buf[w] = np.int64(np.rint(t * mult))
                    sr = S[n, g, h + ph, pw : pw + W]
                    for w in range(W):
                        sr[w] += buf[w]
                    for b in range(ka):
                        pr = P[n, g, b, h + ph, pw : pw + W, cw]
                        for w in range(W):
                            pr[w] |= np.uint64((buf[w] >> b) & 1) << bit


@kernel
def _im2col_range(P, S, Cg, KH, KW, sh, sw, dh, dw, OH, OW, X, A, n_lo, n_hi):
    """Pixel-packed P (N, G, ka, Hp, Wp, CWp) -> X (G, ka, Kw, M) (zero on entry), A (G, M).

    Reduction index r = (ki*KW + kj)*Cg + c: the Cg channel bits of one input pixel are one
    contiguous run, so a kernel tap costs one shift-or per plane (two when it straddles words)."""
    G = P.shape[1]
    ka = P.shape[2]
    CWp = P.shape[5]
    L = OH * OW
    for n in range(n_lo, n_hi):
        for g in range(G):
            for ki in range(KH):
                for kj in range(KW):
                    base = (ki * KW + kj) * Cg
                    c0 = kj * dw
                    c1 = c0 + sw * (OW - 1) + 1
                    for oh in range(OH):
                        ih = oh * sh + ki * dh
                        m0 = n * L + oh * OW
                        ar = A[g, m0 : m0 + OW]
                        sr = S[n, g, ih, c0:c1:sw]
                        for ow in range(OW):
                            ar[ow] += sr[ow]
                        for cw in range(CWp):
                            off = base + cw * 64
                            q = off >> 6
                            s = np.uint64(off & 63)
                            nb = min(64, Cg - cw * 64)
                            spill = (off & 63) > 0 and (off & 63) + nb > 64
                            rs = np.uint64(64 - (off & 63))
                            for b in range(ka):
                                pr = P[n, g, b, ih, c0:c1:sw, cw]
                                xr = X[g, b, q, m0 : m0 + OW]
                                for ow in range(OW):
                                    xr[ow] |= pr[ow] << s
                                if spill:
                                    xr2 = X[g, b, q + 1, m0 : m0 + OW]
                                    for ow in range(OW):
                                        xr2[ow] |= pr[ow] >> rs


@kernel
def _conv_pack_serial(x, mode, hi, mult, ma, ph, pw, P, S, Cg, KH, KW, sh, sw, dh, dw, OH, OW, X, A):
    N = x.shape[0]
    _pixel_pack_range(x, mode, hi, mult, ma, ph, pw, P, S, 0, N)
    _im2col_range(P, S, Cg, KH, KW, sh, sw, dh, dw, OH, OW, X, A, 0, N)


@kernel(parallel=True)
def _conv_pack_parallel(x, mode, hi, mult, ma, ph, pw, P, S, Cg, KH, KW, sh, sw, dh, dw, OH, OW, X, A):
    N = x.shape[0]
    for n in prange(N):
        _pixel_pack_range(x, mode, hi, mult, ma, ph, pw, P, S, n, n + 1)
        _im2col_range(P, S, Cg, KH, KW, sh, sw, dh, dw, OH, OW, X, A, n, n + 1)


def conv_pack(
    x: np.ndarray,
    ka: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    hi: float = 0.0,
    mult: float = 0.0,
    mode: int = 1,
    ma: int = 0,
):
    """Quantize (mode 0) or take as codes (mode 1) a float32 NCHW batch and im2col it straight
    into bit planes, *cols* layout, reduction order (ki, kj, c).

    Returns ``X`` (G, ka, Kw, M) uint64, ``A`` (G, M) int64 and (OH, OW)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    N, C, H, W = x.shape
    KH, KW = kernel_size
    ph, pw = padding
    OH = (H + 2 * ph - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + 2 * pw - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    Cg = C // groups
    Kred = Cg * KH * KW
    M = N * OH * OW
    P = np.zeros((N, groups, ka, H + 2 * ph, W + 2 * pw, num_words(Cg)), np.uint64)
    S = np.zeros((N, groups, H + 2 * ph, W + 2 * pw), np.int64)
    X = np.zeros((groups, ka, num_words(Kred), M), np.uint64)
    A = np.zeros((groups, M), np.int64)
    work = M * KH * KW * groups * ka * num_words(Cg) + x.size * ka
    f = _conv_pack_parallel if N >= 2 and use_parallel(work * 4) else _conv_pack_serial
    f(
        x, np.int64(mode), np.float32(hi), np.float32(mult), np.int64(ma), np.int64(ph), np.int64(pw),
        P, S, np.int64(Cg), np.int64(KH), np.int64(KW), np.int64(stride[0]), np.int64(stride[1]),
        np.int64(dilation[0]), np.int64(dilation[1]), np.int64(OH), np.int64(OW), X, A,
    )
    return X, A, (OH, OW)


# ----------------------------------------------------------------------------------------------
# GEMM, rows layout: X (M, ka, Kw), W (O, J, Kw), out (M, O)
# ----------------------------------------------------------------------------------------------


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


@kernel
def _gemm_rows_serial(X, A, W, wshift, wneg, s0, s1, s2, relu, out):
    _gemm_rows_range(X, A, W, wshift, wneg, s0, s1, s2, relu, out, 0, W.shape[0])


@kernel(parallel=True)
def _gemm_rows_parallel(X, A, W, wshift, wneg, s0, s1, s2, relu, out):
    O = W.shape[0]
    chunk = 32
    for c in prange((O + chunk - 1) // chunk):
        _gemm_rows_range(X, A, W, wshift, wneg, s0, s1, s2, relu, out, c * chunk, min(O, (c + 1) * chunk))


def gemm_rows(X, A, W, wshift, wneg, s0, s1, s2, relu=False, out=None):
    """``out[m, o] = s1[o]*D[m, o] + s2[o]*A[m] + s0[o]`` (optionally ReLU), rows layout."""
    M, ka, Kw = X.shape
    O, J, _ = W.shape
    if out is None:
        out = np.empty((M, O), np.float32)
    work = M * O * J * ka * Kw
    f = _gemm_rows_parallel if O >= 64 and use_parallel(work) else _gemm_rows_serial
    f(X, A, W, wshift, wneg, s0, s1, s2, bool(relu), out)
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
def _gemm_cols_serial(X, A, W, wshift, wneg, s0, s1, s2, relu, out, TM):
    G = X.shape[0]
    M = X.shape[3]
    Og = W.shape[1]
    D = np.empty(TM, np.int64)
    V = np.empty(TM, np.float64)
    for g in range(G):
        for m0 in range(0, M, TM):
            _gemm_cols_tile(X, A, W, wshift, wneg, s0, s1, s2, relu, out, g, m0, min(M, m0 + TM), 0, Og, D, V)


@kernel(parallel=True)
def _gemm_cols_parallel(X, A, W, wshift, wneg, s0, s1, s2, relu, out, TM, n_oc):
    G = X.shape[0]
    M = X.shape[3]
    Og = W.shape[1]
    n_mt = (M + TM - 1) // TM
    och = (Og + n_oc - 1) // n_oc
    for tile in prange(G * n_mt * n_oc):
        D = np.empty(TM, np.int64)
        V = np.empty(TM, np.float64)
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
    nthreads = numba.get_num_threads()
    if not use_parallel(work):
        _gemm_cols_serial(X, A, W, wshift, wneg, s0, s1, s2, bool(relu), out, TM)
        return out
    n_tiles = G * ((M + TM - 1) // TM)
    n_oc = 1
    while n_tiles * n_oc < 2 * nthreads and n_oc * 2 <= Og:
        n_oc *= 2
    _gemm_cols_parallel(X, A, W, wshift, wneg, s0, s1, s2, bool(relu), out, TM, n_oc)
    return out


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


@kernel
def _select_sum_serial(x, W, wshift, wneg, s0, s1, s2, relu, out):
    _select_sum_range(x, W, wshift, wneg, s0, s1, s2, relu, out, 0, W.shape[0])


@kernel(parallel=True)
def _select_sum_parallel(x, W, wshift, wneg, s0, s1, s2, relu, out):
    O = W.shape[0]
    chunk = 16
    for c in prange((O + chunk - 1) // chunk):
        _select_sum_range(x, W, wshift, wneg, s0, s1, s2, relu, out, c * chunk, min(O, (c + 1) * chunk))


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
    f = _select_sum_parallel if O >= 32 and use_parallel(work // 16) else _select_sum_serial
    f(xp, W, wshift, wneg, s0, s1, s2, bool(relu), out)
    return out
