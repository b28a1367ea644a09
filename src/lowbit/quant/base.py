"""Quantizer base classes, the encoded form that export packs, and straight-through helpers.

A quantizer is an ``nn.Module`` whose ``forward(x)`` returns the fake-quantized tensor (same
shape and dtype) and whose backward is a chosen straight-through / coarse gradient. It also
``encode``s a tensor into integer codes plus the few floats that decode it::

    decode(codes) = levels[codes] * scale          (scale broadcasts: per tensor or per channel)

``levels`` is a small 1-D codebook (at most ``2**bits`` entries) shared by all channels, so
binary ({-1, +1}), ternary ({-1, 0, +1}), uniform integers, power-of-two sets and learned
asymmetric ternary (TTQ: {-W_n, 0, W_p}) all fit one packed layout.

Straight-through estimator, written so that the forward value is *exactly* the quantized one:

    out = q.detach() + (s(x) - s(x).detach())

``s(x) - s(x).detach()`` is exactly zero in floating point, so ``out == q`` bit for bit, and
its derivative is ``s'(x)``: the surrogate whose derivative replaces the a.e.-zero derivative
of the staircase (identity, ReLU or clipped ReLU; Yin et al., "Understanding straight-through
estimator in training activation quantized neural nets", ICLR 2019).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

Kind = Literal["weight", "activation"]
log = logging.getLogger(__name__)

#: Share of negative inputs above which an unsigned activation quantizer warns at initialisation.
NEGATIVE_SHARE_WARN = 0.25


class NegativeInputWarning(UserWarning):
    """An unsigned activation quantizer sees many negative inputs (they all become 0)."""


@dataclass
class Encoded:
    """Integer codes plus what decodes them: ``levels[codes] * scale``.

    ``branches`` holds further encodings whose decoded values are summed with this one
    (residual expansion); it is empty for ordinary quantizers.
    """

    codes: Tensor  # integer tensor, values in [0, len(levels))
    levels: Tensor  # 1-D float codebook
    scale: Tensor  # float, broadcastable to codes.shape (0-d or per output channel)
    bits: int
    branches: tuple[Encoded, ...] = ()

    def decode(self) -> Tensor:
        out = self.levels[self.codes.long()] * self.scale
        for b in self.branches:
            out = out + b.decode()
        return out

    @property
    def num_levels(self) -> int:
        return int(self.levels.numel())


def straight_through(q: Tensor, surrogate: Tensor) -> Tensor:
    """Return ``q`` in the forward pass with the gradient of ``surrogate`` in the backward pass."""
    return q.detach() + (surrogate - surrogate.detach())


def channel_reduce_dims(x: Tensor, axis: int = 0) -> tuple[int, ...]:
    """Dimensions to reduce for per-output-channel statistics (all but ``axis``)."""
    return tuple(d for d in range(x.dim()) if d != axis)


def per_channel_view(v: Tensor, like: Tensor, axis: int = 0) -> Tensor:
    """Reshape a length-C vector so it broadcasts against ``like`` along ``axis``."""
    shape = [1] * like.dim()
    shape[axis] = -1
    return v.reshape(shape)


def channel_rows(w: Tensor, axis: int = 0) -> Tensor:
    """``(C, M)``: one row per output channel (``C = w.shape[axis]``)."""
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def from_channel_rows(rows: Tensor, like: Tensor, axis: int = 0) -> Tensor:
    """Inverse of :func:`channel_rows`: ``(C, M)`` back to the shape of ``like``."""
    moved = like.movedim(axis, 0).shape
    return rows.reshape(moved).movedim(0, axis)


class Quantizer(nn.Module):
    """Base of all quantizers. Subclasses set ``kind``, ``name`` and ``bits_allowed``.

    Constructor keyword arguments (beyond ``bits``) are what a recipe may set for the method;
    the recipe validator reads them from the signature.
    """

    kind: ClassVar[Kind]
    name: ClassVar[str]
    bits_allowed: ClassVar[tuple[int, ...]]

    def __init__(self, bits: int) -> None:
        super().__init__()
        if bits not in self.bits_allowed:
            raise ValueError(
                f"{self.kind} quantizer {self.name!r} does not support bits={bits}; "
                f"allowed: {list(self.bits_allowed)}"
            )
        self.bits = int(bits)

    def encode(self, x: Tensor) -> Encoded:  # pragma: no cover - abstract
        raise NotImplementedError

    def is_initialized(self) -> bool:
        """Whether the data-dependent state (the ``initialized`` buffer of quantizers that set
        their scale from the first data they see) is set. Once true it is read from a Python
        flag: torch.compile then guards on the flag instead of breaking the graph on every call
        at ``bool(buffer)``, a data-dependent branch."""
        if self.__dict__.get("_initialized_flag", False):
            return True
        seen = bool(self.initialized)
        if seen and not torch.compiler.is_compiling():
            self.__dict__["_initialized_flag"] = True
        return seen

    def mark_initialized(self) -> None:
        """Set the ``initialized`` buffer (saved with the model) and its Python flag."""
        self.initialized.fill_(True)
        if not torch.compiler.is_compiling():
            self.__dict__["_initialized_flag"] = True

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.__dict__.pop("_initialized_flag", None)  # the loaded buffer decides again

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _cacheable(w: Tensor) -> bool:
    """A plain tensor outside tracing/compiling/export (those see fake or symbolic tensors and
    must record the quantizer's ops, not a cached constant)."""
    if type(w) not in (Tensor, nn.Parameter):
        return False
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting())


