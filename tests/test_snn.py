"""lowbit.snn: the LIF recursion, its surrogate gradient, BN folding, CNN -> SNN conversion, spike and
energy accounting, the quantized twin's training, the Conv3d hyperspectral path and its loader."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from _snn_twin import saved_twin_accuracy
from torch import nn

import lowbit
from lowbit.data import DatasetFormatError, DatasetNotFoundError, load_dataset
from lowbit.data.hyperspectral import extract_patches, split_pixels, write_scene
from lowbit.nn.quantize import quantizable_layers
from lowbit.snn import (
    FP32_45NM,
    LIF,
    ConversionError,
    HSICNN3d,
    LeNet5Avg,
    convert,
    fold_bn,
    lif_step,
    spike,
    spike_energy,
    surrogate_grad,
)
from lowbit.snn.energy import synaptic_events

W6 = {"default": {"weight": {"method": "uniform", "bits": 6}}}


def small_cnn() -> nn.Sequential:
    """conv1 -> bn1 -> relu1 -> pool1 -> flatten -> fc1 -> relu2 -> fc2 on 1x8x8, non-trivial BN."""
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 4, 3, padding=1, bias=False), bn1=nn.BatchNorm2d(4), relu1=nn.ReLU(),
        pool1=nn.AvgPool2d(2), flatten=nn.Flatten(), fc1=nn.Linear(64, 16), relu2=nn.ReLU(),
        fc2=nn.Linear(16, 5)))
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.2, 0.2)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
        net.bn1.bias.uniform_(-0.1, 0.3)
    return net.eval()


# ---------------------------------------------------------------------------- the neuron
def test_lif_recursion_matches_hand_computed_sequence():
    # leak 0.5, threshold 1, soft reset: u = 0.5 u + I; spike iff u > 1; u -= 1 on a spike
    lif = LIF(threshold=1.0, leak=0.5)
    currents = [0.6, 0.6, 0.6, 0.0, 1.5, 1.0]
    u, spikes, mems = None, [], []
    for c in currents:
        s, u = lif(torch.tensor([c]), u)
        spikes.append(s.item())
        mems.append(u.item())
    # u: 0.6 | 0.9 | 1.05 -> spike -> 0.05 | 0.025 | 1.5125 -> spike -> 0.5125 | 1.25625 -> spike -> 0.25625
    assert spikes == [0, 0, 1, 0, 1, 1]
    assert mems == pytest.approx([0.6, 0.9, 0.05, 0.025, 0.5125, 0.25625], abs=1e-6)
    # strictly above threshold: u == th does not fire; the spike carries the threshold as amplitude
    s, u = LIF(threshold=2.0, leak=1.0)(torch.tensor([2.0, 2.5]))
    assert s.tolist() == [0.0, 2.0] and u.tolist() == pytest.approx([2.0, 0.5])


def test_surrogate_gradient_is_its_definition():
    z = torch.tensor([-2.0, -1.0, -0.75, -0.1, 0.0, 0.3, 1.0, 1.7], requires_grad=True)
    for gamma in (0.3, 1.0):
        z.grad = None
        o = spike(z, gamma)
        assert o.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
        o.sum().backward()
        expect = [gamma * max(0.0, 1 - abs(v)) for v in z.detach().tolist()]
        assert z.grad.tolist() == pytest.approx(expect)
        assert surrogate_grad(z.detach(), gamma).tolist() == pytest.approx(expect)


def test_threshold_and_leak_gradients_through_time():
    """Two steps, no spike at step 1: u2 = lam I1 + I2, o2 = H(u2 / th - 1)."""
    g = 0.3
    i1, i2 = 0.4, 0.5
    lam = torch.tensor(0.8, requires_grad=True)
    th = torch.tensor(0.9, requires_grad=True)
    o1, u = lif_step(None, torch.tensor(i1), lam, th, g)
    o2, _ = lif_step(u, torch.tensor(i2), lam, th, g)
    assert o1.item() == 0 and o2.item() == 0  # u2 = 0.82 < 0.9
    o2.backward()
    u2 = 0.8 * i1 + i2
    d = g * max(0.0, 1 - abs(u2 / 0.9 - 1))
    assert lam.grad.item() == pytest.approx(d * i1 / 0.9, rel=1e-5)
    assert th.grad.item() == pytest.approx(d * -u2 / 0.9**2, rel=1e-5)
    # through a spike's reset (spike held constant there) and the amplitude s = th * o
    th2 = torch.tensor(0.5, requires_grad=True)
    lif = LIF()
    o, u = lif_step(None, torch.tensor(0.7), 1.0, th2, g)  # fires: z = 0.4, u -> 0.2
    assert o.item() == 1 and u.item() == pytest.approx(0.2)
    u.backward()
    assert th2.grad.item() == pytest.approx(-1.0)
    assert isinstance(lif.leak, nn.Parameter) and lif.leak.requires_grad and lif.threshold.requires_grad


def test_lif_rejects_bad_settings():
    with pytest.raises(ValueError, match="threshold must be > 0"):
        LIF(threshold=0.0)
    with pytest.raises(ValueError, match="leak must be in"):
        LIF(leak=1.5)


# ---------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("kind", ["conv2d", "conv3d", "linear", "conv_nobias"])
def test_bn_folding_is_exact(kind, one_thread):
    torch.manual_seed(1)
    layer, bn, x = {
        "conv2d": (nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), torch.randn(4, 3, 6, 6)),
        "conv3d": (nn.Conv3d(2, 4, (3, 3, 3)), nn.BatchNorm3d(4), torch.randn(3, 2, 5, 5, 5)),
        "linear": (nn.Linear(7, 6), nn.BatchNorm1d(6), torch.randn(9, 7)),
        "conv_nobias": (nn.Conv2d(2, 3, 3, groups=1, bias=False), nn.BatchNorm2d(3), torch.randn(2, 2, 5, 5)),
    }[kind]
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    folded = fold_bn(layer, bn)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(layer(x)), atol=1e-5, rtol=1e-5)
    assert layer.bias is None or folded.bias is not layer.bias  # the original is untouched


def test_converted_rates_approach_cnn_activations(one_thread):
    """Threshold = max activation (percentile 100), leak 1, soft reset: the first layer's rate
    times its threshold is within th / T of the CNN's ReLU output (the IF bound: 0 <= t I - th N_t
    <= th), and the logits converge to the CNN's as T grows."""
    cnn = small_cnn()
    x = torch.randn(16, 1, 8, 8)
    snn = convert(cnn, 1, [x], percentile=100)
    with torch.no_grad():
        a1 = torch.relu(cnn.bn1(cnn.conv1(x)))
        assert snn.lif1.threshold.item() == pytest.approx(a1.max().item(), rel=1e-6)
        th = snn.lif1.threshold.item()
        errors = {}
        for T in (16, 128, 1024):
            out = []
            h = snn.lif1.register_forward_hook(lambda _m, _a, o, out=out: out.append(o[0]))
            logits = snn.set_timesteps(T)(x)
            h.remove()
            rate = torch.stack(out).mean(0) / th
            assert (rate * th - a1).abs().max().item() <= th / T + 1e-5
            ref = cnn(x)
            errors[T] = ((logits - ref).norm() / ref.norm()).item()
    # relative logit error, measured 0.074, 0.010, 0.0012: about 1.2 / T; bounds leave a factor of 2
    assert errors[1024] < errors[128] < errors[16]
    assert errors[16] < 0.15 and errors[128] < 0.02 and errors[1024] < 2.5e-3


