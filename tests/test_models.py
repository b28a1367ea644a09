"""Tests of lowbit.models: shapes, parameter counts, MACs, specs, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import lowbit.search  # noqa: F401  (registers the searched zoo model qdarts_cellnet, whatever ran before)
from lowbit.models import (
    MODELS,
    build_from_spec,
    build_model,
    count_params,
    layer_table,
    list_models,
)

# name -> (kwargs, input shape without batch, number of outputs)
CASES = {
    "mlp": ({}, (1, 28, 28), 10),
    "lenet5": ({}, (1, 28, 28), 10),
    "lenet5_avg": ({}, (1, 28, 28), 10),
    "hsi_cnn3d": ({}, (30, 11, 11), 16),
    "releq_lenet": ({}, (1, 28, 28), 10),
    "releq_simplenet": ({}, (3, 32, 32), 10),
    "svhn_cnn": ({}, (3, 32, 32), 10),
    "dorefa_svhn": ({}, (3, 40, 40), 10),
    "resnet20": ({}, (3, 32, 32), 10),
    "resnet32": ({}, (3, 32, 32), 10),
    "resnet44": ({"shortcut": "B"}, (3, 32, 32), 10),
    "resnet56": ({}, (3, 32, 32), 10),
    "resnet18": ({"cifar_stem": True, "num_classes": 100}, (3, 32, 32), 100),
    "vgg_small": ({}, (3, 32, 32), 10),
    "vgg11": ({}, (3, 32, 32), 10),
    "mobilenet_tiny": ({}, (3, 32, 32), 10),
    "qdarts_cellnet": ({"ops": ["conv3x3", "sep3x3", "conv5x5", "skip", "dil3x3"], "channels": 8},
                       (3, 32, 32), 10),
}

# other input sizes the models promise to handle
EXTRA_CASES = [
    ("lenet5", {"input_size": 32, "in_channels": 3}, (3, 32, 32)),
    ("dorefa_svhn", {}, (3, 32, 32)),
    ("svhn_cnn", {"input_size": 40}, (3, 40, 40)),
    ("mobilenet_tiny", {"in_channels": 1}, (1, 28, 28)),
    ("mlp", {"bn": True, "hidden": [64, 32, 16]}, (784,)),
    ("releq_simplenet", {"bn": True}, (3, 32, 32)),
    ("resnet18", {"width_mult": 0.125, "num_classes": 7}, (3, 64, 64)),
]


def test_every_registered_model_has_a_case():
    assert set(CASES) == set(list_models()) == set(MODELS)
    for entry in MODELS.values():
        assert entry.description and "\n" not in entry.description


@pytest.mark.parametrize("name", list(CASES))
def test_forward_shape(name):
    kwargs, shape, n_out = CASES[name]
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    y = model(torch.randn(2, *shape))
    assert y.shape == (2, n_out)
    assert torch.isfinite(y).all()
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, n_out)


@pytest.mark.parametrize(("name", "kwargs", "shape"), EXTRA_CASES)
def test_forward_other_inputs(name, kwargs, shape):
    model = build_model(name, **kwargs)
    n_out = kwargs.get("num_classes", 10)
    assert model(torch.randn(2, *shape)).shape == (2, n_out)


def test_backward_reaches_every_parameter():
    model = build_model("resnet20", width_mult=0.25)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_common_attributes_and_readable_names():
    for name, (kwargs, _, n_out) in CASES.items():
        model = build_model(name, **kwargs)
        assert model.num_classes == n_out
        assert model.width_mult == 1.0
        assert hasattr(model, "in_features" if name == "mlp" else "in_channels")
    names = dict(build_model("resnet20").named_modules())
    for n in ("conv1", "bn1", "layer1.0.conv1", "layer1.0.relu1", "layer1.0.relu2", "layer3.2.conv2", "fc"):
        assert n in names
    names = dict(build_model("lenet5").named_modules())
    for n in ("conv1", "bn1", "relu1", "pool1", "conv2", "fc1", "fc2", "fc3"):
        assert n in names
    assert isinstance(names["relu1"], nn.ReLU)


def test_relu_modules_are_distinct_instances():
    for name in list_models():
        model = build_model(name)
        relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        assert relus, name
        assert len({id(m) for m in relus}) == len(relus), name


def test_lenet5_structure_order():
    model = build_model("lenet5")
    kinds = [type(m).__name__ for m in model.children()]
    assert kinds == [
        "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
        "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
        "Flatten",
        "Linear", "BatchNorm1d", "ReLU",
        "Linear", "BatchNorm1d", "ReLU",
        "Linear",
    ]  # fmt: skip


def _lenet5_params(in_ch, c1, c2, f1, f2, k, bn, flat):
    """Hand formula: conv/fc weights (+ bias if no BN) + 2 BN parameters per channel."""
    extra = 2 if bn else 1  # BN weight+bias replaces the layer bias
    return (
        in_ch * c1 * 25 + extra * c1
        + c1 * c2 * 25 + extra * c2
        + c2 * flat * f1 + extra * f1
        + f1 * f2 + extra * f2
        + f2 * k + k
    )  # fmt: skip


def test_lenet5_param_count_formula():
    assert count_params(build_model("lenet5")) == _lenet5_params(1, 6, 16, 120, 84, 10, True, 25)
    assert count_params(build_model("lenet5")) == 61932
    assert count_params(build_model("lenet5", bn=False)) == 61706  # the classic LeNet-5
    assert count_params(build_model("lenet5", bn=False)) == _lenet5_params(1, 6, 16, 120, 84, 10, False, 25)
    m = build_model("lenet5", in_channels=3, input_size=32, width_mult=2.0, num_classes=7)
    assert count_params(m) == _lenet5_params(3, 12, 32, 240, 168, 7, True, 36)


def test_resnet_param_counts():
    # He et al. 2016 table 6: 0.27M, 0.46M, 0.66M, 0.85M (option A, no shortcut params)
    expected = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586,
                "resnet56": 853_018}  # fmt: skip
    for name, n in expected.items():
        assert count_params(build_model(name)) == n
    # option B adds 1x1 conv + BN projections at the two stage transitions
    b = count_params(build_model("resnet20", shortcut="B"))
    assert b == 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    # torchvision resnet18
    assert count_params(build_model("resnet18")) == 11_689_512


@pytest.mark.parametrize("name", ["resnet20", "vgg_small", "lenet5", "mobilenet_tiny"])
def test_width_mult_scales_params_about_quadratically(name):
    p1 = count_params(build_model(name))
    p2 = count_params(build_model(name, width_mult=2.0))
    ratio = p2 / p1
    low = 2.5 if name in ("lenet5", "mobilenet_tiny") else 3.8  # input/output layers scale ~2x
    assert low < ratio <= 4.0, ratio


def test_width_mult_channels_rounded_and_at_least_one():
    m = build_model("resnet20", width_mult=0.5)
    assert m.conv1.out_channels == 8 and m.fc.in_features == 32
    m = build_model("resnet20", width_mult=0.01)
    assert m.conv1.out_channels == 1 and m.layer3[0].conv1.out_channels == 1
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    m = build_model("vgg11", width_mult=1.3)
    assert m.conv1.out_channels == 83  # 64 * 1.3 = 83.2
    assert m.fc.in_features == 666  # 512 * 1.3 = 665.6


def test_option_a_shortcut_is_parameter_free_zero_padding():
    m = build_model("resnet20")
    block = m.layer2[0]
    assert sum(p.numel() for p in block.downsample.parameters()) == 0
    x = torch.randn(2, 16, 8, 8)
    y = block.downsample(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert (y[:, :8] == 0).all() and (y[:, 24:] == 0).all()
    assert m.layer1[0].downsample is None


def _by_name(table):
    return {r.name: r for r in table}


def test_macs_closed_forms_conv_linear_depthwise():
    t = _by_name(layer_table(build_model("mobilenet_tiny"), (3, 32, 32)))
    # dense 3x3 conv, 3 -> 32, 32x32 output
    assert t["conv1"].macs == 32 * 32 * 32 * 3 * 9
    # depthwise 3x3 conv, 64 channels, stride 2: 16x16 output, one input channel per filter
    dw = t["block2.dw"]
    assert dw.groups == 64 and dw.weight_shape == (64, 1, 3, 3)
    assert dw.macs == 64 * 16 * 16 * 9 and dw.params == 64 * 9
    # pointwise 1x1 conv 64 -> 128 on 16x16
    assert t["block2.pw"].macs == 128 * 16 * 16 * 64
    # linear 256 -> 10
    assert t["fc"].macs == 256 * 10 and t["fc"].params == 256 * 10 + 10
    assert t["fc"].type == "Linear" and t["conv1"].type == "Conv2d"

    t = _by_name(layer_table(build_model("lenet5"), (1, 28, 28)))
    assert t["conv1"].macs == 6 * 28 * 28 * 25
    assert t["conv2"].macs == 16 * 10 * 10 * 6 * 25
    assert t["fc1"].macs == 400 * 120 and t["fc1"].input_shape == (400,)
    assert t["fc3"].macs == 84 * 10
    assert list(t) == ["conv1", "conv2", "fc1", "fc2", "fc3"]


def test_macs_grouped_conv_and_odd_layers():
    model = nn.Sequential(
        nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4),  # grouped: 2 in-channels/filter
        nn.ConvTranspose2d(12, 6, 2, stride=2),
        nn.Conv1d(6, 4, 1),  # never called: macs 0
    )

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model[:2]
            self.unused = model[2]
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            y = self.body(x)  # (B, 6, 10, 10)
            return self.head(y[..., :5])  # linear on a 4-D tensor: (B, 6, 10, 3)

    t = _by_name(layer_table(Wrap(), (8, 10, 10)))
    assert t["body.0"].macs == 12 * 5 * 5 * (8 // 4) * 9
    assert t["body.1"].macs == (12 * 5 * 5) * 6 * 4  # input elements x out/groups x k
    assert t["unused"].calls == 0 and t["unused"].macs == 0
    assert t["head"].macs == 6 * 10 * 3 * 5


def test_layer_table_totals_and_restores_mode():
    model = build_model("resnet20")
    model.train()
    model.layer1.eval()  # mixed flags must survive
    bn = model.bn1
    before = bn.running_mean.clone()
    table = layer_table(model, (3, 32, 32))
    assert model.training and not model.layer1.training and model.layer2.training
    assert torch.equal(bn.running_mean, before)  # eval probe: no BN statistics update
    assert sum(r.params for r in table) == count_params(model) - sum(
        m.weight.numel() * 2 for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )
    assert sum(r.macs for r in table) == 40_551_040  # ~41M MACs per CIFAR image
    assert json.dumps([r.as_dict() for r in table])
    # batch size does not change the per-sample numbers
    assert layer_table(model, (3, 32, 32), batch_size=3) == table


def test_layer_table_parametrized_weight_not_evaluated():
    from torch.nn.utils import parametrize

    calls = []

    class Sign(nn.Module):
        def forward(self, w):
            calls.append(1)
            return torch.sign(w)

    model = build_model("lenet5")
    parametrize.register_parametrization(model.conv2, "weight", Sign())
    calls.clear()
    t = _by_name(layer_table(model, (1, 28, 28)))
    assert t["conv2"].type == "Conv2d" and t["conv2"].weight_shape == (16, 6, 5, 5)
    assert len(calls) == 1  # only the probe forward, not the table


@pytest.mark.parametrize("name", list(CASES))
def test_spec_round_trip(name):
    kwargs, _, _ = CASES[name]
    kwargs = {**kwargs, "width_mult": 0.5}
    model = build_model(name, **kwargs)
    spec = json.loads(json.dumps(model.lowbit_spec))
    assert spec["name"] == name
    assert spec["kwargs"]["width_mult"] == 0.5
    for rebuilt in (build_model(**spec), build_from_spec(spec)):
        a, b = model.state_dict(), rebuilt.state_dict()
        assert list(a) == list(b)
        assert all(a[k].shape == b[k].shape for k in a)
        assert rebuilt.lowbit_spec == spec


def test_spec_records_defaults_and_lists():
    m = build_model("mlp", hidden=(32, 16))
    assert m.lowbit_spec == {
        "name": "mlp",
        "kwargs": {"num_classes": 10, "in_features": 784, "width_mult": 1.0,
                   "hidden": [32, 16], "bn": False},
    }  # fmt: skip


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="resnet20") as exc:
        build_model("resnet21")
    for name in list_models():
        assert name in str(exc.value)


def test_bad_kwarg_lists_parameters():
    with pytest.raises(ValueError, match="widht_mult") as exc:
        build_model("resnet20", widht_mult=2.0)
    for p in ("num_classes", "in_channels", "width_mult", "shortcut"):
        assert p in str(exc.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("resnet20", {"shortcut": "C"}, r"\['A', 'B'\]"),
        ("resnet20", {"width_mult": 0}, "width_mult"),
        ("lenet5", {"num_classes": 0}, "num_classes"),
        ("lenet5", {"input_size": 8}, "too small"),
        ("vgg_small", {"input_size": [4, 4]}, "too small"),
        ("mlp", {"hidden": [0]}, "hidden"),
        ("svhn_cnn", {"dropout": 1.0}, "dropout"),
        ("lenet5", {"input_size": "28"}, "input_size"),
        ("mlp", {"hidden": object()}, "hidden"),
    ],
)
def test_bad_values_raise_value_error(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, **kwargs)


def test_bad_spec():
    with pytest.raises(ValueError, match="name"):
        build_from_spec({"kwargs": {}})
    with pytest.raises(ValueError, match="allowed"):
        build_from_spec({"name": "lenet5", "kwargs": {"depth": 3}})


def test_shortcut_case_insensitive_normalised():
    m = build_model("resnet20", shortcut="b")
    assert m.shortcut == "B"
    assert isinstance(m.layer2[0].downsample, nn.Sequential)


def test_register_model_rebuilds_user_model():
    from lowbit.models import register_model

    @register_model("_test_tiny", "a one-layer test model")
    def tiny(num_classes: int = 3, in_features: int = 4, width_mult: float = 1.0) -> nn.Module:
        return nn.Linear(in_features, num_classes)

    try:
        m = build_model("_test_tiny", num_classes=5)
        assert m.lowbit_spec == {
            "name": "_test_tiny",
            "kwargs": {"num_classes": 5, "in_features": 4, "width_mult": 1.0},
        }
        assert build_from_spec(m.lowbit_spec).weight.shape == (5, 4)
        with pytest.raises(ValueError, match="already registered"):
            register_model("_test_tiny", "again")(tiny)
    finally:
        MODELS.pop("_test_tiny", None)
