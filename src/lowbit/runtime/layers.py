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
``sx * (code - ma)``. PACT and DoReFa activations are computed inside the packing kernel with the
quantizer's own float32 formula (``rint(clip(x, 0, hi) * mult)``, checked against ``encode`` at
compile time); other quantizers with uniform levels go through ``encode`` at every call; a layer
without input quantizer takes float activations (sums of selected inputs, no multiplications).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.quantize import input_quantizer, weight_quantizer
from ..quant.base import ActivationQuantizer, Encoded
from ..quant.dorefa import DoReFaActivation
from ..quant.pact import PACTActivation
from . import kernels as K

log = logging.getLogger(__name__)

# Linear layers with at most this many rows use the rows layout; more rows use the cols layout
ROWS_MAX = 8


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


# ----------------------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------------------


@dataclass
class ActSpec:
    """How a layer's input becomes codes. mode 0: fused clip quantizer; 1: ``encode`` each call;
    -1: no quantizer (float activations)."""

    quantizer: ActivationQuantizer | None
    mode: int
    bits: int = 0
    hi: float = 0.0  # float32 value
    mult: float = 0.0  # float32 value
    sx: float = 1.0
    ma: float = 0.0

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
    if q is None:
        return ActSpec(None, -1)
    n = 2**q.bits - 1
    if type(q) is DoReFaActivation:
        return ActSpec(q, 0, q.bits, hi=1.0, mult=float(np.float32(n)), sx=1.0 / n, ma=0.0)
    if type(q) is PACTActivation:
        alpha = q.alpha.detach().abs().clamp_min(1e-4).float()
        mult = float(((2**q.bits - 1) / alpha).float())
        step = float((alpha / (2**q.bits - 1)).float())
        return ActSpec(q, 0, q.bits, hi=float(alpha), mult=mult, sx=step, ma=0.0)
    return ActSpec(q, 1, q.bits)


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
        self.fused.append("bn")

    def fuse_relu(self) -> None:
        self.relu = True
        self.fused.append("relu")

    def coeffs(self, sx: float, ma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wp = self.wp
        alpha = wp.sw * sx * self.bn_scale
        s1 = alpha * wp.u
        s2 = alpha * wp.l0
        s0 = self.beta - alpha * ma * (wp.l0 * wp.K + wp.u * wp.C)
        return s0, s1, s2

    def _coeffs_static(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._static is None:
            self._static = self.coeffs(self.act.sx, self.act.ma)
        return self._static

    def _codes_input(self, x: Tensor) -> tuple[np.ndarray, int, float, float, float, float]:
        """(array, mode, hi, mult, sx, ma) for the packing kernels."""
        a = self.act
        if a.mode == 0:
            return x.detach().contiguous().float().numpy(), 0, a.hi, a.mult, a.sx, a.ma
        codes, sx, ma = encode_codes(a, x.detach())
        return codes, 1, 0.0, 0.0, sx, ma

    @property
    def weight_bytes(self) -> int:
        """Packed planes + float32 per-channel scale and bias."""
        return self.wp.packed_bytes + 8 * self.out_features

    def describe(self) -> str:
        wp = self.wp
        return (
            f"{wp.kind} w{wp.bits} ({wp.num_planes} plane{'s' if wp.num_planes > 1 else ''}) x "
            f"{self.act.name} act" + (f" +{'+'.join(self.fused)}" if self.fused else "")
        )

    def extra_repr(self) -> str:
        return f"{self.layer_name}: {self.describe()}"


class PackedLinear(_PackedBase):
    def __init__(self, name: str, layer: nn.Linear, wp: WeightPlanes, act: ActSpec) -> None:
        super().__init__(name, wp, act, layer.bias)
        self.in_features = layer.in_features

    def forward(self, x: Tensor) -> Tensor:
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
            s0, s1, s2 = self._coeffs_static() if mode == 0 else self.coeffs(sx, ma)
            X, A = K.pack_rows(arr, self.act.bits, hi, mult, mode)
            if M <= ROWS_MAX:
                K.gemm_rows(X, A, W, wp.shift, wp.neg, s0, s1, s2, self.relu, out)
            else:
                Xc = np.ascontiguousarray(X.transpose(1, 2, 0))[None]
                K.gemm_cols(Xc, A[None], wp.W, wp.shift, wp.neg, s0, s1, s2, out.reshape(M, -1, 1), self.relu)
        return torch.from_numpy(out).reshape(*lead, self.out_features)


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

    def _ma_code(self, ma: float) -> int:
        mc = round(ma)
        if abs(mc - ma) > 1e-6:
            if any(self.padding):
                raise NotPackableError("zero padding is not on the activation grid")
            return 0
        return int(mc)

    def forward(self, x: Tensor) -> Tensor:
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


def build_packed(name: str, layer: nn.Module) -> _PackedBase:
    """The packed replacement of a quantized Linear / Conv2d; raises NotPackableError otherwise."""
    wq = weight_quantizer(layer)
    if wq is None:
        raise NotPackableError("weight is not quantized")
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise NotPackableError(f"{type(layer).__name__} is not a Linear or Conv2d")
    with torch.no_grad():
        enc = wq.encode(layer.parametrizations.weight.original)  # type: ignore[union-attr]
    groups = 1
    if isinstance(layer, nn.Conv2d):
        groups = layer.groups
        # reduction order (ki, kj, c): the channels of one input pixel are contiguous bits
        enc = Encoded(enc.codes.permute(0, 2, 3, 1), enc.levels, enc.scale, enc.bits, enc.branches)
    wp = decompose_weight(enc, groups)
    act = act_spec(input_quantizer(layer))
    if isinstance(layer, nn.Linear):
        return PackedLinear(name, layer, wp, act)
    return PackedConv2d(name, layer, wp, act)
