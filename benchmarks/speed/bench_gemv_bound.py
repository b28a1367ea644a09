"""What bounds the batch-1 GEMV on a deep model: memory or arithmetic.

    python benchmarks/speed/bench_gemv_bound.py            # ~1 minute, one thread
    python benchmarks/speed/bench_gemv_bound.py --rows 2   # two rows per product

For 8 layers of 4096x4096 weights (the deep MLP of ``bench_gemv.py``), binary / ternary / 4-bit
fields (``runtime/kernels_gemv.py``) and ternary weights at 1.6 bits (five trits per byte,
``runtime/kernels_tq1.py``), timed side by side in interleaved rounds (one thread):

- ``cold``: the 8 GEMVs after the FP32 model ran (its 537 MB evict the caches), as in a deep
  model where every layer's weights come from DRAM;
- ``warm``: the 8 GEMVs right after the same 8 GEMVs (a model called in a loop with nothing in
  between: on a CPU whose last-level cache holds the model's fields they come from there);
- ``in cache``: one layer's GEMV 8 times (its fields stay in L2 / L3): the arithmetic and cache
  cost alone;
- ``read only``: a plain loop reading the same field bytes (XOR of 64-bit words, numba), after
  the FP32 model: what one core gets from DRAM for those bytes;
- ``fp32``: PyTorch FP32, 8 x ``linear`` + ReLU on the float weights (537 MB).

If ``cold`` is close to ``read only`` the kernel runs at the core's DRAM read rate and only fewer
bytes can make it faster; the ratio FP32 / cold is then about (FP32 bytes / field bytes) x (the
two read rates). ``in cache`` of the 1.6-bit kernel against the 2-bit one is its decoding cost
(two byte additions and two ``vpdpbusd`` per 64 weights instead of one mask and one ``vpdpbusd``).
Writes benchmarks/results/gemv_bound.{json,md} (``--rows 2``: gemv_bound_rows2); a single run,
medians (min) of the rounds; seed 0 (random weights and input).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, run_meta, write_results

N, LAYERS = 4096, 8
KINDS = {"binary": (0, 1), "ternary": (-1, 1), "ternary 1.6-bit": (-1, 1), "4-bit": (0, 15)}


@numba.njit(nogil=True, cache=False)
def _read(a: np.ndarray) -> np.uint64:
    s = np.uint64(0)
    for i in range(a.size):
        s ^= a[i]
    return s


def measure(rounds: int, seed: int = 0, rows: int = 1) -> list[dict]:
    from lowbit.runtime import kernels_gemv as KV
    from lowbit.runtime import kernels_tq1 as KT

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    ws = [torch.randn(N, N) * 0.01 for _ in range(LAYERS)]
    x = torch.randn(rows, N)

    def fp32() -> None:
        with torch.inference_mode():
            h = x
            for w in ws:
                h = torch.relu(torch.nn.functional.linear(h, w))

    fns = {"fp32": fp32}
    nbytes = {"fp32": 4 * N * N * LAYERS}
    coef = np.ones((3, N))
    qp = np.array([3.0, 85.0], np.float32)
    xa = rng.random((rows, N)).astype(np.float32)
    out = np.empty((rows, N), np.float32)
    for kind, (lo, hi) in KINDS.items():
        qs = [rng.integers(lo, hi, endpoint=True, size=(N, N)) for _ in range(LAYERS)]
        if kind.endswith("1.6-bit"):
            gws = [KT.tq1_weights(KV.GemvWeights(q), q) for q in qs]
            if any(g.tq1 is None for g in gws):
                raise SystemExit("no 1.6-bit form here (needs AVX-512 VNNI and LOWBIT_RUNTIME_TQ1 not 0)")
            if rows > KT.TQ1_KERNEL_ROWS:
                raise SystemExit(f"the 1.6-bit kernel runs at most {KT.TQ1_KERNEL_ROWS} rows")
            fields = [g.tq1.w for g in gws]
        else:
            gws = [KV.GemvWeights(q) for q in qs]  # ternary: the 2-bit fields only
            fields = [g.w for g in gws]
        del qs
        words = [f.view(np.uint64) for f in fields]
        if kind.endswith("1.6-bit"):  # the 1.6-bit kernel itself, whatever rows the layers give it
            def run(g, xa=xa, qp=qp, coef=coef, out=out):
                g.tq1.run(xa, 0, qp, coef, True, out)
        else:
            def run(g, xa=xa, qp=qp, coef=coef, out=out):
                KV.gemv_run(xa, 0, qp, g, coef, True, out)
        fns[f"{kind} cold"] = lambda gws=gws, run=run: [run(g) for g in gws]
        fns[f"{kind} warm"] = fns[f"{kind} cold"]
        fns[f"{kind} in cache"] = lambda g=gws[0], run=run: [run(g) for _ in range(LAYERS)]
        fns[f"{kind} read only"] = lambda words=words: [_read(w) for w in words]
        for what in ("cold", "warm", "in cache", "read only"):
            nbytes[f"{kind} {what}"] = sum(int(f.nbytes) for f in fields)
    for f in fns.values():  # compile and warm
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            (fns[k] if k.endswith(("in cache", "warm")) else fp32)()  # warm the layers / evict everything
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    rows = []
    for k, t in times.items():
        med, mn = float(np.median(t)), float(np.min(t))
        rows.append({"method": k, "median_ms": med * 1e3, "min_ms": mn * 1e3, "bytes": nbytes[k],
                     "gb_s_median": nbytes[k] / med / 1e9, "rounds": len(t)})
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    by = {r["method"]: r for r in rows}
    fp = by["fp32"]["median_ms"]
    g = meta["git"]
    git = str(g)
    if isinstance(g, dict):
        git = str(g.get("commit", "?"))[:10] + (" (dirty tree)" if g.get("dirty") else "")
    lines = [
        f"# What bounds the batch-{meta.get('rows', 1)} GEMV: 8 x 4096x4096 layers, one thread",
        "",
        f"Command: `{meta['command']}`; git {git}; single run, {rows[0]['rounds']} interleaved "
        "rounds, medians (min). `cold`: the 8 GEMVs after the FP32 model evicted the caches; `warm`: the 8 "
        "GEMVs after themselves; `in cache`: one layer's GEMV 8 times; `read only`: a plain loop reading the "
        "same field bytes after the FP32 model.",
        "",
        "| weights / method | median ms | min ms | MB read | GB/s (median) | FP32 / this |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['gb_s_median']:.1f} | {fp / r['median_ms']:.1f}x |")
    lines += ["", "Cold GEMV time / read-only time of the same bytes (1.0 = the kernel runs at the core's "
              "read rate):", ""]
    for kind in KINDS:
        c, r = by[f"{kind} cold"]["median_ms"], by[f"{kind} read only"]["median_ms"]
        lines.append(f"- {kind}: {c / r:.2f}")
    lines += ["", "Ternary at 1.6 bits against the 2-bit ternary GEMV (2-bit ms / 1.6-bit ms, > 1: the "
              "1.6-bit one is faster), medians (min):", ""]
    for what in ("cold", "warm", "in cache", "read only"):
        a, b = by[f"ternary {what}"], by[f"ternary 1.6-bit {what}"]
        lines.append(f"- {what}: {a['median_ms'] / b['median_ms']:.2f}x ({a['min_ms'] / b['min_ms']:.2f}x)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--rows", type=int, default=1, help="rows of each product (1 or 2)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    t0 = time.time()
    rows = measure(args.rounds, rows=args.rows)
    meta = run_meta(__file__, argv, t0, seeds=[0], rows=args.rows)
    name = "gemv_bound" if args.rows == 1 else f"gemv_bound_rows{args.rows}"
    write_results(args.out, name, {"meta": meta, "rows": rows}, markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
