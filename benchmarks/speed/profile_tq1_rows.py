"""Why the 1.6-bit ternary GEMV (``runtime/kernels_tq1.py``) runs at about half the speed of the
2-bit field GEMV (``runtime/kernels_gemv.py``) when the weights are in cache, at 1 and 2 rows.

    python benchmarks/speed/profile_tq1_rows.py

Two measurements, one process, one thread:

- ``loop``: the instruction mix of the compiled inner loop of each tile at 2 rows (``_q2_2`` and
  ``_t2_2``, 2 blocks of 16 outputs), read from numba's assembly (the numba disk cache is switched
  off for this: numba cannot show the assembly of cached code), normalised per 64 weights of one
  row. On this machine the hardware counters are not available (``perf stat`` reports them as not
  supported), so the loop's instructions stand in for a cycle profile.
- ``timing``: ``gemv_run`` on the 2-bit fields against ``Tq1Weights.run`` on the same ternary
  layer (N x N, called back to back, so the weights stay in L2 / L3), 1 and 2 rows, interleaved
  (``harness.time_interleaved``); both give the same bits (checked).

Writes benchmarks/results/profile_tq1_rows.{json,md}. Single run, seed 0.
"""

from __future__ import annotations

import collections
import os
import re
import sys
import time
from pathlib import Path

os.environ["LOWBIT_NUMBA_CACHE"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from common import ROOT, run_meta, write_results
from harness import time_interleaved
from numba import njit

from lowbit.runtime import kernels_gemv as KV
from lowbit.runtime import kernels_tq1 as KT


@njit
def _only_tq1(xf, xs, w, ws, nG, A, F, off, cf, cs, of, O):
    KT._q2_2(xf, 0, xs, w, 0, ws, nG, A, 0, 2, F, off, cf, cs, 0, True, of, O)


@njit
def _only_2bit(xf, xs, w, ws, nG, A, F, off, cf, cs, of, O):
    KV._t2_2(xf, 0, xs, w, 0, ws, nG, A, 0, 2, F, off, cf, cs, 0, True, of, O)


def _loop_mix(fn, xs: int) -> collections.Counter:
    """Instructions of the loop (a backward jump) that holds the ``vpdpbusd``."""
    args = (np.zeros(2 * xs, np.int8), xs, np.zeros(256, np.uint8), 64, 1, np.zeros(2, np.int64),
            np.zeros(32, np.int32), 1, np.zeros(96), 32, np.zeros(64, np.float32), 32)
    fn(*args)
    lines = [s.strip() for s in fn.inspect_asm(fn.signatures[0]).splitlines()]
    labels = {s[:-1]: i for i, s in enumerate(lines) if re.match(r"^\.?L\w+:$", s)}
    for i, s in enumerate(lines):
        m = re.match(r"^j\w+\s+(\.?L\w+)$", s)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in lines[labels[m.group(1)] + 1 : i + 1]
                    if x and not x.startswith((".", "#")) and not x.endswith(":")]
            if any(x.startswith("vpdpbusd") for x in body):
                return collections.Counter(x.split()[0] for x in body)
    raise RuntimeError("no vpdpbusd loop found")


def main() -> None:
    t0 = time.time()
    # weights per loop iteration and row: 2 blocks x 16 outputs x (20 reduction indices for the
    # 1.6-bit group, 16 for a 2-bit group: 4 quads of 4)
    loops = {}
    tiles = (("1.6-bit", _only_tq1, 20, 2 * 16 * 20), ("2-bit", _only_2bit, 32, 2 * 16 * 16))
    for name, fn, xs, weights in tiles:
        mix = _loop_mix(fn, xs)
        per64 = {k: v * 64 / (2 * weights) for k, v in mix.items()}  # 2 rows
        loops[name] = {"instructions": dict(mix), "weights_per_row": weights, "per_64_weights_per_row": per64}
        print(name, dict(mix), {k: round(v, 3) for k, v in per64.items()})
    rng = np.random.default_rng(0)
    qp = np.array([1.0, 255.0], np.float32)
    rows = []
    for N in (1024, 2048, 4096):
        q = rng.choice([-1, 0, 1], size=(N, N))
        gw2 = KV.GemvWeights(q)
        gwq = KT.tq1_weights(KV.GemvWeights(q), q, min_weights=0)
        coef = KV.gemv_coef(rng.standard_normal(N), rng.random(N), rng.standard_normal(N) * 1e-3, gw2)
        for M in (1, 2):
            x = rng.random((M, N), dtype=np.float32)
            o2, oq = np.empty((M, N), np.float32), np.empty((M, N), np.float32)

            def f2(x=x, o2=o2, gw2=gw2, coef=coef):
                KV.gemv_run(x, 0, qp, gw2, coef, False, o2)

            def fq(x=x, oq=oq, gwq=gwq, coef=coef):
                gwq.tq1.run(x, 0, qp, coef, False, oq)

            f2()
            fq()
            same = bool(np.array_equal(o2.view(np.uint32), oq.view(np.uint32)))
            t = time_interleaved({"2-bit": f2, "1.6-bit": fq}, max_rounds=3000, budget_s=3.0)
            row = {"N": N, "rows": M, "bit_identical": same, "ms_2bit": t["2-bit"]["median_s"] * 1e3,
                   "ms_tq1": t["1.6-bit"]["median_s"] * 1e3,
                   "speed_tq1_over_2bit_median": t["2-bit"]["median_s"] / t["1.6-bit"]["median_s"],
                   "speed_tq1_over_2bit_min": t["2-bit"]["min_s"] / t["1.6-bit"]["min_s"],
                   "rounds": t["2-bit"]["rounds"]}
            rows.append(row)
            print(row)
    meta = run_meta(__file__, [], t0, seeds=[0])
    p2, pq = loops["2-bit"]["per_64_weights_per_row"], loops["1.6-bit"]["per_64_weights_per_row"]
    md = ["# 1.6-bit against 2-bit ternary GEMV with the weights in cache", "",
          f"`{meta['command']}`; git {meta['git']}; one thread, single run, interleaved on the machine as "
          "it was (ratios only).", "",
          "## Inner loop at 2 rows (compiled assembly), per 64 weights of one row", "",
          "| instruction | 2-bit fields | 1.6-bit |", "|---|---|---|"]
    for k in sorted(set(p2) | set(pq), key=lambda k: -max(p2.get(k, 0), pq.get(k, 0))):
        md.append(f"| {k} | {p2.get(k, 0):.3f} | {pq.get(k, 0):.3f} |")
    md += ["", "## Time, weights in cache (N x N ternary layer called back to back)", "",
           "| N | rows | 2-bit ms | 1.6-bit ms | speed of 1.6-bit / 2-bit (median) | (min) | same bits |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['N']} | {r['rows']} | {r['ms_2bit']:.4f} | {r['ms_tq1']:.4f} | "
                  f"{r['speed_tq1_over_2bit_median']:.2f}x | {r['speed_tq1_over_2bit_min']:.2f}x | "
                  f"{r['bit_identical']} |")
    payload = {"meta": meta, "loops": loops, "rows": rows}
    write_results(ROOT / "benchmarks" / "results", "profile_tq1_rows", payload, "\n".join(md))


if __name__ == "__main__":
    main()
