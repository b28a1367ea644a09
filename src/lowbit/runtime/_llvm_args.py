"""The argument side of the runtime's hand-written LLVM tiles (``kernels_gemv``, ``kernels_tq1``,
``kernels_gemm``): array data pointers, int64 constants, the pointers of a tile's rows and output
blocks, and unaligned vector loads and stores.

A numba intrinsic's ``codegen`` receives its arguments as LLVM values: an array is numba's array
struct (``cgutils.create_struct_proxy``), whose ``data`` member is the pointer the tiles read
(``_jit._array_ptr``); integers are i64. A tile then addresses R rows and OB blocks either at a
fixed stride from a start (``start + j*step``: :func:`strided`) or through an int64 array of
offsets (:func:`offset_pointers`); vectors are loaded and stored at any alignment (:func:`load_as`,
:func:`store_as`). These helpers emit exactly the instructions the tiles wrote
inline before, in the same order, so the machine code and the results are unchanged.
"""

from __future__ import annotations

from llvmlite import ir

from ._jit import _I32, _I64, _V16I32, _V64I8, _array_ptr, _splat


def i64(v: int) -> ir.Constant:
    """An i64 constant."""
    return ir.Constant(_I64, v)


class Args:
    """An intrinsic's arguments inside ``codegen``: ``args[i]`` the LLVM value of argument ``i``,
    :meth:`ptr` the data pointer of array argument ``i``."""

    def __init__(self, context, builder: ir.IRBuilder, signature, args) -> None:
        self.context, self.builder, self.signature, self.args = context, builder, signature, args

    def __getitem__(self, i: int):
        return self.args[i]

    def ptr(self, i: int, ty: ir.Type, at=None):
        """The data of array argument ``i`` as a ``ty`` pointer, ``at`` elements on (an i64 value)."""
        p = _array_ptr(self.context, self.builder, self.signature.args[i], self.args[i], ty)
        return p if at is None else self.builder.gep(p, [at])


def strided(builder: ir.IRBuilder, base, start, step, n: int) -> list:
    """Pointers ``base + start + j*step`` for ``j < n`` (i64 element offsets; ``start`` None: 0)."""
    out = []
    for j in range(n):
        off = builder.mul(step, i64(j))
        out.append(builder.gep(base, [off if start is None else builder.add(start, off)]))
    return out


def offset_pointers(builder: ir.IRBuilder, base, offsets, n: int) -> list:
    """Pointers ``base + offsets[j]`` for ``j < n`` (``offsets`` an i64 pointer)."""
    return [builder.gep(base, [builder.load(builder.gep(offsets, [i64(j)]))]) for j in range(n)]


def load_as(builder: ir.IRBuilder, ptr, ty: ir.Type, at=None, align: int = 1):
    """The ``ty`` value (a vector or a scalar) at ``ptr``, ``at`` elements of ``ptr``'s own type on,
    ``align`` bytes aligned."""
    p = ptr if at is None else builder.gep(ptr, [at])
    ld = builder.load(builder.bitcast(p, ty.as_pointer()))
    ld.align = align
    return ld


def store_as(builder: ir.IRBuilder, value, ptr, at=None, align: int = 1) -> None:
    """Store ``value`` at ``ptr`` (``at`` elements of ``ptr``'s own type on), ``align`` bytes aligned."""
    p = ptr if at is None else builder.gep(ptr, [at])
    st = builder.store(value, builder.bitcast(p, value.type.as_pointer()))
    st.align = align


def broadcast_quad(builder: ir.IRBuilder, ptr, at):
    """The 4 bytes at ``ptr + at`` (any alignment) repeated over a 64-byte vector: the broadcast
    operand of ``vpdpbusd``."""
    s = load_as(builder, ptr, _I32, at)
    return builder.bitcast(_splat(builder, s, _V16I32), _V64I8)

