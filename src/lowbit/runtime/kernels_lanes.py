"""One-channel convolutions with the output pixels in the vector lanes (AVX-512 VNNI + VBMI).

The int8 convolution (``kernels_int8``) puts output *channels* in the 16 lanes of a ``vpdpbusd``:
a layer with 6 of them (LeNet-5's first, 1 -> 6 channels, 5x5) leaves 10 lanes idle in every
product and in every epilogue, and its quads (4 input bytes) are mostly one pixel's window. Here
the lanes hold 16 neighbouring output pixels of one row instead, for layers with one input
channel, width stride 1, no dilation and at most 8 output channels. For kernel row ``kh`` and
quad ``q`` (kernel columns ``4q .. 4q+3``) one 64-byte load and one ``vpermb`` give every lane
``j`` its four input bytes::

    win[j] = x[n, oh*sh + kh, ow0 + j + 4q : ow0 + j + 4q + 4]

and each output channel ``o`` (8 accumulators) takes ``acc[o][j] += win[j] . w[o, kh, 4q:4q+4]``
(one ``vpdpbusd`` with the broadcast weight quad; columns past the kernel width have zero
weights). A 5x5 layer: 10 windows and 80 products per 16 pixels, against 160 products (10 per
pixel, 16 channels each) on the channel lanes.

The epilogue writes the next layer's codes only (the ``EPI_CODES | EPI_F32`` epilogue of
``_jit._Epilogue``, bit for bit the same codes): per channel ``t = clip(fma(a, D, b), 0, hi) * mult``
on 16 pixels, ``code = rint(t)``; where a pixel's ``t`` lies within ``0.5 - lim`` of a rounding tie
the channel's 16 pixels are recomputed on the float64 path, ``y = float32(s1*D + s0)`` (a multiply,
then an add). The 8 code vectors are permuted in registers (two ``vpermi2b``) to the NHWC order of the code
image, where the 16 pixels' codes are ``16*O`` consecutive bytes (pixel ``j``'s channels at
``crow + j*O``), and stored with two masked stores.

``lanes_conv_reference`` is the NumPy form the kernel is tested against (with the float64 codes
of ``int8_conv``'s epilogue, which the f32 path equals).
"""

from __future__ import annotations

import llvmlite.binding as llvm
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
    _array_ptr,
    _declare,
    _splat,
    _vpdpbusd,
    kernel,
)
from .kernels_threads import parallel_for

#: output channels of a lanes layer (padded: 8 accumulators per 16 pixels)
LANES_O = 8
#: pixels per vector
LANES_PX = 16
#: vectors of 16 pixels per call, sharing each broadcast weight quad (2 took the same time as 1 on
#: LeNet-5's first layer, so 1: the products are not what bounds it, the epilogue is about half)
SEGS = 1
#: the epilogue flags the lanes kernel writes (codes from the float32 path, ReLU or not)
LANES_FLAGS = (EPI_CODES | EPI_F32, EPI_RELU | EPI_CODES | EPI_F32)


