"""The float32 epilogue of the int8 kernels (``_jit._Epilogue``, ``EPI_F32``): the next layer's
codes from ``fma(f32(s1), D, f32(s0))`` equal the float64 path's codes exactly, because pixels
within the error bound of a rounding tie are recomputed in float64. Checked on coefficients that
put many outputs exactly on ties (where a float32 epilogue without the guard is wrong), on the
VNNI and AMX kernels, against a NumPy reference from the exact integer sums."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from lowbit.runtime import _amx
from lowbit.runtime import kernels as K
from lowbit.runtime import kernels_int8 as k8

needs_vnni = pytest.mark.skipif(not K.HAS_VNNI, reason="int8 kernels need AVX-512 VNNI")
RNG = np.random.default_rng(11)
HI, MULT = np.float32(3.0), np.float32(5.0)  # 4-bit PACT: codes 0..15


def _problem(rng, N=2, C=16, H=10, W=10, O=40, KH=3):
    x = rng.integers(0, 16, (N, C, H, W))
    w = rng.integers(-7, 8, (O, C, KH, KH))
    D = k8.int8_conv_reference(x, w, (1, 1), (1, 1), (1, 1))  # (N, OH, OW, O) exact integers
    xq = k8.int8_quantize(x.astype(np.float32).transpose(0, 2, 3, 1), (1, 1), mode=1)
    w_int = w.transpose(0, 2, 3, 1)
    return x, w_int, D, xq


def _coefficients(rng, O: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Half the channels on ties: ``t = y * mult`` = D/2 (or D/2 + 1/4 * odd), i.e. every odd D
    lands on a half-integer, where one float32 rounding decides the code."""
    s0, s1 = np.zeros(width + 64), np.zeros(width + 64)
    s1[:O] = rng.uniform(0.002, 0.02, O)
    s0[:O] = rng.uniform(-1.0, 2.0, O)
    tie = np.arange(O) % 2 == 0
    s1[:O][tie] = 0.5 / float(MULT) * (1 + rng.integers(0, 3, tie.sum()) * 2.0**-20)
    s0[:O][tie] = rng.choice([0.0, 1.5 / float(MULT), 0.3], tie.sum())
    return s0, s1


def _reference_codes(D: np.ndarray, s0: np.ndarray, s1: np.ndarray) -> np.ndarray:
    O = D.shape[-1]
    y = (s1[:O] * D + s0[:O]).astype(np.float32)  # the float64 path's y (one rounding to float32)
    t = np.minimum(np.maximum(y, np.float32(0)), HI) * MULT
    return np.rint(t).astype(np.uint8)


def _run(kernel: str, xq, w_int, geo, s0, s1, sf, N, OH, OW, O) -> np.ndarray:
    codes = np.zeros(N * (OH + 2) * (OW + 2) * O + 64, np.uint8)
    cgeo = np.array([OH + 2, OW + 2, 1, 1], np.int64)
    KH, KW, C = w_int.shape[1:]
    Wp = int(geo[1])
    if kernel == "vnni":
        w8, passes = k8.pack_int8_weights(w_int, 1)
        qoff = k8.int8_quad_offsets(k8.int8_geometry(KH, KW, C, 1, 1), Wp, C)
        k8.int8_conv(xq, geo, qoff, w8, passes, s0, s1, True, None, None, codes, cgeo, HI, MULT, sf)
    else:
        wa, kc, nck, nbt = k8.pack_amx_weights(w_int)
        koff = k8.amx_k_offsets(KH, nck, kc, 1, Wp, C)
        cfg = _amx.amx_tile_config(kc, nbt)
        k8.amx_conv(xq, geo, koff, wa, cfg, kc, nbt, s0, s1, True, None, None, codes, cgeo, HI, MULT, sf)
    return codes[:-64].reshape(N, OH + 2, OW + 2, O)[:, 1:-1, 1:-1]


@pytest.fixture
def two_threads(monkeypatch):
    """int8_conv split over two threads (parallel threshold 0); numba's thread count restored."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here")
    monkeypatch.setattr(k8, "INT8_MIN_PARALLEL_MACS", 0)
    prev = numba.get_num_threads()
    numba.set_num_threads(2)
    yield
    numba.set_num_threads(prev)


@needs_vnni
def test_f32_epilogue_two_threads(two_threads):
    test_f32_epilogue_codes_equal_float64_on_ties("vnni")


@needs_vnni
@pytest.mark.parametrize("kernel", ["vnni", "amx"])
def test_f32_epilogue_codes_equal_float64_on_ties(kernel):
    if kernel == "amx" and not _amx.amx_enabled():
        pytest.skip("AMX-INT8 not available (CPU or OS)")
    rng = np.random.default_rng(11)  # fixed data: the unguarded float32 result below is wrong for it
    N, O = 2, 40
    _, w_int, D, xq = _problem(rng, N=N, O=O)
    OH, OW = D.shape[1:3]
    geo = np.array([12, 12, 16, OH, OW, 1, 1, N, O], np.int64)
    width = -(-O // 16) * 16
    s0, s1 = _coefficients(rng, O, width)
    wabs = np.abs(w_int).reshape(O, -1).sum(axis=1)
    sf, usable = k8.f32_coefficients(s0, s1, wabs, 15, float(HI), float(MULT))
    assert usable
    want = _reference_codes(D, s0, s1)
    f64 = _run(kernel, xq, w_int, geo, s0, s1, None, N, OH, OW, O)
    f32 = _run(kernel, xq, w_int, geo, s0, s1, sf, N, OH, OW, O)
    assert np.array_equal(f64, want)
    assert np.array_equal(f32, want)
    # the guard matters: with no room (lim = 0.5, nothing recomputed) float32 alone is wrong here
    blind = sf.copy().reshape(-1, 3, 16)
    blind[:, 2] = 0.5
    wrong = _run(kernel, xq, w_int, geo, s0, s1, blind.reshape(-1), N, OH, OW, O)
    assert not np.array_equal(wrong, want)
    odd_ties = (D[..., ::2] % 2 != 0).sum()
    assert odd_ties > 100  # many outputs sit exactly on a tie


def test_f32_coefficients_layout_and_bound():
    O, width = 20, 32
    s0, s1 = np.zeros(width + 64), np.zeros(width + 64)
    s0[:O], s1[:O] = RNG.uniform(-1, 1, O), RNG.uniform(0.01, 0.1, O)
    wabs = RNG.integers(1, 500, O).astype(np.float64)
    sf, usable = k8.f32_coefficients(s0, s1, wabs, 15, 3.0, 5.0)
    assert usable and sf.shape == (3 * (width + 64),)
    blk = sf.reshape(-1, 3, 16)
    a, b, lim = blk[:, 0].reshape(-1), blk[:, 1].reshape(-1), blk[:, 2].reshape(-1)
    assert np.array_equal(a[:O], s1[:O].astype(np.float32))
    assert np.array_equal(b[:O], s0[:O].astype(np.float32))
    u = 2.0**-24
    e = 2 * (5.0 * 4 * u * (np.abs(s1[:O]) * 15 * wabs + np.abs(s0[:O])) + 4 * u * (3.0 * 5.0 + 1))
    assert (lim[:O] <= 0.5 - e).all() and (lim[:O] > 0.5 - e - 1e-7).all()
    assert np.array_equal(lim.astype(np.float32), lim)  # float32 values
    # integer sums that may not be exact in float32: not usable
    _, usable = k8.f32_coefficients(s0, s1, np.full(O, 2.0**20), 255, 3.0, 5.0)
    assert not usable
