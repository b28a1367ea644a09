"""Speed benchmark harness: lowbit's packed runtime against FP32 PyTorch, PyTorch dynamic int8
and onnxruntime dynamic int8, measured side by side in one process (not part of the library: it
ships with the source checkout).

``run_speed_benchmark`` is what ``benchmarks/speed/bench_speed.py`` and ``lowbit bench speed``
call. For every model and batch size the baselines and the lowbit variants are timed in
interleaved rounds (one call of each per round, in a new random order each round), so that a
change of machine load hits all of them alike; the median over rounds is reported, with the
minimum.

Baselines:

- ``fp32``: the float model in PyTorch (``torch.inference_mode``).
- ``torch-dyn-int8``: ``torch.ao.quantization.quantize_dynamic`` on the float model. It
  quantizes ``nn.Linear`` only (int8 weights, activations quantized per batch at run time);
  convolutions stay FP32.
- ``ort-int8``: ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights) of the float
  model exported with ``torch.onnx.export``; Conv and MatMul/Gemm become integer ops.
- ``lowbit-<w>``: ``lowbit.runtime.compile`` of the model quantized with binary / TWN ternary /
  DoReFa 4-bit weights and 4-bit PACT activations on every layer (first and last included).

Weights are random (speed does not depend on training); BatchNorm statistics are randomised so
that folding is exercised.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import platform
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit._io import atomic_write

log = logging.getLogger(__name__)

MODELS: dict[str, dict[str, Any]] = {
    "mlp": {"build": ("mlp", {"hidden": (4096, 4096)}), "input": (1, 28, 28),
            "label": "MLP 784-4096-4096-10"},
    "lenet5": {"build": ("lenet5", {}), "input": (1, 28, 28), "label": "LeNet-5 (28x28)"},
    "resnet20": {"build": ("resnet20", {}), "input": (3, 32, 32), "label": "ResNet-20 (CIFAR 32x32)"},
}

WEIGHTS: dict[str, dict[str, Any]] = {
    "binary": {"method": "binary", "bits": 1},
    "ternary": {"method": "twn", "bits": 2},
    "4bit": {"method": "dorefa", "bits": 4},
}
ACTIVATION = {"method": "pact", "bits": 4, "alpha_init": 3.0}
_LAST_INFO: dict[str, Any] = {}


# ----------------------------------------------------------------------------------------------
# machine / timing helpers
# ----------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["simd"] = [f for f in ("avx2", "avx512f", "avx512_vpopcntdq", "avx512_vnni", "avx_vnni")
                                if f in flags]
                break
    for mod in ("numpy", "numba", "onnx", "onnxruntime"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    try:
        import numba

        info["numba_threads"] = numba.get_num_threads()
        info["numba_threading_layer"] = os.environ.get("NUMBA_THREADING_LAYER", "default")
    except Exception:
        pass
    with contextlib.suppress(OSError):
        info["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    return info


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Median / min / p90 seconds of each callable, timed in interleaved rounds.

    Each round runs the methods in a new (seeded) random order: a method pays for what the one
    before it left behind (cold caches; with several threads, another runtime's threads still
    spinning), measurably at batch 1 (ResNet-20 after the FP32 model: ~0.2 ms on one thread), so
    a fixed order would charge it to whichever method follows the baselines."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        order = keys[:]
        rng.shuffle(order)
        for k in order:
            f = fns[k]
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {
        k: {"median_s": statistics.median(v), "min_s": min(v), "p90_s": float(np.percentile(v, 90)),
            "repeats": len(v)}
        for k, v in times.items()
    }


# ----------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_((torch.rand(m.num_features, generator=g) - 0.5) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def float_weight_bytes(model: nn.Module) -> int:
    return sum(4 * p.numel() for p in model.parameters())


def torch_dynamic_int8(model: nn.Module) -> tuple[nn.Module, int]:
    """quantize_dynamic (Linear only) and its weight bytes (int8 Linear weights, fp32 rest)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    nbytes = 0
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, nn.Linear) and name == "weight":
                nbytes += p.numel() + 8  # int8 + per-tensor scale / zero point
            else:
                nbytes += 4 * p.numel()
    return q, nbytes


