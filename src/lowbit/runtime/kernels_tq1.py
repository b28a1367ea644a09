"""Ternary weights at 1.6 bits for the batch-1 GEMV: five trits per byte, decoded in registers with
byte additions and multiplied with ``vpdpbusd`` (AVX-512 VNNI).

At batch 1 a deep model reads every weight once from DRAM, and the 2-bit ternary GEMV of
``kernels_gemv`` already streams its fields at the core's read rate (``benchmarks/results/
gemv_bound.md``): only fewer bytes per weight make it faster. ``3**5 = 243 <= 256``, so five
trits fit a byte (1.6 bits per weight, 0.8x the bytes of 2-bit fields).

Encoding (the idea of llama.cpp's TQ1_0, ``ggml/src/ggml-quants.c``, and of bitnet.cpp's TL2
ternary packing): the trits ``t_0 .. t_4`` in ``{0, 1, 2}`` (the fields ``f = q + off`` of
``kernels_gemv``) of one byte make ``n = sum_i t_i 3**(4-i)`` in ``[0, 243)``, stored as the byte
``p = ceil(256 n / 243)``. Then, with ``u_i = 3**i p mod 256``::

    t_i = floor(3 u_i / 256)                           (exact for every n: see below)
    u_{i+1} = 3 u_i mod 256 = 3 u_i - 256 t_i  =>  t_i = (3 u_i - u_{i+1}) / 256

``p/256 = n/243 + e`` with ``0 <= e < 1/256``; ``u_i/256`` is the fraction of ``3**i p/256`` =
``m/3**(5-i) + 3**i e`` (``m`` the last ``5-i`` trits), and ``3**(i+1) e < 3**(i+1)/256 <
1/3**(4-i)`` (as ``3**5 < 256``) keeps ``3 u_i/256`` below the next integer: its floor is ``t_i``.

Product without extracting a trit. The second form is linear in the bytes: for the shifted
activation codes ``x = a - 128`` (signed bytes) of the reduction indices of trit ``i``::

    sum_j t_ij x_ij = (3 * sum_j u_ij x_ij - sum_j u_(i+1)j x_ij) / 256

so a group of 64 bytes (16 outputs x 4 lanes x 5 trits = 320 weights) costs, per 64 weights, one
byte multiply by 3 (two ``vpaddb``: ``u + u + u``) and two ``vpdpbusd`` (``u_i`` and ``u_{i+1}``
against the same broadcast codes), summed into two int32 registers ``S = sum u_i x_i``, ``S' =
sum u_{i+1} x_i``; the tile ends with ``E = (3 S - S') >> 8``. llama.cpp's AVX2 TQ1_0 kernel
extracts each trit instead (a multiply by 3 and its top bits with ``avg`` and shifts, ~5 operations
per 32 weights); the linear form needs no extraction, no table and no mask. int32 sums wrap
(``vpdpbusd`` does not saturate) and ``3 S - S' = 256 E`` is exact modulo ``2**32``, so it is exact
while ``|256 E| < 2**31``: ``|E| <= 2 * 128 * K`` needs ``K < 32768`` (:class:`Tq1Weights`
refuses longer reductions; the 2-bit fields run those).

Layout (:func:`pack_tq1`): outputs in blocks of 16; a block's ``nG = ceil(K/20)`` groups of 64
bytes; byte ``4*o + l`` of group ``g`` holds the trits ``i = 0..4`` of output ``o``, reduction
index ``r = 20*g + 4*i + l``: decoding trit ``i`` of a whole vector gives the ``vpdpbusd`` operand
of reduction quad ``5*g + i`` (16 outputs x 4 consecutive weights, as the 2-bit layout). The
reduction is padded with zero trits (byte 0) and zero codes.

The epilogue is the 2-bit GEMV's (``kernels_gemv.tile_epilogue``: ``D = E + F - off*A``, float64
coefficients), so a layer's outputs are bit for bit those of its 2-bit GEMV. Kernels: ``_tq1_tile(R,
OB)`` (LLVM IR) on a CPU with AVX-512 VNNI; :func:`gemv_tq1_plain` is a scalar numba loop over the
same bytes, a second reference for the tests (layers hold the 1.6-bit form only where the CPU has
VNNI; the plain path runs bit-serial products); :func:`tq1_reference` the NumPy reference of the
product.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba.core import cgutils

from . import kernels_gemv as KV
from ._jit import _V16I32, HOST_VNNI, _vpdpbusd, kernel
from ._llvm_args import broadcast_quad, i64
from .kernels_gemv import GemvWeights, _quant_rows, few_row_tile, gemv_coef, gemv_reference, tile_loads
from .kernels_threads import parallel_for, use_parallel

#: reduction indices per 64-byte group (16 outputs x 4 lanes x 5 trits per byte)
GROUP = 20
#: rows the 1.6-bit tiles take (1 or 2)
TQ1_KERNEL_ROWS = 2
#: rows up to which layers run the 1.6-bit GEMV. At 2 rows it decodes each byte for two rows of
#: products (4 ``vpdpbusd`` per 64 weights against the 2-bit tile's 2): measured on the deep
#: 4096-wide MLP (benchmarks/results/gemv_bound_rows2.md) 1.05x the 2-bit GEMV cold (min) and 0.5x
#: with the weights in cache, so 2 rows take the 2-bit fields. Why (benchmarks/results/
#: profile_tq1_rows.md): the compiled loop issues 2 ``vpdpbusd`` and 1 ``vpaddb`` per 64 weights and
#: row against the 2-bit tile's 1 ``vpdpbusd`` and 0.5 ``vpandq``, and ``vpdpbusd`` issues about once
#: a cycle (``kernels_gemv``'s cost note): in cache it ran 0.52-0.57x the 2-bit GEMV at 2 rows
TQ1_MAX_ROWS = 1
#: smallest layer (weights O*K) given the 1.6-bit form. Decoding costs more arithmetic than the
#: 2-bit fields (2 ``vpaddb`` + 2 ``vpdpbusd`` per 64 weights against 1 ``vpandd`` + 1
#: ``vpdpbusd``), so it only pays where the bytes come from DRAM. Measured (benchmarks/results/
#: gemv_tq1*.md, gemv_bound.md; one thread, loaded machine), kernel medians against the 2-bit one,
#: one layer between the baselines' calls: 2048^2 0.79x, 3072^2 0.97x, 4096^2 1.21x; the 8-layer
#: 4096^2 MLP 1.11x median (1.19x min); one 4096^2 layer called back to back (its fields in L3)
#: 0.78x. So from 4096^2 weights on
TQ1_MIN_WEIGHTS = 1 << 24
#: longest reduction with exact int32 sums (module docstring)
TQ1_MAX_K = 32767
#: whether ternary layers get the 1.6-bit form (``LOWBIT_RUNTIME_TQ1=0`` switches it off)
ENABLED = os.environ.get("LOWBIT_RUNTIME_TQ1", "1").strip().lower() not in ("0", "false", "no", "off")
_POW3 = np.array([81, 27, 9, 3, 1], np.int64)


def encode_trits(t: np.ndarray) -> np.ndarray:
    """Bytes of trits ``t`` (..., 5) in {0, 1, 2}: ``ceil(256 n / 243)``, ``n = sum_i t_i 3**(4-i)``."""
    n = np.asarray(t, np.int64) @ _POW3
    return ((n * 256 + 242) // 243).astype(np.uint8)


def decode_trits(p: np.ndarray) -> np.ndarray:
    """Trits (..., 5) of bytes ``p``: ``t_i = (3 * (3**i p mod 256)) >> 8``."""
    u = np.asarray(p, np.int64)[..., None] * np.array([1, 3, 9, 27, 81]) % 256
    return (3 * u) >> 8


def pack_tq1(f: np.ndarray) -> np.ndarray:
    """NumPy reference of the layout of the module docstring, flat uint8: fields ``f`` (O, K) in
    {0, 1, 2} -> ``ceil(O/16)`` blocks of ``ceil(K/20)`` groups of 64 bytes."""
    f = np.asarray(f, np.int64)
    O, K = f.shape
    Op, nG = -(-O // 16) * 16, -(-K // GROUP)
    t = np.zeros((Op, nG * GROUP), np.int64)
    t[:O, :K] = f
    t = t.reshape(Op // 16, 16, nG, 5, 4).transpose(0, 2, 1, 4, 3)  # (blk, g, o, l, i)
    return np.ascontiguousarray(encode_trits(t)).reshape(-1)


def unpack_tq1(w: np.ndarray, O: int, K: int) -> np.ndarray:
    """Inverse of :func:`pack_tq1`: the fields (O, K) int64."""
    Op, nG = -(-O // 16) * 16, -(-K // GROUP)
    t = decode_trits(np.asarray(w).reshape(Op // 16, nG, 16, 4))  # (blk, g, o, l, i)
    return t.transpose(0, 2, 1, 4, 3).reshape(Op, nG * GROUP)[:O, :K]


@kernel
def _pack_fast(f, w):
    """:func:`pack_tq1` as one pass (fields ``f`` (O, K) int64 in {0, 1, 2}; ``w`` zeroed)."""
    O, K = f.shape
    nG = -(-K // 20)
    for o in range(O):
        base = (o // 16) * nG * 64 + 4 * (o % 16)
        for g in range(nG):
            for lane in range(4):
                n = 0
                for i in range(5):
                    r = 20 * g + 4 * i + lane
                    n = 3 * n + (f[o, r] if r < K else 0)
                w[base + 64 * g + lane] = np.uint8((n * 256 + 242) // 243)


def pack_tq1_fast(f: np.ndarray) -> np.ndarray:
    """:func:`pack_tq1` in one numba pass (a 4096x4096 layer in milliseconds, not seconds)."""
    f = np.ascontiguousarray(f, np.int64)
    O, K = f.shape
    w = np.zeros(-(-O // 16) * -(-K // GROUP) * 64, np.uint8)
    _pack_fast(f, w)
    return w


def tq1_reference(codes: np.ndarray, w: np.ndarray, O: int, K: int, off: int, s0: np.ndarray, s1: np.ndarray,
                  s2: np.ndarray, relu: bool = False) -> np.ndarray:
    """NumPy reference of the 1.6-bit GEMV: the weights ``q = f - off`` decoded from the bytes ``w``,
    then :func:`kernels_gemv.gemv_reference` (exact int64 products, float64 epilogue)."""
    return gemv_reference(codes, unpack_tq1(w, O, K) - off, s0, s1, s2, relu)


# ----------------------------------------------------------------------------------------------
# the VNNI tile
# ----------------------------------------------------------------------------------------------


def _opaque(builder, v):
    """``v`` through an empty inline-asm statement: LLVM then cannot fold ``u + u + u`` of the next
    trits into byte multiplies by 9, 27, 81 (which it lowers to ``vpmaddubsw`` + ``vpmullw`` +
    ``vpermt2b``, 3 instructions where 2 ``vpaddb`` do)."""
    return builder.asm(ir.FunctionType(v.type, [v.type]), "", "=v,0", [v], False)


def _tq1_tile(R: int, OB: int):
    """``kernels_gemv.few_row_tile`` on the 1.6-bit bytes (``nG`` groups of 20 reduction indices;
    ``x`` rows of ``20*nG`` shifted codes): R rows x OB*16 outputs. Per group and block:
    ``u_0`` the 64 bytes, ``u_{i+1} = u_i + u_i + u_i`` (bytes, wrapping), ``S += u_i . x_i``,
    ``S' += u_{i+1} . x_i`` (``vpdpbusd``, the codes of quad ``5g + i`` broadcast); at the end
    ``E = (3 S - S') >> 8`` (module docstring) and the epilogue of ``kernels_gemv``."""

    def product(builder, rows, blks, ws, nG):
        zero = ir.Constant(_V16I32, [0] * 16)
        acc = [[[cgutils.alloca_once_value(builder, zero) for _ in range(2)] for _ in range(OB)]
               for _ in range(R)]
        with cgutils.for_range(builder, nG) as loop:
            g = loop.index
            u = tile_loads(builder, blks, g, ws)
            xq = builder.mul(g, i64(GROUP))
            for i in range(5):
                un = [builder.add(_opaque(builder, builder.add(v, v)), v) for v in u]
                for r in range(R):
                    av = broadcast_quad(builder, rows[r], builder.add(xq, i64(4 * i)))
                    for k in range(OB):
                        a0, a1 = acc[r][k]
                        builder.store(_vpdpbusd(builder, builder.load(a0), u[k], av), a0)
                        builder.store(_vpdpbusd(builder, builder.load(a1), un[k], av), a1)
                u = un

        def sums(r, k):
            a0, a1 = acc[r][k]
            three = builder.mul(builder.load(a0), ir.Constant(_V16I32, [3] * 16))
            e = builder.sub(three, builder.load(a1))
            return builder.ashr(e, ir.Constant(_V16I32, [8] * 16))

        return sums

    return few_row_tile(R, OB, product)


# (rows, blocks of 16 outputs): 2*R*OB sum registers; an odd block count ends with 1-block tiles
_q1_4, _q1_1, _q2_2, _q2_1 = _tq1_tile(1, 4), _tq1_tile(1, 1), _tq1_tile(2, 2), _tq1_tile(2, 1)


@kernel
def _part(codes, A, off, nG, F, w, coef, relu, out, k_lo, k_hi):
    """Output blocks k_lo..k_hi of every row (one thread's share); ``codes`` (M, 20*nG), M <= 2."""
    M, xs = codes.shape
    O = out.shape[1]
    cs = coef.shape[1]
    xf = codes.reshape(-1)
    cf = coef.reshape(-1)
    of = out.reshape(-1)
    ws = nG * 64
    k = k_lo
    while k < k_hi:
        wb = k * ws
        o0 = 16 * k
        if M == 1:
            if k + 4 <= k_hi:
                _q1_4(xf, 0, xs, w, wb, ws, nG, A, 0, M, F, off, cf, cs, o0, relu, of, O)
                k += 4
            else:
                _q1_1(xf, 0, xs, w, wb, ws, nG, A, 0, M, F, off, cf, cs, o0, relu, of, O)
                k += 1
        elif k + 2 <= k_hi:
            _q2_2(xf, 0, xs, w, wb, ws, nG, A, 0, M, F, off, cf, cs, o0, relu, of, O)
            k += 2
        else:
            _q2_1(xf, 0, xs, w, wb, ws, nG, A, 0, M, F, off, cf, cs, o0, relu, of, O)
            k += 1


@kernel
def _codes(x, mode, qp, nG):
    """Shifted codes (M, 20*nG) int8 (zero past K) and code sums of rows x."""
    M = x.shape[0]
    codes = np.zeros((M, nG * 20), np.int8)
    A = np.empty(M, np.int64)
    _quant_rows(x, mode, qp[0], qp[1], codes, A)
    return codes, A


@kernel
def _serial(x, mode, qp, off, nG, F, w, coef, relu, out):
    codes, A = _codes(x, mode, qp, nG)
    _part(codes, A, off, nG, F, w, coef, relu, out, 0, F.shape[0] // 16)


class Tq1Weights:
    """The 1.6-bit form of a ternary layer's fields (:func:`pack_tq1`), next to its
    :class:`kernels_gemv.GemvWeights` (whose ``F``, ``off`` and coefficient layout it shares)."""

    max_rows = TQ1_MAX_ROWS

    def __init__(self, gw: GemvWeights, q: np.ndarray) -> None:
        q = np.asarray(q, np.int64)
        if gw.K > TQ1_MAX_K:
            raise ValueError(f"reduction of {gw.K} too long for the 1.6-bit GEMV (at most {TQ1_MAX_K})")
        f = q + gw.off
        if q.shape != (gw.O, gw.K) or (f.size and (f.min() < 0 or f.max() > 2)):
            raise ValueError("the 1.6-bit GEMV takes ternary fields (three consecutive integer weights)")
        self.gw = gw
        self.nG = -(-gw.K // GROUP)
        self.w = pack_tq1_fast(f)

    @property
    def nbytes(self) -> int:
        return int(self.w.nbytes)

    def run(self, x: np.ndarray, mode: int, qp: np.ndarray, coef: np.ndarray, relu: bool,
            out: np.ndarray) -> None:
        """``kernels_gemv.gemv_run`` on the 1.6-bit bytes (``coef`` padded, M <= :data:`TQ1_KERNEL_ROWS`)."""
        gw = self.gw
        M, O = out.shape
        if M == 0:
            return
        if not (O >= 64 and use_parallel(M * O * gw.K, KV.GEMV_MIN_PARALLEL_MACS)):
            _serial(x, mode, qp, gw.off, self.nG, gw.F, self.w, coef, relu, out)
            return
        codes, A = _codes(x, mode, qp, self.nG)
        parallel_for(_part, gw.F.shape[0] // 16, codes, A, gw.off, self.nG, gw.F, self.w, coef, relu, out,
                     parallel=True, grain=4)


def tq1_weights(gw: GemvWeights, q: np.ndarray, min_weights: int | None = None) -> GemvWeights:
    """``gw`` with its 1.6-bit form attached where it applies (ternary fields, at least
    ``min_weights`` weights (default :data:`TQ1_MIN_WEIGHTS`), ``K <=`` :data:`TQ1_MAX_K`,
    :data:`ENABLED`, a VNNI host): ``kernels_gemv.gemv_run`` then runs rows ``M <= TQ1_MAX_ROWS``
    on it (:func:`gemv_tq1` up to ``TQ1_KERNEL_ROWS``)."""
    q = np.asarray(q)
    least = TQ1_MIN_WEIGHTS if min_weights is None else min_weights
    n = gw.O * gw.K
    big = n >= least
    if ENABLED and HOST_VNNI and big and gw.b == 2 and gw.K <= TQ1_MAX_K and q.size and int(np.ptp(q)) <= 2:
        gw.tq1 = Tq1Weights(gw, q)
    return gw


# ----------------------------------------------------------------------------------------------
# the plain path
# ----------------------------------------------------------------------------------------------


@kernel
def _plain(codes, A, off, w, O, K, coef, relu, out):
    M = codes.shape[0]
    nG = -(-K // 20)
    for m in range(M):
        for o in range(O):
            base = (o // 16) * nG * 64 + 4 * (o % 16)
            e = np.int64(0)
            for g in range(nG):
                for lane in range(4):
                    u = np.int64(w[base + 64 * g + lane])
                    for i in range(5):
                        r = 20 * g + 4 * i + lane
                        if r < K:
                            e += ((3 * u) >> 8) * codes[m, r]
                        u = (3 * u) & 255
            d = e - off * A[m]
            y = coef[1, o] * d + coef[2, o] * A[m] + coef[0, o]
            if relu and y < 0.0:
                y = 0.0
            out[m, o] = np.float32(y)


def gemv_tq1_plain(codes: np.ndarray, tq: Tq1Weights | np.ndarray, O: int, K: int, off: int,
                   coef: np.ndarray, relu: bool, out: np.ndarray) -> np.ndarray:
    """Scalar numba loop on the 1.6-bit bytes (any CPU): ``codes`` (M, K) integer codes in [0, 256),
    ``coef`` float64 rows s0, s1, s2 (>= O entries each); ``out`` (M, O) float32 as
    :func:`tq1_reference` (``D = sum_r (f - off) a``, computed as ``sum f a - off*A``)."""
    w = tq.w if isinstance(tq, Tq1Weights) else np.asarray(tq, np.uint8)
    c = np.ascontiguousarray(codes, np.int64)
    A = c.sum(axis=1)
    _plain(c, A, int(off), w, int(O), int(K), np.ascontiguousarray(coef, np.float64), bool(relu), out)
    return out


def gemv_tq1(x: np.ndarray, mode: int, hi: float, mult: float, gw: GemvWeights, s0: np.ndarray,
             s1: np.ndarray, s2: np.ndarray, relu: bool, out: np.ndarray) -> np.ndarray:
    """``kernels_gemv.gemv`` on the 1.6-bit form of ``gw`` (attached by :func:`tq1_weights`)."""
    tq = getattr(gw, "tq1", None)
    if tq is None:
        raise ValueError("these weights have no 1.6-bit form (ternary fields, K <= TQ1_MAX_K, VNNI)")
    if out.shape[0] > TQ1_KERNEL_ROWS:
        raise ValueError(f"the 1.6-bit GEMV runs at most {TQ1_KERNEL_ROWS} rows, got {out.shape[0]}")
    tq.run(x, int(mode), np.array([hi, mult], np.float32), gemv_coef(s0, s1, s2, gw), bool(relu), out)
    return out
