"""How much can a second core give? The same packed model run serially in two separate processes,
one pinned to each core, at the same time, against each alone.

    python benchmarks/speed/bench_core_contention.py                       # ~2 min
    python benchmarks/speed/bench_core_contention.py --cases lenet5:128 --seconds 2 --out /tmp/r

Two processes share no Python, no GIL, no thread pool and no memory of the runtime: whatever slows
each of them when both run is the machine's (shared caches, memory bandwidth, the hypervisor).
If each runs ``s`` times slower beside the other, two threads in one process can give at most
``2 / s`` times the 1-thread throughput on this machine, however well the runtime splits the work:
the ceiling for issue 13's 2-thread target (>= 1.7x).

Two child processes, one pinned to each core, build the case's packed model (``w2a4``: ternary
weights, 4-bit PACT activations, the speed harness's case) and run it on serial kernels and one
PyTorch thread. In rounds, each in a new random order, a window of ``--seconds`` of back-to-back
calls runs on core 0 alone, on core 1 alone, and on both together (a common start). Writes
``core_contention.{json,md}`` under ``--out`` (default ``benchmarks/results/no_amx``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_threads_contamination import MachineShare
from common import run_meta, write_results

RESULTS = Path(__file__).resolve().parents[1] / "results" / "no_amx"


def child(case: str, batch: int, cpu: int) -> None:
    """One timing process (``--child``), pinned to ``cpu`` (serial kernels, one PyTorch thread) or,
    for ``cpu`` -1, on both cores with the runtime's 2-thread split: builds and warms the model, says
    ``ready``, then for every ``START SECONDS`` line on stdin times back-to-back calls from START for
    SECONDS and prints their median and minimum as one JSON line."""
    os.sched_setaffinity(0, {0, 1} if cpu < 0 else {cpu})
    import torch
    from harness import CASES, float_case, quantized_model, set_threads

    from lowbit.runtime import compile as rt_compile
    from lowbit.runtime import kernels_threads as KT

    set_threads(2 if cpu < 0 else 1)
    fm, x_all = float_case(CASES[case], max(batch, 8))
    packed = rt_compile(quantized_model(fm, "w2a4"), x_all[:8])
    x = x_all[:batch].contiguous()
    KT.set_serial(cpu >= 0)
    with torch.inference_mode():
        for _ in range(10):
            packed(x)
        print("ready", flush=True)
        for line in sys.stdin:
            start, seconds = (float(v) for v in line.split())
            while time.time() < start:
                time.sleep(0.0005)
            ts: list[float] = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                t = time.perf_counter()
                packed(x)
                ts.append(time.perf_counter() - t)
            print(json.dumps({"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
                              "calls": len(ts)}), flush=True)


def measure(case: str, batch: int, rounds: int, seconds: float, seed: int) -> dict:
    """Rounds of four windows in a random order each round: the core-0 child alone, the core-1
    child alone, both together, and the 2-thread child (one process, the runtime's split); per arm
    the median over rounds of each window's median."""
    kids = [subprocess.Popen([sys.executable, __file__, "--child", case, str(batch), str(c)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for c in (0, 1, -1)]
    try:
        for k in kids:  # each child builds and warms up, then says so
            if k.stdout.readline().strip() != "ready":
                raise SystemExit(f"{case}: a timing child process failed before it was ready")
        got: dict[str, list[list[dict]]] = {"alone": [[], []], "together": [[], []], "threads": [[]]}
        rng = random.Random(seed)
        for _ in range(rounds):
            arms = [("alone", (0,)), ("alone", (1,)), ("together", (0, 1)), ("threads", (2,))]
            rng.shuffle(arms)
            for arm, which in arms:
                start = time.time() + 0.05
                for c in which:
                    kids[c].stdin.write(f"{start:.6f} {seconds}\n")
                    kids[c].stdin.flush()
                for c in which:
                    got[arm][min(c, len(got[arm]) - 1)].append(json.loads(kids[c].stdout.readline()))
    finally:
        for k in kids:
            k.stdin.close()
            k.wait()
    summary = {arm: [{"median_ms": statistics.median(w["median_ms"] for w in win),
                      "min_ms": min(w["min_ms"] for w in win)} for win in per] for arm, per in got.items()}
    pairs = zip(summary["together"], summary["alone"], strict=True)
    slow = [t["median_ms"] / s["median_ms"] for t, s in pairs]
    one = statistics.mean(s["median_ms"] for s in summary["alone"])
    return {"case": case, "batch": batch, "rounds": rounds, **summary, "windows": got, "slowdown": slow,
            "ceiling": sum(1 / s for s in slow), "threads_scaling": one / summary["threads"][0]["median_ms"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["lenet5:128", "resnet20:16", "mlp:64"],
                   help="CASE:BATCH of the speed harness's cases")
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per window")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the three windows")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="core_contention")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        case, batch, cpu = a.child
        child(case, int(batch), int(cpu))
        return
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("this benchmark needs two cores")
    t0 = time.time()
    share = MachineShare()
    rows = []
    for spec in a.cases:
        case, _, b = spec.partition(":")
        batch = int(b or 1)
        rows.append(measure(case, batch, a.rounds, a.seconds, seed=0))
        print({k: v for k, v in rows[-1].items() if k != "windows"}, flush=True)
    meta = run_meta(__file__, argv, t0, seeds=[0], seconds=a.seconds, rounds=a.rounds, **share.stop())
    md = markdown(meta, rows)
    write_results(a.out, a.name, {"meta": meta, "rows": rows}, md)
    print(md)


def markdown(meta: dict, rows: list[dict]) -> str:
    md = ["# Two cores, two processes: the machine's ceiling for 2-thread scaling", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
          f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; load average at start / end "
          f"{meta['load_start']} / {meta['load_end']}; the hypervisor stole {meta['stolen_cores']:.2f} "
          "cores on average (`/proc/stat`; the timed processes are this benchmark's own children); "
          "single run.", "",
          "Each process runs the packed model (`w2a4`) serially, pinned to one core, calls back to "
          f"back in windows of {meta['seconds']:g} s: {meta['rounds']} rounds of four windows (core 0 "
          "alone, core 1 alone, both together, and the 2-thread process below) in a new random order "
          "each round; per arm the median over rounds of the windows' medians, and the best call. "
          "Slowdown = median beside the other process / median alone on the same core. Ceiling = the "
          "sum over the two processes of 1 / slowdown: the throughput two cores gave relative to one, "
          "with nothing shared but the machine.", "",
          "2 threads: a third process on both cores with the runtime's own 2-thread split (the fourth "
          "window); its scaling = the mean of the two alone medians / its median.", "",
          "| case | batch | alone core 0 / core 1: median (min) ms | together core 0 / core 1: median "
          "(min) ms | slowdown | ceiling | 2 threads: median (min) ms | 2-thread scaling |",
          "|---|---:|---|---|---|---:|---|---:|"]
    for r in rows:
        th = r["threads"][0]
        al = " / ".join(f"{s['median_ms']:.3f} ({s['min_ms']:.3f})" for s in r["alone"])
        to = " / ".join(f"{s['median_ms']:.3f} ({s['min_ms']:.3f})" for s in r["together"])
        md.append(f"| {r['case']} | {r['batch']} | {al} | {to} | "
                  f"{' / '.join(f'{s:.2f}x' for s in r['slowdown'])} | {r['ceiling']:.2f}x | "
                  f"{th['median_ms']:.3f} ({th['min_ms']:.3f}) | {r['threads_scaling']:.2f}x |")
    return "\n".join(md)


if __name__ == "__main__":
    main()
