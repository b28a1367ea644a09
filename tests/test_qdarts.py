"""∇QDARTS: expected BOPs against the closed form and lowbit report, its gradient against finite
differences, the penalty's effect on a toy task, derivation, resume, and input checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lowbit.export import model_report, report_from_file, save_packed
from lowbit.nn.quantize import input_quantizer, weight_quantizer
from lowbit.search.qdarts import (
    OPS,
    Choice,
    QDARTSConfig,
    SearchSpace,
    SuperNet,
    bops_penalty,
    build_derived,
    derive,
    qdarts_search,
    searched_bops,
    searched_layer_names,
)

SHAPE = (3, 8, 8)


def tiny_space(**kw) -> SearchSpace:
    base = dict(channels=4, layers=3, reductions=(1,), input_size=8)
    return SearchSpace(**{**base, **kw})


def randomize(net: SuperNet, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_expected_bops_equals_closed_form_over_joint_choices():
    """E[BOPs] = sum over (op, w bits, a bits) of p*q*r x that choice's BOPs, each choice's BOPs
    read from lowbit's report of the derived net."""
    space = tiny_space()
    net = SuperNet(space)
    randomize(net)
    per_choice = {}  # (layer, op, wb, ab) -> BOPs of that layer in the report
    for op, wb, ab in itertools.product(space.ops, space.w_bits, space.a_bits):
        geno = [Choice(op if op in space.candidates(l) else "conv3x3", wb, ab) for l in range(space.layers)]
        rows = {r.name: r.bops for r in model_report(build_derived(space, geno), SHAPE).rows}
        for l, c in enumerate(geno):
            names = [n for n in searched_layer_names(geno) if n.startswith(f"cells.{l}.")]
            per_choice[(l, c.op, wb, ab)] = sum(rows[n] for n in names)
    closed = 0.0
    for l, cell in enumerate(net.cells):
        p, q, r = (torch.softmax(t.detach().double(), -1) for t in (cell.alpha, cell.gamma_w, cell.gamma_a))
        for i, op in enumerate(cell.names):
            for k, wb in enumerate(space.w_bits):
                for j, ab in enumerate(space.a_bits):
                    closed += float(p[i] * q[i, k] * r[i, j]) * per_choice[(l, op, wb, ab)]
    assert net.expected_bops().item() == pytest.approx(closed, rel=1e-12)
    assert per_choice[(0, "skip", 2, 2)] == 0
    # a layer's conv3x3 at W2A4: MACs (4 out x 8 x 8 positions x 4 in x 9) x 2 x 4
    assert per_choice[(0, "conv3x3", 2, 4)] == 4 * 64 * 4 * 9 * 8


def test_derived_bops_equal_lowbit_report_and_one_hot_expectation(tmp_path):
    space = tiny_space()
    net = SuperNet(space)
    randomize(net, 1)
    geno = derive(net)
    with torch.no_grad():  # one-hot relaxation at the derived choice
        for cell, c in zip(net.cells, geno, strict=True):
            o = cell.names.index(c.op)
            cell.alpha.fill_(-1e4)
            cell.alpha[o] = 1e4
            cell.gamma_w.fill_(-1e4)
            cell.gamma_w[o, space.w_bits.index(c.w_bits)] = 1e4
            cell.gamma_a.fill_(-1e4)
            cell.gamma_a[o, space.a_bits.index(c.a_bits)] = 1e4
    model = build_derived(space, geno)
    counted = searched_bops(model, geno, SHAPE)
    assert net.expected_bops().item() == counted["searched"]
    rep = model_report(model, SHAPE)
    assert counted["total"] == rep.total_bops
    save_packed(model.eval(), tmp_path / "d.lowbit")  # the file `lowbit report` reads
    from_file = report_from_file(tmp_path / "d.lowbit", SHAPE)
    assert from_file.total_bops == rep.total_bops
    assert sum(r.bops for r in from_file.rows if r.name in searched_layer_names(geno)) == counted["searched"]


def test_recipe_quantizes_searched_convs_at_chosen_bits_and_keeps_stem_fc_float():
    space = tiny_space()
    geno = [Choice("sep3x3", 2, 4), Choice("conv5x5", 4, 2), Choice("skip", 2, 2)]
    model = build_derived(space, geno)
    names = searched_layer_names(geno)
    assert names == ["cells.0.conv0", "cells.0.conv1", "cells.1.conv0"]
    for n, (wb, ab) in zip(names, [(2, 4), (2, 4), (4, 2)], strict=True):
        layer = model.get_submodule(n)
        assert (weight_quantizer(layer).bits, input_quantizer(layer).bits) == (wb, ab)
    assert weight_quantizer(model.stem.conv) is None and weight_quantizer(model.fc) is None
    assert model.get_submodule("cells.0.conv0").groups == 4  # depthwise half of sep3x3


