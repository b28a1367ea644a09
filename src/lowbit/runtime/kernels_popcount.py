"""Bit-serial popcount GEMMs of activation bit planes with weight bit planes, rows and cols
layouts, and the AVX-512 ``vpopcntq`` GEMM of one-bit activations with one weight plane (W1A1);
see ``kernels.py`` for the notation."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import _F32, _F64, _I32, _I64, HAS_VNNI, _declare, _splat, host_has, kernel, popcount64
from ._llvm_args import Args, i64, load_as, store_as, strided
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


# ----------------------------------------------------------------------------------------------
# W1A1 GEMM on AVX-512 VPOPCNTDQ: X (M, Kw), W (O, Kw) one bit plane each, out (M, O)
# ----------------------------------------------------------------------------------------------


#: the ``vpopcntq`` tile may be used here (AVX-512 VPOPCNTDQ, the plain path not forced)
HAS_VPOPCNT = HAS_VNNI and host_has("avx512vpopcntdq")
#: rows of one tile: 3 rows x 8 outputs keep 24 accumulators, the 3 row vectors and a temporary in
#: the 32 zmm registers (4 x 8 spills); the rows past M overlap the tile before
W1A1_R = 3
#: blocks of 8 outputs whose weights one sweep over the rows reads together (32 KB: L1)
W1A1_CHUNK = 8
#: a split over threads from this much work (rows x outputs x words), in parts of at least
#: W1A1_PART_WORK: on this 2-vCPU EPYC a 4096^2 layer at 8 rows ran 1.1-1.4x slower on 2 threads
#: (8 or 2 parts), 1.2x faster at 16 rows, 1.4-1.5x at 32 (a thread's part costs ~0.1 ms to start)
W1A1_MIN_PARALLEL = 1 << 22
W1A1_PART_WORK = 1 << 20
_V8I64 = ir.VectorType(_I64, 8)
_V8I32 = ir.VectorType(_I32, 8)


def w1a1_weights(W: np.ndarray) -> np.ndarray:
    """One weight plane (O, Kw) uint64 (O >= 8) in the tile's order: blocks of 8 outputs, starting
    at ``min(8*b, O-8)`` (the last overlaps the one before where 8 does not divide O), each as
    ``ceil(Kw/8)`` steps of 8 rows x 8 words (zero padded): (nb, nk, 8, 8). A tile then reads its
    weights as one sequential stream (row by row, 8 streams 512 bytes apart, was slower at 8 rows in
    a one-off probe)."""
    O, Kw = W.shape
    nk = -(-Kw // 8)
    starts = np.minimum(8 * np.arange(-(-O // 8)), O - 8)
    rows = W[starts[:, None] + np.arange(8)]  # (nb, 8, Kw)
    out = np.zeros((len(starts), 8, 8 * nk), np.uint64)
    out[:, :, :Kw] = rows
    return np.ascontiguousarray(out.reshape(len(starts), 8, nk, 8).transpose(0, 2, 1, 3))


def w1a1_reference(X: np.ndarray, Wb: np.ndarray, O: int) -> np.ndarray:
    """NumPy reference of the tile's counts from :func:`w1a1_weights`: ``P[m, o] = popcount(X[m] &
    W[o])`` (int64)."""
    nb, nk = Wb.shape[:2]
    W = Wb.transpose(0, 2, 1, 3).reshape(nb, 8, 8 * nk)
    starts = np.minimum(8 * np.arange(nb), O - 8)
    Wr = np.zeros((O, 8 * nk), np.uint64)
    for b, o0 in enumerate(starts):
        Wr[o0:o0 + 8] = W[b]
    Kw = X.shape[1]
    bits = np.unpackbits(Wr[:, :Kw].view(np.uint8), axis=1, bitorder="little").astype(np.int64)
    return np.unpackbits(X.view(np.uint8), axis=1, bitorder="little").astype(np.int64) @ bits.T


def w1a1_tile(R: int):
    """An intrinsic computing R rows x 8 outputs of a one-bit product and ``gemm_rows``' epilogue::

        tile(X, m, Wb, blk, o0, kw, A, g, s0, s1, s2, relu, out)

    ``X`` (M, kw) uint64 C-contiguous, rows ``m..m+R``; ``Wb`` :func:`w1a1_weights`, block ``blk``
    (outputs ``o0..o0+8``):

    - ``P[r, c] = sum_{i < kw} popcount(X[m+r, i] & W[o0+c, i])``: per 8 words (512 products) and
      pair (r, c) ``vpandq``, ``vpopcntq``, ``vpaddq`` into 8 lanes; the last ``kw % 8`` words by
      masked loads (zeros beyond). A row's 8 accumulators are summed in a 3-level shuffle tree (7
      adds for 8 outputs, not 8 horizontal sums) into one vector of its 8 counts;
    - ``out[m+r, o0+c] = float32(s1[o]*float64(g*P) + s2[o]*float64(A[m+r]) + s0[o])`` (``o = o0+c``;
      ``relu`` != 0: negative values 0), in that order, unfused, 8 outputs per instruction."""

    @intrinsic
    def tile(typingctx, X, m, Wb, blk, o0, kw, A, g, s0, s1, s2, relu, out):
        sig = types.void(X, m, Wb, blk, o0, kw, A, g, s0, s1, s2, relu, out)

        def codegen(context, builder, signature, args):
            a = Args(context, builder, signature, args)
            b = builder
            m, o0, kw = a[1], a[4], a[5]
            nk = b.lshr(b.add(kw, i64(7)), i64(3))
            xr = strided(b, a.ptr(0, _I64), b.mul(m, kw), kw, R)
            wr = strided(b, a.ptr(2, _I64), b.mul(a[3], b.shl(nk, i64(6))), i64(8), 8)
            zero = ir.Constant(_V8I64, [0] * 8)
            ctpop = _declare(b, "llvm.ctpop.v8i64", _V8I64, [_V8I64])
            mload = _declare(b, "llvm.masked.load.v8i64.p0", _V8I64,
                             [_V8I64.as_pointer(), _I32, ir.VectorType(ir.IntType(1), 8), _V8I64])
            accs = [cgutils.alloca_once_value(b, zero) for _ in range(R * 8)]

            def step(k, xload):
                xv = [xload(p) for p in xr]
                for c in range(8):  # one weight vector live at a time (24 + 3 + 2 registers)
                    wv = load_as(b, wr[c], _V8I64, b.shl(k, i64(6)), align=8)
                    for r in range(R):
                        acc = accs[8 * r + c]
                        b.store(b.add(b.load(acc), b.call(ctpop, [b.and_(xv[r], wv)])), acc)

            nfull = b.lshr(kw, i64(3))
            with cgutils.for_range(b, nfull) as loop:
                k = loop.index
                step(k, lambda p: load_as(b, p, _V8I64, b.shl(k, i64(3)), align=8))
            tail = b.and_(kw, i64(7))
            with b.if_then(b.icmp_signed(">", tail, i64(0))):  # the weights' padding words are zero
                lanes = ir.Constant(_V8I32, list(range(8)))
                mask = b.icmp_signed("<", lanes, _splat8(b, b.trunc(tail, _I32)))
                off = b.shl(nfull, i64(3))
                step(nfull, lambda p: b.call(mload, [b.bitcast(b.gep(p, [off]), _V8I64.as_pointer()),
                                                     ir.Constant(_I32, 8), mask, zero]))

            def pairs(u, v, lo, hi):
                return b.add(b.shuffle_vector(u, v, ir.Constant(_V8I32, lo)),
                             b.shuffle_vector(u, v, ir.Constant(_V8I32, hi)))

            f64v = ir.VectorType(_F64, 8)
            c0, c1, c2 = (load_as(b, a.ptr(i, _F64), f64v, o0, align=8) for i in (8, 9, 10))
            gv = _splat8(b, a[7])
            relu = _splat8(b, b.icmp_signed("!=", a[11], i64(0)))
            fzero = ir.Constant(f64v, [0.0] * 8)
            ap = a.ptr(6, _I64, m)
            op = a.ptr(12, _F32)
            out_arr = cgutils.create_struct_proxy(signature.args[12])(context, b, value=a[12])
            O = b.extract_value(out_arr.shape, 1)
            for r in range(R):
                v = [b.load(accs[8 * r + c]) for c in range(8)]
                # lanes [u0+u1, v0+v1, u2+u3, ...], then by pairs of lanes, then by halves
                s = [pairs(v[2 * k], v[2 * k + 1], [0, 8, 2, 10, 4, 12, 6, 14], [1, 9, 3, 11, 5, 13, 7, 15])
                     for k in range(4)]
                t = [pairs(s[2 * k], s[2 * k + 1], [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])
                     for k in range(2)]
                u = pairs(t[0], t[1], [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])
                am = _splat8(b, b.sitofp(b.load(b.gep(ap, [i64(r)])), _F64))
                y = b.fadd(b.fadd(b.fmul(c1, b.sitofp(b.mul(gv, u), f64v)), b.fmul(c2, am)), c0)
                y = b.select(b.and_(relu, b.fcmp_ordered("<", y, fzero)), fzero, y)
                at = b.add(b.mul(b.add(m, i64(r)), O), o0)
                store_as(b, b.fptrunc(y, ir.VectorType(_F32, 8)), op, at, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


def _splat8(builder: ir.IRBuilder, x):
    """``x`` in the 8 lanes of a vector."""
    return _splat(builder, x, ir.VectorType(x.type, 8))


# tiles of 3 rows, and of 1 and 2 for one and two rows (a batch-1 call: the weights stream once, at
# one bit each, so the product runs at the memory's pace)
_w1a1_tile1, _w1a1_tile2, _w1a1_tile3 = (w1a1_tile(r) for r in (1, 2, 3)) if HAS_VPOPCNT else (None,) * 3


@kernel
def _w1a1_range(X, A, Wb, O, g, s0, s1, s2, relu, out, b_lo, b_hi):
    """Blocks b_lo..b_hi of 8 outputs, every row in tiles of W1A1_R rows (the last overlapping; one
    and two rows: one tile of theirs), the blocks of a chunk together per tile row."""
    M = X.shape[0]
    Kw = X.shape[1]
    R = min(M, W1A1_R)
    for c_lo in range(b_lo, b_hi, W1A1_CHUNK):
        c_hi = min(b_hi, c_lo + W1A1_CHUNK)
        for m0 in range(0, M, R):
            m = min(m0, M - R)
            for blk in range(c_lo, c_hi):
                o0 = min(8 * blk, O - 8)
                if R == 3:
                    _w1a1_tile3(X, m, Wb, blk, o0, Kw, A, g, s0, s1, s2, relu, out)
                elif R == 2:
                    _w1a1_tile2(X, m, Wb, blk, o0, Kw, A, g, s0, s1, s2, relu, out)
                else:
                    _w1a1_tile1(X, m, Wb, blk, o0, Kw, A, g, s0, s1, s2, relu, out)


def gemm_w1a1(X: np.ndarray, A: np.ndarray, Wb: np.ndarray, O: int, g: int, s0: np.ndarray, s1: np.ndarray,
              s2: np.ndarray, relu: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """``out[m, o] = s1[o]*D[m, o] + s2[o]*A[m] + s0[o]`` (optionally ReLU) with ``D = g *
    popcount(X[m] & W[o])``: one-bit activation codes ``X`` (M, Kw) uint64, one weight plane of
    ``O`` outputs as :func:`w1a1_weights` ``Wb``, coefficient ``g`` (``±2**shift``); ``gemm_rows``
    with J = ka = 1 and the same float64 epilogue, so the same outputs bit for bit. Needs
    :data:`HAS_VPOPCNT`."""
    M, Kw = X.shape
    if _w1a1_tile3 is None or M < 1 or O < 8 or Wb.shape != (-(-O // 8), -(-Kw // 8), 8, 8):
        raise ValueError(f"gemm_w1a1: X {X.shape}, weights {Wb.shape} for {O} outputs: needs AVX-512 "
                         f"VPOPCNTDQ (here: {HAS_VPOPCNT}), rows and w1a1_weights of a plane of >= 8 "
                         f"outputs with the rows' {Kw} words")
    if X.dtype != np.uint64 or Wb.dtype != np.uint64:
        raise ValueError(f"gemm_w1a1: X and the weights must be uint64 words, got {X.dtype} and {Wb.dtype}")
    if out is None:
        out = np.empty((M, O), np.float32)
    if out.shape != (M, O) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"gemm_w1a1: out must be C-contiguous float32 ({M}, {O}), got {out.dtype} "
                         f"{out.shape}")
    for name, c in (("s0", s0), ("s1", s1), ("s2", s2)):
        if c.dtype != np.float64 or c.shape[0] < O:
            raise ValueError(f"gemm_w1a1: {name} must be float64 with >= {O} entries, got {c.dtype} "
                             f"{c.shape}")
    parallel_for(_w1a1_range, Wb.shape[0], np.ascontiguousarray(X), A.astype(np.int64, copy=False), Wb,
                 np.int64(O), np.int64(g), s0, s1, s2, np.int64(relu), out,
                 parallel=use_parallel(M * O * Kw, W1A1_MIN_PARALLEL),
                 grain=max(1, W1A1_PART_WORK // (8 * M * Kw)))
    return out
