"""One compiled Linear layer with 5-bit DoReFa weights at batch 1: as built now (the GEMV on 8-bit
fields, run per module) against the build before 8-bit fields (no fields: an int8 copy in int8
parts, which the flat executor runs), beside the 4-bit layer (the GEMV on 4-bit fields), in one
process, whole compiled-model calls.

    python benchmarks/speed/ab_linear_wide_flat.py

One thread, ``harness.time_interleaved``; only ratios within a size count (the machine may be
loaded). Writes benchmarks/results/ab_linear_wide_flat.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, run_meta, write_results
from harness import _infer, set_threads, time_interleaved


def _model(bits: int, n: int, seed: int) -> nn.Module:
    import lowbit

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(n, n)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(m, {"default": {"weight": {"method": "dorefa", "bits": bits},
                                        "activation": {"method": "pact", "bits": 8, "alpha_init": 3.0}}})
    return m


def main(argv: list[str] | None = None) -> None:
    from lowbit.runtime import compile as rt_compile
    from lowbit.runtime import layers as L

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--budget", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0, help="the weights, the inputs and the rounds' order")
    args = p.parse_args(argv)
    t0 = time.time()
    set_threads(1)
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        x = torch.rand(1, n, generator=torch.Generator().manual_seed(args.seed)) * 3
        m5 = _model(5, n, args.seed)
        new = rt_compile(m5, x)
        real = L.gemv_weights
        L.gemv_weights = lambda wp, q=None, wide=False, real=real: real(wp, q, False)  # no 8-bit fields
        try:
            old = rt_compile(m5, x)
        finally:
            L.gemv_weights = real
        m4 = rt_compile(_model(4, n, args.seed), x)
        ref = _infer(old, x)
        assert float((_infer(new, x) - ref).abs().max() / ref.abs().max()) < 1e-6
        models = {"w5 gemv 8-bit fields": new, "w5 int8 parts (flat, before)": old,
                  "w4 gemv 4-bit fields": m4}
        tm = time_interleaved({k: (lambda pm=pm, x=x: _infer(pm, x)) for k, pm in models.items()},
                              max_rounds=5000, budget_s=args.budget, seed=args.seed)
        base = tm["w5 gemv 8-bit fields"]["median_s"]
        for k, pm in models.items():
            pl = next(iter(pm.packed_layers().values()))
            rows.append({"N": n, "model": k, "median_us": tm[k]["median_s"] * 1e6,
                         "time_vs_new": tm[k]["median_s"] / base, "kernel": pl.kernel_name(),
                         "runs_flat": bool(pl.runs_flat)})
    meta = run_meta(__file__, argv, t0, seeds=[args.seed], threads=1)
    md = ["# Batch 1: 8-bit-field GEMV against the int8 copy in the flat executor", "",
          f"`{meta['command']}` (commit {meta['git'].get('commit', '?')[:10]}). One thread, interleaved, "
          "possibly loaded machine: compare within a size.", "",
          "| N | model | median us | vs w5 gemv | flat | kernel |", "|---|---|---|---|---|---|"]
    md += [f"| {r['N']} | {r['model']} | {r['median_us']:.1f} | {r['time_vs_new']:.2f} | {r['runs_flat']} | "
           f"{r['kernel']} |" for r in rows]
    write_results(ROOT / "benchmarks" / "results", "ab_linear_wide_flat", {"meta": meta, "rows": rows},
                  "\n".join(md))


if __name__ == "__main__":
    main()
