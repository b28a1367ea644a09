"""The 2-thread paths of the deep MLP's kernels (issue 13): the polling worker of ``run_shared``
(every item once, errors raised, a second caller served by the pool, the worker really taking
items), ``_poll``'s two stop rules, the AMX row quantization split over threads from
``AMX_ROWS_MIN_PARALLEL`` on, the other activation passes from their own thresholds, and packed
MLPs giving the same bits on 1 and 2 threads on every many-row path (table lookup, AMX with the
rows split or not, polling worker on or off)."""

from __future__ import annotations

import threading
import time

import numba
import numpy as np
import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit.runtime import _amx
from lowbit.runtime import kernels_amx as KA
from lowbit.runtime import kernels_codes as KC
from lowbit.runtime import kernels_gemm as KG
from lowbit.runtime import kernels_pack as KP
from lowbit.runtime import kernels_popcount as KPC
from lowbit.runtime import kernels_threads as KT

needs_two = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
needs_amx = pytest.mark.skipif(not _amx.amx_enabled(), reason="AMX-INT8 unavailable (CPU, OS or plain path)")


def test_poll_stops_on_change_or_equal_and_times_out():
    a = np.array([5, 0], np.int64)
    t = KT.ticks_per_us()
    assert KT._poll(a, 0, 7, False, int(50 * t), int(20 * t)) == 5  # differs from 7: at once
    assert KT._poll(a, 0, 5, True, int(50 * t), int(20 * t)) == 5  # equals 5: at once
    assert KT._poll(a, 0, 5, False, int(2000 * t), int(500 * t)) == 5  # never changes: times out

    def later() -> None:
        time.sleep(0.01)
        a[0] = 9

    th = threading.Thread(target=later)
    th.start()
    w = time.perf_counter()
    assert KT._poll(a, 0, 5, False, int(5e6 * t), int(20 * t)) == 9  # sees another thread's store
    th.join()
    assert time.perf_counter() - w < 2.0


@pytest.mark.parametrize("spin", [0, 300])
def test_run_shared_every_item_once_and_the_worker_takes_some(monkeypatch, spin):
    monkeypatch.setattr(KT, "SPIN_US", spin)
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work(slot: int, i: int) -> None:
        time.sleep(0.002)  # long enough that a worker arrives while items are left
        with lock:
            seen.append((slot, i))

    slots: set[int] = set()
    for _ in range(3):
        seen.clear()
        KT.run_shared(24, work, 2, poll=True)
        assert sorted(i for _, i in seen) == list(range(24))
        slots |= {s for s, _ in seen}
    # the second thread ran items in some call (a split, not the caller alone); each call returns
    # once its items are done, so on a busy machine one call may end before the worker is woken
    assert slots == {0, 1}


def test_run_shared_polling_worker_raises_an_items_error(monkeypatch):
    monkeypatch.setattr(KT, "SPIN_US", 300)
    ran: list[int] = []

    def work(slot: int, i: int) -> None:
        time.sleep(0.001)
        ran.append(i)
        if i == 5:
            raise ValueError("item 5")

    with pytest.raises(ValueError, match="item 5"):
        KT.run_shared(12, work, 2, poll=True)
    assert sorted(ran) == list(range(12))
    KT.run_shared(4, lambda s, i: ran.append(100 + i), 2, poll=True)  # the worker survived the error
    assert sorted(ran[12:]) == [100, 101, 102, 103]