class WeightQuantizer(Quantizer):
    """A quantizer used as a ``torch.nn.utils.parametrize`` parametrization of a weight.

    ``channel_axis`` is the output-channel dimension of the weight that per-channel statistics
    keep (0 for Linear/ConvNd, 1 for ConvTransposeNd and transformers' ``Conv1D``; set by
    ``lowbit.quantize`` from the layer type or the recipe's ``channel_axis``). Per-channel
    scales have the broadcastable shape of size C along ``channel_axis`` and 1 elsewhere.

    Eval-mode cache: in eval mode and with gradients off (``torch.no_grad``/``inference_mode``)
    the quantized weight is computed once and reused while the latent weight and the quantizer's
    own parameters and buffers are unchanged (same tensors, same ``_version``); ``train()``
    drops it. With gradients on, every call re-quantizes, so gradients stay exact.
    """

    kind: ClassVar[Kind] = "weight"

    def __init__(self, bits: int, per_channel: bool = False) -> None:
        super().__init__(bits)
        self.per_channel = bool(per_channel)
        self.channel_axis = 0
        self._cache: tuple[tuple[Any, ...], Tensor] | None = None

    def per_channel_stats(self, w: Tensor) -> bool:
        """Whether statistics of ``w`` are taken per output channel."""
        return self.per_channel and w.dim() > 1

    def reduce_dims(self, w: Tensor) -> tuple[int, ...]:
        return channel_reduce_dims(w, self.channel_axis)

    def __call__(self, w: Tensor) -> Tensor:
        if self.training or torch.is_grad_enabled() or not _cacheable(w):
            self._cache = None
            return super().__call__(w)
        key = self._cache_key(w)
        if key is None:
            self._cache = None
            return super().__call__(w)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        out = super().__call__(w)
        key = self._cache_key(w)  # after the call: a lazy initialisation changes state
        self._cache = None if key is None else (key, out)
        return out

    def _cache_key(self, w: Tensor) -> tuple[Any, ...] | None:
        state = [w, *self.parameters(), *self.buffers()]
        if any(t.is_inference() for t in state):
            return None  # tensors made under inference_mode have no version counter to key on
        return (self.channel_axis, w.shape, w.dtype, w.device,
                *((id(t), t.data_ptr(), t._version) for t in state))

    def train(self, mode: bool = True) -> WeightQuantizer:
        self._cache = None
        return super().train(mode)

    def stored(self) -> WeightQuantizer:
        """The quantizer a packed file records for this one: itself. A training-time wrapper
        (BinaryRelax's relaxed weight) returns the quantizer it wraps, whose ``encode`` gives the
        same codes, so the file loads with the stored recipe alone and without training state."""
        return self

    def initialize(self, w: Tensor) -> None:
        """Set data-dependent state (learned scales, thresholds) from the float weight.

        Called once by ``quantize`` before the quantizer is attached; the default does nothing.
        """

    def preimage(self, enc: Encoded) -> Tensor | None:
        """A latent weight that this quantizer maps back onto ``enc`` (used when a packed file is
        loaded for fine-tuning), or None: the loader then tries the decoded weight itself and,
        where re-quantizing is not a fixed point, freezes the decoded weight."""
        return None

    def reduce_abs_mean(self, w: Tensor) -> Tensor:
        """mean|w| per tensor (0-d) or per output channel (broadcastable)."""
        if self.per_channel_stats(w):
            return w.abs().mean(dim=self.reduce_dims(w), keepdim=True)
        return w.abs().mean()

    def reduce_abs_max(self, w: Tensor) -> Tensor:
        if self.per_channel_stats(w):
            return w.abs().amax(dim=self.reduce_dims(w), keepdim=True)
        return w.abs().max()

    def extra_repr(self) -> str:
        axis = f", channel_axis={self.channel_axis}" if self.per_channel and self.channel_axis else ""
        return f"bits={self.bits}, per_channel={self.per_channel}{axis}"


