"""Packed low-bit kernels (numba): bit-serial popcount products of k-bit activation codes with
weights given as a few bit planes, and int8 dot-product convolutions (AVX-512 VNNI).

Notation (one layer, one group):

- activation codes ``a[m, r]`` in ``[0, 2**ka)`` for row ``m`` (a sample, or an output pixel of a
  convolution after im2col) and reduction index ``r`` (``K`` of them); the activation value is
  ``sx * (a - ma)``.
- weights ``w[o, r] = sw[o] * (l0 + u * sum_j g_j * bit_j[o, r])`` with ``J`` bit planes
  ``bit_j`` and integer plane coefficients ``g_j = (-1)**neg_j * 2**shift_j``: binary weights are
  one plane (``l0=-1, u=2``: ``w = sw*(2*bit - 1)``), ternary weights two planes ``+``/``-``
  (``l0=0``), ``k``-bit uniform weights the ``k`` bit planes of their code.
- the integer products computed by the kernels are exact (int64)::

      D[m, o] = sum_j g_j sum_b 2**b popcount(W_j[o] & X_b[m])   = sum_r (sum_j g_j bit_j[o,r]) a[m,r]
      A[m]    = sum_r a[m, r]

  and the float epilogue gives ``y = s1[o]*D + s2[o]*A + s0[o]`` (then an optional ReLU), with
  ``s1 = alpha*u``, ``s2 = alpha*l0``, ``s0 = beta - alpha*ma*(l0*K + u*C[o])``,
  ``alpha = sw*sx*(bn scale)``, ``C[o] = sum_r sum_j g_j bit_j[o, r]`` (see ``layers.py``).

Bits are packed along the reduction dimension into uint64 words: element ``r`` is bit ``r % 64``
of word ``r // 64``; padding bits are zero in both operands.

Two layouts:

- *rows* (``X[m, b, i]``): for few rows (a Linear layer at batch 1). The inner loop runs over the
  words of one weight row and one activation row and vectorises to ``vpopcntq``.
- *cols* (``X[b, i, m]``): for many rows (convolutions, large batches). The inner loop runs over
  rows ``m`` with one weight word broadcast, so short reductions (3x3x16 = 144 bits) still
  vectorise.

A third family computes the same product with int8 dot products (AVX-512 VNNI, section "int8
convolution" below): activation codes as uint8 in NHWC order, weights as the integers
``w_int = (l0 + u*sum_j g_j bit_j) / unit`` in int8 (``unit = u`` or ``u/2``: +-1 for binary
weights, -1/0/+1 for ternary, odd levels for DoReFa k-bit), 64 multiply-adds per instruction
whatever the weight bit-width, so ``D = sum_r w_int*a`` and no ``A`` term. For the small-channel
convolutions of LeNet-5 and ResNet-20 it is 5-15x faster than the bit-serial kernels (no bit-plane
packing of the activations, which dominated there, and 4 instead of 4-16 popcount steps per 64
products), and 2-4x faster than oneDNN's FP32 convolution. Its epilogue can add a residual
operand and write the next layer's input codes directly (``vnni_tile`` in ``_jit.py``). The
layers use it wherever the CPU has VNNI and the weights fold; the bit-serial kernels remain for
other CPUs, grouped convolutions and float activations. On CPUs with AMX-INT8 the flat executor
runs the same convolutions on AMX tiles (``_amx.py``).

Linear layers keep their weights at their true width where the arithmetic allows: 1-7 rows run a
GEMV on 1/2/4-bit weight fields unpacked in registers into ``vpdpbusd`` operands
(``kernels_gemv.py``: at batch 1 every weight is read once, so the bytes read are the cost), and
more rows of binary/ternary/2-bit weights a table-lookup GEMM (from 3 / 5 rows on the AVX-512 tiles,
8 on the plain path: ``kernels_gemm.lut_min_rows``; ``kernels_gemm.py``: per
group of weights one ``vpermb`` lookup of precomputed activation sums, then ``vpdpbusd``; symmetric
ternary weights on sign-symmetric base-3 tables, three weights a lookup: ``kernels_lut3.py``). Binary
weights with one-bit codes (W1A1) run every row count on a ``vpopcntq`` GEMM of the two bit planes
(``kernels_popcount.gemm_w1a1``) where the CPU has AVX-512 VPOPCNTDQ and no AMX.

Threads: every kernel is a serial numba function over a range (rows, outputs, images or
tiles) that releases the GIL; :func:`parallel_for` splits the range over the runtime's own
Python worker threads when the work is large. There are no numba ``parallel=True`` (OpenMP)
regions: their idle threads spin, and next to PyTorch's own OpenMP pool two spinning pools
steal each other's cores (on a 2-core machine a 0.1 ms batch-1 model took ~10 ms). The thread
count is numba's (``numba.set_num_threads``, thread-local); worker threads run with one.

Files, one per kernel family (this module re-exports the public functions of the first six):
``kernels_threads.py`` (worker pool, ``parallel_for``), ``kernels_pack.py`` (fused activation
quantization, bit-plane packing, im2col), ``kernels_popcount.py`` (bit-serial GEMMs, rows and
cols layouts; the W1A1 ``vpopcntq`` GEMM), ``kernels_select.py`` (float activations),
``kernels_int8.py`` (VNNI), ``kernels_pool.py`` (max pooling on codes, global average pooling);
``kernels_gemv.py`` (few-row GEMV on weight fields), ``kernels_tq1.py`` (ternary GEMV at 1.6 bits),
``kernels_gemm.py`` (table-lookup GEMM), ``kernels_lut3.py`` (its base-3 form for ternary
weights), ``kernels_lut_conv.py`` (the 4-bit tables' tiles as convolutions on
binary / ternary weights), ``kernels_amx.py`` (many-row Linear layers on AMX
tiles), ``kernels_codes.py`` (signed activation codes) and ``kernels_lanes.py`` (one-channel
convolutions with output pixels in the lanes) are imported from their own files;
``executor.py`` runs a whole packed conv net as one numba call. Tunables (``PARALLEL_MIN_WORK``,
``INT8_MIN_PARALLEL_MACS``, ``GEMV_MAX_ROWS``, ``LUT_MIN_ROWS``) live in, and are read from, their
own file.
"""

from __future__ import annotations

from ._jit import HAS_VNNI as HAS_VNNI  # re-exported: the layers check it here
from .kernels_int8 import (
    INT8_SLACK,
    int8_conv,
    int8_geometry,
    int8_quad_offsets,
    int8_quantize,
    pack_int8_weights,
)
from .kernels_pack import conv_pack, pack_bits, pack_rows, quantize_codes
from .kernels_pool import code_maxpool, global_avgpool
from .kernels_popcount import gemm_cols, gemm_rows
from .kernels_select import select_sum
from .kernels_threads import num_threads, num_words, parallel_for, thread_pool, use_parallel

__all__ = [
    "HAS_VNNI",
    "INT8_SLACK",
    "code_maxpool",
    "conv_pack",
    "gemm_cols",
    "gemm_rows",
    "global_avgpool",
    "int8_conv",
    "int8_geometry",
    "int8_quad_offsets",
    "int8_quantize",
    "num_threads",
    "num_words",
    "pack_bits",
    "pack_int8_weights",
    "pack_rows",
    "parallel_for",
    "quantize_codes",
    "select_sum",
    "thread_pool",
    "use_parallel",
]
