"""numba for the runtime kernels: the ``kernel`` decorator, an x86 ``popcnt`` intrinsic and the
AVX-512 VNNI int8 tiles.

Set-up (on-disk cache, ``LOWBIT_NUMBA_CACHE``, thread policy: serial GIL-releasing kernels, no
numba parallel regions) is the package's one numba set-up, ``lowbit._numba``.

Popcount: ``llvm.ctpop.i64`` emitted directly (``builder.ctpop``). On a CPU with AVX-512
VPOPCNTDQ, LLVM vectorises popcount reductions to ``vpopcntq`` (8 words per instruction);
elsewhere it uses the scalar ``popcnt`` instruction or a bit trick.

int8 dot-product tiles: ``vnni_tile(R, OB)`` is a register-blocked micro-kernel written in LLVM
IR around ``vpdpbusd`` (AVX-512 VNNI: 64 unsigned-byte x signed-byte products summed into 16
int32 lanes per instruction). numba cannot express vector registers, and LLVM does not turn a
plain numba loop into ``vpdpbusd`` (it widens to int64 and multiplies 8 lanes at a time), so the
tile is emitted by hand. It is only compiled where ``HAS_VNNI`` is true (the host CPU reports
``avx512vnni`` and ``avx512bw``); elsewhere the runtime uses the bit-serial kernels.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import _numba

log = logging.getLogger(__name__)

#: whether the runtime kernels are cached on disk (``lowbit._numba.cache_enabled``)
CACHE = _numba.cache_enabled(__file__)


def kernel(fn):
    """``lowbit._numba.jit`` with the runtime's flags: no fastmath (exact float order), no bounds
    checks, the GIL released (the runtime's worker threads call kernels concurrently), serial
    (no numba parallel region: the thread policy of ``lowbit._numba``)."""
    return _numba.jit(fn)


@intrinsic
def popcount64(typingctx, x):
    """Number of set bits of a uint64 (``llvm.ctpop.i64``)."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


# ----------------------------------------------------------------------------------------------
# AVX-512 VNNI int8 tiles
# ----------------------------------------------------------------------------------------------


def host_has(*features: str) -> bool:
    """Whether the host CPU has every one of ``features`` (LLVM's names, e.g. ``avx512vbmi``); False
    where the query fails."""
    try:
        import llvmlite.binding as llvm

        feats = llvm.get_host_cpu_features()
        return all(bool(feats.get(f)) for f in features)
    except Exception:  # pragma: no cover - feature query unavailable
        return False


def _host_has_vnni() -> bool:
    return host_has("avx512vnni", "avx512bw", "avx512f")


def _env_plain() -> bool:
    plain = os.environ.get("LOWBIT_RUNTIME_PLAIN", "0").strip().lower() not in ("", "0", "false", "no", "off")
    no_int8 = os.environ.get("LOWBIT_RUNTIME_INT8", "1").strip().lower() in ("0", "false", "no", "off")
    return plain or no_int8


#: the host CPU has AVX-512 VNNI (and BW, F)
HOST_VNNI = _host_has_vnni()
#: the int8 (VNNI) kernels may be used: the host has them and the plain path is not forced
#: (``LOWBIT_RUNTIME_PLAIN=1``, old name ``LOWBIT_RUNTIME_INT8=0``, or :func:`set_plain`)
HAS_VNNI = HOST_VNNI and not _env_plain()


# CPU-specific flags that other runtime modules derive from ``HAS_VNNI`` when they are imported
# (``kernels_gemm.HAS_LUT``, ``kernels_popcount.HAS_VPOPCNT``): switched off with the plain path,
# restored after it
_DERIVED_FLAGS = ("HAS_LUT", "HAS_VPOPCNT")
_SAVED_FLAGS: dict[tuple[str, str], bool] = {}


def set_plain(flag: bool = True) -> None:
    """Force (True) or release (False) the plain path: layers packed afterwards ignore the
    AVX-512 specific kernels (VNNI int8 tiles, and what builds on them: AMX, the ``vpermb``
    tables), as on a CPU without them. The environment's ``LOWBIT_RUNTIME_PLAIN=1`` sets it at
    start. Code choosing an AVX-512 kernel reads ``kernels.HAS_VNNI`` (or a flag derived from it)."""
    global HAS_VNNI
    HAS_VNNI = HOST_VNNI and not flag
    from . import kernels  # the layers read ``kernels.HAS_VNNI`` when they are built

    kernels.HAS_VNNI = HAS_VNNI
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith(__package__ + "."):
            continue
        for attr in _DERIVED_FLAGS:
            if not hasattr(mod, attr):
                continue
            if flag:
                _SAVED_FLAGS.setdefault((name, attr), getattr(mod, attr))
                setattr(mod, attr, False)
            elif (name, attr) in _SAVED_FLAGS:
                setattr(mod, attr, _SAVED_FLAGS.pop((name, attr)))


def plain() -> bool:
    """Whether the runtime packs layers without the VNNI kernels (forced, or a CPU without them)."""
    from . import kernels

    return not kernels.HAS_VNNI

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_I1, _F32, _F64 = ir.IntType(1), ir.FloatType(), ir.DoubleType()
_V16I32 = ir.VectorType(_I32, 16)
_V64I8 = ir.VectorType(_I8, 64)
_V16F32 = ir.VectorType(_F32, 16)
_V16F64 = ir.VectorType(_F64, 16)
_V16I1 = ir.VectorType(_I1, 16)
_V16I8 = ir.VectorType(_I8, 16)


def _vpdpbusd(builder: ir.IRBuilder, acc, a, b):
    fnty = ir.FunctionType(_V16I32, [_V16I32, _V64I8, _V64I8])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [acc, a, b])


