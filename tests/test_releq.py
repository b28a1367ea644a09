"""ReLeQ: the reward's closed form, advantages, state features, the cache, the agent against the
exhaustive oracle on a known accuracy surface, and the fine-tune evaluator."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.data import load_dataset
from lowbit.models import build_model
from lowbit.nn.quantize import weight_quantizer
from lowbit.search import FineTuneEvaluator, ReLeQ, exhaustive, releq_reward
from lowbit.search.releq import PPOConfig, gae, layer_features

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reward_closed_form() -> None:
    # every layer at b_min with float accuracy: x = 0, y = 1 -> 2 (1 * 1 - 0.5) = 1
    assert releq_reward(2 / 6, 1.0, 2, 6) == pytest.approx(1.0)
    # every layer at b_max: x = 1 - 2/6
    x = 1 - 2 / 6
    assert releq_reward(1.0, 1.0, 2, 6) == pytest.approx(2 * ((1 - x**0.8) - 0.5))
    expected = 2 * ((1 - (0.5 - 1 / 3) ** 0.8) * 0.98 ** (1 / 0.98) - 0.5)
    assert releq_reward(0.5, 0.98, 2, 6) == pytest.approx(expected)
    assert releq_reward(0.5, 0.39, 2, 6, threshold=0.4) == -1.0
    # fewer bits pay more at equal accuracy; lost accuracy costs
    assert releq_reward(0.5, 0.99, 2, 6) > releq_reward(0.7, 0.99, 2, 6)
    assert releq_reward(0.5, 0.99, 2, 6) > releq_reward(0.5, 0.95, 2, 6)


def test_gae_with_lambda_one_is_return_minus_value() -> None:
    r, v, g = [0.1, -0.2, 0.7], [0.3, 0.1, -0.4], 0.9
    returns = [r[0] + g * r[1] + g * g * r[2], r[1] + g * r[2], r[2]]
    assert gae(r, v, g, 1.0) == pytest.approx([ret - val for ret, val in zip(returns, v, strict=True)])
    # lambda = 0: one-step TD errors
    assert gae(r, v, g, 0.0) == pytest.approx([r[0] + g * v[1] - v[0], r[1] + g * v[2] - v[1], r[2] - v[2]])


def test_layer_features() -> None:
    torch.manual_seed(0)
    layers = list(dict(build_model("releq_lenet").named_children()).values())
    layers = [m for m in layers if isinstance(m, nn.Conv2d | nn.Linear)]
    f = layer_features(layers)
    assert len(f) == 4 and all(len(row) == 4 for row in f)
    n_out = [row[0] for row in f]
    assert min(n_out) == 0.0 and max(n_out) == 1.0  # min-max normalised (10 ... 500 outputs)
    assert f[0][2] == 1.0 and f[2][2] == 0.0  # 5x5 kernels vs fully connected
    assert f[1][3] == pytest.approx(float(layers[1].weight.detach().std()))


def _surface(bits: tuple[int, ...]) -> float:
    """A known accuracy surface: layer 1 is fragile below 4 bits, layer 3 below 3 bits."""
    acc = 0.99
    acc -= 0.08 * max(0, 4 - bits[1])
    acc -= 0.10 * max(0, 3 - bits[3])
    acc -= 0.002 * max(0, 3 - bits[0])
    return acc


def _layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Conv2d(1, 8, 5), nn.Conv2d(8, 16, 5), nn.Linear(256, 64), nn.Linear(64, 10)]


def _recorded() -> tuple[list[tuple[int, ...]], Callable[[tuple[int, ...]], float]]:
    """An evaluator of :func:`_surface` that records every assignment it is asked to measure."""
    calls: list[tuple[int, ...]] = []

    def evaluate(bits: tuple[int, ...]) -> float:
        calls.append(bits)
        return _surface(bits)

    return calls, evaluate


def test_agent_finds_the_oracle_optimum_on_a_known_surface() -> None:
    calls, evaluate = _recorded()

    oracle = exhaustive(ReLeQ(_surface, _layers(), float_acc=0.99))
    assert len(oracle) == 5**4 and oracle[0][0] == (2, 4, 2, 3)  # the cheapest lossless assignment
    rank = {bits: i for i, (bits, _, _) in enumerate(oracle)}
    # the paper's PPO settings: the best assignment seen is the oracle's, at a fraction of its cost
    search = ReLeQ(evaluate, _layers(), float_acc=0.99, seed=0)
    result = search.run(300)
    assert result.best_bits == oracle[0][0]
    assert result.best_reward == pytest.approx(oracle[0][1])
    full = {b for b in calls if len(b) == 4 and b in rank}
    assert len(full) < len(oracle) / 2 and len(calls) == len(set(calls))  # each vector measured once
    # a faster-learning agent converges: its greedy episode is among the two best assignments
    fast = ReLeQ(_surface, _layers(), float_acc=0.99, ppo=PPOConfig(lr=1e-3), seed=1)
    fast.run(300)
    assert rank[fast.episode(greedy=True)["bits"]] <= 1


def test_terminal_rewards_measure_one_full_assignment_per_episode() -> None:
    calls, evaluate = _recorded()

    oracle = exhaustive(ReLeQ(_surface, _layers(), float_acc=0.99))
    search = ReLeQ(evaluate, _layers(), float_acc=0.99, seed=0, step_rewards=False)
    ep = search.episode()
    assert ep["rewards"][:-1] == [0.0, 0.0, 0.0] and calls == [ep["bits"]]  # no partial assignment
    result = search.run(300)
    assert result.best_bits == oracle[0][0]  # the cheapest lossless assignment, found all the same
    assert len(calls) == len(set(calls)) <= 301 and len(calls) < len(oracle) / 3


def test_cache_file_resumes_without_new_measurements(tmp_path: Path) -> None:
    calls, evaluate = _recorded()

    path = tmp_path / "cache.json"
    ReLeQ(evaluate, _layers(), 0.99, cache_path=path, seed=1).run(16)
    n = len(calls)
    assert n > 0 and len(json.loads(path.read_text())) == n
    again = ReLeQ(evaluate, _layers(), 0.99, cache_path=path, seed=1).run(16)
    assert len(calls) == n and again.evaluations == n  # same seed: the same episodes, all cached
    with pytest.raises(ValueError, match="actions must be bit-widths"):
        ReLeQ(evaluate, _layers(), 0.99, actions=(0, 2))
    with pytest.raises(ValueError, match="float_acc"):
        ReLeQ(evaluate, _layers(), 99.0)


def _accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy of `model` (eval mode) over every batch of `loader`, counted here."""
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return hits / sum(len(y) for _, y in loader)


