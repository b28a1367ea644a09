"""Cost of quantization-aware training: one training step (forward, backward, optimizer step)
of a quantized model against the same float model, timed side by side in one run.

    python benchmarks/speed/bench_train_step.py [--quick] [--threads 2] [--out benchmarks/results]

Steps of the float and quantized models are interleaved (A, B, A, B, ...) so that machine noise
hits both alike; the table reports the median step time of each and the ratio of medians.
Writes ``train_step.md`` and ``train_step.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import lowbit
from lowbit.models import build_model

RECIPES: dict[str, dict[str, Any]] = {
    "W1A4 binary+PACT": {"default": {"weight": {"method": "binary", "bits": 1},
                                     "activation": {"method": "pact", "bits": 4}}},
    "W2A4 DoReFa": {"default": {"weight": {"method": "dorefa", "bits": 2},
                                "activation": {"method": "dorefa", "bits": 4}}},
    "W4A4 LSQ": {"default": {"weight": {"method": "lsq", "bits": 4},
                             "activation": {"method": "lsq", "bits": 4}}},
    "W2 ternary (TWN), A32": {"default": {"weight": {"method": "twn", "bits": 2}}},
}

MODELS = {
    "resnet20": ({"num_classes": 10}, (3, 32, 32)),
    "lenet5": ({"num_classes": 10}, (1, 28, 28)),
}


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def time_pair(step_a, step_b, repeats: int, warmup: int = 3) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        step_a()
        step_b()
    ta, tb = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        step_a()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        step_b()
        tb.append(time.perf_counter() - t)
    return ta, tb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    repeats = 5 if a.quick else 20
    rows = []
    for mname, (kw, shape) in MODELS.items():
        torch.manual_seed(0)
        x = torch.randn(a.batch, *shape)
        y = torch.randint(0, 10, (a.batch,))
        for rname, recipe in RECIPES.items():
            fp = build_model(mname, **kw)
            q = build_model(mname, **kw)
            q.load_state_dict(fp.state_dict())
            lowbit.quantize(q, recipe)
            ta, tb = time_pair(make_step(fp, x, y), make_step(q, x, y), repeats)
            mf, mq = statistics.median(ta), statistics.median(tb)
            rows.append({"model": mname, "recipe": rname, "batch": a.batch, "fp32_ms": 1e3 * mf,
                         "qat_ms": 1e3 * mq, "ratio": mq / mf, "repeats": repeats})
            print(f"{mname:9s} {rname:24s} fp32 {1e3 * mf:8.1f} ms  qat {1e3 * mq:8.1f} ms  "
                  f"ratio {mq / mf:.2f}", flush=True)
    meta = {"command": "python benchmarks/speed/bench_train_step.py " + " ".join(argv or sys.argv[1:]),
            "torch": torch.__version__, "threads": a.threads, "machine": platform.processor(),
            "note": "all layers quantized (first and last included); SGD momentum step"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = ["# Quantization-aware training step cost vs FP32", "",
          f"Command: `{meta['command']}` — torch {meta['torch']}, {a.threads} thread(s), batch {a.batch}, "
          f"median of {repeats} interleaved steps each. {meta['note']}.", "",
          "| model | recipe | FP32 step (ms) | QAT step (ms) | QAT / FP32 |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['recipe']} | {r['fp32_ms']:.1f} | {r['qat_ms']:.1f} | {r['ratio']:.2f}x |")
    (out / "train_step.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
