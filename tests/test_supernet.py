"""Any-topology, any-precision supernets: a switched sub-net equals the extracted sub-net run alone
(bit for bit) on residual and depthwise models, channel groups follow residual adds, quantized
weights are cached, switching is atomic, costs match the export report, the file round-trips,
and sandwich training (with Delayed epsilon-Shrinking) trains every sub-net."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from lowbit.export.errors import FormatError
from lowbit.export.report import model_report
from lowbit.models import build_model
from lowbit.nn.supernet import Supernet, SupernetError
from lowbit.serve import load_supernet, save_supernet
from lowbit.train.sandwich import DelayedShrinking, SandwichLoss

pytestmark = pytest.mark.usefixtures("one_thread")

SUBNETS = [
    {"name": "small-b2", "width": 0.25, "bits": 2},
    {"name": "mixed", "width": {"layer1.*": 0.5, "layer3.*": 0.75, "block2.*": 0.5, "conv2": 0.5},
     "bits": [4, 8]},
    {"name": "half-b8", "width": 0.5, "bits": 8},
    {"name": "float", "width": 1.0},
]


def _supernet(name: str, shape: tuple[int, ...], **kw: object) -> Supernet:
    torch.manual_seed(0)
    sn = Supernet(build_model(name, **kw), SUBNETS, shape)
    sn.train()
    with torch.no_grad():  # distinct BatchNorm statistics and PACT levels per sub-net
        for i, n in enumerate(sn.names):
            sn.set_subnet(n)
            sn(torch.randn(8, *shape) + i)
    for m in sn.modules():
        if hasattr(m, "alpha"):
            with torch.no_grad():
                m.alpha.fill_(float(torch.rand(()) * 3 + 1))
    return sn.eval()


@pytest.mark.parametrize(("model", "shape", "kw"), [
    ("resnet20", (3, 16, 16), {}),
    ("resnet20", (3, 16, 16), {"shortcut": "B"}),
    ("mobilenet_tiny", (3, 16, 16), {}),
    ("lenet5", (1, 28, 28), {}),
])
def test_switched_subnet_equals_extracted_subnet_bit_for_bit(model: str, shape: tuple[int, ...],
                                                             kw: dict) -> None:
    sn = _supernet(model, shape, **kw)
    x = torch.randn(3, *shape)
    for n in sn.names:
        with torch.no_grad():
            y = sn.run(x, n)
            alone = sn.extract(n)(x)
        assert torch.equal(y, alone), n


def test_widest_float_subnet_is_the_float_model() -> None:
    torch.manual_seed(0)
    m = build_model("resnet20")
    m.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
        sn = Supernet(m, SUBNETS, (3, 16, 16)).eval()
        assert torch.equal(sn.run(x, "float"), ref)


def test_channel_groups_follow_residual_adds_and_depthwise_layers() -> None:
    sn = _supernet("resnet20", (3, 16, 16))
    sub = sn.extract("mixed")
    # stage 1 (16 ch) is tied to the stem by identity shortcuts: 0.5 -> 8 everywhere, stem included
    assert sub.conv1.weight.shape == (8, 3, 3, 3)
    assert sub.layer1[2].conv2.weight.shape == (8, 8, 3, 3)
    # stage 2 has no rule: full 32 channels; stage 3: round(0.75 * 64) = 48; the classes never shrink
    assert sub.layer2[0].conv1.weight.shape == (32, 8, 3, 3)
    assert sub.layer3[1].conv2.weight.shape == (48, 48, 3, 3)
    assert sub.fc.weight.shape == (10, 48)
    assert sub.layer2[0].downsample.out_channels == 32 and sub.layer2[0].downsample.in_channels == 8
    mb = _supernet("mobilenet_tiny", (3, 16, 16)).extract("mixed")
    # block2.pw at 0.5 of 128; block3.dw runs depthwise over those 64 channels
    assert mb.block2.pw.weight.shape == (64, 64, 1, 1)
    assert mb.block3.dw.weight.shape == (64, 1, 3, 3) and mb.block3.dw.groups == 64


def test_linear_after_flatten_is_sliced_channel_major() -> None:
    sn = _supernet("lenet5", (1, 28, 28))
    sub = sn.extract("half-b8")
    latent = sn.model.fc1.base.weight
    assert sub.fc1.parametrizations.weight.original.shape == (60, 8 * 25)
    expect = latent.view(120, 16, 25)[:60, :8].reshape(60, 200)
    assert torch.equal(sub.fc1.parametrizations.weight.original, expect)


def test_quantized_weights_are_cached_in_eval_and_dropped_in_training() -> None:
    sn = _supernet("lenet5", (1, 28, 28)).prepare()
    calls = []
    for m in sn.modules():
        if m.__class__.__name__ == "DoReFaWeight":
            m.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        for n in sn.names * 2:
            sn.run(x, n)
    assert calls == []  # switching never re-quantizes
    sn.train()
    sn.set_subnet("small-b2")
    sn(x)
    assert len(calls) == 3  # conv2, fc1, fc2 (first and last layers stay float)


def test_concurrent_runs_never_see_a_half_switched_model() -> None:
    sn = _supernet("lenet5", (1, 28, 28)).prepare()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = {n: sn.run(x, n) for n in sn.names}
    bad: list[str] = []

    def worker(k: int) -> None:
        with torch.no_grad():
            for i in range(30):
                n = sn.names[(i + k) % len(sn.names)]
                if not torch.equal(sn.run(x, n), ref[n]):
                    bad.append(n)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert bad == []


def test_a_switch_during_forward_waits_for_the_call_to_end() -> None:
    """forward from one thread, set_subnet from another while the call is between two layers: the
    switch waits, and the call computes one sub-net from its first layer to its last."""
    sn = _supernet("lenet5", (1, 28, 28)).prepare()
    x = torch.randn(4, 1, 28, 28)
    a, b = sn.names[0], sn.names[2]
    with torch.no_grad():
        ref = sn.run(x, a)
    sn.set_subnet(a)
    inside, release = threading.Event(), threading.Event()

    def pause(*_: object) -> None:  # after the first layer: the moment a switch would mix sub-nets
        inside.set()
        release.wait(10)

    hook = sn.model.conv1.register_forward_hook(pause)
    out: list[torch.Tensor] = []
    with torch.no_grad():
        call = threading.Thread(target=lambda: out.append(sn(x)))
        call.start()
        assert inside.wait(10)
        switch = threading.Thread(target=sn.set_subnet, args=(b,))
        switch.start()
        switch.join(0.3)
        assert switch.is_alive()  # it waits for the call
        release.set()
        call.join(10)
        switch.join(10)
    hook.remove()
    assert torch.equal(out[0], ref) and sn.subnet == b


def test_costs_match_the_export_report_of_the_extracted_subnet() -> None:
    sn = _supernet("lenet5", (1, 28, 28))
    for n in sn.names[:-1]:  # the float sub-net is a plain float model (nothing to pack)
        rep = model_report(sn.extract(n), (1, 28, 28))
        assert sn.cost(n)["bops"] == rep.total_bops, n
        assert sn.cost(n)["macs"] == rep.total_macs, n
    # LeNet-5 at width 0.25: conv1 2x(28x28)x25, conv2 4x(10x10)x(2x25), fc1 30x100, fc2 21x30, fc3 10x21
    macs = 2 * 784 * 25 + 4 * 100 * 50 + 30 * 100 + 21 * 30 + 10 * 21
    assert sn.cost("small-b2")["macs"] == macs
    assert sn.choices[0] == "small-b2" and sn.choices[-1] == "float"


def test_file_round_trip_and_bad_files(tmp_path) -> None:
    sn = _supernet("resnet20", (3, 16, 16))
    sn.info["half-b8"] = {"val_acc": 0.5}
    f = tmp_path / "r.supernet"
    save_supernet(sn, f)
    back = load_supernet(f)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for n in sn.names:
            assert torch.equal(back.run(x, n), sn.run(x, n))
    assert back.info["half-b8"] == {"val_acc": 0.5}
    data = f.read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"data_offsets|header"):
        load_supernet(tmp_path / "cut")
    with pytest.raises(FormatError, match="does not exist"):
        load_supernet(tmp_path / "nope")


@pytest.mark.parametrize(("subnets", "match"), [
    ([{"name": "a", "width": 1.5}], "fraction in"),
    ([{"name": "a", "bits": 9}], "integer 1..8"),
    ([{"name": "a"}, {"name": "a"}], "unique names"),
    ([{"name": "a", "depth": 2}], "unknown keys"),
])
def test_bad_subnet_specs_are_clear_errors(subnets: list, match: str) -> None:
    with pytest.raises(SupernetError, match=match):
        Supernet(build_model("lenet5"), subnets, (1, 28, 28))


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).mean((2, 3)))


def test_unsupported_models_are_clear_errors() -> None:
    with pytest.raises(SupernetError, match="concatenat"):
        Supernet(_Cat(), [{"name": "a"}], (1, 8, 8))
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(SupernetError, match="grouped convolution"):
        Supernet(grouped, [{"name": "a"}], (4, 8, 8))


def test_delayed_shrinking_admits_smaller_subnets_later() -> None:
    s = DelayedShrinking(100, warmup=0.25)  # n = 4: eps = 0.75 / 6 = 0.125
    assert [s.admitted(4, k) for k in (0, 24, 25, 37, 38, 50, 99)] == [1, 1, 2, 2, 3, 4, 4]
    sn = _supernet("lenet5", (1, 28, 28))
    loss = SandwichLoss(n_random=1, schedule=DelayedShrinking(10, warmup=0.5))
    assert loss.widths(sn) == ["float"]  # warmup: the largest alone
    loss.step = 5
    assert loss.widths(sn) == ["float", "mixed"]  # then the next size step


def test_sandwich_training_lowers_every_subnets_loss() -> None:
    torch.manual_seed(0)
    sn = Supernet(build_model("lenet5"), SUBNETS, (1, 28, 28))
    x, y = torch.randn(24, 1, 28, 28), torch.randint(0, 10, (24,))
    opt = torch.optim.Adam(sn.parameters(), 5e-3)
    loss_fn = SandwichLoss(n_random=1, seed=0)

    def losses() -> list[float]:
        sn.eval()
        with torch.no_grad():
            out = [float(nn.functional.cross_entropy(sn.run(x, n), y)) for n in sn.names]
        sn.train()
        return out

    before = losses()
    for _ in range(8):
        loss, _ = loss_fn(sn, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = losses()
    assert all(a < 0.7 * b for a, b in zip(after, before, strict=True)), (before, after)
    assert sn.subnet == "float"  # left at the largest


def test_sandwich_loss_resumes_with_the_same_schedule_and_draws() -> None:
    class Switchable:  # the sandwich rule needs only choices and set_choice
        choices = tuple(f"s{i}" for i in range(6))
        training = True

    class AtStep:
        def __init__(self, step: int) -> None:
            self.global_step = step

    def epoch(loss: SandwichLoss, start: int, steps: int) -> list[list[str]]:
        loss.on_epoch_start(AtStep(start), 0)
        picks = []
        for _ in range(steps):
            picks.append(loss.widths(Switchable()))
            loss.step += 1  # what a training call does
        return picks

    sched = DelayedShrinking(total_steps=40, warmup=0.25)
    whole = SandwichLoss(n_random=2, seed=3, schedule=sched)
    first, second = epoch(whole, 0, 20), epoch(whole, 20, 20)
    resumed = SandwichLoss(n_random=2, seed=3, schedule=sched)  # a fresh process at epoch 2
    assert epoch(resumed, 20, 20) == second
    assert len(first[0]) == 1 and len(second[-1]) == 4  # the schedule followed the global step
    assert len({tuple(p) for p in second}) > 1  # the random middle sub-nets do vary
