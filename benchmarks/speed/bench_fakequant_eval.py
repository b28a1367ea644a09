"""Eval-mode cost of a fake-quantized model against its float twin (weight cache on and off).

MLP 784-4096-4096-10 at batch 1, one thread, ``model.eval()`` under ``torch.no_grad()``. For each
weight method the quantized model (the layer inputs quantized too when the row says so) is timed
with the eval-mode weight cache (``WeightQuantizer`` reuses the quantized weight while nothing
changed) and without it (the cache dropped before every call: what every call cost before the
cache existed). Timings are interleaved rounds (one call of each variant per round, after
warm-up), median over rounds.

    python benchmarks/speed/bench_fakequant_eval.py [--rounds 30] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results

import lowbit
from lowbit.nn import weight_quantizers

METHODS = {
    "binary": {"method": "binary", "bits": 1},
    "twn": {"method": "twn", "bits": 2},
    "lsq-4": {"method": "lsq", "bits": 4},
    "uniform-4-mse": {"method": "uniform", "bits": 4, "scale": "mse"},
}
ACT = {"method": "pact", "bits": 4, "alpha_init": 4.0}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 10))


def _drop_cache(model: nn.Module) -> None:
    for _, _, q in weight_quantizers(model).values():
        q._cache = None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--uncached-rounds", type=int, default=3, help="rounds for the slow uncached calls")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fp = mlp().eval()
    x = torch.randn(1, 1, 28, 28)
    variants: dict[str, tuple[nn.Module, bool]] = {"float": (fp, False)}
    for name, spec in METHODS.items():
        for act in (False, True):
            m = copy.deepcopy(fp)
            lowbit.quantize(m, {"default": {"weight": spec, "activation": ACT if act else None},
                                "rules": [{"match": "@first", "activation": None}]})
            m.eval()
            variants[f"{name}{'+a4' if act else ''}"] = (m, True)
    times: dict[str, list[float]] = {k: [] for k in variants}
    uncached: dict[str, list[float]] = {k: [] for k, (_, q) in variants.items() if q}
    with torch.no_grad():
        for m, _ in variants.values():  # warm-up (numba compile, first cache fill)
            m(x)
        for r in range(args.rounds):
            for k, (m, _) in variants.items():
                t = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t)
            if r < args.uncached_rounds:
                for k in uncached:
                    m = variants[k][0]
                    _drop_cache(m)
                    t = time.perf_counter()
                    m(x)
                    uncached[k].append(time.perf_counter() - t)
    f = statistics.median(times["float"])
    rows = []
    for k in variants:
        med = statistics.median(times[k])
        row = {"model": k, "cached_ms": med * 1e3, "ratio_vs_float": med / f}
        if uncached.get(k):
            u = statistics.median(uncached[k])
            row.update(uncached_ms=u * 1e3, uncached_ratio_vs_float=u / f)
        rows.append(row)
    md = ["# Eval-mode fake-quantized forward vs float (MLP 784-4096-4096-10, batch 1, 1 thread)", "",
          "`model.eval()` under `torch.no_grad()`; median of interleaved rounds "
          f"({args.rounds} rounds cached, {args.uncached_rounds} uncached). Single run.", "",
          "| model | cached (ms) | x float | no cache (ms) | x float |", "|---|---|---|---|---|"]
    for r in rows:
        u = f"{r['uncached_ms']:.1f} | {r['uncached_ratio_vs_float']:.1f}" if "uncached_ms" in r else "- | -"
        md.append(f"| {r['model']} | {r['cached_ms']:.2f} | {r['ratio_vs_float']:.2f} | {u} |")
    meta = run_meta(__file__, argv, t0, seeds=[0])
    write_results(args.out, "fakequant_eval", {"meta": meta, "rows": rows}, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
