"""The runtime's work sharing (``kernels_threads.run_shared``, used by ``parallel_for`` and the flat
executor): every item runs once, the call returns when the items are done even if a worker never
started, an item's error reaches the caller; ``parallel_for``'s parts tile the range; packed models
give the same bits on 1 and 2 threads with the split observed."""

from __future__ import annotations

import itertools
import threading

import numba
import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit.runtime import kernels as K
from lowbit.runtime import kernels_threads as KT

needs_two = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")


def test_run_shared_runs_every_item_once_on_valid_slots():
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work(slot: int, i: int) -> None:
        with lock:
            seen.append((slot, i))

    KT.run_shared(37, work, 2)
    assert sorted(i for _, i in seen) == list(range(37))
    assert {s for s, _ in seen} <= {0, 1}
    seen.clear()
    KT.run_shared(1, work, 4)  # fewer items than threads: no worker is asked
    assert seen == [(0, 0)]


def test_run_shared_returns_without_waiting_for_a_worker_that_never_started():
    """Every worker of the pool is kept busy: the caller runs all items and returns; the late
    worker's turn, once it comes, finds nothing. (A futures wait would block until release.)"""
    nt = 3  # a pool of its own, so that no other test's pool is blocked
    pool = KT.thread_pool(nt)
    release = threading.Event()
    blockers = [pool.submit(release.wait) for _ in range(nt)]
    seen: list[tuple[int, int]] = []
    finished = threading.Event()

    def call() -> None:
        KT.run_shared(10, lambda slot, i: seen.append((slot, i)), nt)
        finished.set()

    th = threading.Thread(target=call, daemon=True)
    th.start()
    try:
        assert finished.wait(30.0), "run_shared waited for workers that had not started"
        assert sorted(seen) == [(0, i) for i in range(10)]
    finally:
        release.set()
        for b in blockers:
            b.result()
    th.join(30.0)
    KT.thread_pool(nt).submit(int).result()  # the late turns ran and found nothing
    assert len(seen) == 10


def test_run_shared_raises_an_items_error_after_all_items_ran():
    ran: list[int] = []

    def work(slot: int, i: int) -> None:
        ran.append(i)
        if i == 2:
            raise RuntimeError("item 2 failed")

    with pytest.raises(RuntimeError, match="item 2 failed"):
        KT.run_shared(6, work, 2)
    assert sorted(ran) == list(range(6))


@needs_two
@pytest.mark.parametrize("ppt, n, grain", [(4, 1000, 1), (4, 256, 16), (0, 257, 4), (2, 9, 4), (4, 5, 1)])
def test_parallel_for_parts_tile_the_range(monkeypatch, ppt, n, grain):
    monkeypatch.setattr(KT, "PARTS_PER_THREAD", ppt)
    numba.set_num_threads(2)
    parts: list[tuple[int, int]] = []
    KT.parallel_for(lambda lo, hi: parts.append((lo, hi)), n, grain=grain)
    parts.sort()
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))  # contiguous, no overlap
    assert all(lo % grain == 0 and hi > lo for lo, hi in parts)
    if n >= 2 * grain:
        assert len(parts) == (2 if ppt == 0 else min(2 * ppt, n // grain))
    KT.set_serial(True)
    try:
        parts.clear()
        KT.parallel_for(lambda lo, hi: parts.append((lo, hi)), n, grain=grain)
        assert parts == [(0, n)]  # one thread: one call
    finally:
        KT.set_serial(False)


def _mlp_packed(act_bits: int) -> tuple[rt.PackedModel, torch.Tensor]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 384), torch.nn.ReLU(), torch.nn.Linear(384, 128)).eval()
    lowbit.quantize(m, {"default": {"weight": {"method": "binary", "bits": 1},
                                    "activation": {"method": "pact", "bits": act_bits, "alpha_init": 3.0}}})
    x = torch.rand(64, 256, generator=torch.Generator().manual_seed(1))
    return rt.compile(m.eval(), x[:8]), x


@needs_two
@pytest.mark.skipif(not K.HAS_VNNI, reason="the int8 and GEMV kernels need AVX-512 VNNI")
@pytest.mark.parametrize("ppt", [0, 4])
def test_packed_model_same_bits_on_one_and_two_threads(monkeypatch, ppt):
    """Module by module (kernels' parallel_for) and flat (the executor's pieces): the split is
    observed through run_shared's callers, the outputs equal bit for bit."""
    from lowbit.runtime import executor as E
    from lowbit.runtime import kernels_amx, kernels_gemv, kernels_int8

    monkeypatch.setattr(KT, "PARALLEL_MIN_WORK", 1)  # split even these small layers
    for mod, name in ((kernels_int8, "INT8_MIN_PARALLEL_MACS"), (kernels_gemv, "GEMV_MIN_PARALLEL_MACS"),
                      (kernels_amx, "AMX_MIN_PARALLEL_MACS"), (kernels_amx, "VNNI_MIN_PARALLEL_MACS")):
        monkeypatch.setattr(mod, name, 1)
    monkeypatch.setattr(E, "MIN_THREAD_WORK_S", 0.0)
    monkeypatch.setattr(KT, "PARTS_PER_THREAD", ppt)
    packed, x = _mlp_packed(4)
    assert packed.executor is not None
    callers: list[str] = []
    real = KT.run_shared

    def counting(n, work, nt):
        callers.append(work.__qualname__)
        return real(n, work, nt)

    monkeypatch.setattr(KT, "run_shared", counting)
    numba.set_num_threads(2)
    flat = packed.executor
    for path in ("flat", "modules"):
        packed.executor = flat if path == "flat" else None
        for b in (8, 64):
            KT.set_serial(True)
            try:
                one = packed(x[:b])
            finally:
                KT.set_serial(False)
            callers.clear()
            two = packed(x[:b])
            assert torch.equal(one, two), (path, b)
            if path == "flat":
                assert callers == ["FlatExecutor._call.<locals>.work"] and flat.last_threads == 2
            elif b == 64:  # (8 rows are fewer than two of the int8 kernel's row grains: not split)
                # parallel_for's parts shared from a counter, or the static split (no run_shared)
                assert (set(callers) == {"parallel_for.<locals>.<lambda>"}) if ppt else not callers, callers
    packed.executor = flat
