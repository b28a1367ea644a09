"""Where a 2-thread call of the deep MLP spends its time, kernel by kernel (issue 13, threads).

    python benchmarks/speed/probe_thread_mlp.py --variants w1a4 --batches 64 256     # ~30 s
    python benchmarks/speed/probe_thread_mlp.py --note "the training campaign paused"

The packed 8 x Linear 4096^2 MLP (``harness.CASES["mlp"]``) is called in interleaved loops in
three modes: ``1t`` (the calling thread's kernels serial, ``kernels_threads.set_serial``), ``2t``
(as a user's call runs: ``parallel_for`` cuts each large kernel into parts that the caller and a
worker take from a shared counter), and ``2t parts on caller`` (the same parts, all run by the
calling thread one after the other: the cost of the cut without a second thread). Every
``parallel_for`` call is timed (wall, on the caller) and every part of a split one (thread CPU
time and wall on the thread that ran it), so a part's CPU time run beside another thread can be
set against the same part run alone. Per call: wall, process CPU time (all threads), the time of
each kernel function, and the caller's wall outside the kernels (Python, allocation, waits at
the end of a split). Writes ``<out>/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results
from harness import CASES, quantized_model, set_threads

from lowbit.runtime import compile as rt_compile
from lowbit.runtime import kernels_amx as KA
from lowbit.runtime import kernels_gemm as KG
from lowbit.runtime import kernels_threads as KT

RESULTS = Path(__file__).resolve().parents[1] / "results"
MODES = ("1t", "2t", "2t parts on caller")


class Recorder:
    """Wraps ``kernels_threads.run_shared`` and the kernel modules' ``parallel_for``."""

    def __init__(self) -> None:
        self.on = False
        self.calls: list[tuple[str, float, bool]] = []  # (fn, wall s, split)
        self.items: list[tuple[str, int, float, float]] = []  # (fn, slot, cpu s, wall s)
        self.fn = ""
        self.serial_parts = False
        self._rs = KT.run_shared
        self._pf = KT.parallel_for
        self._lock = threading.Lock()

    def install(self) -> None:
        rec = self

        def run_shared(n, work, nt):
            fn = rec.fn

            def timed(slot, i):
                c, w = time.thread_time(), time.perf_counter()
                work(slot, i)
                with rec._lock:
                    rec.items.append((fn, slot, time.thread_time() - c, time.perf_counter() - w))

            if rec.serial_parts:
                for i in range(n):
                    timed(0, i)
            else:
                rec._rs(n, timed, nt)

        def parallel_for(fn, n, *args, parallel=True, grain=1):
            name = getattr(fn, "__name__", str(fn))
            rec.fn = name
            split = parallel and KT.num_threads() > 1 and n >= 2 * grain
            w = time.perf_counter()
            rec._pf(fn, n, *args, parallel=parallel, grain=grain)
            rec.calls.append((name, time.perf_counter() - w, split))

        KT.run_shared = run_shared
        KA.parallel_for = parallel_for
        KG.parallel_for = parallel_for

    def reset(self) -> None:
        self.calls.clear()
        self.items.clear()


def sched() -> dict[int, tuple[int, int]]:
    """Per thread of this process: (ns on a CPU, ns runnable but waiting for one) from
    ``/proc/self/task/<tid>/schedstat``."""
    out = {}
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/schedstat") as f:
                run, wait, _ = f.read().split()
        except (OSError, ValueError):
            continue
        out[int(t)] = (int(run), int(wait))
    return out


