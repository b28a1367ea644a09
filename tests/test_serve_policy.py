"""The queue-aware policy (slackfit-queue) on hand-made queues whose answer is known, against a
brute-force re-derivation over all sub-nets; the discrete-event simulation (a closed form, and
slackfit-queue against slackfit on a bursty trace with the CIFAR-10 ResNet-20 supernet's profile);
and the real server process serving with --policy slackfit-queue."""

from __future__ import annotations

import random

import pytest

from lowbit.serve import Decision, make_policy
from lowbit.serve.loadgen import make_trace
from lowbit.serve.policy import cut_batches, plan_met
from lowbit.serve.simulate import simulate

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve import ARGS, _start, supernet_file, trainable  # noqa: E402, F401 - the server fixtures

ACC = {"slow": 0.9, "mid": 0.8, "fast": 0.7}
# ms at batch b = fixed + per-sample cost, b = 1..4
TABLE = {"slow": [10 + 5 * b for b in range(1, 5)], "mid": [6 + 3 * b for b in range(1, 5)],
         "fast": [2 + 1 * b for b in range(1, 5)]}


def lat(s: str, b: int) -> float:
    return TABLE[s][min(b, 4) - 1]


def policy():
    return make_policy("slackfit-queue", ACC, max_batch=4)


def test_when_the_whole_queue_fits_the_most_accurate_serves_a_full_batch() -> None:
    # 8 one-sample requests: slow takes 30 ms per batch of 4, so 30 and 60 ms; all slacks >= 60
    d = policy().decide([1] * 8, [60.0] * 8, lat)
    assert d == Decision("slow", 4, ())
    # slackfit decides on the oldest request alone: the same here
    assert make_policy("slackfit", ACC, 4).decide([1] * 8, [60.0] * 8, lat) == Decision("slow", 4)


def test_a_backlog_makes_it_take_a_cheaper_subnet_where_slackfit_does_not() -> None:
    # the oldest has 100 ms (slow fits it easily), but 12 requests need 3 batches: slow 30/60/90 ms
    # misses the 8 later ones (slack 50 ms), mid 18/36/54 misses the last 4, fast 6/12/18 meets all
    sizes, slack = [1] * 12, [100.0] * 4 + [50.0] * 8
    assert make_policy("slackfit", ACC, 4).decide(sizes, slack, lat) == Decision("slow", 4)
    assert policy().decide(sizes, slack, lat) == Decision("fast", 4, ())
    # with 40 ms more for the last four, mid (54 ms) meets every deadline and is more accurate
    assert policy().decide(sizes, [100.0] * 4 + [50.0] * 4 + [60.0] * 4, lat) == Decision("mid", 4, ())


def test_nothing_fits_sheds_the_hopeless_and_serves_the_rest_with_the_most_deadlines() -> None:
    # request 0 has 3 ms: even fast's first batch (6 ms) ends too late, so no sub-net can meet it;
    # requests 1..4 have 20 ms: fast's first batch (now 1..4) ends at 6; slow's at 30 (too late),
    # mid's at 18 (in time); request 5 has 5 ms, also hopeless once the batch ahead of it runs
    sizes, slack = [1] * 6, [3.0, 20.0, 20.0, 20.0, 20.0, 5.0]
    d = policy().decide(sizes, slack, lat)
    assert d.shed == (0, 5) and d == Decision("mid", 4, (0, 5))
    # everything hopeless: shed all, serve nothing
    assert policy().decide([1, 1], [1.0, 2.0], lat) == Decision(None, 0, (0, 1))


def test_an_arrival_rate_the_accurate_subnet_cannot_keep_up_with_moves_to_a_faster_one() -> None:
    # full batches: slow 4 requests / 30 ms = 0.133 per ms, mid 4 / 18 = 0.222, fast 4 / 6 = 0.667
    p = policy()
    assert p.decide([1] * 4, [100.0] * 4, lat, rate=0.1) == Decision("slow", 4, ())
    assert p.decide([1] * 4, [100.0] * 4, lat, rate=0.2) == Decision("mid", 4, ())
    # no sub-net keeps up: the fastest of those that meet the queue
    assert p.decide([1] * 4, [100.0] * 4, lat, rate=1.0) == Decision("fast", 4, ())
    # slackfit ignores the rate
    assert make_policy("slackfit", ACC, 4).decide([1] * 4, [100.0] * 4, lat, rate=1.0) == Decision("slow", 4)


