"""The start-up latency profile: sub-nets take turns, and the numbers are the quantile of each
sub-net's own times (a fake clock advanced by the fake sub-nets, so the expected values are exact)."""

from __future__ import annotations

import pytest

from lowbit.serve import profile as prof


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _FakeNet:
    """``run`` advances the clock by ``cost[name] * batch`` ms (+ ``extra`` ms on listed calls)."""

    input_shape = (3,)

    def __init__(self, cost: dict[str, float], clock: _Clock, extra: dict[int, float] | None = None) -> None:
        self.names = list(cost)
        self.cost, self.clock, self.extra = cost, clock, extra or {}
        self.calls: list[tuple[str, int]] = []

    def run(self, x, name):
        self.clock.t += 1e-3 * (self.cost[name] * x.shape[0] + self.extra.get(len(self.calls), 0.0))
        self.calls.append((name, x.shape[0]))
        return x


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(prof.time, "perf_counter", c)
    return c


def test_subnets_take_turns_with_a_rotating_first(clock):
    net = _FakeNet({"a": 1.0, "b": 2.0, "c": 3.0}, clock)
    prof.profile_supernet(net, max_batch=4, repeats=2, warmup=1)
    sizes = [1, 2, 4]
    assert len(net.calls) == 3 * 3 * len(sizes)
    rounds = [net.calls[i * 9:(i + 1) * 9] for i in range(3)]
    firsts = ["abc", "bca", "cab"]
    for r, first in zip(rounds, firsts, strict=True):
        for j, b in enumerate(sizes):
            chunk = r[3 * j:3 * j + 3]
            assert [n for n, _ in chunk] == list(first)
            assert {bb for _, bb in chunk} == {b}


def test_latencies_are_each_subnets_own_quantile_interpolated(clock):
    net = _FakeNet({"a": 1.0, "b": 2.5}, clock)
    p = prof.profile_supernet(net, max_batch=8, repeats=4, warmup=1)
    assert p.latency("a", 1) == pytest.approx(1.0)
    assert p.latency("b", 4) == pytest.approx(10.0)
    assert p.latency("b", 8) == pytest.approx(20.0)
    assert p.latency("a", 6) == pytest.approx(6.0)  # between the measured 4 and 8
    assert p.latency("a", 100) == p.latency("a", 8)


def test_a_slow_spell_lands_on_the_quantile_not_on_one_subnet(clock):
    # 2 sub-nets, 1 size (max_batch 1), 10 timed rounds + 1 warm-up: calls 0-1 warm up, then
    # call 2 + 2i (+ 1) is round i's first (second). A spell slows the calls 8..11 (rounds 3-4):
    # interleaved, it hits both sub-nets twice each; their 0.5 quantiles stay at the clean value.
    net = _FakeNet({"a": 1.0, "b": 1.0}, clock, extra={k: 50.0 for k in range(8, 12)})
    p = prof.profile_supernet(net, max_batch=1, repeats=10, warmup=1, quantile=0.5)
    assert p.latency("a", 1) == pytest.approx(1.0)
    assert p.latency("b", 1) == pytest.approx(1.0)
    p9 = prof.profile_supernet(_FakeNet({"a": 1.0, "b": 1.0}, clock, extra={k: 50.0 for k in range(8, 12)}),
                               max_batch=1, repeats=10, warmup=1, quantile=0.9)
    assert p9.latency("a", 1) == pytest.approx(p9.latency("b", 1))


def test_bad_max_batch():
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        prof.profile_supernet(_FakeNet({"a": 1.0}, _Clock()), max_batch=0)
