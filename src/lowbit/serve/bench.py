"""``lowbit bench serve``: every policy against every trace, on the loopback interface.

For each policy a ``lowbit serve`` process is started on a free port (it profiles its sub-nets,
then answers ``/health``), all before any load; then every trace is replayed by the load generator
(:mod:`lowbit.serve.loadgen`) against each server in turn (trace-major order, so a change in the
machine's background load affects all policies alike), with a pause between replays so queues
drain; at the end every server is stopped with SIGTERM and its exit status recorded. Per policy
and trace: SLO attainment, served accuracy (mix-weighted test accuracy recorded in the supernet
file) and throughput.

The mean rate is given (``rate``) or set from the servers' own start-up latency profiles
(``rate=None``): ``load`` times the capacity of the most accurate sub-net, the most requests per
second it can serve at any batch of whole requests, ``max_k k / lat(k * samples)`` for
``k * samples <= max_batch``. With ``load > 1`` that sub-net alone cannot keep up, so queues build
and the policies must trade accuracy for deadlines (the bursty trace triples the rate for a quarter
of every second, the ramp ends at 1.8 times the mean). A given rate is reported against the same
profile's capacities. The profile is a 90th percentile of a few runs at start-up, so on a busy
machine it can be off by 2x from one start to the next; a rate given from measured batch times is
then the steadier basis.

Resume: with a partial-results file (``<out>/<stem>.partial.jsonl``, :func:`partial_path`) every
finished (policy, trace, seed) run is appended to it as one JSON line, flushed to disk, so a killed
load test loses at most the run in progress (a torn last line is skipped when read back). Its first
line holds the settings (the supernet file's SHA-256, SLO, rate or load, durations, policies,
traces, seeds, runtime, profile settings, the lowbit commit) and the rate basis. ``resume=True``
keeps the runs of a file with the same settings and measures the rest at the same rate, against
the same rate basis (the first run's profile); other settings are refused, naming what differs.
Without ``resume`` an existing file is refused unless ``overwrite``. Every server writes the latency
profile it plans with (``lowbit serve --save-profile``), and the process's line in the partial file
keeps it (``server_profiles``, per policy); a resumed process starts each server with ``--profile``
from the first recorded profile of its policy instead of profiling again (a start-up profile can be
off by 2x from one start to the next), so every run of a policy plans with one profile:
``same_server_profiles`` in the results is true when the recorded profiles say so. Each process's
profiles, and which process measured each run, are in the results. The callers delete the file
once the report is written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text
from .file import load_supernet
from .loadgen import make_trace, replay, summarize
from .profile import file_sha256, read_profile, save_profile

__all__ = ["POLICY_DEFINITIONS", "capacity_rps", "free_port", "partial_path", "read_partial",
           "run_serve_bench", "start_server", "stop_server"]

log = logging.getLogger(__name__)

POLICY_DEFINITIONS = {
    "slackfit": "SlackFit (SuperServe): the largest batch first, served by the most accurate sub-net "
                "whose profiled latency fits the slack of the OLDEST queued request; the oldest is shed "
                "when nothing fits it even at batch 1",
    "slackfit-queue": "the most accurate sub-net whose plan for the WHOLE queue (FIFO batches of max "
                      "batch) meets every queued deadline and whose full-batch rate keeps up with the "
                      "last 100 ms of arrivals; requests no sub-net's plan can meet are shed at once; "
                      "otherwise the most correct answers (accuracy x deadlines met, or x rate)",
    "max-accuracy": "SlackFit with the most accurate sub-net only (a smaller batch instead of a cheaper "
                    "sub-net)",
    "fixed:<name>": "SlackFit with that sub-net only",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    path: str | os.PathLike[str], port: int, args: Sequence[str] = (), timeout_s: float = 120.0
) -> subprocess.Popen[bytes]:
    """``python -m lowbit.cli serve PATH --port PORT ARGS``; returns once ``/health`` answers. The
    server's output goes to a temporary file (a pipe nobody reads would block it when full); its
    tail is in the error if the server dies first."""
    import httpx

    from .app import PARENT_ENV

    env = {**os.environ, "OMP_NUM_THREADS": "1", PARENT_ENV: str(os.getpid())}  # it ends with us
    cmd = [sys.executable, "-m", "lowbit.cli", "serve", str(path), "--port", str(port), *args]
    out = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out.seek(0)
            text = out.read().decode(errors="replace")
            out.close()
            raise RuntimeError(f"server exited with status {proc.returncode} before answering: "
                               f"{text[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                proc.lowbit_output = out  # type: ignore[attr-defined]  # closed by stop_server
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    out.close()
    raise RuntimeError(f"server did not answer /health within {timeout_s:g} s")


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
    """SIGTERM, then wait; returns the exit status (killed after ``timeout_s``: -9)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9
    finally:
        out = getattr(proc, "lowbit_output", None)
        if out is not None:
            out.close()


