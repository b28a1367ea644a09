"""Many-row Linear layers on CPUs with AVX-512 VNNI but no AMX: the expanded-field GEMM on VNNI
register tiles (``kernels_amx._vnni_tile``) against the paths those layers took before it (the
table-lookup GEMM for binary / ternary weights with few-bit codes, else the int8 kernel on an int8
copy of the weights), in one process and one interleaved run.

    python benchmarks/speed/ab_vnni_linear.py
    python benchmarks/speed/ab_vnni_linear.py --no-layers --batches 64 256 --variants w2a4 w4a4

1. Layers (``--rows``): one 4096x4096 layer, ternary weights, 4-bit codes quantized in the call,
   ReLU: the lookup tables (``kernels_gemm``) against the VNNI tiles (``kernels_amx.amx_linear``
   with ``vnni=True``), both checked equal to the integer reference first; the row count from
   which PackedLinear takes the VNNI tiles is ``kernels_amx.ternary_vnni_rows()`` (measured).
2. MLP (``--variants`` x ``--batches``): ``lowbit.runtime.compile`` of the 8-layer 4096-wide MLP of
   the speed benchmark twice, with the VNNI tiles (the default) and without them
   (``kernels_amx.VNNI_LINEAR = False`` while packing: the paths before), beside onnxruntime
   dynamic and static QDQ int8 and PyTorch dynamic int8 (``harness.py``'s baselines); the two
   lowbit outputs checked equal first. Memory: every array each packed model holds
   (``harness.memory_bytes``): without the VNNI tiles a large 4-bit (or 8-bit-code) layer keeps an
   int8 copy of its weights.

Timing: one thread, ``harness.time_interleaved`` (each method's turn: settle, an untimed call, the
timed call; a new random order each round) on the calling thread's CPU time, medians. Writes
benchmarks/results/<name>.{json,md} (default ``no_amx/ab_vnni_linear``).
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

import numba
import numpy as np
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

from lowbit.runtime import _amx, kernels
from lowbit.runtime import compile as rt_compile
from lowbit.runtime import kernels_amx as KA

CLOCK = time.thread_time  # every method runs on the calling thread at one thread


def layer_block(M: int, n: int, budget_s: float, seed: int) -> dict:
    q, s0, s1, run = KA.ternary_pair(n, n, seed)
    x = np.random.default_rng(seed + 1).uniform(-1, 3, (M, n)).astype(np.float32)
    codes = np.rint(np.clip(x, np.float32(0), np.float32(3.0)) * np.float32(5.0))
    ref = KA.amx_linear_reference(codes, q, s0, s1, True)
    outs = {k: np.empty((M, n), np.float32) for k in ("tables", "vnni")}

    def tables():
        run(x, outs["tables"], "tables")

    def vnni():
        run(x, outs["vnni"], "vnni")

    fns = {"tables": tables, "vnni": vnni}
    for k, f in fns.items():
        f()
        if not np.array_equal(outs[k], ref):
            raise SystemExit(f"ternary {M} rows: {k} differs from the integer reference")
    t = time_interleaved(fns, max_rounds=400, budget_s=budget_s, seed=seed, turns=True, clock=CLOCK)
    med = {k: 1e3 * v["median_s"] for k, v in t.items()}
    low = {k: 1e3 * v["min_s"] for k, v in t.items()}
    return {"rows": M, "rounds": t["vnni"]["rounds"], "tables_ms": med["tables"], "vnni_ms": med["vnni"],
            "tables_min_ms": low["tables"], "vnni_min_ms": low["vnni"],
            "tables_over_vnni": med["tables"] / med["vnni"],
            "tables_over_vnni_min": low["tables"] / low["vnni"]}


def _pack(fm: torch.nn.Module, variant: str, vnni: bool):
    keep = KA.VNNI_LINEAR
    KA.VNNI_LINEAR = vnni
    try:
        return rt_compile(quantized_model(fm, variant), torch.rand(8, 4096))
    finally:
        KA.VNNI_LINEAR = keep


def mlp_block(variants: list[str], batches: list[int], budget_s: float, seed: int,
              onnx_dir: Path) -> list[dict]:
    torch.manual_seed(seed)
    fm = deep_mlp(4096, 8).eval()
    baselines, missing = mlp_int8_baselines(fm, 4096, seed, onnx_dir)
    ours = ("lowbit before", "lowbit vnni")
    rows = []
    for variant in variants:
        before, after = _pack(fm, variant, False), _pack(fm, variant, True)
        mem = {"before": memory_bytes(before)["in_memory"], "vnni": memory_bytes(after)["in_memory"]}
        for B in batches:
            x = torch.rand(B, 4096, generator=torch.Generator().manual_seed(seed + B)).contiguous()
            fns = {ours[0]: lambda p=before, x=x: p(x), ours[1]: lambda p=after, x=x: p(x), **baselines(x)}
            if not torch.equal(fns[ours[0]](), fns[ours[1]]()):
                raise SystemExit(f"MLP {variant} batch {B}: the outputs before and with VNNI tiles differ")
            t = time_interleaved(fns, max_rounds=200, budget_s=budget_s, seed=seed, turns=True, clock=CLOCK)
            med, low, best, best_ms, best_low = block_ms(t, ours)
            rows.append({"variant": variant, "batch": B, "rounds": t["lowbit vnni"]["rounds"],
                         **{f"{k}_ms": v for k, v in med.items()},
                         **{f"{k}_min_ms": v for k, v in low.items()},
                         "best_int8": best, "before_vs_best_int8": best_ms / med["lowbit before"],
                         "vnni_vs_best_int8": best_ms / med["lowbit vnni"],
                         "vnni_vs_best_int8_min": best_low / low["lowbit vnni"],
                         "before_over_vnni": med["lowbit before"] / med["lowbit vnni"],
                         "memory_before_bytes": mem["before"], "memory_vnni_bytes": mem["vnni"],
                         "missing": missing})
            print(rows[-1], flush=True)
        del before, after
    return rows


def to_markdown(layers: list[dict], mlp: list[dict], meta: dict) -> str:
    lines = [
        "# Many-row Linear layers without AMX: VNNI register tiles on the expanded fields",
        "",
        f"Command: `{meta['command']}`; git {meta['git'].get('commit', '?')[:10]}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; CPU: {meta['machine'].get('cpu', '?')}. "
        "One thread; one interleaved run per block (each method's turn: settle, an untimed call, the timed "
        "call; random order each round), medians of thread CPU time in ms; a single run "
        f"({meta['load']}), so only the ratios within a block mean something. Outputs checked bit for bit "
        "first (layers: against the integer reference; MLP: before against with the VNNI tiles).",
        "",
    ]
    if layers:
        lines += [
            "## One 4096x4096 ternary layer (4-bit codes quantized in the call, ReLU)",
            "",
            "| rows | rounds | lookup tables | VNNI tiles | tables / VNNI | tables / VNNI (minima) |",
            "|---:|---:|---:|---:|---:|---:|",
            *[f"| {r['rows']} | {r['rounds']} | {r['tables_ms']:.3f} | {r['vnni_ms']:.3f} | "
              f"{r['tables_over_vnni']:.2f} | {r['tables_over_vnni_min']:.2f} |" for r in layers],
            "",
            "PackedLinear runs ternary layers with tables on the VNNI tiles from "
            + (f"{rows} rows" if (rows := KA.ternary_vnni_rows()) < KA.NEVER_ROWS else "no row count")
            + " here (`kernels_amx.ternary_vnni_rows`: measured once per process, or"
            " `LOWBIT_RUNTIME_TERNARY_VNNI_ROWS`).",
            "",
        ]
    if mlp:
        lines += [
            "## MLP 8 x Linear 4096x4096 (`lowbit.runtime.compile`), beside the int8 baselines",
            "",
            "| variant | batch | rounds | lowbit before | lowbit VNNI | ORT dyn int8 | ORT QDQ int8 "
            "| torch dyn int8 | before vs best int8 | VNNI vs best int8 | VNNI vs best int8 (minima) "
            "| before / VNNI | in memory before | in memory VNNI |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *[f"| {r['variant']} | {r['batch']} | {r['rounds']} | {r['lowbit before_ms']:.2f} | "
              f"{r['lowbit vnni_ms']:.2f} | {r.get('ort-dyn-int8_ms', float('nan')):.2f} | "
              f"{r.get('ort-qdq-int8_ms', float('nan')):.2f} | {r['torch-dyn-int8_ms']:.2f} | "
              f"{r['before_vs_best_int8']:.2f}x | {r['vnni_vs_best_int8']:.2f}x | "
              f"{r['vnni_vs_best_int8_min']:.2f}x | {r['before_over_vnni']:.2f} | "
              f"{r['memory_before_bytes'] / 1e6:.1f} MB | {r['memory_vnni_bytes'] / 1e6:.1f} MB |"
              for r in mlp],
            "",
            "x vs best int8: the fastest int8 baseline's time over lowbit's (above 1: lowbit faster). "
            "(minima): the same ratio of each method's fastest round. In memory: every array the packed "
            "model holds (weights in every form its kernels read, scales, biases).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[16, 24, 32, 48, 64, 256])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--layer-budget-s", type=float, default=3.0)
    p.add_argument("--no-layers", action="store_true")
    p.add_argument("--no-mlp", action="store_true")
    p.add_argument("--variants", nargs="+", default=["w2a4", "w2a8", "w4a4", "w4a8", "w1a8"])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--mlp-budget-s", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "no_amx"))
    p.add_argument("--name", default="ab_vnni_linear")
    a = p.parse_args(argv)
    if _amx.amx_enabled() or not kernels.HAS_VNNI:
        print("needs AVX-512 VNNI without AMX (here: AMX enabled or no VNNI): nothing to compare")
        return 1
    t0 = time.time()
    set_threads(1)
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    layers = []
    for M in [] if a.no_layers else a.rows:
        layers.append(layer_block(M, a.size, a.layer_budget_s, a.seed))
        print(layers[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        mlp = [] if a.no_mlp else mlp_block(a.variants, a.batches, a.mlp_budget_s, a.seed, Path(tmp))
    load = f"load average {load} at start, {' '.join(f'{v:.2f}' for v in os.getloadavg())} at end"
    meta = run_meta(__file__, argv, t0, seeds=[a.seed], load=load, threads=1)
    write_results(a.out, a.name, {"meta": meta, "layers": layers, "mlp": mlp}, to_markdown(layers, mlp, meta))
    print(f"wrote {Path(a.out) / (a.name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
