"""Probe: a 2-thread split whose parts are claimed inside nogil code, against the runtime's split.

    python benchmarks/speed/probe_split_claims.py                 # ~2 min, both cores free
    python benchmarks/speed/probe_split_claims.py --batches 8 64 --variants w1a4 w2a4

``kernels_threads.run_shared`` (what ``parallel_for`` uses) hands a split's parts out from Python:
each part is a numba dispatch, which needs the GIL, so the two threads take turns holding it, and
a thread asking for the GIL while the other holds it sleeps on a futex until it is released. On
the 2-vCPU virtual machine this was measured on, a plain two-thread pool split of a 0.3 ms
lookup-table GEMM ended 0.26 ms after it started, against 0.16 ms per half run alone, while two
processes running the whole GEMM side by side each kept their one-process speed. This probe
replaces ``parallel_for`` in the kernel modules by a split whose parts are claimed from an
atomic counter inside nogil code (the caller publishes the split from there too, and a worker
goes back to Python only while the caller runs its parts, when the GIL is free), and times the
packed 8 x 4096^2 MLP (``harness.CASES["mlp"]``) on 1 thread, on 2 threads with the runtime's
split and on 2 threads with the claims, interleaved, outputs checked equal bit for bit.
Ratio = 1-thread median / 2-thread median. It is a probe, not the runtime: a kernel raising an
exception inside a claimed part would leave the caller waiting. Writes
``<out>/probe_split_claims.{json,md}`` (default: benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_thread_scaling import serial
from common import run_meta, write_results
from harness import CASES, quantized_model, set_threads

from lowbit.runtime import compile as rt_compile
from lowbit.runtime import kernels_amx, kernels_codes, kernels_gemm, kernels_gemv, kernels_int8, kernels_pool
from lowbit.runtime import kernels_threads as KT
from lowbit.runtime._jit import kernel
from lowbit.runtime.kernels_threads import (
    _POOL_LOCK,
    CAN_SPIN,
    PARTS_PER_THREAD,
    _load_relaxed,
    _pause,
    _sched_yield,
    _serial_worker,
    _spin_ticks,
    num_threads,
    wait_for_split,
)

# ----------------------------------------------------------------------------------------------
# splits without a contended GIL: parts claimed inside nogil code
# ----------------------------------------------------------------------------------------------
#
# run_shared hands its items out from Python: every item is a numba dispatch, which needs the GIL,
# so the calling thread and the worker take turns holding it, and a thread that asks for the GIL
# while the other holds it sleeps on a futex until it is released. On this 2-vCPU virtual machine
# that wake-up took ~0.1 ms (a plain two-thread pool split of a 0.3 ms lookup-table GEMM ended
# 0.26 ms after it started, against 0.16 ms per half), as much as the half the worker saves.
# Here the parts are claimed from a counter inside nogil code (``_claim_parts``), the caller
# publishes a split from there too, and a worker only returns to Python, to fetch the next split's
# kernel and arguments, while the caller runs its own parts: the GIL is then free. A worker that
# has not started when the caller runs out of parts leaves them to the caller (never slower than
# one thread but for the dispatch), and polls SPIN_US for the next split before it sleeps.

_SEQ_SHIFT = 24  # a counter holds (split number << _SEQ_SHIFT) | parts: a late worker claims nothing


@intrinsic
def _cas(typingctx, a, i, expected, new):
    """``a[i] == expected`` -> ``a[i] = new`` as one atomic step (int64 array); True if it was."""
    sig = types.boolean(a, i, expected, new)

    def codegen(context, builder, signature, args):
        arr = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0])
        p = builder.gep(arr.data, [args[1]])
        return builder.extract_value(builder.cmpxchg(p, args[2], args[3], "seq_cst", "seq_cst"), 1)

    return sig, codegen


@intrinsic
def _store_atomic(typingctx, a, i, v):
    """``a[i] = v`` (int64 array) as an atomic store, seen by the other threads' atomic loads."""
    sig = types.void(a, i, v)

    def codegen(context, builder, signature, args):
        arr = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0])
        builder.store_atomic(args[2], builder.gep(arr.data, [args[1]]), "seq_cst", 8)
        return context.get_dummy_value()

    return sig, codegen


