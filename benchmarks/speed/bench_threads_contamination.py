"""Do the idle threads one runtime leaves spinning slow down the next runtime's call?

    python benchmarks/speed/bench_threads_contamination.py                  # ~1.5 min
    python benchmarks/speed/bench_threads_contamination.py --threads 2 --rounds 2 --out /tmp/r

The speed benchmark interleaves calls of PyTorch, onnxruntime and lowbit in one process. PyTorch's
OpenMP workers (libgomp) and onnxruntime's intra-op pool spin for a while after a parallel region
before they sleep; on a 2-core machine a spinning thread takes a core from whichever call comes
next. Three measurements, every model at one batch, 1 and 2 threads:

1. Spinning: the CPU time of every thread but the calling one (``/proc/self/task/*/schedstat``,
   nanoseconds) in windows after one call of each method, the caller asleep: cores busy = that
   time / the window. Each repetition starts after a long sleep (everything parked).
2. Contamination: the call of method V timed right after a call of method P (P untimed): directly,
   after ``harness.settle`` (sleep until this process's other threads are idle), or after the settle
   and one untimed call of V (the speed harness's turn); every (P, V, mode) trial in a new random
   order each round. V right after V is V run alone, as a user's loop runs it.
3. The speed harness's block (``harness.time_interleaved``) on the three methods with plain rounds
   and with turns, alternated: the 2-thread / 1-thread ratios each gives.

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
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conv import ACTIVATION, MODELS, WEIGHTS, _export_onnx, _randomize_bn
from common import run_meta, write_results
from harness import ort_session, others_cpu_s, set_threads, settle, time_interleaved

import lowbit
from lowbit.models import build_model
from lowbit.runtime import compile as rt_compile

RESULTS = Path(__file__).resolve().parents[1] / "results"
WINDOWS_MS = (1, 3, 10, 30, 100, 300)  # window ends after the call returns


def busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds every process on the machine has used, CPU seconds this process has used)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / tick, time.process_time()  # all but idle and iowait


def steal_ticks() -> int:
    """Stolen time so far (``/proc/stat``, clock ticks; 0 where it cannot be read): time the
    hypervisor ran something else while one of this machine's virtual CPUs wanted to run.
    :func:`busy_cpu_s` counts it as busy."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) if fields[0] == "cpu" and len(fields) > 8 else 0
    except OSError:
        return 0


class MachineShare:
    """What else used the machine from construction to :meth:`stop`: the load average at both ends,
    other processes' cores and the hypervisor's stolen cores on average (``/proc/stat``)."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
        self.busy0, self.steal0 = busy_cpu_s(), steal_ticks()

    def stop(self) -> dict[str, object]:
        busy1, steal1 = busy_cpu_s(), steal_ticks()
        wall = time.time() - self.t0
        stolen = (steal1 - self.steal0) / os.sysconf("SC_CLK_TCK") / wall
        # busy_cpu_s counts stolen time as busy
        others = max(0.0, (busy1[0] - self.busy0[0] - (busy1[1] - self.busy0[1])) / wall - stolen)
        return {"load_start": self.load_start, "load_end": " ".join(f"{v:.2f}" for v in os.getloadavg()),
                "other_processes_cores": others, "stolen_cores": stolen}

    @staticmethod
    def sentence(meta: dict) -> str:
        """The report's words for a :meth:`stop` recorded in ``meta``."""
        return (f"load average at start / end {meta['load_start']} / {meta['load_end']}; other processes "
                f"used {meta['other_processes_cores']:.2f} of the 2 cores and the hypervisor stole "
                f"{meta['stolen_cores']:.2f} on average during the run (`/proc/stat`)")


