"""Base-3 table-lookup GEMM for ternary weights (runtime/kernels_lut3.py): tables and sums bit for
bit against the NumPy references on shapes with partial steps, tiles and blocks, AVX-512 and plain
paths, 1 and 2 threads; the packing's signs and canonical patterns; which packed layers take it; bad
input refused. No timing here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.runtime import kernels_gemm as KG
from lowbit.runtime import kernels_lut3 as KL3
from lowbit.runtime.layers import build_packed, fold_integers

RNG = np.random.default_rng(11)
PATHS = ["plain"] + (["avx512"] if KG.HAS_LUT else [])


@pytest.mark.parametrize("level,ka", [(1, 1), (1, 4), (1, 5), (2, 3), (3, 2)])
@pytest.mark.parametrize("path", PATHS)
def test_lut3_gemm_equals_integer_reference(level, ka, path, threads):
    for M, K, O in [(1, 5, 3), (7, 12, 16), (9, 100, 37), (17, 333, 50), (140, 129, 20)]:
        w = level * RNG.integers(-1, 2, (O, K))
        a = RNG.integers(0, 1 << ka, (M, K))
        a[M // 2] = (1 << ka) - 1  # a row of the largest codes: the entries at their bounds
        w[0, :] = -level  # an output of all-negative groups (the most negative canonical sums)
        assert KL3.lut3_level(w) == level and KL3.lut3_fits(level, ka)
        bias = KL3.lut3_bias(level, ka)
        tab = KL3.lut3_tables(a.astype(np.float32), level, bias, plain=path == "plain")
        np.testing.assert_array_equal(tab, KL3.lut3_tables_reference(a, level, bias))
        wq, ssum = KL3.lut3_pack_weights(w, level)
        s1 = RNG.uniform(0.5, 2.0, O)
        s0 = RNG.normal(size=O)
        for relu in (False, True):
            got = KL3.lut3_gemm(tab, wq, KL3.lut3_offsets(ssum, bias), O, s0, s1, relu, plain=path == "plain")
            np.testing.assert_array_equal(got, KL3.lut3_gemm_reference(a, w, s0, s1, relu))


@pytest.mark.parametrize("path", PATHS)
def test_lut3_equals_the_4bit_tables(path):
    """The same layer on the 4-bit tables of kernels_gemm: the same bits (both exact)."""
    M, K, O = 33, 515, 70
    w = RNG.integers(-1, 2, (O, K))
    a = RNG.integers(0, 16, (M, K)).astype(np.float32)
    s0, s1 = RNG.normal(size=O), RNG.uniform(0.5, 2.0, O)
    lv, cb = KG.lut_levels(w)
    old = KG.lut_gemm(KG.lut_tables(a, lv, cb), KG.lut_pack_weights(w, lv, cb), O, s0, s1, True,
                      plain=path == "plain")
    wq, ssum = KL3.lut3_pack_weights(w, 1)
    tab = KL3.lut3_tables(a, 1, KL3.lut3_bias(1, 4), plain=path == "plain")
    corr = KL3.lut3_offsets(ssum, KL3.lut3_bias(1, 4))
    new = KL3.lut3_gemm(tab, wq, corr, O, s0, s1, True, plain=path == "plain")
    np.testing.assert_array_equal(new, old)


def _unpack(wq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(canonical index, negative sign, slot) per (output, group) from the packed pairs."""
    nb, npairs, _ = wq.shape
    c = np.stack([wq[:, :, :64] & 15, wq[:, :, :64] >> 4], axis=2)  # block, pair, step, byte
    neg = np.unpackbits(wq[:, :, 64:].reshape(nb, npairs, 2, 8), axis=-1, bitorder="little")
    slot = np.broadcast_to(np.arange(64) % 4, c.shape)

    def per_output(v):  # byte 4*o + s of step t -> [16*block + o, 4*t + s]
        return v.reshape(nb, 2 * npairs, 16, 4).transpose(0, 2, 1, 3).reshape(16 * nb, 8 * npairs)

    return tuple(per_output(v).astype(np.int64) for v in (c, neg, slot))


def test_packing_signs_and_canonical_patterns():
    """Canonical patterns 0..13 (zero: 0) as nibbles, signs as bit masks: a group's pattern and sign
    give back its three weights; a weight matrix and its negation share patterns and differ in every
    nonzero group's sign; ``ssum`` counts the signs (padding groups +1); 5 bits per 3 weights."""
    O, K = 20, 53  # 18 groups, 5 steps -> 6 (3 pairs), 2 blocks
    w = RNG.integers(-1, 2, (O, K))
    w[1] = 0
    wq, ssum = KL3.lut3_pack_weights(w, 1)
    assert wq.shape == (2, 3, 80) and wq.dtype == np.uint8 and ssum.shape == (32,)
    c, neg, slot = _unpack(wq)
    assert c.max() <= 13 and (slot == np.arange(24) % 4).all()
    pat = KL3._PATTERNS[c] * (1 - 2 * neg)[..., None]  # (Op, groups, 3)
    wp = np.zeros((32, 72), np.int64)
    wp[:O, :K] = w
    np.testing.assert_array_equal(pat.reshape(32, 72), wp)
    assert (c[1] == 0).all() and (neg[1] == 0).all() and ssum[1] == 24
    np.testing.assert_array_equal(ssum, (1 - 2 * neg).sum(axis=1))
    wn, sn = KL3.lut3_pack_weights(-w, 1)
    cn, negn, _ = _unpack(wn)
    np.testing.assert_array_equal(cn, c)
    np.testing.assert_array_equal(negn[c > 0], 1 - neg[c > 0])
    np.testing.assert_array_equal(sn + ssum, 2 * (c == 0).sum(axis=1))  # a zero group keeps its + sign
    wq2, _ = KL3.lut3_pack_weights(RNG.integers(-1, 2, (16, 240)), 1)
    assert wq2.nbytes * 8 == 16 * 240 * 5 // 3


