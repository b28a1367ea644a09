"""The flat executor's thread rule (``executor.split_step``): what it is based on and what it does.

    python benchmarks/speed/bench_flat_split.py                 # ~1-2 min
    python benchmarks/speed/bench_flat_split.py --budget-s 3 --out /tmp/r

1. One thread: each conv net's serial time per image (batch 1 and 32, least disturbed quarter of
   the calls) and the round trip of handing a no-op to the runtime's worker pool and waiting for
   it: the two numbers the rule's ``MIN_THREAD_WORK_S`` weighs.
2. Two threads, interleaved rounds: the packed model with the rule against the same model with
   ``MIN_THREAD_WORK_S = 0`` (a batch split whenever each thread gets ``MIN_SPLIT`` images, the
   behaviour before the rule), outputs checked equal.
3. Batch 1, two threads: the packed model's call alone and right after a 2-thread onnxruntime FP32
   call (only the packed call timed): how much another runtime's spinning threads cost the next
   call, which runs on one thread either way.

Packed models: binary weights, PACT 4-bit activations. Writes benchmarks/results/flat_split.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conv import ACTIVATION, MODELS, WEIGHTS, _export_onnx, _randomize_bn
from common import run_meta, write_results
from harness import ort_session, set_threads, time_interleaved

import lowbit
from lowbit.models import build_model
from lowbit.runtime import compile as rt_compile
from lowbit.runtime import executor as E
from lowbit.runtime import kernels_threads as KT

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _q25(v: list[float]) -> float:
    v = sorted(v)
    return v[len(v) // 4]


def serial_per_image(packed, shape, batch: int, n: int) -> float:
    """Least-disturbed-quarter seconds per image of the general path on one thread."""
    x = torch.rand(batch, *shape)
    ex = packed.executor
    for _ in range(3):
        ex._call(x)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        ex._call(x)
        ts.append(time.perf_counter() - t)
    return _q25(ts) / batch


def handoff(n: int = 2000) -> dict[str, float]:
    pool = KT.thread_pool(2)
    for _ in range(100):
        pool.submit(int).result()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        pool.submit(int).result()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return {"min_us": 1e6 * ts[0], "q25_us": 1e6 * ts[n // 4], "median_us": 1e6 * ts[n // 2],
            "p90_us": 1e6 * ts[9 * n // 10]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 32])
    p.add_argument("--budget-s", type=float, default=4.0, help="time budget of one interleaved block")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--seed", type=int, default=0,
                   help="the models' weights and BN statistics, the inputs (batch B's: seed + B) and the "
                   "interleaved rounds' order")
    a = p.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(a.seed)  # the float weights and the serial and batch-1 inputs: the global generator
    rows, b1 = [], []
    per_image = {}
    set_threads(1)
    hand = handoff()
    tmp = Path(tempfile.mkdtemp())
    models = {}
    for name in a.models:
        shape = MODELS[name][1]
        fm = build_model(name).eval()
        _randomize_bn(fm, a.seed)
        q = lowbit.quantize(copy.deepcopy(fm), {"default": {"weight": WEIGHTS["binary"],
                                                            "activation": ACTIVATION}}).eval()
        packed = rt_compile(q, torch.rand(2, *shape, generator=torch.Generator().manual_seed(a.seed)))
        _export_onnx(fm, shape, tmp / f"{name}.onnx")
        models[name] = (packed, shape)
        per_image[name] = {f"b{b}_us": 1e6 * serial_per_image(packed, shape, b, 60 if b == 1 else 15)
                           for b in (1, 32)}
    set_threads(2)
    keep = E.MIN_THREAD_WORK_S
    try:
        for name, (packed, shape) in models.items():
            for B in a.batches:
                x = torch.rand(B, *shape, generator=torch.Generator().manual_seed(a.seed + B))

                def rule(x=x, packed=packed):
                    E.MIN_THREAD_WORK_S = keep
                    return packed(x)

                def old(x=x, packed=packed):
                    E.MIN_THREAD_WORK_S = 0.0
                    return packed(x)

                assert torch.equal(rule(), old())
                t = time_interleaved({"rule": rule, "old": old}, 400, a.budget_s, seed=a.seed)
                E.MIN_THREAD_WORK_S = keep
                packed(x)
                rows.append({"model": name, "batch": B, "rule_ms": 1e3 * t["rule"]["median_s"],
                             "old_ms": 1e3 * t["old"]["median_s"],
                             "rule_threads": packed.executor.last_threads,
                             "speedup": t["old"]["median_s"] / t["rule"]["median_s"]})
            sess = ort_session(tmp / f"{name}.onnx", 2)
            x1 = torch.rand(1, *shape)
            xn = x1.numpy()
            after: list[float] = []

            def alone(x1=x1, packed=packed):
                return packed(x1)

            def after_ort(x1=x1, xn=xn, sess=sess, after=after, packed=packed):
                sess(xn)
                t = time.perf_counter()
                y = packed(x1)
                after.append(time.perf_counter() - t)
                return y

            t = time_interleaved({"alone": alone, "after_ort": after_ort}, 2000, a.budget_s, seed=a.seed)
            b1.append({"model": name, "alone_us": 1e6 * t["alone"]["median_s"],
                       "after_ort2_us": 1e6 * float(np.median(after[-t["alone"]["rounds"]:])),
                       "rounds": t["alone"]["rounds"]})
    finally:
        E.MIN_THREAD_WORK_S = keep
    share = E.thread_share_s()
    payload = {"meta": run_meta(__file__, argv, t0, seeds=[a.seed], min_thread_work_s=keep,
                                handoff_share=E.HANDOFF_SHARE, runtime_handoff_s=E.handoff_s(),
                                share_s=share),
               "handoff": hand,
               "serial_per_image": per_image, "split": rows, "batch1_after_ort": b1}
    md = ["# Flat executor: the thread rule", "",
          f"Command: `{payload['meta']['command']}`. Single run; timings on a shared, loaded 2-core machine,",
          "ratios within one interleaved block only.", "",
          f"Hand-off of a no-op to the worker pool and back (1 thread): min {hand['min_us']:.1f} us, "
          f"median {hand['median_us']:.1f} us, p90 {hand['p90_us']:.1f} us. "
          f"Rule: split when each thread's share >= max({keep * 1e6:.0f} us, {E.HANDOFF_SHARE:g} x the "
          f"runtime's own hand-off measure {E.handoff_s() * 1e6:.1f} us) = {share * 1e6:.0f} us.", "",
          "| model | serial us/image, batch 1 | serial us/image, batch 32 |", "|---|---:|---:|"]
    md += [f"| {k} | {v['b1_us']:.1f} | {v['b32_us']:.1f} |" for k, v in per_image.items()]
    md += ["", "2 threads, rule vs split by image count (before the rule), medians:", "",
           "| model | batch | rule ms | old ms | old / rule | threads (rule) |",
           "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['batch']} | {r['rule_ms']:.3f} | {r['old_ms']:.3f} | {r['speedup']:.2f}x | "
           f"{r['rule_threads']} |" for r in rows]
    md += ["", "Batch 1, 2 threads: the packed call alone vs right after a 2-thread onnxruntime FP32 call:",
           "",
           "| model | alone us | after ort (2 threads) us | ratio |", "|---|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['alone_us']:.1f} | {r['after_ort2_us']:.1f} | "
           f"{r['alone_us'] / r['after_ort2_us']:.2f}x |" for r in b1]
    write_results(a.out, "flat_split", payload, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
