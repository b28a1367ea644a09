"""Speed benchmark of lowbit's packed CPU runtime against the best FP32 (PyTorch, onnxruntime) and
the best int8 (PyTorch dynamic, onnxruntime dynamic and static QDQ) baselines, with the targets of
issue 13 evaluated on the measured rows (see README.md beside this file).

    python benchmarks/speed/bench_speed.py --threads 1 2        # the full run (<= 8 min on an idle machine)
    python benchmarks/speed/bench_speed.py --quick              # small models, seconds (tests)
    python benchmarks/speed/bench_speed.py --cases mlp --batches 1 8 --threads 1
    python benchmarks/speed/bench_speed.py --threads 1 2 --resume   # after a killed run

Writes benchmarks/results/speed.{json,md,png}. The logic lives in ``harness.py`` (running and
timing) and ``speed_report.py`` (best baselines, targets, Markdown, plot) beside this file;
``lowbit bench speed`` runs :func:`run_speed_benchmark` from a source checkout.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import CASES, QUICK_CASES, RESULTS, VARIANTS
from harness import run_speed_benchmark as _run


def run_speed_benchmark(out_dir=RESULTS, quick: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Same as :func:`harness.run_speed_benchmark`, results in benchmarks/results by default."""
    return _run(out_dir=out_dir, quick=quick, **kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cases",
        nargs="+",
        choices=list(CASES) + [c for c in QUICK_CASES if c not in CASES],
        help="default: every case (--quick: every quick case)",
    )
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="restrict the lowbit variants")
    p.add_argument("--batches", nargs="+", type=int, help="restrict each case's batch sizes")
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="thread counts (torch, numba, onnxruntime alike), each timed per case and batch",
    )
    p.add_argument("--repeats", type=int, default=15, help="at most this many rounds per block")
    p.add_argument("--block-s", type=float, default=3.0, help="time budget of one block (sets the rounds)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--gemv-json", help="the GEMV benchmark's results (default: gemv.json beside --out)")
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--resume", action="store_true", help="reuse the cases a killed run with the same settings did"
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = sys.argv[1:] if argv is None else argv
    cmd = " ".join(["python benchmarks/speed/bench_speed.py", *(shlex.quote(s) for s in args)])
    payload = _run(
        cases=a.cases,
        threads=a.threads,
        batches=a.batches,
        variants=a.variants,
        repeats=a.repeats,
        block_s=a.block_s,
        out_dir=a.out,
        quick=a.quick,
        resume=a.resume,
        seed=a.seed,
        command=cmd,
        gemv_json=a.gemv_json,
    )
    for t in payload["targets"]:
        met = "not measured" if t["met"] is None else "met" if t["met"] else "NOT met"
        print(f"{met:>12}  t={t['threads']}  {t['target']}: {t['details']}")
    print(f"wrote {a.out}/speed.md ({payload['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
