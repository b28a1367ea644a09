"""ReLeQ on MNIST: the PPO agent's per-layer weight bits against the exhaustive oracle.

    python benchmarks/search/releq_mnist.py                 # ~40 min on one core (the oracle dominates)
    python benchmarks/search/releq_mnist.py --episodes 100 --no-oracle

ReLeQ's Caffe LeNet (conv20-5, conv50-5, fc500, fc10; ``releq_lenet``) is trained in float
(``--fp-epochs``, Adam). The environment's measurement is a one-epoch quantization-aware
fine-tune from the float weights on ``--proxy`` training images (``uniform`` weights, MSE scale
per channel, float activations), read on ``--val`` training images that the proxy fine-tunes
never train on (the float model did see them; the test set is not used by the search). Actions
are 2..6 bits per layer (ReLeQ's LeNet setting), so the 5^4 = 625 assignments can all be
measured: the oracle. The agent runs ``--episodes`` episodes with the paper's PPO settings; both
share one cache, and the table says how many distinct assignments the agent itself asked for.
Finally the agent's best, the oracle's best and uniform 2/3/4-bit assignments are fine-tuned
``--final-epochs`` epochs on the full training set and measured on the test set. Writes
``benchmarks/results/releq_mnist.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowbit.data import load_dataset
from lowbit.experiment import RunSpec, train_run
from lowbit.models import build_model
from lowbit.nn.quantize import quantizable_layers, quantize
from lowbit.search import FineTuneEvaluator, ReLeQ, exhaustive
from lowbit.train import TrainConfig, Trainer, load_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results

WEIGHT = {"method": "uniform", "scale": "mse", "per_channel": True}


def run_agent(agent: ReLeQ, episodes: int, progress: Callable[[int, dict[str, Any]], None] | None = None,
              ) -> tuple[Any, int]:
    """``agent.run(episodes)`` and the number of distinct assignments its episodes asked for
    (partial ones included). Counted from the agent's own calls, not from its cache: a search
    resumed after a kill during the oracle reads the oracle's measurements into the cache too."""
    asked: set[tuple[Any, ...]] = set()
    measure = agent.accuracy

    def accuracy(bits: tuple[Any, ...]) -> float:
        asked.add(tuple(bits))
        return measure(bits)

    agent.accuracy = accuracy  # this instance only; the class's method is back after the run
    try:
        result = agent.run(episodes, progress=progress)
    finally:
        del agent.accuracy
    return result, len(asked)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--proxy", type=int, default=2048, help="training images of the proxy fine-tune")
    p.add_argument("--val", type=int, default=2000, help="held-out training images the search reads")
    p.add_argument("--fp-epochs", type=int, default=5)
    p.add_argument("--final-epochs", type=int, default=3)
    p.add_argument("--no-oracle", action="store_true")
    p.add_argument("--runs-dir", default="runs/search")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    runs = Path(a.runs_dir)
    fp_dir = runs / "releq_lenet_fp"
    fp = train_run(RunSpec(model="releq_lenet", dataset="mnist", out=str(fp_dir),
                           train={"epochs": a.fp_epochs, "optimizer": "adam", "lr": 1e-3, "seed": 0}),
                   resume=True)
    data = load_dataset("mnist", batch_size=128, seed=0)
    held, rest = data.train.split(a.val, seed=0)
    proxy = rest.subset(a.proxy, seed=0)

    def make_model() -> torch.nn.Module:
        torch.manual_seed(0)
        m = build_model("releq_lenet")
        load_weights(m, fp_dir / "best.safetensors")
        return m

    proxy_cfg = TrainConfig(epochs=1, optimizer="adam", lr=1e-3, schedule="constant", seed=0,
                            tensorboard=False)
    evaluator = FineTuneEvaluator(make_model, proxy, held, proxy_cfg, WEIGHT)
    float_val = Trainer(make_model(), proxy, held, proxy_cfg).evaluate()["acc"]
    measured: list[tuple[int, ...]] = []

    def counted(bits: tuple[int, ...]) -> float:
        measured.append(bits)
        return evaluator(bits)

    def search(seed: int = 0) -> ReLeQ:
        return ReLeQ(counted, evaluator.layers(), float_val, actions=(2, 3, 4, 5, 6), seed=seed,
                     cache_path=runs / "releq_cache.json")

    agent = search()
    result, agent_cost = run_agent(agent, a.episodes, progress=lambda i, h: print(
        f"episode {i + 1}/{a.episodes}: bits {h['bits']} reward {h['reward']:+.3f} acc {h['acc']:.4f}",
        flush=True) if (i + 1) % 25 == 0 else None)
    asked = {tuple(h["bits"]) for h in result.history}
    oracle = None if a.no_oracle else exhaustive(search())
    rank = None
    if oracle:
        ranks = {b: i for i, (b, _, _) in enumerate(oracle)}
        rank = ranks[result.best_bits]

    def final(bits: tuple[int, ...]) -> float:
        model = make_model()
        names = list(quantizable_layers(model))
        rules = [{"match": n, "weight": {**WEIGHT, "bits": b}} for n, b in zip(names, bits, strict=True)]
        quantize(model, {"default": {"weight": None}, "rules": rules})
        cfg = TrainConfig(epochs=a.final_epochs, optimizer="adam", lr=1e-3, schedule="cosine", seed=0,
                          tensorboard=False)
        tr = Trainer(model, data.train, data.test, cfg)
        tr.fit()
        return float(tr.evaluate()["acc"])

    finals: list[dict[str, Any]] = []
    candidates = [("ReLeQ agent's best", result.best_bits)]
    if oracle:
        candidates.append(("oracle's best (exhaustive)", oracle[0][0]))
    candidates += [(f"uniform {b}-bit", (b,) * 4) for b in (2, 3, 4)]
    for label, bits in candidates:
        acc = final(bits)
        finals.append({"assignment": label, "bits": list(bits), "mean_bits": sum(bits) / len(bits),
                       "search_reward": agent.terminal_reward(bits), "search_val_acc": agent.accuracy(bits),
                       "test_acc": acc})
        print(f"{label:28s} bits {bits} test {100 * acc:.2f}%", flush=True)
    meta = run_meta(
        __file__, argv, t0, seeds=[0], episodes=a.episodes, proxy=a.proxy, val=a.val, fp_epochs=a.fp_epochs,
        final_epochs=a.final_epochs, float_test_acc=fp.test_acc, float_val_acc=float_val,
        agent_distinct_assignments=agent_cost, agent_episode_assignments=len(asked), agent_best_rank=rank,
        oracle_top5=[[list(b), r, acc] for b, r, acc in oracle[:5]] if oracle else None)
    write_results(a.out, "releq_mnist", {"meta": meta, "finals": finals, "history": result.history},
                  render(meta, finals))
    return 0


