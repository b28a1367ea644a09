"""One-channel convolutions with the output pixels in the vector lanes (AVX-512 VNNI + VBMI).

The int8 convolution (``kernels_int8``) puts output *channels* in the 16 lanes of a ``vpdpbusd``:
a layer with 6 of them (LeNet-5's first, 1 -> 6 channels, 5x5) leaves 10 lanes idle in every
product and in every epilogue, and its quads (4 input bytes) are mostly one pixel's window. Here
the lanes hold 16 neighbouring output pixels of one row instead, for layers with one input
channel, width stride 1, no dilation and at most 8 output channels. For kernel row ``kh`` and
quad ``q`` (kernel columns ``4q .. 4q+3``) one 64-byte load and one ``vpermb`` give every lane
``j`` its four input bytes::

    win[j] = x[n, oh*sh + kh, ow0 + j + 4q : ow0 + j + 4q + 4]

and each output channel ``o`` takes ``acc[o][j] += win[j] . w[o, kh, 4q:4q+4]`` (one ``vpdpbusd``
with the broadcast weight quad; columns past the kernel width have zero weights), on 4, 6 or 8
accumulators per row, the fewest that hold the layer's channels. A 5x5 layer with 6 channels: 10
windows and 60 products per 16 pixels, against 160 products (10 per
pixel, 16 channels each) on the channel lanes.

The epilogue writes the next layer's codes only (the ``EPI_CODES | EPI_F32`` epilogue of
``_jit._Epilogue``, bit for bit the same codes): per channel ``t = clip(fma(a, D, b), 0, hi) * mult``
on 16 pixels, ``code = rint(t)``; where a pixel's ``t`` lies within ``0.5 - lim`` of a rounding tie
the channel's 16 pixels are recomputed on the float64 path, ``y = float32(s1*D + s0)`` (a multiply,
then an add). The 8 code vectors are permuted in registers (two ``vpermi2b``) to the NHWC order of the code
image, where the 16 pixels' codes are ``16*O`` consecutive bytes (pixel ``j``'s channels at
``crow + j*O``), and stored with two masked stores.

Max pool: where a 2x2 max pool with stride 2 reads nothing but these codes (LeNet-5's pool1), a
call computes two output rows (the window loads of both, one broadcast weight quad for both) and
writes the pooled codes only: per channel the larger code of the two rows (``vpmaxub``), then of
each pair of neighbouring lanes; codes are monotone in ``y``, so this is the code of the pooled
value, and the pool's own pass over a full-size code image is left out
(``executor._fused_pool``).

``lanes_conv_reference`` is the NumPy form the kernel is tested against (with the float64 codes
of ``int8_conv``'s epilogue, which the f32 path equals).
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
    _I1,
    _I8,
    _I32,
    _I64,
    _V16F32,
    _V16F64,
    _V16I32,
    _V64I8,
    EPI_CODES,
    EPI_F32,
    EPI_RELU,
    HOST_VNNI,
    _array_ptr,
    _declare,
    _splat,
    _vpdpbusd,
    clip_mult,
    host_has,
    kernel,
)

#: output channels of a lanes layer at most (the weights are stored padded to this many)
LANES_O = 8
#: pixels per vector
LANES_PX = 16
#: the epilogue flags the lanes kernel writes (codes from the float32 path, ReLU or not)
LANES_FLAGS = (EPI_CODES | EPI_F32, EPI_RELU | EPI_CODES | EPI_F32)


#: the CPU has AVX-512 VNNI and VBMI: elsewhere the row kernels compile to nothing (the flat
#: executor's loop calls them, and LLVM cannot select ``vpermi2b`` without VBMI), and no layer
#: is planned on them (:func:`host_has_lanes`)
HOST_LANES = HOST_VNNI and host_has("avx512vbmi")


def host_has_lanes() -> bool:
    """:data:`HOST_LANES`, and the VNNI kernels not switched off (``_jit.set_plain``)."""
    from . import kernels

    return HOST_LANES and kernels.HAS_VNNI


def lanes_applies(C: int, O: int, kernel_size: tuple[int, int], stride: tuple[int, int],
                  dilation: tuple[int, int], flags: int, w_int: np.ndarray) -> bool:
    """Whether a convolution runs on the lanes kernel: one input channel, at most :data:`LANES_O`
    outputs, width stride 1, no dilation, a codes-only float32 epilogue and int8 weights."""
    return (C == 1 and O <= LANES_O and stride[1] == 1 and tuple(dilation) == (1, 1)
            and flags in LANES_FLAGS and int(w_int.min(initial=0)) >= -128
            and int(w_int.max(initial=0)) <= 127)


def pack_lanes_weights(w_int: np.ndarray) -> np.ndarray:
    """``w_int`` (O, KH, KW) or (O, KH, KW, 1) integers -> int8: (KH, QW, LANES_O, 4), ``QW =
    ceil(KW/4)``, the weight quad of channel ``o`` for kernel row ``kh`` and columns ``4q..4q+3``
    (zero past the width and for channels past ``O``), then two 128-byte store orders, for 16
    pixels and for 8 pooled ones (``P``): byte ``k`` of the stored codes in NHWC order (pixel
    ``k // O``, channel ``k % O``) is byte ``(k % O)*P + k // O`` of the channel-major code vectors."""
    w = np.asarray(w_int).reshape(w_int.shape[0], w_int.shape[1], w_int.shape[2])
    O, KH, KW = w.shape
    QW = -(-KW // 4)
    out = np.zeros((KH, QW, LANES_O, 4), np.int8)
    wp = np.zeros((O, KH, QW * 4), np.int64)
    wp[:, :, :KW] = w
    out[:, :, :O, :] = wp.reshape(O, KH, QW, 4).transpose(1, 2, 0, 3)
    k = np.arange(2 * 64)
    orders = [np.where(k < P * O, (k % O) * P + k // O, 0).astype(np.int8) for P in (LANES_PX, LANES_PX // 2)]
    return np.concatenate([out.reshape(-1), *orders])


def _lanes_row_intrinsic(pool: bool, NO: int = LANES_O):
    """The row kernel: one output row's 16 pixels, or (``pool``) two rows' and their 2x2 maxima;
    ``NO`` output channels computed (the code vectors of the others are zeros)."""
    R = 2 if pool else 1  # output rows per call
    PX = LANES_PX // 2 if pool else LANES_PX  # pixels stored per call

    @intrinsic
    def lanes_row(typingctx, x, base, Wp, Rs, KH, QW, w, s0, s1, sf, O, nv, codes, cbase, qhi, qmult):
        """16 output pixels from ``x[base + ...]`` (see the module docstring; a second row from
        ``base + Rs`` when pooling), their codes to ``codes[cbase + j*O + o]`` for ``j < nv``
        (pooling: ``j < nv // 2``, each the largest of a 2x2 block), ``o < O``."""
        sig = types.void(x, base, Wp, Rs, KH, QW, w, s0, s1, sf, O, nv, codes, cbase, qhi, qmult)

        def codegen(context, builder, signature, args):
            if not HOST_LANES:
                return context.get_dummy_value()
            xa, ba, wpa, rsa, kha, qwa, wa, s0a, s1a, sfa, Oa, nva, cda, cba, qha, qma = args

            def data(i, v, ty):
                return _array_ptr(context, builder, signature.args[i], v, ty)

            def i64(v):
                return ir.Constant(_I64, v)

            xp = builder.gep(data(0, xa, _I8), [ba])
            wp = data(6, wa, _I8)
            zero = ir.Constant(_V16I32, [0] * 16)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(NO)] for _ in range(R)]
            idx = ir.Constant(ir.VectorType(_I32, 64), [j + t for j in range(LANES_PX) for t in range(4)])
            undef64 = ir.Constant(_V64I8, None)
            with cgutils.for_range(builder, kha) as kl:
                rowp = builder.gep(xp, [builder.mul(kl.index, wpa)])
                with cgutils.for_range(builder, qwa) as ql:
                    src = builder.gep(rowp, [builder.mul(ql.index, i64(4))])
                    wins = []
                    for r in range(R):
                        v = builder.bitcast(builder.gep(src, [builder.mul(rsa, i64(r))]), _V64I8.as_pointer())
                        v = builder.load(v)
                        v.align = 1
                        wins.append(builder.shuffle_vector(v, undef64, idx))  # vpermb: lane j <- bytes j..j+3
                    wq = builder.gep(wp, [builder.mul(builder.add(builder.mul(kl.index, qwa), ql.index),
                                                      i64(LANES_O * 4))])
                    wq = builder.bitcast(wq, _I32.as_pointer())
                    for o in range(NO):
                        q = builder.load(builder.gep(wq, [i64(o)]))
                        q.align = 1
                        wv = builder.bitcast(_splat(builder, q, _V16I32), _V64I8)
                        for r in range(R):
                            acc = accs[r][o]
                            builder.store(_vpdpbusd(builder, builder.load(acc), wins[r], wv), acc)

            # ---- epilogue: codes of each channel's 16 pixels
            s0p = data(7, s0a, _F64)
            s1p = data(8, s1a, _F64)
            sfp = data(9, sfa, _F64)
            rint = _declare(builder, "llvm.rint.v16f32", _V16F32, [_V16F32])
            fma = _declare(builder, "llvm.fma.v16f32", _V16F32, [_V16F32, _V16F32, _V16F32])
            fabs = _declare(builder, "llvm.fabs.v16f32", _V16F32, [_V16F32])
            zf = ir.Constant(_V16F32, [0.0] * 16)
            hi_v = _splat(builder, qha, _V16F32)
            mult_v = _splat(builder, qma, _V16F32)
            i16 = ir.IntType(16)
            v16i8 = ir.VectorType(_I8, 16)
            lanes = ir.Constant(_V16I32, list(range(LANES_PX)))
            valid = builder.icmp_signed("<", lanes, _splat(builder, builder.trunc(nva, _I32), _V16I32))

            def codes_t(y):
                return clip_mult(builder, y, zf, hi_v, mult_v)

            def scalar(p, k):
                return builder.load(builder.gep(p, [i64(k)]))

            def codes_of(d, o):
                a = builder.fptrunc(scalar(sfp, o), _F32)
                b = builder.fptrunc(scalar(sfp, 16 + o), _F32)
                lim = builder.fptrunc(scalar(sfp, 32 + o), _F32)
                t = codes_t(builder.call(fma, [_splat(builder, a, _V16F32), builder.sitofp(d, _V16F32),
                                                 _splat(builder, b, _V16F32)]))
                r = builder.call(rint, [t])
                near = builder.and_(builder.fcmp_ordered(">=", builder.call(fabs, [builder.fsub(t, r)]),
                                                         _splat(builder, lim, _V16F32)), valid)
                slot = cgutils.alloca_once_value(builder, r)
                any_near = builder.icmp_unsigned("!=", builder.bitcast(near, i16), ir.Constant(i16, 0))
                with builder.if_then(any_near, likely=False):
                    # float64: y = float32(s1*D + s0), a multiply then an add (no fused multiply-add)
                    s1v = _splat(builder, scalar(s1p, o), _V16F64)
                    s0v = _splat(builder, scalar(s0p, o), _V16F64)
                    v = builder.fadd(builder.fmul(s1v, builder.sitofp(d, _V16F64)), s0v)
                    builder.store(builder.call(rint, [codes_t(builder.fptrunc(v, _V16F32))]), slot)
                return builder.fptoui(builder.load(slot), v16i8)

            def umax(a, b):
                return builder.select(builder.icmp_unsigned(">", a, b), a, b)

            def cat(u, v, n):
                mask = ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n)))
                return builder.shuffle_vector(u, v, mask)

            cvals = []
            for o in range(NO):
                c = codes_of(builder.load(accs[0][o]), o)
                if pool:  # the larger code of the two rows, then of each pair of columns
                    c = umax(c, codes_of(builder.load(accs[1][o]), o))
                    pick = [ir.Constant(ir.VectorType(_I32, 8), list(range(k, 16, 2))) for k in (0, 1)]
                    c = umax(builder.shuffle_vector(c, c, pick[0]), builder.shuffle_vector(c, c, pick[1]))
                cvals.append(c)
            cvals += [ir.Constant(ir.VectorType(_I8, PX), [0] * PX)] * (LANES_O - NO)
            # NHWC order: byte j*O + o of the pixels' codes is byte o*PX + j of the code vectors (a
            # permutation with the order stored after the weights), then masked stores
            mstore = _declare(builder, "llvm.masked.store.v64i8.p0", ir.VoidType(),
                              [_V64I8, _I8.as_pointer(), _I32, ir.VectorType(_I1, 64)])
            order = builder.gep(wp, [builder.add(builder.mul(builder.mul(kha, qwa), i64(LANES_O * 4)),
                                                 i64(128 if pool else 0))])
            cp = builder.gep(data(12, cda, _I8), [cba])
            npx = builder.sdiv(nva, i64(2)) if pool else nva
            total = builder.trunc(builder.mul(npx, Oa), _I32)
            v64i32 = ir.VectorType(_I32, 64)
            n = PX
            while len(cvals) > 1:  # 8 vectors of PX bytes -> one of 8*PX
                cvals = [cat(cvals[2 * i], cvals[2 * i + 1], n) for i in range(len(cvals) // 2)]
                n *= 2
            allc = cvals[0]
            if pool:  # 64 bytes: one permutation
                halves = [(allc, allc, "llvm.x86.avx512.permvar.qi.512")]
            else:  # 128 bytes: two permutations of both halves
                lo = builder.shuffle_vector(allc, allc, ir.Constant(v64i32, list(range(64))))
                hi = builder.shuffle_vector(allc, allc, ir.Constant(v64i32, list(range(64, 128))))
                halves = [(lo, hi, "llvm.x86.avx512.vpermi2var.qi.512")] * 2
            for half, (lo, hi, name) in enumerate(halves):
                ip = builder.bitcast(builder.gep(order, [i64(64 * half)]), _V64I8.as_pointer())
                ix = builder.load(ip)
                ix.align = 1
                if pool:
                    fn = _declare(builder, name, _V64I8, [_V64I8, _V64I8])
                    nhwc = builder.call(fn, [lo, ix])
                else:
                    fn = _declare(builder, name, _V64I8, [_V64I8, _V64I8, _V64I8])
                    nhwc = builder.call(fn, [lo, ix, hi])
                k = ir.Constant(v64i32, [64 * half + i for i in range(64)])
                keep = builder.icmp_signed("<", k, _splat(builder, total, v64i32))
                builder.call(mstore, [nhwc, builder.gep(cp, [i64(64 * half)]), ir.Constant(_I32, 1), keep])
            return context.get_dummy_value()

        return sig, codegen

    return lanes_row


# the row kernel for 4, 6 and 8 channels: a layer runs on the smallest that holds its outputs (LeNet-5's
# first layer, 6 channels, with the pool: 3.1-3.3 -> 2.4-2.5 us on 6 instead of 8, one-off probe)
lanes_row_4, lanes_row_6, lanes_row = (_lanes_row_intrinsic(False, no) for no in (4, 6, LANES_O))
lanes_pool_4, lanes_pool_6, lanes_pool = (_lanes_row_intrinsic(True, no) for no in (4, 6, LANES_O))


@kernel
def _lanes_conv_range(xq, geo, KH, QW, w, s0, s1, sf, codes, cgeo, qhi, qmult, pool, r_lo, r_hi):
    """Output rows ``r_lo .. r_hi`` (``r = n*OH + oh``) of the lanes convolution: ``geo`` = (Hp, Wp,
    C, OH, OW, sh, sw, N, O) as ``int8_conv``'s, ``cgeo`` = (Hp', Wp', ph', pw') the code image's.
    ``pool``: followed by a 2x2 max pool with stride 2 (floor), rows ``r = n*(OH//2) + ph`` of the
    pooled image, each from conv rows ``2ph`` and ``2ph + 1``."""
    Hp = geo[0]
    Wp = geo[1]
    OH = geo[3]
    OW = geo[4]
    sh = geo[5]
    O = geo[8]
    Hc = cgeo[0]
    Wc = cgeo[1]
    phc = cgeo[2]
    pwc = cgeo[3]
    qh = np.float32(qhi)
    qm = np.float32(qmult)
    R = OH // 2 if pool else OH  # rows of the image written
    CW = OW // 2 * 2 if pool else OW  # conv columns computed
    for r in range(r_lo, r_hi):
        n = r // R
        oh = r - n * R
        xb = (n * Hp + (2 * oh if pool else oh) * sh) * Wp
        cb = ((n * Hc + oh + phc) * Wc + pwc) * O
        for ow0 in range(0, CW, 16):
            nv = min(16, CW - ow0)
            xr = xb + ow0
            if pool:
                cr = cb + (ow0 // 2) * O
                if O <= 4:
                    lanes_pool_4(xq, xr, Wp, sh * Wp, KH, QW, w, s0, s1, sf, O, nv, codes, cr, qh, qm)
                elif O <= 6:
                    lanes_pool_6(xq, xr, Wp, sh * Wp, KH, QW, w, s0, s1, sf, O, nv, codes, cr, qh, qm)
                else:
                    lanes_pool(xq, xr, Wp, sh * Wp, KH, QW, w, s0, s1, sf, O, nv, codes, cr, qh, qm)
            else:
                cr = cb + ow0 * O
                if O <= 4:
                    lanes_row_4(xq, xr, Wp, 0, KH, QW, w, s0, s1, sf, O, nv, codes, cr, qh, qm)
                elif O <= 6:
                    lanes_row_6(xq, xr, Wp, 0, KH, QW, w, s0, s1, sf, O, nv, codes, cr, qh, qm)
                else:
                    lanes_row(xq, xr, Wp, 0, KH, QW, w, s0, s1, sf, O, nv, codes, cr, qh, qm)


def lanes_conv(xq: np.ndarray, geo: np.ndarray, KH: int, KW: int, w: np.ndarray, s0: np.ndarray,
               s1: np.ndarray, sf: np.ndarray, codes: np.ndarray, cgeo: np.ndarray, qhi: float,
               qmult: float, pool: bool = False) -> None:
    """The lanes convolution of the code image ``xq`` (``kernels_int8.int8_quantize``'s layout, one
    channel) with :func:`pack_lanes_weights`' ``w``, its codes written into
    ``codes`` (the next layer's padded image, geometry ``cgeo``; its border must already hold the
    padding code); ``pool``: the codes of a 2x2 max pool with stride 2 of the output instead."""
    g = [int(v) for v in geo]
    if g[2] != 1 or g[6] != 1 or g[8] > LANES_O:
        raise ValueError(f"lanes_conv: needs 1 input channel, width stride 1 and <= {LANES_O} outputs; "
                         f"geometry {g}")
    QW = -(-KW // 4)
    if w.dtype != np.int8 or w.size != KH * QW * LANES_O * 4 + 256:
        raise ValueError(f"lanes_conv: weights {w.dtype} of {w.size}; int8 of {KH * QW * LANES_O * 4 + 256} "
                         "(pack_lanes_weights)")
    if sf.size < 48 or s0.size < 16 or s1.size < 16:
        raise ValueError("lanes_conv: s0, s1 need 16 entries and sf 48 (f32_coefficients of one block)")
    rows = g[7] * (g[3] // 2 if pool else g[3])
    _lanes_conv_range(xq, geo, np.int64(KH), np.int64(QW), w, s0, s1, sf, codes, cgeo, float(qhi),
                      float(qmult), bool(pool), 0, rows)


def lanes_conv_reference(x: np.ndarray, w_int: np.ndarray, sh: int, s0: np.ndarray, s1: np.ndarray,
                         qhi: float, qmult: float, pool: bool = False) -> np.ndarray:
    """Codes (N, OH, OW, O) of the convolution of padded one-channel codes ``x`` (N, Hp, Wp) with
    ``w_int`` (O, KH, KW), width stride 1: ``D`` exact, then ``rint(clip(float32(s1*D + s0), 0, hi)
    * mult)`` in float32 (the float64 epilogue's codes); ``pool``: their 2x2 maxima, stride 2."""
    N, Hp, Wp = x.shape
    O, KH, KW = w_int.shape
    OH = (Hp - KH) // sh + 1
    OW = Wp - KW + 1
    D = np.zeros((N, OH, OW, O), np.int64)
    for kh in range(KH):
        for kw in range(KW):
            patch = x[:, kh : kh + sh * (OH - 1) + 1 : sh, kw : kw + OW].astype(np.int64)
            D += patch[..., None] * w_int[:, kh, kw].astype(np.int64)
    y = (s1[:O] * D.astype(np.float64) + s0[:O]).astype(np.float32)
    t = np.minimum(np.maximum(y, np.float32(0)), np.float32(qhi)) * np.float32(qmult)
    c = np.rint(t).astype(np.uint8)
    if pool:
        PH, PW = OH // 2, OW // 2
        c = c[:, : 2 * PH, : 2 * PW].reshape(N, PH, 2, PW, 2, O).max(axis=(2, 4))
    return c
