"""The speed harness's timing rule (benchmarks/speed/harness.py): with ``turns`` every method's timed
call comes after a settle and an untimed call of the same method, never right after another
method's call; the settle waits until the process's other threads stop using CPU. Fake clocks and
fake thread-CPU counters: no wall-clock assertions."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "speed"))

import harness


class World:
    """A fake clock and an event log. A method's call takes 1 ms after its own call, 5 ms after the
    settle (cold caches) and 50 ms right after another method's call (its threads still spinning)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.log: list[str] = []

    def clock(self) -> float:
        return self.now

    def settle(self) -> float:
        self.log.append("settle")
        self.now += 0.02
        return 0.02

    def method(self, name: str):
        def call() -> None:
            prev = self.log[-1] if self.log else name
            self.now += 1e-3 if prev == name else 5e-3 if prev == "settle" else 50e-3
            self.log.append(name)

        return call


def test_turns_time_each_method_after_a_settle_and_its_own_untimed_call():
    w = World()
    fns = {k: w.method(k) for k in "abc"}
    t = harness.time_interleaved(fns, max_rounds=6, budget_s=1e9, seed=3, turns=True, clock=w.clock,
                                 settle_fn=w.settle)
    warmup = w.log[:6]  # two untimed warm-up rounds of one plain call each
    assert sorted(warmup) == ["a", "a", "b", "b", "c", "c"]
    turns = w.log[6:]
    assert len(turns) == 6 * 3 * 3
    for i in range(0, len(turns), 3):  # every turn: settle, call, call of the same method
        s, warm, timed = turns[i : i + 3]
        assert s == "settle" and warm == timed and warm in fns
    # only the turn's second call is timed: 1 ms each; the warm call (5 ms) and the settle never count
    for k in fns:
        for s in ("median_s", "min_s", "p90_s"):
            assert t[k][s] == pytest.approx(1e-3)
        assert t[k]["rounds"] == 6
        assert t[k]["settle_s"] == pytest.approx(6 * 3 * 0.02)


def test_plain_rounds_charge_a_method_for_the_previous_one():
    """The rule the turns replace: each timed call follows another method's (after the first in a
    round, and across rounds), so the medians carry the 50 ms contamination."""
    w = World()
    fns = {k: w.method(k) for k in "abc"}
    t = harness.time_interleaved(fns, max_rounds=8, budget_s=1e9, seed=3, clock=w.clock,
                                 settle_fn=w.settle)
    assert "settle" not in w.log
    assert max(t[k]["median_s"] for k in fns) == pytest.approx(50e-3)
    assert "settle_s" not in t["a"]


def test_turns_budget_counts_both_calls_of_a_turn():
    w = World()
    fns = {k: w.method(k) for k in "ab"}
    # the first warm-up round costs 1 + 50 ms (b after a), the second 50 + 50 ms; the faster sets the
    # rounds: two calls per turn and 2 ms of warm calls per method -> 1.05 s / (2 * 51 + 4 ms) -> 9
    t = harness.time_interleaved(fns, max_rounds=100, budget_s=1.05, seed=0, turns=True, clock=w.clock,
                                 settle_fn=w.settle)
    assert t["a"]["rounds"] == 9


class Threads:
    """Fake clock, sleep and other-thread CPU: one other thread spins (1 core) until ``stop``."""

    def __init__(self, stop: float | None) -> None:
        self.now, self.stop, self.sleeps = 0.0, stop, []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def others(self) -> float:
        return self.now if self.stop is None else min(self.now, self.stop)


def test_settle_waits_until_other_threads_are_idle():
    th = Threads(stop=0.030)  # a pool spinning for 30 ms after the previous call
    waited = harness.settle(th.clock, th.sleep, th.others, lambda: 1)
    w = harness.SETTLE_WINDOW_S
    # the first window after the spin stopped that saw (almost) no CPU ends the settle
    assert 0.030 + w <= waited + 1e-12 <= 0.030 + 2 * w + 1e-12
    assert all(s == w for s in th.sleeps)


def test_settle_returns_after_one_window_when_idle_and_is_bounded():
    idle = Threads(stop=0.0)
    waited = harness.settle(idle.clock, idle.sleep, idle.others, lambda: 1)
    assert waited == pytest.approx(harness.SETTLE_WINDOW_S)
    busy = Threads(stop=None)  # never parks
    waited = harness.settle(busy.clock, busy.sleep, busy.others, lambda: 1)
    assert harness.SETTLE_MAX_S <= waited < harness.SETTLE_MAX_S + harness.SETTLE_WINDOW_S + 1e-12
    blind = Threads(stop=0.0)  # no /proc: one maximal sleep
    assert harness.settle(blind.clock, blind.sleep, lambda: None, lambda: None) == harness.SETTLE_MAX_S
    assert blind.sleeps == [harness.SETTLE_MAX_S]


