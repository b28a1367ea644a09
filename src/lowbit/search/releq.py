"""ReLeQ: per-layer weight (and optionally activation) bit-widths chosen by a PPO agent.

Elthakeb, Pilligundla, Mireshghallah, Yazdanbakhsh, Esmaeilzadeh, "ReLeQ: a reinforcement learning
approach for automatic deep quantization of neural networks" (arXiv 1811.01704; IEEE Micro 2020).

An episode sweeps the quantizable layers in order; at layer ``l`` the agent sees

    s_l = [l / (L-1), b_prev / 32, quant_state, acc_state, n_out, c_in, kernel, std(w_l)]
    quant_state = sum(bits so far, b_max for the layers not yet chosen) / (b_max L)
    acc_state   = acc(current bits) / acc_float

(``n_out``, ``c_in``, ``kernel`` min-max normalised over the layers) and picks ``b_l`` from
``actions``. After each choice the environment measures the accuracy of the current assignment
(layers not chosen yet stay at ``b_max``) with a short quantization-aware fine-tune from the
float weights, cached per bit vector, and pays

    x = quant_state - b_min / b_max,   y = acc_state
    R = 2 ((1 - x^0.8) y^(1/y) - 0.5),    R = -1 if y < threshold

(ReLeQ's reward: fewer bits raise ``1 - x^0.8``, ``y^(1/y)`` falls steeply as accuracy is lost).
The agent is PPO (clip 0.3, value weight 1, entropy weight 0.01, gamma 0.9, GAE lambda 1) with an
MLP-128 trunk, a 128-128 policy head read at softmax temperature 0.5 and a 128-64 value head.

Activation bits (``act_actions``): each action is then a pair ``(b_w, b_a)`` from
``actions x act_actions``; a layer's "bits" in ``quant_state`` become ``b_w b_a`` (its share of the
bit-operations per MAC, normalised by ``max b_w * max b_a``) and ``b_prev`` the pair's geometric
mean ``sqrt(b_w b_a)``.

A resource budget (``cost``, ``budget``; e.g. BOPs = sum_l MAC_l b_w b_a): ReLeQ's own reward only
prices bits through ``x``; here the constraint is hard, as in HAQ (Wang et al., CVPR 2019). At layer
``l`` an action is offered only if the assignment it leads to, with the layers not chosen yet at
the cheapest action, costs at most the budget (infeasible logits masked, in the rollout and in the
PPO update); the layers not chosen yet sit at that cheapest action in every measurement too (so
each measured assignment is within the budget); and the reward drops the bits term (``x = 0``,
``R = 2 (y^(1/y) - 0.5)``): within the budget only accuracy pays (fewer bits earn nothing).

``step_rewards=False`` (a departure, for small compute budgets): only the finished assignment is
measured, once per episode; the earlier steps pay 0 and see ``acc_state = 1``. An episode then
costs one fine-tune instead of one per layer, so the same compute buys ``L`` times more episodes
(PPO updates) at the price of a state that no longer tracks accuracy along the sweep.

The evaluator is any ``bits tuple -> accuracy`` callable; :class:`FineTuneEvaluator` is the
paper's (a short fine-tune of the quantized model from float weights, then validation
accuracy). Its cache is a JSON file, so a killed search resumes without repeating fine-tunes,
and :func:`exhaustive` over the same evaluator gives the oracle the agent can be checked against.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._io import atomic_write_text
from ..nn.quantize import quantizable_layers, quantize
from ..train import TrainConfig, Trainer

__all__ = ["FineTuneEvaluator", "PPOAgent", "ReLeQ", "ReLeQResult", "check_actions", "exhaustive",
           "layer_features", "releq_reward"]


def releq_reward(
    quant_state: float, acc_state: float, b_min: int, b_max: int, threshold: float = 0.4
) -> float:
    """ReLeQ's reward ``2 ((1 - x^0.8) y^(1/y) - 0.5)`` (``-1`` below the accuracy threshold)."""
    if acc_state < threshold:
        return -1.0
    x = max(0.0, quant_state - b_min / b_max)
    y = max(acc_state, 1e-9)
    return 2.0 * ((1.0 - x**0.8) * y ** (1.0 / y) - 0.5)


