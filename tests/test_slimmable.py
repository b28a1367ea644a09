"""Slimmable supernets: the widest is the network itself, a width equals the explicitly sliced
sub-net, BatchNorm is per width, quantized weights slice exactly, and sandwich training trains
every width."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.models import build_model
from lowbit.nn.quantize import input_quantizer
from lowbit.nn.slimmable import SlimmableChain
from lowbit.train import TrainConfig, Trainer
from lowbit.train.sandwich import SandwichLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def _lenet() -> nn.Sequential:
    torch.manual_seed(0)
    m = build_model("lenet5")
    m.train()
    with torch.no_grad():
        m(torch.randn(32, 1, 28, 28))  # non-trivial BN statistics
    return m.eval()


def test_widest_is_the_network_and_widths_are_sliced_subnets() -> None:
    net = _lenet()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = net(x)
    s = SlimmableChain(net, widths=(0.5, 1.0)).eval()
    with torch.no_grad():
        assert torch.equal(s(x), ref)
    assert s.active_channels(0.5) == {"conv1": 3, "conv2": 8, "fc1": 60, "fc2": 42, "fc3": 10}
    s.set_width(0.5)
    sub = s.extract(0.5).eval()
    assert sub.conv1.weight.shape == (3, 1, 5, 5) and sub.fc1.weight.shape == (60, 8 * 5 * 5)
    # flatten is channel-major: fc1's columns are the first 8 channels' 25 positions each
    assert torch.equal(sub.fc1.weight, net.fc1.weight[:60, :200])
    with torch.no_grad():
        torch.testing.assert_close(s(x), sub(x))
    with pytest.raises(ValueError, match="not one of"):
        s.set_width(0.3)


def test_batchnorm_is_per_width() -> None:
    s = SlimmableChain(_lenet(), widths=(0.25, 0.5, 1.0))
    s.train()
    before = s.net.bn2.running_mean.clone()
    s.set_width(0.25)
    s(torch.randn(8, 1, 28, 28) + 3)
    assert torch.equal(s.net.bn2.running_mean, before)  # the widest's statistics did not move
    assert not torch.equal(s.bns["bn2"][0].running_mean, before[:4])
    assert s.bns["bn2"][0].num_features == 4 and s.bns["bn2"][1].num_features == 8


def test_quantized_supernet_slices_the_quantized_weight() -> None:
    net = _lenet()
    lowbit.quantize(net, {"default": {"weight": {"method": "binary", "bits": 1, "per_channel": True},
                                      "activation": {"method": "pact", "bits": 4}},
                          "rules": [{"match": "@first", "activation": None}]})
    s = SlimmableChain(net, widths=(0.5, 1.0)).eval()
    s.set_width(0.5)
    x = torch.rand(4, 1, 28, 28)
    # reference: the sliced sub-net with the same quantized weights and the same input quantizers
    sub = s.extract(0.5).eval()
    with torch.no_grad():
        for name in ("conv2", "fc1", "fc2", "fc3"):
            c_out, c_in = getattr(sub, name).weight.shape[:2]
            getattr(sub, name).weight.copy_(getattr(net, name).weight[:c_out, :c_in])
        sub.conv1.weight.copy_(net.conv1.weight[:3])
        for name in ("conv2", "fc1", "fc2", "fc3"):
            iq = copy.deepcopy(input_quantizer(getattr(net, name)))
            getattr(sub, name).register_forward_pre_hook(lambda mod, args, iq=iq: (iq(args[0]),))
        torch.testing.assert_close(s(x), sub(x))
    with pytest.raises(ValueError, match="grouped convolution"):
        SlimmableChain(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1)))


def test_sandwich_training_trains_every_width() -> None:
    """Sandwich training against training the widest alone: the narrow sub-nets become usable."""
    torch.manual_seed(0)
    x = torch.randn(512, 1, 28, 28)
    y = (x[:, 0, :14].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :14].mean((1, 2)) > 0).long()
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    accs = {}
    for mode in ("sandwich", "widest"):
        torch.manual_seed(0)
        s = SlimmableChain(build_model("lenet5"), widths=(0.25, 0.5, 0.75, 1.0))
        loss = SandwichLoss(n_random=1) if mode == "sandwich" else None
        if loss is not None:
            assert loss.widths(s)[:2] == [1.0, 0.25] and len(loss.widths(s)) == 3
        cfg = TrainConfig(epochs=6, optimizer="adam", lr=3e-3, seed=0, tensorboard=False)
        Trainer(s, loader, None, cfg, loss_fn=loss).fit()
        s.eval()
        accs[mode] = []
        for r in s.widths:
            s.set_width(r)
            with torch.no_grad():
                accs[mode].append(float((s(x).argmax(1) == y).double().mean()))
    assert accs["sandwich"][-1] > 0.95 and accs["widest"][-1] > 0.95
    for sw, wd in zip(accs["sandwich"][:-1], accs["widest"][:-1], strict=True):
        assert sw > wd + 0.2, accs  # chance: 0.25
