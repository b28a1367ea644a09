"""Speed benchmark of lowbit's packed CPU runtime against FP32 PyTorch, PyTorch dynamic int8 and
onnxruntime int8 (see README.md beside this file).

    python benchmarks/speed/bench_speed.py                     # full run, 2 threads, ~3 minutes
    python benchmarks/speed/bench_speed.py --threads 1 2       # 1 then 2 threads, ~5 minutes
    python benchmarks/speed/bench_speed.py --quick             # batches 1 and 32, binary only
    python benchmarks/speed/bench_speed.py --models mlp --batches 1 32 --repeats 30

Writes benchmarks/results/speed.md and speed.json. The logic lives in ``harness.py`` beside this
file (``run_speed_benchmark``; ``lowbit bench speed`` runs it from a source checkout).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import MODELS, WEIGHTS
from harness import run_speed_benchmark as _run

RESULTS = Path(__file__).resolve().parents[1] / "results"


def run_speed_benchmark(
    models=("mlp", "lenet5", "resnet20"),
    batches=(1, 32, 256),
    repeats: int = 15,
    out_dir=RESULTS,
    **kwargs: Any,
) -> list[dict]:
    """Same as :func:`harness.run_speed_benchmark`, results in benchmarks/results."""
    return _run(models=models, batches=batches, repeats=repeats, out_dir=out_dir, **kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=list(WEIGHTS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, nargs="+", default=[2],
                   help="threads for every engine; several values run the benchmark once per value")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cmd = "python benchmarks/speed/bench_speed.py " + " ".join(shlex.quote(s) for s in (argv or sys.argv[1:]))
    rows = _run(
        models=a.models, batches=a.batches, repeats=a.repeats, out_dir=a.out, weights=a.weights,
        threads=a.threads[0] if len(a.threads) == 1 else a.threads, command=cmd.strip(), quick=a.quick,
    )
    for r in rows:
        sp = r["speedup_vs_fp32"]
        print(f"t={r['threads']} {r['model']:<9} b={r['batch']:<4} {r['method']:<15} "
              f"{r['median_ms']:10.3f} ms  {'' if sp is None else f'{sp:6.2f}x'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
