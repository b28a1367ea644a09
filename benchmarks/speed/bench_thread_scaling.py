"""lowbit's own 2-thread scaling: the same packed model on 1 and on 2 threads, side by side.

    python benchmarks/speed/bench_thread_scaling.py                          # ~1.5 min
    python benchmarks/speed/bench_thread_scaling.py --cases resnet20 --batches 8 64 --out /tmp/r

No baselines (no ONNX export), so it is cheap enough for a short quiet window. In one process the
numba kernels run on 2 threads; the 1-thread calls switch the calling thread to serial kernels
(``kernels_threads.set_serial``, which the flat executor and every ``parallel_for`` read; PyTorch
keeps 2 threads, which only layers left in PyTorch would use: none here), so both
counts share the model and take turns in the same interleaved rounds (``harness.time_interleaved``
with turns). Outputs of the two are checked equal. Ratio = 1-thread median / 2-thread median
(throughput ratio; issue 13's target: >= 1.7x at batch >= 8, never below 1 at batch 1).
Writes benchmarks/results/thread_scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_threads_contamination import MachineShare
from common import run_meta, write_results
from harness import CASES, float_case, quantized_model, set_threads, time_interleaved

from lowbit.runtime import compile as rt_compile
from lowbit.runtime import kernels_threads as KT

RESULTS = Path(__file__).resolve().parents[1] / "results"


def serial(fn):
    def call():
        prev = KT.set_serial(True)
        try:
            return fn()
        finally:
            KT.set_serial(prev)

    return call


def parts(fn, n: int):
    def call():
        keep = KT.PARTS_PER_THREAD
        KT.PARTS_PER_THREAD = n
        try:
            return fn()
        finally:
            KT.PARTS_PER_THREAD = keep

    return call


def with_settings(fn, settings: dict[str, int]):
    """``fn`` run with the runtime's module constants in ``settings`` (``"kernels_codes.NAME"`` ->
    value) set for the call, restored after it."""
    import importlib

    targets = [(importlib.import_module(f"lowbit.runtime.{k.rsplit('.', 1)[0]}"), k.rsplit(".", 1)[1], v)
               for k, v in settings.items()]
    for mod, name, _ in targets:
        if not hasattr(mod, name):
            raise SystemExit(f"--ab: lowbit.runtime.{mod.__name__.rsplit('.', 1)[1]} has no {name}")

    def call():
        keep = [(mod, name, getattr(mod, name)) for mod, name, _ in targets]
        for mod, name, v in targets:
            setattr(mod, name, v)
        try:
            return fn()
        finally:
            for mod, name, v in keep:
                setattr(mod, name, v)

    return call


def parse_settings(items: list[str]) -> dict[str, int]:
    out = {}
    for it in items:
        key, eq, val = it.partition("=")
        if not eq or "." not in key:
            raise SystemExit("--ab: expected MODULE.CONSTANT=INTEGER (e.g. "
                             f"kernels_codes.CLIP_MIN_PARALLEL=131072), got {it!r}")
        try:
            out[key] = int(val, 0)
        except ValueError:
            raise SystemExit(f"--ab: {key}'s value must be an integer, got {val!r}") from None
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["lenet5", "resnet20", "mlp"], choices=list(CASES))
    p.add_argument("--variants", nargs="+", default=["w1a4", "w2a4"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 256])
    p.add_argument("--budget-s", type=float, default=1.5, help="time budget of one interleaved block")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default="thread_scaling")
    p.add_argument("--parts", nargs="*", type=int, default=[],
                   help="also time 2 threads with these kernels_threads.PARTS_PER_THREAD values (an A/B)")
    p.add_argument("--ab", nargs="*", default=[], metavar="MODULE.CONSTANT=INT",
                   help="also time 2 threads with these lowbit.runtime module constants set, e.g. "
                        "kernels_codes.CLIP_MIN_PARALLEL=131072 (an A/B against the tree's values)")
    a = p.parse_args(argv)
    if min(a.batches) < 1:
        p.error(f"--batches: batch sizes must be >= 1, got {a.batches}")
    ab = parse_settings(a.ab)
    t0 = time.time()
    share = MachineShare()
    set_threads(2)
    rows = []
    for name in a.cases:
        case = CASES[name]
        batches = sorted(set(a.batches))
        fm, x_all = float_case(case, max(batches))
        for v in a.variants:
            if v not in case.variants:
                continue
            packed = rt_compile(quantized_model(fm, v), x_all[:8])
            for b in batches:
                x = x_all[:b].contiguous()
                two = lambda packed=packed, x=x: packed(x)  # noqa: E731
                one = serial(two)
                if not torch.equal(one(), two()):
                    raise AssertionError(f"{name}/{v} b{b}: 1- and 2-thread outputs differ")
                fns = {"1": one, "2": two}
                for pp in a.parts:
                    fns[f"parts {pp}"] = parts(two, pp)
                if ab:
                    fns["ab"] = with_settings(two, ab)
                    if not torch.equal(fns["ab"](), two()):
                        raise AssertionError(f"{name}/{v} b{b}: the --ab settings change the output")
                t = time_interleaved(fns, 60 if b < 64 else 20, a.budget_s, turns=True)
                ex = packed.executor
                two()  # (the last timed call may have been the serial one)
                rows.append({"case": name, "variant": v, "batch": b, "ms_1": 1e3 * t["1"]["median_s"],
                             "ms_2": 1e3 * t["2"]["median_s"], "min_ms_1": 1e3 * t["1"]["min_s"],
                             "min_ms_2": 1e3 * t["2"]["min_s"], "rounds": t["1"]["rounds"],
                             "ratio": t["1"]["median_s"] / t["2"]["median_s"],
                             "flat_threads": None if ex is None else ex.last_threads,
                             "parts_ms": {pp: 1e3 * t[f"parts {pp}"]["median_s"] for pp in a.parts},
                             "ab_ms": 1e3 * t["ab"]["median_s"] if ab else None})
                print(rows[-1], flush=True)
            del packed
    meta = run_meta(__file__, argv, t0, seeds=[0], **share.stop())
    payload = {"meta": meta, "ab": ab, "rows": rows}
    md = ["# lowbit: 2 threads against 1, the same packed model side by side", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
          f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; {MachineShare.sentence(meta)}; "
          "single run.", "",
          "1 thread: the calling thread's kernels serial (`kernels_threads.set_serial`); rounds "
          "interleaved with turns (`harness.time_interleaved`); ratio = 1-thread median / 2-thread median. "
          "`flat threads`: threads the flat executor's last 2-thread call used (conv nets).", "",
          "| case | variant | batch | 1 thread ms (min) | 2 threads ms (min) | 2 vs 1 | flat threads "
          "| rounds |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['case']} | {r['variant']} | {r['batch']} | {r['ms_1']:.3f} ({r['min_ms_1']:.3f}) | "
           f"{r['ms_2']:.3f} ({r['min_ms_2']:.3f}) | {r['ratio']:.2f}x | {r['flat_threads'] or '–'} | "
           f"{r['rounds']} |" for r in rows]
    if a.parts:
        head = " | ".join(f"p={pp}" for pp in a.parts)
        md += ["", f"2 threads with `PARTS_PER_THREAD` = p (default {KT.PARTS_PER_THREAD}): median ms "
               "(1-thread median / it)", "", f"| case | variant | batch | {head} |",
               "|---|---|---:|" + "---:|" * len(a.parts)]
        for r in rows:
            cells = [f"{r['parts_ms'][pp]:.3f} ({r['ms_1'] / r['parts_ms'][pp]:.2f}x)" for pp in a.parts]
            md.append(f"| {r['case']} | {r['variant']} | {r['batch']} | " + " | ".join(cells) + " |")
    if ab:
        sets = ", ".join(f"`{k} = {v}`" for k, v in ab.items())
        md += ["", f"A/B: 2 threads with {sets} (B) against the tree's values (A, the column `2 threads` "
               "above), in the same rounds: median ms and the 1-thread median over it", "",
               "| case | variant | batch | A: 2 threads | B: 2 threads | A / B |",
               "|---|---|---:|---:|---:|---:|"]
        md += [f"| {r['case']} | {r['variant']} | {r['batch']} | {r['ms_2']:.3f} ({r['ratio']:.2f}x) | "
               f"{r['ab_ms']:.3f} ({r['ms_1'] / r['ab_ms']:.2f}x) | {r['ms_2'] / r['ab_ms']:.2f} |"
               for r in rows]
    write_results(a.out, a.name, payload, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