def test_run_shared_second_caller_while_the_polling_worker_is_held(monkeypatch):
    """Two callers at once: one gets the polling worker, the other the pool; both finish with every
    item run once."""
    monkeypatch.setattr(KT, "SPIN_US", 300)
    sp = KT._spinner()
    got = {0: [], 1: []}
    with sp.owner:  # held as by another caller: this call must not hand items to the poller
        KT.run_shared(8, lambda s, i: (time.sleep(0.001), got[0].append((s, i))), 2, poll=True)
    assert sorted(i for _, i in got[0]) == list(range(8))

    def caller(k: int) -> None:
        KT.run_shared(16, lambda s, i: (time.sleep(0.001), got[k].append((s, i))), 2, poll=True)

    ths = [threading.Thread(target=caller, args=(k,)) for k in (0, 1)]
    got[0].clear()
    for th in ths:
        th.start()
    for th in ths:
        th.join(30.0)
    assert sorted(i for _, i in got[0]) == list(range(16))
    assert sorted(i for _, i in got[1]) == list(range(16))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_forked_child_gets_its_own_polling_worker(monkeypatch):
    """After fork the child's run_shared still splits (a fresh polling thread), every item once."""
    import os

    monkeypatch.setattr(KT, "SPIN_US", 300)
    KT.run_shared(2, lambda s, i: None, 2, poll=True)  # the parent's poller exists
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the slots that ran the items, then leave at once
        code = 1
        try:
            seen: list[tuple[int, int]] = []
            lock = threading.Lock()

            def work(slot: int, i: int) -> None:
                time.sleep(0.002)
                with lock:
                    seen.append((slot, i))

            KT.run_shared(16, work, 2, poll=True)
            ok = sorted(i for _, i in seen) == list(range(16))
            os.write(w, f"{int(ok)} {int(any(s == 1 for s, _ in seen))}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    got = os.read(r, 64).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert got == "1 1", got  # every item once, and the child's own poller took some


@needs_two
@needs_amx
def test_amx_rows_split_from_the_threshold(monkeypatch):
    """The row quantization splits where M*K reaches AMX_ROWS_MIN_PARALLEL (and not below), and the
    tiles equal the reference either way."""
    numba.set_num_threads(2)
    calls: list[tuple[str, bool]] = []
    real = KA.parallel_for

    def spy(fn, n, *args, parallel=True, grain=1):
        calls.append((fn.__name__, parallel))
        real(fn, n, *args, parallel=parallel, grain=grain)

    monkeypatch.setattr(KA, "parallel_for", spy)
    rng = np.random.default_rng(0)
    M, K = 64, 200
    x = rng.integers(0, 16, (M, K)).astype(np.uint8)
    ref = KA.amx_rows_reference(x, -(-K // 64))
    for thr, split in ((M * K, True), (M * K + 1, False)):
        monkeypatch.setattr(KA, "AMX_ROWS_MIN_PARALLEL", thr)
        monkeypatch.setattr(KT, "PARALLEL_MIN_WORK", 1)
        calls.clear()
        got = KA.amx_rows(x)
        np.testing.assert_array_equal(got, ref)
        got = KA.amx_rows(x.astype(np.float32), mode=0, hi=15.0, mult=1.0)
        np.testing.assert_array_equal(got, ref)
        assert calls == [("_amx_rows_u8_range", split), ("_amx_rows_range", split)]


def _activation_passes(rng: np.random.Generator):
    """(name, module, threshold constant, values of the call, call, reference) of the activation
    passes with their own split thresholds (benchmarks/speed/bench_stream_split.py)."""
    x = rng.normal(0, 2, (48, 96)).astype(np.float32)
    w = rng.choice([-1, 1], (32, 96))
    lv, cb = KG.lut_levels(w)
    a = rng.integers(0, 16, (48, 96)).astype(np.uint8)
    return [
        ("clip", KC, "CLIP_MIN_PARALLEL", x.size, lambda: KC.clip_codes(x, -2.0, 2.0, 31.75, 64),
         KC.clip_codes_reference(x, -2.0, 2.0, 31.75, 64)),
        ("quantize", KP, "QUANTIZE_MIN_PARALLEL", x.size, lambda: KP.quantize_codes(x, 2.0, np.float32(7.5)),
         KP.quantize_codes_reference(x, 2.0, np.float32(7.5))),
        ("tables", KG, "LUT_TABLES_MIN_PARALLEL", a.size, lambda: KG.lut_tables(a, lv, cb),
         KG.lut_tables(a, lv, cb)),
    ]


@needs_two
@pytest.mark.parametrize("which", [0, 1, 2])
def test_activation_passes_split_from_their_thresholds(monkeypatch, which):
    """Each activation pass splits where its values reach its own threshold (and not below; a
    split of such a pass lost below about 2**19-2**23 values), with the same output either way."""
    numba.set_num_threads(2)
    name, mod, const, n, call, want = _activation_passes(np.random.default_rng(which))[which]
    calls: list[bool] = []
    real = mod.parallel_for

    def spy(fn, items, *args, parallel=True, grain=1):
        calls.append(parallel)
        real(fn, items, *args, parallel=parallel, grain=grain)

    monkeypatch.setattr(mod, "parallel_for", spy)
    for thr, split in ((n, True), (n + 1, False)):
        monkeypatch.setattr(mod, const, thr)
        calls.clear()
        got = call()
        np.testing.assert_array_equal(got, want)
        assert calls == [split] or (not split and calls == []), (name, thr, calls)


def _packed_mlp(width: int, act_bits: int, weight: str) -> rt.PackedModel:
    torch.manual_seed(0)
    layers = []
    for _ in range(3):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    m = torch.nn.Sequential(*layers).eval()
    lowbit.quantize(m, {"default": {"weight": {"method": weight, "bits": 1 if weight == "binary" else 2},
                                    "activation": {"method": "pact", "bits": act_bits, "alpha_init": 3.0}}})
    with torch.no_grad():
        m(torch.rand(4, width))
    return rt.compile(m.eval(), torch.rand(8, width))


@needs_two
@pytest.mark.parametrize("weight, act_bits", [("binary", 4), ("twn", 4), ("binary", 1)])
def test_packed_mlp_same_bits_on_one_and_two_threads(monkeypatch, weight, act_bits):
    """Every many-row path of a packed Linear chain (table lookup at 8 rows where the layer has
    tables, AMX tiles at 16-96 rows, W1A1's vpopcntq GEMM) on 2 threads, split at every size
    (thresholds at 1), with the rows' quantization split or not and the polling worker on or off:
    the same bits as on 1 thread, and the split observed."""
    numba.set_num_threads(2)
    fast = _packed_mlp(640, act_bits, weight)
    monkeypatch.setattr(KT, "PARALLEL_MIN_WORK", 1)
    monkeypatch.setattr(KA, "AMX_MIN_PARALLEL_MACS", 1)
    monkeypatch.setattr(KA, "VNNI_MIN_PARALLEL_MACS", 1)
    monkeypatch.setattr(KG, "LUT_TABLES_MIN_PARALLEL", 1)
    monkeypatch.setattr(KPC, "W1A1_MIN_PARALLEL", 1)  # W1A1 on vpopcntq, where the CPU has it
    monkeypatch.setattr(KPC, "W1A1_PART_WORK", 1)
    splits: list[int] = []
    real = KT.run_shared

    def spy(n, work, nt):
        splits.append(n)
        real(n, work, nt)

    monkeypatch.setattr(KT, "run_shared", spy)
    for M in (8, 16, 40, 96):
        x = torch.rand(M, 640, generator=torch.Generator().manual_seed(M))
        KT.set_serial(True)
        try:
            splits.clear()
            ref = fast(x)
            assert splits == []  # one thread: nothing split
        finally:
            KT.set_serial(False)
        for spin in (0, 300):
            for rows in (1, 1 << 40):
                monkeypatch.setattr(KT, "SPIN_US", spin)
                monkeypatch.setattr(KA, "AMX_ROWS_MIN_PARALLEL", rows)
                splits.clear()
                got = fast(x)
                assert torch.equal(got, ref), (M, spin, rows)
                assert splits, (M, spin, rows)  # the kernels did split


def test_lut_gemm_same_bits_for_every_cut(monkeypatch):
    """The table-lookup GEMM at 8 rows (its outputs cut over threads) gives the same bits for any
    parts count as one call over all outputs (the AVX path where the CPU has it, else the plain)."""
    rng = np.random.default_rng(3)
    O, K, M = 200, 256, 8
    w = rng.choice([-1, 1], (O, K))
    lv, cb = KG.lut_levels(w)
    wq = KG.lut_pack_weights(w, lv, cb)
    a = rng.integers(0, 16, (M, K)).astype(np.uint8)
    tab = KG.lut_tables(a, lv, cb)
    s0, s1 = rng.standard_normal(O), rng.random(O)
    numba.set_num_threads(2)
    KT.set_serial(True)
    try:
        ref = KG.lut_gemm(tab, wq, O, s0, s1, True)
    finally:
        KT.set_serial(False)
    np.testing.assert_array_equal(ref, KG.lut_gemm_reference(a, w, s0, s1, True))
    for ppt in (1, 2, 4):
        monkeypatch.setattr(KT, "PARTS_PER_THREAD", ppt)
        np.testing.assert_array_equal(KG.lut_gemm(tab, wq, O, s0, s1, True), ref)
