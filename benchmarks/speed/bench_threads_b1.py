"""Batch 1 on 1 and 2 threads: the packed model's thread policy for small calls.

    python benchmarks/speed/bench_threads_b1.py                       # bert256, bert512; w1a8s, w2a8s
    python benchmarks/speed/bench_threads_b1.py --cases bert256 --rounds 10
    python benchmarks/speed/bench_threads_b1.py --cases mlp lenet5 resnet20 --variants w1a4 w2a4

A packed model called on one sample of at most ``runtime.compiler.SERIAL_MAX_NUMEL`` input values
runs on the calling thread (PyTorch intra-op threads 1, runtime kernels unsplit). This measures,
for the cases of ``bench_speed.py`` (``harness.CASES``: BERT by default; same variants, seed 0):

- group ``policy``: the packed model on 1 thread and on 2 threads (policy on), and float PyTorch
  on 1 thread, interleaved (``harness.time_interleaved``: a new random order each round);
- group ``no policy``: the packed model on 2 threads with the policy off (``serial_numel = 0``),
  float PyTorch on 2 threads and the packed model on 1 thread, interleaved; kept apart from the
  first group because PyTorch's 2-thread OpenMP workers keep spinning after each call and slow
  whatever runs next.

Ratios are medians of the same group. The 2-core machine is shared (load average recorded):
single run. Writes benchmarks/results/threads_b1.{json,md} through ``benchmarks/common.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numba
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import CASES, bert_rows_main, in_ms, make_inputs, quantized_model, time_interleaved  # noqa: E402

from lowbit.runtime import compile as rt_compile  # noqa: E402


def _call(model: Any, x: torch.Tensor, threads: int, serial: int | None = None):
    def f() -> None:
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        if serial is not None:
            model.serial_numel = serial
        with torch.inference_mode():
            model(x)

    return f


def measure(case: str, variant: str, rounds: int) -> dict[str, Any]:
    c = CASES[case]
    torch.manual_seed(0)
    fm = c.build().eval()
    x = make_inputs(c, 1, 0)
    packed = rt_compile(quantized_model(fm, variant), x)
    on = packed.serial_numel
    groups = {
        "policy": {"lowbit 1t": _call(packed, x, 1, on), "lowbit 2t": _call(packed, x, 2, on),
                   "torch-fp32 1t": _call(fm, x, 1)},
        "no policy": {"lowbit 2t": _call(packed, x, 2, 0), "torch-fp32 2t": _call(fm, x, 2),
                      "lowbit 1t": _call(packed, x, 1, on)},
    }
    out: dict[str, Any] = {"case": case, "variant": variant}
    for g, fns in groups.items():
        out[g] = in_ms(time_interleaved(fns, rounds, budget_s=60.0, min_rounds=rounds))
    p = {k: v["median_ms"] for k, v in out["policy"].items()}
    q = {k: v["median_ms"] for k, v in out["no policy"].items()}
    out["ratios"] = {
        "lowbit 2t / 1t speed (policy)": p["lowbit 1t"] / p["lowbit 2t"],
        "lowbit 2t / 1t speed (no policy)": q["lowbit 1t"] / q["lowbit 2t"],
        "lowbit 1t vs torch-fp32 1t": p["torch-fp32 1t"] / p["lowbit 1t"],
        "lowbit 2t vs torch-fp32 1t (policy)": p["torch-fp32 1t"] / p["lowbit 2t"],
        "lowbit 2t vs torch-fp32 2t (no policy)": q["torch-fp32 2t"] / q["lowbit 2t"],
    }
    print(case, variant, {k: round(v, 2) for k, v in out["ratios"].items()}, flush=True)
    return out


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Batch 1 on 1 and 2 threads: the packed model's thread policy",
        "",
        f"Command: `{meta['command']}`; git {meta['git'].get('commit', '?')}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; load average at start / end: "
        f"{meta['load_start']} / {meta['load_end']}; single run (shared 2-core machine).",
        "",
        "Medians (ms) of interleaved rounds; each group timed on its own (see the script's docstring).",
        "Policy: one sample of at most `SERIAL_MAX_NUMEL` input values runs on one thread.",
        "",
        "| case | variant | lowbit 1t | lowbit 2t (policy) | torch-fp32 1t | 2t/1t speed (policy) "
        "| lowbit 2t no policy | torch-fp32 2t | 2t/1t speed (no policy) | lowbit 1t vs torch-fp32 1t |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p, q, x = r["policy"], r["no policy"], r["ratios"]
        lines.append(
            f"| {r['case']} | {r['variant']} | {p['lowbit 1t']['median_ms']:.2f} "
            f"| {p['lowbit 2t']['median_ms']:.2f} "
            f"| {p['torch-fp32 1t']['median_ms']:.2f} | {x['lowbit 2t / 1t speed (policy)']:.2f}x "
            f"| {q['lowbit 2t']['median_ms']:.2f} | {q['torch-fp32 2t']['median_ms']:.2f} "
            f"| {x['lowbit 2t / 1t speed (no policy)']:.2f}x | {x['lowbit 1t vs torch-fp32 1t']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    bert_rows_main(__file__, "threads_b1", measure, to_markdown, argv)


if __name__ == "__main__":
    main()
