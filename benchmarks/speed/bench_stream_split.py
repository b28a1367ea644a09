"""The activation passes on 1 and on 2 threads: from what size does splitting them pay?

    python benchmarks/speed/bench_stream_split.py                  # ~1 min, both cores free
    python benchmarks/speed/bench_stream_split.py --sizes 17 20 22 --out /tmp/s

Before a packed layer's product, its input is turned into codes in one pass over the activations:
``clip_codes`` (signed codes of a transformer's Linear), ``quantize_codes``, ``amx_rows`` (codes
in the VNNI / AMX row tiles, from floats or from uint8 codes) and ``lut_tables`` (the lookup GEMM's
per-row tables). Each pass is a few loads and stores per value, so it is bound by memory and by
the hand-off to the second thread, not by arithmetic. This script times each pass's kernel on its
whole range on the calling thread against ``kernels_threads.parallel_for`` over 2 threads (the
split the wrappers use above their thresholds), interleaved in rounds (``harness.time_interleaved``,
turns), at 2**s values for each ``--sizes`` s (rows of 1024 values; ``lut_tables``: 4-bit codes,
binary weights, 1024 values per row as in a 1024-wide layer). Outputs of both are checked equal.
Gain = 1-thread median / 2-thread median. Writes ``<out>/stream_split.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_threads_contamination import MachineShare
from common import run_meta, write_results
from harness import set_threads, time_interleaved

from lowbit.runtime import kernels_amx as KA
from lowbit.runtime import kernels_codes as KC
from lowbit.runtime import kernels_gemm as KG
from lowbit.runtime import kernels_threads as KT
from lowbit.runtime.kernels_amx import _amx_rows_range, _amx_rows_u8_range
from lowbit.runtime.kernels_codes import _clip_codes_range
from lowbit.runtime.kernels_pack import _quantize_range

RESULTS = Path(__file__).resolve().parents[1] / "results"
ROW = 1024


def passes(n: int, rng: np.random.Generator) -> dict[str, tuple[Callable, int, tuple, int, np.ndarray]]:
    """name -> (range kernel, items, arguments before (lo, hi), grain, output array) at ``n`` values."""
    M = n // ROW
    x = rng.standard_normal((M, ROW), dtype=np.float32)
    u8 = rng.integers(0, 256, (M, ROW), dtype=np.uint8)
    lo, hi, mult, off = KC.clip_args(-2.0, 2.0, 31.75, 64)
    c_out = np.empty(n, np.uint8)
    q_out = np.empty(n, np.uint8)
    nk = -(-ROW // 64)
    Mp = -(-M // 16) * 16
    r_out = KA.aligned_u8(Mp * nk * 64)
    u_out = KA.aligned_u8(Mp * nk * 64)
    lv = np.array([-1, 1], np.int64)
    sel, lv32 = KG._selectors(lv, 1)
    T = np.empty((M, KG.lut_groups(ROW, 1) * 16), np.int8)
    lut = KG._lut_tables_plain if not KG.HAS_LUT else KG._lut_tables_avx
    return {
        "clip_codes": (_clip_codes_range, n, (x.reshape(-1), lo, hi, mult, off, c_out), 16384, c_out),
        "quantize_codes": (_quantize_range, n, (x.reshape(-1), np.int64(0), np.float32(2.0), np.float32(7.5),
                                                 q_out), 16384, q_out),
        "amx_rows (float)": (_amx_rows_range, Mp, (x, np.int64(0), np.float32(2.0), np.float32(127.5),
                                                   np.int64(nk), r_out), 16, r_out),
        "amx_rows (uint8)": (_amx_rows_u8_range, Mp, (u8, np.int64(nk), u_out), 16, u_out),
        "lut_tables": (lut, M, (x, np.int64(0), np.float32(2.0), np.float32(7.5), sel, lv32, np.int64(4), T),
                       8, T),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[16, 17, 18, 19, 20, 21, 22, 23],
                   help="log2 of the values per pass")
    p.add_argument("--budget-s", type=float, default=1.0, help="time budget of one interleaved block")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="stream_split")
    a = p.parse_args(argv)
    t0 = time.time()
    share = MachineShare()
    set_threads(2)
    rng = np.random.default_rng(0)
    rows = []
    for s in a.sizes:
        for name, (fn, items, args, grain, out) in passes(1 << s, rng).items():
            def one(fn=fn, items=items, args=args):
                fn(*args, 0, items)

            def two(fn=fn, items=items, args=args, grain=grain):
                KT.parallel_for(fn, items, *args, parallel=True, grain=grain)

            one()
            ref = out.copy()
            out[...] = 0
            two()
            if not np.array_equal(ref, out):
                raise AssertionError(f"{name} at 2**{s}: split output differs")
            t = time_interleaved({"1": one, "2": two}, 200, a.budget_s, turns=True)
            rows.append({"pass": name, "log2_values": s, "ms_1": 1e3 * t["1"]["median_s"],
                         "ms_2": 1e3 * t["2"]["median_s"], "gain": t["1"]["median_s"] / t["2"]["median_s"],
                         "rounds": t["1"]["rounds"]})
            print(rows[-1], flush=True)
    meta = run_meta(__file__, argv, t0, seeds=[0], **share.stop())
    payload = {"meta": meta, "rows": rows}
    names = list(dict.fromkeys(r["pass"] for r in rows))
    md = ["# The activation passes on 2 threads against 1", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
          f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; {MachineShare.sentence(meta)}; "
          "single run.", "",
          "Each pass's kernel over its whole range on the calling thread (1) against "
          "`kernels_threads.parallel_for` on 2 threads (2), interleaved rounds with turns; cells are "
          "1-thread ms / 2-thread ms (gain = 1-thread median / 2-thread median).", "",
          "| values | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for s in a.sizes:
        cells = []
        for name in names:
            r = next(r for r in rows if r["pass"] == name and r["log2_values"] == s)
            cells.append(f"{r['ms_1']:.3f} / {r['ms_2']:.3f} ({r['gain']:.2f}x)")
        md.append(f"| 2^{s} | " + " | ".join(cells) + " |")
    write_results(a.out, a.name, payload, "\n".join(md))


if __name__ == "__main__":
    main()
