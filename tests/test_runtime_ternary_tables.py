"""Ternary PackedLinear layers on an AMX CPU hold no lookup tables: the GEMV takes up to
``GEMV_MAX_ROWS`` rows and AMX every row count from there, so the tables would never run; the
memory count drops by their bytes and every row count still gives the same bits. Binary layers
keep theirs (faster than AMX below ``AMX_MIN_ROWS_LUT[1]`` rows)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.runtime import _amx
from lowbit.runtime import kernels_amx as KA
from lowbit.runtime import kernels_gemv as KV
from lowbit.runtime.compiler import reference_fp64
from lowbit.runtime.layers import PackedLinear, build_packed

needs_amx = pytest.mark.skipif(not _amx.amx_enabled(), reason="AMX-INT8 unavailable (CPU, OS or plain path)")
ACT = {"method": "pact", "bits": 4, "alpha_init": 3.0}


def _layer(weight: dict, K: int = 520, O: int = 530) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(K, O)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(lin, {"default": {"weight": weight, "activation": ACT}})
    return lin.eval()


@needs_amx
def test_ternary_layer_drops_tables_and_counts_it(monkeypatch):
    lin = _layer({"method": "twn", "bits": 2})
    pl = build_packed("fc", lin)
    assert isinstance(pl, PackedLinear) and pl.amx is not None and pl.gemv is not None
    assert pl.lut is None and pl.i8 is None and "lut" not in pl.kernel_name()
    assert pl.amx_min_rows == KA.AMX_MIN_ROWS <= KV.GEMV_MAX_ROWS + 1
    assert pl.runtime_bytes == pl.weight_bytes + pl.gemv.nbytes + pl.amx.nbytes
    x = torch.randn(20, 520) * 2
    rows = (1, KV.GEMV_MAX_ROWS, KV.GEMV_MAX_ROWS + 1, 11, 20)  # GEMV, then AMX
    with torch.inference_mode():
        got = {M: pl(x[:M]) for M in rows}
    # where AMX would start later than the GEMV ends, the tables fill the gap and are counted
    monkeypatch.setitem(KA.AMX_MIN_ROWS_LUT, 2, 12)
    kept = build_packed("fc", lin)
    assert kept.lut is not None and kept.lut.nbytes > 0 and kept.amx_min_rows == 12
    assert kept.runtime_bytes == pl.runtime_bytes + kept.lut.nbytes
    with torch.inference_mode():
        for M in rows:  # 8 and 11 rows on the tables here: the same bits
            np.testing.assert_array_equal(got[M].numpy(), kept(x[:M]).numpy())
            ref = reference_fp64(lin, x[:M])
            assert float((got[M].double() - ref).abs().max() / ref.abs().max()) < 1e-6


@needs_amx
def test_binary_layer_keeps_tables():
    pl = build_packed("fc", _layer({"method": "binary", "bits": 1}))
    assert pl.amx is not None and pl.lut is not None
    assert pl.amx_min_rows == KA.AMX_MIN_ROWS_LUT[1] > KV.GEMV_MAX_ROWS + 1
    assert pl.runtime_bytes == pl.weight_bytes + pl.gemv.nbytes + pl.amx.nbytes + pl.lut.nbytes
