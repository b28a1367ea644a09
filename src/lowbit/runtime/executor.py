"""Flat execution of a compiled conv net: the whole packed graph in one numba call.

``compile()`` leaves a graph of packed modules (int8 convolutions linked by activation codes,
pools on codes, global average pooling, Linear layers). At batch 1 a ResNet-20 does ~0.3 ms of
arithmetic but the module graph spent about twice that again in Python: one module call, a
few NumPy allocations, torch <-> NumPy conversions and a numba dispatch (type checks of ~16
arguments) per layer. :class:`FlatExecutor` turns the graph into a *program*, an int64 table
with one row per operation, plus four flat arrays (quad offsets, int8 weights, float64
epilogue coefficients, and the two arenas that hold every intermediate tensor), and runs it
with one call of a numba interpreter (``_run``), which calls the same kernels the modules call.

Memory plan: every intermediate tensor has a region of the float32 or uint8 arena sized for a
chunk of ``chunk`` images; a region is handed to a later tensor once the last operation that
reads it has run (``_reuse_regions``: a padded code image whose writer fills only the interior
goes to one of the same geometry, so the zero border, written once when the arena is made,
stays zero). The interpreter runs the whole program on one chunk of images, then the next, so a
chunk's activations stay in cache (``CHUNK_BYTES``). Programs and arenas are made
once per input shape (and per calling thread, so that concurrent callers do not share arenas).

Threads: a batch is split over threads only where splitting can pay (:func:`split_step`): more than
one numba thread, at least ``MIN_SPLIT`` images per thread, and each thread's share of the work at
least ``MIN_THREAD_WORK_S`` and ``HANDOFF_SHARE`` times the hand-off to a worker measured on this
machine (:func:`handoff_s`), the work being the images times the program's time per image
(``Program.t_img``, the least per-image time of its serial calls on this machine; unknown until one
has run, so a shape's first call is serial). The batch is then cut into pieces (up to
``PIECES_PER_THREAD`` per thread, more only where a chunk caps a piece, each at least half a
thread's minimum share) that the calling thread and the runtime's workers take from a shared
counter, each running the program on its own arena (the interpreter releases the GIL); the call
returns once every piece has run, without waiting for a worker the OS has not started yet
(``kernels_threads.run_shared``; the worker polls a while for the next split before it sleeps,
``FLAT_POLL``). Anything smaller, batch 1 always, runs on the calling thread
alone. The environment variable ``LOWBIT_FLAT_MIN_THREAD_US`` sets the minimum share in
microseconds; ``0`` splits every batch of ``MIN_SPLIT`` images per thread, as before the rule.

Operations (``prog[i, 0]``): quantize a float tensor into a padded code image (the model input
or an intermediate), convolution (Linear layers as 1x1 convolutions over rows; field 29 picks the
kernel: 0 int8 VNNI tiles, 1 AMX tiles, 2-3 output pixels in the lanes, 4 table lookup with its
tables in a region of the code arena) with its int8 epilogue, strided subsampling and channel
zero-padding of float tensors (the option-A shortcut of CIFAR ResNets), max pooling on codes,
global average pooling. A graph with anything else (a layer left in PyTorch, a bit-serial layer,
a quantizer without a fused formula) is not flattened and runs module by module (:func:`plan`
raises :class:`UnsupportedGraphError`).
"""

from __future__ import annotations

import math
import operator
import os
import threading
import time
from dataclasses import dataclass, field

import numba
import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from llvmlite import ir
from numba import types
from numba.extending import intrinsic
from torch import Tensor, nn

from . import _amx
from . import kernels_threads as _threads
from ._amx import amx_release
from ._jit import EPI_CODES, EPI_FLOAT, EPI_RELU, EPI_RESIDUAL, element_ptr, kernel
from .kernels_amx import aligned_u8
from .kernels_int8 import (
    AMX_SCRATCH,
    INT8_ROWS_SCRATCH,
    INT8_SLACK,
    _amx_conv_range,
    _int8_conv_range,
    _int8_quantize_nchw,
    _int8_quantize_range,
    aligned_copy,
    amx_k_offsets,
    epilogue_flags,
    int8_parts,
    pack_amx_weights,
    pack_int8_weights,
)
from .kernels_lanes import _lanes_conv_range, host_has_lanes, lanes_applies, pack_lanes_weights
from .kernels_lut_conv import LUT_CONV_SCRATCH, _lut_conv_range, _tables_range, lut_conv_offsets
from .kernels_pool import _code_maxpool_range, _global_avgpool_range
from .layers import CodeMaxPool2d, GlobalAvgPool2d, PackedConv2d, PackedLinear, fold_integers, plane_integers

OP_QUANT, OP_CONV, OP_SUBSAMPLE, OP_CPAD, OP_MAXPOOL, OP_GAP = range(6)
NF = 40  # fields of a program row
# arena bytes of one chunk: within the 2 MB L2 with the weights beside it. ResNet-20 at batch 32 (354 KB
# of arenas per image), fastest tenth of the calls, one interleaved run: 0.5 MB (chunk 1) 3.83 ms, 1 MB
# (2) 3.50, 1.5 MB (4) 3.39, 2 MB (5) 3.40
CHUNK_BYTES = 3 << 19
MAX_CHUNK = 64
MIN_SPLIT = 2  # images per thread before a batch is split over threads
PIECES_PER_THREAD = 4
#: 1: a batch split over threads hands its pieces to run_shared's polling worker, which polls for
#: the next split a while (SPIN_US) before it sleeps, as parallel_for's splits do; 0: to the pool,
#: whose worker sleeps at once and is woken at every call. Side by side (no_amx/ab_flat_poll.md):
#: LeNet-5's 2-thread call 1.04-1.10x faster at 64-256 images, ResNet-20's 0.96-1.02x (noise)
FLAT_POLL = 1
_ALIGN = 64


def _min_thread_work_s(default_us: float = 100.0) -> float:
    """``LOWBIT_FLAT_MIN_THREAD_US`` (microseconds, >= 0) in seconds, else ``default_us``."""
    raw = os.environ.get("LOWBIT_FLAT_MIN_THREAD_US")
    if raw is None or not raw.strip():
        return default_us * 1e-6
    try:
        us = float(raw)
    except ValueError:
        us = -1.0
    if not us >= 0.0 or math.isinf(us):
        raise ValueError(f"LOWBIT_FLAT_MIN_THREAD_US={raw!r}: expected a number of microseconds >= 0")
    return us * 1e-6


# A batch is split over threads only where each thread gets at least this much work (seconds of
# one core). Handing a piece to a worker and waiting for it took 9-15 us (median 13.5 us) on this
# 2-core machine under load; two threads pay from about twice that, and a worker woken on a busy
# machine can take far longer, so the share is ~7x the hand-off (the kernels' PARALLEL_MIN_WORK
# is of the same order). Measured serial times per image: LeNet-5 11-21 us, ResNet-20 100-125 us,
# so LeNet-5 splits from ~20 images, ResNet-20 from 2-4 (benchmarks/speed/bench_flat_split.py).
MIN_THREAD_WORK_S = _min_thread_work_s()
# The hand-off is the machine's, not a constant: on a 2-vCPU EPYC VM it took 60-70 us (median), where
# a 100 us share split LeNet-5's 64 images (140 us a thread) and ran them 0.70x as fast as one thread
# (epyc_zen4/flat_split.md, epyc_zen4/speed.md), while ResNet-20's 4 images (400 us a thread) gained.
# So the share is also at least HANDOFF_SHARE hand-offs measured here, once per process (unless
# LOWBIT_FLAT_MIN_THREAD_US sets it: SHARE_FROM_ENV).
HANDOFF_SHARE = 3.0
SHARE_FROM_ENV = bool(os.environ.get("LOWBIT_FLAT_MIN_THREAD_US", "").strip())
_HANDOFF_S: float | None = None