def layer_features(layers: Sequence[nn.Module]) -> list[list[float]]:
    """Per layer ``[n_out, c_in, kernel, std(w)]``, the first three min-max normalised."""
    raw = []
    for m in layers:
        w = m.weight.detach()
        kernel = int(w[0, 0].numel()) if w.dim() > 2 else 1
        raw.append([float(w.shape[0]), float(w.shape[1]), float(kernel), float(w.std())])
    cols = list(zip(*raw, strict=True))
    out = []
    for row in raw:
        feats = []
        for j, v in enumerate(row[:3]):
            lo, hi = min(cols[j]), max(cols[j])
            feats.append((v - lo) / (hi - lo) if hi > lo else 0.0)
        out.append([*feats, row[3]])
    return out


# ---- the environment's measurement ---------------------------------------------------------
class FineTuneEvaluator:
    """``bits -> validation accuracy`` after a short quantization-aware fine-tune from float weights.

    ``make_model()`` returns the float model (weights loaded); layer ``i`` of ``names`` (default:
    every one of ``quantizable_layers``; the others stay float) gets ``{**weight, "bits": bits[i]}``
    and, when ``bits[i]`` is a pair ``(b_w, b_a)``, also ``{**activation, "bits": b_a}`` on its
    input (otherwise activations stay float, as in ReLeQ, which searches weight bits), with a
    signed grid for the layers in ``signed_inputs`` (e.g. the first layer, reading normalised data).
    ``train``/``val`` are loaders; ``config`` the fine-tune's TrainConfig (e.g. one epoch, Adam).
    ``device``: where each fine-tune runs (default: where ``make_model()`` puts the model).
    """

    def __init__(self, make_model: Callable[[], nn.Module], train: Any, val: Any,
                 config: TrainConfig | dict[str, Any], weight: dict[str, Any] | None = None,
                 device: str | torch.device | None = None, names: Sequence[str] | None = None,
                 activation: dict[str, Any] | None = None, signed_inputs: Sequence[str] = ()) -> None:
        self.make_model, self.train, self.val = make_model, train, val
        self.signed_inputs = set(signed_inputs)  # layers whose inputs go negative (e.g. the data)
        self.config = config
        self.device = device
        self.weight = dict(weight or {"method": "uniform", "scale": "mse", "per_channel": True})
        self.activation = dict(activation or {"method": "pact"})
        every = list(quantizable_layers(make_model()))
        self.names = every if names is None else list(names)
        unknown = [n for n in self.names if n not in every]
        if unknown or not self.names:
            raise ValueError(f"releq: names must be quantizable layers of the model, got {unknown or []!r}; "
                             f"allowed: {every}")

    def layers(self) -> list[nn.Module]:
        return list(quantizable_layers(self.make_model()).values())

    def __call__(self, bits: tuple[int, ...]) -> float:
        if len(bits) != len(self.names):
            raise ValueError(f"releq: {len(bits)} bit-widths for {len(self.names)} layers {self.names}")
        model = self.make_model()
        rules = []
        for n, b in zip(self.names, bits, strict=True):
            if isinstance(b, int):
                rules.append({"match": n, "weight": {**self.weight, "bits": b}})
            else:
                act = {**self.activation, "bits": b[1]}
                if n in self.signed_inputs:
                    act["signed"] = True
                rules.append({"match": n, "weight": {**self.weight, "bits": b[0]}, "activation": act})
        quantize(model, {"default": {"weight": None}, "rules": rules})
        trainer = Trainer(model, self.train, self.val, self.config, device=self.device)
        trainer.fit()
        return float(trainer.evaluate()["acc"])


