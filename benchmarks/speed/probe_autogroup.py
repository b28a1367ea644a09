"""What share of the 2 cores a 2-thread process gets beside niced work (issue 13, threads).

    python benchmarks/speed/probe_autogroup.py                          # ~3 s

Linux's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``) gives each session
(autogroup) an equal share of the CPUs; a process's nice value then only ranks it within its own
session, and a session's weight is its autogroup's nice (``/proc/<pid>/autogroup``). So a training
campaign started at nice 10 in its own session still takes half the machine from a benchmark in
another session. This probe prints the setting and the autogroups of the niced processes it can
see, then runs two threads of a dependent scalar chain (CPU bound, no shared unit) in this
process for ``--seconds`` and reports the cores this process got (its CPU time over the wall
time; 2.0 = both cores) and what ``/proc/stat`` counted meanwhile as user (nice 0) and nice time.
Writes ``<out>/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results
from probe_thread_contention import _scalar_chain

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def niced_processes() -> list[dict]:
    """Processes with a positive nice that used CPU: pid, nice, name, autogroup line."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        stat = _read(f"/proc/{pid}/stat")
        if not stat:
            continue
        f = stat.rsplit(")", 1)[1].split()
        nice, cpu = int(f[16]), int(f[11]) + int(f[12])
        if nice > 0 and cpu > 0:
            out.append({"pid": int(pid), "nice": nice, "name": _read(f"/proc/{pid}/comm"),
                        "autogroup": _read(f"/proc/{pid}/autogroup")})
    return out


def cpu_fields() -> list[int]:
    with open("/proc/stat") as fh:
        return [int(x) for x in fh.readline().split()[1:]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--note", default="", help="the machine's state")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="probe_autogroup")
    a = p.parse_args(argv)
    t0 = time.time()
    _scalar_chain(10)
    n = int(3e7 / 5.6e-3 * a.seconds)  # 3e7 steps take ~5.6 ms on a core of its own
    enabled = _read("/proc/sys/kernel/sched_autogroup_enabled")
    mine = _read("/proc/self/autogroup")
    niced = niced_processes()
    tick = os.sysconf("SC_CLK_TCK")
    s0, c0, w0 = cpu_fields(), time.process_time(), time.perf_counter()
    ths = [threading.Thread(target=_scalar_chain, args=(n,)) for _ in range(2)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    d = [b - x for x, b in zip(s0, cpu_fields(), strict=True)]
    res = {"sched_autogroup_enabled": enabled, "this_autogroup": mine, "niced": niced, "wall_s": wall,
           "process_cores": cpu / wall, "user_cores": d[0] / tick / wall, "nice_cores": d[1] / tick / wall,
           "idle_cores": d[3] / tick / wall}
    meta = run_meta(__file__, argv, t0, seeds=[], note=a.note)  # no randomness: a fixed scalar chain
    md = ["# A 2-thread process beside niced work: the cores it gets", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
          f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; {a.note or 'machine state not noted'}; "
          "single run.", "",
          f"`/proc/sys/kernel/sched_autogroup_enabled` = {enabled or '?'}; this process: "
          f"`{mine or '?'}`.", "",
          "Niced processes that had used CPU (pid, nice, name, autogroup):", ""]
    md += [f"- {q['pid']}, nice {q['nice']}, {q['name']}: `{q['autogroup']}`" for q in niced] or ["- none"]
    md += ["", f"Two CPU-bound threads of this process for {wall:.2f} s: this process got "
           f"{res['process_cores']:.2f} cores (2.00 = both); `/proc/stat` meanwhile: user (nice <= 0) "
           f"{res['user_cores']:.2f}, nice {res['nice_cores']:.2f}, idle {res['idle_cores']:.2f} cores.", "",
           "With autogroups a niced process in another session keeps its session's share (half the machine "
           "against one other busy session) whatever its nice. The kernel's documentation "
           "(sched-autogroup) gives the remedies, not tried here: the niced session lowers its own weight "
           "(`echo 10 > /proc/self/autogroup` in its process), or `sched_autogroup_enabled` = 0."]
    write_results(a.out, a.name, {"meta": meta, **res}, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
