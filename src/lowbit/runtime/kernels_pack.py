"""Fused activation quantization and bit-plane packing of activation codes (rows layout,
and im2col for convolutions); see ``kernels.py`` for the notation."""

from __future__ import annotations

import numpy as np

from ._jit import kernel
from .kernels_threads import num_words, parallel_for, use_parallel

# ----------------------------------------------------------------------------------------------
# activation quantization (fused): code = rint(min(max(x, 0), hi) * mult) in float32
# ----------------------------------------------------------------------------------------------

#: from this many values :func:`quantize_codes` is split over threads (0.43-1.02x at 2**16-2**18,
#: 1.28-1.87x from 2**19, benchmarks/results/no_amx/stream_split.md; it split from 2**17)
QUANTIZE_MIN_PARALLEL = 1 << 19


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


def quantize_codes_reference(x: np.ndarray, hi: float, mult: float) -> np.ndarray:
    """NumPy reference of :func:`quantize_codes` (mode 0): ``rint(clip(x, 0, hi) * mult)`` in float32."""
    t = np.minimum(np.maximum(np.asarray(x, np.float32), np.float32(0.0)), np.float32(hi))
    return np.rint(t * np.float32(mult)).astype(np.uint8)


def quantize_codes(x: np.ndarray, hi: float, mult: float, mode: int = 0) -> np.ndarray:
    """uint8 codes of float32 ``x`` (any shape): ``rint(clip(x, 0, hi) * mult)``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.uint8)
    parallel_for(_quantize_range, x.size, x.reshape(-1), np.int64(mode), np.float32(hi), np.float32(mult),
                 out.reshape(-1), parallel=use_parallel(x.size, QUANTIZE_MIN_PARALLEL), grain=16384)
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


def _codes_reference(x: np.ndarray, hi: float, mult: float, mode: int) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return (x.astype(np.uint8) if mode == 1 else quantize_codes_reference(x, hi, mult)).astype(np.int64)


def pack_rows_reference(x: np.ndarray, ka: int, hi: float = 0.0, mult: float = 0.0, mode: int = 1):
    """NumPy reference of :func:`pack_rows` (``_pack_rows_range``): the ``ka`` bit planes of each
    row's codes packed by :func:`pack_bits`, and the code sums."""
    codes = _codes_reference(x, hi, mult, mode)
    X = np.stack([pack_bits((codes >> b) & 1) for b in range(ka)], axis=1)
    return X, codes.sum(axis=1)


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


def conv_pack_reference(x, ka, kernel_size, stride, padding, dilation, groups, hi=0.0, mult=0.0, mode=1,
                        ma=0):
    """NumPy reference of :func:`conv_pack` (``_pixel_pack_range`` then ``_im2col_range``): im2col
    of the codes (padding pixels hold code ``ma``) in reduction order (ki, kj, c) per group, then
    :func:`pack_bits` of each bit plane; ``A`` the code sum of each column."""
    codes = _codes_reference(x, hi, mult, mode)
    N, C, H, W = codes.shape
    KH, KW = kernel_size
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    padded = np.pad(codes, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=ma)
    OH = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    OW = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    rh, rw = sh * (OH - 1) + 1, sw * (OW - 1) + 1
    taps = [padded[:, :, ki * dh : ki * dh + rh : sh, kj * dw : kj * dw + rw : sw]
            for ki in range(KH) for kj in range(KW)]  # each (N, C, OH, OW)
    cols = np.stack(taps).transpose(1, 3, 4, 0, 2).reshape(N * OH * OW, KH * KW, groups, C // groups)
    Xs, As = [], []
    for g in range(groups):
        cg = cols[:, :, g, :].reshape(N * OH * OW, -1)  # (M, Kred), r = (ki*KW + kj)*Cg + c
        Xs.append(np.stack([pack_bits((cg >> b) & 1).T for b in range(ka)]))
        As.append(cg.sum(axis=1))
    return np.stack(Xs), np.stack(As), (OH, OW)


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
