"""Few-row products (a Linear layer at batch 1..7): int8 activation codes times weights kept as
1-, 2- or 4-bit fields (5-8 bit codes: 8-bit fields, on request), unpacked in registers and
multiplied with ``vpdpbusd`` (AVX-512 VNNI).

Math. With activation codes ``a[m, r]`` in ``[0, 2**ka)`` (``ka <= 8``) and the integer
weights ``q[o, r] = sum_j g_j bit_j[o, r]`` of the bit planes (notation of ``kernels.py``), each
weight is stored as the unsigned *field* ``f[o, r] = q[o, r] + off`` of ``b`` bits, ``off =
-min(q)`` and ``b`` the smallest of 1, 2, 4 with ``max(q) - min(q) < 2**b`` (binary: ``f = bit``,
``off = 0``, ``b = 1``; ternary -1/0/+1: ``f = q + 1``, ``b = 2``; DoReFa k-bit: the code,
``b = k`` rounded up to 1, 2 or 4; for ``k = 5..8`` a layer may ask for ``b = 8``,
:data:`WIDE_BITS`: one field per byte, ``T = 1``, the mask a no-op). Then, exactly in integers::

    E[m, o]  = sum_r (a[m, r] - 128) * f[o, r]  (vpdpbusd: u8 fields x s8 shifted codes, int32)
    D[m, o]  = E[m, o] + 128*F[o] - off*A[m],   F[o] = sum_r f[o, r],  A[m] = sum_r a[m, r]
    y[m, o]  = s1[o]*D + s2[o]*A[m] + s0[o]      (float64, as ``gemm_reference``; optional ReLU)

int32 cannot overflow for ``K < 2**31 * T / (128*255)`` (``T = 8/b``; 131,000 for 4-bit fields):
the tile's partial sum of quad ``t`` holds ``K/T`` products of a shifted code (``|a - 128| <=
128``) with ``2**(b*t) * f <= 255``; :class:`GemvWeights` refuses longer reductions.

Layout. Outputs are taken 16 at a time (one zmm register of int32 lanes). For an output block
and a *group* of ``T = 8/b`` reduction quads (``32/b`` reduction indices), one 64-byte vector
holds the fields: byte ``4*o + l`` (output ``o < 16``, lane ``l < 4``) carries in bits
``[b*t, b*t + b)`` the field of reduction index ``r = group*4*T + 4*t + l``. Unpacking quad ``t``
is one mask, ``v & ((2**b - 1) << b*t) = 2**(b*t) * f`` (no shift: see ``_tile``); it is the
operand ``vpdpbusd`` wants (16 outputs x 4 consecutive weights), multiplied by the 4 shifted
codes of quad ``t`` broadcast to all lanes (the shift by -128 makes 8-bit codes signed bytes).
So the weights stream from memory once, at their bit width
(a 4096x4096 ternary layer is 4 MiB instead of 16 MiB of int8), the activations are read from
L1, and nothing is ever expanded to int8 in memory. Reduction length and output count are
padded (to 32 and 16) with zero codes and zero fields.

Sources of the idea. bitnet.cpp's I2_S kernel (microsoft/BitNet, ``src/ggml-bitnet-mad.cpp``)
keeps ternary weights as 2-bit fields 0/1/2, four per byte, and unpacks them in registers (shifts
by 2, 4, 6 and a mask 3) into the unsigned operand of ``maddubs`` against signed 8-bit
activations; llama.cpp's TQ2_0 (``ggml/src/ggml-cpu/arch/x86/quants.c``,
``ggml_vec_dot_tq2_0_q8_K``) does the same and subtracts the field offset through precomputed
activation block sums. T-MAC (Wei et al., 2024, arXiv:2407.00088) and bitnet.cpp's TL2 look
weight groups up in tables of activation sums with ``pshufb`` instead (int8 tables: lossy for
8-bit codes). This module takes the I2_S / TQ2_0 idea, exact through ``F`` and ``off*A``, with
its own lane layout (16 outputs x 4 reduction indices per vector, so that ``vpdpbusd`` needs no
horizontal sums), masks in place instead of shifts, and 1- and 4-bit fields besides 2-bit ones.
Published figure: bitnet.cpp's ``src/README.md`` ("Kernel Performance Comparison", AMD EPYC
7V13, 1 thread) times a [1, 2048] x [2048, 2048] I2_S product at 0.058 +- 0.007 ms.

Cost at batch 1 (measured on the test machine, one thread). The inner loop spends one
``vpandd`` and one ``vpdpbusd`` (with its broadcast code load) per 64 weights whatever the field
width, and ``vpdpbusd`` issues about once a cycle, so a layer whose fields stay in cache runs at
~1 cycle per 64 weights (binary 4096x4096: ~0.1 ms). In a deep model the fields come from DRAM
(8 x 4096x4096 binary is 16 MiB, 4-bit 64 MiB) and the bytes are the cost: each weight stream is
prefetched ahead (``PREFETCH``), and the epilogue runs in registers at the end of each tile
(no int32 scratch array, no second pass). In side-by-side runs on the loaded machine (paired
rounds, cold caches) these took the deep MLP's kernels to 0.65x (binary), 0.8x (ternary) and
0.9x (4-bit) of their time before; the fastest rounds (binary 1.2-1.3 ms, ternary 2.3-2.6 ms,
4-bit 4.3-4.5 ms for 8 layers) stream 13-15 GB/s, the single-core read rate of that machine.

Kernels: ``_tile(b, R, OB)`` (LLVM IR around ``vpdpbusd``): R rows x OB blocks of 16 outputs,
sums and epilogue, compiled only on a CPU with AVX-512 VNNI. Elsewhere, and when the plain path is forced
(``LOWBIT_RUNTIME_PLAIN=1`` / ``_jit.set_plain``), ``PackedLinear`` runs the bit-serial
``gemm_rows`` on its bit planes (a scalar loop over this layout measured 20-100x slower than
that). :func:`gemv_reference` is the NumPy reference (exact int64 products, the same float64
epilogue).

Ternary weights at 1.6 bits. Large ternary layers (``kernels_tq1.TQ1_MIN_WEIGHTS``) also hold
their fields five to a byte (``GemvWeights.tq1``, ``kernels_tq1``): :func:`gemv_run` runs one row
on them (0.8x the bytes; the same epilogue, :func:`tile_epilogue`, so the same outputs bit for bit)
and more rows on the 2-bit fields, which the AMX GEMM expands too.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import (
    _F32,
    _F64,
    _I8,
    _I32,
    _I64,
    _V16F32,
    _V16F64,
    _V16I1,
    _V16I32,
    _V64I8,
    HOST_VNNI,
    _declare,
    _splat,
    _vpdpbusd,
    kernel,
)
from ._llvm_args import Args, broadcast_quad, i64, load_as, strided
from .kernels_threads import parallel_for, use_parallel

#: the few-row path runs up to this many rows (PackedLinear; the many-row GEMM starts above)
GEMV_MAX_ROWS = 7
#: field widths of the weights
FIELD_BITS = (1, 2, 4)
#: the field width of wide integer weights (5-8 bit codes: DoReFa / uniform at 5-8 bits), taken
#: only where asked (``field_bits(q, wide=True)``): a byte per weight, so no smaller than the int8
#: weights of an int8 GEMV, but the codes themselves (DoReFa 8-bit: 0..255) with their offset in
#: the epilogue, where the folded integers ``2i - 255`` would need three int8 parts
WIDE_BITS = 8
#: below this many multiply-adds (M*O*K) a product runs on one thread. Few-row products are
#: 0.03-0.5 ms; handing half of one to a worker thread lost more than it saved on the 2-core test
#: machine under load (bench_gemv, deep 8x4096 MLP, w1a8: 2.1 ms on 1 thread, 9.3 ms on 2 with a
#: split from 2**23 MACs), so only products far larger than a 4096x4096 layer are split
GEMV_MIN_PARALLEL_MACS = 1 << 28
#: software prefetch distance of each weight stream, bytes (prefetcht0). At batch 1 the weights
#: come from DRAM; in side-by-side runs on the deep 4096-wide MLP (cold caches), prefetching 2 KiB
#: ahead, into the next tile's block past a block's end, took 0.6-0.9x the time of no prefetch
#: (binary gains most: its blocks are shortest); 1, 3 or 4 KiB measured the same within 6%
PREFETCH = 2048


def gemv_reference(codes: np.ndarray, q: np.ndarray, s0: np.ndarray, s1: np.ndarray, s2: np.ndarray,
                   relu: bool = False) -> np.ndarray:
    """NumPy reference of :func:`gemv`: codes (M, K) integers, integer weights q (O, K);
    ``y = s1*D + s2*A + s0`` with the exact int64 ``D = codes @ q.T``, ``A = codes.sum(1)``."""
    c = np.asarray(codes).astype(np.int64)
    D = c @ np.asarray(q).astype(np.int64).T
    y = s1 * D + s2 * c.sum(1, keepdims=True) + s0
    return (np.maximum(y, 0.0) if relu else y).astype(np.float32)


def field_bits(q: np.ndarray, wide: bool = False) -> tuple[int, int] | None:
    """``(b, off)`` of integer weights q: fields ``q + off`` in ``[0, 2**b)``; None when the range
    needs more than 4 bits (with ``wide``: more than :data:`WIDE_BITS`)."""
    lo, hi = (int(q.min()), int(q.max())) if q.size else (0, 0)
    for b in FIELD_BITS + ((WIDE_BITS,) if wide else ()):
        if hi - lo < (1 << b):
            return b, -lo
    return None


def pack_fields(q: np.ndarray, b: int, off: int) -> np.ndarray:
    """The layout of the module docstring, flat uint8: ``ceil(O/16)`` output blocks of
    ``nG = ceil(K/32)*b`` groups of 64 bytes; ``q`` (O, K) integers, fields ``q + off`` of ``b`` bits."""
    q = np.asarray(q).astype(np.int64)
    O, Kr = q.shape
    T = 8 // b
    Op, Kp = -(-O // 16) * 16, -(-Kr // 32) * 32
    f = np.zeros((Op, Kp), np.uint8)
    f[:O, :Kr] = q + off
    nG = Kp // (4 * T)
    f = f.reshape(Op // 16, 16, nG, T, 4).transpose(0, 2, 1, 4, 3)  # (blk, g, o, l, t)
    v = np.zeros(f.shape[:4], np.uint8)
    for t in range(T):
        v |= f[..., t] << np.uint8(b * t)
    return np.ascontiguousarray(v).reshape(-1)


@kernel
def _pack_fields_fast(q, b, off, w):
    """:func:`pack_fields` as one pass over ``q`` (O, K) integers; ``w`` zeroed."""
    O, K = q.shape
    T = 8 // b
    nG = (K + 31) // 32 * b
    for o in range(O):
        base = (o // 16) * nG * 64 + 4 * (o % 16)
        for g in range(nG):
            for lane in range(4):
                v = 0
                for t in range(T):
                    r = 4 * T * g + 4 * t + lane
                    if r < K:
                        v |= (np.int64(q[o, r]) + off) << (b * t)
                w[base + 64 * g + lane] = np.uint8(v)


def pack_fields_fast(q: np.ndarray, b: int, off: int) -> np.ndarray:
    """:func:`pack_fields` in one numba pass (a 4096x4096 ternary layer: 45 ms against the NumPy
    reference's 0.36 s, one thread on the loaded test machine)."""
    q = np.ascontiguousarray(q)
    O, K = q.shape
    w = np.zeros(-(-O // 16) * 16 * -(-K // 32) * 32 * b // 8, np.uint8)
    _pack_fields_fast(q, np.int64(b), np.int64(off), w)
    return w


def unpack_fields(w: np.ndarray, b: int, O: int, K: int) -> np.ndarray:
    """Inverse of :func:`pack_fields` (the fields, (O, K) int64)."""
    T = 8 // b
    Op, Kp = -(-O // 16) * 16, -(-K // 32) * 32
    nG = Kp // (4 * T)
    v = np.asarray(w).reshape(Op // 16, nG, 16, 4)
    f = np.stack([(v >> np.uint8(b * t)) & np.uint8((1 << b) - 1) for t in range(T)], axis=-1)
    return f.transpose(0, 2, 1, 4, 3).reshape(Op, Kp)[:O, :K].astype(np.int64)


# ----------------------------------------------------------------------------------------------
# the VNNI tile
# ----------------------------------------------------------------------------------------------


def tile_epilogue(a: Args, R: int, OB: int, sums) -> None:
    """The epilogue of a few-row tile (IR, in registers, the order of :func:`gemv_reference`), for
    tiles with the arguments ``a`` of :func:`few_row_tile`: for rows ``r < nv`` (row ``m0 + r`` of ``out``
    (M, O) float32 and of the code sums ``A`` int64), output ``o = o0 + 16*k + lane < O``: ``D = E +
    F[o] - off*A`` (int32, exact: ``|D| < 2**31``), ``y = s1*D + s2*A + s0`` in float64 (``coef``
    flat, rows s0, s1, s2 of ``cs`` >= ``o0 + 16*OB`` entries each), ReLU when ``relu``, rounded to
    float32. ``sums(r, k)`` emits the int32 vector ``E = sum_r (a - 128) * f`` of row r, block k."""
    builder = a.builder
    m0a, nva, offa, csa, o0a, rla, Oa = a[8], a[9], a[11], a[13], a[14], a[15], a[17]
    Ap = a.ptr(7, _I64)
    Fp = a.ptr(10, _I32, o0a)
    cp = a.ptr(12, _F64, o0a)
    op = a.ptr(16, _F32)
    off32 = builder.trunc(offa, _I32)
    relu_v = _splat(builder, builder.icmp_unsigned("!=", rla, ir.Constant(rla.type, 0)), _V16I1)
    lanes = ir.Constant(_V16I32, list(range(16)))
    zd = ir.Constant(_V16F64, [0.0] * 16)
    mstore = _declare(builder, "llvm.masked.store.v16f32.p0", ir.VoidType(),
                      [_V16F32, _F32.as_pointer(), _I32, _V16I1])
    blk = []
    for k in range(OB):
        Fv = load_as(builder, Fp, _V16I32, i64(16 * k), 4)
        sv = [load_as(builder, cp, _V16F64, builder.add(builder.mul(csa, i64(j)), i64(16 * k)), 8)
              for j in range(3)]
        lim = builder.trunc(builder.sub(builder.sub(Oa, o0a), i64(16 * k)), _I32)
        blk.append((Fv, sv, builder.icmp_signed("<", lanes, _splat(builder, lim, _V16I32))))
    for r in range(R):
        with builder.if_then(builder.icmp_signed("<", i64(r), nva)):
            m = builder.add(m0a, i64(r))
            av = builder.load(builder.gep(Ap, [m]))
            corr = _splat(builder, builder.mul(off32, builder.trunc(av, _I32)), _V16I32)
            af = _splat(builder, builder.sitofp(av, _F64), _V16F64)
            orow = builder.gep(op, [builder.add(builder.mul(m, Oa), o0a)])
            for k in range(OB):
                Fv, (s0v, s1v, s2v), mask = blk[k]
                d = builder.sitofp(builder.sub(builder.add(sums(r, k), Fv), corr), _V16F64)
                y = builder.fadd(builder.fadd(builder.fmul(s1v, d), builder.fmul(s2v, af)), s0v)
                y = builder.select(builder.and_(builder.fcmp_ordered("<", y, zd), relu_v), zd, y)
                ptr = builder.gep(orow, [i64(16 * k)])
                builder.call(mstore, [builder.fptrunc(y, _V16F32), ptr, ir.Constant(_I32, 4), mask])


def tile_loads(builder, blks: list, g, ws) -> list:
    """IR: the 64-byte weight vectors of group ``g`` of each block stream (``blks``: byte pointers,
    ``ws`` the bytes of a block), each stream prefetched ``PREFETCH`` bytes ahead; past a block's
    end the prefetch goes to the same block of the next tile (the blocks of a tile are consecutive)."""
    OB = len(blks)
    pf = _declare(builder, "llvm.prefetch.p0", ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
    at = builder.mul(g, ir.Constant(_I64, 64))
    pa = builder.add(at, ir.Constant(_I64, PREFETCH))
    if OB > 1:
        nxt = builder.add(pa, builder.mul(ws, ir.Constant(_I64, OB - 1)))
        pa = builder.select(builder.icmp_signed(">=", pa, ws), nxt, pa)
    wv = []
    for k in range(OB):
        hint = [ir.Constant(_I32, v) for v in (0, 3, 1)]  # read, L1, data
        builder.call(pf, [builder.gep(blks[k], [pa]), *hint])
        wv.append(load_as(builder, blks[k], _V64I8, at))
    return wv


def few_row_tile(R: int, OB: int, product):
    """Intrinsic ``tile(x, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, coef, cs, o0, relu, out, O)``:
    R rows x OB*16 outputs of a few-row product and its epilogue (:func:`tile_epilogue`).

    ``x`` int8 shifted codes ``a - 128``, row ``r`` at byte ``x0 + r*xs``; ``w`` uint8 weight
    bytes, block ``k < OB`` at byte ``wb + k*ws``, ``nG`` groups of 64 bytes each. The product is
    emitted by ``product(builder, rows, blks, ws, nG)`` (``rows``, ``blks``: byte pointers of the
    rows and blocks), which returns ``sums(r, k)`` for the epilogue. The field tiles
    (:func:`_tile`) and the 1.6-bit ones (``kernels_tq1``) differ only in ``product``."""

    @intrinsic
    def tile(typingctx, x, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, coef, cs, o0, relu, out, O):
        sig = types.void(x, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, coef, cs, o0, relu, out, O)

        def codegen(context, builder, signature, args):
            a = Args(context, builder, signature, args)
            xp, wp = a.ptr(0, _I8), a.ptr(3, _I8)
            rows, blks = strided(builder, xp, args[1], args[2], R), strided(builder, wp, args[4], args[5], OB)
            tile_epilogue(a, R, OB, product(builder, rows, blks, args[5], args[6]))
            return context.get_dummy_value()

        return sig, codegen

    return tile


def _tile(b: int, R: int, OB: int):
    """:func:`few_row_tile` on ``b``-bit fields (4*T*nG codes a row, ``T = 8/b``).

    Quad ``t`` of a group is the field vector masked in place, ``v & ((2**b - 1) << b*t)`` =
    ``2**(b*t) * f`` (one ``vpandd``, no shift: on Intel cores vector shifts share port 0 with
    ``vpdpbusd``), as the unsigned operand of ``vpdpbusd``; the shifted codes are the signed one (a
    broadcast 32-bit load). Quad ``t`` sums into its own register, divided by ``2**(b*t)``
    (exactly: an arithmetic shift of a multiple) when the tile ends. Each block's stream is
    prefetched ``PREFETCH`` bytes ahead (at batch 1 the weights come from DRAM: measured 10-25%
    faster on the deep 4096-wide MLP). The epilogue is exact by the bound of the module docstring."""
    T = 8 // b

    def byte(v):
        return v - 256 if v >= 128 else v

    def product(builder, rows, blks, ws, nG):
        zero = ir.Constant(_V16I32, [0] * 16)
        accs = [[[cgutils.alloca_once_value(builder, zero) for _ in range(T)] for _ in range(OB)]
                for _ in range(R)]
        masks = [ir.Constant(_V64I8, [byte(((1 << b) - 1) << (b * t))] * 64) for t in range(T)]
        with cgutils.for_range(builder, nG) as loop:
            g = loop.index
            wv = tile_loads(builder, blks, g, ws)
            xq = builder.mul(g, i64(4 * T))
            for t in range(T):
                fs = [builder.and_(wv[k], masks[t]) for k in range(OB)]
                for r in range(R):
                    av = broadcast_quad(builder, rows[r], builder.add(xq, i64(4 * t)))
                    for k in range(OB):
                        acc = accs[r][k][t]
                        builder.store(_vpdpbusd(builder, builder.load(acc), fs[k], av), acc)

        def sums(r, k):  # the exact E of row r, block k: quad t's sum is 2**(b*t) times its share
            s = builder.load(accs[r][k][0])
            for t in range(1, T):
                sh = ir.Constant(_V16I32, [b * t] * 16)
                s = builder.add(s, builder.ashr(builder.load(accs[r][k][t]), sh))
            return s

        return sums

    return few_row_tile(R, OB, product)


# tiles per field width b: (rows, blocks of 16 outputs) with R*OB*T <= 16 accumulators; an
# odd block count ends with a 1-block tile
_t1_1, _t1_2, _s1_1, _s1_2 = _tile(1, 1, 2), _tile(1, 2, 1), _tile(1, 1, 1), _tile(1, 2, 1)
_t2_1, _t2_2, _t2_4 = _tile(2, 1, 2), _tile(2, 2, 2), _tile(2, 4, 1)
_s2_1, _s2_2, _s2_4 = _tile(2, 1, 1), _tile(2, 2, 1), _tile(2, 4, 1)
_t4_1, _t4_2, _t4_4 = _tile(4, 1, 2), _tile(4, 2, 2), _tile(4, 4, 2)
_s4_1, _s4_2, _s4_4 = _tile(4, 1, 1), _tile(4, 2, 1), _tile(4, 4, 1)
_t8_1, _t8_2, _t8_4 = _tile(8, 1, 2), _tile(8, 2, 2), _tile(8, 4, 2)
_s8_1, _s8_2, _s8_4 = _tile(8, 1, 1), _tile(8, 2, 1), _tile(8, 4, 1)


def tile_shape(b: int, M: int) -> tuple[int, int]:
    """(rows R, blocks OB) of the tile used for M rows with b-bit fields."""
    R = 1 if M == 1 else 2 if (M == 2 or b == 1) else 4
    OB = {1: (2, 1, 1, 1, 1), 2: (2, 2, 2, 1, 1), 4: (2, 2, 2, 2, 2), 8: (2, 2, 2, 2, 2)}[b][R]
    return R, OB


# ----------------------------------------------------------------------------------------------
# drivers
# ----------------------------------------------------------------------------------------------


#: adding and subtracting 1.5 * 2**23 rounds a float32 in [0, 2**22] to the nearest integer, ties
#: to even: ``rint`` that LLVM vectorises (the scalar loop took 4-5 us per 4096 inputs)
_ROUND = np.float32(12582912.0)


@kernel
def _quant_rows(x, mode, hi, mult, codes, A):
    """x (M, K) float32 -> codes (Mp, Kp) int8 holding ``a - 128`` (zero beyond M, K on entry),
    A (M,) code sums. mode 0: ``a = rint(min(max(x, 0), hi) * mult)`` in float32 (the fused
    quantizer; ``hi * mult <= 255``); 1: x holds the codes."""
    M, Kr = x.shape
    for m in range(M):
        s = np.int32(0)
        row = codes[m]
        xr = x[m]
        if mode == 1:
            for r in range(Kr):
                c = np.int32(xr[r])
                row[r] = np.int8(c - 128)
                s += c
        else:
            for r in range(Kr):
                v = xr[r]
                t = v if v > np.float32(0.0) else np.float32(0.0)
                t = t if t < hi else hi
                c = np.int32((t * mult + _ROUND) - _ROUND)
                row[r] = np.int8(c - 128)
                s += c
        A[m] = s


@kernel
def _part(codes, A, geo, F, w, coef, relu, out, k_lo, k_hi):
    """Output blocks k_lo..k_hi of every row (one thread's share): sums and epilogue; geo = (b,
    off, nG), ``codes`` (Mp, Kp) with Mp a multiple of the tile's rows, ``coef`` (3, cs) float64."""
    Mp, xs = codes.shape
    M, O = out.shape
    b = geo[0]
    off = geo[1]
    nG = geo[2]
    cs = coef.shape[1]
    xf = codes.reshape(-1)
    cf = coef.reshape(-1)
    of = out.reshape(-1)
    ws = nG * 64
    R = 1 if Mp == 1 else 2 if (Mp == 2 or b == 1) else 4
    OB = 1 if (b == 1 and R == 2) or (b == 2 and R == 4) else 2
    for m0 in range(0, Mp, R):
        x0 = m0 * xs
        nv = M - m0
        k = k_lo
        while k < k_hi:
            wb = k * ws
            o0 = 16 * k
            if OB == 2 and k + 2 <= k_hi:
                if b == 1:
                    _t1_1(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                elif b == 2:
                    if R == 1:
                        _t2_1(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                    else:
                        _t2_2(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                elif b == 4:
                    if R == 1:
                        _t4_1(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                    elif R == 2:
                        _t4_2(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                    else:
                        _t4_4(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                else:
                    if R == 1:
                        _t8_1(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                    elif R == 2:
                        _t8_2(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                    else:
                        _t8_4(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                k += 2
            else:
                if b == 1:
                    if R == 1:
                        _s1_1(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                    else:
                        _s1_2(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                elif b == 2:
                    if R == 1:
                        _s2_1(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                    elif R == 2:
                        _s2_2(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                    else:
                        _s2_4(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                elif b == 4:
                    if R == 1:
                        _s4_1(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                    elif R == 2:
                        _s4_2(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                    else:
                        _s4_4(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                else:
                    if R == 1:
                        _s8_1(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                    elif R == 2:
                        _s8_2(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                    else:
                        _s8_4(xf, x0, xs, w, wb, ws, nG, A, m0, nv, F, off, cf, cs, o0, relu, of, O)
                k += 1


@kernel
def _padded_rows(M, b):
    """Rows of the code buffer: M rounded up to the tile's rows."""
    if M <= 2:
        return M
    R = 2 if b == 1 else 4
    return -(-M // R) * R


@kernel
def _codes(x, mode, qp, geo):
    """Quantized codes (Mp, Kp) int8 and code sums A of rows x."""
    M = x.shape[0]
    b = geo[0]
    codes = np.zeros((_padded_rows(M, b), geo[2] * 32 // b), np.int8)
    A = np.empty(M, np.int64)
    _quant_rows(x, mode, qp[0], qp[1], codes, A)
    return codes, A


@kernel
def _gemv_serial(x, mode, qp, geo, F, w, coef, relu, out):
    codes, A = _codes(x, mode, qp, geo)
    _part(codes, A, geo, F, w, coef, relu, out, 0, F.shape[0] // 16)


class GemvWeights:
    """Weights of the few-row kernels: fields (:func:`pack_fields`) and what the epilogue needs."""

    def __init__(self, q: np.ndarray, wide: bool = False) -> None:
        q = np.asarray(q)
        fb = field_bits(q, wide)
        if fb is None:
            lo, hi = int(q.min()), int(q.max())
            most = WIDE_BITS if wide else FIELD_BITS[-1]
            raise ValueError(f"integer weights in [{lo}, {hi}] need fields wider than {most} bits")
        self.b, self.off = fb
        self.O, self.K = (int(v) for v in q.shape)
        if self.K * 128 * 255 // (8 // self.b) >= 2**31:  # the bound of the module docstring
            raise ValueError(f"reduction of {self.K} too long for int32 sums")
        self.w = pack_fields_fast(q, self.b, self.off)
        self.nG = -(-self.K // 32) * self.b  # groups of 32/b reduction indices
        F = np.zeros(-(-self.O // 16) * 16, np.int32)  # < 128*255*K < 2**31 (the bound above)
        F[: self.O] = 128 * (q.sum(axis=1, dtype=np.int64) + self.off * self.K)
        self.F = F
        self.geo = np.array([self.b, self.off, self.nG], np.int64)
        #: the 1.6-bit form of ternary fields (``kernels_tq1.tq1_weights``): rows ``M <=
        #: tq1.max_rows`` run on it, with this object's ``F``, ``off`` and coefficients
        self.tq1 = None

    @property
    def nbytes(self) -> int:
        return int(self.w.nbytes + self.F.nbytes + (self.tq1.nbytes if self.tq1 is not None else 0))


def gemv_coef(s0: np.ndarray, s1: np.ndarray, s2: np.ndarray, gw: GemvWeights) -> np.ndarray:
    """The epilogue's coefficients as the kernel reads them: float64 (3, O rounded up to 16), rows
    s0, s1, s2 (zero beyond O)."""
    c = np.zeros((3, gw.F.shape[0]), np.float64)
    c[:, : gw.O] = np.stack([s0, s1, s2])
    return c


def gemv_run(x: np.ndarray, mode: int, qp: np.ndarray, gw: GemvWeights, coef: np.ndarray, relu: bool,
             out: np.ndarray) -> np.ndarray:
    """:func:`gemv` with its arguments prepared (what a layer caches): ``qp`` float32 (hi, mult),
    ``coef`` float64 rows s0, s1, s2 (:func:`gemv_coef`; an unpadded (3, O) array is padded here)."""
    if coef.shape[1] != gw.F.shape[0]:
        coef = gemv_coef(coef[0], coef[1], coef[2], gw)
    M, O = out.shape
    if gw.tq1 is not None and gw.tq1.max_rows >= M:  # ternary at 1.6 bits (kernels_tq1)
        gw.tq1.run(x, mode, qp, coef, relu, out)
        return out
    if not (O >= 64 and use_parallel(M * O * gw.K, GEMV_MIN_PARALLEL_MACS)):
        _gemv_serial(x, mode, qp, gw.geo, gw.F, gw.w, coef, relu, out)
        return out
    codes, A = _codes(x, mode, qp, gw.geo)
    parallel_for(_part, gw.F.shape[0] // 16, codes, A, gw.geo, gw.F, gw.w, coef, relu, out, parallel=True,
                 grain=2)
    return out


def gemv(x: np.ndarray, mode: int, hi: float, mult: float, gw: GemvWeights, s0: np.ndarray,
         s1: np.ndarray, s2: np.ndarray, relu: bool, out: np.ndarray) -> np.ndarray:
    """``out`` (M, O) float32 = the epilogue of the module docstring for rows ``x`` (M, K) (float32,
    or integer codes with mode 1): quantized with ``rint(clip(x, 0, hi) * mult)`` (mode 0) or codes
    already (mode 1). Needs AVX-512 VNNI (``_jit.HOST_VNNI``; the tiles are compiled on first use)."""
    if not HOST_VNNI:
        raise RuntimeError("kernels_gemv.gemv needs AVX-512 VNNI; use the bit-serial gemm_rows on this CPU")
    qp = np.array([hi, mult], np.float32)
    return gemv_run(x, int(mode), qp, gw, gemv_coef(s0, s1, s2, gw), bool(relu), out)
