"""ONNX export: Q/DQ graphs that onnxruntime runs and that compute the fake-quantized model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import lowbit
from lowbit.export import export_onnx
from lowbit.export.onnx_export import act_grid, run_onnx, weight_grid
from lowbit.models import build_model
from lowbit.nn import input_quantizer, quantizable_layers
from lowbit.quant import registry
from lowbit.quant.base import ActivationQuantizer, Encoded, WeightQuantizer, straight_through

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

W1A4 = {
    "default": {
        "weight": {"method": "binary", "bits": 1},
        "activation": {"method": "pact", "bits": 4, "alpha_init": 2.0},
    },
    "rules": [{"match": "@first", "activation": None}],
}


def _lenet(recipe: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("lenet5")
    lowbit.quantize(model, recipe)
    model.train()
    with torch.no_grad():
        model(torch.rand(64, 1, 28, 28))  # batch-norm statistics
    return model.eval()


def _agreement(
    model: nn.Module, path: Path, x: Tensor, optimize: bool = True, exact: bool = True
) -> tuple[float, np.ndarray]:
    """Argmax agreement and per-row max |logit difference| relative to max(1, |logits|)."""
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_onnx(path, x, optimize=optimize, exact=exact)
    assert got.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    return float((ref.argmax(1) == got.argmax(1)).mean()), np.abs(ref - got).max(axis=1) / scale


def _onnx_weight_types(path: Path) -> list[int]:
    m = onnx.load(str(path))
    producer = {o: n for n in m.graph.node for o in n.output}
    types = []
    for n in m.graph.node:
        if (
            n.op_type == "DequantizeLinear"
            and n.input[0] in producer
            and producer[n.input[0]].op_type == "Constant"
        ):
            types.append(producer[n.input[0]].attribute[0].t.data_type)
    return types


@pytest.mark.parametrize("opset", [17, 21])
def test_lenet_binary_w_4bit_a_matches_onnxruntime(tmp_path: Path, opset: int) -> None:
    model = _lenet(W1A4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "m.onnx"
    rep = export_onnx(model, path, (1, 28, 28), opset=opset)
    # the caller's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(lowbit.quantized_layers(model)) == 5
    x = torch.rand(2000, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for optimize, exact in ((True, True), (False, True), (True, False)):  # (True, False): plain ORT
        agree, diff = _agreement(model, path, x, optimize, exact)
        assert agree >= 0.999
        assert (diff <= 1e-4).mean() >= 0.999, diff.max()
    # table: every binary weight is exact integer codes; activations are Q/DQ
    want = "int4" if opset >= 21 else "int8"
    assert [r.onnx_weight for r in rep.rows] == [want] * 5
    assert all(r.lossless and not r.widened for r in rep.rows)
    assert [r.onnx_activation for r in rep.rows] == ["none"] + ["uint8 Q/DQ"] * 4
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 9 and ops.count("Clip") == 4
    tp = onnx.TensorProto
    assert _onnx_weight_types(path) == [tp.INT4 if opset >= 21 else tp.INT8] * 5


def test_per_axis_ternary_and_dorefa_types(tmp_path: Path) -> None:
    recipe = {
        "default": {
            "weight": {"method": "twn", "bits": 2, "per_channel": True},
            "activation": {"method": "dorefa", "bits": 4},
        },
        "rules": [
            {"match": "@first", "activation": None},
            {"match": "fc1", "weight": {"method": "dorefa", "bits": 4}},
            {"match": "fc2", "weight": {"method": "dorefa", "bits": 8}},
            {"match": "@last", "weight": None},
        ],
    }
    model = _lenet(recipe)
    x = torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    for opset, fc2 in ((21, "int16"), (17, "float32")):
        path = tmp_path / f"m{opset}.onnx"
        rep = export_onnx(model, path, (1, 28, 28), opset=opset)
        rows = {r.name: r for r in rep.rows}
        conv = "int4" if opset >= 21 else "int8"
        assert rows["conv1"].onnx_weight == conv and rows["conv1"].per_axis
        assert rows["fc1"].onnx_weight == "int8" and not rows["fc1"].per_axis  # odd integers -15..15
        assert rows["fc2"].onnx_weight == fc2 and rows["fc2"].widened == (opset < 21)
        assert rows["fc3"].w_method == "float" and not rows["fc3"].widened
        assert rows["fc1"].onnx_activation == "uint8 Q/DQ"
        # float weights get their input grid as Clip/Round float ops (see WeightBiasQuantization)
        assert rows["fc3"].onnx_activation == "Clip/Round"
        assert rows["fc2"].onnx_activation == ("Clip/Round" if opset < 21 else "uint8 Q/DQ")
        agree, diff = _agreement(model, path, x)
        assert agree >= 0.999 and (diff <= 1e-4).mean() >= 0.99


class AsymTernary(WeightQuantizer):
    """TTQ-like codebook {-1, 0, sqrt(2)} * scale: on no integer grid ({-0.3, 0, 0.7} would be:
    -3, 0, 7 times 0.1)."""

    name = "asym_ternary_test"
    bits_allowed = (2,)

    def __init__(self) -> None:
        super().__init__(2)
        self.register_buffer("levels", torch.tensor([-1.0, 0.0, 2**0.5]))

    def encode(self, w: Tensor) -> Encoded:
        w = w.detach()
        d = 0.5 * w.abs().mean()
        codes = ((w > d).to(torch.uint8) - (w < -d).to(torch.uint8) + 1).to(torch.uint8)
        return Encoded(codes, self.levels, w.abs().max(), 2)

    def forward(self, w: Tensor) -> Tensor:
        return straight_through(self.encode(w).decode(), w)


class DynamicAct(ActivationQuantizer):
    """Step from the batch's max: not a static Q/DQ grid, exported as float ops."""

    name = "dynamic_test"
    bits_allowed = (4,)

    def __init__(self) -> None:
        super().__init__(4, "relu")

    def encode(self, x: Tensor) -> Encoded:
        s = x.detach().clamp_min(0).amax().clamp_min(1e-3) / 15
        codes = torch.round(x.detach().clamp_min(0) / s).clamp(0, 15).to(torch.uint8)
        return Encoded(codes, torch.arange(16, dtype=x.dtype), s, 4)

    def forward(self, x: Tensor) -> Tensor:
        return straight_through(self.encode(x).decode(), x)


