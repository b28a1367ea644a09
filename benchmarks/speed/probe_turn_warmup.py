"""How long a method must run after a sleep before its calls are timed: LeNet-5 at batch 1 (lowbit
w1a4 packed, onnxruntime FP32), one thread. Each repetition sleeps (as the speed harness's settle
does), runs untimed calls for ``warm`` ms (at least one call), then times one call; beside it, the
same call timed back to back in a plain loop. Sets ``harness.TURN_WARM_S``.

    python benchmarks/speed/probe_turn_warmup.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from ab_call_path import ort_fp32
from common import run_meta, write_results
from harness import CASES, make_inputs, quantized_model

from lowbit.runtime import compile as rt_compile


def _after_sleep(fn, warm_s: float, sleep_s: float, reps: int) -> list[float]:
    pc, out = time.perf_counter, []
    for _ in range(reps):
        time.sleep(sleep_s)
        t = pc()
        fn()
        while pc() - t < warm_s:
            fn()
        t0 = pc()
        fn()
        out.append(pc() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warm-ms", nargs="+", type=float, default=[0, 0.5, 2, 10])
    ap.add_argument("--sleep-ms", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(1)
    case = CASES["lenet5"]
    torch.manual_seed(0)
    fmodel = case.build().eval()
    example = make_inputs(case, 2, 1)
    packed = rt_compile(quantized_model(fmodel, "w1a4"), example)
    x = make_inputs(case, 1, 0).contiguous()
    xn = x.numpy()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        ort = ort_fp32(fmodel, example, Path(d))
        fns = {"lowbit-w1a4": lambda: packed(x), "ort-fp32": lambda: ort(xn)}
        for fn in fns.values():
            for _ in range(200):
                fn()
        for name, fn in fns.items():
            loop = []
            for _ in range(10 * args.reps):
                t = time.perf_counter()
                fn()
                loop.append(time.perf_counter() - t)
            rows.append({"method": name, "warm_ms": None, "median_us": 1e6 * statistics.median(loop),
                         "min_us": 1e6 * min(loop)})
            for w in args.warm_ms:
                v = _after_sleep(fn, w / 1e3, args.sleep_ms / 1e3, args.reps)
                rows.append({"method": name, "warm_ms": w, "median_us": 1e6 * statistics.median(v),
                             "min_us": 1e6 * min(v)})
    meta = run_meta(__file__, argv, t0, seeds=[0], threads=1, note=args.note)
    md = ["# A timed call after a sleep: how much warm-up it needs (LeNet-5, batch 1, one thread)", "",
          f"`{meta['command']}`; commit {str(meta['git'].get('commit'))[:10]}"
          f"{' (dirty tree)' if meta['git'].get('dirty') else ''}. {args.note} Single run: each "
          f"repetition sleeps {args.sleep_ms:g} ms, runs untimed calls for the warm-up (at least one), "
          f"then times one call; {args.reps} repetitions, and a plain loop of {10 * args.reps} calls.", "",
          "| method | untimed calls for | median us | min us | median / loop median |",
          "|---|---|---:|---:|---:|"]
    for r in rows:
        base = next(b for b in rows if b["method"] == r["method"] and b["warm_ms"] is None)
        label = "plain loop" if r["warm_ms"] is None else f"{r['warm_ms']:g} ms (>= 1 call)"
        md.append(f"| {r['method']} | {label} | {r['median_us']:.1f} | {r['min_us']:.1f} | "
                  f"{r['median_us'] / base['median_us']:.2f} |")
    write_results(args.out, "turn_warmup", {**meta, "rows": rows}, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
