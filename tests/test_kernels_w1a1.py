"""The W1A1 GEMM on AVX-512 VPOPCNTDQ (``kernels_popcount.gemm_w1a1``): the bit-serial rows GEMM's
outputs bit for bit, at any shape and thread count; PackedLinear runs binary weights x one-bit
codes on it at every row count, without GEMV fields, tables or int8 weights, and matches the plain
path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.runtime import _jit
from lowbit.runtime import kernels_gemv as KV
from lowbit.runtime import kernels_popcount as KP
from lowbit.runtime.compiler import reference_fp64
from lowbit.runtime.layers import Codes, build_packed

needs_vpopcnt = pytest.mark.skipif(not KP.HAS_VPOPCNT,
                                   reason="AVX-512 VPOPCNTDQ unavailable (CPU or plain path)")
RNG = np.random.default_rng(0)


@pytest.fixture
def threads(threads, monkeypatch):
    """conftest's thread counts, with the W1A1 GEMM's split forced on too, in parts of one block."""
    monkeypatch.setattr(KP, "W1A1_MIN_PARALLEL", 1)
    monkeypatch.setattr(KP, "W1A1_PART_WORK", 1)
    return threads


def _planes(M: int, O: int, K: int):
    """One-bit codes (M, K) and weight bits (O, K) packed into words (zero padding bits)."""
    Kw = -(-K // 64)

    def pack(bits):
        full = np.zeros((bits.shape[0], 64 * Kw), np.uint8)
        full[:, :K] = bits
        return np.packbits(full, axis=1, bitorder="little").view(np.uint64).reshape(bits.shape[0], Kw)

    codes = RNG.integers(0, 2, (M, K))
    return pack(codes), codes.sum(1).astype(np.int64), pack(RNG.integers(0, 2, (O, K)))


@needs_vpopcnt
@pytest.mark.parametrize("M,O,K", [(1, 8, 64), (2, 21, 700), (3, 8, 64), (8, 16, 512), (10, 13, 577),
                                   (33, 70, 1000), (64, 40, 4096)])
@pytest.mark.parametrize("g,relu", [(1, False), (-2, True)])
def test_gemm_w1a1_equals_rows_gemm(M, O, K, g, relu, threads):
    X, A, W = _planes(M, O, K)
    s0, s1, s2 = RNG.normal(size=(3, O))
    Wb = KP.w1a1_weights(W)
    assert Wb.shape == (-(-O // 8), -(-K // 512), 8, 8)
    np.testing.assert_array_equal(KP.w1a1_reference(X, Wb, O), _counts(X, W))
    got = KP.gemm_w1a1(X, A, Wb, O, g, s0, s1, s2, relu)
    shift = np.array([int(np.log2(abs(g)))])
    ref = KP.gemm_rows(X[:, None], A, W[:, None], shift, np.array([g < 0]), s0, s1, s2, relu)
    np.testing.assert_array_equal(got, ref)
    # and the integers themselves: the NumPy reference on the codes
    codes = np.unpackbits(X.view(np.uint8), axis=1, bitorder="little")[:, :K]
    np.testing.assert_allclose(got, KP.gemm_reference(codes, W[:, None], shift, np.array([g < 0]), s0, s1, s2,
                                                      relu), rtol=1e-6, atol=1e-5)


def _counts(X: np.ndarray, W: np.ndarray) -> np.ndarray:
    def bits(a):
        return np.unpackbits(a.view(np.uint8), axis=1, bitorder="little").astype(np.int64)

    return bits(X) @ bits(W).T


@needs_vpopcnt
def test_gemm_w1a1_rejects_what_it_cannot_run():
    X, A, W = _planes(4, 6, 64)
    with pytest.raises(ValueError, match=">= 8"):
        KP.gemm_w1a1(X, A, KP.w1a1_weights(np.concatenate([W, W])), 6, 1, *np.zeros((3, 6)))
    X, A, W = _planes(8, 16, 600)
    with pytest.raises(ValueError, match="words"):  # weights of another reduction length
        KP.gemm_w1a1(X, A, KP.w1a1_weights(W[:, :5]), 16, 1, *np.zeros((3, 16)))
    with pytest.raises(ValueError, match="float64"):
        KP.gemm_w1a1(X, A, KP.w1a1_weights(W), 16, 1, *np.zeros((3, 16), np.float32))
    with pytest.raises(ValueError, match="uint64"):
        KP.gemm_w1a1(X.view(np.int64), A, KP.w1a1_weights(W), 16, 1, *np.zeros((3, 16)))
    with pytest.raises(ValueError, match="C-contiguous float32"):
        KP.gemm_w1a1(X, A, KP.w1a1_weights(W), 16, 1, *np.zeros((3, 16)), out=np.zeros((16, 8), np.float32).T)


def _w1a1_layer(K: int, O: int) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(K, O)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(lin, {"default": {"weight": {"method": "binary", "bits": 1},
                                          "activation": {"method": "pact", "bits": 1, "alpha_init": 3.0}}})
    return lin.eval()


@needs_vpopcnt
def test_packed_linear_runs_w1a1_on_vpopcnt_from_the_planes(monkeypatch, threads):
    lin = _w1a1_layer(600, 530)
    pl = build_packed("fc", lin)
    assert pl.w1a1 is not None and "vpopcntq" in pl.kernel_name()
    # the planes and their blocks only: no GEMV fields, tables, AMX or int8 copy
    assert pl.gemv is None and pl.lut is None and pl.i8 is None and pl.amx is None
    assert pl.runtime_bytes == pl.weight_bytes + pl.w1a1.nbytes
    calls: list[int] = []
    real = KP.gemm_w1a1
    monkeypatch.setattr(KP, "gemm_w1a1", lambda X, *a, **k: calls.append(X.shape[0]) or real(X, *a, **k))
    rows = (1, KV.GEMV_MAX_ROWS, KV.GEMV_MAX_ROWS + 1, 41)
    x = torch.randn(41, 600) * 2
    with torch.inference_mode():
        got = {M: pl(x[:M]) for M in rows}
    assert calls == list(rows)  # every row count
    _jit.set_plain(True)  # the same layer on the bit-serial kernels: the same bits
    try:
        ref_pl = build_packed("fc", lin)
    finally:
        _jit.set_plain(False)
    assert ref_pl.w1a1 is None
    for M in rows:
        with torch.inference_mode():
            np.testing.assert_array_equal(got[M].numpy(), ref_pl(x[:M]).numpy())
        ref = reference_fp64(lin, x[:M])
        assert float((got[M].double() - ref).abs().max() / ref.abs().max()) < 1e-6
    # rows of codes from a fused producer take the same path
    codes = (x[:20] > 0.5).numpy().astype(np.uint8)
    buf = np.concatenate([codes.reshape(-1), np.zeros(64, np.uint8)])
    del calls[:]
    y = pl(Codes(buf, (20, 1, 1, 600), (0, 0)))
    assert calls == [20]
    with torch.inference_mode():
        np.testing.assert_array_equal(y.numpy(), ref_pl(Codes(buf, (20, 1, 1, 600), (0, 0))).numpy())


@needs_vpopcnt
def test_w1a1_model_loaded_from_its_file_runs_on_vpopcnt_and_equals_compile(tmp_path):
    """A W1A1 MLP saved as .lowbit and loaded (the stored codes, no re-quantizing) runs its Linear
    layers on vpopcntq, bit for bit as the runtime compiled from the model, and the integer
    arithmetic equals the exactly decoded float64 model."""
    import lowbit.runtime as rt
    from lowbit.models import build_model

    torch.manual_seed(1)
    model = build_model("mlp", in_features=300, hidden=(200, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(model, {"default": {"weight": {"method": "binary", "bits": 1},
                                            "activation": {"method": "pact", "bits": 1, "alpha_init": 2.0}}})
    model.eval()
    path = tmp_path / "m.lowbit"
    lowbit.save_packed(model, path)
    loaded = rt.load(path)
    x = torch.randn(12, 300)
    compiled = rt.compile(model, x, batch_chunk=0)
    assert [r.detail for r in loaded.layers if r.kind == "packed"] == [
        r.detail for r in compiled.layers if r.kind == "packed"]
    assert sum("vpopcntq" in r.detail for r in loaded.layers) == 3
    for M in (1, 12):
        got = loaded(x[:M])
        assert torch.equal(got, compiled(x[:M]))
        ref = reference_fp64(model, x[:M])
        assert float((got.double() - ref).abs().max() / ref.abs().max()) < 1e-6
