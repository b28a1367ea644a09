"""Pooling in the runtime: max pooling on activation codes, global average pooling of NHWC
floats with float64 sums."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import kernels_int8 as _i8  # its parallel threshold, read at call time
from ._jit import element_ptr, kernel
from .kernels_threads import parallel_for, use_parallel

_NO_SCRATCH = np.zeros(0, np.uint8)  # a parallel call: each thread allocates its buffers

# ----------------------------------------------------------------------------------------------
# max pooling on codes
# ----------------------------------------------------------------------------------------------


@intrinsic
def _max4_16(typingctx, dst, do, src, o0, o1, o2, o3):
    """``dst[do : do + 16]`` = the byte-wise maximum of ``src[o : o + 16]`` for the four offsets:
    four vector loads and three ``vpmaxub``."""
    sig = types.void(dst, do, src, o0, o1, o2, o3)

    def codegen(context, builder, signature, args):
        vt = ir.VectorType(ir.IntType(8), 16)

        def at(i, off):
            return element_ptr(context, builder, signature.args[i], args[i], off, vt)

        m = None
        for off in args[3:7]:
            v = builder.load(at(2, off), align=1)
            m = v if m is None else builder.select(builder.icmp_unsigned(">", m, v), m, v)
        builder.store(m, at(0, args[1]), align=1)
        return context.get_dummy_value()

    return sig, codegen


@kernel
def _code_maxpool_range(xq, g, yq, scratch, n_lo, n_hi):
    """Max pooling of a padded code image (N, Hp, Wp, C) into another (N, Hc, Wc, C), output
    pixel (oh, ow) at (oh + phc, ow + pwc). ``g`` = (C, Hp, Wp, ph, pw, KH, KW, SH, SW, OH, OW, Hc,
    Wc, phc, pwc, chw). The pool window reads the valid image only (no pool padding). With
    ``chw`` the output is instead (N, C*OH*OW) in (c, oh, ow) order: what ``flatten`` of an NCHW
    tensor gives, the input rows of a following Linear layer. ``scratch`` (uint8): the row buffers
    when it holds them (the flat executor's arena), else they are allocated (a parallel call's
    threads: an empty one)."""
    C = g[0]
    Hp = g[1]
    Wp = g[2]
    ph = g[3]
    pw = g[4]
    KH = g[5]
    KW = g[6]
    SH = g[7]
    SW = g[8]
    OH = g[9]
    OW = g[10]
    Hc = g[11]
    Wc = g[12]
    phc = g[13]
    pwc = g[14]
    chw = g[15] != 0
    L = OH * OW
    Wv = (OW - 1) * SW + KW  # input pixels of a row that the windows read
    Wg = ((OW - 1) * SW + 1) * C  # bytes of the horizontal maxima that the outputs pick from
    buf = scratch if scratch.shape[0] >= Wv * C + Wg else np.empty(Wv * C + Wg, np.uint8)
    h = buf[: Wv * C]
    hm = buf[Wv * C : Wv * C + Wg]
    # 2x2 windows with stride 2 on whole vectors of channels, NHWC out: each output pixel's codes
    # are the vector maximum of its 4 input pixels', written in place (the loops below vectorise
    # 256 bytes a step and copy the outputs one byte at a time: LeNet-5's second pool took ~0.6 us)
    quad = KH == 2 and KW == 2 and SH == 2 and SW == 2 and C % 16 == 0 and not chw
    for n in range(n_lo, n_hi):
        for oh in range(OH):
            if quad:
                r0 = ((n * Hp + 2 * oh + ph) * Wp + pw) * C
                r1 = r0 + Wp * C
                o = ((n * Hc + oh + phc) * Wc + pwc) * C
                for ow in range(OW):
                    for c in range(0, C, 16):
                        i = 2 * ow * C + c
                        _max4_16(yq, o + ow * C + c, xq, r0 + i, r0 + i + C, r1 + i, r1 + i + C)
                continue
            # vertical max over the KH input rows: contiguous runs, vectorised
            r0 = ((n * Hp + oh * SH + ph) * Wp + pw) * C
            src = xq[r0 : r0 + Wv * C]
            for j in range(Wv * C):
                h[j] = src[j]
            for kh in range(1, KH):
                rk = r0 + kh * Wp * C
                src = xq[rk : rk + Wv * C]
                for j in range(Wv * C):
                    h[j] = max(h[j], src[j])
            # horizontal max over KW neighbouring pixels, as KW shifted runs (vectorised), then
            # every SW-th pixel of it is an output
            for j in range(Wg):
                hm[j] = h[j]
            for kw in range(1, KW):
                hs = h[kw * C : kw * C + Wg]
                for j in range(Wg):
                    hm[j] = max(hm[j], hs[j])
            if chw:
                dst = yq[n * C * L + oh * OW : (n + 1) * C * L]
                for c in range(C):
                    for ow in range(OW):
                        dst[c * L + ow] = hm[ow * SW * C + c]
            else:
                o = ((n * Hc + oh + phc) * Wc + pwc) * C
                dst = yq[o : o + OW * C]
                for ow in range(OW):
                    for c in range(C):
                        dst[ow * C + c] = hm[ow * SW * C + c]


def code_maxpool(xq: np.ndarray, N: int, g: np.ndarray, yq: np.ndarray) -> None:
    """Max pooling on code images (see ``_code_maxpool_range``). Exact for quantized activations:
    the quantizers are non-decreasing, so the code of the maximum is the maximum of the codes."""
    work = N * int(g[9] * g[10] * g[5] * g[6] * g[0])
    par = use_parallel(work, _i8.INT8_MIN_PARALLEL_MACS // 8)
    parallel_for(_code_maxpool_range, N, xq, g, yq, _NO_SCRATCH, parallel=par)


def code_maxpool_reference(xq: np.ndarray, N: int, g: np.ndarray, yq: np.ndarray) -> np.ndarray:
    """NumPy reference of :func:`code_maxpool`: a copy of ``yq`` with the pooled codes written
    where the kernel writes them (window maxima over the valid image of ``xq``)."""
    C, Hp, Wp, ph, pw, KH, KW, SH, SW, OH, OW, Hc, Wc, phc, pwc, chw = (int(v) for v in g[:16])
    img = xq[: N * Hp * Wp * C].reshape(N, Hp, Wp, C)
    out = np.zeros((N, OH, OW, C), xq.dtype)
    rh, rw = SH * (OH - 1) + 1, SW * (OW - 1) + 1
    for kh in range(KH):
        for kw in range(KW):
            win = img[:, ph + kh : ph + kh + rh : SH, pw + kw : pw + kw + rw : SW]
            out = np.maximum(out, win)
    y = yq.copy()
    if chw:
        y[: N * C * OH * OW] = out.transpose(0, 3, 1, 2).reshape(-1)
    else:
        y[: N * Hc * Wc * C].reshape(N, Hc, Wc, C)[:, phc : phc + OH, pwc : pwc + OW] = out
    return y


# ----------------------------------------------------------------------------------------------
# global average pooling of NHWC floats (float64 accumulation)
# ----------------------------------------------------------------------------------------------


@kernel
def _global_avgpool_range(x, out, scratch, n_lo, n_hi):
    """out[n, c] = float32(mean over (h, w) of x[n, h, w, c]) with float64 sums; x (N, H, W, C)
    float32 (any strides). ``scratch`` (uint8, on an 8-byte boundary): the sums when it holds
    them, else they are allocated."""
    H = x.shape[1]
    W = x.shape[2]
    C = x.shape[3]
    acc = scratch[: 8 * C].view(np.float64) if scratch.shape[0] >= 8 * C else np.empty(C, np.float64)
    hw = np.float64(H * W)
    for n in range(n_lo, n_hi):
        acc[:] = 0.0
        for h in range(H):
            for w in range(W):
                xr = x[n, h, w, :]
                for c in range(C):
                    acc[c] += np.float64(xr[c])
        orow = out[n]
        for c in range(C):
            orow[c] = acc[c] / hw


def global_avgpool(x: np.ndarray) -> np.ndarray:
    """(N, C) float32 means of ``x`` (N, H, W, C) over H and W, summed in float64 (the float32
    result is the exact mean rounded once, whatever the summation order)."""
    N, C = x.shape[0], x.shape[3]
    out = np.empty((N, C), np.float32)
    par = use_parallel(x.size * 4, _i8.INT8_MIN_PARALLEL_MACS // 4)
    parallel_for(_global_avgpool_range, N, x, out, _NO_SCRATCH, parallel=par)
    return out


def global_avgpool_reference(x: np.ndarray) -> np.ndarray:
    """NumPy reference of :func:`global_avgpool`: float64 means over H and W, rounded to float32."""
    return np.asarray(x, np.float64).mean(axis=(1, 2)).astype(np.float32)
