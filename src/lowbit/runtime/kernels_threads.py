"""Threads of the runtime kernels: the worker pool, the thread count and ``parallel_for``
(see ``kernels.py`` for the policy)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numba

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


def run_shared(n: int, work: Callable[[int, int], None], nt: int) -> None:
    """``work(slot, i)`` for every ``i`` in ``range(n)``, on the calling thread (slot 0) and up to
    ``nt - 1`` of the pool's workers (slots 1, 2, ...), each taking the next ``i`` from a shared
    counter. Returns when every item has run, not when every worker has started: a worker the OS
    has not run by then finds nothing left (on a busy machine waking a worker can take
    milliseconds). The first exception of an item is raised here once all items have run."""
    counter = itertools.count()  # next() on it is atomic under the GIL
    left = [n]
    lock = threading.Lock()
    done = threading.Event()
    errors: list[BaseException] = []

    def take(slot: int) -> None:
        while (i := next(counter)) < n:
            try:
                work(slot, i)
            except BaseException as e:  # raised by the caller below
                errors.append(e)
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    pool = thread_pool(nt)
    for k in range(1, min(nt, n)):
        pool.submit(take, k)
    take(0)
    done.wait()
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
    run_shared(len(bounds), lambda slot, i: fn(*args, *bounds[i]), nt)


def num_words(k: int) -> int:
    return (int(k) + 63) // 64
