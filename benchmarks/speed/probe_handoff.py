"""What the runtime's 2-thread split costs by itself: layers of fixed-duration work (issue 13, threads).

    python benchmarks/speed/probe_handoff.py                                   # ~20 s
    python benchmarks/speed/probe_handoff.py --note "the training campaign paused"

A "call" is ``--layers`` layers, each ``gap`` us of serial work on the calling thread (as a Linear
layer's row quantization and Python) and then ``layer`` us of work split by
``kernels_threads.parallel_for`` into parts (each part spins on the time-stamp counter for its
share: fixed-duration work, so the times measure the hand-off, the wake-ups and the waits, not
the cores' speed). Interleaved rounds time the call on 1 thread (``set_serial``) and on 2 threads
for each ``spin/ppt`` of ``--modes``: :data:`kernels_threads.SPIN_US` (0: the worker and the
caller sleep at once, the hand-off before polling), :data:`kernels_threads.PARTS_PER_THREAD` and
optionally :data:`kernels_threads.SPIN_YIELD_US` (0: never yield while polling).
Ratio = 1-thread call / 2-thread call; the ideal is ``(gap + layer) / (gap + layer / 2)``. Each
timed loop also records the cores the machine's other nice-0 processes used meanwhile
(``/proc/stat``; niced ones, such as the campaign at nice 10, yield to these threads); the "free"
columns take only the rounds in which every loop saw less than ``--free`` of a core used by them
(two threads cannot gain while another process holds the second core). Writes
``<out>/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results

from lowbit._numba import jit
from lowbit.runtime import kernels_threads as KT

RESULTS = Path(__file__).resolve().parents[1] / "results"


@jit
def _spin(ticks):
    t0 = KT._pause()
    while KT._pause() - t0 < ticks:
        pass


@jit
def _spin_range(ticks_per, lo, hi):
    _spin(ticks_per * (hi - lo))


def busy_s() -> float:
    """CPU seconds the machine's processes have used at nice 0 or below (``/proc/stat``; a niced
    process, such as the training campaign at nice 10, yields its core to these threads)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[1] - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def call(layers: int, gap_t: int, per_t: int, units: int) -> None:
    for _ in range(layers):
        _spin(gap_t)
        KT.parallel_for(_spin_range, units, per_t)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--cases", nargs="+", default=["30:250", "60:1200", "300:4500"],
                   help="gap_us:layer_us pairs (about the deep MLP's at batch 8, 64, 256)")
    p.add_argument("--modes", nargs="+", default=["0/4", "300/4", "0/1", "300/1"],
                   help="SPIN_US/PARTS_PER_THREAD[/SPIN_YIELD_US, 0: never] of the 2-thread calls")
    p.add_argument("--free", type=float, default=0.25, help="others' cores below which a round is free")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--note", default="", help="the machine's state (e.g. the training campaign paused)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="probe_handoff")
    a = p.parse_args(argv)
    t0 = time.time()
    load0 = " ".join(f"{v:.2f}" for v in os.getloadavg())
    import numba

    numba.set_num_threads(2)
    keep = (KT.SPIN_US, KT.PARTS_PER_THREAD, KT.SPIN_YIELD_US)
    tpu = KT.ticks_per_us()
    units = 64
    rows = []
    for case in a.cases:
        gap_us, layer_us = (float(v) for v in case.split(":"))
        gap_t, per_t = int(gap_us * tpu), int(layer_us * tpu / units)
        modes = ["1t"] + [f"2t {m}" for m in a.modes]
        got: dict[str, list[float]] = {m: [] for m in modes}
        free: list[bool] = []
        for r in range(a.rounds):
            ok = True
            for m in modes[r % len(modes):] + modes[: r % len(modes)]:  # rotated: no mode always first
                prev = KT.set_serial(m == "1t")
                if m != "1t":
                    spin, ppt, *yl = (int(v) for v in m.split()[-1].split("/"))
                    KT.SPIN_US, KT.PARTS_PER_THREAD = spin, ppt
                    KT.SPIN_YIELD_US = (yl[0] or 10**9) if yl else keep[2]
                try:
                    call(a.layers, gap_t, per_t, units)  # one untimed call: the state of a loop
                    b0, c0, w = busy_s(), time.process_time(), time.perf_counter()
                    for _ in range(3):
                        call(a.layers, gap_t, per_t, units)
                    el = time.perf_counter() - w
                    got[m].append(el / 3)
                    ok = ok and (busy_s() - b0 - (time.process_time() - c0)) / el < a.free
                finally:
                    KT.set_serial(prev)
                    KT.SPIN_US, KT.PARTS_PER_THREAD, KT.SPIN_YIELD_US = keep
            free.append(ok)
        med = {m: statistics.median(v) for m, v in got.items()}
        fr = {m: [t for t, f in zip(v, free, strict=True) if f] for m, v in got.items()}
        fmed = {m: statistics.median(v) for m, v in fr.items() if v}
        ideal = (gap_us + layer_us) / (gap_us + layer_us / 2)
        row = {"gap_us": gap_us, "layer_us": layer_us, "layers": a.layers, "ideal_ratio": ideal,
               "ms": {m: 1e3 * v for m, v in med.items()},
               "ratio": {m: med["1t"] / med[m] for m in modes[1:]}, "rounds": a.rounds,
               "free_rounds": sum(free), "free_ms": {m: 1e3 * v for m, v in fmed.items()},
               "free_ratio": {m: fmed["1t"] / fmed[m] for m in modes[1:] if fmed}}
        rows.append(row)
        print(row, flush=True)
    # no randomness: fixed spin work, modes in a rotated (not shuffled) order
    meta = run_meta(__file__, argv, t0, seeds=[], note=a.note, load_start=load0,
                    load_end=" ".join(f"{v:.2f}" for v in os.getloadavg()))
    head = " | ".join(f"2t {m}: ratio (free)" for m in a.modes)
    md = ["# The 2-thread split's own cost: layers of fixed-duration work", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
          f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; {a.note or 'machine state not noted'}; "
          f"load average at start / end {meta['load_start']} / {meta['load_end']}; single run, medians of "
          f"{a.rounds} interleaved rounds (order rotated; 3 calls each after an untimed one).", "",
          f"A call: {a.layers} x (gap us serial + layer us split over 64 units by `parallel_for`). Modes "
          "`2t s/p[/y]`: `SPIN_US` s, `PARTS_PER_THREAD` p, `SPIN_YIELD_US` y (0: never). Ratio = 1-thread "
          "call / 2-thread call, over all "
          f"rounds and (free) over the rounds in which other nice-0 processes used < {a.free} cores in every "
          "loop; ideal = (gap + layer) / (gap + layer / 2).", "",
          f"| gap us | layer us | 1 thread ms | {head} | free rounds | ideal |",
          "|---:|---:|---:|" + "---:|" * len(a.modes) + "---:|---:|"]
    for r in rows:
        fr = r["free_ratio"]
        cells = " | ".join(f"{r['ratio'][f'2t {m}']:.2f}x ({fr.get(f'2t {m}', float('nan')):.2f}x)"
                           for m in a.modes)
        md.append(f"| {r['gap_us']:.0f} | {r['layer_us']:.0f} | {r['ms']['1t']:.3f} | {cells} | "
                  f"{r['free_rounds']} / {r['rounds']} | {r['ideal_ratio']:.2f}x |")
    write_results(a.out, a.name, {"meta": meta, "rows": rows}, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
