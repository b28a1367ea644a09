"""int8 dot-product convolutions and Linear layers (AVX-512 VNNI) on uint8 activation codes in
NHWC order; see ``kernels.py``."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._amx import (
    amx_block_1x1,
    amx_block_1x2,
    amx_block_1x3,
    amx_block_1x4,
    amx_block_2x2,
    amx_block_4x1,
    amx_config,
)
from ._jit import (
    _V16F32,
    _V16I8,
    EPI_CODES,
    EPI_F32,
    EPI_FLOAT,
    EPI_RELU,
    EPI_RESIDUAL,
    VNNI_TILES,
    _array_ptr,
    _declare,
    _Epilogue,
    _splat,
    branch_on_flags,
    clip_mult,
    element_ptr,
    kernel,
    vnni_row_1,
    vnni_row_2,
    vnni_row_3,
    vnni_row_4,
    vnni_tile_1,
    vnni_tile_2,
    vnni_tile_3,
    vnni_tile_4,
)
from .kernels_amx import aligned_u8
from .kernels_threads import parallel_for, use_parallel

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
# same with H = W = 1 and C = K. Integer weights beyond int8 (DoReFa's 8-bit levels 2i - 255)
# are a sum of 2-4 int8 parts (``int8_split``), each quad listed once per part: the products
# cost that many times more, the sums are the same exact int32 (the bit-serial kernels they
# replace took 10-45 ms for a ResNet-20 at batch 1).
#
# Why not im2col: the quads are read in place (a quad offset table per layer), so the only pass
# over the activations before the product is quantizing them into the code image, and that pass
# disappears too when the previous layer writes the codes in its epilogue (``EPI_CODES``).
# Output pixels are computed 6-8 at a time against 16-64 output channels, accumulators in
# registers; the float epilogue (per-channel scale and shift with folded batch norm, residual
# addition, ReLU) runs on the registers before anything is stored.
#
# Epilogue precision (``_jit._Epilogue``): float64, so that a float output is the float32 rounding
# of the exact value and a code is the one the fake-quantized model in float64 gives. A layer that
# writes only the next layer's codes (no float output, no residual) takes a float32 path (one
# fma per 16 channels instead of float64 conversions): :func:`f32_coefficients` bounds its error
# per channel, and a pixel whose scaled value lies within that bound of a rounding tie is
# recomputed in float64, so the codes are the float64 path's, bit for bit.

INT8_SLACK = 64
INT8_ROWS_SCRATCH = 27  # int64 row offsets ``_int8_conv_range`` works with
INT8_MIN_PARALLEL_MACS = 1 << 24  # about 100 us of one core


def int8_conv_reference(codes: np.ndarray, w_int: np.ndarray, stride: tuple[int, int],
                        padding: tuple[int, int], dilation: tuple[int, int], ma: int = 0) -> np.ndarray:
    """Torch reference of :func:`int8_conv`'s integer sums ``D`` (before the epilogue): codes
    (N, C, H, W) padded with code ``ma``, weights (O, C, KH, KW); a float64 convolution of small
    integers, exact. Returns (N, OH, OW, O) float64, NHWC like the kernel."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(codes).astype(np.float64))
    x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), value=float(ma))
    y = F.conv2d(x, torch.from_numpy(np.asarray(w_int).astype(np.float64)), stride=stride, dilation=dilation)
    return y.permute(0, 2, 3, 1).numpy()


MAX_INT8_PARTS = 4  # integer weights in [-512, 508] run as up to 4 int8 parts


