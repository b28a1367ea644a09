"""DCQ and knowledge distillation against plain straight-through training, MNIST LeNet-5.

    python benchmarks/repro/distill_mnist.py                  # ~10 min, two single-thread processes
    python benchmarks/repro/distill_mnist.py --bits 1 --epochs 3

Every layer of LeNet-5 is quantized (DoReFa weights at ``--bits``, DoReFa 2-bit activations on
every layer input but the image): the regime where the DCQ paper reports its gains over DoReFa.
Each row starts from the reproduction suite's shared float LeNet-5 (``runs/repro-val/mnist/s0/fp``, the
teacher too) and trains ``--epochs`` epochs (Adam, lr 1e-3, cosine) with cross-entropy (plain
DoReFa), with KD from the float teacher (alpha 0.9, T 4), or with DCQ (sections cut after
pool1 and pool2; sectioned for all but the last epoch, then whole-model KD). Writes
``benchmarks/results/distill_mnist.{md,json}``; runs live under ``runs/repro-val/mnist/distill``
and a rerun reuses finished ones.
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
from run_mnist import commit_text, fp_run, train_seconds


def recipe(bits: int, method: dict[str, Any] | None) -> dict[str, Any]:
    r: dict[str, Any] = {
        "name": f"dorefa-w{bits}a2-all",
        "default": {"weight": {"method": "dorefa", "bits": bits},
                    "activation": {"method": "dorefa", "bits": 2}},
        "rules": [{"match": "@first", "activation": None}],
    }
    if method:
        r["methods"] = [method]
    return r


def one(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    spec = RunSpec(model="lenet5", dataset="mnist", recipe=job["recipe"], init=job["init"], out=job["out"],
                   train={"epochs": job["epochs"], "optimizer": "adam", "lr": 1e-3, "schedule": "cosine",
                          "weight_decay": 0.0, "seed": 0})
    res = train_run(spec, resume=True)
    return {**{k: v for k, v in job.items() if k != "recipe"}, "test_acc": res.test_acc,
            "packed_bytes": res.size["file_bytes"] if res.size else None,
            "train_s": round(train_seconds(Path(job["out"])), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs-dir", default="runs/repro-val")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    t0 = time.time()
    fp, _, fp_dir = fp_run("mnist", Path(a.runs_dir), 10, 1.0, seed=0)
    init = str(fp_dir / "best.safetensors")
    teacher = str(fp_dir)
    methods = [
        ("DoReFa (cross-entropy)", None),
        ("KD", {"name": "kd", "teacher": teacher, "alpha": 0.9, "temperature": 4.0}),
        ("DCQ", {"name": "dcq", "teacher": teacher, "dcq_epochs": max(0, a.epochs - 1)}),
    ]
    jobs = []
    for bits in a.bits:
        for label, method in methods:
            tag = "ce" if method is None else method["name"]
            out = Path(a.runs_dir) / "mnist" / "distill" / f"w{bits}-{tag}"
            jobs.append({"bits": bits, "method": label, "recipe": recipe(bits, method), "init": init,
                         "epochs": a.epochs, "out": str(out)})
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(one, jobs))
    for r in rows:
        print(f"W{r['bits']}/A2 {r['method']:24s} {100 * r['test_acc']:.2f}%", flush=True)
    meta = run_meta(__file__, argv, t0, seeds=[0], epochs=a.epochs, fp_acc=fp.test_acc)
    write_results(a.out, "distill_mnist", {"meta": meta, "rows": rows}, render(meta, rows))
    return 0


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# DCQ and knowledge distillation vs plain DoReFa, MNIST LeNet-5, every layer quantized",
        "",
        f"Command: `{meta['command']}` — {commit_text(meta)}, torch {meta['torch']}, one thread per run, "
        "total wall time "
        f"{meta['wall_time_s']:.0f} s. Every row starts from the shared float LeNet-5 "
        f"(test accuracy {100 * meta['fp_acc']:.2f}%), which is also the teacher, and trains "
        f"{meta['epochs']} epochs (Adam, lr 1e-3, cosine). DoReFa weights at the bits shown, DoReFa 2-bit "
        "activations on every layer input but the image. KD: alpha 0.9, T 4. DCQ: sections cut after "
        "pool1 and pool2, trained on the teacher's features for all epochs but the last, then whole-model "
        "KD. One run per row (seed 0).",
        "",
        "| W/A bits | training | test acc | drop vs float (pp) | packed bytes | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = f"{r['packed_bytes']:,}" if r["packed_bytes"] else "-"
        lines.append(f"| W{r['bits']}/A2 | {r['method']} | {100 * r['test_acc']:.2f}% | "
                     f"{100 * (meta['fp_acc'] - r['test_acc']):+.2f} | {size} | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
