"""Many-row GEMM on ternary weights by sign-symmetric base-3 table lookup, exact in integer
arithmetic: three weights per lookup where :mod:`kernels_gemm`'s 4-bit tables take two.

Math (one layer; see ``kernels.py`` for the notation). The weights are ``w_int = l * p`` with
``p[o, r]`` in {-1, 0, 1} (symmetric ternary levels -l, 0, l). The reduction is cut into groups
of three consecutive indices; a group's pattern ``(p0, p1, p2)`` and its negation have opposite
dot products, so a group is stored as a sign ``sg[o, g]`` (+-1) and a *canonical* pattern, the one
of the pair whose last nonzero entry is +1 (13 of them, and the zero pattern: 14 indices ``c``,
``n = 13 + c`` in base 3 with digits ``p_i + 1``). For activation row ``m`` the table of group
``g`` lists each canonical pattern's dot product, offset by ``B`` so that it is a byte >= 0::

    T[m, g, c] = B + l * sum_{i < 3} p_i(13 + c) * a[m, 3g + i]      (uint8, B = 2 l (2**ka - 1))

(a canonical pattern has at most two -1 entries), so that::

    D[m, o] = sum_g sg[o, g] * T[m, g, c[o, g]] - B * sum_g sg[o, g]

the last sum a per-output constant (``ssum``) fixed when the weights are packed: one lookup and
one signed add replace three multiply-adds. Entries fit a byte while ``5 l (2**ka - 1) <= 255``
(unit levels: codes of up to 5 bits).

AVX-512 (VBMI + VNNI): a *step* is 4 consecutive groups; ``vpermb`` looks up 64 bytes in its
64-byte table (byte ``16*s + c``: slot ``s``, canonical index ``c``). The weights hold, per block of
16 outputs and pair of steps, the two steps' indices as the low and high nibbles of 64 bytes (byte
``4*o + s``: output ``o``, slot ``s``) and then the two steps' signs as 64-bit masks (bit ``4*o +
s`` set: -1). The tile splits the nibbles, adds the slot ``16*s`` and turns each mask into +-1 bytes
(a masked blend), once for the R rows of the tile; per row and step one ``vpermb`` looks up 64 bytes
and one ``vpdpbusd`` multiplies them (unsigned) by the signs and adds output ``o``'s four into its
int32 lane: two instructions per 192 multiply-adds of 16 outputs, where the 4-bit tables on ternary
weights do 128 (plus a ``vpaddb`` per two lookups). Weights: 5 bits per 3 (1.67 bits a weight;
the 4-bit tables: 2). Tables: 64 bytes per 12 activations (the 4-bit tables: per 8).

Layouts: tables ``tab`` (M, S*64) uint8, ``S`` steps padded to whole pairs (padding activations
0); weights ``wq`` (Op/16, S/2, 80) uint8: block, pair, 64 nibble bytes (low: step ``2p``, high:
``2p + 1``), then the two steps' sign masks (8 bytes each, little-endian bit order; padding groups:
index 0, sign +1, counted in ``ssum``). A tile keeps R rows x OB blocks of 16 outputs in registers
(:data:`LUT3_R`, :data:`LUT3_OB`), as :func:`kernels_gemm.lut_tile`.

The plain path (``_lut3_plain_range``, any CPU) computes the same sums with scalar lookups;
``lut3_gemm_reference`` is the NumPy form both are tested against.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import kernels_gemm as KG
from ._jit import _I8, _I32, _I64, _V16I32, _V64I8, _splat, _vpdpbusd, kernel
from ._llvm_args import Args, i64, load_as, offset_pointers, store_as, strided
from .kernels_gemm import (
    LUT_TABLES_MIN_PARALLEL,
    LUT_UNIT_WORK,
    _epilogue,
    _row_codes,
    _vpermb,
    lut_gemm_reference,
)
from .kernels_threads import num_threads, parallel_for, use_parallel

#: packed Linear layers use these tables for symmetric ternary weights (``LOWBIT_RUNTIME_LUT3=0``:
#: the 4-bit tables of ``kernels_gemm``, for side-by-side measurements); the attribute is read when a
#: layer is packed
ENABLED = os.environ.get("LOWBIT_RUNTIME_LUT3", "1").strip().lower() not in ("0", "false", "no", "off")

#: rows x 16-output blocks of a register tile: 8 x 2 (16 accumulators) shares each block's index
#: and sign vectors among 8 rows; in a one-off probe (one index byte per group then, 64-256 rows of
#: 4096^2) it ran within a few percent of 4 x 4 and 4 x 3, all 1.15-1.2x the 4-bit tables
LUT3_R, LUT3_OB = 8, 2
#: rows whose tables (S*64 bytes each: 21.8 kB at K = 4096) are read while one group of output
#: blocks' weights stays hot
LUT3_ROW_BLOCK = 64
#: digits per group, groups per step, table bytes per step
_G, _S, _STEP = 3, 4, 64
#: the canonical patterns (14, 3): row c is the pattern of base-3 number 13 + c, digits p_i + 1
_PATTERNS = ((np.arange(13, 27)[:, None] // 3 ** np.arange(_G)[None, :]) % 3) - 1

lut3_gemm_reference = lut_gemm_reference


def lut3_level(w_int: np.ndarray) -> int | None:
    """``l`` where the integer weights take only the values -l, 0, l (l >= 1; all zero: 1), else
    None (the 4-bit tables of :mod:`kernels_gemm` take any four levels)."""
    w = np.asarray(w_int)
    if w.dtype.kind not in "iu":
        return None
    hi = int(np.abs(w).max(initial=0))
    if hi == 0:
        return 1
    ok = (w == 0) | (w == hi) | (w == -hi)
    return hi if bool(ok.all()) else None


def lut3_bias(level: int, ka: int) -> int:
    """``B``: the offset that makes every table entry a byte >= 0, ``2 l (2**ka - 1)``."""
    return 2 * level * ((1 << ka) - 1)


def lut3_fits(level: int, ka: int) -> bool:
    """Whether every table entry fits a byte: ``5 l (2**ka - 1) <= 255``."""
    return 5 * level * ((1 << ka) - 1) <= 255


def lut3_steps(K: int) -> int:
    """Steps (4 groups of 3) of a reduction of ``K``, padded to whole pairs."""
    steps = -(-K // (_G * _S))
    return steps + (steps & 1)


def lut3_pack_weights(w_int: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """``w_int`` (O, K) in {-l, 0, l} -> (``wq`` (Op/16, S/2, 80) uint8: per block and step pair
    the two steps' canonical indices as nibbles, then their sign masks; ``ssum`` (Op,) int32: each
    output's sum of group signs)."""
    w_int = np.asarray(w_int, np.int64)
    O, K = w_int.shape
    if not ((w_int == 0) | (np.abs(w_int) == level)).all():
        raise ValueError(f"weights outside -{level}, 0, {level}")
    S = lut3_steps(K)
    Op = -(-O // 16) * 16
    d = np.ones((Op, S * _S * _G), np.int64)  # digits p + 1; padding: p = 0
    d[:O, :K] = np.sign(w_int) + 1
    n = d[:, 0::3] + 3 * d[:, 1::3] + 9 * d[:, 2::3]  # (Op, groups), 0..26
    neg = n < 13
    c = np.where(neg, 13 - n, n - 13)  # the negation of pattern n is pattern 26 - n
    # byte 4*o + s of step t: block, step, (o, s)
    c = c.reshape(Op // 16, 16, S, _S).transpose(0, 2, 1, 3).reshape(Op // 16, S // 2, 2, 64)
    ng = neg.reshape(Op // 16, 16, S, _S).transpose(0, 2, 1, 3).reshape(Op // 16, S // 2, 2, 64)
    wq = np.empty((Op // 16, S // 2, 80), np.uint8)
    wq[:, :, :64] = c[:, :, 0] | (c[:, :, 1] << 4)
    wq[:, :, 64:] = np.packbits(ng, axis=-1, bitorder="little").reshape(Op // 16, S // 2, 16)
    ssum = (S * _S - 2 * neg.sum(axis=1)).astype(np.int32)
    return wq, ssum


def lut3_offsets(ssum: np.ndarray, bias: int) -> np.ndarray:
    """The per-output constant the tables' offset adds to the sums, ``B * ssum`` (int64): made once
    per layer, taken off by :func:`lut3_gemm`."""
    return np.asarray(ssum, np.int64) * int(bias)


def lut3_tables_reference(a: np.ndarray, level: int, bias: int) -> np.ndarray:
    """NumPy reference of the tables: codes ``a`` (M, K) -> ``T`` (M, S*64) uint8."""
    a = np.asarray(a, np.int64)
    M, K = a.shape
    S = lut3_steps(K)
    ap = np.zeros((M, S * _S * _G), np.int64)
    ap[:, :K] = a
    T = np.full((M, S * _S, 16), bias, np.int64)
    T[:, :, :14] += level * np.einsum("mgi,ci->mgc", ap.reshape(M, S * _S, _G), _PATTERNS)
    if T.min(initial=0) < 0 or T.max(initial=0) > 255:
        raise ValueError("table entries do not fit a byte")
    return T.reshape(M, S * _STEP).astype(np.uint8)


def _table_masks() -> list[ir.Constant]:
    """Shuffle masks of :func:`_table_row`: entry ``16*s + c`` of digit position ``i`` reads byte
    ``16*(p_i + 1) + 3*s + i`` of the level-scaled codes (48: a zero byte, for c >= 14)."""
    masks = []
    for i in range(_G):
        m = []
        for j in range(_STEP):
            s, c = divmod(j, 16)
            m.append(16 * (int(_PATTERNS[c, i]) + 1) + _G * s + i if c < 14 else 48)
        masks.append(ir.Constant(ir.VectorType(_I32, _STEP), m))
    return masks


@intrinsic
def _table_row(typingctx, a, level, bias, nsteps, T, toff):
    """The tables of one row of codes ``a`` (uint8, 16 readable bytes past the last step's 12):
    per step, the 12 codes times -l, 0, l into 48 bytes (then 16 zeros), each entry ``B`` plus the
    sum of three of those bytes (``_table_masks``); one shuffle and one add per digit position."""
    sig = types.void(a, level, bias, nsteps, T, toff)
    masks = _table_masks()

    def codegen(context, builder, signature, args):
        g = Args(context, builder, signature, args)
        ap, tp = g.ptr(0, _I8), g.ptr(4, _I8, args[5])
        v16 = ir.VectorType(_I8, 16)
        lvl = _splat(builder, builder.trunc(args[1], _I8), v16)
        bias = _splat(builder, builder.trunc(args[2], _I8), _V64I8)
        zero16 = ir.Constant(v16, [0] * 16)
        cat32 = ir.Constant(ir.VectorType(_I32, 32), list(range(32)))
        cat64 = ir.Constant(ir.VectorType(_I32, 64), list(range(64)))
        with cgutils.for_range(builder, args[3]) as loop:
            t = loop.index
            ld = load_as(builder, ap, v16, builder.mul(t, i64(_G * _S)))
            pos = builder.mul(ld, lvl)
            blk = builder.shuffle_vector(builder.shuffle_vector(builder.sub(zero16, pos), zero16, cat32),
                                         builder.shuffle_vector(pos, zero16, cat32), cat64)
            acc = bias
            for m in masks:
                acc = builder.add(acc, builder.shuffle_vector(blk, ir.Constant(blk.type, None), m))
            store_as(builder, acc, tp, builder.mul(t, i64(_STEP)))
        return context.get_dummy_value()

    return sig, codegen


@kernel
def _lut3_tables_avx(x, mode, hi, mult, level, bias, T, m_lo, m_hi):
    S = T.shape[1] // 64
    a = np.zeros(S * 12 + 16, np.uint8)
    tflat = T.reshape(-1)
    for m in range(m_lo, m_hi):
        _row_codes(x[m], mode, hi, mult, a)
        _table_row(a, level, bias, S, tflat, m * S * 64)


@kernel
def _lut3_tables_plain(x, mode, hi, mult, level, bias, T, m_lo, m_hi):
    S = T.shape[1] // 64
    a = np.zeros(S * 12 + 16, np.uint8)
    for m in range(m_lo, m_hi):
        _row_codes(x[m], mode, hi, mult, a)
        tr = T[m]
        for g in range(S * 4):
            for c in range(16):
                e = bias
                if c < 14:
                    n = c + 13
                    for i in range(3):
                        e += (n % 3 - 1) * level * np.int64(a[3 * g + i])
                        n //= 3
                tr[g * 16 + c] = np.uint8(e)


def lut3_tables(x: np.ndarray, level: int, bias: int, hi: float = 0.0, mult: float = 0.0, mode: int = 1,
                out: np.ndarray | None = None, plain: bool | None = None) -> np.ndarray:
    """Tables (M, S*64) uint8 of the rows of ``x`` (M, K): quantized with the fused clip formula
    (mode 0) or taken as codes (mode 1). The caller checks :func:`lut3_fits`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    M, K = x.shape
    T = np.empty((M, lut3_steps(K) * _STEP), np.uint8) if out is None else out
    fn = _lut3_tables_plain if (not KG.HAS_LUT if plain is None else plain) else _lut3_tables_avx
    parallel_for(fn, M, x, np.int64(mode), np.float32(hi), np.float32(mult), np.int64(level),
                 np.int64(bias), T, parallel=use_parallel(M * K, LUT_TABLES_MIN_PARALLEL), grain=8)
    return T


def lut3_tile(R: int, OB: int):
    """An intrinsic ``tile(tab, trow, npairs, wq, wbase, wstride, acc)``: the int32 signed lookup
    sums of R rows x OB*16 outputs into ``acc`` (R*OB*16 int32, row major; the bias not yet taken
    off); ``trow`` int64 (R,) element offsets of the rows' tables in ``tab``; block ``b``'s packed
    step pairs at ``wbase + b*wstride`` of ``wq``. Per pair and block: the nibbles split and given
    their slots, the sign masks made +-1 bytes (once for the R rows); per row: two table loads, and
    per block two ``vpermb`` and two ``vpdpbusd``."""

    @intrinsic
    def tile(typingctx, tab, trow, npairs, wq, wbase, wstride, acc):
        sig = types.void(tab, trow, npairs, wq, wbase, wstride, acc)

        def codegen(context, builder, signature, args):
            g = Args(context, builder, signature, args)
            bases = offset_pointers(builder, g.ptr(0, _I8), g.ptr(1, _I64), R)
            wbases = strided(builder, g.ptr(3, _I8, args[4]), None, args[5], OB)
            ones = ir.Constant(_V64I8, [1] * 64)
            minus = ir.Constant(_V64I8, [-1] * 64)
            lo4 = ir.Constant(_V64I8, [15] * 64)
            four = ir.Constant(_V64I8, [4] * 64)
            slot = ir.Constant(_V64I8, [16 * (j % 4) for j in range(64)])
            m64 = ir.VectorType(ir.IntType(1), 64)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16I32, [0] * 16)) for _ in range(R * OB)]
            with cgutils.for_range(builder, args[2]) as pairs:
                p = pairs.index
                off = builder.mul(p, i64(80))
                idx, sgn = [], []
                for b in range(OB):
                    v = load_as(builder, wbases[b], _V64I8, off)
                    lo, hi = builder.and_(v, lo4), builder.lshr(v, four)  # the two steps' nibbles
                    idx.append((builder.or_(lo, slot), builder.or_(hi, slot)))
                    signs = []
                    for h in range(2):
                        m = load_as(builder, wbases[b], _I64, builder.add(off, i64(64 + 8 * h)))
                        signs.append(builder.select(builder.bitcast(m, m64), minus, ones))
                    sgn.append(signs)
                toff = builder.mul(p, i64(2 * _STEP))
                for r in range(R):
                    tabs = [load_as(builder, bases[r], _V64I8, builder.add(toff, i64(_STEP * h)))
                            for h in range(2)]
                    for b in range(OB):
                        a = accs[r * OB + b]
                        for h in range(2):
                            look = _vpermb(builder, tabs[h], idx[b][h])
                            builder.store(_vpdpbusd(builder, builder.load(a), look, sgn[b][h]), a)
            ap = g.ptr(6, _I32)
            for k in range(R * OB):
                store_as(builder, builder.load(accs[k]), ap, i64(16 * k), 4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


#: rows of the tile that takes a row tile of at most this many valid rows (few-row calls, the last
#: rows of a call): 8-row tiles would compute the missing rows too
LUT3_R_SMALL = 4
_TILES = (tuple(lut3_tile(r, ob) for r in (LUT3_R, LUT3_R_SMALL) for ob in range(1, LUT3_OB + 1))
          if KG.HAS_LUT else ())
if _TILES:
    _tile1, _tile2, _small1, _small2 = _TILES
else:  # never called: the plain path runs instead
    _tile1 = _tile2 = _small1 = _small2 = None


@kernel
def _unbias(acc, R, OB, nv, o0, O, corr):
    """``acc[r, o] -= corr[o0 + o]``: the tables' offset taken off the valid rows and outputs."""
    W = OB * 16
    on = min(W, O - o0)
    for r in range(nv):
        for o in range(on):
            acc[r * W + o] -= np.int32(corr[o0 + o])


@kernel
def _lut3_avx_range(tab, wq, O, corr, s0, s1, relu, out, by_rows, lo, hi):
    """Rows lo..hi (``by_rows``) or output blocks lo..hi of every row."""
    M = out.shape[0]
    nblk = wq.shape[0]
    npairs = wq.shape[1]
    wstride = npairs * 80
    ldt = tab.shape[1]
    tflat = tab.reshape(-1)
    wflat = wq.reshape(-1)
    acc = np.empty(LUT3_R * LUT3_OB * 16, np.int32)
    trow = np.empty(LUT3_R, np.int64)
    if by_rows:
        m_lo, m_hi, b_lo, b_hi = lo, hi, 0, nblk
    else:
        m_lo, m_hi, b_lo, b_hi = 0, M, lo, hi
    for mb in range(m_lo, m_hi, LUT3_ROW_BLOCK):
        mb_hi = min(m_hi, mb + LUT3_ROW_BLOCK)
        for b0 in range(b_lo, b_hi, LUT3_OB):
            ob = min(LUT3_OB, b_hi - b0)
            wbase = b0 * wstride
            for m0 in range(mb, mb_hi, LUT3_R):
                nv = min(LUT3_R, mb_hi - m0)
                for r in range(LUT3_R):  # rows past the last repeat it (their sums are not stored)
                    trow[r] = (m0 + min(r, nv - 1)) * ldt
                if nv <= LUT3_R_SMALL:
                    if ob == 2:
                        _small2(tflat, trow, npairs, wflat, wbase, wstride, acc)
                    else:
                        _small1(tflat, trow, npairs, wflat, wbase, wstride, acc)
                elif ob == 2:
                    _tile2(tflat, trow, npairs, wflat, wbase, wstride, acc)
                else:
                    _tile1(tflat, trow, npairs, wflat, wbase, wstride, acc)
                _unbias(acc, LUT3_R, ob, nv, b0 * 16, O, corr)
                _epilogue(acc, LUT3_R, ob, nv, b0 * 16, O, s0, s1, relu, out, m0)


@kernel
def _lut3_plain_range(tab, wq, O, corr, s0, s1, relu, out, by_rows, lo, hi):
    """The same sums with scalar lookups (any CPU)."""
    M = out.shape[0]
    nblk = wq.shape[0]
    npairs = wq.shape[1]
    acc = np.empty(16, np.int64)
    if by_rows:
        m_lo, m_hi, b_lo, b_hi = lo, hi, 0, nblk
    else:
        m_lo, m_hi, b_lo, b_hi = 0, M, lo, hi
    for m in range(m_lo, m_hi):
        tr = tab[m]
        for b in range(b_lo, b_hi):
            for o in range(16):
                acc[o] = 0
            for p in range(npairs):
                wb = wq[b, p]
                for h in range(2):
                    t = tr[(2 * p + h) * 64 : (2 * p + h + 1) * 64]
                    for j in range(64):
                        c = (wb[j] >> np.uint8(4 * h)) & np.uint8(15)
                        e = np.int64(t[(j & 3) * 16 + c])
                        neg = (wb[64 + 8 * h + (j >> 3)] >> np.uint8(j & 7)) & np.uint8(1)
                        acc[j >> 2] += -e if neg else e
            for o in range(min(16, O - 16 * b)):
                oc = 16 * b + o
                v = s1[oc] * np.float64(acc[o] - corr[oc]) + s0[oc]
                if relu and v < 0.0:
                    v = 0.0
                out[m, oc] = np.float32(v)


def lut3_gemm(tab: np.ndarray, wq: np.ndarray, corr: np.ndarray, O: int, s0: np.ndarray, s1: np.ndarray,
              relu: bool = False, out: np.ndarray | None = None, plain: bool | None = None) -> np.ndarray:
    """``out[m, o] = float32(relu(s1[o]*D[m, o] + s0[o]))`` (float64 multiply then add) with the exact
    ``D`` of the module docstring (weights :func:`lut3_pack_weights`, tables :func:`lut3_tables` with
    offset ``B``, ``corr`` :func:`lut3_offsets` of the weights' sign sums and ``B``). ``s0``, ``s1``
    float64 of at least O entries; ``plain``
    forces the scalar path."""
    if (wq.ndim != 3 or wq.shape[2] != 80 or tab.shape[1] != wq.shape[1] * 2 * _STEP or corr.shape[0] < O
            or corr.dtype != np.int64):
        raise ValueError(f"tables {tab.shape}, weights {wq.shape} and offsets {corr.dtype} {corr.shape} "
                         f"do not match: expected weights (blocks, pairs, 80), tables (rows, pairs*128), "
                         f">= {O} int64 offsets (lut3_offsets)")
    M = tab.shape[0]
    if out is None:
        out = np.empty((M, O), np.float32)
    if M == 0:
        return out
    if plain is None:  # the 4-bit tables' switch (kernels_gemm.HAS_LUT: VBMI + VNNI, not forced plain)
        plain = not KG.HAS_LUT
    fn = _lut3_plain_range if plain else _lut3_avx_range
    nblk = wq.shape[0]
    nt = num_threads()
    by_rows = 64 * nt <= M
    n = M if by_rows else nblk
    par = use_parallel(LUT_UNIT_WORK * M * nblk * (wq.shape[1] * 3 // 2))
    parallel_for(fn, n, tab, wq, np.int64(O), corr, s0, s1, bool(relu), out, by_rows, parallel=par,
                 grain=LUT3_R * 2 if by_rows else 2 * LUT3_OB)
    return out
