"""Channel ordering for width supernets: the float function is unchanged, groups are sorted by the
importance of the weights that produce them, option-A shortcuts keep their copied channels at one
offset in every width, a model the permutation would change is refused and left as it was, and an
ordered supernet round-trips through its file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit.runtime
from lowbit.models import build_model
from lowbit.models.resnet import PadShortcut
from lowbit.nn.channel_order import order_channels
from lowbit.nn.supernet import Supernet, SupernetError
from lowbit.serve import load_supernet, save_supernet

pytestmark = pytest.mark.usefixtures("one_thread")


def _resnet(**kw: object) -> nn.Module:
    """ResNet-20 with BatchNorm statistics moved away from their initial values."""
    torch.manual_seed(0)
    m = build_model("resnet20", **kw)
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(16, 3, 16, 16))
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


def _importance(convs: list[nn.Conv2d]) -> torch.Tensor:
    imp = torch.zeros(convs[0].out_channels, dtype=torch.float64)
    for c in convs:
        n = c.weight.detach().double().reshape(c.out_channels, -1).abs().sum(1)
        imp += n / n.mean()
    return imp


@pytest.mark.parametrize("kw", [{}, {"shortcut": "B"}])
def test_ordering_keeps_the_float_function_and_sorts_by_importance(kw: dict) -> None:
    m = _resnet(**kw)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
        stem_before = m.conv1.weight.clone()
        order_channels(m, (3, 16, 16))
        got = m(x)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(m.conv1.weight, stem_before)  # something did move
    # stage 1's residual group: the stem and every block's second conv produce it, sorted descending
    imp = _importance([m.conv1] + [b.conv2 for b in m.layer1])
    assert torch.all(imp[:-1] >= imp[1:])
    # a block's inner group has one producer: its first conv
    inner = _importance([m.layer2[1].conv1])
    assert torch.all(inner[:-1] >= inner[1:])


@pytest.mark.parametrize(("name", "shape"), [("mobilenet_tiny", (3, 16, 16)), ("lenet5", (1, 28, 28))])
def test_depthwise_blocks_and_a_linear_after_a_flatten_keep_the_function(name: str, shape: tuple) -> None:
    torch.manual_seed(0)
    m = build_model(name).eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        ref = m(x)
        perms = order_channels(m, shape)
        assert torch.allclose(m(x), ref, rtol=1e-5, atol=1e-6)
    assert perms and any(p != sorted(p) for p in perms.values())


def test_option_a_shortcut_keeps_its_copied_channels_at_one_offset() -> None:
    m = _resnet()
    with torch.no_grad():
        order_channels(m, (3, 16, 16))
        pad = m.layer2[0].downsample
        assert isinstance(pad, PadShortcut) and pad.front == 8  # (32 - 16) // 2, now explicit
        stage2 = _importance([m.layer2[0].conv2, m.layer2[1].conv2, m.layer2[2].conv2])
    # the channels around the copied block are sorted among themselves, the best ones in front
    free = torch.cat([stage2[:8], stage2[24:]])
    assert torch.all(free[:-1] >= free[1:])
    sn = Supernet(m, [{"name": f"w{r}", "width": r} for r in (0.25, 0.5, 1.0)], (3, 16, 16))
    fronts = {n: sn.sliced(n).layer2[0].downsample.front for n in sn.names}
    # halving keeps the copied channels where the full width has them; a quarter has no room for that
    assert fronts == {"w0.25": 4, "w0.5": 8, "w1.0": 8}


def test_first_layout_puts_the_copied_channels_in_front() -> None:
    m = _resnet()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
        order_channels(m, (3, 16, 16), shortcut="first")
        assert torch.allclose(m(x), ref, rtol=1e-5, atol=1e-5)
    assert m.layer2[0].downsample.front == 0 and m.layer3[0].downsample.front == 0
    with pytest.raises(SupernetError, match="'keep' or 'first'"):
        order_channels(m, (3, 16, 16), shortcut="middle")


class _Rolls(nn.Module):
    """Mixes channels (a roll) where the channel groups cannot see it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.roll(self.a(x), 1, dims=1))


def test_a_permutation_that_would_change_the_model_is_refused_and_undone() -> None:
    torch.manual_seed(0)
    m = _Rolls()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(SupernetError, match="changed the model's output"):
        order_channels(m, (3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_ordered_supernet_round_trips_through_both_file_forms(tmp_path) -> None:
    subnets = [{"name": "w0.5-b4", "width": 0.5, "bits": 4}, {"name": "w1.0-b8", "width": 1.0, "bits": 8}]
    m = _resnet(width_mult=0.5)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        float_ref = m(x)
    sn = Supernet(m, [*subnets, {"name": "float", "width": 1.0}], (3, 16, 16), order="l1").eval()
    assert sn.spec()["order"] == "l1"
    with torch.no_grad():
        assert torch.allclose(sn.run(x, "float"), float_ref, rtol=1e-5, atol=1e-5)
    save_supernet(sn, tmp_path / "v1.supernet", codes=False)
    save_supernet(sn, tmp_path / "v2.supernet")
    back = load_supernet(tmp_path / "v1.supernet")
    loaded = load_supernet(tmp_path / "v2.supernet")
    assert back.model.layer2[0].downsample.base.front == 4  # the layout is rebuilt, not the default
    for n in sn.names:
        with torch.inference_mode():
            assert torch.equal(back.run(x, n), sn.run(x, n)), n
            assert torch.equal(loaded.run(x, n), sn.run(x, n)), n
        if n != "float":
            got = lowbit.runtime.compile(loaded.models[n], x)(x)
            assert torch.equal(got, lowbit.runtime.compile(sn.extract(n), x)(x)), n
    with pytest.raises(SupernetError, match="order="):
        Supernet(_resnet(), subnets, (3, 16, 16), order="l2")
