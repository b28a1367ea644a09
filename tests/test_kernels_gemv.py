"""The few-row GEMV (runtime/kernels_gemv.py): the field layout, the kernel against its exact
integer reference (every field width, 1..8-bit codes, odd shapes, 1 and 2 threads), and the
PackedLinear dispatch against the float64 fake-quantized model and the forced plain path."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.runtime import _jit, compile
from lowbit.runtime import kernels as K
from lowbit.runtime import kernels_gemv as KV
from lowbit.runtime.compiler import reference_fp64
from lowbit.runtime.kernels_pack import quantize_codes_reference
from lowbit.runtime.layers import PackedLinear

needs_vnni = pytest.mark.skipif(not _jit.HOST_VNNI, reason="the GEMV tiles need AVX-512 VNNI")
# layers pick the GEMV only where the plain path is not forced for the whole run (LOWBIT_RUNTIME_PLAIN=1)
layers_vnni = pytest.mark.skipif(not _jit.HAS_VNNI, reason="layers use the GEMV: AVX-512 VNNI, not plain")

# integer weight ranges of binary, ternary, shifted ternary (levels -2, 0, 1), 2-bit and 4-bit
RANGES = {"binary": (0, 1), "ternary": (-1, 1), "ternary-shift": (-2, 1), "2bit": (0, 3), "4bit": (0, 15)}


def _weights(rng, kind: str, O: int, Kr: int) -> np.ndarray:
    lo, hi = RANGES[kind]
    q = rng.integers(lo, hi + 1, (O, Kr))
    if kind == "ternary-shift":
        q[q == -1] = 0
    return q


@pytest.mark.parametrize("kind,b,off", [("binary", 1, 0), ("ternary", 2, 1), ("ternary-shift", 2, 2),
                                        ("2bit", 2, 0), ("4bit", 4, 0)])
def test_fields_roundtrip(kind, b, off):
    rng = np.random.default_rng(0)
    for O, Kr in [(1, 2), (17, 33), (40, 129), (5, 300)]:
        q = _weights(rng, kind, O, Kr)
        q[0, 0], q[-1, -1] = RANGES[kind]  # both ends of the range occur
        assert KV.field_bits(q) == (b, off)
        w = KV.pack_fields(q, b, off)
        assert w.size == -(-O // 16) * 16 * -(-Kr // 32) * 32 * b // 8
        np.testing.assert_array_equal(KV.unpack_fields(w, b, O, Kr), q + off)
        for dtype in (np.int32, np.int64):  # the one-pass packer GemvWeights uses: the same bytes
            np.testing.assert_array_equal(KV.pack_fields_fast(q.astype(dtype), b, off), w)


def test_field_bits_refuses_wide_ranges():
    assert KV.field_bits(np.array([[-8, 8]])) is None
    with pytest.raises(ValueError, match="wider than 4 bits"):
        KV.GemvWeights(np.array([[0, 16]]))
    with pytest.raises(ValueError, match="too long"):
        KV.GemvWeights((np.arange(140_000) % 16)[None])  # 4-bit fields: K < 131,000


@needs_vnni
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", list(RANGES))
def test_gemv_equals_integer_reference(kind, threads, monkeypatch):
    """Bit-exact: the kernel's float32 output equals the reference's (exact int64 sums, the same
    float64 epilogue), for codes of 1..8 bits, given as codes or quantized from floats."""
    rng = np.random.default_rng(hash(kind) % 2**32)
    if threads == 2:
        monkeypatch.setattr(KV, "GEMV_MIN_PARALLEL_MACS", 0)
    old = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for M, O, Kr, ka in [(1, 16, 32, 8), (1, 37, 70, 1), (2, 70, 129, 4), (3, 64, 200, 8), (4, 33, 65, 2),
                             (5, 100, 31, 3), (7, 90, 300, 8), (6, 130, 1, 5), (1, 200, 1000, 7)]:
            q = _weights(rng, kind, O, Kr)
            gw = KV.GemvWeights(q)
            s0, s1, s2 = rng.standard_normal((3, O))
            for relu in (False, True):
                codes = rng.integers(0, 2**ka, (M, Kr)).astype(np.float32)
                codes[0, : min(Kr, 5)] = 2**ka - 1  # the largest code occurs
                out = np.full((M, O), np.nan, np.float32)
                KV.gemv(codes, 1, 0.0, 0.0, gw, s0, s1, s2, relu, out)
                ref = KV.gemv_reference(codes, q, s0, s1, s2, relu)
                np.testing.assert_array_equal(out, ref, err_msg=f"{kind} M={M} O={O} K={Kr} ka={ka}")
            # fused quantization of float inputs (mode 0)
            x = rng.standard_normal((M, Kr)).astype(np.float32) * 2
            hi, mult = np.float32(1.5), np.float32((2**ka - 1) / 1.5)
            out = np.empty((M, O), np.float32)
            KV.gemv(x, 0, hi, mult, gw, s0, s1, s2, False, out)
            ref = KV.gemv_reference(quantize_codes_reference(x, hi, mult), q, s0, s1, s2)
            np.testing.assert_array_equal(out, ref)
    finally:
        numba.set_num_threads(old)


@needs_vnni
@pytest.mark.parametrize("mult", [1.0, 0.5, 85.0])
def test_gemv_input_rounding_ties_to_even(mult):
    """The fused input quantizer clips to [0, hi] and rounds half-way products to even as
    ``np.rint`` does (0.5 -> 0, 1.5 -> 2, 2.5 -> 2): every tie and every code, exactly."""
    hi = np.float32(255.0 / mult)
    ties = (np.arange(256) + 0.5) / np.float32(mult)
    x = np.concatenate([ties, np.arange(256) / np.float32(mult), [-3.0, -0.0, 1e9, hi, np.nextafter(hi, 0)]])
    x = x.astype(np.float32)[None]
    t = np.minimum(np.maximum(x, np.float32(0)), hi) * np.float32(mult)
    assert np.sum(t == np.floor(t) + 0.5) >= 100  # the ties are exact in float32
    rng = np.random.default_rng(3)
    q = _weights(rng, "ternary", 16, x.shape[1])
    gw = KV.GemvWeights(q)
    s0, s1, s2 = rng.standard_normal((3, 16))
    out = np.empty((1, 16), np.float32)
    KV.gemv(x, 0, hi, np.float32(mult), gw, s0, s1, s2, False, out)
    codes = quantize_codes_reference(x, hi, np.float32(mult))
    np.testing.assert_array_equal(out, KV.gemv_reference(codes, q, s0, s1, s2))
    # one code off by one changes the output: the comparison can fail
    codes[0, 1] += 1
    assert not np.array_equal(out, KV.gemv_reference(codes, q, s0, s1, s2))


@needs_vnni
def test_gemv_run_coefficients_padded_or_not():
    """``gemv_run`` takes the epilogue's coefficients padded to 16 outputs (what a layer caches,
    :func:`gemv_coef`) or as (3, O) rows; both give the reference exactly, and the padding is zero."""
    rng = np.random.default_rng(5)
    q = _weights(rng, "4bit", 37, 90)
    gw = KV.GemvWeights(q)
    s0, s1, s2 = rng.standard_normal((3, 37))
    coef = KV.gemv_coef(s0, s1, s2, gw)
    assert coef.shape == (3, 48) and not coef[:, 37:].any()
    codes = rng.integers(0, 256, (2, 90)).astype(np.float32)
    qp = np.array([0.0, 0.0], np.float32)
    ref = KV.gemv_reference(codes, q, s0, s1, s2, True)
    for c in (coef, np.stack([s0, s1, s2])):
        out = np.empty((2, 37), np.float32)
        KV.gemv_run(codes, 1, qp, gw, c, True, out)
        np.testing.assert_array_equal(out, ref)


@needs_vnni
def test_gemv_is_not_the_reference_of_other_weights():
    """The comparison can fail: one flipped weight field changes the output."""
    rng = np.random.default_rng(1)
    q = _weights(rng, "ternary", 16, 64)
    codes = rng.integers(1, 256, (1, 64)).astype(np.float32)
    ones = np.ones(16)
    out = np.empty((1, 16), np.float32)
    KV.gemv(codes, 1, 0.0, 0.0, KV.GemvWeights(q), 0 * ones, ones, 0 * ones, False, out)
    q2 = q.copy()
    q2[3, 10] = 1 if q[3, 10] != 1 else -1
    ref2 = KV.gemv_reference(codes, q2, 0 * ones, ones, 0 * ones)
    assert not np.array_equal(out, ref2)
    assert np.array_equal(out, KV.gemv_reference(codes, q, 0 * ones, ones, 0 * ones))


# ----------------------------------------------------------------------------------------------
# through PackedLinear / compile
# ----------------------------------------------------------------------------------------------

WEIGHTS = {
    "binary": {"method": "binary", "bits": 1},
    "ternary": {"method": "twn", "bits": 2},
    "2bit": {"method": "dorefa", "bits": 2},
    "4bit": {"method": "dorefa", "bits": 4},
}


def _mlp(weight: dict, act: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(70, 129), nn.ReLU(), nn.Linear(129, 300), nn.ReLU(), nn.Linear(300, 37))
    lowbit.quantize(m, {"default": {"weight": weight, "activation": act}})
    return m.eval()


PACT8 = {"method": "pact", "bits": 8, "alpha_init": 3.0}
PACT3 = {"method": "pact", "bits": 3, "alpha_init": 2.0}
DOREFA1 = {"method": "dorefa", "bits": 1}
SIGNED4 = {"method": "uniform", "bits": 4, "signed": True, "clip": 2.0}  # codes with a zero point
ACTS = {"binary": (PACT8, SIGNED4), "ternary": (PACT3, PACT8), "2bit": (DOREFA1, SIGNED4),
        "4bit": (PACT8, PACT3)}


@layers_vnni
@pytest.mark.parametrize("wname", list(WEIGHTS))
def test_packed_linear_few_rows(wname, monkeypatch):
    """compile() of a quantized MLP: every layer on the GEMV for 1..7 rows, equal to the float64
    fake-quantized model, and bit for bit equal to the forced plain path (bit-serial kernels) and
    to itself on 2 threads."""
    for i, act in enumerate(ACTS[wname]):
        qm = _mlp(WEIGHTS[wname], act, seed=i)
        x = torch.randn(3, 70)
        pm = compile(qm, x)
        layers = [m for m in pm.packed_layers().values() if isinstance(m, PackedLinear)]
        assert len(layers) == 3 and all(m.gemv is not None for m in layers), pm.summary()
        assert "gemv" in layers[0].describe()
        _jit.set_plain(True)
        try:
            plain = compile(qm, x)
        finally:
            _jit.set_plain(False)
        assert all(m.gemv is None for m in plain.packed_layers().values())
        x7 = torch.randn(7, 70) * 2
        ref7 = reference_fp64(qm, x7)  # rows are independent
        for M in (1, 2, 5, 7):
            xm, ref = x7[:M], ref7[:M]
            got = pm(xm)
            scale = ref.abs().max().clamp_min(1e-12)
            assert float((got.double() - ref).abs().max() / scale) < 1e-5, (wname, act, M)
            assert torch.equal(got, plain(xm)), (wname, act, M)
            monkeypatch.setattr(KV, "GEMV_MIN_PARALLEL_MACS", 0)
            old = numba.get_num_threads()
            numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
            try:
                assert torch.equal(got, pm(xm))
            finally:
                numba.set_num_threads(old)
                monkeypatch.undo()


@layers_vnni
def test_packed_linear_codes_input():
    """Codes handed over by a fused producer (``_forward_codes``) take the GEMV too."""
    qm = _mlp(WEIGHTS["ternary"], {"method": "pact", "bits": 4, "alpha_init": 2.0})
    pm = compile(qm, torch.randn(2, 70))
    lin = next(m for m in pm.packed_layers().values() if isinstance(m, PackedLinear))
    x = torch.rand(2, 70) * 3
    codes = K.quantize_codes(x.numpy(), lin.act.hi, lin.act.mult)
    from lowbit.runtime.layers import Codes

    buf = np.concatenate([codes.reshape(-1), np.zeros(K.INT8_SLACK, np.uint8)])
    got = lin(Codes(buf, (2, 1, 1, 70), (0, 0)))
    assert torch.equal(got, lin(x))
    assert torch.equal(lin(x[None]), lin(x)[None])  # leading dimensions (the general path)
