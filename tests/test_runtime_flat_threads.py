"""The flat executor's thread rule (``executor.split_step``): a batch is split over threads only
where each thread's share of the work (images x the program's measured time per image) reaches
``MIN_THREAD_WORK_S``; batch 1 always runs on the calling thread. Observed through the threads
that call the interpreter; outputs are the same bit for bit whichever way a batch runs, and
``LOWBIT_FLAT_MIN_THREAD_US=0`` (``MIN_THREAD_WORK_S = 0``) restores the split by image count."""

from __future__ import annotations

import math
import threading

import numba
import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit.models import build_model
from lowbit.runtime import executor as E
from lowbit.runtime import kernels as K

needs_vnni = pytest.mark.skipif(not K.HAS_VNNI, reason="int8 kernels need AVX-512 VNNI")
needs_two = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
ACT = {"method": "pact", "bits": 4, "alpha_init": 3.0}
SHAPE = (1, 28, 28)


def test_split_step_rule():
    us = 1e-6
    # one thread, or fewer than MIN_SPLIT images per thread: never split
    assert E.split_step(64, 1, 1.0, 64, 100 * us) == 0
    assert E.split_step(1, 2, 1.0, 64, 100 * us) == 0
    assert E.split_step(3, 2, 1.0, 64, 0.0) == 0
    # work below a thread's minimum share: serial; at it: split
    assert E.split_step(8, 2, 20 * us, 64, 100 * us) == 0  # 160 us < 2 x 100 us
    assert E.split_step(10, 2, 20 * us, 64, 100 * us) == 3  # 200 us: pieces of >= 50 us (3 images)
    assert E.split_step(4, 2, 120 * us, 4, 100 * us) == 1  # ResNet-20-sized images: one each
    # unknown time per image: serial unless the rule is off
    assert E.split_step(256, 2, math.inf, 64, 100 * us) == 0
    # the rule off: the old pieces (PIECES_PER_THREAD per thread, at most a chunk)
    assert E.split_step(4, 2, math.inf, 64, 0.0) == 1
    assert E.split_step(256, 2, math.inf, 64, 0.0) == 32
    assert E.split_step(256, 2, math.inf, 16, 0.0) == 16
    # pieces never exceed a chunk
    assert E.split_step(256, 2, 1 * us, 16, 100 * us) == 16


def test_share_is_at_least_a_few_handoffs_of_this_machine(monkeypatch):
    """Without an explicit share the rule also asks HANDOFF_SHARE hand-offs per thread, measured once
    per process: with a 70 us hand-off LeNet-5's 64 images (4.4 us each) stay on one thread, ResNet-20's
    4 (200 us each) split; the environment's share and an explicit one are taken as they are."""
    us = 1e-6
    monkeypatch.setattr(E, "SHARE_FROM_ENV", False)
    monkeypatch.setattr(E, "MIN_THREAD_WORK_S", 100 * us)
    monkeypatch.setattr(E, "_HANDOFF_S", 70 * us)
    assert E.thread_share_s() == pytest.approx(210 * us)
    assert E.split_step(64, 2, 4.4 * us, 64) == 0
    assert E.split_step(4, 2, 200 * us, 64) > 0
    assert E.split_step(64, 2, 4.4 * us, 64, 100 * us) > 0  # an explicit share: no floor
    monkeypatch.setattr(E, "SHARE_FROM_ENV", True)  # LOWBIT_FLAT_MIN_THREAD_US's share, as set
    assert E.thread_share_s() == pytest.approx(100 * us) and E.split_step(64, 2, 4.4 * us, 64) > 0
    monkeypatch.setattr(E, "SHARE_FROM_ENV", False)
    monkeypatch.setattr(E, "MIN_THREAD_WORK_S", 0.0)  # 0: split by image count, as before the rule
    assert E.thread_share_s() == 0.0 and E.split_step(64, 2, 4.4 * us, 64) > 0
    monkeypatch.setattr(E, "_HANDOFF_S", None)
    h = E.handoff_s()
    assert 0.0 < h < 1.0 and E.handoff_s() == h  # measured once, then kept