def int8_parts(w_int: np.ndarray) -> int:
    """How many int8 parts integer weights need (:func:`int8_split`): 1 when they fit int8, ``k``
    for ``-128k <= w <= 127k`` (DoReFa's 8-bit levels ``2i - 255``: 3), 0 beyond
    :data:`MAX_INT8_PARTS` parts."""
    w_int = np.asarray(w_int)
    if not w_int.size:
        return 1
    k = max(1, -(-int(w_int.max()) // 127), -(-int(-w_int.min()) // 128))
    return k if k <= MAX_INT8_PARTS else 0


def int8_split(w_int: np.ndarray, k: int) -> list[np.ndarray]:
    """``k`` int8 arrays ``floor((w + i) / k)``, ``i < k``, summing to ``w`` (Hermite's identity),
    each within one of ``w / k``: a layer whose integer weights do not fit int8 reads each
    reduction quad (K chunk) ``k`` times, once per part (``k`` times the products, the same exact
    int32 sums ``D``)."""
    w_int = np.asarray(w_int, np.int64)
    parts = [(w_int + i) // k for i in range(k)]
    if any(p.min(initial=0) < -128 or p.max(initial=0) > 127 for p in parts):
        raise ValueError(f"integer weights in [{w_int.min()}, {w_int.max()}] do not fit {k} int8 parts")
    return [p.astype(np.int8) for p in parts]


def int8_geometry(KH: int, KW: int, C: int, dh: int, dw: int, parts: int = 1) -> np.ndarray:
    """Quads of the reduction: (nq, 3) int64 rows ``(kernel row offset in input rows, kernel col
    offset in pixels, byte offset in the run)``; the byte offset of quad ``i`` for a padded image
    of width Wp is ``(a*Wp + b)*C + c``. ``parts`` (:func:`int8_parts`): every quad that many times
    in a row, once per int8 part of the weights."""
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
    g = np.array(q, np.int64).reshape(-1, 3)
    return np.repeat(g, parts, axis=0)


def int8_quad_offsets(geom: np.ndarray, Wp: int, C: int) -> np.ndarray:
    return np.ascontiguousarray((geom[:, 0] * Wp + geom[:, 1]) * C + geom[:, 2])


def pack_int8_weights(w_int: np.ndarray, dw: int):
    """Integer weights ``w_int`` (O, KH, KW, C) in [-128, 127] -> (w, passes) for the int8
    kernels: ``w`` int8 flat, ``passes`` int64 (P, 3) rows ``(OB, first channel, byte offset)``.

    Quads follow :func:`int8_geometry` (``dw`` selects run or tap order); weights beyond int8 follow
    its geometry of ``parts = int8_parts(w_int)``, part ``i`` of :func:`int8_split` on copy ``i``
    of each quad."""
    w_int = np.asarray(w_int)
    k = int8_parts(w_int)
    if k == 0:
        raise ValueError("weights do not fit int8 parts")
    O, KH, KW, C = w_int.shape
    split = int8_split(w_int, k)
    geom = int8_geometry(KH, KW, C, 1, dw, k)
    nq = geom.shape[0]
    Wq = np.zeros((nq, O, 4), np.int8)
    for i in range(nq):
        kh = int(geom[i, 0])
        wh = split[i % k]
        for t in range(4):
            j = int(geom[i, 2]) + t
            if dw == 1:
                if j < KW * C:
                    Wq[i, :, t] = wh[:, kh, j // C, j % C]
            else:
                if j < C:
                    Wq[i, :, t] = wh[:, kh, int(geom[i, 1]) // dw, j]
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


_U32 = 2.0**-24  # unit roundoff of float32


def f32_coefficients(s0: np.ndarray, s1: np.ndarray, wabs: np.ndarray, in_max: int, hi: float, mult: float
                     ) -> tuple[np.ndarray, bool]:
    """The float32 epilogue's coefficients (``_jit._Epilogue``, ``EPI_F32``) for ``y = s1*D + s0``
    with ``|D| <= in_max * wabs[o]`` (``wabs[o] = sum_r |w_int[o, r]|``, ``in_max`` the largest
    input code), the next layer's codes ``rint(min(max(y, 0), hi) * mult)``.

    Returns (``sf``, usable): ``sf`` float64 (3 * len(s0)) holding float32 values, per block of 16
    channels ``a = f32(s1)``, ``b = f32(s0)``, ``lim = 0.5 - e`` (rounded down). Error bound: with
    ``u = 2**-24``, ``fma(a, D, b)`` is within ``dy = 4u(|s1|*Dmax + |s0|)`` of ``float32(s1*D +
    s0)`` (the float64 path's value: one rounding of ``a``, ``b`` and the fma each, one of the
    float64 result), clipping does not increase it and ``t = y * mult`` adds two float32
    roundings: ``|t32 - t64| <= mult*dy + 4u*(hi*mult + 1) = e/2``. A half-integer farther than
    ``e`` from ``t32`` is not between ``t32`` and ``t64``, so both round to the same code.
    ``usable`` is False when the bound leaves no room (``lim < 0.4``) or ``D`` may not be exact
    in float32 (``Dmax >= 2**24``)."""
    s0 = np.asarray(s0, np.float64)
    s1 = np.asarray(s1, np.float64)
    n = s0.shape[0]
    dmax = np.zeros(n)
    dmax[: len(wabs)] = float(in_max) * np.asarray(wabs, np.float64)
    e = 2.0 * (mult * 4 * _U32 * (np.abs(s1) * dmax + np.abs(s0)) + 4 * _U32 * (hi * mult + 1.0))
    lim = (0.5 - e).astype(np.float32)
    lim = np.where(lim.astype(np.float64) > 0.5 - e, np.nextafter(lim, np.float32(-1)), lim)
    parts = np.stack([s1.astype(np.float32), s0.astype(np.float32), lim]).astype(np.float64)  # (3, n)
    nb = n // 16
    sf = np.zeros(3 * n, np.float64)
    sf[: 48 * nb] = parts[:, : 16 * nb].reshape(3, nb, 16).transpose(1, 0, 2).reshape(-1)
    usable = bool(dmax.max(initial=0.0) < 2.0**24 and lim[: len(wabs)].min(initial=0.5) >= 0.4)
    return sf, usable


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


@intrinsic
def _codes16(typingctx, src, so, dst, do, hi, mult):
    """``dst[do : do + 16] = rint(min(max(src[so : so + 16], 0), hi) * mult)``: 16 float32 values to
    uint8 codes as vector operations. numba vectorises a row loop 64 values a step, so the rows of a
    28-pixel MNIST image ran scalar (1.6 us for the image, 0.7 us this way)."""
    sig = types.void(src, so, dst, do, hi, mult)

    def codegen(context, builder, signature, args):
        def at(i, vty):
            return element_ptr(context, builder, signature.args[i], args[i], args[i + 1], vty)

        zero = ir.Constant(_V16F32, [0.0] * 16)
        hi, mult = (_splat(builder, a, _V16F32) for a in args[4:6])
        t = clip_mult(builder, builder.load(at(0, _V16F32), align=4), zero, hi, mult)
        rint = _declare(builder, "llvm.rint.v16f32", _V16F32, [_V16F32])
        builder.store(builder.fptoui(builder.call(rint, [t]), _V16I8), at(2, _V16I8), align=1)
        return context.get_dummy_value()

    return sig, codegen


@kernel
def _int8_quantize_nchw(x, hi, mult, ph, pw, xq, n_lo, n_hi, scratch):
    """``_int8_quantize_range`` (mode 0, ``ma = 0``) of images ``n_lo..n_hi`` of a C-contiguous NCHW
    array ``x`` (N, C, H, W) into the padded NHWC code image ``xq`` (image ``n_lo`` first): each
    input row's codes into a contiguous buffer (unit-stride loops, vectorised), then strided into
    the image; three channels (RGB) in one pass over the three rows. The transposed view that
    ``_int8_quantize_range`` reads has run-time strides: a ResNet-20 input (3 x 32 x 32) took
    4.4 us there. ``scratch`` (uint8): the row buffer when it holds ``W`` bytes (else allocated)."""
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    Hp = H + 2 * ph
    Wp = W + 2 * pw
    rowlen = Wp * C
    tmp = scratch[:W] if scratch.shape[0] >= W else np.empty(W, np.uint8)
    for n in range(n_lo, n_hi):
        img = xq[(n - n_lo) * Hp * rowlen : (n - n_lo + 1) * Hp * rowlen]
        img[: ph * rowlen] = 0
        img[(ph + H) * rowlen :] = 0
        for h in range(H):
            row = img[(h + ph) * rowlen : (h + ph + 1) * rowlen]
            row[: pw * C] = 0
            row[(pw + W) * C :] = 0
            if C == 3:  # RGB: the three codes of a pixel stored together (LLVM vectorises the
                # interleaving stores: ResNet-20's input 0.55 us against 2.8-4.8 us by channel rows)
                x0 = x[n, 0, h]
                x1 = x[n, 1, h]
                x2 = x[n, 2, h]
                dst = row[pw * 3 : (pw + W) * 3]
                for w in range(W):
                    t0 = min(max(x0[w], np.float32(0.0)), hi)
                    t1 = min(max(x1[w], np.float32(0.0)), hi)
                    t2 = min(max(x2[w], np.float32(0.0)), hi)
                    dst[3 * w] = np.uint8(np.rint(t0 * mult))
                    dst[3 * w + 1] = np.uint8(np.rint(t1 * mult))
                    dst[3 * w + 2] = np.uint8(np.rint(t2 * mult))
                continue
            if C == 1 and W >= 16 and x.strides[3] == 4:  # one channel: 16 codes at a time, straight
                # into the row (the last 16 overlap the previous ones when 16 does not divide W)
                for w0 in range(0, W, 16):
                    w = min(w0, W - 16)
                    _codes16(x[n, 0, h], w, row, pw + w, hi, mult)
                continue
            for c in range(C):
                xr = x[n, c, h]
                for w in range(W):
                    t = min(max(xr[w], np.float32(0.0)), hi)
                    tmp[w] = np.uint8(np.rint(t * mult))
                dst = row[pw * C + c : (pw + W) * C : C]
                for w in range(W):
                    dst[w] = tmp[w]


def int8_quantize(x: np.ndarray, padding: tuple[int, int] = (0, 0), hi: float = 0.0, mult: float = 0.0,
                  mode: int = 1, ma: int = 0) -> np.ndarray:
    """Codes of ``x`` (N, H, W, C) float32 (any strides: an NCHW tensor's ``permute(0, 2, 3, 1)``
    works, a channels-last one is read contiguously) as the flat padded uint8 image the int8
    kernels read: (N, H+2ph, W+2pw, C) then INT8_SLACK zero bytes. Mode 0 quantizes with the
    fused clip formula ``rint(clip(x, 0, hi) * mult)``, mode 1 takes the values as codes."""
    N, H, W, C = x.shape
    ph, pw = padding
    Hp, Wp = H + 2 * ph, W + 2 * pw
    xq = aligned_u8(N * Hp * Wp * C + INT8_SLACK)  # on a line: AMX tiles load from it
    xq[-INT8_SLACK:] = 0
    cmajor = C <= 4 or x.strides[3] > x.strides[2]
    parallel_for(_int8_quantize_range, N, x, np.int64(mode), np.float32(hi), np.float32(mult), np.int64(ma),
                 np.int64(ph), np.int64(pw), np.int64(Hp), np.int64(Wp), cmajor, xq,
                 parallel=use_parallel(x.size * 4, INT8_MIN_PARALLEL_MACS // 4))
    return xq


@kernel
def _int8_conv_range(xq, geo, qoff, w, passes, s0, s1, sf, flags, out, res, codes, cgeo, qhi, qmult, scratch,
                     m_lo, m_hi):
    """Output pixels m_lo..m_hi (m = (n, oh, ow)) of the int8 convolution, every pass of output
    channels, with the epilogue of ``vnni_tile`` (``flags``). ``scratch``: int64, at least
    :data:`INT8_ROWS_SCRATCH` entries for the row offsets, the caller's (the flat executor's
    arena; a LeNet-5 at batch 1 runs three such layers, whose six small allocations took
    ~0.3 us each), or shorter (a parallel caller's threads): then allocated here.

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
    ib = scratch if scratch.shape[0] >= INT8_ROWS_SCRATCH else np.empty(INT8_ROWS_SCRATCH, np.int64)
    rows = ib[0:8]
    orows = ib[8:16]
    crows = ib[16:24]
    r1 = ib[24:25]
    o1 = ib[25:26]
    c1 = ib[26:27]
    for p in range(passes.shape[0]):
        OB = passes[p, 0]
        o0 = passes[p, 1]
        wb = passes[p, 2]
        R = VNNI_TILES[OB]
        on = O - o0
        # running output position of the next row, (n, oh, ow), and its offsets: input bytes,
        # output and code elements (multiplied out only where an output row starts: recomputing
        # them per row took a quarter of a LeNet-5 first layer's time)
        n = m_lo // L
        oh = (m_lo - n * L) // OW
        ow = m_lo - n * L - oh * OW
        rb = ((n * Hp + oh * sh) * Wp + ow * sw) * C
        cb = ((n * Hc + oh + phc) * Wc + ow + pwc) * O + o0
        ob = m_lo * O + o0
        for m0 in range(m_lo, m_hi, R):
            nv = min(R, m_hi - m0)
            for r in range(nv):
                rows[r] = rb
                orows[r] = ob
                crows[r] = cb
                ob += O
                ow += 1
                if ow == OW:
                    ow = 0
                    oh += 1
                    if oh == OH:
                        oh = 0
                        n += 1
                    rb = (n * Hp + oh * sh) * Wp * C
                    cb = ((n * Hc + oh + phc) * Wc + pwc) * O + o0
                else:
                    rb += sw * C
                    cb += O
            for r in range(nv, R):
                rows[r] = rows[nv - 1]
            if nv <= 2:  # a Linear layer at batch 1-2: one-row tiles, not R rows of which nv count
                for r in range(nv):
                    r1[0] = rows[r]
                    o1[0] = orows[r]
                    c1[0] = crows[r]
                    if OB == 1:
                        vnni_row_1(xq, r1, qoff, nq, w, wb, s0, s1, sf, o0, 1, on, flags, out, o1, res, codes,
                                   c1, qh, qm)
                    elif OB == 2:
                        vnni_row_2(xq, r1, qoff, nq, w, wb, s0, s1, sf, o0, 1, on, flags, out, o1, res, codes,
                                   c1, qh, qm)
                    elif OB == 3:
                        vnni_row_3(xq, r1, qoff, nq, w, wb, s0, s1, sf, o0, 1, on, flags, out, o1, res, codes,
                                   c1, qh, qm)
                    else:
                        vnni_row_4(xq, r1, qoff, nq, w, wb, s0, s1, sf, o0, 1, on, flags, out, o1, res, codes,
                                   c1, qh, qm)
            elif OB == 1:
                vnni_tile_1(xq, rows, qoff, nq, w, wb, s0, s1, sf, o0, nv, on, flags, out, orows, res, codes,
                            crows, qh, qm)
            elif OB == 2:
                vnni_tile_2(xq, rows, qoff, nq, w, wb, s0, s1, sf, o0, nv, on, flags, out, orows, res, codes,
                            crows, qh, qm)
            elif OB == 3:
                vnni_tile_3(xq, rows, qoff, nq, w, wb, s0, s1, sf, o0, nv, on, flags, out, orows, res, codes,
                            crows, qh, qm)
            else:
                vnni_tile_4(xq, rows, qoff, nq, w, wb, s0, s1, sf, o0, nv, on, flags, out, orows, res, codes,
                            crows, qh, qm)


_EMPTY_F32 = np.zeros(0, np.float32)
_EMPTY_U8 = np.zeros(0, np.uint8)
_NO_CGEO = np.zeros(4, np.int64)
_NO_SCRATCH = np.zeros(0, np.int64)  # each thread of a parallel call allocates its own


def epilogue_flags(relu: bool, emit_float: bool, residual: bool, codes: bool, f32: bool) -> int:
    """The epilogue flags of the int8 kernels; ``EPI_F32`` only where it applies (codes, no float
    output, no residual)."""
    flags = (EPI_RELU if relu else 0) | (EPI_FLOAT if emit_float else 0)
    flags |= (EPI_RESIDUAL if residual else 0) | (EPI_CODES if codes else 0)
    if f32 and codes and not emit_float and not residual:
        flags |= EPI_F32
    return flags


def _flags(relu, out, res, codes, sf) -> int:
    return epilogue_flags(relu, out is not None, res is not None, codes is not None, sf is not None)


def _sf(sf: np.ndarray | None, s0: np.ndarray) -> np.ndarray:
    """``sf`` or zeros of its size (the kernels read it whatever the flags)."""
    return np.zeros(3 * s0.shape[0], np.float64) if sf is None else sf


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
    sf: np.ndarray | None = None,
) -> None:
    """The int8 convolution of the code image ``xq`` (:func:`int8_quantize`) with the weights of
    :func:`pack_int8_weights`, quads ``qoff`` (:func:`int8_quad_offsets`), ``geo`` = (Hp, Wp, C,
    OH, OW, sh, sw, N, O) int64.

    ``y = s1*D + s0`` (+ ``res``) (ReLU) goes to ``out`` (N*OH*OW*O float32, NHWC order) and / or,
    quantized with the next layer's clip formula (``qhi``, ``qmult``), to ``codes``, that layer's
    padded image of geometry ``cgeo`` = (Hp', Wp', ph', pw') (its border must already hold the
    padding code). ``s0``, ``s1`` float64 are zero padded to whole blocks of 16 channels. ``sf``
    (:func:`f32_coefficients`, when usable): codes without a float output or a residual come from
    the float32 epilogue (the same codes, see ``_jit._Epilogue``)."""
    flags = _flags(relu, out, res, codes, sf)
    args = (xq, geo, qoff, w, passes, s0, s1, _sf(sf, s0), flags,
            _EMPTY_F32 if out is None else out.reshape(-1), _EMPTY_F32 if res is None else res.reshape(-1),
            _EMPTY_U8 if codes is None else codes, _NO_CGEO if cgeo is None else cgeo, float(qhi),
            float(qmult))
    g = geo.tolist()
    M = g[7] * g[3] * g[4]
    macs = M * qoff.shape[0] * 4 * g[8]
    # parts of whole tiles (6 and 8 rows)
    parallel_for(_int8_conv_range, M, *args, _NO_SCRATCH, parallel=use_parallel(macs, INT8_MIN_PARALLEL_MACS),
                 grain=24)


# ----------------------------------------------------------------------------------------------
# int8 convolution on AMX tiles (see _amx.py)
# ----------------------------------------------------------------------------------------------
#
# Rows are *virtual* output pixels: for strides sh == sw == s, output pixel (oh, ow) of image n
# reads its kernel window from byte ``s*v*C`` of the image with ``v = oh*Wp + ow``, so 16
# consecutive v are one A tile with row stride s*C bytes, whatever the output row they fall in.
# The v with ``ow >= OW`` (the padded columns) are computed and dropped by the epilogue: 2 of 34
# columns for a 32x32 layer, about half for a stride-2 layer. Per kernel row the KW*C bytes of
# the window are cut into chunks of kc <= 64 bytes (one tdpbusd each); chunk bytes past the
# window meet zero weights.
#
# Alignment. The weight tiles (rows of 64 bytes, tiles kc*16 bytes apart), the parked int32 sums
# and the code images start on 64-byte lines (``kernels_amx.aligned_u8``; the flat executor's
# arenas and weight array too, every region a multiple of 64 bytes): a tile whose rows straddle
# lines loads at less than half speed (``kernels_amx``). Activation tiles start on a line only
# where the geometry allows: their rows are ``s*C`` bytes apart, so with 64 channels (stride 1)
# every row and K chunk is on a line, with 16 or 32 channels the rows straddle lines by
# construction. Aligned against left to chance, ResNet-20 in the flat executor ran 1.07-1.24x as
# fast at batch 1 and 1.03-1.31x at batch 32 (medians at batch 1, fastest calls at batch 32, whose
# medians jump between two speeds on the loaded machine; 3 interleaved runs x 3 weight kinds, one
# thread).


def aligned_copy(a: np.ndarray) -> np.ndarray:
    """A flat copy of ``a`` starting on a 64-byte line (``kernels_amx.aligned_u8``): AMX tiles
    loaded from or stored to a misaligned buffer ran at less than half speed."""
    a = np.asarray(a)
    out = aligned_u8(a.nbytes).view(a.dtype)
    out[:] = a.reshape(-1)
    return out


@kernel
def amx_acc() -> np.ndarray:
    """The int32 sums of up to 4 accumulator tiles (16 x 64 int32), on a 64-byte line: the tile
    stores write 64-byte rows."""
    return aligned_u8(4096).view(np.int32)


def amx_chunks(KW: int, C: int) -> tuple[int, int]:
    """(kc, nck): K chunk bytes (a multiple of 4, <= 64) and chunks per kernel row."""
    run = KW * C
    nck = -(-run // 64)
    kc = (-(-run // nck) + 3) // 4 * 4
    return kc, nck


def pack_amx_weights(w_int: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """Integer weights (O, KH, KW, C) in int8 -> (w, kc, nck, nbt): for each K chunk ``k = kh*nck
    + j`` and block ``b`` of 16 output channels, kc/4 rows of 16 channels x 4 bytes (the VNNI
    layout of tdpbusd's second operand), ``w[((k*nbt + b)*kc/4 + q)*64 + 4*o + t] = w_int[16b+o,
    kh, r // C, r % C]`` with ``r = j*kc + 4q + t`` (zero for ``r >= KW*C`` or ``16b+o >= O``).
    Weights beyond int8 (``p = int8_parts(w_int)`` parts): as if the kernel had p*KH rows, row
    ``p*kh + i`` holding part ``i`` of row ``kh`` (:func:`int8_split`; ``amx_k_offsets(parts=p)``)."""
    w_int = np.asarray(w_int)
    k = int8_parts(w_int)
    if k == 0:
        raise ValueError("weights do not fit int8 parts")
    if k > 1:  # kernel row kh -> rows k*kh + i
        w_int = np.stack(int8_split(w_int, k), axis=2).reshape(w_int.shape[0], -1, *w_int.shape[2:])
    O, KH, KW, C = w_int.shape
    kc, nck = amx_chunks(KW, C)
    nbt = -(-O // 16)
    run = KW * C
    flat = np.zeros((nbt * 16, KH, nck * kc), np.int8)
    flat[:O, :, :run] = w_int.reshape(O, KH, run)
    # (o, kh, j, q, t) -> (kh, j, b, q, o, t)
    t = flat.reshape(nbt, 16, KH, nck, kc // 4, 4).transpose(2, 3, 0, 4, 1, 5)
    w = aligned_copy(t)  # every B tile on a line: tiles are kc*16 bytes apart, kc a multiple of 4
    return w, kc, nck, nbt


def amx_k_offsets(KH: int, nck: int, kc: int, dh: int, Wp: int, C: int, parts: int = 1) -> np.ndarray:
    """Byte offset of K chunk ``kh*nck + j`` from a pixel's window start: ``kh*dh*Wp*C + j*kc``.
    ``parts`` (weights in that many int8 parts, :func:`pack_amx_weights`): each kernel row repeated."""
    f = parts
    kh = np.repeat(np.arange(KH * f, dtype=np.int64), nck) // f
    j = np.tile(np.arange(nck, dtype=np.int64), KH * f)
    return np.ascontiguousarray(kh * dh * Wp * C + j * kc)


def amx_tile_epilogue(NB: int):
    """An intrinsic running the int8 epilogue (``_jit._Epilogue``) on the rows of one AMX tile of
    virtual output pixels, skipping the padding columns itself::

        epi(acc, arow, n, ow, Wp, OW, orow, crow, cskip, step, s0, s1, sf, c0, on, flags, out, res,
            codes, qhi, qmult)

    Row ``j < n`` holds the sums of virtual pixel column ``ow + j`` (modulo ``Wp``) at ``acc[arow +
    j*NB*16:]``; a column ``>= OW`` is padding and is skipped. The valid rows are consecutive
    outputs: the float output / residual of the first at ``orow``, its codes at ``crow``, each next
    one ``step`` further, and ``cskip`` more for the codes when an output row ends (the next
    layer's padded image). One call per tile instead of one per run of valid rows: the runs cost
    a division and a dispatch on the flags each (0.7-3.6 us of a 16-channel 32x32 layer)."""

    @intrinsic
    def epi(typingctx, acc, arow, n, ow, Wp, OW, orow, crow, cskip, step, s0, s1, sf, c0, on, flags, out,
            res, codes, qhi, qmult):
        sig = types.void(acc, arow, n, ow, Wp, OW, orow, crow, cskip, step, s0, s1, sf, c0, on, flags, out,
                         res, codes, qhi, qmult)

        def codegen(context, builder, signature, args):
            (aca, ara, na, owa, wpa, OWa, ora, cra, csa, sta, s0a, s1a, sfa, c0a, ona, fla, oa, rsa, cda, qha,
             qma) = args
            i64 = ir.IntType(64)

            def data(i, v, ty):
                return _array_ptr(context, builder, signature.args[i], v, ty)

            def c(v):
                return ir.Constant(i64, v)

            f32, i8, i32 = ir.FloatType(), ir.IntType(8), ir.IntType(32)
            ap = builder.gep(data(0, aca, i32), [ara])
            s0p = builder.gep(data(10, s0a, ir.DoubleType()), [c0a])
            s1p = builder.gep(data(11, s1a, ir.DoubleType()), [c0a])
            sfp = builder.gep(data(12, sfa, ir.DoubleType()), [builder.mul(c0a, c(3))])
            epi = _Epilogue(context, builder, NB, s0p, s1p, sfp, ona, fla, qha, qma)
            op = data(16, oa, f32)
            rsp = data(17, rsa, f32)
            cdp = data(18, cda, i8)
            v16 = ir.VectorType(i32, 16)

            def rows(static):
                ow = cgutils.alloca_once_value(builder, owa)
                orow = cgutils.alloca_once_value(builder, ora)
                crow = cgutils.alloca_once_value(builder, cra)
                with cgutils.for_range(builder, na) as loop:
                    j = loop.index
                    w = builder.load(ow)
                    with builder.if_then(builder.icmp_signed("<", w, OWa), likely=True):
                        a = builder.gep(ap, [builder.mul(j, c(NB * 16))])
                        ds = []
                        for b in range(NB):
                            ld = builder.load(builder.bitcast(builder.gep(a, [c(16 * b)]), v16.as_pointer()))
                            ld.align = 4
                            ds.append(ld)
                        o, cr = builder.load(orow), builder.load(crow)
                        optr, rptr = builder.gep(op, [o]), builder.gep(rsp, [o])
                        epi.row(ds, optr, rptr, builder.gep(cdp, [cr]), static)
                        builder.store(builder.add(o, sta), orow)
                        cr = builder.add(cr, sta)
                        # the row's last output: the next valid row starts the next output row
                        last = builder.icmp_signed("==", builder.add(w, c(1)), OWa)
                        builder.store(builder.select(last, builder.add(cr, csa), cr), crow)
                    w1 = builder.add(w, c(1))
                    builder.store(builder.select(builder.icmp_signed("==", w1, wpa), c(0), w1), ow)

            branch_on_flags(builder, fla, rows, "tepi")
            return context.get_dummy_value()

        return sig, codegen

    return epi


amx_tile_epilogue_1 = amx_tile_epilogue(1)
amx_tile_epilogue_2 = amx_tile_epilogue(2)
amx_tile_epilogue_3 = amx_tile_epilogue(3)
amx_tile_epilogue_4 = amx_tile_epilogue(4)


#: bytes of the scratch an AMX convolution works in (:func:`amx_scratch`): the parked int32 sums
#: of up to 4 tiles (4096 bytes, on a line), then the activation tiles' base offsets (4 int64)
AMX_SCRATCH = 4096 + 64


def amx_scratch() -> np.ndarray:
    """A fresh scratch for :func:`_amx_conv_range` (:data:`AMX_SCRATCH` bytes on a 64-byte line)."""
    return aligned_u8(AMX_SCRATCH)


@kernel
def _amx_conv_range(xq, geo, koff, w, cfg, kc, nbt, s0, s1, sf, flags, out, res, codes, cgeo, qhi, qmult,
                    n_lo, n_hi, scratch):
    """Images n_lo..n_hi of the int8 convolution on AMX tiles (geometry and epilogue as
    ``_int8_conv_range``; ``sh == sw`` and at least 16 virtual rows per image, see above).
    ``scratch``: :data:`AMX_SCRATCH` bytes on a 64-byte line (:func:`amx_scratch`; the flat
    executor's code arena ends with one), the caller's: the two NumPy allocations it replaced
    took ~0.6 us of every call (ResNet-20's 21 AMX convolutions: ~12 us of a 120 us call)."""
    Hp = geo[0]
    Wp = geo[1]
    C = geo[2]
    OH = geo[3]
    OW = geo[4]
    s = geo[5]
    O = geo[8]
    Hc = cgeo[0]
    Wc = cgeo[1]
    phc = cgeo[2]
    pwc = cgeo[3]
    nk = koff.shape[0]
    VM = (OH - 1) * Wp + OW
    istr = s * C
    nstride = kc * 16
    kstride = nbt * nstride
    b5 = nbt >= 3  # tmm5 holds weights (``_amx.amx_b5``): one activation tile per block
    cskip = (Wc - OW) * O  # codes: from an output row's end to the next row's start
    acc = scratch[:4096].view(np.int32)
    abase = scratch[4096 : 4096 + 32].view(np.int64)
    qh = np.float32(qhi)
    qm = np.float32(qmult)
    amx_config(cfg)
    for n in range(n_lo, n_hi):
        img = n * Hp * Wp * C
        ob = 0
        while ob < nbt:
            NB = min(nbt - ob, 4)
            MB = 1 if b5 else 4 // NB
            wb = ob * nstride
            c0 = ob * 16
            for v0 in range(0, VM, 16 * MB):
                for m in range(MB):
                    abase[m] = img + istr * min(v0 + 16 * m, VM - 16)
                if NB == 1 and MB == 4:
                    amx_block_4x1(xq, abase, istr, koff, nk, w, wb, kstride, nstride, acc)
                elif NB == 2 and MB == 2:
                    amx_block_2x2(xq, abase, istr, koff, nk, w, wb, kstride, nstride, acc)
                elif NB == 1:
                    amx_block_1x1(xq, abase, istr, koff, nk, w, wb, kstride, nstride, acc)
                elif NB == 2:
                    amx_block_1x2(xq, abase, istr, koff, nk, w, wb, kstride, nstride, acc)
                elif NB == 3:
                    amx_block_1x3(xq, abase, istr, koff, nk, w, wb, kstride, nstride, acc)
                else:
                    amx_block_1x4(xq, abase, istr, koff, nk, w, wb, kstride, nstride, acc)
                # the epilogue, one call per tile: virtual row v + r is output (oh, ow) of v + r =
                # oh*Wp + ow, a padding column where ow >= OW (skipped by the intrinsic)
                for m in range(MB):
                    if v0 + 16 * m >= VM:
                        break
                    v = min(v0 + 16 * m, VM - 16)
                    oh = v // Wp
                    ow = v - oh * Wp
                    if ow >= OW:  # the first valid row starts the next output row
                        oh += 1
                        owv = 0
                    else:
                        owv = ow
                    orow = ((n * OH + oh) * OW + owv) * O + c0
                    crow = ((n * Hc + oh + phc) * Wc + owv + pwc) * O + c0
                    arow = m * 16 * NB * 16
                    if NB == 1:
                        amx_tile_epilogue_1(acc, arow, 16, ow, Wp, OW, orow, crow, cskip, O, s0, s1, sf, c0,
                                            O - c0, flags, out, res, codes, qh, qm)
                    elif NB == 2:
                        amx_tile_epilogue_2(acc, arow, 16, ow, Wp, OW, orow, crow, cskip, O, s0, s1, sf, c0,
                                            O - c0, flags, out, res, codes, qh, qm)
                    elif NB == 3:
                        amx_tile_epilogue_3(acc, arow, 16, ow, Wp, OW, orow, crow, cskip, O, s0, s1, sf, c0,
                                            O - c0, flags, out, res, codes, qh, qm)
                    else:
                        amx_tile_epilogue_4(acc, arow, 16, ow, Wp, OW, orow, crow, cskip, O, s0, s1, sf, c0,
                                            O - c0, flags, out, res, codes, qh, qm)
            ob += NB


def amx_conv(xq: np.ndarray, geo: np.ndarray, koff: np.ndarray, w: np.ndarray, cfg: np.ndarray, kc: int,
             nbt: int, s0: np.ndarray, s1: np.ndarray, relu: bool = False, out: np.ndarray | None = None,
             res: np.ndarray | None = None, codes: np.ndarray | None = None, cgeo: np.ndarray | None = None,
             qhi: float = 0.0, qmult: float = 0.0, sf: np.ndarray | None = None) -> None:
    """:func:`int8_conv` on AMX tiles (``_amx.HAS_AMX``): weights of :func:`pack_amx_weights`,
    K offsets :func:`amx_k_offsets`, tile configuration ``_amx.amx_tile_config(kc, nbt)``. One
    thread."""
    flags = _flags(relu, out, res, codes, sf)
    out = _EMPTY_F32 if out is None else out.reshape(-1)
    res = _EMPTY_F32 if res is None else res.reshape(-1)
    _amx_conv_range(xq, geo, koff, w, cfg, int(kc), int(nbt), s0, s1, _sf(sf, s0), flags, out, res,
                    _EMPTY_U8 if codes is None else codes, _NO_CGEO if cgeo is None else cgeo, float(qhi),
                    float(qmult), 0, int(geo[7]), amx_scratch())