# ---- the agent -----------------------------------------------------------------------------
class PPOAgent(nn.Module):
    """MLP-128 trunk; policy head 128-128 -> actions (softmax at ``temperature``); value 128-64-1."""

    def __init__(self, state_dim: int, n_actions: int, temperature: float = 0.5) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(state_dim, 128), nn.Tanh())
        self.policy = nn.Sequential(nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, n_actions))
        self.value = nn.Sequential(nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 1))
        self.temperature = temperature

    def forward(
        self, s: Tensor, mask: Tensor | None = None
    ) -> tuple[torch.distributions.Categorical, Tensor]:
        """``mask``: allowed actions (bool, same leading shape); the others get probability 0."""
        h = self.trunk(s)
        logits = self.policy(h) / self.temperature
        if mask is not None:
            logits = logits.masked_fill(~mask, -1e9)  # finite: log-probs and entropy stay finite
        dist = torch.distributions.Categorical(logits=logits)
        return dist, self.value(h).squeeze(-1)


@dataclass
class PPOConfig:
    clip: float = 0.3
    value_weight: float = 1.0
    entropy_weight: float = 0.01
    gamma: float = 0.9
    gae_lambda: float = 1.0
    lr: float = 1e-4
    episodes_per_update: int = 8
    update_epochs: int = 4


def gae(rewards: Sequence[float], values: Sequence[float], gamma: float, lam: float) -> list[float]:
    """Generalised advantage estimates of one finished episode (value 0 after the last step)."""
    adv, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        nxt = values[t + 1] if t + 1 < len(values) else 0.0
        delta = rewards[t] + gamma * nxt - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


