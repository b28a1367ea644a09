"""Batch-1 Linear speed of the packed runtime (the few-row GEMV, ``runtime/kernels_gemv.py``)
against the strongest FP32 and int8 baselines, measured side by side in one process.

    python benchmarks/speed/bench_gemv.py                         # both parts, 1 and 2 threads
    python benchmarks/speed/bench_gemv.py --sizes 2048 --no-mlp   # one layer size only
    python benchmarks/speed/bench_gemv.py --threads 1 --sizes 4096 --mlp-variants w2a8 w2a8-2bit \
        --name gemv_tq1                                           # ternary: 1.6 bits vs 2-bit fields

Part 1, per layer: one ``Linear(N, N)`` (N = 512, 1024, 2048, 4096) at batch 1, weights binary /
TWN ternary / DoReFa 2-bit / DoReFa 4-bit with 8-bit PACT input codes, against the same float
layer in PyTorch FP32, onnxruntime FP32, PyTorch dynamic int8 (``quantize_dynamic``) and
onnxruntime dynamic / static QDQ int8. ``lowbit`` is the whole call of the compiled one-layer
model on a float tensor (input quantization, product, float epilogue, output tensor);
``kernel`` is the GEMV alone on NumPy arrays (``kernels_gemv.gemv_run`` with the layer's cached
arguments). bitnet.cpp's published
figure for one [1, 2048] x [2048, 2048] I2_S product stands beside the 2048 rows (microsoft/BitNet
``src/README.md``, "Kernel Performance Comparison": AMD EPYC 7V13, 1 thread, 0.058 +- 0.007 ms;
another CPU, not measured here).

Part 2, ``deep MLP``: 8 x ``Linear(4096, 4096)`` with ReLU between, batch 1, every layer packed,
weights binary / ternary / 4-bit x 8- and 4-bit PACT activations, with the same baselines and the
batch-1 targets of issue 13 (best FP32 = faster of PyTorch and onnxruntime FP32, best int8 =
fastest of the three int8 baselines).

Ternary layers run their 1.6-bit form at batch 1 (``runtime/kernels_tq1.py``); ``ternary-2bit``
(per layer) and the ``-2bit`` MLP variants are the same models compiled with it switched off (the
2-bit fields of ``kernels_gemv``), timed in the same interleaved groups.

Timing: ``harness.time_interleaved`` (all methods of one group take turns in a new random order
each round; median and min over rounds) with turns as ``bench_speed.py`` times them: per turn a
settle, untimed calls for 2 ms, then the timed call, i.e. a method timed as a user's loop runs it;
``--cold`` times one call per method per round instead (each call after the other methods ran:
caches cold). Writes benchmarks/results/gemv.{json,md} through ``benchmarks/common.py``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, run_meta, write_results
from harness import (
    VARIANTS,
    _infer,
    deep_mlp,
    export_onnx,
    machine_info,
    ort_session,
    quantized_model,
    set_threads,
    time_interleaved,
    torch_dynamic_int8,
)

log = logging.getLogger("bench_gemv")

#: bitnet.cpp's published [1, 2048] x [2048, 2048] I2_S time (microsoft/BitNet src/README.md)
BITNET_2048_MS = 0.058
BITNET_SOURCE = ("microsoft/BitNet src/README.md, 'Kernel Performance Comparison' (AMD EPYC 7V13, 1 thread, "
                 "weight-parallel I2_S: 0.058 +- 0.007 ms)")
LAYER_WEIGHTS = {"binary": "w1a8", "ternary": "w2a8", "ternary-2bit": "w2a8", "2bit": None, "4bit": "w4a8"}
TWO_BIT = ({"method": "dorefa", "bits": 2}, {"method": "pact", "bits": 8, "alpha_init": 3.0})
MLP_VARIANTS = ("w1a8", "w1a4", "w2a8", "w2a4", "w4a8", "w4a4", "w2a8-2bit", "w2a4-2bit")
#: suffix of a model compiled without the 1.6-bit ternary form (kernels_tq1)
NO_TQ1 = "-2bit"
BASELINES = ("torch-fp32", "ort-fp32", "torch-dyn-int8", "ort-dyn-int8", "ort-qdq-int8")
#: issue 13, batch 1 on the deep MLP: (weight kind, x best FP32, x best int8)
TARGETS = {"w1": (25.0, 2.5), "w2": (14.0, 2.5), "w4": (7.0, 1.3)}
TARGET_GEMV_MS = 0.06
#: warm turns (harness.time_interleaved(turns=True)); --cold switches them off
TURNS = True
#: "2 threads never slower": the 2-thread median within 3% of the 1-thread one (the spread of two
#: medians of the same serial code in one interleaved group, measured: up to 1%)
SAME = 1.03


def _quantized(fmodel: nn.Module, weights: str) -> nn.Module:
    if weights != "2bit":
        return quantized_model(fmodel, LAYER_WEIGHTS[weights])
    import lowbit

    q = copy.deepcopy(fmodel)
    w, a = TWO_BIT
    lowbit.quantize(q, {"default": {"weight": w, "activation": a}})
    return q.eval()


class Baselines:
    """The five baselines of one float model: ONNX files exported once, sessions per thread count."""

    def __init__(self, fmodel: nn.Module, example: torch.Tensor, calib: list[np.ndarray], workdir: Path
                 ) -> None:
        self.fmodel, self.example = fmodel, example
        self.dyn, _ = torch_dynamic_int8(fmodel)
        self.paths, self.missing = export_onnx(fmodel, example, calib, workdir)

    def fns(self, threads: int) -> dict[str, Any]:
        x, xn = self.example, self.example.numpy()
        fns: dict[str, Any] = {
            "torch-fp32": lambda: _infer(self.fmodel, x),
            "torch-dyn-int8": lambda: _infer(self.dyn, x),
        }
        for name, p in self.paths.items():
            run = ort_session(p, threads)
            fns[name] = lambda run=run: run(xn)
        return fns


def _lowbit(qmodel: nn.Module, example: torch.Tensor, check: bool = True, tq1: bool = True):
    """``runtime.compile``; ``check=False`` skips the comparison with the fake-quantized model (the
    deep MLP: tests/test_kernels_gemv.py checks the same layers exactly, and the check of 8 layers
    of 4096^2 in float32 and float64 took minutes on the loaded machine); ``tq1=False`` compiles
    ternary layers without their 1.6-bit form."""
    from lowbit.runtime import compile as rt_compile
    from lowbit.runtime import kernels_tq1 as KT

    old, KT.ENABLED = KT.ENABLED, KT.ENABLED and tq1
    try:
        return rt_compile(qmodel, example, check=check)
    finally:
        KT.ENABLED = old


def _with_threads(n: int, f):
    """``f`` run with ``n`` numba threads (thread-local), so that 1- and 2-thread calls of the same
    model take turns in one interleaved group."""
    import numba

    n = min(n, numba.config.NUMBA_NUM_THREADS)

    def run():
        numba.set_num_threads(n)
        return f()

    return run


def thread_group(packed: dict[str, Any], x: torch.Tensor, budget_s: float, part: str, **key: Any
                 ) -> list[dict]:
    """Every lowbit model at 1 and 2 numba threads, interleaved in one group (PyTorch at 1 thread,
    no baseline in the group: their idle OpenMP threads would spin between the calls)."""
    set_threads(1)
    fns = {}
    for w, pm in packed.items():
        for n in (1, 2):
            fns[f"lowbit-{w}@{n}"] = _with_threads(n, lambda pm=pm: pm(x))
    timing = time_interleaved(fns, max_rounds=400, budget_s=budget_s, turns=TURNS)
    set_threads(1)
    rows = []
    for k, t in timing.items():
        name, _, n = k.partition("@")
        rows.append({"part": part, **key, "batch": 1, "threads": int(n), "method": name,
                     "median_ms": t["median_s"] * 1e3, "min_ms": t["min_s"] * 1e3, "rounds": t["rounds"]})
    return rows


def layer_part(sizes: list[int], threads_list: list[int], budget_s: float, workdir: Path) -> list[dict]:
    from lowbit.runtime import kernels_gemv as KV
    from lowbit.runtime.layers import PackedLinear

    rows: list[dict] = []
    for N in sizes:
        torch.manual_seed(N)
        fmodel = nn.Sequential(nn.Linear(N, N)).eval()
        x = torch.rand(1, N)
        calib = [torch.rand(8, N).numpy() for _ in range(4)]
        packed = {w: _lowbit(_quantized(fmodel, w), x, tq1=not w.endswith(NO_TQ1)) for w in LAYER_WEIGHTS}
        with tempfile.TemporaryDirectory(dir=workdir) as td:
            base = Baselines(fmodel, x, calib, Path(td))
            missing = base.missing
            for threads in threads_list:
                set_threads(threads)
                fns = base.fns(threads)
                info: dict[str, dict] = {}
                for w, pm in packed.items():
                    lin = next(m for m in pm.packed_layers().values() if isinstance(m, PackedLinear))
                    fns[f"lowbit-{w}"] = lambda pm=pm, x=x: pm(x)
                    gw = lin.gemv
                    if gw is not None:
                        _, qp, coef = lin._gemv_static()  # the arguments the layer caches
                        xa, out = x.numpy(), np.empty((1, N), np.float32)
                        fns[f"kernel-{w}"] = (lambda xa=xa, gw=gw, qp=qp, coef=coef, out=out:
                                              KV.gemv_run(xa, 0, qp, gw, coef, False, out))
                    info[w] = {"kernel_name": lin.kernel_name(), "weight_bytes": lin.weight_bytes,
                               "field_bytes": None if gw is None else gw.nbytes}
                timing = time_interleaved(fns, max_rounds=400, budget_s=budget_s, turns=TURNS)
                del fns
                rows += _layer_rows(timing, N, threads, info)
                for k, why in missing.items():
                    rows.append({"part": "layer", "N": N, "threads": threads, "method": k, "why": why})
                log.info("layer %d, %d thread(s) done", N, threads)
            del base
        if len(threads_list) > 1:
            rows += thread_group(packed, x, budget_s, "layer-threads", N=N, K=N)
        del packed, fmodel
        gc.collect()
    return rows


def _layer_rows(timing: dict, N: int, threads: int, info: dict) -> list[dict]:
    rows = []
    for k, t in timing.items():
        kind, _, w = k.partition("-") if k.startswith(("lowbit", "kernel")) else (k, "", "")
        rows.append({
            "part": "layer", "N": N, "K": N, "batch": 1, "threads": threads,
            "method": k if not w else f"lowbit-{w}" if kind == "lowbit" else f"lowbit-kernel-{w}",
            "weights": w or "float",
            "bits": {"binary": 1, "ternary": 2, "ternary-2bit": 2, "2bit": 2, "4bit": 4}.get(w),
            "median_ms": t["median_s"] * 1e3, "min_ms": t["min_s"] * 1e3, "rounds": t["rounds"],
            **({} if not w else info[w]),
        })
    return rows


def mlp_part(threads_list: list[int], budget_s: float, workdir: Path, variants: tuple[str, ...]
             ) -> list[dict]:
    rows: list[dict] = []
    torch.manual_seed(0)
    fmodel = deep_mlp(4096, 8).eval()
    x = torch.rand(1, 4096)
    calib = [torch.rand(4, 4096).numpy() for _ in range(2)]
    packed = {}
    for v in variants:
        qm = quantized_model(fmodel, v.removesuffix(NO_TQ1))
        pm = _lowbit(qm, x, check=False, tq1=not v.endswith(NO_TQ1))
        packed[v] = pm
        log.info("deep MLP %s compiled: %s", v, next(iter(pm.packed_layers().values())).describe())
    with tempfile.TemporaryDirectory(dir=workdir) as td:
        base = Baselines(fmodel, x, calib, Path(td))
        for threads in threads_list:
            set_threads(threads)
            fns = base.fns(threads)
            for v, pm in packed.items():
                fns[f"lowbit-{v}"] = lambda pm=pm: pm(x)
            timing = time_interleaved(fns, max_rounds=100, budget_s=budget_s, turns=TURNS)
            del fns
            gc.collect()
            for k, t in timing.items():
                row = {"part": "deep-mlp", "threads": threads, "batch": 1, "method": k,
                       "median_ms": t["median_s"] * 1e3, "min_ms": t["min_s"] * 1e3, "rounds": t["rounds"]}
                if k.startswith("lowbit-"):
                    row["describe"] = next(iter(packed[k[7:]].packed_layers().values())).describe()
                rows.append(row)
            for k, why in base.missing.items():
                rows.append({"part": "deep-mlp", "threads": threads, "method": k, "why": why})
            log.info("deep MLP, %d thread(s) done", threads)
        del base
    if len(threads_list) > 1:
        rows += thread_group(packed, x, budget_s, "deep-mlp-threads")
    return rows


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _best(rows: list[dict], names: tuple[str, ...]) -> tuple[str, float] | None:
    got = [(r["method"], r["median_ms"]) for r in rows if r["method"] in names and "median_ms" in r]
    return min(got, key=lambda t: t[1]) if got else None


def targets(rows: list[dict]) -> list[dict]:
    """Every batch-1 target of the brief: measured value, threshold, met."""
    out: list[dict] = []
    mlp = [r for r in rows if r["part"] == "deep-mlp"]
    for th in sorted({r["threads"] for r in mlp}):
        g = [r for r in mlp if r["threads"] == th]
        fp = _best(g, ("torch-fp32", "ort-fp32"))
        i8 = _best(g, ("torch-dyn-int8", "ort-dyn-int8", "ort-qdq-int8"))
        for r in g:
            if not r["method"].startswith("lowbit-") or "median_ms" not in r:
                continue
            v = r["method"][7:]
            want_fp, want_i8 = TARGETS[v[:2]]
            for base, want, what in ((fp, want_fp, "best FP32"), (i8, want_i8, "best int8")):
                if base is None:
                    continue
                ratio = base[1] / r["median_ms"]
                out.append({"target": f"deep MLP batch 1, {v}: >= {want:g}x {what} ({base[0]})",
                            "threads": th, "value": round(ratio, 2), "unit": "x", "met": ratio >= want})
    mt = [r for r in rows if r["part"] == "deep-mlp-threads"]
    for v in sorted({r["method"] for r in mt}):
        t = {r["threads"]: r["median_ms"] for r in mt if r["method"] == v}
        if 1 in t and 2 in t:
            out.append({"target": f"deep MLP batch 1, {v[7:]}: 2 threads not slower than 1", "threads": 2,
                        "value": round(t[1] / t[2], 2), "unit": "x (1-thread ms / 2-thread ms)",
                        "met": t[2] <= SAME * t[1]})
    lay = [r for r in rows if r["part"] == "layer" and "median_ms" in r]
    for r in lay:
        if r["method"] == "lowbit-ternary" and r["N"] == 2048 and r["threads"] == 1:
            out.append({"target": "one 2048^2 ternary GEMV, batch 1, 1 thread: <= 0.06 ms (whole call)",
                        "threads": 1, "value": round(r["median_ms"], 4), "unit": "ms",
                        "met": r["median_ms"] <= TARGET_GEMV_MS})
    lt = [r for r in rows if r["part"] == "layer-threads"]
    for N in sorted({r["N"] for r in lt}):
        for w in LAYER_WEIGHTS:
            t = {r["threads"]: r["median_ms"] for r in lt if r["N"] == N and r["method"] == f"lowbit-{w}"}
            if 1 in t and 2 in t:
                out.append({"target": f"layer {N}^2 {w}: 2 threads not slower than 1", "threads": 2,
                            "value": round(t[1] / t[2], 2), "unit": "x (1-thread ms / 2-thread ms)",
                            "met": t[2] <= SAME * t[1]})
    return out


def to_markdown(rows: list[dict], tg: list[dict], meta: dict) -> str:
    m = meta.get("machine_info", {})
    lines = [
        "# Batch-1 Linear speed: the packed GEMV vs FP32 / int8 baselines",
        "",
        f"Machine: {m.get('cpu')} ({m.get('logical_cpus')} logical CPUs; SIMD "
        f"{', '.join(m.get('simd', []))}); load average at start {' '.join(m.get('loadavg', []))}, at end "
        f"{' '.join(meta.get('loadavg_end', []))}.",
        f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; single run (one process, interleaved "
        "rounds; ratios within the run).",
        "",
        "Times are medians over interleaved rounds (min in brackets), ms, "
        + ("each method timed in turns as a user's loop runs it (settle, 2 ms of untimed calls, the "
           "timed call)" if meta.get("turns", False) else "one call per method per round (caches cold: the "
           "other methods ran between two calls of one)") + ". `lowbit` is the whole call of the",
        "compiled layer on a float tensor; `kernel` the GEMV alone on NumPy arrays. Activations: 8-bit PACT",
        "codes. bitnet.cpp's figure is published, for another CPU: " + BITNET_SOURCE + ".",
        "",
        "## Per layer (batch 1)",
        "",
    ]
    lay = [r for r in rows if r["part"] == "layer" and "median_ms" in r]
    methods = [*BASELINES, *(f"lowbit-{w}" for w in LAYER_WEIGHTS)]
    methods += [f"lowbit-kernel-{w}" for w in LAYER_WEIGHTS]
    present = [mm for mm in methods if any(r["method"] == mm for r in lay)]
    lines.append("| N | threads | " + " | ".join(present) + " | bitnet.cpp I2_S (published) |")
    lines.append("|---:|---:|" + "---:|" * len(present) + "---:|")
    for N in sorted({r["N"] for r in lay}):
        for th in sorted({r["threads"] for r in lay if r["N"] == N}):
            cells = []
            for mm in present:
                r = next((r for r in lay if r["N"] == N and r["threads"] == th and r["method"] == mm), None)
                cells.append("" if r is None else f"{r['median_ms']:.4f} ({r['min_ms']:.4f})")
            bit = f"{BITNET_2048_MS}" if (N == 2048 and th == 1) else ""
            lines.append(f"| {N} | {th} | " + " | ".join(cells) + f" | {bit} |")
    lines += ["", "Speed-up of the whole lowbit call over the best FP32 and the best int8 baseline of the",
              "same row:", "", "| N | threads | weights | lowbit ms | x best FP32 | x best int8 |",
              "|---:|---:|---|---:|---:|---:|"]
    for N in sorted({r["N"] for r in lay}):
        for th in sorted({r["threads"] for r in lay if r["N"] == N}):
            g = [r for r in lay if r["N"] == N and r["threads"] == th]
            fp = _best(g, ("torch-fp32", "ort-fp32"))
            i8 = _best(g, ("torch-dyn-int8", "ort-dyn-int8", "ort-qdq-int8"))
            for w in LAYER_WEIGHTS:
                r = next((r for r in g if r["method"] == f"lowbit-{w}"), None)
                if r is None:
                    continue
                lines.append(f"| {N} | {th} | {w} | {r['median_ms']:.4f} | {fp[1] / r['median_ms']:.1f}x "
                             f"({fp[0]}) | {i8[1] / r['median_ms']:.1f}x ({i8[0]}) |")
    mlp = [r for r in rows if r["part"] == "deep-mlp" and "median_ms" in r]
    if mlp:
        lines += ["", "## Deep MLP: 8 x Linear 4096x4096, batch 1", "",
                  "| threads | method | median ms | min ms | x best FP32 | x best int8 |",
                  "|---:|---|---:|---:|---:|---:|"]
        for th in sorted({r["threads"] for r in mlp}):
            g = [r for r in mlp if r["threads"] == th]
            fp = _best(g, ("torch-fp32", "ort-fp32"))
            i8 = _best(g, ("torch-dyn-int8", "ort-dyn-int8", "ort-qdq-int8"))
            for r in g:
                lines.append(f"| {th} | {r['method']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | "
                             f"{fp[1] / r['median_ms']:.2f}x | {i8[1] / r['median_ms']:.2f}x |")
        kinds = sorted({r["describe"] for r in mlp if "describe" in r})
        lines += ["", "Packed layers: " + "; ".join(kinds) + "."]
        pairs = [(th, r, t) for th in sorted({r["threads"] for r in mlp})
                 for r in mlp if r["threads"] == th and r["method"].endswith(NO_TQ1)
                 for t in mlp if t["threads"] == th and t["method"] == r["method"].removesuffix(NO_TQ1)]
        if pairs:
            lines += ["", "Ternary at 1.6 bits against its 2-bit fields, same model, same interleaved group "
                      "(2-bit ms / 1.6-bit ms; > 1: 1.6 bits faster): " + "; ".join(
                          f"{t['method'][7:]} {th} thread(s) {r['median_ms'] / t['median_ms']:.2f}x median "
                          f"({r['min_ms'] / t['min_ms']:.2f}x min)" for th, r, t in pairs) + "."]
    th_rows = [r for r in rows if r["part"] in ("layer-threads", "deep-mlp-threads")]
    if th_rows:
        lines += ["", "## 1 vs 2 threads, side by side (one interleaved group per model, no baseline in it)",
                  "",
                  "| model | method | 1 thread ms | 2 threads ms | 1t / 2t |", "|---|---|---:|---:|---:|"]
        for part in ("layer-threads", "deep-mlp-threads"):
            g = [r for r in th_rows if r["part"] == part]
            for key in sorted({(r.get("N", 0), r["method"]) for r in g}):
                t = {r["threads"]: r["median_ms"] for r in g if (r.get("N", 0), r["method"]) == key}
                model = f"Linear {key[0]}^2" if part == "layer-threads" else "deep MLP"
                if 1 in t and 2 in t:
                    lines.append(f"| {model} | {key[1]} | {t[1]:.4f} | {t[2]:.4f} | {t[1] / t[2]:.2f} |")
    missing = [r for r in rows if "why" in r]
    if missing:
        lines += ["", "Baselines not measured: " + "; ".join(f"{r['method']} ({r['why']})" for r in missing)]
    lines += ["", "## Targets (issue 13, batch 1)", "", "| target | threads | measured | met |",
              "|---|---:|---:|---|"]
    for t in tg:
        met = "yes" if t["met"] else "NO"
        lines.append(f"| {t['target']} | {t['threads']} | {t['value']} {t['unit']} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-mlp", action="store_true", help="skip the deep MLP part")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer part")
    p.add_argument("--mlp-variants", nargs="+", default=list(MLP_VARIANTS), choices=list(MLP_VARIANTS))
    p.add_argument("--budget", type=float, default=6.0, help="seconds of timed rounds per group")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="gemv", help="results file name (default gemv: gemv.json, gemv.md)")
    p.add_argument("--cold", action="store_true",
                   help="one call per method per round (caches cold) instead of warm turns")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    global TURNS
    TURNS = not a.cold
    t0 = time.time()
    info = machine_info()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as td:
        if not a.no_layers:
            rows += layer_part(a.sizes, a.threads, a.budget, Path(td))
        if not a.no_mlp:
            rows += mlp_part(a.threads, a.budget, Path(td), tuple(a.mlp_variants))
    tg = targets(rows)
    # seed 0: the deep MLP and every interleaved round's order; each layer of size N draws with N as seed
    seeds = sorted({0, *([] if a.no_layers else a.sizes)})
    meta = run_meta(__file__, argv, t0, seeds=seeds, machine_info=info,
                    loadavg_end=machine_info().get("loadavg"), bitnet_source=BITNET_SOURCE, turns=TURNS,
                    variants={v: VARIANTS[v.removesuffix(NO_TQ1)][2] + (" (2-bit fields, no 1.6-bit form)"
                                                                       if v.endswith(NO_TQ1) else "")
                              for v in MLP_VARIANTS},
                    layer_weights={"binary": VARIANTS["w1a8"][2], "ternary": VARIANTS["w2a8"][2],
                                   "ternary-2bit": VARIANTS["w2a8"][2] + " (2-bit fields, no 1.6-bit form)",
                                   "2bit": "DoReFa 2-bit weights x 8-bit PACT activations",
                                   "4bit": VARIANTS["w4a8"][2]})
    write_results(a.out, a.name, {"meta": meta, "rows": rows, "targets": tg}, to_markdown(rows, tg, meta))
    for t in tg:
        print(f"{'met' if t['met'] else 'NOT'} {t['target']} [{t['threads']} thr]: {t['value']} {t['unit']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
