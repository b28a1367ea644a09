"""Threads of the runtime kernels: the worker pool, the thread count and ``parallel_for``
(see ``kernels.py`` for the policy)."""

from __future__ import annotations

import itertools
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import kernel

# Below this many word-operations (about 100-200 us of one core) a kernel runs on one thread:
# handing work to a thread costs ~10 us on an idle machine and can cost milliseconds on an
# oversubscribed one, so only clearly large work is split.
PARALLEL_MIN_WORK = 1 << 21

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _serial_worker() -> None:
    numba.set_num_threads(1)  # thread-local: a worker never splits its own work again


def thread_pool(n: int) -> ThreadPoolExecutor:
    """The runtime's pool of ``n`` worker threads (kernels called from them run serially)."""
    with _POOL_LOCK:
        pool = _POOLS.get(n)
        if pool is None:
            pool = ThreadPoolExecutor(n, thread_name_prefix="lowbit-rt", initializer=_serial_worker)
            _POOLS[n] = pool
        return pool


_GET_NUM_THREADS = None
# per calling thread: ``serial`` (set_serial) makes every kernel it calls run on it alone
_LOCAL = threading.local()


def set_serial(flag: bool) -> bool:
    """Run the kernels the calling thread starts on that thread alone (True) or on
    :func:`num_threads` threads again (False); returns the previous setting. A packed model's
    small calls use it (``compiler.SERIAL_MAX_NUMEL``): handing a few hundred microseconds of work
    to a second thread loses on a busy machine."""
    prev = _LOCAL.__dict__.get("serial", False)
    _LOCAL.serial = bool(flag)
    return prev


def num_threads() -> int:
    """numba's (thread-local) thread count, read without ``numba.get_num_threads``'s lock; 1 while
    :func:`set_serial` is on for the calling thread."""
    global _GET_NUM_THREADS
    if _LOCAL.__dict__.get("serial", False):
        return 1
    if _GET_NUM_THREADS is None:
        import torch

        keep = torch.get_num_threads()
        n = numba.get_num_threads()  # launches numba's threading layer once ...
        torch.set_num_threads(keep)  # ... which resets the OpenMP count PyTorch reads in this thread
        from numba.np.ufunc import parallel as _p

        _GET_NUM_THREADS = getattr(_p, "_get_num_threads", None) or numba.get_num_threads
        return n
    n = _GET_NUM_THREADS()
    return n if n > 0 else numba.get_num_threads()


def use_parallel(work: int, min_work: int | None = None) -> bool:
    """Split the work over threads: enough work and more than one thread."""
    return work >= (PARALLEL_MIN_WORK if min_work is None else min_work) and num_threads() > 1


# A worker that has run its part of a split polls for the next split this many microseconds
# before it sleeps, and a caller that has run its part polls as long for the worker's last part
# before it sleeps (0: both sleep at once, the ThreadPoolExecutor hand-off alone). On this 2-vCPU
# virtual machine a sleeping thread's core halts, and waking it (an interrupt through the
# hypervisor) took 20-40 us right after a call and ~200 us after 20 ms idle
# (benchmarks/results/thread_split.md), once per Linear layer's split and again for the caller
# after the split; a deep MLP splits every layer, with 0.03-0.3 ms of serial work between splits.
# Measured on the deep 4096-wide MLP on 2 threads against the worker sleeping: 0.99-1.04x paired by
# round in a quiet window (benchmarks/results/ab_thread_scaling.md); in development runs while other
# processes held about a core, 1.03x against 0.74x and 0.82x against 0.78x of the 1-thread speed at 8
# rows (table lookup), 0.93x against 0.83x at 64, equal at 256. Small gains: the split's cost on this
# machine is mostly the other processes' share of the cores (probe_autogroup.md), not the hand-off.
SPIN_US = 300
#: ... offering the core to any other runnable thread (``sched_yield``) this often while polling: on a
#: busy machine the two threads may share one core, and a poll must not keep the other off it
SPIN_YIELD_US = 20
#: ... and neither polls for this many seconds after a split whose polling worker ran none of its
#: items (another process had its core: polling then only takes time from the threads that run)
SPIN_BACKOFF_S = 0.05
_BACKOFF_UNTIL = [0.0]


@intrinsic
def _load_relaxed(typingctx, a, i):
    """``a[i]`` of an int64 array as an atomic (monotonic) load: read again on every call, never
    hoisted out of a polling loop."""
    sig = types.int64(a, i)

    def codegen(context, builder, signature, args):
        arr = cgutils.create_struct_proxy(signature.args[0])(context, builder, value=args[0])
        p = builder.gep(arr.data, [args[1]])
        v = builder.load_atomic(p, "monotonic", 8)
        return v

    return sig, codegen


