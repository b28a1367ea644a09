"""Table-lookup GEMM (runtime/kernels_gemm.py): bit-exact against the integer reference on random
shapes, AVX-512 and plain paths, 1 and 2 threads; PackedLinear's many-row path against the
fake-quantized layer in float64. No timing here."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.runtime import kernels_amx as KA
from lowbit.runtime import kernels_gemm as KG
from lowbit.runtime import kernels_gemv as KV
from lowbit.runtime import kernels_popcount as KP
from lowbit.runtime import kernels_threads
from lowbit.runtime.layers import build_packed, fold_integers

RNG = np.random.default_rng(7)

LEVELS = {"binary": [-1, 1], "ternary": [-1, 0, 1], "asym_ternary": [-2, 0, 1], "uniform2": [-3, -1, 1, 3]}
PATHS = ["plain"] + (["avx512"] if KG.HAS_LUT else [])


def _case(kind: str, M: int, K: int, O: int, ka: int):
    lv0 = np.array(LEVELS[kind])
    w = lv0[RNG.integers(0, lv0.size, (O, K))]
    a = RNG.integers(0, 1 << ka, (M, K))
    return w, a


@pytest.mark.parametrize("kind,ka", [("binary", 1), ("binary", 2), ("binary", 4), ("binary", 5),
                                     ("ternary", 4), ("ternary", 5), ("ternary", 6), ("asym_ternary", 3),
                                     ("uniform2", 3)])
@pytest.mark.parametrize("path", PATHS)
def test_lut_gemm_equals_integer_reference(kind, ka, path, threads):
    for M, K, O in [(1, 7, 5), (9, 100, 37), (70, 333, 50), (300, 129, 20)]:
        w, a = _case(kind, M, K, O, ka)
        a[M // 2] = (1 << ka) - 1  # a row of the largest codes: the table entries at their bound
        lv, cb = KG.lut_levels(w)
        assert KG.lut_fits(lv, cb, ka)
        tab = KG.lut_tables(a.astype(np.float32), lv, cb, plain=path == "plain")
        np.testing.assert_array_equal(tab, KG.lut_tables_reference(a, lv, cb))
        wq = KG.lut_pack_weights(w, lv, cb)
        s1 = RNG.uniform(0.5, 2.0, O)
        s0 = RNG.normal(size=O)
        for relu in (False, True):
            for sums in sorted({1, KG.lut_sums(lv, cb, ka)}):
                got = KG.lut_gemm(tab, wq, O, s0, s1, relu, plain=path == "plain", sums=sums)
                np.testing.assert_array_equal(got, KG.lut_gemm_reference(a, w, s0, s1, relu))


@pytest.mark.skipif(not KG.HAS_LUT, reason="the lookup tiles need AVX-512 VBMI + VNNI")
@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_lut_tile_segments_read_their_own_tables(kind):
    """A tile's reduction in segments (a convolution's kernel taps): segment s of row r reads the
    tables at ``trow[r] + koff[s]`` against the weights' step pairs in segment order."""
    R, nseg, K = KG.LUT_R, 3, 32
    lv0 = np.array(LEVELS[kind])
    w = lv0[RNG.integers(0, lv0.size, (16, nseg * K))]
    lv, cb = KG.lut_levels(w)
    a = RNG.integers(0, 16, (R, nseg, K))
    tsize = KG.lut_groups(K, cb) * 16
    trow = np.arange(R, dtype=np.int64) * 5 * tsize
    koff = np.array([2 * tsize, 0, 3 * tsize + 64], np.int64)  # out of order, one not a whole table on
    tab = RNG.integers(-100, 100, R * 5 * tsize).astype(np.int8)  # anything outside the tables
    for r in range(R):
        for s in range(nseg):
            at = trow[r] + koff[s]
            tab[at : at + tsize] = KG.lut_tables_reference(a[r, s][None], lv, cb)[0]
    wq = KG.lut_pack_weights(w, lv, cb)
    npairs = wq.shape[1] // nseg

    @numba.njit
    def run(tab, trow, koff, npairs, wq, acc, sums):
        KG._tile1(tab, trow, koff, koff.shape[0], npairs, wq.reshape(-1), 0, wq.shape[1] * 64, acc, sums)

    want = sum(a[:, s] @ w[:, s * K : (s + 1) * K].T for s in range(nseg))
    for sums in sorted({1, KG.lut_sums(lv, cb, 4)}):
        acc = np.zeros(R * 16, np.int32)
        run(tab, trow, koff, npairs, wq, acc, sums)
        np.testing.assert_array_equal(acc.reshape(R, 16), want)


@pytest.mark.parametrize("kind,ka,sums", [("binary", 1, 2), ("binary", 4, 2), ("binary", 5, 1),
                                          ("ternary", 5, 2), ("ternary", 6, 1), ("asym_ternary", 3, 2),
                                          ("uniform2", 3, 2), ("uniform2", 4, 1)])
def test_lut_sums_adds_two_lookups_only_where_they_fit_int8(kind, ka, sums):
    lv, cb = KG.lut_levels(np.array(LEVELS[kind]))
    assert KG.lut_sums(lv, cb, ka) == sums


