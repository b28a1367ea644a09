"""The table-lookup convolution (``kernels_lut_conv``): its tables against the NumPy reference, its
product and epilogue against the int8 kernel bit for bit (every epilogue, strides, dilation, output
passes, threads), where the layers use it, and a compiled ResNet-20 with it equal to the one
without (flat executor and module graph). No timing here."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from test_runtime_conv_speedpath import _check_flat, _model

import lowbit.runtime as rt
from lowbit.runtime import _amx, executor
from lowbit.runtime import kernels_gemm as KG
from lowbit.runtime import kernels_int8 as k8
from lowbit.runtime import kernels_lut_conv as KL

RNG = np.random.default_rng(11)
needs_lut = pytest.mark.skipif(not KL.HAS_LUT, reason="the lookup tiles need AVX-512 VBMI + VNNI")
LEVELS = {"binary": [-1, 1], "ternary": [-1, 0, 1]}


@pytest.fixture
def threads(threads, monkeypatch):
    """conftest's thread counts, with the convolution's and its tables' split forced on too."""
    monkeypatch.setattr(KL, "LUT_CONV_MIN_PARALLEL_MACS", 1)
    monkeypatch.setattr(KL, "LUT_CONV_TABLES_MIN_PARALLEL", 1)
    return threads


@needs_lut
@pytest.mark.parametrize("kind,C", [("binary", 16), ("binary", 32), ("binary", 40), ("ternary", 8),
                                    ("ternary", 64)])
def test_tables_equal_reference(kind, C):
    """Pixel tables of a padded code image; padding steps (binary on 16 or 40 channels) stay zero."""
    lv, cb = KG.lut_levels(np.array(LEVELS[kind]))
    xq = k8.int8_quantize(RNG.integers(0, 16, (2, 5, 4, C)).astype(np.float32), (1, 1), mode=1)
    npix = 2 * 7 * 6
    T = KL.lut_conv_tables(xq, npix, C, lv, cb)
    want = KG.lut_tables_reference(xq[: npix * C].reshape(npix, C), lv, cb)
    assert want.shape[1] == 16 * KL.pixel_groups(C, cb)
    np.testing.assert_array_equal(T.reshape(npix, -1), want)


CASES = [  # N, C, H, W, O, KH, KW, stride, pad, dilation
    (1, 32, 8, 8, 32, 3, 3, 1, 1, 1),  # ResNet-20 stage 2 shape (2 blocks: 8-row tiles)
    (2, 64, 6, 5, 64, 3, 3, 1, 1, 1),  # stage 3 (4 blocks: 4-row tiles), rows not a multiple of 4
    (1, 32, 9, 9, 48, 3, 3, 2, 1, 1),  # stride 2, 3 blocks (6-row tiles)
    (2, 64, 7, 7, 80, 3, 3, 1, 1, 1),  # 5 blocks: chunks of 4 then 1
    (1, 32, 9, 9, 16, 3, 3, 1, 2, 2),  # dilation 2
    (1, 64, 5, 5, 10, 1, 1, 1, 0, 1),  # 1x1, 10 outputs
    (1, 16, 6, 6, 16, 3, 3, 1, 1, 1),  # padding steps (binary on 16 channels): the kernel still exact
]


