"""Conv-net speed of lowbit's packed runtime against the strongest FP32 and int8 baselines.

    python benchmarks/speed/bench_conv.py                       # full run, ~5-10 minutes
    python benchmarks/speed/bench_conv.py --quick               # batches 1 and 8, few rounds

LeNet-5 (28x28) and ResNet-20 (CIFAR 32x32, option-A shortcuts) from ``lowbit.models`` at batches
1/8/32/256, with 1 and 2 threads (torch, onnxruntime and the runtime alike). Methods:

- ``torch-fp32``: the float model in PyTorch; ``ort-fp32``: the same exported to ONNX, run by
  onnxruntime (MLAS); best FP32 = the faster of the two (per model, batch and thread count);
- ``torch-dyn-int8``: ``quantize_dynamic`` (Linear layers int8; convolutions stay FP32);
  ``ort-qdq-int8``: onnxruntime ``quantize_static`` in QDQ format (per-channel int8 weights,
  uint8 activations calibrated on random inputs; convolutions run as integer ops); best int8 =
  the faster of the two;
- ``lowbit-<w>``: ``lowbit.runtime.compile`` of the model with binary / TWN ternary / DoReFa
  4-bit weights and 4-bit PACT activations on every layer (first and last included).

All methods of one (threads, model, batch) are timed in interleaved rounds (one call each per
round, in a new random order), so machine load hits them alike; medians over rounds, min beside.
A second table times lowbit with 1 and 2 threads interleaved (the thread-scaling target).
Weight bytes: ``file`` is what is stored (packed planes + float32 per-channel scale/bias for
lowbit, float32 parameters, int8 Linear weights, the .onnx file); ``memory`` adds every runtime
copy (lowbit's int8 expansions of the weights for the VNNI and AMX kernels).

Writes benchmarks/results/conv.md and conv.json. Reusable pieces (for other speed benchmarks):
:func:`build_methods` (every method for one model as callables), :func:`time_interleaved`,
:func:`ort_session`, :func:`ort_static_int8`, :func:`lowbit_memory_bytes`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results

import lowbit
from lowbit.models import build_model
from lowbit.runtime import compile as rt_compile

log = logging.getLogger("bench_conv")
RESULTS = Path(__file__).resolve().parents[1] / "results"
MODELS = {"lenet5": ("LeNet-5 (28x28)", (1, 28, 28)), "resnet20": ("ResNet-20 (CIFAR 32x32)", (3, 32, 32))}
WEIGHTS = {
    "binary": {"method": "binary", "bits": 1},
    "ternary": {"method": "twn", "bits": 2},
    "4bit": {"method": "dorefa", "bits": 4},
}
ACTIVATION = {"method": "pact", "bits": 4, "alpha_init": 3.0}
FP32 = ("torch-fp32", "ort-fp32")
INT8 = ("torch-dyn-int8", "ort-qdq-int8")


def time_interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Median / min seconds of each callable over ``rounds`` interleaved rounds (2 warm-up rounds;
    each round runs every callable once, in a new seeded random order)."""
    for _ in range(2):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(keys)
        for k in keys:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: {"median_s": statistics.median(v), "min_s": min(v)} for k, v in times.items()}


def _randomize_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_((torch.rand(m.num_features, generator=g) - 0.5) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _export_onnx(model: nn.Module, shape: tuple[int, ...], path: Path) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.rand(1, *shape),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            opset_version=17,
        )