def test_widened_weights_and_float_op_activations(tmp_path: Path) -> None:
    model = _lenet(W1A4)
    parametrize.register_parametrization(model.fc1, "weight", AsymTernary(), unsafe=True)
    # replace binary on fc1 by the asymmetric codebook: drop the binary quantizer first
    plist = model.fc1.parametrizations.weight
    del plist[0]
    model.fc2.input_quantizer = DynamicAct()
    path = tmp_path / "m.onnx"
    rep = export_onnx(model, path, (1, 28, 28))
    rows = {r.name: r for r in rep.rows}
    assert rows["fc1"].widened and not rows["fc1"].lossless and rows["fc1"].onnx_weight == "float32"
    assert rows["fc1"].w_method == "asym_ternary_test"
    assert rep.widened == ["fc1"]
    assert rows["fc1"].onnx_activation == "Clip/Round"  # float weight: no Q/DQ input
    assert rows["fc2"].onnx_activation == "float ops"
    assert rows["conv2"].onnx_weight == "int4"
    x = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    agree, diff = _agreement(model, path, x)
    assert agree >= 0.99 and (diff <= 1e-4).mean() >= 0.98
    table = {r["name"]: r for r in __import__("json").loads(rep.to_json())["rows"]}
    assert table["fc1"]["widened"] and not table["conv2"]["widened"]


def test_weight_grid_finds_integer_forms() -> None:
    a = torch.tensor(0.37)
    w = torch.where(torch.randn(8, 9) >= 0, a, -a)
    g = weight_grid(w, False, 21)
    assert g.qtype == "int4" and set(g.x.unique().tolist()) <= {-1, 1} and g.max_abs_error == 0.0
    g = weight_grid(w, False, 17)
    assert g.qtype == "int8"
    # DoReFa k bits: odd integers 2i - (2^k - 1), i.e. int4 up to 3 bits, int8 up to 7, int16 at 8
    from lowbit.quant.dorefa import DoReFaWeight

    for k, want in ((2, "int4"), (3, "int4"), (4, "int8"), (7, "int8"), (8, "int16")):
        q = DoReFaWeight(k)
        assert weight_grid(q(torch.randn(64, 64)), False, 21).qtype == want, k
    assert weight_grid(DoReFaWeight(8)(torch.randn(64, 64)), False, 17) is None  # widened
    # unsigned grids use a zero point; powers of two fit a grid of their smallest step
    u = torch.tensor([0.0, 0.25, 0.5, 1.0]).repeat(4, 1)
    g = weight_grid(u, False, 21)
    assert g is not None and g.qtype in ("int4", "uint4")
    assert weight_grid(torch.tensor([[-0.3, 0.0, 0.7]]), False, 21).qtype == "int4"  # -3, 0, 7
    assert weight_grid(torch.tensor([[-1.0, 0.0, 2**0.5]]), False, 21) is None


