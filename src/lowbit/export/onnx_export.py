"""ONNX export of a fake-quantized model as a QuantizeLinear/DequantizeLinear (Q/DQ) graph.

``export_onnx(model, path, input_shape, opset=21)`` writes an ONNX model that computes the same
function as the PyTorch fake-quantized model (eval mode), to float rounding:

- **Weights** of quantized layers whose decoded values lie on an integer grid,
  ``w = (x - zero_point) * step`` (per tensor, or per output channel: ``axis=0``), become an
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

onnxruntime's default optimisations keep this function except in one place: a quantized
weight whose layer input is float (weight-only quantization, or an activation exported as float
ops) feeding a MatMul becomes ``MatMulNBits``, which by default computes with the input
quantized to int8 (``session.qdq_matmulnbits_accuracy_level`` 4): predictions agree, logits
move by ~1e-4. Set that session option to 1 (:data:`EXACT_SESSION_CONFIG`, used by
:func:`run_onnx`) for float32 compute. Layers with Q/DQ inputs are unaffected (integer
``MatMulIntegerToFloat`` / ``QLinearConv`` kernels, exact up to rounding).

What onnxruntime 1.31 (CPU) runs, measured when this was written: per-tensor and per-axis
``DequantizeLinear`` from INT8, UINT8, INT4, UINT4 and INT16 constants (opset 21), with all
graph optimisations on. The graph is produced by the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``; the default dynamo exporter needs ``onnxscript``,
which lowbit does not require) with custom symbolic functions; INT4 constants, which torch
has no dtype for, are written as INT8 and rewritten to INT4 in the ONNX graph afterwards.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._io import atomic_write
from ..nn.quantize import input_quantizer, quantizable_layers, weight_quantizer
from .packed import _method_name, encode_weight

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


def weight_grid(w: Tensor, per_channel: bool, opset: int) -> WeightGrid | None:
    """Integer codes, scale and zero point with ``(x - zp) * scale == w`` (to float rounding), in
    the smallest ONNX integer type the opset allows; None if no grid fits (widen)."""
    wf = w.detach().to(torch.float32).cpu()
    W = wf.numpy().astype(np.float64)
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
        if x.min() < lo or x.max() > hi:
            continue
        recon = (x - z_b).astype(np.float32) * s_b  # what DequantizeLinear computes
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
        )
    return None


class _WeightDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: Tensor, grid: WeightGrid) -> Tensor:
        return w.clone()

    @staticmethod
    def symbolic(g: Any, w: Any, grid: WeightGrid) -> Any:
        x = g.op("Constant", value_t=grid.x)
        s = g.op("Constant", value_t=grid.scale)
        z = g.op("Constant", value_t=grid.zero_point)
        if grid.scale.dim() == 1:
            return g.op("DequantizeLinear", x, s, z, axis_i=0)
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


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    input_shape: Sequence[int],
    opset: int = 21,
    *,
    dynamic_batch: bool = True,
    input_name: str = "input",
    output_name: str = "output",
) -> OnnxReport:
    """Export a (fake-)quantized model to ONNX with Q/DQ nodes; returns the per-layer table.

    ``input_shape`` is one sample without the batch dimension (e.g. ``(1, 28, 28)``). The model
    itself is not modified (a copy is exported, in eval mode).
    """
    import onnx

    if not isinstance(opset, int) or not MIN_OPSET <= opset <= LEGACY_MAX_OPSET:
        raise ValueError(f"opset must be an integer in [{MIN_OPSET}, {LEGACY_MAX_OPSET}], got {opset!r}")
    m = copy.deepcopy(model).cpu().eval()
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
            per_channel = any(e.scale.numel() > 1 for e in _walk(enc))
            grid = weight_grid(w, per_channel, opset)
            row.w_method, row.w_bits = _method_name(wq), sum(int(e.bits) for e in _walk(enc))
            # Replace the parametrization chain in place (remove_parametrizations would edit the
            # parametrized class that this deep copy shares with the caller's model).
            plist = layer.parametrizations.weight  # type: ignore[union-attr]
            with torch.no_grad():
                plist.original.data = w.to(plist.original.dtype)
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
        rows.append(row)
    dummy = torch.zeros((1, *[int(s) for s in input_shape]), dtype=_dtype(m))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m,
            (dummy,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[input_name],
            output_names=[output_name],
            do_constant_folding=True,
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None,
        )
    proto = onnx.load_from_string(buf.getvalue())
    n4 = _to_int4(proto) if opset >= 21 else 0
    planned = sum(r.onnx_weight in ("int4", "uint4") for r in rows)
    if n4 != planned:
        raise RuntimeError(f"ONNX rewrite: {n4} INT4/UINT4 weights written, {planned} planned")
    onnx.checker.check_model(proto)
    atomic_write(path, proto.SerializeToString())
    return OnnxReport(path=str(path), opset=opset, rows=rows)


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


# onnxruntime turns "DequantizeLinear(constant int weight) -> MatMul" whose other input is float
# (a layer whose input is not quantized) into MatMulNBits, and by default (accuracy level 4)
# that kernel quantizes the float input to int8 on the fly: faster, but no longer the function
# the graph states (errors ~1e-4 relative). Accuracy level 1 keeps float32 compute.
EXACT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}


def run_onnx(
    path: str | os.PathLike[str], x: Tensor | np.ndarray, optimize: bool = True, exact: bool = True
) -> np.ndarray:
    """Run an exported model on onnxruntime (CPU) and return its first output.

    ``exact=True`` applies :data:`EXACT_SESSION_CONFIG` (see there); ``optimize=False`` turns
    all graph optimisations off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if exact:
        for k, v in EXACT_SESSION_CONFIG.items():
            so.add_session_config_entry(k, v)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    return sess.run(None, {sess.get_inputs()[0].name: arr.astype(np.float32)})[0]
