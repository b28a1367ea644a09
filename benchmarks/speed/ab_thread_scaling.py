"""A/B of the runtime's 2-thread split (the deep MLP, or ``--case``): 1 thread against 2, before and after
(issue 13).

    python benchmarks/speed/ab_thread_scaling.py                                  # ~2 min
    python benchmarks/speed/ab_thread_scaling.py --note "the training campaign paused"

The packed 8 x Linear 4096^2 MLP (``harness.CASES["mlp"]``; ``--case``: another case of the speed
harness, e.g. ``bert256`` with ``--variants w1a8s w2a8s --batches 8``) of each variant, in one
process: at each batch, interleaved rounds time a short loop of calls on 1 thread (``set_serial``,
PyTorch on one thread) and on 2 threads under each configuration of ``--configs``
(``name:key=value,...``; keys: ``spin`` = ``kernels_threads.SPIN_US``, ``rows`` = log2 of
``kernels_amx.AMX_ROWS_MIN_PARALLEL``, ``macs`` = log2 of ``kernels_amx.AMX_MIN_PARALLEL_MACS``,
``vmacs`` = the same of ``VNNI_MIN_PARALLEL_MACS``, ``ppt`` = ``kernels_threads.PARTS_PER_THREAD``;
a key left out keeps the module's value). ``before`` is the runtime before this change. Every
configuration's output is checked equal, bit for bit, to the 1-thread output. Per round also the
cores the machine's other processes used at nice 0 and, apart, niced ones (``/proc/stat``; the
training campaign runs at nice 10 unless paused): 2 threads can only gain while the second core
is free of other nice-0 work. Ratio = 1-thread median / 2-thread median (throughput ratio; issue 13's
target: >= 1.7 at batch >= 8, >= 1 at batch 1). Writes ``<out>/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results
from harness import CASES, make_inputs, quantized_model, set_threads

from lowbit.runtime import _amx
from lowbit.runtime import compile as rt_compile
from lowbit.runtime import kernels_amx as KA
from lowbit.runtime import kernels_threads as KT

RESULTS = Path(__file__).resolve().parents[1] / "results"
KEYS = {"spin": (KT, "SPIN_US", lambda v: int(v)),
        "rows": (KA, "AMX_ROWS_MIN_PARALLEL", lambda v: 1 << int(v)),
        "macs": (KA, "AMX_MIN_PARALLEL_MACS", lambda v: 1 << int(v)),
        "vmacs": (KA, "VNNI_MIN_PARALLEL_MACS", lambda v: 1 << int(v)),
        "ppt": (KT, "PARTS_PER_THREAD", lambda v: int(v))}
BEFORE = "before:spin=0,rows=22,ppt=4"


def parse_config(text: str) -> tuple[str, dict[str, int]]:
    name, _, body = text.partition(":")
    vals: dict[str, int] = {}
    for kv in filter(None, body.split(",")):
        k, _, v = kv.partition("=")
        if k not in KEYS:
            raise SystemExit(f"--configs: unknown key {k!r} in {text!r}; keys: {', '.join(KEYS)}")
        _, attr, conv = KEYS[k]
        vals[attr] = conv(v)
    return name, vals


def settings(vals: dict[str, int]):
    """A context manager that sets the modules' constants of ``vals`` and restores them."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        keep = {}
        for attr, v in vals.items():
            mod = next(m for m, a, _ in KEYS.values() if a == attr)
            keep[attr] = (mod, getattr(mod, attr))
            setattr(mod, attr, v)
        try:
            yield
        finally:
            for attr, (mod, v) in keep.items():
                setattr(mod, attr, v)

    return cm()


