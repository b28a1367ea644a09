"""Do two threads of one process slow each other, and on which kind of work? (issue 13, threads)

    python benchmarks/speed/probe_thread_contention.py                 # ~15 s
    python benchmarks/speed/probe_thread_contention.py --note "the training campaign paused"

For each workload, interleaved rounds of: each thread's copy of the work alone (the calling
thread's on its data, then a runtime worker's on its own), then both at once (started together
by a barrier). Per thread: wall time and thread CPU time of its copy; the slowdown is a thread's
time in the pair over its time alone (medians over the rounds). Workloads (all numba,
GIL released):

- ``scalar chain``: a dependent 64-bit multiply-add chain (latency bound, one ALU port);
- ``avx512 fma L1``: float32 multiply-adds over 4 KiB in L1 (16 independent zmm chains: bound by
  the vector ports and the L1 load/store ports);
- ``vnni L1``: ``vpdpbusd`` over L1-resident int8 vectors (the GEMV / table-lookup kernels' unit);
- ``amx, no loads`` / ``amx, 4 loads``: steps of 4 ``tdpbusd`` on L1-resident tiles
  (``profile_amx_linear._tile_loop``; 4 loads: the AMX GEMM's 2 x 2 step);
- ``read 1 MiB`` (L2) / ``read 32 MiB`` (L3): a vectorized sum over a buffer read again and again;
- ``amx_linear 4096^2 x 64 rows`` / ``x 256 rows``: one binary-weight packed layer's AMX GEMM
  (``kernels_amx.amx_linear``, serial on each thread, each thread its own rows and output).

If the two vCPUs were separate cores, compute-bound loops would not slow each other (slowdown ~1.0);
if they are two hardware threads of one core (the guest's ``lscpu`` cannot tell: it shows what the
hypervisor reports), loops bound by a shared execution unit (vector ports, the AMX unit) run up to
2x slower each while a latency-bound chain does not. Writes ``<out>/<name>.{json,md}``.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results
from profile_amx_linear import _tile_loop

from lowbit._numba import jit
from lowbit.runtime import _amx
from lowbit.runtime import kernels_amx as KA
from lowbit.runtime import kernels_threads as KT

RESULTS = Path(__file__).resolve().parents[1] / "results"


@jit
def _scalar_chain(n):
    x = np.uint64(1)
    for _ in range(n):
        x = x * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
    return x


@jit
def _fma_l1(a, b, n):
    """b[j] = b[j] * 0.999 + a[j] over 1024 float32 (4 KiB each), n times."""
    c = np.float32(0.999)
    for _ in range(n):
        for j in range(a.size):
            b[j] = b[j] * c + a[j]
    return b[0]


@jit
def _vnni_l1(a, w, acc, n):
    """acc[j] += sum of 4 products a*w per int32 lane, over 4 KiB of int8 (the compiler emits
    ``vpdpbusd`` for this pattern where it vectorizes; checked by the timing, not the asm)."""
    for _ in range(n):
        for j in range(acc.size):
            s = acc[j]
            for t in range(4):
                s += np.int32(a[4 * j + t]) * np.int32(w[4 * j + t])
            acc[j] = s
    return acc[0]


@jit
def _read_sum(x, n):
    s = np.int64(0)
    for _ in range(n):
        for j in range(x.size):
            s += x[j]
    return s


def _workloads(scale: float) -> dict[str, object]:
    """name -> a function of (slot,) running ~10-40 ms of that work on the slot's own data."""
    rng = np.random.default_rng(0)
    data = [dict() for _ in range(2)]
    for d in data:
        d["fa"] = rng.random(1024).astype(np.float32)
        d["fb"] = rng.random(1024).astype(np.float32)
        d["i8a"] = rng.integers(0, 255, 4096).astype(np.uint8)
        d["i8w"] = rng.integers(-128, 127, 4096).astype(np.int8)
        d["acc"] = np.zeros(1024, np.int32)
        d["l2"] = rng.integers(0, 9, (1 << 20) // 8).astype(np.int64)
        d["l3"] = rng.integers(0, 9, (32 << 20) // 8).astype(np.int64)
        d["tiles"] = KA.aligned_u8(8192)
        d["tiles"][:] = rng.integers(0, 256, 8192)
    cfg = _amx.amx_tile_config(64, 2)
    t0, t4 = _tile_loop(0), _tile_loop(4)

    def s(n: float) -> int:
        return max(1, int(n * scale))

    w: dict[str, object] = {
        "scalar chain": lambda k: _scalar_chain(s(3e7)),
        "avx512 fma L1": lambda k: _fma_l1(data[k]["fa"], data[k]["fb"], s(2e4)),
        "vnni L1": lambda k: _vnni_l1(data[k]["i8a"], data[k]["i8w"], data[k]["acc"], s(1e4)),
        "read 1 MiB (L2)": lambda k: _read_sum(data[k]["l2"], s(150)),
        "read 32 MiB (L3)": lambda k: _read_sum(data[k]["l3"], s(3)),
    }
    if _amx.amx_enabled():
        w["amx, no loads"] = lambda k: t0(cfg, data[k]["tiles"][:4096], s(2e5))
        w["amx, 4 loads"] = lambda k: t4(cfg, data[k]["tiles"][:4096], s(1e5))
        w.update(_layer_workloads(rng, scale))
    return w


def _layer_workloads(rng: np.random.Generator, scale: float) -> dict[str, object]:
    """One binary 4096x4096 packed layer's AMX GEMM, serial, each thread its own rows and output."""
    from lowbit.runtime.kernels_gemv import GemvWeights

    O = K = 4096
    q = rng.integers(0, 2, (O, K)).astype(np.int64)
    aw = KA.amx_linear_weights(GemvWeights(q), q, 2 * q - 1, 1.0)
    s0, s1 = KA.amx_coeffs(aw, np.ones(O), 1.0, 0.0, np.ones(O), np.zeros(O))
    out: dict[str, object] = {}
    for M, reps in ((64, 4), (256, 1)):
        xs = [rng.integers(0, 16, (M, K)).astype(np.uint8) for _ in range(2)]
        outs = [np.empty((M, O), np.float32) for _ in range(2)]

        def f(k: int, xs=xs, outs=outs, reps=reps) -> None:
            prev = KT.set_serial(True)
            try:
                for _ in range(max(1, int(reps * scale))):
                    KA.amx_linear(xs[k], 1, 0.0, 0.0, aw, s0, s1, True, outs[k])
            finally:
                KT.set_serial(prev)

        out[f"amx_linear 4096^2 x {M} rows"] = f
    return out


def _busy_s() -> float:
    """CPU seconds every process on the machine has used (``/proc/stat``: all but idle, iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _timed(fn, k: int, res: dict, barrier: threading.Barrier | None) -> None:
    if barrier is not None:
        barrier.wait()
    w, c = time.perf_counter(), time.thread_time()
    fn(k)
    res[k] = (time.perf_counter() - w, time.thread_time() - c)


def measure(work: dict[str, object], rounds: int) -> list[dict]:
    """Per workload and round: each thread's copy (own data: slot 0 on the caller, slot 1 on a
    worker) alone, then both at once; slowdown of slot k = its time in the pair / its time alone."""
    pool = KT.thread_pool(2)
    for fn in work.values():  # compile and warm
        fn(0)
        pool.submit(fn, 1).result()
    keys = ("alone0", "alone1", "pair0", "pair1")
    got = {n: {k: [] for k in keys + tuple(k + "_cpu" for k in keys)} for n in work}
    for _ in range(rounds):
        for name, fn in work.items():
            res: dict = {}
            _timed(fn, 0, res, None)
            pool.submit(_timed, fn, 1, res, None).result()
            for k in (0, 1):
                got[name][f"alone{k}"].append(res[k][0])
                got[name][f"alone{k}_cpu"].append(res[k][1])
            res = {}
            bar = threading.Barrier(2)
            f = pool.submit(_timed, fn, 1, res, bar)
            _timed(fn, 0, res, bar)
            f.result()
            for k in (0, 1):
                got[name][f"pair{k}"].append(res[k][0])
                got[name][f"pair{k}_cpu"].append(res[k][1])
    rows = []
    for name, g in got.items():
        med = {k: statistics.median(v) for k, v in g.items()}
        rows.append({"work": name, "alone_ms": [1e3 * med["alone0"], 1e3 * med["alone1"]],
                     "alone_cpu_ms": [1e3 * med["alone0_cpu"], 1e3 * med["alone1_cpu"]],
                     "pair_ms": [1e3 * med["pair0"], 1e3 * med["pair1"]],
                     "pair_cpu_ms": [1e3 * med["pair0_cpu"], 1e3 * med["pair1_cpu"]],
                     "slowdown_wall": [med[f"pair{k}"] / med[f"alone{k}"] for k in (0, 1)],
                     "slowdown_cpu": [med[f"pair{k}_cpu"] / med[f"alone{k}_cpu"] for k in (0, 1)],
                     "rounds": rounds})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every workload's length")
    p.add_argument("--only", nargs="*", default=[], help="workload names to run (default: all)")
    p.add_argument("--note", default="", help="the machine's state (e.g. the training campaign paused)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="thread_contention")
    a = p.parse_args(argv)
    t0 = time.time()
    load0 = " ".join(f"{v:.2f}" for v in os.getloadavg())
    work = _workloads(a.scale)
    if a.only:
        work = {k: v for k, v in work.items() if k in a.only}
    b0, c0, w0 = _busy_s(), time.process_time(), time.perf_counter()
    rows = measure(work, a.rounds)
    others = max(0.0, _busy_s() - b0 - (time.process_time() - c0)) / (time.perf_counter() - w0)
    meta = run_meta(__file__, argv, t0, seeds=[0], note=a.note, load_start=load0,
                    other_processes_cores=others, load_end=" ".join(f"{v:.2f}" for v in os.getloadavg()))
    md = ["# Two threads of one process on the same kind of work: how much each slows the other", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
          f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; {a.note or 'machine state not noted'}; "
          f"load average at start / end {meta['load_start']} / {meta['load_end']}; other processes used "
          f"{others:.2f} cores on average meanwhile (`/proc/stat`); single run, medians of "
          f"{a.rounds} interleaved rounds.", "",
          "Thread 0: the calling thread, thread 1: a runtime worker, each with its own data. alone: one "
          "thread's copy while the other waits; pair: both at once (started by a barrier). Slowdown = "
          "time in the pair / time alone, per thread (wall; CPU = thread CPU time). ~1.0: the threads do "
          "not share that resource; ~2.0: they share it fully (two hardware threads of one core on an "
          "execution unit).", "",
          "| work | alone ms, thread 0 / 1 | pair ms, thread 0 / 1 | slowdown wall 0 / 1 "
          "| slowdown CPU 0 / 1 |",
          "|---|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['work']} | {r['alone_ms'][0]:.2f} / {r['alone_ms'][1]:.2f} | "
                  f"{r['pair_ms'][0]:.2f} / {r['pair_ms'][1]:.2f} | "
                  f"{r['slowdown_wall'][0]:.2f} / {r['slowdown_wall'][1]:.2f} | "
                  f"{r['slowdown_cpu'][0]:.2f} / {r['slowdown_cpu'][1]:.2f} |")
    write_results(a.out, a.name, {"meta": meta, "rows": rows}, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