def test_settle_does_not_sleep_when_no_other_thread_runs():
    th = Threads(stop=None)
    assert harness.settle(th.clock, th.sleep, th.others, lambda: 0) == 0.0 and th.sleeps == []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_others_running_sees_a_spinning_thread_not_a_waiting_one():
    time.sleep(0.05)
    before = harness.others_running()
    idle = threading.Event()
    waiter = threading.Thread(target=idle.wait)  # parked: state S
    waiter.start()
    try:
        time.sleep(0.05)
        assert harness.others_running() == before
    finally:
        idle.set()
        waiter.join()
    stop = threading.Event()
    data = b"x" * (1 << 24)

    def spin() -> None:  # hashing a large buffer runs without the GIL: state R, as a spinning pool
        while not stop.is_set():
            hashlib.sha256(data).digest()

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        time.sleep(0.01)
        seen = max(harness.others_running() for _ in range(50))
    finally:
        stop.set()
        spinner.join()
    assert seen >= before + 1


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_others_cpu_counts_other_threads_not_the_caller():
    c0, p0 = harness.others_cpu_s(), time.thread_time()
    x = 0
    while time.thread_time() - p0 < 0.05:  # the caller busy: not counted
        x += 1
    own = harness.others_cpu_s() - c0
    assert own < 0.5 * (time.thread_time() - p0)
    stop, done = threading.Event(), threading.Event()
    spun: list[float] = []

    def spin() -> None:
        t = time.thread_time()
        while not stop.is_set():
            pass
        spun.append(time.thread_time() - t)
        done.wait()  # alive until read: an ended thread leaves /proc/self/task

    c1 = harness.others_cpu_s()
    th = threading.Thread(target=spin)
    th.start()
    time.sleep(0.1)  # the caller asleep, the spinner running
    stop.set()
    while not spun:
        time.sleep(0.001)
    got = harness.others_cpu_s() - c1
    done.set()
    th.join()
    assert spun[0] > 0 and got >= 0.9 * spun[0]


def test_turns_warm_up_for_warm_s_before_the_timed_call():
    """Calls of 1 ms (5 ms right after the settle): with warm_s 8 ms a turn is the settle, four
    untimed calls (5 + 1 + 1 + 1 = 8 ms), then the timed call (1 ms)."""
    w = World()
    fns = {k: w.method(k) for k in "ab"}
    t = harness.time_interleaved(fns, max_rounds=3, budget_s=1e9, seed=1, turns=True, clock=w.clock,
                                 settle_fn=w.settle, warm_s=8e-3)
    turns = w.log[4:]  # after the two plain warm-up rounds
    assert len(turns) == 3 * 2 * 6
    for i in range(0, len(turns), 6):
        assert turns[i] == "settle" and len(set(turns[i + 1 : i + 6])) == 1
    assert t["a"]["median_s"] == pytest.approx(1e-3) and t["b"]["rounds"] == 3


class Spinners:
    """A fake clock and fake running threads: the threads in ``spin`` run until ``until[tid]``
    seconds; each call of the method takes 3 ms."""

    def __init__(self, until: dict[str, float]) -> None:
        self.now = 0.0
        self.until = until
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def running(self) -> set[str]:
        return {t for t, end in self.until.items() if self.now < end}

    def call(self) -> None:
        self.calls += 1
        self.now += 3e-3


def test_settle_running_calls_the_method_until_the_spinning_threads_stop():
    w = Spinners({"ort-1": 0.040, "ort-2": 0.025})
    ran = harness.settle_running(w.call, w.clock, w.running)
    # calls of 3 ms, checked every SETTLE_WINDOW_S (4 ms): the first check after 40 ms sees both stopped
    assert 0.040 <= ran < 0.040 + 2 * harness.SETTLE_WINDOW_S + 3e-3
    assert w.calls == round(ran / 3e-3)


def test_settle_running_ignores_threads_that_start_later_and_stops_at_the_cap():
    w = Spinners({"ort-1": 0.010, "own": 1e9})
    w.until["own"] = 1e9
    # "own" (the method's own pool) runs too, but it was spinning at the start: it is waited for ...
    assert harness.settle_running(w.call, w.clock, w.running) == pytest.approx(harness.SETTLE_MAX_S, abs=4e-3)
    # ... while a thread that was not running at the start is not
    w2 = Spinners({"ort-1": 0.010})
    start_running = w2.running()
    w2.until["late"] = 1e9

    def running() -> set[str]:
        return w2.running() if w2.calls else start_running

    assert harness.settle_running(w2.call, w2.clock, running) < 0.010 + 2 * harness.SETTLE_WINDOW_S + 3e-3


def test_settle_running_without_spinning_threads_makes_no_call():
    w = Spinners({})
    assert harness.settle_running(w.call, w.clock, w.running) == 0.0 and w.calls == 0
    assert harness.settle_running(w.call, w.clock, lambda: None) == 0.0 and w.calls == 0


def test_turns_settle_by_running_by_default(monkeypatch):
    w = Spinners({"ort-1": 0.5})  # spins through the warm-up rounds and the first turns
    monkeypatch.setattr(harness, "running_tids", w.running)
    t = harness.time_interleaved({"a": w.call}, max_rounds=3, budget_s=1e9, turns=True, clock=w.clock,
                                 warm_s=0.0)
    assert t["a"]["rounds"] == 3 and t["a"]["median_s"] == pytest.approx(3e-3)
    # the first turn ran the method (no sleep) until the cap, the second until the spinner stopped
    assert w.calls == 2 + round(t["a"]["settle_s"] / 3e-3) + 3 * 2
    assert 0.5 - 0.006 - 3e-3 <= t["a"]["settle_s"] <= 0.5 + 2 * harness.SETTLE_WINDOW_S
