"""Where a 2-thread call's time goes: every shared work item (``kernels_threads.run_shared``: the flat
executor's pieces, ``parallel_for``'s parts) traced with its thread, wall span and CPU time.

    python benchmarks/speed/profile_thread_split.py                # ~30 s
    python benchmarks/speed/profile_thread_split.py --calls 5 --out /tmp/r

Per call (medians over ``--calls`` calls, 2 threads, binary weights x PACT 4-bit activations):

- ``serial ms``: the same input on one thread (``set_serial``), for scale;
- ``call ms``: the 2-thread call; ``start us``: from the call until the first item starts (the
  hand-off and everything before the split);
- ``overlap``: the items' summed wall time over the wall span they cover: 2.0 when both threads run
  items at once all along, 1.0 when they take turns;
- ``off-CPU``: the share of the items' wall time their thread was not on a CPU (another thread or
  process had the core): with the two threads taking turns on one core this is about half.

Also: whether the two cores compute at full speed at once (a throughput-bound float loop, ~80 ms,
alone and on two threads at once: each thread's CPU time; 1.0x = no slowdown from running beside
the other; on a virtual machine a core's hyperthread sibling on the host may be busy), and the
wake-up latency of the runtime's pool: a no-op handed to it after the pool sat idle for a
gap (as between two calls, or between two layers' parallel regions), until it starts. Alongside:
the CPU share other processes used during the run (``/proc/stat``). Writes
benchmarks/results/thread_split.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_threads_contamination import busy_cpu_s
from common import run_meta, write_results
from harness import CASES, _randomize_bn, deep_mlp, make_inputs, quantized_model, set_threads

from lowbit.runtime import compile as rt_compile
from lowbit.runtime import kernels_threads as KT

RESULTS = Path(__file__).resolve().parents[1] / "results"


def traced_calls(packed, x: torch.Tensor, calls: int) -> dict[str, float]:
    items: list[tuple[int, float, float, float]] = []
    real = KT.run_shared

    def tracing(n, work, nt):
        def traced(slot, i):
            t0, c0 = time.perf_counter(), time.thread_time()
            work(slot, i)
            items.append((threading.get_ident(), t0, time.perf_counter(), time.thread_time() - c0))

        return real(n, traced, nt)

    per: dict[str, list[float]] = {k: [] for k in ("serial_ms", "call_ms", "start_us", "overlap", "off_cpu",
                                                 "items", "threads")}
    KT.run_shared = tracing
    try:
        for _ in range(calls):
            prev = KT.set_serial(True)
            t = time.perf_counter()
            packed(x)
            per["serial_ms"].append(1e3 * (time.perf_counter() - t))
            KT.set_serial(prev)
            items.clear()
            t = time.perf_counter()
            packed(x)
            per["call_ms"].append(1e3 * (time.perf_counter() - t))
            if not items:
                continue
            span = max(e for _, _, e, _ in items) - min(s for _, s, _, _ in items)
            busy = sum(e - s for _, s, e, _ in items)
            per["start_us"].append(1e6 * (min(s for _, s, _, _ in items) - t))
            per["overlap"].append(busy / max(span, 1e-12))
            per["off_cpu"].append(1.0 - sum(c for *_, c in items) / max(busy, 1e-12))
            per["items"].append(len(items))
            per["threads"].append(len({tid for tid, *_ in items}))
    finally:
        KT.run_shared = real
    return {k: statistics.median(v) if v else float("nan") for k, v in per.items()}


def _fma_loop(a, b, reps):
    s = np.float32(0)
    for _ in range(reps):
        for i in range(a.size):
            s += a[i] * b[i]
    return s


def two_cores(reps: int = 4, inner: int = 400_000) -> dict[str, list[float]]:
    """CPU ms of the loop alone and of each of two copies run at once (and the pair's wall ms)."""
    import numba

    fn = numba.njit(nogil=True, fastmath=True)(_fma_loop)
    a = np.random.default_rng(0).random(4096, np.float32)
    fn(a, a, 1)
    out: dict[str, list[float]] = {"alone_cpu_ms": [], "pair_cpu_ms": [], "pair_wall_ms": []}

    def run(res: list, i: int) -> None:
        t = time.thread_time()
        fn(a, a, inner)
        res[i] = 1e3 * (time.thread_time() - t)

    for _ in range(reps):
        r = [0.0]
        run(r, 0)
        out["alone_cpu_ms"].append(r[0])
        r2 = [0.0, 0.0]
        ts = [threading.Thread(target=run, args=(r2, i)) for i in range(2)]
        w = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        out["pair_wall_ms"].append(1e3 * (time.perf_counter() - w))
        out["pair_cpu_ms"] += r2
    return out


def wake_latency(gaps_s=(0.0, 2e-4, 2e-3, 2e-2), n: int = 60) -> list[dict[str, float]]:
    """Median / quartiles (us) from handing a no-op to the idle pool until it starts, per idle gap."""
    pool = KT.thread_pool(2)
    out = []
    for gap in gaps_s:
        lat = []
        for _ in range(n):
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            lat.append(1e6 * (pool.submit(time.perf_counter).result() - t0))
        lat.sort()
        out.append({"idle_gap_ms": 1e3 * gap, "median_us": statistics.median(lat), "q25_us": lat[n // 4],
                    "q75_us": lat[3 * n // 4]})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--parts", nargs="+", type=int, default=[KT.PARTS_PER_THREAD],
                   help="kernels_threads.PARTS_PER_THREAD values for the MLP rows")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    t0 = time.time()
    busy0 = busy_cpu_s()
    set_threads(2)
    rows = []
    torch.manual_seed(0)
    setups = [("lenet5", 64), ("lenet5", 256), ("resnet20", 8), ("resnet20", 64)]
    for name, b in setups:
        case = CASES[name]
        fm = case.build().eval()
        _randomize_bn(fm, 0)
        x = make_inputs(case, b, 0)
        packed = rt_compile(quantized_model(fm, "w1a4"), x[:8])
        for _ in range(3):
            packed(x)
        rows.append({"model": name, "path": "flat executor pieces", "batch": b,
                     **traced_calls(packed, x, a.calls)})
    mlp = deep_mlp(4096, 2).eval()
    x_all = torch.rand(256, 4096, generator=torch.Generator().manual_seed(0))
    packed = rt_compile(quantized_model(mlp, "w1a4"), x_all[:8])
    keep = KT.PARTS_PER_THREAD
    for b in (8, 64, 256):
        x = x_all[:b].contiguous()
        for pp in a.parts:
            KT.PARTS_PER_THREAD = pp
            try:
                for _ in range(3):
                    packed(x)
                rows.append({"model": "mlp 2 x 4096^2", "path": f"parallel_for, {pp} part(s) per thread",
                             "batch": b, **traced_calls(packed, x, a.calls)})
            finally:
                KT.PARTS_PER_THREAD = keep
    wake = wake_latency()
    cores = two_cores()
    busy1 = busy_cpu_s()
    others = (busy1[0] - busy0[0] - (busy1[1] - busy0[1])) / (time.time() - t0)
    meta = run_meta(__file__, argv, t0, seeds=[0], other_processes_cores=others,
                    loadavg=" ".join(f"{v:.2f}" for v in os.getloadavg()))
    md = ["# 2-thread calls traced: do the two threads run at once?", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
          f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; other processes used {others:.2f} of the "
          f"2 cores on average during the run; load average at the end {meta['loadavg']}; single run, "
          f"medians over {a.calls} calls.", "",
          "overlap: the items' summed wall time / the span they cover (2.0: both threads at once; 1.0: "
          "taking turns). off-CPU: share of the items' wall time their thread was not running.", "",
          "| model | path | batch | serial ms | 2-thread call ms | start us | items | threads | overlap | "
          "off-CPU |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['path']} | {r['batch']} | {r['serial_ms']:.3f} | {r['call_ms']:.3f} | "
           f"{r['start_us']:.0f} | {r['items']:.0f} | {r['threads']:.0f} | {r['overlap']:.2f} | "
           f"{r['off_cpu']:.2f} |" for r in rows]
    md += ["", "Wake-up of the idle pool: a no-op handed to it until it starts (us):", "",
           "| idle gap ms | median | q25 | q75 |", "|---:|---:|---:|---:|"]
    md += [f"| {w['idle_gap_ms']:g} | {w['median_us']:.1f} | {w['q25_us']:.1f} | {w['q75_us']:.1f} |"
           for w in wake]
    md += ["", "Two cores at once (a float loop; CPU ms per thread, each repetition):", "",
           "alone: " + ", ".join(f"{v:.0f}" for v in cores["alone_cpu_ms"]) + "; two at once: "
           + ", ".join(f"{v:.0f}" for v in cores["pair_cpu_ms"]) + " (pair wall: "
           + ", ".join(f"{v:.0f}" for v in cores["pair_wall_ms"]) + ")"]
    write_results(a.out, "thread_split", {"meta": meta, "rows": rows, "wake": wake, "two_cores": cores},
                  "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
