"""W1A1 (binary weights x 1-bit activations) on the deep MLP: the AMX int8 tiles the runtime picks
against the bit-serial AND-popcount product of the plain path and the best int8 baseline, side by
side in one run.

    python benchmarks/speed/ab_w1a1_popcount.py [--batches 8 64 256] [--budget-s 8] [--out DIR]

The issue's W1A1 target (>= 2.5x best int8 at batch 8-256) names XNOR-popcount. The runtime runs
W1A1 layers on AMX (``tdpbusd`` on the bit fields: 1024 int8 multiply-adds a cycle) and keeps the
popcount product (``kernels_popcount.gemm_rows``: AND of 64-bit words of activation and weight
bits, ``popcount``, one weight row against one input row at a time) for CPUs without AVX-512;
this script times both arms of one quantized model beside onnxruntime's static QDQ int8 model of
the float network. The popcount arm is compiled with the plain path forced (``_jit.set_plain``),
its table-lookup form dropped and its rows layout (``gemm_rows``) taken at every batch, so that
every layer runs the AND-popcount product. 8 x ``Linear(4096, 4096)`` with ReLU between
(``harness.deep_mlp``), one thread, interleaved turns (``harness.time_interleaved(turns=True)``).
The two lowbit arms compute the same integers; their outputs are compared (largest difference
relative to the largest output).

Why AMX: a 512-bit AND + popcount + add handles 512 one-bit products, and the popcount issues at
most once a cycle, while one ``tdpbusd`` does 16 x 16 x 64 int8 products in 16 cycles (1024 a
cycle). A popcount kernel tuned to its limit would reach about half of what the tiles can.
Writes ``<out>/ab_w1a1_popcount.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results
from harness import (
    deep_mlp,
    export_onnx,
    in_ms,
    machine_info,
    ort_session,
    quantized_model,
    set_threads,
    time_interleaved,
)

from lowbit._io import atomic_write_text
from lowbit.runtime import _jit, layers
from lowbit.runtime import compile as rt_compile
from lowbit.runtime import kernels_threads as KT

RESULTS = Path(__file__).resolve().parents[1] / "results"
WIDTH, DEPTH = 4096, 8


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 64, 256])
    p.add_argument("--budget-s", type=float, default=8.0)
    p.add_argument("--width", type=int, default=WIDTH)
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--from-json", help="write the Markdown of an earlier run's JSON and stop")
    a = p.parse_args(argv)
    if a.from_json:
        path = Path(a.from_json)
        atomic_write_text(path.with_suffix(".md"), render(json.loads(path.read_text())) + "\n")
        return
    t0 = time.time()
    set_threads(1)
    torch.manual_seed(0)
    fmodel = deep_mlp(a.width, DEPTH).eval()
    qm = quantized_model(fmodel, "w1a1")
    example = torch.rand(16, a.width)
    amx = rt_compile(qm, example, check=False)
    _jit.set_plain(True)
    try:
        popcount = rt_compile(qm, example, check=False)
    finally:
        _jit.set_plain(False)
    for m in popcount.packed_layers().values():
        m.lut = None  # the plain path's table lookup from 8 rows on: popcount at every batch here
    # the rows layout at every batch: at 64 rows it ran 5x as fast as the columns layout the plain
    # path takes beyond ROWS_MAX rows (the AMX arm never reaches either)
    layers.ROWS_MAX = 1 << 30
    kernels = {"amx": amx.layers[0].detail,
               "popcount": "AND-popcount of 64-bit words, rows layout (kernels_popcount.gemm_rows)"}
    with tempfile.TemporaryDirectory() as td:
        calib = [torch.rand(8, a.width, generator=torch.Generator().manual_seed(1000 + i)).numpy()
                 for i in range(4)]
        paths, missing = export_onnx(fmodel, example, calib, Path(td))
        if "ort-qdq-int8" not in paths:
            raise SystemExit(f"no onnxruntime QDQ int8 model: {missing}")
        ort = ort_session(paths["ort-qdq-int8"], 1)
        load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
        rows: list[dict[str, Any]] = []
        for b in a.batches:
            x = torch.rand(b, a.width, generator=torch.Generator().manual_seed(b))
            xn = x.numpy()
            ya, yp = amx(x), popcount(x)
            diff = float((ya - yp).abs().max() / ya.abs().max().clamp_min(1e-30))
            fns = {"lowbit-amx": lambda x=x: amx(x), "lowbit-popcount": lambda x=x: popcount(x),
                   "ort-qdq-int8": lambda xn=xn: ort(xn)}
            tm = in_ms(time_interleaved(fns, max_rounds=200, budget_s=a.budget_s, turns=True))
            macs = DEPTH * a.width * a.width * b
            row = {"batch": b, "rel_diff_amx_popcount": diff, "macs": macs,
                   **{f"{k}_{s}": t[s] for k, t in tm.items() for s in ("median_ms", "min_ms", "rounds")}}
            rows.append(row)
            print(f"b{b}: " + ", ".join(f"{k} {t['median_ms']:.2f} ms" for k, t in tm.items()), flush=True)
        load_end = " ".join(f"{v:.2f}" for v in os.getloadavg())
    meta = run_meta(__file__, argv, t0, seeds=[0], machine_info=machine_info(), load_start=load_start,
                    load_end=load_end, note=a.note)
    payload = {"meta": meta, "width": a.width, "kernels": kernels, "rows": rows,
               "tsc_ghz": KT.ticks_per_us() / 1e3}
    md = render(payload)
    write_results(a.out, "ab_w1a1_popcount", payload, md)
    print(md)


def render(payload: dict[str, Any]) -> str:
    """The Markdown of a run's JSON payload."""
    meta, kernels, rows = payload["meta"], payload["kernels"], payload["rows"]
    width = payload.get("width", WIDTH)
    ghz = payload.get("tsc_ghz") or KT.ticks_per_us() / 1e3  # (a payload without it: this machine's)
    md = [
        f"# W1A1 on the deep MLP ({DEPTH} x {width}^2): the runtime (AMX tiles) vs the AND-popcount "
        "product vs best int8",
        "",
        f"Machine: {meta['machine_info'].get('cpu', '?')}; load average at start {meta['load_start']}, at "
        f"end {meta['load_end']}. {meta.get('note', '')}",
        f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; single run; 1 thread; interleaved turns "
        "(settle, 2 ms of untimed calls, the timed call); medians, best in brackets.",
        "",
        f"Layers: runtime arm `{kernels['amx']}` (so the table lookup at 8 rows, AMX from 12); popcount "
        f"arm (plain path forced) `{kernels['popcount']}`.",
        "",
        "| batch | lowbit runtime ms | lowbit popcount ms | ort QDQ int8 ms | runtime vs int8 "
        "| popcount vs int8 | runtime / popcount speed | runtime GMAC/s | popcount GMAC/s "
        "| rel. diff runtime vs popcount |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        am, pc, oi = r["lowbit-amx_median_ms"], r["lowbit-popcount_median_ms"], r["ort-qdq-int8_median_ms"]
        md.append(f"| {r['batch']} | {am:.2f} ({r['lowbit-amx_min_ms']:.2f}) | {pc:.2f} "
                  f"({r['lowbit-popcount_min_ms']:.2f}) | {oi:.2f} ({r['ort-qdq-int8_min_ms']:.2f}) | "
                  f"{oi / am:.2f}x | {oi / pc:.2f}x | {pc / am:.2f}x | {r['macs'] / am / 1e6:.0f} | "
                  f"{r['macs'] / pc / 1e6:.0f} | {r['rel_diff_amx_popcount']:.1e} |")
    md += ["", f"Multiply-adds per cycle at the time-stamp counter's {ghz:.2f} GHz: runtime "
           + ", ".join(f"{r['macs'] / r['lowbit-amx_median_ms'] / 1e6 / ghz:.0f}" for r in rows)
           + "; popcount "
           + ", ".join(f"{r['macs'] / r['lowbit-popcount_median_ms'] / 1e6 / ghz:.0f}" for r in rows)
           + f" (batches {', '.join(str(r['batch']) for r in rows)})."]
    return "\n".join(md)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