def ort_session(path: Path, threads: int):
    """An onnxruntime CPU session with ``threads`` intra-op threads (one inter-op thread)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_static_int8(fp32_path: Path, out_path: Path, shape: tuple[int, ...], seed: int = 0) -> Path:
    """QDQ static int8 quantization of an ONNX model (per-channel int8 weights, uint8 activations,
    MinMax calibration on 8 random inputs of per-sample ``shape``)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            g = np.random.default_rng(seed)
            self._it = iter([{"x": g.random((1, *shape), dtype=np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self._it, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(fp32_path),
                str(out_path),
                _Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
    finally:
        root.setLevel(level)
    return out_path


def lowbit_memory_bytes(packed) -> int:
    """Bytes of every weight copy a compiled model holds: the packed planes and per-channel floats
    (``weight_bytes``), the int8 expansion of the VNNI kernels, and the flat executor's programs
    (int8 weights for VNNI and AMX, float64 epilogue coefficients)."""
    total = packed.weight_bytes()
    for m in packed.packed_layers().values():
        if m.i8 is not None:
            total += m.i8.nbytes
    ex = getattr(packed, "executor", None)
    if ex is not None:
        for prog in ex._programs.values():
            if prog is not None:
                total += prog.w8.nbytes + prog.sc.nbytes
    return total


def build_methods(
    name: str, threads: int, workdir: Path, seed: int = 0, weights: tuple[str, ...] = tuple(WEIGHTS)
) -> tuple[dict[str, Any], dict[str, dict]]:
    """Every method for model ``name`` as ``runner(x: Tensor) -> output``, with its metadata
    (weight bytes, notes). The lowbit runners are compiled on a batch of 2."""
    torch.manual_seed(seed)
    shape = MODELS[name][1]
    fm = build_model(name).eval()
    _randomize_bn(fm, seed)
    fp32_bytes = sum(4 * p.numel() for p in fm.parameters())
    runners: dict[str, Any] = {}
    meta: dict[str, dict] = {}

    def infer(m):
        def run(x):
            with torch.inference_mode():
                return m(x)

        return run

    runners["torch-fp32"] = infer(fm)
    meta["torch-fp32"] = {"file_bytes": fp32_bytes, "memory_bytes": fp32_bytes, "note": "PyTorch FP32"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fm), {nn.Linear}, dtype=torch.qint8)
    dyn_bytes = sum(
        (p.numel() + 8) if isinstance(m, nn.Linear) and n == "weight" else 4 * p.numel()
        for m in fm.modules()
        for n, p in m.named_parameters(recurse=False)
    )
    runners["torch-dyn-int8"] = infer(dyn)
    meta["torch-dyn-int8"] = {
        "file_bytes": dyn_bytes,
        "memory_bytes": dyn_bytes,
        "note": "quantize_dynamic: Linear int8, convolutions FP32",
    }
    fp32_path = workdir / f"{name}_fp32.onnx"
    _export_onnx(fm, shape, fp32_path)
    q_path = ort_static_int8(fp32_path, workdir / f"{name}_qdq.onnx", shape, seed)
    for key, path, note in (
        ("ort-fp32", fp32_path, "onnxruntime FP32 (MLAS)"),
        ("ort-qdq-int8", q_path, "onnxruntime quantize_static QDQ, per-channel int8"),
    ):
        sess = ort_session(path, threads)
        runners[key] = lambda x, s=sess: s.run(None, {"x": x.numpy()})[0]
        size = path.stat().st_size
        meta[key] = {"file_bytes": size, "memory_bytes": size, "note": note}
    for w in weights:
        q = lowbit.quantize(
            copy.deepcopy(fm), {"default": {"weight": WEIGHTS[w], "activation": ACTIVATION}}
        ).eval()
        x2 = torch.rand(2, *shape, generator=torch.Generator().manual_seed(seed))
        packed = rt_compile(q, x2)
        key = f"lowbit-{w}"
        runners[key] = packed
        meta[key] = {
            "file_bytes": packed.weight_bytes(),
            "note": f"{WEIGHTS[w]['method']} w{WEIGHTS[w]['bits']} "
            f"x pact a4, {sum(r.kind == 'packed' for r in packed.layers)}/{len(packed.layers)} packed",
            "qmodel": q,
        }
    return runners, meta


def _rel_fp64(qmodel: nn.Module, packed, x: torch.Tensor) -> float:
    from lowbit.runtime.compiler import reference_fp64

    ref = reference_fp64(qmodel, x)
    return float((packed(x).double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _set_threads(n: int) -> None:
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _rounds(batch: int, quick: bool) -> int:
    r = 60 if batch == 1 else 25 if batch <= 8 else 12 if batch <= 32 else 4
    return max(3, r // 4) if quick else r


def run(models, batches, threads, weights, quick: bool, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rows: list[dict] = []
    scaling: list[dict] = []
    with tempfile.TemporaryDirectory() as td:
        for th in threads:
            _set_threads(th)
            for name in models:
                runners, meta = build_methods(name, th, Path(td), seed, weights)
                shape = MODELS[name][1]
                for batch in batches:
                    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed + batch))
                    fns = {k: (lambda r=r, x=x: r(x)) for k, r in runners.items()}
                    timing = time_interleaved(fns, _rounds(batch, quick), seed)
                    best_fp32 = min(timing[k]["median_s"] for k in FP32)
                    best_int8 = min(timing[k]["median_s"] for k in INT8)
                    best_fp32_min = min(timing[k]["min_s"] for k in FP32)
                    for k, tm in timing.items():
                        m = {kk: v for kk, v in meta[k].items() if kk != "qmodel"}
                        if k.startswith("lowbit-"):
                            m["memory_bytes"] = lowbit_memory_bytes(runners[k])
                            if batch <= 8:
                                m["max_rel_diff_fp64"] = _rel_fp64(meta[k]["qmodel"], runners[k], x)
                            m["flat"] = (
                                runners[k].executor is not None
                                and runners[k].executor.program(tuple(shape)) is not None
                            )
                        rows.append(
                            {
                                "threads": th,
                                "model": name,
                                "batch": batch,
                                "method": k,
                                "median_ms": tm["median_s"] * 1e3,
                                "min_ms": tm["min_s"] * 1e3,
                                "throughput_per_s": batch / tm["median_s"],
                                "vs_best_fp32": best_fp32 / tm["median_s"],
                                "vs_best_int8": best_int8 / tm["median_s"],
                                "vs_best_fp32_min": best_fp32_min / tm["min_s"],
                                **m,
                            }
                        )
                    log.info(
                        "threads %d %s batch %d: %s",
                        th,
                        name,
                        batch,
                        "  ".join(f"{k} {tm['median_s'] * 1e3:.3f}" for k, tm in timing.items()),
                    )
        # thread scaling of the runtime: 1 and 2 threads interleaved in one loop
        if max(threads) > 1:
            for name in models:
                runners, _ = build_methods(name, 1, Path(td), seed, weights)
                shape = MODELS[name][1]
                for batch in batches:
                    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed + batch))
                    fns = {}
                    for w in weights:
                        p = runners[f"lowbit-{w}"]
                        for th in (1, 2):
                            fns[f"{w}@{th}"] = lambda p=p, th=th, x=x: (numba.set_num_threads(th), p(x))
                    timing = time_interleaved(fns, _rounds(batch, quick), seed)
                    for w in weights:
                        t1, t2 = timing[f"{w}@1"], timing[f"{w}@2"]
                        scaling.append(
                            {
                                "model": name,
                                "batch": batch,
                                "weights": w,
                                "median_ms_1t": t1["median_s"] * 1e3,
                                "median_ms_2t": t2["median_s"] * 1e3,
                                "speedup_2t": t1["median_s"] / t2["median_s"],
                                "speedup_2t_min": t1["min_s"] / t2["min_s"],
                            }
                        )
                    log.info("scaling %s batch %d done", name, batch)
            numba.set_num_threads(1)
    return rows, scaling


def _targets(rows: list[dict], scaling: list[dict]) -> list[str]:
    """The issue's conv-net targets, each with the measured value."""

    def worst_lowbit(th, model, batch):
        rs = [
            r
            for r in rows
            if r["threads"] == th
            and r["model"] == model
            and r["batch"] == batch
            and r["method"].startswith("lowbit-")
        ]
        return min(rs, key=lambda r: r["vs_best_fp32"]) if rs else None

    out = ["| target | threads | medians (worst lowbit weights) | mins | met (medians) |",
           "|---|---:|---|---|---|"]
    for model, batch, goal in (("resnet20", 1, 4.0), ("resnet20", 32, 5.0), ("lenet5", 1, 3.0)):
        for th in sorted({r["threads"] for r in rows}):
            w = worst_lowbit(th, model, batch)
            if w is None:
                continue
            met = "yes" if w["vs_best_fp32"] >= goal else "no"
            out.append(f"| {MODELS[model][0]} batch {batch} >= {goal:g}x best FP32 | {th} | "
                       f"{w['vs_best_fp32']:.2f}x ({w['method']}) | {w['vs_best_fp32_min']:.2f}x | {met} |")
    for s in scaling:
        if s["batch"] == 1 or s["batch"] >= 8:
            goal, what = (1.7, ">= 1.7x") if s["batch"] >= 8 else (0.95, "not slower (5% noise)")
            label = f"{MODELS[s['model']][0]} batch {s['batch']} {s['weights']}"
            out.append(f"| 2 threads {what}: {label} | 1/2 | "
                       f"{s['speedup_2t']:.2f}x | {s['speedup_2t_min']:.2f}x | "
                       f"{'yes' if s['speedup_2t'] >= goal else 'no'} |")
    return out


def to_markdown(rows: list[dict], scaling: list[dict], meta: dict) -> str:
    m = meta.get("machine", {})
    lines = [
        "# Conv nets: lowbit packed runtime vs best FP32 and best int8",
        "",
        f"Command: `{meta['command']}`; machine: {m.get('cpu', '?')}, "
        f"{m.get('logical_cpus', m.get('cpus', '?'))} logical CPUs; "
        f"load average at start {meta.get('loadavg_start')}, at end {meta.get('loadavg_end')}; "
        f"wall time {meta.get('wall_time_s')} s; seed {meta.get('seeds')}.",
        f"Runtime kernels: AMX {'on' if meta.get('amx') else 'off'}, AVX-512 VNNI "
        f"{'on' if meta.get('vnni') else 'off'}.",
        "",
        "Interleaved rounds (every method of one row group once per round, random order); median and min "
        "over rounds. `vs best FP32` = the faster of torch-fp32 / ort-fp32 divided by the method's median; "
        "`vs best int8` likewise with torch-dyn-int8 / ort-qdq-int8. Weight bytes: stored (`file`) and "
        "every in-memory copy (`memory`: lowbit's int8 expansions for the VNNI / AMX kernels included). "
        "`mins` in the targets table: the same ratio on the fastest round of each method (the machine is "
        "shared by many processes; the minimum is the least disturbed call).",
        "",
        "## Targets",
        "",
        *_targets(rows, scaling),
        "",
        "## Latency",
        "",
        "| threads | model | batch | method | median ms | min ms | images/s | vs best FP32 | vs best int8 "
        "| weight bytes file | weight bytes memory |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['threads']} | {MODELS[r['model']][0]} | {r['batch']} | {r['method']} | "
            f"{r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['throughput_per_s']:.0f} | "
            f"{r['vs_best_fp32']:.2f}x | {r['vs_best_int8']:.2f}x | {r['file_bytes']:,} | "
            f"{r['memory_bytes']:,} |"
        )
    if scaling:
        lines += [
            "",
            "## Threads (lowbit, 1 and 2 threads interleaved in one loop)",
            "",
            "| model | batch | weights | 1 thread ms | 2 threads ms | speed-up | speed-up (mins) |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        for s in scaling:
            lines.append(
                f"| {MODELS[s['model']][0]} | {s['batch']} | {s['weights']} | {s['median_ms_1t']:.3f} | "
                f"{s['median_ms_2t']:.3f} | {s['speedup_2t']:.2f}x | {s['speedup_2t_min']:.2f}x |"
            )
    notes = sorted({f"{r['method']}: {r['note']}" for r in rows})
    lines += ["", "Methods:", ""] + [f"- {n}" for n in notes]
    d = [r["max_rel_diff_fp64"] for r in rows if "max_rel_diff_fp64" in r]
    if d:
        lines += [
            "",
            "Exactness: largest relative difference of a lowbit output to the fake-quantized model "
            f"run in float64 (batches <= 8): {max(d):.1e}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=list(WEIGHTS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 256])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--quick", action="store_true", help="batches 1 and 8, a quarter of the rounds")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--stem", default="conv")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    load0 = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    batches = [b for b in a.batches if b <= 8] if a.quick else a.batches
    rows, scaling = run(a.models, batches, a.threads, tuple(a.weights), a.quick)
    from lowbit.runtime import _amx
    from lowbit.runtime import kernels as K

    meta = run_meta(
        __file__,
        argv,
        t0,
        seeds=[0],
        amx=_amx.amx_enabled(),
        vnni=bool(K.HAS_VNNI),
        loadavg_start=" ".join(load0 or []),
        loadavg_end=" ".join(Path("/proc/loadavg").read_text().split()[:3]),
    )
    md = to_markdown(rows, scaling, meta)
    write_results(a.out, a.stem, {"meta": meta, "rows": rows, "scaling": scaling}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