@needs_lut
@pytest.mark.parametrize("kind", ["binary", "ternary"])
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_lut_conv_equals_int8_conv(kind, case, threads):
    N, C, H, W, O, KH, KW, s, pad, d = case
    lv0 = np.array(LEVELS[kind])
    w_int = lv0[RNG.integers(0, lv0.size, (O, KH, KW, C))]
    xq = k8.int8_quantize(RNG.integers(0, 16, (N, H, W, C)).astype(np.float32), (pad, pad), mode=1)
    Hp, Wp = H + 2 * pad, W + 2 * pad
    OH, OW = (Hp - d * (KH - 1) - 1) // s + 1, (Wp - d * (KW - 1) - 1) // s + 1
    geo = np.array([Hp, Wp, C, OH, OW, s, s, N, O], np.int64)
    w8, passes = k8.pack_int8_weights(w_int, d)
    qoff = k8.int8_quad_offsets(k8.int8_geometry(KH, KW, C, d, d), Wp, C)
    lv, cb = KG.lut_levels(w_int)
    tpix = 16 * KL.pixel_groups(C, cb)
    tab = KL.lut_conv_tables(xq, N * Hp * Wp, C, lv, cb)
    koff = KL.lut_conv_offsets(KH, KW, d, d, Wp, tpix)
    wq = KL.lut_conv_weights(w_int, lv, cb)
    Op = -(-O // 16) * 16
    s0, s1 = np.zeros(Op), np.zeros(Op)
    s1[:O], s0[:O] = RNG.uniform(0.01, 0.05, O), RNG.uniform(-1, 1, O)
    res = RNG.standard_normal((N, OH, OW, O)).astype(np.float32)
    cg = np.array([OH + 2, OW + 2, 1, 1], np.int64)
    hi, mult = 3.0, 5.0
    # the integer sums themselves (s1 = 1, s0 = 0): the float64 convolution of the integers
    one = np.zeros(Op)
    one[:O] = 1.0
    raw = np.empty((N, OH, OW, O), np.float32)
    for sums in sorted({1, KG.lut_sums(lv, cb, 4)}):
        KL.lut_conv(tab, geo, tpix, koff, wq, sums, np.zeros(Op), one, False, raw)
        x = xq[: N * Hp * Wp * C].reshape(N, Hp, Wp, C).transpose(0, 3, 1, 2)
        D = k8.int8_conv_reference(x, w_int.transpose(0, 3, 1, 2), (s, s), (0, 0), (d, d))
        np.testing.assert_array_equal(raw.astype(np.float64), D)
    sums = KG.lut_sums(lv, cb, 4)
    wabs = np.abs(w_int).reshape(O, -1).sum(axis=1).astype(np.float64)
    sf, usable = k8.f32_coefficients(s0, s1, wabs, 15, hi, mult)
    assert usable
    # (ReLU, float output, residual, codes, float32 epilogue)
    epilogues = [(True, True, True, True, False), (False, True, False, False, False),
                 (True, False, False, True, True), (True, False, True, True, False)]
    for relu, use_out, use_res, use_codes, use_sf in epilogues:
        got = []
        for kernel in ("lut", "int8"):
            out = np.full((N, OH, OW, O), np.nan, np.float32) if use_out else None
            codes = np.zeros(N * (OH + 2) * (OW + 2) * O + 64, np.uint8) if use_codes else None
            args = (s0, s1, relu, out, res if use_res else None, codes, cg if use_codes else None, hi, mult,
                    sf if use_sf else None)
            if kernel == "lut":
                KL.lut_conv(tab, geo, tpix, koff, wq, sums, *args)
            else:
                k8.int8_conv(xq, geo, qoff, w8, passes, *args)
            got.append((out, codes))
        (lo, lc), (io, ic) = got
        assert (lo is None or np.array_equal(lo, io)) and (lc is None or np.array_equal(lc, ic))
        assert lo is None or not np.isnan(lo).any()


def test_where_the_layers_use_it(monkeypatch):
    monkeypatch.setattr(KL, "HAS_LUT", True)
    binary, _ = KG.lut_levels(np.array([-1, 1]))
    ternary, _ = KG.lut_levels(np.array([-1, 0, 1]))
    two_bit, _ = KG.lut_levels(np.array([-3, -1, 1, 3]))
    assert KL.lut_conv_applies(binary, 1, 32, 4) and KL.lut_conv_applies(binary, 1, 64, 1)
    assert not KL.lut_conv_applies(binary, 1, 16, 4)  # half of each step pair would be padding
    assert not KL.lut_conv_applies(binary, 1, 32, 5)  # two lookups no longer fit int8
    assert KL.lut_conv_applies(ternary, 2, 64, 4) and KL.lut_conv_applies(ternary, 2, 64, 5)
    assert not KL.lut_conv_applies(ternary, 2, 32, 4)  # measured no faster
    assert not KL.lut_conv_applies(two_bit, 2, 64, 4)  # 2 * 2 * 3 * 15 > 127
    monkeypatch.setattr(KL, "USE", False)
    assert not KL.lut_conv_applies(binary, 1, 32, 4)
    monkeypatch.setattr(KL, "USE", True)
    monkeypatch.setattr(KL, "HAS_LUT", False)
    assert not KL.lut_conv_applies(binary, 1, 32, 4)


@needs_lut
@pytest.mark.parametrize("weight,n_lut", [("binary", 11), ("ternary", 5)])
def test_resnet20_with_lookup_convolutions_equals_without(weight, n_lut, monkeypatch):
    """Binary stages 2-3 (32 and 64 channels) and ternary stage 3 run by lookup: the flat program
    and the module graph give the int8 kernel's outputs bit for bit, on 1 and 2 threads, in chunks
    of one image."""
    monkeypatch.setattr(_amx, "HAS_AMX", False)  # the executor prefers AMX tiles where it has them
    monkeypatch.setattr(executor, "CHUNK_BYTES", 1)  # one image per chunk
    monkeypatch.setattr(executor, "MIN_THREAD_WORK_S", 0.0)  # split this small batch too
    model = _model("resnet20", weight)
    x = torch.rand(3, 3, 16, 16)
    got = {}
    prev = numba.get_num_threads()
    try:
        for use in (True, False):
            monkeypatch.setattr(KL, "USE", use)
            packed = rt.compile(model, x[:2])
            kinds = [layer.kernel_name() for layer in packed.packed_layers().values()]
            assert kinds.count("lut") == (n_lut if use else 0)
            prog = packed.executor.program((3, 16, 16))
            assert int((prog.prog[:, 29] == 4).sum()) == (n_lut if use else 0)
            got[use] = packed(x)
            for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
                numba.set_num_threads(threads)
                _check_flat(model, packed, x)
    finally:
        numba.set_num_threads(prev)
    assert torch.equal(got[True], got[False])