# epilogue flags of vnni_tile / amx_epilogue
EPI_RELU, EPI_FLOAT, EPI_RESIDUAL, EPI_CODES, EPI_F32 = 1, 2, 4, 8, 16
#: flag combinations with their own branch-free AMX epilogue loop: codes only (float32), a
#: residual block's output (float, codes), the last block (float), a layer feeding a shortcut
STATIC_EPILOGUES = (EPI_RELU | EPI_CODES | EPI_F32, EPI_RELU | EPI_FLOAT | EPI_RESIDUAL | EPI_CODES,
                    EPI_RELU | EPI_FLOAT | EPI_RESIDUAL, EPI_RELU | EPI_FLOAT | EPI_CODES)


def branch_on_flags(builder: ir.IRBuilder, flags, rows, name: str) -> None:
    """Emit ``rows(static)`` once per :data:`STATIC_EPILOGUES` value, each in a block entered when
    ``flags`` (an integer LLVM value) equals it, and ``rows(None)`` (flags read at run time)
    otherwise: the flag combinations of conv nets get loops without branches on the flags."""
    done = builder.function.append_basic_block(f"{name}_done")
    for static in STATIC_EPILOGUES:
        nxt = builder.function.append_basic_block(f"{name}_not_{static}")
        body = builder.function.append_basic_block(f"{name}_{static}")
        builder.cbranch(builder.icmp_unsigned("==", flags, ir.Constant(flags.type, static)), body, nxt)
        builder.position_at_end(body)
        rows(static)
        builder.branch(done)
        builder.position_at_end(nxt)
    rows(None)
    builder.branch(done)
    builder.position_at_end(done)


def _splat(builder: ir.IRBuilder, value, vty: ir.VectorType):
    """``value`` in every lane of the vector type ``vty``."""
    v = builder.insert_element(ir.Constant(vty, None), value, ir.Constant(_I32, 0))
    lanes = ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(v, ir.Constant(vty, None), lanes)


def clip_mult(builder: ir.IRBuilder, y, zero, hi, mult):
    """``min(max(y, 0), hi) * mult`` on float32 vectors (selects, so a NaN gives 0): the next
    layer's code before rounding, as every int8 epilogue computes it."""
    t = builder.select(builder.fcmp_ordered(">", y, zero), y, zero)
    t = builder.select(builder.fcmp_ordered(">", t, hi), hi, t)
    return builder.fmul(t, mult)