def _reference(sizes, slack, table, acc, max_batch, rate):
    """The rule written out per request, without the bisect/caching of the implementation."""
    names = sorted(acc, key=lambda n: -acc[n])

    def plan(idx, s):  # finish time of each request of ``idx`` under s, batches of whole requests
        out, t, i = {}, 0.0, 0
        while i < len(idx):
            j, n = i, 0
            while j < len(idx) and (n == 0 or n + sizes[idx[j]] <= max_batch):
                n += sizes[idx[j]]
                j += 1
            t += table[s][min(n, max_batch) - 1]
            out.update({r: t for r in idx[i:j]})
            i = j
        return out

    everyone = list(range(len(sizes)))
    plans = {s: plan(everyone, s) for s in names}
    hopeless = [r for r in everyone if all(plans[s][r] > slack[r] for s in names)]
    keep = [r for r in everyone if r not in hopeless]
    if not keep:
        return None, hopeless
    met = {s: sum(f <= slack[r] for r, f in plan(keep, s).items()) for s in names}
    mean_k = round(sum(sizes[r] for r in keep) / len(keep))
    cap = {s: (max_batch // mean_k) / table[s][max_batch - 1] for s in names}
    w = acc if all(0 < a <= 1 for a in acc.values()) else dict.fromkeys(acc, 1.0)
    fit = [s for s in names if met[s] == len(keep)]
    if fit:
        keeps_up = [s for s in fit if cap[s] >= rate]
        return (keeps_up[0] if keeps_up else max(fit, key=lambda s: (cap[s] * w[s], acc[s]))), hopeless
    return max(names, key=lambda s: (met[s] * w[s], acc[s])), hopeless


def test_decisions_equal_a_brute_force_over_all_subnets_on_random_queues() -> None:
    rng = random.Random(0)
    for trial in range(300):
        max_batch = rng.choice([4, 8, 16])
        # accuracies in (0, 1] weigh the deadlines met; other scores (here percent) only rank
        unit = 100 if trial % 3 == 0 else 1
        acc = {f"s{i}": rng.uniform(0.05, 1) * unit for i in range(rng.randint(1, 4))}
        table = {}
        for s in acc:
            fixed, per = rng.uniform(0.5, 5), rng.uniform(0.1, 2)
            table[s] = [fixed + per * b for b in range(1, max_batch + 1)]
        n = rng.randint(1, 60)
        sizes = [rng.randint(1, max_batch // 2) for _ in range(n)]
        slack = sorted(rng.uniform(-5, 120) for _ in range(n))  # one SLO: serving order = deadline order
        rate = rng.choice([0.0, rng.uniform(0, 3)])
        p = make_policy("slackfit-queue", acc, max_batch)
        d = p.decide(sizes, slack, lambda s, b, t=table, m=max_batch: t[s][min(b, m) - 1], rate)
        want, hopeless = _reference(sizes, slack, table, acc, max_batch, rate)
        assert d.subnet == want and list(d.shed) == hopeless, trial
        if want is not None:  # the batch is the first batch of whole requests of what is left
            left = [sizes[i] for i in range(n) if i not in hopeless]
            assert d.batch == sum(left[: cut_batches(left, max_batch)[0]]), trial


def test_plan_helpers() -> None:
    assert cut_batches([1, 2, 1, 3, 4, 1], 4) == [3, 4, 5, 6]  # 1+2+1 | 3 | 4 | 1
    assert cut_batches([], 4) == []
    assert plan_met([1, 1, 1], [5.0, 5.0, 9.0], [2, 3], [4.0, 4.0]) == [True, True, True]
    assert plan_met([1, 1, 1], [5.0, 5.0, 7.9], [2, 3], [4.0, 4.0]) == [True, True, False]


def test_simulation_matches_a_closed_form() -> None:
    table = {"only": [10.0] * 4}
    eight = [0.0] * 8  # 8 requests at t = 0, batches of 4 take 10 ms
    p = make_policy("fixed:only", {"only": 1.0}, 4)
    r = simulate(p, table, eight, slo_ms=25, reserve_ms=0)
    assert (r["met"], r["shed"], r["served"]) == (8, 0, 8)  # done at 10 and 20 ms
    # SLO 15 ms: the first four end at 10 ms; the next four have 5 ms left < 10: each is shed
    r = simulate(p, table, eight, slo_ms=15, reserve_ms=0, trace=True)
    assert (r["met"], r["shed"], r["served"]) == (4, 4, 4) and r["slo_attainment"] == 0.5
    assert [d["subnet"] for d in r["decisions"]] == ["only"] + [None] * 4
    # a queue of at most 2: of 8 simultaneous arrivals 6 are refused at the door
    r = simulate(p, table, eight, slo_ms=25, reserve_ms=0, max_queue=2)
    assert (r["met"], r["refused"]) == (2, 6)


# Median ms of the CIFAR-10 ResNet-20 bit-width supernet's sub-nets (runs/supernet_r20_cifar,
# packed runtime, one thread) at batches 1, 2, 4, 8, 16, 24, 32, timed side by side (15 shuffled
# rounds) on the 2-core machine under load; validation accuracies from its file. b2 is as fast as
# b4 in the packed runtime, b8 about 1.8x slower at 32.
R20_SIZES = [1, 2, 4, 8, 16, 24, 32]
R20_MS = {"b2": [1.08, 1.63, 2.17, 7.44, 10.21, 17.63, 21.27],
          "b4": [1.12, 1.61, 2.2, 5.07, 10.77, 15.19, 20.6],
          "b8": [1.53, 2.19, 3.53, 9.83, 15.66, 28.87, 36.36]}
R20_ACC = {"b2": 0.7126, "b4": 0.8214, "b8": 0.8254}


def _r20_table() -> dict[str, list[float]]:
    out = {}
    for n, pts in R20_MS.items():
        row = []
        for b in range(1, 33):
            lo = max(i for i, s in enumerate(R20_SIZES) if s <= b)
            hi = min(i for i, s in enumerate(R20_SIZES) if s >= b)
            f = 0.0 if hi == lo else (b - R20_SIZES[lo]) / (R20_SIZES[hi] - R20_SIZES[lo])
            row.append(pts[lo] + f * (pts[hi] - pts[lo]))
        out[n] = row
    return out


def test_simulated_bursty_trace_queue_aware_meets_more_deadlines_than_slackfit() -> None:
    from lowbit.serve.bench import capacity_rps

    ms = _r20_table()
    rate = 1.2 * capacity_rps(ms["b8"], 8)  # 8 samples per request, 1.2 x b8's capacity
    met, n, mix = {}, 0, {}
    for seed in range(3):
        arr = make_trace("bursty", rate, 10, seed=seed)
        n += len(arr)
        for pol in ("slackfit", "slackfit-queue", "fixed:b8"):
            r = simulate(make_policy(pol, R20_ACC, 32), ms, arr, slo_ms=500, samples=8, accuracy=R20_ACC,
                         sigma=0.3, seed=seed, rate_window_ms=100)
            met[pol] = met.get(pol, 0) + r["met"]
            mix[pol] = r["mix"]
    share = {p: m / n for p, m in met.items()}
    # measured: slackfit 0.78, slackfit-queue 0.97, fixed:b8 0.68; slackfit serves b8 most of the time
    assert share["slackfit-queue"] > share["slackfit"] + 0.1, share
    assert share["slackfit"] < 0.85 and share["slackfit-queue"] > 0.93, share
    assert mix["slackfit"]["b8"] > 0.6 and mix["slackfit-queue"]["b8"] < mix["slackfit"]["b8"], mix


def test_server_serves_with_slackfit_queue_and_logs_its_decisions(supernet_file) -> None:  # noqa: F811
    from lowbit.serve.bench import stop_server

    url, proc = _start(supernet_file, [*ARGS, "--policy", "slackfit-queue"])
    try:
        assert httpx.get(f"{url}/health").json()["policy"] == "slackfit-queue"
        r = httpx.post(f"{url}/predict", json={"inputs": [[[[0.0] * 28] * 28]] * 2})
        assert r.status_code == 200 and r.json()["subnet"] == "big" and r.json()["batch"] == 2, r.text
        r = httpx.post(f"{url}/predict", json={"inputs": [[[0.0] * 28] * 28]}, headers={"x-slo-ms": "0.001"})
        assert r.status_code == 503 and "deadline cannot be met" in r.json()["error"]
        m = httpx.get(f"{url}/metrics", params={"decisions": 10}).json()
        log = m["decision_log"]
        assert [d["subnet"] for d in log] == ["big", None] and [d["shed"] for d in log] == [0, 1]
        assert log[0]["samples"] == 2 and m["shed"] == 1 and m["decisions"] == 2
        assert 0 < log[0]["run_ms"] <= log[0]["oldest_ms"] and "run_ms" not in log[1]  # a shed: no batch
        assert httpx.get(f"{url}/metrics", params={"decisions": "x"}).status_code == 400
    finally:
        assert stop_server(proc) == 0


def test_report_states_the_machine_the_policies_and_a_given_rate(tmp_path) -> None:
    from lowbit.serve.bench import write_report
    from lowbit.serve.loadgen import Record, summarize

    recs = [Record(0, 200, 10, "a"), Record(0, 200, 50, "b"), Record(0, 503, 1, None)]
    dec = {"decisions": 3, "complete": True, "by_subnet": {"a": {"batches": 2, "median_queue": 1,
                                                                 "median_slack_ms": 20.0}},
           "shed_by_decisions": 1, "decide_us_median": 40.0, "decide_us_max": 90.0, "scale_median": 1.1,
           "run_ms_median": 3.5, "oldest_ms_median": 9.0, "oldest_ms_p99": 30.0}
    runs = [{"policy": p, "trace": "bursty", **summarize(recs, 30, {"a": 0.9, "b": 0.99}, 2),
             "server_decisions": dec} for p in ("slackfit-queue", "fixed:a")]
    basis = {"load": 1.5, "subnet": "b", "rate": 15.0, "capacity_rps": {"a": 40.0, "b": 10.0}, "given": True,
             "profile_ms_at_max_batch": {"a": 1.0, "b": 4.0}}
    settings = {"rate": 15.0, "duration_s": 2, "slo_ms": 30, "max_batch": 4, "seed": 0, "traces": ["bursty"],
                "policies": ["slackfit-queue", "fixed:a"], "samples_per_request": 1, "runtime": "packed",
                "rate_basis": basis, "load_average_before": (2.0, 2.0, 2.0), "load_average": (3.0, 3.0, 3.0),
                "cpus": 2, "note": "campaign paused"}
    write_report({"runs": runs, "server_exit_status": {}, "settings": settings}, tmp_path, "r")
    md = (tmp_path / "r.md").read_text()
    assert "Rate given (--rate): 15.0 req/s = 1.50 x the capacity of the most accurate sub-net b" in md
    assert "150% of b's capacity" in md
    assert "bursts (3x the mean for a quarter of every second) 1.1x, 4.5x" in md
    assert "Machine: 2 CPUs, load average (1, 5, 15 min) 2.0, 2.0, 2.0 before" in md
    assert "campaign paused" in md
    assert "- `slackfit-queue`: the most accurate sub-net whose plan for the WHOLE queue" in md
    assert "- `fixed:<name>`: SlackFit with that sub-net only" in md and "`slackfit`:" not in md
    assert "| bursty | 0 | slackfit-queue | a 2 (1, 20) | 1 | 40 / 90 | 1.10 | 3.5 | 9 / 30 |" in md
