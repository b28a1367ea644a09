"""The AMX Linear epilogue (runtime/kernels_amx.py): the int32 sums of a run of channel groups stay
parked, then ``_jit.amx_epilogue`` runs per 16 rows and group. Bit-exact against
``amx_linear_reference`` (exact integer sums, float64 epilogue, float32 store) on ragged shapes (rows
not a multiple of 16, outputs not a multiple of 32 / 64, several runs per call, the last one
partial), binary / ternary / 4-bit weights with 4- and 8-bit activation codes, ReLU on and off, 1
and 2 threads, runs of 1 to 32 groups; the next layer's codes written by the epilogue (row-major,
or in its tile layout, then run from there) equal its quantization of the float output;
PackedLinear at many rows (the plain path: test_kernels_amx.py). No timing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.runtime import _amx
from lowbit.runtime import kernels_amx as KA
from lowbit.runtime.kernels_gemv import GemvWeights
from lowbit.runtime.kernels_pack import quantize_codes_reference
from lowbit.runtime.layers import PackedLinear, build_packed, fold_integers

needs_amx = pytest.mark.skipif(not _amx.amx_enabled(), reason="AMX-INT8 unavailable (CPU, OS or plain path)")

RNG = np.random.default_rng(2026)
# (M, K, O): M off multiples of 16 (one row block, odd block counts), O off multiples of 32 / 64 and
# above 256 channels (more than one epilogue run per call, the last one partial)
SHAPES = [(9, 64, 20), (16, 100, 37), (17, 130, 70), (33, 200, 100), (45, 257, 130), (70, 128, 300),
          (100, 64, 530)]


def _weights(kind: str, O: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """(plane integers q, folded int8 weights) as layers.fold_integers gives them."""
    if kind == "binary":
        q = RNG.integers(0, 2, (O, K))
        return q, 2 * q - 1
    if kind == "ternary":
        q = RNG.integers(-1, 2, (O, K))
        return q, q
    q = RNG.integers(0, 16, (O, K))
    return q, 2 * q - 15


def _misaligned(M: int, O: int, shift: int) -> np.ndarray:
    """An (M, O) float32 array starting ``shift`` floats past a 64-byte line."""
    raw = KA.aligned_u8(4 * (M * O + 16)).view(np.float32)
    return raw[shift : shift + M * O].reshape(M, O)


@pytest.fixture
def threads(threads, monkeypatch):
    """conftest's thread counts, with the AMX / VNNI tiles' split forced on too."""
    monkeypatch.setattr(KA, "AMX_MIN_PARALLEL_MACS", 1)
    monkeypatch.setattr(KA, "VNNI_MIN_PARALLEL_MACS", 1)
    return threads


@needs_amx
@pytest.mark.parametrize("kind", ["binary", "ternary", "q4"])
def test_epilogue_bit_exact(kind, threads):
    for j, (M, K, O) in enumerate(SHAPES):
        q, w = _weights(kind, O, K)
        aw = KA.amx_linear_weights(GemvWeights(q), q, w, 0.25)
        a = RNG.integers(0, 256 if j % 2 else 16, (M, K))  # 8-bit and 4-bit codes
        s0, s1 = KA.amx_coeffs(aw, RNG.uniform(0.5, 2.0, O), 0.1, 3.0, RNG.uniform(0.5, 2.0, O),
                               RNG.normal(size=O))
        for relu in (False, True):
            out = _misaligned(M, O, j % 16)  # rows need not start on a cache line
            out[:] = np.nan  # every output written
            KA.amx_linear(a.astype(np.float32), 1, 0.0, 0.0, aw, s0, s1, relu, out)
            np.testing.assert_array_equal(out, KA.amx_linear_reference(a, w, s0, s1, relu))


@needs_amx
@pytest.mark.parametrize("channels,acc_kib", [(16, 512), (64, 512), (96, 512), (256, 1), (1024, 4096)])
def test_epilogue_runs_of_any_length(channels, acc_kib, monkeypatch):
    """Runs of 1 to 32 groups (a run not a multiple of the group count included), the cap on the
    parked sums (1 KiB: one group per run)."""
    monkeypatch.setattr(KA, "EPI_CHANNELS", channels)
    monkeypatch.setattr(KA, "EPI_ACC_KIB", acc_kib)
    for M, K, O in [(40, 130, 530), (16, 64, 300), (300, 64, 200)]:
        q, w = _weights("ternary", O, K)
        aw = KA.amx_linear_weights(GemvWeights(q), q, w, 1.0)
        a = RNG.integers(0, 16, (M, K))
        s0, s1 = KA.amx_coeffs(aw, np.ones(O), 0.3, 0.0, np.ones(O), RNG.normal(size=O))
        out = np.full((M, O), np.nan, np.float32)
        KA.amx_linear(a.astype(np.uint8), 1, 0.0, 0.0, aw, s0, s1, True, out)
        np.testing.assert_array_equal(out, KA.amx_linear_reference(a, w, s0, s1, True))


def _case(j: int, M: int, K: int, O: int):
    """Shape j's layer (binary / ternary / 4-bit in turn), 4-bit input codes and its coefficients."""
    q, w = _weights(("binary", "ternary", "q4")[j % 3], O, K)
    aw = KA.amx_linear_weights(GemvWeights(q), q, w, 0.5)
    a = RNG.integers(0, 16, (M, K))
    s0, s1 = KA.amx_coeffs(aw, RNG.uniform(0.5, 2.0, O), 0.1, 1.0, np.ones(O), RNG.normal(size=O))
    return w, aw, a, s0, s1


