"""SlackFit against every fixed sub-net (and max-accuracy) under constant, bursty and ramping load.

    python benchmarks/serve/serve_load.py            # ~12 min; needs runs/serve/lenet5x2.supernet
    python benchmarks/serve/serve_load.py --duration 4 --policies slackfit fixed:w1.0-b8

The supernet is the one ``benchmarks/serve/train_supernet.py`` writes (its sub-nets' test
accuracies are recorded in the file). For each policy a fresh ``lowbit serve`` process (one
inference thread) is started on a free loopback port and every trace is replayed against it by the
open-loop load generator; see :mod:`lowbit.serve.bench`. Writes ``benchmarks/results/serve.{json,md,png}``.

Defaults are sized for a busy 2-core machine: 16 samples per request (so the network, not HTTP
parsing, is a large part of each request's cost), 25 requests/s on average, a 200 ms SLO.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from lowbit.serve import load_supernet
from lowbit.serve.bench import run_serve_bench, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--supernet", default="runs/serve/lenet5x2.supernet")
    p.add_argument("--policies", nargs="+", default=["slackfit", "max-accuracy", "fixed:all"])
    p.add_argument("--traces", nargs="+", default=["constant", "bursty", "ramp"])
    p.add_argument("--rate", type=float, default=25.0)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--slo-ms", type=float, default=200.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--runtime", choices=("packed", "torch"), default="packed",
                   help="what the servers run their sub-nets on (lowbit serve --runtime)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    t0 = time.time()
    policies = []
    for pol in a.policies:
        policies += [f"fixed:{n}" for n in load_supernet(a.supernet).choices] if pol == "fixed:all" else [pol]
    res = run_serve_bench(a.supernet, policies, a.traces, a.rate, a.duration, a.slo_ms, a.max_batch, a.seed,
                          samples=a.samples, runtime=a.runtime)
    write_report(res, a.out, "serve", run_meta(__file__, argv, t0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