@intrinsic
def _pause(typingctx):
    """The spin-wait hint (``pause``) and the time-stamp counter after it."""
    sig = types.int64()

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                            "llvm.x86.sse2.pause")
        builder.call(fn, [])
        rd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(rd, [])

    return sig, codegen


#: the polling needs x86-64 Linux (``pause``, the time-stamp counter, the ``sched_yield`` syscall);
#: elsewhere workers sleep at once as with SPIN_US = 0
CAN_SPIN = platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux")


@intrinsic
def _sched_yield(typingctx):
    """libc's ``sched_yield()`` (a call to the process's symbol, resolved when the loop is linked)."""
    sig = types.int32()

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "sched_yield")
        return builder.call(fn, [])

    return sig, codegen


@kernel
def _poll(a, i, value, equal, ticks, yield_ticks):
    """Poll ``a[i]`` until it equals ``value`` (``equal``) or differs from it, at most ``ticks``
    time-stamp counter ticks, offering the core to other runnable threads (``sched_yield``) every
    ``yield_ticks``; returns the last value read (the GIL is released meanwhile)."""
    t0 = _pause()
    ty = t0
    v = _load_relaxed(a, i)
    while (v == value) != equal:
        t = _pause()
        if t - t0 > ticks:
            break
        if t - ty > yield_ticks:
            _sched_yield()
            ty = t
        v = _load_relaxed(a, i)
    return v


@kernel
def _tsc():
    return _pause()


_TICKS_PER_US: list[float] = []


def ticks_per_us() -> float:
    """Time-stamp counter ticks per microsecond (measured once, over 2 ms)."""
    if not _TICKS_PER_US:
        _tsc()
        c0, t0 = _tsc(), time.perf_counter()
        time.sleep(0.002)
        c1, t1 = _tsc(), time.perf_counter()
        _TICKS_PER_US.append(max((c1 - c0) / ((t1 - t0) * 1e6), 1.0))
    return _TICKS_PER_US[0]


def _spin_ticks() -> tuple[int, int]:
    """(:data:`SPIN_US`, :data:`SPIN_YIELD_US`) in ticks; no polling while backing off."""
    t = ticks_per_us()
    if time.perf_counter() < _BACKOFF_UNTIL[0]:
        return 0, 0
    return int(SPIN_US * t), int(SPIN_YIELD_US * t)


def wait_for_split(state: np.ndarray, seen: int, cv: threading.Condition) -> None:
    """A worker's wait for the split after number ``seen`` (``state[0]``): polling :data:`SPIN_US`
    (:func:`_spin_ticks`), then asleep on ``cv``, which the caller notifies as it hands a split."""
    if int(_poll(state, 0, seen, False, *_spin_ticks())) == seen:
        with cv:
            while int(state[0]) == seen:
                cv.wait()


class _Spinner:
    """One worker thread for slot 1 of :func:`run_shared`: it takes a split's items like a pool worker,
    then polls for the next split :data:`SPIN_US` before it sleeps, so that a split that follows soon
    finds it on a core. ``state[0]``: the splits handed out so far."""

    def __init__(self) -> None:
        self.state = np.zeros(8, np.int64)
        self.job: Callable[[int], None] | None = None
        self.cv = threading.Condition(threading.Lock())
        self.owner = threading.Lock()  # one caller at a time hands splits to it
        threading.Thread(target=self._loop, name="lowbit-rt-spin", daemon=True).start()

    def _loop(self) -> None:
        _serial_worker()
        seen = 0
        while True:
            wait_for_split(self.state, seen, self.cv)
            seen = int(self.state[0])
            job = self.job
            if job is not None:
                job(1)

    def hand(self, job: Callable[[int], None]) -> None:
        with self.cv:
            self.job = job
            self.state[0] += 1
            self.cv.notify()


_SPINNER: list[_Spinner] = []
if hasattr(os, "register_at_fork"):  # a forked child has no polling thread: it makes its own
    os.register_at_fork(after_in_child=_SPINNER.clear)


def _spinner() -> _Spinner:
    with _POOL_LOCK:
        if not _SPINNER:
            _SPINNER.append(_Spinner())
        return _SPINNER[0]


