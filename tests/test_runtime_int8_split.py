"""Integer weights beyond int8 (DoReFa's 8-bit levels ``2i - 255``) on the int8 conv kernels: three
int8 parts per weight, each reduction quad / K chunk read once per part. The integer sums equal a float64
convolution of the integers exactly; a ResNet with 8-bit weights and activations runs every conv
on the int8 path (not the bit-serial one) and equals the float64 fake-quantized model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
import lowbit.runtime as rt
from lowbit.models import build_model
from lowbit.runtime import _amx
from lowbit.runtime import kernels as K
from lowbit.runtime import kernels_int8 as k8
from lowbit.runtime.compiler import reference_fp64
from lowbit.runtime.layers import fold_integers

RNG = np.random.default_rng(11)
needs_vnni = pytest.mark.skipif(not K.HAS_VNNI, reason="int8 kernels need AVX-512 VNNI")
needs_amx = pytest.mark.skipif(not _amx.HAS_AMX, reason="AMX-INT8 not available (CPU or OS)")


def test_parts_sum_to_the_weight_and_fit_int8():
    w = np.arange(-512, 509)
    for k in (2, 3, 4):
        inside = w[(w >= -128 * k) & (w <= 127 * k)]
        parts = k8.int8_split(inside, k)
        assert len(parts) == k and all(p.dtype == np.int8 for p in parts)
        assert np.array_equal(np.sum([p.astype(np.int64) for p in parts], axis=0), inside)
    assert k8.int8_parts(np.array([-128, 127])) == 1
    assert k8.int8_parts(np.array([-255, 255])) == 3  # DoReFa 8-bit levels
    assert k8.int8_parts(np.array([-256, 254])) == 2
    assert k8.int8_parts(np.array([0, 509])) == 0
    with pytest.raises(ValueError, match="do not fit 2 int8 parts"):
        k8.int8_split(np.array([255]), 2)
    g = k8.int8_geometry(3, 3, 16, 1, 1, parts=3)
    base = k8.int8_geometry(3, 3, 16, 1, 1)
    assert all(np.array_equal(g[i::3], base) for i in range(3))
    offs = k8.amx_k_offsets(2, 2, 48, 1, 10, 32, parts=2)
    assert offs.tolist() == [0, 48, 0, 48, 320, 368, 320, 368]


CASES = [
    (1, 16, 12, 12, 16, 3, 3, 1, 1),   # ResNet stage 1 shape, smaller image
    (2, 24, 9, 9, 40, 3, 3, 2, 1),     # stride 2, ragged channels (3 blocks, the last 8 wide)
    (1, 3, 16, 16, 16, 3, 3, 1, 1),    # the stem: 9-byte rows
    (2, 64, 6, 6, 10, 1, 1, 1, 0),     # 1x1, 10 outputs
]


@needs_vnni
@pytest.mark.parametrize("kernel", ["vnni", "amx"])
@pytest.mark.parametrize("case", CASES)
def test_split_weights_give_exact_integer_sums(case, kernel):
    if kernel == "amx" and not _amx.HAS_AMX:
        pytest.skip("AMX-INT8 not available (CPU or OS)")
    N, C, H, W, O, KH, KW, s, pad = case
    x = RNG.integers(0, 256, (N, C, H, W))  # 8-bit codes
    w = 2 * RNG.integers(0, 256, (O, C, KH, KW)) - 255  # DoReFa 8-bit levels, both ends included
    w.flat[:2] = (-255, 255)
    D = k8.int8_conv_reference(x, w, (s, s), (pad, pad), (1, 1))
    xq = k8.int8_quantize(x.astype(np.float32).transpose(0, 2, 3, 1), (pad, pad), mode=1)
    OH, OW = D.shape[1:3]
    Hp, Wp = H + 2 * pad, W + 2 * pad
    w_int = w.transpose(0, 2, 3, 1)
    geo = np.array([Hp, Wp, C, OH, OW, s, s, N, O], np.int64)
    width = -(-O // 16) * 16 + 64
    one, zero = np.zeros(width), np.zeros(width)
    one[:O] = 1.0
    raw = np.full((N, OH, OW, O), np.nan, np.float32)
    if kernel == "amx":
        wa, kc, nck, nbt = k8.pack_amx_weights(w_int)
        koff = k8.amx_k_offsets(KH, nck, kc, 1, Wp, C, parts=3)
        k8.amx_conv(xq, geo, koff, wa, _amx.amx_tile_config(kc, nbt), kc, nbt, zero, one, False, raw)
    else:
        w8, passes = k8.pack_int8_weights(w_int, 1)
        qoff = k8.int8_quad_offsets(k8.int8_geometry(KH, KW, C, 1, 1, parts=3), Wp, C)
        k8.int8_conv(xq, geo, qoff, w8, passes, zero, one, False, raw)
    assert np.abs(D).max() < 2**24  # the float32 output holds the sums exactly
    assert np.array_equal(raw.astype(np.float64), D)


@needs_vnni
def test_eight_bit_resnet_runs_int8_and_equals_fp64():
    torch.manual_seed(0)
    m = build_model("resnet20", width_mult=0.5).eval()
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_((torch.rand(mod.num_features, generator=g) - 0.5) * 0.2)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    recipe = {"default": {"weight": {"method": "dorefa", "bits": 8},
                          "activation": {"method": "pact", "bits": 8, "alpha_init": 3.0}},
              # an 8-bit Linear layer runs bit-serial (not flattened): the classifier at 4 bits
              "rules": [{"match": "fc", "weight": {"method": "dorefa", "bits": 4},
                         "activation": {"method": "pact", "bits": 4, "alpha_init": 3.0}}]}
    model = lowbit.quantize(m, recipe).eval()
    x = torch.rand(3, 3, 16, 16)
    packed = rt.compile(model, x[:2])
    convs = {n: p for n, p in packed.packed_layers().items() if type(p).__name__ == "PackedConv2d"}
    assert convs and all(p.i8 is not None for p in convs.values())
    # every conv's integer weights exceed int8 (the largest |w| is DoReFa's level 255: 3 parts where it
    # is positive, 2 where it is -255), so each quad is read once per part
    for p in convs.values():
        w_int = fold_integers(p.wp)[0]
        k = k8.int8_parts(w_int)
        assert k in (2, 3) and int(np.abs(w_int).max()) == 255
        assert all(np.array_equal(p.i8.geom[i::k], p.i8.geom[::k]) for i in range(k))
    ref = reference_fp64(model, x)
    flat = packed(x)
    assert packed.executor.program((3, 16, 16)) is not None
    ex, packed.executor = packed.executor, None
    try:
        modules = packed(x)
    finally:
        packed.executor = ex
    assert torch.equal(flat, modules)
    assert float((flat.double() - ref).abs().max() / ref.abs().max()) < 1e-6


@needs_vnni
def test_split_weights_dilated_taps_on_vnni():
    """Tap order (dilation 2 along the width): each tap's quads repeated per part, exact sums."""
    N, C, H, W, O, KH, KW, pad, dil = 2, 8, 11, 11, 20, 3, 3, 2, (2, 2)
    x = RNG.integers(0, 256, (N, C, H, W))
    w = 2 * RNG.integers(0, 256, (O, C, KH, KW)) - 255
    w.flat[0] = 255
    D = k8.int8_conv_reference(x, w, (1, 1), (pad, pad), dil)
    xq = k8.int8_quantize(x.astype(np.float32).transpose(0, 2, 3, 1), (pad, pad), mode=1)
    OH, OW = D.shape[1:3]
    Hp, Wp = H + 2 * pad, W + 2 * pad
    w_int = w.transpose(0, 2, 3, 1)
    k = k8.int8_parts(w_int)
    assert k == 3
    w8, passes = k8.pack_int8_weights(w_int, dil[1])
    qoff = k8.int8_quad_offsets(k8.int8_geometry(KH, KW, C, *dil, parts=k), Wp, C)
    geo = np.array([Hp, Wp, C, OH, OW, 1, 1, N, O], np.int64)
    one, zero = np.zeros(32 + 64), np.zeros(32 + 64)
    one[:O] = 1.0
    raw = np.full((N, OH, OW, O), np.nan, np.float32)
    k8.int8_conv(xq, geo, qoff, w8, passes, zero, one, False, raw)
    assert np.array_equal(raw.astype(np.float64), D)
