"""ResNet-20 on CIFAR-10 on a CPU: a short float training, then quantized fine-tunes from it.

    python benchmarks/repro/run_cifar10.py                          # ~40 min on 2 cores
    python benchmarks/repro/run_cifar10.py --fp-epochs 30 --q-epochs 10 --recipes dorefa-w2a4

Data: the CIFAR-10 JPEG image-folder zip (``--data-dir``, default ``../shared/data``; near-original,
not lossless: accuracy is close to, not identical with, accuracy on the original files), standard
crop + flip augmentation. The float ResNet-20 trains ``--fp-epochs`` epochs (SGD momentum 0.9,
lr 0.1, weight decay 5e-4, cosine); each recipe then fine-tunes ``--q-epochs`` epochs from its best
checkpoint with the recipe's own optimizer settings. These budgets are far below the papers'
(160-200 epochs), so the numbers are a CPU-budget baseline, not a reproduction of the papers'
tables. Writes ``benchmarks/results/cifar10.{md,json}``; runs live under ``runs/cifar10`` and a
rerun reuses finished ones.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from lowbit.experiment import RunSpec, train_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results
from run_mnist import bits_of, train_seconds


def one(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(job["threads"])
    spec = RunSpec(model="resnet20", dataset="cifar10", data_dir=job["data_dir"], recipe=job["recipe"],
                   init=job["init"], out=job["out"], train=job["train"])
    res = train_run(spec, resume=True)
    return {"recipe": job["recipe"], "test_acc": res.test_acc, "epochs": job["train"]["epochs"],
            "packed_bytes": res.size["file_bytes"] if res.size else None,
            "train_s": round(train_seconds(Path(job["out"])), 1), "out": job["out"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--fp-epochs", type=int, default=15)
    p.add_argument("--q-epochs", type=int, default=5)
    p.add_argument("--recipes", nargs="+", default=["dorefa-w2a4", "lenet5-w1a4"])
    p.add_argument("--runs-dir", default="runs/cifar10")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    t0 = time.time()
    runs = Path(a.runs_dir)
    fp_train = {"epochs": a.fp_epochs, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                "schedule": "cosine", "seed": 0}
    fp = one({"recipe": None, "init": None, "out": str(runs / "fp"), "train": fp_train, "threads": 2,
              "data_dir": a.data_dir})
    init = str(runs / "fp" / "best.safetensors")
    jobs = [{"recipe": r, "init": init, "out": str(runs / r), "train": {"epochs": a.q_epochs, "seed": 0},
             "threads": 1, "data_dir": a.data_dir} for r in a.recipes]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(one, jobs))
    for r in rows:
        wb, ab, kept = bits_of(r["recipe"])
        r.update(w_bits=wb, a_bits=ab, float_layers=kept)
        print(f"{r['recipe']:16s} W{wb}/A{ab} acc {100 * r['test_acc']:.2f}% "
              f"(float {100 * fp['test_acc']:.2f}%)")
    meta = run_meta(__file__, argv, t0, seeds=[0], fp=fp)
    lines = [
        "# ResNet-20 on CIFAR-10 (JPEG copy), short CPU budget",
        "",
        f"Command: `{meta['command']}` — torch {meta['torch']}, total wall time "
        f"{meta['wall_time_s']:.0f} s. "
        f"Float ResNet-20: {fp['epochs']} epochs (SGD momentum 0.9, lr 0.1, weight decay 5e-4, cosine, "
        f"crop + flip), test accuracy {100 * fp['test_acc']:.2f}% ({fp['train_s']:.0f} s on 2 threads). "
        "Each recipe fine-tunes from the float model's best checkpoint with its own optimizer "
        "settings, one thread, two runs side by side. Data: the JPEG image-folder copy of CIFAR-10 "
        "(close to, not identical with, the original files). Budgets far below the papers' 160-200 "
        "epochs: a CPU baseline, not a reproduction of their tables. One run per row (seed 0).",
        "",
        "| recipe | W/A bits | float layers | test acc | drop vs float (pp) | packed bytes | epochs "
        "| train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = f"{r['packed_bytes']:,}" if r["packed_bytes"] else "-"
        lines.append(f"| `{r['recipe']}` | W{r['w_bits']}/A{r['a_bits']} | {r['float_layers']} | "
                     f"{100 * r['test_acc']:.2f}% | {100 * (fp['test_acc'] - r['test_acc']):+.2f} | {size} | "
                     f"{r['epochs']} | {r['train_s']:.0f} |")
    write_results(a.out, "cifar10", {"meta": meta, "rows": rows}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
