"""Packed inference layers: a quantized Linear / Conv2d turned into bit planes plus a float
epilogue (per-output-channel scale, bias, folded batch norm, optional ReLU).

Weight side (``decompose_weight``): the encoded weight ``levels[codes] * scale`` is rewritten as
``sw[o] * (l0 + u * sum_j g_j bit_j)`` with integer plane coefficients ``g_j = +-2**shift_j``:

- two levels (binary, DoReFa 1-bit):     one plane ``codes == 1``, ``l0 = levels[0]``,
  ``u = levels[1] - levels[0]``  (``w = sw*(2*bit - 1)`` for +-1)
- a codebook with 0 and two more levels that are +-2**e multiples of one unit (TWN's -1, 0, +1):
  ``+`` and ``-`` masks, ``l0 = 0``
- uniform levels ``l0 + d*i`` (DoReFa k-bit): the bit planes of the code, ``g_j = 2**j``, ``u = d``
- anything else: not packable, the layer runs in PyTorch.

Activation side (``ActSpec``): the layer's input quantizer gives codes with values
``sx * (code - ma)``. A quantizer whose ``runtime_codes_spec()`` gives its formula (PACT, DoReFa:
``rint(clip(x, 0, hi) * mult)`` in float32; checked against ``encode`` at compile time when there
is an example input) is computed inside the packing kernel; a signed grid's formula
(``rint(clip(x, -hi, hi) * mult) + Q``: signed PACT, LSQ, uniform) by one pass of
``kernels_codes.clip_codes`` before the kernel, the offset ``ma = Q`` taken out in the epilogue;
other quantizers with uniform levels go through ``encode`` at every call; a layer without input
quantizer takes float activations (sums of selected inputs, no multiplications).

Kernels: convolutions use the int8 kernels (``Int8Weights``: the weight folded into int8) where
the CPU has AVX-512 VNNI, the input is quantized and the convolution is not grouped; they read
and write NHWC (float outputs are channels-last tensors) and, linked by ``compile()``, hand
:class:`Codes` to the next layer instead of float tensors. Linear layers dispatch by rows
(:class:`PackedLinear`: the GEMV on 1/2/4-bit weight fields, or 8-bit ones for 5-8 bit weights,
for few rows; AMX tiles, lookup tables or the int8 kernel for more). Everything else runs on the
bit-serial kernels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..export.packed import encode_weight, is_hf_conv1d, torch_type_name
from ..nn.quantize import input_quantizer, weight_quantizer
from ..quant.base import ActivationQuantizer, Encoded
from . import _amx
from . import kernels as K
from . import kernels_amx as KA
from . import kernels_codes as KC
from . import kernels_gemm as KG
from . import kernels_gemv as KV
from . import kernels_int8 as KI
from . import kernels_lut3 as KL3
from . import kernels_lut_conv as KL
from . import kernels_popcount as KP
from . import kernels_tq1 as KT
from ._amx import amx_enabled

log = logging.getLogger(__name__)

# Linear layers with at most this many rows use the rows layout; more rows use the cols layout
ROWS_MAX = 8
# ... unless the int8 kernel is available: bit-serial rows for a single row (a GEMV reads every
# weight once: 1-4 bit planes are 2-8x less memory than int8) and while rows x weight planes x
# activation bits stay within this budget (measured on the MLP 4096x4096 and LeNet-5: binary
# weights up to 3 rows; from 2 rows on int8 wins for ternary and 4-bit weights)
ROWS_INT8_BUDGET = 12
# Linear layers with a table-lookup form and at least this many weights leave the flat executor
LUT_FLAT_MAX = 1 << 18


class NotPackableError(ValueError):
    """The layer cannot run on the packed kernels (it then runs in PyTorch)."""


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------


@dataclass
class WeightPlanes:
    W: np.ndarray  # (G, Og, J, Kw) uint64 bit planes
    shift: np.ndarray  # (J,) int64
    neg: np.ndarray  # (J,) bool
    l0: float
    u: float
    sw: np.ndarray  # (O,) float64 per-output-channel scale
    C: np.ndarray  # (O,) int64: sum_r sum_j g_j bit_j[o, r]
    K: int  # reduction length per group
    kind: str  # 'binary' | 'ternary' | 'uniform'
    bits: int

    @property
    def num_planes(self) -> int:
        return int(self.W.shape[2])

    @property
    def packed_bytes(self) -> int:
        return int(self.W.nbytes)


def _is_pow2(v: float) -> tuple[bool, int]:
    a = abs(v)
    if a < 0.5:
        return False, 0
    e = round(math.log2(a))
    return abs(a - 2.0**e) <= 1e-9 * a, int(e)


def decompose_weight(enc: Encoded, groups: int = 1) -> WeightPlanes:
    """Bit-plane form of an encoded weight of shape (O, Cin/groups, ...) or (O, K)."""
    if enc.branches:
        raise NotPackableError("residual (multi-branch) weight encodings are not packed")
    codes = enc.codes.detach().cpu().long().numpy()
    O = codes.shape[0]
    codes = codes.reshape(O, -1)
    Kred = codes.shape[1]
    lv = enc.levels.detach().cpu().double().numpy().reshape(-1)
    L = lv.size
    scale = enc.scale.detach().cpu().double()
    if scale.numel() == 1:
        sw = np.full(O, float(scale.reshape(())), np.float64)
    elif scale.numel() == O:
        sw = scale.reshape(O).numpy().copy()
    else:
        raise NotPackableError(
            f"weight scale of shape {tuple(enc.scale.shape)} is neither per tensor nor per channel"
        )
    if codes.size and (codes.min() < 0 or codes.max() >= L):
        raise NotPackableError("weight codes outside the codebook")
    tol = 1e-6 * max(1.0, float(np.abs(lv).max()) if L else 1.0)
    planes: list[np.ndarray] = []
    shifts: list[int] = []
    negs: list[bool] = []
    kind = ""
    l0 = 0.0
    u = 1.0
    nz = [i for i in range(L) if abs(lv[i]) > tol]
    if L == 2:
        kind, l0, u = "binary", float(lv[0]), float(lv[1] - lv[0])
        planes, shifts, negs = [codes == 1], [0], [False]
    elif L == 3 and len(nz) == 2:
        unit = min(abs(lv[i]) for i in nz)
        ok = True
        for i in nz:
            p2, e = _is_pow2(lv[i] / unit)
            ok = ok and p2
            planes.append(codes == i)
            shifts.append(e)
            negs.append(bool(lv[i] < 0))
        if not ok:
            raise NotPackableError(f"ternary levels {lv.tolist()} are not +-2**e multiples of one unit")
        kind, l0, u = "ternary", 0.0, float(unit)
    elif L >= 2:
        d = (lv[-1] - lv[0]) / (L - 1)
        if abs(d) <= tol or np.abs(lv - (lv[0] + d * np.arange(L))).max() > tol:
            raise NotPackableError(f"weight levels {lv.tolist()} are not uniform")
        J = max(1, int(L - 1).bit_length())
        kind, l0, u = "uniform", float(lv[0]), float(d)
        for j in range(J):
            planes.append(((codes >> j) & 1).astype(bool))
            shifts.append(j)
            negs.append(False)
    else:
        raise NotPackableError("a weight codebook with a single level")
    bits = np.stack(planes, axis=1)  # (O, J, Kred)
    g = np.array([(-1 if n else 1) * (1 << s) for s, n in zip(shifts, negs, strict=True)], np.int64)
    C = (bits.astype(np.int64) * g[None, :, None]).sum(axis=(1, 2))
    Og = O // groups
    Wp = K.pack_bits(bits).reshape(groups, Og, len(planes), -1)
    return WeightPlanes(
        W=np.ascontiguousarray(Wp),
        shift=np.array(shifts, np.int64),
        neg=np.array(negs, np.bool_),
        l0=l0,
        u=u,
        sw=sw,
        C=C,
        K=Kred,
        kind=kind,
        bits=int(enc.bits),
    )


def plane_integers(wp: WeightPlanes) -> np.ndarray:
    """The integer weight ``q[o, r] = sum_j g_j bit_j[o, r]`` of every group, (G*Og, K) int32."""
    G, Og, J, _ = wp.W.shape
    bits = np.unpackbits(wp.W.view(np.uint8), axis=-1, bitorder="little")[..., : wp.K]
    q = np.zeros((G * Og, wp.K), np.int32)
    for j in range(J):
        g = (-1 if wp.neg[j] else 1) * (1 << int(wp.shift[j]))
        q += g * bits[:, :, j, :].reshape(G * Og, wp.K).astype(np.int32)
    return q


@dataclass
class Int8Weights:
    """Weights for the int8 (VNNI) kernels: ``w = sw[o] * unit * w_int[o, r]`` with ``w_int`` in
    int8, packed by :func:`~lowbit.runtime.kernels.pack_int8_weights`."""

    w: np.ndarray  # int8, flat
    passes: np.ndarray  # (P, 3) int64: blocks, first channel, byte offset
    geom: np.ndarray  # (nq, 3) int64 reduction quads
    unit: float
    wsum: np.ndarray  # (O,) float64: sum_r w_int[o, r]
    width: int  # output channels padded to whole blocks of 16

    @property
    def nbytes(self) -> int:
        return int(self.w.nbytes)

    def qoff(self, Wp: int, C: int) -> np.ndarray:
        """Byte offsets of the quads for a padded input of width ``Wp`` (cached)."""
        cache = self.__dict__.setdefault("_qoff", {})
        q = cache.get((Wp, C))
        if q is None:
            if len(cache) > 32:
                cache.clear()
            q = cache[(Wp, C)] = K.int8_quad_offsets(self.geom, Wp, C)
        return q


def int8_weights(wp: WeightPlanes, kshape: tuple[int, int, int], dilation: tuple[int, int] = (1, 1),
                 split: bool = False) -> Int8Weights | None:
    """Fold ``l0 + u*q`` into an int8 weight ``unit * w_int`` (``unit = u`` or ``u/2``, so that
    ``l0/unit`` is an integer: binary +-1, ternary, DoReFa's odd levels ``2i - (2**k - 1)``).

    ``kshape`` is (KH, KW, C) of the reduction (``(1, 1, K)`` for a Linear layer). Returns None
    when the weights are grouped, the levels do not fold or ``w_int`` does not fit int8 (with
    ``split``: a few int8 parts, ``kernels_int8.int8_parts``, as DoReFa's 8-bit levels need)."""
    folded = fold_integers(wp)
    if folded is None:
        return None
    w_int, unit = folded
    parts = KI.int8_parts(w_int)
    if parts == 0 or (parts > 1 and not split):
        return None
    KH, KW, C = kshape
    O = w_int.shape[0]
    w, passes = K.pack_int8_weights(w_int.reshape(O, KH, KW, C), dilation[1])
    return Int8Weights(
        w=w, passes=passes, geom=K.int8_geometry(KH, KW, C, dilation[0], dilation[1], parts), unit=unit,
        wsum=w_int.sum(axis=1).astype(np.float64), width=16 * int(passes[:, 0].sum()),
    )


def fold_integers(wp: WeightPlanes, q: np.ndarray | None = None) -> tuple[np.ndarray, float] | None:
    """``(w_int, unit)`` with ``l0 + u*q = unit * w_int`` and ``w_int`` (O, K) int64 (``unit = u`` or
    ``u/2``); None for grouped weights or levels that do not fold. ``q``: :func:`plane_integers` of
    ``wp`` where the caller has them."""
    if wp.W.shape[0] != 1 or wp.u == 0:
        return None
    ratio = wp.l0 / wp.u
    for f in (1, 2):
        v = ratio * f
        if abs(v - round(v)) <= 1e-6 * max(1.0, abs(v)):
            break
    else:
        return None
    q = plane_integers(wp) if q is None else q
    return round(ratio * f) + f * q.astype(np.int64), wp.u / f


@dataclass
class LutWeights:
    """Weights for the table-lookup GEMM (``kernels_gemm``): ``w = sw[o] * unit * lv[code]``, the
    codes packed 4 bits per group of ``4 // cb`` weights."""

    wq: np.ndarray  # (Op/16, Gp/8, 64) uint8; base-3: (Op/16, S/2, 80) (kernels_lut3)
    lv: np.ndarray  # (2**cb,) int64 integer levels
    cb: int
    unit: float
    wsum: np.ndarray  # (O,) float64: sum_r w_int[o, r]
    sums: int = 1  # lookups the tiles add as bytes before widening (kernels_gemm.lut_sums)
    # ternary weights -l, 0, l: the base-3 tables of kernels_lut3 (three weights a lookup)
    corr: np.ndarray | None = None  # (Op,) int64 per-output offsets (kernels_lut3.lut3_offsets)
    level: int = 0  # l
    bias: int = 0  # the tables' offset (kernels_lut3.lut3_bias)

    @property
    def nbytes(self) -> int:
        return int(self.wq.nbytes) + (0 if self.corr is None else int(self.corr.nbytes))

    @property
    def base3(self) -> bool:
        return self.corr is not None


def lut_form(w_int: np.ndarray, ka: int) -> tuple[np.ndarray, int] | None:
    """``(lv, cb)``: the levels and code bits (``kernels_gemm.lut_levels``) of the table-lookup form
    of folded weights ``w_int`` for ``ka``-bit activation codes; None where the weights take more
    than 4 values or the tables would not fit int8. Cheap next to packing them (:func:`lut_weights`)."""
    top = max(int(w_int.max()), -int(w_int.min())) if w_int.size else 0
    if 2 * top * ((1 << ka) - 1) > 127:  # no table fits, whatever the levels (lut_fits with 4 // cb >= 2)
        return None
    levels = KG.lut_levels(w_int)
    return levels if levels is not None and KG.lut_fits(*levels, ka) else None


def lut_weights(wp: WeightPlanes, ka: int, folded: tuple[np.ndarray, float] | None = None,
                form: tuple[np.ndarray, int] | None = None) -> LutWeights | None:
    """The table-lookup form of binary / ternary / 2-bit weights for ``ka``-bit activation codes
    (symmetric ternary weights: the base-3 tables of ``kernels_lut3`` where they fit); None where
    the weights take more than 4 values or the tables would not fit int8. ``folded``
    (:func:`fold_integers`) and ``form`` (:func:`lut_form`): where the caller has them."""
    folded = fold_integers(wp) if folded is None else folded
    if folded is None:
        return None
    w_int, unit = folded
    form = lut_form(w_int, ka) if form is None else form
    if form is None:
        return None
    lv, cb = form
    wsum = w_int.sum(axis=1).astype(np.float64)
    level = KL3.lut3_level(w_int) if cb == 2 and KL3.ENABLED else None
    if level is not None and KL3.lut3_fits(level, ka):
        wq, ssum = KL3.lut3_pack_weights(w_int, level)
        bias = KL3.lut3_bias(level, ka)
        return LutWeights(wq, lv, cb, unit, wsum, 1, KL3.lut3_offsets(ssum, bias), level, bias)
    return LutWeights(KG.lut_pack_weights(w_int, lv, cb), lv, cb, unit, wsum, KG.lut_sums(lv, cb, ka))


@dataclass
class LutConvWeights:
    """Weights for the table-lookup convolution (``kernels_lut_conv``): the taps' codes, 4 bits per
    group of ``4 // cb`` weights, for tables of ``tpix`` bytes per input pixel."""

    wq: np.ndarray  # (Op/16, KH*KW*Gc/8, 64) uint8
    lv: np.ndarray  # (2**cb,) int64 integer levels
    cb: int
    sums: int
    tpix: int

    @property
    def nbytes(self) -> int:
        return int(self.wq.nbytes)


def conv_lut_weights(wp: WeightPlanes, kshape: tuple[int, int, int], ka: int) -> LutConvWeights | None:
    """The table-lookup form of a convolution's weights for ``ka``-bit input codes, where
    ``kernels_lut_conv.lut_conv_applies`` says it runs (binary weights on multiples of 32 channels,
    ternary on 64 or more); else None. ``kshape`` = (KH, KW, C)."""
    if not KL.HAS_LUT:
        return None
    folded = fold_integers(wp)
    levels = None if folded is None else KG.lut_levels(folded[0])
    KH, KW, C = kshape
    if levels is None or not KL.lut_conv_applies(*levels, C, ka):
        return None
    lv, cb = levels
    w_int = folded[0].reshape(-1, KH, KW, C)
    return LutConvWeights(KL.lut_conv_weights(w_int, lv, cb), lv, cb, KG.lut_sums(lv, cb, ka),
                          16 * KL.pixel_groups(C, cb))


def gemv_weights(wp: WeightPlanes, q: np.ndarray | None = None, wide: bool = False) -> KV.GemvWeights | None:
    """The few-row form of the weights (``kernels_gemv``: the plane integers as 1/2/4-bit fields,
    with ``wide`` 5-8 bit codes as 8-bit fields; large ternary ones also at 1.6 bits for one row,
    ``kernels_tq1``); None for grouped weights, integers spanning more than 16 (``wide``: 256) values
    or too long a reduction. ``q``: :func:`plane_integers` of ``wp`` where the caller has them."""
    if wp.W.shape[0] != 1:
        return None
    q = plane_integers(wp) if q is None else q
    if KV.field_bits(q, wide) is None:
        return None
    try:
        return KT.tq1_weights(KV.GemvWeights(q, wide), q)
    except ValueError:
        return None


#: wide (8-bit field) Linear layers with AMX weights run this many rows and more on AMX tiles (the
#: int8 conv kernel over the rows, padded to the 16 it needs); fewer rows, and every row count where
#: there are no AMX weights, run the GEMV on the 8-bit fields. DoReFa 5-bit 4096x4096 at 8 / 12 / 16
#: rows: AMX 1.54 / 1.51 / 1.53 ms, GEMV 5.3 / 2.7 / 6.7 ms; 1024x1024 0.14 / 0.15 / 0.13 against
#: 0.09 / 0.12 / 0.14 ms (there the GEMV is faster up to 12 rows; one thread, loaded machine,
#: ``benchmarks/results/ab_linear_wide.md``)
WIDE_AMX_MIN_ROWS = 8
#: rows of one image the AMX conv kernel needs (``kernels_int8._amx_conv_range``)
_AMX_IMAGE_ROWS = 16


@dataclass
class WideAmxWeights:
    """Weights beyond 4 bits of a Linear layer on AMX tiles: ``w = sw[o] * unit * w_int[o, r]``,
    ``w_int`` (:func:`fold_integers`) as ``parts`` int8 parts where it leaves int8 (DoReFa 8-bit
    ``2i - 255``: 3; 5-7 bit and ``uniform`` 8-bit: 1), packed by ``kernels_int8.pack_amx_weights``
    as a 1x1 convolution of K channels over one image of M pixels (the rows)."""

    w: np.ndarray  # int8, flat, on a 64-byte line
    cfg: np.ndarray  # the tile configuration
    koff: np.ndarray  # K chunk offsets (each chunk once per part)
    kc: int
    nbt: int
    parts: int
    unit: float
    wsum: np.ndarray  # (O,) float64: sum_r w_int[o, r]

    @property
    def nbytes(self) -> int:
        return int(self.w.nbytes)


#: ... and from this many rows where their folded weights need several int8 parts (DoReFa 8-bit:
#: 3), each K chunk multiplied once per part. 4096x4096 w8a8, AMX on 3 parts against the GEMV on
#: 8-bit fields: 3.7 / 3.6 / 9.9 against 1.4 / 2.7 / 7.1 ms at 8 / 16 / 32 rows, 16.6 against 16.1 at
#: 64, 28.0 / 55.3 against 31.2 / 60.0 at 128 / 256; 1024x1024 0.21 / 0.40 / 1.08 against 0.09 /
#: 0.39 / 1.42 ms at 8 / 64 / 256 rows (one thread, loaded machine,
#: ``benchmarks/results/ab_linear_wide_parts*.md``)
WIDE_AMX_MIN_ROWS_PARTS = 64


def wide_amx_weights(folded: tuple[np.ndarray, float]) -> WideAmxWeights | None:
    """:class:`WideAmxWeights` of folded weights ``(w_int, unit)`` (O, K); None beyond
    ``kernels_int8.MAX_INT8_PARTS`` int8 parts."""
    w_int, unit = folded
    parts = KI.int8_parts(w_int)
    if parts == 0:
        return None
    O, Kr = w_int.shape
    w, kc, nck, nbt = KI.pack_amx_weights(w_int.reshape(O, 1, 1, Kr))
    cfg = _amx.amx_tile_config(kc, nbt)
    koff = KI.amx_k_offsets(1, nck, kc, 1, 1, Kr, parts)
    return WideAmxWeights(w, cfg, koff, kc, nbt, parts, float(unit), w_int.sum(axis=1).astype(np.float64))


# ----------------------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------------------


@dataclass
class ActSpec:
    """How a layer's input becomes codes. mode 0: fused clip quantizer ``rint(clip(x, 0, hi) *
    mult)``; 2: the signed clip formula ``rint(clip(x, lo, hi) * mult) + offset`` (one
    ``kernels_codes`` pass, then the kernels read codes); 1: ``encode`` each call; -1: no
    quantizer (float activations)."""

    quantizer: ActivationQuantizer | None
    mode: int
    bits: int = 0
    hi: float = 0.0  # float32 value
    mult: float = 0.0  # float32 value
    sx: float = 1.0
    ma: float = 0.0
    lo: float = 0.0  # float32 value (mode 2)
    offset: int = 0  # mode 2

    @property
    def name(self) -> str:
        if self.quantizer is None:
            return "float"
        return f"{self.quantizer.name}{self.bits}"


def _affine_levels(levels: Tensor, scale: Tensor) -> tuple[float, float]:
    """(sx, ma) with value = sx * (code - ma) for uniform levels; NotPackableError otherwise."""
    lv = levels.detach().cpu().double().numpy().reshape(-1)
    if scale.numel() != 1:
        raise NotPackableError("per-channel activation scales are not packed")
    if lv.size < 2:
        raise NotPackableError("activation codebook with a single level")
    d = (lv[-1] - lv[0]) / (lv.size - 1)
    if d <= 0 or np.abs(lv - (lv[0] + d * np.arange(lv.size))).max() > 1e-6 * max(1.0, np.abs(lv).max()):
        raise NotPackableError(f"activation levels are not uniform: {lv.tolist()[:8]}")
    s = float(scale.detach().double().reshape(()))
    return s * d, -lv[0] / d


def act_spec(q: ActivationQuantizer | None) -> ActSpec:
    """The quantizer's own :meth:`~lowbit.quant.base.ActivationQuantizer.runtime_codes_spec`
    (fused into the kernels: PACT, DoReFa, and LSQ / uniform where a checked multiplier exists;
    unsigned grids in the kernels' own pass, mode 0, symmetric signed grids in one ``kernels_codes``
    pass, mode 2), else ``encode`` at every call (BCGD's ceil, steps taken per batch); no
    quantizer: float activations. Dispatch is through the hook only, never the quantizer's type."""
    if q is None:
        return ActSpec(None, -1)
    spec = q.runtime_codes_spec()
    if spec is None:
        return ActSpec(q, 1, q.bits)
    mode = 2 if spec.signed else 0
    return ActSpec(q, mode, spec.bits, hi=spec.hi, mult=spec.mult, sx=spec.step, ma=spec.zero, lo=spec.lo,
                   offset=spec.offset)


def spec_codes(spec: ActSpec, x: np.ndarray) -> np.ndarray:
    """uint8 codes of float32 ``x`` by the spec's clip formula (modes 0 and 2)."""
    args = spec.__dict__.get("_clip_args")
    if args is None:  # the kernel's typed scalars, made once
        args = spec.__dict__["_clip_args"] = KC.clip_args(spec.lo, spec.hi, spec.mult, spec.offset)
    return KC.clip_codes(x, spec.lo, spec.hi, spec.mult, spec.offset, args)


def encode_codes(spec: ActSpec, x: Tensor) -> tuple[np.ndarray, float, float]:
    """Generic path: codes (float32 array of integers), sx, ma via the quantizer's encode."""
    enc = spec.quantizer.encode(x)  # type: ignore[union-attr]
    if enc.branches:
        raise NotPackableError("multi-branch activation encodings are not packed")
    if enc.levels.numel() > 256:
        raise NotPackableError("activation codes wider than 8 bits")
    sx, ma = _affine_levels(enc.levels, enc.scale)
    return enc.codes.to(torch.float32).contiguous().numpy(), sx, ma


# ----------------------------------------------------------------------------------------------
# activation codes passed between packed layers
# ----------------------------------------------------------------------------------------------


@dataclass
class Codes:
    """Activation codes handed from a packed layer to the next one instead of a float tensor:
    the flat uint8 image the int8 kernels read, (N, H + 2*ph, W + 2*pw, C) in NHWC order with the
    padding code on the border, then ``kernels.INT8_SLACK`` zero bytes. Only ``compile()``
    creates such links (the producer quantizes with its consumer's fused formula, exactly as the
    consumer would quantize the float tensor)."""

    buf: np.ndarray
    shape: tuple[int, int, int, int]  # N, H, W, C
    pad: tuple[int, int]


@dataclass
class CodeTiles:
    """A Linear layer's output handed to the next Linear layer as that layer's activation codes in
    the AMX tile layout (``kernels_amx.amx_rows``: ``rows`` rows of ``features`` codes, zero
    padding), written by the producer's epilogue: the float output and the consumer's pass that
    quantizes it into tiles are skipped. Only ``compile()`` links layers this way
    (:class:`TileTarget`); the codes are those the consumer's fused formula makes of the float
    output (``kernels_amx.amx_linear``)."""

    buf: np.ndarray
    rows: int
    features: int


@dataclass
class TileTarget:
    """The consumer of a producer's :class:`CodeTiles`: its fused input formula
    ``rint(clip(x, 0, hi) * mult)`` and the fewest rows it runs on AMX (fewer rows go as floats)."""

    hi: float
    mult: float
    min_rows: int


@dataclass
class CodeTarget:
    """The input quantizer (fused clip formula, zero padding code) and padding of the layer that
    consumes a producer's codes."""

    hi: float
    mult: float
    pad: tuple[int, int]

    def geometry(self, H: int, W: int) -> np.ndarray:
        """``cgeo`` of the int8 kernels: (Hp, Wp, ph, pw) of the padded image."""
        ph, pw = self.pad
        return np.array([H + 2 * ph, W + 2 * pw, ph, pw], np.int64)

    def alloc(self, N: int, H: int, W: int, C: int) -> Codes:
        """A zeroed image (border = padding code 0) for N x H x W x C codes."""
        ph, pw = self.pad
        buf = np.zeros(N * (H + 2 * ph) * (W + 2 * pw) * C + K.INT8_SLACK, np.uint8)
        return Codes(buf, (N, H, W, C), self.pad)


@dataclass
class _Plan:
    """Per input size: the int8 kernels' geometry and quad offsets (and the codes' geometry)."""

    geo: np.ndarray
    OH: int
    OW: int
    qoff: np.ndarray
    cgeo: np.ndarray | None = None
    koff: np.ndarray | None = None  # the table-lookup kernel's tap offsets


def as_nchw(out: np.ndarray) -> Tensor:
    """An NHWC float32 array as a channels-last NCHW tensor that remembers the array (so that the
    next packed layer reads it without going through torch)."""
    t = torch.from_numpy(out).permute(0, 3, 1, 2)
    t._lowbit_nhwc = out
    return t


def nhwc(x: Tensor) -> np.ndarray:
    """A (N, H, W, C) float32 view of an NCHW tensor (the array behind it when a packed layer made
    it; strided for an NCHW-contiguous tensor)."""
    a = x.__dict__.get("_lowbit_nhwc") if type(x) is Tensor else None
    if a is not None:
        return a
    return x.detach().float().permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------------------------
# packed layers
# ----------------------------------------------------------------------------------------------


class _PackedBase(nn.Module):
    def __init__(self, name: str, wp: WeightPlanes, act: ActSpec, bias: Tensor | None) -> None:
        super().__init__()
        self.layer_name = name
        self.wp = wp
        self.act = act
        O = wp.sw.shape[0]
        self.out_features = O
        self.bn_scale = np.ones(O, np.float64)
        self.beta = np.zeros(O, np.float64) if bias is None else bias.detach().double().cpu().numpy().copy()
        self.relu = False
        self.input_ndim = 0  # set by compile() from the example input (0: unknown)
        self.fused: list[str] = []
        self._static: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.i8: Int8Weights | None = None  # int8 (VNNI) weights, when that kernel is used
        self._static8: tuple[np.ndarray, np.ndarray] | None = None
        # set by compile() (int8 convolutions only): emit codes for the next layer, a float
        # output or not, and a residual operand added before the ReLU (forward(x, res))
        self.code_target: CodeTarget | None = None
        # set by compile() (Linear -> Linear on AMX): hand the next layer CodeTiles
        self.tile_target: TileTarget | None = None
        self.emit_float = True
        self.residual = False
        # a plain module attribute, so that the quantizer's parameters do not count twice
        self.__dict__["act_quantizer"] = act.quantizer

    # -- epilogue --------------------------------------------------------------------------
    def fold_bn(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        if bn.running_mean is None or bn.running_var is None:
            raise NotPackableError("batch norm without running statistics")
        var = bn.running_var.detach().double().cpu().numpy()
        mean = bn.running_mean.detach().double().cpu().numpy()
        a = 1.0 / np.sqrt(var + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight.detach().double().cpu().numpy()
        b = -mean * a
        if bn.bias is not None:
            b = b + bn.bias.detach().double().cpu().numpy()
        self.bn_scale = self.bn_scale * a
        self.beta = self.beta * a + b
        self._static = None
        self._static8 = None
        self._static_lut = None
        self.fused.append("bn")

    def fuse_relu(self) -> None:
        self.relu = True
        self.fused.append("relu")

    def coeffs(self, sx: float, ma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.act.mode == 2 and sx == self.act.sx and ma == self.act.ma:
            return self._coeffs_static()  # signed fused codes: static, computed once
        return self._coeffs(sx, ma)

    def _coeffs(self, sx: float, ma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wp = self.wp
        alpha = wp.sw * sx * self.bn_scale
        s1 = alpha * wp.u
        s2 = alpha * wp.l0
        s0 = self.beta - alpha * ma * (wp.l0 * wp.K + wp.u * wp.C)
        return s0, s1, s2

    def _coeffs_static(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._static is None:
            self._static = self._coeffs(self.act.sx, self.act.ma)
        return self._static

    def coeffs8(self, sx: float, ma: float) -> tuple[np.ndarray, np.ndarray]:
        """(s0, s1) of the int8 kernels, ``y = s1*D + s0`` with ``D = sum_r w_int*a``, zero padded to
        whole blocks of 16 channels."""
        if self.act.mode == 2 and sx == self.act.sx and ma == self.act.ma:
            return self._coeffs8_static()  # signed fused codes: static, computed once
        return self._coeffs8(sx, ma)

    def _coeffs8(self, sx: float, ma: float) -> tuple[np.ndarray, np.ndarray]:
        i8 = self.i8
        assert i8 is not None
        alpha = self.wp.sw * sx * self.bn_scale * i8.unit
        s0 = np.zeros(i8.width + 64, np.float64)
        s1 = np.zeros(i8.width + 64, np.float64)
        O = self.out_features
        s1[:O] = alpha
        s0[:O] = self.beta - alpha * ma * i8.wsum
        return s0, s1

    def _coeffs8_static(self) -> tuple[np.ndarray, np.ndarray]:
        if self._static8 is None:
            self._static8 = self._coeffs8(self.act.sx, self.act.ma)
        return self._static8

    def _codes_input(self, x: Tensor) -> tuple[np.ndarray, int, float, float, float, float]:
        """(array, mode, hi, mult, sx, ma) for the packing kernels (signed fused codes: uint8 codes,
        mode 1)."""
        a = self.act
        if a.mode in (0, 2):
            xa = x.detach() if x.requires_grad else x
            if xa.dtype != torch.float32 or not xa.is_contiguous():  # (dispatches only where needed)
                xa = xa.contiguous().float()
            if a.mode == 0:
                return xa.numpy(), 0, a.hi, a.mult, a.sx, a.ma
            return spec_codes(a, xa.numpy()), 1, 0.0, 0.0, a.sx, a.ma
        codes, sx, ma = encode_codes(a, x.detach())
        return codes, 1, 0.0, 0.0, sx, ma

    @property
    def weight(self) -> Tensor:
        """The dequantized weight in the layer's original layout (float32), for model code that
        reads ``layer.weight`` (its dtype, device or shape: transformers does); packed inference
        does not use it."""
        wp = self.wp
        q = torch.from_numpy(plane_integers(wp)).double()
        w = torch.from_numpy(wp.sw).double()[:, None] * (wp.l0 + wp.u * q)
        if isinstance(self, PackedConv2d):
            kh, kw = self.kernel_size
            return w.reshape(w.shape[0], kh, kw, -1).permute(0, 3, 1, 2).float().contiguous()
        return w.float()

    @property
    def weight_bytes(self) -> int:
        """Packed planes + float32 per-channel scale and bias."""
        return self.wp.packed_bytes + 8 * self.out_features

    def kernel_name(self) -> str:
        return "int8" if self.i8 is not None else "bit-serial"

    def describe(self) -> str:
        wp = self.wp
        return (
            f"{wp.kind} w{wp.bits} ({wp.num_planes} plane{'s' if wp.num_planes > 1 else ''}) x "
            f"{self.act.name} act, {self.kernel_name()}" + (f" +{'+'.join(self.fused)}" if self.fused else "")
        )

    def extra_repr(self) -> str:
        return f"{self.layer_name}: {self.describe()}"


class PackedLinear(_PackedBase):
    """Dispatch by rows (samples x tokens) M:

    - ``M <= kernels_gemv.GEMV_MAX_ROWS``: the GEMV on 1/2/4-bit weight fields (VNNI), below
      :attr:`lut_min_rows` where the layer has lookup tables;
    - ``M >= amx_min_rows``: int8 expanded from the same fields per call, one L1 slice at a time
      (``kernels_amx``), into AMX tiles, or on CPUs with AVX-512 VNNI but no AMX into VNNI register
      tiles; from 8 rows, or where the tables below exist from where they are slower
      (``kernels_amx.min_rows``);
    - ``M >= lut_min_rows`` (``kernels_gemm.lut_min_rows``: 3 binary, 5 ternary / 2-bit on the
      AVX-512 tiles, else 8): the table-lookup GEMM on 1/2-bit weight codes
      (``kernels_gemm``: binary, ternary, 2-bit weights with activation codes whose tables fit int8:
      up to 5 bits for binary, 6 for ternary, 4 for 2-bit -3/-1/1/3), AVX-512 or its plain path; not
      held where AMX starts right after the GEMV's last row (ternary weights), as they would never
      run;
    - otherwise the int8 kernel (a 1x1 convolution over the rows) where the CPU has VNNI, else the
      bit-serial rows / cols GEMM. A large layer that has both compact forms holds no int8 copy.

    One-bit activation codes with one weight plane (binary weights, W1A1), on CPUs with AVX-512
    VPOPCNTDQ and no AMX, run every row count on the ``vpopcntq`` GEMM on the bit plane in block
    order (``kernels_popcount.gemm_w1a1``) instead: at one row it reads each weight as one bit.

    Weights of 5-8 bits (:attr:`wide`: the codes as 8-bit GEMV fields) run the GEMV below
    :data:`WIDE_AMX_MIN_ROWS` rows and, from there, AMX tiles on the folded weights
    (:class:`WideAmxWeights`: one int8 part for 5-7 bit DoReFa and ``uniform`` 8-bit; DoReFa
    8-bit's 3 parts from :data:`WIDE_AMX_MIN_ROWS_PARTS` rows); CPUs without AMX run the GEMV at
    every row count. They ran bit-serial before (8-bit
    DoReFa at every row count: 3-9x the 4-bit layer's time at one row, 33-209x at 64 rows,
    ``benchmarks/results/linear_wide_before.md``).
    """

    def __init__(self, name: str, layer: nn.Module, wp: WeightPlanes, act: ActSpec) -> None:
        super().__init__(name, wp, act, layer.bias)
        self.in_features = wp.K
        codes = act.mode != -1 and act.bits <= 8
        large = wp.K * self.out_features >= LUT_FLAT_MAX
        # the plane integers and their int8 fold, made once for the GEMV, AMX and the tables
        q = plane_integers(wp) if codes and wp.W.shape[0] == 1 else None
        folded = fold_integers(wp, q) if q is not None else None
        # W1A1 (binary weights, one-bit codes) at every row count on vpopcntq, from the plane in the
        # tiles' block order: no GEMV fields, tables or int8 copy; CPUs with AMX keep their tiles
        self.w1a1: np.ndarray | None = None
        if (KP.HAS_VPOPCNT and act.mode in (0, 1) and act.bits == 1 and wp.W.shape[0] == 1
                and wp.W.shape[2] == 1 and self.out_features >= 8 and KA.backend() != "amx"):
            self.w1a1 = KP.w1a1_weights(wp.W[0, :, 0])
            q = folded = None
        # few rows (<= KV.GEMV_MAX_ROWS): weight fields unpacked in registers (VNNI); 5-8 bit
        # codes as 8-bit fields (the bit-serial kernels they replace read 5-8 planes per row)
        self.gemv = gemv_weights(wp, q, wide=True) if K.HAS_VNNI and q is not None else None
        self._static_lut: tuple[np.ndarray, np.ndarray] | None = None
        # many rows (>= amx_min_rows) on AMX tiles, expanded from the GEMV's fields on the fly;
        # wide fields (no 16-entry table) as int8 parts (>= WIDE_AMX_MIN_ROWS rows)
        self.amx: KA.AmxLinearWeights | None = None
        self.amx8: WideAmxWeights | None = None
        if folded is not None and self.gemv is not None and KA.backend() is not None:
            if not self.wide:  # AMX tiles, or VNNI registers on CPUs without AMX
                self.amx = KA.amx_linear_weights(self.gemv, q, *folded)
            elif amx_enabled():
                self.amx8 = wide_amx_weights(folded)
        # many rows (>= KG.LUT_MIN_ROWS): table lookup on the compact codes, built only where they
        # would run: decided from their code bits before packing them
        self.lut: LutWeights | None = None
        form = lut_form(folded[0], act.bits) if folded is not None else None
        if form is not None and not self.tables_idle(form[1]):
            self.lut = lut_weights(wp, act.bits, folded, form)
        # every row count has a kernel on compact weights (GEMV, then tables or AMX; vpopcntq): a
        # large layer holds no int8 copy (not even built)
        tables = self.lut is not None and self.lut_min_rows <= KV.GEMV_MAX_ROWS + 1
        compact = self.gemv is not None and (self.amx is not None or self.wide or tables)
        compact = compact or self.w1a1 is not None
        if K.HAS_VNNI and codes and not (compact and large):
            self.i8 = int8_weights(wp, (1, 1, wp.K), split=self.wide)

    @property
    def wide(self) -> bool:
        """Whether the GEMV holds 8-bit fields (5-8 bit codes): it then runs every row count below
        :attr:`wide_amx_min_rows` where AMX weights exist, else every row count; a small layer's int8
        copy (int8 parts) is for the flat executor."""
        return self.gemv is not None and self.gemv.b == KV.WIDE_BITS

    def _gemv_rows(self, M: int) -> bool:
        """Whether M rows run on the GEMV: up to ``GEMV_MAX_ROWS``; 8-bit fields below
        :attr:`wide_amx_min_rows` where they have AMX weights, else at every row count (the int8
        kernel on 3 int8 parts measured 1.8-7.5x the GEMV's time at 1-16 rows of 4096x4096, on 1 part
        1.0-4.4x; ``benchmarks/results/ab_linear_wide.md``)."""
        if self.wide:
            return self.amx8 is None or self.wide_amx_min_rows > M
        return self.gemv is not None and M <= KV.GEMV_MAX_ROWS and self.lut_min_rows > M

    @property
    def wide_amx_min_rows(self) -> int:
        """Rows from which a wide layer runs on AMX: :data:`WIDE_AMX_MIN_ROWS`, or
        :data:`WIDE_AMX_MIN_ROWS_PARTS` where its weights are several int8 parts."""
        a8 = self.amx8
        return WIDE_AMX_MIN_ROWS if a8 is None or a8.parts == 1 else WIDE_AMX_MIN_ROWS_PARTS

    def _amx8_forward(self, arr: np.ndarray, mode: int, hi: float, mult: float, sx: float, ma: float,
                      out: np.ndarray) -> None:
        """Rows (codes of ``arr``: fused formula or given) on AMX tiles with the weights in int8 parts:
        a 1x1 convolution over one image of M pixels (``kernels_int8.amx_conv``), fewer than 16 rows
        padded with zero rows (their outputs dropped)."""
        a8 = self.amx8
        assert a8 is not None
        M, Kr = arr.shape
        O = self.out_features
        Mp = max(M, _AMX_IMAGE_ROWS)
        if Mp > M:
            pad = np.zeros((Mp, Kr), arr.dtype)
            pad[:M] = arr
            arr, dst = pad, np.empty((Mp, O), np.float32)
        else:
            dst = out
        xq = KI.int8_quantize(arr.reshape(1, 1, Mp, Kr), (0, 0), hi, mult, mode)
        geo = np.array([1, Mp, Kr, 1, Mp, 1, 1, 1, O], np.int64)
        s0, s1 = self._amx8_coeffs(sx, ma)
        KI.amx_conv(xq, geo, a8.koff, a8.w, a8.cfg, a8.kc, a8.nbt, s0, s1, self.relu, dst)
        if dst is not out:
            out[:] = dst[:M]

    def _w1a1_forward(self, arr: np.ndarray, mode: int, hi: float, mult: float, sx: float, ma: float,
                      out: np.ndarray) -> None:
        """Rows (codes of ``arr``: fused formula or given) on the ``vpopcntq`` GEMM: the one-bit codes
        packed as a bit plane, ``gemm_rows``' coefficients and epilogue."""
        assert self.w1a1 is not None
        static = mode == 0 or (sx == self.act.sx and ma == self.act.ma)
        s0, s1, s2 = self._coeffs_static() if static else self.coeffs(sx, ma)
        X, A = K.pack_rows(arr, 1, hi, mult, mode)
        wp = self.wp
        g = (-1 if wp.neg[0] else 1) << int(wp.shift[0])
        KP.gemm_w1a1(X[:, 0], A, self.w1a1, self.out_features, g, s0, s1, s2, self.relu, out)

    def _amx8_coeffs(self, sx: float, ma: float) -> tuple[np.ndarray, np.ndarray]:
        """(s0, s1) of the wide AMX path, ``y = s1*D + s0`` with ``D = sum_r w_int*a``, zero padded to
        whole blocks of 16 channels plus 64; cached for the static (sx, ma) while the static
        coefficients stay (a folded batch norm renews them)."""
        a8 = self.amx8
        assert a8 is not None

        def make() -> tuple[np.ndarray, np.ndarray]:
            alpha = self.wp.sw * sx * self.bn_scale * a8.unit
            s0 = np.zeros(16 * a8.nbt + 64, np.float64)
            s1 = np.zeros_like(s0)
            O = self.out_features
            s1[:O] = alpha
            s0[:O] = self.beta - alpha * ma * a8.wsum
            return s0, s1

        if sx != self.act.sx or ma != self.act.ma:
            return make()
        st = self._coeffs_static()
        c = self.__dict__.get("_amx8_cache")
        if c is None or c[0] is not st:
            c = (st, make())
            self.__dict__["_amx8_cache"] = c
        return c[1]

    def tables_idle(self, cb: int) -> bool:
        """Whether lookup tables on ``cb``-bit weight codes would never run: the expanded-field GEMM
        (``kernels_amx``) is faster from ``kernels_amx.min_rows(cb)`` rows on and the GEMV takes
        every row count below (on AMX: ternary and 2-bit codes, ``cb = 2``), so they are not built."""
        return self.amx is not None and KA.min_rows(cb) <= KV.GEMV_MAX_ROWS + 1

    @property
    def lut_min_rows(self) -> int:
        """Rows from which the layer runs on its lookup tables (``kernels_gemm.lut_min_rows`` of
        their code bits; no tables: never)."""
        return KA.NEVER_ROWS if self.lut is None else KG.lut_min_rows(self.lut.cb)

    @property
    def amx_min_rows(self) -> int:
        """Rows from which the expanded-field GEMM runs (AMX tiles, or VNNI registers without AMX):
        ``kernels_amx.min_rows``, later where lookup tables (binary / ternary weights, few-bit codes)
        are faster."""
        return KA.min_rows(None if self.lut is None else self.lut.cb)

    def coeffs_lut(self, sx: float, ma: float) -> tuple[np.ndarray, np.ndarray]:
        """(s0, s1) of the table-lookup GEMM, ``y = s1*D + s0`` with ``D = sum_r w_int*a``."""
        lut = self.lut
        assert lut is not None
        alpha = self.wp.sw * sx * self.bn_scale * lut.unit
        return self.beta - alpha * ma * lut.wsum, alpha

    def _lut_forward(self, arr: np.ndarray, mode: int, hi: float, mult: float, sx: float, ma: float,
                     out: np.ndarray) -> None:
        """Many rows on the table-lookup GEMM (codes of ``arr``: fused formula or given)."""
        lut = self.lut
        assert lut is not None
        if mode == 0 and self._static_lut is None:
            self._static_lut = self.coeffs_lut(sx, ma)
        s0, s1 = self._static_lut if mode == 0 else self.coeffs_lut(sx, ma)
        if lut.base3:
            tab = KL3.lut3_tables(arr, lut.level, lut.bias, hi, mult, mode)
            KL3.lut3_gemm(tab, lut.wq, lut.corr, self.out_features, s0, s1, self.relu, out)
            return
        tab = KG.lut_tables(arr, lut.lv, lut.cb, hi, mult, mode)
        KG.lut_gemm(tab, lut.wq, self.out_features, s0, s1, self.relu, out, sums=lut.sums)

    @property
    def runs_flat(self) -> bool:
        """Whether the flat executor may run this layer as its int8 1x1 convolution: it has int8
        weights and no table-lookup form, or is small (a conv net's classifier, where one flat call
        beats per-layer dispatch); large layers with tables run their own many-row dispatch."""
        small = self.in_features * self.out_features < LUT_FLAT_MAX
        if self.gemv is not None and not small:
            return False  # few rows: the GEMV on the weight fields (the flat program would run int8)
        return self.i8 is not None and (self.lut is None or small)

    @property
    def runtime_bytes(self) -> int:
        """Every weight copy the layer holds for its kernels (bit planes, int8, table-lookup codes)
        plus float32 scale and bias."""
        n = self.weight_bytes
        if self.i8 is not None:
            n += self.i8.nbytes
        if self.lut is not None:
            n += self.lut.nbytes
        if self.gemv is not None:
            n += self.gemv.nbytes
        if self.amx is not None:
            n += self.amx.nbytes  # its tiles are expanded from the GEMV's fields per call
        if self.amx8 is not None:
            n += self.amx8.nbytes
        if self.w1a1 is not None:
            n += self.w1a1.nbytes
        return n

    def _rows(self, M: int) -> bool:
        """Bit-serial rows GEMV rather than the int8 kernel for M rows."""
        return M == 1 or M * self.wp.num_planes * self.act.bits <= ROWS_INT8_BUDGET

    def kernel_name(self) -> str:
        if self.w1a1 is not None:
            flat = " / int8 (flat)" if self.i8 is not None else ""
            return "vpopcntq on the bit plane (every row count)" + flat
        lut = ""
        if self.lut is not None:
            lut = f" / {'base-3 ' if self.lut.base3 else ''}lut (>= {self.lut_min_rows} rows)"
        if self.gemv is not None:
            gemv = f"gemv {self.gemv.b}-bit fields (<= {min(KV.GEMV_MAX_ROWS, self.lut_min_rows - 1)} rows)"
            if self.gemv.tq1 is not None:
                gemv = f"gemv 1.6-bit (<= {self.gemv.tq1.max_rows} rows) / " + gemv[5:]
            amx = ""
            if self.amx is not None and self.amx_min_rows < KA.NEVER_ROWS:
                amx = f" / {KA.backend()} on the fields (>= {self.amx_min_rows} rows)"
            if self.amx8 is not None:
                r = self.wide_amx_min_rows
                gemv = gemv.replace(f"<= {KV.GEMV_MAX_ROWS}", f"<= {r - 1}")
                amx = f" / amx on {self.amx8.parts} int8 part(s) (>= {r} rows)"
            return gemv + (" / int8" if self.i8 is not None else "") + lut + amx
        if self.i8 is None:
            return "bit-serial" + lut
        n = max(1, ROWS_INT8_BUDGET // (self.wp.num_planes * max(self.act.bits, 1)))
        return f"bit-serial (<= {n} rows) / int8" + lut

    def _amx_coeffs(self, sx: float, ma: float) -> tuple[np.ndarray, np.ndarray]:
        """(s0, s1) of the AMX GEMM (``kernels_amx.amx_coeffs``); cached for the layer's static
        (sx, ma) while the static coefficients stay (a folded batch norm renews them)."""
        assert self.amx is not None
        if sx != self.act.sx or ma != self.act.ma:
            return KA.amx_coeffs(self.amx, self.wp.sw, sx, ma, self.bn_scale, self.beta)
        st = self._coeffs_static()
        c = self.__dict__.get("_amx_cache")
        if c is None or c[0] is not st:
            c = (st, KA.amx_coeffs(self.amx, self.wp.sw, sx, ma, self.bn_scale, self.beta))
            self.__dict__["_amx_cache"] = c
        return c[1]

    def _gemv_static(self) -> tuple[tuple, np.ndarray, np.ndarray]:
        """(static coefficients, float32 (hi, mult), float64 s0/s1/s2 padded as the kernel reads
        them) of the GEMV, cached while the static coefficients stay (a folded batch norm renews them)."""
        st = self._coeffs_static()
        c = self.__dict__.get("_gemv_cache")
        if c is None or c[0] is not st:
            c = (st, np.array([self.act.hi, self.act.mult], np.float32), KV.gemv_coef(*st, self.gemv))
            self.__dict__["_gemv_cache"] = c
        return c

    def _forward_gemv(self, x: Tensor) -> Tensor:
        """Few float rows (M, K) and the fused input quantizer: the GEMV with cached arguments (at
        batch 1 the Python around a 4096x4096 product is a sizeable part of its time)."""
        xa = x.detach() if x.requires_grad else x  # detach() alone costs ~1 us a call
        if xa.dtype != torch.float32 or not xa.is_contiguous():
            xa = xa.contiguous().float()
        _, qp, coef = self._gemv_static()
        out = np.empty((xa.shape[0], self.out_features), np.float32)
        KV.gemv_run(xa.numpy(), 0, qp, self.gemv, coef, self.relu, out)
        return torch.from_numpy(out)

    def forward(self, x: Tensor | Codes | CodeTiles) -> Tensor | CodeTiles:
        if isinstance(x, Codes):
            return self._forward_codes(x)
        if isinstance(x, CodeTiles):
            return self._forward_tiles(x)
        if (self.gemv is not None and self.act.mode == 0 and x.dim() == 2 and self._gemv_rows(x.shape[0])
                and x.shape[1] == self.in_features):
            return self._forward_gemv(x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self.layer_name}: an input of shape {tuple(x.shape)}; this Linear layer "
                             f"takes {self.in_features} features in the last dimension")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        M = x2.shape[0]
        wp = self.wp
        W = wp.W[0]
        out = np.empty((M, self.out_features), np.float32)
        if self.act.mode == -1:
            s0, s1, s2 = self._coeffs_static()
            xf = x2.detach().contiguous().float().numpy()
            K.select_sum(xf, W, wp.shift, wp.neg, s0, s1, s2, self.relu, out)
        else:
            arr, mode, hi, mult, sx, ma = self._codes_input(x2)
            if self._gemv_rows(M):
                s0, s1, s2 = self._coeffs_static() if mode == 0 else self.coeffs(sx, ma)
                KV.gemv(arr, mode, hi, mult, self.gemv, s0, s1, s2, self.relu, out)
                return torch.from_numpy(out).reshape(*lead, self.out_features)
            if self.w1a1 is not None:
                self._w1a1_forward(arr, mode, hi, mult, sx, ma, out)
                return torch.from_numpy(out).reshape(*lead, self.out_features)
            if self.amx8 is not None:
                self._amx8_forward(arr, mode, hi, mult, sx, ma, out)
                return torch.from_numpy(out).reshape(*lead, self.out_features)
            if self.amx is not None and self.amx_min_rows <= M:
                y = self._amx_out(KA.amx_rows(arr, mode, hi, mult), M, *self._amx_coeffs(sx, ma), out,
                                  tiles=x.dim() == 2)
                return y if isinstance(y, CodeTiles) else y.reshape(*lead, self.out_features)
            if self.lut is not None and self.lut_min_rows <= M:
                self._lut_forward(arr, mode, hi, mult, sx, ma, out)
                return torch.from_numpy(out).reshape(*lead, self.out_features)
            i8 = self.i8
            if i8 is not None and not self._rows(M):
                # a 1x1 convolution over M "pixels" of K channels
                t0, t1 = self._coeffs8_static() if mode == 0 else self.coeffs8(sx, ma)
                xq = K.int8_quantize(arr.reshape(M, 1, 1, -1), (0, 0), hi, mult, mode)
                geo = np.array([1, 1, self.in_features, 1, 1, 1, 1, M, self.out_features], np.int64)
                K.int8_conv(xq, geo, i8.qoff(1, self.in_features), i8.w, i8.passes, t0, t1, self.relu, out)
                return torch.from_numpy(out).reshape(*lead, self.out_features)
            s0, s1, s2 = self._coeffs_static() if mode == 0 else self.coeffs(sx, ma)
            X, A = K.pack_rows(arr, self.act.bits, hi, mult, mode)
            if M <= ROWS_MAX:
                K.gemm_rows(X, A, W, wp.shift, wp.neg, s0, s1, s2, self.relu, out)
            else:
                Xc = np.ascontiguousarray(X.transpose(1, 2, 0))[None]
                K.gemm_cols(Xc, A[None], wp.W, wp.shift, wp.neg, s0, s1, s2, out.reshape(M, -1, 1), self.relu)
        return torch.from_numpy(out).reshape(*lead, self.out_features)


    def _forward_tiles(self, x: CodeTiles) -> Tensor | CodeTiles:
        """Rows of codes in the AMX tile layout from a linked producer (static coefficients); to
        the next linked layer as tiles again where it runs these rows on AMX."""
        if x.features != self.in_features or self.amx is None:
            what = "" if self.amx is not None else " without AMX weights"
            raise RuntimeError(f"{self.layer_name}: code tiles of {x.features} features for a layer of "
                               f"{self.in_features} inputs{what}")
        M = x.rows
        out = np.empty((M, self.out_features), np.float32)
        return self._amx_out(x.buf, M, *self._amx_coeffs(self.act.sx, self.act.ma), out)

    def _amx_out(self, xq: np.ndarray, M: int, s0: np.ndarray, s1: np.ndarray, out: np.ndarray,
                 tiles: bool = True) -> Tensor | CodeTiles:
        """The AMX product of M rows in the tile layout (``kernels_amx.amx_rows``): the next layer's
        :class:`CodeTiles` where it is linked (``tile_target``) and runs these rows on AMX, else the
        float rows ``out`` (M, O) as a tensor."""
        tt = self.tile_target
        if tiles and tt is not None and tt.min_rows <= M:
            codes = KA.code_tiles(M, self.out_features)
            KA.amx_linear_tiles(xq, M, self.amx, s0, s1, self.relu, None, codes, tt.hi, tt.mult, tiles=True)
            return CodeTiles(codes, M, self.out_features)
        KA.amx_linear_tiles(xq, M, self.amx, s0, s1, self.relu, out)
        return torch.from_numpy(out)

    def _forward_codes(self, x: Codes) -> Tensor | CodeTiles:
        """Rows of codes (``(M, 1, 1, K)``, from a fused producer: static coefficients)."""
        M, kin = x.shape[0], x.shape[3]
        if kin != self.in_features or x.shape[1:3] != (1, 1):
            raise RuntimeError(
                f"{self.layer_name}: codes of shape {x.shape}, expected rows of {self.in_features}"
            )
        O = self.out_features
        out = np.empty((M, O), np.float32)
        i8 = self.i8
        if self._gemv_rows(M):
            _, qp, coef = self._gemv_static()
            KV.gemv_run(x.buf[: M * kin].reshape(M, kin), 1, qp, self.gemv, coef, self.relu, out)
        elif self.w1a1 is not None:
            self._w1a1_forward(x.buf[: M * kin].reshape(M, kin), 1, 0.0, 0.0, self.act.sx,
                               self.act.ma, out)
        elif self.amx8 is not None:
            codes = x.buf[: M * kin].reshape(M, kin)
            self._amx8_forward(codes, 1, 0.0, 0.0, self.act.sx, self.act.ma, out)
        elif self.amx is not None and self.amx_min_rows <= M:
            xq = KA.amx_rows(x.buf[: M * kin].reshape(M, kin), 1)
            return self._amx_out(xq, M, *self._amx_coeffs(self.act.sx, self.act.ma), out)
        elif self.lut is not None and self.lut_min_rows <= M:
            codes = x.buf[: M * kin].reshape(M, kin).astype(np.float32)
            self._lut_forward(codes, 1, 0.0, 0.0, self.act.sx, self.act.ma, out)
        elif i8 is not None and not self._rows(M):
            t0, t1 = self._coeffs8_static()
            geo = np.array([1, 1, kin, 1, 1, 1, 1, M, O], np.int64)
            K.int8_conv(x.buf, geo, i8.qoff(1, kin), i8.w, i8.passes, t0, t1, self.relu, out)
        else:
            s0, s1, s2 = self._coeffs_static()
            wp = self.wp
            X, A = K.pack_rows(x.buf[: M * kin].reshape(M, kin).astype(np.float32), self.act.bits)
            if M <= ROWS_MAX:
                K.gemm_rows(X, A, wp.W[0], wp.shift, wp.neg, s0, s1, s2, self.relu, out)
            else:
                Xc = np.ascontiguousarray(X.transpose(1, 2, 0))[None]
                K.gemm_cols(Xc, A[None], wp.W, wp.shift, wp.neg, s0, s1, s2, out.reshape(M, -1, 1), self.relu)
        return torch.from_numpy(out)


class PackedConv2d(_PackedBase):
    def __init__(self, name: str, layer: nn.Conv2d, wp: WeightPlanes, act: ActSpec) -> None:
        super().__init__(name, wp, act, layer.bias)
        if layer.padding_mode != "zeros":
            raise NotPackableError(f"padding_mode={layer.padding_mode!r}")
        if isinstance(layer.padding, str):
            raise NotPackableError(f"padding={layer.padding!r}")
        self.in_channels = layer.in_channels
        self.kernel_size = tuple(layer.kernel_size)
        self.stride = tuple(layer.stride)
        self.padding = tuple(layer.padding)
        self.dilation = tuple(layer.dilation)
        self.groups = layer.groups
        self.ma_code = 0
        if act.mode == 0 and act.ma != 0:
            raise NotPackableError("fused activation quantizer with a zero point")
        self.lutc = None
        if K.HAS_VNNI and act.mode != -1 and act.bits <= 8 and self.groups == 1:
            kshape = (*self.kernel_size, self.in_channels)
            self.i8 = int8_weights(wp, kshape, self.dilation, split=True)
            # unsigned codes from 0 (padding tables are 0); not where the flat executor has AMX tiles
            # for the layer instead (the lookup kernel was measured on a CPU without them)
            if self.i8 is not None and act.mode == 0 and not amx_enabled():
                self.lutc = conv_lut_weights(wp, kshape, self.in_max_code().bit_length())

    def i8_abs_sums(self) -> np.ndarray:
        """(O,) float64 ``sum_r |w_int[o, r]|`` of the int8 weights (a bound on the integer sums)."""
        got = self.__dict__.get("_i8_abs")
        if got is None:
            folded = fold_integers(self.wp)
            assert folded is not None
            got = self.__dict__["_i8_abs"] = np.abs(folded[0]).sum(axis=1).astype(np.float64)
        return got

    def in_max_code(self) -> int:
        """The largest input code: ``rint(hi * mult)`` of the fused quantizer, else 255 (uint8)."""
        a = self.act
        return int(np.rint(np.float32(a.hi) * np.float32(a.mult))) if a.mode == 0 else 255

    def f32_coefficients(self, s0: np.ndarray, s1: np.ndarray) -> np.ndarray | None:
        """The float32 epilogue's coefficients for the codes of ``code_target`` (None where it does
        not apply: no code target, a float output, or a bound without room), cached per ``s0``."""
        ct = self.code_target
        if ct is None or self.emit_float or self.residual:
            return None
        key = (id(s0), ct.hi, ct.mult)
        got = self.__dict__.get("_f32")
        if got is None or got[0] != key or got[1] is not s0:
            sf, usable = KI.f32_coefficients(s0, s1, self.i8_abs_sums(), self.in_max_code(), ct.hi, ct.mult)
            got = self.__dict__["_f32"] = (key, s0, sf if usable else None)
        return got[2]

    def out_hw(self, H: int, W: int) -> tuple[int, int]:
        KH, KW = self.kernel_size
        OH = (H + 2 * self.padding[0] - self.dilation[0] * (KH - 1) - 1) // self.stride[0] + 1
        OW = (W + 2 * self.padding[1] - self.dilation[1] * (KW - 1) - 1) // self.stride[1] + 1
        return OH, OW

    def _ma_code(self, ma: float) -> int:
        mc = round(ma)
        if abs(mc - ma) > 1e-6:
            if any(self.padding):
                raise NotPackableError("zero padding is not on the activation grid")
            return 0
        return int(mc)

    def forward(self, x: Tensor | Codes, res: Tensor | None = None):
        if type(x) is not Codes:
            s = x.shape
            if len(s) != 4 or s[1] != self.in_channels:
                raise ValueError(f"{self.layer_name}: an input of shape {tuple(s)}; this Conv2d takes "
                                 f"(N, {self.in_channels}, H, W)")
        if self.i8 is not None:
            return self._forward_int8(x, res)
        N = x.shape[0]
        wp = self.wp
        O = self.out_features
        if self.act.mode == -1:
            return self._forward_float(x)
        arr, mode, hi, mult, sx, ma = self._codes_input(x)
        s0, s1, s2 = self._coeffs_static() if mode == 0 else self.coeffs(sx, ma)
        X, A, (OH, OW) = K.conv_pack(
            arr, self.act.bits, self.kernel_size, self.stride, self.padding, self.dilation, self.groups,
            hi, mult, mode, self._ma_code(ma),
        )
        out = np.empty((N, O, OH * OW), np.float32)
        K.gemm_cols(X, A, wp.W, wp.shift, wp.neg, s0, s1, s2, out, self.relu)
        return torch.from_numpy(out).view(N, O, OH, OW)

    def _plan(self, N: int, H: int, W: int) -> _Plan:
        """Geometry of the int8 kernels for an input of N x H x W (cached)."""
        cache = self.__dict__.setdefault("_plans", {})
        plan = cache.get((N, H, W))
        if plan is None:
            if len(cache) > 32:
                cache.clear()
            OH, OW = self.out_hw(H, W)
            ph, pw = self.padding
            dims = [H + 2 * ph, W + 2 * pw, self.in_channels, OH, OW, *self.stride, N, self.out_features]
            geo = np.array(dims, np.int64)
            assert self.i8 is not None
            plan = cache[(N, H, W)] = _Plan(geo, OH, OW, self.i8.qoff(W + 2 * pw, self.in_channels))
        return plan

    def _forward_int8(self, x: Tensor | Codes, res: Tensor | None = None):
        """NHWC all the way. The input is a float tensor read through a (N, H, W, C) view
        (contiguous when it is channels-last) and quantized, or :class:`Codes` from the previous
        layer. The float output is an NHWC array returned as a channels-last NCHW tensor; with a
        ``code_target`` the codes of the next layer come too (``(tensor, codes)``, or only the
        codes when ``emit_float`` is off). ``res``: the residual operand added before the ReLU."""
        i8 = self.i8
        assert i8 is not None
        a = self.act
        if type(x) is Codes:
            N, H, W, _ = x.shape
            if x.pad != self.padding:
                raise RuntimeError(f"{self.layer_name}: codes padded by {x.pad}, expected {self.padding}")
            xq = x.buf
            s0, s1 = self._static8 or self._coeffs8_static()
        else:
            N, _, H, W = x.shape
            if a.mode == 0:
                xq = K.int8_quantize(nhwc(x), self.padding, a.hi, a.mult, 0)
                s0, s1 = self._static8 or self._coeffs8_static()
            else:
                if a.mode == 2:  # the signed formula: one codes pass instead of encode
                    codes, sx, maf = self._codes_input(x)[0], a.sx, a.ma
                else:
                    codes, sx, maf = encode_codes(a, x.detach())
                xq = K.int8_quantize(codes.transpose(0, 2, 3, 1), self.padding, mode=1, ma=self._ma_code(maf))
                s0, s1 = self.coeffs8(sx, maf)
        plan = self._plan(N, H, W)
        OH, OW = plan.OH, plan.OW
        O = self.out_features
        resn = None
        if res is not None:
            resn = nhwc(res)
            if resn.shape != (N, OH, OW, O):
                return self._residual_fallback(xq, plan, s0, s1, res, N)
            if not resn.flags.c_contiguous:
                resn = np.ascontiguousarray(resn)
        ct = self.code_target
        out = np.empty((N, OH, OW, O), np.float32) if (self.emit_float or ct is None) else None
        if ct is not None:
            if plan.cgeo is None:
                plan.cgeo = ct.geometry(OH, OW)
            codes_out = ct.alloc(N, OH, OW, O)
            sf = self.f32_coefficients(s0, s1) if out is None and resn is None else None
            self._conv(xq, plan, s0, s1, self.relu, out, resn, codes_out.buf, plan.cgeo, ct.hi, ct.mult, sf)
        else:
            codes_out = None
            self._conv(xq, plan, s0, s1, self.relu, out, resn)
        y = None if out is None else as_nchw(out)
        if codes_out is None:
            return y
        return codes_out if y is None else (y, codes_out)

    def _conv(self, xq: np.ndarray, plan: _Plan, s0: np.ndarray, s1: np.ndarray, relu: bool,
              out: np.ndarray | None, res: np.ndarray | None = None, codes: np.ndarray | None = None,
              cgeo: np.ndarray | None = None, qhi: float = 0.0, qmult: float = 0.0,
              sf: np.ndarray | None = None) -> None:
        """The product and epilogue of ``kernels_int8.int8_conv`` on the padded code image ``xq``:
        by table lookup where the layer has the weights for it (``lutc``), else on the int8 kernel.
        The same outputs bit for bit (the same integer sums, the same epilogue)."""
        lc = self.lutc
        if lc is None:
            i8 = self.i8
            K.int8_conv(xq, plan.geo, plan.qoff, i8.w, i8.passes, s0, s1, relu, out, res, codes, cgeo, qhi,
                        qmult, sf)
            return
        if plan.koff is None:
            plan.koff = KL.lut_conv_offsets(*self.kernel_size, *self.dilation, int(plan.geo[1]), lc.tpix)
        g = plan.geo
        tab = KL.lut_conv_tables(xq, int(g[7] * g[0] * g[1]), self.in_channels, lc.lv, lc.cb)
        KL.lut_conv(tab, plan.geo, lc.tpix, plan.koff, lc.wq, lc.sums, s0, s1, relu, out, res, codes, cgeo,
                    qhi, qmult, sf)

    def kernel_name(self) -> str:
        return "lut" if self.lutc is not None else super().kernel_name()

    def _residual_fallback(self, xq, plan: _Plan, s0, s1, res, N):
        """A residual operand of another shape (broadcasting): add it in PyTorch."""
        O = self.out_features
        OH, OW = plan.OH, plan.OW
        out = np.empty((N, OH, OW, O), np.float32)
        self._conv(xq, plan, s0, s1, False, out)
        y = as_nchw(out) + res
        if self.relu:
            y = torch.relu(y)
        ct = self.code_target
        if ct is None:
            return y
        codes = Codes(K.int8_quantize(nhwc(y), ct.pad, ct.hi, ct.mult, 0), (N, OH, OW, O), ct.pad)
        return (y, codes) if self.emit_float else codes

    def _forward_float(self, x: Tensor) -> Tensor:
        wp = self.wp
        N, _, H, Wd = x.shape
        KH, KW = self.kernel_size
        OH = (H + 2 * self.padding[0] - self.dilation[0] * (KH - 1) - 1) // self.stride[0] + 1
        OW = (Wd + 2 * self.padding[1] - self.dilation[1] * (KW - 1) - 1) // self.stride[1] + 1
        # (N, C*KH*KW, L)
        cols = F.unfold(x.float(), self.kernel_size, self.dilation, self.padding, self.stride)
        G = self.groups
        Og = self.out_features // G
        s0, s1, s2 = self.coeffs(1.0, 0.0)
        L = OH * OW
        out = np.empty((N, self.out_features, L), np.float32)
        Cg = self.in_channels // G
        # unfold's reduction order is (c, ki, kj); the packed weights use (ki, kj, c)
        cols = cols.view(N, G, Cg, KH * KW, L).permute(0, 1, 4, 3, 2)  # (N, G, L, KH*KW, Cg)
        for g in range(G):
            rows = cols[:, g].reshape(N * L, wp.K).contiguous().numpy()
            sl = slice(g * Og, (g + 1) * Og)
            y = K.select_sum(rows, wp.W[g], wp.shift, wp.neg, s0[sl], s1[sl], s2[sl], self.relu)
            out[:, sl, :] = y.reshape(N, L, Og).transpose(0, 2, 1)
        return torch.from_numpy(out).view(N, self.out_features, OH, OW)


class PackedConv1d(PackedConv2d):
    """A Conv1d as a ``(k, 1)`` Conv2d over the ``(N, C, L, 1)`` view of its input (audio front
    ends, Whisper's encoder stem). ``stride[0]``, ``kernel_size[0]``, ``padding[0]`` and
    ``dilation[0]`` are the Conv1d's (model code reads them). Not linked to its neighbours (no
    batch-norm folding, residual or code links)."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x.unsqueeze(3)).squeeze(3)

    @property
    def weight(self) -> Tensor:
        return super().weight.squeeze(3)


def _as_conv2d_geometry(layer: nn.Conv1d) -> SimpleNamespace:
    """What PackedConv2d reads of a convolution, for a Conv1d seen as a (k, 1) Conv2d."""
    pad = layer.padding if isinstance(layer.padding, str) else (layer.padding[0], 0)
    return SimpleNamespace(bias=layer.bias, padding_mode=layer.padding_mode, padding=pad,
                           in_channels=layer.in_channels, kernel_size=(layer.kernel_size[0], 1),
                           stride=(layer.stride[0], 1), dilation=(layer.dilation[0], 1), groups=layer.groups)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def code_poolable(pool: nn.Module) -> bool:
    """A MaxPool2d that :class:`CodeMaxPool2d` can run (no padding, dilation, ceil mode)."""
    return (
        type(pool) is nn.MaxPool2d
        and _pair(pool.padding) == (0, 0)
        and _pair(pool.dilation) == (1, 1)
        and not pool.ceil_mode
        and not pool.return_indices
    )


class CodeMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` between two int8 layers, on the codes: the quantizer is non-decreasing, so
    pooling codes equals quantizing the pooled floats. Writes straight into the next layer's
    padded image (``target``), or with ``flat`` into the rows of a Linear layer that follows a
    ``flatten`` (channel-major, as flattening an NCHW tensor orders them)."""

    def __init__(self, pool: nn.MaxPool2d, target: CodeTarget, flat: bool = False) -> None:
        super().__init__()
        self.kernel_size = _pair(pool.kernel_size)
        self.stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
        self.target = target
        self.flat = flat

    def forward(self, x: Codes) -> Codes:
        N, H, W, C = x.shape
        (KH, KW), (SH, SW) = self.kernel_size, self.stride
        OH, OW = (H - KH) // SH + 1, (W - KW) // SW + 1
        ph, pw = x.pad
        if self.flat:
            out, cgeo = self.target.alloc(N, 1, 1, C * OH * OW), self.target.geometry(1, 1)
        else:
            out, cgeo = self.target.alloc(N, OH, OW, C), self.target.geometry(OH, OW)
        g = np.array([C, H + 2 * ph, W + 2 * pw, ph, pw, KH, KW, SH, SW, OH, OW, *cgeo, int(self.flat)],
                     np.int64)
        K.code_maxpool(x.buf, N, g, out.buf)
        return out

    def extra_repr(self) -> str:
        flat = ", flattened" if self.flat else ""
        return f"kernel_size={self.kernel_size}, stride={self.stride} (on codes{flat})"


def is_global_avgpool(m: nn.Module) -> bool:
    return type(m) is nn.AdaptiveAvgPool2d and _pair(m.output_size) == (1, 1)


class GlobalAvgPool2d(nn.Module):
    """``AdaptiveAvgPool2d(1)`` after an int8 layer: reads its NHWC float output directly and sums
    in float64, so the float32 mean is rounded once (PyTorch's float32 sums round at every step,
    which can move a value across the next quantizer's rounding boundary)."""

    def forward(self, x: Tensor) -> Tensor:
        out = K.global_avgpool(nhwc(x))
        return torch.from_numpy(out)[:, :, None, None]


def build_packed(name: str, layer: nn.Module) -> _PackedBase:
    """The packed replacement of a quantized Linear / Conv2d; raises NotPackableError otherwise."""
    conv1d = is_hf_conv1d(layer)
    if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)) and not conv1d:
        raise NotPackableError(f"{torch_type_name(layer)} is not a Linear, Conv1d or Conv2d (its quantized "
                               "weights run in PyTorch)")
    if weight_quantizer(layer) is None:
        raise NotPackableError("weight is not quantized")
    enc = encode_weight(layer)  # the stored encoding of a loaded (FrozenWeight) layer
    if conv1d:  # transformers' Conv1D: a Linear with the weight stored in x out
        if enc.branches:
            raise NotPackableError("residual (multi-branch) weight encodings are not packed")
        scale = enc.scale.t() if enc.scale.dim() == 2 else enc.scale
        enc = Encoded(enc.codes.t(), enc.levels, scale, enc.bits)
    groups = 1
    if isinstance(layer, nn.Conv1d):  # as a (k, 1) Conv2d
        scale = enc.scale.unsqueeze(3) if enc.scale.dim() == 3 else enc.scale
        enc = Encoded(enc.codes.unsqueeze(3), enc.levels, scale, enc.bits, enc.branches)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        groups = layer.groups
        # reduction order (ki, kj, c): the channels of one input pixel are contiguous bits
        enc = Encoded(enc.codes.permute(0, 2, 3, 1), enc.levels, enc.scale, enc.bits, enc.branches)
    wp = decompose_weight(enc, groups)
    act = act_spec(input_quantizer(layer))
    if isinstance(layer, nn.Linear) or conv1d:
        return PackedLinear(name, layer, wp, act)
    if isinstance(layer, nn.Conv1d):
        return PackedConv1d(name, _as_conv2d_geometry(layer), wp, act)  # type: ignore[arg-type]
    return PackedConv2d(name, layer, wp, act)
