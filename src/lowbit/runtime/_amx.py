"""AMX int8 tiles (Intel Advanced Matrix Extensions) for the int8 convolutions, in LLVM IR.

``tdpbusd`` multiplies a 16 x K tile of unsigned bytes by a K x 16 tile of signed bytes (stored
as K/4 rows of 16 x 4 bytes) into a 16 x 16 int32 tile: 16384 multiply-adds per instruction, 16x
an AVX-512 VNNI ``vpdpbusd``. Tiles are loaded from memory with any row stride, which makes the
convolution's im2col free: for a kernel row ``kh`` the KW*C bytes that 16 consecutive output
pixels read are 16 overlapping windows of the padded NHWC code image, ``stride*C`` bytes apart.

Use needs three things, checked once (:data:`HAS_AMX`): the CPU reports ``amx-tile`` and
``amx-int8`` (LLVM's host features), Linux grants the process the tile data state
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``; without it the first tile instruction
raises SIGILL), and ``LOWBIT_RUNTIME_AMX=0`` is not set; :func:`amx_enabled` also checks the plain
path at each use (``set_plain`` may change it later). The intrinsics
below emit the AMX instructions only when the host has them (elsewhere they compile to nothing
and the runtime never calls them), so the kernels that contain them still compile on any CPU.

The tile registers are configured per layer (:func:`amx_config`: ``ldtilecfg`` of a 64-byte
palette-1 configuration, :func:`amx_tile_config`) and used through immediates: tmm0-3 hold the
int32 accumulators, tmm4 (and tmm5 up to 2 blocks of 16 channels) activation tiles, tmm6-7 weight
tiles (tmm5-7 from 3 blocks, :func:`amx_b5`). Nothing else in the process
uses tile registers between the configuration and the last tile of a layer (the kernels run
straight-line numba code; the OS saves tile state across context switches).
"""

from __future__ import annotations

import ctypes
import logging
import os

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

log = logging.getLogger(__name__)

_ARCH_GET_XCOMP_PERM, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 0x1022, 0x1023, 18
_SYS_ARCH_PRCTL = 158  # x86-64
_OFF = ("0", "false", "no", "off")


def _host_amx() -> bool:
    try:
        import llvmlite.binding as llvm

        f = llvm.get_host_cpu_features()
        return bool(f.get("amx-tile")) and bool(f.get("amx-int8")) and bool(f.get("avx512vnni"))
    except Exception:  # pragma: no cover - feature query unavailable
        return False