def run_shared(n: int, work: Callable[[int, int], None], nt: int, poll: bool | None = None) -> None:
    """``work(slot, i)`` for every ``i`` in ``range(n)``, on the calling thread (slot 0) and up to
    ``nt - 1`` workers (slots 1, 2, ...), each taking the next ``i`` from a shared counter. Returns
    when every item has run, not when every worker has started: a worker the OS has not run by then
    finds nothing left (on a busy machine waking a worker can take milliseconds). The first
    exception of an item is raised here once all items have run.

    With ``poll`` (default: whether the call comes from :func:`run_polling`: :func:`parallel_for`,
    whose splits come one per layer, and the flat executor's) slot 1 goes to the polling worker
    (:data:`SPIN_US` > 0, unless another caller holds it), the other slots to the pool's workers,
    and after its items the caller polls :data:`SPIN_US` for the workers' last items before it
    sleeps; without, every slot goes to the pool (the flat executor with ``executor.FLAT_POLL``
    0)."""
    if poll is None:
        poll = _LOCAL.__dict__.get("poll", False)
    counter = itertools.count()  # next() on it is atomic under the GIL
    left = np.array([n, 0], np.int64)  # items not yet finished (read by _poll without the GIL)
    ran = [0, 0]  # items run by slot 0 and slot 1
    lock = threading.Lock()
    done = threading.Event()
    errors: list[BaseException] = []

    def take(slot: int) -> None:
        while (i := next(counter)) < n:
            ran[slot > 0] += 1
            try:
                work(slot, i)
            except BaseException as e:  # raised by the caller below
                errors.append(e)
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    nw = min(nt, n) - 1
    spin = poll and SPIN_US > 0 and CAN_SPIN
    sp = _spinner() if spin and nw > 0 else None
    if sp is not None and not sp.owner.acquire(blocking=False):
        sp = None
    try:
        if sp is not None:
            sp.hand(take)
        if nw > (sp is not None):
            pool = thread_pool(nt)
            for k in range(1 + (sp is not None), nw + 1):
                pool.submit(take, k)
        take(0)
        if spin and left[0] > 0:
            _poll(left, 0, 0, True, *_spin_ticks())
        done.wait()
        if sp is not None and ran[1] == 0 and n > 1:
            _BACKOFF_UNTIL[0] = time.perf_counter() + SPIN_BACKOFF_S
    finally:
        if sp is not None:
            sp.owner.release()
    if errors:
        raise errors[0]


# parallel_for cuts the range into this many parts per thread, run by run_shared (0: one part per
# thread and the caller waits for every worker's part, the split before run_shared). Waking the idle
# pool takes 20-40 us right after a call and ~200 us after 20 ms idle on this 2-vCPU machine, and a
# Linear layer's parallel region is 0.1-2 ms, so with one part per thread the caller's part ends
# well before the worker's: 2 x 4096^2 MLP layers, 2 threads, two clean windows (threads never off
# the CPU), the items' overlap (2.0 = both threads busy all along) was 1.03-1.55 with one part per
# thread and 1.09-1.72 with four, higher in 5 of 6 (batch, window) pairs; 2-thread call 3.05 against
# 4.32 ms at batch 64, 9.62 against 12.38 at 256 (benchmarks/results/thread_split.md). A part costs
# one numba dispatch (~3-5 us).
PARTS_PER_THREAD = 4


def parallel_for(fn, n: int, *args, parallel: bool = True, grain: int = 1) -> None:
    """``fn(*args, lo, hi)`` over ``[0, n)``: one call, or (``parallel`` and more than one thread)
    parts of the range, boundaries multiples of ``grain``, that the calling thread and the pool's
    workers take from a shared counter (:func:`run_shared`, up to :data:`PARTS_PER_THREAD` parts per
    thread). ``fn`` must be a GIL-releasing kernel whose result does not depend on how the range
    is cut."""
    nt = num_threads()
    if not parallel or nt <= 1 or n < 2 * grain:
        fn(*args, 0, n)
        return
    parts = nt * PARTS_PER_THREAD if PARTS_PER_THREAD > 0 else nt
    per = -(-n // min(parts, n // grain))
    per = -(-per // grain) * grain
    bounds = [(lo, min(n, lo + per)) for lo in range(0, n, per)]
    if PARTS_PER_THREAD <= 0:
        pool = thread_pool(nt)
        futs = [pool.submit(fn, *args, lo, hi) for lo, hi in bounds[1:]]
        fn(*args, *bounds[0])
        for f in futs:
            f.result()
        return
    run_polling(len(bounds), lambda slot, i: fn(*args, *bounds[i]), nt)


def run_polling(n: int, work: Callable[[int, int], None], nt: int) -> None:
    """:func:`run_shared` with slot 1 on the polling worker (:data:`SPIN_US`), which then stays on
    its core a while for the next split: for callers whose splits come in quick succession."""
    _LOCAL.poll = True  # (read by run_shared: a wrapper of it keeps its three arguments)
    try:
        run_shared(n, work, nt)
    finally:
        _LOCAL.poll = False


def num_words(k: int) -> int:
    return (int(k) + 63) // 64