def test_lut_gemm_refuses_sums_its_tiles_do_not_have():
    w, a = _case("binary", 4, 64, 16, 1)
    lv, cb = KG.lut_levels(w)
    with pytest.raises(ValueError, match=r"sums=4.*1 or 2"):
        KG.lut_gemm(KG.lut_tables(a.astype(np.float32), lv, cb), KG.lut_pack_weights(w, lv, cb), 16,
                    np.zeros(16), np.ones(16), sums=4)


def test_lut_gemm_splits_only_work_worth_a_thread(monkeypatch):
    """On 2 threads the lookup GEMM is cut over threads from LUT_UNIT_WORK x rows x 16-output blocks
    x step pairs >= PARALLEL_MIN_WORK on (binary 4096^2 at 8 rows: one thread; at 64 rows: split)."""
    old = numba.get_num_threads()
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    numba.set_num_threads(2)
    cuts: list[int] = []
    real = kernels_threads.run_shared
    monkeypatch.setattr(kernels_threads, "run_shared",
                        lambda n, work, nt: (cuts.append(n), real(n, work, nt)))
    try:
        O = K = 4096
        w = RNG.choice([-1, 1], (O, K))
        lv, cb = KG.lut_levels(w)
        wq = KG.lut_pack_weights(w, lv, cb)
        s0, s1 = np.zeros(O), np.ones(O)
        for M, split in ((8, False), (64, True)):
            a = RNG.integers(0, 16, (M, K))
            tab = KG.lut_tables(a.astype(np.float32), lv, cb)
            units = M * wq.shape[0] * wq.shape[1]
            assert (KG.LUT_UNIT_WORK * units >= kernels_threads.PARALLEL_MIN_WORK) == split
            cuts.clear()
            got = KG.lut_gemm(tab, wq, O, s0, s1)
            assert bool(cuts) == split, M
            np.testing.assert_array_equal(got, KG.lut_gemm_reference(a, w, s0, s1, False))
    finally:
        numba.set_num_threads(old)


def test_tables_reference_closed_form():
    """T[g, n] of binary weights: the dot product of the 4 codes with the signs of n's bits."""
    a = np.array([[3, 5, 7, 11, 1]])
    lv = np.array([-1, 1])
    T = KG.lut_tables_reference(a, lv, 1).reshape(1, -1, 16)
    assert T[0, 0, 0] == -(3 + 5 + 7 + 11) and T[0, 0, 15] == 3 + 5 + 7 + 11
    assert T[0, 0, 0b0101] == 3 - 5 + 7 - 11
    assert T[0, 1, 1] == 1 and T[0, 1, 0] == -1 and T[0, 1, 2] == -1  # padding codes are 0
    # ternary (2 bits per weight, 2 per group): n = c0 | c1 << 2 over levels (-1, 0, 1, 0)
    T = KG.lut_tables_reference(np.array([[4, 9]]), np.array([-1, 0, 1, 0]), 2).reshape(1, -1, 16)
    assert T[0, 0, 0b1000] == -4 + 9 and T[0, 0, 0b0010] == 4 - 9 and T[0, 0, 0b0101] == 0


def test_fused_quantization_in_tables():
    """mode 0: the table builder quantizes floats with the clip formula, as quantize_codes does."""
    from lowbit.runtime.kernels_pack import quantize_codes_reference

    x = RNG.normal(size=(13, 77)).astype(np.float32)
    lv = np.array([-1, 1])
    for path in PATHS:
        tab = KG.lut_tables(x, lv, 1, hi=1.5, mult=10.0, mode=0, plain=path == "plain")
        codes = quantize_codes_reference(x, 1.5, 10.0)
        np.testing.assert_array_equal(tab, KG.lut_tables_reference(codes, lv, 1))


@pytest.mark.parametrize("vals", [[-1, 1], [0, 1], [-1, 0, 1], [-3, -1, 1, 3], [2], [0, 70000],
                                  [-2, 0, 1, 5, 9]])
def test_lut_levels_equal_sorted_unique(vals):
    """lut_levels (counting small integers, sorting wide ranges) lists the levels np.unique gives."""
    rng = np.random.default_rng(len(vals))
    w = rng.choice(np.array(vals, np.int64), size=(37, 53))
    got = KG.lut_levels(w)
    u = np.unique(w)
    if u.size > 4:
        assert got is None
        return
    lv, cb = got
    assert cb == (1 if u.size <= 2 else 2)
    np.testing.assert_array_equal(lv, np.concatenate([u, np.zeros((1 << cb) - u.size, np.int64)]))


def test_lut_fits_bounds():
    assert KG.lut_fits(np.array([-1, 1]), 1, 5)  # 4 * 31 = 124
    assert not KG.lut_fits(np.array([-1, 1]), 1, 6)
    assert KG.lut_fits(np.array([-1, 0, 1, 0]), 2, 6)  # 2 * 63 = 126
    assert not KG.lut_fits(np.array([-3, -1, 1, 3]), 2, 5)  # 2 * 3 * 31 = 186
    assert KG.lut_levels(np.arange(5)) is None


