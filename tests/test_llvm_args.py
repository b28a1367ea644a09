"""runtime/_llvm_args.py: the pointers and loads the LLVM tiles build from their arguments, checked
through a small intrinsic against NumPy indexing (strided rows, rows at offsets, unaligned vector
loads and stores, the broadcast of 4 bytes)."""

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from lowbit.runtime._jit import _I8, _I32, _I64, _V16I32
from lowbit.runtime._llvm_args import Args, broadcast_quad, i64, load_as, offset_pointers, store_as, strided


@intrinsic
def _gather(typingctx, x, start, step, offs, out, quads):
    """out[j] = the 16 int32 at byte ``start + j*step`` of x (j < 3), then at byte ``offs[j]``;
    quads[j] = the 4 bytes at byte ``offs[j] + 1`` of x broadcast to 64 bytes."""
    sig = types.void(x, start, step, offs, out, quads)

    def codegen(context, builder, signature, args):
        a = Args(context, builder, signature, args)
        xp = a.ptr(0, _I8)
        op = a.ptr(4, _I32)
        qp = a.ptr(5, _I8)
        ptrs = strided(builder, xp, a[1], a[2], 3) + offset_pointers(builder, xp, a.ptr(3, _I64), 3)
        for j, p in enumerate(ptrs):
            store_as(builder, load_as(builder, p, _V16I32), op, i64(16 * j))
        for j, p in enumerate(ptrs[3:]):
            store_as(builder, broadcast_quad(builder, p, i64(1)), qp, i64(64 * j))
        return context.get_dummy_value()

    return sig, codegen


@njit
def _run(x, start, step, offs, out, quads):
    _gather(x, start, step, offs, out, quads)


def test_pointers_and_loads_match_numpy_indexing():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, 1024).astype(np.uint8)
    start, step = 5, 131  # odd byte offsets: the loads are unaligned
    offs = np.array([17, 0, 900], np.int64)
    out = np.zeros(6 * 16, np.int32)
    quads = np.zeros(3 * 64, np.uint8)
    _run(x, start, step, offs, out, quads)
    at = [start + j * step for j in range(3)] + list(offs)
    want = np.concatenate([x[b : b + 64].view(np.int32) for b in at])
    np.testing.assert_array_equal(out, want)
    want_q = np.concatenate([np.tile(x[b + 1 : b + 5], 16) for b in offs])
    np.testing.assert_array_equal(quads, want_q)


def test_ptr_offset_is_in_elements_of_the_pointer_type():
    """``Args.ptr(i, ty, at)`` moves ``at`` elements of ``ty`` (4 bytes for int32), not bytes."""

    @intrinsic
    def second_word(typingctx, x, out):
        def codegen(context, builder, signature, args):
            a = Args(context, builder, signature, args)
            v = builder.load(a.ptr(0, _I32, i64(1)))
            builder.store(v, a.ptr(1, _I32))
            return context.get_dummy_value()

        return types.void(x, out), codegen

    @njit
    def run(x, out):
        second_word(x, out)

    x = np.array([7, 11, 13], np.int32)
    out = np.zeros(1, np.int32)
    run(x, out)
    assert out[0] == 11
