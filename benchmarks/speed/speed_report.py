"""What the speed benchmark derives from its timed rows: the best FP32 and best int8 baseline of
every (case, batch, threads), the speed-ups over them, the issue-13 targets with met / not met,
the Markdown report and the plot. Pure functions of the rows (tested on constructed rows)."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FP32_METHODS = ("torch-fp32", "ort-fp32")
INT8_METHODS = ("torch-dyn-int8", "ort-dyn-int8", "ort-qdq-int8")
BITNET_GEMV_MS = 0.058  # bitnet.cpp I2_S, 2048x2048 ternary GEMV, 1 thread (EPYC 7V13, published)


def family(method: str) -> str:
    """'fp32', 'int8' or 'lowbit' for a method name."""
    if method in FP32_METHODS:
        return "fp32"
    if method in INT8_METHODS:
        return "int8"
    if method.startswith("lowbit-"):
        return "lowbit"
    raise ValueError(
        f"unknown method {method!r}; allowed: {', '.join(FP32_METHODS + INT8_METHODS)} or lowbit-*"
    )


def _key(r: dict[str, Any]) -> tuple:
    return (r["model"], r["batch"], r["threads"])


def best_baselines(rows: Iterable[dict[str, Any]]) -> dict[tuple, dict[str, tuple[str, float]]]:
    """``{(model, batch, threads): {"fp32": (method, median_ms), "int8": (method, median_ms)}}``: the
    fastest (lowest median) baseline of each family among the rows timed side by side."""
    best: dict[tuple, dict[str, tuple[str, float]]] = defaultdict(dict)
    for r in rows:
        fam = family(r["method"])
        if fam == "lowbit" or r.get("median_ms") is None:
            continue
        cur = best[_key(r)].get(fam)
        if cur is None or r["median_ms"] < cur[1]:
            best[_key(r)][fam] = (r["method"], r["median_ms"])
    return dict(best)


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``best_fp32``/``best_int8`` (method names), ``speedup_vs_torch_fp32``,
    ``speedup_vs_best_fp32`` and ``speedup_vs_best_int8`` (baseline median / row median) on every
    row, in place; a ratio whose baseline was not timed is None. Returns ``rows``."""
    best = best_baselines(rows)
    torch_fp32 = {_key(r): r["median_ms"] for r in rows if r["method"] == "torch-fp32"}
    for r in rows:
        b = best.get(_key(r), {})
        t = r["median_ms"]
        for fam in ("fp32", "int8"):
            m = b.get(fam)
            r[f"best_{fam}"] = m[0] if m else None
            r[f"speedup_vs_best_{fam}"] = m[1] / t if m else None
        base = torch_fp32.get(_key(r))
        r["speedup_vs_torch_fp32"] = base / t if base else None
    return rows


