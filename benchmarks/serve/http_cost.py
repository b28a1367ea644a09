"""Where a request's time goes at a given rate: one ``lowbit serve`` process (``--policy``), the
constant trace replayed for ``--duration`` s at each ``--rates`` value by the load generator in this
process; per rate the client's latency, the in-server time of each batch's oldest request (the
server's decision log), the batches' run time, and the CPU time per request of the client (this
process) and of the server process (inference included).

    python benchmarks/serve/http_cost.py --samples 8 --rates 100 150 200

When the client's latency is far above the in-server time, requests wait outside the batching
queue (sending, HTTP, the event loop), which no serving policy sees. Prints one line per rate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

from lowbit.serve import load_supernet
from lowbit.serve.bench import free_port, start_server, stop_server
from lowbit.serve.loadgen import make_trace, replay, summarize


def _summarize_spy(path: str, top: int = 5) -> None:
    """Samples per thread and its most frequent last two frames, from a py-spy raw file."""
    threads: dict[str, Counter[str]] = {}
    for line in Path(path).read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        tail = ";".join(f.split(" (")[0] for f in frames[-2:])
        threads.setdefault(frames[0], Counter())[tail] += int(n)
    for t, c in threads.items():
        total = sum(c.values())
        print(f"  {t}: {total} samples; "
              + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in c.most_common(top)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--supernet", default="runs/supernet_r20_cifar/resnet20.supernet")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--rates", type=float, nargs="+", default=[50.0, 100.0, 200.0])
    p.add_argument("--policy", default="fixed:b4")
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--slo-ms", type=float, default=500.0)
    p.add_argument("--spy", default=None,
                   help="record the server with py-spy (raw, every thread, idle included) during the first "
                   "rate into this file, and print each thread's most frequent innermost frames")
    a = p.parse_args(argv)
    sn = load_supernet(a.supernet)
    x = torch.randn((a.samples, *sn.input_shape)).numpy().astype("<f4").tobytes()
    shape = ",".join(str(d) for d in (a.samples, *sn.input_shape))
    port = free_port()
    args = ["--slo-ms", str(a.slo_ms), "--policy", a.policy, "--max-batch", "32"]
    proc = start_server(a.supernet, port, args, timeout_s=300)
    base, tick = f"http://127.0.0.1:{port}", os.sysconf("SC_CLK_TCK")

    def server_cpu_s() -> float:
        f = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / tick

    try:
        for i, rate in enumerate(a.rates):
            arrivals = make_trace("constant", rate, a.duration, seed=0)
            spy = None
            if a.spy and i == 0:
                cmd = [str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(proc.pid),
                       "-d", str(max(1, int(a.duration) - 1)), "-r", "200", "--threads", "--idle",
                       "-f", "raw", "-o", a.spy]
                spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            seq = httpx.get(f"{base}/metrics").json()["decisions"]
            c0, s0, t0 = resource.getrusage(resource.RUSAGE_SELF), server_cpu_s(), time.time()
            recs = asyncio.run(replay(f"{base}/predict", arrivals, x, shape, timeout_s=10, max_in_flight=256))
            c1, s1, wall = resource.getrusage(resource.RUSAGE_SELF), server_cpu_s(), time.time() - t0
            if spy is not None:
                spy.wait()
                _summarize_spy(a.spy)
            log = [d for d in httpx.get(f"{base}/metrics", params={"decisions": 20000}).json()["decision_log"]
                   if d["seq"] >= seq and "oldest_ms" in d]
            s, n = summarize(recs, a.slo_ms, {}, a.duration), len(recs)
            client = (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) / n
            print(f"samples {a.samples} rate {rate:g}: {n} requests in {wall:.1f} s, "
                  f"SLO {s['slo_attainment']:.2f}, "
                  f"client p50 {s['p50_ms']:.0f} p99 {s['p99_ms']:.0f} ms | in-server oldest p50 "
                  f"{statistics.median(d['oldest_ms'] for d in log):.0f} ms, batch run p50 "
                  f"{statistics.median(d['run_ms'] for d in log):.1f} ms, {len(log)} batches | "
                  "CPU per request: "
                  f"client {1e3 * client:.2f} ms, server {1e3 * (s1 - s0) / n:.2f} ms", flush=True)
    finally:
        stop_server(proc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
