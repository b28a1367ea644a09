"""A bounded open-loop load generator on the loopback interface.

Arrival times follow a trace; each request is sent at its time whatever the server's state
(open loop, as real users do), as a binary float32 body, and the client records status, latency
and the sub-net that answered. It stops by itself: at most ``len(arrivals)`` requests (capped by
the caller), each with a timeout, so a replay lasts at most ``duration + timeout`` seconds.

Traces (non-homogeneous Poisson arrivals drawn by thinning, seeded), mean rate ``rate`` req/s
over ``duration`` seconds:

- ``constant``: rate(t) = rate
- ``bursty``:   rate(t) = 3 rate during the first quarter of every second, rate / 3 otherwise
- ``ramp``:     rate(t) rises linearly from 0.2 rate to 1.8 rate
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["TRACES", "Record", "make_trace", "replay", "summarize"]

TRACES: dict[str, Callable[[float, float, float], float]] = {
    "constant": lambda t, rate, dur: rate,
    "bursty": lambda t, rate, dur: 3 * rate if (t % 1.0) < 0.25 else rate / 3,
    "ramp": lambda t, rate, dur: rate * (0.2 + 1.6 * t / dur),
}


def make_trace(
    kind: str, rate: float, duration: float, seed: int = 0, max_requests: int = 100_000
) -> list[float]:
    """Arrival offsets (seconds) of a trace; at most ``max_requests``."""
    if kind not in TRACES:
        raise ValueError(f"unknown trace {kind!r}; allowed: {', '.join(TRACES)}")
    if not rate > 0 or not duration > 0:
        raise ValueError(f"rate and duration must be > 0, got {rate!r}, {duration!r}")
    f = TRACES[kind]
    peak = 3 * rate if kind == "bursty" else 1.8 * rate if kind == "ramp" else rate
    rng = random.Random(seed)
    t, out = 0.0, []
    while len(out) < max_requests:
        t += rng.expovariate(peak)
        if t >= duration:
            break
        if rng.random() * peak <= f(t, rate, duration):
            out.append(t)
    return out


@dataclass
class Record:
    sent: float  # seconds after the replay started
    status: int  # HTTP status, 0 for a client-side timeout or connection error
    latency_ms: float
    subnet: str | None


async def replay(
    url: str, arrivals: list[float], body: bytes, shape: str, timeout_s: float = 5.0, max_in_flight: int = 512
) -> list[Record]:
    """Send ``body`` (one binary sample of ``shape``) to ``url`` at every arrival time."""
    import httpx

    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    headers = {"content-type": "application/octet-stream", "x-shape": shape}
    records: list[Record] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        start = time.perf_counter()

        async def one(at: float) -> None:
            delay = at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            t = time.perf_counter()
            try:
                r = await client.post(url, content=body, headers=headers)
                status = r.status_code
                subnet = r.json().get("subnet") if status == 200 else None
            except (httpx.HTTPError, ValueError):
                status, subnet = 0, None
            records.append(Record(t - start, status, 1e3 * (time.perf_counter() - t), subnet))

        await asyncio.gather(*(one(a) for a in arrivals))
    return sorted(records, key=lambda r: r.sent)


def summarize(
    records: list[Record], slo_ms: float, accuracy: dict[str, float], duration: float
) -> dict[str, Any]:
    """SLO attainment (answered 200 within ``slo_ms``, over all requests), served accuracy (mean
    recorded accuracy of the sub-nets that answered, i.e. mix-weighted), throughput, status counts."""
    n = len(records)
    ok = [r for r in records if r.status == 200]
    good = [r for r in ok if r.latency_ms <= slo_ms]
    mix: dict[str, int] = {}
    for r in ok:
        mix[r.subnet or "?"] = mix.get(r.subnet or "?", 0) + 1
    lat = sorted(r.latency_ms for r in ok)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {
        "requests": n,
        "slo_attainment": len(good) / n if n else math.nan,
        "served_accuracy": sum(accuracy.get(r.subnet or "", math.nan) for r in ok) / len(ok)
        if ok
        else math.nan,
        "throughput_rps": len(ok) / duration,
        "goodput_rps": len(good) / duration,
        "p50_ms": lat[len(lat) // 2] if lat else math.nan,
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else math.nan,
        "statuses": statuses,
        "mix": {k: v / len(ok) for k, v in sorted(mix.items())} if ok else {},
    }


def records_to_dicts(records: list[Record]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
