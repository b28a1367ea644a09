"""Convolutions on compact binary / ternary / 2-bit weights by table lookup (LUT), exact in integer
arithmetic: the :mod:`kernels_gemm` tables and tiles read in place from a padded NHWC code image,
with the int8 convolution's epilogue (``_jit._Epilogue``: folded batch norm, residual, ReLU, the
next layer's codes), so that a layer's outputs are the int8 kernel's bit for bit.

Math. The weights ``w_int[o, kh, kw, c]`` take the levels ``lv`` of ``cb``-bit codes
(``kernels_gemm.lut_levels``); an activation ``a[n, h, w, c]`` is a code of at most ``ka`` bits.
The table of *pixel* ``(n, h, w)`` lists, for each group ``g`` of ``c = 4 // cb`` consecutive
channels and each 4-bit index ``j``, the group's dot product with the weight pattern ``j``::

    T[n, h, w, g, j] = sum_{i < c} lv[(j >> cb*i) & (2**cb - 1)] * a[n, h, w, g*c + i]

so that the convolution is a sum of lookups, one per group and kernel tap::

    D[n, oh, ow, o] = sum_{kh, kw, g} T[n, oh*sh + kh*dh, ow*sw + kw*dw, g, nib[o, kh, kw, g]]

A pixel's table is built once and read by every output pixel whose window holds it (9 for a 3x3
convolution): im2col would build it 9 times. The reduction of an output pixel is one *segment*
per tap, each ``Gc/8`` step pairs of the tile (``Gc`` = the groups of one pixel's channels padded
to whole pairs: 16 ternary or 32 binary channels are one pair), at table offset
``koff[kh, kw] = (kh*dh*Wp + kw*dw) * 16*Gc`` from the output pixel's first tap. The weights
of tap ``(kh, kw)`` are ``kernels_gemm.lut_pack_weights`` of its (O, C) slice, padded to ``Gc``
groups (the padding activations are 0, so any level does), the taps one after the other.

Cost: per 16 outputs and step pair (8 groups: 16 ternary or 32 binary channels) the tile does 2
byte permutes (``vpermb``) and 1 ``vpdpbusd`` (with ``kernels_gemm.lut_sums`` = 2) where the int8
kernel does 4 (ternary) or 8 (binary) ``vpdpbusd``. On Zen 4 the two instructions share pipes
(``issue_rates.md``: 2.96 G ``vpermb``/s, 3.67 G ``vpdpbusd``/s, 2.42 G of the pair/s), which puts
the ternary ceiling near 1.15x the int8 kernel's rate and the binary one near 2.3x, before the
tables (16 bytes per group and pixel, one pass over the image, ``kernels_gemm.table_row``).

Rows: an R-row tile takes R consecutive output pixels of one output row (``LUT_CONV_R``); its
int32 sums go through the int8 epilogue (``_jit.amx_epilogue``). Threads: output rows.

Where the layers use it (:func:`lut_conv_applies`), from measurements on an AMD EPYC (Zen 4), one
thread: ResNet-20 with binary weights and 4-bit activations in the flat executor ran 1.27-1.28x
as fast with its 32- and 64-channel layers by lookup as on the int8 kernel alone, with ternary
weights on its 64-channel layers 1.03-1.05x (``benchmarks/results/epyc_zen4/ab_lut_conv.md``).
Per layer, tables included (``probe_lut_conv.md``, batch 8): binary on 32 / 64 channels
1.12-1.66x the int8 kernel, ternary on 64 1.08x, on 32 0.81-0.94x, both on 16 channels 0.60-0.71x
(binary: half of each step pair is padding there, and its tables cost as much per pixel as on 32
channels). A second form with one table offset per step (no padding for 16 binary channels, an
odd last step alone) measured no faster on 16 channels in the flat executor (1.00x) and was not
kept.
"""

from __future__ import annotations

import numpy as np

from ._jit import amx_epilogue_1, amx_epilogue_2, amx_epilogue_3, amx_epilogue_4, kernel
from .kernels_gemm import HAS_LUT, _table_row2, _table_row4, lut_groups, lut_pack_weights, lut_tile
from .kernels_int8 import epilogue_flags
from .kernels_threads import parallel_for, use_parallel

# rows of a tile per number of 16-output blocks (index OB = 1..4): R*OB accumulators, 2*OB index
# vectors and the two table vectors of a row in 32 zmm registers
LUT_CONV_R = (0, 8, 8, 6, 4)
#: False: every convolution on the int8 kernel (comparisons, tests)
USE = True
#: from this many multiply-adds a convolution is split over threads (as the int8 kernel's)
LUT_CONV_MIN_PARALLEL_MACS = 1 << 24
#: and its tables from this many table bytes
LUT_CONV_TABLES_MIN_PARALLEL = 1 << 20
#: int64 entries of ``_lut_conv_range``'s scratch: a tile's int32 sums (R*OB*16 <= 288, LUT_CONV_R)
#: and its 8 row offsets
LUT_CONV_SCRATCH = 152

if HAS_LUT:
    _ctile1, _ctile2, _ctile3, _ctile4 = (lut_tile(LUT_CONV_R[ob], ob) for ob in range(1, 5))