def host_has_lanes() -> bool:
    """AVX-512 VNNI (from ``_jit``, the plain path switch included) and VBMI (``vpermb``)."""
    from . import kernels

    if not kernels.HAS_VNNI:
        return False
    try:
        return bool(llvm.get_host_cpu_features().get("avx512vbmi"))
    except Exception:  # pragma: no cover - feature query unavailable
        return False


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
    (zero past the width and for channels past ``O``), then the 128-byte store order: byte ``k``
    of 16 pixels' codes in NHWC order (pixel ``k // O``, channel ``k % O``) is byte
    ``(k % O)*16 + k // O`` of the channel-major code vectors."""
    w = np.asarray(w_int).reshape(w_int.shape[0], w_int.shape[1], w_int.shape[2])
    O, KH, KW = w.shape
    QW = -(-KW // 4)
    out = np.zeros((KH, QW, LANES_O, 4), np.int8)
    wp = np.zeros((O, KH, QW * 4), np.int64)
    wp[:, :, :KW] = w
    out[:, :, :O, :] = wp.reshape(O, KH, QW, 4).transpose(1, 2, 0, 3)
    k = np.arange(2 * 64)
    order = np.where(k < LANES_PX * O, (k % O) * LANES_PX + k // O, 0).astype(np.int8)
    return np.concatenate([out.reshape(-1), order])


def _lanes_row_intrinsic():
    @intrinsic
    def lanes_row(typingctx, x, base, Wp, KH, QW, w, s0, s1, sf, O, nv, codes, cbase, qhi, qmult):
        """16 output pixels from ``x[base + ...]`` (see the module docstring), their codes to
        ``codes[cbase + j*O + o]`` for ``j < nv``, ``o < O``."""
        sig = types.void(x, base, Wp, KH, QW, w, s0, s1, sf, O, nv, codes, cbase, qhi, qmult)

        def codegen(context, builder, signature, args):
            xa, ba, wpa, kha, qwa, wa, s0a, s1a, sfa, Oa, nva, cda, cba, qha, qma = args

            def data(i, v, ty):
                return _array_ptr(context, builder, signature.args[i], v, ty)

            def i64(v):
                return ir.Constant(_I64, v)

            xp = builder.gep(data(0, xa, _I8), [ba])
            wp = data(5, wa, _I8)
            zero = ir.Constant(_V16I32, [0] * 16)
            # SEGS groups of 16 pixels share each broadcast weight quad
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(LANES_O)] for _ in range(SEGS)]
            idx = ir.Constant(ir.VectorType(_I32, 64), [j + t for j in range(LANES_PX) for t in range(4)])
            undef64 = ir.Constant(_V64I8, None)
            with cgutils.for_range(builder, kha) as kl:
                rowp = builder.gep(xp, [builder.mul(kl.index, wpa)])
                with cgutils.for_range(builder, qwa) as ql:
                    src = builder.gep(rowp, [builder.mul(ql.index, i64(4))])
                    wins = []
                    for g in range(SEGS):
                        v = builder.bitcast(builder.gep(src, [i64(LANES_PX * g)]), _V64I8.as_pointer())
                        v = builder.load(v)
                        v.align = 1
                        wins.append(builder.shuffle_vector(v, undef64, idx))  # vpermb: lane j <- bytes j..j+3
                    wq = builder.gep(wp, [builder.mul(builder.add(builder.mul(kl.index, qwa), ql.index),
                                                      i64(LANES_O * 4))])
                    wq = builder.bitcast(wq, _I32.as_pointer())
                    for o in range(LANES_O):
                        q = builder.load(builder.gep(wq, [i64(o)]))
                        q.align = 1
                        wv = builder.bitcast(_splat(builder, q, _V16I32), _V64I8)
                        for g in range(SEGS):
                            acc = accs[g][o]
                            builder.store(_vpdpbusd(builder, builder.load(acc), wins[g], wv), acc)

            # ---- epilogue: codes of each channel's 16 pixels
            s0p = data(6, s0a, _F64)
            s1p = data(7, s1a, _F64)
            sfp = data(8, sfa, _F64)
            rint = _declare(builder, "llvm.rint.v16f32", _V16F32, [_V16F32])
            fma = _declare(builder, "llvm.fma.v16f32", _V16F32, [_V16F32, _V16F32, _V16F32])
            fabs = _declare(builder, "llvm.fabs.v16f32", _V16F32, [_V16F32])
            zf = ir.Constant(_V16F32, [0.0] * 16)
            hi_v = _splat(builder, qha, _V16F32)
            mult_v = _splat(builder, qma, _V16F32)
            i16 = ir.IntType(16)

            def clip_mult(y):
                t = builder.select(builder.fcmp_ordered(">", y, zf), y, zf)
                t = builder.select(builder.fcmp_ordered(">", t, hi_v), hi_v, t)
                return builder.fmul(t, mult_v)

            def scalar(p, k):
                return builder.load(builder.gep(p, [i64(k)]))

            def _segment(g, ng):
                valid = builder.icmp_signed("<", lanes, _splat(builder, builder.trunc(ng, _I32), _V16I32))
                cvals = []
                for o in range(LANES_O):
                    d = builder.load(accs[g][o])
                    a = builder.fptrunc(scalar(sfp, o), _F32)
                    b = builder.fptrunc(scalar(sfp, 16 + o), _F32)
                    lim = builder.fptrunc(scalar(sfp, 32 + o), _F32)
                    t = clip_mult(builder.call(fma, [_splat(builder, a, _V16F32), builder.sitofp(d, _V16F32),
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
                        y = builder.fptrunc(v, _V16F32)
                        builder.store(builder.call(rint, [clip_mult(y)]), slot)
                    cvals.append(builder.fptoui(builder.load(slot), v16i8))

                # NHWC order: byte j*O + o of the 16 pixels' codes is byte o*16 + j of the 8 code
                # vectors (a vpermi2b with the order stored after the weights); two masked stores
                def cat(u, v, n):
                    mask = ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n)))
                    return builder.shuffle_vector(u, v, mask)

                c2 = [cat(cvals[2 * i], cvals[2 * i + 1], 16) for i in range(4)]
                lo, hi = cat(c2[0], c2[1], 32), cat(c2[2], c2[3], 32)
                cp0 = builder.gep(data(11, cda, _I8), [cba])
                cp = builder.gep(cp0, [builder.mul(i64(LANES_PX * g), Oa)])
                total = builder.trunc(builder.mul(ng, Oa), _I32)
                for half in range(2):
                    idx = builder.bitcast(builder.gep(order, [i64(64 * half)]), _V64I8.as_pointer())
                    idx = builder.load(idx)
                    idx.align = 1
                    k = ir.Constant(v64i32, [64 * half + i for i in range(64)])
                    keep = builder.icmp_signed("<", k, _splat64(builder, total))
                    nhwc = builder.call(perm, [lo, idx, hi])
                    dst = builder.gep(cp, [i64(64 * half)])
                    builder.call(mstore, [nhwc, dst, ir.Constant(_I32, 1), keep])

            v16i8 = ir.VectorType(_I8, 16)
            lanes = ir.Constant(_V16I32, list(range(LANES_PX)))
            perm = _declare(builder, "llvm.x86.avx512.vpermi2var.qi.512", _V64I8, [_V64I8, _V64I8, _V64I8])
            mstore = _declare(builder, "llvm.masked.store.v64i8.p0", ir.VoidType(),
                              [_V64I8, _I8.as_pointer(), _I32, ir.VectorType(_I1, 64)])
            order = builder.gep(wp, [builder.mul(builder.mul(kha, qwa), i64(LANES_O * 4))])
            v64i32 = ir.VectorType(_I32, 64)
            for g in range(SEGS):
                ng = builder.sub(nva, i64(LANES_PX * g))  # pixels from this group's first on
                with builder.if_then(builder.icmp_signed(">", ng, i64(0))):
                    full = builder.icmp_signed(">", ng, i64(LANES_PX))
                    _segment(g, builder.select(full, i64(LANES_PX), ng))
            return context.get_dummy_value()

        return sig, codegen

    return lanes_row


