"""Linear layers with 5- to 8-bit weights in the packed runtime, against the same layer at 4 bits
and against PyTorch / onnxruntime int8, measured side by side in one process.

    python benchmarks/speed/bench_linear_wide.py                       # 1024 and 4096, batch 1/8/64
    python benchmarks/speed/bench_linear_wide.py --sizes 1024 --batches 1 --name linear_wide_small

One ``Linear(N, N)`` per size, quantized with DoReFa weights at 4-8 bits (and symmetric ``uniform``
8-bit weights) times PACT activations at 4 and 8 bits, compiled with ``lowbit.runtime.compile``;
baselines: PyTorch dynamic int8 (``quantize_dynamic``), onnxruntime dynamic int8 and static QDQ
int8 of the float layer. Every method of one (size, batch) group is timed in the same interleaved
rounds (``harness.time_interleaved``), one thread, so only ratios within a group are meaningful
(the machine may be loaded). Each packed layer's outputs are checked against its float64 reference
(``compiler.reference_fp64``) once. Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, run_meta, write_results
from harness import _infer, export_onnx, ort_session, set_threads, time_interleaved, torch_dynamic_int8

log = logging.getLogger("bench_linear_wide")

#: name -> (weight spec, activation bits)
VARIANTS: dict[str, tuple[dict[str, Any], int]] = {
    **{f"w{b}a{a}": ({"method": "dorefa", "bits": b}, a) for a in (8, 4) for b in (4, 5, 6, 7, 8)},
    **{f"u8a{a}": ({"method": "uniform", "bits": 8}, a) for a in (8, 4)},
}
BASELINES = ("torch-dyn-int8", "ort-dyn-int8", "ort-qdq-int8")


def packed_layer(fl: nn.Module, weight: dict[str, Any], abits: int, example: torch.Tensor):
    """(compiled model, its layer's kernel description, max |packed - float64 reference|)."""
    import copy

    import lowbit
    from lowbit.runtime import compile as rt_compile
    from lowbit.runtime.compiler import reference_fp64

    q = copy.deepcopy(fl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(q, {"default": {"weight": weight, "activation": {"method": "pact", "bits": abits,
                                                                          "alpha_init": 3.0}}})
    q.eval()
    packed = rt_compile(q, example)
    x = example[:4]
    ref = reference_fp64(q, x)
    err = float((_infer(packed, x).double() - ref.double()).abs().max())
    desc = "; ".join(m.describe() for m in packed.modules() if hasattr(m, "describe"))
    return packed, desc, err


def run(sizes: list[int], batches: list[int], variants: list[str], budget: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in sizes:
        torch.manual_seed(n)
        fl = nn.Sequential(nn.Linear(n, n)).eval()
        gen = torch.Generator().manual_seed(1)
        xs = {b: torch.rand(b, n, generator=gen) * 3.0 for b in batches}
        engines: dict[str, Any] = {}
        info: dict[str, dict[str, Any]] = {}
        for v in variants:
            w, a = VARIANTS[v]
            t = time.perf_counter()
            engines[v], desc, err = packed_layer(fl, w, a, torch.rand(4, n, generator=gen) * 3.0)
            info[v] = {"kernel": desc, "max_abs_err_vs_fp64": err, "compile_s": time.perf_counter() - t}
            log.info("N=%d %s: %s (err %.2e, %.1f s)", n, v, desc, err, info[v]["compile_s"])
        tq, _ = torch_dynamic_int8(fl)
        with tempfile.TemporaryDirectory() as d:
            calib = [(torch.rand(8, n, generator=gen) * 3.0).numpy() for _ in range(4)]
            paths, _missing = export_onnx(fl, xs[batches[0]], calib, Path(d))
            sessions = {k: ort_session(p, 1) for k, p in paths.items() if k in BASELINES}
            for b in batches:
                x = xs[b]
                xn = x.numpy()
                fns = {v: (lambda e=e, x=x: _infer(e, x)) for v, e in engines.items()}
                fns["torch-dyn-int8"] = lambda x=x, tq=tq: _infer(tq, x)
                for k, s in sessions.items():
                    fns[k] = lambda s=s, xn=xn: s(xn)
                tm = time_interleaved(fns, max_rounds=400, budget_s=budget)
                best8 = min(tm[k]["median_s"] for k in BASELINES if k in tm)
                for k, r in tm.items():
                    ref4 = f"w4a{VARIANTS[k][1]}" if k in VARIANTS else None
                    rows.append({
                        "N": n, "batch": b, "method": k, "median_ms": r["median_s"] * 1e3,
                        "min_ms": r["min_s"] * 1e3, "rounds": r["rounds"],
                        "x_best_int8": best8 / r["median_s"],
                        "time_vs_4bit": (r["median_s"] / tm[ref4]["median_s"]) if ref4 in tm else None,
                        **info.get(k, {}),
                    })
                log.info("N=%d batch %d: %s", n, b, {k: round(r["median_s"] * 1e3, 3) for k, r in tm.items()})
            del sessions
        del engines, tq
        gc.collect()
    return rows


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = ["# Linear layers with 5-8 bit weights (packed runtime)", "",
           f"`{meta['command']}` (commit {meta['git'].get('commit', '?')[:10]}"
           f"{', dirty' if meta['git'].get('dirty') else ''}). One thread; all methods of a (N, batch) group "
           "timed in the same interleaved rounds on a possibly loaded machine: compare within a group only.",
           "", "`vs 4-bit`: median time over the DoReFa 4-bit layer's at the same activation bits (lower is "
           "faster); `x best int8`: fastest int8 baseline's median over this one's (higher is faster).", "",
           "| N | batch | method | median ms | vs 4-bit | x best int8 | kernel |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        v4 = f"{r['time_vs_4bit']:.2f}" if r.get("time_vs_4bit") is not None else ""
        out.append(f"| {r['N']} | {r['batch']} | {r['method']} | {r['median_ms']:.3f} | {v4} | "
                   f"{r['x_best_int8']:.2f} | {r.get('kernel', '')} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per (N, batch) group")
    p.add_argument("--name", default="linear_wide")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    set_threads(1)
    rows = run(args.sizes, args.batches, args.variants, args.budget)
    meta = run_meta(__file__, argv, t0, seeds=[0, 1], threads=1)
    write_results(ROOT / "benchmarks" / "results", args.name, {"meta": meta, "rows": rows},
                  to_markdown(rows, meta))
    np.set_printoptions(precision=3)
    print(to_markdown(rows, meta))


if __name__ == "__main__":
    main()
