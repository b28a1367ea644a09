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

A profile file (``lowbit serve --save-profile FILE``, read back by ``--profile FILE`` instead of
measuring) is the JSON object ``{"format": "lowbit.serve.profile", "version": 1, "supernet_sha256",
"runtime": {sub-net: "packed" | "torch"}, "threads", "max_batch", "ms": {sub-net: [ms at batch 1,
..., ms at max_batch]}}``: the latencies apply only to the same supernet file, sub-net engines,
inference threads and max batch, so :func:`load_profile` and :func:`check_runtime` refuse others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text
from ..nn.supernet import Supernet
from .engines import SubnetEngines

__all__ = ["PROFILE_FORMAT", "PROFILE_VERSION", "LatencyProfile", "check_runtime", "file_sha256",
           "load_profile", "profile_document", "profile_supernet", "read_profile", "save_profile",
           "time_batch"]

PROFILE_FORMAT = "lowbit.serve.profile"
PROFILE_VERSION = 1

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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes: what a profile file names its supernet file by."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def profile_document(profile: LatencyProfile, supernet_sha256: str, runtime: Mapping[str, str],
                     threads: int) -> dict[str, Any]:
    """The profile file's JSON object: ``profile`` as measured on the supernet file with that SHA-256,
    its sub-nets on ``runtime`` (sub-net -> ``"packed"`` or ``"torch"``) with ``threads`` threads."""
    return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "supernet_sha256": supernet_sha256,
            "runtime": dict(runtime), "threads": int(threads), "max_batch": profile.max_batch,
            "ms": {n: [float(v) for v in row] for n, row in profile.ms.items()}}


def save_profile(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> None:
    """Write a :func:`profile_document` atomically (floats in full, so a load gives them back exactly)."""
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n", example="profile.json")


def read_profile(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A profile file's JSON object, checked for its format and version only (see :func:`load_profile`)."""
    hint = "give a file written by lowbit serve --save-profile FILE"
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"profile file {str(path)!r} cannot be read ({e.strerror or e}); {hint}") from None
    except ValueError as e:
        raise ValueError(f"profile file {str(path)!r} is not JSON ({e}); {hint}") from None
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"profile file {str(path)!r}: format is {got!r}, expected {PROFILE_FORMAT!r}; "
                         f"{hint}")
    if doc.get("version") != PROFILE_VERSION:
        raise ValueError(f"profile file {str(path)!r}: version {doc.get('version')!r} is not supported "
                         f"(expected {PROFILE_VERSION}); profile again with lowbit serve --save-profile FILE")
    return doc


def load_profile(path: str | os.PathLike[str], names: Sequence[str], supernet_sha256: str, max_batch: int,
                 threads: int) -> tuple[LatencyProfile, dict[str, str]]:
    """The latency profile in a profile file and the sub-net engines it was measured on (to be
    compared with the server's by :func:`check_runtime` once they are built). A ValueError says
    what is wrong: another supernet file, max batch or thread count, a sub-net missing or unknown,
    a latency that is not a positive finite number of milliseconds."""
    doc = read_profile(path)
    what = f"profile file {str(path)!r}"
    again = "profile again (lowbit serve without --profile, with --save-profile FILE)"
    if doc.get("supernet_sha256") != supernet_sha256:
        raise ValueError(f"{what} was measured on the supernet file with SHA-256 "
                         f"{doc.get('supernet_sha256')!r}, not on this one ({supernet_sha256}); give this "
                         f"supernet's profile, or {again}")
    if doc.get("max_batch") != max_batch:
        raise ValueError(f"{what} covers batches up to {doc.get('max_batch')!r}, this server's max batch is "
                         f"{max_batch}; pass --max-batch {doc.get('max_batch')!r}, or {again}")
    if doc.get("threads") != threads:
        raise ValueError(f"{what} was measured with {doc.get('threads')!r} inference thread(s), this server "
                         f"runs {threads}; pass --threads {doc.get('threads')!r}, or {again}")
    runtime, ms = doc.get("runtime"), doc.get("ms")
    if not isinstance(ms, dict) or not isinstance(runtime, dict):
        raise ValueError(f"{what}: 'ms' and 'runtime' must be objects keyed by sub-net; {again}")
    missing = [n for n in names if n not in ms or n not in runtime]
    unknown = sorted((set(ms) | set(runtime)) - set(names))
    if missing or unknown:
        raise ValueError(f"{what} does not match the supernet's sub-nets ({', '.join(names)}): "
                         + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                     + ([f"unknown {', '.join(unknown)}"] if unknown else []))
                         + f"; {again}")
    rows: dict[str, list[float]] = {}
    for n in names:
        row = ms[n]
        if not isinstance(row, list) or len(row) != max_batch:
            raise ValueError(f"{what}: sub-net {n} must have {max_batch} latencies (batches 1..{max_batch}), "
                             f"got {len(row) if isinstance(row, list) else type(row).__name__}; {again}")
        for b, v in enumerate(row, 1):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{what}: sub-net {n} at batch {b} has latency {v!r}; every latency must be "
                                 f"a positive finite number of milliseconds; {again}")
        rows[n] = [float(v) for v in row]
    return LatencyProfile(rows, max_batch), {n: runtime[n] for n in names}


def check_runtime(path: str | os.PathLike[str], measured: Mapping[str, str],
                  serving: Mapping[str, str]) -> None:
    """A ValueError unless every sub-net runs on the engine (``"packed"`` or ``"torch"``) that the
    profile file ``path`` was measured on: their latencies differ."""
    diff = [f"{n} {measured.get(n)!r} there, {serving[n]!r} here" for n in serving
            if measured.get(n) != serving[n]]
    if diff:
        raise ValueError(f"profile file {str(path)!r} was measured on other sub-net engines "
                         f"({'; '.join(diff)}); pass the --runtime it was measured with, or profile again "
                         "(lowbit serve without --profile, with --save-profile FILE)")
