"""Which kernel a Linear layer with 5-8 bit weights should run at few rows: ``layer`` (the layer as
built: the GEMV below ``wide_amx_min_rows`` rows, AMX tiles from there, padded to 16 rows: from 8
rows where the weights fit int8, from 64 for DoReFa 8-bit's 3 int8 parts), ``gemv8`` (the GEMV on
8-bit fields, ``kernels_gemv.WIDE_BITS``, at every row count), ``amx-parts`` (AMX from 8 rows
whatever the int8 parts: DoReFa 8-bit's 3 parts too), ``int8-parts`` (the int8 kernel on int8
parts, ``kernels_int8.int8_conv``, a 1x1 convolution over the rows) and ``bit-serial``
(``gemm_rows`` / ``gemm_cols`` on the weight planes, what such layers ran before outside the flat
executor), side by side in one process.

    python benchmarks/speed/ab_linear_wide.py                     # 1024 and 4096, rows 1 4 8 12 16
    python benchmarks/speed/ab_linear_wide.py --sizes 4096 --rows 1 8 --variants w8a8

Each variant is the same packed layer (``build_packed``) with the other kernels' weights dropped;
every variant's output is checked within 1e-6 relative of the layer's (the same exact integer
sums, float64 epilogues in a different form). One thread, ``harness.time_interleaved``; only ratios within a
(size, weights, rows) group count (the machine may be loaded). Writes
benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, run_meta, write_results
from harness import _infer, set_threads, time_interleaved

log = logging.getLogger("ab_linear_wide")

VARIANTS = {"w5a8": 5, "w8a8": 8}
KERNELS = ("gemv8", "amx-parts", "int8-parts", "bit-serial")


def layers(n: int, bits: int) -> dict[str, Any]:
    import lowbit
    from lowbit.runtime import layers as L
    from lowbit.runtime.layers import build_packed, int8_weights

    torch.manual_seed(n + bits)
    lin = nn.Linear(n, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(lin, {"default": {"weight": {"method": "dorefa", "bits": bits},
                                          "activation": {"method": "pact", "bits": 8, "alpha_init": 3.0}}})
    lin.eval()
    built = build_packed("fc", lin)
    gemv = build_packed("fc", lin)
    gemv.amx8 = None
    gemv._gemv_rows = lambda M: True  # the GEMV at every row count
    amx = build_packed("fc", lin)  # AMX from WIDE_AMX_MIN_ROWS rows whatever the int8 parts
    amx._gemv_rows = lambda M: amx.amx8 is None or M < L.WIDE_AMX_MIN_ROWS
    i8 = build_packed("fc", lin)
    i8.gemv, i8.amx8 = None, None
    i8.i8 = int8_weights(i8.wp, (1, 1, n), split=True)
    i8._rows = lambda M: False  # the int8 kernel at every row count, one row included
    serial = build_packed("fc", lin)
    serial.gemv, serial.amx8, serial.i8 = None, None, None
    return {"layer": built, "gemv8": gemv, "amx-parts": amx, "int8-parts": i8, "bit-serial": serial}


def run(sizes: list[int], rows: list[int], variants: list[str], budget: float, kernels: list[str]
        ) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n in sizes:
        for v in variants:
            ls = {k: la for k, la in layers(n, VARIANTS[v]).items() if k in kernels}
            gen = torch.Generator().manual_seed(0)
            for m in rows:
                x = torch.rand(m, n, generator=gen) * 3.0
                ref = _infer(ls["layer"], x)
                for k, layer in ls.items():  # exact integer sums, epilogues rounded differently
                    y = _infer(layer, x)
                    assert float((y - ref).abs().max() / ref.abs().max()) < 1e-6, k
                tm = time_interleaved({k: (lambda la=la, x=x: _infer(la, x)) for k, la in ls.items()},
                                      max_rounds=300, budget_s=budget)
                g = tm["layer"]["median_s"]
                for k, r in tm.items():
                    out.append({"N": n, "weights": v, "rows": m, "kernel": k,
                                "median_ms": r["median_s"] * 1e3, "min_ms": r["min_s"] * 1e3,
                                "rounds": r["rounds"], "time_vs_layer": r["median_s"] / g})
                ms = {k: round(r["median_s"] * 1e3, 3) for k, r in tm.items()}
                log.info("N=%d %s rows=%d: %s", n, v, m, ms)
    return out


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = ["# Few-row kernels for Linear layers with 5-8 bit weights", "",
           f"`{meta['command']}` (commit {meta['git'].get('commit', '?')[:10]}"
           f"{', dirty' if meta['git'].get('dirty') else ''}). One thread, the kernels of a group "
           "timed in the same interleaved rounds on a possibly loaded machine; `vs layer`: median time over "
           "the layer as built (lower is faster).", "",
           "| N | weights | rows | kernel | median ms | min ms | vs layer |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['N']} | {r['weights']} | {r['rows']} | {r['kernel']} | {r['median_ms']:.3f} | "
                   f"{r['min_ms']:.3f} | {r['time_vs_layer']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 12, 16])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS),
                   help="which to time (the layer as built always)")
    p.add_argument("--budget", type=float, default=1.5, help="seconds of timing per group")
    p.add_argument("--name", default="ab_linear_wide")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    set_threads(1)
    rows = run(args.sizes, args.rows, args.variants, args.budget, ["layer", *args.kernels])
    # each layer's weights draw with N + bits as seed; the inputs and the turn order with 0
    seeds = sorted({0, *(n + VARIANTS[v] for n in args.sizes for v in args.variants)})
    meta = run_meta(__file__, argv, t0, seeds=seeds, threads=1)
    write_results(ROOT / "benchmarks" / "results", args.name, {"meta": meta, "rows": rows},
                  to_markdown(rows, meta))


if __name__ == "__main__":
    main()