def ort_int8(model: nn.Module, example: torch.Tensor, threads: int, workdir: Path):
    """(run(x) -> y, quantized ONNX bytes) or raises when onnx / onnxruntime are missing."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path = workdir / "model_fp32.onnx"
    q_path = workdir / "model_int8.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(fp32_path), dynamo=False, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17,
        )
        ort_log = logging.getLogger()
        level = ort_log.level
        ort_log.setLevel(logging.ERROR)
        try:
            quantize_dynamic(str(fp32_path), str(q_path), weight_type=QuantType.QInt8)
        finally:
            ort_log.setLevel(level)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(q_path), so, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {"x": x})[0]

    return run, q_path.stat().st_size


def quantized_model(model: nn.Module, weight: dict[str, Any]) -> nn.Module:
    import lowbit

    q = copy.deepcopy(model)
    lowbit.quantize(q, {"default": {"weight": weight, "activation": ACTIVATION}})
    return q.eval()


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------


def run_speed_benchmark(
    models: Sequence[str] = ("mlp", "lenet5", "resnet20"),
    batches: Sequence[int] = (1, 32, 256),
    repeats: int = 15,
    out_dir: str | os.PathLike | None = None,
    weights: Sequence[str] = ("binary", "ternary", "4bit"),
    threads: int | Sequence[int] = 2,
    baselines: Sequence[str] = ("fp32", "torch-dyn-int8", "ort-int8"),
    seed: int = 0,
    command: str | None = None,
    quick: bool = False,
) -> list[dict[str, Any]]:
    """Time every model x batch x method; write ``speed.json`` / ``speed.md`` into ``out_dir``
    (when given) and return the rows.

    ``repeats`` interleaved rounds per (model, batch), fewer (at least 3) at batch >= 256.
    ``quick``: batches 1 and 32, 5 rounds, binary weights only (about a minute).
    ``threads``: torch / numba / onnxruntime threads; a sequence runs the whole benchmark once
    per value (rows carry ``threads``).
    """
    if not isinstance(threads, int):
        rows_all: list[dict[str, Any]] = []
        info_all: dict[str, Any] = {}
        load_start = machine_info().get("loadavg")
        t0 = time.perf_counter()
        for th in threads:
            rows_all += run_speed_benchmark(
                models, batches, repeats, None, weights, int(th), baselines, seed, command, quick
            )
            info_all = _LAST_INFO.copy()
        if out_dir is not None:
            info_all["threads"] = list(threads)
            info_all["loadavg"] = load_start
            info_all["loadavg_end"] = machine_info().get("loadavg")
            info_all["total_s"] = time.perf_counter() - t0
            write_results(rows_all, info_all, Path(out_dir), command)
        return rows_all
    from lowbit.models import build_model

    if quick:
        batches = tuple(b for b in batches if b <= 32) or (1,)
        repeats = min(repeats, 5)
        weights = tuple(weights[:1])
    if command is None:
        command = "lowbit bench speed" + (" --quick" if quick else "")

    from lowbit.runtime import compile as rt_compile

    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except Exception:
        pass
    info = machine_info()
    info["threads"] = threads
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for mname in models:
        spec = MODELS[mname]
        torch.manual_seed(seed)
        name, kw = spec["build"]
        fmodel = build_model(name, **kw).eval()
        _randomize_bn(fmodel, seed)
        shape = spec["input"]
        qmodels = {w: quantized_model(fmodel, WEIGHTS[w]) for w in weights}
        dyn, dyn_bytes = torch_dynamic_int8(fmodel) if "torch-dyn-int8" in baselines else (None, 0)
        ort_run, ort_bytes = None, 0
        with tempfile.TemporaryDirectory() as td:
            if "ort-int8" in baselines:
                try:
                    ort_run, ort_bytes = ort_int8(fmodel, torch.rand(1, *shape), threads, Path(td))
                except Exception as e:
                    log.warning("onnxruntime baseline unavailable: %s", e)
            for batch in batches:
                g = torch.Generator().manual_seed(seed + batch)
                x = torch.rand(batch, *shape, generator=g)
                xn = x.numpy()
                fns: dict[str, Callable[[], Any]] = {}
                meta: dict[str, dict[str, Any]] = {}
                if "fp32" in baselines:
                    fns["fp32"] = lambda m=fmodel, x=x: _infer(m, x)
                    meta["fp32"] = {"weight_bytes": float_weight_bytes(fmodel), "note": "PyTorch FP32"}
                if dyn is not None:
                    fns["torch-dyn-int8"] = lambda d=dyn, x=x: _infer(d, x)
                    meta["torch-dyn-int8"] = {"weight_bytes": dyn_bytes,
                                              "note": "quantize_dynamic: Linear int8, conv FP32"}
                if ort_run is not None:
                    fns["ort-int8"] = lambda r=ort_run, xn=xn: r(xn)
                    meta["ort-int8"] = {"weight_bytes": ort_bytes,
                                        "note": "onnxruntime quantize_dynamic QInt8 (file size)"}
                for w, qm in qmodels.items():
                    tc = time.perf_counter()
                    packed = rt_compile(qm, x)
                    compile_s = time.perf_counter() - tc
                    key = f"lowbit-{w}"
                    fns[key] = lambda p=packed, x=x: p(x)
                    meta[key] = {
                        "weight_bytes": packed.weight_bytes(),
                        "note": f"{WEIGHTS[w]['method']} w{WEIGHTS[w]['bits']} x pact a4, all layers packed"
                        if all(r.kind == "packed" for r in packed.layers)
                        else f"{sum(r.kind == 'packed' for r in packed.layers)}/{len(packed.layers)} packed",
                        "max_rel_diff_vs_fakequant": packed.max_rel_diff,
                        "max_rel_diff_vs_fakequant_fp64": _rel_diff_fp64(qm, packed, x),
                        "compile_s": compile_s,
                        "batch_chunk": packed.batch_chunk,
                    }
                reps = repeats if batch < 256 else max(3, repeats // 3)
                timing = time_interleaved(fns, reps)
                base = timing.get("fp32", {}).get("median_s")
                for k, tm in timing.items():
                    row = {
                        "threads": threads,
                        "model": mname,
                        "model_label": spec["label"],
                        "batch": batch,
                        "method": k,
                        "median_ms": tm["median_s"] * 1e3,
                        "min_ms": tm["min_s"] * 1e3,
                        "p90_ms": tm["p90_s"] * 1e3,
                        "repeats": tm["repeats"],
                        "throughput_per_s": batch / tm["median_s"],
                        "speedup_vs_fp32": (base / tm["median_s"]) if base else None,
                        **meta[k],
                    }
                    rows.append(row)
                log.info("speed: %s batch %d threads %d done (%.0fs elapsed)", mname, batch, threads,
                         time.perf_counter() - t_start)
    info["loadavg_end"] = machine_info().get("loadavg")
    info["total_s"] = time.perf_counter() - t_start
    _LAST_INFO.clear()
    _LAST_INFO.update(info)
    if out_dir is not None:
        write_results(rows, info, Path(out_dir), command)
    return rows


def _rel_diff_fp64(qmodel: nn.Module, packed: nn.Module, x: torch.Tensor) -> float:
    """Largest relative difference of the packed output to the fake-quantized model run in float64
    (``compiler.reference_fp64``: the integer arithmetic the packed kernels do exactly)."""
    from lowbit.runtime.compiler import reference_fp64

    ref = reference_fp64(qmodel, x)
    got = packed(x).double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _infer(model: nn.Module, x: torch.Tensor) -> Any:
    with torch.inference_mode():
        return model(x)


def to_markdown(rows: list[dict[str, Any]], info: dict[str, Any], command: str | None = None) -> str:
    lines = [
        "# Speed: lowbit packed runtime vs FP32 / int8 baselines",
        "",
        f"Machine: {info.get('cpu')} ({info.get('logical_cpus')} logical CPUs, "
        f"SIMD: {', '.join(info.get('simd', [])) or 'n/a'}); threads per run: "
        f"{info.get('threads', info.get('torch_threads'))} (torch, numba and onnxruntime intra-op alike).",
        f"Versions: python {info.get('python')}, torch {info.get('torch')}, numpy {info.get('numpy')}, "
        f"numba {info.get('numba')}, onnx {info.get('onnx')}, onnxruntime {info.get('onnxruntime')}.",
        f"Load average at start / end: {' '.join(info.get('loadavg', []))} / "
        f"{' '.join(info.get('loadavg_end') or [])}; total time {info.get('total_s', 0):.0f} s.",
    ]
    if command:
        lines.append(f"Command: `{command}`")
    lines += [
        "",
        "Latency is the median over interleaved rounds (all methods of one model and batch take turns, in",
        "a new random order each round), min is the best round; speed-up is FP32 median / method",
        "median. Weight bytes: packed bit planes + float32 per-channel scale and bias (lowbit;",
        "the int8 kernels also keep one int8 byte per weight in memory), int8 Linear weights (torch",
        "dynamic), the quantized .onnx file (onnxruntime), float32 parameters (FP32).",
        "",
        "| threads | model | batch | method | median ms | min ms | throughput /s | speed-up vs FP32 |"
        " weight bytes |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sp = r["speedup_vs_fp32"]
        lines.append(
            f"| {r['threads']} | {r['model_label']} | {r['batch']} | {r['method']} | {r['median_ms']:.3f} | "
            f"{r['min_ms']:.3f} | "
            f"{r['throughput_per_s']:.1f} | {'' if sp is None else f'{sp:.2f}x'} | {r['weight_bytes']:,} |"
        )
    notes = sorted({f"{r['method']}: {r['note']}" for r in rows})
    lines += ["", "Methods:", ""] + [f"- {n}" for n in notes]
    diffs = [r for r in rows if r.get("max_rel_diff_vs_fakequant") is not None]
    if diffs:
        worst = max(diffs, key=lambda r: r["max_rel_diff_vs_fakequant"])
        lines += [
            "",
            f"Exactness check (on the benchmark batch): largest relative output difference to the "
            f"fake-quantized PyTorch model in float32 {worst['max_rel_diff_vs_fakequant']:.2e} "
            f"({worst['model']}, batch {worst['batch']}, {worst['method']})",
        ]
        d64 = [r for r in diffs if r.get("max_rel_diff_vs_fakequant_fp64") is not None]
        if d64:
            w64 = max(d64, key=lambda r: r["max_rel_diff_vs_fakequant_fp64"])
            lines[-1] += (
                f"; to the same model run in float64 {w64['max_rel_diff_vs_fakequant_fp64']:.2e} "
                f"({w64['model']}, batch {w64['batch']}, {w64['method']}). The float32 model can put a "
                "value that lies within float32 rounding of an activation quantizer's rounding boundary on "
                "the neighbouring code (its convolutions round, the packed integer sums do not); the "
                "float64 run shows that the packed model computes the quantized network exactly."
            )
        else:
            lines[-1] += "."
    return "\n".join(lines) + "\n"


def write_results(
    rows: list[dict[str, Any]], info: dict[str, Any], out_dir: Path, command: str | None
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "command": command, "rows": rows}
    atomic_write(out_dir / "speed.json", (json.dumps(payload, indent=1, default=float) + "\n").encode())
    atomic_write(out_dir / "speed.md", to_markdown(rows, info, command).encode())