def test_convert_keeps_names_and_rejects_what_it_cannot_convert():
    snn = convert(LeNet5Avg(), 3)
    names = [n for n, _ in snn.plan]
    assert names == ["conv1", "lif1", "pool1", "conv2", "lif2", "pool2", "flatten", "fc1", "lif3", "fc2",
                     "lif4", "fc3"]
    assert list(quantizable_layers(snn)) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    from lowbit.models import build_model

    assert convert(build_model("lenet5").eval(), 2)(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # max pools
    features = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    nested = nn.Sequential(OrderedDict(features=features, head=nn.Linear(4, 2)))
    assert [n for n, _ in convert(nested, 2).plan] == ["features_0", "features_1_lif", "head"]
    with pytest.raises(ConversionError, match=r"nn\.Sequential.*ResNet"):
        convert(build_model("resnet20", width_mult=0.25), 4)
    with pytest.raises(ConversionError, match=r"'1' \(Sigmoid\).*allowed"):
        convert(nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)), 4)
    with pytest.raises(ConversionError, match="without a ReLU"):
        convert(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), 4)
    with pytest.raises(ConversionError, match="ends with a ReLU"):
        convert(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), 4)
    with pytest.raises(ConversionError, match="no ReLU"):
        convert(nn.Sequential(nn.Linear(3, 4)), 4)
    with pytest.raises(ConversionError, match="already"):
        convert(lowbit.quantize(small_cnn(), W6), 4)
    with pytest.raises(ValueError, match="timesteps must be an integer >= 1"):
        convert(small_cnn(), 0)
    with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\]"):
        convert(small_cnn(), 2, [torch.randn(2, 1, 8, 8)], percentile=0)
    with pytest.raises(ValueError, match="threshold_scale"):
        convert(small_cnn(), 2, threshold_scale=-1)