def test_min_thread_env(monkeypatch):
    monkeypatch.delenv("LOWBIT_FLAT_MIN_THREAD_US", raising=False)
    assert E._min_thread_work_s() == pytest.approx(100e-6)
    monkeypatch.setenv("LOWBIT_FLAT_MIN_THREAD_US", "0")
    assert E._min_thread_work_s() == 0.0
    monkeypatch.setenv("LOWBIT_FLAT_MIN_THREAD_US", "250")
    assert E._min_thread_work_s() == pytest.approx(250e-6)
    for bad in ("-1", "fast", "nan", "inf"):
        monkeypatch.setenv("LOWBIT_FLAT_MIN_THREAD_US", bad)
        with pytest.raises(ValueError, match="LOWBIT_FLAT_MIN_THREAD_US"):
            E._min_thread_work_s()


@pytest.fixture
def two_threads():
    nt, nn_ = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(2)
    numba.set_num_threads(2)
    yield
    numba.set_num_threads(nn_)
    torch.set_num_threads(nt)


def _spy(monkeypatch) -> list[int]:
    """The threads that run the interpreter, one entry per call of ``_run`` / ``_run_at`` from
    Python (install after both are compiled: ``_run_at`` calls ``_run`` inside numba)."""
    seen: list[int] = []
    for name in ("_run", "_run_at"):
        fn = getattr(E, name)

        def spy(*a, fn=fn):
            seen.append(threading.get_ident())
            return fn(*a)

        monkeypatch.setattr(E, name, spy)
    return seen


def _pool_threads() -> set[int]:
    """The runtime's worker threads: the pool's and the polling worker (``FLAT_POLL``)."""
    from lowbit.runtime import kernels_threads as KT

    pool = KT.thread_pool(2)
    spin = {t.ident for t in threading.enumerate() if t.name == "lowbit-rt-spin"}
    return {t.ident for t in pool._threads} | spin


def _lenet():
    torch.manual_seed(0)
    m = build_model("lenet5").eval()
    q = lowbit.quantize(m, {"default": {"weight": {"method": "binary", "bits": 1}, "activation": ACT}}).eval()
    return rt.compile(q, torch.rand(2, *SHAPE))


@needs_vnni
@needs_two
def test_threads_by_work(two_threads, monkeypatch):
    packed = _lenet()
    ex = packed.executor
    me = threading.get_ident()
    xs = {B: 3 * torch.rand(B, *SHAPE, generator=torch.Generator().manual_seed(B)) for B in (1, 4, 256)}
    serial = {}
    for B, x in xs.items():  # serial runs: the reference outputs and the time per image
        monkeypatch.setattr(E, "MIN_THREAD_WORK_S", math.inf)
        serial[B] = [packed(x) for _ in range(3)][-1]
    calls = _spy(monkeypatch)
    prog = ex.program(SHAPE)
    assert math.isfinite(prog.t_img) and prog.t_img > 0  # the serial calls measured it
    # the rule on a fixed time per image (the measured one depends on the machine's load): LeNet-5's
    # ~15 us on a quiet core; later serial calls may only lower it
    prog.t_img = 15e-6
    monkeypatch.setattr(E, "MIN_THREAD_WORK_S", 100e-6)
    for B in (1, 4):
        for _ in range(3):
            calls.clear()
            y = packed(xs[B])
            assert set(calls) == {me}, B  # the calling thread alone
            assert torch.equal(y, serial[B])
            if B == 4:
                assert ex.last_threads == 1
    # batch 256 (~4 ms): both threads take pieces
    calls.clear()
    y = packed(xs[256])
    # 8 pieces of 32 images (PIECES_PER_THREAD per thread) taken by the calling thread and the
    # worker (which of them takes how many depends on the OS's scheduling)
    assert ex.last_threads == 2 and len(calls) == 8
    assert set(calls) <= {me, *_pool_threads()}
    assert torch.equal(y, serial[256])
    # handed to the pool's sleeping workers instead of the polling one: the same pieces, the same bits
    monkeypatch.setattr(E, "FLAT_POLL", 0)
    calls.clear()
    assert torch.equal(packed(xs[256]), serial[256]) and len(calls) == 8
    assert set(calls) <= {me, *_pool_threads()}
    monkeypatch.setattr(E, "FLAT_POLL", 1)
    # the override: no work minimum, batch 4 is split by image count as before the rule
    monkeypatch.setattr(E, "MIN_THREAD_WORK_S", 0.0)
    calls.clear()
    y = packed(xs[4])
    assert ex.last_threads == 2 and len(calls) == 4 and torch.equal(y, serial[4])
    # batch 1 stays on the calling thread even then
    calls.clear()
    assert torch.equal(packed(xs[1]), serial[1]) and set(calls) == {me}
