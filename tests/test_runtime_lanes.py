"""The lanes convolution (``kernels_lanes``: one input channel, output pixels in the vector lanes),
alone and with a 2x2 max pool after it: equal to its integer / float64 reference on ragged shapes
and at rounding ties (where its float32 epilogue must fall back to float64), the border of the code
image untouched, and a packed LeNet-5 giving the same bits with it, with the pool fused or not, as
on the channel lanes of the int8 kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _runtime_models import calibrated_lenet

import lowbit.runtime as rt
from lowbit.runtime import _amx, _jit
from lowbit.runtime import executor as E
from lowbit.runtime import kernels_lanes as KL
from lowbit.runtime._jit import EPI_CODES, EPI_F32, EPI_FLOAT, EPI_RELU
from lowbit.runtime.kernels_int8 import f32_coefficients

needs_lanes = pytest.mark.skipif(not KL.host_has_lanes(), reason="lanes kernel needs AVX-512 VNNI and VBMI")
# where AMX-INT8 is enabled its tiles take every convolution the flat executor runs (checked first)
no_amx = pytest.mark.skipif(_amx.amx_enabled(), reason="AMX tiles take LeNet-5's first layer on this CPU")

HI, MULT = 3.0, 5.0


def _layer(N, H, W, KH, KW, O, sh, pad, seed, wmax=1, amax=15, ties=False):
    """Padded one-channel codes, integer weights and coefficients (``ties``: ``s1 = 0.5 / mult``,
    ``s0 = 0``, so every odd sum lands on a rounding tie of the next layer's codes)."""
    rng = np.random.default_rng(seed)
    ph, pw = pad
    x = np.zeros((N, H + 2 * ph, W + 2 * pw), np.uint8)
    x[:, ph : ph + H, pw : pw + W] = rng.integers(0, amax + 1, (N, H, W))
    w = rng.integers(-wmax, wmax + 1, (O, KH, KW))
    s0, s1 = np.zeros(16), np.zeros(16)
    s1[:O] = 0.5 / MULT if ties else rng.uniform(0.01, 0.2, O)
    s0[:O] = 0.0 if ties else rng.uniform(-1, 1, O)
    sf, usable = f32_coefficients(s0, s1, np.abs(w).reshape(O, -1).sum(1), amax, HI, MULT)
    assert usable
    return x, w, s0, s1, sf


def _run(x, w, s0, s1, sf, sh, cpad=(1, 2), pool=False):
    N, Hp, Wp = x.shape
    O, KH, KW = w.shape
    geo = np.array([Hp, Wp, 1, (Hp - KH) // sh + 1, Wp - KW + 1, sh, 1, N, O], np.int64)
    OH, OW = (int(geo[3]) // 2, int(geo[4]) // 2) if pool else (int(geo[3]), int(geo[4]))
    Hc, Wc = OH + 2 * cpad[0], OW + 2 * cpad[1]
    xq = np.zeros(x.size + 64, np.uint8)
    xq[: x.size] = x.reshape(-1)
    codes = np.zeros(N * Hc * Wc * O + 64, np.uint8)
    KL.lanes_conv(xq, geo, KH, KW, KL.pack_lanes_weights(w), s0, s1, sf, codes,
                  np.array([Hc, Wc, *cpad], np.int64), HI, MULT, pool=pool)
    img = codes[: N * Hc * Wc * O].reshape(N, Hc, Wc, O)
    inner = img[:, cpad[0] : cpad[0] + OH, cpad[1] : cpad[1] + OW].copy()
    img[:, cpad[0] : cpad[0] + OH, cpad[1] : cpad[1] + OW] = 0
    return inner, bool(img.any() or codes[N * Hc * Wc * O :].any())


CASES = [  # N, H, W, KH, KW, O, sh, pad
    (1, 28, 28, 5, 5, 6, 1, (2, 2)),  # LeNet-5's first layer
    (2, 10, 37, 3, 3, 8, 2, (1, 1)),
    (3, 7, 5, 1, 1, 1, 1, (0, 0)),
    (2, 9, 40, 7, 7, 5, 1, (3, 3)),
    (1, 33, 17, 2, 6, 3, 3, (0, 1)),
    (1, 12, 20, 3, 3, 4, 1, (1, 1)),  # the row kernel's three channel counts: 4 (O <= 4), 6, 8
    (2, 8, 18, 4, 5, 7, 1, (0, 2)),
]


@needs_lanes
@pytest.mark.parametrize("pool", [False, True], ids=["conv", "conv+pool"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:7])))
def test_lanes_conv_equals_reference(case, pool):
    N, H, W, KH, KW, O, sh, pad = case
    x, w, s0, s1, sf = _layer(N, H, W, KH, KW, O, sh, pad, seed=sum(case[:7]), wmax=3)
    got, border = _run(x, w, s0, s1, sf, sh, pool=pool)
    np.testing.assert_array_equal(got, KL.lanes_conv_reference(x, w, sh, s0, s1, HI, MULT, pool=pool))
    assert not border  # codes only inside the next layer's padding, nothing past the image


@needs_lanes
@pytest.mark.parametrize("pool", [False, True], ids=["conv", "conv+pool"])
@pytest.mark.parametrize("case", [(2, 12, 30, 5, 5, 6, 1, (2, 2)), (1, 12, 19, 3, 4, 7, 1, (1, 1))])
def test_lanes_conv_at_rounding_ties(case, pool):
    """Sums on rounding ties: the float32 path alone gives other codes there (checked by switching
    the fallback off through ``lim``), the kernel the float64 ones."""
    N, H, W, KH, KW, O, sh, pad = case
    x, w, s0, s1, sf = _layer(N, H, W, KH, KW, O, sh, pad, seed=7, wmax=5, ties=True)
    want = KL.lanes_conv_reference(x, w, sh, s0, s1, HI, MULT, pool=pool)
    got, _ = _run(x, w, s0, s1, sf, sh, pool=pool)
    np.testing.assert_array_equal(got, want)
    never = sf.copy()
    never[32:48] = 1.0  # no pixel is ever "near": the float32 codes everywhere
    f32_only, _ = _run(x, w, s0, s1, never, sh, pool=pool)
    assert (f32_only != want).any()


def test_lanes_applies_only_where_it_can():
    w = np.ones((6, 5, 5, 1), np.int64)
    codes = EPI_RELU | EPI_CODES | EPI_F32
    assert KL.lanes_applies(1, 6, (5, 5), (1, 1), (1, 1), codes, w)
    assert KL.lanes_applies(1, 6, (5, 5), (2, 1), (1, 1), EPI_CODES | EPI_F32, w)
    assert not KL.lanes_applies(2, 6, (5, 5), (1, 1), (1, 1), codes, w)  # two input channels
    assert not KL.lanes_applies(1, 9, (5, 5), (1, 1), (1, 1), codes, w)  # more than LANES_O outputs
    assert not KL.lanes_applies(1, 6, (5, 5), (1, 2), (1, 1), codes, w)  # width stride 2
    assert not KL.lanes_applies(1, 6, (5, 5), (1, 1), (2, 1), codes, w)  # dilation
    assert not KL.lanes_applies(1, 6, (5, 5), (1, 1), (1, 1), codes | EPI_FLOAT, w)  # a float output
    assert not KL.lanes_applies(1, 6, (5, 5), (1, 1), (1, 1), EPI_RELU | EPI_CODES, w)  # float64 epilogue
    assert not KL.lanes_applies(1, 6, (5, 5), (1, 1), (1, 1), codes, 200 * w)  # beyond int8


def test_lanes_conv_refuses_other_layouts():
    geo = np.array([32, 32, 3, 28, 28, 1, 1, 1, 6], np.int64)
    with pytest.raises(ValueError, match="1 input channel"):
        KL.lanes_conv(np.zeros(4096, np.uint8), geo, 5, 5, np.zeros(576, np.int8), np.zeros(16), np.zeros(16),
                      np.zeros(48), np.zeros(4096, np.uint8), np.zeros(4, np.int64), HI, MULT)


@needs_lanes
@no_amx
@pytest.mark.parametrize("weight", [{"method": "binary", "bits": 1}, {"method": "dorefa", "bits": 4}],
                         ids=["binary", "dorefa4"])
def test_packed_lenet_same_bits_on_pixel_and_channel_lanes(weight, monkeypatch):
    """LeNet-5's first layer on the channel lanes, on the pixel lanes, and on the pixel lanes with
    the max pool after it fused: the same output bits at batch 1, 2 and 5."""
    q = calibrated_lenet(weight)
    x = 3 * torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    kinds, outs = {}, {}
    for name, lanes, fuse in (("channel", False, False), ("pixel", True, False), ("fused", True, True)):
        monkeypatch.setattr(E, "LANES", lanes)
        monkeypatch.setattr(E, "FUSE_POOL", fuse)
        packed = rt.compile(q, x[:2])
        prog = packed.executor.program((1, 28, 28)).prog
        kinds[name] = ([int(p[29]) for p in prog if p[0] == E.OP_CONV],
                       sum(int(p[0]) == E.OP_MAXPOOL for p in prog))
        outs[name] = [packed(x[:b]) for b in (1, 2, 5)]
    assert kinds["channel"] == ([0, 0, 0, 0, 0], 2)  # conv1, conv2, fc1-fc3 on the int8 kernel
    assert kinds["pixel"] == ([2, 0, 0, 0, 0], 2)  # conv1 on the pixel lanes
    assert kinds["fused"] == ([3, 0, 0, 0, 0], 1)  # ... writing the pooled codes: one pool left
    for name in ("pixel", "fused"):
        for got, want in zip(outs[name], outs["channel"], strict=True):
            assert torch.equal(got, want), name


def test_plain_path_has_no_lanes():
    _jit.set_plain(True)
    try:
        assert not KL.host_has_lanes()
    finally:
        _jit.set_plain(False)
