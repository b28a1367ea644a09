"""Few rows (2-8) of Linear layers with lookup tables: the GEMV on weight fields up to 7 rows and
the tables from 8 (before) against the tables from ``kernels_gemm.lut_min_rows`` (after: 3 rows for
binary weights, 5 for ternary and 2-bit), in one process and one interleaved run per variant and
row count.

    python benchmarks/speed/ab_lut_min_rows.py [--variants w1a4 w2a4 w2ua4] [--rows 2 3 4 5 6 7 8]

``lowbit.runtime.compile`` of the 8-layer 4096-wide MLP of the speed benchmark once per variant
(binary, TWN ternary on the base-3 tables, DoReFa 2-bit weights, each with 4-bit PACT codes); the
two arms are the same packed model called with ``kernels_gemm.LUT_MIN_ROWS_CB`` emptied (before)
or as shipped (after). Their outputs are checked against each other first: equal bit for bit, or
for the 2-bit weights within 1e-6 (the GEMV's epilogue for four-level weights rounds differently
from the tables'; both are tested against the float64 reference). One thread;
``harness.time_interleaved`` (each arm's turn: an untimed call, then the timed one; a new random
order each round), medians of the calling thread's CPU time. Writes ``<out>/<name>.{json,md}``
(default ``epyc_zen4/ab_lut_min_rows``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from common import ROOT, run_meta, write_results
from harness import VARIANTS, _pact, deep_mlp, quantized_model, set_threads, time_interleaved

from lowbit.runtime import compile as rt_compile
from lowbit.runtime import kernels_gemm as KG

EXTRA = {"w2ua4": ({"method": "dorefa", "bits": 2}, _pact(4), "DoReFa 2-bit weights x 4-bit PACT codes")}
ARMS = ("before", "after")


def measure(variants: list[str], rows: list[int], budget_s: float, seed: int) -> tuple[list[dict], dict]:
    torch.manual_seed(seed)
    fm = deep_mlp(4096, 8).eval()
    shipped = dict(KG.LUT_MIN_ROWS_CB)
    out, kernels = [], {}
    for v in variants:
        VARIANTS.update(EXTRA)
        model = rt_compile(quantized_model(fm, v), torch.rand(8, 4096))
        kernels[v] = model.layers[0].detail

        def call(x, arm, model=model):
            KG.LUT_MIN_ROWS_CB.clear()
            if arm == "after":
                KG.LUT_MIN_ROWS_CB.update(shipped)
            try:
                return model(x)
            finally:
                KG.LUT_MIN_ROWS_CB.clear()
                KG.LUT_MIN_ROWS_CB.update(shipped)

        for M in rows:
            x = torch.rand(M, 4096, generator=torch.Generator().manual_seed(seed + M))
            a, b = call(x, "before"), call(x, "after")
            if not torch.allclose(a, b, rtol=0, atol=1e-6 * float(a.abs().max())):
                raise SystemExit(f"{v} at {M} rows: the two arms' outputs differ")
            t = time_interleaved({arm: (lambda x=x, arm=arm: call(x, arm)) for arm in ARMS}, max_rounds=200,
                                 budget_s=budget_s, seed=seed, turns=True, clock=time.thread_time)
            med = {arm: 1e3 * t[arm]["median_s"] for arm in ARMS}
            out.append({"variant": v, "rows": M, "rounds": t["after"]["rounds"],
                        "equal": bool(torch.equal(a, b)), **{f"{arm}_ms": med[arm] for arm in ARMS},
                        "before_over_after": med["before"] / med["after"]})
            print(out[-1], flush=True)
    return out, {"kernels": kernels, "lut_min_rows": {str(k): KG.lut_min_rows(k) for k in shipped}}


def to_markdown(rows: list[dict], info: dict, meta: dict) -> str:
    return "\n".join([
        "# Few rows on the lookup tables: GEMV to 7 rows (before) vs tables from `lut_min_rows` (after)",
        "",
        f"Command: `{meta['command']}`; git {meta['git'].get('commit', '?')[:10]}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; CPU: {meta['machine'].get('cpu', '?')}. "
        "The 8 x 4096^2 MLP, one thread; one interleaved run per variant and row count (each arm's turn: "
        "an untimed call, then the timed one), medians of thread CPU time in ms; a single run. Tables from "
        f"{info['lut_min_rows']} rows (weight code bits: rows) after.",
        "",
        *[f"- `{v}`: `{k}`" for v, k in info["kernels"].items()],
        "",
        "| variant | rows | rounds | before ms | after ms | before / after | outputs equal bit for bit |",
        "|---|---:|---:|---:|---:|---:|---|",
        *[f"| {r['variant']} | {r['rows']} | {r['rounds']} | {r['before_ms']:.2f} | {r['after_ms']:.2f} | "
          f"{r['before_over_after']:.2f} | {'yes' if r['equal'] else 'within 1e-6'} |" for r in rows],
        "",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["w1a4", "w2a4", "w2ua4"])
    p.add_argument("--rows", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    p.add_argument("--budget-s", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "epyc_zen4"))
    p.add_argument("--name", default="ab_lut_min_rows")
    a = p.parse_args(argv)
    if not KG.HAS_LUT:
        print("needs the AVX-512 lookup tiles (VBMI + VNNI): on the plain path the tables start at 8 rows")
        return 1
    t0 = time.time()
    set_threads(1)
    rows, info = measure(a.variants, a.rows, a.budget_s, a.seed)
    meta = run_meta(__file__, argv, t0, seeds=[a.seed])
    write_results(a.out, a.name, {"meta": meta, "rows": rows, **info}, to_markdown(rows, info, meta))
    print(to_markdown(rows, info, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