def _splat64(builder: ir.IRBuilder, value):
    vty = ir.VectorType(_I32, 64)
    v = builder.insert_element(ir.Constant(vty, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vty, None), ir.Constant(vty, [0] * 64))


lanes_row = _lanes_row_intrinsic()


@kernel
def _lanes_conv_range(xq, geo, KH, QW, w, s0, s1, sf, codes, cgeo, qhi, qmult, r_lo, r_hi):
    """Output rows ``r_lo .. r_hi`` (``r = n*OH + oh``) of the lanes convolution: ``geo`` = (Hp, Wp,
    C, OH, OW, sh, sw, N, O) as ``int8_conv``'s, ``cgeo`` = (Hp', Wp', ph', pw') the code image's."""
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
    for r in range(r_lo, r_hi):
        n = r // OH
        oh = r - n * OH
        xb = (n * Hp + oh * sh) * Wp
        cb = ((n * Hc + oh + phc) * Wc + pwc) * O
        for ow0 in range(0, OW, LANES_PX * SEGS):
            nv = min(LANES_PX * SEGS, OW - ow0)
            lanes_row(xq, xb + ow0, Wp, KH, QW, w, s0, s1, sf, O, nv, codes, cb + ow0 * O, qh, qm)


def lanes_conv(xq: np.ndarray, geo: np.ndarray, KH: int, KW: int, w: np.ndarray, s0: np.ndarray,
               s1: np.ndarray, sf: np.ndarray, codes: np.ndarray, cgeo: np.ndarray, qhi: float,
               qmult: float) -> None:
    """The lanes convolution of the code image ``xq`` (``kernels_int8.int8_quantize``'s layout, one
    channel) with :func:`pack_lanes_weights`' ``w``, its codes written into ``codes`` (the next
    layer's padded image, geometry ``cgeo``; its border must already hold the padding code)."""
    g = [int(v) for v in geo]
    if g[2] != 1 or g[6] != 1 or g[8] > LANES_O:
        raise ValueError(f"lanes_conv: needs 1 input channel, width stride 1 and <= {LANES_O} outputs; "
                         f"geometry {g}")
    QW = -(-KW // 4)
    if w.dtype != np.int8 or w.size != KH * QW * LANES_O * 4 + 128:
        raise ValueError(f"lanes_conv: weights {w.dtype} of {w.size}; int8 of {KH * QW * LANES_O * 4 + 128} "
                         "(pack_lanes_weights)")
    if sf.size < 48 or s0.size < 16 or s1.size < 16:
        raise ValueError("lanes_conv: s0, s1 need 16 entries and sf 48 (f32_coefficients of one block)")
    rows = g[7] * g[3]
    parallel_for(_lanes_conv_range, rows, xq, geo, np.int64(KH), np.int64(QW), w, s0, s1, sf, codes, cgeo,
                 float(qhi), float(qmult), parallel=False)


def lanes_conv_reference(x: np.ndarray, w_int: np.ndarray, sh: int, s0: np.ndarray, s1: np.ndarray,
                         qhi: float, qmult: float) -> np.ndarray:
    """Codes (N, OH, OW, O) of the convolution of padded one-channel codes ``x`` (N, Hp, Wp) with
    ``w_int`` (O, KH, KW), width stride 1: ``D`` exact, then ``rint(clip(float32(s1*D + s0), 0, hi)
    * mult)`` in float32 (the float64 epilogue's codes)."""
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
    return np.rint(t).astype(np.uint8)