# ---------------------------------------------------------------------------- energy
def test_synaptic_events_brute_force():
    """A conv after a 2x2 average pool: every pre-pool spike costs one accumulate per synapse of
    its pooled position."""
    g = torch.Generator().manual_seed(0)
    s = (torch.rand(1, 1, 8, 8, generator=g) < 0.3).float()
    conv = nn.Conv2d(1, 2, 3, padding=1)
    pooled = nn.AvgPool2d(2)(s)
    counted = synaptic_events(conv, pooled) * 4
    brute = 0
    for i in range(4):
        for j in range(4):
            spikes_in_window = int(s[0, 0, 2 * i: 2 * i + 2, 2 * j: 2 * j + 2].sum())
            outputs = sum(1 for oi in range(4) for oj in range(4) if abs(oi - i) <= 1 and abs(oj - j) <= 1)
            brute += spikes_in_window * outputs * 2
    assert counted == pytest.approx(brute)
    lin = nn.Linear(5, 3)
    assert synaptic_events(lin, torch.tensor([[1.0, 0, 1, 1, 0]])) == 9


def test_spike_energy_accounting(one_thread):
    cnn = small_cnn()
    x = torch.randn(8, 1, 8, 8)
    snn = convert(cnn, 4, [x])
    spikes = {}
    def keep(n: str):
        return lambda m, _a, o: spikes.setdefault(n, []).append(o[0] / m.threshold)

    hooks = [m.register_forward_hook(keep(n)) for n, m in snn.lif_layers().items()]
    with torch.no_grad():
        snn(x)
    for h in hooks:
        h.remove()
    e = spike_energy(snn, [x], FP32_45NM)
    n1 = sum(float(o.sum()) for o in spikes["lif1"])  # lif1 spikes -> avg pool -> fc (64 in, 16 out)
    n2 = sum(float(o.sum()) for o in spikes["lif2"])
    rows = {r["layer"]: r for r in e["layers"]}
    assert rows["conv1"]["sops"] is None and rows["conv1"]["macs"] == 4 * 64 * 9
    assert rows["fc1"]["sops"] == pytest.approx(n1 * 16 / 8, rel=1e-5)  # a spike: one path through the pool
    assert rows["fc2"]["sops"] == pytest.approx(n2 * 5 / 8, rel=1e-5)
    assert e["lif"][0]["spike_rate"] == pytest.approx(n1 / (8 * 256 * 4))
    e_cnn = (2304 + 64 * 16 + 16 * 5) * 4.6
    e_snn = 2304 * 4.6 + (rows["fc1"]["sops"] + rows["fc2"]["sops"]) * 0.9
    assert e["energy_ratio"] == pytest.approx(e_cnn / e_snn)
    assert e["energy_ratio_first_layer_xT"] == pytest.approx(e_cnn / (e_snn + 3 * 2304 * 4.6))
    with pytest.raises(TypeError, match="SpikingNet"):
        spike_energy(cnn, [x])


