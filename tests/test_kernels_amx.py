"""AMX GEMM of many-row packed Linear layers (runtime/kernels_amx.py), and its VNNI register
tiles for CPUs without AMX: tile layouts and the field expansion against their NumPy references,
the product (both back ends) bit-exact against the integer reference for binary, ternary and
4-bit weights on ragged shapes with 1 and 2 threads, and PackedLinear's
dispatch (AMX from AMX_MIN_ROWS rows, equal to the int8 path bit for bit, plain path unchanged).
No time is asserted; the ternary row-count probe's choice is checked with one kernel made 2 ms slower."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit._numba import jit
from lowbit.runtime import _amx, _jit
from lowbit.runtime import kernels as RK
from lowbit.runtime import kernels_amx as KA
from lowbit.runtime import kernels_gemv as KV
from lowbit.runtime import kernels_popcount as KP
from lowbit.runtime.compiler import reference_fp64
from lowbit.runtime.kernels_gemv import GemvWeights
from lowbit.runtime.kernels_pack import quantize_codes_reference
from lowbit.runtime.layers import Codes, PackedLinear, build_packed, fold_integers

needs_amx = pytest.mark.skipif(not _amx.amx_enabled(), reason="AMX-INT8 unavailable (CPU, OS or plain path)")
needs_host_vnni = pytest.mark.skipif(not _jit.HOST_VNNI, reason="the expansion needs AVX-512 (VNNI) CPUs")

RNG = np.random.default_rng(13)
# ragged sizes: rows not a multiple of 16 (one row block, odd and even block counts), reductions
# not a multiple of 64 (nor of the fields' 32), outputs not a multiple of 16 (1..7 blocks). Every
# accumulator shape of the kernel's blocking occurs: one row block against groups of 4 blocks of
# 16 channels (1x4, and 1x3 / 1x1 for the rest), pairs of blocks against 32 rows (2x2, 1x2 at an
# odd row-block count), single blocks against 64 rows (4x1, 1x1); reductions of 1 chunk up to 33
# (5 slices of 8, the last one partial: sums parked and reloaded between slices).
SHAPES = [(8, 64, 16), (16, 100, 37), (12, 200, 70), (17, 130, 50), (40, 257, 33), (70, 1000, 100),
          (300, 129, 20), (33, 64, 80), (50, 2100, 40)]


def _weights(kind: str, O: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """(plane integers q, folded int8 weights w_int) as layers.fold_integers gives them."""
    if kind == "binary":  # q = bit, w = 2*bit - 1
        q = RNG.integers(0, 2, (O, K))
        return q, 2 * q - 1
    if kind == "ternary":  # q = +plane - -plane, w = q
        q = RNG.integers(-1, 2, (O, K))
        return q, q
    q = RNG.integers(0, 16, (O, K))  # DoReFa 4-bit: code, odd levels 2*code - 15
    return q, 2 * q - 15


@pytest.fixture(params=["amx", "vnni"])
def backend(request) -> bool:
    """The tile back end of ``amx_linear`` (its ``vnni`` argument): AMX tiles where AMX is enabled,
    VNNI register tiles wherever the CPU has AVX-512 VNNI (with or without AMX)."""
    if request.param == "amx" and not _amx.amx_enabled():
        pytest.skip("AMX-INT8 unavailable (CPU, OS or plain path)")
    if request.param == "vnni" and not (_jit.HOST_VNNI and _jit.HAS_VNNI):
        pytest.skip("AVX-512 VNNI unavailable (CPU or plain path)")
    return request.param == "vnni"


@pytest.fixture
def threads(threads, monkeypatch):
    """conftest's thread counts, with the AMX / VNNI tiles' split forced on too."""
    monkeypatch.setattr(KA, "AMX_MIN_PARALLEL_MACS", 1)
    monkeypatch.setattr(KA, "VNNI_MIN_PARALLEL_MACS", 1)
    return threads


# ---------------------------------------------------------------------------------------------
# layouts (no AMX needed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["binary", "ternary", "q4"])
def test_field_table_and_expanded_tiles(kind):
    """Tile (b, k) row q byte 4*o + t is w_int[16b + o, 64k + 4q + t] (tdpbusd's VNNI operand)."""
    O, K = 37, 130
    q, w = _weights(kind, O, K)
    gw = GemvWeights(q)
    aw = KA.amx_linear_weights(gw, q, w, 0.5)
    assert aw is not None and gw.b == {"binary": 1, "ternary": 2, "q4": 4}[kind]
    tab = aw.tab[:16]
    assert np.array_equal(np.tile(tab, 4), aw.tab)
    np.testing.assert_array_equal(tab[q + gw.off], w)
    ex = KA.expand_reference(aw)
    assert ex.shape == (3, 3, 16, 64)
    for b, k, qq, o, t in [(0, 0, 0, 0, 0), (1, 1, 5, 3, 2), (2, 0, 15, 4, 3), (0, 2, 0, 15, 1)]:
        r = 64 * k + 4 * qq + t
        assert ex[b, k, qq, 4 * o + t] == w[16 * b + o, r]
    full = ex.reshape(3, 3, 16, 16, 4).transpose(0, 3, 1, 2, 4)  # (b, o, k, q, t)
    np.testing.assert_array_equal(full.reshape(48, 192)[:O, :K], w)
    assert (ex.reshape(3, 3, 16, 16, 4)[:, 2, 8:] == 0).all()  # past the fields' 32-padding: zero rows


def test_field_table_refuses():
    q = np.array([[0, 1, 1]])
    assert KA.field_table(q, np.array([[-1, 1, 2]]), 1) is None  # field 1 maps to two weights
    assert KA.field_table(q, np.array([[-1, 200, 200]]), 1) is None  # weight outside int8
    assert KA.field_table(np.array([[0, 2]]), np.array([[0, 1]]), 1) is None  # field wider than b
    # int32 sums: K * 255 * max|w| must stay below 2**31
    q = np.tile(np.array([[0, 1]]), (16, 34000))
    gw = GemvWeights(q)
    assert KA.amx_linear_weights(gw, q, 2 * q - 1, 1.0) is not None  # +-1: 68000 * 255 fits
    assert KA.amx_linear_weights(gw, q, 127 * (2 * q - 1), 1.0) is None


def test_tile_buffers_start_on_cache_lines():
    """Tile rows must not straddle 64-byte lines (misaligned tiles load far slower)."""
    offsets = {KA.aligned_u8(n).ctypes.data % 64 for n in (1, 100, 1000, 4096, 40000, 1 << 20)}
    assert offsets == {0}
    assert KA.aligned_u8(1000).size == 1000
    for M, K in [(3, 70), (16, 64), (50, 1000)]:
        assert KA.amx_rows(RNG.normal(size=(M, K)).astype(np.float32), 0, 1.0, 15.0).ctypes.data % 64 == 0


@pytest.mark.parametrize("M,K", [(1, 10), (16, 64), (17, 130), (40, 257)])
def test_rows_tile_layout(M, K):
    codes = RNG.integers(0, 256, (M, K))
    nk = -(-K // 64)
    ref = KA.amx_rows_reference(codes, nk)
    assert ref.size == -(-M // 16) * 16 * nk * 64
    i, k, r, c = (M - 1) // 16, (K - 1) // 64, (M - 1) % 16, (K - 1) % 64
    assert ref[((i * nk + k) * 16 + r) * 64 + c] == codes[M - 1, K - 1]
    np.testing.assert_array_equal(KA.amx_rows(codes.astype(np.float32), 1), ref)
    np.testing.assert_array_equal(KA.amx_rows(codes.astype(np.uint8), 1), ref)
    x = RNG.normal(size=(M, K)).astype(np.float32) * 2
    fused = KA.amx_rows(x, 0, 1.5, 10.0)
    np.testing.assert_array_equal(fused, KA.amx_rows_reference(quantize_codes_reference(x, 1.5, 10.0), nk))


@jit
def _expand_all(w, nG, b, tab, nbt, nk, dst):
    G = 16 // (8 // b)
    for blk in range(nbt):
        for k in range(nk):
            ngv = min(G, nG - k * G)
            off = blk * nG * 64 + k * G * 64
            doff = (blk * nk + k) * 1024
            if b == 1:
                KA._expand1(w, off, ngv, tab, dst, doff)
            elif b == 2:
                KA._expand2(w, off, ngv, tab, dst, doff)
            else:
                KA._expand4(w, off, ngv, tab, dst, doff)


@needs_host_vnni
@pytest.mark.parametrize("kind", ["binary", "ternary", "q4"])
@pytest.mark.parametrize("K", [32, 64, 100, 130, 257])
def test_expand_kernel_equals_reference(kind, K):
    O = 37
    q, w = _weights(kind, O, K)
    aw = KA.amx_linear_weights(GemvWeights(q), q, w, 1.0)
    ref = KA.expand_reference(aw)
    got = np.full(ref.size, 77, np.uint8)
    _expand_all(aw.gw.w, aw.gw.nG, aw.gw.b, aw.tab, ref.shape[0], ref.shape[1], got)
    np.testing.assert_array_equal(got.view(np.int8).reshape(ref.shape), ref)


# ---------------------------------------------------------------------------------------------
# the product
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["binary", "ternary", "q4"])
def test_amx_linear_equals_integer_reference(kind, threads, backend):
    for M, K, O in SHAPES:
        q, w = _weights(kind, O, K)
        aw = KA.amx_linear_weights(GemvWeights(q), q, w, 0.25)
        a = RNG.integers(0, 256 if kind == "q4" else 16, (M, K))
        # D itself (s1 = 1, s0 = 0: float32 holds these sums exactly)
        one, zero = np.zeros(O + 80), np.zeros(O + 80)
        one[:O] = 1.0
        D = np.empty((M, O), np.float32)
        KA.amx_linear(a.astype(np.uint8), 1, 0.0, 0.0, aw, zero, one, False, D, vnni=backend)
        np.testing.assert_array_equal(D, (a @ w.T).astype(np.float32))
        # the epilogue of the layers: per-channel scale and shift, ReLU
        sw, bn = RNG.uniform(0.5, 2.0, O), RNG.uniform(0.5, 2.0, O)
        s0, s1 = KA.amx_coeffs(aw, sw, 0.1, 3.0, bn, RNG.normal(size=O))
        for relu in (False, True):
            out = np.empty((M, O), np.float32)
            KA.amx_linear(a.astype(np.float32), 1, 0.0, 0.0, aw, s0, s1, relu, out, vnni=backend)
            np.testing.assert_array_equal(out, KA.amx_linear_reference(a, w, s0, s1, relu))


def test_amx_linear_fused_quantization(threads, backend):
    """mode 0: the rows are quantized with rint(clip(x, 0, hi) * mult), as the other kernels do."""
    M, K, O = 50, 200, 40
    q, w = _weights("ternary", O, K)
    aw = KA.amx_linear_weights(GemvWeights(q), q, w, 1.0)
    x = RNG.normal(size=(M, K)).astype(np.float32) * 3
    s0, s1 = KA.amx_coeffs(aw, np.ones(O), 0.2, 0.0, np.ones(O), RNG.normal(size=O))
    out = np.empty((M, O), np.float32)
    KA.amx_linear(x, 0, 3.0, 5.0, aw, s0, s1, True, out, vnni=backend)
    codes = quantize_codes_reference(x, 3.0, 5.0)
    np.testing.assert_array_equal(out, KA.amx_linear_reference(codes, w, s0, s1, True))


def test_amx_linear_rejects_bad_shapes():
    q, w = _weights("binary", 20, 64)
    aw = KA.amx_linear_weights(GemvWeights(q), q, w, 1.0)
    s0, s1 = KA.amx_coeffs(aw, np.ones(20), 1.0, 0.0, np.ones(20), np.zeros(20))
    with pytest.raises(ValueError, match="rows"):
        out = np.empty((16, 20), np.float32)
        KA.amx_linear(np.zeros((16, 65), np.float32), 1, 0, 0, aw, s0, s1, False, out)


# ---------------------------------------------------------------------------------------------
# PackedLinear's dispatch
# ---------------------------------------------------------------------------------------------

VARIANTS = {
    "w1a4": ({"method": "binary", "bits": 1}, {"method": "pact", "bits": 4, "alpha_init": 3.0}),
    "w2a4": ({"method": "twn", "bits": 2}, {"method": "pact", "bits": 4, "alpha_init": 3.0}),
    "w4a8": ({"method": "dorefa", "bits": 4}, {"method": "pact", "bits": 8, "alpha_init": 3.0}),
    "w1a1": ({"method": "binary", "bits": 1}, {"method": "pact", "bits": 1, "alpha_init": 3.0}),
}


def _layer(variant: str, K: int = 520, O: int = 530, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(K, O)
    w, a = VARIANTS[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(lin, {"default": {"weight": w, "activation": a}})
    return lin.eval()


def _calls(monkeypatch) -> list[int]:
    """The row counts of the AMX products the code under test runs (``amx_linear_tiles``, which
    ``amx_linear`` and the packed layers call)."""
    n: list[int] = []
    real = KA.amx_linear_tiles

    def spy(xq, M, *args, **kw):
        n.append(M)
        return real(xq, M, *args, **kw)

    monkeypatch.setattr(KA, "amx_linear_tiles", spy)
    return n


@needs_amx
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_linear_dispatch_and_int8_equality(variant, monkeypatch, threads):
    lin = _layer(variant)
    pl = build_packed("fc", lin)
    assert isinstance(pl, PackedLinear) and pl.amx is not None
    assert "amx" in pl.kernel_name()
    assert pl.i8 is None  # a large layer holds no int8 copy: GEMV fields (+ tables) only
    # binary weights, <= 4-bit codes: tables (ternary: none, AMX runs from the GEMV's last row on)
    assert (pl.lut is None) == (variant in ("w4a8", "w2a4"))
    r = pl.amx_min_rows
    assert r == (KA.AMX_MIN_ROWS if pl.lut is None else KA.AMX_MIN_ROWS_LUT[pl.lut.cb])
    assert pl.amx.nbytes < 8 * 1024  # the table and the weight sums: nothing per weight
    assert pl.runtime_bytes == (pl.weight_bytes + pl.gemv.nbytes + pl.amx.nbytes
                                + (0 if pl.lut is None else pl.lut.nbytes))
    calls = _calls(monkeypatch)
    rows = (1, r - 1, r, r + 9)
    x = torch.randn(r + 9, 520) * 2
    with torch.inference_mode():
        got = {M: pl(x[:M]) for M in rows}
    assert calls == [r, r + 9]  # from amx_min_rows rows on, and only there
    # the same layer without AMX (int8 1x1 convolution or lookup tables): the same bits
    monkeypatch.setattr(_amx, "HAS_AMX", False)
    ref_pl = build_packed("fc", lin)
    assert ref_pl.amx is None
    for M in rows[1:]:
        with torch.inference_mode():
            np.testing.assert_array_equal(got[M].numpy(), ref_pl(x[:M]).numpy())
        ref = reference_fp64(lin, x[:M])
        assert float((got[M].double() - ref).abs().max() / ref.abs().max()) < 1e-6


@needs_amx
def test_packed_linear_codes_input(monkeypatch):
    """Rows of codes handed over by a fused producer (``Codes``) take the AMX path too."""
    lin = _layer("w2a4", K=300, O=100)
    pl = build_packed("fc", lin)
    calls = _calls(monkeypatch)
    M = 33
    codes = RNG.integers(0, 16, (M, 300)).astype(np.uint8)
    buf = np.concatenate([codes.reshape(-1), np.zeros(64, np.uint8)])
    got = pl(Codes(buf, (M, 1, 1, 300), (0, 0)))
    assert calls == [M]
    # the same codes as floats through the encode-free path: code values are their own codes
    s0, s1 = pl._amx_coeffs(pl.act.sx, pl.act.ma)
    w, unit = fold_integers(pl.wp)
    assert unit == pl.amx.unit
    np.testing.assert_array_equal(got.numpy(), KA.amx_linear_reference(codes, w, s0, s1, pl.relu))


def test_plain_path_has_no_amx_and_matches_reference(monkeypatch):
    _jit.set_plain(True)
    try:
        lin = _layer("w2a4", K=200, O=70)
        pl = build_packed("fc", lin)
        assert pl.amx is None and "amx" not in pl.kernel_name()
        x = torch.randn(20, 200) * 2
        with torch.inference_mode():
            got = pl(x)
        ref = reference_fp64(lin, x)
        assert float((got.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    finally:
        _jit.set_plain(False)


# ---------------------------------------------------------------------------------------------
# PackedLinear on VNNI register tiles (AVX-512 VNNI, no AMX)
# ---------------------------------------------------------------------------------------------

needs_vnni = pytest.mark.skipif(not (_jit.HOST_VNNI and _jit.HAS_VNNI), reason="AVX-512 VNNI unavailable")


@needs_vnni
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_linear_on_vnni_tiles_without_amx(variant, monkeypatch, threads):
    """Without AMX the layer keeps the expanded-field form for the VNNI tiles and runs them from
    kernels_amx.min_rows rows on (ternary with tables: later; binary with tables: never), bit for bit
    what the layer computed without them (tables or the int8 copy), and a large layer holds no int8
    copy."""
    monkeypatch.setattr(_amx, "HAS_AMX", False)
    monkeypatch.setattr(KA, "_ternary_rows", 48)  # as measured on a Xeon (an EPYC: never)
    monkeypatch.setattr(KP, "HAS_VPOPCNT", False)  # W1A1 as on a CPU without VPOPCNTDQ (test_kernels_w1a1)
    assert KA.backend() == "vnni"
    lin = _layer(variant)
    pl = build_packed("fc", lin)
    assert pl.amx is not None and pl.i8 is None
    assert (pl.lut is None) == (variant == "w4a8")  # ternary keeps its tables for fewer rows
    r = pl.amx_min_rows
    assert r == (KA.VNNI_MIN_ROWS if pl.lut is None else 48 if pl.lut.cb == 2 else KA.NEVER_ROWS)
    assert ("vnni on the fields" in pl.kernel_name()) == (r < KA.NEVER_ROWS)
    calls = _calls(monkeypatch)
    rows = [M for M in (KV.GEMV_MAX_ROWS + 1, r - 1, r, r + 9) if KV.GEMV_MAX_ROWS < M < 200]
    x = torch.randn(200, 520) * 2
    with torch.inference_mode():
        got = {M: pl(x[:M]) for M in rows}
    assert calls == [M for M in rows if r <= M]
    monkeypatch.setattr(KA, "VNNI_LINEAR", False)  # the paths before: tables / int8 copy
    assert KA.backend() is None
    ref_pl = build_packed("fc", lin)
    assert ref_pl.amx is None and (ref_pl.i8 is None) == (ref_pl.lut is not None)
    for M in rows:
        with torch.inference_mode():
            np.testing.assert_array_equal(got[M].numpy(), ref_pl(x[:M]).numpy())
        ref = reference_fp64(lin, x[:M])
        assert float((got[M].double() - ref).abs().max() / ref.abs().max()) < 1e-6


@needs_vnni
def test_vnni_tiles_write_codes_for_the_next_layer(monkeypatch):
    """The epilogue's codes (row-major and in the tile layout) are the fused formula applied to the
    float output, as on AMX."""
    monkeypatch.setattr(_amx, "HAS_AMX", False)
    M, K, O = 45, 300, 70
    q, w = _weights("q4", O, K)
    aw = KA.amx_linear_weights(GemvWeights(q), q, w, 0.5)
    a = RNG.integers(0, 16, (M, K)).astype(np.uint8)
    s0, s1 = KA.amx_coeffs(aw, RNG.uniform(0.5, 2, O), 0.01, 0.0, np.ones(O), RNG.normal(size=O))
    out = np.empty((M, O), np.float32)
    codes = np.empty((M, O), np.uint8)
    KA.amx_linear(a, 1, 0.0, 0.0, aw, s0, s1, True, out, codes, 2.0, 7.5)
    np.testing.assert_array_equal(out, KA.amx_linear_reference(a, w, s0, s1, True))
    np.testing.assert_array_equal(codes, quantize_codes_reference(out, 2.0, 7.5))
    tiles = KA.amx_linear(a, 1, 0.0, 0.0, aw, s0, s1, True, None, KA.code_tiles(M, O), 2.0, 7.5, tiles=True)
    np.testing.assert_array_equal(tiles, KA.amx_rows_reference(codes, -(-O // 64)))


def test_ternary_vnni_rows_from_the_environment_or_measured(monkeypatch):
    """The row count from which ternary tables give way to the VNNI tiles: set by the environment
    (a count or ``never``; anything else is refused), else measured once and kept."""
    for env, want in (("64", 64), ("never", KA.NEVER_ROWS), (" Never ", KA.NEVER_ROWS)):
        monkeypatch.setattr(KA, "_ternary_rows", None)
        monkeypatch.setenv("LOWBIT_RUNTIME_TERNARY_VNNI_ROWS", env)
        assert KA.ternary_vnni_rows() == want
    for bad in ("0", "-3", "lots"):
        monkeypatch.setattr(KA, "_ternary_rows", None)
        monkeypatch.setenv("LOWBIT_RUNTIME_TERNARY_VNNI_ROWS", bad)
        with pytest.raises(ValueError, match="positive row count or 'never'"):
            KA.ternary_vnni_rows()
    monkeypatch.delenv("LOWBIT_RUNTIME_TERNARY_VNNI_ROWS")
    monkeypatch.setattr(KA, "_ternary_rows", None)
    monkeypatch.setattr(KA, "_probe_ternary_rows", lambda: 77)
    assert KA.ternary_vnni_rows() == 77 and KA._ternary_rows == 77  # measured once, then kept
    monkeypatch.setattr(_amx, "HAS_AMX", False)
    monkeypatch.setattr(KA, "VNNI_LINEAR", True)
    monkeypatch.setattr(RK, "HAS_VNNI", True)
    assert KA.min_rows(2) == 77 and KA.min_rows(1) == KA.NEVER_ROWS and KA.min_rows(None) == KA.VNNI_MIN_ROWS


@needs_vnni
def test_ternary_probe_picks_a_probed_row_count_or_never(monkeypatch):
    """On this CPU the probe runs both kernels and returns one of the probed counts or never; with
    the VNNI tiles made to look free it picks the first count, made to look slow never."""
    q, s0, s1, run = KA.ternary_pair(300, 70, seed=3)  # what the probe times: both exact
    x = RNG.uniform(-1, 3, (50, 300)).astype(np.float32)
    ref = KA.amx_linear_reference(np.rint(np.clip(x, 0, 3) * np.float32(5)), q, s0, s1, True)
    for kernel in ("tables", "vnni"):
        out = np.empty((50, 70), np.float32)
        run(x, out, kernel)
        np.testing.assert_array_equal(out, ref)
    got = KA._probe_ternary_rows(k=512, n=128, reps=3)
    assert got in (*KA.TERNARY_PROBE_ROWS, KA.NEVER_ROWS)
    from lowbit.runtime import kernels_gemm as KG
    from lowbit.runtime import kernels_lut3 as KL3

    real = {(KG, "lut_gemm"): KG.lut_gemm, (KL3, "lut3_gemm"): KL3.lut3_gemm}  # 4-bit, base-3 tables

    def slowed(fn):
        def slow(*a, **k):
            time.sleep(0.002)
            return fn(*a, **k)
        return slow

    for (mod, name), fn in real.items():
        monkeypatch.setattr(mod, name, slowed(fn))
    assert KA._probe_ternary_rows(k=512, n=128, reps=3) == KA.TERNARY_PROBE_ROWS[0]
    for (mod, name), fn in real.items():
        monkeypatch.setattr(mod, name, fn)
    real_tiles = KA.amx_linear

    def slow_tiles(*a, **k):
        time.sleep(0.002)
        return real_tiles(*a, **k)

    monkeypatch.setattr(KA, "amx_linear", slow_tiles)
    assert KA._probe_ternary_rows(k=512, n=128, reps=3) == KA.NEVER_ROWS


def test_vnni_switch_and_plain_path(monkeypatch):
    """``LOWBIT_RUNTIME_VNNI_LINEAR=0`` (``VNNI_LINEAR``) and the plain path leave no VNNI tiles."""
    monkeypatch.setattr(_amx, "HAS_AMX", False)
    monkeypatch.setattr(KA, "VNNI_LINEAR", False)
    assert KA.backend() is None and build_packed("fc", _layer("w4a8", K=200, O=70)).amx is None
    monkeypatch.setattr(KA, "VNNI_LINEAR", True)
    _jit.set_plain(True)
    try:
        assert KA.backend() is None and build_packed("fc", _layer("w4a8", K=200, O=70)).amx is None
    finally:
        _jit.set_plain(False)
