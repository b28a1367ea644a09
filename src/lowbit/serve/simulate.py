"""A discrete-event simulation of the batching queue: a policy on a latency table, no server, no
wall clock.

It replays arrival times (:func:`lowbit.serve.loadgen.make_trace`) through the same loop as
:class:`lowbit.serve.batching.Batcher`: one worker; whenever it is idle and requests wait, the
policy sees every queued request's samples and slack (deadline - now - ``reserve_ms``) and the
latency table ``ms[name][b - 1]``; shed requests are answered 503 at once; the batch then takes
``ms[subnet][b - 1] x noise`` milliseconds, ``noise`` drawn from a seeded log-normal with
``sigma`` (0: exactly the table), and every request in it meets its deadline iff the batch ends by
``arrival + slo_ms``. A request that finds ``max_queue`` requests waiting is refused (503). The
planning latencies are the table itself (a server scales its profile online; here the scale is 1);
the arrival rate the policy sees is the count of arrivals in the last ``rate_window_ms`` (0: the
policy is told 0, i.e. nothing about arrivals), as the server measures it.

It returns what the load generator measures (SLO attainment over all requests, served accuracy,
sub-net mix) and, with ``trace=True``, every decision: time, queue length, the oldest request's
slack, the sub-net, batch and number shed, which is how one sees why a policy misses.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any

from .policy import Policy

__all__ = ["simulate"]


def simulate(
    policy: Policy,
    ms: Mapping[str, Sequence[float]],
    arrivals: Sequence[float],
    slo_ms: float,
    samples: int = 1,
    accuracy: Mapping[str, float] | None = None,
    reserve_ms: float | None = None,
    sigma: float = 0.0,
    seed: int = 0,
    max_queue: int = 1024,
    trace: bool = False,
    rate_window_ms: float = 0.0,
) -> dict[str, Any]:
    """Serve requests of ``samples`` samples arriving at ``arrivals`` (seconds) with ``policy``."""
    max_batch = min(len(row) for row in ms.values())
    if not 1 <= samples <= max_batch:
        raise ValueError(f"simulate: {samples} samples per request do not fit a batch of at most {max_batch}")
    reserve = 0.1 * slo_ms if reserve_ms is None else reserve_ms
    rng = random.Random(seed)
    arr = sorted(1e3 * a for a in arrivals)  # ms
    queue: deque[float] = deque()  # arrival times (ms) of waiting requests, in order
    now, nxt = 0.0, 0
    met = shed = refused = served = 0
    mix: Counter[str] = Counter()
    log: list[dict[str, Any]] = []

    def admit(until: float) -> None:
        nonlocal nxt, refused
        while nxt < len(arr) and arr[nxt] <= until:
            if len(queue) >= max_queue:
                refused += 1
            else:
                queue.append(arr[nxt])
            nxt += 1

    while nxt < len(arr) or queue:
        admit(now)
        if not queue:
            now = arr[nxt]
            continue
        slack = [a + slo_ms - now - reserve for a in queue]
        window = min(rate_window_ms, now) if now > 0 else 1.0
        lo = bisect_left(arr, now - window, 0, nxt)
        rate = (nxt - lo) / window if rate_window_ms > 0 else 0.0
        d = policy.decide([samples] * len(queue), slack, lambda s, b: ms[s][min(b, max_batch) - 1], rate)
        drop = set(d.shed) if d.shed else ({0} if d.subnet is None else set())
        if trace:
            log.append({"t_ms": round(now, 3), "queue": len(queue), "slack_ms": round(slack[0], 3),
                        "rate_per_s": round(1e3 * rate, 1), "subnet": d.subnet, "batch": d.batch,
                        "shed": len(drop)})
        if drop:
            shed += len(drop)
            queue = deque(a for i, a in enumerate(queue) if i not in drop)
        if d.subnet is None:
            continue
        k = max(1, d.batch // samples)
        batch = [queue.popleft() for _ in range(min(k, len(queue)))]
        if not batch:
            continue
        noise = math.exp(rng.gauss(0.0, sigma)) if sigma > 0 else 1.0
        now += ms[d.subnet][len(batch) * samples - 1] * noise
        met += sum(now <= a + slo_ms for a in batch)
        served += len(batch)
        mix[d.subnet] += len(batch)
    n = len(arr)
    acc = accuracy or {}
    out: dict[str, Any] = {
        "requests": n,
        "met": met,
        "served": served,
        "shed": shed,
        "refused": refused,
        "slo_attainment": met / n if n else math.nan,
        "served_accuracy": (sum(acc.get(s, math.nan) * c for s, c in mix.items()) / served
                            if served else math.nan),
        "mix": {s: c / served for s, c in sorted(mix.items())} if served else {},
    }
    if trace:
        out["decisions"] = log
    return out
