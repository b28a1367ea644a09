"""lowbit.runtime: packed kernels equal integer references; packed layers and compiled models
equal the fake-quantized PyTorch model (float rounding only). No timing here."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
import lowbit.runtime as rt
from lowbit.quant.base import ActivationQuantizer, Encoded
from lowbit.quant.dorefa import DoReFaActivation
from lowbit.quant.pact import PACTActivation
from lowbit.runtime import kernels as K
from lowbit.runtime import kernels_amx as KA
from lowbit.runtime import kernels_int8, kernels_pack, kernels_popcount, kernels_select, kernels_threads
from lowbit.runtime.kernels_codes import clip_codes
from lowbit.runtime.layers import build_packed, decompose_weight

RNG = np.random.default_rng(1234)

needs_vnni = pytest.mark.skipif(not K.HAS_VNNI, reason="int8 kernels need AVX-512 VNNI")


@pytest.fixture(params=["int8", "bit-serial"])
def kernel_path(request, monkeypatch):
    """Build packed layers with the int8 (VNNI) kernels where available, or force bit-serial."""
    if request.param == "int8" and not K.HAS_VNNI:
        pytest.skip("int8 kernels need AVX-512 VNNI")
    if request.param == "bit-serial":
        monkeypatch.setattr(K, "HAS_VNNI", False)
    return request.param

LEVELS = {
    "binary": [-1.0, 1.0],
    "ternary": [-1.0, 0.0, 1.0],
    "asym_ternary": [-2.0, 0.0, 1.0],  # +-2**e multiples of one unit
    "uniform2": [-1.0, -1 / 3, 1 / 3, 1.0],
    "uniform4": [2 * i / 15 - 1 for i in range(16)],
}


def _weights(kind: str, O: int, Kred: int, per_channel: bool) -> Encoded:
    lv = torch.tensor(LEVELS[kind], dtype=torch.float64)
    codes = torch.from_numpy(RNG.integers(0, len(lv), (O, Kred))).to(torch.uint8)
    scale = torch.from_numpy(RNG.uniform(0.5, 2.0, (O, 1))) if per_channel else torch.tensor(0.7)
    return Encoded(codes=codes, levels=lv, scale=scale, bits=max(1, (len(lv) - 1).bit_length()))


def _reference(enc: Encoded, a: np.ndarray) -> np.ndarray:
    """Exact integer D = sum_r g[o, r] * a[m, r] with g the plane-coefficient weight integer."""
    wp = decompose_weight(enc)
    w_int = (enc.levels.numpy()[enc.codes.long().numpy()] - wp.l0) / wp.u  # integers
    assert np.allclose(w_int, np.round(w_int))
    return a.astype(np.int64) @ np.round(w_int).astype(np.int64).T


def test_pack_bits_layout():
    bits = RNG.integers(0, 2, (3, 131)).astype(bool)
    words = K.pack_bits(bits)
    assert words.shape == (3, 3) and words.dtype == np.uint64
    for r in range(131):
        got = (words[:, r // 64] >> np.uint64(r % 64)) & np.uint64(1)
        assert np.array_equal(got.astype(bool), bits[:, r])
    assert int(words[:, 2].max() >> np.uint64(3)) == 0  # padding bits are zero


@pytest.mark.parametrize("kind", list(LEVELS))
@pytest.mark.parametrize("ka", [1, 3, 4, 8])
def test_gemm_equals_integer_reference(kind, ka):
    M, Kred, O = 5, 197, 37  # odd sizes: not multiples of 8 or 64
    enc = _weights(kind, O, Kred, per_channel=True)
    wp = decompose_weight(enc)
    a = RNG.integers(0, 2**ka, (M, Kred))
    ref = _reference(enc, a)
    one, zero = np.ones(O), np.zeros(O)
    X, A = K.pack_rows(a.astype(np.float32), ka)  # mode 1: the values are the codes
    assert np.array_equal(A, a.sum(1))
    rows = K.gemm_rows(X, A, wp.W[0], wp.shift, wp.neg, zero, one, zero)
    assert np.array_equal(rows.astype(np.int64), ref)
    Xc = np.ascontiguousarray(X.transpose(1, 2, 0))[None]
    cols = np.empty((M, O, 1), np.float32)
    K.gemm_cols(Xc, A[None], wp.W, wp.shift, wp.neg, zero, one, zero, cols)
    assert np.array_equal(cols[..., 0].astype(np.int64), ref)
    # the A (code sum) term of the epilogue
    arow = K.gemm_rows(X, A, wp.W[0], wp.shift, wp.neg, zero, zero, one)
    assert np.array_equal(arow, np.repeat(a.sum(1, keepdims=True), O, 1).astype(np.float32))
    # the NumPy reference beside the kernels: exact D, then the whole epilogue
    assert np.array_equal(kernels_popcount.gemm_reference(a, wp.W[0], wp.shift, wp.neg, zero, one, zero),
                          ref.astype(np.float32))
    s0, s1, s2 = RNG.standard_normal((3, O))
    got = K.gemm_rows(X, A, wp.W[0], wp.shift, wp.neg, s0, s1, s2, True)
    want = kernels_popcount.gemm_reference(a, wp.W[0], wp.shift, wp.neg, s0, s1, s2, True)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))


@pytest.mark.parametrize("kind", ["binary", "ternary", "uniform4"])
def test_select_sum_float_activations(kind):
    M, Kred, O = 3, 75, 19
    enc = _weights(kind, O, Kred, per_channel=False)
    wp = decompose_weight(enc)
    x = RNG.standard_normal((M, Kred)).astype(np.float32)
    wp_int = (enc.levels.numpy()[enc.codes.long().numpy()] - wp.l0) / wp.u
    got = K.select_sum(x, wp.W[0], wp.shift, wp.neg, np.zeros(O), np.ones(O), np.zeros(O))
    np.testing.assert_allclose(got, x.astype(np.float64) @ wp_int.T, rtol=1e-5, atol=1e-5)
    s0, s1, s2 = RNG.standard_normal((3, O))
    got = K.select_sum(x, wp.W[0], wp.shift, wp.neg, s0, s1, s2, True)
    want = kernels_select.select_sum_reference(x, wp.W[0], wp.shift, wp.neg, s0, s1, s2, True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_parallel_kernels_match_serial(monkeypatch):
    enc = _weights("ternary", 70, 300, per_channel=True)
    wp = decompose_weight(enc)
    a = RNG.integers(0, 16, (40, 300))
    ref = _reference(enc, a)
    monkeypatch.setattr(kernels_threads, "PARALLEL_MIN_WORK", 0)
    one, zero = np.ones(70), np.zeros(70)
    X, A = K.pack_rows(a.astype(np.float32), 4)
    got = K.gemm_rows(X, A, wp.W[0], wp.shift, wp.neg, zero, one, zero)
    assert np.array_equal(got.astype(np.int64), ref)
    Xc = np.ascontiguousarray(X.transpose(1, 2, 0))[None]
    cols = np.empty((40, 70, 1), np.float32)
    K.gemm_cols(Xc, A[None], wp.W, wp.shift, wp.neg, zero, one, zero, cols)
    assert np.array_equal(cols[..., 0].astype(np.int64), ref)


@pytest.mark.parametrize("q", [PACTActivation(4, alpha_init=2.5), PACTActivation(3), DoReFaActivation(4),
                               DoReFaActivation(8)])
def test_fused_activation_codes_equal_encode(q):
    x = torch.randn(4000) * 3
    edges = q.encode(torch.linspace(-1, 12, 100)).levels  # include values on the grid / at half steps
    x = torch.cat([x, edges, edges + 1e-7, torch.tensor([0.0, -0.0, 1.0, 1e9, -1e9])])
    spec = rt.layers.act_spec(q)
    got = K.quantize_codes(x.numpy(), spec.hi, spec.mult)
    assert np.array_equal(got.astype(np.int64), q.encode(x).codes.long().numpy())
    assert np.array_equal(got, kernels_pack.quantize_codes_reference(x.numpy(), spec.hi, spec.mult))
    _, A = K.pack_rows(x.numpy()[None], q.bits, spec.hi, spec.mult, mode=0)
    assert int(A[0]) == int(q.encode(x).codes.long().sum())


def _act_quantizers():
    from lowbit.quant import registry

    out = []
    for name in registry.names("activation"):
        for bits in (1, 2, 4, 8):
            out.append(registry.create("activation", name, bits))
    out += [PACTActivation(3, alpha_init=0.7), PACTActivation(4, alpha_init=2.5, signed=True)]
    return out


@pytest.mark.parametrize("q", _act_quantizers(), ids=lambda q: f"{q.name}{q.bits}{'s' if q.signed else ''}")
def test_runtime_codes_spec_reproduces_forward(q):
    """The hook's formula gives encode's codes and forward's values bit for bit (eval mode)."""
    q.eval()
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.linspace(-3, 12, 30001), torch.randn(5000, generator=g) * 4,
                   torch.tensor([0.0, -0.0, 1e9, -1e9])])
    spec = q.runtime_codes_spec()
    if spec is None:  # the runtime calls encode: nothing to reproduce
        assert q.name not in ("dorefa", "pact")
        return
    edges = q.encode(torch.linspace(spec.lo, spec.hi, 2**q.bits)).decode()
    half = edges + spec.step / 2  # rounding boundaries, and the float just below each
    x = torch.cat([x, edges, half, torch.nextafter(half, torch.tensor(0.0))])
    if spec.signed:  # rint(clip(x, lo, hi) * mult) + offset
        codes = clip_codes(x.numpy(), spec.lo, spec.hi, spec.mult, spec.offset).astype(np.int64)
    else:
        codes = K.quantize_codes(x.numpy(), spec.hi, spec.mult).astype(np.int64)
    assert np.array_equal(codes, q.encode(x).codes.long().numpy())
    values = torch.from_numpy(spec.step * (codes - spec.zero)).float()
    with torch.no_grad():
        assert torch.equal(values, q(x))