CoarseGrad = Literal["identity", "relu", "clipped_relu"]


@dataclass(frozen=True)
class ActCodesSpec:
    """An activation quantizer as a clip-and-scale formula that packed kernels evaluate inline:

        code  = rint(clip(x, lo, hi) * mult) + offset   in float32 (lo, hi, mult float32 values)
        value = step * (code - zero)                    in float64, then rounded to float32

    ``code`` must equal ``encode(x).codes`` and ``value`` ``forward(x)`` in eval mode, bit for bit,
    for every float32 ``x``. The packed kernels sum integer codes exactly and apply ``step`` and
    ``zero`` in the float64 epilogue. Unsigned grids have ``lo = 0``, ``offset = 0``; a symmetric
    signed grid ``-Q..Q`` has ``lo = -hi`` and ``offset = zero = Q`` (its codes are ``0..2Q``)."""

    bits: int
    hi: float
    mult: float
    step: float
    zero: float = 0.0
    lo: float = 0.0
    offset: int = 0

    @property
    def signed(self) -> bool:
        """Whether the clip is below 0 (the codes carry an offset)."""
        return self.lo != 0.0


class ActivationQuantizer(Quantizer):
    """A quantizer applied to a layer's input. ``ste`` picks the coarse gradient.

    ``signed``: whether the grid is the symmetric signed one, ``-(2^(b-1)-1) .. 2^(b-1)-1`` times
    the step (``lsq``, ``uniform`` and ``pact`` offer it), or the unsigned ``0 .. 2^b-1`` (every
    quantizer's default). An unsigned quantizer maps every negative input to 0; at its first
    training batch it warns (once, naming ``layer_name``, set by ``lowbit.quantize``) when more
    than ``NEGATIVE_SHARE_WARN`` of the inputs are negative.
    """

    kind: ClassVar[Kind] = "activation"
    default_ste: ClassVar[CoarseGrad] = "clipped_relu"

    def __init__(self, bits: int, ste: CoarseGrad | None = None, signed: bool = False) -> None:
        super().__init__(bits)
        ste = ste or self.default_ste
        if ste not in ("identity", "relu", "clipped_relu"):
            raise ValueError(
                f"unknown coarse gradient ste={ste!r}; allowed: identity, relu, clipped_relu"
            )
        if not isinstance(signed, bool):
            raise ValueError(f"{self.name}: signed must be true or false, got {signed!r}")
        if signed and bits < 2:
            raise ValueError(f"{self.name}: signed=true needs bits >= 2 (1 signed bit is the grid {{0}}), "
                             f"got bits={bits}")
        if signed and ste == "relu":
            raise ValueError(f"{self.name}: ste='relu' would stop the gradient of every negative input of a "
                             "signed grid; allowed with signed=true: identity, clipped_relu")
        self.ste: CoarseGrad = ste
        self.signed = signed
        self.layer_name = ""
        self._sign_checked = False

    def check_sign(self, x: Tensor) -> None:
        """Warn once if this unsigned quantizer sees a large share of negative inputs."""
        if self.signed or self._sign_checked or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return  # (a traced or compiled graph would bake the check in)
        self._sign_checked = True
        share = float((x.detach() < 0).float().mean()) if x.numel() else 0.0
        if share > NEGATIVE_SHARE_WARN:
            where = f"layer {self.layer_name!r}" if self.layer_name else "a layer"
            msg = (f"unsigned {self.name} activation quantizer of {where}: {share:.0%} of its inputs are "
                   "negative and quantize to 0; use signed: true (lsq, uniform, pact) for signed inputs")
            log.warning(msg)
            warnings.warn(msg, NegativeInputWarning, stacklevel=3)

    def runtime_codes_spec(self) -> ActCodesSpec | None:
        """The eval-mode codes as an :class:`ActCodesSpec` formula, for the packed runtime; None
        (the default) when ``encode`` is not that formula: the runtime then calls ``encode``.

        The hook of every activation quantizer the runtime packs (the runtime never tests a
        quantizer's type). A quantizer returns a spec only when it reproduces ``encode`` and
        ``forward`` bit for bit for every float32 input: directly from its formula (PACT,
        DoReFa), or, for a division ``x / s`` (LSQ, uniform), by :func:`clip_multiply_spec` (signed
        grids: :func:`symmetric_multiply_spec`), which searches a multiplier and checks it at every
        code boundary. Quantizers whose codes depend on the batch (not yet initialised), a division
        no float32 multiplier reproduces, and ceil rounding (BCGD) return None."""
        return None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ste={self.ste}" + (", signed=True" if self.signed else "")


def _f32_of(bits_pattern: Any) -> Any:
    """float32 values of non-negative int64 bit patterns (numpy)."""
    import numpy as np

    return np.asarray(bits_pattern, np.int64).astype(np.int32).view(np.float32)


