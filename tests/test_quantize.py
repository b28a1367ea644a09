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


def test_quantize_foreign_model_trains_and_stays_on_grid() -> None:
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
        warnings.simplefilter("error")
        lowbit.quantize(SeparableNet(), W1A4)
