"""Profile: where a packed BERT encoder's time goes on 1 and on 2 threads (torch.profiler).

    python benchmarks/speed/profile_bert_threads.py --out benchmarks/results/epyc_zen4   # ~2 min

The speed harness's BERT encoder (``--case``, default ``bert256``: hidden 256, 4 layers, seq 64)
packed (``--variant``, default ``w2a8s``), at ``--batch`` (8) samples: its Linear layers run in the
packed runtime, attention, GELU, LayerNorm and the residual adds stay in PyTorch. Per thread count
(PyTorch's and the kernels' both 1, then both 2), in each of ``--runs`` runs: the call's median over
``--repeats`` calls, and a torch.profiler pass over ``--profiled`` calls giving each PyTorch
operator's time on the calling thread per call; the packed layers are the rest of the call (their
kernels are not PyTorch operators). Writes ``<out>/profile_bert_threads.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results
from harness import CASES, build_lowbit, make_inputs, set_threads


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", default="bert256", choices=[c for c in CASES if c.startswith("bert")])
    p.add_argument("--variant", default="w2a8s")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--profiled", type=int, default=10)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--runs", type=int, default=3, help="measurement runs, one after the other")
    p.add_argument("--note", default="", help="the machine's state (what ran beside it)")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    t0 = time.time()
    case = CASES[a.case]
    torch.manual_seed(0)
    fm = case.build().eval()
    x = make_inputs(case, a.batch, 0)
    packed = build_lowbit(fm, a.variant, x[:1], x).packed
    runs: list[dict[int, dict]] = []
    with torch.inference_mode():
        for _ in range(a.runs):
            res: dict[int, dict] = {}
            for th in (1, 2, 1, 2):  # the second pass of each is kept (warm)
                set_threads(th)
                packed(x)
                ts = []
                for _ in range(a.repeats):
                    t = time.perf_counter()
                    packed(x)
                    ts.append(time.perf_counter() - t)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(a.profiled):
                        packed(x)
                ops = {e.key: {"ms_per_call": e.self_cpu_time_total / 1e3 / a.profiled,
                               "count": e.count // a.profiled} for e in prof.key_averages()}
                torch_ms = sum(o["ms_per_call"] for o in ops.values())
                res[th] = {"call_ms": 1e3 * statistics.median(ts), "torch_ops_ms": torch_ms, "ops": ops,
                           "packed_ms": 1e3 * statistics.median(ts) - torch_ms}
            runs.append(res)
    set_threads(1)
    meta = run_meta(__file__, argv, t0, seeds=[0], case=a.case, variant=a.variant, batch=a.batch,
                    repeats=a.repeats, profiled=a.profiled, runs=a.runs, note=a.note)

    def med(th: int, key: str) -> float:
        return statistics.median(r[th][key] for r in runs)

    def ratios(key: str) -> str:
        rs = sorted(r[1][key] / r[2][key] for r in runs)
        return f"{statistics.median(rs):.2f}x ({rs[0]:.2f}-{rs[-1]:.2f}x)"

    top = sorted(runs[0][1]["ops"], key=lambda k: -runs[0][1]["ops"][k]["ms_per_call"])[: a.top]
    md = [f"# Where a packed {case.label} spends a call, 1 and 2 threads", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}; "
          f"{a.note or 'machine state not noted'}. `{a.variant}` at batch {a.batch}, {a.runs} runs one after "
          f"the other in one process; a run's call = median of {a.repeats} calls; PyTorch operators: "
          f"their time on the calling thread per call over {a.profiled} profiled calls (torch.profiler, self "
          "time); packed layers = call - PyTorch operators (the profiler's own cost lands in the "
          "operators' share). Cells: the median over runs; ratios: median (range) over runs of each "
          "run's 1-thread / 2-thread time.", "",
          "| part | 1 thread ms | 2 threads ms | 1 / 2 threads |", "|---|---:|---:|---:|"]
    for lab, key in (("whole call", "call_ms"), ("packed layers", "packed_ms"),
                     ("PyTorch operators", "torch_ops_ms")):
        md.append(f"| {lab} | {med(1, key):.2f} | {med(2, key):.2f} | {ratios(key)} |")
    for k in top:
        o = [(r[1]["ops"][k]["ms_per_call"], r[2]["ops"].get(k, {}).get("ms_per_call", float("nan")))
             for r in runs if k in r[1]["ops"]]
        o1, o2 = statistics.median(v[0] for v in o), statistics.median(v[1] for v in o)
        md.append(f"| `{k}` ({runs[0][1]['ops'][k]['count']} per call) | {o1:.3f} | {o2:.3f} | "
                  f"{o1 / o2:.2f}x |")
    write_results(a.out, "profile_bert_threads", {"meta": meta, "runs": runs}, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
