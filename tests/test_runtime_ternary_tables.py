"""Ternary PackedLinear layers on an AMX CPU hold no lookup tables: the GEMV takes up to
``GEMV_MAX_ROWS`` rows and AMX every row count from there, so the tables would never run; the
memory count drops by their bytes and every row count still gives the same bits. Binary layers
keep theirs (faster than AMX below ``AMX_MIN_ROWS_LUT[1]`` rows). The decision is taken before the
tables are packed (a ternary layer never builds them), and where AMX is absent (switched off, or the
plain path) the tables are built and run, equal to the exact integer reference."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn.quantize import input_quantizer
from lowbit.runtime import _amx, _jit
from lowbit.runtime import kernels_amx as KA
from lowbit.runtime import kernels_gemm as KG
from lowbit.runtime import kernels_gemv as KV
from lowbit.runtime import kernels_lut3 as KL3
from lowbit.runtime.compiler import reference_fp64
from lowbit.runtime.layers import PackedLinear, build_packed, fold_integers, lut_form

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


@needs_amx
def test_idle_tables_are_never_built(monkeypatch):
    """The ternary layer decides from its code bits that AMX leaves the tables idle and never packs
    them (the packer raises here); a binary layer, which keeps its tables, does call it."""

    def refuse(*args):
        raise AssertionError("lookup tables packed")

    monkeypatch.setattr(KG, "lut_pack_weights", refuse)
    monkeypatch.setattr(KL3, "lut3_pack_weights", refuse)
    pl = build_packed("fc", _layer({"method": "twn", "bits": 2}))
    assert pl.amx is not None and pl.lut is None and pl.tables_idle(2)
    with pytest.raises(AssertionError, match="lookup tables packed"):
        build_packed("fc", _layer({"method": "binary", "bits": 1}))


@pytest.mark.parametrize("base3", [True, False], ids=["base3", "nibble"])
@pytest.mark.parametrize("path", ["amx-off", "plain"])
def test_tables_built_and_exact_without_amx(path, base3, monkeypatch):
    """Without AMX (switched off, or the plain path) the ternary layer packs its tables once and runs
    8-20 rows on them (the base-3 tables of ``kernels_lut3``, or with them switched off the 4-bit
    ones of ``kernels_gemm``), bit for bit the exact integer reference's epilogue."""
    lin = _layer({"method": "twn", "bits": 2})
    if KA.backend() == "vnni":  # the once-per-process probe packs and runs a layer of its own: first
        KA.ternary_vnni_rows()
    packs, gemms = [], []
    mod, pname, gname = (KL3, "lut3_pack_weights", "lut3_gemm") if base3 else (KG, "lut_pack_weights",
                                                                                 "lut_gemm")
    pack, gemm = getattr(mod, pname), getattr(mod, gname)
    monkeypatch.setattr(mod, pname, lambda *a: packs.append(1) or pack(*a))
    monkeypatch.setattr(mod, gname, lambda *a, **k: gemms.append(1) or gemm(*a, **k))
    monkeypatch.setattr(KL3, "ENABLED", base3)
    monkeypatch.setattr(_amx, "HAS_AMX", False)
    x = torch.randn(20, 520) * 2
    if path == "plain":
        _jit.set_plain(True)
    try:
        pl = build_packed("fc", lin)
        # no AMX: the VNNI register tiles take the expanded fields where the CPU has VNNI, from more
        # rows than these
        assert (pl.amx is not None) == (KA.backend() == "vnni") and pl.amx_min_rows > 20
        assert pl.lut is not None and packs == [1] and not pl.tables_idle(pl.lut.cb)
        assert pl.lut.base3 == base3 and ("base-3 lut" in pl.kernel_name()) == base3
        assert (pl.gemv is None) == (path == "plain" or not _jit.HOST_VNNI)
        with torch.inference_mode():
            got = {M: pl(x[:M]).numpy() for M in (KG.LUT_MIN_ROWS, 11, 20)}
    finally:
        if path == "plain":
            _jit.set_plain(False)
    assert len(gemms) == 3
    w_int = fold_integers(pl.wp)[0]
    s0, s1 = pl.coeffs_lut(pl.act.sx, pl.act.ma)
    for M, y in got.items():
        codes = input_quantizer(lin).encode(x[:M]).codes.long().numpy()
        np.testing.assert_array_equal(y, KG.lut_gemm_reference(codes, w_int, s0, s1, pl.relu))


@pytest.mark.parametrize("vals", [[-1, 1], [-1, 0, 1], [-3, -1, 1, 3], [0, 1], [0], [-2, 0, 2],
                                  [-1, 0, 1, 2, 3]])
def test_lut_form_is_levels_where_the_tables_fit(vals):
    """lut_form (which skips counting the levels where no table can fit) gives the levels exactly
    where kernels_gemm.lut_fits accepts them, for every activation width."""
    w = np.random.default_rng(len(vals)).choice(np.array(vals, np.int64), size=(19, 23))
    for ka in range(1, 9):
        levels = KG.lut_levels(w)
        want = levels if levels is not None and KG.lut_fits(*levels, ka) else None
        got = lut_form(w, ka)
        assert (got is None) == (want is None), (vals, ka)
        if got is not None:
            np.testing.assert_array_equal(got[0], want[0])
            assert got[1] == want[1]