def clip_multiply_spec(codes: Any, bits: int, top: int, step: float, mult_hint: float) -> ActCodesSpec | None:
    """The clip-multiply form ``rint(clip(x, 0, hi) * mult)`` (float32) of an unsigned code
    function, if one reproduces it for every float32 ``x``; else None.

    ``codes(x)`` (a float32 tensor in, integer codes out) must be non-decreasing in ``x``, 0 for
    ``x <= 0`` and ``top`` at ``+inf``: LSQ's ``clip(round(x / s), 0, Q_P)``, uniform's
    ``clip(round(x / s), 0, L)``. A division by ``s`` is a multiplication by ``1/s`` only for a
    power-of-two ``s``, so the multiplier is searched: the boundaries ``b_k`` (the smallest float32
    with code ``>= k``, by bisection over the float32 bit patterns) are found from ``codes``
    itself, ``hi = b_top``, and the candidates ``mult_hint`` and its float32 neighbours (up to 8
    ulps away) are tried at every ``b_k`` and the float just below it. Two non-decreasing step
    functions equal at both sides of every step of one of them are equal everywhere, so a
    candidate that passes reproduces ``codes`` exactly (NaN aside). ``step`` is the value of code
    1 (``value = step * code``)."""
    import numpy as np

    probe = torch.tensor([-math.inf, -1e30, -1.0, -1e-30, -0.0, 0.0, math.inf], dtype=torch.float32)
    at = codes(probe).long().tolist()
    if at[:-1] != [0] * 6 or at[-1] != top:
        return None
    k = torch.arange(1, top + 1, dtype=torch.int64)
    lo = torch.zeros(top, dtype=torch.int64)  # code(lo) < k
    hi = torch.full((top,), 0x7F800000, dtype=torch.int64)  # code(hi) >= k (hi = +inf)
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        c = codes(torch.from_numpy(_f32_of(mid.numpy()))).long()
        up = c >= k
        hi = torch.where(up, mid, hi)
        lo = torch.where(up, lo, mid)
    b = hi.numpy()
    pts = np.concatenate([_f32_of(b), _f32_of(b - 1)])
    want = codes(torch.from_numpy(pts)).long().numpy()
    clip = np.float32(_f32_of(b[-1:])[0])
    ups, downs = [np.float32(mult_hint)], [np.float32(mult_hint)]
    for _ in range(8):
        ups.append(np.nextafter(ups[-1], np.float32(np.inf)))
        downs.append(np.nextafter(downs[-1], np.float32(0)))
    for m in [ups[0], *(v for pair in zip(ups[1:], downs[1:], strict=True) for v in pair)]:
        got = np.rint(np.minimum(np.maximum(pts, np.float32(0)), clip) * m)
        if np.array_equal(got.astype(np.int64), want):
            return ActCodesSpec(bits, hi=float(clip), mult=float(m), step=float(step))
    return None


def symmetric_multiply_spec(codes: Any, bits: int, q: int, step: float,
                            mult_hint: float) -> ActCodesSpec | None:
    """The signed form ``rint(clip(x, -hi, hi) * mult) + q`` (codes ``0..2q``, value ``step * (code -
    q)``) of a symmetric code function ``codes(x) = clip(round(x / s), -q, q) + q``, if one
    reproduces it for every float32 ``x``; else None.

    The positive half ``max(codes(x) - q, 0)`` is an unsigned code function: its clip-multiply form
    comes from :func:`clip_multiply_spec`. Rounding half to even and a symmetric clip are odd
    functions, and so is the formula, so the negative half follows; it is checked at the mirrored
    half-way points ``-(k + 1/2) * step`` (k = 0..q) and their float32 neighbours, where a rounding
    that is not symmetric (``floor(v + 1/2)``) would differ."""
    import numpy as np

    pos = clip_multiply_spec(lambda x: (codes(x).long() - q).clamp_min(0), bits, q, step, mult_hint)
    if pos is None:
        return None
    mid = -(np.arange(q + 1, dtype=np.float64) + 0.5) * step
    pts = np.concatenate([mid, -mid]).astype(np.float32)
    pts = np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)), np.nextafter(pts, np.float32(-np.inf)),
                          np.array([-np.inf, -pos.hi, np.inf], np.float32)])
    hi, m = np.float32(pos.hi), np.float32(pos.mult)
    got = np.rint(np.minimum(np.maximum(pts, -hi), hi) * m).astype(np.int64) + q
    want = codes(torch.from_numpy(pts)).long().numpy()
    if not np.array_equal(got, want):
        return None
    return ActCodesSpec(bits, hi=pos.hi, mult=pos.mult, step=pos.step, zero=float(q), lo=-pos.hi, offset=q)
