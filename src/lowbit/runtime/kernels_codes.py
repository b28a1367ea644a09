"""Activation codes of a clip formula with a lower clip and a code offset (signed grids):

    code = rint(clip(x, lo, hi) * mult) + offset        float32 ops, stored as uint8

the :class:`~lowbit.quant.base.ActCodesSpec` of a symmetric signed quantizer (signed PACT, LSQ,
uniform: ``lo = -hi``, ``offset = Q``, codes ``0..2Q``). The packed kernels then sum the unsigned
codes exactly and subtract ``offset`` in the float64 epilogue (``sx * (code - ma)`` with
``ma = offset``; see ``layers._PackedBase.coeffs``), so a signed input costs one pass over it, as
an unsigned one does. ``clip_codes_reference`` is the NumPy form the kernel is tested against.
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel
from .kernels_threads import parallel_for, use_parallel


@kernel
def _clip_codes_range(x, lo, hi, mult, offset, out, i_lo, i_hi):
    for i in range(i_lo, i_hi):
        t = min(max(x[i], lo), hi)
        out[i] = np.uint8(np.int32(np.rint(t * mult)) + offset)


def clip_codes_reference(x: np.ndarray, lo: float, hi: float, mult: float, offset: int) -> np.ndarray:
    """NumPy reference of :func:`clip_codes`."""
    t = np.minimum(np.maximum(np.asarray(x, np.float32), np.float32(lo)), np.float32(hi))
    return (np.rint(t * np.float32(mult)).astype(np.int64) + int(offset)).astype(np.uint8)


def clip_codes(x: np.ndarray, lo: float, hi: float, mult: float, offset: int) -> np.ndarray:
    """uint8 codes ``rint(clip(x, lo, hi) * mult) + offset`` of float32 ``x`` (any shape; the result
    has its shape). The caller guarantees ``0 <= code <= 255`` (``offset = -rint(lo * mult)``)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.uint8)
    parallel_for(_clip_codes_range, x.size, x.reshape(-1), np.float32(lo), np.float32(hi), np.float32(mult),
                 np.int32(offset), out.reshape(-1), parallel=use_parallel(x.size * 16), grain=16384)
    return out
