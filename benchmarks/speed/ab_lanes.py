"""A/B: one-channel first layers on the pixel lanes (``kernels_lanes``) against the channel lanes.

    python benchmarks/speed/ab_lanes.py                      # LeNet-5, ~1 min, one core free
    python benchmarks/speed/ab_lanes.py --batches 1 8 64 --out /tmp/ab

The same quantized model is compiled three times: ``executor.LANES`` off (the first layer on the
int8 kernel's channel lanes, as before: ``channel``), on without the max pool fused into it
(``pixel``, ``executor.FUSE_POOL`` off) and on with it (``fused``); their outputs are checked equal
bit for bit, then all are timed in the same interleaved rounds (``harness.time_interleaved``,
turns), one thread. Ratios = channel median / the arm's median. Writes ``<out>/ab_lanes.{json,md}``
(default: benchmarks/results).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_threads_contamination import MachineShare
from common import run_meta, write_results
from harness import CASES, float_case, quantized_model, set_threads, time_interleaved

from lowbit.runtime import compile as rt_compile
from lowbit.runtime import executor as E

RESULTS = Path(__file__).resolve().parents[1] / "results"
ARMS = (("channel", False, False), ("pixel", True, False), ("fused", True, True))  # (name, LANES, FUSE_POOL)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["lenet5"], choices=list(CASES))
    p.add_argument("--variants", nargs="+", default=["w1a4", "w2a4", "w4a4"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--budget-s", type=float, default=3.0, help="time budget of one interleaved block")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="ab_lanes")
    p.add_argument("--note", default="", help="what else ran on the machine, for the report")
    a = p.parse_args(argv)
    t0 = time.time()
    share = MachineShare()
    set_threads(1)
    rows = []
    for name in a.cases:
        case = CASES[name]
        fm, x_all = float_case(case, max(a.batches))
        for v in a.variants:
            if v not in case.variants:
                continue
            qm = quantized_model(fm, v)
            keep = E.LANES, E.FUSE_POOL
            models = {}
            try:
                for arm, lanes, fuse in ARMS:
                    E.LANES, E.FUSE_POOL = lanes, fuse
                    models[arm] = rt_compile(qm, x_all[:8])
            finally:
                E.LANES, E.FUSE_POOL = keep
            kinds = [int(r[29]) for r in models["fused"].executor.program(tuple(x_all.shape[1:])).prog
                     if r[0] == E.OP_CONV]
            for b in a.batches:
                x = x_all[:b].contiguous()
                ref = models["channel"](x)
                for arm, m in models.items():
                    if not torch.equal(m(x), ref):
                        raise AssertionError(f"{name}/{v} b{b}: {arm} differs from the channel lanes")
                fns = {arm: (lambda x=x, m=m: m(x)) for arm, m in models.items()}
                t = time_interleaved(fns, 400, a.budget_s, turns=True)
                row = {"case": name, "variant": v, "batch": b, "rounds": t["channel"]["rounds"],
                       "lanes_layers": sum(k in (2, 3) for k in kinds),
                       "fused_pools": sum(k == 3 for k in kinds)}
                for arm in models:
                    row[f"us_{arm}"] = 1e6 * t[arm]["median_s"]
                    row[f"min_us_{arm}"] = 1e6 * t[arm]["min_s"]
                    row[f"ratio_{arm}"] = t["channel"]["median_s"] / t[arm]["median_s"]
                rows.append(row)
                print(rows[-1], flush=True)
    meta = run_meta(__file__, argv, t0, seeds=[0], note=a.note, **share.stop())
    md = ["# A/B: one-channel layers on the pixel lanes against the channel lanes", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
          f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; {MachineShare.sentence(meta)}; single "
          "run, one thread." + (f" {a.note}" if a.note else ""), "",
          "channel: `executor.LANES = False` (every convolution on the int8 kernel's channel lanes); "
          "pixel: layers with one input channel and at most 8 outputs on `kernels_lanes` (`lanes layers`), "
          "`executor.FUSE_POOL = False`; fused: the same, writing the codes of the 2x2 max pool after them "
          "(`fused pools`). Outputs equal bit for bit; interleaved rounds with turns; cells: median us "
          "(min), channel median / it.", "",
          "| case | variant | batch | lanes layers | fused pools | channel | pixel | fused | rounds |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r[f'us_{arm}']:.1f} ({r[f'min_us_{arm}']:.1f}, {r[f'ratio_{arm}']:.2f}x)"
                 for arm, _, _ in ARMS]
        md.append(f"| {r['case']} | {r['variant']} | {r['batch']} | {r['lanes_layers']} | "
                  f"{r['fused_pools']} | " + " | ".join(cells) + f" | {r['rounds']} |")
    write_results(a.out, a.name, {"meta": meta, "rows": rows}, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
