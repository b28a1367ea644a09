"""Why SlackFit serves the slowest sub-net while the queue grows, and what the queue-aware rule
changes: the batching queue simulated (:mod:`lowbit.serve.simulate`, no server, no wall clock) on
the supernet's measured latencies, every policy on every trace, and the cost of one decision.

    python benchmarks/serve/policy_sim.py      # ~1 min; needs runs/supernet_r20_cifar/resnet20.supernet

1. Profile: every sub-net of the packed supernet (one thread) at batches 1, 2, 4, 8, 16, 24, 32,
   timed side by side in shuffled rounds; the median per (sub-net, batch), interpolated linearly
   between sizes (as the server's profile is).
2. Simulation: ``--samples`` samples per request, SLO ``--slo-ms``, mean rates ``--loads`` x the
   capacity of the most accurate sub-net, the constant/bursty/ramp traces of the load generator
   (seeds 0..``--seeds``-1, ``--duration`` s), batch times = profile x log-normal noise (``sigma``
   0 and 0.3, seeded). The queue-aware policy sees the arrival rate of the last 100 ms, as the
   server measures it.
3. Diagnosis: at every decision of ``slackfit`` and ``slackfit-queue``, whether the chosen
   sub-net's plan for the WHOLE queue (FIFO batches of ``max_batch``) meets every queued deadline,
   and the queue length; SlackFit looks only at the oldest request's slack. On the bursty trace,
   the requests shed and the batches per sub-net in each quarter of a second (the first is the
   burst). ``--profile`` reuses an earlier run's latency profile (then only the cost is re-timed).
4. Cost: median microseconds of one ``decide`` on a queue of 1024 requests (``--samples`` samples
   each, slacks spread over the SLO), against the profiled latency of one full batch of the
   fastest sub-net, both timed in this run.

Writes ``benchmarks/results/serve_policy_sim.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from lowbit.serve import SubnetEngines, load_supernet, make_policy
from lowbit.serve.bench import capacity_rps
from lowbit.serve.loadgen import make_trace
from lowbit.serve.policy import Policy, cut_batches, plan_met
from lowbit.serve.simulate import simulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results

SIZES = [1, 2, 4, 8, 16, 24, 32]
POLICIES = ["slackfit", "slackfit-queue", "max-accuracy", "fixed:b2", "fixed:b4", "fixed:b8"]


def profile(path: str, rounds: int) -> tuple[dict[str, list[float]], dict[str, float], dict[str, float]]:
    """Median ms per sub-net at batches 1..32 (interpolated), validation and test accuracy."""
    sn = load_supernet(path)
    eng = SubnetEngines(sn, "packed", threads=1)
    xs = {b: torch.randn(b, *sn.input_shape) for b in SIZES}
    t: dict[tuple[str, int], list[float]] = {(n, b): [] for n in sn.names for b in SIZES}
    rng = random.Random(0)
    with torch.inference_mode():
        for n in sn.names:
            for b in SIZES:
                eng.run(xs[b], n)
        for _ in range(rounds):
            order = list(t)
            rng.shuffle(order)
            for n, b in order:
                t0 = time.perf_counter()
                eng.run(xs[b], n)
                t[(n, b)].append(1e3 * (time.perf_counter() - t0))
    ms = {}
    for n in sn.names:
        pts = [statistics.median(t[(n, b)]) for b in SIZES]
        row = []
        for b in range(1, SIZES[-1] + 1):
            lo = max(i for i, s in enumerate(SIZES) if s <= b)
            hi = min(i for i, s in enumerate(SIZES) if s >= b)
            f = 0.0 if hi == lo else (b - SIZES[lo]) / (SIZES[hi] - SIZES[lo])
            row.append(pts[lo] + f * (pts[hi] - pts[lo]))
        ms[n] = row
    val = {n: float(sn.info[n].get("val_acc", sn.info[n].get("test_acc"))) for n in sn.names}
    test = {n: float(sn.info[n].get("test_acc", float("nan"))) for n in sn.names}
    return ms, val, test


class Watched:
    """A policy whose decisions are recorded with the chosen sub-net's plan for the whole queue."""

    def __init__(self, inner: Policy) -> None:
        self.inner, self.log = inner, []

    def decide(self, sizes, slack_ms, latency, rate=0.0):
        d = self.inner.decide(sizes, slack_ms, latency, rate)
        if d.subnet is not None:
            gone = set(d.shed)
            keep = [i for i in range(len(sizes)) if i not in gone]
            sz, sl = [sizes[i] for i in keep], [slack_ms[i] for i in keep]
            ends = cut_batches(sz, self.inner.max_batch)
            b = [sum(sz[s:e]) for s, e in zip([0, *ends[:-1]], ends, strict=True)]
            met = plan_met(sz, sl, ends, [latency(d.subnet, x) for x in b])
            self.log.append((d.subnet, len(sz), sum(met) == len(met), sl[0]))
        return d