# ---------------------------------------------------------------------------- quantized training
def test_quantized_twin_trains_weights_leak_and_threshold(one_thread):
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, :4].mean((1, 2)) > 0).long()
    snn = lowbit.quantize(convert(small_cnn(), 3, [x], threshold_scale=0.5), W6)
    w = snn.conv1.weight  # the twin keeps the CNN's module names
    step = w.detach().abs().max() / 31
    codes = w.detach() / step
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 31 + 1e-4
    th0 = {n: m.threshold.item() for n, m in snn.lif_layers().items()}
    opt = torch.optim.Adam(snn.parameters(), lr=1e-2)
    snn.train()
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(snn(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert all(m.threshold.item() != th0[n] for n, m in snn.lif_layers().items())
    assert all(m.leak.grad is not None for m in snn.lif_layers().values())


# ---------------------------------------------------------------------------- hyperspectral
def _scene(rng: np.random.Generator, H: int = 14, W: int = 12, bands: int = 16, k: int = 3):
    gt = rng.integers(0, k + 1, (H, W)).astype(np.uint8)
    spectra = rng.normal(size=(k + 1, bands)) * 3
    cube = spectra[gt] + 0.3 * rng.normal(size=(H, W, bands))
    return (1000 + 100 * cube).astype(np.uint16), gt


def test_hsi_loader_patches_split_and_normalisation(tmp_path):
    rng = np.random.default_rng(0)
    cube, gt = _scene(rng)
    write_scene(tmp_path, "salinas", cube, gt)
    b = load_dataset("salinas", data_dir=tmp_path, patch=5, pca=None, train_fraction=0.25, split_seed=3)
    assert b.in_shape == (16, 5, 5) and b.num_classes == 16
    rows, cols = np.nonzero(gt)
    assert b.train.num_samples + b.test.num_samples == len(rows)
    per_class = np.bincount(gt[gt > 0] - 1)
    expect = [min(max(1, round(0.25 * n)), max(1, n - 1)) for n in per_class]
    assert b.train.class_counts(3).tolist() == expect
    # the centre of each patch is the pixel's spectrum standardised with the training pixels' statistics
    tr, te = split_pixels(gt[rows, cols].astype(np.int64) - 1, 0.25, 3)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(rows)
    spec = cube[rows, cols].astype(np.float64)
    mu, sd = spec[tr].mean(0), spec[tr].std(0)
    centre = b.train.x[:, :, 2, 2].numpy()
    np.testing.assert_allclose(centre, (spec[tr] - mu) / sd, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(b.train.y.numpy(), gt[rows[tr], cols[tr]] - 1)
    # same seed: same split; another seed: another one
    again = load_dataset("salinas", data_dir=tmp_path, patch=5, pca=None, train_fraction=0.25, split_seed=3)
    assert torch.equal(again.train.x, b.train.x)
    other = load_dataset("salinas", data_dir=tmp_path, patch=5, pca=None, train_fraction=0.25, split_seed=4)
    assert not torch.equal(other.train.y, b.train.y) or not torch.equal(other.train.x, b.train.x)
    # PCA fitted on the training pixels: standardised components
    p = load_dataset("salinas", data_dir=tmp_path, patch=3, pca=4, train_fraction=0.25, split_seed=3)
    c = p.train.x[:, :, 1, 1].double()
    assert p.in_shape == (4, 3, 3)
    torch.testing.assert_close(c.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-5, rtol=0)
    sd = c.std(0, unbiased=False)
    torch.testing.assert_close(sd, torch.ones(4, dtype=torch.float64), atol=1e-4, rtol=0)


def test_extract_patches_reflects_at_borders():
    cube = np.arange(5 * 6 * 2, dtype=np.float32).reshape(5, 6, 2)
    p = extract_patches(cube, np.array([0, 4]), np.array([0, 5]), 3)
    assert p.shape == (2, 2, 3, 3)
    np.testing.assert_array_equal(p[0, :, 1, 1], cube[0, 0])
    np.testing.assert_array_equal(p[0, :, 0, 0], cube[1, 1])  # reflected: row -1 -> 1, col -1 -> 1
    np.testing.assert_array_equal(p[1, :, 2, 2], cube[3, 4])
    with pytest.raises(ValueError, match="odd"):
        extract_patches(cube, np.array([0]), np.array([0]), 4)


def test_hsi_loader_rejects_bad_files(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"Indian_pines_corrected\.mat"):
        load_dataset("indian_pines", data_dir=tmp_path / "none")
    import scipy.io

    rng = np.random.default_rng(1)
    cube, gt = _scene(rng)
    scipy.io.savemat(tmp_path / "PaviaU.mat", {"pavia": cube})
    scipy.io.savemat(tmp_path / "PaviaU_gt.mat", {"paviaU_gt": gt})
    with pytest.raises(DatasetFormatError, match=r"'paviaU'.*\['pavia'\]"):
        load_dataset("pavia_university", data_dir=tmp_path)
    scipy.io.savemat(tmp_path / "PaviaU.mat", {"paviaU": cube})
    scipy.io.savemat(tmp_path / "PaviaU_gt.mat", {"paviaU_gt": gt[:-1]})
    with pytest.raises(DatasetFormatError, match="H x W must match"):
        load_dataset("pavia_university", data_dir=tmp_path)
    scipy.io.savemat(tmp_path / "PaviaU_gt.mat", {"paviaU_gt": gt + 7})
    with pytest.raises(DatasetFormatError, match=r"labels must be 0 \(unlabelled\) .. 9"):
        load_dataset("pavia_university", data_dir=tmp_path)
    (tmp_path / "PaviaU.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetFormatError, match="MATLAB"):
        load_dataset("pavia_university", data_dir=tmp_path)


def test_conv3d_hybrid_twin_on_a_hyperspectral_scene(tmp_path, one_thread):
    rng = np.random.default_rng(2)
    cube, gt = _scene(rng, H=12, W=12, bands=16)
    write_scene(tmp_path, "indian_pines", cube, gt)
    b = load_dataset("indian_pines", data_dir=tmp_path, patch=9, train_fraction=0.5, batch_size=32)
    assert b.in_shape == (16, 9, 9)
    torch.manual_seed(0)
    cnn = HSICNN3d(num_classes=16, in_channels=16, input_size=9, channels3d=(2, 2, 4), channels2d=8,
                   hidden=(16,))
    x, y = b.train.x, b.train.y
    snn = lowbit.quantize(convert(cnn.eval(), 2, [x], threshold_scale=0.5), W6)
    assert isinstance(snn.conv3d_1, nn.Conv3d) and "lif3d_1" in snn.lif_layers()
    opt = torch.optim.Adam(snn.parameters(), lr=1e-2)
    snn.train()
    losses = []
    for _ in range(25):
        loss = nn.functional.cross_entropy(snn(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    e = spike_energy(snn, [b.test.x])
    assert e["layers"][0]["input"] == "analog" and e["snn_sops"] > 0


def test_cli_snn_convert(tmp_path, one_thread):
    from lowbit.cli import main

    fp = tmp_path / "fp"
    assert main(["train", "--model", "mlp", "--model-arg", "hidden=[16]", "--data", "digits", "--epochs", "1",
                 "--out", str(fp)]) == 0
    out = tmp_path / "snn"
    assert main(["snn", "convert", str(fp), "--out", str(out), "--timesteps", "3", "--val", "200"]) == 0
    res = json.loads((out / "snn.json").read_text())
    assert res["timesteps"] == 3 and res["recipe"]["name"] == "snn-w6"
    assert res["test_acc"] == saved_twin_accuracy(fp, out / "snn.safetensors", 3)
    assert res["energy"]["lif"][0]["layer"] == "lif1" and (out / "snn.safetensors").exists()
    assert main(["snn", "convert", str(fp), "--out", str(out), "--val", "99999"]) == 2
