"""Packed low-bit kernels (numba): bit-serial popcount products of k-bit activation codes with
weights given as a few bit planes, and int8 dot-product convolutions (AVX-512 VNNI).

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

A third family computes the same product with int8 dot products (AVX-512 VNNI, section "int8
convolution" below): activation codes as uint8 in NHWC order, weights as the integers
``w_int = (l0 + u*sum_j g_j bit_j) / unit`` in int8 (``unit = u`` or ``u/2``: +-1 for binary
weights, -1/0/+1 for ternary, odd levels for DoReFa k-bit), 64 multiply-adds per instruction
whatever the weight bit-width, so ``D = sum_r w_int*a`` and no ``A`` term. For the small-channel
convolutions of LeNet-5 and ResNet-20 it is 5-15x faster than the bit-serial kernels (no bit-plane
packing of the activations, which dominated there, and 4 instead of 4-16 popcount steps per 64
products), and 2-4x faster than oneDNN's FP32 convolution. Its epilogue can add a residual
operand and write the next layer's input codes directly (``vnni_tile`` in ``_jit.py``). The
layers use it wherever the CPU has VNNI and the weights fold; the bit-serial kernels remain for
other CPUs, grouped convolutions, float activations and single-row Linear layers (GEMV on
compact bit planes: the weights, not the arithmetic, are the cost there).

Threads: every kernel is a serial numba function over a range (rows, outputs, images or
tiles) that releases the GIL; :func:`parallel_for` splits the range over the runtime's own
Python worker threads when the work is large. There are no numba ``parallel=True`` (OpenMP)
regions: their idle threads spin, and next to PyTorch's own OpenMP pool two spinning pools
steal each other's cores (on a 2-core machine a 0.1 ms batch-1 model took ~10 ms). The thread
count is numba's (``numba.set_num_threads``, thread-local); worker threads run with one.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from ._jit import (
    EPI_CODES,
    EPI_FLOAT,
    EPI_RELU,
    EPI_RESIDUAL,
    VNNI_TILES,
    kernel,
    popcount64,
    vnni_tile_1,
    vnni_tile_2,
    vnni_tile_3,
    vnni_tile_4,
)
from ._jit import (
    HAS_VNNI as HAS_VNNI,  # re-exported: the layers check it here
)

# Below this many word-operations (about 100-200 us of one core) a kernel runs on one thread:
# handing work to a thread costs ~10 us on an idle machine and can cost milliseconds on an
# oversubscribed one, so only clearly large work is split.
PARALLEL_MIN_WORK = 1 << 21

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _serial_worker() -> None:
    numba.set_num_threads(1)  # thread-local: a worker never splits its own work again


def thread_pool(n: int) -> ThreadPoolExecutor:
    """The runtime's pool of ``n`` worker threads (kernels called from them run serially)."""
    with _POOL_LOCK:
        pool = _POOLS.get(n)
        if pool is None:
            pool = ThreadPoolExecutor(n, thread_name_prefix="lowbit-rt", initializer=_serial_worker)
            _POOLS[n] = pool
        return pool


_GET_NUM_THREADS = None


def num_threads() -> int:
    """numba's (thread-local) thread count, read without ``numba.get_num_threads``'s lock."""
    global _GET_NUM_THREADS
    if _GET_NUM_THREADS is None:
        n = numba.get_num_threads()  # launches numba's threading layer once
        from numba.np.ufunc import parallel as _p

        _GET_NUM_THREADS = getattr(_p, "_get_num_threads", None) or numba.get_num_threads
        return n
    n = _GET_NUM_THREADS()
    return n if n > 0 else numba.get_num_threads()


def use_parallel(work: int, min_work: int | None = None) -> bool:
    """Split the work over threads: enough work and more than one thread."""
    return work >= (PARALLEL_MIN_WORK if min_work is None else min_work) and num_threads() > 1


