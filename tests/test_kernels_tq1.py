"""The 1.6-bit ternary GEMV (runtime/kernels_tq1.py): the five-trits-per-byte code (every trit
pattern), the layout (NumPy reference against the one-pass packer, ragged shapes), the VNNI kernel
and the scalar plain-path loop against the exact integer reference (1 and 2 rows, 1 and 2 threads,
the int32 bound), and PackedLinear / compile with ternary weights against the float64 model."""

from __future__ import annotations

import itertools

import numba
import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.runtime import _jit, compile
from lowbit.runtime import kernels_gemv as KV
from lowbit.runtime import kernels_tq1 as KT
from lowbit.runtime.compiler import reference_fp64
from lowbit.runtime.kernels_pack import quantize_codes_reference
from lowbit.runtime.layers import PackedLinear

needs_vnni = pytest.mark.skipif(not _jit.HOST_VNNI, reason="the 1.6-bit tiles need AVX-512 VNNI")
layers_vnni = pytest.mark.skipif(not (_jit.HAS_VNNI and KT.ENABLED), reason="layers use the 1.6-bit GEMV")

# (M, O, K): K not a multiple of 5, 20, 32 or 64, O odd or not a multiple of 16
SHAPES = [(1, 1, 2), (1, 17, 7), (2, 33, 77), (1, 49, 333), (2, 100, 1001), (1, 64, 20), (2, 16, 5),
          (1, 130, 64), (2, 3, 4097)]
# integer weights taking three consecutive values: fields q + off in {0, 1, 2}
LEVELS = {"ternary": (-1, 1), "shifted": (-2, 0), "unsigned": (0, 2)}


def _trits() -> np.ndarray:
    return np.array(list(itertools.product(range(3), repeat=5)))


