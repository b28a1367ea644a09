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
    model: nn.Module, path: Path, x: Tensor, optimize: bool = True
) -> tuple[float, np.ndarray]:
    """Argmax agreement and per-row max |logit difference| relative to max(1, |logits|)."""
    with torch.no_grad():
        ref = model(x).numpy()
    got = run_onnx(path, x, optimize=optimize)
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
    for optimize in (True, False):  # True: a plain onnxruntime session
        agree, diff = _agreement(model, path, x, optimize)
        assert agree == 1.0 and diff.max() <= 1e-4, diff.max()
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
        assert agree == 1.0 and diff.max() <= 1e-4, diff.max()


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
    assert agree == 1.0 and diff.max() <= 1e-4, diff.max()
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


# ----------------------------------------------------------------------------------------------
# any model, a plain onnxruntime session
# ----------------------------------------------------------------------------------------------
def _plain_session(path: Path, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path)).run(None, {k: v.numpy() for k, v in feed.items()})


def _rel(got: np.ndarray, ref: Tensor) -> float:
    r = ref.detach().numpy()
    return float(np.abs(got - r).max() / max(float(np.abs(r).max()), 1e-12))


class _Biased(nn.Module):
    """Float biases far from the grid of input step x weight step (what WeightBiasQuantization
    rounds them to), on a Gemm, a Conv and a Linear over a 3-D input (MatMul)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 16, 64)
        self.seq = nn.Linear(16, 16)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x))  # (N, 8, 4, 4)
        h = self.seq(h.flatten(2)).flatten(1)  # a Linear on (N, 8, 16)
        return self.fc2(torch.relu(self.fc1(h)))


@pytest.mark.parametrize("first_act", [False, True])
def test_plain_onnxruntime_session_reproduces_float_biases(tmp_path: Path, first_act: bool) -> None:
    """Defect 5c: a default InferenceSession (WeightBiasQuantization, MatMulNBits) used to move
    the logits of such a model by 2% (0.7% top-1 flips)."""
    torch.manual_seed(0)
    model = _Biased()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.bias.uniform_(-1, 1)
    rules = [] if first_act else [{"match": "@first", "activation": None}]
    lowbit.quantize(model, {
        "default": {"weight": {"method": "binary", "bits": 1},
                    "activation": {"method": "pact", "bits": 4, "alpha_init": 2.0}},
        "rules": rules,
    })
    model.eval()
    x = torch.randn(1000, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "b.onnx"
    export_onnx(model, path, x[:1])
    with torch.no_grad():
        ref = model(x)
    got = _plain_session(path, {"input": x})[0]
    assert _rel(got, ref) <= 1e-4
    assert (got.argmax(1) == ref.numpy().argmax(1)).all()


def test_weight_only_linear_on_3d_input_plain_session(tmp_path: Path) -> None:
    """Integer weights with float inputs on a MatMul became MatMulNBits (int8 inputs on the fly)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Tanh(), nn.Linear(64, 10))
    lowbit.quantize(model, {"default": {"weight": {"method": "twn", "bits": 2, "per_channel": True}}})
    model.eval()
    x = torch.randn(8, 5, 64, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "w.onnx"
    rep = export_onnx(model, path, x)
    assert [r.onnx_weight for r in rep.rows] == ["int4", "int4"] and all(r.per_axis for r in rep.rows)
    with torch.no_grad():
        ref = model(x)
    got = _plain_session(path, {"input": x})[0]
    assert _rel(got, ref) <= 1e-5


class _IdsModel(nn.Module):
    """Integer token ids in, a module called twice (shared weights), keyword arguments, a dict out."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(16, 30)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        h = self.emb(input_ids)
        h = torch.tanh(self.block(h))
        h = torch.tanh(self.block(h))  # called twice
        if attention_mask is not None:
            h = h * attention_mask[..., None].to(h.dtype)
        return {"logits": self.head(h), "hidden": h}


def test_integer_ids_keyword_inputs_and_module_called_twice(tmp_path: Path) -> None:
    """Defect 5a/5b: example inputs of any dtype (tensor, tuple, kwargs); a module called twice at
    opset 21 (its DequantizeLinear written twice) used to fail "3 INT4 weights written, 2 planned"."""
    torch.manual_seed(0)
    model = lowbit.quantize(_IdsModel(), {
        "default": {"weight": {"method": "twn", "bits": 2},
                    "activation": {"method": "lsq", "bits": 4, "signed": True}},
    })
    ids = torch.randint(0, 30, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.int64)
    model.train()
    with torch.no_grad():
        model(ids)  # data initialisation of the activation steps
    model.eval()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
    for how, call in [
        ("tensor", dict(input_shape=ids)),
        ("tuple", dict(input_shape=(ids, mask))),
        ("kwargs", dict(kwargs={"input_ids": ids, "attention_mask": mask})),
    ]:
        path = tmp_path / f"{how}.onnx"
        rep = export_onnx(model, path, opset=21, **call)
        assert [r.onnx_weight for r in rep.rows] == ["int4", "int4"]
        assert all(r.onnx_activation == "int8 Q/DQ" for r in rep.rows)
        names = [i.name for i in onnx.load(str(path)).graph.input]
        feed = {"tensor": {"input": ids}, "tuple": {"input_0": ids, "input_1": mask},
                "kwargs": {"input_ids": ids, "attention_mask": mask}}[how]
        assert names == list(feed)
        logits, hidden = _plain_session(path, feed)
        assert _rel(logits, ref["logits"]) <= 1e-4 and _rel(hidden, ref["hidden"]) <= 1e-4
        assert (logits.argmax(-1) == ref["logits"].numpy().argmax(-1)).all()
    # the block's weight: two DequantizeLinear nodes of INT4 codes (one per call), the head's one
    assert _onnx_weight_types(tmp_path / "kwargs.onnx").count(onnx.TensorProto.INT4) == 3


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():  # stands for an op the TorchScript exporter has no symbolic for
            raise RuntimeError("unsupported operator aten::something")
        return self.fc(x)


def test_untraceable_model_clear_error(tmp_path: Path) -> None:
    from lowbit.export.onnx_export import OnnxExportError

    model = lowbit.quantize(_Untraceable(), {"default": {"weight": {"method": "binary", "bits": 1}}})
    with pytest.raises(OnnxExportError, match="TorchScript ONNX exporter cannot trace _Untraceable") as info:
        export_onnx(model, tmp_path / "u.onnx", torch.randn(2, 4))
    assert "aten::something" in str(info.value) and "dynamo" in str(info.value)
    assert not (tmp_path / "u.onnx").exists()
    with pytest.raises(ValueError, match="example inputs"):
        export_onnx(model, tmp_path / "u.onnx", "1x4")  # type: ignore[arg-type]


class _Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.rnn(x)[0])


def test_lstm_right_after_a_training_step(tmp_path: Path) -> None:
    """An LSTM's cached flat weights hold non-leaf tensors after a training step (deepcopy refused
    them); its quantized weights are listed, as float constants of the ONNX LSTM."""
    torch.manual_seed(0)
    recipe = {"default": {"weight": {"method": "twn", "bits": 2},
                          "activation": {"method": "lsq", "bits": 4, "signed": True}}}
    model = lowbit.quantize(_Tagger(), recipe)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    model.train()
    model(x).square().mean().backward()  # a training step's forward/backward, then straight to export
    model.eval()
    rep = export_onnx(model, tmp_path / "l.onnx", x)
    rows = {r.name: r for r in rep.rows}
    assert list(rows) == ["rnn", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "fc"]
    assert rows["rnn.weight_hh_l0"].w_method == "twn" and rows["rnn.weight_hh_l0"].widened
    assert rows["fc"].onnx_weight == "int4"
    with torch.no_grad():
        ref = model(x)
    got = _plain_session(tmp_path / "l.onnx", {"input": x})[0]
    assert _rel(got, ref) <= 1e-5