# ----------------------------------------------------------------------------------------------
# targets (issue 13)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One target: ``metric`` of every row of ``model`` x ``variants`` x ``batches`` must be
    ``>= threshold`` (``<=`` for the GEMV time). ``per_threads``: one result per thread count."""

    text: str
    model: str | tuple[str, ...]
    variants: tuple[str, ...]
    batches: tuple[int, ...]
    metric: str  # speedup_vs_best_fp32 | speedup_vs_best_int8 | speedup_vs_torch_fp32 | threads_*
    threshold: float
    per_threads: bool = True


TRANSFORMERS = ("bert256", "bert512")
TARGETS: tuple[Target, ...] = (
    Target(
        "MLP 8x4096^2, batch 1: binary >= 25x best FP32",
        "mlp",
        ("w1a8", "w1a4"),
        (1,),
        "speedup_vs_best_fp32",
        25.0,
    ),
    Target(
        "MLP 8x4096^2, batch 1: ternary >= 14x best FP32",
        "mlp",
        ("w2a8", "w2a4"),
        (1,),
        "speedup_vs_best_fp32",
        14.0,
    ),
    Target(
        "MLP 8x4096^2, batch 1: 4-bit >= 7x best FP32",
        "mlp",
        ("w4a8", "w4a4"),
        (1,),
        "speedup_vs_best_fp32",
        7.0,
    ),
    Target(
        "MLP 8x4096^2, batch 1: binary and ternary >= 2.5x best int8",
        "mlp",
        ("w1a8", "w1a4", "w2a8", "w2a4"),
        (1,),
        "speedup_vs_best_int8",
        2.5,
    ),
    Target(
        "MLP 8x4096^2, batch 1: 4-bit >= 1.3x best int8",
        "mlp",
        ("w4a8", "w4a4"),
        (1,),
        "speedup_vs_best_int8",
        1.3,
    ),
    Target(
        "MLP 8x4096^2, batch 8-256: binary/ternary W, <= 4-bit A >= 1.3x best int8",
        "mlp",
        ("w1a4", "w2a4", "w1a1"),
        (8, 64, 256),
        "speedup_vs_best_int8",
        1.3,
    ),
    Target(
        "MLP 8x4096^2, batch 8-256: W1A1 >= 2.5x best int8",
        "mlp",
        ("w1a1",),
        (8, 64, 256),
        "speedup_vs_best_int8",
        2.5,
    ),
    Target(
        "2 threads >= 1.7x the 1-thread throughput at batch >= 8 (every case, every lowbit variant)",
        (),
        (),
        (8, 32, 64, 256),
        "threads_scaling",
        1.7,
        per_threads=False,
    ),
    Target(
        "2 threads never slower than 1 thread at batch 1 (every case, every lowbit variant)",
        (),
        (),
        (1,),
        "threads_scaling",
        1.0,
        per_threads=False,
    ),
    Target(
        "ResNet-20, batch 1: >= 4x best FP32",
        "resnet20",
        ("w1a4", "w2a4", "w4a4"),
        (1,),
        "speedup_vs_best_fp32",
        4.0,
    ),
    Target(
        "ResNet-20, batch 32: >= 5x best FP32",
        "resnet20",
        ("w1a4", "w2a4", "w4a4"),
        (32,),
        "speedup_vs_best_fp32",
        5.0,
    ),
    Target(
        "LeNet-5, batch 1: >= 3x best FP32",
        "lenet5",
        ("w1a4", "w2a4", "w4a4"),
        (1,),
        "speedup_vs_best_fp32",
        3.0,
    ),
    Target(
        "transformer encoder, batch 1: never slower than float PyTorch",
        TRANSFORMERS,
        ("w1a8s", "w2a8s"),
        (1,),
        "speedup_vs_torch_fp32",
        1.0,
    ),
    Target(
        "transformer encoder, hidden >= 512, batch 1: >= 2x float PyTorch",
        "bert512",
        ("w1a8s", "w2a8s"),
        (1,),
        "speedup_vs_torch_fp32",
        2.0,
    ),
)
GEMV_TARGET_TEXT = "one 2048^2 ternary GEMV, batch 1, 1 thread: <= 0.06 ms (bitnet.cpp I2_S: 0.058 ms)"
GEMV_TARGET_MS = 0.06


def _fmt_x(v: float) -> str:
    return f"{v:.2f}x"


def _result(
    text: str,
    threads: Any,
    threshold: float,
    values: list[tuple[str, float]],
    higher: bool = True,
    unit: str = "x",
) -> dict[str, Any]:
    """A target's row: the worst value, met when every value meets the threshold."""
    if not values:
        return {
            "target": text,
            "threads": threads,
            "threshold": threshold,
            "measured": None,
            "met": None,
            "details": "not measured",
        }
    worst = min(values, key=lambda kv: kv[1]) if higher else max(values, key=lambda kv: kv[1])
    ok = all((v >= threshold) if higher else (v <= threshold) for _, v in values)
    fmt = _fmt_x if unit == "x" else (lambda v: f"{v:.4f} ms")
    return {
        "target": text,
        "threads": threads,
        "threshold": threshold,
        "measured": worst[1],
        "worst": worst[0],
        "met": ok,
        "details": _details(values, fmt),
        "values": dict(values),
    }


def _details(values: list[tuple[str, float]], fmt: Callable[[float], str]) -> str:
    """Every value, or, for many values named ``case/...``, each case's range and its worst."""
    if len(values) <= 8 or not all("/" in k for k, _ in values):
        return "; ".join(f"{k} {fmt(v)}" for k, v in values)
    groups: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for k, v in values:
        groups[k.split("/", 1)[0]].append((k.split("/", 1)[1], v))
    parts = []
    for g, kv in groups.items():
        lo, hi = min(kv, key=lambda t: t[1]), max(kv, key=lambda t: t[1])
        parts.append(f"{g}: {fmt(lo[1])} ({lo[0]}) .. {fmt(hi[1])} ({hi[0]})")
    return "; ".join(parts)


