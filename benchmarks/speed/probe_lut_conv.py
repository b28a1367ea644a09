"""Probe: ResNet-20's 3x3 convolutions by table lookup (LUT) against the runtime's int8 kernel.

    python benchmarks/speed/probe_lut_conv.py --out benchmarks/results/epyc_zen4   # ~3 min, 1 thread

The runtime runs binary, ternary and 4-bit convolutions on one int8 kernel (``kernels_int8``,
``vpdpbusd``), which on the AMD EPYC (Zen 4) this was written on reaches about 170 G multiply-adds/s
in a ResNet-20, near the core's 235 G/s ``vpdpbusd`` rate (``issue_rates.md``): a faster ResNet-20
needs another kernel. This probe times the lookup-table convolution (``kernels_lut_conv``: the
Linear layers' tables and tiles, read in place from the padded NHWC code image), checks it
against the int8 kernel bit for bit (float output, residual, ReLU, next layer's codes), and times
both on ResNet-20's layer shapes, interleaved, medians of ``--repeats`` calls, one thread, with
the tables' pass timed on its own. Writes ``<out>/probe_lut_conv.{json,md}``.

Its math and the rule for where the layers use it: ``lowbit.runtime.kernels_lut_conv``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results
from harness import set_threads

from lowbit.runtime import kernels_int8 as KI
from lowbit.runtime.kernels_gemm import HAS_LUT, lut_levels, lut_sums
from lowbit.runtime.kernels_lut_conv import (
    lut_conv,
    lut_conv_applies,
    lut_conv_offsets,
    lut_conv_tables,
    lut_conv_weights,
    pixel_groups,
)

# ----------------------------------------------------------------------------------------------
# the probe
# ----------------------------------------------------------------------------------------------

LEVELS = {"binary": [-1, 1], "ternary": [-1, 0, 1]}
# ResNet-20 (CIFAR): (H, C, O, stride) of its 3x3 convolutions, with how many of each it has
LAYERS = ((32, 16, 16, 1, 6), (32, 16, 32, 2, 1), (16, 32, 32, 1, 5), (16, 32, 64, 2, 1), (8, 64, 64, 1, 5))


def _median_us(f, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def probe_layer(rng: np.random.Generator, weights: str, N: int, H: int, C: int, O: int, s: int,
                repeats: int) -> dict:
    KH = KW = 3
    lv0 = np.array(LEVELS[weights])
    w = lv0[rng.integers(0, lv0.size, (O, KH, KW, C))]
    codes = rng.integers(0, 16, size=(N, H, H, C)).astype(np.float32)  # 4-bit activation codes
    xq = KI.int8_quantize(codes, (1, 1), mode=1)
    Hp = H + 2
    OH = (Hp - KH) // s + 1
    wq8, passes = KI.pack_int8_weights(w, 1)
    qoff = KI.int8_quad_offsets(KI.int8_geometry(KH, KW, C, 1, 1), Hp, C)
    geo = np.array([Hp, Hp, C, OH, OH, s, s, N, O], np.int64)
    Op = -(-O // 16) * 16
    s0, s1 = rng.normal(size=Op), rng.uniform(0.01, 0.02, size=Op)
    res = rng.normal(size=N * OH * OH * O).astype(np.float32)
    cgeo = np.array([OH + 2, OH + 2, 1, 1], np.int64)
    outs = [np.empty(N * OH * OH * O, np.float32) for _ in range(2)]
    cds = [np.zeros(N * (OH + 2) ** 2 * O + 64, np.uint8) for _ in range(2)]
    lv, cb = lut_levels(w)
    sums = lut_sums(lv, cb, 4)
    wl = lut_conv_weights(w, lv, cb)
    tpix = 16 * pixel_groups(C, cb)
    npix = N * Hp * Hp
    tab = np.zeros(npix * tpix, np.int8)
    koff = lut_conv_offsets(KH, KW, 1, 1, Hp, tpix)

    def int8_call() -> None:
        KI.int8_conv(xq, geo, qoff, wq8, passes, s0, s1, True, outs[0], res, cds[0], cgeo, 4.0, 3.75)

    def tables_call() -> None:
        lut_conv_tables(xq, npix, C, lv, cb, out=tab)

    def lut_call() -> None:
        lut_conv(tab, geo, tpix, koff, wl, sums, s0, s1, True, outs[1], res, cds[1], cgeo, 4.0, 3.75)

    int8_call()
    tables_call()
    lut_call()
    exact = bool(np.array_equal(outs[0], outs[1]) and np.array_equal(cds[0], cds[1]))
    if not exact:
        raise AssertionError(f"{weights} {H}x{H}x{C}->{O} s{s}: the lookup convolution differs from int8's")
    t = {"int8": [], "tables": [], "lut": []}
    for _ in range(5):  # interleaved rounds
        t["int8"].append(_median_us(int8_call, repeats))
        t["tables"].append(_median_us(tables_call, repeats))
        t["lut"].append(_median_us(lut_call, repeats))
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"weights": weights, "batch": N, "H": H, "C": C, "O": O, "stride": s, "exact": exact,
            "int8_us": med["int8"], "tables_us": med["tables"], "lut_us": med["lut"],
            "kernel_ratio": med["int8"] / med["lut"], "ratio": med["int8"] / (med["lut"] + med["tables"])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if not HAS_LUT:
        sys.exit("this CPU lacks AVX-512 VBMI / VNNI: the lookup tiles do not run here")
    t0 = time.time()
    set_threads(1)
    rng = np.random.default_rng(args.seed)
    rows = []
    for N in args.batches:
        for weights in ("binary", "ternary"):
            for H, C, O, s, count in LAYERS:
                r = probe_layer(rng, weights, N, H, C, O, s, args.repeats)
                lv, cb = lut_levels(np.array(LEVELS[weights]))
                r["count"], r["applies"] = count, bool(lut_conv_applies(lv, cb, C, 4))
                rows.append(r)
                print(f"{weights} b{N} {H}x{H} {C}->{O} s{s}: int8 {r['int8_us']:.1f} us, lookup "
                      f"{r['lut_us']:.1f} + tables {r['tables_us']:.1f} us: {r['ratio']:.2f}x", flush=True)
    totals = {}
    for N in args.batches:
        for weights in ("binary", "ternary"):
            sel = [r for r in rows if r["batch"] == N and r["weights"] == weights]
            i8 = sum(r["count"] * r["int8_us"] for r in sel)
            lut = sum(r["count"] * (r["lut_us"] + r["tables_us"]) for r in sel)
            ruled = sum(r["count"] * (r["lut_us"] + r["tables_us"] if r["applies"] else r["int8_us"])
                        for r in sel)
            totals[f"{weights}/b{N}"] = {"int8_us": i8, "lut_us": lut, "ratio": i8 / lut, "rule_us": ruled,
                                         "rule_ratio": i8 / ruled}
    meta = run_meta(__file__, argv, t0, seeds=[args.seed], threads=1, repeats=args.repeats)
    md = ["# Probe: 3x3 convolutions by table lookup vs the int8 kernel (ResNet-20 shapes)", "",
          f"Command: `{meta['command']}`; git {meta['git']['commit'][:10]}; "
          f"CPU: {meta['machine'].get('cpu', '?')}; one thread; "
          f"4-bit activation codes; medians of {args.repeats} calls, median of 5 interleaved rounds; outputs "
          "checked equal bit for bit (float output + residual + ReLU + next layer's codes). Time = the "
          "convolution with its epilogue; the lookup one also needs the tables' pass (its own column).", "",
          "| weights | batch | layer | int8 us | lookup us | tables us | lookup / int8 (kernel) | "
          "int8 / (lookup + tables) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['weights']} | {r['batch']} | {r['H']}x{r['H']} {r['C']}->{r['O']} s{r['stride']} "
                  f"(x{r['count']}) | {r['int8_us']:.1f} | {r['lut_us']:.1f} | {r['tables_us']:.1f} | "
                  f"{r['kernel_ratio']:.2f}x | {r['ratio']:.2f}x |")
    md += ["", "ResNet-20's 3x3 convolutions in all (layer times x their count): every one by lookup, and by "
           "lookup only where the layers use it (`kernels_lut_conv.lut_conv_applies`: binary on 32 and 64 "
           "channels, ternary on 64), the int8 kernel elsewhere. Separate calls from Python, unlike the "
           "flat executor (`ab_lut_conv.md` times whole models).", "",
           "| weights / batch | int8 us | all by lookup us | speed-up | lookup where used us | speed-up |",
           "|---|---:|---:|---:|---:|---:|"]
    for k, v in totals.items():
        md.append(f"| {k} | {v['int8_us']:.0f} | {v['lut_us']:.0f} | {v['ratio']:.2f}x | "
                  f"{v['rule_us']:.0f} | {v['rule_ratio']:.2f}x |")
    write_results(args.out, "probe_lut_conv", {"meta": meta, "rows": rows, "totals": totals}, "\n".join(md))


if __name__ == "__main__":
    main()