class SignedUniform(ActivationQuantizer):
    """Test-only activation quantizer with a zero point: codes 0..15 for values (c - 8) * 0.25."""

    name = "signed_test"
    bits_allowed = (4,)

    def forward(self, x):
        return self.encode(x).decode()

    def encode(self, x):
        codes = torch.clamp(torch.round(x / 0.25) + 8, 0, 15).to(torch.uint8)
        levels = torch.arange(16, dtype=x.dtype) - 8
        return Encoded(codes=codes, levels=levels, scale=torch.tensor(0.25, dtype=x.dtype), bits=4)


def _quantized_layer(layer: nn.Module, wmethod: dict, act: ActivationQuantizer | None) -> nn.Module:
    recipe = {"default": {"weight": wmethod, "activation": None}}
    model = lowbit.quantize(nn.Sequential(layer), recipe)
    if act is not None:
        from lowbit.nn.quantize import _quantize_input

        layer.input_quantizer = act
        layer.register_forward_pre_hook(_quantize_input)
    return model.eval()


WMETHODS = [
    {"method": "binary", "bits": 1},
    {"method": "binary", "bits": 1, "per_channel": True},
    {"method": "twn", "bits": 2},
    {"method": "dorefa", "bits": 4},
]


def _wid(d: dict) -> str:
    return f"{d['method']}{d['bits']}{'pc' if d.get('per_channel') else ''}"


