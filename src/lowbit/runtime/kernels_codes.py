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

MAX_ABS = float(1 << 22)  # |clip * mult| bound: codes far inside int32
#: from this many values the pass is split over threads: a few loads and stores per value, so on a
#: 2-vCPU machine the hand-off to the second thread (0.06-0.2 ms) outweighed the half it takes below
#: about 2M values (0.14-0.73x at 2**16-2**20, 1.09x at 2**21, 1.45-1.55x above,
#: benchmarks/results/no_amx/stream_split.md). Split from 2**17 before, a BERT encoder's Linear
#: inputs at batch 8 and 64 were, and the encoders ran 1.14-1.28x slower on 2 threads than with
#: this threshold (BERT-256; no_amx/thread_scaling_stream.md)
CLIP_MIN_PARALLEL = 1 << 21


@kernel
def _clip_codes_range(x, lo, hi, mult, offset, out, i_lo, i_hi):
    # slices: the loop index is provably non-negative (no wrap-around select), so the loop
    # vectorises (measured 10x faster on 64k values than indexing x[i] from i_lo)
    xs = x[i_lo:i_hi]
    os = out[i_lo:i_hi]
    for i in range(xs.size):
        t = xs[i]
        t = lo if t < lo else t
        t = hi if t > hi else t
        os[i] = np.uint8(np.int32(np.rint(t * mult)) + offset)


def clip_codes_reference(x: np.ndarray, lo: float, hi: float, mult: float, offset: int) -> np.ndarray:
    """NumPy reference of :func:`clip_codes`."""
    t = np.minimum(np.maximum(np.asarray(x, np.float32), np.float32(lo)), np.float32(hi))
    return (np.rint(t * np.float32(mult)).astype(np.int64) + int(offset)).astype(np.uint8)


def clip_args(lo: float, hi: float, mult: float, offset: int) -> tuple:
    """The kernel's typed scalars (a layer keeps them: making numpy scalars costs ~1 us each)."""
    if not max(abs(lo), abs(hi)) * abs(mult) < MAX_ABS:
        raise ValueError(f"clip_codes: |clip * mult| must stay below 2**22, got lo={lo}, hi={hi}, "
                         f"mult={mult}")
    return np.float32(lo), np.float32(hi), np.float32(mult), np.int32(offset)


def clip_codes(x: np.ndarray, lo: float, hi: float, mult: float, offset: int, args: tuple | None = None
               ) -> np.ndarray:
    """uint8 codes ``rint(clip(x, lo, hi) * mult) + offset`` of float32 ``x`` (any shape; the result
    has its shape). The caller guarantees ``0 <= code <= 255`` (``offset = -rint(lo * mult)``);
    ``args``: :func:`clip_args` of the same values, made once."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.uint8)
    lo_, hi_, mult_, off_ = args or clip_args(lo, hi, mult, offset)
    n = x.size
    if use_parallel(n, CLIP_MIN_PARALLEL):
        parallel_for(_clip_codes_range, n, x.reshape(-1), lo_, hi_, mult_, off_, out.reshape(-1), grain=16384)
    else:  # (a direct call: a layer at batch 1 runs this 24 times per transformer call)
        _clip_codes_range(x.reshape(-1), lo_, hi_, mult_, off_, out.reshape(-1), 0, n)
    return out