def test_bops_gradient_matches_finite_differences():
    space = tiny_space()
    net = SuperNet(space)
    randomize(net, 2)
    params = net.arch_parameters()
    for p in params:  # float64 logits, so that a step of 1e-6 is not lost to rounding
        p.data = p.data.double()
    target = 0.5 * net.expected_bops().item()
    for fn in (lambda: net.expected_bops(), lambda: bops_penalty(net.expected_bops(), target, 1.0),
               lambda: bops_penalty(net.expected_bops(), None, 1e5)):
        grads = torch.autograd.grad(fn(), params)
        h = 1e-6
        for p, g in zip(params, grads, strict=True):
            for idx in itertools.product(*map(range, p.shape)):
                with torch.no_grad():
                    old = float(p[idx])
                    p[idx] = old + h
                    up = float(fn())
                    p[idx] = old - h
                    down = float(fn())
                    p[idx] = old
                fd = (up - down) / (2 * h)
                assert float(g[idx]) == pytest.approx(fd, rel=1e-3, abs=1e-6 * max(1.0, abs(fd)))


def _toy_batches(n_batches: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two classes: which half of the image (left/right) is brighter, with noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 2, (16,), generator=g)
        x = torch.randn(16, *SHAPE, generator=g) * 0.5
        x[y == 0, :, :, :4] += 1.0
        x[y == 1, :, :, 4:] += 1.0
        out.append((x, y))
    return out


def _cheapest_prob(net: SuperNet) -> list[float]:
    """Per layer, probability of its cheapest (op, w bits, a bits) under the relaxation."""
    out = []
    for cell, macs in zip(net.cells, net.macs(), strict=True):
        p, q, r = cell.probs()
        o = min(range(len(cell.names)), key=lambda i: sum(macs[i]))
        bits = 1.0 if not macs[o] else q[o, 0] * r[o, 0]  # skip has no convs, so no bits to choose
        out.append(float(p[o] * bits))
    return out


@pytest.mark.parametrize("weight", [0.0, 50.0])
def test_strong_bops_penalty_drives_to_cheapest_and_zero_penalty_does_not(weight):
    torch.manual_seed(0)
    space = tiny_space(ops=("conv3x3", "sep3x3", "skip"), w_bits=(2, 8), a_bits=(2, 8))
    net = SuperNet(space)
    e0 = net.expected_bops().item()
    cfg = QDARTSConfig(epochs=6, warmup_epochs=0, arch_lr=0.1, w_lr=0.05, bops_weight=weight)
    res = qdarts_search(net, _toy_batches(10, 0), _toy_batches(10, 1), cfg)
    lo, _ = net.bops_range()
    cheap = _cheapest_prob(net)
    if weight > 0:
        assert min(cheap) > 0.8
        assert res.expected_bops < lo + 0.1 * (e0 - lo)
        assert res.genotype == [Choice("skip", 2, 2), Choice("sep3x3", 2, 2), Choice("skip", 2, 2)]
        assert searched_bops(build_derived(space, res.genotype), res.genotype, SHAPE)["searched"] == lo
    else:
        assert max(cheap) < 0.5
        assert res.expected_bops > 0.5 * e0
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]  # the weights did learn


def test_derivation_is_deterministic_and_ties_go_to_the_first_candidate():
    space = tiny_space()
    net = SuperNet(space)
    assert derive(net) == [Choice("conv3x3", 2, 2)] * 3  # all logits 0: first op, fewest bits
    randomize(net, 3)
    first = derive(net)
    clone = SuperNet(space)
    clone.load_state_dict(net.state_dict())
    assert derive(net) == first == derive(clone)
    with torch.no_grad():
        net.cells[0].alpha.copy_(torch.tensor([0.0, 2.0, 2.0, 1.0, 2.0]))
    assert derive(net)[0].op == "conv5x5"