def capacity_rps(ms: Sequence[float], samples: int) -> float:
    """The most requests of ``samples`` samples per second a sub-net serves, from its profile
    (``ms[b - 1]``: milliseconds at batch ``b``): ``max_k 1000 k / ms[k * samples - 1]``."""
    if not 1 <= samples <= len(ms):
        raise ValueError(f"capacity: {samples} samples per request do not fit a batch of at most {len(ms)}")
    return max(1e3 * k / ms[k * samples - 1] for k in range(1, len(ms) // samples + 1))


def _rate_basis(url: str, samples: int, load: float) -> dict[str, Any]:
    """The rate ``load`` x the capacity of the most accurate sub-net, from a server's /metrics."""
    import httpx

    m = httpx.get(f"{url}/metrics", timeout=10.0).json()
    acc, prof = m["accuracy"], m["profile_ms"]
    top = max(acc, key=lambda n: acc[n])
    caps = {n: round(capacity_rps(prof[n], samples), 2) for n in prof}
    return {"load": load, "subnet": top, "rate": load * caps[top], "capacity_rps": caps,
            "profile_ms_at_max_batch": {n: prof[n][-1] for n in prof}}


def _decisions_since(url: str, seq: int) -> dict[str, Any]:
    """A summary of the server's decisions numbered ``seq`` on (its ``/metrics?decisions=N`` log):
    per sub-net the batches and the median queue (requests) and oldest slack (ms) when it was
    chosen; the requests shed by decisions; the median and largest decision cost (us) and the
    median latency scale."""
    import httpx

    m = httpx.get(f"{url}/metrics", params={"decisions": 20_000}, timeout=30.0).json()
    rows = [d for d in m.get("decision_log", []) if d["seq"] >= seq]
    by: dict[str, list[dict[str, Any]]] = {}
    for d in rows:
        if d["subnet"] is not None:
            by.setdefault(d["subnet"], []).append(d)

    oldest = sorted(d["oldest_ms"] for d in rows if "oldest_ms" in d)

    def med(v: list[float]) -> float:
        v = sorted(v)
        return v[len(v) // 2] if v else math.nan

    return {
        "decisions": len(rows),
        "complete": bool(rows) and rows[0]["seq"] == seq,  # the log is bounded: older ones may be gone
        "by_subnet": {n: {"batches": len(ds), "median_queue": med([d["queue"] for d in ds]),
                          "median_slack_ms": med([d["slack_ms"] for d in ds])}
                      for n, ds in sorted(by.items())},
        "shed_by_decisions": sum(d["shed"] for d in rows),
        "decide_us_median": med([d["decide_us"] for d in rows]),
        "decide_us_max": max((d["decide_us"] for d in rows), default=math.nan),
        "scale_median": med([d["scale"] for d in rows]),
        "run_ms_median": med([d["run_ms"] for d in rows if "run_ms" in d]),
        # in-server time of each batch's oldest request (arrival in the queue to its batch's end): the
        # part of the client's latency that the batching queue and the policy account for
        "oldest_ms_median": med(oldest),
        "oldest_ms_p99": oldest[int(0.99 * len(oldest))] if oldest else math.nan,
    }


def partial_path(out: str | os.PathLike[str], stem: str = "serve") -> Path:
    """Where ``lowbit bench serve --out OUT --stem STEM`` keeps its finished runs until the report."""
    return Path(out) / f"{stem}.partial.jsonl"


def read_partial(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], bool]:
    """The records of a partial-results file and whether its last line was torn (a kill while it was
    appended: that line is left out). A bad line before the last one is a ValueError."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    tail = lines.pop()  # after the last newline: "" unless an append was cut short
    records = []
    for i, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if i < len(lines):
                raise ValueError(f"{path} line {i} is not JSON ({e}); delete the file (or pass --overwrite) "
                                 "to start the load test again") from None
            tail = line  # a torn line that happens to end in a newline
    return records, bool(tail)


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, on disk before this returns: a kill leaves the line whole or torn, never a
    torn line that reads back as valid."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _claim_partial(
    path: Path, settings: dict[str, Any], resume: bool, overwrite: bool
) -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[dict[str, Any]]]:
    """(header, processes, finished runs) of the partial file that this load test may continue:
    nothing for a fresh start. Refuses a file without ``resume`` (unless ``overwrite``, which deletes
    it) and one made with other settings."""
    if not path.is_file():
        return None, [], []
    if not resume:
        if not overwrite:
            raise ValueError(f"{path} holds the finished runs of an earlier load test; pass --resume to "
                             "continue it, --overwrite to start again (the file is deleted), or choose "
                             "another --stem or --out")
        path.unlink()
        log.info("%s: the earlier load test's runs were deleted (--overwrite)", path)
        return None, [], []
    records, torn = read_partial(path)
    if not records or records[0].get("kind") != "header":
        raise ValueError(f"{path} has no settings line: it is not a lowbit bench serve partial-results file; "
                         "pass --overwrite to replace it, or choose another --stem or --out")
    header = records[0]
    was = header["settings"]
    now = json.loads(json.dumps(settings, sort_keys=True, default=str))  # as it reads back
    if was != now:
        changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        raise ValueError(f"{path} was measured with other settings: "
                         + "; ".join(f"{k} was {was.get(k)!r}, now {now.get(k)!r}" for k in changed)
                         + ". Drop --resume (and pass --overwrite) to start again, or pass another --stem "
                         "or --out to keep both")
    if torn:  # rewritten without the torn line, so the next append starts on a line of its own
        log.warning("%s: the last line was cut short by a kill; that run is measured again", path)
        atomic_write_text(path, "".join(json.dumps(r, default=float) + "\n" for r in records))
    processes = [r for r in records if r.get("kind") == "process"]
    runs = [r["run"] for r in records if r.get("kind") == "run"]
    log.info("%s: resuming, %d run(s) already measured by %d process(es)", path, len(runs), len(processes))
    return header, processes, runs


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_serve_bench(
    path: str | os.PathLike[str],
    policies: Sequence[str],
    traces: Sequence[str],
    rate: float | None,
    duration: float,
    slo_ms: float,
    max_batch: int = 32,
    seed: int = 0,
    max_requests: int = 5000,
    pause_s: float = 1.0,
    samples: int = 32,
    max_in_flight: int = 64,
    profile_repeats: int = 10,
    runtime: str = "packed",
    load: float = 1.2,
    repeats: int = 2,
    note: str = "",
    partial: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Results ``{"runs": [{policy, trace, seed, **summary}], "accuracy", "settings", "processes"}``.
    Each request carries ``samples`` samples; the client keeps at most ``max_in_flight`` connections;
    every server runs its sub-nets on ``runtime`` (``lowbit serve --runtime``). ``rate=None``: ``load``
    times the capacity of the most accurate sub-net in the first server's profile. ``repeats``: every
    trace is drawn with the seeds ``seed, seed + 1, ...`` in turn (the same servers), each run kept.
    ``note`` (e.g. what else ran on the machine) goes into the report as given.

    ``partial``: the partial-results file (:func:`partial_path`) each finished run is appended to;
    ``resume`` keeps the runs it holds (same settings only), ``overwrite`` deletes it (without either,
    an existing file is refused). Each run's ``measured_by_process`` indexes ``processes``: the
    process (pid, start time, note, its servers' profiles) that measured it. A resumed process starts
    its servers with the profiles that the partial file's first process with that policy recorded."""
    import httpx

    from ..provenance import git_state

    seeds = [seed + i for i in range(repeats)]
    # what a resumed load test must share with the runs it keeps (not the note: it is per process)
    claim = {"supernet_sha256": file_sha256(path), "slo_ms": slo_ms, "rate": rate,
             "load": load if rate is None else None, "duration_s": duration, "max_batch": max_batch,
             "seeds": seeds, "max_requests": max_requests, "pause_s": pause_s, "samples_per_request": samples,
             "max_in_flight": max_in_flight, "profile_repeats": profile_repeats, "runtime": runtime,
             "traces": list(traces), "policies": list(policies),
             "policy_definitions": {p: POLICY_DEFINITIONS.get("fixed:<name>" if p.startswith("fixed:") else p)
                                    for p in policies},
             "git": git_state()}
    part = Path(partial) if partial is not None else None
    header, processes, old = (_claim_partial(part, claim, resume, overwrite) if part is not None
                              else (None, [], []))
    done = {(r["policy"], r["trace"], r["seed"]): r for r in old}
    cells = [(pol, tr, s) for s in seeds for tr in traces for pol in policies]  # trace-major, as measured
    todo = [c for c in cells if c not in done]
    process = len(processes)
    me = {"kind": "process", "process": process, "pid": os.getpid(), "started_utc": _utc_now(), "note": note}

    load_before = os.getloadavg()
    sn = load_supernet(path)
    accuracy = {n: float(sn.info.get(n, {}).get("test_acc", math.nan)) for n in sn.names}
    x = torch.randn((samples, *sn.input_shape)).numpy().astype("<f4").tobytes()
    shape = ",".join(str(d) for d in (samples, *sn.input_shape))
    new, exits, servers = {}, {}, {}
    basis: dict[str, Any] | None = header["rate_basis"] if header else None
    if header:
        rate = header["rate"]  # the first process's rate, so that every run shares one
    shared: dict[str, dict[str, Any]] = {}  # per policy, the profile its first server planned with
    for p in processes:
        for pol, doc in p.get("server_profiles", {}).items():
            shared.setdefault(pol, doc)
    me["server_profiles"] = {}
    try:
        # every server is started (and profiles its sub-nets) before any load, while the others idle;
        # then each trace is replayed against every policy in turn, so that the machine's changing
        # background load falls on all policies alike (a resumed test starts only the servers it needs,
        # each with the profile its policy's first server measured, so that every run plans with it)
        with tempfile.TemporaryDirectory(prefix="lowbit-bench-serve-") as tmp:
            for i, pol in enumerate(p for p in policies if any(c[0] == p for c in todo)):
                port = free_port()
                saved = Path(tmp) / f"{i}.profile.json"
                args = ["--slo-ms", str(slo_ms), "--policy", pol, "--max-batch", str(max_batch),
                        "--profile-repeats", str(profile_repeats), "--runtime", runtime,
                        "--save-profile", str(saved)]
                if pol in shared:
                    save_profile(Path(tmp) / f"{i}.shared.json", shared[pol])
                    args += ["--profile", str(Path(tmp) / f"{i}.shared.json")]
                servers[pol] = (port, start_server(path, port, args, timeout_s=900.0))  # compile + profile
                me["server_profiles"][pol] = read_profile(saved)  # written before the server answers
        if basis is None and todo:
            basis = _rate_basis(f"http://127.0.0.1:{servers[policies[0]][0]}", samples, load)
            if rate is None:
                rate = float(basis["rate"])
                log.info("rate %.1f req/s = %g x the capacity of %s", rate, load, basis["subnet"])
            else:  # a given rate: the profile only says what load it is
                basis.update(given=True, rate=rate, load=rate / basis["capacity_rps"][basis["subnet"]])
            if part is not None:
                atomic_write_text(part, json.dumps({"kind": "header", "settings": claim, "rate": rate,
                                                    "rate_basis": basis}, sort_keys=True, default=str) + "\n")
        if part is not None and todo:
            _append_line(part, me)
        for pol, tr, tr_seed in todo:
            arrivals = make_trace(tr, rate, duration, seed=tr_seed, max_requests=max_requests)
            base = f"http://127.0.0.1:{servers[pol][0]}"
            seq = httpx.get(f"{base}/metrics", timeout=30.0).json()["decisions"]
            recs = asyncio.run(replay(f"{base}/predict", arrivals, x, shape,
                                      timeout_s=max(2.0, 20 * slo_ms / 1e3), max_in_flight=max_in_flight))
            s = summarize(recs, slo_ms, accuracy, duration)
            run = {"policy": pol, "trace": tr, "seed": tr_seed, **s,
                   "server_decisions": _decisions_since(base, seq), "measured_by_process": process,
                   "finished_utc": _utc_now()}
            if part is not None:
                _append_line(part, {"kind": "run", "run": run})
            new[pol, tr, tr_seed] = run
            log.info("%s / %s: SLO %.3f, accuracy %.4f, %.0f req/s", pol, tr, s["slo_attainment"],
                     s["served_accuracy"], s["throughput_rps"])
            time.sleep(pause_s)
    finally:
        for pol, (_, proc) in servers.items():
            exits[pol] = stop_server(proc)
    runs = [done.get(c) or new[c] for c in cells]
    procs = [{k: v for k, v in p.items() if k != "kind"} for p in [*processes, me]]
    for p in procs:
        p["runs"] = sum(r["measured_by_process"] == p["process"] for r in runs)
    # the profiles each policy's runs planned with, as their servers wrote them (None: not recorded):
    # one per policy when every process's servers took the first one's
    planned: dict[str, set[str | None]] = {}
    for r in runs:
        doc = procs[r["measured_by_process"]].get("server_profiles", {}).get(r["policy"])
        planned.setdefault(r["policy"], set()).add(json.dumps(doc, sort_keys=True) if doc else None)
    return {
        "runs": runs,
        "accuracy": accuracy,
        "server_exit_status": exits,
        "processes": procs,
        # every run of a policy planned with one profile (and the rate and its basis are the first
        # process's always)
        "same_server_profiles": all(len(docs) == 1 and None not in docs for docs in planned.values()),
        "settings": {
            "rate": rate,
            "duration_s": duration,
            "slo_ms": slo_ms,
            "max_batch": max_batch,
            "seed": seed,
            "seeds": seeds,
            "traces": list(traces),
            "policies": list(policies),
            "supernet": str(path),
            "supernet_sha256": claim["supernet_sha256"],
            "samples_per_request": samples,
            "max_in_flight": max_in_flight,
            "runtime": runtime,
            "rate_basis": basis,
            "load_average_before": load_before,
            "load_average": os.getloadavg(),
            "cpus": os.cpu_count(),
            "note": note,
            "resumed": bool(processes),
        },
    }


def aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (trace, policy), in first-seen order: ``n`` runs, mean and sample standard deviation of SLO
    attainment and of served accuracy (over the runs that answered anything)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["trace"], r["policy"]), []).append(r)

    def mean_std(v: list[float]) -> tuple[float, float]:
        if not v:
            return math.nan, math.nan
        m = sum(v) / len(v)
        return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0

    out = []
    for (tr, pol), rs in groups.items():
        slo = mean_std([r["slo_attainment"] for r in rs])
        acc = mean_std([r["served_accuracy"] for r in rs if not math.isnan(r["served_accuracy"])])
        out.append({"trace": tr, "policy": pol, "n": len(rs), "slo_mean": slo[0], "slo_std": slo[1],
                    "acc_mean": acc[0], "acc_std": acc[1]})
    return out


