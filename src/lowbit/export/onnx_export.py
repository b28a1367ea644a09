"""ONNX export of a fake-quantized model as a QuantizeLinear/DequantizeLinear (Q/DQ) graph.

``export_onnx(model, path, input_shape, opset=21)`` writes an ONNX model that computes the same
function as the PyTorch fake-quantized model (eval mode), to float rounding:

- **Weights** of quantized layers whose decoded values lie on an integer grid,
  ``w = (x - zero_point) * step`` (per tensor, or per output channel along the weight's channel
  axis: 0 for Linear/Conv, 1 for ConvTranspose and transformers' ``Conv1D``), become an
  integer constant ``x`` followed by ``DequantizeLinear``. The grid is found from the decoded
  weight itself, so binary (``+-alpha`` -> ``+-1``), ternary (``{-1, 0, 1} * alpha``), DoReFa
  k-bit (odd integers ``2i - (2^k - 1)`` times ``1/(2^k - 1)``), uniform and power-of-two
  codebooks (when they fit) all qualify. The integer type is the smallest that holds the
  grid: ``INT4``/``UINT4`` (opset >= 21), ``INT8``/``UINT8``, ``INT16`` (opset >= 21). ONNX
  zero points are integers, so DoReFa's levels ``(i - (2^k-1)/2) * 2/(2^k-1)`` (a half-integer
  zero point) need the odd-integer form: 1..3 bits fit INT4, 4..7 bits INT8, 8 bits INT16
  (INT8 impossible -> widened below opset 21).
- Weights whose values are on no such grid (TTQ's asymmetric ``{-W_n, 0, W_p}``, learned
  codebooks, too wide ranges) are **widened**: exported as the dequantized float weight.
  Exact too, but not stored as integers.
- **Activations** quantized on a layer's input by a uniform round-to-nearest quantizer with
  levels ``k * step`` (PACT, DoReFa, ...) become ``Clip(lo, hi) -> QuantizeLinear(step, 0)
  -> DequantizeLinear`` (UINT8 when ``lo >= 0``, else INT8). Whether a quantizer is of that
  form is checked numerically against its own forward; other activation quantizers
  (ceil-rounding, dynamic ranges) are exported as the float ops their forward traces to.
  When the layer's weight is float (full precision or widened) the same grid is written as
  float ops, ``Round(Clip(x, lo, hi) / step) * step``: onnxruntime's WeightBiasQuantization
  transformer (enabled at every optimisation level) turns "DequantizeLinear input + float
  weight" into an int8-quantized weight, which would change the function.

The returned :class:`OnnxReport` says, per layer, the ONNX weight type, whether it is exact
("lossless") or widened, and how the activation was exported.

The exported file computes this function in a **plain** ``onnxruntime.InferenceSession(path)``
(all default graph optimisations on). Two of those optimisations would change it, and the
graph is written so that neither applies:

- ``WeightBiasQuantization`` rounds the float bias of a ``Conv``/``ConvTranspose``/``Gemm``
  with a ``DequantizeLinear`` input to the int32 grid of input step x weight step (2% logit
  error on an MLP with binary weights and 4-bit inputs). It takes 1-D bias constants only: a
  Gemm's bias is written as ``(1, N)``, a convolution's bias as an ``Add`` after it.
- ``DequantizeLinear(integer weight) -> MatMul`` with a float input (``Linear`` on a 3-D input
  whose input is not quantized) becomes ``MatMulNBits``, which by default quantizes that input
  to int8 on the fly (~1% error). Every ``Linear`` with integer weights is written as one 2-D
  ``Gemm`` (``Reshape -> Gemm -> Reshape``), which it leaves alone.

Example inputs can be a shape, tensors (integer ids too) or keyword tensors; nested outputs
(tuples, dicts, ``ModelOutput``) become one ONNX output per tensor. The graph is produced by
the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) with custom symbolic
functions; INT4 constants, which torch has no dtype for, are written as INT8 and rewritten to
INT4 in the ONNX graph afterwards. A model that exporter cannot trace raises
:class:`OnnxExportError` saying why (the dynamo exporter cannot carry these symbolics, and it
needs ``onnxscript``, which lowbit does not require).
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
import os
import types
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_write, check_file_path
from ..nn.quantize import input_quantizer, quantizable_layers, weight_quantizer
from .packed import (
    _channel_axis,
    _method_name,
    check_finite,
    encode_weight,
    is_hf_conv1d,
    refresh_rnn_weights,
)

MIN_OPSET = 13  # per-axis DequantizeLinear
LEGACY_MAX_OPSET = 21

# (name, lo, hi, torch dtype used in the traced graph, minimum opset)
_WEIGHT_TYPES = [
    ("int4", -8, 7, torch.int8, 21),
    ("uint4", 0, 15, torch.uint8, 21),
    ("int8", -128, 127, torch.int8, 13),
    ("uint8", 0, 255, torch.uint8, 13),
    ("int16", -32768, 32767, torch.int16, 21),
]


@dataclass
class OnnxLayerRow:
    name: str
    w_method: str  # "float" when the weight is not quantized
    w_bits: int
    onnx_weight: str  # int4 | uint4 | int8 | uint8 | int16 | float32 ...
    per_axis: bool
    lossless: bool  # integer codes + DequantizeLinear reproduce the weight (to float rounding)
    widened: bool  # a quantized weight exported as dequantized floats
    max_abs_error: float
    a_method: str
    a_bits: int
    onnx_activation: str  # "none" | "uint8 Q/DQ" | "int8 Q/DQ" | "Clip/Round" | "float ops"
    note: str = ""


@dataclass
class OnnxReport:
    path: str
    opset: int
    rows: list[OnnxLayerRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "opset": self.opset, "rows": [asdict(r) for r in self.rows]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @property
    def widened(self) -> list[str]:
        return [r.name for r in self.rows if r.widened]

    def to_rich_table(self) -> Any:
        from rich.table import Table

        t = Table(title=f"ONNX export (opset {self.opset}): {self.path}")
        for c in (
            "layer",
            "weight",
            "W bits",
            "ONNX weight",
            "exact",
            "activation",
            "ONNX activation",
            "note",
        ):
            t.add_column(c)
        for r in self.rows:
            t.add_row(
                r.name,
                r.w_method,
                str(r.w_bits),
                r.onnx_weight + (" per-axis" if r.per_axis else ""),
                "yes" if r.lossless else ("widened" if r.widened else "-"),
                f"{r.a_method}/{r.a_bits}" if r.a_method != "float" else "float",
                r.onnx_activation,
                r.note,
            )
        return t


# ----------------------------------------------------------------------------------------------
# weights: integer grids
# ----------------------------------------------------------------------------------------------
@dataclass
class WeightGrid:
    qtype: str
    x: Tensor  # integer codes (traced dtype), same shape as the weight
    scale: Tensor  # float32, 0-d or (C,)
    zero_point: Tensor  # traced dtype, 0-d or (C,)
    max_abs_error: float
    axis: int = 0  # the channel axis of a per-channel scale
    calls: int = 0  # DequantizeLinear nodes written (a module called twice writes two)


def _group_step(vals: np.ndarray) -> tuple[float, np.ndarray] | None:
    """A step ``u`` with every value an integer multiple of it: ``(u, integers)`` or None."""
    vals = np.unique(vals)
    if vals.size == 0 or not np.all(np.isfinite(vals)):
        return None
    if np.all(vals == 0):
        return 1.0, np.zeros_like(vals, dtype=np.int64)
    bases = []
    if vals.size > 1:
        bases.append(float(np.min(np.diff(vals))))
    nz = np.abs(vals[vals != 0])
    bases.append(float(nz.min()))
    for base in bases:
        for k in range(1, 9):
            u = base / k
            if u <= 0 or not math.isfinite(u):
                continue
            r = vals / u
            ints = np.rint(r)
            if np.max(np.abs(ints)) > 65535:
                continue
            if np.max(np.abs(r - ints)) <= 1e-3:
                return _refit(vals, ints), ints.astype(np.int64)
    return None


def _refit(vals: np.ndarray, ints: np.ndarray) -> float:
    """The float32 step that reproduces ``vals`` from ``ints`` best (max error), starting from
    the least-squares step and trying its float32 neighbours."""
    u = float(np.dot(ints, vals) / np.dot(ints, ints))
    best, best_err = u, math.inf
    c = np.float32(u)
    cands = [c]
    for _ in range(4):
        cands = [
            np.nextafter(cands[0], np.float32(-np.inf)),
            *cands,
            np.nextafter(cands[-1], np.float32(np.inf)),
        ]
    v32 = vals.astype(np.float32)
    i32 = ints.astype(np.float32)
    for cand in cands:
        err = float(np.max(np.abs(i32 * cand - v32)))
        if err < best_err:
            best, best_err = float(cand), err
    return best


def weight_grid(w: Tensor, per_channel: bool, opset: int, axis: int = 0) -> WeightGrid | None:
    """Integer codes, scale and zero point with ``(x - zp) * scale == w`` (to float rounding), in
    the smallest ONNX integer type the opset allows; None if no grid fits (widen). Per channel,
    the channels run along ``axis`` (0: Linear/Conv, 1: ConvTranspose, transformers' Conv1D)."""
    wf = w.detach().to(torch.float32).cpu()
    W = wf.numpy().astype(np.float64)
    if per_channel:
        W = np.moveaxis(W, axis, 0)
    groups = [W[c].reshape(-1) for c in range(W.shape[0])] if per_channel else [W.reshape(-1)]
    steps, ranges = [], []
    for g in groups:
        res = _group_step(g)
        if res is None:
            return None
        u, ints = res
        steps.append(u)
        ranges.append((int(ints.min()), int(ints.max())))
    for qname, lo, hi, tdt, min_opset in _WEIGHT_TYPES:
        if opset < min_opset:
            continue
        zps = []
        for rmin, rmax in ranges:
            zlo, zhi = max(lo, lo - rmin), min(hi, hi - rmax)
            if zlo > zhi:
                break
            zps.append(min(max(0, zlo), zhi))
        if len(zps) != len(groups):
            continue
        scale = np.asarray(steps, dtype=np.float32)
        zp = np.asarray(zps, dtype=np.int64)
        if per_channel:
            shape = (-1,) + (1,) * (W.ndim - 1)
            s_b, z_b = scale.reshape(shape), zp.reshape(shape)
        else:
            s_b, z_b = scale.reshape(()), zp.reshape(())
        x = np.rint(W / s_b.astype(np.float64)).astype(np.int64) + z_b
        if x.size and (x.min() < lo or x.max() > hi):
            continue
        recon = (x - z_b).astype(np.float32) * s_b  # what DequantizeLinear computes
        if per_channel:
            x, recon = np.moveaxis(x, 0, axis), np.moveaxis(recon, 0, axis)
        err = float(np.max(np.abs(recon - wf.numpy()))) if W.size else 0.0
        tol = 4 * np.finfo(np.float32).eps * max(float(np.max(np.abs(W))) if W.size else 0.0, 1e-30)
        if err > tol:
            return None
        return WeightGrid(
            qtype=qname,
            x=torch.from_numpy(x).to(tdt),
            scale=torch.from_numpy(scale if per_channel else scale.reshape(())),
            zero_point=torch.from_numpy(zp if per_channel else zp.reshape(())).to(tdt),
            max_abs_error=err,
            axis=axis,
        )
    return None


class _WeightDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: Tensor, grid: WeightGrid) -> Tensor:
        return w.clone()

    @staticmethod
    def symbolic(g: Any, w: Any, grid: WeightGrid) -> Any:
        grid.calls += 1
        x = g.op("Constant", value_t=grid.x)
        s = g.op("Constant", value_t=grid.scale)
        z = g.op("Constant", value_t=grid.zero_point)
        if grid.scale.dim() == 1:
            return g.op("DequantizeLinear", x, s, z, axis_i=grid.axis)
        return g.op("DequantizeLinear", x, s, z)