def test_every_trit_pattern_of_a_byte_round_trips():
    t = _trits()
    p = KT.encode_trits(t)
    assert len(np.unique(p)) == 243 and p.dtype == np.uint8  # 243 distinct bytes
    np.testing.assert_array_equal(KT.decode_trits(p), t)
    # the kernel's linear form: 3 u_i - u_{i+1} = 256 t_i for every byte and trit
    u = p.astype(np.int64)
    for i in range(5):
        un = (3 * u) % 256
        np.testing.assert_array_equal(3 * u - un, 256 * t[:, i])
        u = un
    # the plain rounding would not do: floor instead of ceil loses trits
    n = t @ np.array([81, 27, 9, 3, 1])
    assert not np.array_equal(KT.decode_trits((n * 256 // 243).astype(np.uint8)), t)


@pytest.mark.parametrize("O,K", [(1, 1), (17, 7), (33, 77), (16, 20), (49, 333), (5, 4097)])
def test_layout_roundtrip_and_fast_packer(O, K):
    rng = np.random.default_rng(O * 1000 + K)
    f = rng.integers(0, 3, (O, K))
    w = KT.pack_tq1(f)
    assert w.size == -(-O // 16) * -(-K // 20) * 64  # 1.6 bits per weight plus padding
    np.testing.assert_array_equal(KT.pack_tq1_fast(f), w)
    np.testing.assert_array_equal(KT.unpack_tq1(w, O, K), f)
    # byte 4*o + l of group g holds reduction index 20 g + 4 i + l as trit i
    if O > 3 and K > 27:
        g, o, lane, i = 1, 3, 2, 1
        assert KT.decode_trits(w[64 * g + 4 * o + lane])[i] == f[o, 20 * g + 4 * i + lane]


def _run(gw, codes, s0, s1, s2, relu, mode=1, hi=0.0, mult=0.0):
    out = np.full((codes.shape[0], gw.O), np.nan, np.float32)
    KT.gemv_tq1(codes, mode, hi, mult, gw, s0, s1, s2, relu, out)
    return out


@needs_vnni
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("levels", list(LEVELS))
def test_tq1_equals_integer_reference(levels, threads, monkeypatch):
    """Bit-exact on ragged shapes: the 1.6-bit kernel's float32 output equals the reference (exact
    int64 sums, the same float64 epilogue) and the 2-bit GEMV's, for codes and fused quantization."""
    rng = np.random.default_rng(len(levels) + threads)
    if threads == 2:
        monkeypatch.setattr(KV, "GEMV_MIN_PARALLEL_MACS", 0)
    old = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    lo, hi_q = LEVELS[levels]
    try:
        for M, O, K in SHAPES:
            q = rng.integers(lo, hi_q + 1, (O, K))
            q[0, 0], q[-1, -1] = lo, hi_q  # three levels: 2-bit fields (two would make 1-bit ones)
            gw = KT.tq1_weights(KV.GemvWeights(q), q, min_weights=0)
            assert gw.tq1 is not None
            np.testing.assert_array_equal(KT.unpack_tq1(gw.tq1.w, O, K) - gw.off, q)
            s0, s1, s2 = rng.standard_normal((3, O))
            for relu in (False, True):
                codes = rng.integers(0, 256, (M, K)).astype(np.float32)
                codes[0, : min(K, 5)] = 255
                ref = KV.gemv_reference(codes, q, s0, s1, s2, relu)
                np.testing.assert_array_equal(_run(gw, codes, s0, s1, s2, relu), ref, err_msg=f"{M} {O} {K}")
                # gemv() dispatches to it, and the 2-bit kernel (3+ rows or no 1.6-bit form) agrees
                out = np.empty((M, O), np.float32)
                KV.gemv(codes, 1, 0.0, 0.0, gw, s0, s1, s2, relu, out)
                np.testing.assert_array_equal(out, ref)
                KV.gemv(codes, 1, 0.0, 0.0, KV.GemvWeights(q), s0, s1, s2, relu, out)
                np.testing.assert_array_equal(out, ref)
            x = rng.standard_normal((M, K)).astype(np.float32) * 2
            hi, mult = np.float32(1.5), np.float32(255 / 1.5)
            ref = KV.gemv_reference(quantize_codes_reference(x, hi, mult), q, s0, s1, s2)
            np.testing.assert_array_equal(_run(gw, x, s0, s1, s2, False, 0, hi, mult), ref)
    finally:
        numba.set_num_threads(old)


@needs_vnni
def test_tq1_exact_at_the_int32_bound():
    """The largest products at the longest accepted reduction (``3 S - S'`` wraps in int32 and is
    still exact), and the comparison can fail (one flipped trit changes the output)."""
    K = KT.TQ1_MAX_K
    ones = np.ones(16)
    for code, level in [(0, 1), (0, -1), (255, -1), (255, 1)]:
        q = np.full((16, K), level)
        q[1, ::7], q[2, ::5] = 0, -level  # three levels (2-bit fields)
        gw = KT.tq1_weights(KV.GemvWeights(q), q, min_weights=0)
        codes = np.full((1, K), code, np.float32)
        out = _run(gw, codes, 0 * ones, ones, 0 * ones, False)
        np.testing.assert_array_equal(out, KV.gemv_reference(codes, q, 0 * ones, ones, 0 * ones))
    assert _run(gw, codes[:0], 0 * ones, ones, 0 * ones, False).shape == (0, 16)  # no rows: nothing read
    q2 = q.copy()
    q2[5, 12345] = 0
    assert not np.array_equal(out, KV.gemv_reference(codes, q2, 0 * ones, ones, 0 * ones))
    with pytest.raises(ValueError, match="too long"):
        KT.Tq1Weights(KV.GemvWeights(np.zeros((1, K + 1), np.int64)), np.zeros((1, K + 1), np.int64))


def test_tq1_weights_only_for_large_ternary_layers(monkeypatch):
    rng = np.random.default_rng(4)
    monkeypatch.setattr(KT, "TQ1_MIN_WEIGHTS", 800)
    q = rng.integers(-1, 2, (20, 40))
    assert (KT.tq1_weights(KV.GemvWeights(q), q).tq1 is not None) == _jit.HOST_VNNI  # 800 weights
    assert KT.tq1_weights(KV.GemvWeights(q[:, :39]), q[:, :39]).tq1 is None  # 780: smaller layers stay 2-bit
    monkeypatch.setattr(KT, "TQ1_MIN_WEIGHTS", 0)
    assert KT.tq1_weights(KV.GemvWeights(q := rng.integers(0, 4, (20, 40))), q).tq1 is None  # 4 levels
    assert KT.tq1_weights(KV.GemvWeights(q := rng.integers(0, 2, (20, 40))), q).tq1 is None  # binary
    big = np.zeros((1, KT.TQ1_MAX_K + 1), np.int64)
    big[0, 0] = 2
    assert KT.tq1_weights(KV.GemvWeights(big), big).tq1 is None
    q = rng.integers(-1, 2, (20, 40))
    gw = KT.tq1_weights(KV.GemvWeights(q), q)
    assert (gw.tq1 is not None) == _jit.HOST_VNNI
    if gw.tq1 is not None:
        assert gw.nbytes == gw.w.nbytes + gw.F.nbytes + gw.tq1.w.nbytes
    monkeypatch.setattr(KT, "ENABLED", False)
    assert KT.tq1_weights(KV.GemvWeights(q), q).tq1 is None


@pytest.mark.parametrize("levels", list(LEVELS))
def test_plain_loop_equals_reference(levels):
    """The scalar loop over the same bytes (any CPU) equals the reference: ragged shapes, 1-2 rows."""
    rng = np.random.default_rng(7)
    lo, hi = LEVELS[levels]
    off = -lo
    for M, O, K in SHAPES[:7]:
        q = rng.integers(lo, hi + 1, (O, K))
        w = KT.pack_tq1(q + off)
        codes = rng.integers(0, 256, (M, K))
        s = rng.standard_normal((3, O))
        for relu in (False, True):
            out = np.empty((M, O), np.float32)
            KT.gemv_tq1_plain(codes, w, O, K, off, s, relu, out)
            np.testing.assert_array_equal(out, KT.tq1_reference(codes, w, O, K, off, *s, relu))
            np.testing.assert_array_equal(out, KV.gemv_reference(codes, q, *s, relu))


# ----------------------------------------------------------------------------------------------
# through PackedLinear / compile
# ----------------------------------------------------------------------------------------------


def _mlp(act: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # every layer has >= layers.LUT_FLAT_MAX weights (smaller ones run the flat int8 program)
    m = nn.Sequential(nn.Linear(301, 901), nn.ReLU(), nn.Linear(901, 517), nn.ReLU(), nn.Linear(517, 600))
    lowbit.quantize(m, {"default": {"weight": {"method": "twn", "bits": 2}, "activation": act}})
    return m.eval()


@layers_vnni
@pytest.mark.parametrize("act", [{"method": "pact", "bits": 8, "alpha_init": 3.0},
                                 {"method": "pact", "bits": 4, "alpha_init": 2.0}])
def test_compiled_ternary_mlp_runs_tq1(act, monkeypatch):
    """compile() of a ternary MLP: every layer holds the 1.6-bit form and runs it at 1 row;
    the output equals the float64 fake-quantized model and, bit for bit, the forced plain path
    (bit-serial kernels, no 1.6-bit form), the 2-bit GEMV (1.6-bit switched off) and 2 threads."""
    monkeypatch.setattr(KT, "TQ1_MIN_WEIGHTS", 0)  # layers of 0.3-0.8M weights: below the default
    qm = _mlp(act, seed=act["bits"])
    x = torch.randn(4, 301) * 2
    pm = compile(qm, x)
    layers = [m for m in pm.packed_layers().values() if isinstance(m, PackedLinear)]
    assert len(layers) == 3 and all(m.gemv is not None and m.gemv.tq1 is not None for m in layers)
    calls = []
    run = KT.Tq1Weights.run
    monkeypatch.setattr(KT.Tq1Weights, "run", lambda self, *a: calls.append(a[-1].shape[0]) or run(self, *a))
    ref = reference_fp64(qm, x)
    got = {M: pm(x[:M]) for M in (1, 2, 3)}
    assert calls == [1] * 3  # 2 and 3 rows: the 2-bit GEMV (KT.TQ1_MAX_ROWS)
    monkeypatch.undo()
    _jit.set_plain(True)
    try:
        plain = compile(qm, x)
    finally:
        _jit.set_plain(False)
    assert all(m.gemv is None for m in plain.packed_layers().values() if isinstance(m, PackedLinear))
    monkeypatch.setattr(KT, "ENABLED", False)
    two_bit = compile(qm, x)
    assert all(m.gemv.tq1 is None for m in two_bit.packed_layers().values() if isinstance(m, PackedLinear))
    monkeypatch.undo()
    for M, y in got.items():
        scale = ref[:M].abs().max().clamp_min(1e-12)
        assert float((y.double() - ref[:M]).abs().max() / scale) < 1e-5, M
        assert torch.equal(y, plain(x[:M])) and torch.equal(y, two_bit(x[:M])), M
    monkeypatch.setattr(KV, "GEMV_MIN_PARALLEL_MACS", 0)
    old = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        assert torch.equal(got[1], pm(x[:1])) and torch.equal(got[2], pm(x[:2]))
    finally:
        numba.set_num_threads(old)