def test_activation_grids_of_core_quantizers() -> None:
    from lowbit.quant.dorefa import DoReFaActivation
    from lowbit.quant.pact import PACTActivation

    for bits in (1, 2, 4, 8):
        g = act_grid(PACTActivation(bits, alpha_init=3.0))
        assert g is not None and g.qtype == "uint8" and (g.lo, g.hi) == (0, 2**bits - 1)
        g = act_grid(DoReFaActivation(bits))
        assert g is not None and g.hi == 2**bits - 1
    assert act_grid(DynamicAct()) is None


def _act_cases() -> list[tuple[str, int]]:
    out = []
    for name in registry.names("activation"):
        allowed = registry.get("activation", name).bits_allowed
        out.append((name, 4 if 4 in allowed else allowed[0]))
    return out


@pytest.mark.parametrize("method,bits", _act_cases())
def test_every_registered_activation_quantizer_exports(tmp_path: Path, method: str, bits: int) -> None:
    recipe = {
        "default": {
            "weight": {"method": "binary", "bits": 1},
            "activation": {"method": method, "bits": bits},
        },
        "rules": [{"match": "@first", "activation": None}],
    }
    model = _lenet(recipe)
    rep = export_onnx(model, tmp_path / "m.onnx", (1, 28, 28))
    for r in rep.rows[1:]:
        assert r.onnx_activation in ("uint8 Q/DQ", "int8 Q/DQ", "Clip/Round", "float ops")
        layer = quantizable_layers(model)[r.name]
        if r.onnx_activation != "float ops":
            assert act_grid(input_quantizer(layer)) is not None
    x = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    agree, _ = _agreement(model, tmp_path / "m.onnx", x)
    assert agree >= 0.97, (method, [r.onnx_activation for r in rep.rows])


def _weight_cases() -> list[tuple[str, int]]:
    out = []
    for name in registry.names("weight"):
        allowed = registry.get("weight", name).bits_allowed
        out.extend((name, b) for b in sorted({allowed[0], allowed[-1]}))
    return out


@pytest.mark.parametrize("method,bits", _weight_cases())
def test_every_registered_weight_quantizer_exports(tmp_path: Path, method: str, bits: int) -> None:
    recipe = {
        "default": {
            "weight": {"method": method, "bits": bits},
            "activation": {"method": "pact", "bits": 8, "alpha_init": 4.0},
        },
        "rules": [{"match": "@first", "activation": None}],
    }
    model = _lenet(recipe)
    rep = export_onnx(model, tmp_path / "m.onnx", (1, 28, 28))
    for r in rep.rows:
        assert r.lossless or r.widened
    x = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    agree, _ = _agreement(model, tmp_path / "m.onnx", x)
    assert agree >= 0.99, (method, bits, [(r.onnx_weight, r.widened) for r in rep.rows])


def test_bad_opset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="opset"):
        export_onnx(_lenet(W1A4), tmp_path / "m.onnx", (1, 28, 28), opset=11)


@pytest.mark.parametrize("scale", ["max", "mse"])
def test_scaled_wrpn_exports_as_int4(tmp_path: Path, scale: str) -> None:
    recipe = {
        "default": {
            "weight": {"method": "wrpn", "bits": 2, "scale": scale, "per_channel": True},
            "activation": {"method": "dorefa", "bits": 4},
        },
        "rules": [{"match": "@first", "activation": None}],
    }
    model = _lenet(recipe)
    rep = export_onnx(model, tmp_path / "m.onnx", (1, 28, 28))
    quantized = [r for r in rep.rows if r.w_method == "wrpn"]
    assert len(quantized) == 5
    assert all(r.lossless and r.onnx_weight == "int4" and r.per_axis for r in quantized)
    x = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    agree, _ = _agreement(model, tmp_path / "m.onnx", x)
    assert agree >= 0.99