def test_fine_tune_evaluator_on_digits() -> None:
    data = load_dataset("digits", batch_size=64, seed=0, flatten=True)
    train, val = data.train.split(1000, seed=0)
    made: list[nn.Module] = []

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        made.append(build_model("mlp", in_features=64, hidden=[32], num_classes=10))
        return made[-1]

    ev = FineTuneEvaluator(make_model, train, val, {"epochs": 2, "optimizer": "adam", "lr": 1e-2,
                                                     "tensorboard": False})
    assert ev.names == ["fc1", "fc2"]
    acc8 = ev((8, 8))
    assert acc8 > 0.5 and acc8 == _accuracy(made[-1], val)
    acc2 = ev((2, 2))  # each call fine-tunes a fresh model: its own validation accuracy
    assert acc2 == _accuracy(made[-1], val) and weight_quantizer(made[-1].fc1).bits == 2
    with pytest.raises(ValueError, match="2 layers"):
        ev((4,))


def test_cli_search_releq_writes_a_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.cli import main
    from lowbit.experiment import RunSpec, train_run
    from lowbit.recipe import Recipe

    common = {"model": "mlp", "model_kwargs": {"hidden": [32, 32]}, "dataset": "digits", "batch_size": 64}
    fp_train = {"epochs": 2, "optimizer": "adam", "lr": 3e-3}
    train_run(RunSpec(**common, train=fp_train, out=str(tmp_path / "fp")))
    out = tmp_path / "search"
    args = ["search", "releq", str(tmp_path / "fp"), "--out", str(out), "--episodes", "8",
            "--actions", "2", "4", "--proxy", "300", "--val", "300"]
    assert main(args) == 0
    res = json.loads((out / "releq.json").read_text())
    assert res["layers"] == ["fc1", "fc2", "fc3"] and len(res["history"]) == 8
    assert 0 < res["evaluations"] <= 2**3 and len(json.loads((out / "releq_cache.json").read_text())) <= 8
    recipe = Recipe.from_yaml(out / "recipe.yaml")
    bits = [recipe.plan(n, "fc1", "fc3").weight.bits for n in res["layers"]]
    assert bits == res["best_bits"] and set(bits) <= {2, 4}
    def no_fine_tune(self, bits):
        raise AssertionError(f"measured {bits} again")

    monkeypatch.setattr(FineTuneEvaluator, "__call__", no_fine_tune)
    assert main(args) == 0  # a rerun measures nothing new: every assignment is cached
    assert json.loads((out / "releq.json").read_text())["best_bits"] == res["best_bits"]
    other = [*args[:-4], "--proxy", "200", "--val", "300"]  # another way of measuring: refused
    assert main(other) == 2
    assert json.loads((out / "releq.json").read_text())["best_bits"] == res["best_bits"]