WMETHODS = [{"method": "binary", "bits": 1}, {"method": "twn", "bits": 2}, {"method": "dorefa", "bits": 2},
            {"method": "dorefa", "bits": 4}]


@pytest.mark.parametrize("wm", WMETHODS, ids=lambda d: f"{d['method']}{d['bits']}")
@pytest.mark.parametrize("abits", [1, 2, 4, 8])
@pytest.mark.parametrize("plain", [False, True], ids=["fast", "plain"])
def test_packed_linear_many_rows_equals_fake_quant_float64(wm, abits, plain, threads, monkeypatch):
    """PackedLinear at 8..300 rows equals the fake-quantized layer computed in float64 (the packed
    epilogue rounds once, to float32); the table path is taken wherever the tables fit int8."""
    if plain:
        monkeypatch.setattr(KG, "HAS_LUT", False)
    torch.manual_seed(0)
    layer = nn.Linear(131, 45)
    lowbit.quantize(layer, {"default": {"weight": wm, "activation": {"method": "dorefa", "bits": abits}}})
    layer.eval()
    packed = build_packed("fc", layer)
    folded = fold_integers(packed.wp)
    lv = KG.lut_levels(folded[0])
    fits = lv is not None and KG.lut_fits(*lv, abits)
    # no tables where the expanded-field GEMM runs from the GEMV's last row on (never chosen)
    unused = fits and packed.amx is not None and KA.min_rows(lv[1]) <= KV.GEMV_MAX_ROWS + 1
    # nor where binary weights x one-bit codes run on vpopcntq (test_kernels_w1a1)
    w1a1 = packed.w1a1 is not None
    assert w1a1 == (KP.HAS_VPOPCNT and wm["method"] == "binary" and abits == 1 and KA.backend() != "amx")
    assert (packed.lut is not None) == (fits and not unused and not w1a1)
    if wm["method"] in ("binary", "twn") and abits <= 4:
        assert packed.lut is not None or unused or w1a1
    for M in (8, 9, 64, 300):
        x = torch.randn(M, 131) * 0.7 + 0.3
        with torch.no_grad():
            w64 = layer.weight.double()
            a64 = _fake_quant_input(layer, x).double()
            ref = (a64 @ w64.T + layer.bias.double()).float()
        got = packed(x)
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-6 * float(ref.abs().max()))
        if packed.lut is not None:
            codes = _codes(layer, x)
            w_int = folded[0]
            s0, s1 = packed.coeffs_lut(packed.act.sx, packed.act.ma)
            np.testing.assert_array_equal(got.numpy(), KG.lut_gemm_reference(codes, w_int, s0, s1))
        elif unused:  # on AMX tiles: the exact integer sums, the same epilogue
            s0, s1 = packed._amx_coeffs(packed.act.sx, packed.act.ma)
            ref = KA.amx_linear_reference(_codes(layer, x), folded[0], s0, s1, packed.relu)
            np.testing.assert_array_equal(got.numpy(), ref)


def _fake_quant_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from lowbit.nn.quantize import input_quantizer

    return input_quantizer(layer)(x)


def _codes(layer: nn.Module, x: torch.Tensor) -> np.ndarray:
    from lowbit.nn.quantize import input_quantizer

    return input_quantizer(layer).encode(x).codes.long().numpy()


FEW = [({"method": "binary", "bits": 1}, 1), ({"method": "twn", "bits": 2}, 2),
       ({"method": "dorefa", "bits": 2}, 2)]


@pytest.mark.parametrize("wm,cb", FEW, ids=["binary", "ternary", "dorefa2"])
def test_few_rows_take_the_tables_from_lut_min_rows(wm, cb, monkeypatch):
    """1-9 rows: the GEMV below ``kernels_gemm.lut_min_rows`` (3 rows for binary weights, 5 for
    ternary / 2-bit on the AVX-512 tiles; 8 on the plain path), the tables from it; every row count
    within 1e-6 of the float64 reference."""
    from lowbit.runtime.compiler import reference_fp64

    torch.manual_seed(0)
    layer = nn.Linear(96, 40)
    act = {"method": "pact", "bits": 4, "alpha_init": 3.0}
    lowbit.quantize(layer, {"default": {"weight": wm, "activation": act}})
    layer.eval()
    packed = build_packed("fc", layer)
    if packed.lut is None or packed.gemv is None:
        pytest.skip("no GEMV and lookup tables side by side on this CPU's path")
    want = {1: 3, 2: 5}[cb] if KG.HAS_LUT else KG.LUT_MIN_ROWS
    assert KG.lut_min_rows(cb) == packed.lut_min_rows == want
    assert f"lut (>= {want} rows)" in packed.kernel_name() and f"(<= {want - 1} rows)" in packed.kernel_name()
    calls, real = [], packed._lut_forward
    monkeypatch.setattr(packed, "_lut_forward", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for M in range(1, 10):
        x = torch.randn(M, 96) * 1.5
        with torch.inference_mode():
            got = packed(x).double()
        ref = reference_fp64(layer, x)
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6, M
    assert calls == list(range(want, 10))
