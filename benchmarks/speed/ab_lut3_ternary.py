"""Ternary weights x 4-bit codes on CPUs with AVX-512 VBMI + VNNI: the base-3 lookup tables
(``kernels_lut3``: three weights a lookup, the sign a ``vpdpbusd`` operand) against the 4-bit tables
the layers ran on before (``kernels_gemm``: two weights a lookup), beside the int8 baselines, in one
process and one interleaved run per thread count and batch.

    python benchmarks/speed/ab_lut3_ternary.py [--batches 8 16 64 256] [--threads 1 2] [--out DIR]

``lowbit.runtime.compile`` of the 8-layer 4096-wide MLP of the speed benchmark (variant ``w2a4``:
TWN weights, 4-bit PACT codes) twice: with the base-3 tables (the default) and without them
(``kernels_lut3.ENABLED`` off while packing). Below 8 rows both run the same GEMV, so the batches
start at 8. The two outputs are checked equal bit for bit first. Baselines: onnxruntime dynamic and
static QDQ int8 and PyTorch dynamic int8 (``harness.mlp_int8_baselines``, made for each thread
count); best int8 = the fastest median. Memory: every array each packed model holds
(``harness.memory_bytes``).

Timing: ``harness.time_interleaved`` (each method's turn: settle, an untimed call, the timed call;
a new random order each round), medians; the calling thread's CPU time on one thread, wall time on
two. Writes ``<out>/<name>.{json,md}`` (default ``epyc_zen4/ab_lut3_ternary``).
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
from lowbit.runtime import kernels_gemm as KG
from lowbit.runtime import kernels_lut3 as KL3

OURS = ("lowbit 4-bit tables", "lowbit base-3 tables")


def _pack(fm: torch.nn.Module, base3: bool):
    keep = KL3.ENABLED
    KL3.ENABLED = base3
    try:
        return rt_compile(quantized_model(fm, "w2a4"), torch.rand(8, 4096))
    finally:
        KL3.ENABLED = keep


def measure(batches: list[int], threads: list[int], budget_s: float, seed: int, onnx_dir: Path
            ) -> tuple[list[dict], dict]:
    torch.manual_seed(seed)
    fm = deep_mlp(4096, 8).eval()
    nib, b3 = _pack(fm, False), _pack(fm, True)
    kernels = {OURS[0]: nib.layers[0].detail, OURS[1]: b3.layers[0].detail}
    mem = {OURS[0]: memory_bytes(nib)["in_memory"], OURS[1]: memory_bytes(b3)["in_memory"]}
    rows = []
    for nt in threads:
        set_threads(nt)
        baselines, missing = mlp_int8_baselines(fm, 4096, seed, onnx_dir, nt)
        clock = time.thread_time if nt == 1 else time.perf_counter
        for B in batches:
            x = torch.rand(B, 4096, generator=torch.Generator().manual_seed(seed + B)).contiguous()
            fns = {OURS[0]: lambda x=x: nib(x), OURS[1]: lambda x=x: b3(x), **baselines(x)}
            if not torch.equal(fns[OURS[0]](), fns[OURS[1]]()):
                raise SystemExit(f"batch {B}: the outputs on the two table forms differ")
            t = time_interleaved(fns, max_rounds=200, budget_s=budget_s, seed=seed, turns=True, clock=clock)
            med, low, best, best_ms, best_low = block_ms(t, OURS)
            rows.append({"threads": nt, "batch": B, "rounds": t[OURS[1]]["rounds"],
                         **{f"{k}_ms": v for k, v in med.items()},
                         **{f"{k}_min_ms": v for k, v in low.items()}, "best_int8": best,
                         "nibble_vs_best_int8": best_ms / med[OURS[0]],
                         "base3_vs_best_int8": best_ms / med[OURS[1]],
                         "base3_vs_best_int8_min": best_low / low[OURS[1]],
                         "nibble_over_base3": med[OURS[0]] / med[OURS[1]]})
            print(rows[-1], flush=True)
    return rows, {"kernels": kernels, "memory_bytes": mem, "missing": missing}


def to_markdown(rows: list[dict], info: dict, meta: dict) -> str:
    mem = info["memory_bytes"]
    return "\n".join([
        "# Ternary x 4-bit codes on the deep MLP (8 x 4096^2): base-3 vs 4-bit lookup tables vs best int8",
        "",
        f"Command: `{meta['command']}`; git {meta['git'].get('commit', '?')[:10]}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; "
        f"CPU: {meta['machine'].get('cpu', '?')}; "
        f"load average {meta['load']}. One interleaved run per thread count and batch (each method's "
        "turn: settle, an untimed call, the timed call; random order each round), medians in ms (thread "
        "CPU time on one thread, wall time on two); a single run, so only the ratios within a row mean "
        "something. The two lowbit models' outputs checked equal bit for bit first.",
        "",
        f"Layers: 4-bit tables `{info['kernels'][OURS[0]]}`; base-3 `{info['kernels'][OURS[1]]}`. In memory "
        f"(every array the packed model holds): 4-bit tables {mem[OURS[0]] / 1e6:.1f} MB, base-3 "
        f"{mem[OURS[1]] / 1e6:.1f} MB (5 bits per 3 weights against 4 per 2).",
        "",
        "| threads | batch | rounds | 4-bit tables | base-3 tables | ORT dyn int8 | ORT QDQ int8 "
        "| torch dyn int8 | 4-bit vs best int8 | base-3 vs best int8 | (minima) | 4-bit / base-3 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['threads']} | {r['batch']} | {r['rounds']} | {r[OURS[0] + '_ms']:.2f} | "
          f"{r[OURS[1] + '_ms']:.2f} | {r.get('ort-dyn-int8_ms', float('nan')):.2f} | "
          f"{r.get('ort-qdq-int8_ms', float('nan')):.2f} | {r['torch-dyn-int8_ms']:.2f} | "
          f"{r['nibble_vs_best_int8']:.2f}x | {r['base3_vs_best_int8']:.2f}x | "
          f"{r['base3_vs_best_int8_min']:.2f}x | {r['nibble_over_base3']:.2f} |"
          for r in rows],
        "",
        "x vs best int8: the fastest int8 baseline's median over lowbit's (above 1: lowbit faster); "
        "(minima): the same ratio of fastest rounds. Issue 13's target for binary / ternary weights with "
        "<= 4-bit codes: >= 1.3x best int8 at batch 8-256.",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16, 64, 256])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--budget-s", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "epyc_zen4"))
    p.add_argument("--name", default="ab_lut3_ternary")
    a = p.parse_args(argv)
    if not KG.HAS_LUT:
        print("needs AVX-512 VBMI + VNNI (and the plain path not forced): nothing to compare")
        return 1
    t0 = time.time()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory() as td:
        rows, info = measure(a.batches, a.threads, a.budget_s, a.seed, Path(td))
    meta = run_meta(__file__, argv, t0, seeds=[a.seed])
    meta["load"] = f"{load} at start, {' '.join(f'{v:.2f}' for v in os.getloadavg())} at end"
    payload = {"meta": meta, "rows": rows, **info}
    write_results(a.out, a.name, payload, to_markdown(rows, info, meta))
    print(to_markdown(rows, info, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