def decision_cost(ms: dict[str, list[float]], acc: dict[str, float], samples: int, slo_ms: float,
                  n: int = 1024, calls: int = 30) -> dict[str, float]:
    rng = random.Random(0)
    sizes = [samples] * n
    slack = sorted(rng.uniform(0, slo_ms) for _ in range(n))
    lat = lambda s, b: ms[s][min(b, 32) - 1]  # noqa: E731
    out = {}
    for pol in ("slackfit", "slackfit-queue"):
        p = make_policy(pol, acc, 32)
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            p.decide(sizes, slack, lat, 0.05)
            ts.append(1e6 * (time.perf_counter() - t0))
        out[pol] = statistics.median(ts)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--supernet", default="runs/supernet_r20_cifar/resnet20.supernet")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--slo-ms", type=float, default=500.0)
    p.add_argument("--loads", type=float, nargs="+", default=[1.2, 1.5])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15, help="profiling rounds")
    p.add_argument("--profile", default=None,
                   help="take the latency profile and accuracies from this earlier results JSON")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--stem", default="serve_policy_sim")
    a = p.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(1)
    if a.profile:
        prev = json.loads(Path(a.profile).read_text())
        ms, val, test = prev["profile_ms"], prev["val_acc"], prev["test_acc"]
    else:
        ms, val, test = profile(a.supernet, a.rounds)
    caps = {n: capacity_rps(ms[n], a.samples) for n in ms}
    top = max(val, key=lambda n: val[n])
    rows, diag, phases = [], {}, {}
    for sigma in (0.0, 0.3):
        for load in a.loads:
            rate = load * caps[top]
            for tr in ("constant", "bursty", "ramp"):
                for pol in POLICIES:
                    rs, log = [], []
                    for seed in range(a.seeds):
                        w = Watched(make_policy(pol, val, 32))
                        arr = make_trace(tr, rate, a.duration, seed=seed)
                        rs.append(simulate(w, ms, arr, a.slo_ms, samples=a.samples, accuracy=test,
                                           sigma=sigma, seed=seed, rate_window_ms=100, trace=True))
                        log += w.log
                        if tr == "bursty":  # when, within each second, are requests shed, who serves
                            q = phases.setdefault(f"{sigma}/{load}/{pol}", {"shed": [0] * 4, "batches": {}})
                            for e in rs[-1].pop("decisions"):
                                k = int((e["t_ms"] % 1000) // 250)
                                q["shed"][k] += e["shed"]
                                if e["subnet"]:
                                    q["batches"].setdefault(e["subnet"], [0] * 4)[k] += 1
                        else:
                            rs[-1].pop("decisions")
                    n = sum(r["requests"] for r in rs)
                    served = sum(r["served"] for r in rs)
                    row = {"sigma": sigma, "load": load, "rate": rate, "trace": tr, "policy": pol,
                           "requests": n, "slo_attainment": sum(r["met"] for r in rs) / n,
                           "served_accuracy": sum(r["served_accuracy"] * r["served"] for r in rs) / served,
                           "shed": sum(r["shed"] for r in rs),
                           "mix": {s: sum(r["mix"].get(s, 0) * r["served"] for r in rs) / served for s in ms}}
                    rows.append(row)
                    if pol in ("slackfit", "slackfit-queue"):
                        top_log = [x for x in log if x[0] == top]
                        diag[f"{sigma}/{load}/{tr}/{pol}"] = {
                            "batches": len(log),
                            "top_batches": len(top_log),
                            "top_batches_whole_queue_late": sum(not ok for _, _, ok, _ in top_log),
                            "top_median_queue": (statistics.median([q for _, q, _, _ in top_log])
                                                 if top_log else None),
                            "top_median_oldest_slack_ms": (statistics.median([s for *_, s in top_log])
                                                           if top_log else None),
                            "late_batches": sum(not ok for _, _, ok, _ in log),
                        }
    cost = decision_cost(ms, val, a.samples, a.slo_ms)
    fastest = min(ms, key=lambda n: ms[n][-1])
    meta = run_meta(__file__, argv, t0, seeds=list(range(a.seeds)))
    payload = {**meta, "profile_ms": ms, "val_acc": val, "test_acc": test, "capacity_rps": caps, "rows": rows,
               "diagnosis": diag, "bursty_by_quarter": phases, "decide_us_1024": cost, "settings": vars(a)}
    md = [
        "# Serving policies in simulation: why SlackFit serves b8 while the queue grows",
        "",
        f"`{meta['command']}`",
        "",
        f"Supernet `{a.supernet}`: median packed latency (one thread, {a.rounds} shuffled rounds side by "
        "side, this machine under load"
        + (f"; taken from `{a.profile}`, an earlier run of this script" if a.profile else "")
        + ") at batch 8/16/32: "
        + "; ".join(f"{n} {ms[n][7]:.1f}/{ms[n][15]:.1f}/{ms[n][31]:.1f} ms" for n in ms)
        + f". Capacity at {a.samples} samples per request (requests/s at the best batch of whole requests): "
        + ", ".join(f"{n} {c:.0f}" for n, c in caps.items())
        + ". Validation accuracy (what the policies rank by): "
        + ", ".join(f"{n} {100 * v:.2f}%" for n, v in val.items())
        + "; served accuracy below is test accuracy.",
        "",
        f"Simulated (lowbit.serve.simulate): SLO {a.slo_ms:g} ms (10% kept as reserve), max batch 32, "
        f"{a.samples} samples per request, {a.duration:g} s per trace, trace seeds 0..{a.seeds - 1} pooled; "
        "batch time = profile x exp(N(0, sigma^2)); rate = load x the capacity of "
        f"{top}. slackfit: the most accurate sub-net whose latency fits the OLDEST request's slack, largest "
        "batch first; slackfit-queue: the most accurate sub-net whose plan for the whole queue meets every "
        "deadline and keeps up with the last 100 ms of arrivals, hopeless requests shed at once "
        "(src/lowbit/serve/policy.py).",
        "",
        "| sigma | load | trace | policy | SLO attainment | served accuracy | shed | served mix |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(f"| {r['sigma']:g} | {r['load']:g} | {r['trace']} | {r['policy']} | "
                  f"{100 * r['slo_attainment']:.1f}% | {100 * r['served_accuracy']:.2f}% | {r['shed']} | "
                  + ", ".join(f"{s} {100 * v:.0f}%" for s, v in r["mix"].items() if v >= 0.005) + " |")
    md += ["", f"Diagnosis: batches served by {top} (the most accurate sub-net), and whether the plan of "
           f"the WHOLE queue with {top} (FIFO batches of 32 samples) met every queued deadline when it was "
           "chosen.",
           "", f"| sigma | load | trace | policy | batches | {top} batches | of which the whole queue could "
           f"not be met by {top} | median queue at {top} (requests) | median oldest slack at {top} (ms) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for k, v in diag.items():
        sigma, load, tr, pol = k.split("/")
        md.append(f"| {sigma} | {load} | {tr} | {pol} | {v['batches']} | {v['top_batches']} | "
                  f"{v['top_batches_whole_queue_late']} | {v['top_median_queue']} | "
                  + (f"{v['top_median_oldest_slack_ms']:.0f}" if v["top_median_oldest_slack_ms"] is not None
                     else "-") + " |")
    md += ["", "Bursty trace by quarter of each second (Q1: the burst at 3x the mean rate, Q2-Q4: 1/3 of "
           "it): requests shed and batches per sub-net (all trace seeds).", "",
           "| sigma | load | policy | shed Q1 / Q2 / Q3 / Q4 | batches per sub-net Q1 / Q2 / Q3 / Q4 |",
           "|---|---|---|---|---|"]
    for k, v in phases.items():
        sigma, load, pol = k.split("/")
        md.append(f"| {sigma} | {load} | {pol} | {' / '.join(map(str, v['shed']))} | "
                  + "; ".join(f"{n} {' / '.join(map(str, c))}" for n, c in sorted(v["batches"].items()))
                  + " |")
    md += ["", f"Cost of one decision on a queue of 1024 requests ({a.samples} samples each), median of 30 "
           "calls in this run (loaded machine): "
           + ", ".join(f"{p} {us:.0f} us" for p, us in cost.items())
           + f"; one full batch of the fastest sub-net ({fastest}) takes {ms[fastest][-1]:.1f} ms "
           f"({1e3 * ms[fastest][-1] / cost['slackfit-queue']:.0f}x slackfit-queue's decision)."]
    write_results(a.out, a.stem, payload, "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
