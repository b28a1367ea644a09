"""Bit-width or width? LeNet-5 at equal weight storage, one network-wide bit-width per row.

    python benchmarks/search/width_budget.py                  # ~25 min, two single-thread processes
    python benchmarks/search/width_budget.py --dataset mnist --ref-bits 2 --epochs 4

For each budget (the weight storage of the width-1 LeNet-5 at ``--ref-bits`` bits; first and last
layer float, 32 bits per float parameter) and each bit-width in ``--bits``, the widest LeNet-5
that fits (:func:`lowbit.search.width_for_budget`) is trained from scratch for ``--epochs`` epochs
(Adam, lr 2e-3, cosine) with that bit-width on every weight but the first and last layer's
(``binary`` per channel at 1 bit, ``lsq`` per channel above; activations float) and measured on
the test set. Writes ``benchmarks/results/width_budget.{md,json}``; runs live under
``runs/width``, and a rerun reuses finished ones.
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
from lowbit.models import build_model
from lowbit.search import model_weight_bits, width_for_budget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results


def recipe(bits: int) -> dict[str, Any]:
    weight = ({"method": "binary", "bits": 1, "per_channel": True} if bits == 1
              else {"method": "lsq", "bits": bits, "per_channel": True})
    return {"default": {"weight": weight}, "rules": [{"match": "@first", "weight": None},
                                                     {"match": "@last", "weight": None}]}


def one(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    res = train_run(RunSpec(model="lenet5", model_kwargs={"width_mult": job["width"]}, dataset=job["dataset"],
                            recipe=recipe(job["bits"]), out=job["out"],
                            train={"epochs": job["epochs"], "optimizer": "adam", "lr": 2e-3,
                                   "schedule": "cosine", "weight_decay": 0.0, "seed": 0}), resume=True)
    return {**job, "test_acc": res.test_acc}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--ref-bits", type=int, nargs="+", default=[2, 4],
                   help="budgets: width-1 storage at these bits")
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs-dir", default="runs/width")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    t0 = time.time()

    def build(m: float) -> torch.nn.Module:
        return build_model("lenet5", width_mult=m)

    jobs = []
    for ref in a.ref_bits:
        budget = model_weight_bits(build(1.0), ref)
        for bits in a.bits:
            m, size = width_for_budget(build, bits, budget)
            jobs.append({"dataset": a.dataset, "budget_bits": budget, "ref_bits": ref, "bits": bits,
                         "width": round(m, 4), "storage_bits": size, "epochs": a.epochs,
                         "params": sum(q.numel() for q in build(round(m, 4)).parameters()),
                         "out": str(Path(a.runs_dir) / a.dataset / f"budget{ref}-w{bits}")})
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(one, jobs))
    for r in rows:
        print(f"budget {r['budget_bits']:,} bits: W{r['bits']} width {r['width']:.3f} "
              f"acc {100 * r['test_acc']:.2f}%")
    meta = run_meta(__file__, argv, t0, seeds=[0], dataset=a.dataset, epochs=a.epochs)
    lines = [
        f"# Bit-width or width at equal weight storage: LeNet-5 on {a.dataset}",
        "",
        f"Command: `{meta['command']}` — torch {meta['torch']}, one thread per run, total wall time "
        f"{meta['wall_time_s']:.0f} s. Budget: the weight storage of the width-1 LeNet-5 at the reference "
        "bits (first and last layer float at 32 bits, like every bias and BN parameter). Each row: the "
        f"widest LeNet-5 within the budget at that bit-width, trained from scratch {a.epochs} epochs (Adam, "
        "lr 2e-3, cosine); binary (1 bit) or LSQ weights per channel, activations float. One run per row.",
        "",
        "| budget (bits) | = width 1 at | W bits | width | storage (bits) | parameters | test acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['budget_bits']:,} | {r['ref_bits']} bits | {r['bits']} | {r['width']:.3f} | "
                     f"{r['storage_bits']:,} | {r['params']:,} | {100 * r['test_acc']:.2f}% |")
    write_results(a.out, "width_budget", {"meta": meta, "rows": rows}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
