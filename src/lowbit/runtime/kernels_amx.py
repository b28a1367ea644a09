"""Many-row Linear layers on int8 expanded from the weights' 1/2/4-bit fields one L1 slice at a
time: on AMX tiles, or on CPUs with AVX-512 VNNI but no AMX on VNNI register tiles.

Math. Activation codes ``a[m, r]`` in ``[0, 2**ka)`` (``ka <= 8``), integer weights
``w_int[o, r]`` in int8 (the folded weights of ``layers.fold_integers``: +-1 for binary, -1/0/+1
for ternary, the odd levels ``2i - 15`` of DoReFa 4-bit) and per-channel float64 coefficients::

    D[m, o] = sum_r a[m, r] * w_int[o, r]             (exact: int32 tile accumulators)
    y[m, o] = s1[o] * D[m, o] + s0[o]                (float64, a multiply then an add; optional ReLU)

with ``s1 = sw*sx*(bn scale)*unit`` and ``s0 = beta - s1*ma*sum_r w_int[o, r]``
(:func:`amx_coeffs`, as ``layers.py``'s ``coeffs8``); ``y`` is stored as float32.

Weights. A layer keeps only the few-row GEMV's fields (``kernels_gemv``: ``f = q + off`` of
``b`` = 1, 2 or 4 bits, 16 outputs x 4 reduction indices per 64-byte vector, quad ``t`` of a group
in bits ``[b*t, b*t + b)`` of each byte). That byte order is the row order of ``tdpbusd``'s second
operand (a K x 16 tile of signed bytes stored as K/4 rows of 16 outputs x 4 bytes), so one B tile
(64 reduction indices x 16 outputs) is ``16 / T`` field vectors (``T = 8/b``), and row ``t`` of a
vector is ``tab[(v >> b*t) & (2**b - 1)]``: a shift, a mask and a ``vpshufb`` lookup of the
16-entry table ``tab[f] = w_int`` of the field (:func:`field_table`). The B tiles of a group of
2 (or, for a single row block, 4) blocks of 16 output channels are expanded like that one
reduction slice at a time (:data:`SLICE_KIB` KiB: 8 chunks of 64 for 32 channels) into a
buffer that stays in L1, and every row block of the batch accumulates against the slice (its
int32 sums parked in memory between slices). So each weight byte is read once per call at ``b``
bits and the int8 form exists only for the slice in flight: no int8 copy of the layer is held.
Expanding into L1 measured half the time of expanding a whole 4096-deep panel into L2 (0.25
against 0.5 ms for all of a binary 4096x4096 layer, one thread).

Activations are quantized (the fused clip formula ``rint(clip(x, 0, hi) * mult)`` in float32,
or given codes) straight into the tile layout (:func:`amx_rows_reference`): 16 rows x 64 bytes
per tile, tile ``(i, k)`` (rows ``16i..``, reduction ``64k..``) at byte ``(i*nk + k)*1024``, so a
tile load reads 1 KiB contiguously (rows of a 4096-byte stride would all fall into one L1 set)
and rows / reduction indices past the end are zero codes (they add nothing to ``D``).

The quantization is one vector pass (``_codes64``: 64 codes per call, 0.16 ms for 256 x 4096
floats where the scalar numba loop took 0.66 ms).

Products (``_tiles``, registers as ``_amx.amx_block``): 2 x 2 accumulator tiles (32 rows x 32
channels) for 32 rows or more, 1 x 4 (16 rows x 64 channels) for one row block. Threads split the
channel groups (``parallel_for``; the epilogue's runs are formed within each thread's groups, so
a layer of one run still splits); each thread configures its tiles and releases them at the end.

Epilogue (:func:`_epilogue`). The int32 sums of a run of groups (:data:`EPI_CHANNELS` = 256
channels, :func:`epilogue_groups`) stay parked, each group's as ``Mp`` rows of 32 (64) int32,
then the conv executor's per-tile epilogue (``_jit.amx_epilogue``: the float64 ``s1*D + s0`` of
``_jit._Epilogue``, coefficients loaded once per call, masked stores for ragged channels) runs
per 16 rows and group, so each output row receives the run's 1 KiB at once. Before, one
``_amx.epilogue_row`` call per output row and group of 32 channels wrote a column strip of 128
bytes per row, rows 16 KiB apart, group after group. At 256 rows the epilogue is mostly the
writing of a 4 MiB float32 output that no cache holds, not arithmetic: alone it takes about as
long either way (``benchmarks/results/profile_amx_linear.md``, "epilogue"), but inside the call
the runs made a 4096x4096 layer 1.04-1.13x as fast at 256 rows, 0.97-1.15x at 64 and equal at
16 (one interleaved run on the loaded machine; with one group per epilogue call the runs' gain
at 256 rows is lost, 1.10-1.15x slower: ``ab_amx_epilogue.md``). Tried in development and not
kept: non-temporal stores for the rows of a run (no faster than plain stores) and panels of 64
channels for the parked sums (256-byte tile rows; the products 10% slower at 64 rows).

Codes for the next layer. With ``codes`` the epilogue also (or only) writes the next layer's
activation codes, its fused formula applied to the float32 output (``_jit._Epilogue``'s
``EPI_CODES``), row-major or (``tiles=True``, :func:`code_tiles`) straight into that layer's tile
layout, which :func:`amx_linear_tiles` then runs from without a row pass of its own: a 4096x4096
layer plus the next layer's row quantization took 1.09-1.11x less time that way at 256 rows,
1.00-1.06x at 64 and 16 (``benchmarks/results/ab_amx_epilogue_chain.md``; one run on the loaded
machine). ``PackedLinear`` uses it where the compiler links a Linear layer to the next one
(``compiler._link_tiles``: ``layers.TileTarget``, ``layers.CodeTiles``).

Alignment. Every buffer a tile is loaded from or stored to (the row codes, the expanded slice,
the parked sums) starts on a 64-byte cache line (:func:`aligned_u8`); NumPy and numba give
16- or 32-byte alignment depending on the size and the heap's state, and a tile whose 64-byte
rows straddle two lines each loads far slower: the 2 x 2 step (2 A + 2 B tile loads per 4
``tdpbusd``) on L1-resident tiles ran 2.40 TMAC/s aligned against 0.81-0.94 at offsets of 16,
32, 48 bytes, and 4 products with no loads 2.32 (one thread, side by side). The same kernel
with its buffers aligned ran 1.24-1.71x as fast as left to chance at 16-256 rows of a binary
4096x4096 layer (``benchmarks/results/profile_amx_linear.md`` has the parts and the tile-unit
rates). A blocking that keeps the 2 x 2 sums in tiles over the whole reduction (B tiles of a
32-channel group expanded into a 4096-deep panel, re-read from L2 by every later row block) was
tried and measured slower once both were aligned (0.63x at 16 rows, 0.75-0.95x at 32-256): its
expansion into the L2-sized panel took 0.6 ms per layer against 0.25 into the L1 slice, and A
and B tiles both streaming from L2 ran 1.2-1.6 TMAC/s against 2.0 with the B tiles in L1.

VNNI register tiles (:func:`_vnni_tile`, CPUs without AMX: :func:`backend`). The same expanded
slice, parked sums and epilogue; the products are ``vpdpbusd`` on zmm registers: 6 rows x 4 blocks
of 16 channels (24 accumulators), per reduction quad 4 loads of the slice's rows (16 channels x 4
weights each), one broadcast of each row's 4 codes and 24 ``vpdpbusd``. The slices are 32 KiB
(:data:`VNNI_SLICE_KIB`: 512 reduction indices of 64 channels); in development 4x4, 5x4, 7x3, 8x3
and 12x2 tiles and 16 or 64 KiB slices ran slower. It is also the faster many-row path for
ternary weights on such a CPU: their lookup tables (``kernels_gemm``) need one ``vpermb`` per 128
multiply-adds, and where ``vpermb`` issues once per cycle while ``vpdpbusd`` (64 each) issues
twice, int8 does the same 128 per cycle without building tables, so beyond a few dozen rows the
tables lose (:data:`VNNI_MIN_ROWS_LUT`); binary tables (256 per ``vpermb``) stay faster. The issue
rates: ``benchmarks/results/no_amx/issue_rates.md``; the kernels side by side:
``benchmarks/results/no_amx/ab_vnni_linear.md``.

``PackedLinear`` dispatches here (:func:`backend`: ``_amx.amx_enabled()``, else AVX-512 VNNI unless
``LOWBIT_RUNTIME_VNNI_LINEAR=0``) from :func:`min_rows` rows on and keeps its other kernels
elsewhere (the plain path has neither).
:func:`amx_linear_reference` is the NumPy reference (exact int64 ``D``, the same float64
epilogue), :func:`expand_reference` the B tiles the kernel builds.

The idea of multiplying tiles of low-bit weights unpacked on the fly follows what GEMM libraries
for weight-only quantization do on AMX (unpack a weight panel into a small buffer, then run
the int8 tiles over it); the field layout and the table lookup are this runtime's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._amx import (
    _VOID,
    HOST_AMX,
    _fn,
    _i8c,
    _ptr,
    amx_config,
    amx_enabled,
    amx_release,
    amx_tile_config,
)
from ._jit import (
    _V16I32,
    _V64I8,
    EPI_CODES,
    EPI_FLOAT,
    EPI_RELU,
    HOST_VNNI,
    _vpdpbusd,
    amx_epilogue_2,
    amx_epilogue_4,
    kernel,
)
from ._llvm_args import Args, broadcast_quad, i64, load_as, offset_pointers, store_as
from .kernels_gemv import GemvWeights, unpack_fields
from .kernels_threads import parallel_for, use_parallel

#: PackedLinear runs this many rows and more on AMX tiles (fewer: the GEMV on the same fields)
AMX_MIN_ROWS = 8
#: ... unless the layer has lookup tables (``kernels_gemm``; key: bits per weight code), which
#: are faster below these rows (PackedLinear 4096x4096 with 4-bit PACT codes, one thread, two
#: interleaved runs on the loaded test machine, CPU time of the tables over that of AMX with
#: aligned tiles: binary weights 0.88-0.95 at 8 rows, 1.11 at 12, 1.21-1.25 at 16; ternary
#: 1.19-1.25 at 8, 1.64 at 12)
AMX_MIN_ROWS_LUT = {1: 12, 2: 8}
#: on CPUs with AVX-512 VNNI but no AMX the same expanded slices run on VNNI register tiles
#: (:func:`_vnni_tile`) from this many rows, ...
VNNI_MIN_ROWS = 8
#: ... or, where the layer has lookup tables, from these: binary tables stay faster at every row
#: count (two lookups per 256 multiply-adds against four ``vpdpbusd``). Ternary ones (2-bit codes)
#: depend on the CPU's issue rates, so :func:`ternary_vnni_rows` measures it once per process: on
#: an Intel Xeon (``vpdpbusd`` issued at 1.9x the rate of ``vpermb``, ``no_amx/issue_rates.md``) a
#: 4096x4096 ternary layer, 4-bit codes, one thread, took tables / VNNI time 0.83 at 16 rows, 1.00
#: at 24, 1.17 at 48, 1.21 at 64, 1.46 at 256 (``benchmarks/results/no_amx/ab_vnni_linear.md``); on
#: an AMD EPYC Zen 4 (1.24x, ``epyc_zen4/issue_rates.md``: a lookup's 128 products then beat two
#: ``vpdpbusd``) 0.57 at 16, 0.69 at 48 and 64, 0.79 at 256: the tables win at every row count
#: (``benchmarks/results/epyc_zen4/ab_vnni_linear.md``)
VNNI_MIN_ROWS_LUT = {1: 1 << 40}  # (1 << 40: never); 2: ternary_vnni_rows()
#: a row count no batch reaches: "never" in the tables above
NEVER_ROWS = 1 << 40
#: the row counts :func:`ternary_vnni_rows` tries, and the margin by which the VNNI tiles must win
TERNARY_PROBE_ROWS, TERNARY_PROBE_MARGIN = (48, 256), 0.9
_ternary_rows: int | None = None
#: ``LOWBIT_RUNTIME_VNNI_LINEAR=0`` keeps many-row Linear layers off the VNNI tiles (CPUs without AMX)
VNNI_LINEAR = os.environ.get("LOWBIT_RUNTIME_VNNI_LINEAR", "1").strip().lower() not in ("0", "false", "no",
                                                                                        "off")


def backend() -> str | None:
    """The tile back end of this module here and now: ``"amx"``, ``"vnni"`` (AVX-512 VNNI without
    AMX, unless switched off) or None (the plain path, or neither)."""
    if amx_enabled():
        return "amx"
    from . import kernels

    return "vnni" if kernels.HAS_VNNI and VNNI_LINEAR else None


def min_rows(cb: int | None) -> int:
    """Rows from which :func:`amx_linear` runs a layer on :func:`backend`: without lookup tables
    (``cb`` None) :data:`AMX_MIN_ROWS` / :data:`VNNI_MIN_ROWS`; with tables on ``cb``-bit codes
    where it beats them (:data:`AMX_MIN_ROWS_LUT` / :data:`VNNI_MIN_ROWS_LUT`; ternary on the VNNI
    tiles: :func:`ternary_vnni_rows`)."""
    tiles = backend()
    if tiles == "amx":
        return AMX_MIN_ROWS if cb is None else AMX_MIN_ROWS_LUT[cb]
    if cb == 2:  # measured, and only where the VNNI tiles can run
        return ternary_vnni_rows() if tiles == "vnni" else NEVER_ROWS
    return VNNI_MIN_ROWS if cb is None else VNNI_MIN_ROWS_LUT[cb]


def ternary_vnni_rows() -> int:
    """Rows from which a ternary layer with lookup tables runs on the VNNI tiles instead (CPUs with
    AVX-512 VNNI, no AMX): ``LOWBIT_RUNTIME_TERNARY_VNNI_ROWS`` (a row count, or ``never``), else
    measured once per process (:func:`_probe_ternary_rows`). Either path gives the same integers,
    so the choice moves only the speed."""
    global _ternary_rows
    if _ternary_rows is None:
        env = os.environ.get("LOWBIT_RUNTIME_TERNARY_VNNI_ROWS", "").strip().lower()
        if env:
            if env == "never":
                _ternary_rows = NEVER_ROWS
            elif env.isdigit() and int(env) > 0:
                _ternary_rows = int(env)
            else:
                raise ValueError(f"LOWBIT_RUNTIME_TERNARY_VNNI_ROWS={env!r}: give a positive row count "
                                 "or 'never'")
        else:
            _ternary_rows = _probe_ternary_rows()
    return _ternary_rows


def ternary_pair(k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, Callable]:
    """A random ternary ``n x k`` layer (ReLU, bias) with both of its many-row products, for
    :func:`_probe_ternary_rows` and the benchmarks: ``(q, s0, s1, run)``, where ``run(x, out, kernel)``
    quantizes ``x`` to 4-bit codes (``clip(x, 0, 3) * 5``, rounded) and writes the layer's output to
    ``out`` with the lookup tables (``kernel="tables"``: those a packed ternary layer holds, the
    base-3 ones of ``kernels_lut3`` unless switched off, else ``kernels_gemm``'s) or the VNNI tiles
    (``"vnni"``); both equal :func:`amx_linear_reference` on those codes."""
    from . import kernels_gemm as KG
    from . import kernels_lut3 as KL3

    rng = np.random.default_rng(seed)
    q = rng.integers(-1, 2, (n, k))
    aw = amx_linear_weights(GemvWeights(q), q, q, 1.0)
    s0, s1 = amx_coeffs(aw, np.ones(n), 0.1, 0.0, np.ones(n), rng.normal(size=n))
    lv, cb = KG.lut_levels(q)
    base3 = KL3.ENABLED
    bias = KL3.lut3_bias(1, 4)  # the 4-bit codes of 3.0 * 5.0
    wq, ssum = KL3.lut3_pack_weights(q, 1) if base3 else (KG.lut_pack_weights(q, lv, cb), None)
    corr = KL3.lut3_offsets(ssum, bias) if base3 else None
    sums = KG.lut_sums(lv, cb, 4)

    def run(x: np.ndarray, out: np.ndarray, kernel: str) -> None:
        if kernel == "tables" and base3:
            KL3.lut3_gemm(KL3.lut3_tables(x, 1, bias, 3.0, 5.0, 0), wq, corr, n, s0, s1, True, out)
        elif kernel == "tables":
            KG.lut_gemm(KG.lut_tables(x, lv, cb, 3.0, 5.0, 0), wq, n, s0, s1, True, out, sums=sums)
        else:
            amx_linear(x, 0, 3.0, 5.0, aw, s0, s1, True, out, vnni=True)

    return q, s0, s1, run


def _probe_ternary_rows(k: int = 2048, n: int = 512, reps: int = 5) -> int:
    """The first of :data:`TERNARY_PROBE_ROWS` at which the VNNI tiles take at most
    :data:`TERNARY_PROBE_MARGIN` of the lookup tables' time on a ternary ``k x n`` layer
    (:func:`ternary_pair`; best of ``reps`` interleaved calls each), else :data:`NEVER_ROWS`.
    It runs when the first ternary layer is packed, a fraction of a second once its kernels are
    compiled; a CPU without VNNI never runs the tiles."""
    from . import kernels

    if not (kernels.HAS_VNNI and HOST_VNNI):
        return NEVER_ROWS
    import time

    *_, run = ternary_pair(k, n)
    rng = np.random.default_rng(1)
    for rows in TERNARY_PROBE_ROWS:
        x = rng.uniform(-1, 3, (rows, k)).astype(np.float32)
        out = np.empty((rows, n), np.float32)
        best = {"tables": float("inf"), "vnni": float("inf")}
        for i in range(reps + 1):  # the first round compiles / warms up and is not counted
            for name in best:
                t = time.perf_counter()
                run(x, out, name)
                if i:
                    best[name] = min(best[name], time.perf_counter() - t)
        if best["vnni"] <= TERNARY_PROBE_MARGIN * best["tables"]:
            return rows
    return NEVER_ROWS


#: below this many multiply-adds (M*K*O) one thread runs the product on the AMX tiles. 8 x 4096^2 =
#: 2**27 ran 0.82x as fast on 2 threads as on 1 on the loaded 2-core test machine; with the polling
#: worker (``kernels_threads.SPIN_US``) the 8-layer 4096-wide ternary MLP at 8 rows split from 2**27
#: ran 1.06x its 1-thread speed in rounds with the second core free (0.99x unsplit) but 0.82x while
#: another process held a core (0.99x unsplit) (benchmarks/speed/ab_thread_scaling.py runs): kept
AMX_MIN_PARALLEL_MACS = 1 << 28
#: the same for the VNNI register tiles (no AMX), slower per product, so that a split pays off
#: sooner: on the AMD EPYC with the second core free the 4096-wide MLP at 8 rows (2**27 per layer)
#: split from 2**24 ran 1.36-1.71x its 1-thread speed, 0.87-1.03x with 2**28
#: (benchmarks/results/epyc_zen4/thread_split_macs.md). Smaller products lose: BERT-256's layers at
#: 128-2048 rows split on 2 threads ran 0.34-0.94x their 1-thread speed at 2**23-2**25
#: multiply-adds, 1.12-1.22x at 2**26, 1.33-1.69x above (epyc_zen4/probe_vnni_split.md)
VNNI_MIN_PARALLEL_MACS = 1 << 26
#: from this many row values (M*K) the row quantization into tiles (:func:`amx_rows`) is split over
#: threads too. On the AMX machine at 2**22 (1024 rows of 4096), 256 rows took 0.3 ms of a 4096x4096
#: layer's ~4.5 serial; on a 2-vCPU machine without AMX the split pass ran 0.57-0.80x at 2**20
#: values, 0.78-1.09x at 2**21, 1.24-1.51x above (benchmarks/results/no_amx/stream_split.md)
AMX_ROWS_MIN_PARALLEL = 1 << 21
#: KiB of B tiles expanded per reduction slice (stays in L1 while every row block reads it; 16
#: measured faster than 32 at 16-64 rows, e.g. 1.0 against 1.6 ms for 64 x 4096^2 binary, and
#: equal at 256)
SLICE_KIB = 16
#: ... and for the VNNI register tiles (4 blocks of 16 channels x 512 reduction indices)
VNNI_SLICE_KIB = 32
#: channels whose int32 sums stay parked (per group of 32 channels, 64 for a single row block)
#: until one epilogue runs over them ...
EPI_CHANNELS = 256
#: ... unless they would take more than this many KiB (then fewer, at least one group)
EPI_ACC_KIB = 512


@dataclass
class AmxLinearWeights:
    """A Linear layer's weights for :func:`amx_linear`: the GEMV fields (shared, not copied) and
    the field -> int8 table, with what the epilogue needs."""

    gw: GemvWeights
    tab: np.ndarray  # (64,) int8: tab[16*lane + f] = w_int of field f (each 128-bit lane)
    unit: float
    wsum: np.ndarray  # (O,) float64: sum_r w_int[o, r]

    @property
    def nbytes(self) -> int:
        """Bytes held besides the GEMV fields (which the layer holds anyway)."""
        return int(self.tab.nbytes + self.wsum.nbytes)

    @property
    def nk(self) -> int:
        """Reduction chunks of 64 bytes."""
        return -(-self.gw.K // 64)


def field_table(fields: np.ndarray, w_int: np.ndarray, b: int) -> np.ndarray | None:
    """The table ``tab[f]`` with ``w_int == tab[fields]`` (64 bytes: the 16 entries in each 128-bit
    lane, as ``vpshufb`` reads them); None where a field maps to two weights or a weight leaves
    int8."""
    f = np.asarray(fields).reshape(-1)
    w = np.asarray(w_int).reshape(-1)
    if w.size and (w.min() < -128 or w.max() > 127):
        return None
    if f.size and (f.min() < 0 or f.max() >= (1 << b)):
        return None
    t = np.zeros(16, np.int64)
    t[f] = w
    if not np.array_equal(t[f], w):
        return None
    return np.tile(t.astype(np.int8), 4)


def amx_linear_weights(gw: GemvWeights, q: np.ndarray, w_int: np.ndarray, unit: float
                       ) -> AmxLinearWeights | None:
    """The AMX form of a layer whose GEMV fields ``gw`` hold the plane integers ``q`` (O, K) and
    whose folded int8 weights are ``w_int = unit``-multiples (:func:`layers.fold_integers`);
    None where the fields do not map one to one onto int8 weights or int32 sums could overflow
    (``K * 255 * max|w_int| >= 2**31``)."""
    tab = field_table(np.asarray(q) + gw.off, w_int, gw.b)
    if tab is None or gw.K * 255 * int(np.abs(tab.astype(np.int64)).max()) >= 2**31:
        return None
    return AmxLinearWeights(gw, tab, float(unit), np.asarray(w_int).sum(axis=1).astype(np.float64))


def amx_coeffs(aw: AmxLinearWeights, sw: np.ndarray, sx: float, ma: float, bn_scale: np.ndarray,
               beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s0, s1) float64 of the epilogue, zero padded to whole blocks of 16 channels plus 64."""
    O = aw.gw.O
    width = -(-O // 16) * 16 + 64
    alpha = sw * sx * bn_scale * aw.unit
    s0 = np.zeros(width, np.float64)
    s1 = np.zeros(width, np.float64)
    s1[:O] = alpha
    s0[:O] = beta - alpha * ma * aw.wsum
    return s0, s1


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------


def amx_linear_reference(codes: np.ndarray, w_int: np.ndarray, s0: np.ndarray, s1: np.ndarray,
                         relu: bool = False) -> np.ndarray:
    """NumPy reference of :func:`amx_linear`: codes (M, K), w_int (O, K) integers; exact int64
    ``D = codes @ w_int.T``, then ``y = s1*D + s0`` in float64, ReLU, float32."""
    O = np.asarray(w_int).shape[0]
    D = np.asarray(codes).astype(np.int64) @ np.asarray(w_int).astype(np.int64).T
    y = np.asarray(s1)[:O] * D + np.asarray(s0)[:O]
    return (np.maximum(y, 0.0) if relu else y).astype(np.float32)


def amx_rows_reference(codes: np.ndarray, nk: int) -> np.ndarray:
    """The tile layout of codes (M, K) (uint8, flat): ``((i*nk + k)*16 + r)*64 + c`` holds
    ``codes[16i + r, 64k + c]``, zero past M rows and K columns."""
    c = np.asarray(codes)
    M, K = c.shape
    Mp = -(-M // 16) * 16
    p = np.zeros((Mp, nk * 64), np.uint8)
    p[:M, :K] = c
    return np.ascontiguousarray(p.reshape(Mp // 16, 16, nk, 64).transpose(0, 2, 1, 3)).reshape(-1)


def expand_reference(aw: AmxLinearWeights) -> np.ndarray:
    """The B tiles of every block of 16 channels (int8, (nbt, nk, 16, 64)): row ``q`` of tile
    ``(b, k)``, byte ``4*o + t``, is ``w_int[16b + o, 64k + 4q + t]`` (``tab[0]`` past K within
    the fields' padding of 32, zero past it, ``tab[0]`` past O)."""
    gw = aw.gw
    nbt, nk = -(-gw.O // 16), aw.nk
    f = np.zeros((nbt * 16, -(-gw.K // 32) * 32), np.int64)
    f[: gw.O, : gw.K] = unpack_fields(gw.w, gw.b, gw.O, gw.K)
    w = aw.tab[:16][f]
    full = np.zeros((nbt * 16, nk * 64), np.int8)
    full[:, : w.shape[1]] = w
    return np.ascontiguousarray(full.reshape(nbt, 16, nk, 16, 4).transpose(0, 2, 3, 1, 4)).reshape(
        nbt, nk, 16, 64)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------

_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _expand(b: int):
    """Intrinsic ``expand(w, woff, ngv, tab, dst, doff)``: the B tile (16 rows of 64 bytes at byte
    ``doff`` of ``dst``) of the ``16 / T`` field vectors at byte ``woff`` of ``w`` (``T = 8/b``);
    vectors ``>= ngv`` (past the fields' reduction) give zero rows."""
    T = 8 // b
    G = 16 // T

    @intrinsic
    def expand(typingctx, w, woff, ngv, tab, dst, doff):
        sig = types.void(w, woff, ngv, tab, dst, doff)

        def codegen(context, builder, signature, args):
            if not HOST_VNNI:  # AVX-512 BW: every CPU that runs either tile back end
                return context.get_dummy_value()
            wa, woa, nga, ta, da, doa = args
            sg = signature.args

            def data(i, v):
                arr = cgutils.create_struct_proxy(sg[i])(context, builder, value=v)
                return builder.bitcast(arr.data, _I8.as_pointer())

            def vec(p, off):
                return builder.bitcast(builder.gep(p, [ir.Constant(_I64, off)]), _V64I8.as_pointer())

            wp = builder.gep(data(0, wa), [woa])
            dp = builder.gep(data(4, da), [doa])
            tv = builder.load(vec(data(3, ta), 0))
            tv.align = 1
            mask = ir.Constant(_V64I8, [(1 << b) - 1] * 64)
            zero = ir.Constant(_V64I8, [0] * 64)
            fnty = ir.FunctionType(_V64I8, [_V64I8, _V64I8])
            pshufb = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.pshuf.b.512")
            for g in range(G):
                valid = builder.icmp_signed("<", ir.Constant(_I64, g), nga)
                with builder.if_else(valid) as (then, otherwise):
                    with then:
                        v = builder.load(vec(wp, 64 * g))
                        v.align = 1
                        for t in range(T):
                            s = builder.lshr(v, ir.Constant(_V64I8, [b * t] * 64)) if t else v
                            row = builder.call(pshufb, [tv, builder.and_(s, mask)])
                            st = builder.store(row, vec(dp, 64 * (g * T + t)))
                            st.align = 1
                    with otherwise:
                        for t in range(T):
                            st = builder.store(zero, vec(dp, 64 * (g * T + t)))
                            st.align = 1
            return context.get_dummy_value()

        return sig, codegen

    return expand


_expand1, _expand2, _expand4 = _expand(1), _expand(2), _expand(4)


@intrinsic
def _codes64(typingctx, x, xoff, mode, hi, mult, dst, doff):
    """64 codes of the float32 ``x[xoff:xoff + 64]`` to ``dst[doff:]`` (uint8): mode 0
    ``rint(min(max(x, 0), hi) * mult)`` in float32 (the fused quantizer, as the scalar kernels:
    a compare-select clip, a multiply, round half to even), mode 1 the values as they are."""
    sig = types.void(x, xoff, mode, hi, mult, dst, doff)

    def codegen(context, builder, signature, args):  # generic vector IR: compiles on any CPU
        xa, xoa, ma, ha, mua, da, doa = args
        sg = signature.args
        xp = builder.gep(_ptr(context, builder, sg[0], xa, _F32), [xoa])
        dp = builder.gep(_ptr(context, builder, sg[5], da, _I8), [doa])
        v16 = ir.VectorType(_F32, 16)

        def splat(v):
            u = builder.insert_element(ir.Constant(v16, None), v, ir.Constant(_I32, 0))
            return builder.shuffle_vector(u, ir.Constant(v16, None), ir.Constant(_V16I32, [0] * 16))

        zero, hv, mv = ir.Constant(v16, [0.0] * 16), splat(ha), splat(mua)
        rint = _fn(builder, "llvm.rint.v16f32", v16, [v16])
        clip = builder.icmp_signed("==", ma, ir.Constant(ma.type, 0))
        for j in range(4):
            ld = builder.load(builder.bitcast(builder.gep(xp, [ir.Constant(_I64, 16 * j)]), v16.as_pointer()))
            ld.align = 4
            t = builder.select(builder.fcmp_ordered(">", ld, zero), ld, zero)
            t = builder.select(builder.fcmp_ordered("<", t, hv), t, hv)
            q = builder.call(rint, [builder.fmul(t, mv)])
            c = builder.fptoui(builder.select(clip, q, ld), ir.VectorType(_I8, 16))
            st = builder.store(c, builder.bitcast(builder.gep(dp, [ir.Constant(_I64, 16 * j)]),
                                                  ir.VectorType(_I8, 16).as_pointer()))
            st.align = 1
        return context.get_dummy_value()

    return sig, codegen


@kernel
def _amx_rows_range(x, mode, hi, mult, nk, xq, m_lo, m_hi):
    """Rows m_lo..m_hi (of the padded row count) of ``x`` (M, K) float32 (contiguous) into the
    tile layout ``xq``: mode 0 quantizes with ``rint(min(max(x, 0), hi) * mult)`` in float32, mode
    1 takes the values as codes; rows >= M and columns >= K get code 0."""
    M, K = x.shape
    xf = x.reshape(-1)
    for m in range(m_lo, m_hi):
        i = m // 16
        r = m - 16 * i
        for k in range(nk):
            d0 = ((i * nk + k) * 16 + r) * 64
            k0 = 64 * k
            if m < M and k0 + 64 <= K:
                _codes64(xf, m * K + k0, mode, hi, mult, xq, d0)
                continue
            dst = xq[d0 : d0 + 64]
            dst[:] = 0
            if m < M:
                for c in range(K - k0):
                    t = xf[m * K + k0 + c]
                    if mode == 0:
                        t = np.rint(min(max(t, np.float32(0.0)), hi) * mult)
                    dst[c] = np.uint8(t)


@kernel
def _amx_rows_u8_range(x, nk, xq, m_lo, m_hi):
    """:func:`_amx_rows_range` for uint8 codes (a producer's ``Codes``)."""
    M, K = x.shape
    for m in range(m_lo, m_hi):
        i = m // 16
        r = m - 16 * i
        for k in range(nk):
            d0 = ((i * nk + k) * 16 + r) * 64
            dst = xq[d0 : d0 + 64]
            k0 = 64 * k
            n = min(64, K - k0) if m < M else 0
            for c in range(n):
                dst[c] = x[m, k0 + c]
            for c in range(n, 64):
                dst[c] = 0


def _tiles(MB: int, NB: int):
    """Intrinsic ``tiles(x, abase, aoff, nks, w, kstride, acc, aco, cstride, resume)``: MB x NB
    accumulator tiles ``C[m, n] (+)= sum_{k < nks} A[m, k] @ B[k, n]``. ``A[m, k]`` is the 16 x 64
    uint8 tile at byte ``abase[m] + aoff + 1024*k`` of ``x`` (rows 64 bytes apart), ``B[k, n]`` the
    int8 VNNI tile at byte ``k*kstride + 1024*n`` of ``w``; ``C`` (MB*16 rows of NB*16 int32, rows
    ``cstride`` bytes apart) starts at ``acc[aco:]``: loaded first when ``resume`` (else zero),
    stored at the end. Registers as
    ``_amx.amx_block``: C in tmm0-3, A in tmm4 (and tmm5 for MB >= 2), B in tmm6-7, or tmm5-7 for
    NB >= 3 (the configuration ``amx_tile_config(64, 4)``)."""
    if MB * NB > 4 or MB < 1 or NB < 1 or (NB >= 3 and MB > 1):
        raise ValueError("MB*NB <= 4 accumulator tiles, NB >= 3 only with MB == 1")

    @intrinsic
    def tiles(typingctx, x, abase, aoff, nks, w, kstride, acc, aco, cstride, resume):
        sig = types.void(x, abase, aoff, nks, w, kstride, acc, aco, cstride, resume)

        def codegen(context, builder, signature, args):
            if not HOST_AMX:
                return context.get_dummy_value()
            xa, ba, aoa, nka, wa, ksa, aca, acoa, csa, rsa = args
            sg = signature.args
            xp = builder.gep(_ptr(context, builder, sg[0], xa, _I8), [aoa])
            bp = _ptr(context, builder, sg[1], ba, _I64)
            wp = _ptr(context, builder, sg[4], wa, _I8)
            c4 = builder.mul(acoa, ir.Constant(_I64, 4))
            cp = builder.gep(_ptr(context, builder, sg[6], aca, _I8), [c4])
            load = _fn(builder, "llvm.x86.tileloadd64", _VOID, [_I8, _I8.as_pointer(), _I64])
            store = _fn(builder, "llvm.x86.tilestored64", _VOID, [_I8, _I8.as_pointer(), _I64])
            zero = _fn(builder, "llvm.x86.tilezero", _VOID, [_I8])
            dp = _fn(builder, "llvm.x86.tdpbusd", _VOID, [_I8, _I8, _I8])
            pf = _fn(builder, "llvm.prefetch.p0", _VOID, [_I8.as_pointer(), _I32, _I32, _I32])
            row = csa

            def i32(v):
                return ir.Constant(_I32, v)

            stride = ir.Constant(_I64, 64)

            def ctile(m, n):
                return builder.gep(cp, [builder.add(builder.mul(csa, ir.Constant(_I64, 16 * m)),
                                                    ir.Constant(_I64, 64 * n))])

            resume = builder.icmp_signed("!=", rsa, ir.Constant(rsa.type, 0))
            with builder.if_else(resume) as (then, otherwise):
                with then:
                    for m in range(MB):
                        for n in range(NB):
                            builder.call(load, [_i8c(m * NB + n), ctile(m, n), row])
                with otherwise:
                    for t in range(MB * NB):
                        builder.call(zero, [_i8c(t)])
            bases = [builder.gep(xp, [builder.load(builder.gep(bp, [ir.Constant(_I64, m)]))])
                     for m in range(MB)]
            with cgutils.for_range(builder, nka) as loop:
                k = loop.index
                ko = builder.mul(k, ir.Constant(_I64, 1024))
                wk = builder.gep(wp, [builder.mul(k, ksa)])

                def bt(n):
                    return builder.gep(wk, [ir.Constant(_I64, 1024 * n)])

                for m in range(MB):  # the next step's A tiles into L1 (measured ~10% at 64-256 rows)
                    nxt = builder.gep(bases[m], [builder.add(ko, ir.Constant(_I64, 1024))])
                    for line in range(16):
                        ptr = builder.gep(nxt, [ir.Constant(_I64, 64 * line)])
                        builder.call(pf, [ptr, i32(0), i32(3), i32(1)])  # read, to L1, data
                if MB == 2 and NB == 2:  # loads spread between the products
                    builder.call(load, [_i8c(4), builder.gep(bases[0], [ko]), stride])
                    builder.call(load, [_i8c(6), bt(0), stride])
                    builder.call(dp, [_i8c(0), _i8c(4), _i8c(6)])
                    builder.call(load, [_i8c(7), bt(1), stride])
                    builder.call(dp, [_i8c(1), _i8c(4), _i8c(7)])
                    builder.call(load, [_i8c(5), builder.gep(bases[1], [ko]), stride])
                    builder.call(dp, [_i8c(3), _i8c(5), _i8c(7)])
                    builder.call(dp, [_i8c(2), _i8c(5), _i8c(6)])
                elif NB <= 2:
                    for n in range(NB):
                        builder.call(load, [_i8c(6 + n), bt(n), stride])
                    for m in range(MB):
                        builder.call(load, [_i8c(4 + m % 2), builder.gep(bases[m], [ko]), stride])
                        for n in range(NB):
                            builder.call(dp, [_i8c(m * NB + n), _i8c(4 + m % 2), _i8c(6 + n)])
                else:  # one A tile against 3-4 B tiles rotating over tmm5-7
                    builder.call(load, [_i8c(4), builder.gep(bases[0], [ko]), stride])
                    for n in range(NB):
                        builder.call(load, [_i8c(5 + n % 3), bt(n), stride])
                        builder.call(dp, [_i8c(n), _i8c(4), _i8c(5 + n % 3)])
            for m in range(MB):
                for n in range(NB):
                    builder.call(store, [_i8c(m * NB + n), ctile(m, n), row])
            return context.get_dummy_value()

        return sig, codegen

    return tiles


_t2x2, _t4x1, _t1x1 = _tiles(2, 2), _tiles(4, 1), _tiles(1, 1)
_t1x2, _t1x3, _t1x4 = _tiles(1, 2), _tiles(1, 3), _tiles(1, 4)

#: rows of a VNNI register tile (x 4 blocks of 16 channels: 24 of the 32 zmm registers hold sums)
VNNI_R = 6


def _vnni_tile(NB: int):
    """Intrinsic ``vtile(x, abase, aoff, nks, w, kstride, acc, arow, resume)``: the VNNI register
    tile of the CPUs without AMX over the same operands as :func:`_tiles`: :data:`VNNI_R` rows x NB
    blocks of 16 channels, ``C[r, n] (+)= sum_{k < nks} sum_q A_r[k, q] . B[k, n][q]`` where
    ``A_r[k, q]`` is the quad (4 codes) at byte ``abase[r] + aoff + 1024*k + 4*q`` of ``x`` (row r
    in the tile layout) and ``B[k, n][q]`` the 64-byte row ``q`` (16 channels x 4) of the expanded
    tile at byte ``k*kstride + 1024*n`` of ``w``: one ``vpdpbusd`` per row and block, the quad
    broadcast to every channel. ``C`` row r (NB*16 int32) at element ``arow[r]`` of ``acc``:
    loaded first when ``resume`` (else zero), stored at the end. Rows repeated in ``abase`` /
    ``arow`` (a last tile of fewer rows) compute and store the same sums twice."""
    R = VNNI_R

    @intrinsic
    def vtile(typingctx, x, abase, aoff, nks, w, kstride, acc, arow, resume):
        sig = types.void(x, abase, aoff, nks, w, kstride, acc, arow, resume)

        def codegen(context, builder, signature, args):
            if not HOST_VNNI:
                return context.get_dummy_value()
            a = Args(context, builder, signature, args)
            rows = offset_pointers(builder, a.ptr(0, _I8, args[2]), a.ptr(1, _I64), R)
            wp = a.ptr(4, _I8)
            cps = offset_pointers(builder, a.ptr(6, _I32), a.ptr(7, _I64), R)
            zero = ir.Constant(_V16I32, [0] * 16)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(NB)] for _ in range(R)]
            with builder.if_then(builder.icmp_signed("!=", args[8], ir.Constant(args[8].type, 0))):
                for r in range(R):
                    for n in range(NB):
                        builder.store(load_as(builder, cps[r], _V16I32, i64(16 * n), 4), accs[r][n])
            with cgutils.for_range(builder, args[3]) as kloop:  # reduction chunks of 64
                k = kloop.index
                wk = builder.gep(wp, [builder.mul(k, args[5])])
                ko = builder.mul(k, i64(1024))
                with cgutils.for_range(builder, i64(16)) as qloop:  # quads of a chunk
                    q = qloop.index
                    ws = [load_as(builder, wk, _V64I8, builder.add(builder.mul(q, i64(64)), i64(1024 * n)))
                          for n in range(NB)]
                    xo = builder.add(ko, builder.mul(q, i64(4)))
                    for r in range(R):
                        xv = broadcast_quad(builder, rows[r], xo)
                        for n in range(NB):
                            c = accs[r][n]
                            builder.store(_vpdpbusd(builder, builder.load(c), xv, ws[n]), c)
            for r in range(R):
                for n in range(NB):
                    store_as(builder, builder.load(accs[r][n]), cps[r], i64(16 * n), 4)
            return context.get_dummy_value()

        return sig, codegen

    return vtile


_v1, _v2, _v3, _v4 = _vnni_tile(1), _vnni_tile(2), _vnni_tile(3), _vnni_tile(4)


@kernel
def aligned_u8(n):
    """``n`` bytes starting on a 64-byte cache line, so that no 64-byte tile row straddles two
    lines (see the module docstring: misaligned tiles ran the products at less than half speed)."""
    raw = np.empty(n + 64, np.uint8)
    off = (64 - raw.ctypes.data % 64) % 64
    return raw[off : off + n]


@kernel
def _epilogue(acc, Mp, M, NBmax, c_s, nch, s0, s1, sf, flags, out, O, codes, nkc, qhi, qmult):
    """Outputs of channels ``c_s .. c_s + nch`` (a run of groups of ``NBmax`` blocks of 16) from their
    sums, parked per group (group ``g`` of the run: ``Mp`` rows of ``NBmax*16`` int32 at
    ``acc[g*Mp*NBmax*16:]``): per 16 rows, the ``_jit.amx_epilogue`` of each group (coefficients
    loaded once per call, no per-row dispatch), so each output row gets the run's channels at once.
    Float outputs and / or codes (``flags``) at the same offsets of ``out`` and ``codes``, or (``nkc``
    > 0, codes only) the codes in the tile layout of :func:`amx_rows` for ``nkc`` chunks of 64."""
    W = NBmax * 16
    for r0 in range(0, M, 16):
        nr = min(16, M - r0)
        for g in range((nch + W - 1) // W):
            c0 = c_s + W * g
            a0 = (g * Mp + r0) * W
            o = r0 * O + c0
            co = o
            step = O
            if nkc > 0:  # rows r0.. of chunk c0 // 64 (a group never straddles two chunks)
                co = ((r0 // 16) * nkc + c0 // 64) * 1024 + c0 % 64
                step = 64
            if NBmax == 4:
                amx_epilogue_4(acc, a0, nr, o, co, step, s0, s1, sf, c0, c_s + nch - c0, flags, out, out,
                               codes, qhi, qmult)
            else:
                amx_epilogue_2(acc, a0, nr, o, co, step, s0, s1, sf, c0, c_s + nch - c0, flags, out, out,
                               codes, qhi, qmult)


@kernel
def _amx_linear_range(xq, nk, Mp, M, w, b, nG, tab, cfg, NBmax, KS, S, s0, s1, sf, flags, out, O, codes, nkc,
                      qhi, qmult, vnni, g_lo, g_hi):
    """Channel groups g_lo..g_hi (``NBmax`` blocks of 16 each) of :func:`amx_linear` for all rows:
    per slice of ``KS`` reduction chunks the group's B tiles are expanded into an L1-sized buffer
    and every row block accumulates against them (int32 sums parked in ``acc`` between slices).
    The sums of ``S`` consecutive groups stay parked, then go through :func:`_epilogue` together.
    ``vnni``: the products on VNNI registers (:func:`_vnni_tile`, :data:`VNNI_R` rows at a time)
    instead of AMX tiles (no tile configuration)."""
    nbt = (O + 15) // 16
    T = 8 // b
    G = 16 // T
    nmb = Mp // 16
    acc = aligned_u8(S * Mp * NBmax * 64).view(np.int32)
    abase = np.empty(4, np.int64)
    buf = aligned_u8(KS * NBmax * 1024)
    arow = np.empty(VNNI_R, np.int64)
    vbase = np.empty(VNNI_R, np.int64)
    if not vnni:
        amx_config(cfg)
    for sg in range(g_lo, g_hi, S):
        sg_hi = min(sg + S, g_hi)
        for grp in range(sg, sg_hi):
            b0 = grp * NBmax
            NB = min(NBmax, nbt - b0)
            kstride = NB * 1024
            cbase = (grp - sg) * Mp * NBmax * 16  # the group's sums: rows of NBmax*16 int32
            for k0 in range(0, nk, KS):
                nks = min(KS, nk - k0)
                for n in range(NB):  # B tile of chunk k0 + kk, block n at byte (kk*NB + n)*1024
                    wblk = (b0 + n) * nG * 64
                    for kk in range(nks):
                        k = k0 + kk
                        ngv = min(G, nG - k * G)
                        woff = wblk + k * G * 64
                        doff = (kk * NB + n) * 1024
                        if b == 1:
                            _expand1(w, woff, ngv, tab, buf, doff)
                        elif b == 2:
                            _expand2(w, woff, ngv, tab, buf, doff)
                        else:
                            _expand4(w, woff, ngv, tab, buf, doff)
                resume = k0 > 0
                aoff = k0 * 1024
                if vnni:
                    for m0 in range(0, M, VNNI_R):
                        for r in range(VNNI_R):
                            m = min(m0 + r, M - 1)
                            vbase[r] = ((m // 16) * nk * 16 + m % 16) * 64
                            arow[r] = cbase + m * NBmax * 16
                        if NB == 4:
                            _v4(xq, vbase, aoff, nks, buf, kstride, acc, arow, resume)
                        elif NB == 3:
                            _v3(xq, vbase, aoff, nks, buf, kstride, acc, arow, resume)
                        elif NB == 2:
                            _v2(xq, vbase, aoff, nks, buf, kstride, acc, arow, resume)
                        else:
                            _v1(xq, vbase, aoff, nks, buf, kstride, acc, arow, resume)
                    continue
                i = 0
                while i < nmb:
                    if NB == 2 and nmb - i >= 2:
                        MB = 2
                    elif NB == 1 and nmb - i >= 4:
                        MB = 4
                    else:
                        MB = 1
                    for m in range(MB):
                        abase[m] = (i + m) * nk * 1024
                    aco = cbase + i * 16 * NBmax * 16
                    if MB == 2:
                        _t2x2(xq, abase, aoff, nks, buf, kstride, acc, aco, NBmax * 64, resume)
                    elif MB == 4:
                        _t4x1(xq, abase, aoff, nks, buf, kstride, acc, aco, NBmax * 64, resume)
                    elif NB == 1:
                        _t1x1(xq, abase, aoff, nks, buf, kstride, acc, aco, NBmax * 64, resume)
                    elif NB == 2:
                        _t1x2(xq, abase, aoff, nks, buf, kstride, acc, aco, NBmax * 64, resume)
                    elif NB == 3:
                        _t1x3(xq, abase, aoff, nks, buf, kstride, acc, aco, NBmax * 64, resume)
                    else:
                        _t1x4(xq, abase, aoff, nks, buf, kstride, acc, aco, NBmax * 64, resume)
                    i += MB
        c_s = sg * NBmax * 16
        nch = min(sg_hi * NBmax * 16, O) - c_s
        _epilogue(acc, Mp, M, NBmax, c_s, nch, s0, s1, sf, flags, out, O, codes, nkc, qhi, qmult)
    if not vnni:
        amx_release()


def amx_rows(x: np.ndarray, mode: int = 1, hi: float = 0.0, mult: float = 0.0) -> np.ndarray:
    """Codes of ``x`` (M, K) (float32, or integer codes with mode 1) in the tile layout
    (:func:`amx_rows_reference`)."""
    M, K = x.shape
    nk = -(-K // 64)
    Mp = -(-M // 16) * 16
    xq = aligned_u8(Mp * nk * 64)
    par = use_parallel(M * K, AMX_ROWS_MIN_PARALLEL)
    if x.dtype == np.uint8:
        parallel_for(_amx_rows_u8_range, Mp, x, np.int64(nk), xq, parallel=par, grain=16)
        return xq
    x = np.ascontiguousarray(x, dtype=np.float32)
    parallel_for(_amx_rows_range, Mp, x, np.int64(mode), np.float32(hi), np.float32(mult), np.int64(nk), xq,
                 parallel=par, grain=16)
    return xq


_CFG_2X2 = amx_tile_config(64, 2)
_CFG_1X4 = amx_tile_config(64, 4)
_ZEROS: list[np.ndarray] = [np.zeros(0)]


def _zeros(n: int) -> np.ndarray:
    """At least ``n`` float64 zeros, shared (only read): the epilogue's float32 coefficients, which
    the float output does not use."""
    z = _ZEROS[0]
    if z.size < n:
        z = np.zeros(max(n, 2 * z.size))
        _ZEROS[0] = z
    return z


def epilogue_groups(Mp: int, NBmax: int) -> int:
    """Groups of ``NBmax`` blocks of 16 channels whose sums (``Mp`` rows) one epilogue call takes:
    :data:`EPI_CHANNELS` channels, fewer where they would exceed :data:`EPI_ACC_KIB`, at least one."""
    return max(1, min(EPI_CHANNELS, (EPI_ACC_KIB << 10) // (4 * Mp)) // (16 * NBmax))


def amx_linear(x: np.ndarray, mode: int, hi: float, mult: float, aw: AmxLinearWeights, s0: np.ndarray,
               s1: np.ndarray, relu: bool, out: np.ndarray | None, codes: np.ndarray | None = None,
               qhi: float = 0.0, qmult: float = 0.0, tiles: bool = False, vnni: bool | None = None
               ) -> np.ndarray:
    """``out`` (M, O) float32 = ``s1*D + s0`` (ReLU) of the module docstring for rows ``x`` (M, K):
    float32 quantized with ``rint(clip(x, 0, hi) * mult)`` (mode 0) or codes (mode 1, any integer
    or float dtype). ``s0``, ``s1`` float64 from :func:`amx_coeffs` (at least ``O`` rounded up to
    64 entries). With ``codes`` the epilogue also writes the next layer's codes of ``y =
    float32(out)``, ``rint(min(max(y, 0), qhi) * qmult)`` in float32 (the fused formula that layer
    would apply to ``out``): uint8, C order, M*O or more entries, or with ``tiles`` the tile layout
    of :func:`amx_rows` (a :func:`code_tiles` buffer, ``out`` None) for the next layer's
    :func:`amx_linear_tiles`; ``out`` may then be None. Returns ``out``, or ``codes`` without it.
    Needs ``_amx.amx_enabled()``."""
    if x.shape[1] != aw.gw.K:
        raise ValueError(f"amx_linear: rows {x.shape} for a {aw.gw.O}x{aw.gw.K} layer")
    return amx_linear_tiles(amx_rows(x, mode, hi, mult), x.shape[0], aw, s0, s1, relu, out, codes, qhi, qmult,
                            tiles, vnni)


def code_tiles(M: int, K: int) -> np.ndarray:
    """A zeroed buffer for the codes of M rows of K in the tile layout of :func:`amx_rows` (its
    padding stays zero: rows past M and columns past K add nothing to the next product)."""
    n = -(-M // 16) * 16 * -(-K // 64) * 64
    t = aligned_u8(n)
    t[:] = 0
    return t


def amx_linear_tiles(xq: np.ndarray, M: int, aw: AmxLinearWeights, s0: np.ndarray, s1: np.ndarray, relu: bool,
                     out: np.ndarray | None, codes: np.ndarray | None = None, qhi: float = 0.0,
                     qmult: float = 0.0, tiles: bool = False, vnni: bool | None = None) -> np.ndarray:
    """:func:`amx_linear` of M rows already in the tile layout (:func:`amx_rows`, or a producer's
    :func:`code_tiles` written by its epilogue); ``tiles``: write ``codes`` (from :func:`code_tiles`,
    ``out`` None) in that layout for the next layer's :func:`amx_linear_tiles`. ``vnni``: the
    products on VNNI registers (default: where AMX is not enabled)."""
    gw = aw.gw
    if out is None and codes is None:
        raise ValueError("amx_linear: nothing to write (out and codes are None)")
    Mp = -(-M // 16) * 16
    if xq.dtype != np.uint8 or xq.size < Mp * aw.nk * 64:
        raise ValueError(f"amx_linear: row tiles {xq.dtype} of {xq.size}; uint8, {Mp * aw.nk * 64} for "
                         f"{M} rows")
    if out is not None and out.shape != (M, gw.O):
        raise ValueError(f"amx_linear: out {out.shape} for {M} rows of a {gw.O}x{gw.K} layer")
    width = -(-gw.O // 64) * 64
    if s0.size < width or s1.size < width or s0.dtype != np.float64 or s1.dtype != np.float64:
        raise ValueError(f"amx_linear: coefficients s0 {s0.shape} {s0.dtype} / s1 {s1.shape} {s1.dtype}; "
                         f"float64 with at least {width} entries (amx_coeffs) for {gw.O} outputs")
    if out is not None and not out.flags.c_contiguous:
        raise ValueError("amx_linear: out must be C-contiguous")
    nkc = width // 64 if tiles else 0
    if codes is not None:
        need = Mp * width if tiles else M * gw.O
        if codes.dtype != np.uint8 or not codes.flags.c_contiguous or codes.size < need:
            raise ValueError(f"amx_linear: codes {codes.dtype} of {codes.size}; uint8, C order, at least "
                             f"{need} ({'code_tiles' if tiles else 'M*O'})")
    if tiles and (codes is None or out is not None):
        raise ValueError("amx_linear: code tiles are written alone (codes given, out None)")
    if vnni is None:
        vnni = backend() != "amx"
    if vnni and not HOST_VNNI:
        raise RuntimeError("amx_linear: neither AMX-INT8 nor AVX-512 VNNI on this CPU")
    NBmax = 4 if Mp == 16 or vnni else 2
    cfg = _CFG_1X4 if NBmax == 4 else _CFG_2X2
    KS = (VNNI_SLICE_KIB if vnni else SLICE_KIB) // NBmax
    nbt = -(-gw.O // 16)
    S = epilogue_groups(Mp, NBmax)
    flags = EPI_RELU if relu else 0
    flags |= (EPI_FLOAT if out is not None else 0) | (EPI_CODES if codes is not None else 0)
    fo = out.reshape(-1) if out is not None else np.empty(0, np.float32)
    co = codes.reshape(-1) if codes is not None else np.empty(0, np.uint8)
    parallel_for(_amx_linear_range, -(-nbt // NBmax), xq, np.int64(aw.nk), np.int64(Mp), np.int64(M), gw.w,
                 np.int64(gw.b), np.int64(gw.nG), aw.tab, cfg, np.int64(NBmax), np.int64(KS),
                 np.int64(S), s0, s1, _zeros(3 * width), np.int64(flags), fo, np.int64(gw.O), co,
                 np.int64(nkc), np.float32(qhi), np.float32(qmult), bool(vnni),
                 parallel=use_parallel(M * gw.K * gw.O, VNNI_MIN_PARALLEL_MACS if vnni else
                                       AMX_MIN_PARALLEL_MACS))
    return out if out is not None else codes
