"""The batching queue: requests wait in arrival order; one worker takes the next batch, asks the
policy which sub-net serves it, runs it on one inference thread, and answers every request.

Every request gets the deadline ``arrival + slo_ms``. Before each batch the policy sees the
queue (samples and remaining slack of every request, in arrival order; the slack is less a reserve
of 10% of the SLO for answering after the batch) and the profiled latencies scaled by ``scale``,
an exponential average (weight 0.2) of measured / profiled batch time, so that the plan follows
the machine when other work slows it down, and the arrival rate over the last ``rate_window_s``
(requests per ms; ``slackfit-queue`` uses it). Requests the policy sheds (SlackFit: the oldest, when
no sub-net meets its deadline even at batch 1; ``slackfit-queue``: every request no sub-net can
meet) get :class:`Shed` (HTTP 503) instead of being served late, and the worker decides again.
The last ``decisions`` choices (queue length, samples, oldest slack, arrival rate, sub-net, batch,
shed count, scale, cost of the decision; for a batch served, its run time and the time its oldest
request spent in the server) are kept for ``/metrics?decisions=N``. A full queue (``max_queue``
requests) refuses new ones at once (also 503). A batch runs on its sub-net's engine
(:mod:`lowbit.serve.engines`): a packed sub-net is a model of its own, a PyTorch one runs as its
stored model (``LoadedSupernet.run``) or, from a version-1 file, is switched and run inside
``Supernet.run`` under its lock, so a batch is never computed by a half-switched model.

:class:`Metrics` keeps counters (served, shed, rejected, per-sub-net samples and batches) and the
last ``window`` end-to-end latencies for percentiles; SLO attainment is the share of finished
requests (served or shed) that were answered within their deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..nn.supernet import Supernet
from .engines import SubnetEngines
from .policy import Decision, Policy
from .profile import LatencyProfile

__all__ = ["Batcher", "Metrics", "Result", "Shed"]

log = logging.getLogger(__name__)


class Shed(Exception):  # noqa: N818 - an outcome, not a bug
    """The request was dropped: its deadline could not be met, the queue was full, or the server stops."""


@dataclass
class Result:
    outputs: Tensor
    subnet: str
    batch: int
    latency_ms: float


@dataclass
class _Request:
    x: Tensor
    arrival: float
    deadline: float
    future: asyncio.Future[Result]


@dataclass
class Metrics:
    window: int = 10_000
    served: int = 0
    met: int = 0
    shed: int = 0
    rejected: int = 0
    batches: int = 0
    decisions: int = 0
    decide_s: float = 0.0
    samples: Counter[str] = field(default_factory=Counter)
    batches_by_subnet: Counter[str] = field(default_factory=Counter)
    latencies: deque[float] = field(default_factory=deque)
    started: float = field(default_factory=time.monotonic)

    def record(self, latency_ms: float, met: bool) -> None:
        self.served += 1
        self.met += int(met)
        self.latencies.append(latency_ms)
        if len(self.latencies) > self.window:
            self.latencies.popleft()

    def to_dict(self, queue_depth: int) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

        finished = self.served + self.shed
        total = sum(self.samples.values())
        return {
            "queue_depth": queue_depth,
            "served": self.served,
            "shed": self.shed,
            "rejected": self.rejected,
            "batches": self.batches,
            "slo_attainment": round(self.met / finished, 4) if finished else None,
            "latency_ms": {
                "p50": pct(0.5),
                "p90": pct(0.9),
                "p99": pct(0.99),
                "max": lat[-1] if lat else None,
            },
            "subnet_mix": {n: round(c / total, 4) for n, c in sorted(self.samples.items())} if total else {},
            "subnet_samples": dict(sorted(self.samples.items())),
            "subnet_batches": dict(sorted(self.batches_by_subnet.items())),
            "decisions": self.decisions,
            "decide_us_mean": round(1e6 * self.decide_s / self.decisions, 1) if self.decisions else None,
            "uptime_s": round(time.monotonic() - self.started, 1),
        }


class Batcher:
    """Queue + worker. ``await submit(x)`` returns a :class:`Result` or raises :class:`Shed`."""

    def __init__(
        self,
        supernet: Supernet | SubnetEngines,
        profile: LatencyProfile,
        policy: Policy,
        slo_ms: float,
        max_queue: int = 1024,
        decisions: int = 20_000,
        rate_window_s: float = 0.1,
    ) -> None:
        if not slo_ms > 0:
            raise ValueError(f"slo_ms must be > 0, got {slo_ms!r}")
        self.supernet, self.profile, self.policy = supernet, profile, policy
        self.slo_s = slo_ms / 1e3
        self.max_queue = max_queue
        self.queue: deque[_Request] = deque()
        self.metrics = Metrics()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-infer")
        self._task: asyncio.Task[None] | None = None
        self.scale = 1.0  # measured / profiled batch time, tracked online
        self.reserve_s = 0.1 * self.slo_s  # kept for answering after the batch (JSON, transport)
        self.decisions: deque[dict[str, Any]] = deque(maxlen=decisions)
        self.rate_window_s = rate_window_s
        self._arrivals: deque[float] = deque()  # arrival times within the last rate_window_s

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self.queue:
            self._shed(self.queue.popleft(), "the server is shutting down")
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self.queue)

    async def warmup(self) -> None:
        """Run every sub-net once on the inference thread (first calls pay one-time costs)."""
        loop = asyncio.get_running_loop()
        x = torch.zeros((1, *self.supernet.input_shape))
        for name in self.supernet.names:
            await loop.run_in_executor(self._executor, self._infer, x, name)

    async def submit(self, x: Tensor, slo_ms: float | None = None) -> Result:
        """Queue ``x`` with the deadline ``now + slo_ms`` (default: the server's SLO)."""
        now = time.monotonic()
        self._arrivals.append(now)
        if len(self.queue) >= self.max_queue:
            self.metrics.shed += 1
            raise Shed(f"queue full ({self.max_queue} requests waiting); try again later")
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        slo_s = self.slo_s if slo_ms is None else slo_ms / 1e3
        self.queue.append(_Request(x, now, now + slo_s, fut))
        self._wake.set()
        return await fut

    def _shed(self, r: _Request, why: str) -> None:
        self.metrics.shed += 1
        if not r.future.done():
            r.future.set_exception(Shed(why))

    def _log(
        self, now: float, sizes: list[int], slacks: list[float], rate: float, d: Decision, cost_s: float
    ) -> None:
        self.metrics.decide_s += cost_s
        self.decisions.append({
            "seq": self.metrics.decisions, "t": round(now - self.metrics.started, 4), "queue": len(sizes),
            "samples": sum(sizes), "slack_ms": round(slacks[0], 2), "rate_per_s": round(1e3 * rate, 1),
            "subnet": d.subnet, "batch": d.batch,
            "shed": len(d.shed) if d.shed else int(d.subnet is None), "scale": round(self.scale, 3),
            "decide_us": round(1e6 * cost_s, 1),
        })
        self.metrics.decisions += 1

    def _latency(self, name: str, batch: int) -> float:
        return self.scale * self.profile.latency(name, batch)

    def _infer(self, x: Tensor, name: str) -> Tensor:
        with torch.inference_mode():
            return self.supernet.run(x, name)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            sizes = [r.x.shape[0] for r in self.queue]
            slacks = [1e3 * (r.deadline - now - self.reserve_s) for r in self.queue]
            while self._arrivals and self._arrivals[0] < now - self.rate_window_s:
                self._arrivals.popleft()
            window_ms = 1e3 * min(self.rate_window_s, max(now - self.metrics.started, 1e-3))
            rate = len(self._arrivals) / window_ms
            t0 = time.perf_counter()
            d = self.policy.decide(sizes, slacks, self._latency, rate)
            self._log(now, sizes, slacks, rate, d, time.perf_counter() - t0)
            queued = sum(sizes)
            if d.shed:
                gone = set(d.shed)
                left: deque[_Request] = deque()
                for i, r in enumerate(self.queue):
                    if i in gone:
                        self._shed(r, f"its deadline cannot be met ({max(slacks[i], 0):.1f} ms left, "
                                      f"{queued} samples queued); request shed")
                    else:
                        left.append(r)
                self.queue = left
            take: list[_Request] = []
            n = 0
            if d.subnet is not None:
                for r in self.queue:
                    if n + r.x.shape[0] > d.batch:
                        break
                    take.append(r)
                    n += r.x.shape[0]
            if not take:
                if not d.shed and self.queue:
                    self._shed(
                        self.queue.popleft(),
                        f"its deadline cannot be met ({max(slacks[0], 0):.1f} ms "
                        f"left, {queued} samples queued); request shed",
                    )
                continue
            for _ in take:
                self.queue.popleft()
            x = take[0].x if len(take) == 1 else torch.cat([r.x for r in take])
            try:
                t = time.monotonic()
                y = await loop.run_in_executor(self._executor, self._infer, x, d.subnet)
                ratio = 1e3 * (time.monotonic() - t) / max(self.profile.latency(d.subnet, n), 1e-3)
                self.scale = min(20.0, max(0.5, 0.8 * self.scale + 0.2 * ratio))
            except Exception as e:  # a failed batch fails its requests, not the server
                log.exception("batch of %d on %s failed", n, d.subnet)
                for r in take:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            done = time.monotonic()
            if self.decisions:  # this batch's entry: its run time and its oldest request's time in the server
                self.decisions[-1].update(run_ms=round(1e3 * (done - t), 3),
                                          oldest_ms=round(1e3 * (done - take[0].arrival), 3))
            self.metrics.batches += 1
            self.metrics.samples[d.subnet] += n
            self.metrics.batches_by_subnet[d.subnet] += 1
            i = 0
            for r in take:
                k = r.x.shape[0]
                lat = 1e3 * (done - r.arrival)
                self.metrics.record(lat, done <= r.deadline)
                if not r.future.done():
                    r.future.set_result(Result(y[i : i + k], d.subnet, n, lat))
                i += k