# ---- the search ----------------------------------------------------------------------------
@dataclass
class ReLeQResult:
    best_bits: tuple[int, ...]
    best_reward: float
    best_acc: float
    float_acc: float
    episodes: int
    evaluations: int  # distinct bit vectors measured (cache size)
    history: list[dict[str, Any]] = field(default_factory=list)  # per episode: bits, reward, acc

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _read_cache(path: Path) -> dict[str, float]:
    """The measured accuracies in ``path`` (``{"2,4,8": 0.91, ...}``), or a ValueError naming the file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): float(v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError) as e:  # bad UTF-8 or JSON, or not an object of numbers
        raise ValueError(f"releq: {path} is not a cache of measured accuracies (a JSON object of bits -> "
                         f"accuracy): {e}; delete it to measure the assignments again") from None


def check_actions(actions: Sequence[int], act_actions: Sequence[int] | None = None) -> None:
    """A ValueError unless ``actions`` (and ``act_actions`` if given) are non-empty lists of bit-widths
    in [1, 8]."""
    checks = [("actions", actions)] + ([("act_actions", act_actions)] if act_actions is not None else [])
    for what, bits in checks:
        if (isinstance(bits, str | int) or not bits
                or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8 for b in bits)):
            raise ValueError(f"releq: {what} must be bit-widths in [1, 8] (a non-empty list), got {bits!r}")


class ReLeQ:
    """The search: ``run(episodes)`` trains the agent and returns the best assignment seen.

    ``evaluate(bits) -> accuracy`` for a full bit tuple (one entry per layer: an int, or a
    ``(b_w, b_a)`` pair with ``act_actions``); ``layers``: the quantizable modules in order (for the
    state features); ``cache_path``: JSON file of measured accuracies (read at start, written after
    every new measurement). ``cost(bits) -> float`` and ``budget``: the hard resource constraint
    (module docstring); ``cost`` must not decrease when any layer's bits grow.
    """

    def __init__(
        self,
        evaluate: Callable[[tuple[int, ...]], float],
        layers: Sequence[nn.Module],
        float_acc: float,
        actions: Sequence[int] = (2, 3, 4, 5, 6),
        threshold: float = 0.4,
        ppo: PPOConfig | None = None,
        seed: int = 0,
        cache_path: str | Path | None = None,
        act_actions: Sequence[int] | None = None,
        cost: Callable[[tuple[Any, ...]], float] | None = None,
        budget: float | None = None,
        step_rewards: bool = True,
    ) -> None:
        check_actions(actions, act_actions)
        if not 0 < float_acc <= 1:
            raise ValueError(f"releq: float_acc must be an accuracy in (0, 1], got {float_acc!r}")
        if (cost is None) != (budget is None):
            raise ValueError("releq: a budget needs its cost function and a cost function its budget")
        self.evaluate_fn, self.float_acc = evaluate, float(float_acc)
        self.actions: tuple[Any, ...] = tuple(sorted(set(actions)))
        if act_actions is not None:  # (weight bits, activation bits) pairs
            self.actions = tuple((w, a) for w in self.actions for a in sorted(set(act_actions)))
        sizes = [self.size(c) for c in self.actions]
        self.b_min, self.b_max = min(sizes), max(sizes)
        self.threshold = threshold
        self.features = layer_features(layers)
        self.n_layers = len(self.features)
        self.cost, self.budget = cost, budget
        self.step_rewards = bool(step_rewards)
        # layers not chosen yet: at the largest action (ReLeQ), or the cheapest under a budget
        self.pad = self.actions[sizes.index(self.b_min if budget is not None else self.b_max)]
        if cost is not None and cost((self.pad,) * self.n_layers) > budget:
            raise ValueError(f"releq: budget {budget:.6g} is below the cheapest assignment "
                             f"{(self.pad,) * self.n_layers} (cost {cost((self.pad,) * self.n_layers):.6g})")
        self.cfg = ppo or PPOConfig()
        torch.manual_seed(seed)
        self.rng = torch.Generator().manual_seed(seed)
        self.agent = PPOAgent(8, len(self.actions))
        self.opt = torch.optim.Adam(self.agent.parameters(), lr=self.cfg.lr)
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[str, float] = {}
        if self.cache_path and self.cache_path.exists():
            self.cache = _read_cache(self.cache_path)

    # environment ------------------------------------------------------------------------
    @staticmethod
    def size(choice: Any) -> int:
        """A choice's bits: ``b`` for weight bits, ``b_w * b_a`` for a pair (bit-operations per MAC)."""
        return choice if isinstance(choice, int) else choice[0] * choice[1]

    def padded(self, chosen: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(chosen) + (self.pad,) * (self.n_layers - len(chosen))

    def feasible(self, chosen: Sequence[Any]) -> Tensor:
        """Which actions are allowed after ``chosen`` (all of them without a budget)."""
        if self.cost is None:
            return torch.ones(len(self.actions), dtype=torch.bool)
        return torch.tensor([self.cost(self.padded([*chosen, c])) <= self.budget for c in self.actions])

    def accuracy(self, bits: tuple[Any, ...]) -> float:
        key = ",".join(str(b) if isinstance(b, int) else "/".join(map(str, b)) for b in bits)
        if key not in self.cache:
            self.cache[key] = float(self.evaluate_fn(bits))
            if self.cache_path:
                atomic_write_text(self.cache_path, json.dumps(self.cache, indent=0, sort_keys=True))
        return self.cache[key]

    def quant_state(self, chosen: Sequence[Any]) -> float:
        return sum(map(self.size, self.padded(chosen))) / (self.b_max * self.n_layers)

    def state(self, l: int, chosen: Sequence[Any], acc_state: float) -> Tensor:
        prev = self.size(chosen[-1]) if chosen else self.b_max
        if not isinstance(self.actions[0], int):
            prev = prev**0.5  # the pair's geometric-mean bits
        pos = l / max(1, self.n_layers - 1)
        return torch.tensor([pos, prev / 32, self.quant_state(chosen), acc_state, *self.features[l]])

    def _reward(self, chosen: Sequence[Any], acc: float) -> float:
        # under a budget the bits term is dropped (x = 0): only accuracy pays within the budget
        q = self.b_min / self.b_max if self.budget is not None else self.quant_state(chosen)
        return releq_reward(q, acc / self.float_acc, self.b_min, self.b_max, self.threshold)

    def reward(self, chosen: Sequence[Any]) -> tuple[float, float]:
        acc = self.accuracy(self.padded(chosen))
        return self._reward(chosen, acc), acc

    # agent ------------------------------------------------------------------------------
    def episode(self, greedy: bool = False) -> dict[str, Any]:
        chosen: list[Any] = []
        states, masks, actions, logps, values, rewards = [], [], [], [], [], []
        acc_state, acc = 1.0, self.float_acc
        for l in range(self.n_layers):
            s = self.state(l, chosen, acc_state)
            mask = self.feasible(chosen)
            with torch.no_grad():
                dist, v = self.agent(s, mask)
            if greedy:
                a = torch.argmax(dist.probs)
            else:
                a = torch.multinomial(dist.probs, 1, generator=self.rng)[0]
            chosen.append(self.actions[int(a)])
            if self.step_rewards or l == self.n_layers - 1:
                r, acc = self.reward(chosen)
                acc_state = acc / self.float_acc
            else:  # measured once, at the end of the sweep
                r = 0.0
            states.append(s)
            masks.append(mask)
            actions.append(int(a))
            logps.append(float(dist.log_prob(a)))
            values.append(float(v))
            rewards.append(r)
        return {"states": states, "masks": masks, "actions": actions, "logps": logps, "values": values,
                "rewards": rewards, "bits": tuple(chosen), "acc": acc, "reward": rewards[-1]}

    def update(self, episodes: Sequence[dict[str, Any]]) -> None:
        c = self.cfg
        s = torch.stack([st for e in episodes for st in e["states"]])
        mask = torch.stack([m for e in episodes for m in e["masks"]])
        a = torch.tensor([x for e in episodes for x in e["actions"]])
        old_logp = torch.tensor([x for e in episodes for x in e["logps"]])
        adv_l, ret_l = [], []
        for e in episodes:
            adv = gae(e["rewards"], e["values"], c.gamma, c.gae_lambda)
            adv_l += adv
            ret_l += [x + v for x, v in zip(adv, e["values"], strict=True)]
        adv_t, ret_t = torch.tensor(adv_l), torch.tensor(ret_l)
        if adv_t.numel() > 1:
            adv_t = (adv_t - adv_t.mean()) / (adv_t.std() + 1e-8)
        for _ in range(c.update_epochs):
            dist, v = self.agent(s, mask)
            ratio = torch.exp(dist.log_prob(a) - old_logp)
            surrogate = torch.min(ratio * adv_t, ratio.clamp(1 - c.clip, 1 + c.clip) * adv_t)
            loss = -surrogate.mean() + c.value_weight * (v - ret_t).square().mean() \
                - c.entropy_weight * dist.entropy().mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()

    def run(
        self, episodes: int, progress: Callable[[int, dict[str, Any]], None] | None = None
    ) -> ReLeQResult:
        history: list[dict[str, Any]] = []
        batch: list[dict[str, Any]] = []
        for i in range(episodes):
            ep = self.episode()
            batch.append(ep)
            history.append({"bits": list(ep["bits"]), "reward": ep["reward"], "acc": ep["acc"]})
            if progress:
                progress(i, history[-1])
            if len(batch) == self.cfg.episodes_per_update:
                self.update(batch)
                batch = []
        best = max(history, key=lambda h: h["reward"]) if history else None
        if best is None:
            raise ValueError("releq: run at least one episode")
        return ReLeQResult(tuple(best["bits"]), best["reward"], best["acc"], self.float_acc, episodes,
                           len(self.cache), history)

    def terminal_reward(self, bits: tuple[Any, ...]) -> float:
        return self._reward(bits, self.accuracy(bits))

    def assignments(self) -> list[tuple[Any, ...]]:
        """Every full assignment the agent can reach: all ``len(actions) ** layers`` of them, or
        under a budget the feasible ones (found depth first through :meth:`feasible`)."""
        if self.cost is None:
            return list(itertools.product(self.actions, repeat=self.n_layers))
        out: list[tuple[Any, ...]] = []

        def walk(prefix: tuple[Any, ...]) -> None:
            if len(prefix) == self.n_layers:
                out.append(prefix)
                return
            for c, ok in zip(self.actions, self.feasible(prefix).tolist(), strict=True):
                if ok:
                    walk((*prefix, c))

        walk(())
        return out


def exhaustive(search: ReLeQ) -> list[tuple[tuple[Any, ...], float, float]]:
    """Every reachable full assignment's ``(bits, terminal reward, accuracy)``, best reward first
    (ties: fewer bits first): the oracle for the agent (one evaluation each, cached like the
    agent's)."""
    out = []
    for bits in search.assignments():
        out.append((bits, search.terminal_reward(bits), search.accuracy(bits)))
    out.sort(key=lambda t: (-t[1], sum(map(search.size, t[0]))))
    return out