def test_tables_reference_closed_form():
    """Canonical pattern c is base-3 number 13 + c (digits p_i + 1, the last nonzero entry +1)."""
    a = np.array([[2, 5, 7]])
    T = KL3.lut3_tables_reference(a, 1, 10).reshape(-1, 16)
    assert T[0, 0] == 10  # zero pattern
    assert T[0, 1] == 10 + 2  # n = 14: (1, 0, 0)
    assert T[0, 2] == 10 - 2 + 5  # n = 15: (-1, 1, 0)
    assert T[0, 13] == 10 + 2 + 5 + 7  # n = 26: (1, 1, 1)
    assert (T[1:] == 10).all()  # padding groups: the offset alone


def test_fused_quantization_in_tables():
    """mode 0: the tables quantize floats with the clip formula, as quantize_codes does."""
    from lowbit.runtime.kernels_pack import quantize_codes_reference

    x = RNG.normal(size=(13, 77)).astype(np.float32)
    codes = quantize_codes_reference(x, 1.5, 10.0)
    for path in PATHS:
        tab = KL3.lut3_tables(x, 1, 30, hi=1.5, mult=10.0, mode=0, plain=path == "plain")
        np.testing.assert_array_equal(tab, KL3.lut3_tables_reference(codes, 1, 30))


@pytest.mark.parametrize("vals,level", [([-1, 0, 1], 1), ([-2, 0, 2], 2), ([0], 1), ([-3, 3], 3),
                                        ([0, 4], 4), ([-2, 0, 1], None), ([-1, 0, 1, 2], None)])
def test_lut3_level(vals, level):
    w = RNG.choice(np.array(vals, np.int64), size=(9, 31))
    assert KL3.lut3_level(w) == level
    assert KL3.lut3_level(w.astype(np.float32)) is None


def test_lut3_fits_bounds():
    assert KL3.lut3_fits(1, 5) and not KL3.lut3_fits(1, 6)  # 5 * 31 = 155, 5 * 63 = 315
    assert KL3.lut3_fits(3, 4) and not KL3.lut3_fits(4, 4)  # 225, 300
    assert KL3.lut3_bias(1, 4) == 30


def test_bad_input_refused():
    with pytest.raises(ValueError, match=r"outside -1, 0, 1"):
        KL3.lut3_pack_weights(np.array([[2, 0, 1]]), 1)
    wq, ssum = KL3.lut3_pack_weights(RNG.integers(-1, 2, (20, 30)), 1)
    tab = KL3.lut3_tables(RNG.integers(0, 4, (3, 30)).astype(np.float32), 1, 6)
    s = np.ones(20)
    with pytest.raises(ValueError, match="do not match"):
        KL3.lut3_gemm(tab[:, :64], wq, KL3.lut3_offsets(ssum, 6), 20, s, s)
    with pytest.raises(ValueError, match="do not match"):
        KL3.lut3_gemm(tab, wq, KL3.lut3_offsets(ssum[:5], 6), 20, s, s)
    with pytest.raises(ValueError, match="int64 offsets"):
        KL3.lut3_gemm(tab, wq, ssum, 20, s, s)  # the sign sums, not the offsets


def _layer(abits: int, K: int = 130, O: int = 40) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(K, O)
    lowbit.quantize(lin, {"default": {"weight": {"method": "twn", "bits": 2},
                                      "activation": {"method": "pact", "bits": abits, "alpha_init": 3.0}}})
    return lin.eval()


@pytest.mark.parametrize("abits", [2, 5, 6])
def test_packed_ternary_layer_takes_base3_tables_where_they_fit(abits, monkeypatch, threads):
    """A TWN layer takes the base-3 tables for codes of up to 5 bits (the 4-bit tables at 6, where
    only those fit), and with them switched off the 4-bit ones: the same bits at 8-70 rows, equal
    to the exact integer reference's epilogue."""
    from lowbit.nn.quantize import input_quantizer
    from lowbit.runtime import _amx

    monkeypatch.setattr(_amx, "HAS_AMX", False)
    lin = _layer(abits)
    pl = build_packed("fc", lin)
    if pl.lut is None:
        pytest.skip("no lookup tables on this CPU's path (the expanded-field GEMM takes these rows)")
    assert pl.lut.base3 == (abits <= 5)
    monkeypatch.setattr(KL3, "ENABLED", False)
    old = build_packed("fc", lin)
    assert old.lut is not None and not old.lut.base3
    assert pl.lut.nbytes == pl.lut.wq.nbytes + (pl.lut.corr.nbytes if pl.lut.base3 else 0)
    w_int = fold_integers(pl.wp)[0]
    s0, s1 = pl.coeffs_lut(pl.act.sx, pl.act.ma)
    for M in (8, 9, 70):
        x = torch.randn(M, 130) * 1.5
        with torch.inference_mode():
            got, want = pl(x).numpy(), old(x).numpy()
        np.testing.assert_array_equal(got, want)
        codes = input_quantizer(lin).encode(x).codes.long().numpy()
        np.testing.assert_array_equal(got, KL3.lut3_gemm_reference(codes, w_int, s0, s1, pl.relu))