@kernel
def _claim_parts(state, seq, fn, args, bounds):
    """Run the parts of split ``seq`` that the counter ``state[1]`` still gives out; count each
    finished one in ``state[2]``. ``fn(*args, bounds[i], bounds[i + 1])``."""
    n = bounds.shape[0] - 1
    tag = seq << _SEQ_SHIFT
    while True:
        c = _load_relaxed(state, 1)
        if c - tag >= n or c < tag or c >= tag + (1 << _SEQ_SHIFT):
            return
        if _cas(state, 1, c, c + 1):
            i = c - tag
            fn(*args, bounds[i], bounds[i + 1])
            while True:
                d = _load_relaxed(state, 2)
                if _cas(state, 2, d, d + 1):
                    break


@kernel
def _lead_split(state, seq, fn, args, bounds, yield_ticks):
    """The caller's side of split ``seq``: publish it (``state[0]``), run parts, wait for the rest."""
    n = bounds.shape[0] - 1
    tag = seq << _SEQ_SHIFT
    _store_atomic(state, 1, tag)
    _store_atomic(state, 2, tag)
    _store_atomic(state, 0, seq)
    _claim_parts(state, seq, fn, args, bounds)
    ty = _pause()
    while _load_relaxed(state, 2) != tag + n:
        t = _pause()
        if t - ty > yield_ticks:
            _sched_yield()
            ty = t


@kernel
def _follow_split(state, seq, fn, args, bounds, ticks, yield_ticks):
    """A worker's side of split ``seq``: run the parts it can claim, then poll for the next split at
    most ``ticks``; True if one came."""
    _claim_parts(state, seq, fn, args, bounds)
    t0 = _pause()
    ty = t0
    while _load_relaxed(state, 0) == seq:
        t = _pause()
        if t - t0 > ticks:
            return False
        if t - ty > yield_ticks:
            _sched_yield()
            ty = t
    return True


class _Crew:
    """``nt - 1`` worker threads for :func:`split_claims` (``state``: split number, part counter,
    finished parts)."""

    def __init__(self, nw: int) -> None:
        self.state = np.zeros(8, np.int64)
        self.seq = 0
        self.job: tuple[Any, tuple, np.ndarray] | None = None
        self.cv = threading.Condition(threading.Lock())
        self.owner = threading.Lock()  # one caller at a time
        for k in range(nw):
            threading.Thread(target=self._loop, name=f"lowbit-rt-crew{k}", daemon=True).start()

    def _loop(self) -> None:
        _serial_worker()
        seen = 0
        while True:
            wait_for_split(self.state, seen, self.cv)
            while True:
                seq = int(self.state[0])
                job = self.job
                seen = seq
                if job is None:
                    break
                fn, args, bounds = job
                ticks, yticks = _spin_ticks()
                if not _follow_split(self.state, seq, fn, args, bounds, ticks, yticks):
                    break

    def run(self, fn: Any, args: tuple, bounds: np.ndarray) -> None:
        self.seq += 1
        self.job = (fn, args, bounds)
        with self.cv:
            self.cv.notify_all()
        _lead_split(self.state, self.seq, fn, args, bounds, _spin_ticks()[1] or 1 << 62)


_CREWS: dict[int, _Crew] = {}
if hasattr(os, "register_at_fork"):  # a forked child has no workers: it makes its own
    os.register_at_fork(after_in_child=_CREWS.clear)


def split_claims(fn: Any, args: tuple, bounds: np.ndarray, nt: int) -> bool:
    """``fn(*args, bounds[i], bounds[i + 1])`` for every part, claimed by the calling thread and
    ``nt - 1`` workers inside nogil code (see above). False (nothing run) where that cannot be
    done: no polling on this CPU, or another thread of the process is using the workers."""
    if not CAN_SPIN or nt < 2:
        return False
    with _POOL_LOCK:
        crew = _CREWS.get(nt)
        if crew is None:
            crew = _CREWS[nt] = _Crew(nt - 1)
    if not crew.owner.acquire(blocking=False):
        return False
    try:
        crew.run(fn, args, bounds)
    finally:
        crew.owner.release()
    return True