def thread_scaling(rows: Sequence[dict[str, Any]], batches: Sequence[int]) -> list[tuple[str, float]]:
    """``(model/method b<batch>, throughput at 2 threads / at 1 thread)`` for every lowbit row
    timed at both thread counts."""
    t1 = {
        (r["model"], r["method"], r["batch"]): r["median_ms"]
        for r in rows
        if r["threads"] == 1 and family(r["method"]) == "lowbit"
    }
    out = []
    for r in rows:
        k = (r["model"], r["method"], r["batch"])
        if r["threads"] == 2 and k in t1 and r["batch"] in batches:
            out.append(
                (f"{r['model']}/{r['method'].removeprefix('lowbit-')} b{r['batch']}", t1[k] / r["median_ms"])
            )
    return out


def evaluate_targets(
    rows: Sequence[dict[str, Any]], gemv: dict[str, Any] | None = None, targets: Sequence[Target] = TARGETS
) -> list[dict[str, Any]]:
    """Every target of issue 13 with its measured (worst) value and met / not met / not measured
    (``met`` True / False / None). ``rows`` must carry the ratios of :func:`add_ratios`."""
    out: list[dict[str, Any]] = []
    thread_counts = sorted({r["threads"] for r in rows}) or [1]
    for t in targets:
        if t.metric == "threads_scaling":
            # throughput ratio = 1-thread time / 2-thread time ("never slower": >= 1)
            vals = thread_scaling(rows, t.batches)
            out.append(_result(t.text, "1 vs 2", t.threshold, vals))
            continue
        models = (t.model,) if isinstance(t.model, str) else t.model
        for th in thread_counts if t.per_threads else [thread_counts[0]]:
            vals = []
            for r in rows:
                variant = r["method"].removeprefix("lowbit-")
                if (
                    r["model"] in models
                    and r["threads"] == th
                    and r["batch"] in t.batches
                    and r["method"].startswith("lowbit-")
                    and variant in t.variants
                    and r.get(t.metric) is not None
                ):
                    name = variant + (f" b{r['batch']}" if len(t.batches) > 1 else "")
                    name = (f"{r['model']}/" if len(models) > 1 else "") + name
                    vals.append((name, r[t.metric]))
            out.append(_result(t.text, th, t.threshold, vals))
    g = gemv or {}
    vals = [(g.get("source", "gemv.json"), g["ms"])] if g.get("ms") is not None else []
    res = _result(GEMV_TARGET_TEXT, 1, GEMV_TARGET_MS, vals, higher=False, unit="ms")
    if not vals:
        res["details"] = g.get("why", "not measured")
    out.append(res)
    return out


