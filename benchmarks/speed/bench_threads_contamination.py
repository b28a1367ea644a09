"""Do the idle threads one runtime leaves spinning slow down the next runtime's call?

    python benchmarks/speed/bench_threads_contamination.py                  # ~1.5 min
    python benchmarks/speed/bench_threads_contamination.py --threads 2 --rounds 6 --out /tmp/r

The speed benchmark interleaves calls of PyTorch, onnxruntime and lowbit in one process. PyTorch's
OpenMP workers (libgomp) and onnxruntime's intra-op pool spin for a while after a parallel region
before they sleep; on a 2-core machine a spinning thread takes a core from whichever call comes
next. Two measurements, every model at one batch, 1 and 2 threads:

1. Spinning: the CPU time of every thread but the calling one (``/proc/self/task/*/schedstat``,
   nanoseconds) in windows after one call of each method, the caller asleep: cores busy = that
   time / the window. Each repetition starts after a long sleep (everything parked).
2. Contamination: the call of method V timed right after a call of method P (P untimed), with and
   without a settle (a sleep of ``--settle-ms``) between them, every (P, V, settle) trial in a new
   random order each round. V after V with no settle is V run alone, as a user's loop runs it.

Packed models: binary weights, PACT 4-bit activations (``w1a4``). Writes
benchmarks/results/threads_contamination.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conv import ACTIVATION, MODELS, WEIGHTS, _export_onnx, _randomize_bn
from common import run_meta, write_results
from harness import ort_session, set_threads

import lowbit
from lowbit.models import build_model
from lowbit.runtime import compile as rt_compile

RESULTS = Path(__file__).resolve().parents[1] / "results"
WINDOWS_MS = (1, 3, 10, 30, 100, 300)  # window ends after the call returns


def other_threads_cpu_ns() -> int:
    """CPU nanoseconds used so far by every thread of this process except the calling one."""
    me = threading.get_native_id()
    total = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return total


def spin_profile(fn, reps: int, park_s: float) -> list[float]:
    """Median cores busy (other threads' CPU / wall time) in each window of :data:`WINDOWS_MS`."""
    per_window: list[list[float]] = [[] for _ in WINDOWS_MS]
    for _ in range(reps):
        time.sleep(park_s)
        fn()
        t_end = time.perf_counter()
        c_prev, t_prev = other_threads_cpu_ns(), t_end
        for i, w in enumerate(WINDOWS_MS):
            time.sleep(max(0.0, t_end + w * 1e-3 - time.perf_counter()))
            c, t = other_threads_cpu_ns(), time.perf_counter()
            per_window[i].append((c - c_prev) * 1e-9 / max(t - t_prev, 1e-9))
            c_prev, t_prev = c, t
    return [statistics.median(v) for v in per_window]


MODES = ("", " + settle", " + settle + warm")


def contamination(fns: dict, rounds: int, settle_s: float, seed: int) -> dict[str, dict[str, float]]:
    """Median ms of V right after P, for every (P, V) pair and :data:`MODES`: nothing between the
    two calls, a settle (sleep), or a settle and one untimed call of V (the speed harness's turn)."""
    trials = [(p, v, m) for p in fns for v in fns for m in MODES]
    times: dict[tuple, list[float]] = {k: [] for k in trials}
    rng = random.Random(seed)
    for f in fns.values():  # warm-up
        f()
    for _ in range(rounds):
        rng.shuffle(trials)
        for p, v, m in trials:
            fns[p]()
            if m:
                time.sleep(settle_s)
            if m == MODES[2]:
                fns[v]()
            t0 = time.perf_counter()
            fns[v]()
            times[(p, v, m)].append(time.perf_counter() - t0)
    # a fixed column order: every predecessor, each mode
    return {v: {f"after {p}{m}": 1e3 * statistics.median(times[(p, v, m)]) for p in fns for m in MODES}
            for v in fns}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--settle-ms", type=float, default=100.0)
    p.add_argument("--spin-reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    t0 = time.time()
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    tmp = Path(tempfile.mkdtemp())
    set_threads(max(a.threads))
    built = {}
    for name in a.models:
        shape = MODELS[name][1]
        fm = build_model(name).eval()
        _randomize_bn(fm, a.seed)
        q = lowbit.quantize(copy.deepcopy(fm), {"default": {"weight": WEIGHTS["binary"],
                                                            "activation": ACTIVATION}}).eval()
        x = torch.rand(a.batch, *shape, generator=torch.Generator().manual_seed(a.seed))
        packed = rt_compile(q, x)
        _export_onnx(fm, shape, tmp / f"{name}.onnx")
        built[name] = (fm, packed, x)
    spin, cont = [], []
    for t in a.threads:
        set_threads(t)
        for name, (fm, packed, x) in built.items():
            sess = ort_session(tmp / f"{name}.onnx", t)
            xn = x.numpy()

            def torch_fp32(fm=fm, x=x):
                with torch.inference_mode():
                    return fm(x)

            fns = {"lowbit-w1a4": lambda packed=packed, x=x: packed(x),
                   "ort-fp32": lambda sess=sess, xn=xn: sess(xn), "torch-fp32": torch_fp32}
            for f in fns.values():
                f()
            for m, f in fns.items():
                spin.append({"threads": t, "model": name, "method": m,
                             "cores_busy": spin_profile(f, a.spin_reps, 0.5)})
            for v, d in contamination(fns, a.rounds, a.settle_ms * 1e-3, a.seed).items():
                cont.append({"threads": t, "model": name, "batch": a.batch, "victim": v, "ms": d})
            del sess
    meta = run_meta(__file__, argv, t0, seeds=[a.seed], load_start=load_start,
                    load_end=" ".join(f"{v:.2f}" for v in os.getloadavg()), rounds=a.rounds,
                    settle_ms=a.settle_ms, windows_ms=list(WINDOWS_MS))
    payload = {"meta": meta, "spin": spin, "contamination": cont}
    write_results(a.out, "threads_contamination", payload, to_markdown(payload))
    print(to_markdown(payload))


def to_markdown(payload: dict) -> str:
    m = payload["meta"]
    md = ["# Idle-spinning threads of one runtime slow the next runtime's call", "",
          f"Command: `{m['command']}`; commit {m['git'].get('commit', '?')[:10]}; load average at start / "
          f"end {m['load_start']} / {m['load_end']}; single run, seed {m['seeds'][0]}.", "",
          "## 1. Other threads' CPU after one call (cores busy, median of repetitions)", "",
          "Window `a-b ms`: from a to b ms after the call returned, the caller asleep; 1.0 = one core "
          "spinning the whole window.", ""]
    wins = m["windows_ms"]
    heads = [f"{lo}-{hi} ms" for lo, hi in zip([0, *wins[:-1]], wins, strict=True)]
    md += ["| threads | model | method | " + " | ".join(heads) + " |",
           "|---:|---|---|" + "---:|" * len(heads)]
    md += [f"| {r['threads']} | {r['model']} | {r['method']} | "
           + " | ".join(f"{c:.2f}" for c in r["cores_busy"]) + " |" for r in payload["spin"]]
    md += ["", f"## 2. Median ms of a call right after another method's call (settle = {m['settle_ms']:g} ms "
           f"sleep), {m['rounds']} rounds, trials shuffled", "",
           "Bold: the method after itself (run alone, back to back); in brackets: the time / that. "
           "`+ settle + warm`: the sleep, then one untimed call of the timed method (the speed harness's "
           "turn).", ""]
    prev = None
    for r in payload["contamination"]:
        d, v = r["ms"], r["victim"]
        alone = d[f"after {v}"]
        if (r["threads"], r["model"]) != prev:
            prev = (r["threads"], r["model"])
            md += ["", f"**{r['model']}, batch {r['batch']}, {r['threads']} thread(s)**", "",
                   "| timed call | " + " | ".join(d) + " |", "|---|" + "---:|" * len(d)]
        cells = [f"**{d[c]:.3f}**" if c == f"after {v}" else f"{d[c]:.3f} ({d[c] / alone:.2f}x)" for c in d]
        md.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