@needs_amx
@pytest.mark.parametrize("with_float", [True, False], ids=["float+codes", "codes"])
def test_next_layer_codes_from_the_epilogue(with_float, threads):
    """codes = the next layer's fused quantization of the float32 output, bit for bit; the float
    output unchanged beside them; nothing past M*O written."""
    for j, (M, K, O) in enumerate(SHAPES):
        w, aw, a, s0, s1 = _case(j, M, K, O)
        qhi, qmult = 2.5, 15 / 2.5
        for relu in (False, True):
            ref = KA.amx_linear_reference(a, w, s0, s1, relu)
            codes = np.full(M * O + 64, 255, np.uint8)
            out = np.full((M, O), np.nan, np.float32) if with_float else None
            got = KA.amx_linear(a.astype(np.uint8), 1, 0.0, 0.0, aw, s0, s1, relu, out, codes, qhi, qmult)
            assert got is (out if with_float else codes)
            want = quantize_codes_reference(ref, qhi, qmult)
            np.testing.assert_array_equal(codes[: M * O].reshape(M, O), want)
            assert (codes[M * O :] == 255).all()
            if with_float:
                np.testing.assert_array_equal(out, ref)


@needs_amx
def test_next_layer_code_tiles(threads):
    """codes written straight into the next layer's tile layout (amx_rows_reference of its
    quantized input, zero padding kept), and that layer run from them equals it run on the floats."""
    for j, (M, K, O) in enumerate(SHAPES):
        w, aw, a, s0, s1 = _case(j, M, K, O)
        qhi, qmult = 2.5, 15 / 2.5
        y = KA.amx_linear_reference(a, w, s0, s1, True)
        tiles = KA.code_tiles(M, O)
        KA.amx_linear(a.astype(np.uint8), 1, 0.0, 0.0, aw, s0, s1, True, None, tiles, qhi, qmult, tiles=True)
        want = KA.amx_rows_reference(quantize_codes_reference(y, qhi, qmult), -(-O // 64))
        np.testing.assert_array_equal(tiles, want)
        q2, w2 = _weights("ternary", 24, O)  # the next layer, fed with the tiles
        aw2 = KA.amx_linear_weights(GemvWeights(q2), q2, w2, 1.0)
        t0, t1 = KA.amx_coeffs(aw2, np.ones(24), 0.2, 0.0, np.ones(24), RNG.normal(size=24))
        got = KA.amx_linear_tiles(tiles, M, aw2, t0, t1, False, np.empty((M, 24), np.float32))
        np.testing.assert_array_equal(got, KA.amx_linear(y, 0, qhi, qmult, aw2, t0, t1, False,
                                                         np.empty((M, 24), np.float32)))


def test_amx_linear_rejects_short_coefficients():
    q, w = _weights("binary", 70, 64)
    aw = KA.amx_linear_weights(GemvWeights(q), q, w, 1.0)
    s0, s1 = KA.amx_coeffs(aw, np.ones(70), 1.0, 0.0, np.ones(70), np.zeros(70))
    out = np.empty((16, 70), np.float32)
    with pytest.raises(ValueError, match="at least 128 entries"):
        KA.amx_linear(np.zeros((16, 64), np.float32), 1, 0, 0, aw, s0[:100], s1, False, out)
    with pytest.raises(ValueError, match="float64"):
        KA.amx_linear(np.zeros((16, 64), np.float32), 1, 0, 0, aw, s0.astype(np.float32), s1, False, out)
    with pytest.raises(ValueError, match="nothing to write"):
        KA.amx_linear(np.zeros((16, 64), np.float32), 1, 0, 0, aw, s0, s1, False, None)
    with pytest.raises(ValueError, match=r"at least 1120 \(M\*O\)"):
        KA.amx_linear(np.zeros((16, 64), np.float32), 1, 0, 0, aw, s0, s1, False, None,
                      np.zeros(1000, np.uint8))
    with pytest.raises(ValueError, match="written alone"):
        KA.amx_linear(np.zeros((16, 64), np.float32), 1, 0, 0, aw, s0, s1, False, out, KA.code_tiles(16, 70),
                      tiles=True)


def _layer(w: dict, K: int, O: int) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(K, O)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(lin, {"default": {"weight": w, "activation": {"method": "pact", "bits": 4,
                                                                      "alpha_init": 3.0}}})
    return lin.eval()


@needs_amx
def test_packed_linear_many_rows():
    """PackedLinear's AMX path (several epilogue runs, the last one partial): the integer reference."""
    lin = _layer({"method": "twn", "bits": 2}, 300, 530)
    pl = build_packed("fc", lin)
    assert isinstance(pl, PackedLinear) and pl.amx is not None
    M = 77
    x = torch.rand(M, 300) * 4
    with torch.inference_mode():
        got = pl(x).numpy()
    codes = quantize_codes_reference(x.numpy(), pl.act.hi, pl.act.mult)
    w, _ = fold_integers(pl.wp)
    s0, s1 = pl._amx_coeffs(pl.act.sx, pl.act.ma)
    np.testing.assert_array_equal(got, KA.amx_linear_reference(codes, w, s0, s1, pl.relu))
