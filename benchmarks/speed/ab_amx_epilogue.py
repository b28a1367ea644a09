"""The AMX Linear kernel (runtime/kernels_amx.py) of the working tree against an older revision's,
in one process and one interleaved run: per layer and in the 8-layer 4096-wide MLP beside the int8
baselines of the speed benchmark.

    python benchmarks/speed/ab_amx_epilogue.py --base a435f46
    python benchmarks/speed/ab_amx_epilogue.py --base a435f46 --rows 256 --kinds binary --no-mlp
    python benchmarks/speed/ab_amx_epilogue.py --base a435f46 --no-layers --onnx-dir /tmp/mlp_onnx

The base revision's ``kernels_amx.py`` is imported from git as a module beside
``lowbit.runtime`` (the rest of the package is the working tree's). Its ``amx_linear`` ran the
epilogue through ``_amx.epilogue_row`` once per output row of each group of 32 channels; the new
one parks the sums of a run of groups (256 channels) and runs ``_jit.amx_epilogue`` per 16 rows and
group, so each output row gets the run's channels at once.

1. Layers: one 4096x4096 layer (binary, ternary, 4-bit DoReFa weights; 4-bit codes, ReLU) at
   ``--rows``: base, new, and new with one group of channels per epilogue call
   (``EPI_CHANNELS = 1``: the vectorized epilogue without the runs). Outputs checked equal to
   ``amx_linear_reference`` bit for bit before timing.
2. ``--chain``: a layer and the next layer's first step (``amx_rows``, its input rows into the tile
   layout): float32 output then quantized, or the codes written by the epilogue (``codes=``).
3. MLP (``--mlp-variants`` x ``--batches``): ``lowbit.runtime.compile`` of the quantized MLP with
   ``kernels_amx.amx_linear`` set to the base's or the new one before each call (PackedLinear
   looks it up per call), beside onnxruntime dynamic and static QDQ int8 and PyTorch dynamic int8
   (``harness.py``'s baselines); base and new outputs checked equal first.

Timing: one thread, ``harness.time_interleaved`` (each method's turn: settle, an untimed call,
the timed call; a new random order each round) on the calling thread's CPU time (every method
runs on the calling thread at one thread; on the loaded 2-core machine wall time mostly measured
preemption), medians. Writes
benchmarks/results/<name>.{json,md} (default ``ab_amx_epilogue``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
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
    mlp_int8_baselines,
    quantized_model,
    set_threads,
    time_interleaved,
)
from profile_amx_linear import _weights  # the same random layers as the profile

from lowbit.runtime import _amx
from lowbit.runtime import compile as rt_compile
from lowbit.runtime import kernels_amx as KA
from lowbit.runtime.kernels_gemv import GemvWeights

KINDS = ("binary", "ternary", "4bit")
CLOCK = time.thread_time  # every method runs on the calling thread at one thread


def base_kernels(rev: str, folder: Path):
    """The base revision's ``kernels_amx`` as ``lowbit.runtime._base_kernels_amx``."""
    src = subprocess.check_output(
        ["git", "-C", str(ROOT), "show", f"{rev}:src/lowbit/runtime/kernels_amx.py"], text=True)
    path = folder / "_base_kernels_amx.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("lowbit.runtime._base_kernels_amx", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _one_group(fn):
    """``fn`` with one group of channels per epilogue call (the new epilogue without the runs)."""
    def run():
        keep = KA.EPI_CHANNELS
        KA.EPI_CHANNELS = 1
        try:
            return fn()
        finally:
            KA.EPI_CHANNELS = keep
    return run


