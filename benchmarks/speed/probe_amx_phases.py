"""How steady is one core's AMX rate over time? (issue 13: why 1- and 2-thread timings drift)

    python benchmarks/speed/probe_amx_phases.py                          # ~15 s
    python benchmarks/speed/probe_amx_phases.py --note "the training campaign paused"

One thread at a time, pinned to vCPU 0 or 1 in turn (``os.sched_setaffinity``), runs a fixed loop
of ``tdpbusd`` on L1-resident tiles with no loads (``profile_amx_linear._tile_loop(0)``: the tile
unit alone, ~6 ms) and a dependent scalar chain of the same length (one ALU, latency bound), again
and again for ``--seconds``; thread CPU time of each run. On a virtual machine the hypervisor
places each vCPU on a host hardware thread whose sibling may be busy with other work: a unit the
two siblings share (the core's AMX unit, its vector ports) then runs the loop slower, a latency
bound chain hardly. Reports per vCPU the runs' quantiles and the share of runs slower than 1.5x the
fastest. Writes ``<out>/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results
from probe_thread_contention import _scalar_chain
from profile_amx_linear import _tile_loop

from lowbit.runtime import _amx
from lowbit.runtime import kernels_amx as KA

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--note", default="", help="the machine's state (e.g. the training campaign paused)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="probe_amx_phases")
    a = p.parse_args(argv)
    if not _amx.amx_enabled():
        raise SystemExit("probe_amx_phases: AMX-INT8 unavailable on this machine")
    t0 = time.time()
    load0 = " ".join(f"{v:.2f}" for v in os.getloadavg())
    cfg = _amx.amx_tile_config(64, 2)
    tiles = KA.aligned_u8(4096)
    tiles[:] = np.random.default_rng(0).integers(0, 256, 4096)
    amx = _tile_loop(0)
    work = {"amx tile unit": lambda: amx(cfg, tiles, 200_000),
            "scalar chain": lambda: _scalar_chain(30_000_000)}
    for fn in work.values():
        fn()
    cpus = sorted(os.sched_getaffinity(0))[:2]
    runs: dict[str, dict[int, list[float]]] = {w: {c: [] for c in cpus} for w in work}
    keep = os.sched_getaffinity(0)
    end = time.perf_counter() + a.seconds
    try:
        while time.perf_counter() < end:
            for c in cpus:
                os.sched_setaffinity(0, {c})
                for w, fn in work.items():
                    s = time.thread_time()
                    fn()
                    runs[w][c].append(1e3 * (time.thread_time() - s))
    finally:
        os.sched_setaffinity(0, keep)
    rows = []
    for w, per in runs.items():
        for c, v in per.items():
            q = np.quantile(v, [0.0, 0.1, 0.5, 0.9, 1.0])
            rows.append({"work": w, "cpu": c, "runs": len(v), "min_ms": q[0], "p10_ms": q[1],
                         "median_ms": q[2], "p90_ms": q[3], "max_ms": q[4],
                         "slow_share": float(np.mean(np.asarray(v) > 1.5 * q[0])),
                         "ms": [round(x, 3) for x in v]})
    meta = run_meta(__file__, argv, t0, seeds=[0], note=a.note, load_start=load0,
                    load_end=" ".join(f"{v:.2f}" for v in os.getloadavg()))
    md = ["# One thread's AMX rate over time, per vCPU", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
          f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; {a.note or 'machine state not noted'}; "
          f"load average at start / end {meta['load_start']} / {meta['load_end']}; single run.", "",
          "Each run: one pinned thread, thread CPU time of a fixed loop (AMX: 800k `tdpbusd` on L1 tiles, no "
          "loads; scalar: a dependent 64-bit multiply-add chain). slow: share of runs slower than 1.5x the "
          "fastest. Every run in the JSON, in order.", "",
          "| work | vCPU | runs | min ms | p10 | median | p90 | max | slow |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['work']} | {r['cpu']} | {r['runs']} | {r['min_ms']:.2f} | {r['p10_ms']:.2f} | "
           f"{r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['max_ms']:.2f} | {r['slow_share']:.2f} |"
           for r in rows]
    write_results(a.out, a.name, {"meta": meta, "rows": rows}, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