else:  # never called: the layers use the int8 kernel without VBMI
    _ctile1 = _ctile2 = _ctile3 = _ctile4 = None


def lut_conv_applies(lv: np.ndarray, cb: int, C: int, ka: int) -> bool:
    """Whether a convolution with integer levels ``lv`` (``cb``-bit codes) on C channels of
    ``ka``-bit codes runs here, on a CPU with the lookup tiles: where it measured faster (module
    docstring), binary weights on a multiple of 32 channels and ternary / 2-bit weights on a multiple
    of 16, at least 64; both with channels that fill whole step pairs (so that the tables have no
    padding steps) and two lookups per widening add (``kernels_gemm.lut_sums`` = 2: binary weights
    with codes of up to 4 bits, ternary up to 5)."""
    if not (USE and HAS_LUT):
        return False
    fills = C % 32 == 0 if cb == 1 else C % 16 == 0 and C >= 64
    return fills and 2 * (4 // cb) * int(np.abs(lv).max()) * ((1 << ka) - 1) <= 127


def pixel_groups(C: int, cb: int) -> int:
    """Groups ``Gc`` of one pixel's C channels, padded to whole step pairs (8 groups)."""
    return lut_groups(C, cb)


def lut_conv_weights(w_int: np.ndarray, lv: np.ndarray, cb: int) -> np.ndarray:
    """``w_int`` (O, KH, KW, C) with values in ``lv`` -> (Op/16, KH*KW*Gc/8, 64) uint8: the taps'
    packed weights one after the other (module docstring)."""
    w_int = np.asarray(w_int, np.int64)
    O, KH, KW, C = w_int.shape
    Cp = pixel_groups(C, cb) * (4 // cb)
    wpad = np.full((O, KH * KW, Cp), lv[0], np.int64)
    wpad[:, :, :C] = w_int.reshape(O, KH * KW, C)
    return lut_pack_weights(wpad.reshape(O, -1), lv, cb)


def lut_conv_offsets(KH: int, KW: int, dh: int, dw: int, Wp: int, tpix: int) -> np.ndarray:
    """``koff`` (KH*KW,) int64: table offset of each tap from the output pixel's first tap."""
    return np.array([(kh * dh * Wp + kw * dw) * tpix for kh in range(KH) for kw in range(KW)], np.int64)


@kernel
def _tables_range(xq, C, lv, c, tpix, T, p_lo, p_hi):
    """Tables of pixels p_lo..p_hi of the code image ``xq`` (C bytes per pixel) into ``T``. Only
    the steps holding channels are written: the padding steps of ``T`` stay as made (zeros)."""
    nsteps = (C + 4 * c - 1) // (4 * c)
    a = np.zeros(nsteps * 4 * c + 16, np.uint8)
    lv8 = np.empty(4, np.int8)
    for k in range(lv.shape[0]):
        lv8[k] = np.int8(lv[k])
    # whole steps: read the codes in place (the image has slack bytes after it); copying each pixel
    # into a scratch row first (a slice copy) made the pass 3.4x slower on 16 ternary channels
    direct = nsteps * 4 * c == C
    for p in range(p_lo, p_hi):
        if direct:
            src = xq[p * C :]
        else:
            for k in range(C):
                a[k] = xq[p * C + k]
            src = a
        if c == 4:
            _table_row4(src, lv8, nsteps, T, p * tpix)
        else:
            _table_row2(src, lv8, nsteps, T, p * tpix)


def lut_conv_tables(xq: np.ndarray, npix: int, C: int, lv: np.ndarray, cb: int, out: np.ndarray | None = None
                    ) -> np.ndarray:
    """Tables (npix * 16*Gc,) int8 of the first ``npix`` pixels of the code image ``xq`` (uint8,
    C channels per pixel, NHWC); ``out``: zeros, or the tables of an earlier call (its padding
    steps are not written). The caller checks ``kernels_gemm.lut_fits``."""
    tpix = 16 * pixel_groups(C, cb)
    T = np.zeros(npix * tpix, np.int8) if out is None else out
    par = use_parallel(npix * tpix, LUT_CONV_TABLES_MIN_PARALLEL)
    parallel_for(_tables_range, npix, xq, np.int64(C), lv.astype(np.int32), np.int64(4 // cb),
                 np.int64(tpix), T, parallel=par, grain=16)
    return T


@kernel
def _lut_conv_range(tab, geo, tpix, koff, wq, sums, s0, s1, sf, flags, out, res, codes, cgeo, qhi, qmult,
                    scratch, u_lo, u_hi):
    """Output rows u_lo..u_hi (u = (n, oh)) of the convolution: ``geo`` = (Hp, Wp, C, OH, OW, sh, sw,
    N, O) as ``kernels_int8.int8_conv``'s, ``tpix`` table bytes per pixel, epilogue arguments as
    ``int8_conv``'s. ``scratch``: int64, :data:`LUT_CONV_SCRATCH` entries for the sums and row
    offsets (the flat executor's), or shorter: then allocated here."""
    Hp, Wp, OH, OW, sh, sw, O = geo[0], geo[1], geo[3], geo[4], geo[5], geo[6], geo[8]
    Hc, Wc, phc, pwc = cgeo[0], cgeo[1], cgeo[2], cgeo[3]
    nseg = koff.shape[0]
    nblk = wq.shape[0]
    npairs = wq.shape[1] // nseg
    wstride = wq.shape[1] * 64
    wflat = wq.reshape(-1)
    ib = scratch if scratch.shape[0] >= LUT_CONV_SCRATCH else np.empty(LUT_CONV_SCRATCH, np.int64)
    acc = ib[:144].view(np.int32)
    trow = ib[144:152]
    qh = np.float32(qhi)
    qm = np.float32(qmult)
    for u in range(u_lo, u_hi):
        n = u // OH
        oh = u - n * OH
        rb = (n * Hp + oh * sh) * Wp
        for b0 in range(0, nblk, 4):
            ob = min(4, nblk - b0)
            R = LUT_CONV_R[ob]
            c0 = b0 * 16
            for ow0 in range(0, OW, R):
                nv = min(R, OW - ow0)
                for r in range(R):
                    trow[r] = (rb + (ow0 + min(r, nv - 1)) * sw) * tpix
                wb = b0 * wstride
                orow = ((n * OH + oh) * OW + ow0) * O + c0
                crow = ((n * Hc + oh + phc) * Wc + ow0 + pwc) * O + c0
                if ob == 1:
                    _ctile1(tab, trow, koff, nseg, npairs, wflat, wb, wstride, acc, sums)
                    amx_epilogue_1(acc, 0, nv, orow, crow, O, s0, s1, sf, c0, O - c0, flags, out, res, codes,
                                   qh, qm)
                elif ob == 2:
                    _ctile2(tab, trow, koff, nseg, npairs, wflat, wb, wstride, acc, sums)
                    amx_epilogue_2(acc, 0, nv, orow, crow, O, s0, s1, sf, c0, O - c0, flags, out, res, codes,
                                   qh, qm)
                elif ob == 3:
                    _ctile3(tab, trow, koff, nseg, npairs, wflat, wb, wstride, acc, sums)
                    amx_epilogue_3(acc, 0, nv, orow, crow, O, s0, s1, sf, c0, O - c0, flags, out, res, codes,
                                   qh, qm)
                else:
                    _ctile4(tab, trow, koff, nseg, npairs, wflat, wb, wstride, acc, sums)
                    amx_epilogue_4(acc, 0, nv, orow, crow, O, s0, s1, sf, c0, O - c0, flags, out, res, codes,
                                   qh, qm)


_EMPTY_F32 = np.zeros(0, np.float32)
_EMPTY_U8 = np.zeros(0, np.uint8)
_NO_CGEO = np.zeros(4, np.int64)
_NO_SCRATCH = np.zeros(0, np.int64)  # each thread of a parallel call allocates its own


def lut_conv(tab: np.ndarray, geo: np.ndarray, tpix: int, koff: np.ndarray, wq: np.ndarray, sums: int,
             s0: np.ndarray, s1: np.ndarray, relu: bool = False, out: np.ndarray | None = None,
             res: np.ndarray | None = None, codes: np.ndarray | None = None, cgeo: np.ndarray | None = None,
             qhi: float = 0.0, qmult: float = 0.0, sf: np.ndarray | None = None) -> None:
    """The convolution of the tables ``tab`` (:func:`lut_conv_tables` of the padded code image) with
    the weights of :func:`lut_conv_weights`, taps ``koff`` (:func:`lut_conv_offsets`), ``geo`` =
    (Hp, Wp, C, OH, OW, sh, sw, N, O) int64 (``int8_conv``'s), ``tpix`` table bytes per pixel,
    ``sums`` = ``kernels_gemm.lut_sums``. Epilogue, outputs and coefficients as
    ``kernels_int8.int8_conv``."""
    if sums not in (1, 2):
        raise ValueError(f"sums={sums!r}: the tiles add 1 or 2 lookups before widening (lut_sums)")
    if not HAS_LUT:
        raise RuntimeError("the lookup convolution needs AVX-512 VBMI and VNNI")
    flags = epilogue_flags(relu, out is not None, res is not None, codes is not None, sf is not None)
    g = [int(v) for v in geo]
    U = g[7] * g[3]
    macs = U * g[4] * koff.shape[0] * (wq.shape[1] // koff.shape[0]) * 256 * wq.shape[0]
    parallel_for(_lut_conv_range, U, tab, geo, np.int64(tpix), koff, wq, np.int64(sums), s0, s1,
                 np.zeros(3 * s0.shape[0], np.float64) if sf is None else sf, flags,
                 _EMPTY_F32 if out is None else out.reshape(-1),
                 _EMPTY_F32 if res is None else res.reshape(-1),
                 _EMPTY_U8 if codes is None else codes, _NO_CGEO if cgeo is None else cgeo, float(qhi),
                 float(qmult), _NO_SCRATCH, parallel=use_parallel(macs, LUT_CONV_MIN_PARALLEL_MACS), grain=1)