def layer_block(base, kind: str, M: int, n: int, budget_s: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    q, w = _weights(kind, n, rng)
    aw = KA.amx_linear_weights(GemvWeights(q), q, w, 1.0)
    s0, s1 = KA.amx_coeffs(aw, np.ones(n), 0.1, 0.0, np.ones(n), rng.normal(size=n))
    x = rng.uniform(-1, 3, (M, n)).astype(np.float32)
    codes = np.rint(np.clip(x, np.float32(0), np.float32(3.0)) * np.float32(5.0))
    ref = KA.amx_linear_reference(codes, w, s0, s1, True)
    outs = {k: np.empty((M, n), np.float32) for k in ("base", "new", "new, one group per call")}
    fns = {
        "base": lambda: base.amx_linear(x, 0, 3.0, 5.0, aw, s0, s1, True, outs["base"]),
        "new": lambda: KA.amx_linear(x, 0, 3.0, 5.0, aw, s0, s1, True, outs["new"]),
        "new, one group per call": _one_group(lambda: KA.amx_linear(x, 0, 3.0, 5.0, aw, s0, s1, True,
                                                                    outs["new, one group per call"])),
    }
    for k, f in fns.items():
        f()
        if not np.array_equal(outs[k], ref):
            raise SystemExit(f"{kind} {M} rows: {k} differs from amx_linear_reference")
    t = time_interleaved(fns, max_rounds=400, budget_s=budget_s, seed=seed, turns=True, clock=CLOCK)
    med = {k: 1e3 * v["median_s"] for k, v in t.items()}
    low = {k: 1e3 * v["min_s"] for k, v in t.items()}
    return {"kind": kind, "rows": M, "rounds": t["new"]["rounds"], **{f"{k}_ms": v for k, v in med.items()},
            **{f"{k}_min_ms": v for k, v in low.items()},
            "base_over_new": med["base"] / med["new"], "base_over_new_min": low["base"] / low["new"],
            "one_group_over_new": med["new, one group per call"] / med["new"]}


def chain_block(kind: str, M: int, n: int, budget_s: float, seed: int) -> dict:
    """A layer and the next layer's first step, its input rows in the tile layout (``amx_rows``):
    float32 output then the fused formula (today); the codes written by the epilogue, then laid out;
    the codes written by the epilogue in the tile layout (``tiles=True``: nothing left to do)."""
    rng = np.random.default_rng(seed)
    q, w = _weights(kind, n, rng)
    aw = KA.amx_linear_weights(GemvWeights(q), q, w, 1.0)
    s0, s1 = KA.amx_coeffs(aw, np.ones(n), 0.1, 0.0, np.ones(n), rng.normal(size=n))
    x = rng.uniform(-1, 3, (M, n)).astype(np.float32)
    qhi, qmult = 3.0, 5.0
    out = np.empty((M, n), np.float32)
    codes = np.empty((M, n), np.uint8)
    fns = {"float32 out, next layer quantizes": lambda: KA.amx_rows(
               KA.amx_linear(x, 0, 3.0, 5.0, aw, s0, s1, True, out), 0, qhi, qmult),
           "codes from the epilogue": lambda: KA.amx_rows(
               KA.amx_linear(x, 0, 3.0, 5.0, aw, s0, s1, True, None, codes, qhi, qmult).reshape(M, n), 1),
           "code tiles from the epilogue": lambda: KA.amx_linear(x, 0, 3.0, 5.0, aw, s0, s1, True, None,
                                                                 KA.code_tiles(M, n), qhi, qmult, tiles=True)}
    first, *rest = (f() for f in fns.values())
    if not all(np.array_equal(first, r) for r in rest):
        raise SystemExit(f"chain {kind} {M} rows: the next layer's tile rows differ")
    t = time_interleaved(fns, max_rounds=400, budget_s=budget_s, seed=seed, turns=True, clock=CLOCK)
    med = {k: 1e3 * v["median_s"] for k, v in t.items()}
    low = {k: 1e3 * v["min_s"] for k, v in t.items()}
    f, c, ct = list(fns)
    return {"kind": kind, "rows": M, "rounds": t[f]["rounds"], "float_ms": med[f], "codes_ms": med[c],
            "tiles_ms": med[ct], "float_min_ms": low[f], "codes_min_ms": low[c], "tiles_min_ms": low[ct],
            "float_over_codes": med[f] / med[c], "float_over_codes_min": low[f] / low[c],
            "float_over_tiles": med[f] / med[ct], "float_over_tiles_min": low[f] / low[ct]}


def mlp_block(base, variants: list[str], batches: list[int], budget_s: float, seed: int,
              onnx_dir: Path) -> list[dict]:
    torch.manual_seed(seed)
    fm = deep_mlp(4096, 8).eval()
    baselines, missing = mlp_int8_baselines(fm, 4096, seed, onnx_dir)
    packs = {}
    for v in variants:
        packs[v] = rt_compile(quantized_model(fm, v), torch.rand(8, 4096))
    del fm
    new_lin, base_lin = KA.amx_linear, base.amx_linear

    def lowbit(packed, fn, x):
        def run():
            KA.amx_linear = fn
            try:
                return packed(x)
            finally:
                KA.amx_linear = new_lin
        return run

    rows = []
    for variant, B in [(v, B) for v in variants for B in batches]:
        x = torch.rand(B, 4096, generator=torch.Generator().manual_seed(seed + B)).contiguous()
        pk = packs[variant]
        fns = {"lowbit base": lowbit(pk, base_lin, x), "lowbit new": lowbit(pk, new_lin, x), **baselines(x)}
        if not torch.equal(fns["lowbit base"](), fns["lowbit new"]()):
            raise SystemExit(f"MLP {variant} batch {B}: base and new outputs differ")
        t = time_interleaved(fns, max_rounds=200, budget_s=budget_s, seed=seed, turns=True, clock=CLOCK)
        med, low, best, best_ms, best_low = block_ms(t, ("lowbit base", "lowbit new"))
        rows.append({"variant": variant, "batch": B, "rounds": t["lowbit new"]["rounds"],
                     **{f"{k}_ms": v for k, v in med.items()}, **{f"{k}_min_ms": v for k, v in low.items()},
                     "best_int8": best,
                     "base_vs_best_int8": best_ms / med["lowbit base"],
                     "new_vs_best_int8": best_ms / med["lowbit new"],
                     "new_vs_best_int8_min": best_low / low["lowbit new"],
                     "base_over_new": med["lowbit base"] / med["lowbit new"],
                     "base_over_new_min": low["lowbit base"] / low["lowbit new"], "missing": missing})
        print(rows[-1], flush=True)
    return rows


def to_markdown(layers: list[dict], mlp: list[dict], meta: dict, chain: list[dict] | None = None) -> str:
    lines = [
        f"# AMX Linear epilogue: working tree against {meta['base']}",
        "",
        f"Command: `{meta['command']}`; git {meta['git'].get('commit', '?')[:10]}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}. One thread; one interleaved run per block "
        "(each method's turn: settle, an untimed call, the timed call; random order each round), medians "
        f"of thread CPU time in ms; a single run on the shared 2-core machine under load ({meta['load']}), "
        "so only the ratios within a block mean something. Outputs checked bit for bit first (layers: "
        "against `amx_linear_reference`; MLP: base against new).",
        "",
    ]
    if layers:
        lines += [
            "## One 4096x4096 layer (`amx_linear`, 4-bit codes quantized in the call, ReLU)",
            "",
            "| weights | rows | rounds | base | new | new, one group per call | base / new "
            "| base / new (minima) | one group / new |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *[f"| {r['kind']} | {r['rows']} | {r['rounds']} | {r['base_ms']:.3f} | {r['new_ms']:.3f} | "
              f"{r['new, one group per call_ms']:.3f} | {r['base_over_new']:.3f} | "
              f"{r['base_over_new_min']:.3f} | {r['one_group_over_new']:.3f} |"
              for r in layers],
            "",
        ]
    if chain:
        lines += [
            "## A layer and the next layer's row quantization: float32 output, or codes from the epilogue",
            "",
            "`amx_linear` then `amx_rows` of its output (the first step of the next layer's call), the same "
            "tile rows both ways (checked).",
            "",
            "| weights | rows | rounds | float32 out + quantize | codes + their tile layout | code tiles "
            "| float / codes | float / code tiles | float / code tiles (minima) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *[f"| {r['kind']} | {r['rows']} | {r['rounds']} | {r['float_ms']:.3f} | {r['codes_ms']:.3f} | "
              f"{r['tiles_ms']:.3f} | {r['float_over_codes']:.3f} | {r['float_over_tiles']:.3f} | "
              f"{r['float_over_tiles_min']:.3f} |" for r in chain],
            "",
        ]
    if mlp:
        lines += [
            "## MLP 8 x Linear 4096x4096 (`lowbit.runtime.compile`), beside the int8 baselines",
            "",
            "| variant | batch | rounds | lowbit base | lowbit new | ORT dyn int8 | ORT QDQ int8 "
            "| torch dyn int8 | base vs best int8 | new vs best int8 | new vs best int8 (minima) "
            "| base / new | base / new (minima) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *[f"| {r['variant']} | {r['batch']} | {r['rounds']} | {r['lowbit base_ms']:.2f} | "
              f"{r['lowbit new_ms']:.2f} | {r.get('ort-dyn-int8_ms', float('nan')):.2f} | "
              f"{r.get('ort-qdq-int8_ms', float('nan')):.2f} | {r['torch-dyn-int8_ms']:.2f} | "
              f"{r['base_vs_best_int8']:.2f}x | {r['new_vs_best_int8']:.2f}x | "
              f"{r['new_vs_best_int8_min']:.2f}x | {r['base_over_new']:.3f} | {r['base_over_new_min']:.3f} |"
              for r in mlp],
            "",
            "x vs best int8: the fastest int8 baseline's time over lowbit's (above 1: lowbit faster).",
            "(minima): the same ratio of each method's fastest round (interference only adds time).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision whose kernels_amx.py is the baseline")
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--layer-budget-s", type=float, default=4.0)
    p.add_argument("--no-layers", action="store_true")
    p.add_argument("--no-mlp", action="store_true")
    p.add_argument("--chain", action="store_true",
                   help="also time a layer + the next layer's row quantization, float32 or codes handed on")
    p.add_argument("--mlp-variants", nargs="+", default=["w1a4", "w2a4"])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--mlp-budget-s", type=float, default=12.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--onnx-dir", default=None,
                   help="where the int8 ONNX baselines are exported, or found from an earlier run with the "
                        "same seed (default: a new temporary folder)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="ab_amx_epilogue")
    a = p.parse_args(argv)
    if not _amx.amx_enabled():
        print("AMX-INT8 is not available here (CPU, OS or plain path): nothing to compare")
        return 1
    t0 = time.time()
    set_threads(1)
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    tmp = Path(tempfile.mkdtemp())
    base = base_kernels(a.base, tmp)
    layers = []
    for kind in [] if a.no_layers else a.kinds:
        for M in a.rows:
            layers.append(layer_block(base, kind, M, a.size, a.layer_budget_s, a.seed))
            print(layers[-1], flush=True)
    onnx_dir = Path(a.onnx_dir) if a.onnx_dir else tmp
    onnx_dir.mkdir(parents=True, exist_ok=True)
    chain = []
    for kind in a.kinds if a.chain else []:
        for M in a.rows:
            chain.append(chain_block(kind, M, a.size, a.layer_budget_s, a.seed))
            print(chain[-1], flush=True)
    mlp = [] if a.no_mlp else mlp_block(base, a.mlp_variants, a.batches, a.mlp_budget_s, a.seed, onnx_dir)
    load = f"load average {load} at start, {' '.join(f'{v:.2f}' for v in os.getloadavg())} at end"
    meta = run_meta(__file__, argv, t0, seeds=[a.seed], base=a.base, load=load, threads=1)
    write_results(a.out, a.name, {"meta": meta, "layers": layers, "chain": chain, "mlp": mlp},
                  to_markdown(layers, mlp, meta, chain))
    print(f"wrote {Path(a.out) / (a.name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
