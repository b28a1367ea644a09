"""Packed low-bit inference on CPU (numba kernels): ``lowbit.runtime.compile(model, x)``.

>>> packed = lowbit.runtime.compile(quantized_model, example_batch)
>>> packed = lowbit.runtime.load("m.lowbit")   # from a file's stored codes, no re-quantizing
>>> y = packed(x)                 # same function as the fake-quantized model, packed kernels
>>> print(packed.summary())       # which layers run packed, which stay in PyTorch

Linear (and transformers' ``Conv1D``), Conv1d and Conv2d layers with binary, ternary and k-bit
(uniform) weights are packed; other layers (LSTM, attention's own projections) run in PyTorch,
listed with the reason. Binary, ternary and k-bit weights times k-bit activations (unsigned or
signed grids) run with exact integer
accumulation, float only for the per-channel epilogue (folded batch norm, ReLU, residual
addition): on CPUs with AVX-512 VNNI as int8 dot products on uint8 activation codes in NHWC
order, with each layer writing the next layer's codes, Linear layers at 1-7 rows as a GEMV on
1/2/4/8-bit weight fields (``kernels_gemv.py``) and from 8 rows on AMX tiles where the CPU has
them; otherwise as bit-serial popcount GEMMs on bit planes. Layers without an activation quantizer use
additions of selected inputs. See ``kernels.py`` for the arithmetic, ``compiler.py`` for the
graph fusion; the speed benchmark is ``benchmarks/speed/`` of the source checkout.
``set_plain(True)`` (or ``LOWBIT_RUNTIME_PLAIN=1``) makes layers packed afterwards ignore the
AVX-512 VNNI kernels, as on a CPU without them.
"""

from ._jit import plain, set_plain
from .compiler import LayerReport, PackedModel, compile
from .layers import NotPackableError, PackedConv1d, PackedConv2d, PackedLinear, decompose_weight
from .load import load

__all__ = [
    "LayerReport",
    "NotPackableError",
    "PackedConv1d",
    "PackedConv2d",
    "PackedLinear",
    "PackedModel",
    "compile",
    "decompose_weight",
    "load",
    "plain",
    "set_plain",
]