def test_killed_search_resumes_to_the_same_result(tmp_path):
    space = tiny_space(ops=("conv3x3", "skip"))
    cfg = QDARTSConfig(epochs=3, warmup_epochs=1, arch_lr=0.05, bops_weight=1.0)
    train, val = _toy_batches(4, 0), _toy_batches(4, 1)
    torch.manual_seed(0)
    ref = SuperNet(space)
    straight = qdarts_search(ref, train, val, cfg)

    def die(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    torch.manual_seed(0)
    net = SuperNet(space)
    with pytest.raises(KeyboardInterrupt):
        qdarts_search(net, train, val, cfg, checkpoint=tmp_path / "s.safetensors", progress=die)
    torch.manual_seed(1)
    fresh = SuperNet(space)  # another process: other initial weights, all restored from the file
    resumed = qdarts_search(fresh, train, val, cfg, checkpoint=tmp_path / "s.safetensors")
    assert resumed.history == straight.history
    for a, b in zip(ref.arch_parameters(), fresh.arch_parameters(), strict=True):
        assert torch.equal(a, b)


def test_skip_only_offered_where_shapes_allow():
    space = tiny_space()
    assert [("skip" in space.candidates(l)) for l in range(3)] == [True, False, True]
    assert space.shapes() == [(4, 4, 1), (4, 8, 2), (8, 8, 1)]
    with pytest.raises(ValueError, match="cannot change shape at layer 1"):
        build_derived(space, [Choice("skip", 2, 2)] * 3)
    with pytest.raises(ValueError, match="allowed: "):
        build_derived(space, [Choice("conv7x7", 2, 2)] * 3)


@pytest.mark.parametrize("kw, msg", [
    (dict(ops=()), "non-empty list of operation names"),
    (dict(ops=("conv3x3", "conv7x7")), r"unknown operation\(s\) \['conv7x7'\]; allowed"),
    (dict(w_bits=(1, 4)), r"w_bits must be integers in \[2, 8\], got \[1, 4\]"),
    (dict(a_bits=(4, 9)), r"a_bits must be integers in \[2, 8\]"),
    (dict(a_bits=()), "a_bits must be a non-empty list"),
    (dict(w_bits=("4",)), "w_bits must be integers"),
    (dict(ops=("skip",)), "layer 1 changes shape and only 'skip' was offered"),
    (dict(reductions=(3,)), r"reductions must be layer indices in \[0, 2\]"),
    (dict(weight={"method": "uniform", "bits": 4}), "no 'bits'"),
])
def test_bad_search_spaces_are_rejected(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_space(**kw)


def test_bad_activation_method_is_rejected():
    with pytest.raises(KeyError, match="unknown activation method 'nope'; allowed"):
        tiny_space(activation={"method": "nope"})


def test_infeasible_target_and_bad_config_rejected():
    net = SuperNet(tiny_space())
    lo, hi = net.bops_range()
    assert lo == (4 * 16 * 9 + 8 * 16 * 4) * 4  # reduction layer: sep3x3 (dw + pw) at W2A2; skips 0
    with pytest.raises(ValueError, match=r"infeasible.*cheapest choice"):
        qdarts_search(net, [], [], QDARTSConfig(epochs=1, warmup_epochs=0, bops_target=0.5 * lo))
    with pytest.raises(ValueError, match="warmup_epochs"):
        QDARTSConfig(epochs=2, warmup_epochs=2)
    with pytest.raises(ValueError, match="bops_target must be > 0"):
        QDARTSConfig(bops_target=-1.0)
    assert math.isfinite(hi) and hi > lo
    assert set(OPS) == {"conv3x3", "conv5x5", "sep3x3", "dil3x3", "skip"}


def test_qdarts_run_resumes_only_under_its_own_settings(tmp_path):
    from lowbit.search.qdarts import qdarts_run

    space = SearchSpace(ops=("conv3x3", "skip"), w_bits=(2, 4), a_bits=(4,), channels=4, layers=3,
                        reductions=(1, 2))
    cfg = QDARTSConfig(epochs=1, warmup_epochs=0, seed=0)
    kw = {"subset": 240, "val": 40, "batch_size": 32}
    first = qdarts_run("digits", tmp_path, space, cfg, **kw)
    assert (tmp_path / "search.safetensors").exists() and (tmp_path / "search_settings.json").exists()
    again = qdarts_run("digits", tmp_path, space, cfg, **kw)  # the same settings: resumes (finished)
    assert again["genotype"] == first["genotype"]
    with pytest.raises(ValueError, match=r"other settings \(config differ\)"):
        qdarts_run("digits", tmp_path, space, QDARTSConfig(epochs=1, warmup_epochs=0, seed=1), **kw)
    with pytest.raises(ValueError, match=r"other settings \(subset differ\)"):
        qdarts_run("digits", tmp_path, space, cfg, **{**kw, "subset": 200})
