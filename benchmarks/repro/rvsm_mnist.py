"""RVSM sparse training of a quantized LeNet-5 on MNIST: sparsity against accuracy, per penalty.

    python benchmarks/repro/rvsm_mnist.py                    # ~10 min on one core
    python benchmarks/repro/rvsm_mnist.py --penalties tl1 --lams 0.01 --epochs 3

Each run starts from the reproduction suite's float LeNet-5 (``runs/repro-val/mnist/s0/fp``) and
fine-tunes ``--epochs`` epochs (Adam, lr 1e-3, cosine) with 4-bit ``uniform`` weights (per
channel) on conv2, fc1 and fc2 (conv1, fc3 and activations float), with RVSM on those three
layers (``beta`` 1) or without it. Sparsity is the fraction of exactly-zero quantized weights of
the three layers in the final model (RVSM's ``u``). Writes
``benchmarks/results/rvsm_mnist.{md,json}``; runs live under ``runs/repro-val/mnist/rvsm``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results
from run_mnist import fp_run, train_seconds

LAYERS = ["conv2", "fc1", "fc2"]


def recipe(method: dict[str, Any] | None) -> dict[str, Any]:
    rules = [{"match": n, "weight": {"method": "uniform", "bits": 4, "per_channel": True}} for n in LAYERS]
    r: dict[str, Any] = {"default": {"weight": None}, "rules": rules}
    if method:
        r["methods"] = [method]
    return r


def sparsity(model: torch.nn.Module) -> float:
    layers = lowbit.quantized_layers(model)
    zeros = sum(int((layers[n].weight == 0).sum()) for n in LAYERS)
    return zeros / sum(layers[n].weight.numel() for n in LAYERS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--penalties", nargs="+", default=["l1", "l0", "tl1"])
    p.add_argument("--lams", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--runs-dir", default="runs/repro-val")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    fp, _, fp_dir = fp_run("mnist", Path(a.runs_dir), 10, 1.0, seed=0)
    jobs: list[tuple[str, dict[str, Any] | None]] = [("none", None)]
    jobs += [(f"{pen} lambda {lam:g}", {"name": "rvsm", "penalty": pen, "lam": lam, "beta": 1.0,
                                        "layers": LAYERS})
             for pen in a.penalties for lam in a.lams]
    rows = []
    for label, method in jobs:
        tag = label.replace(" ", "-")
        out = Path(a.runs_dir) / "mnist" / "rvsm" / tag
        res = train_run(RunSpec(model="lenet5", dataset="mnist", recipe=recipe(method),
                                init=str(fp_dir / "best.safetensors"), out=str(out),
                                train={"epochs": a.epochs, "optimizer": "adam", "lr": 1e-3,
                                       "schedule": "cosine", "weight_decay": 0.0, "seed": 0}), resume=True)
        sp = sparsity(res.model)
        rows.append({"rvsm": label, "test_acc": res.test_acc, "sparsity": sp,
                     "train_s": round(train_seconds(out), 1)})
        print(f"{label:22s} sparsity {100 * sp:5.1f}%  acc {100 * res.test_acc:.2f}%", flush=True)
    meta = run_meta(__file__, argv, t0, seeds=[0], epochs=a.epochs, fp_acc=fp.test_acc)
    lines = [
        "# RVSM sparse training, LeNet-5 on MNIST, 4-bit weights on conv2/fc1/fc2",
        "",
        f"Command: `{meta['command']}` — torch {meta['torch']}, one thread, total wall time "
        f"{meta['wall_time_s']:.0f} s. From the float LeNet-5 ({100 * fp.test_acc:.2f}%), {a.epochs} epochs "
        "(Adam, lr 1e-3, cosine) with 4-bit `uniform` weights (per channel) on conv2, fc1, fc2 and RVSM "
        "(beta 1) on those layers. Sparsity: exactly-zero quantized weights of the three layers in the "
        "final model. One run per row (seed 0). The packed format stores zeros as ordinary codes: "
        "sparsity is not yet turned into bytes.",
        "",
        "| RVSM penalty | sparsity | test acc | train time (s) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['rvsm']} | {100 * r['sparsity']:.1f}% | {100 * r['test_acc']:.2f}% | "
                     f"{r['train_s']:.0f} |")
    write_results(a.out, "rvsm_mnist", {"meta": meta, "rows": rows}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