def _request_tile_state() -> bool:
    """Ask Linux for the AMX tile data state (per process); True when granted."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
            return False
        mask = ctypes.c_uint64(0)
        if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
            return False
        return bool(mask.value & (1 << _XFEATURE_XTILEDATA))
    except Exception:  # not Linux / no libc syscall
        return False


#: the host CPU has AMX-INT8 (the intrinsics emit tile instructions)
HOST_AMX = _host_amx()
_GRANTED = HOST_AMX and _request_tile_state()
#: the AMX kernels may run: host support, the OS grants the tile state, not switched off
HAS_AMX = _GRANTED and os.environ.get("LOWBIT_RUNTIME_AMX", "1").strip().lower() not in _OFF
if HOST_AMX and not _GRANTED:
    log.info("lowbit.runtime: AMX present but the OS did not grant the tile state; using AVX-512 VNNI")


def amx_enabled() -> bool:
    """AMX kernels may be used now (:data:`HAS_AMX` and the VNNI kernels are not switched off)."""
    from . import kernels

    return HAS_AMX and kernels.HAS_VNNI


def amx_tile_config(kc: int, nbt: int = 1) -> np.ndarray:
    """The 64-byte ``ldtilecfg`` block for K chunks of ``kc`` bytes (a multiple of 4, <= 64) and
    ``nbt`` blocks of 16 output channels: tmm0-3 16 x 16 int32, tmm4 16 x kc bytes (activations),
    tmm6-7 kc/4 x 64 bytes (weights); tmm5 holds activations too (16 x kc) for ``nbt <= 2`` and
    weights (kc/4 x 64) for ``nbt >= 3`` (:func:`amx_b5`)."""
    if kc % 4 or not 4 <= kc <= 64:
        raise ValueError(f"AMX K chunk of {kc} bytes (a multiple of 4 up to 64)")
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1  # palette 1
    colsb = np.zeros(16, np.uint16)
    rows = np.zeros(16, np.uint8)
    colsb[:4], rows[:4] = 64, 16
    colsb[4:6], rows[4:6] = kc, 16
    colsb[6:8], rows[6:8] = 64, kc // 4
    if amx_b5(nbt):
        colsb[5], rows[5] = 64, kc // 4
    cfg[16:48] = colsb.view(np.uint8)
    cfg[48:64] = rows
    return cfg


def amx_b5(nbt: int) -> bool:
    """Layers with >= 3 blocks of 16 channels use tmm5 for weights: one activation tile against 3-4
    weight tiles rotating over tmm5-7 (a weight load then waits for one TDP instead of two)."""
    return nbt >= 3


_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_F32, _F64, _I1 = ir.FloatType(), ir.DoubleType(), ir.IntType(1)
_V16I32, _V16F32, _V16F64 = ir.VectorType(_I32, 16), ir.VectorType(_F32, 16), ir.VectorType(_F64, 16)
_V16I1, _V16I8 = ir.VectorType(_I1, 16), ir.VectorType(_I8, 16)
_VOID = ir.VoidType()


def _fn(builder: ir.IRBuilder, name: str, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _ptr(context, builder, aty, value, ty):
    arr = cgutils.create_struct_proxy(aty)(context, builder, value=value)
    return builder.bitcast(arr.data, ty.as_pointer())


def _i8c(v: int):
    return ir.Constant(_I8, v)


@intrinsic
def amx_config(typingctx, cfg):
    """``ldtilecfg`` of the 64 bytes of ``cfg`` (:func:`amx_tile_config`)."""
    sig = types.void(cfg)

    def codegen(context, builder, signature, args):
        if HOST_AMX:
            p = _ptr(context, builder, signature.args[0], args[0], _I8)
            builder.call(_fn(builder, "llvm.x86.ldtilecfg", _VOID, [_I8.as_pointer()]), [p])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def amx_release(typingctx):
    """``tilerelease``: tile registers back to their initial state."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if HOST_AMX:
            builder.call(_fn(builder, "llvm.x86.tilerelease", _VOID, []), [])
        return context.get_dummy_value()

    return sig, codegen