def parallel_for(fn, n: int, *args, parallel: bool = True, grain: int = 1) -> None:
    """``fn(*args, lo, hi)`` over ``[0, n)``: one call, or (``parallel`` and more than one thread)
    one contiguous part per thread, part boundaries multiples of ``grain``; the calling thread
    takes the first part. ``fn`` must be a GIL-releasing kernel."""
    nt = num_threads()
    if not parallel or nt <= 1 or n < 2 * grain:
        fn(*args, 0, n)
        return
    per = -(-n // nt)
    per = -(-per // grain) * grain
    bounds = [(lo, min(n, lo + per)) for lo in range(0, n, per)]
    pool = thread_pool(nt)
    futs = [pool.submit(fn, *args, lo, hi) for lo, hi in bounds[1:]]
    fn(*args, *bounds[0])
    for f in futs:
        f.result()


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
def _quantize_range(x, mode, hi, mult, out, lo, hi_):
    for i in range(lo, hi_):
        out[i] = np.uint8(_qcode(x[i], mode, hi, mult))


def quantize_codes(x: np.ndarray, hi: float, mult: float, mode: int = 0) -> np.ndarray:
    """uint8 codes of float32 ``x`` (any shape): ``rint(clip(x, 0, hi) * mult)``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.uint8)
    parallel_for(_quantize_range, x.size, x.reshape(-1), np.int64(mode), np.float32(hi), np.float32(mult),
                 out.reshape(-1), parallel=use_parallel(x.size * 16), grain=16384)
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


def pack_rows(x: np.ndarray, ka: int, hi: float = 0.0, mult: float = 0.0, mode: int = 1):
    """Quantize (mode 0) or take as codes (mode 1) the rows of ``x`` (M, K) and bit-pack them.

    Returns ``X`` (M, ka, Kw) uint64 and ``A`` (M,) int64 (sum of codes of each row)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    M, K = x.shape
    X = np.empty((M, ka, num_words(K)), np.uint64)
    A = np.empty(M, np.int64)
    par = M >= 16 and use_parallel(M * K * ka // 4)
    parallel_for(_pack_rows_range, M, x, np.int64(mode), np.float32(hi), np.float32(mult), np.int64(ka), X, A,
                 parallel=par, grain=8)
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
def _conv_pack_range(
    x, mode, hi, mult, ma, ph, pw, P, S, Cg, KH, KW, sh, sw, dh, dw, OH, OW, X, A, n_lo, n_hi
):
    _pixel_pack_range(x, mode, hi, mult, ma, ph, pw, P, S, n_lo, n_hi)
    _im2col_range(P, S, Cg, KH, KW, sh, sw, dh, dw, OH, OW, X, A, n_lo, n_hi)


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
    parallel_for(
        _conv_pack_range, N,
        x, np.int64(mode), np.float32(hi), np.float32(mult), np.int64(ma), np.int64(ph), np.int64(pw),
        P, S, np.int64(Cg), np.int64(KH), np.int64(KW), np.int64(stride[0]), np.int64(stride[1]),
        np.int64(dilation[0]), np.int64(dilation[1]), np.int64(OH), np.int64(OW), X, A,
        parallel=use_parallel(work * 4),
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


# ----------------------------------------------------------------------------------------------
# int8 convolution (AVX-512 VNNI): uint8 codes (NHWC) x int8 weights, int32 accumulation
# ----------------------------------------------------------------------------------------------
#
# Layout. The input codes live in one flat uint8 buffer: the zero-padded NHWC image
# (N, Hp, Wp, C) (border pixels hold the padding code ``ma``) followed by INT8_SLACK bytes. For
# an output pixel the reduction is a list of *quads*, 4 consecutive bytes each, at byte offsets
# ``pixel_base + qoff[i]`` with ``pixel_base = ((n*Hp + oh*sh)*Wp + ow*sw)*C``:
#
# - ``run`` order (dilation 1 along the width): for each kernel row ``kh`` the KW*C bytes of the
#   KW neighbouring pixels are one contiguous run of NHWC memory, cut into ceil(KW*C/4) quads
#   (a 5x5 conv on 1 channel: 2 quads per kernel row, not 25 taps; 3x3 on 16 channels: 12);
# - ``tap`` order (dilation > 1): each (kh, kw) tap is its own run of C bytes.
#
# Quad bytes past the end of a run belong to the next pixel (or to the slack) and meet zero
# weights. Weights are int8 (nq, O, 4), split into passes of OB <= 4 blocks of 16 channels; a
# pass is stored as (nq, OB*16, 4), which is what ``vnni_tile`` reads. Linear layers are the
# same with H = W = 1 and C = K.
#
# Why not im2col: the quads are read in place (a quad offset table per layer), so the only pass
# over the activations before the product is quantizing them into the code image, and that pass
# disappears too when the previous layer writes the codes in its epilogue (``EPI_CODES``).
# Output pixels are computed 6-8 at a time against 16-64 output channels, accumulators in
# registers; the float epilogue (per-channel scale and shift with folded batch norm, residual
# addition, ReLU) runs on the registers before anything is stored.

INT8_SLACK = 64
INT8_MIN_PARALLEL_MACS = 1 << 24  # about 100 us of one core


def int8_geometry(KH: int, KW: int, C: int, dh: int, dw: int) -> np.ndarray:
    """Quads of the reduction: (nq, 3) int64 rows ``(kernel row offset in input rows, kernel col
    offset in pixels, byte offset in the run)``; the byte offset of quad ``i`` for a padded image
    of width Wp is ``(a*Wp + b)*C + c``."""
    q = []
    if dw == 1:
        run = KW * C
        for kh in range(KH):
            for j in range(0, run, 4):
                q.append((kh * dh, 0, j))
    else:
        for kh in range(KH):
            for kw in range(KW):
                for j in range(0, C, 4):
                    q.append((kh * dh, kw * dw, j))
    return np.array(q, np.int64).reshape(-1, 3)


def int8_quad_offsets(geom: np.ndarray, Wp: int, C: int) -> np.ndarray:
    return np.ascontiguousarray((geom[:, 0] * Wp + geom[:, 1]) * C + geom[:, 2])


def pack_int8_weights(w_int: np.ndarray, dw: int):
    """Integer weights ``w_int`` (O, KH, KW, C) in [-128, 127] -> (w, passes) for the int8
    kernels: ``w`` int8 flat, ``passes`` int64 (P, 3) rows ``(OB, first channel, byte offset)``.

    Quads follow :func:`int8_geometry` (``dw`` selects run or tap order)."""
    w_int = np.asarray(w_int)
    if w_int.size and (w_int.min() < -128 or w_int.max() > 127):
        raise ValueError("weights do not fit int8")
    O, KH, KW, C = w_int.shape
    geom = int8_geometry(KH, KW, C, 1, dw)
    nq = geom.shape[0]
    Wq = np.zeros((nq, O, 4), np.int8)
    for i in range(nq):
        kh = int(geom[i, 0])
        for t in range(4):
            j = int(geom[i, 2]) + t
            if dw == 1:
                if j < KW * C:
                    Wq[i, :, t] = w_int[:, kh, j // C, j % C]
            else:
                if j < C:
                    Wq[i, :, t] = w_int[:, kh, int(geom[i, 1]) // dw, j]
    nb = (O + 15) // 16
    npass = (nb + 3) // 4
    sizes = [nb // npass + (1 if p < nb % npass else 0) for p in range(npass)]
    parts, passes, b0, off = [], [], 0, 0
    for ob in sizes:
        blk = np.zeros((nq, ob * 16, 4), np.int8)
        o0, o1 = b0 * 16, min(O, (b0 + ob) * 16)
        blk[:, : o1 - o0] = Wq[:, o0:o1]
        parts.append(blk.reshape(-1))
        passes.append((ob, o0, off))
        off += blk.size
        b0 += ob
    return np.ascontiguousarray(np.concatenate(parts)), np.array(passes, np.int64).reshape(-1, 3)


@kernel
def _int8_quantize_range(x, mode, hi, mult, ma, ph, pw, Hp, Wp, cmajor, xq, n_lo, n_hi):
    """Quantize x (N, H, W, C) float32 (any strides) into the padded code image in ``xq``; the
    border gets the padding code ``ma``. Slices keep the indices provably non-negative, so the
    inner loops vectorise; ``cmajor`` (channel stride above the width stride, an NCHW tensor)
    reads along the width instead of along the channels."""
    H = x.shape[1]
    W = x.shape[2]
    C = x.shape[3]
    mab = np.uint8(ma)
    rowlen = Wp * C
    for n in range(n_lo, n_hi):
        img = xq[n * Hp * rowlen : (n + 1) * Hp * rowlen]
        img[: ph * rowlen] = mab
        img[(ph + H) * rowlen :] = mab
        for h in range(H):
            row = img[(h + ph) * rowlen : (h + ph + 1) * rowlen]
            row[: pw * C] = mab
            row[(pw + W) * C :] = mab
            if cmajor:  # NCHW source: read rows of one channel contiguously
                for c in range(C):
                    xr = x[n, h, :, c]
                    dst = row[pw * C + c : (pw + W) * C : C]
                    if mode == 1:
                        for w in range(W):
                            dst[w] = np.uint8(xr[w])
                    else:
                        for w in range(W):
                            t = min(max(xr[w], np.float32(0.0)), hi)
                            dst[w] = np.uint8(np.rint(t * mult))
                continue
            for w in range(W):
                dst = row[(w + pw) * C : (w + pw + 1) * C]
                xr = x[n, h, w, :]
                if mode == 1:
                    for c in range(C):
                        dst[c] = np.uint8(xr[c])
                else:
                    for c in range(C):
                        t = min(max(xr[c], np.float32(0.0)), hi)
                        dst[c] = np.uint8(np.rint(t * mult))


def int8_quantize(x: np.ndarray, padding: tuple[int, int] = (0, 0), hi: float = 0.0, mult: float = 0.0,
                  mode: int = 1, ma: int = 0) -> np.ndarray:
    """Codes of ``x`` (N, H, W, C) float32 (any strides: an NCHW tensor's ``permute(0, 2, 3, 1)``
    works, a channels-last one is read contiguously) as the flat padded uint8 image the int8
    kernels read: (N, H+2ph, W+2pw, C) then INT8_SLACK zero bytes. Mode 0 quantizes with the
    fused clip formula ``rint(clip(x, 0, hi) * mult)``, mode 1 takes the values as codes."""
    N, H, W, C = x.shape
    ph, pw = padding
    Hp, Wp = H + 2 * ph, W + 2 * pw
    xq = np.empty(N * Hp * Wp * C + INT8_SLACK, np.uint8)
    xq[-INT8_SLACK:] = 0
    cmajor = C <= 4 or x.strides[3] > x.strides[2]
    parallel_for(_int8_quantize_range, N, x, np.int64(mode), np.float32(hi), np.float32(mult), np.int64(ma),
                 np.int64(ph), np.int64(pw), np.int64(Hp), np.int64(Wp), cmajor, xq,
                 parallel=use_parallel(x.size * 4, INT8_MIN_PARALLEL_MACS // 4))
    return xq


@kernel
def _int8_conv_range(xq, geo, qoff, w, passes, s0, s1, flags, out, res, codes, cgeo, qhi, qmult, m_lo, m_hi):
    """Output pixels m_lo..m_hi (m = (n, oh, ow)) of the int8 convolution, every pass of output
    channels, with the epilogue of ``vnni_tile`` (``flags``).

    ``geo`` = (Hp, Wp, C, OH, OW, sh, sw, N, O): input image (padded) and output geometry; ``out``
    and ``res`` are (M, O) float32 flat, ``codes`` the next layer's padded image of geometry
    ``cgeo`` = (Hp', Wp', ph', pw') with O channels."""
    Hp = geo[0]
    Wp = geo[1]
    C = geo[2]
    OH = geo[3]
    OW = geo[4]
    sh = geo[5]
    sw = geo[6]
    O = geo[8]
    Hc = cgeo[0]
    Wc = cgeo[1]
    phc = cgeo[2]
    pwc = cgeo[3]
    nq = qoff.shape[0]
    L = OH * OW
    qh = np.float32(qhi)
    qm = np.float32(qmult)
    rows = np.empty(8, np.int64)
    orows = np.empty(8, np.int64)
    crows = np.empty(8, np.int64)
    for p in range(passes.shape[0]):
        OB = passes[p, 0]
        o0 = passes[p, 1]
        wb = passes[p, 2]
        R = VNNI_TILES[OB]
        on = O - o0
        # running output position of the next row, (n, oh, ow) -> byte / element offsets
        n = m_lo // L
        oh = (m_lo - n * L) // OW
        ow = m_lo - n * L - oh * OW
        for m0 in range(m_lo, m_hi, R):
            nv = min(R, m_hi - m0)
            for r in range(nv):
                rows[r] = ((n * Hp + oh * sh) * Wp + ow * sw) * C
                orows[r] = (m0 + r) * O + o0
                crows[r] = ((n * Hc + oh + phc) * Wc + ow + pwc) * O + o0
                ow += 1
                if ow == OW:
                    ow = 0
                    oh += 1
                    if oh == OH:
                        oh = 0
                        n += 1
            for r in range(nv, R):
                rows[r] = rows[nv - 1]
            if OB == 1:
                vnni_tile_1(xq, rows, qoff, nq, w, wb, s0, s1, o0, nv, on, flags, out, orows, res, codes,
                            crows, qh, qm)
            elif OB == 2:
                vnni_tile_2(xq, rows, qoff, nq, w, wb, s0, s1, o0, nv, on, flags, out, orows, res, codes,
                            crows, qh, qm)
            elif OB == 3:
                vnni_tile_3(xq, rows, qoff, nq, w, wb, s0, s1, o0, nv, on, flags, out, orows, res, codes,
                            crows, qh, qm)
            else:
                vnni_tile_4(xq, rows, qoff, nq, w, wb, s0, s1, o0, nv, on, flags, out, orows, res, codes,
                            crows, qh, qm)


_EMPTY_F32 = np.zeros(0, np.float32)
_EMPTY_U8 = np.zeros(0, np.uint8)
_NO_CGEO = np.zeros(4, np.int64)


def int8_conv(
    xq: np.ndarray,
    geo: np.ndarray,
    qoff: np.ndarray,
    w: np.ndarray,
    passes: np.ndarray,
    s0: np.ndarray,
    s1: np.ndarray,
    relu: bool = False,
    out: np.ndarray | None = None,
    res: np.ndarray | None = None,
    codes: np.ndarray | None = None,
    cgeo: np.ndarray | None = None,
    qhi: float = 0.0,
    qmult: float = 0.0,
) -> None:
    """The int8 convolution of the code image ``xq`` (:func:`int8_quantize`) with the weights of
    :func:`pack_int8_weights`, quads ``qoff`` (:func:`int8_quad_offsets`), ``geo`` = (Hp, Wp, C,
    OH, OW, sh, sw, N, O) int64.

    ``y = s1*D + s0`` (+ ``res``) (ReLU) goes to ``out`` (N*OH*OW*O float32, NHWC order) and / or,
    quantized with the next layer's clip formula (``qhi``, ``qmult``), to ``codes``, that layer's
    padded image of geometry ``cgeo`` = (Hp', Wp', ph', pw') (its border must already hold the
    padding code). ``s0``, ``s1`` float64 are zero padded to whole blocks of 16 channels."""
    flags = (EPI_RELU if relu else 0) | (EPI_FLOAT if out is not None else 0)
    flags |= (EPI_RESIDUAL if res is not None else 0) | (EPI_CODES if codes is not None else 0)
    args = (xq, geo, qoff, w, passes, s0, s1, flags,
            _EMPTY_F32 if out is None else out.reshape(-1), _EMPTY_F32 if res is None else res.reshape(-1),
            _EMPTY_U8 if codes is None else codes, _NO_CGEO if cgeo is None else cgeo, float(qhi),
            float(qmult))
    g = geo.tolist()
    M = g[7] * g[3] * g[4]
    macs = M * qoff.shape[0] * 4 * g[8]
    # parts of whole tiles (6 and 8 rows)
    parallel_for(_int8_conv_range, M, *args, parallel=use_parallel(macs, INT8_MIN_PARALLEL_MACS), grain=24)


# ----------------------------------------------------------------------------------------------
# max pooling on codes
# ----------------------------------------------------------------------------------------------


@kernel
def _code_maxpool_range(xq, g, yq, n_lo, n_hi):
    """Max pooling of a padded code image (N, Hp, Wp, C) into another (N, Hc, Wc, C), output
    pixel (oh, ow) at (oh + phc, ow + pwc). ``g`` = (C, Hp, Wp, ph, pw, KH, KW, SH, SW, OH, OW, Hc,
    Wc, phc, pwc, chw). The pool window reads the valid image only (no pool padding). With
    ``chw`` the output is instead (N, C*OH*OW) in (c, oh, ow) order: what ``flatten`` of an NCHW
    tensor gives, the input rows of a following Linear layer."""
    C = g[0]
    Hp = g[1]
    Wp = g[2]
    ph = g[3]
    pw = g[4]
    KH = g[5]
    KW = g[6]
    SH = g[7]
    SW = g[8]
    OH = g[9]
    OW = g[10]
    Hc = g[11]
    Wc = g[12]
    phc = g[13]
    pwc = g[14]
    chw = g[15] != 0
    L = OH * OW
    Wv = (OW - 1) * SW + KW  # input pixels of a row that the windows read
    h = np.empty(Wv * C, np.uint8)
    for n in range(n_lo, n_hi):
        for oh in range(OH):
            # vertical max over the KH input rows: contiguous runs, vectorised
            r0 = ((n * Hp + oh * SH + ph) * Wp + pw) * C
            src = xq[r0 : r0 + Wv * C]
            for j in range(Wv * C):
                h[j] = src[j]
            for kh in range(1, KH):
                rk = r0 + kh * Wp * C
                src = xq[rk : rk + Wv * C]
                for j in range(Wv * C):
                    h[j] = max(h[j], src[j])
            # horizontal max over KW neighbouring pixels
            if chw:
                dst = yq[n * C * L + oh * OW : (n + 1) * C * L]
            else:
                o = ((n * Hc + oh + phc) * Wc + pwc) * C
                dst = yq[o : o + OW * C]
            for ow in range(OW):
                hb = h[ow * SW * C : (ow * SW + KW) * C]
                for c in range(C):
                    m = hb[c]
                    for kw in range(1, KW):
                        m = max(m, hb[kw * C + c])
                    if chw:
                        dst[c * L + ow] = m
                    else:
                        dst[ow * C + c] = m


def code_maxpool(xq: np.ndarray, N: int, g: np.ndarray, yq: np.ndarray) -> None:
    """Max pooling on code images (see ``_code_maxpool_range``). Exact for quantized activations:
    the quantizers are non-decreasing, so the code of the maximum is the maximum of the codes."""
    work = N * int(g[9] * g[10] * g[5] * g[6] * g[0])
    parallel_for(_code_maxpool_range, N, xq, g, yq, parallel=use_parallel(work, INT8_MIN_PARALLEL_MACS // 8))


# ----------------------------------------------------------------------------------------------
# global average pooling of NHWC floats (float64 accumulation)
# ----------------------------------------------------------------------------------------------


@kernel
def _global_avgpool_range(x, out, n_lo, n_hi):
    """out[n, c] = float32(mean over (h, w) of x[n, h, w, c]) with float64 sums; x (N, H, W, C)
    float32 (any strides)."""
    H = x.shape[1]
    W = x.shape[2]
    C = x.shape[3]
    acc = np.empty(C, np.float64)
    hw = np.float64(H * W)
    for n in range(n_lo, n_hi):
        acc[:] = 0.0
        for h in range(H):
            for w in range(W):
                xr = x[n, h, w, :]
                for c in range(C):
                    acc[c] += np.float64(xr[c])
        orow = out[n]
        for c in range(C):
            orow[c] = acc[c] / hw


def global_avgpool(x: np.ndarray) -> np.ndarray:
    """(N, C) float32 means of ``x`` (N, H, W, C) over H and W, summed in float64 (the float32
    result is the exact mean rounded once, whatever the summation order)."""
    N, C = x.shape[0], x.shape[3]
    out = np.empty((N, C), np.float32)
    par = use_parallel(x.size * 4, INT8_MIN_PARALLEL_MACS // 4)
    parallel_for(_global_avgpool_range, N, x, out, parallel=par)
    return out