def claims_parallel_for(fn, n: int, *args, parallel: bool = True, grain: int = 1) -> None:
    """``kernels_threads.parallel_for`` with :func:`split_claims` in place of ``run_shared``."""
    nt = num_threads()
    if not parallel or nt <= 1 or n < 2 * grain:
        fn(*args, 0, n)
        return
    parts = nt * PARTS_PER_THREAD
    per = -(-n // min(parts, n // grain))
    per = -(-per // grain) * grain
    bounds = np.array([*range(0, n, per), n], np.int64)
    if not split_claims(fn, args, bounds, nt):
        KT.parallel_for(fn, n, *args, parallel=parallel, grain=grain)


MODULES = (kernels_amx, kernels_codes, kernels_gemm, kernels_gemv, kernels_int8, kernels_pool)
ORIGINAL = {m: m.parallel_for for m in MODULES}


def use_claims(on: bool) -> None:
    for m in MODULES:
        m.parallel_for = claims_parallel_for if on else ORIGINAL[m]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["w1a4", "w2a4", "w4a4"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = p.parse_args(argv)
    t0 = time.time()
    load0 = os.getloadavg()
    set_threads(2)
    torch.manual_seed(args.seed)
    fm = CASES["mlp"].build().eval()
    rows = []
    for v in args.variants:
        pm = rt_compile(quantized_model(fm, v), torch.rand(2, 4096))
        for B in args.batches:
            x = torch.rand(B, 4096, generator=torch.Generator().manual_seed(args.seed + B))

            one = serial(lambda pm=pm, x=x: pm(x))

            def shared(pm=pm, x=x):
                use_claims(False)
                return pm(x)

            def claims(pm=pm, x=x):
                use_claims(True)
                return pm(x)

            fns = {"1 thread": one, "2 threads, runtime split": shared, "2 threads, claims": claims}
            ref = one()
            for name, f in fns.items():
                if not torch.equal(f(), ref):
                    raise SystemExit(f"{v} batch {B}: {name} differs from 1 thread")
            t = {k: [] for k in fns}
            rng = random.Random(args.seed)
            n = args.rounds if B < 64 else max(5, args.rounds // 3)
            for _ in range(n):
                order = list(fns.items())
                rng.shuffle(order)
                for k, f in order:
                    s = time.perf_counter()
                    f()
                    t[k].append(time.perf_counter() - s)
            use_claims(False)
            med = {k: statistics.median(ts) * 1e3 for k, ts in t.items()}
            row = {"variant": v, "batch": B, **{f"{k} ms": m for k, m in med.items()},
                   "runtime split vs 1 thread": med["1 thread"] / med["2 threads, runtime split"],
                   "claims vs 1 thread": med["1 thread"] / med["2 threads, claims"], "rounds": n}
            rows.append(row)
            print(f"{v} b{B}: " + ", ".join(f"{k} {m:.3f} ms" for k, m in med.items()), flush=True)
    meta = run_meta(__file__, argv, t0, seeds=[args.seed], load_start=load0, load_end=os.getloadavg())
    loads = " / ".join(" ".join(f"{v:.2f}" for v in la) for la in (load0, os.getloadavg()))
    md = ["# Probe: 2-thread split with parts claimed inside nogil code (the deep MLP, 8 x 4096^2)", "",
          f"Command: `{meta['command']}`. Load average at the start / end: {loads}."
          + (f" {args.note}" if args.note else "") + " Medians of interleaved rounds; outputs equal bit "
          "for bit. Ratio = 1-thread median / 2-thread median.", "",
          "| variant | batch | 1 thread ms | 2 threads, runtime split ms | 2 threads, claims ms | "
          "runtime split vs 1 thread | claims vs 1 thread |", "|---|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['variant']} | {r['batch']} | {r['1 thread ms']:.3f} | "
           f"{r['2 threads, runtime split ms']:.3f} | {r['2 threads, claims ms']:.3f} | "
           f"{r['runtime split vs 1 thread']:.2f}x | {r['claims vs 1 thread']:.2f}x |" for r in rows]
    write_results(args.out, "probe_split_claims", {"meta": meta, "rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