def amx_block(MB: int, NB: int):
    """An intrinsic computing MB x NB tiles of 16 x 16 int32 sums (MB*NB <= 4)::

        block(x, abase, astride, koff, nk, w, wbase, kstride, nstride, acc)

    ``C[m, n] = sum_k A[m, k] @ B[k, n]`` over K chunks ``k < nk``: ``A[m, k]`` is the 16-row
    tile of ``x`` (uint8) at byte ``abase[m] + koff[k]``, rows ``astride`` bytes apart;
    ``B[k, n]`` the weight tile of ``w`` (int8, VNNI layout: kc/4 rows of 16 x 4 bytes) at byte
    ``wbase + k*kstride + n*nstride``. ``C`` goes to ``acc`` (int32) as (MB*16, NB*16) rows.
    Activation tiles go to tmm4 (and tmm5 for MB >= 2), weight tiles to tmm6-7, or for NB >= 3 to
    tmm5-7 (the configuration of :func:`amx_tile_config` with ``amx_b5``)."""
    if MB * NB > 4 or MB < 1 or NB < 1:
        raise ValueError("MB*NB <= 4 accumulator tiles")

    @intrinsic
    def block(typingctx, x, abase, astride, koff, nk, w, wbase, kstride, nstride, acc):
        sig = types.void(x, abase, astride, koff, nk, w, wbase, kstride, nstride, acc)

        def codegen(context, builder, signature, args):
            if not HOST_AMX:
                return context.get_dummy_value()
            xa, ba, sa, ka, nka, wa, wba, ksa, nsa, aca = args
            sg = signature.args
            xp = _ptr(context, builder, sg[0], xa, _I8)
            bp = _ptr(context, builder, sg[1], ba, _I64)
            kp = _ptr(context, builder, sg[3], ka, _I64)
            wp = builder.gep(_ptr(context, builder, sg[5], wa, _I8), [wba])
            cp = _ptr(context, builder, sg[9], aca, _I8)
            load = _fn(builder, "llvm.x86.tileloadd64", _VOID, [_I8, _I8.as_pointer(), _I64])
            store = _fn(builder, "llvm.x86.tilestored64", _VOID, [_I8, _I8.as_pointer(), _I64])
            zero = _fn(builder, "llvm.x86.tilezero", _VOID, [_I8])
            dp = _fn(builder, "llvm.x86.tdpbusd", _VOID, [_I8, _I8, _I8])
            bases = [builder.gep(xp, [builder.load(builder.gep(bp, [ir.Constant(_I64, m)]))])
                     for m in range(MB)]
            for t in range(MB * NB):
                builder.call(zero, [_i8c(t)])
            stride_b = ir.Constant(_I64, 64)
            with cgutils.for_range(builder, nka) as loop:
                k = loop.index
                ko = builder.load(builder.gep(kp, [k]))
                wk = builder.gep(wp, [builder.mul(k, ksa)])

                def bt(n):
                    return builder.gep(wk, [builder.mul(ir.Constant(_I64, n), nsa)])

                def at(m):
                    return builder.gep(bases[m], [ko])

                if NB <= 2:
                    for n in range(NB):
                        builder.call(load, [_i8c(6 + n), bt(n), stride_b])
                    for m in range(MB):
                        builder.call(load, [_i8c(4 + m % 2), at(m), sa])
                        for n in range(NB):
                            builder.call(dp, [_i8c(m * NB + n), _i8c(4 + m % 2), _i8c(6 + n)])
                else:  # MB == 1: one activation tile against 3-4 weight tiles
                    builder.call(load, [_i8c(4), at(0), sa])
                    for n in range(NB):  # weight tiles rotate over tmm5-7 (a load waits for fewer TDPs)
                        builder.call(load, [_i8c(5 + n % 3), bt(n), stride_b])
                        builder.call(dp, [_i8c(n), _i8c(4), _i8c(5 + n % 3)])
            row = ir.Constant(_I64, NB * 64)
            for m in range(MB):
                for n in range(NB):
                    ptr = builder.gep(cp, [ir.Constant(_I64, (m * 16 * NB * 16 + n * 16) * 4)])
                    builder.call(store, [_i8c(m * NB + n), ptr, row])
            return context.get_dummy_value()

        return sig, codegen

    return block


amx_block_4x1 = amx_block(4, 1)
amx_block_2x2 = amx_block(2, 2)
amx_block_1x1 = amx_block(1, 1)
amx_block_1x2 = amx_block(1, 2)
amx_block_1x3 = amx_block(1, 3)
amx_block_1x4 = amx_block(1, 4)