def write_report(
    res: dict[str, Any], out: str | os.PathLike[str], stem: str = "serve", meta: dict[str, Any] | None = None
) -> None:
    """``stem.json``, ``stem.md`` and ``stem.png`` (SLO attainment and served accuracy per trace)."""
    from .._io import atomic_path, atomic_write_text

    out = Path(out)
    agg = aggregate(res["runs"])
    payload = {**(meta or {}), **res, "summary": agg}
    atomic_write_text(out / f"{stem}.json", json.dumps(payload, indent=1, default=float) + "\n")
    st = res["settings"]
    lines = [f"# Serving a supernet under load ({', '.join(st['traces'])} traces)", ""]
    if meta and "command" in meta:
        lines += [f"`{meta['command']}`", ""]
    basis = st.get("rate_basis")
    seeds = st.get("seeds", [st["seed"]])
    if basis:
        ranked = sorted(basis["capacity_rps"].items(), key=lambda kv: -kv[1])
        caps = ", ".join(f"{n} {v:g}" for n, v in ranked)
        lines += [
            (f"Rate given (--rate): {st['rate']:.1f} req/s = {basis['load']:.2f} x the capacity of the most "
             f"accurate sub-net {basis['subnet']} in the servers' start-up profile ({st['policies'][0]}'s). "
             if basis.get("given") else
             f"Rate set from the servers' start-up profile ({st['policies'][0]}'s): {basis['load']:g} x the "
             f"capacity of the most accurate sub-net {basis['subnet']} = {st['rate']:.1f} req/s. ")
            + "Capacity "
            f"(requests/s at the best batch of whole requests, profiled 90th-percentile latency): {caps}. "
            "The mean rate is "
            + ", ".join(f"{100 * st['rate'] / v:.0f}% of {n}'s" for n, v in ranked if v > 0)
            + " capacity; the bursty trace's bursts (3x the mean for a quarter of every second) "
            + ", ".join(f"{3 * st['rate'] / v:.1f}x" for n, v in ranked if v > 0)
            + ", the ramp's end (1.8x) "
            + ", ".join(f"{1.8 * st['rate'] / v:.1f}x" for n, v in ranked if v > 0) + ".",
            "",
        ]
    lines += [
        f"Mean rate {st['rate']:.1f} req/s for {st['duration_s']:g} s per trace, SLO {st['slo_ms']:g} ms, "
        f"max batch {st['max_batch']}, {st['samples_per_request']} sample(s) per request (binary float32), "
        f"trace seeds {', '.join(map(str, seeds))}; "
        f"one server per policy ({st.get('runtime', 'torch')} runtime, 1 inference thread; "
        "all started first, then each trace replayed against every "
        "policy in turn), the load generator in the same machine on loopback"
        + ("; one run per trace seed, the same servers." if len(seeds) > 1 else ", single run."),
        "",
        f"Machine: {st.get('cpus', '?')} CPUs, load average (1, 5, 15 min) "
        + (f"{', '.join(f'{v:.1f}' for v in st['load_average_before'])} before the servers started and "
           if st.get("load_average_before") else "")
        + f"{', '.join(f'{v:.1f}' for v in st['load_average'])} at the end"
        + (f"; {st['note']}" if st.get("note") else "; nothing was said about other work on the machine")
        + ". The servers and the load generator share these CPUs.",
        "",
    ]
    measured = [p for p in res.get("processes", []) if p["runs"]]
    if len(measured) > 1:  # a reader must know that the runs were not all measured back to back
        lines += [
            f"Measured by {len(measured)} processes (a stopped load test continued with --resume; each run's "
            "measured_by_process in the JSON): "
            + ", ".join(f"process {p['process']} started {p['started_utc']}, {p['runs']} run(s)"
                        for p in measured)
            + ". Every run has the first process's rate; "
            + ("every policy's runs planned with the profile its first server measured (the later servers "
               "were started with it, lowbit serve --profile)." if res.get("same_server_profiles") else
               "the servers did not all plan with their policy's first profile (same_server_profiles "
               "false in the JSON)."),
            "",
        ]
    lines += [
        "SLO attainment: answered (200) within the SLO, over all requests sent (shed requests count as "
        "misses). Served accuracy: the test accuracy of the answering sub-net, averaged over answered "
        "requests.",
        "",
        "Policies (src/lowbit/serve/policy.py; every policy plans with the server's start-up profile x "
        "an online scale, the measured / profiled batch time):",
        "",
    ]
    for pol in sorted({p if not p.startswith("fixed:") else "fixed:<name>" for p in st["policies"]},
                      key=list(POLICY_DEFINITIONS).index):
        lines.append(f"- `{pol}`: {POLICY_DEFINITIONS[pol]}")
    lines.append("")
    if any(a["n"] > 1 for a in agg):
        lines += ["| trace | policy | runs | SLO attainment (mean ± std) | served accuracy (mean ± std) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {a['trace']} | {a['policy']} | {a['n']} | {100 * a['slo_mean']:.1f} ± "
                  f"{100 * a['slo_std']:.1f}% | {100 * a['acc_mean']:.2f} ± {100 * a['acc_std']:.2f}% |"
                  for a in agg]
        lines += ["", "Every run:", ""]
    lines += [
        "| trace | seed | policy | requests | SLO attainment | served accuracy | throughput (req/s) | "
        "p50 ms | p99 ms | shed (503) | sub-nets served (share of answers >= 5%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        acc = r["served_accuracy"]
        lines.append(
            f"| {r['trace']} | {r.get('seed', st['seed'])} | {r['policy']} | {r['requests']} | "
            f"{100 * r['slo_attainment']:.1f}% | "
            f"{'-' if math.isnan(acc) else f'{100 * acc:.2f}%'} | {r['throughput_rps']:.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['statuses'].get('503', 0)} | "
            + ", ".join(f"{n} {100 * v:.0f}%" for n, v in sorted(r["mix"].items(), key=lambda kv: -kv[1])
                        if v >= 0.05) + " |"
        )
    dec = [r for r in res["runs"] if r.get("server_decisions")]
    if dec:
        lines += [
            "",
            "The servers' own decision logs (/metrics?decisions=N) for each run: batches per sub-net with "
            "the median queue length (requests) and the median slack of the oldest request (ms) when it was "
            "chosen; requests shed by the policy; the decision's cost (median / max microseconds); the "
            "median latency scale (measured / profiled batch time); the batches' run time; and the time "
            "each batch's oldest request spent in the server (queue + batch). Where the client's latency "
            "(p50/p99 above) is far above the in-server time, the requests waited outside the batching "
            "queue (HTTP, the event loop, the load generator itself).",
            "",
            "| trace | seed | policy | batches: sub-net (median queue, oldest slack ms) | shed by policy | "
            "decision us (median / max) | scale | batch run ms (median) | in-server ms of each batch's "
            "oldest (median / p99) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in dec:
            d = r["server_decisions"]
            mix = ", ".join(f"{n} {v['batches']} ({v['median_queue']:g}, {v['median_slack_ms']:.0f})"
                            for n, v in d["by_subnet"].items())
            lines.append(
                f"| {r['trace']} | {r.get('seed', st['seed'])} | {r['policy']} | {mix or '-'}"
                f"{'' if d['complete'] else ' (log incomplete)'} | {d['shed_by_decisions']} | "
                f"{d['decide_us_median']:.0f} / {d['decide_us_max']:.0f} | {d['scale_median']:.2f} | "
                f"{d['run_ms_median']:.1f} | {d['oldest_ms_median']:.0f} / {d['oldest_ms_p99']:.0f} |"
            )
    lines += [
        "",
        "Server exit status after SIGTERM: "
        + ", ".join(f"{k} {v}" for k, v in res["server_exit_status"].items()),
    ]
    atomic_write_text(out / f"{stem}.md", "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    traces = st["traces"]
    fig, axes = plt.subplots(1, len(traces), figsize=(5 * len(traces), 4.2), squeeze=False)
    try:
        for ax, tr in zip(axes[0], traces, strict=True):
            rows = [a for a in agg if a["trace"] == tr]
            served = [a["acc_mean"] for a in rows if not math.isnan(a["acc_mean"])]
            for a in rows:
                slack = a["policy"].startswith("slackfit")
                none = math.isnan(a["acc_mean"])  # answered nothing: drawn at the left edge
                x = 100 * (min(served, default=0.0) if none else a["acc_mean"])
                ax.errorbar(
                    x,
                    100 * a["slo_mean"],
                    xerr=0 if none else 100 * a["acc_std"],
                    yerr=100 * a["slo_std"],
                    fmt="x" if none else "*" if slack else "o",
                    markersize=9 if slack else 5,
                    color="C1" if none else "C2" if "queue" in a["policy"] else "C3" if slack else "C0",
                    capsize=2,
                    zorder=3,
                )
                ax.annotate(
                    a["policy"].removeprefix("fixed:") + (" (answered none)" if none else ""),
                    (x, 100 * a["slo_mean"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            ax.set_title(f"{tr} trace")
            ax.set_xlabel("served accuracy (%)")
            ax.set_ylabel("SLO attainment (%)")
            ax.grid(alpha=0.3)
        fig.suptitle(f"slackfit (red star), slackfit-queue (green star) vs fixed sub-nets, "
                     f"SLO {st['slo_ms']:g} ms, {st['rate']:.1f} req/s mean")
        fig.tight_layout()
        with atomic_path(out / f"{stem}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def bench_serve_cli(a: Any) -> Any:
    """``lowbit bench serve`` (argparse namespace ``a``): run (``--resume``: on from the partial-results
    file, see :func:`run_serve_bench`), write the report, delete the partial file, return a rich table."""
    from rich.table import Table

    from ..provenance import provenance

    t0 = time.time()
    torch.set_num_threads(1)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    policies = []
    for p in a.policies:
        policies += [f"fixed:{n}" for n in load_supernet(a.supernet).choices] if p == "fixed:all" else [p]
    res = run_serve_bench(
        a.supernet, policies, a.traces, a.rate, a.duration, a.slo_ms, a.max_batch, a.seed, a.max_requests,
        samples=a.samples, max_in_flight=a.max_in_flight, profile_repeats=a.profile_repeats,
        runtime=a.runtime, load=getattr(a, "load", 1.2), repeats=getattr(a, "repeats", 2),
        note=getattr(a, "note", ""), partial=partial_path(a.out, a.stem), resume=getattr(a, "resume", False),
        overwrite=getattr(a, "overwrite", False),
    )
    seeds = [a.seed + i for i in range(getattr(a, "repeats", 2))]
    meta = provenance(" ".join(["lowbit", *(getattr(a, "argv", None) or sys.argv[1:])]), seeds=seeds,
                      wall_time_s=round(time.time() - t0, 1))
    write_report(res, a.out, a.stem, meta)
    partial_path(a.out, a.stem).unlink(missing_ok=True)  # every run is in the report now
    t = Table("trace", "policy", "SLO attainment", "served accuracy", "req/s", "503")
    for r in res["runs"]:
        t.add_row(
            r["trace"],
            r["policy"],
            f"{r['slo_attainment']:.1%}",
            f"{r['served_accuracy']:.2%}",
            f"{r['throughput_rps']:.0f}",
            str(r["statuses"].get("503", 0)),
        )
    return t