@pytest.mark.parametrize("wm", WMETHODS, ids=_wid)
@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=5, out_channels=7, kernel_size=3, stride=2, padding=1),
        dict(in_channels=6, out_channels=9, kernel_size=(3, 2), stride=(1, 2), padding=(2, 1), groups=3,
             bias=True),
        dict(in_channels=70, out_channels=11, kernel_size=3, padding=1, dilation=2),
        dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1, groups=8),  # depthwise
    ],
)
@pytest.mark.parametrize("act", ["pact", "signed", "float"])
def test_conv_equals_torch_conv_on_dequantized(wm, conv, act, kernel_path):
    torch.manual_seed(0)
    aq = {"pact": PACTActivation(4, alpha_init=2.0), "signed": SignedUniform(4), "float": None}[act]
    layer = nn.Conv2d(**{"bias": False, **conv})
    model = _quantized_layer(layer, wm, aq)
    x = torch.randn(2, conv["in_channels"], 9, 11) * 1.5
    with torch.no_grad():
        xq = aq(x) if aq is not None else x
        ref = F.conv2d(xq, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                       layer.groups)
        assert torch.allclose(ref, model(x), atol=1e-5)
    packed = build_packed("0", layer)
    got = packed(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("wm", WMETHODS, ids=lambda d: d["method"])
@pytest.mark.parametrize("batch", [1, 3, 40])
@pytest.mark.parametrize("act", ["dorefa", "signed", "float"])
def test_linear_equals_torch_linear(wm, batch, act, kernel_path):
    torch.manual_seed(1)
    aq = {"dorefa": DoReFaActivation(3), "signed": SignedUniform(4), "float": None}[act]
    layer = nn.Linear(131, 29)
    model = _quantized_layer(layer, wm, aq)
    x = torch.randn(batch, 131)
    with torch.no_grad():
        ref = model(x)
    got = build_packed("0", layer)(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 20, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(20)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(80, 33, bias=False)
        self.bn3 = nn.BatchNorm1d(33)
        self.fc2 = nn.Linear(33, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        x = torch.relu(y) + 0.5 * y  # bn2 output has two users: cannot fuse a ReLU into it
        x = self.pool(x).flatten(1)
        x = F.relu(self.bn3(self.fc1(x)))
        return self.fc2(x)


@pytest.mark.parametrize("wm", WMETHODS[::-1], ids=lambda d: d["method"])
def test_compiled_model_equals_fake_quant(wm, kernel_path):
    torch.manual_seed(0)
    model = SmallNet()
    _randomize_bn(model)
    recipe = {"default": {"weight": wm, "activation": {"method": "pact", "bits": 4, "alpha_init": 2.0}}}
    lowbit.quantize(model, recipe).eval()
    x = torch.randn(6, 3, 10, 10)
    packed = rt.compile(model, x)
    kinds = {r.name: r.kind for r in packed.layers}
    assert kinds == dict.fromkeys(["conv1", "conv2", "fc1", "fc2"], "packed")
    pl = packed.packed_layers()
    assert "bn" in pl["conv1"].fused and "relu" in pl["conv1"].fused
    assert pl["conv2"].fused == ["bn"] and pl["fc1"].fused[:2] == ["bn", "relu"]
    # fc1 hands fc2 its codes in tiles where both run kernels_amx from some row count (_link_tiles)
    assert pl["fc1"].fused[2:] == (["tiles"] if pl["fc1"].tile_target is not None else [])
    links = all(pl[n].amx is not None and pl[n].amx_min_rows < KA.NEVER_ROWS for n in ("fc1", "fc2"))
    assert (pl["fc1"].tile_target is not None) == links
    assert not any(isinstance(m, nn.BatchNorm2d) for m in packed.modules())
    x2 = torch.randn(9, 3, 10, 10)
    with torch.no_grad():
        ref = model(x2)
    got = packed(x2)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert torch.equal(got.argmax(1), ref.argmax(1))
    assert packed.max_rel_diff < 1e-4
    assert 0 < packed.weight_bytes() < sum(4 * p.numel() for p in model.parameters())


def test_compile_zoo_model_and_fallbacks():
    from lowbit.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet5")
    _randomize_bn(model)
    recipe = {
        "default": {"weight": {"method": "binary", "bits": 1}, "activation": {"method": "dorefa", "bits": 4}},
        "rules": [{"match": "@first", "activation": None}, {"match": "@last", "weight": None}],
    }
    lowbit.quantize(model, recipe).eval()
    x = torch.rand(4, 1, 28, 28)
    packed = rt.compile(model, x)
    kinds = {r.name: r.kind for r in packed.layers}
    assert kinds["conv1"] == "packed" and "float act" in packed.packed_layers()["conv1"].describe()
    assert kinds["fc3"] == "torch"  # float weights: the layer runs in PyTorch
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(packed(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert "packed" in packed.summary()


def test_compile_does_not_modify_model_and_accepts_numpy():
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3))
    lowbit.quantize(model, {"default": {"weight": {"method": "twn", "bits": 2},
                                        "activation": {"method": "pact", "bits": 2}}}).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = np.random.default_rng(0).standard_normal((2, 4, 5)).astype(np.float32)
    packed = rt.compile(model, torch.from_numpy(x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
    torch.testing.assert_close(packed(x), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# int8 (VNNI) kernels: exact integer results on odd shapes
# ----------------------------------------------------------------------------------------------


INT8_CASES = [
    # N, C, H, W, O, kernel, stride, padding, dilation, code max, |weight| max
    (2, 1, 9, 11, 6, (5, 5), (1, 1), (2, 2), (1, 1), 15, 1),  # LeNet conv1: 1 channel, run order
    (3, 3, 7, 8, 16, (3, 3), (2, 2), (1, 1), (1, 1), 255, 127),  # extreme codes and weights
    (1, 6, 10, 9, 20, (5, 3), (1, 2), (0, 1), (1, 1), 15, 15),
    (2, 16, 6, 7, 37, (3, 3), (1, 1), (1, 1), (1, 1), 15, 15),  # 3 blocks of 16, 84 rows
    (2, 70, 5, 6, 130, (3, 3), (1, 1), (2, 2), (2, 2), 15, 7),  # dilation: tap order; passes 3+3+3
    (1, 5, 4, 4, 65, (2, 2), (2, 2), (0, 0), (1, 1), 255, 127),  # passes 3+2
    (5, 131, 1, 1, 84, (1, 1), (1, 1), (0, 0), (1, 1), 15, 15),  # a Linear layer: 1x1, 5 rows
    (1, 64, 8, 8, 64, (3, 3), (1, 1), (1, 1), (1, 1), 15, 1),
    # one-row tiles (batch 1-2 Linear layers, a last row): quads in 4 accumulator sets, any remainder
    (1, 4, 1, 1, 16, (1, 1), (1, 1), (0, 0), (1, 1), 255, 127),  # 1 quad: the remainder alone
    (1, 9, 1, 1, 40, (1, 1), (1, 1), (0, 0), (1, 1), 255, 127),  # 3 quads, 3 blocks
    (2, 22, 1, 1, 64, (1, 1), (1, 1), (0, 0), (1, 1), 15, 15),  # 6 quads, 4 blocks
    (2, 31, 1, 1, 130, (1, 1), (1, 1), (0, 0), (1, 1), 255, 127),  # 8 quads, passes 3+3+3
    (1, 16, 3, 3, 16, (3, 3), (1, 1), (1, 1), (1, 1), 255, 127),  # 9 rows: an 8-row tile, then one row
]


def _int8_setup(case):
    N, C, H, W, O, (KH, KW), stride, padding, dilation, amax, wmax = case
    codes = RNG.integers(0, amax + 1, (N, C, H, W))
    w_int = RNG.integers(-wmax, wmax + 1, (O, C, KH, KW))
    w, passes = K.pack_int8_weights(w_int.transpose(0, 2, 3, 1), dilation[1])
    geom = K.int8_geometry(KH, KW, C, *dilation)
    ref = kernels_int8.int8_conv_reference(codes, w_int, stride, padding, dilation)
    OH, OW = ref.shape[1:3]
    Hp, Wp = H + 2 * padding[0], W + 2 * padding[1]
    xq = K.int8_quantize(codes.astype(np.float32).transpose(0, 2, 3, 1), padding)
    geo = np.array([Hp, Wp, C, OH, OW, *stride, N, O], np.int64)
    return codes, w, passes, K.int8_quad_offsets(geom, Wp, C), xq, geo, ref


@needs_vnni
@pytest.mark.parametrize("case", INT8_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_int8_conv_equals_integer_reference(case):
    _, w, passes, qoff, xq, geo, ref = _int8_setup(case)
    O = case[4]
    width = 16 * int(passes[:, 0].sum())
    assert passes[:, 0].max() <= 4 and width >= O
    out = np.empty(ref.shape, np.float32)
    K.int8_conv(xq, geo, qoff, w, passes, np.zeros(width + 64), np.ones(width + 64), False, out)
    assert np.array_equal(out, ref)


@needs_vnni
@pytest.mark.parametrize("case", INT8_CASES[2:5], ids=lambda c: "x".join(map(str, c[:5])))
def test_int8_epilogue_residual_relu_codes(case, monkeypatch):
    """Float64 epilogue (s1*D + s0, + residual, ReLU, float32), the next layer's codes in float32,
    written into a padded image; and the same split over threads."""
    _, w, passes, qoff, xq, geo, D = _int8_setup(case)
    O = case[4]
    width = 16 * int(passes[:, 0].sum())
    s0 = np.zeros(width + 64)
    s1 = np.zeros(width + 64)
    s0[:O] = RNG.uniform(-3, 3, O)
    s1[:O] = RNG.uniform(-0.2, 0.2, O)
    res = RNG.standard_normal(D.shape).astype(np.float32)
    v = s1[:O] * D + s0[:O] + res.astype(np.float64)
    y = np.maximum(v, 0.0).astype(np.float32)
    hi, mult = np.float32(2.5), np.float32(15 / 2.5)
    want = np.rint(np.minimum(np.maximum(y, np.float32(0)), hi) * mult).astype(np.uint8)
    N, OH, OW, _ = D.shape
    ph, pw = 1, 2
    cgeo = np.array([OH + 2 * ph, OW + 2 * pw, ph, pw], np.int64)
    for threads in (1, 2):
        if threads == 2:
            if numba.config.NUMBA_NUM_THREADS < 2:
                continue
            monkeypatch.setattr(kernels_int8, "INT8_MIN_PARALLEL_MACS", 0)
        prev = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            out = np.empty(D.shape, np.float32)
            img = np.zeros(N * (OH + 2 * ph) * (OW + 2 * pw) * O + K.INT8_SLACK, np.uint8)
            K.int8_conv(xq, geo, qoff, w, passes, s0, s1, True, out, res, img, cgeo, float(hi), float(mult))
        finally:
            numba.set_num_threads(prev)
        assert np.array_equal(out, y)
        # codes only, no float output
        img2 = np.zeros_like(img)
        K.int8_conv(xq, geo, qoff, w, passes, s0, s1, True, None, res, img2, cgeo, float(hi), float(mult))
        assert np.array_equal(img2, img)
        img4 = img[: -K.INT8_SLACK].reshape(N, OH + 2 * ph, OW + 2 * pw, O)
        assert np.array_equal(img4[:, ph : ph + OH, pw : pw + OW], want)
        img4[:, ph : ph + OH, pw : pw + OW] = 0
        assert not img4.any() and not img[-K.INT8_SLACK :].any()  # border and slack untouched


@needs_vnni
@pytest.mark.parametrize("shape", [(2, 1, 5, 7), (3, 3, 4, 6), (2, 17, 3, 5)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_int8_quantize_layouts(shape, layout):
    x = RNG.standard_normal(shape).astype(np.float32) * 2
    t = torch.from_numpy(x)
    if layout == "nhwc":
        t = t.contiguous(memory_format=torch.channels_last)
    xn = t.permute(0, 2, 3, 1).numpy()
    hi, mult = 2.0, 15 / 2.0
    for pad, ma in (((0, 0), 0), ((1, 2), 3)):
        got = K.int8_quantize(xn, pad, hi, mult, 0, ma)
        want = K.quantize_codes(x, hi, mult).transpose(0, 2, 3, 1)
        N, H, W, C = want.shape
        img = got[: -K.INT8_SLACK].reshape(N, H + 2 * pad[0], W + 2 * pad[1], C)
        assert np.array_equal(img[:, pad[0] : pad[0] + H, pad[1] : pad[1] + W], want)
        border = np.ones(img.shape, bool)
        border[:, pad[0] : pad[0] + H, pad[1] : pad[1] + W] = False
        assert (img[border] == ma).all() and not got[-K.INT8_SLACK :].any()


@needs_vnni
@pytest.mark.parametrize("pool", [(2, 2), (3, 2), (2, 1)])
@pytest.mark.parametrize("flat", [False, True])
def test_code_maxpool_equals_torch(pool, flat):
    k, st = pool
    N, H, W, C = 3, 9, 8, 6
    codes = RNG.integers(0, 16, (N, H, W, C)).astype(np.uint8)
    ph, pw = 1, 2  # padding of the input image (ignored by the pool window)
    img = np.zeros((N, H + 2 * ph, W + 2 * pw, C), np.uint8)
    img[:, ph : ph + H, pw : pw + W] = codes
    xq = np.concatenate([img.reshape(-1), np.zeros(K.INT8_SLACK, np.uint8)])
    ref = F.max_pool2d(torch.from_numpy(codes).permute(0, 3, 1, 2).float(), k, st)  # (N, C, OH, OW)
    OH, OW = ref.shape[2:]
    tp = (0, 0) if flat else (1, 1)
    cgeo = [1, 1, 0, 0] if flat else [OH + 2, OW + 2, 1, 1]
    out = np.zeros(N * C * OH * OW if flat else N * (OH + 2) * (OW + 2) * C, np.uint8)
    g = np.array([C, H + 2 * ph, W + 2 * pw, ph, pw, k, k, st, st, OH, OW, *cgeo, int(flat)], np.int64)
    K.code_maxpool(xq, N, g, out)
    if flat:
        assert np.array_equal(out.reshape(N, -1), ref.reshape(N, -1).numpy().astype(np.uint8))
    else:
        o = out.reshape(N, OH + 2, OW + 2, C)
        assert np.array_equal(o[:, tp[0] : tp[0] + OH, tp[1] : tp[1] + OW], ref.permute(0, 2, 3, 1).numpy())
        o[:, 1 : 1 + OH, 1 : 1 + OW] = 0
        assert not o.any()


@pytest.mark.parametrize("kind", list(LEVELS))
def test_int8_weight_folding(kind):
    from lowbit.runtime.layers import int8_weights, plane_integers

    enc = _weights(kind, 21, 37, per_channel=True)
    wp = decompose_weight(enc)
    i8 = int8_weights(wp, (1, 1, 37))
    assert i8 is not None
    w_int = i8.w.reshape(-1, 32, 4)  # (quads, 2 blocks of 16, 4)
    w_int = w_int[:, :21].transpose(1, 0, 2).reshape(21, -1)[:, :37].astype(np.float64)
    levels = enc.levels.numpy()[enc.codes.long().numpy()]
    np.testing.assert_allclose(i8.unit * w_int, levels, rtol=1e-12, atol=1e-12)
    assert np.array_equal(i8.wsum, w_int.sum(1))
    np.testing.assert_allclose(plane_integers(wp), (levels - wp.l0) / wp.u, atol=1e-9)
    # levels whose offset is not a half-integer multiple of the step do not fold
    if kind in ("binary", "uniform2", "uniform4"):
        lv = enc.levels
        bad = Encoded(enc.codes, lv + 0.3 * (lv[1] - lv[0]), enc.scale, enc.bits)
        assert int8_weights(decompose_weight(bad), (1, 1, 37)) is None


# ----------------------------------------------------------------------------------------------
# compiled models: fusion, exactness against the float64 fake-quantized model, batch chunking
# ----------------------------------------------------------------------------------------------


def _zoo(name: str, wm: dict, **kw) -> nn.Module:
    from lowbit.models import build_model

    torch.manual_seed(0)
    model = build_model(name, **kw)
    _randomize_bn(model)
    recipe = {"default": {"weight": wm, "activation": {"method": "pact", "bits": 4, "alpha_init": 3.0}}}
    return lowbit.quantize(model, recipe).eval()


def _rel64(model: nn.Module, packed, x: torch.Tensor) -> float:
    """Relative max difference to the fake-quantized model run in float64 with exactly decoded
    quantized values (whose activation codes the float32 PyTorch model can miss by a rounding at a
    quantizer's boundary)."""
    from lowbit.runtime.compiler import reference_fp64

    ref = reference_fp64(model, x)
    got = packed(x).double()
    return float((got - ref).abs().max() / ref.abs().max())


# the bit-serial kernels on 4-bit weights only here (every method: test_compiled_model_equals_fake_quant)
_ZOO_CASES = [(path, wm) for path in ("int8", "bit-serial") for wm in WMETHODS[::-1]
              if path == "int8" or wm["method"] == "dorefa"]


@pytest.mark.parametrize(("kernel_path", "wm"), _ZOO_CASES, ids=[f"{p}-{_wid(w)}" for p, w in _ZOO_CASES])
@pytest.mark.parametrize("net", ["lenet5", "resnet-A", "resnet-B"])
def test_compiled_zoo_exact_and_fused(kernel_path, wm, net, monkeypatch):
    name, kw, shape = {
        "lenet5": ("lenet5", {}, (1, 28, 28)),
        "resnet-A": ("resnet20", {"width_mult": 0.5}, (3, 12, 12)),
        "resnet-B": ("resnet20", {"width_mult": 0.5, "shortcut": "B"}, (3, 10, 10)),
    }[net]
    if kernel_path == "int8" and not K.HAS_VNNI:
        pytest.skip("int8 kernels need AVX-512 VNNI")
    if kernel_path == "bit-serial":
        monkeypatch.setattr(K, "HAS_VNNI", False)
    model = _zoo(name, wm, **kw)
    packed = rt.compile(model, torch.rand(3, *shape))
    assert all(r.kind == "packed" for r in packed.layers)
    for batch in (1, 5):
        assert _rel64(model, packed, torch.rand(batch, *shape)) < 1e-6
    from lowbit.runtime.layers import CodeMaxPool2d

    fused = {n: m.fused for n, m in packed.packed_layers().items()}
    pools = [m for m in packed.modules() if isinstance(m, CodeMaxPool2d)]
    if kernel_path == "bit-serial":
        assert not pools and not any("codes" in f or "add" in f for f in fused.values())
        return
    if net == "lenet5":
        assert [p.flat for p in pools] == [False, True]  # pool1 -> conv2, pool2 -> flatten -> fc1
        assert "codes" in fused["conv1"] and "codes" in fused["conv2"]
    else:
        from lowbit.runtime.layers import GlobalAvgPool2d

        assert fused["layer1.0.conv2"] == ["bn", "add", "relu", "codes"]
        assert fused["layer1.0.conv1"] == ["bn", "relu", "codes"]
        assert not packed.packed_layers()["layer1.0.conv1"].emit_float
        assert any(isinstance(m, GlobalAvgPool2d) for m in packed.modules())


@needs_vnni
def test_batch_chunking_and_threads():
    model = _zoo("resnet20", {"method": "twn", "bits": 2}, width_mult=0.5)
    x = torch.rand(37, 3, 8, 8)
    packed = rt.compile(model, x[:4])
    assert packed.batch_chunk >= 8
    whole = rt.compile(model, x[:4], batch_chunk=0)
    assert whole.batch_chunk == 0
    ref = whole(x)
    packed.batch_chunk = 8
    prev = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            assert torch.equal(packed(x), ref)
    finally:
        numba.set_num_threads(prev)


class _BatchMixing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y - y.mean(0, keepdim=True)  # samples are not independent


class _Broadcast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)

    def forward(self, x):
        m = x.mean((2, 3), keepdim=True)
        y = F.relu(self.conv(x) + m)  # a residual operand that broadcasts
        return self.conv2(y)


@needs_vnni
def test_no_chunking_when_samples_mix_and_broadcast_residual():
    recipe = {"default": {"weight": {"method": "binary", "bits": 1},
                          "activation": {"method": "pact", "bits": 4, "alpha_init": 2.0}}}
    m1 = lowbit.quantize(_BatchMixing(), recipe).eval()
    p1 = rt.compile(m1, torch.rand(4, 3, 6, 6))
    assert p1.batch_chunk == 0
    m2 = lowbit.quantize(_Broadcast(), recipe).eval()
    x = torch.randn(3, 4, 7, 5)
    p2 = rt.compile(m2, x)
    assert "add" in p2.packed_layers()["conv"].fused
    assert _rel64(m2, p2, x) < 1e-6


@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (2, 1, 1, 64), (1, 8, 8, 3)])
def test_global_avgpool_float64_sums(shape):
    x = RNG.standard_normal(shape).astype(np.float32) * 100
    t = torch.from_numpy(x).permute(0, 3, 1, 2)  # any strides: NCHW view of NHWC data
    got = K.global_avgpool(t.contiguous().permute(0, 2, 3, 1).numpy())
    want = x.astype(np.float64).mean(axis=(1, 2)).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=0)


# ----------------------------------------------------------------------------------------------
# any model: nested outputs, attention, signed activations, nothing quantized
# ----------------------------------------------------------------------------------------------
class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> dict:
        h = torch.tanh(self.fc1(x))
        return {"logits": self.fc2(h), "extra": (h, [h.sum(-1)])}


SIGNED_A4 = {"method": "lsq", "bits": 4, "signed": True}


def _calibrated(model: nn.Module, recipe: dict, x) -> nn.Module:
    lowbit.quantize(model, recipe)
    model.train()
    with torch.no_grad():
        model(x)  # data initialisation of the activation steps
    return model.eval()


def test_compile_checks_nested_outputs():
    """Defect 6: the accuracy check used to be skipped (max_abs_diff NaN) for non-tensor outputs."""
    torch.manual_seed(0)
    x = torch.randn(7, 12)
    model = _calibrated(_Nested(), {"default": {"weight": {"method": "twn", "bits": 2},
                                                "activation": SIGNED_A4}}, x)
    packed = rt.compile(model, x)
    assert np.isfinite(packed.max_abs_diff) and packed.max_rel_diff < 1e-5
    with torch.no_grad():
        ref = model(x)
    got = packed(x)
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["extra"][1][0], ref["extra"][1][0], rtol=1e-5, atol=1e-5)


def test_compile_without_quantized_layer_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4))
    model.lowbit_recipe = {"default": {}}  # e.g. loaded with a recipe that quantized nothing
    with pytest.raises(ValueError, match="no quantized layer"):
        rt.compile(model, torch.randn(2, 4))


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(x, x, x)
        return self.fc(a)


def test_attention_out_proj_is_not_reported_packed():
    """MultiheadAttention multiplies by out_proj.weight itself: out_proj never runs as a module, so
    it must not be listed (or swapped) as a packed layer."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = _calibrated(_Attn(), {"default": {"weight": {"method": "binary", "bits": 1},
                                              "activation": SIGNED_A4},
                                  "rules": [{"match": "attn.out_proj", "activation": None}]}, x)
    packed = rt.compile(model, x)
    kinds = {r.name: r for r in packed.layers}
    assert kinds["attn.out_proj"].kind == "torch" and "not called" in kinds["attn.out_proj"].detail
    assert kinds["attn"].kind == "torch" and kinds["fc"].kind == "packed"
    assert set(packed.packed_layers()) == {"fc"}
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(packed(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_signed_activation_codes(bits, kernel_path):
    """Signed symmetric activation grids (levels -(2^(b-1)-1)..2^(b-1)-1) on packed Linear and
    Conv2d layers (zero padding is code 2^(b-1)-1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 36, 4))
    x = torch.randn(5, 3, 6, 6)
    act = {"method": "lsq", "bits": bits, "signed": True}
    model = _calibrated(model, {"default": {"weight": {"method": "twn", "bits": 2}, "activation": act}}, x)
    packed = rt.compile(model, x)
    assert all(r.kind == "packed" for r in packed.layers), packed.summary()
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(packed(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_transformers_conv1d_packs_with_per_channel_axis_1():
    """GPT-2's Conv1D (weight in x out; per-channel scales along dim 1) runs as a PackedLinear."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(24, 12), nn.Tanh(), conv1d(5, 24))
    x = torch.randn(2, 7, 12)
    weight = {"method": "twn", "bits": 2, "per_channel": True}
    recipe = {"default": {"weight": weight, "activation": SIGNED_A4}}
    model = _calibrated(model, recipe, x)
    assert tuple(lowbit.nn.weight_quantizer(model[0]).encode(model[0].weight).scale.shape) == (1, 24)
    packed = rt.compile(model, x)
    assert [r.kind for r in packed.layers] == ["packed", "packed"]
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(packed(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("act", [None, SIGNED_A4], ids=["float-act", "signed-a4"])
def test_conv1d_packs_as_k_by_1_conv2d(act, kernel_path):
    """nn.Conv1d (strided, padded, depthwise) runs as a (k, 1) PackedConv2d; its stride[0] etc.
    are the Conv1d's (Whisper's encoder reads conv1.stride[0])."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 5, stride=2, padding=2), nn.GELU(),
                          nn.Conv1d(8, 8, 3, padding=1, groups=8), nn.GELU(), nn.Conv1d(8, 6, 1, dilation=1))
    x = torch.randn(3, 4, 40)
    model = _calibrated(model, {"default": {"weight": {"method": "twn", "bits": 2, "per_channel": True},
                                            "activation": act}}, x)
    packed = rt.compile(model, x)
    assert [r.kind for r in packed.layers] == ["packed"] * 3, packed.summary()
    first = packed.packed_layers()["0"]
    assert first.stride[0] == 2 and first.kernel_size[0] == 5 and first.padding[0] == 2
    assert first.weight.shape == model[0].weight.shape
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(packed(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
