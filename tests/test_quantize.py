"""quantize(model, recipe) on models it was not written for, and recipe validation."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn import QuantizeError, UnmatchedRuleWarning, input_quantizer, weight_quantizer

W1A4 = {
    "default": {
        "weight": {"method": "binary", "bits": 1},
        "activation": {"method": "pact", "bits": 4, "alpha_init": 3.0},
    },
    "rules": [{"match": "@first", "activation": None}],
}


class Mixer(nn.Module):
    """A user module holding a raw weight and using it with a functional op."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class SeparableNet(nn.Module):
    """Depthwise-separable CNN with functional ReLUs and a custom weight-holding module."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.grouped = nn.Conv1d(16, 16, 3, padding=1, groups=4)
        self.mix = Mixer(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.dw(x))
        x = F.relu(self.pw(x))
        x = F.max_pool2d(x, 2).flatten(2)  # (N, 16, L)
        x = F.relu(self.grouped(x)).mean(-1)
        x = F.relu(self.mix(x))
        return self.head(x)


def _toy_data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0).long()
    return x, y


def test_quantize_foreign_model_trains_and_stays_on_grid(one_thread: None) -> None:
    torch.manual_seed(0)
    model = lowbit.quantize(SeparableNet(), W1A4)
    layers = lowbit.quantized_layers(model)
    assert set(layers) == {"stem", "dw", "pw", "grouped", "mix", "head"}
    assert input_quantizer(model.stem) is None and input_quantizer(model.mix) is not None
    x, y = _toy_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for name, layer in layers.items():
        w = layer.weight  # the quantized weight that forward uses
        alpha = layer.parametrizations.weight.original.detach().abs().mean()
        assert w.unique().numel() <= 2, name
        assert torch.allclose(w.abs(), alpha.expand_as(w)), name
    # The PACT quantizers of the inputs also learned (their alpha moved).
    assert any(abs(float(m.input_quantizer.alpha.detach()) - 3.0) > 1e-4 for m in layers.values()
               if input_quantizer(m) is not None)


def test_functional_activations_are_quantized_on_layer_inputs() -> None:
    model = lowbit.quantize(SeparableNet(), W1A4)
    seen = {}

    def grab(mod, args):  # record what the layer really receives
        seen[mod] = args[0].detach()

    for layer in (model.pw, model.mix, model.head):
        layer.register_forward_pre_hook(grab)  # runs after the quantizing hook
    model(torch.randn(2, 1, 8, 8))
    assert set(seen) == {model.pw, model.mix, model.head}
    for layer, inp in seen.items():
        step = float(layer.input_quantizer.alpha.detach()) / 15
        codes = inp / step
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert inp.unique().numel() <= 16


def test_quantize_twice_is_an_error_and_deepcopy_works() -> None:
    model = lowbit.quantize(SeparableNet(), W1A4)
    with pytest.raises(QuantizeError, match="already quantized"):
        lowbit.quantize(model, W1A4)
    clone = copy.deepcopy(model)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(clone(x), model(x))
    with torch.no_grad():  # the clone's hooks use the clone's own quantizers
        clone.head.input_quantizer.alpha.fill_(0.5)
    assert not torch.equal(clone(x), model(x))


def test_rules_first_last_and_globs() -> None:
    recipe = {
        "default": {"weight": {"method": "dorefa", "bits": 4}},
        "rules": [
            {"match": ["@first", "@last"], "weight": None},
            {"match": "p*", "weight": {"method": "twn", "bits": 2, "per_channel": True}},
        ],
    }
    model = lowbit.quantize(SeparableNet(), recipe)
    assert weight_quantizer(model.stem) is None and weight_quantizer(model.head) is None
    assert weight_quantizer(model.pw).name == "twn" and weight_quantizer(model.pw).per_channel
    assert weight_quantizer(model.dw).name == "dorefa" and weight_quantizer(model.dw).bits == 4
    assert set(lowbit.quantized_layers(model)) == {"dw", "pw", "grouped", "mix"}
    assert model.lowbit_recipe["rules"][1]["match"] == "p*"


def test_unmatched_rule_is_reported() -> None:
    recipe = {"default": {"weight": {"method": "binary", "bits": 1}}, "rules": [{"match": "conv9"}]}
    with pytest.warns(UnmatchedRuleWarning, match="conv9"):
        lowbit.quantize(SeparableNet(), recipe)
    with pytest.raises(lowbit.RecipeError, match="conv9"):
        lowbit.quantize(SeparableNet(), recipe, strict=True)


@pytest.mark.parametrize(
    ("raw", "field", "hint"),
    [
        ({"default": {"weight": {"method": "ternary9", "bits": 2}}}, "default.weight.method", "binary"),
        ({"default": {"weight": {"method": "dorefa", "bits": 9}}}, "default.weight.bits", "[1, 2"),
        ({"default": {"weight": {"method": "dorefa", "bits": 2.5}}}, "default.weight.bits", "[1, 2"),
        ({"default": {"activation": {"method": "pact", "bits": 4, "alpha": 2}}},
         "default.activation.alpha", "alpha_init"),
        ({"default": {"activation": {"method": "pact", "bits": 4, "alpha_init": -2}}},
         "default.activation", "alpha_init"),
        ({"defualt": {}}, "defualt", "default"),
        ({"rules": [{"match": "x", "wieght": None}]}, "rules[0].wieght", "weight"),
        ({"rules": [{"weight": None}]}, "rules[0].match", "glob"),
        ({"default": {"weight": "binary"}}, "default.weight", "mapping"),
        ({"default": {"activation": {"method": "dorefa", "bits": 2, "ste": "tanh"}}},
         "default.activation", "clipped_relu"),
    ],
)
def test_recipe_errors_name_field_value_and_allowed(raw: dict, field: str, hint: str) -> None:
    with pytest.raises(lowbit.RecipeError) as e:
        lowbit.Recipe.from_dict(raw)
    assert field in str(e.value) and hint in str(e.value)


def test_recipe_yaml_round_trip(tmp_path) -> None:
    r = lowbit.Recipe.from_dict({**W1A4, "name": "w1a4", "train": {"epochs": 3}})
    p = tmp_path / "r.yaml"
    p.write_text(r.to_yaml())
    r2 = lowbit.Recipe.from_yaml(p)
    assert r2.to_dict() == r.to_dict()
    assert r2.plan("anything", first="stem", last="head").weight.method == "binary"
    assert r2.plan("stem", first="stem", last="head").activation is None
    with pytest.raises(lowbit.RecipeError, match="does not exist"):
        lowbit.Recipe.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("default: [unclosed")
    with pytest.raises(lowbit.RecipeError, match="YAML"):
        lowbit.Recipe.from_yaml(tmp_path / "bad.yaml")


def test_model_without_weights_is_refused() -> None:
    with pytest.raises(QuantizeError, match="nothing to quantize"):
        lowbit.quantize(nn.Sequential(nn.ReLU()), W1A4)


def test_no_warning_for_matching_rules() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        model = lowbit.quantize(SeparableNet(), W1A4)
    # silent because the rule matched: '@first' took the stem's input quantizer, the rest have one
    assert set(lowbit.quantized_layers(model)) == {"stem", "dw", "pw", "grouped", "mix", "head"}
    assert [n for n, m in lowbit.quantized_layers(model).items() if input_quantizer(m) is None] == ["stem"]


# ---- issue 8: models users bring ---------------------------------------------------------------
from lowbit.nn import SkippedQuantizationWarning, weight_quantizers  # noqa: E402
from lowbit.quant import registry  # noqa: E402
from lowbit.quant.base import WeightQuantizer  # noqa: E402
from lowbit.recipe import TRAINING_METHODS, RecipeError  # noqa: E402

BINARY_W = {"default": {"weight": {"method": "binary", "bits": 1}}}


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_rnn_weights_are_quantized_and_used(cls: type[nn.RNNBase]) -> None:
    torch.manual_seed(0)
    rnn = cls(5, 4, num_layers=2, bidirectional=True, batch_first=True)
    ref = copy.deepcopy(rnn)
    lowbit.quantize(rnn, BINARY_W, strict=True)
    names = [f"weight_{k}_l{i}{r}" for i in range(2) for r in ("", "_reverse") for k in ("ih", "hh")]
    assert sorted(weight_quantizers(rnn)) == sorted(names)
    x = torch.randn(3, 6, 5)
    # The same RNN with its weights replaced by the quantized values, by hand.
    with torch.no_grad():
        for n in names:
            w = getattr(rnn, n)
            assert w.abs().unique().numel() == 1  # binary: one magnitude per tensor
            getattr(ref, n).copy_(w)
    torch.testing.assert_close(rnn(x)[0], ref(x)[0], rtol=0, atol=0)
    # A change of the latent weight reaches forward (the cached _flat_weights are not stale).
    with torch.no_grad():
        rnn.parametrizations.weight_hh_l1.original.mul_(3)
        assert not torch.equal(rnn(x)[0], ref(x)[0])
        ref.weight_hh_l1.copy_(rnn.weight_hh_l1)
    torch.testing.assert_close(rnn(x)[0], ref(x)[0], rtol=0, atol=0)
    rnn(x)[0].sum().backward()
    assert rnn.parametrizations.weight_hh_l0.original.grad.abs().sum() > 0
    # After a training forward the model still deep-copies (an EMA or best-model copy) and the
    # copy computes the same outputs.
    rnn(x)[0].sum()
    twin = copy.deepcopy(rnn)
    torch.testing.assert_close(twin(x)[0], rnn(x)[0], rtol=0, atol=0)


def test_recipe_addresses_rnn_weights_by_name() -> None:
    model = nn.Sequential()
    model.add_module("rnn", nn.LSTM(4, 3))
    recipe = {"default": {"weight": {"method": "binary", "bits": 1}},
              "rules": [{"match": "rnn.weight_hh_l0", "weight": {"method": "twn", "bits": 2}},
                        {"match": "rnn.weight_ih*", "weight": None}]}
    lowbit.quantize(model, recipe, strict=True)
    wq = weight_quantizers(model)
    assert list(wq) == ["rnn.weight_hh_l0"]
    assert wq["rnn.weight_hh_l0"][1] == "weight_hh_l0" and wq["rnn.weight_hh_l0"][2].name == "twn"


class _Attn(nn.Module):
    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.attn(q, kv, kv, need_weights=False)[0]


def test_multihead_attention_weights_and_inputs() -> None:
    torch.manual_seed(0)
    m = _Attn()
    ref = copy.deepcopy(m)
    recipe = {"default": {"weight": {"method": "binary", "bits": 1},
                          "activation": {"method": "uniform", "bits": 4, "signed": True, "clip": 2.0}}}
    with pytest.warns(SkippedQuantizationWarning, match="out_proj"):
        lowbit.quantize(m, recipe)
    assert sorted(weight_quantizers(m)) == ["attn.in_proj_weight", "attn.out_proj.weight"]
    assert input_quantizer(m.attn.out_proj) is None  # never run, so never attached nor reported
    x = torch.randn(2, 5, 8)
    out = m(x, x)
    # By hand: quantized q = k = v (one tensor), quantized in_proj and out_proj weights.
    aq = input_quantizer(m.attn)
    with torch.no_grad():
        ref.attn.in_proj_weight.copy_(m.attn.in_proj_weight)
        ref.attn.out_proj.weight.copy_(m.attn.out_proj.weight)
        xq = aq(x)
        assert (xq < 0).any()  # signed grid: negative inputs survive
        torch.testing.assert_close(out, ref(xq, xq), rtol=0, atol=0)
    # strict refuses what cannot be done
    with pytest.raises(QuantizeError, match="out_proj"):
        lowbit.quantize(_Attn(), recipe, strict=True)
    # inputs only: out_proj is not reported as quantized
    acts = lowbit.quantize(_Attn(), {"default": {"activation": recipe["default"]["activation"]},
                                     "rules": [{"match": "attn.out_proj", "activation": None}]}, strict=True)
    assert list(lowbit.quantized_layers(acts)) == ["attn"]


def test_multihead_attention_separate_projections() -> None:
    m = _Attn(kdim=6)
    lowbit.quantize(m, {"default": {"weight": {"method": "twn", "bits": 2}}}, strict=True)
    assert sorted(weight_quantizers(m)) == ["attn.k_proj_weight", "attn.out_proj.weight",
                                            "attn.q_proj_weight", "attn.v_proj_weight"]
    out = m(torch.randn(2, 3, 8), torch.randn(2, 4, 6))
    assert out.shape == (2, 3, 8)


def test_quantizing_nothing_warns_and_strict_raises() -> None:
    recipe = {"default": {"weight": None, "activation": None}}
    with pytest.warns(SkippedQuantizationWarning, match="none of the model"):
        lowbit.quantize(nn.Sequential(nn.Linear(3, 3)), recipe)
    with pytest.raises(QuantizeError, match="none of the model"):
        lowbit.quantize(nn.Sequential(nn.Linear(3, 3)), recipe, strict=True)
    # a recipe of training methods alone (WaveQ learning the bits of a float model) asks for no quantizer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = lowbit.quantize(nn.Sequential(nn.Linear(3, 3)), {**recipe, "methods": [{"name": "waveq"}]},
                            strict=True)
    assert not weight_quantizers(m) and m.lowbit_recipe["methods"] == [{"name": "waveq"}]


def test_weight_quantizers_names_every_quantized_parameter() -> None:
    m = SeparableNet()
    lowbit.quantize(m, {"default": {"weight": {"method": "binary", "bits": 1}},
                        "rules": [{"match": "dw", "weight": None}]})
    wq = weight_quantizers(m)
    assert list(wq) == ["stem.weight", "pw.weight", "grouped.weight", "mix.weight", "head.weight"]
    for key, (mod, pname, q) in wq.items():
        assert q is weight_quantizer(mod, pname) and key.endswith("." + pname)


# per-channel axis -------------------------------------------------------------------------------
PER_CHANNEL_METHODS = [("binary", 1), ("twn", 2), ("ternary_stat", 2), ("tga", 2), ("lbw", 2), ("lbw", 4),
                       ("lsq", 4), ("uniform", 4), ("dorefa", 1)]


@pytest.mark.parametrize("method,bits", PER_CHANNEL_METHODS)
def test_per_channel_along_axis_1_is_the_transpose_of_axis_0(method: str, bits: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 5) * torch.linspace(0.1, 2, 5)  # columns (axis 1) of very different scales
    q1 = registry.create("weight", method, bits, per_channel=True)
    q0 = registry.create("weight", method, bits, per_channel=True)
    assert isinstance(q1, WeightQuantizer) and q1.channel_axis == 0
    q1.channel_axis = 1
    q1.initialize(w)
    q0.initialize(w.t().contiguous())
    out1, out0 = q1(w), q0(w.t().contiguous())
    torch.testing.assert_close(out1, out0.t(), rtol=1e-6, atol=1e-7)
    enc = q1.encode(w)
    assert torch.equal(enc.decode(), out1)  # bit for bit
    assert enc.scale.shape in ((1, 5), ())  # keepdim shape along channel_axis (dorefa-1: binary's)


def test_channel_axis_follows_the_layer_type_and_the_recipe() -> None:
    from lowbit.nn import default_channel_axis

    tr = pytest.importorskip("transformers.pytorch_utils")
    m = nn.Sequential(nn.Linear(4, 6), nn.ConvTranspose1d(6, 3, 3), nn.Conv1d(3, 2, 1))
    m.add_module("c1d", tr.Conv1D(7, 4))  # GPT-2's layer: weight stored in x out = (4, 7)
    assert [default_channel_axis(x) for x in m] == [0, 1, 0, 1]
    recipe = {"default": {"weight": {"method": "binary", "bits": 1, "per_channel": True}}}
    lowbit.quantize(m, recipe, strict=True)
    assert [weight_quantizer(x).channel_axis for x in m] == [0, 1, 0, 1]
    w = m.c1d.weight
    assert w.shape == (4, 7)
    for c in range(7):  # binary per output column: exactly one magnitude per column
        assert w[:, c].abs().unique().numel() == 1
    assert weight_quantizer(m.c1d).encode(m.c1d.parametrizations.weight.original).scale.shape == (1, 7)
    # explicit override
    m2 = nn.Sequential(tr.Conv1D(7, 4))
    lowbit.quantize(m2, {"default": {"weight": {**recipe["default"]["weight"], "channel_axis": 0}}})
    assert weight_quantizer(m2[0]).channel_axis == 0
    assert m2[0].weight.abs().unique().numel() == 4  # one magnitude per row now
    with pytest.raises(RecipeError, match="channel_axis"):
        lowbit.quantize(nn.Sequential(nn.Linear(3, 3)),
                        {"default": {"weight": {"method": "binary", "bits": 1, "channel_axis": 2}}})
    with pytest.raises(RecipeError, match="channel_axis"):
        lowbit.Recipe.from_dict({"default": {"weight": {"method": "binary", "bits": 1, "channel_axis": "x"}}})


# eval-mode cache --------------------------------------------------------------------------------
def test_eval_mode_caches_the_quantized_weight_until_something_changes() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    lowbit.quantize(m, {"default": {"weight": {"method": "lsq", "bits": 4}}})
    q = weight_quantizer(m[0])
    calls = []
    q.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(4, 6)
    m.eval()
    with torch.no_grad():
        y = m(x)
        assert torch.equal(m(x), y) and len(calls) == 1  # second call: cached
        m[0].parametrizations.weight.original.mul_(2)  # latent weight changed in place
        y2 = m(x)
        assert len(calls) == 2 and not torch.equal(y2, y)
        m(x)
        assert len(calls) == 2
        q.s.mul_(0.5)  # the quantizer's own parameter changed
        y3 = m(x)
        assert len(calls) == 3 and not torch.equal(y3, y2)
        m.load_state_dict(copy.deepcopy(m.state_dict()))  # copies in place: version bumps
        assert torch.equal(m(x), y3) and len(calls) == 4
    m(x)  # gradients on: never cached, so gradients stay exact
    assert len(calls) == 5
    m.train()
    assert q._cache is None
    with torch.no_grad():
        m(x)
        m(x)
    assert len(calls) == 7  # training mode: not cached


# methods validated at load ----------------------------------------------------------------------
def test_recipe_methods_are_validated_at_load() -> None:
    with pytest.raises(RecipeError, match=r"methods\[0\]\.name.*'bcgdd'.*bcgd") as e:
        lowbit.Recipe.from_dict({"methods": [{"name": "bcgdd"}]})
    assert "binary_relax" in str(e.value)
    with pytest.raises(RecipeError, match=r"methods\[1\]\.rhoo.*keys name, rho"):
        lowbit.Recipe.from_dict({"methods": [{"name": "pact_l2"}, {"name": "bcgd", "rhoo": 1e-5}]})
    r = lowbit.Recipe.from_dict({"methods": [{"name": "kd", "teacher": "runs/fp", "alpha": 0.5}]})
    assert r.methods[0]["alpha"] == 0.5


def test_training_method_table_matches_the_implementations() -> None:
    from lowbit.train import methods

    assert set(TRAINING_METHODS) == set(methods.METHODS)
    for name in methods.METHODS:
        assert TRAINING_METHODS[name] == tuple(methods._options(name))


def test_model_quantized_inside_inference_mode_runs_there() -> None:
    # Tensors made under inference_mode carry no version counter: the eval cache must step aside.
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    with torch.inference_mode():
        model = lowbit.quantize(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)),
                                {"default": {"weight": {"method": "twn", "bits": 2}}}).eval()
        y1, y2 = model(x), model(x)
    assert torch.equal(y1, y2)
    w = model[0].weight
    assert w.unique().numel() <= 3  # still ternary
