"""A/B of the speed harness's settle between turns: sleeping until the other threads of the process
are idle (``harness.settle``, the protocol of speed.md at 771122a) against running the timed method
untimed until the threads that were spinning have stopped (``harness.settle_running``, no sleep).

    python benchmarks/speed/ab_settle.py [--cases lenet5 resnet20] [--repeats 2] [--out DIR]

Each case runs ``harness.run_case`` (all baselines and lowbit w1a4, batches 1 and 8, 1 and 2
threads) once per protocol, the protocols alternating ``--repeats`` times (ABAB), in one process.
The check of fairness: at batch 1 a packed LeNet-5 / ResNet-20 runs on the calling thread whatever
the thread count (``SERIAL_MAX_NUMEL``), so its time in the 2-thread block should equal its time in
the 1-thread block; a protocol that slows the core (a sleep before the timed call) shows as a ratio
above 1. Writes ``<out>/ab_settle.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from common import run_meta, write_results

RESULTS = Path(__file__).resolve().parents[1] / "results"
PROTOCOLS = ("sleep", "run")


_TIME_INTERLEAVED = harness.time_interleaved


def _with_protocol(protocol: str):
    """``harness.time_interleaved`` with the protocol's settle (patched for one ``run_case``)."""

    def timed(*args: Any, **kw: Any):
        if protocol == "sleep" and kw.get("turns"):
            kw["settle_fn"] = harness.settle
        return _TIME_INTERLEAVED(*args, **kw)

    return timed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["lenet5", "resnet20"], choices=["lenet5", "resnet20"])
    p.add_argument("--repeats", type=int, default=2, help="ABAB repetitions of the two protocols")
    p.add_argument("--block-s", type=float, default=3.0)
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    for rep in range(a.repeats):
        for protocol in PROTOCOLS if rep % 2 == 0 else PROTOCOLS[::-1]:
            keep = harness.time_interleaved
            harness.time_interleaved = _with_protocol(protocol)
            try:
                for name in a.cases:
                    case = harness.CASES[name]
                    got, _ = harness.run_case(name, case, (1, 2), (1, 8), ("w1a4",), 400, a.block_s, 0)
                    rows += [{**r, "protocol": protocol, "repeat": rep} for r in got]
            finally:
                harness.time_interleaved = keep
            print(f"repeat {rep} {protocol} done", flush=True)
    rows = [{k: v for k, v in r.items() if isinstance(v, (int, float, str)) or v is None} for r in rows]
    meta = run_meta(__file__, argv, t0, seeds=[0], machine_info=harness.machine_info(), note=a.note)
    write_results(a.out, "ab_settle", {"meta": meta, "rows": rows}, markdown(rows, meta))
    print(markdown(rows, meta))


def _med(rows: list[dict], **key: Any) -> float:
    v = [r["median_ms"] for r in rows if all(r[k] == x for k, x in key.items())]
    return statistics.median(v) if v else float("nan")


def markdown(rows: list[dict], meta: dict) -> str:
    m = meta["machine_info"]
    lines = [
        "# Speed harness: settle by sleeping vs settle by running the method",
        "",
        f"Machine: {m.get('cpu', '?')} ({m.get('logical_cpus', '?')} logical CPUs). {meta.get('note') or ''}",
        f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; one process, the protocols alternating; "
        "per cell the median over the repeats of each block's median (ms).",
        "",
        "`sleep`: before each turn the harness sleeps in 4 ms windows until the process's other threads "
        "are idle (onnxruntime's and PyTorch's pools spin after a 2-thread call), then 2 ms of untimed "
        "calls, then the timed call. `run`: the method's untimed calls run until the threads that were "
        "spinning at the turn's start have stopped (no sleep), then the same.",
        "",
        "| case | batch | threads | method | sleep ms | run ms | sleep / run |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    keys = sorted({(r["model"], r["batch"], r["threads"], r["method"]) for r in rows})
    for case, b, t, meth in keys:
        s = _med(rows, model=case, batch=b, threads=t, method=meth, protocol="sleep")
        r = _med(rows, model=case, batch=b, threads=t, method=meth, protocol="run")
        lines.append(f"| {case} | {b} | {t} | {meth} | {s:.4f} | {r:.4f} | {s / r:.2f}x |")
    lines += ["", "Fairness check: lowbit at batch 1 runs on one thread in both blocks, so the 2-thread "
              "block's time over the 1-thread block's should be 1.", "",
              "| case | protocol | lowbit b1, 1-thread block ms | 2-thread block ms | ratio |",
              "|---|---|---:|---:|---:|"]
    for case in sorted({r["model"] for r in rows}):
        for pr in PROTOCOLS:
            one = _med(rows, model=case, batch=1, threads=1, method="lowbit-w1a4", protocol=pr)
            two = _med(rows, model=case, batch=1, threads=2, method="lowbit-w1a4", protocol=pr)
            lines.append(f"| {case} | {pr} | {one:.4f} | {two:.4f} | {two / one:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
