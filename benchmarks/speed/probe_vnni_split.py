"""Probe: from how many multiply-adds does splitting a Linear layer's VNNI tiles over 2 threads pay?

    python benchmarks/speed/probe_vnni_split.py --out benchmarks/results/epyc_zen4   # ~2 min

On CPUs with AVX-512 VNNI and no AMX the runtime runs a Linear layer from 8 rows on VNNI register
tiles (``kernels_amx.amx_linear_tiles``, ``vnni``) and splits the product's channel groups over
threads from ``kernels_amx.VNNI_MIN_PARALLEL_MACS`` multiply-adds (M*K*O). This probe builds the
BERT encoder of the speed harness (hidden ``--hidden``, ternary weights, 8-bit signed
activations: ``w2a8s``), takes the first encoder layer's three shapes (query: H x H,
intermediate: H x 4H, output: 4H x H) and times each layer's call on 1 and 2 threads at 128-2048
rows, interleaved in ``--rounds`` rounds, medians of ``--repeats`` calls per round, the threshold
set to 1 so that every 2-thread call splits; the ratio is the 1-thread median over the 2-thread
median (the median over rounds of each). The 2-thread output is checked equal to the 1-thread one.
Writes ``<out>/probe_vnni_split.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results
from harness import BertEncoder, build_lowbit, set_threads

from lowbit.runtime import kernels_amx as KA

LAYERS = ("attention.self.query", "intermediate.dense", "output.dense")


def _median_ms(f, repeats: int) -> float:
    f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rows", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--note", default="", help="the machine's state (what ran beside it)")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if not KA.HOST_VNNI or KA.backend() == "amx":
        raise SystemExit("probe_vnni_split: needs AVX-512 VNNI without AMX tiles (the VNNI tile path)")
    t0 = time.time()
    torch.manual_seed(0)
    fm = BertEncoder(a.hidden, layers=1).eval()
    x = torch.randn(1, 64, a.hidden, generator=torch.Generator().manual_seed(0))
    packed = build_lowbit(fm, "w2a8s", x, x).packed
    mods = {n.split("layer.0.")[-1]: m for n, m in packed.named_modules()
            if type(m).__name__ == "PackedLinear" and "layer.0." in n}
    keep = KA.VNNI_MIN_PARALLEL_MACS
    rows_out = []
    try:
        KA.VNNI_MIN_PARALLEL_MACS = 1
        with torch.inference_mode():
            for name in LAYERS:
                m = mods[name]
                for rows in a.rows:
                    g = torch.Generator().manual_seed(rows)
                    xin = torch.randn(rows // 64, 64, m.in_features, generator=g)
                    set_threads(1)
                    ref = m(xin)
                    set_threads(2)
                    if not torch.equal(ref, m(xin)):
                        raise AssertionError(f"{name} at {rows} rows: 2 threads differ from 1")
                    got: dict[int, list[float]] = {1: [], 2: []}
                    for r in range(a.rounds):
                        for th in ((1, 2) if r % 2 == 0 else (2, 1)):
                            set_threads(th)
                            got[th].append(_median_ms(lambda m=m, xin=xin: m(xin), a.repeats))
                    t1, t2 = statistics.median(got[1]), statistics.median(got[2])
                    macs = rows * m.in_features * m.out_features
                    rows_out.append({"layer": name, "K": m.in_features, "O": m.out_features, "rows": rows,
                                     "macs": macs, "log2_macs": round(macs.bit_length() - 1), "ms_1t": t1,
                                     "ms_2t": t2, "ratio": t1 / t2, "round_ms": got})
                    print(rows_out[-1]["layer"], rows, f"{t1:.3f} / {t2:.3f} ms = {t1 / t2:.2f}x", flush=True)
    finally:
        KA.VNNI_MIN_PARALLEL_MACS = keep
        set_threads(1)
    meta = run_meta(__file__, argv, t0, seeds=[0, *a.rows], hidden=a.hidden, rounds=a.rounds,
                    repeats=a.repeats, note=a.note, threshold_in_runtime=keep)
    md = ["# Splitting a Linear layer's VNNI tiles over 2 threads: where it pays", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}; "
          f"{a.note or 'machine state not noted'}; single run: medians over {a.rounds} interleaved rounds of "
          f"the median of {a.repeats} calls. BERT encoder layer (hidden {a.hidden}), ternary weights, 8-bit "
          "signed activations (`w2a8s`), the layer's whole call (activation codes, tiles, epilogue); 2 "
          "threads always split (threshold 1), their output equal to 1 thread's. ratio = 1-thread ms / "
          f"2-thread ms. The runtime splits from 2^{keep.bit_length() - 1} multiply-adds "
          "(`kernels_amx.VNNI_MIN_PARALLEL_MACS`).", "",
          "| layer | K x O | rows | log2 MACs | 1 thread ms | 2 threads ms | ratio |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows_out:
        md.append(f"| {r['layer']} | {r['K']} x {r['O']} | {r['rows']} | {r['log2_macs']} | "
                  f"{r['ms_1t']:.3f} | {r['ms_2t']:.3f} | {r['ratio']:.2f}x |")
    by: dict[int, list[float]] = {}
    for r in rows_out:
        by.setdefault(r["log2_macs"], []).append(r["ratio"])
    md += ["", "By size: " + "; ".join(f"2^{k}: {min(v):.2f}-{max(v):.2f}x (n={len(v)})"
                                      for k, v in sorted(by.items())) + "."]
    write_results(a.out, "probe_vnni_split", {"meta": meta, "rows": rows_out}, "\n".join(md))


if __name__ == "__main__":
    main()
