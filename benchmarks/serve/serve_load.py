"""SlackFit against every fixed sub-net (and max-accuracy) under constant, bursty and ramping load,
with the load set from the servers' own latency profiles so that queues really build.

    python benchmarks/serve/serve_load.py     # ~15 min; needs runs/serve_r20/resnet20.supernet
    python benchmarks/serve/serve_load.py --duration 4 --policies slackfit max-accuracy fixed:w0.5-b2

The supernet is the packed file (every sub-net's stored codes, validation and test accuracy) that
``benchmarks/serve/supernet_resnet20.py report`` writes: ResNet-20 (x0.5) on CIFAR-10, where the
sub-nets' packed latencies differ by ~80x (8-bit weights take the runtime's slow bit-serial path)
and the most accurate sub-net is the slowest. For each policy a ``lowbit serve`` process (packed
runtime, one inference thread) starts on a free loopback port, loads every sub-net from the file
and profiles it; then the mean rate is set to ``--load`` times the capacity of the most accurate
sub-net (by validation accuracy, what the servers rank by) in the first server's profile, and every
trace is replayed against every server by the bounded open-loop load generator (at most
``--max-requests`` requests per trace, each with a timeout); see :mod:`lowbit.serve.bench`. Writes
``benchmarks/results/<stem>.{json,md,png}``.

Defaults: 8 samples per request, batches of up to 32 samples (4 requests), a 500 ms SLO, up to 256
client connections, load 1.5 (the most accurate sub-net alone cannot keep up with the mean rate;
the cheaper ones can). The LeNet-5 x2 supernet (``--supernet runs/serve/lenet5x2-codes.supernet``)
is too cheap per input byte for this: with 64 samples (200 KB) per request its rates reach ~100
requests/s, where, on the shared 2-core machine, even its cheapest sub-net answered at a 1 s median
although its profile gave it twice that capacity (at 59 requests/s py-spy saw the server's event
loop take as many CPU samples as its inference thread; the client spent 2.6 ms of CPU per request).
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
    p.add_argument("--supernet", default="runs/serve_r20/resnet20.supernet")
    p.add_argument("--policies", nargs="+", default=["slackfit", "max-accuracy", "fixed:all"])
    p.add_argument("--traces", nargs="+", default=["constant", "bursty", "ramp"])
    p.add_argument("--rate", type=float, default=None,
                   help="mean requests per second (default: --load x the most accurate sub-net's capacity)")
    p.add_argument("--load", type=float, default=1.5)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--slo-ms", type=float, default=500.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-requests", type=int, default=5000)
    p.add_argument("--max-in-flight", type=int, default=256,
                   help="client connections at most (beyond them requests wait unseen by the server)")
    p.add_argument("--profile-repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="replay every trace with the seeds seed, seed+1, ... (the same servers): mean ± std")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--stem", default="serve")
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
                          a.max_requests, samples=a.samples, max_in_flight=a.max_in_flight,
                          profile_repeats=a.profile_repeats, runtime=a.runtime, load=a.load,
                          repeats=a.repeats)
    write_report(res, a.out, a.stem, run_meta(__file__, argv, t0, seeds=res["settings"]["seeds"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