def spin_profile(fn, reps: int, park_s: float) -> list[float]:
    """Median cores busy (other threads' CPU / wall time) in each window of :data:`WINDOWS_MS`."""
    per_window: list[list[float]] = [[] for _ in WINDOWS_MS]
    for _ in range(reps):
        time.sleep(park_s)
        fn()
        t_end = time.perf_counter()
        c_prev, t_prev = others_cpu_s(), t_end
        for i, w in enumerate(WINDOWS_MS):
            time.sleep(max(0.0, t_end + w * 1e-3 - time.perf_counter()))
            c, t = others_cpu_s(), time.perf_counter()
            per_window[i].append((c - c_prev) / max(t - t_prev, 1e-9))
            c_prev, t_prev = c, t
    return [statistics.median(v) for v in per_window]


MODES = ("", " + settle", " + settle + warm")


def contamination(fns: dict, rounds: int, seed: int) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Median ms of V right after P, for every (P, V) pair and :data:`MODES`: nothing between the
    two calls, ``harness.settle`` (sleep until the other threads are idle), or the settle and one
    untimed call of V (the speed harness's turn); and the median settle ms after each P."""
    trials = [(p, v, m) for p in fns for v in fns for m in MODES]
    times: dict[tuple, list[float]] = {k: [] for k in trials}
    settles: dict[str, list[float]] = {p: [] for p in fns}
    rng = random.Random(seed)
    for f in fns.values():  # warm-up
        f()
    for _ in range(rounds):
        rng.shuffle(trials)
        for p, v, m in trials:
            fns[p]()
            if m:
                settles[p].append(settle())
            if m == MODES[2]:
                fns[v]()
            t0 = time.perf_counter()
            fns[v]()
            times[(p, v, m)].append(time.perf_counter() - t0)
    # a fixed column order: every predecessor, each mode
    ms = {v: {f"after {p}{m}": 1e3 * statistics.median(times[(p, v, m)]) for p in fns for m in MODES}
          for v in fns}
    return ms, {p: 1e3 * statistics.median(v) for p, v in settles.items()}


def block_ab(fns: dict, reps: int, budget_s: float, seed: int) -> dict[str, dict[str, list[float]]]:
    """The speed harness's block (``time_interleaved``) with plain rounds and with turns, ``reps``
    times each, alternating: median ms of each method per repetition."""
    out: dict[str, dict[str, list[float]]] = {"plain": {}, "turns": {}}
    for r in range(reps):
        for mode in (("plain", "turns") if r % 2 == 0 else ("turns", "plain")):
            t = time_interleaved(fns, 15, budget_s, seed=seed + r, turns=mode == "turns")
            for k, d in t.items():
                out[mode].setdefault(k, []).append(1e3 * d["median_s"])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--block-reps", type=int, default=2, help="repetitions of each harness block mode")
    p.add_argument("--block-s", type=float, default=0.8, help="time budget of one harness block")
    p.add_argument("--spin-reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    t0 = time.time()
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    busy0 = busy_cpu_s()
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
    spin, cont, blocks = [], [], []
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
            ms, settles = contamination(fns, a.rounds, a.seed)
            for v, d in ms.items():
                cont.append({"threads": t, "model": name, "batch": a.batch, "victim": v, "ms": d,
                             "settle_ms_after_it": settles[v]})
            blocks.append({"threads": t, "model": name, "batch": a.batch,
                           **block_ab(fns, a.block_reps, a.block_s, a.seed)})
            del sess
    busy1 = busy_cpu_s()
    others = (busy1[0] - busy0[0] - (busy1[1] - busy0[1])) / (time.time() - t0)
    meta = run_meta(__file__, argv, t0, seeds=[a.seed], load_start=load_start, other_processes_cores=others,
                    load_end=" ".join(f"{v:.2f}" for v in os.getloadavg()), rounds=a.rounds,
                    windows_ms=list(WINDOWS_MS), block_reps=a.block_reps, block_s=a.block_s)
    payload = {"meta": meta, "spin": spin, "contamination": cont, "blocks": blocks}
    write_results(a.out, "threads_contamination", payload, to_markdown(payload))
    print(to_markdown(payload))


def to_markdown(payload: dict) -> str:
    m = payload["meta"]
    md = ["# Idle-spinning threads of one runtime slow the next runtime's call", "",
          f"Command: `{m['command']}`; commit {m['git'].get('commit', '?')[:10]}; load average at start / "
          f"end {m['load_start']} / {m['load_end']}; other processes used "
          f"{m['other_processes_cores']:.2f} cores on average during the run (`/proc/stat`); single run, "
          f"seed {m['seeds'][0]}.", "",
          "## 1. Other threads' CPU after one call (cores busy, median of repetitions)", "",
          "Window `a-b ms`: from a to b ms after the call returned, the caller asleep; 1.0 = one core "
          "spinning the whole window.", ""]
    wins = m["windows_ms"]
    heads = [f"{lo}-{hi} ms" for lo, hi in zip([0, *wins[:-1]], wins, strict=True)]
    md += ["| threads | model | method | " + " | ".join(heads) + " |",
           "|---:|---|---|" + "---:|" * len(heads)]
    md += [f"| {r['threads']} | {r['model']} | {r['method']} | "
           + " | ".join(f"{c:.2f}" for c in r["cores_busy"]) + " |" for r in payload["spin"]]
    short = {"lowbit-w1a4": "lowbit", "ort-fp32": "ort", "torch-fp32": "torch"}
    md += ["", f"## 2. Median ms of a call right after another method's call ({m['rounds']} rounds, trials "
           "in a new random order each round)", "",
           "Column `after P`: P's call (untimed), then the timed call; `+s`: with `harness.settle` between "
           "them (sleep in 4 ms windows until the process's other threads are idle); `+s+w`: the settle, "
           "then one untimed call of the timed method (the speed harness's turn). Bold: the method after "
           "itself (back to back, as a user's loop runs it alone); in brackets: the time / that. "
           "`settle ms`: median wait of the settle after this method's call.", ""]
    prev = None
    for r in payload["contamination"]:
        d, v = r["ms"], r["victim"]
        alone = d[f"after {v}"]
        cols = [c.replace("after ", "").replace(" + settle", " +s").replace(" + warm", "+w") for c in d]
        for k, n in short.items():
            cols = [c.replace(k, n) for c in cols]
        if (r["threads"], r["model"]) != prev:
            prev = (r["threads"], r["model"])
            md += ["", f"**{r['model']}, batch {r['batch']}, {r['threads']} thread(s)**", "",
                   "| timed call | " + " | ".join(f"after {c}" for c in cols) + " | settle ms |",
                   "|---|" + "---:|" * (len(cols) + 1)]
        cells = [f"**{d[c]:.3f}**" if c == f"after {v}" else f"{d[c]:.3f} ({d[c] / alone:.2f}x)" for c in d]
        md.append(f"| {short.get(v, v)} | " + " | ".join(cells) + f" | {r['settle_ms_after_it']:.1f} |")
    md += ["", "## 3. The speed harness's block: plain rounds against turns", "",
           f"`harness.time_interleaved` on the three methods, budget {m['block_s']:g} s, plain rounds (one "
           "timed call each per round) and turns (settle, untimed call, timed call), alternated, "
           f"{m['block_reps']} repetitions each: median ms of each repetition, and the 2-thread / 1-thread "
           "throughput (ratio of the means of the repetitions' medians).", "",
           "| model | method | mode | 1 thread ms | 2 threads ms | 2 vs 1 thread |",
           "|---|---|---|---:|---:|---:|"]
    blocks = {(b["model"], b["threads"]): b for b in payload["blocks"]}
    for model in dict.fromkeys(b["model"] for b in payload["blocks"]):
        b1, b2 = blocks.get((model, 1)), blocks.get((model, 2))
        for meth in (b1 or b2)["plain"]:
            for mode in ("plain", "turns"):
                v1 = b1[mode][meth] if b1 else None
                v2 = b2[mode][meth] if b2 else None
                fmt = lambda v: " / ".join(f"{x:.3f}" for x in v) if v else "–"  # noqa: E731
                ratio = f"{statistics.mean(v1) / statistics.mean(v2):.2f}x" if v1 and v2 else "–"
                md.append(f"| {model} | {short.get(meth, meth)} | {mode} | {fmt(v1)} | {fmt(v2)} | {ratio} |")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