def _declare(builder: ir.IRBuilder, name: str, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


class _Epilogue:
    """IR of the int8 epilogue for OB blocks of 16 channels (shared by the VNNI tiles and the AMX
    epilogue): per-layer values (coefficients, masks, flags) are made once by the constructor, in
    the block the caller is in; :meth:`row` emits one output pixel.

    Two paths, bit for bit the same codes:

    - float64 (every flag combination): ``v = s1*D + s0`` (a multiply then an add, no fused
      multiply-add), ``+ res``, ReLU, ``y = float32(v)``, float output and / or the next layer's
      codes ``rint(min(max(y, 0), hi) * mult)`` in float32;
    - float32 (``EPI_F32``, set only for a codes-only epilogue, no float output, no residual):
      ``y = fma(a, D, b)`` with ``a``, ``b`` the float32 roundings of ``s1``, ``s0``, then the same
      code formula. It differs from the float64 ``y`` by a bounded amount, so it can change a code
      only where ``t = min(max(y, 0), hi) * mult`` lies within ``e`` of a half-integer (the bound
      per channel, :func:`kernels_int8.f32_coefficients`, stored as ``lim = 0.5 - e``). A pixel
      with any lane that close is recomputed on the float64 path (rare: ``e`` ~ 1e-5).

    Coefficients: ``s0``, ``s1`` float64 from channel ``c0`` on; ``sf`` float64 holding float32
    values, 48 per block of 16 channels from ``3*c0`` on: ``a[16], b[16], lim[16]``."""

    def __init__(self, context, builder, OB, s0p, s1p, sfp, ona, fla, qha, qma):
        self.b = builder
        self.OB = OB

        def i64(v):
            return ir.Constant(_I64, v)

        def flag(bit):
            return builder.icmp_unsigned("!=", builder.and_(fla, i64(bit)), i64(0))

        self.f_relu, self.f_float = flag(EPI_RELU), flag(EPI_FLOAT)
        self.f_res, self.f_codes, self.f_32 = flag(EPI_RESIDUAL), flag(EPI_CODES), flag(EPI_F32)
        self.relu_v = _splat(builder, self.f_relu, _V16I1)
        lanes = ir.Constant(_V16I32, list(range(16)))
        self.zf = ir.Constant(_V16F32, [0.0] * 16)
        self.hi_v = _splat(builder, qha, _V16F32)
        self.mult_v = _splat(builder, qma, _V16F32)
        pf = _F32.as_pointer()
        self.mload = _declare(builder, "llvm.masked.load.v16f32.p0", _V16F32, [pf, _I32, _V16I1, _V16F32])
        self.mstore = _declare(builder, "llvm.masked.store.v16f32.p0", ir.VoidType(),
                               [_V16F32, pf, _I32, _V16I1])
        self.mstore8 = _declare(builder, "llvm.masked.store.v16i8.p0", ir.VoidType(),
                                [_V16I8, _I8.as_pointer(), _I32, _V16I1])
        self.rint = _declare(builder, "llvm.rint.v16f32", _V16F32, [_V16F32])
        self.fma = _declare(builder, "llvm.fma.v16f32", _V16F32, [_V16F32, _V16F32, _V16F32])
        self.fabs = _declare(builder, "llvm.fabs.v16f32", _V16F32, [_V16F32])
        self.vmax = _declare(builder, "llvm.x86.avx512.max.ps.512", _V16F32, [_V16F32, _V16F32, _I32])
        self.sc, self.masks, self.f32c = [], [], []
        for b in range(OB):
            v0 = builder.load(builder.bitcast(builder.gep(s0p, [i64(16 * b)]), _V16F64.as_pointer()))
            v1 = builder.load(builder.bitcast(builder.gep(s1p, [i64(16 * b)]), _V16F64.as_pointer()))
            v0.align = v1.align = 8
            self.sc.append((v0, v1))
            cf = []
            for k in range(3):
                ptr = builder.bitcast(builder.gep(sfp, [i64(48 * b + 16 * k)]), _V16F64.as_pointer())
                ld = builder.load(ptr)
                ld.align = 8
                cf.append(builder.fptrunc(ld, _V16F32))  # exact: float32 values
            self.f32c.append(cf)
            lim = builder.trunc(builder.sub(ona, i64(16 * b)), _I32)
            self.masks.append(builder.icmp_signed("<", lanes, _splat(builder, lim, _V16I32)))

    def _codes(self, y):
        return clip_mult(self.b, y, self.zf, self.hi_v, self.mult_v)

    def _when(self, flag, static, bit):
        """A block run when ``flag`` holds: a branch on the runtime flag, or (``static`` flags known
        when the IR is made) the block or nothing."""
        if static is None:
            return self.b.if_then(flag)
        return contextlib.nullcontext() if static & bit else None

    def row(self, ds, optr, rptr, cptr, static: int | None = None):
        """The epilogue of one pixel: ``ds`` the OB int32 sum vectors; ``optr``/``rptr`` float32
        pointers to its output / residual channel ``c0``, ``cptr`` a byte pointer to its codes.
        ``static``: the flags, when they are known while the IR is made (no branches on them)."""
        b = self.b
        i32_1 = ir.Constant(_I32, 1)
        if static is None or static & EPI_F32:
            slow = cgutils.alloca_once_value(b, ir.Constant(_I1, 1))
            with self._when(self.f_32, static, EPI_F32) or contextlib.nullcontext():
                near = None
                for k in range(self.OB):
                    a, c, lim = self.f32c[k]
                    t = self._codes(b.call(self.fma, [a, b.sitofp(ds[k], _V16F32), c]))
                    r = b.call(self.rint, [t])
                    nk = b.and_(b.fcmp_ordered(">=", b.call(self.fabs, [b.fsub(t, r)]), lim), self.masks[k])
                    near = nk if near is None else b.or_(near, nk)
                    ptr = b.gep(cptr, [ir.Constant(_I64, 16 * k)])
                    b.call(self.mstore8, [b.fptoui(r, _V16I8), ptr, i32_1, self.masks[k]])
                i16 = ir.IntType(16)
                b.store(b.icmp_unsigned("!=", b.bitcast(near, i16), ir.Constant(i16, 0)), slow)
            with b.if_then(b.load(slow), likely=False):
                self._float64(ds, optr, rptr, cptr, static)
        else:
            self._float64(ds, optr, rptr, cptr, static)

    def _float64(self, ds, optr, rptr, cptr, static):
        b = self.b
        i32_4, i32_1 = ir.Constant(_I32, 4), ir.Constant(_I32, 1)
        vals = []
        for k in range(self.OB):
            v0, v1 = self.sc[k]
            vals.append(cgutils.alloca_once_value(b, b.fadd(b.fmul(v1, b.sitofp(ds[k], _V16F64)), v0)))
        ctx = self._when(self.f_res, static, EPI_RESIDUAL)
        if ctx is not None:
            with ctx:
                for k in range(self.OB):
                    ptr = b.gep(rptr, [ir.Constant(_I64, 16 * k)])
                    rv = b.call(self.mload, [ptr, i32_4, self.masks[k], self.zf])
                    b.store(b.fadd(b.load(vals[k]), b.fpext(rv, _V16F64)), vals[k])
        ysf = []
        for k in range(self.OB):
            # ReLU after the rounding to float32: the same value (rounding is monotone and keeps
            # the sign); one vmaxps (an x86 intrinsic, which LLVM does not turn back into float64
            # compares)
            y = b.fptrunc(b.load(vals[k]), _V16F32)
            if static is None:
                y = b.select(b.and_(b.fcmp_ordered("<", y, self.zf), self.relu_v), self.zf, y)
            elif static & EPI_RELU:
                y = b.call(self.vmax, [y, self.zf, ir.Constant(_I32, 4)])
            ysf.append(y)
        ctx = self._when(self.f_float, static, EPI_FLOAT)
        if ctx is not None:
            with ctx:
                for k in range(self.OB):
                    ptr = b.gep(optr, [ir.Constant(_I64, 16 * k)])
                    b.call(self.mstore, [ysf[k], ptr, i32_4, self.masks[k]])
        ctx = self._when(self.f_codes, static, EPI_CODES)
        if ctx is not None:
            with ctx:
                for k in range(self.OB):
                    c = b.fptoui(b.call(self.rint, [self._codes(ysf[k])]), _V16I8)
                    b.call(self.mstore8, [c, b.gep(cptr, [ir.Constant(_I64, 16 * k)]), i32_1, self.masks[k]])


def _array_ptr(context, builder, aty, value, ty):
    arr = cgutils.create_struct_proxy(aty)(context, builder, value=value)
    return builder.bitcast(arr.data, ty.as_pointer())


def element_ptr(context, builder, aty, value, index, ty):
    """The address of element ``index`` of the numba array ``value`` (of type ``aty``) as a pointer
    to ``ty`` (a vector type: the vector that starts there)."""
    arr = cgutils.create_struct_proxy(aty)(context, builder, value=value)
    return builder.bitcast(builder.gep(arr.data, [index]), ty.as_pointer())


def vnni_split(R: int, OB: int) -> int:
    """Accumulator sets of a ``vnni_tile(R, OB)``: enough independent chains (>= 16 where at most 4
    sets give them) to keep the multiply ports busy."""
    return min(4, max(1, 16 // (R * OB)))


def vnni_tile(R: int, OB: int):
    """An intrinsic computing R rows x OB*16 output channels of an int8 product and its epilogue::

        tile(x, rows, qoff, nq, w, wbase, s0, s1, sf, c0, nv, on, flags,
             out, orows, res, codes, crows, qhi, qmult)

    Product (exact int32, in S*R*OB zmm registers, ``S = vnni_split(R, OB)`` sets of accumulators
    taking every S-th quad: at most 24 of 32, and R <= 8 keeps the row pointers in
    general registers):

    - ``x`` uint8 (1-d, contiguous): activation codes; ``rows`` int64 (R,): byte offset of each
      row in ``x``; ``qoff`` int64 (>= nq,): byte offset of reduction quad ``i`` relative to a
      row. Quad ``i`` of row ``r`` is the 4 bytes at ``x[rows[r] + qoff[i] :][:4]``; they need
      not be aligned and may run past the valid data (the matching weights are zero) but must
      stay inside ``x``.
    - ``w`` int8 (1-d, contiguous), from byte ``wbase`` on: for each quad ``i`` and block ``b <
      OB`` 64 bytes ``w[o, 4 lanes]`` for the 16 output channels of the block (``o`` major).
    - ``D[r, o] = sum_i sum_l x[rows[r] + qoff[i] + l] * w[i, o, l]`` (``vpdpbusd``).

    Epilogue (:class:`_Epilogue`) for rows ``r < nv`` and channels ``o < on``; ``s0``/``s1``
    float64 need ``c0 + OB*16`` entries, ``sf`` ``3*(c0 + OB*16)``:

    - ``v = s1[c0+o] * D[r, o] + s0[c0+o]``;
    - ``EPI_RESIDUAL``: ``v += res[orows[r] + o]`` (float32 ``res``, the other operand of a
      residual addition);
    - ``EPI_RELU``: ``v = 0`` where ``v < 0``; then ``y = float32(v)``;
    - ``EPI_FLOAT``: ``out[orows[r] + o] = y`` (float32 ``out``);
    - ``EPI_CODES``: ``codes[crows[r] + o] = rint(min(max(y, 0), qhi) * qmult)`` in float32 (the
      fused PACT / DoReFa formula of the next layer's input quantizer; uint8 ``codes``);
    - ``EPI_F32`` (with ``EPI_CODES`` only): the same codes from the float32 path.

    The flag combinations of :data:`STATIC_EPILOGUES` get their own epilogue without branches on
    the flags (:func:`branch_on_flags`).
    """

    @intrinsic
    def tile(typingctx, x, rows, qoff, nq, w, wbase, s0, s1, sf, c0, nv, on, flags, out, orows, res, codes,
             crows, qhi, qmult):
        sig = types.void(x, rows, qoff, nq, w, wbase, s0, s1, sf, c0, nv, on, flags, out, orows, res, codes,
                         crows, qhi, qmult)

        def codegen(context, builder, signature, args):
            (xa, ra, qa, nqa, wa, wb, s0a, s1a, sfa, c0a, nva, ona, fla, oa, ora, rsa, cda, cra, qha,
             qma) = args

            def data(i, v, ty):
                return _array_ptr(context, builder, signature.args[i], v, ty)

            def i64(v):
                return ir.Constant(_I64, v)

            xp = data(0, xa, _I8)
            rp = data(1, ra, _I64)
            qp = data(2, qa, _I64)
            wp = builder.gep(data(4, wa, _I8), [wb])
            bases = [builder.gep(xp, [builder.load(builder.gep(rp, [i64(r)]))]) for r in range(R)]
            zero = ir.Constant(_V16I32, [0] * 16)
            # S sets of accumulators, quad i into set i % S: a vpdpbusd waits ~5 cycles for the one
            # before it on the same register and the core issues two per cycle, so a tile with fewer
            # than ~10 chains waits on them (the one-row tiles had one chain per 16 channels; a
            # 16-channel 3x3 layer's 8 x 1 tile spent 1.2x the time of two sets in its quad loop)
            S = vnni_split(R, OB)
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(S * R * OB)]

            def quad(i, s):
                off = builder.load(builder.gep(qp, [i]))
                wrow = builder.gep(wp, [builder.mul(i, i64(OB * 64))])
                wv = []
                for b in range(OB):
                    ld = builder.load(builder.bitcast(builder.gep(wrow, [i64(b * 64)]), _V64I8.as_pointer()))
                    ld.align = 1
                    wv.append(ld)
                for r in range(R):
                    q = builder.load(builder.bitcast(builder.gep(bases[r], [off]), _I32.as_pointer()))
                    q.align = 1
                    v = builder.bitcast(_splat(builder, q, _V16I32), _V64I8)
                    for b in range(OB):
                        acc = accs[(s * R + r) * OB + b]
                        builder.store(_vpdpbusd(builder, builder.load(acc), v, wv[b]), acc)

            nfull = builder.sdiv(nqa, i64(S)) if S > 1 else nqa
            with cgutils.for_range(builder, nfull) as loop:
                for s in range(S):
                    quad(builder.add(builder.mul(loop.index, i64(S)), i64(s)), s)
            if S > 1:
                with cgutils.for_range(builder, builder.sub(nqa, builder.mul(nfull, i64(S)))) as loop:
                    quad(builder.add(builder.mul(nfull, i64(S)), loop.index), 0)
                for k in range(R * OB):
                    total = builder.load(accs[k])
                    for s in range(1, S):
                        total = builder.add(total, builder.load(accs[s * R * OB + k]))
                    builder.store(total, accs[k])

            # ---- epilogue
            s0p = builder.gep(data(6, s0a, _F64), [c0a])
            s1p = builder.gep(data(7, s1a, _F64), [c0a])
            sfp = builder.gep(data(8, sfa, _F64), [builder.mul(c0a, i64(3))])
            epi = _Epilogue(context, builder, OB, s0p, s1p, sfp, ona, fla, qha, qma)
            op = data(13, oa, _F32)
            orp = data(14, ora, _I64)
            rsp = data(15, rsa, _F32)
            cdp = data(16, cda, _I8)
            crp = data(17, cra, _I64)

            def rows(static):
                for r in range(R):
                    with builder.if_then(builder.icmp_signed("<", i64(r), nva)):
                        orow = builder.load(builder.gep(orp, [i64(r)]))
                        crow = builder.load(builder.gep(crp, [i64(r)]))
                        ds = [builder.load(accs[r * OB + b]) for b in range(OB)]
                        epi.row(ds, builder.gep(op, [orow]), builder.gep(rsp, [orow]),
                                builder.gep(cdp, [crow]), static)

            branch_on_flags(builder, fla, rows, "epi")
            return context.get_dummy_value()

        return sig, codegen

    return tile


def amx_epilogue(NB: int):
    """An intrinsic running the int8 epilogue (:class:`_Epilogue`, as in :func:`vnni_tile`) on
    consecutive rows of AMX accumulators::

        epi(acc, arow, n, orow, crow, step, s0, s1, sf, c0, on, flags, out, res, codes, qhi, qmult)

    ``acc`` int32, rows of NB*16 sums; for ``j < n`` the sums at ``acc[arow + j*NB*16:]``, float
    output and residual at ``orow + j*step``, codes at ``crow + j*step`` (channel ``c0`` of each)."""

    @intrinsic
    def epi(typingctx, acc, arow, n, orow, crow, step, s0, s1, sf, c0, on, flags, out, res, codes, qhi,
            qmult):
        sig = types.void(acc, arow, n, orow, crow, step, s0, s1, sf, c0, on, flags, out, res, codes, qhi,
                         qmult)

        def codegen(context, builder, signature, args):
            (aca, ara, na, ora, cra, sta, s0a, s1a, sfa, c0a, ona, fla, oa, rsa, cda, qha, qma) = args

            def data(i, v, ty):
                return _array_ptr(context, builder, signature.args[i], v, ty)

            def i64(v):
                return ir.Constant(_I64, v)

            ap = builder.gep(data(0, aca, _I32), [ara])
            s0p = builder.gep(data(6, s0a, _F64), [c0a])
            s1p = builder.gep(data(7, s1a, _F64), [c0a])
            sfp = builder.gep(data(8, sfa, _F64), [builder.mul(c0a, i64(3))])
            epi = _Epilogue(context, builder, NB, s0p, s1p, sfp, ona, fla, qha, qma)
            op = builder.gep(data(12, oa, _F32), [ora])
            rsp = builder.gep(data(13, rsa, _F32), [ora])
            cdp = builder.gep(data(14, cda, _I8), [cra])
            def rows(static):
                with cgutils.for_range(builder, na) as loop:
                    j = loop.index
                    a = builder.gep(ap, [builder.mul(j, i64(NB * 16))])
                    ds = []
                    for b in range(NB):
                        ptr = builder.bitcast(builder.gep(a, [i64(16 * b)]), _V16I32.as_pointer())
                        ld = builder.load(ptr)
                        ld.align = 4
                        ds.append(ld)
                    o = builder.mul(j, sta)
                    epi.row(ds, builder.gep(op, [o]), builder.gep(rsp, [o]), builder.gep(cdp, [o]), static)

            branch_on_flags(builder, fla, rows, "epi")
            return context.get_dummy_value()

        return sig, codegen

    return epi


amx_epilogue_1 = amx_epilogue(1)
amx_epilogue_2 = amx_epilogue(2)
amx_epilogue_3 = amx_epilogue(3)
amx_epilogue_4 = amx_epilogue(4)


# rows of the tile used for OB blocks of 16 output channels (index OB = 1..4)
VNNI_TILES = (0, 8, 8, 8, 6)
vnni_tile_1 = vnni_tile(VNNI_TILES[1], 1)
vnni_tile_2 = vnni_tile(VNNI_TILES[2], 2)
vnni_tile_3 = vnni_tile(VNNI_TILES[3], 3)
vnni_tile_4 = vnni_tile(VNNI_TILES[4], 4)
# one-row tiles (a Linear layer at batch 1: the R-row tiles would compute R - 1 rows for nothing)
vnni_row_1 = vnni_tile(1, 1)
vnni_row_2 = vnni_tile(1, 2)
vnni_row_3 = vnni_tile(1, 3)
vnni_row_4 = vnni_tile(1, 4)