@intrinsic
def epilogue_row(typingctx, acc, aoff, nb, s0, s1, c0, on, flags, out, orow, res, codes, crow, qhi, qmult):
    """The int8 epilogue of one output pixel (the arithmetic of ``_jit.vnni_tile``'s, lane for
    lane): ``nb`` blocks of 16 int32 sums at ``acc[aoff:]``, channels ``c0 + o`` for ``o < on``,
    float output at ``out[orow:]``, residual at ``res[orow:]``, codes at ``codes[crow:]``. No kernel
    of this tree calls it any more; the older ``kernels_amx.py`` that
    ``benchmarks/speed/ab_amx_epilogue.py`` imports as its baseline does."""
    sig = types.void(acc, aoff, nb, s0, s1, c0, on, flags, out, orow, res, codes, crow, qhi, qmult)

    def codegen(context, builder, signature, args):
        from ._jit import EPI_CODES, EPI_FLOAT, EPI_RELU, EPI_RESIDUAL

        (aca, aoa, nba, s0a, s1a, c0a, ona, fla, oa, ora, rsa, cda, cra, qha, qma) = args
        sg = signature.args

        def i64(v):
            return ir.Constant(_I64, v)

        def splat(value, vty):
            v = builder.insert_element(ir.Constant(vty, None), value, ir.Constant(_I32, 0))
            return builder.shuffle_vector(v, ir.Constant(vty, None), ir.Constant(_V16I32, [0] * 16))

        def flag(bit):
            return builder.icmp_unsigned("!=", builder.and_(fla, i64(bit)), i64(0))

        ap = builder.gep(_ptr(context, builder, sg[0], aca, _I32), [aoa])
        s0p = builder.gep(_ptr(context, builder, sg[3], s0a, _F64), [c0a])
        s1p = builder.gep(_ptr(context, builder, sg[4], s1a, _F64), [c0a])
        op = builder.gep(_ptr(context, builder, sg[8], oa, _F32), [ora])
        rp = builder.gep(_ptr(context, builder, sg[10], rsa, _F32), [ora])
        cp = builder.gep(_ptr(context, builder, sg[11], cda, _I8), [cra])
        f_relu, f_float, f_res, f_codes = flag(EPI_RELU), flag(EPI_FLOAT), flag(EPI_RESIDUAL), flag(EPI_CODES)
        relu_v = splat(f_relu, _V16I1)
        lanes = ir.Constant(_V16I32, list(range(16)))
        zd = ir.Constant(_V16F64, [0.0] * 16)
        zf = ir.Constant(_V16F32, [0.0] * 16)
        hi_v = splat(qha, _V16F32)
        mult_v = splat(qma, _V16F32)
        pf, p8 = _F32.as_pointer(), _I8.as_pointer()
        mload = _fn(builder, "llvm.masked.load.v16f32.p0", _V16F32, [pf, _I32, _V16I1, _V16F32])
        mstore = _fn(builder, "llvm.masked.store.v16f32.p0", _VOID, [_V16F32, pf, _I32, _V16I1])
        mstore8 = _fn(builder, "llvm.masked.store.v16i8.p0", _VOID, [_V16I8, p8, _I32, _V16I1])
        rint = _fn(builder, "llvm.rint.v16f32", _V16F32, [_V16F32])
        with cgutils.for_range(builder, nba) as loop:
            o = builder.mul(loop.index, i64(16))
            d = builder.load(builder.bitcast(builder.gep(ap, [o]), _V16I32.as_pointer()))
            d.align = 4
            v0 = builder.load(builder.bitcast(builder.gep(s0p, [o]), _V16F64.as_pointer()))
            v1 = builder.load(builder.bitcast(builder.gep(s1p, [o]), _V16F64.as_pointer()))
            v0.align = v1.align = 8
            lim = builder.trunc(builder.sub(ona, o), _I32)
            mask = builder.icmp_signed("<", lanes, splat(lim, _V16I32))
            y = builder.fadd(builder.fmul(v1, builder.sitofp(d, _V16F64)), v0)
            yv = cgutils.alloca_once_value(builder, y)
            with builder.if_then(f_res):
                rv = builder.call(mload, [builder.gep(rp, [o]), ir.Constant(_I32, 4), mask, zf])
                builder.store(builder.fadd(builder.load(yv), builder.fpext(rv, _V16F64)), yv)
            y = builder.load(yv)
            neg = builder.and_(builder.fcmp_ordered("<", y, zd), relu_v)
            yf = builder.fptrunc(builder.select(neg, zd, y), _V16F32)
            with builder.if_then(f_float):
                builder.call(mstore, [yf, builder.gep(op, [o]), ir.Constant(_I32, 4), mask])
            with builder.if_then(f_codes):
                t = builder.select(builder.fcmp_ordered(">", yf, zf), yf, zf)
                t = builder.select(builder.fcmp_ordered(">", t, hi_v), hi_v, t)
                c = builder.fptoui(builder.call(rint, [builder.fmul(t, mult_v)]), _V16I8)
                builder.call(mstore8, [c, builder.gep(cp, [o]), ir.Constant(_I32, 1), mask])
        return context.get_dummy_value()

    return sig, codegen
