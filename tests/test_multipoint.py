"""Multipoint quantization: optimal points on the scale grid, shrinking residuals, point counts,
output-error allocation against brute force, and packed files that keep the counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.models import build_model
from lowbit.nn.quantize import weight_quantizer
from lowbit.ptq import allocate_points, multipoint_ptq
from lowbit.ptq.multipoint import input_grams, output_errors
from lowbit.quant.multipoint import MultipointWeight, fit_point, multipoint_decompose

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fit_point_is_the_best_on_its_grid(bits: int) -> None:
    q, grid = 2 ** (bits - 1) - 1, 16
    r = torch.randn(12, 30, generator=torch.Generator().manual_seed(bits))
    a, v = fit_point(r, q, grid)
    assert bool((v.abs() <= q).all()) and torch.equal(v, torch.round(v))
    err = (r - a * v).square().sum(1)
    m = r.abs().amax(1, keepdim=True)
    for k in range(1, grid + 1):  # brute force over the same candidates
        ak = m * (k / (grid * q))
        vk = torch.clamp(torch.round(r / ak), -q, q)
        assert bool((err <= (r - ak * vk).square().sum(1) + 1e-6).all())
    # k = grid is the plain max-scaled uniform quantizer: never better than the search
    ref = (r - (m / q) * torch.clamp(torch.round(r / (m / q)), -q, q)).square().sum(1)
    assert bool((err <= ref + 1e-6).all())


def test_residual_shrinks_geometrically() -> None:
    w = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    counts = torch.full((8,), 6)
    scales, codes = multipoint_decompose(w, 3, counts, grid=64)
    errs = output_errors(w, scales, codes, None)  # (C, P) squared weight error after p points
    assert bool((errs[:, 1:] <= errs[:, :-1] + 1e-12).all())
    rel = errs[:, -1] / w.reshape(8, -1).double().square().sum(1)
    assert float(rel.max()) < 1e-6  # six 3-bit points: ~ (1/6)^(2*6)
    assert bool((scales >= 0).all())


def test_counts_forward_and_encoding() -> None:
    torch.manual_seed(1)
    w = torch.randn(5, 7)
    q = MultipointWeight(3, points=3)
    q(w)  # sizes the counts: 3 everywhere
    q.counts = torch.tensor([1, 3, 2, 1, 3])
    y = q(w)
    enc = q.encode(w)
    assert torch.equal(y, enc.decode())  # bit for bit
    assert len(enc.branches) == 2 and enc.bits == 3
    for i, b in enumerate([enc, *enc.branches]):
        zero = (q.counts <= i)
        assert bool((b.scale.reshape(-1)[zero] == 0).all())
    # channel with one point = the single-point quantizer
    single = MultipointWeight(3, points=1)(w)
    assert torch.equal(y[0], single[0]) and torch.equal(y[3], single[3])
    assert float((w - y).square().sum()) < float((w - single).square().sum())
    with pytest.raises(ValueError, match="points must be an integer in"):
        MultipointWeight(3, points=9)


def test_output_error_is_the_gram_form() -> None:
    torch.manual_seed(2)
    layer = nn.Linear(6, 4)
    x = torch.randn(50, 6)
    grams = input_grams(nn.Sequential(layer), {"0": layer}, [x[:20], (x[20:], None)])
    torch.testing.assert_close(grams["0"], x.double().T @ x.double())
    scales, codes = multipoint_decompose(layer.weight, 2, torch.full((4,), 2))
    errs = output_errors(layer.weight, scales, codes, grams["0"])
    r = layer.weight.detach().double() - scales[0].double().unsqueeze(1) * codes[0].double()
    torch.testing.assert_close(errs[:, 0], (x.double() @ r.T).square().sum(0))
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    xc = torch.randn(2, 3, 9, 9)
    g = input_grams(nn.Sequential(conv), {"0": conv}, [xc])["0"]
    scales, codes = multipoint_decompose(conv.weight, 2, torch.full((4,), 1))
    errs = output_errors(conv.weight, scales, codes, g)
    dq = conv.weight.detach() - (scales[0].unsqueeze(1) * codes[0]).reshape(conv.weight.shape)
    out = torch.nn.functional.conv2d(xc.double(), dq.double(), stride=2, padding=1)
    torch.testing.assert_close(errs[:, 0], out.square().sum((0, 2, 3)))


def test_allocation_gives_extra_points_to_the_worst_outputs() -> None:
    """With at most two points, k extra points go to the k channels of largest one-point output
    error (brute force over the layer's channels)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(64, 10)
    grams = input_grams(model, {"0": model[0], "2": model[2], "4": model[4]}, [x])  # float inputs
    lowbit.quantize(model, {"default": {"weight": {"method": "multipoint", "bits": 2, "points": 2}}})
    rows = allocate_points(model, [x], budget=1.25, grams=grams)
    for name, layer in lowbit.quantized_layers(model).items():
        q = weight_quantizer(layer)
        w = layer.parametrizations.weight.original
        g = grams[name]
        scales, codes = multipoint_decompose(w, 2, torch.full((w.shape[0],), 2))
        e1 = output_errors(w, scales, codes, g)[:, 0]
        k = round(0.25 * w.shape[0])
        chosen = set(torch.nonzero(q.counts == 2).flatten().tolist())
        assert chosen == set(torch.topk(e1, k).indices.tolist())
    assert all(r.rel_output_error < r.rel_output_error_1 for r in rows)
    with pytest.raises(ValueError, match=r"budget must be in \[1, points\]"):
        allocate_points(model, [x], budget=2.5)
    with pytest.raises(ValueError, match="no layer quantized with method 'multipoint'"):
        allocate_points(nn.Sequential(nn.Linear(2, 2)), [torch.randn(3, 2)])


def test_ptq_lenet_more_points_less_error_and_packed_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(4)
    x = torch.randn(32, 1, 28, 28)
    errors = []
    for budget in (1.0, 1.5, 2.0):
        torch.manual_seed(0)
        model = build_model("lenet5").eval()
        rows = multipoint_ptq(model, [x], bits=2, budget=budget, max_points=2)
        assert [r.name for r in rows] == ["conv2", "fc1", "fc2"]  # first and last stay float
        assert all(abs(r.mean_points - budget) < 0.05 for r in rows)
        errors.append(sum(r.rel_output_error for r in rows))
    assert errors[0] > errors[1] > errors[2]
    # the allocated counts travel in the packed file
    lowbit.save_packed(model.eval(), tmp_path / "m.lowbit")
    loaded = lowbit.load_packed(tmp_path / "m.lowbit")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_cli_ptq_on_a_float_run(tmp_path: Path) -> None:
    from lowbit.cli import main
    from lowbit.experiment import RunSpec, train_run

    common = {"model": "mlp", "model_kwargs": {"hidden": [32, 32]}, "dataset": "digits", "batch_size": 64}
    fp_train = {"epochs": 2, "optimizer": "adam", "lr": 3e-3}
    train_run(RunSpec(**common, train=fp_train, out=str(tmp_path / "fp")))
    out = tmp_path / "m.lowbit"
    assert main(["ptq", str(tmp_path / "fp"), "--bits", "3", "--budget", "1.5", "--calib", "128",
                 "--out", str(out)]) == 0
    loaded = lowbit.load_packed(out)
    counts = [weight_quantizer(m).counts for m in lowbit.quantized_layers(loaded).values()]
    assert len(counts) == 1 and abs(float(counts[0].double().mean()) - 1.5) < 0.05  # fc2: first/last float
    # a quantized run is refused with a clear message (exit status 2)
    train_run(RunSpec(**common, recipe={"default": {"weight": {"method": "binary", "bits": 1}}},
                      train={"epochs": 1}, out=str(tmp_path / "q")))
    assert main(["ptq", str(tmp_path / "q"), "--out", str(tmp_path / "x.lowbit")]) == 2
    assert not (tmp_path / "x.lowbit").exists()
