"""One quantized slimmable LeNet-5 against four separately trained widths, MNIST.

    python benchmarks/repro/slimmable_mnist.py               # ~15 min on one core
    python benchmarks/repro/slimmable_mnist.py --epochs 2 --widths 0.5 1.0

Every layer but the first and last gets binary weights (per channel) and every layer input but
the image 4-bit PACT activations. The supernet (widths ``--widths``, per-width BatchNorm) is
trained from scratch ``--epochs`` epochs with the sandwich rule (widest, narrowest and one random
width per step, in-place distillation); each width is also trained alone for the same epochs as
an ordinary LeNet-5 with that width multiplier (Adam, lr 2e-3, cosine, for both). Test accuracy
per width. Writes ``benchmarks/results/slimmable_mnist.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit.data import load_dataset
from lowbit.models import build_model
from lowbit.nn.slimmable import SlimmableChain
from lowbit.train import TrainConfig, Trainer, evaluate
from lowbit.train.sandwich import SandwichLoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results

RECIPE = {"default": {"weight": {"method": "binary", "bits": 1, "per_channel": True},
                      "activation": {"method": "pact", "bits": 4}},
          "rules": [{"match": "@first", "weight": None, "activation": None},
                    {"match": "@last", "weight": None}]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    data = load_dataset("mnist", batch_size=128, seed=0)
    cfg = TrainConfig(epochs=a.epochs, optimizer="adam", lr=2e-3, schedule="cosine", seed=0,
                      tensorboard=False)

    torch.manual_seed(0)
    net = lowbit.quantize(build_model("lenet5"), RECIPE)
    supernet = SlimmableChain(net, widths=a.widths)
    t = time.perf_counter()
    Trainer(supernet, data.train, None, cfg, loss_fn=SandwichLoss(n_random=1, seed=0)).fit()
    super_s = time.perf_counter() - t
    rows = []
    for r in supernet.widths:
        supernet.set_width(r)
        rows.append({"width": r, "supernet_acc": evaluate(supernet, data.test)["acc"]})
    for row in rows:
        torch.manual_seed(0)
        alone = lowbit.quantize(build_model("lenet5", width_mult=row["width"]), RECIPE)
        t = time.perf_counter()
        Trainer(alone, data.train, None, cfg).fit()
        row["alone_s"] = round(time.perf_counter() - t, 1)
        row["alone_acc"] = evaluate(alone, data.test)["acc"]
        print(f"width {row['width']:.2f}: supernet {100 * row['supernet_acc']:.2f}%  "
              f"alone {100 * row['alone_acc']:.2f}%", flush=True)
    meta = run_meta(__file__, argv, t0, seeds=[0], epochs=a.epochs, supernet_train_s=round(super_s, 1))
    lines = [
        "# One slimmable binary LeNet-5 against separately trained widths, MNIST",
        "",
        f"Command: `{meta['command']}` — torch {meta['torch']}, one thread, total wall time "
        f"{meta['wall_time_s']:.0f} s. Binary weights (per channel) on every layer but the first and last, "
        f"4-bit PACT activations on every layer input but the image; from scratch, {a.epochs} epochs, Adam "
        "lr 2e-3, cosine. Supernet: sandwich rule (widest, narrowest, one random width per step, in-place "
        f"distillation), per-width BatchNorm, trained once in {meta['supernet_train_s']:.0f} s. Alone: a "
        "LeNet-5 with that width multiplier, trained by itself. One run per row (seed 0).",
        "",
        "| width | supernet test acc | trained alone | alone train time (s) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['width']:.2f} | {100 * r['supernet_acc']:.2f}% | {100 * r['alone_acc']:.2f}% | "
                     f"{r['alone_s']:.0f} |")
    write_results(a.out, "slimmable_mnist", {"meta": meta, "rows": rows}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
