"""Structured sparsity with group lasso and Weight Penalty Clipping, ternary LeNet-5 on MNIST.

    python benchmarks/repro/wpc_mnist.py                     # ~6 min on one core
    python benchmarks/repro/wpc_mnist.py --lams 1e-4 --epochs 3

Each run starts from the reproduction suite's float LeNet-5 (``runs/repro-val/mnist/s0/fp``) and
fine-tunes ``--epochs`` epochs (Adam, lr 1e-3, cosine) with TWN ternary weights on conv2, fc1 and
fc2 (conv1, fc3 and activations float), without a sparsity penalty, with the plain group lasso
(``wpc: false``) or with Weight Penalty Clipping (``wpc: true``), groups of one output channel by
4 input channels (``group: pe``). Skippable groups: groups whose ternary weights are all zero.
alpha / alpha_0: the mean ternary scale of the three layers against the unpenalized run's.
Writes ``benchmarks/results/wpc_mnist.{md,json}``; runs live under ``runs/repro-val/mnist/wpc``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

import lowbit
from lowbit.experiment import RunSpec, train_run
from lowbit.prune import structured_sparsity

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results
from run_mnist import fp_run, train_seconds

LAYERS = ["conv2", "fc1", "fc2"]


def recipe(method: dict[str, Any] | None) -> dict[str, Any]:
    rules = [{"match": n, "weight": {"method": "twn", "bits": 2}} for n in LAYERS]
    r: dict[str, Any] = {"default": {"weight": None}, "rules": rules}
    if method:
        r["methods"] = [method]
    return r


def mean_alpha(model: torch.nn.Module) -> float:
    layers = lowbit.quantized_layers(model)
    return sum(float(layers[n].weight.detach().abs().max()) for n in LAYERS) / len(LAYERS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lams", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--runs-dir", default="runs/repro-val")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    fp, _, fp_dir = fp_run("mnist", Path(a.runs_dir), 10, 1.0, seed=0)
    jobs: list[tuple[str, dict[str, Any] | None]] = [("none", None)]
    for lam in a.lams:
        for wpc in (False, True):
            label = f"{'WPC' if wpc else 'group lasso'} lambda {lam:g}"
            jobs.append((label, {"name": "wpc", "lam": lam, "group": "pe", "pe_in": 4, "wpc": wpc,
                                 "layers": LAYERS}))
    rows = []
    alpha0 = None
    for label, method in jobs:
        out = Path(a.runs_dir) / "mnist" / "wpc" / label.replace(" ", "-")
        res = train_run(RunSpec(model="lenet5", dataset="mnist", recipe=recipe(method),
                                init=str(fp_dir / "best.safetensors"), out=str(out),
                                train={"epochs": a.epochs, "optimizer": "adam", "lr": 1e-3,
                                       "schedule": "cosine", "weight_decay": 0.0, "seed": 0}), resume=True)
        sp = [r for r in structured_sparsity(res.model, "pe", 4) if r.layer in LAYERS]
        groups = sum(r.groups for r in sp)
        zero_groups = sum(r.zero_groups for r in sp)
        alpha = mean_alpha(res.model)
        alpha0 = alpha if alpha0 is None else alpha0
        rows.append({"run": label, "test_acc": res.test_acc, "skippable_groups": zero_groups / groups,
                     "zero_weights": sum(r.zero_weights * r.groups for r in sp) / groups,
                     "alpha_ratio": alpha / alpha0, "train_s": round(train_seconds(out), 1)})
        print(f"{label:26s} skippable groups {100 * zero_groups / groups:5.1f}%  alpha {alpha / alpha0:.2f}  "
              f"acc {100 * res.test_acc:.2f}%", flush=True)
    meta = run_meta(__file__, argv, t0, seeds=[0], epochs=a.epochs, fp_acc=fp.test_acc)
    lines = [
        "# Group lasso with Weight Penalty Clipping, ternary LeNet-5 on MNIST",
        "",
        f"Command: `{meta['command']}` — torch {meta['torch']}, one thread, total wall time "
        f"{meta['wall_time_s']:.0f} s. From the float LeNet-5 ({100 * fp.test_acc:.2f}%), {a.epochs} epochs "
        "(Adam, lr 1e-3, cosine) with TWN ternary weights on conv2, fc1, fc2; penalty groups: one output "
        "channel x 4 input channels. Skippable groups: all-zero ternary groups of the three layers. "
        "alpha ratio: mean ternary scale against the unpenalized run. One run per row (seed 0).",
        "",
        "| penalty | skippable groups | zero weights | alpha ratio | test acc | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {100 * r['skippable_groups']:.1f}% | {100 * r['zero_weights']:.1f}% | "
                     f"{r['alpha_ratio']:.2f} | {100 * r['test_acc']:.2f}% | {r['train_s']:.0f} |")
    write_results(a.out, "wpc_mnist", {"meta": meta, "rows": rows}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
