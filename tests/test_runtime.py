"""lowbit.runtime: packed kernels equal integer references; packed layers and compiled models
equal the fake-quantized PyTorch model (float rounding only). No timing here."""

from __future__ import annotations

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
from lowbit.runtime.layers import build_packed, decompose_weight

RNG = np.random.default_rng(1234)

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


@pytest.mark.parametrize("kind", ["binary", "ternary", "uniform4"])
def test_select_sum_float_activations(kind):
    M, Kred, O = 3, 75, 19
    enc = _weights(kind, O, Kred, per_channel=False)
    wp = decompose_weight(enc)
    x = RNG.standard_normal((M, Kred)).astype(np.float32)
    wp_int = (enc.levels.numpy()[enc.codes.long().numpy()] - wp.l0) / wp.u
    got = K.select_sum(x, wp.W[0], wp.shift, wp.neg, np.zeros(O), np.ones(O), np.zeros(O))
    np.testing.assert_allclose(got, x.astype(np.float64) @ wp_int.T, rtol=1e-5, atol=1e-5)


def test_parallel_kernels_match_serial(monkeypatch):
    enc = _weights("ternary", 70, 300, per_channel=True)
    wp = decompose_weight(enc)
    a = RNG.integers(0, 16, (40, 300))
    ref = _reference(enc, a)
    monkeypatch.setattr(K, "PARALLEL_MIN_WORK", 0)
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
    _, A = K.pack_rows(x.numpy()[None], q.bits, spec.hi, spec.mult, mode=0)
    assert int(A[0]) == int(q.encode(x).codes.long().sum())


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
def test_conv_equals_torch_conv_on_dequantized(wm, conv, act):
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
def test_linear_equals_torch_linear(wm, batch, act):
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
def test_compiled_model_equals_fake_quant(wm):
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
    assert pl["conv2"].fused == ["bn"] and pl["fc1"].fused == ["bn", "relu"]
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
