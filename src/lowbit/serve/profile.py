"""Latency of every sub-net at every batch size, measured once at server start.

Each sub-net runs ``repeats`` times (after ``warmup`` runs) at batch sizes 1, 2, 4, ... and
``max_batch``; the profile keeps a high quantile of the times (``quantile``, default 0.9: a
scheduler that plans with the median misses half its tight deadlines) and interpolates linearly
between measured sizes. The sub-nets take turns call by call (each round runs every sub-net once
per batch size, the first one rotating), as the server switches between them; timed one sub-net
after another, a spell of load from other processes on a shared machine falls on one sub-net alone
and skews the ratios the policies plan with. The server profiles its own
:class:`~lowbit.serve.engines.SubnetEngines` (each sub-net's engine, packed runtime or PyTorch),
i.e. exactly what it executes per batch; given a :class:`Supernet` instead, the times are of
``Supernet.run`` in eval mode with cached quantized weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..nn.supernet import Supernet
from .engines import SubnetEngines

__all__ = ["LatencyProfile", "profile_supernet", "time_batch"]

log = logging.getLogger(__name__)


def _times(supernet: Supernet | SubnetEngines, name: str, batch: int, shape: Sequence[int], repeats: int,
           warmup: int) -> list[float]:
    x = torch.randn((batch, *shape))
    out = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t = time.perf_counter()
            supernet.run(x, name)
            if i >= warmup:
                out.append(1e3 * (time.perf_counter() - t))
    return sorted(out)


def _quantile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


def time_batch(supernet: Supernet | SubnetEngines, name: str, batch: int, shape: Sequence[int],
               repeats: int = 10, warmup: int = 2, quantile: float = 0.5) -> float:
    """Milliseconds of one ``supernet.run`` of sub-net ``name`` on ``batch`` samples: the ``quantile``
    of ``repeats`` runs (0.5: the median; 0: the fastest, the least disturbed by other work)."""
    return _quantile(_times(supernet, name, batch, shape, repeats, warmup), quantile)


@dataclass
class LatencyProfile:
    """``ms[name][b - 1]``: planned milliseconds of sub-net ``name`` at batch ``b`` (1..max_batch)."""

    ms: dict[str, list[float]]
    max_batch: int

    def latency(self, name: str, batch: int) -> float:
        return self.ms[name][min(batch, self.max_batch) - 1]

    def to_dict(self) -> dict[str, list[float]]:
        return {n: [round(v, 4) for v in row] for n, row in self.ms.items()}


def profile_supernet(supernet: Supernet | SubnetEngines, max_batch: int = 32, repeats: int = 10,
                     warmup: int = 2, quantile: float = 0.9) -> LatencyProfile:
    """Profile every sub-net of ``supernet`` (already in eval mode, weights cached) or of its engines."""
    if max_batch < 1:
        raise ValueError(f"profile: max_batch must be >= 1, got {max_batch}")
    sizes = sorted({min(1 << k, max_batch) for k in range(max_batch.bit_length() + 1)} | {max_batch})
    names = list(supernet.names)
    xs = {b: torch.randn((b, *supernet.input_shape)) for b in sizes}
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in names for b in sizes}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            k = i % len(names)
            for b in sizes:
                for name in names[k:] + names[:k]:
                    t = time.perf_counter()
                    supernet.run(xs[b], name)
                    if i >= warmup:
                        times[name, b].append(1e3 * (time.perf_counter() - t))
    ms: dict[str, list[float]] = {}
    for name in names:
        at = {b: _quantile(sorted(times[name, b]), quantile) for b in sizes}
        row = []
        for b in range(1, max_batch + 1):
            lo = max(s for s in sizes if s <= b)
            hi = min(s for s in sizes if s >= b)
            f = 0.0 if hi == lo else (b - lo) / (hi - lo)
            row.append(at[lo] + f * (at[hi] - at[lo]))
        # latency should not fall with batch size; noise can make it, so take running maxima
        for i in range(1, len(row)):
            row[i] = max(row[i], row[i - 1])
        ms[name] = row
        log.info("profiled %s: %.2f ms at batch 1, %.2f ms at batch %d", name, row[0], row[-1], max_batch)
    return LatencyProfile(ms, max_batch)
