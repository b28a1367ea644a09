"""The spiking-friendly zoo models ``lenet5_avg`` and ``hsi_cnn3d``: shapes, MACs of the 3-D
convolutions against their closed form, conversion to a spiking twin, quantization by a recipe,
bad arguments, and ``lowbit train`` on a hyperspectral scene (missing files: a clear error)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _snn_twin import saved_twin_accuracy
from torch import nn

import lowbit
from lowbit.data.hyperspectral import write_scene
from lowbit.models import build_model, count_params, layer_table
from lowbit.nn.quantize import input_quantizer, weight_quantizer
from lowbit.snn import HSICNN3d, LeNet5Avg, convert

pytestmark = pytest.mark.usefixtures("one_thread")

W4A4 = {"default": {"weight": {"method": "uniform", "bits": 4}, "activation": {"method": "pact", "bits": 4}}}


def test_lenet5_avg_is_lenet5_with_average_pools() -> None:
    torch.manual_seed(0)
    m = build_model("lenet5_avg")
    assert isinstance(m, LeNet5Avg) and m.lowbit_spec["name"] == "lenet5_avg"
    assert isinstance(m.pool1, nn.AvgPool2d) and isinstance(m.pool2, nn.AvgPool2d)
    assert count_params(m) == count_params(build_model("lenet5")) == 61932
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    c = build_model("lenet5_avg", in_channels=3, input_size=32, num_classes=7)
    assert c(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    # average pools are linear: pool1's output is the 2x2 mean of relu1's
    x = torch.randn(1, 1, 28, 28)
    m.eval()
    with torch.no_grad():
        r = m.relu1(m.bn1(m.conv1(x)))
        assert torch.allclose(m.pool1(r), r.unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2)))


def test_hsi_cnn3d_shapes_and_macs_closed_form() -> None:
    torch.manual_seed(0)
    m = build_model("hsi_cnn3d")  # 30 bands (Indian Pines after PCA), 11x11 patches, 16 classes
    assert isinstance(m, HSICNN3d) and m(torch.randn(2, 30, 11, 11)).shape == (2, 16)
    t = {r.name: r for r in layer_table(m, (30, 11, 11))}
    # conv3d_i: out channels x out depth x out h x out w x (in channels x kd x 3 x 3)
    assert t["conv3d_1"].macs == 8 * 24 * 9 * 9 * (1 * 7 * 9)
    assert t["conv3d_2"].macs == 16 * 20 * 7 * 7 * (8 * 5 * 9)
    assert t["conv3d_3"].macs == 32 * 18 * 5 * 5 * (16 * 3 * 9)
    assert t["conv2d"].macs == 64 * 3 * 3 * (32 * 18 * 9)  # 18 bands folded into 32 x 18 channels
    assert t["fc1"].macs == 576 * 256
    flat = build_model("hsi_cnn3d", hybrid=False, in_channels=15, input_size=9, num_classes=9, width_mult=0.5)
    assert flat(torch.randn(3, 15, 9, 9)).shape == (3, 9) and flat.conv3d_3.out_channels == 16
    assert "conv2d" not in dict(flat.named_children())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"in_channels": 12}, "too few"),
    ({"input_size": 8}, "too small"),
    ({"channels3d": [8, 16]}, "channels3d"),
    ({"hidden": [0]}, "hidden"),
    ({"channels2d": 0}, "channels2d"),
    ({"width_mult": 0}, "width_mult"),
])
def test_hsi_cnn3d_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_model("hsi_cnn3d", **kwargs)


@pytest.mark.parametrize(("name", "kwargs", "shape"), [
    ("lenet5_avg", {}, (1, 28, 28)),
    ("hsi_cnn3d", {"in_channels": 16, "input_size": 9, "channels3d": [2, 2, 4], "channels2d": 8,
                   "hidden": [16]}, (16, 9, 9)),
])
def test_zoo_models_convert_and_quantize(name, kwargs, shape) -> None:
    torch.manual_seed(0)
    cnn = build_model(name, **kwargs).eval()
    x = torch.rand(8, *shape)
    with torch.no_grad():
        ref = cnn(x)
        snn = convert(cnn, 64, [x])
        out = snn(x)
    assert out.shape == ref.shape
    # 64 steps of the rate code track the CNN's logits (percentile thresholds clip a little)
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.9
    lowbit.quantize(snn, lowbit.load_recipe("snn-w6"))
    first = "conv3d_1" if name == "hsi_cnn3d" else "conv1"
    assert weight_quantizer(getattr(snn, first)).bits == 6
    q = lowbit.quantize(build_model(name, **kwargs), W4A4)
    assert weight_quantizer(getattr(q, first)).bits == 4 and input_quantizer(getattr(q, first)).bits == 4
    assert q(x).shape == ref.shape


def test_lowbit_train_hsi_cnn3d(tmp_path, capsys) -> None:
    from lowbit.cli import main

    args = ["train", "--model", "hsi_cnn3d", "--data", "indian_pines", "--epochs", "1", "--val-size", "0"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*args, "--data-dir", str(empty), "--out", str(tmp_path / "none")]) == 2
    err = " ".join(capsys.readouterr().out.split())  # the CLI prints errors with rich on stdout
    assert "dataset 'indian_pines' not found" in err and "Indian_pines_corrected.mat" in err
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (12, 12)).astype(np.uint8)
    cube = rng.normal(size=(4, 16))[gt] * 3 + 0.3 * rng.normal(size=(12, 12, 16))
    write_scene(tmp_path / "hsi", "indian_pines", (1000 + 100 * cube).astype(np.uint16), gt)
    out = tmp_path / "run"
    assert main([*args, "--data-dir", str(tmp_path / "hsi"), "--out", str(out), "--batch-size", "32",
                 "--model-arg", "hidden=[32]"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_spec"]["name"] == "hsi_cnn3d" and cfg["model_spec"]["kwargs"]["in_channels"] == 16
    assert cfg["model_spec"]["kwargs"]["input_size"] == 11 and cfg["dataset"]["in_shape"] == [16, 11, 11]
    # the zoo model's run converts into its 6-bit spiking twin from the command line
    snn = tmp_path / "snn"
    assert main(["snn", "convert", str(out), "--out", str(snn), "--timesteps", "2", "--val", "4"]) == 0
    res = json.loads((snn / "snn.json").read_text())
    assert res["recipe"]["name"] == "snn-w6"
    assert res["test_acc"] == saved_twin_accuracy(out, snn / "snn.safetensors", 2)
    assert res["energy"]["lif"][0]["layer"] == "lif3d_1" and res["energy"]["snn_sops"] > 0
