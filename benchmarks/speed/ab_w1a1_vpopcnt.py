"""W1A1 (binary weights x 1-bit activations) on CPUs with AVX-512 VPOPCNTDQ and no AMX: the
``vpopcntq`` GEMM (``kernels_popcount.gemm_w1a1``) against what the layers ran on before (the
1-bit-field GEMV up to 7 rows, ``kernels_gemv``, then the lookup tables, ``kernels_gemm``), beside
the int8 baselines, in one process and one interleaved run.

    python benchmarks/speed/ab_w1a1_vpopcnt.py [--batches 1 4 8 16 64 256] [--out DIR]

``lowbit.runtime.compile`` of the 8-layer 4096-wide MLP of the speed benchmark (variant ``w1a1``)
twice: with the ``vpopcntq`` GEMM at every row count (the default here) and without it
(``HAS_VPOPCNT`` off while packing). The two outputs are checked equal bit for bit first.
Baselines: onnxruntime dynamic and static QDQ int8 and PyTorch dynamic int8
(``harness.mlp_int8_baselines``); best int8 = the fastest median. Memory: every array each packed
model holds (``harness.memory_bytes``).

Timing: one thread, ``harness.time_interleaved`` (each method's turn: settle, an untimed call, the
timed call; a new random order each round) on the calling thread's CPU time, medians. Writes
``<out>/<name>.{json,md}`` (default ``epyc_zen4/ab_w1a1_vpopcnt``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from common import ROOT, run_meta, write_results
from harness import (
    block_ms,
    deep_mlp,
    memory_bytes,
    mlp_int8_baselines,
    quantized_model,
    set_threads,
    time_interleaved,
)

from lowbit.runtime import compile as rt_compile
from lowbit.runtime import kernels_popcount as KP

CLOCK = time.thread_time  # every method runs on the calling thread at one thread
OURS = ("lowbit before", "lowbit vpopcntq")


def _pack(fm: torch.nn.Module, vpopcnt: bool):
    keep = KP.HAS_VPOPCNT
    KP.HAS_VPOPCNT = vpopcnt and keep
    try:
        return rt_compile(quantized_model(fm, "w1a1"), torch.rand(8, 4096))
    finally:
        KP.HAS_VPOPCNT = keep


def measure(batches: list[int], budget_s: float, seed: int, onnx_dir: Path) -> tuple[list[dict], dict]:
    torch.manual_seed(seed)
    fm = deep_mlp(4096, 8).eval()
    baselines, missing = mlp_int8_baselines(fm, 4096, seed, onnx_dir)
    tables, pop = _pack(fm, False), _pack(fm, True)
    kernels = {OURS[0]: tables.layers[0].detail, OURS[1]: pop.layers[0].detail}
    mem = {OURS[0]: memory_bytes(tables)["in_memory"], OURS[1]: memory_bytes(pop)["in_memory"]}
    rows = []
    for B in batches:
        x = torch.rand(B, 4096, generator=torch.Generator().manual_seed(seed + B)).contiguous()
        fns = {OURS[0]: lambda x=x: tables(x), OURS[1]: lambda x=x: pop(x), **baselines(x)}
        if not torch.equal(fns[OURS[0]](), fns[OURS[1]]()):
            raise SystemExit(f"batch {B}: the outputs before and on vpopcntq differ")
        t = time_interleaved(fns, max_rounds=200, budget_s=budget_s, seed=seed, turns=True, clock=CLOCK)
        med, low, best, best_ms, best_low = block_ms(t, OURS)
        rows.append({"batch": B, "rounds": t[OURS[1]]["rounds"], **{f"{k}_ms": v for k, v in med.items()},
                     **{f"{k}_min_ms": v for k, v in low.items()}, "best_int8": best,
                     "before_vs_best_int8": best_ms / med[OURS[0]],
                     "vpopcnt_vs_best_int8": best_ms / med[OURS[1]],
                     "vpopcnt_vs_best_int8_min": best_low / low[OURS[1]],
                     "before_over_vpopcnt": med[OURS[0]] / med[OURS[1]],
                     "gmacs_vpopcnt": 8 * 4096 * 4096 * B / med[OURS[1]] / 1e6})
        print(rows[-1], flush=True)
    return rows, {"kernels": kernels, "memory_bytes": mem, "missing": missing}


def to_markdown(rows: list[dict], info: dict, meta: dict) -> str:
    mem = info["memory_bytes"]
    return "\n".join([
        "# W1A1 on the deep MLP (8 x 4096^2): vpopcntq GEMM vs the GEMV and lookup tables vs best int8",
        "",
        f"Command: `{meta['command']}`; git {meta['git'].get('commit', '?')[:10]}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; "
        f"CPU: {meta['machine'].get('cpu', '?')}; "
        f"load average {meta['load']}. One thread; one interleaved run per batch (each method's turn: "
        "settle, an untimed call, the timed call; random order each round), medians of thread CPU time in "
        "ms; a single run, so only the ratios within a row mean something. The two lowbit models' outputs "
        "checked equal bit for bit first.",
        "",
        f"Layers: before `{info['kernels'][OURS[0]]}`; vpopcntq `{info['kernels'][OURS[1]]}`. In memory "
        "(every "
        f"array the packed model holds): before {mem[OURS[0]] / 1e6:.1f} MB, vpopcntq "
        f"{mem[OURS[1]] / 1e6:.1f} MB.",
        "",
        "| batch | rounds | lowbit before | lowbit vpopcntq | ORT dyn int8 | ORT QDQ int8 | torch dyn int8 "
        "| before vs best int8 | vpopcntq vs best int8 | (minima) | before / vpopcntq | vpopcntq GMAC/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['batch']} | {r['rounds']} | {r[OURS[0] + '_ms']:.2f} | {r[OURS[1] + '_ms']:.2f} | "
          f"{r.get('ort-dyn-int8_ms', float('nan')):.2f} | {r.get('ort-qdq-int8_ms', float('nan')):.2f} | "
          f"{r['torch-dyn-int8_ms']:.2f} | {r['before_vs_best_int8']:.2f}x | "
          f"{r['vpopcnt_vs_best_int8']:.2f}x | {r['vpopcnt_vs_best_int8_min']:.2f}x | "
          f"{r['before_over_vpopcnt']:.2f} | {r['gmacs_vpopcnt']:.0f} |"
          for r in rows],
        "",
        "x vs best int8: the fastest int8 baseline's median over lowbit's (above 1: lowbit faster); "
        "(minima): the same ratio of fastest rounds. Issue 13's W1A1 target: >= 2.5x best int8 at batch "
        "8-256.",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 64, 256])
    p.add_argument("--budget-s", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "epyc_zen4"))
    p.add_argument("--name", default="ab_w1a1_vpopcnt")
    a = p.parse_args(argv)
    if not KP.HAS_VPOPCNT:
        print("needs AVX-512 VPOPCNTDQ without AMX (and the plain path not forced): nothing to compare")
        return 1
    t0 = time.time()
    set_threads(1)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory() as td:
        rows, info = measure(a.batches, a.budget_s, a.seed, Path(td))
    meta = run_meta(__file__, argv, t0, seeds=[a.seed])
    meta["load"] = f"{load} at start, {' '.join(f'{v:.2f}' for v in os.getloadavg())} at end"
    payload = {"meta": meta, "rows": rows, **info}
    write_results(a.out, a.name, payload, to_markdown(rows, info, meta))
    print(to_markdown(rows, info, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
