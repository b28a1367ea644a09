"""Size and BOPs reports of quantized models and of ``.lowbit`` files.

A :class:`Report` has one :class:`LayerRow` per quantizable weight (a conv's, a linear's, any
module's >= 2-D weight, e.g. an LSTM's ``weight_hh_l0``) and totals. Byte counts are *what
save_packed writes*: ``model_report`` builds the very payload :func:`lowbit.export.save_packed`
would write (same code path), and ``report_from_file`` reads the tensors of the file, so

- ``row.code_bytes``  = bytes of the layer's packed code tensors (all encodings),
- ``row.scale_bytes`` = bytes of its codebooks and scales,
- ``row.float_bytes`` = bytes of what stays float for the layer (bias; the weight itself for a
  full-precision layer),
- ``other_bytes`` = every other stored tensor (batch norm, quantizer parameters ...),
- ``file_bytes`` = the whole file, headers included; ``compression = fp32_bytes / file_bytes``
  where ``fp32_bytes = 4 * parameters of the float model`` (latent weights stand for the
  quantized ones; batch-norm buffers and quantizer parameters such as PACT alpha do not count).

Bits: ``w_bits`` is the effective weight bit-width (the sum of the nominal bits of all
encodings, e.g. ``2 * branches`` for residual expansion; the dtype width, 32, for float
layers); ``a_bits`` the input quantizer's bits (32 when the input is not quantized).
``BOPs = MACs * w_bits * a_bits`` with MACs per input sample from
:func:`lowbit.models.layer_table` (a generic ``outputs * weight row length`` estimate for
custom layers that are neither conv nor linear).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_path
from ..nn.quantize import input_quantizer, quantizable_layers, quantizable_weights, weight_quantizer
from .packed import (
    FLOAT_DTYPES,
    _method_name,
    build_payload,
    load_packed,
    read_packed,
)


@dataclass
class LayerRow:
    name: str
    type: str
    shape: tuple[int, ...]
    w_method: str  # "float" for a full-precision weight
    w_bits: int
    a_method: str  # "float" for an unquantized input
    a_bits: int
    params: int  # weight + bias elements
    code_bytes: int
    scale_bytes: int
    float_bytes: int
    macs: int | None = None

    @property
    def packed_bytes(self) -> int:
        """Bytes the layer occupies in the file (codes + scales/codebooks + float tensors)."""
        return self.code_bytes + self.scale_bytes + self.float_bytes

    @property
    def bops(self) -> int | None:
        return None if self.macs is None else self.macs * self.w_bits * self.a_bits

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["packed_bytes"] = self.packed_bytes
        d["bops"] = self.bops
        return d


@dataclass
class Report:
    rows: list[LayerRow]
    fp32_bytes: int
    other_bytes: int
    file_bytes: int
    input_shape: tuple[int, ...] | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    # ---- totals ---------------------------------------------------------------------------
    @property
    def packed_bytes(self) -> int:
        """All tensor bytes in the file (layers + other state), headers excluded."""
        return sum(r.packed_bytes for r in self.rows) + self.other_bytes

    @property
    def header_bytes(self) -> int:
        return self.file_bytes - self.packed_bytes

    @property
    def compression(self) -> float:
        """FP32 bytes / whole-file bytes."""
        return self.fp32_bytes / self.file_bytes if self.file_bytes else float("inf")

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def total_macs(self) -> int | None:
        if any(r.macs is None for r in self.rows):
            return None
        return sum(r.macs or 0 for r in self.rows)

    @property
    def total_bops(self) -> int | None:
        if any(r.bops is None for r in self.rows):
            return None
        return sum(r.bops or 0 for r in self.rows)

    def totals(self) -> dict[str, Any]:
        return {
            "layers": len(self.rows),
            "params": self.total_params,
            "fp32_bytes": self.fp32_bytes,
            "packed_bytes": self.packed_bytes,
            "code_bytes": sum(r.code_bytes for r in self.rows),
            "scale_bytes": sum(r.scale_bytes for r in self.rows),
            "float_bytes": sum(r.float_bytes for r in self.rows),
            "other_bytes": self.other_bytes,
            "header_bytes": self.header_bytes,
            "file_bytes": self.file_bytes,
            "compression": self.compression,
            "macs": self.total_macs,
            "bops": self.total_bops,
        }

    # ---- output ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "rows": [r.as_dict() for r in self.rows],
            "totals": self.totals(),
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_rich_table(self) -> Any:
        """A ``rich.table.Table`` with one line per layer and a totals line."""
        from rich.table import Table

        t = Table(title=f"lowbit size report{(' — ' + self.source) if self.source else ''}")
        for col, just in (
            ("layer", "left"),
            ("type", "left"),
            ("weight", "left"),
            ("W bits", "right"),
            ("A bits", "right"),
            ("params", "right"),
            ("packed B", "right"),
            ("MACs", "right"),
            ("BOPs", "right"),
        ):
            t.add_column(col, justify=just)  # type: ignore[arg-type]

        def num(v: int | None) -> str:
            return "-" if v is None else f"{v:,}"

        for r in self.rows:
            t.add_row(
                r.name,
                r.type,
                r.w_method,
                str(r.w_bits),
                str(r.a_bits),
                num(r.params),
                num(r.packed_bytes),
                num(r.macs),
                num(r.bops),
            )
        t.add_section()
        t.add_row(
            "total",
            "",
            f"+{self.other_bytes:,} B other, {self.header_bytes:,} B header",
            "",
            "",
            num(self.total_params),
            num(self.file_bytes),
            num(self.total_macs),
            num(self.total_bops),
        )
        t.caption = (
            f"file {self.file_bytes:,} B vs FP32 {self.fp32_bytes:,} B: {self.compression:.2f}x smaller"
        )
        return t

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write a PNG with two panels: bits per layer and packed bytes per layer."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        import numpy as np

        names = [r.name for r in self.rows]
        x = np.arange(len(names))
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.5 * len(names) + 3), 7), sharex=True)
        try:
            ax1.bar(x - 0.2, [r.w_bits for r in self.rows], 0.4, label="weight bits")
            ax1.bar(x + 0.2, [r.a_bits for r in self.rows], 0.4, label="activation bits")
            ax1.set_ylabel("bits")
            ax1.set_yscale("log", base=2)
            ax1.legend()
            ax1.set_title(f"{self.source or 'model'}: {self.compression:.1f}x smaller than FP32")
            ax2.bar(x, [r.code_bytes for r in self.rows], label="codes")
            ax2.bar(
                x,
                [r.scale_bytes for r in self.rows],
                bottom=[r.code_bytes for r in self.rows],
                label="scales",
            )
            ax2.bar(
                x,
                [r.float_bytes for r in self.rows],
                bottom=[r.code_bytes + r.scale_bytes for r in self.rows],
                label="float",
            )
            ax2.set_ylabel("packed bytes")
            ax2.set_xticks(x)
            ax2.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
            ax2.legend()
            fig.tight_layout()
            p = Path(path)
            with atomic_path(p, "report.png") as tmp:
                fig.savefig(tmp, format="png", dpi=100)
        finally:
            plt.close(fig)
        return p


# ----------------------------------------------------------------------------------------------
def _macs_by_layer(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    from ..models import layer_table

    macs = {row.name: int(row.macs) for row in layer_table(model, input_shape)}
    layers = quantizable_layers(model)
    custom = [n for n in layers if n not in macs]
    if custom:  # generic estimate: each output element uses one weight row
        counts: dict[str, int] = dict.fromkeys(custom, 0)
        handles = []
        for n in custom:
            m = layers[n]

            def hook(mod: nn.Module, args: Any, out: Any, n: str = n) -> None:
                w = getattr(mod, "weight", None)  # (RNN and attention weights: not estimated)
                if isinstance(out, torch.Tensor) and out.dim() > 0 and isinstance(w, torch.Tensor):
                    counts[n] += (out.numel() // out.shape[0]) * (w.numel() // w.shape[0])

            handles.append(m.register_forward_hook(hook))
        modes = {m: m.training for m in model.modules()}
        first = next(iter(model.parameters()), None)
        try:
            model.eval()
            with torch.no_grad():
                model(torch.zeros((1, *input_shape), dtype=first.dtype if first is not None else None))
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
        macs.update(counts)
    return macs


def _float_bits(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() * 8


def model_report(model: nn.Module, input_shape: Sequence[int] | None = None) -> Report:
    """Report of a quantized model; byte counts are exactly those ``save_packed`` writes.

    ``input_shape`` (one sample, no batch dimension, e.g. ``(1, 28, 28)``) enables MACs/BOPs.
    """
    payload = build_payload(model)
    file_bytes = len(payload.to_bytes())
    macs = _macs_by_layer(model, input_shape) if input_shape is not None else {}
    rows = []
    seen: set[int] = set()
    for name, (layer, param) in quantizable_weights(model).items():
        hdr = payload.header["layers"][name]
        wq = weight_quantizer(layer, param)
        aq = input_quantizer(layer) if id(layer) not in seen else None
        seen.add(id(layer))
        counts = payload.layer_bytes[name]
        bias = getattr(layer, "bias", None) if param == "weight" else None
        numel = int(torch.Size(hdr["shape"]).numel())
        rows.append(
            LayerRow(
                name=name,
                type=hdr["type"],
                shape=tuple(hdr["shape"]),
                w_method="float" if wq is None else _method_name(wq),
                w_bits=_float_bits(FLOAT_DTYPES[hdr["dtype"]])
                if wq is None
                else sum(e["bits"] for e in hdr["weight"]["encodings"]),
                a_method="float" if aq is None else _method_name(aq),
                a_bits=32 if aq is None else int(aq.bits),
                params=numel + (bias.numel() if isinstance(bias, torch.Tensor) else 0),
                code_bytes=counts["code_bytes"],
                scale_bytes=counts["scale_bytes"],
                float_bytes=counts["float_bytes"],
                macs=macs.get(name) if input_shape is not None else None,
            )
        )
    layer_total = sum(r.packed_bytes for r in rows)
    tensor_total = sum(t.numel() * t.element_size() for t in payload.tensors.values())
    return Report(
        rows=rows,
        fp32_bytes=4 * payload.header["fp32_params"],
        other_bytes=tensor_total - layer_total,
        file_bytes=file_bytes,
        input_shape=None if input_shape is None else tuple(input_shape),
        source=_source(model),
    )


def report_from_file(
    path: str | os.PathLike[str],
    input_shape: Sequence[int] | None = None,
    model: nn.Module | None = None,
) -> Report:
    """Report of a ``.lowbit`` file from its header and tensors alone; with ``input_shape`` the
    model is loaded (``model`` as for :func:`load_packed`) to count MACs/BOPs."""
    pf = read_packed(path)
    macs: dict[str, int] = {}
    notes = []
    if input_shape is not None:
        loaded = load_packed(path, model=model)
        macs = _macs_by_layer(loaded, input_shape)
    else:
        notes.append("no input_shape: MACs/BOPs not computed")
    rows = []
    counted = 0
    for name, rec in pf.layers.items():
        code_b = scale_b = float_b = 0
        if rec.weight is None:
            key = f"state/{rec.module}.{rec.param}" if rec.module else f"state/{rec.param}"
            float_b += _nb(pf.tensors[key]) if key in pf.tensors else 0
        else:
            for i in range(len(rec.weight["encodings"])):
                code_b += _nb(pf.tensors[f"quant/{name}/{i}/codes"])
                scale_b += _nb(pf.tensors[f"quant/{name}/{i}/levels"]) + _nb(
                    pf.tensors[f"quant/{name}/{i}/scale"]
                )
        bias = pf.tensors.get(f"state/{name}.bias") if rec.param == "weight" else None
        if bias is not None:
            float_b += _nb(bias)
        counted += code_b + scale_b + float_b
        numel = int(torch.Size(rec.shape).numel())
        rows.append(
            LayerRow(
                name=name,
                type=rec.type,
                shape=rec.shape,
                w_method="float" if rec.weight is None else rec.weight["method"],
                w_bits=_float_bits(rec.dtype)
                if rec.weight is None
                else sum(e["bits"] for e in rec.weight["encodings"]),
                a_method="float" if rec.activation is None else rec.activation["method"],
                a_bits=32 if rec.activation is None else int(rec.activation["bits"]),
                params=numel + (bias.numel() if bias is not None else 0),
                code_bytes=code_b,
                scale_bytes=scale_b,
                float_bytes=float_b,
                macs=macs.get(name) if input_shape is not None else None,
            )
        )
    tensor_total = sum(_nb(t) for t in pf.tensors.values())
    spec = pf.spec
    return Report(
        rows=rows,
        fp32_bytes=4 * pf.header["fp32_params"],
        other_bytes=tensor_total - counted,
        file_bytes=os.path.getsize(path),
        input_shape=None if input_shape is None else tuple(input_shape),
        source=str(spec["name"]) if spec else Path(path).name,
        notes=notes,
    )


def _nb(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _source(model: nn.Module) -> str:
    spec = getattr(model, "lowbit_spec", None)
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        return spec["name"]
    return type(model).__name__