def read_gemv(path: Path) -> dict[str, Any]:
    """The 2048x2048 ternary GEMV time (batch 1, one thread, the whole packed layer call) from
    ``benchmarks/speed/bench_gemv.py``'s JSON: its row ``part == "layer"``, ``method ==
    "lowbit-ternary"``, ``N == K == 2048``. ``{"ms", "source", "path"}``, or ``{"why"}`` when the
    file or the row is absent."""
    if not path.is_file():
        return {"why": f"not measured ({path.name} absent)"}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"why": f"not measured ({path.name} unreadable: {e})"}
    rows = data.get("rows", []) if isinstance(data, dict) else []
    for r in rows if isinstance(rows, list) else []:
        if (
            isinstance(r, dict)
            and r.get("part") == "layer"
            and r.get("method") == "lowbit-ternary"
            and r.get("N") == 2048
            and r.get("K", 2048) == 2048
            and r.get("batch", 1) == 1
            and r.get("threads") == 1
            and isinstance(r.get("median_ms"), int | float)
        ):
            return {
                "ms": float(r["median_ms"]),
                "source": "layer 2048x2048 lowbit-ternary, 1 thread",
                "path": _shown(path),
            }
    return {"why": f"not measured (no 2048x2048 lowbit-ternary layer row at 1 thread in {path.name})"}


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (results files name no machine paths)."""
    root = Path(__file__).resolve().parents[2]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def _b(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def _status(met: bool | None) -> str:
    return "not measured" if met is None else "**met**" if met else "not met"


def targets_markdown(targets: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| target | threads | measured (worst) | met | every value |",
        "|---|---|---:|---|---|",
    ]
    for t in targets:
        m = t["measured"]
        ms = "–" if m is None else (f"{m:.4f} ms" if "GEMV" in t["target"] else f"{m:.2f}x")
        if m is not None and t.get("worst"):
            ms += f" ({t['worst']})"
        lines.append(f"| {t['target']} | {t['threads']} | {ms} | {_status(t['met'])} | {t['details']} |")
    return lines


def case_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| threads | batch | method | median ms | min ms | throughput /s | vs PyTorch FP32 | vs best FP32 |"
        " vs best int8 | weight bytes | in memory | rel. diff to fp64 |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d = r.get("max_rel_diff_vs_fakequant_fp64")
        best = ""
        if r["method"] == r.get("best_fp32"):
            best = " (best FP32)"
        elif r["method"] == r.get("best_int8"):
            best = " (best int8)"
        cells = [
            r["threads"],
            r["batch"],
            r["method"] + best,
            f"{r['median_ms']:.3f}",
            f"{r['min_ms']:.3f}",
            f"{r['throughput_per_s']:.0f}",
            _x(r["speedup_vs_torch_fp32"]),
            _x(r["speedup_vs_best_fp32"]),
            _x(r["speedup_vs_best_int8"]),
            _b(r.get("weight_bytes")),
            _b(r.get("weight_bytes_in_memory")),
            "–" if d is None else f"{d:.1e}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def to_markdown(payload: dict[str, Any]) -> str:
    rows, info, meta = payload["rows"], payload.get("machine_info", {}), payload.get("meta", {})
    cases = payload.get("cases", {})
    git = meta.get("git") or {}
    lines = [
        "# Speed: lowbit packed runtime vs the best FP32 and best int8 baselines",
        "",
        f"Machine: {info.get('cpu')} ({info.get('logical_cpus')} logical CPUs; SIMD: "
        f"{', '.join(info.get('simd', [])) or 'n/a'}). Versions: torch {info.get('torch')}, numpy "
        f"{info.get('numpy')}, numba {info.get('numba')}, onnx {info.get('onnx')}, onnxruntime "
        f"{info.get('onnxruntime')}, transformers {info.get('transformers')}; git "
        f"{git.get('commit', '?')}{' (dirty tree)' if git.get('dirty') else ''}.",
        f"Load average at start / end: {' '.join(info.get('loadavg') or [])} / "
        f"{' '.join(info.get('loadavg_end') or [])}; total time {payload.get('total_s', 0):.0f} s; "
        f"seed {payload.get('seed')}"
        + ("; **quick mode** (smaller models, few rounds)" if payload.get("quick") else "")
        + ".",
        f"Command: `{meta.get('command', '')}`",
        "",
        "Method: for every case, batch and thread count all methods are timed in interleaved rounds (each",
        "method takes one turn per round, in a new random order each round, after warm-up calls; numba",
        "JIT and `lowbit.runtime.compile` happen before), median and best round reported; the number of",
        "rounds adapts to the time budget of a block (at least 3). A turn is timed as a user's loop would",
        "run the method alone: first, if other threads of the process are running, a settle (untimed calls",
        "of the method until those threads have stopped, checked every 4 ms, at most 0.3 s: onnxruntime's",
        "intra-op pool spins about one core for 30-45 ms after a 2-thread call, PyTorch's OpenMP workers a",
        "few ms, and on 2 cores a spinning thread slows the next method's call, `threads_contamination.md`;",
        "no sleep: after a sleep the core ran the next calls slowly for a while, `turn_warmup.md`,",
        "`ab_settle.md`), then untimed calls for 2 ms (at least one; warm caches; each runtime keeps its",
        "default spinning for its own next call), then the timed call. Speed-ups are ratios of medians of",
        "the same block: **best FP32** = the faster of PyTorch and onnxruntime FP32, **best int8** = the",
        "fastest of PyTorch dynamic int8, onnxruntime dynamic int8 and onnxruntime static QDQ int8",
        "(per-channel weights, MinMax calibration), per row. Weight bytes: what the format stores",
        "(packed bit planes + float32 per-channel scale and bias for lowbit; int8 weights + float32 rest",
        "for PyTorch int8; the",
        ".onnx file for onnxruntime; float32 parameters for PyTorch FP32). **In memory** (lowbit): every",
        "array the packed model holds, including the int8-expanded weights of its int8 kernels",
        "(`.i8`) and any other runtime copy; for onnxruntime not measured (it prepacks internally).",
        "Rel. diff to fp64: largest |packed - reference| / max |reference| over the timed batch (its",
        "first 64 samples at batch 256, computed within the whole batch), the",
        "reference being the fake-quantized model run in float64 with the codes decoded exactly",
        "(`lowbit.runtime.compiler.reference_fp64`), i.e. the integer arithmetic the kernels claim to do.",
        "",
        "## Targets (issue 13)",
        "",
        *targets_markdown(payload.get("targets", [])),
        "",
    ]
    gemv = payload.get("gemv") or {}
    if gemv.get("ms") is not None:
        lines += [
            f"The GEMV row is read from `{gemv.get('path', 'gemv.json')}` ({gemv.get('source')}); "
            f"bitnet.cpp's published I2_S figure is {BITNET_GEMV_MS} ms.",
            "",
        ]
    lines += ["## Variants", ""]
    for name, v in payload.get("variants", {}).items():
        lines.append(f"- `lowbit-{name}`: {v}")
    lines += [
        "- `torch-fp32`: the float model in PyTorch eager, `torch.inference_mode`",
        "- `ort-fp32`: `torch.onnx.export` (TorchScript exporter, opset 17), onnxruntime CPU, all graph "
        "optimizations",
        "- `torch-dyn-int8`: `torch.ao.quantization.quantize_dynamic` (Linear only: convolutions FP32)",
        "- `ort-dyn-int8`: onnxruntime `quantize_dynamic` (QInt8 weights)",
        "- `ort-qdq-int8`: onnxruntime `quantize_static`, QDQ format, per-channel QInt8 weights, QUInt8 "
        "activations, MinMax calibration on random inputs (after `quant_pre_process` for .onnx files up to "
        "64 MB)",
        "",
    ]
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_case[r["model"]].append(r)
    for model, rs in by_case.items():
        c = cases.get(model, {})
        lines += [f"## {rs[0]['model_label']}", ""]
        if c.get("kernels"):
            lines += ["Packed layers: " + "; ".join(f"`{k}`: {v}" for k, v in c["kernels"].items()), ""]
        if c.get("setup_s") is not None:
            lines += [
                f"Setup (build, quantize, compile, export, calibrate, float64 references): "
                f"{c['setup_s']:.0f} s ({c.get('setup_cpu_s', 0):.0f} s CPU); whole case "
                f"{c.get('total_s', 0):.0f} s ({c.get('total_cpu_s', 0):.0f} s CPU).",
                "",
            ]
        rs = sorted(rs, key=lambda r: (r["threads"], r["batch"], _order(r["method"])))
        lines += [*case_markdown(rs), ""]
    return "\n".join(lines) + "\n"


def _order(method: str) -> tuple[int, str]:
    fam = family(method)
    return ({"fp32": 0, "int8": 1, "lowbit": 2}[fam], method)


# ----------------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------------


def plot(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """speed-up over best FP32 (top) and best int8 (bottom) per case (column) and batch (x), one
    line per lowbit variant, solid 1 thread, dashed 2 threads. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib missing: no plot")
        return False
    lows = [r for r in rows if family(r["method"]) == "lowbit"]
    models = list(dict.fromkeys(r["model"] for r in lows))
    if not models:
        return False
    fig, axes = plt.subplots(2, len(models), figsize=(3.4 * len(models), 6.4), squeeze=False)
    for j, m in enumerate(models):
        rs = [r for r in lows if r["model"] == m]
        batches = sorted({r["batch"] for r in rs})
        methods = sorted({r["method"] for r in rs})
        for i, metric in enumerate(("speedup_vs_best_fp32", "speedup_vs_best_int8")):
            ax = axes[i][j]
            for meth, th in sorted({(r["method"], r["threads"]) for r in rs}):
                pts = sorted(
                    (batches.index(r["batch"]), r[metric])
                    for r in rs
                    if r["method"] == meth and r["threads"] == th and r.get(metric)
                )
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True),
                        marker="o",
                        ms=3,
                        ls="-" if th == 1 else "--",
                        color=f"C{methods.index(meth) % 10}",
                        label=f"{meth.removeprefix('lowbit-')} t{th}",
                    )
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log")
            ax.set_xticks(range(len(batches)), [str(b) for b in batches])
            ax.set_xlabel("batch")
            if j == 0:
                ax.set_ylabel("speed-up vs best " + ("FP32" if i == 0 else "int8"))
            if i == 0:
                ax.set_title(rs[0]["model_label"].split(",")[0], fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if i == 1:
                ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True