def handoff_s() -> float:
    """Median time (seconds) of handing a no-op to the runtime's worker pool and waiting for it,
    measured on the first call of the process (8 untimed, then 32 timed round trips: ~3 ms here)."""
    global _HANDOFF_S
    if _HANDOFF_S is None:
        pool = _threads.thread_pool(2)
        for _ in range(8):
            pool.submit(int).result()
        ts = []
        for _ in range(32):
            t = time.perf_counter()
            pool.submit(int).result()
            ts.append(time.perf_counter() - t)
        _HANDOFF_S = sorted(ts)[len(ts) // 2]
    return _HANDOFF_S


def thread_share_s() -> float:
    """A thread's least share (seconds of one core) of a batch split over threads:
    :data:`MIN_THREAD_WORK_S`, and at least :data:`HANDOFF_SHARE` hand-offs (:func:`handoff_s`)
    unless the environment set the share (0: split by image count)."""
    if MIN_THREAD_WORK_S <= 0.0 or SHARE_FROM_ENV:
        return MIN_THREAD_WORK_S
    return max(MIN_THREAD_WORK_S, HANDOFF_SHARE * handoff_s())


def split_step(B: int, nt: int, t_img: float, chunk: int, min_thread_s: float | None = None) -> int:
    """Images per piece when a batch of ``B`` images runs on ``nt`` threads, or 0: run it on the
    calling thread alone. ``t_img``: the program's time per image in seconds (``inf``: unknown,
    treated as unknown work, i.e. not split unless the share is 0). The share: ``min_thread_s``,
    else :func:`thread_share_s`."""
    if nt <= 1 or MIN_SPLIT * nt > B:
        return 0
    if min_thread_s is not None:
        ms = min_thread_s
    else:  # (the hand-off is measured only where a split is in question)
        ms = thread_share_s() if math.isfinite(t_img) else MIN_THREAD_WORK_S
    if ms > 0.0:
        if not math.isfinite(t_img) or B * t_img < ms * nt:
            return 0
        least = math.ceil(0.5 * ms / t_img)  # a piece is worth at least half a thread's share
    else:
        least = 1
    return max(1, min(chunk, max(-(-B // (PIECES_PER_THREAD * nt)), least)))


def input_dtype_error(dtype: torch.dtype) -> ValueError:
    """The error for an input that is not floating point (integer or bool): the packed layers
    quantize floats, and an image of uint8 pixels computed as its float values would be a silent
    misuse (its scale is not the trained one)."""
    return ValueError(f"input dtype {dtype}: the packed model takes floating-point inputs "
                      "(float32; float16/64 are converted)")


def nonfinite_error(bad: int, total: int) -> ValueError:
    """The error for an input holding NaN or +/-Inf: the packed kernels would turn such a value
    into an activation code (NaN into code 0) where the fake-quantized model gives NaN (or, for an
    infinity, whatever its float layers make of it), so such inputs are refused."""
    return ValueError(f"input holds NaN or infinity ({bad} of {total} values); the packed model takes "
                      "finite values only (find them with torch.isfinite(x); torch.nan_to_num replaces "
                      "them)")


class UnsupportedGraphError(ValueError):
    """The graph has an operation the flat executor does not run."""


# ----------------------------------------------------------------------------------------------
# the interpreter
# ----------------------------------------------------------------------------------------------


@intrinsic
def _copy16(typingctx, src, so, dst, do):
    """``dst[do : do + 16] = src[so : so + 16]`` (float32) as one unaligned vector load and store."""
    sig = types.void(src, so, dst, do)

    def codegen(context, builder, signature, args):
        vt = ir.VectorType(ir.FloatType(), 16)
        ptrs = [element_ptr(context, builder, signature.args[i], args[i], args[i + 1], vt) for i in (0, 2)]
        ld = builder.load(ptrs[0])
        ld.align = 4
        st = builder.store(ld, ptrs[1])
        st.align = 4
        return context.get_dummy_value()

    return sig, codegen


@kernel
def _subsample(src, H, W, C, sh, sw, dst, Co, cl, nv):
    """dst (nv, OH, OW, Co)[..., cl : cl + C] = src (nv, H, W, C)[:, ::sh, ::sw] (NHWC floats,
    flat); the other channels of dst are not written (the option-A shortcut's zero channels: an
    arena region that only this operation writes keeps the zeros it was allocated with). Whole
    blocks of 16 channels move as vectors: the loop over a run-time channel count cost ~20 cycles
    a pixel in checks (ResNet-20: 4 us of a 117 us call)."""
    OH = (H - 1) // sh + 1
    OW = (W - 1) // sw + 1
    C16 = C - C % 16
    d = cl
    for n in range(nv):
        for oh in range(OH):
            for ow in range(OW):
                s = ((n * H + oh * sh) * W + ow * sw) * C
                for c in range(0, C16, 16):
                    _copy16(src, s + c, dst, d + c)
                for c in range(C16, C):
                    dst[d + c] = src[s + c]
                d += Co


@kernel
def _channel_pad(src, HW, C, cl, cr, dst, nv):
    """dst (nv, HW, cl + C + cr) = src (nv, HW, C) with cl zero channels in front, cr behind."""
    Co = cl + C + cr
    for p in range(nv * HW):
        d = p * Co
        s = p * C
        for c in range(cl):
            dst[d + c] = 0.0
        for c in range(C):
            dst[d + cl + c] = src[s + c]
        for c in range(cl + C, Co):
            dst[d + c] = 0.0


@kernel
def count_nonfinite(bits):
    """How many of the float32 values whose bits are the int32 array ``bits`` are NaN or +/-Inf
    (exponent all ones). An integer sum vectorises without fastmath, a float test would not:
    ~0.1 us for a 28x28 image."""
    n = 0
    for i in range(bits.size):
        n += np.int64((bits[i] & 0x7F800000) == 0x7F800000)
    return n


@kernel
def _run(prog, aux, w8, sc, x, out, oinfo, fa, ca, n_img, chunk):
    """Run ``prog`` on images ``0..n_img`` of ``x`` (N, C, H, W) float32, ``chunk`` at a time;
    the result (region ``oinfo``) goes to ``out`` (flat, NCHW order per image). The kernels work
    in the last ``AMX_SCRATCH`` bytes of ``ca`` (``Program.arenas``) instead of allocating their
    buffers per call (~0.3 us each)."""
    used_amx = False
    scratch = ca[ca.shape[0] - AMX_SCRATCH :]
    rows_scratch = scratch[: 8 * INT8_ROWS_SCRATCH].view(np.int64)
    lut_scratch = scratch[: 8 * LUT_CONV_SCRATCH].view(np.int64)
    for c0 in range(0, n_img, chunk):
        nv = min(chunk, n_img - c0)
        for i in range(prog.shape[0]):
            p = prog[i]
            op = p[0]
            if op == OP_QUANT:
                H = p[3]
                W = p[4]
                C = p[5]
                ph = p[6]
                pw = p[7]
                hi = np.float32(sc[p[9]])
                mult = np.float32(sc[p[9] + 1])
                dst = ca[p[8] :]
                if p[1] == 0:  # the model input, NCHW
                    _int8_quantize_nchw(x, hi, mult, ph, pw, dst, c0, c0 + nv, scratch)
                else:
                    xs = fa[p[2] : p[2] + chunk * H * W * C].reshape((chunk, H, W, C))
                    cm = C <= 4
                    _int8_quantize_range(xs, 0, hi, mult, 0, ph, pw, H + 2 * ph, W + 2 * pw, cm, dst, 0, nv)
            elif op == OP_CONV:
                geo = p[2:11]
                qoff = aux[p[11] : p[11] + p[12]]
                passes = aux[p[13] : p[13] + 3 * p[14]].reshape((p[14], 3))
                w = w8[p[15] : p[15] + p[16]]
                s0 = sc[p[17] : p[17] + p[19]]
                s1 = sc[p[18] : p[18] + p[19]]
                sf = sc[p[33] : p[33] + 3 * p[19]]
                flags = p[20]
                o = fa[p[21] :] if flags & EPI_FLOAT else fa[:0]
                r = fa[p[22] :] if flags & EPI_RESIDUAL else fa[:0]
                cd = ca[p[23] :] if flags & EPI_CODES else ca[:0]
                cgeo = p[24:28]
                if p[29] == 4:  # table lookup (kernels_lut_conv): the tables, then the product
                    tab = ca[p[30] :]
                    tpix = p[31]
                    C = geo[2]
                    _tables_range(ca[p[1] :], C, aux[p[34] : p[34] + 4], p[35], tpix, tab, 0,
                                  nv * geo[0] * geo[1])
                    wq = w8[p[15] : p[15] + p[16]].reshape((p[36], p[16] // (64 * p[36]), 64))
                    _lut_conv_range(tab, geo, tpix, qoff, wq, p[32], s0, s1, sf, flags, o, r, cd, cgeo,
                                    sc[p[28]], sc[p[28] + 1], lut_scratch, 0, nv * geo[3])
                elif p[29] >= 2:  # output pixels in the lanes (kernels_lanes): codes only; 3: pooled
                    pool = p[29] == 3  # (_fused_pool)
                    rows = nv * (geo[3] // 2 if pool else geo[3])
                    _lanes_conv_range(ca[p[1] :], geo, p[31], (p[32] + 3) // 4, w8[p[30] :], s0, s1, sf, cd,
                                      cgeo, sc[p[28]], sc[p[28] + 1], pool, 0, rows)
                elif p[29]:  # AMX tiles
                    used_amx = True
                    cfg = w8[p[30] : p[30] + 64]
                    _amx_conv_range(ca[p[1] :], geo, qoff, w, cfg, p[31], p[32], s0, s1, sf, flags, o, r, cd,
                                    cgeo, sc[p[28]], sc[p[28] + 1], 0, nv, scratch)
                else:
                    M = nv * geo[3] * geo[4]
                    _int8_conv_range(ca[p[1] :], geo, qoff, w, passes, s0, s1, sf, flags, o, r, cd, cgeo,
                                     sc[p[28]], sc[p[28] + 1], rows_scratch, 0, M)
            elif op == OP_SUBSAMPLE:
                _subsample(fa[p[1] :], p[2], p[3], p[4], p[5], p[6], fa[p[7] :], p[8], p[9], nv)
            elif op == OP_CPAD:
                _channel_pad(fa[p[1] :], p[2], p[3], p[4], p[5], fa[p[6] :], nv)
            elif op == OP_MAXPOOL:
                _code_maxpool_range(ca[p[1] :], p[2:18], ca[p[18] :], scratch, 0, nv)
            elif op == OP_GAP:
                H = p[2]
                W = p[3]
                C = p[4]
                xs = fa[p[1] : p[1] + chunk * H * W * C].reshape((chunk, H, W, C))
                _global_avgpool_range(xs, fa[p[5] : p[5] + chunk * C].reshape((chunk, C)), scratch, 0, nv)
        # the result: NHWC (or rows) -> NCHW per image
        off = oinfo[0]
        HW = oinfo[1] * oinfo[2]
        C = oinfo[3]
        for n in range(nv):
            src = fa[off + n * HW * C : off + (n + 1) * HW * C]
            dst = out[(c0 + n) * HW * C : (c0 + n + 1) * HW * C]
            for q in range(HW):
                for c in range(C):
                    dst[c * HW + q] = src[q * C + c]
    if used_amx:
        amx_release()


@intrinsic
def _f32_at(typingctx, addr):
    """The float32 pointer at address ``addr`` (a tensor's ``data_ptr()``)."""
    sig = types.CPointer(types.float32)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.FloatType()))

    return sig, codegen


@kernel
def _run_args(prog, aux, w8, sc, xaddr, C, H, W, oaddr, n_out, oinfo, fa, ca, n_img, chunk):
    """``_run`` on the contiguous float32 images (n_img, C, H, W) at address ``xaddr``, the ``n_out``
    result floats to address ``oaddr``: tensors' memory without NumPy views of it. The one-image
    call before :func:`_run_at` (kept for A/B timings and tests): numba's dispatcher types and
    unboxes its fifteen arguments on every call, and inside ``_run`` every view of the eight
    arrays counts references to them."""
    x = numba.carray(_f32_at(xaddr), (n_img, C, H, W))
    _run(prog, aux, w8, sc, x, numba.carray(_f32_at(oaddr), (n_out,)), oinfo, fa, ca, n_img, chunk)


def _ptr_at(nbtype):
    """An intrinsic: the ``nbtype`` pointer at an int64 address."""

    @intrinsic
    def at(typingctx, addr):
        sig = types.CPointer(nbtype)(types.int64)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(nbtype).as_pointer())

        return sig, codegen

    return at


_i64_at, _i8_at, _f64_at, _u8_at, _i32_at = (
    _ptr_at(t) for t in (types.int64, types.int8, types.float64, types.uint8, types.int32))


@kernel
def _count_nonfinite_at(addr, n):
    """:func:`count_nonfinite` of the ``n`` float32 values at address ``addr`` (a tensor's memory)."""
    return count_nonfinite(numba.carray(_i32_at(addr), (n,)))


def check_finite(x: Tensor) -> None:
    """Raise :func:`nonfinite_error` when the floating tensor ``x`` holds NaN or +/-Inf (other dtypes
    pass). A contiguous float32 CPU tensor is read in place by one numba call (~0.2 us at 784
    values); other floating tensors through ``torch.isfinite``."""
    if x.dtype is torch.float32 and x.is_cpu and x.is_contiguous():
        n = x.numel()
        bad = _count_nonfinite_at(x.data_ptr(), n) if n else 0
    elif x.is_floating_point():
        bad = int(x.numel() - torch.isfinite(x).sum())
    else:
        return
    if bad:
        raise nonfinite_error(bad, x.numel())

# fields of a one-image call's context (``_context``): addresses and lengths of the program's arrays
# and the calling thread's arenas, and the image's geometry
(CX_PROG, CX_ROWS, CX_AUX, CX_NAUX, CX_W8, CX_NW8, CX_SC, CX_NSC, CX_OINFO, CX_FA, CX_NFA, CX_CA, CX_NCA,
 CX_C, CX_H, CX_W, CX_NOUT, CX_CHUNK) = range(18)
CX_LEN = 18


@kernel
def _run_at(cx, xaddr, oaddr):
    """``_run`` on one image at address ``xaddr``, its result to address ``oaddr``, everything else
    read from the int64 context at address ``cx`` (``_context``). Three integers for numba's
    dispatcher to type and unbox instead of fifteen arguments (LeNet-5, warm: ~0.8 us less), and
    arrays made from addresses carry no reference count, so that the interpreter's views of them
    cost no atomic increments (~1.6 us less; ``benchmarks/speed/profile_call_path.py``)."""
    c = numba.carray(_i64_at(cx), (CX_LEN,))
    prog = numba.carray(_i64_at(c[CX_PROG]), (c[CX_ROWS], NF))
    aux = numba.carray(_i64_at(c[CX_AUX]), (c[CX_NAUX],))
    w8 = numba.carray(_i8_at(c[CX_W8]), (c[CX_NW8],))
    sc = numba.carray(_f64_at(c[CX_SC]), (c[CX_NSC],))
    oinfo = numba.carray(_i64_at(c[CX_OINFO]), (4,))
    fa = numba.carray(_f32_at(c[CX_FA]), (c[CX_NFA],))
    ca = numba.carray(_u8_at(c[CX_CA]), (c[CX_NCA],))
    bad = count_nonfinite(numba.carray(_i32_at(xaddr), (c[CX_C] * c[CX_H] * c[CX_W],)))
    if bad:  # the caller raises: nothing runs on NaN or +/-Inf
        return bad
    x = numba.carray(_f32_at(xaddr), (1, c[CX_C], c[CX_H], c[CX_W]))
    out = numba.carray(_f32_at(oaddr), (c[CX_NOUT],))
    _run(prog, aux, w8, sc, x, out, oinfo, fa, ca, 1, c[CX_CHUNK])
    return 0


def _context(prog: Program, fa: np.ndarray, ca: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """The int64 context of ``_run_at``: the arrays' addresses, valid while the caller keeps the
    arrays alive (the one-image cache holds them beside it)."""
    arrays = (prog.prog, prog.aux, prog.w8, prog.sc)
    if not all(a.flags.c_contiguous for a in (*arrays, prog.oinfo, fa, ca)):
        raise ValueError("a program's arrays and arenas must be C-contiguous")
    cx = np.zeros(CX_LEN, np.int64)
    for i, a in zip((CX_PROG, CX_AUX, CX_W8, CX_SC), arrays, strict=True):
        cx[i], cx[i + 1] = a.ctypes.data, a.size
    cx[CX_ROWS] = prog.prog.shape[0]
    cx[CX_OINFO] = prog.oinfo.ctypes.data
    cx[CX_FA], cx[CX_NFA], cx[CX_CA], cx[CX_NCA] = fa.ctypes.data, fa.size, ca.ctypes.data, ca.size
    cx[CX_C], cx[CX_H], cx[CX_W] = chw
    cx[CX_NOUT], cx[CX_CHUNK] = prog.out_numel, prog.chunk
    return cx


#: bytes of the output blocks that one-image calls take their output tensors from
OUT_BLOCK_BYTES = 1 << 14


# ----------------------------------------------------------------------------------------------
# the planner: fx graph -> program
# ----------------------------------------------------------------------------------------------


@dataclass
class _Val:
    """A tensor of the program: ``kind`` 'x' (the model input, NCHW), 'f' (float32 NHWC in the
    float arena), 'c' (padded uint8 code image in the code arena), 't' (a (float, codes) pair),
    's' (a subsampling not yet done: ``parts`` = (source, sh, sw); its channel pad does it).
    Per image ``H x W x C``; ``ndim`` is the rank the module graph would see (2: rows). ``hwc``:
    rows of codes that hold a feature map (OH, OW, C) flattened in (h, w, c) order, not PyTorch's
    (c, h, w): the Linear layer reading them takes its weight columns in that order."""

    kind: str
    H: int = 1
    W: int = 1
    C: int = 1
    off: int = 0
    pad: tuple[int, int] = (0, 0)
    ndim: int = 4
    parts: tuple = ()
    hwc: tuple = ()


@dataclass
class Program:
    prog: np.ndarray
    aux: np.ndarray
    w8: np.ndarray
    sc: np.ndarray
    oinfo: np.ndarray
    out_shape: tuple[int, ...]  # per image
    out_numel: int
    fa_size: int
    ca_size: int
    chunk: int
    # least seconds per image of a serial call (inf until one ran): the thread rule's work measure
    t_img: float = math.inf

    def arenas(self) -> tuple[np.ndarray, np.ndarray]:
        """Zeroed float and code arenas, each starting on a 64-byte line (every region offset is a
        multiple of 64 bytes, so AMX tiles of the code images and the epilogue's stores start on
        lines where the geometry allows)."""
        if self.ca_size % _ALIGN:  # the AMX scratch at its end must start on a line
            raise ValueError(f"code arena of {self.ca_size} bytes: expected a multiple of {_ALIGN}")
        fa = aligned_u8(4 * self.fa_size).view(np.float32)
        ca = aligned_u8(self.ca_size)
        fa[:] = 0.0
        ca[:] = 0
        return fa, ca


@dataclass
class _Builder:
    N: int
    rows: list = field(default_factory=list)
    aux: list = field(default_factory=list)
    w8: list = field(default_factory=list)
    sc: list = field(default_factory=list)
    n_aux: int = 0
    n_w8: int = 0
    n_sc: int = 0
    fa: int = 0
    ca: int = 0
    _weights: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)  # ('f' | 'c', offset) -> region size (elements)

    def falloc(self, H: int, W: int, C: int) -> int:
        off = self.fa
        self.fa += -(-self.N * H * W * C // 16) * 16
        self.sizes[("f", off)] = self.fa - off
        return off

    def calloc(self, Hp: int, Wp: int, C: int) -> int:
        off = self.ca
        self.ca += -(-self.N * Hp * Wp * C // _ALIGN) * _ALIGN
        self.sizes[("c", off)] = self.ca - off
        return off

    def put(self, lst: str, arr: np.ndarray) -> int:
        n = f"n_{lst}"
        off = getattr(self, n)
        if lst == "w8" and arr.size % _ALIGN:  # weight tiles and tile configurations start on lines
            arr = np.concatenate([arr.reshape(-1), np.zeros(-arr.size % _ALIGN, arr.dtype)])
        getattr(self, lst).append(arr)
        setattr(self, n, off + arr.size)
        return off

    def floats(self, *v: float) -> int:
        return self.put("sc", np.array(v, np.float64))

    def op(self, *fields: int) -> None:
        row = np.zeros(NF, np.int64)
        row[: len(fields)] = fields
        self.rows.append(row)


def _module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The runtime module a ``__call__`` of a bound forward calls (see ``_bind_forwards``)."""
    if node.op == "call_method" and node.target == "__call__" and node.args:
        fn = node.args[0]
        if isinstance(fn, fx.Node) and fn.op == "get_attr":
            return getattr(getattr(gm, str(fn.target)), "__self__", None)
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def _quantize(b: _Builder, v: _Val, pm: PackedConv2d | PackedLinear, pad: tuple[int, int]) -> _Val:
    """Codes of the float value ``v`` with the fused quantizer of ``pm`` (mode 0 only)."""
    a = pm.act
    if a.mode != 0 or a.ma != 0:
        raise UnsupportedGraphError(f"{pm.layer_name}: input quantizer without a fused formula")
    if v.kind not in ("x", "f"):
        raise UnsupportedGraphError(f"{pm.layer_name}: input of kind {v.kind}")
    ph, pw = pad
    off = b.calloc(v.H + 2 * ph, v.W + 2 * pw, v.C)
    b.op(OP_QUANT, 0 if v.kind == "x" else 1, v.off, v.H, v.W, v.C, ph, pw, off, b.floats(a.hi, a.mult))
    return _Val("c", v.H, v.W, v.C, off, pad)


def _coefficients(b: _Builder, pm) -> tuple[int, int, int]:
    """(s0 offset, s1 offset, length) of an int8 layer's epilogue coefficients."""
    got = b._weights.get(("sc", id(pm)))
    if got is None:
        s0, s1 = pm._static8 or pm._coeffs8_static()
        got = b._weights[("sc", id(pm))] = (b.put("sc", s0), b.put("sc", s1), s0.size)
    return got


def _f32_coefficients(b: _Builder, pm) -> int:
    """Offset of the float32 epilogue's coefficients of ``pm`` (``PackedConv2d.f32_coefficients``),
    or -1 when it does not apply."""
    key = ("sf", id(pm))
    got = b._weights.get(key)
    if got is None:
        s0, s1 = pm._static8 or pm._coeffs8_static()
        sf = pm.f32_coefficients(s0, s1)
        got = b._weights[key] = -1 if sf is None else b.put("sc", sf)
    return got


def _weights(b: _Builder, pm, hwc: tuple = ()) -> tuple[int, int, int, int]:
    """(w offset, w length, passes offset, passes count) of the VNNI weights of an int8 layer (put
    into the program only for layers that run on the VNNI tiles). ``hwc`` = (OH, OW, C): a Linear
    layer whose inputs come in (h, w, c) order (``_Val.hwc``), its weight columns permuted to it."""
    key = (id(pm), hwc)
    got = b._weights.get(key)
    if got is None:
        i8 = pm.i8
        w = i8.w
        if hwc:
            OH, OW, C = hwc
            w_int = fold_integers(pm.wp)[0]
            # column (h, w, c) of the permuted weights is PyTorch's flatten column (c, h, w)
            perm = np.arange(C * OH * OW).reshape(C, OH, OW).transpose(1, 2, 0).reshape(-1)
            w, passes = pack_int8_weights(w_int[:, perm].reshape(w_int.shape[0], 1, 1, -1), 1)
            assert np.array_equal(passes, i8.passes) and w.size == i8.w.size
        got = (b.put("w8", w), w.size, b.put("aux", i8.passes.reshape(-1)), i8.passes.shape[0])
        b._weights[key] = got
    return got


def _lut_weights(b: _Builder, pm: PackedConv2d) -> tuple[int, int, int]:
    """(w offset, w length, levels offset) of ``pm``'s table-lookup weights (``pm.lutc``)."""
    got = b._weights.get(("lut", id(pm)))
    if got is None:
        lc = pm.lutc
        lv = np.zeros(4, np.int64)
        lv[: lc.lv.size] = lc.lv
        got = (b.put("w8", lc.wq.view(np.int8).reshape(-1)), lc.wq.size, b.put("aux", lv))
        b._weights[("lut", id(pm))] = got
    return got


def _int_weights(pm: PackedConv2d) -> np.ndarray:
    """``pm``'s integer weights (O, KH, KW, C): ``w = sw * (l0 + u*q) = sw * unit * w_int``
    (``layers.int8_weights``)."""
    wp, i8 = pm.wp, pm.i8
    w_int = round(wp.l0 / i8.unit) + round(wp.u / i8.unit) * plane_integers(wp).astype(np.int64)
    return w_int.reshape(pm.out_features, *pm.kernel_size, pm.in_channels)


def _amx_weights(b: _Builder, pm: PackedConv2d) -> tuple[int, int, int, int, int, int, int]:
    """(w offset, w length, config offset, kc, nbt, nck, parts) of the AMX copy of ``pm``'s weights
    (``parts``: int8 parts per weight, ``kernels_int8.int8_parts``)."""
    got = b._weights.get(("amx", id(pm)))
    if got is None:
        w_int = _int_weights(pm)
        w, kc, nck, nbt = pack_amx_weights(w_int)
        cfg = _amx.amx_tile_config(kc, nbt).view(np.int8)
        got = (b.put("w8", w), w.size, b.put("w8", cfg), kc, nbt, nck, int8_parts(w_int))
        b._weights[("amx", id(pm))] = got
    return got


def _lanes_weights(b: _Builder, pm: PackedConv2d, flags: int) -> int:
    """Offset of ``pm``'s weights for the lanes kernel (``kernels_lanes``), or -1 where it does not
    apply (or :data:`LANES` is off)."""
    key = ("lanes", id(pm))
    got = b._weights.get(key)
    if got is None:
        got = -1
        if LANES and host_has_lanes():
            w_int = _int_weights(pm)
            if lanes_applies(pm.in_channels, pm.out_features, pm.kernel_size, pm.stride, pm.dilation, flags,
                             w_int):
                got = b.put("w8", pack_lanes_weights(w_int[..., 0]))
        b._weights[key] = got
    return got


#: one-channel layers with few outputs run with their output pixels in the vector lanes
#: (``kernels_lanes``) where they can; False: always the channel lanes of ``kernels_int8``
LANES = True
#: ... and write the codes of a 2x2 max pool after them directly (``_fused_pool``)
FUSE_POOL = True


def _use_amx(pm, linear: bool, H: int, W: int) -> bool:
    """AMX tiles for this convolution: equal strides, no dilation along the width, at least 16
    virtual rows per image (``kernels_int8``, AMX section)."""
    if linear or not _amx.amx_enabled() or pm.dilation[1] != 1 or pm.stride[0] != pm.stride[1]:
        return False
    OH, OW = pm.out_hw(H, W)
    return (OH - 1) * (W + 2 * pm.padding[1]) + OW >= 16


def _conv(b: _Builder, pm, x: _Val, res: _Val | None, linear: bool) -> _Val:
    if linear:
        if x.H * x.W != 1 or pm.in_features != x.C:
            raise UnsupportedGraphError(f"{pm.layer_name}: a Linear layer on a {x.H}x{x.W}x{x.C} tensor")
        stride, pad, OH, OW = (1, 1), (0, 0), 1, 1
    else:
        if pm.in_channels != x.C:
            raise UnsupportedGraphError(f"{pm.layer_name}: {x.C} input channels")
        stride, pad = pm.stride, pm.padding
        OH, OW = pm.out_hw(x.H, x.W)
    if x.kind != "c":
        x = _quantize(b, x, pm, pad)
    elif x.pad != pad:
        raise UnsupportedGraphError(f"{pm.layer_name}: codes padded by {x.pad}, expected {pad}")
    O = pm.out_features
    i8 = pm.i8
    Hp, Wp = x.H + 2 * pad[0], x.W + 2 * pad[1]
    qoff = i8.qoff(Wp, x.C)
    s0o, s1o, sn = _coefficients(b, pm)
    ct = None if linear else pm.code_target
    emit_float = linear or pm.emit_float or ct is None
    fo = b.falloc(OH, OW, O) if emit_float else 0
    ro = 0
    if res is not None:
        if res.kind != "f" or (res.H, res.W, res.C) != (OH, OW, O):
            raise UnsupportedGraphError(f"{pm.layer_name}: residual operand of another shape")
        ro = res.off
    sfo = -1 if (emit_float or res is not None or linear) else _f32_coefficients(b, pm)
    flags = epilogue_flags(pm.relu, emit_float, res is not None, ct is not None, sfo >= 0)
    if sfo < 0:  # the kernels read them whatever the flags
        sfo = b.put("sc", np.zeros(3 * sn, np.float64))
    co, cgeo, qs = 0, [0, 0, 0, 0], b.floats(0.0, 0.0)
    cval = None
    if ct is not None:
        cgeo = [int(v) for v in ct.geometry(OH, OW)]
        co = b.calloc(cgeo[0], cgeo[1], O)
        qs = b.floats(ct.hi, ct.mult)
        cval = _Val("c", OH, OW, O, co, tuple(ct.pad))
    geo = [Hp, Wp, x.C, OH, OW, stride[0], stride[1], b.N, O]
    amx = [0, 0, 0, 0]
    lut = []
    if _use_amx(pm, linear, x.H, x.W):
        wo, wl, cfo, kc, nbt, nck, parts = _amx_weights(b, pm)
        po = pn = 0
        qoff = amx_k_offsets(pm.kernel_size[0], nck, kc, pm.dilation[0], Wp, x.C, parts)
        amx = [1, cfo, kc, nbt]
    elif not linear and pm.lutc is not None:
        lc = pm.lutc
        assert lc.tpix == 64 * -(-x.C * lc.cb // 16), "padding steps: the tables' region is not written whole"
        wo, wl, lvo = _lut_weights(b, pm)
        po = pn = 0
        qoff = lut_conv_offsets(*pm.kernel_size, *pm.dilation, Wp, lc.tpix)
        amx = [4, b.calloc(Hp, Wp, lc.tpix), lc.tpix, lc.sums]
        lut = [lvo, 4 // lc.cb, lc.wq.shape[0]]
    elif not linear and (lo := _lanes_weights(b, pm, flags)) >= 0:
        wo = wl = po = pn = 0
        amx = [2, lo, pm.kernel_size[0], pm.kernel_size[1]]
    else:
        wo, wl, po, pn = _weights(b, pm, x.hwc)
    b.op(OP_CONV, x.off, *geo, b.put("aux", qoff), qoff.size, po, pn, wo, wl, s0o, s1o, sn, flags, fo, ro, co,
         *cgeo, qs, *amx, sfo, *lut)
    fval = _Val("f", OH, OW, O, fo, ndim=2 if linear else 4) if emit_float else None
    if cval is None:
        return fval
    return cval if fval is None else _Val("t", parts=(fval, cval))


def _slice_steps(idx) -> tuple[int, int] | None:
    """(sh, sw) of ``x[:, :, ::sh, ::sw]``; None for any other index."""
    if not isinstance(idx, tuple) or len(idx) != 4 or not all(isinstance(s, slice) for s in idx):
        return None
    for d, s in enumerate(idx):
        if s.start not in (None, 0) or s.stop is not None or (d < 2 and s.step not in (None, 1)):
            return None
    return (idx[2].step or 1, idx[3].step or 1)


def _channel_pads(args, kwargs) -> tuple[int, int] | None:
    """(front, back) of ``F.pad(x, (0, 0, 0, 0, front, back))`` with zeros; None otherwise."""
    pads = args[1] if len(args) > 1 else kwargs.get("pad")
    mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
    value = args[3] if len(args) > 3 else kwargs.get("value", None)
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pads, (tuple, list)):
        return None
    pads = list(pads)
    if len(pads) != 6 or any(pads[:4]) or min(pads) < 0:
        return None
    return int(pads[4]), int(pads[5])


def plan(gm: fx.GraphModule, shape: tuple[int, ...], N: int) -> Program:
    """The program of ``gm`` for inputs of per-image ``shape`` (C, H, W) or (K,), ``N`` images a
    chunk. Raises :class:`UnsupportedGraphError` for a graph the interpreter cannot run."""
    b = _Builder(N)
    vals: dict[fx.Node, _Val | None] = {}
    result: _Val | None = None
    if len(shape) == 3:
        xin = _Val("x", shape[1], shape[2], shape[0])
    elif len(shape) == 1:
        xin = _Val("x", 1, 1, shape[0], ndim=2)
    else:
        raise UnsupportedGraphError(f"input of rank {len(shape) + 1}")
    n_in = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            n_in += 1
            if n_in > 1:
                raise UnsupportedGraphError("more than one input")
            vals[node] = xin
            continue
        if node.op == "get_attr":
            vals[node] = None
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or vals.get(out) is None or vals[out].kind != "f":
                raise UnsupportedGraphError("the output is not one float tensor")
            result = vals[out]
            continue
        args = [vals.get(a) if isinstance(a, fx.Node) else a for a in node.args]
        mod = _module_of(gm, node)
        if mod is not None:
            cargs = args[1:] if node.op == "call_method" else args
            if node.kwargs:
                raise UnsupportedGraphError(f"{node.name}: keyword arguments")
            if type(mod) is PackedConv2d and mod.i8 is not None:
                vals[node] = _conv(b, mod, cargs[0], cargs[1] if len(cargs) > 1 else None, linear=False)
            elif type(mod) is PackedLinear and mod.runs_flat and len(cargs) == 1:
                vals[node] = _conv(b, mod, cargs[0], None, linear=True)
            elif type(mod) is CodeMaxPool2d:
                src = node.args[1] if node.op == "call_method" else node.args[0]
                fused = _fused_pool(b, mod, cargs[0], len(src.users) if isinstance(src, fx.Node) else 0)
                vals[node] = fused or _maxpool(b, mod, cargs[0])
            elif type(mod) is GlobalAvgPool2d:
                x = cargs[0]
                if x is None or x.kind != "f":
                    raise UnsupportedGraphError("global average pooling of a non-float tensor")
                off = b.falloc(1, 1, x.C)
                b.op(OP_GAP, x.off, x.H, x.W, x.C, off)
                vals[node] = _Val("f", 1, 1, x.C, off)
            elif type(mod) is nn.Flatten and mod.start_dim == 1 and mod.end_dim == -1:
                vals[node] = _flatten(cargs[0])
            else:
                raise UnsupportedGraphError(f"{node.name}: {type(mod).__name__} runs in PyTorch")
            continue
        if node.op == "call_function" and node.target is operator.getitem:
            src = args[0]
            if src is not None and src.kind == "t" and isinstance(node.args[1], int):
                vals[node] = src.parts[node.args[1]]
                continue
            steps = _slice_steps(node.args[1])
            if src is not None and src.kind == "f" and src.ndim == 4 and steps is not None:
                sh, sw = steps
                OH, OW = (src.H - 1) // sh + 1, (src.W - 1) // sw + 1
                users = list(node.users)
                if len(users) == 1 and users[0].op == "call_function" and users[0].target is F.pad \
                        and users[0].args[0] is node and _channel_pads(users[0].args, users[0].kwargs):
                    # subsampled then zero-padded (option-A shortcut): one operation, at the pad
                    vals[node] = _Val("s", OH, OW, src.C, src.off, parts=(src, sh, sw))
                    continue
                off = b.falloc(OH, OW, src.C)
                b.op(OP_SUBSAMPLE, src.off, src.H, src.W, src.C, sh, sw, off, src.C, 0)
                vals[node] = _Val("f", OH, OW, src.C, off)
                continue
        if node.op == "call_function" and node.target is F.pad:
            src = args[0]
            cp = _channel_pads(node.args, node.kwargs)
            if src is not None and src.kind == "s" and cp is not None:
                full, sh, sw = src.parts
                Co = src.C + sum(cp)
                off = b.falloc(src.H, src.W, Co)
                b.op(OP_SUBSAMPLE, full.off, full.H, full.W, full.C, sh, sw, off, Co, cp[0])
                vals[node] = _Val("f", src.H, src.W, Co, off)
                continue
            if src is not None and src.kind == "f" and src.ndim == 4 and cp is not None:
                off = b.falloc(src.H, src.W, src.C + sum(cp))
                b.op(OP_CPAD, src.off, src.H * src.W, src.C, cp[0], cp[1], off)
                vals[node] = _Val("f", src.H, src.W, src.C + sum(cp), off)
                continue
        if (node.op == "call_function" and node.target is torch.flatten and tuple(node.args[1:]) == (1,)
                and not node.kwargs):
            vals[node] = _flatten(args[0])
            continue
        raise UnsupportedGraphError(f"{node.name}: {node.op} {getattr(node.target, '__name__', node.target)}")
    if result is None:
        raise UnsupportedGraphError("no output")
    out_shape = (result.C,) if result.ndim == 2 else (result.C, result.H, result.W)
    rows = _fuse_codes(b.rows, result.off) if FUSE_CODES else b.rows
    prog = np.stack(rows) if rows else np.zeros((0, NF), np.int64)
    out_off, fa_size, ca_size = (_reuse_regions(prog, b.sizes, result.off) if REUSE
                                 else (result.off, b.fa, b.ca))
    return Program(
        prog=prog,
        aux=_cat(b.aux, np.int64), w8=aligned_copy(_cat(b.w8, np.int8)), sc=_cat(b.sc, np.float64),
        oinfo=np.array([out_off, result.H, result.W, result.C], np.int64), out_shape=out_shape,
        out_numel=int(np.prod(out_shape)),
        fa_size=fa_size + 16, ca_size=ca_size + 4 * INT8_SLACK + 1024 + AMX_SCRATCH, chunk=N,
    )


#: a Linear layer whose float output only the next Linear's quantization reads writes those codes
#: itself (``_fuse_codes``)
FUSE_CODES = True


def _fuse_codes(rows: list[np.ndarray], result_off: int) -> list[np.ndarray]:
    """``rows`` without the quantization of a Linear layer's float output that nothing else reads:
    the layer's epilogue writes those codes instead (the float64 epilogue's codes are the quantize
    row's formula, ``rint(min(max(y, 0), hi) * mult)``, on the same float32 ``y``)."""
    reads: dict[int, int] = {}
    for p in rows:
        for arena, f in _regions(p)[0]:
            if arena == "f":
                reads[int(p[f])] = reads.get(int(p[f]), 0) + 1
    out: list[np.ndarray] = []
    for p in rows:
        prev = out[-1] if out else None
        if (p[0] == OP_QUANT and p[1] == 1 and p[3] == 1 and p[4] == 1 and p[6] == 0 and p[7] == 0
                and prev is not None and prev[0] == OP_CONV and prev[29] == 0 and tuple(prev[2:4]) == (1, 1)
                and prev[20] & ~EPI_RELU == EPI_FLOAT and prev[21] == p[2] and p[2] != result_off
                and reads.get(int(p[2])) == 1):
            prev[20] = (prev[20] & EPI_RELU) | EPI_CODES
            prev[23], prev[24:28], prev[28] = p[8], (1, 1, 0, 0), p[9]
            continue
        out.append(p)
    return out


def _regions(p: np.ndarray) -> tuple[list, list]:
    """(reads, writes) of program row ``p``: reads ``(arena, field)``, writes ``(arena, field, key)``
    with ``key`` None for a region the operation writes whole (borders of code images included),
    else what the region's untouched part must have been left by (a code image whose writer fills
    the interior only: its geometry, so its zero border is the one every earlier user left), or
    ``False`` (a float region with zero channels written once: never reused)."""
    op = int(p[0])
    if op == OP_QUANT:
        return ([("f", 2)] if p[1] else []), [("c", 8, None)]
    if op == OP_CONV:
        flags = int(p[20])
        reads = [("c", 1)] + ([("f", 22)] if flags & EPI_RESIDUAL else [])
        writes = [("f", 21, None)] if flags & EPI_FLOAT else []
        if flags & EPI_CODES:
            writes.append(("c", 23, ("conv", *(int(v) for v in p[24:28]), int(p[10]))))
        if p[29] == 4:  # the tables: written whole (no padding steps, lut_conv_applies), read by this row
            writes.append(("c", 30, None))
        return reads, writes
    if op == OP_SUBSAMPLE:
        return [("f", 1)], [("f", 7, None if p[8] == p[4] else False)]
    if op == OP_CPAD:
        return [("f", 1)], [("f", 6, None)]
    if op == OP_MAXPOOL:
        key = None if p[17] else ("pool", *(int(v) for v in p[13:17]), int(p[2]))
        return [("c", 1)], [("c", 18, key)]
    if op == OP_GAP:
        return [("f", 1)], [("f", 5, None)]
    raise AssertionError(f"operation {op}")


#: intermediate tensors share arena regions once dead (``_reuse_regions``)
REUSE = True


def _reuse_regions(prog: np.ndarray, sizes: dict, out_off: int) -> tuple[int, int, int]:
    """Give dead tensors' arena regions to later ones (in place on ``prog``'s offsets); returns the
    output's offset and the float and code arenas' sizes.

    A region is free after the last operation that reads it (its writers allocate first, so no
    operation reads and writes the same memory: an AMX tile recomputes overlapping rows). It goes
    to a later region of the same arena and size whose writer fills it whole, or, for a code image
    that only its interior is written to, to one of the same geometry (its border is zero, as the
    kernels never write it); a float region with zero channels is never shared. A ResNet-20's
    per-image arenas (every tensor its own region: ~0.7 MB) then stay in a few hundred KB: fewer
    lines to fetch when another program has evicted them from L2 between calls."""
    last: dict[tuple, int] = {}
    for i, p in enumerate(prog):
        for arena, f in _regions(p)[0]:
            last[(arena, int(p[f]))] = i
    last[("f", out_off)] = len(prog)  # the result is read after the program
    new: dict[tuple, int] = {}
    key_of: dict[tuple, object] = {}
    pools: dict[tuple, list] = {}  # (arena, size, writer's key) -> free new offsets
    top = {"f": 0, "c": 0}
    for i, p in enumerate(prog):
        reads, writes = _regions(p)
        for arena, f, key in writes:
            old = (arena, int(p[f]))
            size = sizes[old]
            got = None
            if key is None:  # written whole: any free region of its size
                for (pa, ps, _), pool in pools.items():
                    if pa == arena and ps == size and pool:
                        got = pool.pop()
                        break
            elif key is not False and pools.get((arena, size, key)):
                got = pools[(arena, size, key)].pop()
            if got is None:
                got = top[arena]
                top[arena] += size
            new[old], key_of[old] = got, key
            last.setdefault(old, i)  # written, never read: free after this row
        fields = [(arena, f) for arena, f in reads] + [(arena, f) for arena, f, _ in writes]
        olds = [(arena, int(p[f])) for arena, f in fields]
        for (_, f), old in zip(fields, olds, strict=True):
            p[f] = new[old]
        for old in set(olds):
            if last.get(old) == i:
                del last[old]
                if key_of[old] is not False:
                    pools.setdefault((old[0], sizes[old], key_of[old]), []).append(new[old])
    return new[("f", out_off)], top["f"], top["c"]


def _cat(parts: list[np.ndarray], dt) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(parts).astype(dt)) if parts else np.zeros(1, dt)


def _flatten(x: _Val | None) -> _Val:
    if x is None or x.kind != "f" or x.H * x.W != 1:
        raise UnsupportedGraphError("flatten of a feature map (NHWC order differs from PyTorch's NCHW)")
    return _Val("f", 1, 1, x.C, x.off, ndim=2)


def _fused_pool(b: _Builder, mod: CodeMaxPool2d, x: _Val | None, users: int) -> _Val | None:
    """A 2x2 max pool (stride 2) whose input is the codes of the lanes convolution just before it,
    read by nothing else: that convolution writes the pooled codes itself (``kernels_lanes``,
    ``pool``) and the pool's own operation is left out (the value it returns); None otherwise."""
    if not FUSE_POOL or x is None or x.kind != "c" or users != 1 or not b.rows or mod.flat or x.pad != (0, 0):
        return None
    last = b.rows[-1]
    if last[0] != OP_CONV or last[29] != 2 or last[23] != x.off:
        return None
    if tuple(mod.kernel_size) != (2, 2) or tuple(mod.stride) != (2, 2) or x.H < 2 or x.W < 2:
        return None
    OH, OW = x.H // 2, x.W // 2
    cgeo = [int(v) for v in mod.target.geometry(OH, OW)]
    off = b.calloc(cgeo[0], cgeo[1], x.C)
    last[29], last[23], last[24:28] = 3, off, cgeo
    return _Val("c", OH, OW, x.C, off, tuple(mod.target.pad))


def _maxpool(b: _Builder, mod: CodeMaxPool2d, x: _Val | None) -> _Val:
    if x is None or x.kind != "c":
        raise UnsupportedGraphError("max pooling of a tensor that is not codes")
    (KH, KW), (SH, SW) = mod.kernel_size, mod.stride
    OH, OW = (x.H - KH) // SH + 1, (x.W - KW) // SW + 1
    ph, pw = x.pad
    if mod.flat:  # the rows of a Linear layer, written in (h, w, c) order: whole pixels, as vectors
        # where they can be (kernels_pool), instead of one byte at a time into PyTorch's (c, h, w)
        if tuple(int(v) for v in mod.target.geometry(1, 1)) != (1, 1, 0, 0):
            raise UnsupportedGraphError("a flattening max pool whose codes are padded")
        cgeo = [OH, OW, 0, 0]
        off = b.calloc(OH, OW, x.C)
        val = _Val("c", 1, 1, x.C * OH * OW, off, (0, 0), ndim=2, hwc=(OH, OW, x.C))
    else:
        cgeo = [int(v) for v in mod.target.geometry(OH, OW)]
        off = b.calloc(cgeo[0], cgeo[1], x.C)
        val = _Val("c", OH, OW, x.C, off, tuple(mod.target.pad))
    b.op(OP_MAXPOOL, x.off, x.C, x.H + 2 * ph, x.W + 2 * pw, ph, pw, KH, KW, SH, SW, OH, OW, *cgeo, 0, off)
    return val


# ----------------------------------------------------------------------------------------------
# the executor
# ----------------------------------------------------------------------------------------------


class FlatExecutor:
    """Runs a compiled graph as programs (one per input shape), see the module docstring."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._programs: dict[tuple, Program | None] = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        # one image: (input shape, calling thread) -> (program, its arenas, per-image shape, output shape)
        self._one: dict[tuple, tuple] = {}
        # threads the last general-path call ran its program on (the one-image path: always 1)
        self.last_threads = 1

    def program(self, shape: tuple[int, ...]) -> Program | None:
        """The program for per-image ``shape`` (None: this graph does not flatten)."""
        with self._lock:
            if shape in self._programs:
                return self._programs[shape]
            try:
                one = plan(self.gm, shape, 1)
                per_image = 4 * one.fa_size + one.ca_size
                chunk = int(max(1, min(MAX_CHUNK, CHUNK_BYTES // max(per_image, 1))))
                prog = one if chunk == 1 else plan(self.gm, shape, chunk)
            except UnsupportedGraphError:
                prog = None
            self._programs[shape] = prog
            return prog

    @staticmethod
    def _arenas(arenas: dict, shape, slot: int, prog: Program) -> tuple[np.ndarray, np.ndarray]:
        """The calling thread's arenas for ``shape`` and worker ``slot``."""
        a = arenas.get((shape, slot))
        if a is None:
            a = arenas[(shape, slot)] = prog.arenas()
        return a

    def __call__(self, x: Tensor) -> Tensor | None:
        """The model's output on ``x``, or None when this input does not run flat."""
        y = self.one(x)
        return self._call(x) if y is None else y

    def one(self, x: Tensor) -> Tensor | None:
        """The output on ``x`` when it is one image of a shape this thread has run before (None
        otherwise): its program and arenas cached, the tensor's data read in place. At batch 1 a
        LeNet-5 call spent about as long around the numba call (NumPy views, conversions, look-ups)
        as inside it. One image always runs on the calling thread. The numba call is ``_run_at``
        on three ints (the context of :func:`_context`, the input's and the output's addresses):
        warm, LeNet-5's call went from 17.7 to 15.1 us (``benchmarks/results/profile_call_path_lenet5.md``).

        Output tensors come from blocks (:data:`OUT_BLOCK_BYTES`) split into one-image views, made
        a block at a time: each call's output is its own memory, never written again, and the call
        touches no NumPy or tensor-making code. With the caches cold (another program ran between
        calls, as in a server or the interleaved benchmark) ``torch.from_numpy`` alone took ~12 us
        and ``np.empty`` ~6 us of a LeNet-5 call (1.2 and 0.4 us warm)."""
        one = self._one.get((x.shape, threading.get_ident()))
        if one is None or x.dtype is not torch.float32 or not x.is_cpu or x.requires_grad \
                or not x.is_contiguous():
            return None
        outs = one[5]
        y, oaddr = outs.pop() if outs else self._refill(one)
        # the program, arenas and geometry as one context address: three ints to pass; the call
        # counts the input's non-finite values first (in the same call: no second dispatch)
        bad = _run_at(one[3], x.data_ptr(), oaddr)
        if bad:
            outs.append((y, oaddr))
            raise nonfinite_error(bad, x.numel())
        return y

    @staticmethod
    def _refill(one: tuple) -> tuple[Tensor, int]:
        """A new block of output tensors for the one-image entry ``one``; returns its first."""
        prog, oshape, outs = one[0], one[4], one[5]
        n = max(1, OUT_BLOCK_BYTES // (4 * prog.out_numel))
        blk = np.empty((n, *oshape), np.float32)
        base, step = blk.ctypes.data, blk.strides[0]
        # the last view first: pop() hands them out in memory order (unbind: ~15% less than split)
        views = reversed(torch.from_numpy(blk).unbind(0))
        outs.extend(zip(views, range(base + (n - 1) * step, base - 1, -step), strict=True))
        return outs.pop()

    def one_args(self, x: Tensor) -> Tensor | None:
        """:meth:`one` through ``_run_args`` (fifteen arguments, eight of them arrays): the
        one-image path before the context, the same output; kept for A/B timings and tests."""
        one = self._one.get((x.shape, threading.get_ident()))
        if one is None or x.dtype is not torch.float32 or not x.is_cpu or x.requires_grad \
                or not x.is_contiguous():
            return None
        prog, fa, ca, outs, (C, H, W) = one[0], one[1], one[2], one[5], one[7]
        y, oaddr = outs.pop() if outs else self._refill(one)
        _run_args(prog.prog, prog.aux, prog.w8, prog.sc, x.data_ptr(), C, H, W, oaddr, prog.out_numel,
                  prog.oinfo, fa, ca, 1, prog.chunk)
        return y

    def _call(self, x: Tensor) -> Tensor | None:
        shape = x.shape[1:]  # torch.Size: a hashable tuple
        prog = self._programs.get(shape, False)
        if prog is False:
            if x.dim() < 2:
                return None
            prog = self.program(tuple(int(s) for s in shape))
            self._programs[shape] = prog
        if prog is None or x.shape[0] == 0:
            return None
        if x.dtype is not torch.float32 or x.requires_grad or not x.is_contiguous():
            if not x.is_floating_point():  # (the one-image path takes float32 only)
                raise input_dtype_error(x.dtype)
            x = x.detach().float().contiguous()
        xn = x.numpy()
        bad = count_nonfinite(xn.reshape(-1).view(np.int32))
        if bad:
            raise nonfinite_error(bad, xn.size)
        B = xn.shape[0]
        x4 = xn.reshape(B, -1, 1, 1) if xn.ndim == 2 else xn
        out = np.empty(B * prog.out_numel, np.float32)
        arenas = self._local.__dict__.get("arenas")
        if arenas is None:
            arenas = self._local.__dict__.setdefault("arenas", {})
        nt = _threads.num_threads()
        step = split_step(B, nt, prog.t_img, prog.chunk)
        self.last_threads = nt if step else 1
        if step:
            # dynamic schedule: pieces taken from a shared counter, so that a thread the OS does not
            # run (a busy machine) delays nobody: the others take its pieces (a static split waits
            # for the slowest part)
            pieces = [(lo, min(B, lo + step)) for lo in range(0, B, step)]
            n = prog.out_numel
            slots = [self._arenas(arenas, shape, k, prog) for k in range(min(nt, len(pieces)))]

            def work(slot: int, i: int) -> None:
                lo, hi = pieces[i]
                fa, ca = slots[slot]
                _run(prog.prog, prog.aux, prog.w8, prog.sc, x4[lo:hi], out[lo * n : hi * n], prog.oinfo,
                     fa, ca, hi - lo, prog.chunk)

            (_threads.run_polling if FLAT_POLL else _threads.run_shared)(len(pieces), work, nt)
        else:
            a = arenas.get((shape, 0))
            fa, ca = a if a is not None else self._arenas(arenas, shape, 0, prog)
            t0 = time.perf_counter()
            _run(prog.prog, prog.aux, prog.w8, prog.sc, x4, out, prog.oinfo, fa, ca, B, prog.chunk)
            t = (time.perf_counter() - t0) / B
            if t < prog.t_img and a is not None:  # not the call that made the arenas (page faults)
                prog.t_img = t
            if B == 1 and x.is_cpu:
                if len(self._one) > 64:  # many threads or shapes: start again
                    self._one.clear()
                key = (x.shape, threading.get_ident())
                chw = tuple(int(v) for v in x4.shape[1:])
                cx = _context(prog, fa, ca, chw)
                # the context holds addresses: the entry keeps it and every array it points to alive
                keep = (cx, prog.prog, prog.aux, prog.w8, prog.sc, prog.oinfo)
                # (program, arenas, context address, output shape, output tensors, kept arrays, image)
                self._one[key] = (prog, fa, ca, int(cx.ctypes.data), (1, *prog.out_shape), [], keep, chw)
        return torch.from_numpy(out.reshape(B, *prog.out_shape))  # a NumPy reshape: no torch dispatch
