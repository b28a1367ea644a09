"""lowbit.export: bit packing, the packed ``.lowbit`` format, size/BOPs reports, ONNX export.

>>> from lowbit.export import save_packed, load_packed, model_report, export_onnx
>>> save_packed(qmodel, "m.lowbit")              # codes bit-packed + scales + JSON header
>>> model = load_packed("m.lowbit")              # zoo models rebuild themselves
>>> model_report(qmodel, (1, 28, 28)).to_rich_table()
>>> export_onnx(qmodel, "m.onnx", (1, 28, 28))   # Q/DQ graph for onnxruntime (shape of one sample)
>>> export_onnx(lm, "lm.onnx", kwargs={"input_ids": ids, "attention_mask": mask})  # example inputs

ONNX support (``onnx``, ``onnxruntime``) and plots (``matplotlib``) are imported lazily.
"""

from __future__ import annotations

from typing import Any

from .bitpack import (
    Packing,
    PackingError,
    bits_for,
    choose_packing,
    pack_bits,
    pack_radix,
    unpack_bits,
    unpack_radix,
)
from .errors import FormatError
from .packed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FrozenWeight,
    PackedFile,
    encode_weight,
    frozen_layers,
    load_packed,
    read_packed,
    save_packed,
    thaw,
)
from .report import LayerRow, Report, model_report, report_from_file


def export_onnx(*args: Any, **kwargs: Any) -> Any:
    """See :func:`lowbit.export.onnx_export.export_onnx` (imports onnx lazily)."""
    from .onnx_export import export_onnx as _export

    return _export(*args, **kwargs)


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FormatError",
    "FrozenWeight",
    "LayerRow",
    "PackedFile",
    "Packing",
    "PackingError",
    "Report",
    "bits_for",
    "choose_packing",
    "encode_weight",
    "export_onnx",
    "frozen_layers",
    "load_packed",
    "model_report",
    "pack_bits",
    "pack_radix",
    "read_packed",
    "report_from_file",
    "save_packed",
    "thaw",
    "unpack_bits",
    "unpack_radix",
]