def busy_s() -> tuple[float, float]:
    """CPU seconds the machine's processes have used: (at nice 0 or below, at a positive nice)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[1] - v[3] - v[4]) / tick, v[1] / tick


def amx_probe(loop, cfg, tiles) -> list[float]:
    """ms of a short AMX tile-unit loop (``profile_amx_linear._tile_loop(0)``, ~1 ms) pinned to each of
    the first two vCPUs: on this virtual machine a vCPU's AMX rate halves for seconds at a time
    while the host hardware thread beside it runs other work (``probe_amx_phases.md``)."""
    keep = os.sched_getaffinity(0)
    out = []
    try:
        for c in sorted(keep)[:2]:
            os.sched_setaffinity(0, {c})
            s = time.thread_time()
            loop(cfg, tiles, 40_000)
            out.append(1e3 * (time.thread_time() - s))
    finally:
        os.sched_setaffinity(0, keep)
    return out


def timed_loop(fn, budget_s: float, min_calls: int) -> tuple[float, float, float]:
    """(median seconds per call of a loop lasting ``budget_s``, cores the other processes used
    meanwhile at nice 0, cores niced processes used)."""
    fn()  # untimed: the state of a user's loop
    ts = []
    b0, c0, w0 = busy_s(), time.process_time(), time.perf_counter()
    while len(ts) < min_calls or time.perf_counter() - w0 < budget_s:
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    wall = time.perf_counter() - w0
    b1 = busy_s()
    others = max(0.0, (b1[0] - b0[0]) - (time.process_time() - c0)) / wall
    return statistics.median(ts), others, (b1[1] - b0[1]) / wall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", default="mlp", choices=sorted(CASES), help="the speed harness's case")
    p.add_argument("--variants", nargs="+", default=["w1a4", "w2a4", "w1a1"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 256])
    p.add_argument("--configs", nargs="+", default=[BEFORE, "after:"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--loop-s", type=float, default=0.15, help="seconds of one timed loop")
    p.add_argument("--free", type=float, default=0.25, help="others' cores below which a round is free")
    p.add_argument("--steady", type=float, default=1.3,
                   help="a round is steady when every vCPU's AMX probe before and after it took less than "
                   "this many times the run's fastest probe")
    p.add_argument("--note", default="", help="the machine's state (e.g. the training campaign paused)")
    p.add_argument("--wait-for", default="", help="after building the models, wait until this file exists "
                   "(so that a quiet window covers the timings alone)")
    p.add_argument("--done-file", default="", help="a file created once the timings are done")
    p.add_argument("--from-json", default="", help="only write the Markdown of a run's JSON (same options)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="ab_thread_scaling")
    a = p.parse_args(argv)
    if a.from_json:
        import json

        payload = json.loads(Path(a.from_json).read_text())
        write_results(a.out, a.name, payload, markdown(payload["meta"], payload["rows"], a))
        return
    t0 = time.time()
    load0 = " ".join(f"{v:.2f}" for v in os.getloadavg())
    configs = [parse_config(c) for c in a.configs]
    set_threads(2)
    case = CASES[a.case]
    torch.manual_seed(0)
    fm = case.build().eval()
    models = {v: rt_compile(quantized_model(fm, v), make_inputs(case, 8, 0)) for v in a.variants}
    t_built = time.time()
    probe = None
    if _amx.amx_enabled():
        from profile_amx_linear import _tile_loop

        tiles = KA.aligned_u8(4096)
        tiles[:] = 1
        probe = (_tile_loop(0), _amx.amx_tile_config(64, 2), tiles)
        amx_probe(*probe)
    if a.wait_for:
        while not os.path.exists(a.wait_for):
            time.sleep(0.2)
        load0 = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    for b in a.batches:
        x = make_inputs(case, b, b)
        for v, fast in models.items():
            def one(fast=fast, x=x):  # 1 thread: the kernels serial, PyTorch's ops (attention ...) too
                prev, nt = KT.set_serial(True), torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    return fast(x)
                finally:
                    torch.set_num_threads(nt)
                    KT.set_serial(prev)

            def two(vals, fast=fast, x=x):
                with settings(vals):
                    return fast(x)

            ref = one()
            for name, vals in configs:
                if not torch.equal(ref, two(vals)):
                    raise AssertionError(f"{v} b{b} {name}: 2-thread output differs from the 1-thread one")
            fns = {"1t": one, **{f"2t {name}": (lambda vals=vals: two(vals)) for name, vals in configs}}
            got: dict[str, list[float]] = {m: [] for m in fns}
            others: list[float] = []
            niced: list[float] = []
            free: list[bool] = []
            order = list(fns)
            cal: list[list[float]] = []
            for r in range(a.rounds):
                ok = True
                c0 = amx_probe(*probe) if probe else []
                for m in order[r % len(order):] + order[: r % len(order)]:  # rotated: no mode always first
                    t, o, nc = timed_loop(fns[m], a.loop_s, 3)
                    got[m].append(t)
                    others.append(o)
                    niced.append(nc)
                    ok = ok and o < a.free
                free.append(ok)
                cal.append(c0 + (amx_probe(*probe) if probe else []))
            med = {m: statistics.median(ts) for m, ts in got.items()}
            fmed = {m: statistics.median(t for t, f in zip(ts, free, strict=True) if f)
                    for m, ts in got.items() if any(free)}
            rows.append({"variant": v, "batch": b, "ms": {m: 1e3 * t for m, t in med.items()},
                         "ratio": {m: med["1t"] / med[m] for m in fns if m != "1t"},
                         "free_rounds": sum(free), "free_ms": {m: 1e3 * t for m, t in fmed.items()},
                         "free_ratio": {m: fmed["1t"] / fmed[m] for m in fns if m != "1t" and fmed},
                         "others_cores_median": statistics.median(others), "others_cores_max": max(others),
                         "niced_cores_median": statistics.median(niced), "rounds": a.rounds,
                         "round_ms": {m: [round(1e3 * t, 4) for t in ts] for m, ts in got.items()},
                         "round_free": free, "round_amx_probe_ms": [[round(x, 3) for x in c] for c in cal]})
            print(rows[-1], flush=True)
    if a.done_file:
        Path(a.done_file).touch()
    # seed 0: the model's weights; each batch's input draws with its batch size as seed
    meta = run_meta(__file__, argv, t0, seeds=sorted({0, *a.batches}), note=a.note, load_start=load0,
                    case=a.case, case_label=case.label,
                    build_s=round(t_built - t0, 1),
                    load_end=" ".join(f"{v:.2f}" for v in os.getloadavg()),
                    configs={n: vals for n, vals in configs})
    write_results(a.out, a.name, {"meta": meta, "rows": rows}, markdown(meta, rows, a))
    print(markdown(meta, rows, a))


def derive(rows: list[dict], a: argparse.Namespace) -> float:
    """Adds to each row the steady-round medians and the per-round paired ratios; returns the run's
    fastest AMX probe (ms)."""
    floor = min((x for r in rows for c in r["round_amx_probe_ms"] for x in c), default=0.0)
    for r in rows:  # steady rounds: no vCPU in a slow AMX phase around the round
        st = [bool(c) and max(c) < a.steady * floor for c in r["round_amx_probe_ms"]]
        ts = {m: [t for t, k in zip(v, st, strict=True) if k] for m, v in r["round_ms"].items()}
        r["steady_rounds"] = sum(st)
        r["steady_ms"] = {m: statistics.median(v) for m, v in ts.items() if v}
        r["steady_ratio"] = ({m: r["steady_ms"]["1t"] / t for m, t in r["steady_ms"].items() if m != "1t"}
                             if r["steady_ms"] else {})
        # the same round's loops ran within ~0.3 s of each other: a round's ratio sees one machine state
        rm = r["round_ms"]
        modes = [m for m in rm if m != "1t"]
        r["paired_ratio"] = {m: statistics.median(x / y for x, y in zip(rm["1t"], rm[m], strict=True))
                             for m in modes}
        r["paired_vs_first"] = {m: statistics.median(x / y for x, y in zip(rm[modes[0]], rm[m], strict=True))
                                for m in modes[1:]}
    return floor


def markdown(meta: dict, rows: list[dict], a: argparse.Namespace) -> str:
    floor = derive(rows, a)
    names = list(meta["configs"])
    head = " | ".join(f"2 threads, {n}: ms (ratio; free; steady; paired)" for n in names)
    vs = " | ".join(f"{n} vs {names[0]}" for n in names[1:])
    what = meta.get("case_label", "the deep MLP")
    md = [f"# 2 threads against 1 on {what}, before and after (one process, interleaved)", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
          f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; "
          f"{meta.get('note') or 'machine state not noted'}; "
          f"load average at start / end {meta['load_start']} / {meta['load_end']}; single run, medians of "
          f"{rows[0]['rounds']} interleaved rounds of {a.loop_s:.2f} s loops (order rotated each round).", "",
          "Configurations: " + "; ".join(f"`{n}`: {v or 'this commit'}" for n, v in meta["configs"].items())
          + ". ratio = 1-thread median / 2-thread median (issue 13: >= 1.7 at batch >= 8). others: cores "
          "the machine's other nice-0 processes used during the loops (median / max "
          "over the loops); niced: cores niced processes (the campaign at nice 10, when not paused) used, "
          "median. free: the ratio over the rounds in which every loop saw less than "
          f"{a.free} cores used by other nice-0 processes (2 threads cannot gain while another process "
          "holds the second core). steady: "
          + (f"the ratio over the rounds in which a ~1 ms AMX loop pinned to each vCPU, run before and "
             f"after the round, took less than {a.steady}x the run's fastest ({floor:.2f} ms): on the AMX "
             "virtual machine a vCPU's AMX rate halved for seconds at a time while the host hardware thread "
             "beside it ran other work (`probe_amx_phases.md`), which no process here causes or sees. "
             if floor > 0 else "- (this CPU has no AMX to probe). ")
          + "paired: the median over rounds of the round's own 1-thread / 2-thread ratio. "
          "Per-round times and probes in the JSON.", "",
          f"| variant | batch | 1 thread ms | {head} | free / steady rounds | others (max) | niced |",
          "|---|---:|---:|" + "---:|" * len(names) + "---:|---:|---:|"]
    for r in rows:
        fr, sr, pr = r["free_ratio"], r["steady_ratio"], r["paired_ratio"]
        steady = {n: f"{sr[f'2t {n}']:.2f}x" if f"2t {n}" in sr else "-" for n in names}
        cells = " | ".join(f"{r['ms'][f'2t {n}']:.3f} ({r['ratio'][f'2t {n}']:.2f}x; "
                           f"{fr.get(f'2t {n}', float('nan')):.2f}x; {steady[n]}; "
                           f"{pr[f'2t {n}']:.2f}x)" for n in names)
        md.append(f"| {r['variant']} | {r['batch']} | {r['ms']['1t']:.3f} | {cells} | "
                  f"{r['free_rounds']} / {r['steady_rounds']} of {r['rounds']} | "
                  f"{r['others_cores_median']:.2f} ({r['others_cores_max']:.2f}) | "
                  f"{r['niced_cores_median']:.2f} |")
    if len(names) > 1:
        md += ["", f"The 2-thread configurations against `{names[0]}`, paired by round (median over rounds "
               f"of `{names[0]}` ms / the configuration's ms in the same round; > 1: faster than "
               f"`{names[0]}`):",
               "", f"| variant | batch | {vs} |", "|---|---:|" + "---:|" * (len(names) - 1)]
        for r in rows:
            pv = r["paired_vs_first"]
            md.append(f"| {r['variant']} | {r['batch']} | "
                      + " | ".join(f"{pv[f'2t {n}']:.2f}x" for n in names[1:]) + " |")
    return "\n".join(md)


if __name__ == "__main__":
    main()