class _DQParam(nn.Module):
    def __init__(self, grid: WeightGrid) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, w: Tensor) -> Tensor:
        return _WeightDQ.apply(w, self.grid)


# ----------------------------------------------------------------------------------------------
# activations: Clip -> QuantizeLinear -> DequantizeLinear
# ----------------------------------------------------------------------------------------------
@dataclass
class ActGrid:
    qtype: str  # uint8 | int8
    step: float
    lo: int
    hi: int


def _probe(lo: float, hi: float, n: int = 20000, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    span = max(hi - lo, 1e-6)
    parts = [
        torch.linspace(lo - span, hi + span, n // 2),
        lo + span * (torch.rand(n // 4, generator=g) * 3 - 1),
        torch.randn(n // 4, generator=g) * span,
        torch.tensor([0.0, lo, hi, -1e30, 1e30]),
    ]
    return torch.cat(parts).to(torch.float32)


def act_grid(aq: nn.Module) -> ActGrid | None:
    """The uniform round-to-nearest grid that ``aq`` implements, checked against its forward."""
    try:
        with torch.no_grad():
            enc = aq.encode(torch.linspace(-1, 1, 11))
            if enc.scale.numel() != 1 or enc.branches:
                return None
            vals = (enc.levels.to(torch.float32) * enc.scale.to(torch.float32).reshape(())).numpy()
            vals = np.sort(vals.astype(np.float64))
            if vals.size < 2:
                return None
            step = float(vals[1] - vals[0])
            if not step > 0:
                return None
            ks = vals / step
            ki = np.rint(ks)
            if np.max(np.abs(ks - ki)) > 1e-4 or np.any(np.diff(ki) != 1):
                return None
            lo, hi = int(ki[0]), int(ki[-1])
            if lo >= 0 and hi <= 255:
                qtype = "uint8"
            elif lo >= -128 and hi <= 127:
                qtype = "int8"
            else:
                return None
            step32 = np.float32(step)
            x = _probe(lo * step, hi * step)
            got = aq(x).to(torch.float32).numpy()
            xn = x.numpy()
            lo_v, hi_v = np.float32(lo) * step32, np.float32(hi) * step32
            y = np.clip(xn, lo_v, hi_v)
            q = np.clip(np.rint(y / step32), lo, hi)
            ref = (q * step32).astype(np.float32)
            frac = np.abs((y / step32) % 1.0 - 0.5)
            ok = (frac > 1e-3) & np.isfinite(xn)
            # same integer code everywhere (a code flip is an error of one step; dequantizing
            # q * step or q / n differs by float rounding only)
            if not np.all(np.abs(got[ok] - ref[ok]) <= 1e-3 * float(step32)):
                return None
            return ActGrid(qtype=qtype, step=float(step32), lo=lo, hi=hi)
    except Exception:
        return None


class _ActQDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, grid: ActGrid) -> Tensor:
        s = torch.tensor(grid.step, dtype=x.dtype)
        y = torch.clamp(x, float(grid.lo * s), float(grid.hi * s))
        return torch.round(y / s) * s

    @staticmethod
    def symbolic(g: Any, x: Any, grid: ActGrid) -> Any:
        s = torch.tensor(grid.step, dtype=torch.float32)
        lo = g.op("Constant", value_t=(torch.tensor(float(grid.lo), dtype=torch.float32) * s))
        hi = g.op("Constant", value_t=(torch.tensor(float(grid.hi), dtype=torch.float32) * s))
        tdt = torch.uint8 if grid.qtype == "uint8" else torch.int8
        sc = g.op("Constant", value_t=s)
        zp = g.op("Constant", value_t=torch.zeros((), dtype=tdt))
        y = g.op("Clip", x, lo, hi)
        q = g.op("QuantizeLinear", y, sc, zp)
        return g.op("DequantizeLinear", q, sc, zp)


class _ActRound(torch.autograd.Function):
    """The same grid as float ops: ``Round(Clip(x, lo, hi) / step) * step``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, grid: ActGrid) -> Tensor:
        return _ActQDQ.forward(ctx, x, grid)

    @staticmethod
    def symbolic(g: Any, x: Any, grid: ActGrid) -> Any:
        s = torch.tensor(grid.step, dtype=torch.float32)
        lo = g.op("Constant", value_t=(torch.tensor(float(grid.lo), dtype=torch.float32) * s))
        hi = g.op("Constant", value_t=(torch.tensor(float(grid.hi), dtype=torch.float32) * s))
        sc = g.op("Constant", value_t=s)
        y = g.op("Clip", x, lo, hi)
        return g.op("Mul", g.op("Round", g.op("Div", y, sc)), sc)


class _ActModule(nn.Module):
    def __init__(self, grid: ActGrid, qdq: bool = True) -> None:
        super().__init__()
        self.grid = grid
        self.qdq = qdq

    def forward(self, x: Tensor) -> Tensor:
        if self.qdq:
            return _ActQDQ.apply(x, self.grid)
        return _ActRound.apply(x, self.grid)


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def _to_int4(model: Any) -> int:
    """Rewrite the INT8/UINT8 constants of weight DequantizeLinear nodes whose values fit 4 bits
    into INT4/UINT4 (opset >= 21). Returns how many nodes were rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    count = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        consts = [producer.get(node.input[0]), producer.get(node.input[2])]
        if any(c is None or c.op_type != "Constant" for c in consts):
            continue
        arrs = [numpy_helper.to_array(c.attribute[0].t) for c in consts]
        if arrs[0].dtype == np.int8 and all(a.dtype == np.int8 for a in arrs):
            lo, hi, ttype = -8, 7, TensorProto.INT4
        elif all(a.dtype == np.uint8 for a in arrs):
            lo, hi, ttype = 0, 15, TensorProto.UINT4
        else:
            continue
        if any(a.size and (a.min() < lo or a.max() > hi) for a in arrs):
            continue
        for c, a in zip(consts, arrs, strict=True):
            t = helper.make_tensor(
                c.attribute[0].t.name or c.output[0], ttype, a.shape, a.astype(np.int64).reshape(-1).tolist()
            )
            c.attribute[0].t.CopyFrom(t)
        count += 1
    return count


def _gemm_layer(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or is_hf_conv1d(layer)


def _linear_as_gemm(self: nn.Module, x: Tensor) -> Tensor:
    """``nn.Linear`` (or transformers' ``Conv1D``) as one 2-D ``Gemm`` with a bias, whatever
    the input's rank.

    onnxruntime turns ``DequantizeLinear(integer weight) -> MatMul`` with a float input (a layer
    whose input is not quantized; the ``MatMul`` that ``Linear`` on a 3-D input exports to) into
    ``MatMulNBits``, which by default quantizes the float input to int8 on the fly (~1% logit
    error). It leaves a ``Gemm`` alone."""
    w = self.weight if is_hf_conv1d(self) else self.weight.t()  # in x out
    bias = self.bias if self.bias is not None else torch.zeros(w.shape[1], dtype=x.dtype)
    rows = x.reshape(-1, w.shape[0])
    act = self.__dict__.get("_lowbit_rows_act")
    if act is not None:
        rows = act(rows)
    y = torch.addmm(bias, rows, w)
    return y.reshape(*x.shape[:-1], w.shape[1])


class OnnxExportError(RuntimeError):
    """The model cannot be exported to ONNX (the message says why and what to try)."""


Inputs = Tensor | tuple[Any, ...] | list[Any] | Sequence[int]


def _example_args(model: nn.Module, inputs: Inputs | None, kwargs: dict[str, Any] | None) -> tuple[Any, ...]:
    """Positional example inputs: a shape (one sample, batch 1 of zeros added), a tensor, a tuple."""
    if inputs is None:
        if not kwargs:
            raise ValueError("export_onnx needs example inputs: a shape, a tensor, a tuple or kwargs=")
        return ()
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(v, Tensor) for v in inputs):
        return tuple(inputs)
    if isinstance(inputs, (tuple, list)) and all(type(v) is int for v in inputs):
        return (torch.zeros((1, *[int(v) for v in inputs]), dtype=_dtype(model)),)
    raise ValueError(
        f"example inputs must be a shape (ints, one sample without the batch dimension), a tensor or a "
        f"tuple of tensors; got {type(inputs).__name__}"
    )


@torch.no_grad()
def _run_example(wrapped: nn.Module, example: tuple[Tensor, ...], input_shape: Any) -> Any:
    """The model's outputs on the example; when ``input_shape`` is a shape the model fails on, a
    ValueError saying so and what input_shape means (a shape with the batch dimension included is
    the usual mistake: the shape without its first entry is suggested when the model runs on it)."""
    is_shape = isinstance(input_shape, (tuple, list)) and all(type(v) is int for v in input_shape)
    try:
        return wrapped(*example)
    except Exception as e:
        if not is_shape:
            raise
        cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        hint = "e.g. (1, 28, 28) for one 28x28 grey image"
        if len(input_shape) > 1:
            try:
                wrapped(torch.zeros((1, *input_shape[1:]), dtype=example[0].dtype), *example[1:])
                hint = f"e.g. {tuple(input_shape[1:])}, on which the model runs"
            except Exception:  # the shorter shape fails too: keep the generic example
                pass
        raise ValueError(
            f"the model failed on an example of shape {tuple(example[0].shape)} made from "
            f"input_shape={tuple(input_shape)}: {cause}; input_shape is ONE sample without the batch "
            f"dimension, {hint}"
        ) from e


def _flat_outputs(out: Any) -> list[Tensor]:
    """The tensors of a (nested) output in order: tensors, tuples/lists, dicts and ModelOutputs."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):  # transformers' ModelOutput is an OrderedDict of its set fields
        return [t for v in out.values() for t in _flat_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat_outputs(v)]
    return []


class _Flat(nn.Module):
    """Positional tensors in (keyword arguments by name), a flat tuple of output tensors out."""

    def __init__(self, model: nn.Module, n_args: int, kw_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.n_args = n_args
        self.kw_names = kw_names

    def forward(self, *xs: Tensor) -> tuple[Tensor, ...]:
        kw = dict(zip(self.kw_names, xs[self.n_args :], strict=True))
        return tuple(_flat_outputs(self.model(*xs[: self.n_args], **kw)))


def _prepare(m: nn.Module, opset: int) -> list[OnnxLayerRow]:
    """Swap weight quantizers for integer DequantizeLinear constants and activation quantizers for
    Q/DQ (or Clip/Round) in the copy ``m``; returns the per-layer table."""
    rows: list[OnnxLayerRow] = []
    for name, layer in quantizable_layers(m).items():
        wq, aq = weight_quantizer(layer), input_quantizer(layer)
        row = OnnxLayerRow(
            name=name,
            w_method="float",
            w_bits=32,
            onnx_weight="float32",
            per_axis=False,
            lossless=True,
            widened=False,
            max_abs_error=0.0,
            a_method="float",
            a_bits=32,
            onnx_activation="none",
        )
        if wq is not None:
            enc = encode_weight(layer)
            with torch.no_grad():
                w = layer.weight.detach().clone()
            axis = _channel_axis(enc)
            per_channel = axis is not None
            grid = weight_grid(w, per_channel, opset, axis or 0)
            row.w_method, row.w_bits = _method_name(wq), sum(int(e.bits) for e in _walk(enc))
            # Replace the parametrization chain in place (remove_parametrizations would edit the
            # parametrized class that this deep copy shares with the caller's model).
            plist = layer.parametrizations.weight  # type: ignore[union-attr]
            # a new Parameter: the latent one may be tied to a float twin (an embedding)
            plist.original = nn.Parameter(w.to(plist.original.dtype), requires_grad=False)
            for i in reversed(range(len(plist))):
                del plist[i]
            if grid is None:
                plist.append(nn.Identity())
                row.onnx_weight, row.lossless, row.widened = str(w.dtype).replace("torch.", ""), False, True
                row.note = "values on no integer grid the opset allows: dequantized float weight"
            else:
                plist.append(_DQParam(grid))
                row.onnx_weight, row.per_axis, row.max_abs_error = grid.qtype, per_channel, grid.max_abs_error
        if aq is not None:
            row.a_method, row.a_bits = _method_name(aq), int(aq.bits)
            agrid = act_grid(aq)
            if agrid is None:
                row.onnx_activation = "float ops"
                row.note = (
                    (row.note + "; " if row.note else "") + "activation quantizer is not uniform "
                    "round-to-nearest: exported as the float ops of its forward"
                )
            elif row.onnx_weight.startswith(("int", "uint")):
                layer.input_quantizer = _ActModule(agrid)
                row.onnx_activation = f"{agrid.qtype} Q/DQ"
            else:
                # A float weight behind a DequantizeLinear input is what onnxruntime's
                # WeightBiasQuantization looks for: it would quantize that weight to int8 (lossy).
                # The same grid as Clip/Round float ops keeps the weight float.
                layer.input_quantizer = _ActModule(agrid, qdq=False)
                row.onnx_activation = "Clip/Round"
        if not isinstance(getattr(layer, "weight", None), Tensor):  # an LSTM, an attention module
            row.w_method, row.onnx_weight = "-", "-"
            row.note = (row.note + "; " if row.note else "") + "its input; its weights are the rows below"
        if _gemm_layer(layer) and row.onnx_weight.startswith(("int", "uint")):
            layer.forward = types.MethodType(_linear_as_gemm, layer)
            if isinstance(getattr(layer, "input_quantizer", None), _ActModule):
                # quantize the 2-D rows (after the Reshape): onnxruntime's propagation of an INT8
                # Q/DQ pair through a Reshape writes an invalid QuantizeLinear (opset 21)
                layer.__dict__["_lowbit_rows_act"] = layer.input_quantizer
                layer.input_quantizer = nn.Identity()
        rows.append(row)
        rows.extend(_other_weight_rows(name, layer))
    return rows


def _other_weight_rows(name: str, layer: nn.Module) -> list[OnnxLayerRow]:
    """Rows for quantized weights not called ``weight`` (LSTM/GRU ``weight_ih_l0``, attention
    ``in_proj_weight``): the exporter folds their fake-quantized values into float constants of
    the ONNX LSTM / attention ops (exact, not stored as integers)."""
    out = []
    for param in getattr(layer, "parametrizations", {}) or {}:
        wq = weight_quantizer(layer, param)
        if param == "weight" or wq is None:
            continue
        enc = encode_weight(layer, param)
        out.append(OnnxLayerRow(
            name=f"{name}.{param}" if name else param, w_method=_method_name(wq),
            w_bits=sum(int(e.bits) for e in _walk(enc)), onnx_weight="float32", per_axis=False,
            lossless=False, widened=True, max_abs_error=0.0, a_method="float", a_bits=32,
            onnx_activation="none",
            note="RNN/attention weight: its quantized values as float constants of the fused op",
        ))
    return out


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    input_shape: Inputs | None = None,
    opset: int = 21,
    *,
    kwargs: dict[str, Tensor] | None = None,
    dynamic_batch: bool = True,
    input_name: str = "input",
    output_name: str = "output",
) -> OnnxReport:
    """Export a (fake-)quantized model to ONNX with Q/DQ nodes; returns the per-layer table.

    Example inputs, so that any model exports (language models take integer ids):

    - ``input_shape``: one sample without the batch dimension (e.g. ``(1, 28, 28)``; a float
      batch of one is made), or a tensor, or a tuple of tensors (positional arguments);
    - ``kwargs``: keyword tensor arguments (``input_ids=..., attention_mask=...``).

    Inputs are named ``input`` (one positional tensor), ``input_<i>``, or by their keyword;
    outputs ``output`` (one tensor) or ``output_<i>``, the tensors of a nested output (tuple,
    dict, ``ModelOutput``) in order. The model itself is not modified (a copy is exported, in
    eval mode). The graph is what onnxruntime's *default* session runs unchanged (see
    :func:`_protect_biases`).

    A model with a NaN/Inf parameter or buffer (a diverged run) is refused with a ValueError that
    names them. NaN *inputs* are not propagated by the Q/DQ graph: onnxruntime's QuantizeLinear
    gives NaN the code 0 (the element reads as 0) where the PyTorch model outputs NaN; check
    inputs before running the graph where that matters.
    """
    import onnx

    if not isinstance(opset, int) or not MIN_OPSET <= opset <= LEGACY_MAX_OPSET:
        raise ValueError(f"opset must be an integer in [{MIN_OPSET}, {LEGACY_MAX_OPSET}], got {opset!r}")
    kwargs = dict(kwargs or {})
    bad = [k for k, v in kwargs.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"kwargs {bad} are not tensors; ONNX inputs are tensors (pass other options to "
                         "the model's constructor or config)")
    check_file_path(path, "model.onnx")  # before the (slow) trace
    # NaN initializers would export silently and run as finite numbers in onnxruntime
    check_finite(itertools.chain(model.named_parameters(), model.named_buffers()), "cannot export to ONNX")
    refresh_rnn_weights(model)
    m = copy.deepcopy(model).cpu().eval()
    args = tuple(a.cpu() for a in _example_args(m, input_shape, kwargs))
    rows = _prepare(m, opset)
    wrapped = _Flat(m, len(args), list(kwargs))
    example = args + tuple(v.cpu() for v in kwargs.values())
    in_names = [f"{input_name}_{i}" for i in range(len(args))]
    if len(args) == 1 and not kwargs:
        in_names = [input_name]
    in_names += list(kwargs)
    n_out = len(_run_example(wrapped, example, input_shape))
    if n_out == 0:
        raise OnnxExportError("the model's output holds no tensor to export")
    out_names = [output_name] if n_out == 1 else [f"{output_name}_{i}" for i in range(n_out)]
    dyn = None
    if dynamic_batch:
        dyn = {n: {0: "batch"} for n in in_names + out_names}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped,
                example,
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=in_names,
                output_names=out_names,
                do_constant_folding=True,
                dynamic_axes=dyn,
            )
    except Exception as e:
        raise OnnxExportError(_exporter_message(model, e)) from e
    proto = onnx.load_from_string(buf.getvalue())
    n4 = _to_int4(proto) if opset >= 21 else 0
    # a module called twice writes its weight's DequantizeLinear twice
    planned = sum(g.calls for g in _grids(m) if g.qtype in ("int4", "uint4")) if opset >= 21 else 0
    if n4 != planned:
        raise RuntimeError(f"ONNX rewrite: {n4} INT4/UINT4 weights written, {planned} planned")
    _protect_biases(proto)
    onnx.checker.check_model(proto)
    atomic_write(path, proto.SerializeToString(), "model.onnx")
    return OnnxReport(path=str(path), opset=opset, rows=rows)


def _grids(m: nn.Module) -> list[WeightGrid]:
    return [p.grid for p in m.modules() if isinstance(p, _DQParam)]


def _exporter_message(model: nn.Module, e: Exception) -> str:
    """Why the export failed and what can be done (the Q/DQ symbolics need the TorchScript exporter)."""
    try:
        import onnxscript  # noqa: F401

        dynamo = "the dynamo exporter (torch.onnx.export(..., dynamo=True)) can export the float model"
    except ImportError:
        dynamo = "the dynamo exporter would need the onnxscript package, which is not installed"
    hint = ""
    if "aten::diff" in str(e):  # transformers' packed-sequence check, run when no mask is given
        hint = " Pass the attention mask too (kwargs={'input_ids': ..., 'attention_mask': ...})."
    return (
        f"the TorchScript ONNX exporter cannot trace {type(model).__name__}: {type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}. lowbit writes its integer Q/DQ weights through "
        f"that exporter; {dynamo}, but without lowbit's integer weights. For transformers models, "
        "try attn_implementation='eager' in the config; otherwise export the parts that trace." + hint
    )


def _protect_biases(proto: Any) -> int:
    """Make the graph immune to onnxruntime's WeightBiasQuantization (on in every default session).

    That transformer looks for ``Conv``/``ConvTranspose``/``Gemm`` whose input comes from a
    per-tensor ``DequantizeLinear`` and whose bias is a 1-D constant, and rewrites the bias as
    ``DequantizeLinear(int32(round(b / (s_x * s_w))), s_x * s_w)``: the float bias is rounded to
    the grid of the product of the input and weight steps (0.02 relative logit error, 0.7% of
    top-1 flips on an MLP with binary weights and 4-bit inputs). Here a Gemm's bias becomes a
    ``(1, N)`` constant (Gemm broadcasts it; the transformer only takes 1-D biases) and a
    convolution's bias an ``Add`` of a ``(1, C, 1, ...)`` constant after it. The function is
    unchanged. Returns how many nodes were changed."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1

    def const(name: str) -> Any:
        if name in inits:
            return inits[name]
        p = producer.get(name)
        if p is not None and p.op_type == "Constant" and p.attribute and p.attribute[0].name == "value":
            return p.attribute[0].t
        return None

    changed = 0
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type not in ("Gemm", "Conv", "ConvTranspose") or len(node.input) < 3 or not node.input[2]:
            continue
        t = const(node.input[2])
        if t is None:
            continue
        b = numpy_helper.to_array(t)
        if b.ndim != 1:
            continue
        if node.op_type == "Gemm":
            if users.get(node.input[2], 0) != 1:  # a shared constant: give this node its own
                new = numpy_helper.from_array(b.reshape(1, -1), f"{node.input[2]}_{changed}_2d")
                graph.initializer.append(new)
                node.input[2] = new.name
            else:
                t.CopyFrom(numpy_helper.from_array(b.reshape(1, -1), t.name))
            changed += 1
            continue
        rank = _conv_rank(node, const)
        if rank is None:
            continue
        new = numpy_helper.from_array(b.reshape((1, -1) + (1,) * rank), f"{node.input[2]}_{changed}_nd")
        graph.initializer.append(new)
        out = node.output[0]
        node.output[0] = f"{out}_before_bias"
        del node.input[2]
        nodes.append(helper.make_node("Add", [node.output[0], new.name], [out], name=f"{node.name}_bias"))
        changed += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return changed


def _conv_rank(node: Any, const: Any) -> int | None:
    """Number of spatial dimensions of a Conv/ConvTranspose (from its kernel), None if unknown."""
    for a in node.attribute:
        if a.name == "kernel_shape":
            return len(a.ints)
    w = const(node.input[1])
    if w is not None:
        return len(w.dims) - 2
    return None


def _walk(enc: Any) -> list[Any]:
    out = [enc]
    for b in enc.branches:
        out.extend(_walk(b))
    return out


def _dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


Feed = Tensor | np.ndarray | tuple[Any, ...] | dict[str, Any]


def run_onnx(path: str | os.PathLike[str], x: Feed, optimize: bool = True) -> np.ndarray:
    """Run an exported model in a plain onnxruntime session (CPU; the default graph optimisations,
    as users run it) and return its first output. ``x``: one input, a tuple of inputs in order,
    or a dict by input name. ``optimize=False`` turns all graph optimisations off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, onnx_feed(sess, x))[0]


def onnx_feed(sess: Any, x: Feed) -> dict[str, np.ndarray]:
    """The input dict of an onnxruntime session from one input, a tuple, or a dict by name."""
    names = [i.name for i in sess.get_inputs()]

    def arr(v: Any) -> np.ndarray:
        a = v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
        return a.astype(np.float32) if a.dtype == np.float64 else a

    if isinstance(x, dict):
        return {k: arr(v) for k, v in x.items()}
    vals = list(x) if isinstance(x, (tuple, list)) else [x]
    if len(vals) != len(names):
        raise ValueError(f"the model takes inputs {names}, got {len(vals)} value(s)")
    return {n: arr(v) for n, v in zip(names, vals, strict=True)}
