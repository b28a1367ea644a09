"""Many-row GEMM on compact low-bit weights by table lookup (LUT): binary, ternary and 2-bit
weights times activation codes of up to 6 bits (:func:`lut_fits`), exact in integer arithmetic.

Math (one layer; see ``kernels.py`` for the notation). The weights are small integers ``w_int[o, r]``
taking at most ``2**cb`` values ``lv[0..]`` (``cb`` = 1: binary +-1; ``cb`` = 2: ternary -1/0/+1,
DoReFa 2-bit -3/-1/1/3), stored as codes ``c[o, r]`` with ``w_int = lv[c]``. The reduction is cut
into groups of ``c = 4 // cb`` consecutive indices (4 binary or 2 ternary weights); the codes of
one group form a 4-bit index ``nib[o, g] = sum_i c[o, g*c + i] << (cb*i)``. For activation row
``m`` the *table* of group ``g`` lists, for each of the 16 indices, the group's dot product::

    T[m, g, n] = sum_{i < c} lv[(n >> cb*i) & (2**cb - 1)] * a[m, g*c + i]      (exact in int8)

so that ``D[m, o] = sum_r w_int[o, r] a[m, r] = sum_g T[m, g, nib[o, g]]``: one lookup replaces
``c`` multiply-adds. It fits int8 while ``c * max|lv| * (2**ka - 1) <= 127``: binary weights with
activations of up to 5 bits, ternary weights with up to 6, 2-bit weights (-3/-1/1/3) with up to 4.

AVX-512 (VBMI + VNNI): ``vpermb`` looks up 64 bytes in one 64-byte register holding the tables of
4 consecutive groups (byte ``16*s + n``: group slot ``s``, index ``n``); the index byte of output
``o`` (of a block of 16) and slot ``s`` is ``16*s + nib[o, g]`` at byte ``4*o + s``, so that
``vpdpbusd`` with a vector of ones adds the 4 looked-up bytes of each output into its int32 lane:
two instructions for ``16 * 4 * c`` multiply-adds (256 for binary weights, 128 for ternary) where
the int8 kernel needs four ``vpdpbusd`` (64 each), and the weights stay at ``cb`` bits (one
64-byte load holds the indices of 16 outputs x 8 groups, two steps: low and high nibbles). Where two
table entries still fit int8 (:func:`lut_sums`) the two steps' looked-up bytes are added first
(``vpaddb``) and widened by one ``vpdpbusd``.
A tile keeps R rows x OB blocks of 16 outputs in registers (R*OB accumulators); the tables of the
R rows are read once per output chunk, the weights once per row tile. This is the table-lookup
idea of T-MAC (Wei et al., 2024, arXiv:2407.00088) and bitnet.cpp's TL kernels, here with the
full-register byte permute instead of ``pshufb`` and exact int8 tables of integer codes.

Layouts: tables ``tab`` (M, Gp*16) int8, ``Gp`` groups padded to a multiple of 8 (padding
activations are 0, so padding entries are 0). Weights ``wq`` (Op/16, Gp/8, 64) uint8: block ``b``,
step pair ``p``, byte ``4*o + s`` = ``nib[16b + o, 8p + s] | nib[16b + o, 8p + 4 + s] << 4``.

The plain path (``_lut_plain_range``, any CPU) computes the same sums with scalar lookups.
Threads: the output blocks are split over the runtime's worker threads for few rows (each thread
reads half the weights), the rows for many (``parallel_for``).
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import _I8, _I32, _I64, _V16I32, _V64I8, HAS_VNNI, _vpdpbusd, host_has, kernel
from ._llvm_args import Args, i64, load_as, offset_pointers, store_as, strided
from .kernels_threads import num_threads, parallel_for, use_parallel

# a Linear layer uses the table-lookup GEMM from this many rows on (fewer: the GEMV kernels) ...
LUT_MIN_ROWS = 8
#: ... or from these, per weight code bits (1: binary; 2: ternary, 2-bit): the GEMV reads the whole
#: weight matrix again for every few rows (2 binary, 4 ternary / 2-bit, then it starts over), the
#: tables once per row tile. The 8 x 4096^2 MLP with 4-bit codes, one thread, AMD EPYC (one-off
#: probe, then benchmarks/results/epyc_zen4/ab_lut_min_rows.md): GEMV / tables time 1.07 at 2 rows
#: and 1.8-2.3 at 3-7 (binary); 0.56-0.81 at 2 rows, 0.7-1.0 at 3-4 and 1.1-1.3 at 5-7 (ternary on
#: either table form, 2-bit)
LUT_MIN_ROWS_CB = {1: 3, 2: 5}


def lut_min_rows(cb: int) -> int:
    """Rows from which a Linear layer with ``cb``-bit weight codes runs on its lookup tables (on the
    plain path :data:`LUT_MIN_ROWS`: the fewer rows were measured on the AVX-512 tiles only)."""
    return min(LUT_MIN_ROWS, LUT_MIN_ROWS_CB.get(cb, LUT_MIN_ROWS)) if HAS_LUT else LUT_MIN_ROWS


# rows x 16-output blocks of a register tile (R*OB accumulators of 32 zmm registers)
LUT_R, LUT_OB = 4, 4
# rows whose tables are kept hot (L2) while the weights of all outputs stream past
LUT_ROW_BLOCK = 64
#: the lookup GEMM's work in ``kernels_threads.use_parallel``'s word-operations per unit (one row x
#: 16 outputs x one step pair). Split at every size, the 8 x 4096^2 MLP at 8 rows ran 0.81x as fast
#: on 2 threads as on 1 with binary weights (2**18 units per layer) and 1.12x with ternary (2**19),
#: and at 64 rows binary gained 1.16x (benchmarks/results/no_amx/probe_split_claims.md): with 4
#: and the 2**21 threshold the binary layers at 8 rows run on one thread (then 1.00x), the others
#: split (no_amx/thread_scaling_lut.md)
LUT_UNIT_WORK = 4
#: from this many row values (M*K) the tables are built on threads: 0.19-0.86x split at 2**16-2**19
#: values, 0.92x at 2**20, 1.45-1.77x above (benchmarks/results/no_amx/stream_split.md; split from
#: 16 rows before, e.g. 64 rows of 4096)
LUT_TABLES_MIN_PARALLEL = 1 << 20


def _host_has_lut() -> bool:
    if os.environ.get("LOWBIT_RUNTIME_LUT", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return HAS_VNNI and host_has("avx512vbmi")


#: the AVX-512 table-lookup tiles may be used here (VBMI + VNNI); else the plain path
HAS_LUT = _host_has_lut()


# ----------------------------------------------------------------------------------------------
# weights and tables
# ----------------------------------------------------------------------------------------------


def lut_levels(w_int: np.ndarray) -> tuple[np.ndarray, int] | None:
    """``(lv, cb)``: the sorted integer levels of ``w_int`` (padded with 0 to ``2**cb`` entries) and
    the code bits, or None when the weights take more than 4 values."""
    w = np.asarray(w_int)
    lo, hi = (int(w.min()), int(w.max())) if w.size and w.dtype.kind == "i" else (0, 1 << 16)
    if hi - lo < 1 << 16:  # small integers: counting them took 1/3 the time of np.unique's sort (4096^2)
        vals = np.flatnonzero(np.bincount(np.subtract(w.reshape(-1), lo, dtype=np.intp))) + lo
    else:
        vals = np.unique(w)
    if vals.size > 4:
        return None
    cb = 1 if vals.size <= 2 else 2
    lv = np.zeros(1 << cb, np.int64)
    lv[: vals.size] = vals
    return lv, cb


def lut_fits(lv: np.ndarray, cb: int, ka: int) -> bool:
    """Whether every table entry fits int8: ``(4 // cb) * max|lv| * (2**ka - 1) <= 127``."""
    return (4 // cb) * int(np.abs(lv).max()) * ((1 << ka) - 1) <= 127


def lut_sums(lv: np.ndarray, cb: int, ka: int) -> int:
    """Lookups the tiles may add as bytes before widening them (:func:`lut_tile`'s ``S``): 2 where
    two table entries still fit int8, ``2 * (4 // cb) * max|lv| * (2**ka - 1) <= 127`` (binary
    weights with up to 4-bit codes, ternary with up to 5), else 1."""
    return 2 if 2 * (4 // cb) * int(np.abs(lv).max()) * ((1 << ka) - 1) <= 127 else 1


def lut_groups(K: int, cb: int) -> int:
    """Groups of the reduction, padded to whole step pairs (8 groups)."""
    c = 4 // cb
    groups = (K + c - 1) // c
    return (groups + 7) // 8 * 8


def lut_pack_weights(w_int: np.ndarray, lv: np.ndarray, cb: int) -> np.ndarray:
    """``w_int`` (O, K) with values in ``lv`` -> ``wq`` (Op/16, Gp/8, 64) uint8 (module docstring)."""
    w_int = np.asarray(w_int, np.int64)
    O, K = w_int.shape
    c = 4 // cb
    Gp = lut_groups(K, cb)
    Op = -(-O // 16) * 16
    codes = np.zeros((Op, Gp * c), np.int64)
    codes[:O, :K] = _codes_of(w_int, lv)
    nib = np.zeros((Op, Gp), np.int64)
    for i in range(c):
        nib |= codes[:, i::c] << (cb * i)
    nib = nib.reshape(Op // 16, 16, Gp // 8, 2, 4)  # block, o, pair, half, slot
    byte = nib[:, :, :, 0, :] | (nib[:, :, :, 1, :] << 4)  # block, o, pair, slot
    return np.ascontiguousarray(byte.transpose(0, 2, 1, 3).reshape(Op // 16, Gp // 8, 64).astype(np.uint8))


def _codes_of(w_int: np.ndarray, lv: np.ndarray) -> np.ndarray:
    codes = np.full(w_int.shape, -1, np.int64)
    for i in range(lv.size - 1, -1, -1):  # the first index of a repeated (padding) level wins
        codes[w_int == lv[i]] = i
    if (codes < 0).any():
        raise ValueError("weights outside the levels")
    return codes


def lut_tables_reference(a: np.ndarray, lv: np.ndarray, cb: int) -> np.ndarray:
    """NumPy reference of the tables: codes ``a`` (M, K) -> ``T`` (M, Gp*16) int8."""
    a = np.asarray(a, np.int64)
    M, K = a.shape
    c = 4 // cb
    Gp = lut_groups(K, cb)
    ap = np.zeros((M, Gp * c), np.int64)
    ap[:, :K] = a
    n = np.arange(16)
    sel = lv[(n[:, None] >> (cb * np.arange(c))[None, :]) & ((1 << cb) - 1)]  # (16, c)
    T = np.einsum("mgi,ni->mgn", ap.reshape(M, Gp, c), sel)
    if np.abs(T).max(initial=0) > 127:
        raise ValueError("table entries do not fit int8")
    return T.reshape(M, Gp * 16).astype(np.int8)


def lut_gemm_reference(a: np.ndarray, w_int: np.ndarray, s0: np.ndarray, s1: np.ndarray,
                       relu: bool = False) -> np.ndarray:
    """NumPy reference of :func:`lut_gemm`: ``y = s1*D + s0`` (float64, then ReLU, float32) with the
    exact ``D = a @ w_int.T``."""
    D = np.asarray(a, np.int64) @ np.asarray(w_int, np.int64).T
    O = D.shape[1]
    y = s1[:O] * D.astype(np.float64) + s0[:O]
    return (np.maximum(y, 0.0) if relu else y).astype(np.float32)


@kernel
def _row_codes(xr, mode, hi, mult, a):
    """Codes of one row into ``a`` (uint8, zero beyond the row)."""
    K = xr.shape[0]
    if mode == 1:
        for r in range(K):
            a[r] = np.uint8(xr[r])
    else:
        for r in range(K):
            t = min(max(xr[r], np.float32(0.0)), hi)
            a[r] = np.uint8(np.rint(t * mult))


@kernel
def _lut_tables_plain(x, mode, hi, mult, sel, lv, c, T, m_lo, m_hi):
    """Tables of rows m_lo..m_hi (scalar path); ``sel`` (c, 64) int8: level of index ``j % 16`` at
    position i."""
    Gp = T.shape[1] // 16
    a = np.zeros(Gp * c + 16, np.uint8)
    for m in range(m_lo, m_hi):
        _row_codes(x[m], mode, hi, mult, a)
        tr = T[m]
        for g in range(Gp):
            for n in range(16):
                e = np.int32(0)
                for i in range(c):
                    e += np.int32(sel[i, n]) * np.int32(a[g * c + i])
                tr[g * 16 + n] = np.int8(e)


@kernel
def _lut_tables_avx(x, mode, hi, mult, sel, lv, c, T, m_lo, m_hi):
    """Tables of rows m_lo..m_hi (``table_row``); ``lv`` (2**cb,) integer levels."""
    Gp = T.shape[1] // 16
    a = np.zeros(Gp * c + 16, np.uint8)
    lv8 = np.empty(4, np.int8)
    for k in range(lv.shape[0]):
        lv8[k] = np.int8(lv[k])
    tflat = T.reshape(-1)
    for m in range(m_lo, m_hi):
        _row_codes(x[m], mode, hi, mult, a)
        if c == 4:
            _table_row4(a, lv8, Gp // 4, tflat, m * Gp * 16)
        else:
            _table_row2(a, lv8, Gp // 4, tflat, m * Gp * 16)


_SELECTORS: dict[tuple[int, bytes], tuple[np.ndarray, np.ndarray]] = {}


def _selectors(lv: np.ndarray, cb: int) -> tuple[np.ndarray, np.ndarray]:
    """(sel, lv int32) of :func:`lut_tables` for integer levels ``lv`` of ``cb``-bit codes: ``sel[i, j]``
    the level that the ``i``-th code of a 4-bit table index ``j % 16`` selects. Cached: they depend
    on the levels only, and making them took ~6 us of a ~25 us call at 8 rows of 4096."""
    key = (cb, lv.tobytes())
    got = _SELECTORS.get(key)
    if got is None:
        c = 4 // cb
        j = np.arange(64) % 16
        sel = lv[(j[None, :] >> (cb * np.arange(c))[:, None]) & ((1 << cb) - 1)]
        got = _SELECTORS[key] = (np.ascontiguousarray(sel.astype(np.int8)), lv.astype(np.int32))
    return got


def lut_tables(x: np.ndarray, lv: np.ndarray, cb: int, hi: float = 0.0, mult: float = 0.0, mode: int = 1,
               out: np.ndarray | None = None, plain: bool | None = None) -> np.ndarray:
    """Tables (M, Gp*16) int8 of the rows of ``x`` (M, K): quantized with the fused clip formula
    (mode 0) or taken as codes (mode 1). The caller checks :func:`lut_fits`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    M, K = x.shape
    sel, lv32 = _selectors(lv, cb)
    T = np.empty((M, lut_groups(K, cb) * 16), np.int8) if out is None else out
    fn = _lut_tables_plain if (not HAS_LUT if plain is None else plain) else _lut_tables_avx
    parallel_for(fn, M, x, np.int64(mode), np.float32(hi), np.float32(mult), sel, lv32, np.int64(4 // cb), T,
                 parallel=use_parallel(M * K, LUT_TABLES_MIN_PARALLEL), grain=8)
    return T


# ----------------------------------------------------------------------------------------------
# the AVX-512 tile
# ----------------------------------------------------------------------------------------------

def _vpermb(builder: ir.IRBuilder, table, idx):
    fnty = ir.FunctionType(_V64I8, [_V64I8, _V64I8])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.permvar.qi.512")
    return builder.call(fn, [table, idx])


def table_row(c: int):
    """An intrinsic ``row(a, lv, nsteps, T, toff)``: the tables of one row of codes ``a`` (uint8,
    16 readable bytes past the last step) for integer levels ``lv`` (int8, ``2**cb`` of them). Per
    step ``t`` the ``q = 4*c`` codes are scaled by every level into 32 bytes
    ``s[q*k + j] = lv[k] * a[q*t + j]``, then::

        T[toff + 64*t + j] = sum_{i<c} s[q*code_i(j % 16) + c*(j // 16) + i]

    with ``code_i(n) = (n >> cb*i) & (2**cb - 1)``: one byte permute (``vpermb``) and one add per
    position ``i`` of a group (int8, exact when the entries fit)."""
    cb = 4 // c
    q = 4 * c
    L = 1 << cb
    masks = []
    for i in range(c):
        idx = []
        for j in range(64):
            code = ((j % 16) >> (cb * i)) & (L - 1)
            idx.append(q * code + c * (j // 16) + i)
        masks.append(ir.Constant(ir.VectorType(_I32, 64), idx))

    @intrinsic
    def row(typingctx, a, lv, nsteps, T, toff):
        sig = types.void(a, lv, nsteps, T, toff)

        def codegen(context, builder, signature, args):
            a = Args(context, builder, signature, args)
            ap = a.ptr(0, _I8)
            lp = a.ptr(1, _I8)
            tp = a.ptr(3, _I8, args[4])
            vq = ir.VectorType(_I8, q)
            lvs = []
            for k in range(L):
                lk = builder.load(builder.gep(lp, [i64(k)]))
                v = builder.insert_element(ir.Constant(vq, None), lk, ir.Constant(_I32, 0))
                zeros = ir.Constant(ir.VectorType(_I32, q), [0] * q)
                lvs.append(builder.shuffle_vector(v, ir.Constant(vq, None), zeros))
            with cgutils.for_range(builder, args[2]) as loop:  # nsteps
                t = loop.index
                ld = load_as(builder, ap, vq, builder.mul(t, i64(q)))
                sc = [builder.mul(ld, lvs[k]) for k in range(L)]
                while len(sc) > 1:  # concatenate into 32 bytes
                    n = sc[0].type.count
                    cat = ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n)))
                    sc = [builder.shuffle_vector(sc[k], sc[k + 1], cat) for k in range(0, len(sc), 2)]
                blk = sc[0]
                acc = None
                for i in range(c):
                    term = builder.shuffle_vector(blk, ir.Constant(blk.type, None), masks[i])
                    acc = term if acc is None else builder.add(acc, term)
                store_as(builder, acc, tp, builder.mul(t, i64(64)))
            return context.get_dummy_value()

        return sig, codegen

    return row


def lut_tile(R: int, OB: int):
    """An intrinsic ``tile(tab, trow, koff, nseg, npairs, wq, wbase, wstride, acc, sums)``: the int32
    sums ``D`` of R rows x OB*16 outputs into ``acc`` (R*OB*16 int32, row major).

    ``tab`` int8 tables (1-d), ``trow`` int64 (R,) element offset of each row's table; the reduction
    is ``nseg`` segments of ``npairs`` step pairs (8 groups each), segment ``s`` of row ``r`` at
    ``tab[trow[r] + koff[s]:]`` (a GEMM: one segment at offset 0; a convolution: one per kernel tap,
    each reading the tables of another input pixel, :mod:`kernels_lut_conv`); ``wq`` uint8 packed
    weights (1-d), block ``b`` of the tile starting at ``wbase + b*wstride``, its step pairs in
    segment order.

    ``sums`` (1 or 2): lookups added as bytes (``vpaddb``) before one ``vpdpbusd`` widens them, 2 where
    two table entries still fit int8 (:func:`lut_sums`): the two steps of a pair, so that the widening
    adds run once per two permutes (both loops are compiled; the branch is taken once per call). Four,
    over two pairs, were no faster in a one-off probe: each lookup still costs one add."""

    @intrinsic
    def tile(typingctx, tab, trow, koff, nseg, npairs, wq, wbase, wstride, acc, sums):
        sig = types.void(tab, trow, koff, nseg, npairs, wq, wbase, wstride, acc, sums)

        def codegen(context, builder, signature, args):
            a = Args(context, builder, signature, args)
            tp = a.ptr(0, _I8)
            rp = a.ptr(1, _I64)
            kp = a.ptr(2, _I64)
            npairs = args[4]
            wp = a.ptr(5, _I8, args[6])
            bases = offset_pointers(builder, tp, rp, R)
            wbases = strided(builder, wp, None, args[7], OB)
            zero = ir.Constant(_V16I32, [0] * 16)
            ones = ir.Constant(_V64I8, [1] * 64)
            lo4 = ir.Constant(_V64I8, [15] * 64)
            four = ir.Constant(_V64I8, [4] * 64)
            slot = ir.Constant(_V64I8, [16 * (j % 4) for j in range(64)])
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(R * OB)]

            def pair(S: int, q, toff) -> None:
                """Step pair ``q`` of the weights against the tables at ``trow[r] + toff``."""
                idx = []
                for b in range(OB):
                    v = load_as(builder, wbases[b], _V64I8, builder.mul(q, i64(64)))
                    lo, hi = builder.and_(v, lo4), builder.lshr(v, four)  # the two steps' nibbles
                    idx.append((builder.or_(lo, slot), builder.or_(hi, slot)))
                for r in range(R):
                    tabs = [load_as(builder, bases[r], _V64I8, builder.add(toff, i64(64 * h)))
                            for h in range(2)]
                    for b in range(OB):
                        part = None
                        for h in range(2):
                            look = _vpermb(builder, tabs[h], idx[b][h])
                            part = look if part is None else builder.add(part, look)
                            if S == 1 or h == 1:
                                acc = accs[r * OB + b]
                                builder.store(_vpdpbusd(builder, builder.load(acc), ones, part), acc)
                                part = None

            def loop(S: int) -> None:
                with cgutils.for_range(builder, args[3]) as segs:  # nseg
                    s = segs.index
                    soff = builder.load(builder.gep(kp, [s]))
                    q0 = builder.mul(s, npairs)
                    with cgutils.for_range(builder, npairs) as pairs:
                        p = pairs.index
                        pair(S, builder.add(q0, p), builder.add(soff, builder.mul(p, i64(128))))

            is2 = builder.icmp_signed("==", args[9], ir.Constant(args[9].type, 2))
            with builder.if_else(is2) as (two, one):
                with two:
                    loop(2)
                with one:
                    loop(1)
            ap = a.ptr(8, _I32)
            for k in range(R * OB):
                store_as(builder, builder.load(accs[k]), ap, i64(16 * k), 4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_ONE_SEGMENT = np.zeros(1, np.int64)  # a GEMM's reduction: one segment at offset 0
_TILES = tuple(lut_tile(LUT_R, ob) for ob in range(1, LUT_OB + 1)) if HAS_LUT else ()
_table_row4 = table_row(4) if HAS_LUT else None
_table_row2 = table_row(2) if HAS_LUT else None
if HAS_LUT:
    _tile1, _tile2, _tile3, _tile4 = _TILES
else:  # never called: the plain path runs instead
    _tile1 = _tile2 = _tile3 = _tile4 = None


@kernel
def _epilogue(acc, R, OB, nv, o0, O, s0, s1, relu, out, m0):
    """``out[m0 + r, o0 + o] = f32(relu(s1*D + s0))`` for the valid rows and outputs of a tile."""
    W = OB * 16
    on = min(W, O - o0)
    c1 = s1[o0 : o0 + on]
    c0 = s0[o0 : o0 + on]
    for r in range(nv):  # branch-free inner loops (they vectorise)
        orow = out[m0 + r, o0 : o0 + on]
        ar = acc[r * W : r * W + on]
        if relu:
            for o in range(on):
                orow[o] = np.float32(max(c1[o] * np.float64(ar[o]) + c0[o], 0.0))
        else:
            for o in range(on):
                orow[o] = np.float32(c1[o] * np.float64(ar[o]) + c0[o])


@kernel
def _lut_avx_range(tab, wq, O, s0, s1, relu, out, by_rows, sums, lo, hi):
    """Rows lo..hi (``by_rows``) or output blocks lo..hi of every row."""
    M = out.shape[0]
    nblk = wq.shape[0]
    npairs = wq.shape[1]
    wstride = npairs * 64
    ldt = tab.shape[1]
    tflat = tab.reshape(-1)
    wflat = wq.reshape(-1)
    acc = np.empty(LUT_R * LUT_OB * 16, np.int32)
    trow = np.empty(LUT_R, np.int64)
    if by_rows:
        m_lo, m_hi, b_lo, b_hi = lo, hi, 0, nblk
    else:
        m_lo, m_hi, b_lo, b_hi = 0, M, lo, hi
    for mb in range(m_lo, m_hi, LUT_ROW_BLOCK):
        mb_hi = min(m_hi, mb + LUT_ROW_BLOCK)
        for b0 in range(b_lo, b_hi, LUT_OB):
            ob = min(LUT_OB, b_hi - b0)
            wbase = b0 * wstride
            for m0 in range(mb, mb_hi, LUT_R):
                nv = min(LUT_R, mb_hi - m0)
                for r in range(LUT_R):
                    trow[r] = (m0 + min(r, nv - 1)) * ldt
                if ob == 4:
                    _tile4(tflat, trow, _ONE_SEGMENT, 1, npairs, wflat, wbase, wstride, acc, sums)
                elif ob == 3:
                    _tile3(tflat, trow, _ONE_SEGMENT, 1, npairs, wflat, wbase, wstride, acc, sums)
                elif ob == 2:
                    _tile2(tflat, trow, _ONE_SEGMENT, 1, npairs, wflat, wbase, wstride, acc, sums)
                else:
                    _tile1(tflat, trow, _ONE_SEGMENT, 1, npairs, wflat, wbase, wstride, acc, sums)
                _epilogue(acc, LUT_R, ob, nv, b0 * 16, O, s0, s1, relu, out, m0)


@kernel
def _lut_plain_range(tab, wq, O, s0, s1, relu, out, by_rows, sums, lo, hi):
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
                        n = (wb[j] >> np.uint8(4 * h)) & np.uint8(15)
                        acc[j >> 2] += np.int64(t[(j & 3) * 16 + n])
            for o in range(min(16, O - 16 * b)):
                oc = 16 * b + o
                v = s1[oc] * np.float64(acc[o]) + s0[oc]
                if relu and v < 0.0:
                    v = 0.0
                out[m, oc] = np.float32(v)


def lut_gemm(tab: np.ndarray, wq: np.ndarray, O: int, s0: np.ndarray, s1: np.ndarray, relu: bool = False,
             out: np.ndarray | None = None, plain: bool | None = None, sums: int = 1) -> np.ndarray:
    """``out[m, o] = float32(relu(s1[o]*D[m, o] + s0[o]))`` (float64 multiply then add) with the exact
    ``D = sum_g tab[m, g, nib[o, g]]`` (:func:`lut_tables`, :func:`lut_pack_weights`). ``s0``,
    ``s1`` float64 of at least O entries. ``plain`` forces the scalar path (default: where the CPU
    lacks VBMI / VNNI). ``sums``: :func:`lut_sums` of the tables' levels and codes (1 is always
    exact; 2 only where it says so)."""
    if sums not in (1, 2):
        raise ValueError(f"sums={sums!r}: the tiles add 1 or 2 lookups before widening (lut_sums)")
    M = tab.shape[0]
    if out is None:
        out = np.empty((M, O), np.float32)
    if M == 0:
        return out
    if plain is None:
        plain = not HAS_LUT
    fn = _lut_plain_range if plain else _lut_avx_range
    nblk = wq.shape[0]
    nt = num_threads()
    by_rows = 64 * nt <= M
    # outputs for few rows (each thread streams its part of the weights), rows for many
    n = M if by_rows else nblk
    par = use_parallel(LUT_UNIT_WORK * M * nblk * wq.shape[1])
    grain = LUT_R * 4 if by_rows else LUT_OB
    parallel_for(fn, n, tab, wq, np.int64(O), s0, s1, bool(relu), out, by_rows, np.int64(sums), parallel=par,
                 grain=grain)
    return out
