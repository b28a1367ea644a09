"""Device placement without a GPU.

The ``meta`` device stands in for a GPU: a tensor created on the CPU (a factory call without
``device=``) that meets a meta tensor raises, just as a CPU tensor meeting a CUDA tensor does.
What this catches: every op of a forward/backward that can run without reading values. What it
cannot: code that reads tensor values in Python (``.item()``, ``bool(t)``: LSQ, TGA, TTQ and
multipoint weights, every activation quantizer), which meta refuses to run; those are listed in
``VALUE_DEPENDENT`` and checked to fail for that reason only, not for a device mismatch. The
GPU benchmark script (benchmarks/gpu/bench_gpu.py) runs the rest on CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.data import Augment, BatchLoader
from lowbit.nn import quantize
from lowbit.quant import registry as R
from lowbit.quant.base import Quantizer
from lowbit.quant.mixed import expected_bits
from lowbit.train import TrainConfig, Trainer

VALUE_DEPENDENT = {("weight", "lsq"), ("weight", "multipoint"), ("weight", "tga"), ("weight", "ttq"),
                   ("activation", "bcgd"), ("activation", "dorefa"), ("activation", "lsq"),
                   ("activation", "pact"), ("activation", "uniform")}
META_REFUSES = ("cannot be called on meta tensors", "data-dependent", "meta tensor")


def _quantizers() -> list[tuple[str, str]]:
    return [(kind, name) for kind in ("weight", "activation") for name in R.names(kind)]


def _make(kind: str, name: str) -> Quantizer:
    cls = R.get(kind, name)
    bits = next((b for b in (4, 2) if b in cls.bits_allowed), cls.bits_allowed[0])
    return R.create(kind, name, bits)


@pytest.mark.parametrize(("kind", "name"), _quantizers())
def test_quantizer_forward_backward_stays_on_the_device(kind, name):
    q = _make(kind, name).to("meta")
    shape = (8, 4, 3, 3) if kind == "weight" else (4, 4, 5, 5)
    x = torch.randn(shape, device="meta", requires_grad=True)
    try:
        y = q(x)
        y.float().sum().backward()
    except (RuntimeError, NotImplementedError) as e:
        msg = str(e)
        assert (kind, name) in VALUE_DEPENDENT, f"{kind} {name} on meta: {msg}"
        assert any(s in msg for s in META_REFUSES), f"{kind} {name}: not a value read: {msg}"
        return
    assert (kind, name) not in VALUE_DEPENDENT, f"{kind} {name} now runs on meta: drop it from the list"
    assert y.device.type == "meta" and y.shape == x.shape
    assert x.grad is not None and x.grad.device.type == "meta"
    for p in q.parameters():
        assert p.grad is None or p.grad.device.type == "meta"


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10))


@pytest.mark.parametrize(("method", "bits"), [("binary", 1), ("dorefa", 4), ("twn", 2), ("mixed", 4),
                                              ("uniform", 4)])
def test_training_step_on_the_device(method, bits):
    """A quantized model moved to the device trains a step there: forward, loss, backward,
    optimizer update, and the mixed-precision bits penalty (a CPU tensor there was a bug)."""
    model = quantize(_net(), {"default": {"weight": {"method": method, "bits": bits}}})
    model.to("meta")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(2, 1, 8, 8, device="meta")
    y = torch.zeros(2, dtype=torch.int64, device="meta")
    loss = F.cross_entropy(model(x), y)
    if method == "mixed":
        loss = loss + 0.01 * expected_bits(model)
    loss.backward()
    opt.step()
    assert all(p.device.type == "meta" for p in model.parameters())
    states = [opt.state[p]["exp_avg"] for p in model.parameters() if p.grad is not None]
    assert states and all(t.device.type == "meta" for t in states)


def test_loader_cuts_and_augments_batches_on_its_device():
    x = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(10) % 3
    cpu = BatchLoader(x, y, batch_size=4, shuffle=True, seed=1, mean=(0.5,) * 3, std=(0.25,) * 3,
                      augment=Augment(pad=2, flip=True))
    dev = cpu.replace().to("meta")
    batches = list(dev)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert all(b[0].device.type == "meta" and b[1].device.type == "meta" for b in batches)
    assert all(b[0].dtype == torch.float32 for b in batches)
    rest, held = cpu.holdout(3)  # carved on the CPU (it reads the labels), then moved
    assert held.to("meta").device.type == "meta" and rest.num_samples == 7


def test_bf16_autocast_keeps_quantizers_in_fp32(one_thread):
    torch.manual_seed(0)
    recipe = {"default": {"weight": {"method": "dorefa", "bits": 2},
                          "activation": {"method": "lsq", "bits": 4}}}
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    model = quantize(net, recipe)
    seen: dict[str, list[torch.dtype]] = {"quant": [], "linear": []}
    for m in model.modules():
        if isinstance(m, Quantizer) and m.kind == "activation":
            m.register_forward_hook(lambda mod, a, out: seen["quant"].append(a[0].dtype))
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, a, out: seen["linear"].append(out.dtype))
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(96, 6, generator=g)
    ys = (xs[:, 0] > 0).long() + (xs[:, 1] > 0).long()
    loader = BatchLoader(xs, ys, batch_size=32, shuffle=True)
    cfg = TrainConfig(epochs=4, optimizer="adam", lr=1e-2, precision="bf16", tensorboard=False, log_every=1)
    hist = Trainer(model, loader, None, cfg).fit()
    assert seen["quant"] and set(seen["quant"]) == {torch.float32}  # quantizer math in fp32
    assert torch.bfloat16 in seen["linear"]  # while the matmuls ran in bf16
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]


def test_channels_last_conv_net_trains(one_thread):
    torch.manual_seed(0)
    model = quantize(_net(), {"default": {"weight": {"method": "binary", "bits": 1}}})
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 10, (32,))
    cfg = TrainConfig(epochs=2, optimizer="adam", lr=1e-2, channels_last=True, tensorboard=False)
    hist = Trainer(model, BatchLoader(x, y, batch_size=16), None, cfg).fit()
    # the second convolution's latent weight (4 input channels: with 1, any layout counts as both)
    w = model[2].parametrizations.weight.original
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert all(math.isfinite(h["train_loss"]) for h in hist) and len(hist) == 2


def test_sync_bn_refuses_cpu_processes():
    cfg = TrainConfig(epochs=1, sync_bn=True)
    assert cfg.sync_bn  # accepted in one process (no effect there)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(epochs=1, precision="fp16")


# ------------------------------------------------------------------ on a real GPU (skipped here)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize(("kind", "name"), _quantizers())
def test_cuda_quantizer_matches_cpu(kind, name):
    """The torch formulas on CUDA give the numbers of the CPU path (numba kernels there)."""
    torch.manual_seed(0)
    q_cpu = _make(kind, name)
    shape = (8, 4, 3, 3) if kind == "weight" else (4, 4, 5, 5)
    x = torch.randn(shape)
    q_cpu.train()
    q_gpu = _make(kind, name).cuda()
    q_gpu.load_state_dict(q_cpu.state_dict())
    outs = []
    for q, dev in ((q_cpu, "cpu"), (q_gpu, "cuda")):
        xi = x.to(dev).requires_grad_(True)
        y = q(xi)
        (y * torch.linspace(-1, 1, y.numel(), device=dev).reshape(y.shape)).sum().backward()
        outs.append((y.detach().cpu(), xi.grad.cpu()))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-4)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-4)


@cuda
def test_cuda_train_run_end_to_end(tmp_path):
    from lowbit.experiment import RunSpec, train_run

    res = train_run(RunSpec(model="lenet5", dataset="mnist", recipe="lenet5-w1a4", train_subset=2048,
                            train={"epochs": 1, "precision": "bf16", "channels_last": True},
                            device="cuda", out=str(tmp_path / "run")))
    assert res.device.startswith("cuda") and res.test_acc > 0.3
    assert (tmp_path / "run" / "model.lowbit").exists()


@cuda
def test_cuda_ptq_and_mixed_bits_on_the_gpu():
    from lowbit.ptq.multipoint import allocate_points

    model = quantize(_net(), {"default": {"weight": {"method": "mixed", "bits": 4}}}).cuda()
    assert expected_bits(model).device.type == "cuda"
    mp = quantize(_net(), {"default": {"weight": {"method": "multipoint", "bits": 4, "points": 2}}}).cuda()
    rows = allocate_points(mp, [torch.randn(4, 1, 8, 8)], budget=1.5)
    assert rows
