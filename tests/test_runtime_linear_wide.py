"""Linear layers with 5-8 bit weights (DoReFa, symmetric ``uniform``): the GEMV on 8-bit fields
(``kernels_gemv.WIDE_BITS``) bit for bit its integer reference on ragged shapes, 1 and 2 threads;
PackedLinear's dispatch (the GEMV below ``wide_amx_min_rows`` rows, AMX tiles from there, rows padded
to 16: from 8 rows for weights that fit int8, from 64 for DoReFa 8-bit's 3 int8 parts; the GEMV at
every row count without AMX; bit-serial on the plain path; a small layer's int8 copy in parts for
the flat executor), each path's outputs bit for bit its integer reference and within float
rounding of the float64 fake-quantized layer. No timing here."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
import lowbit.runtime as rt
from lowbit.runtime import _amx, _jit
from lowbit.runtime import kernels as K
from lowbit.runtime import kernels_amx as KA
from lowbit.runtime import kernels_gemv as KV
from lowbit.runtime import kernels_int8 as KI
from lowbit.runtime import layers as L
from lowbit.runtime.compiler import reference_fp64
from lowbit.runtime.kernels_pack import quantize_codes_reference
from lowbit.runtime.layers import Codes, build_packed, fold_integers, plane_integers

needs_vnni = pytest.mark.skipif(not K.HAS_VNNI, reason="the GEMV needs AVX-512 VNNI")
needs_amx = pytest.mark.skipif(not _amx.amx_enabled(), reason="AMX-INT8 unavailable (CPU, OS or plain path)")

RNG = np.random.default_rng(17)
PACT = {"method": "pact", "alpha_init": 3.0}
#: name -> (weight spec, activation spec); int8 parts of the folded weights in the comment
WIDE = {
    "w5a8": ({"method": "dorefa", "bits": 5}, {**PACT, "bits": 8}),   # 2i - 31: 1 part
    "w7a4": ({"method": "dorefa", "bits": 7}, {**PACT, "bits": 4}),   # 2i - 127: 1 part
    "w8a8": ({"method": "dorefa", "bits": 8}, {**PACT, "bits": 8}),   # 2i - 255: 3 parts
    "w8a4": ({"method": "dorefa", "bits": 8}, {**PACT, "bits": 4}),
    "u8a8": ({"method": "uniform", "bits": 8}, {**PACT, "bits": 8}),  # i - 127: 1 part
}


@pytest.fixture
def threads(threads, monkeypatch):
    """conftest's thread counts, with the GEMV's split forced on too."""
    monkeypatch.setattr(KV, "GEMV_MIN_PARALLEL_MACS", 1)
    return threads


def _layer(variant: str, K: int = 520, O: int = 530, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(K, O)
    w, a = WIDE[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(lin, {"default": {"weight": w, "activation": a}})
    return lin.eval()


def _spy(monkeypatch, mod, name: str) -> list[int]:
    """Row counts of the calls of ``mod.name``."""
    n: list[int] = []
    real = getattr(mod, name)

    def spy(x, *args, **kw):
        n.append(x.shape[0] if name != "amx_conv" else int(args[0][1]))  # amx_conv: geo's Wp = rows
        return real(x, *args, **kw)

    monkeypatch.setattr(mod, name, spy)
    return n


# ---------------------------------------------------------------------------------------------
# 8-bit fields
# ---------------------------------------------------------------------------------------------


def test_wide_fields_only_on_request_and_layout():
    q = RNG.integers(0, 256, (37, 100))
    q[0, :2] = (0, 255)
    assert KV.field_bits(q) is None  # the compact widths stop at 4 bits
    assert KV.field_bits(q, wide=True) == (8, 0)
    assert KV.field_bits(q - 127, wide=True) == (8, 127)
    assert KV.field_bits(q[:, :50] % 16, wide=True) == (4, 0)  # narrow weights keep narrow fields
    assert KV.field_bits(np.array([[0, 256]]), wide=True) is None
    with pytest.raises(ValueError, match="wider than 4 bits"):
        KV.GemvWeights(q)
    w = KV.pack_fields_fast(q, 8, 0)
    np.testing.assert_array_equal(w, KV.pack_fields(q, 8, 0))
    np.testing.assert_array_equal(KV.unpack_fields(w, 8, 37, 100), q)
    # block k, group g (4 reduction indices), byte 4*o + l: q[16k + o, 4g + l]
    v = w.reshape(3, 32, 16, 4)
    assert v[1, 5, 3, 2] == q[19, 22] and v[2, 24, 4, 3] == q[36, 99] and v[2, 24, 5, 3] == 0


@needs_vnni
@pytest.mark.parametrize("M", [1, 2, 3, 8, 15])  # every tile shape: 1, 2 and 4 rows, a ragged last tile
@pytest.mark.parametrize("shape", [(16, 32), (37, 100), (130, 64)])
def test_wide_gemv_bit_exact(M, shape, threads):
    O, Kr = shape
    q = RNG.integers(-100, 156, (O, Kr))  # 256 values, offset 100
    q.flat[:2] = (-100, 155)
    gw = KV.GemvWeights(q, wide=True)
    assert (gw.b, gw.off) == (8, 100)
    codes = RNG.integers(0, 256, (M, Kr))
    codes.flat[:2] = (0, 255)
    s0, s1, s2 = RNG.normal(size=(3, O))
    for relu in (False, True):
        out = np.full((M, O), np.nan, np.float32)
        KV.gemv(codes.astype(np.float32), 1, 0.0, 0.0, gw, s0, s1, s2, relu, out)
        np.testing.assert_array_equal(out, KV.gemv_reference(codes, q, s0, s1, s2, relu))
    # the integer sums themselves (s1 = 1): exact in float32 below 2**24
    one, zero = np.ones(O), np.zeros(O)
    out = np.empty((M, O), np.float32)
    KV.gemv(codes.astype(np.float32), 1, 0.0, 0.0, gw, zero, one, zero, False, out)
    np.testing.assert_array_equal(out.astype(np.int64), codes @ q.T)


# ---------------------------------------------------------------------------------------------
# PackedLinear
# ---------------------------------------------------------------------------------------------


def _codes(pl, x: torch.Tensor) -> np.ndarray:
    return quantize_codes_reference(x.numpy(), pl.act.hi, pl.act.mult).astype(np.int64)


def _check_fp64(lin, x, got) -> None:
    ref = reference_fp64(lin, x)
    assert float((got.double() - ref).abs().max() / ref.abs().max()) < 1e-6


@needs_amx
@pytest.mark.parametrize("variant", list(WIDE))
def test_packed_linear_wide_dispatch_bit_exact(variant, monkeypatch, threads):
    lin = _layer(variant)
    pl = build_packed("fc", lin)
    w_int, unit = fold_integers(pl.wp)
    parts = 3 if variant.startswith("w8") else 1
    assert KI.int8_parts(w_int) == parts
    assert pl.wide and pl.gemv.b == 8 and pl.amx is None and pl.lut is None
    assert pl.i8 is None  # a large layer: the 8-bit fields (and AMX weights) only
    rows = (1, 7, 8, 15, 16, 37, 64)
    assert pl.amx8 is not None and pl.amx8.parts == parts and pl.amx8.unit == unit
    assert f"amx on {parts} int8 part" in pl.kernel_name()
    assert pl.runtime_bytes == pl.weight_bytes + pl.gemv.nbytes + pl.amx8.nbytes
    assert pl.amx8.nbytes >= parts * 520 * 530
    if parts == 1:  # AMX from 8 rows on (padded to 16), the GEMV below
        assert pl.wide_amx_min_rows == L.WIDE_AMX_MIN_ROWS == 8
        want_amx, want_gemv = [16, 16, 16, 37, 64], [1, 7]
    else:  # 3 int8 parts: AMX from 64 rows
        assert pl.wide_amx_min_rows == L.WIDE_AMX_MIN_ROWS_PARTS == 64
        want_amx, want_gemv = [64], [1, 7, 8, 15, 16, 37]
    amx, gemv = _spy(monkeypatch, KI, "amx_conv"), _spy(monkeypatch, KV, "gemv_run")
    x = torch.randn(64, 520) * 2
    with torch.inference_mode():
        got = {M: pl(x[:M]) for M in rows}
    assert amx == want_amx and gemv == want_gemv
    q = plane_integers(pl.wp)
    for M in rows:
        codes = _codes(pl, x[:M])
        if pl._gemv_rows(M):
            want = KV.gemv_reference(codes, q, *pl._coeffs_static(), pl.relu)
        else:
            want = KA.amx_linear_reference(codes, w_int, *pl._amx8_coeffs(pl.act.sx, pl.act.ma), pl.relu)
        np.testing.assert_array_equal(got[M].numpy(), want)
        _check_fp64(lin, x[:M], got[M])
    # without AMX: the GEMV at every row count, no int8 copy
    monkeypatch.setattr(_amx, "HAS_AMX", False)
    pv = build_packed("fc", lin)
    assert pv.amx8 is None and pv.i8 is None and pv.gemv.b == 8
    with torch.inference_mode():
        for M in rows:
            y = pv(x[:M])
            want = KV.gemv_reference(_codes(pv, x[:M]), q, *pv._coeffs_static(), pv.relu)
            np.testing.assert_array_equal(y.numpy(), want)
            _check_fp64(lin, x[:M], y)


@needs_amx
def test_packed_linear_wide_codes_input(monkeypatch):
    """Rows of codes from a fused producer (``Codes``) take the GEMV and AMX paths too."""
    lin = _layer("w7a4", K=300, O=100)
    pl = build_packed("fc", lin)
    assert pl.amx8 is not None
    w_int, _ = fold_integers(pl.wp)
    q = plane_integers(pl.wp)
    for M in (5, 9, 33):
        codes = RNG.integers(0, 16, (M, 300)).astype(np.uint8)
        buf = np.concatenate([codes.reshape(-1), np.zeros(64, np.uint8)])
        got = pl(Codes(buf, (M, 1, 1, 300), (0, 0)))
        if M < L.WIDE_AMX_MIN_ROWS:
            want = KV.gemv_reference(codes, q, *pl._coeffs_static(), pl.relu)
        else:
            want = KA.amx_linear_reference(codes, w_int, *pl._amx8_coeffs(pl.act.sx, pl.act.ma), pl.relu)
        np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("variant", ["w8a8", "w5a8"])
def test_plain_path_runs_bit_serial(variant):
    _jit.set_plain(True)
    try:
        lin = _layer(variant, K=200, O=70)
        pl = build_packed("fc", lin)
        assert pl.gemv is None and pl.amx8 is None and pl.i8 is None
        assert pl.kernel_name() == "bit-serial"
        x = torch.randn(20, 200) * 2
        with torch.inference_mode():
            for M in (1, 20):
                _check_fp64(lin, x[:M], pl(x[:M]))
    finally:
        _jit.set_plain(False)


@needs_vnni
def test_small_wide_mlp_flat_equals_modules_and_fp64():
    """A small 8-bit MLP (int8 copies in parts, run by the flat executor) equals its modules and
    the float64 model."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(100, 60), nn.ReLU(), nn.Linear(60, 10)).eval()
    w, a = WIDE["w8a8"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(m, {"default": {"weight": w, "activation": a}})
    x = torch.randn(20, 100) * 2
    packed = rt.compile(m, x[:2])
    pls = list(packed.packed_layers().values())
    assert all(p.wide and p.i8 is not None for p in pls)
    assert [KI.int8_parts(fold_integers(p.wp)[0]) for p in pls] == [3, 3]
    assert [p.i8.geom.shape[0] for p in pls] == [3 * 25, 3 * 15]  # each quad once per part
    for M in (1, 20):
        with torch.inference_mode():
            y = packed(x[:M])
            ex, packed.executor = packed.executor, None
            try:
                ym = packed(x[:M])
            finally:
                packed.executor = ex
        np.testing.assert_array_equal(y.numpy(), ym.numpy())
        _check_fp64(m, x[:M], y)