def busy_s() -> float:
    """CPU seconds every process on the machine has used (``/proc/stat``: all but idle, iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def loop(fast, x, mode: str, rec: Recorder, n: int) -> dict:
    prev = KT.set_serial(mode == "1t")
    rec.serial_parts = mode == "2t parts on caller"
    try:
        for _ in range(2):
            fast(x)
        rec.reset()
        s0, b0 = sched(), busy_s()
        c, w = time.process_time(), time.perf_counter()
        for _ in range(n):
            fast(x)
        wall, cpu = (time.perf_counter() - w) / n, (time.process_time() - c) / n
        s1, b1 = sched(), busy_s()
    finally:
        KT.set_serial(prev)
        rec.serial_parts = False
    fn_wall: dict[str, float] = defaultdict(float)
    for name, t, _ in rec.calls:
        fn_wall[name] += t / n
    item_cpu: dict[str, float] = defaultdict(float)
    slot_cpu: dict[int, float] = defaultdict(float)
    for name, slot, ct, _ in rec.items:
        item_cpu[name] += ct / n
        slot_cpu[slot] += ct / n
    me = threading.get_native_id()
    d = {t: (v[0] - s0.get(t, (0, 0))[0], v[1] - s0.get(t, (0, 0))[1]) for t, v in s1.items()}
    workers = [v for t, v in d.items() if t != me]
    return {"wall": wall, "cpu": cpu, "fn_wall": dict(fn_wall),
            "caller_run": d.get(me, (0, 0))[0] * 1e-9 / n, "caller_wait": d.get(me, (0, 0))[1] * 1e-9 / n,
            "workers_run": sum(v[0] for v in workers) * 1e-9 / n,
            "workers_wait": sum(v[1] for v in workers) * 1e-9 / n,
            "others_cores": max(0.0, (b1 - b0) - cpu * n) / (wall * n), "item_cpu": dict(item_cpu),
            "slot_cpu": dict(slot_cpu), "outside": wall - sum(fn_wall.values()),
            "parts": len(rec.items) / n}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=["w1a4"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 64, 256])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=8, help="calls per timed loop")
    p.add_argument("--note", default="", help="the machine's state (e.g. the training campaign paused)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="probe_thread_mlp")
    a = p.parse_args(argv)
    t0 = time.time()
    load0 = " ".join(f"{v:.2f}" for v in os.getloadavg())
    set_threads(2)
    rec = Recorder()
    rec.install()
    rows = []
    case = CASES["mlp"]
    torch.manual_seed(0)
    fm = case.build().eval()
    for v in a.variants:
        fast = rt_compile(quantized_model(fm, v), torch.rand(8, 4096))
        for b in a.batches:
            x = torch.rand(b, 4096)
            y1 = KT.set_serial(True)
            ref = fast(x)
            KT.set_serial(y1)
            if not torch.equal(ref, fast(x)):
                raise AssertionError(f"{v} b{b}: 1- and 2-thread outputs differ")
            res: dict[str, list[dict]] = {m: [] for m in MODES}
            for _ in range(a.rounds):
                for m in MODES:
                    res[m].append(loop(fast, x, m, rec, a.calls if b >= 64 else 4 * a.calls))
            for m in MODES:
                rs = res[m]

                def med(f, rs=rs):
                    return 1e3 * statistics.median(f(r) for r in rs)

                fns = sorted({k for r in rs for k in r["fn_wall"]})
                slots = sorted({k for r in rs for k in r["slot_cpu"]})
                rows.append({"variant": v, "batch": b, "mode": m, "wall_ms": med(lambda r: r["wall"]),
                             **{f"{k}_ms": med(lambda r, k=k: r[k]) for k in
                                ("caller_run", "caller_wait", "workers_run", "workers_wait")},
                             "others_cores": statistics.median(r["others_cores"] for r in rs),
                             "cpu_ms": med(lambda r: r["cpu"]), "outside_ms": med(lambda r: r["outside"]),
                             "fn_wall_ms": {f: med(lambda r, f=f: r["fn_wall"].get(f, 0.0)) for f in fns},
                             "parts_cpu_ms": {f: med(lambda r, f=f: r["item_cpu"].get(f, 0.0)) for f in fns},
                             "slot_cpu_ms": {s: med(lambda r, s=s: r["slot_cpu"].get(s, 0.0)) for s in slots},
                             "parts_per_call": statistics.median(r["parts"] for r in rs), "rounds": a.rounds})
                print(rows[-1], flush=True)
        del fast
    meta = run_meta(__file__, argv, t0, seeds=[0], note=a.note, load_start=load0,
                    load_end=" ".join(f"{v:.2f}" for v in os.getloadavg()))
    md = ["# The deep MLP's 2-thread call, kernel by kernel", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
          f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; {a.note or 'machine state not noted'}; "
          f"load average at start / end {meta['load_start']} / {meta['load_end']}; single run, medians of "
          f"{a.rounds} interleaved rounds; ms per call of the 8-layer model.", "",
          "kernel wall: the caller's wall time in each kernel's `parallel_for` (all layers); parts CPU: the "
          "thread CPU time of the split kernel's parts, all threads (the same parts in `2t` and `2t parts "
          "on caller`); outside: the call's wall outside the kernels. run / wait: the caller's and the "
          "workers' time on a CPU and runnable but waiting for one (`/proc/self/task/*/schedstat`); "
          "others: cores the other processes of the machine used meanwhile (`/proc/stat`, 10 ms ticks).",
          "", "| variant | batch | mode | wall | process CPU | caller run / wait | workers run / wait "
          "| others | outside | kernel wall | parts CPU (by thread) |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        kw = ", ".join(f"{k.strip('_')} {t:.2f}" for k, t in r["fn_wall_ms"].items())
        pc = ", ".join(f"{k.strip('_')} {t:.2f}" for k, t in r["parts_cpu_ms"].items() if t > 0)
        sc = " / ".join(f"{t:.2f}" for t in r["slot_cpu_ms"].values())
        md.append(f"| {r['variant']} | {r['batch']} | {r['mode']} | {r['wall_ms']:.2f} | {r['cpu_ms']:.2f} | "
                  f"{r['caller_run_ms']:.2f} / {r['caller_wait_ms']:.2f} | "
                  f"{r['workers_run_ms']:.2f} / {r['workers_wait_ms']:.2f} | {r['others_cores']:.2f} | "
                  f"{r['outside_ms']:.2f} | {kw} | {pc or '–'}{f' ({sc})' if sc else ''} |")
    write_results(a.out, a.name, {"meta": meta, "rows": rows}, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