def test_cli_search_releq_with_activation_bits_under_a_bops_budget(tmp_path: Path) -> None:
    from lowbit.cli import main
    from lowbit.experiment import RunSpec, train_run
    from lowbit.recipe import Recipe

    common = {"model": "mlp", "model_kwargs": {"hidden": [32, 32]}, "dataset": "digits", "batch_size": 64}
    fp_train = {"epochs": 1, "optimizer": "adam", "lr": 3e-3}
    train_run(RunSpec(**common, train=fp_train, out=str(tmp_path / "fp")))
    macs = [64 * 32, 32 * 32, 32 * 10]  # fc1, fc2, fc3 on 8x8 digits, flattened
    budget = sum(m * 4 * 4 for m in macs) - 1  # uniform W4A4 just misses it
    out = tmp_path / "search"
    args = ["search", "releq", str(tmp_path / "fp"), "--out", str(out), "--episodes", "6",
            "--actions", "2", "4", "--act-actions", "2", "4", "--bops-budget", str(budget),
            "--proxy", "300", "--val", "300"]
    assert main(args) == 0
    res = json.loads((out / "releq.json").read_text())
    assert res["macs"] == macs and res["bops_budget"] == budget

    def bops(bits):
        return sum(m * w * a for m, (w, a) in zip(macs, bits, strict=True))

    assert all(bops(h["bits"]) <= budget for h in res["history"])
    # measured once per episode, at its end: the cache holds exactly the episodes' assignments
    once = tmp_path / "once"
    assert main([*args[:4], str(once), *args[5:], "--reward-at-end"]) == 0
    at_end = json.loads((once / "releq.json").read_text())
    cached = set(json.loads((once / "releq_cache.json").read_text()))
    assert at_end["step_rewards"] is False and at_end["evaluations"] == len(cached) <= 6
    assert cached == {",".join(f"{w}/{a}" for w, a in h["bits"]) for h in at_end["history"]}
    assert res["best_bops"] == bops(res["best_bits"]) <= budget
    recipe = Recipe.from_yaml(out / "recipe.yaml")
    plans = [recipe.plan(n, "fc1", "fc3") for n in res["layers"]]
    assert [[p.weight.bits, p.activation.bits] for p in plans] == res["best_bits"]
    # fc1 reads the (normalised, signed) data
    assert [p.activation.options.get("signed", False) for p in plans] == [True, False, False]