def render(meta: dict[str, Any], finals: list[dict[str, Any]]) -> str:
    lines = [
        "# ReLeQ on MNIST (ReLeQ's LeNet: conv20-5, conv50-5, fc500, fc10), weight bits 2-6 per layer",
        "",
        f"Command: `{meta['command']}` — torch {meta['torch']}, one thread, total wall time "
        f"{meta['wall_time_s']:.0f} s. Float model: {meta['fp_epochs']} epochs Adam, test accuracy "
        f"{100 * meta['float_test_acc']:.2f}% (validation {100 * meta['float_val_acc']:.2f}%). Search "
        f"measurement: 1-epoch fine-tune on {meta['proxy']} training images, accuracy on {meta['val']} "
        "training images the proxy fine-tunes never see (the float model did); `uniform` weights "
        "(MSE scale per channel), float activations. "
        f"Agent: {meta['episodes']} episodes, PPO with the paper's settings; it asked for "
        f"{meta['agent_distinct_assignments']} distinct assignments (of 625).",
        "",
    ]
    if meta["agent_best_rank"] is not None:
        top = ", ".join(f"{tuple(b)} ({r:+.3f}, {100 * acc:.2f}%)" for b, r, acc in meta["oracle_top5"])
        lines += [f"Exhaustive oracle (all 625 assignments, same measurement): top five by reward: {top}. "
                  f"The agent's best is rank {meta['agent_best_rank'] + 1} of 625.", ""]
    lines += [
        f"Final: each assignment fine-tuned {meta['final_epochs']} epochs on all 60k training images, "
        "test accuracy on the 10k test images.",
        "",
        "| assignment | bits (conv1, conv2, fc1, fc2) | mean bits | search reward | search val acc "
        "| test acc |",
        "|---|---|---|---|---|---|",
    ]
    for f in finals:
        lines.append(f"| {f['assignment']} | {tuple(f['bits'])} | {f['mean_bits']:.2f} | "
                     f"{f['search_reward']:+.3f} | {100 * f['search_val_acc']:.2f}% | "
                     f"{100 * f['test_acc']:.2f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
