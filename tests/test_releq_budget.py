"""ReLeQ with activation bits and a hard resource budget: the feasible set against brute force,
masked rollouts within the budget, the accuracy-only reward's closed form, the agent against the
oracle over the feasible set, and the fine-tune evaluator quantizing weights and inputs."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lowbit.data import load_dataset
from lowbit.models import build_model
from lowbit.nn.quantize import input_quantizer, weight_quantizer
from lowbit.search import FineTuneEvaluator, ReLeQ, exhaustive, releq_reward

pytestmark = pytest.mark.usefixtures("one_thread")

MACS = [100, 400, 50, 800]  # per layer: cost = sum MACs * b_w * b_a (bit-operations)
BUDGET = 4 * sum(MACS) + 1000  # all W2A2 plus 1000 BOPs to spend


def cost(bits: tuple[tuple[int, int], ...]) -> float:
    return float(sum(m * w * a for m, (w, a) in zip(MACS, bits, strict=True)))


def _layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Conv2d(1, 8, 5), nn.Conv2d(8, 16, 5), nn.Linear(256, 64), nn.Linear(64, 10)]


def _surface(bits: tuple[tuple[int, int], ...]) -> float:
    """Layer 2's activations are fragile below 4 bits, layer 0's weights below 3; other bits are free."""
    return 0.9 - 0.1 * max(0, 4 - bits[2][1]) - 0.05 * max(0, 3 - bits[0][0])


def _search(evaluate=_surface, **kw) -> ReLeQ:
    return ReLeQ(evaluate, _layers(), 0.9, actions=(2, 3, 4), act_actions=(2, 3, 4), cost=cost,
                 budget=BUDGET, **kw)


def test_feasible_set_is_the_brute_force_one() -> None:
    s = _search()
    assert len(s.actions) == 9 and s.actions[0] == (2, 2) and s.pad == (2, 2)
    brute = [a for a in itertools.product(s.actions, repeat=4) if cost(a) <= BUDGET]
    assert sorted(s.assignments()) == sorted(brute) and 1 < len(brute) < 9**4
    # without a budget every assignment is reachable, padded at the largest action (ReLeQ)
    free = ReLeQ(_surface, _layers(), 0.9, actions=(2, 4), act_actions=(2, 4))
    assert len(free.assignments()) == 4**4 and free.pad == (4, 4)
    assert free.quant_state([(2, 2)]) == pytest.approx((4 + 3 * 16) / (16 * 4))


def test_reward_under_a_budget_is_accuracy_only() -> None:
    s = _search()
    y = 0.8 / 0.9
    expected = 2 * (y ** (1 / y) - 0.5)
    assert s._reward([(2, 2)], 0.8) == pytest.approx(expected)
    assert s._reward([(4, 4), (2, 2)], 0.8) == pytest.approx(expected)  # bits are not priced
    assert expected == pytest.approx(releq_reward(4 / 16, y, 4, 16))


def test_rollouts_stay_within_the_budget_and_find_the_oracle() -> None:
    seen: list[tuple] = []

    def evaluate(bits):
        seen.append(bits)
        return _surface(bits)

    oracle = exhaustive(_search())
    best = oracle[0][0]
    assert best[2][1] == 4 and best[0][0] >= 3 and cost(best) <= BUDGET
    s = _search(evaluate, seed=0)
    res = s.run(200)
    assert all(cost(tuple(h["bits"])) <= BUDGET for h in res.history)
    assert seen and all(cost(b) <= BUDGET for b in seen)  # every measurement within the budget too
    assert res.best_reward == pytest.approx(oracle[0][1])
    assert _surface(res.best_bits) == pytest.approx(0.9)


def test_budget_errors() -> None:
    with pytest.raises(ValueError, match="below the cheapest assignment"):
        ReLeQ(_surface, _layers(), 0.9, actions=(2, 4), act_actions=(2, 4), cost=cost, budget=100.0)
    with pytest.raises(ValueError, match="budget needs its cost"):
        ReLeQ(_surface, _layers(), 0.9, cost=cost)
    with pytest.raises(ValueError, match="act_actions must be bit-widths"):
        ReLeQ(_surface, _layers(), 0.9, act_actions=())


def _accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy of `model` (eval mode) over every batch of `loader`, counted here."""
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return hits / sum(len(y) for _, y in loader)


def test_fine_tune_evaluator_quantizes_weights_and_inputs_of_named_layers() -> None:
    data = load_dataset("digits", batch_size=64, seed=0, flatten=True)
    train, val = data.train.split(1000, seed=0)
    made: list[nn.Module] = []

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        made.append(build_model("mlp", in_features=64, hidden=[32], num_classes=10))
        return made[-1]

    ev = FineTuneEvaluator(make_model, train, val, {"epochs": 1, "optimizer": "adam", "lr": 1e-2,
                                                     "tensorboard": False}, names=["fc2"])
    assert ev.names == ["fc2"]
    acc = ev(((3, 2),))
    m = made[-1]
    assert acc == _accuracy(m, val)  # the fine-tuned model's top-1 on the validation split
    assert weight_quantizer(m.fc1) is None and input_quantizer(m.fc1) is None  # not searched: float
    assert weight_quantizer(m.fc2).bits == 3 and input_quantizer(m.fc2).bits == 2
    with pytest.raises(ValueError, match="quantizable layers"):
        FineTuneEvaluator(make_model, train, val, {"epochs": 1}, names=["nope"])
