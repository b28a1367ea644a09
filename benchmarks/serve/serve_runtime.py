"""Per-sub-net latency of what ``lowbit serve`` runs per batch: ``--runtime packed`` (each sub-net
compiled by ``lowbit.runtime``) against ``--runtime torch`` (``Supernet.run``, eval mode, cached
quantized weights), at batch 1/8/32, one thread.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/serve/serve_runtime.py

Reads ``runs/serve/lenet5x2.supernet`` (written by ``benchmarks/serve/train_supernet.py``); each
number is the fastest of 6 rounds x 5 runs on a seeded random batch, the rounds going over every
sub-net and engine in turn so that a burst of background load does not fall on one of them only.
Writes ``benchmarks/results/serve_runtime.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results

from lowbit.serve import load_supernet
from lowbit.serve.engines import SubnetEngines

BATCHES = (1, 8, 32)


def fastest_ms(eng: SubnetEngines, name: str, x: torch.Tensor, repeats: int) -> float:
    ts = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t = time.perf_counter()
            eng.run(x, name)
            if i:
                ts.append(1e3 * (time.perf_counter() - t))
    return min(ts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--supernet", default="runs/serve/lenet5x2.supernet")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(1)
    sn = load_supernet(a.supernet)
    engines = {"torch": SubnetEngines(sn, "torch"), "packed": SubnetEngines(sn, "packed")}
    g = torch.Generator().manual_seed(0)
    xs = {b: torch.randn((b, *sn.input_shape), generator=g) for b in BATCHES}
    best: dict[tuple[str, str, int], float] = {}
    for _ in range(a.rounds):
        for n in sn.names:
            for rt, eng in engines.items():
                for b in BATCHES:
                    t = fastest_ms(eng, n, xs[b], a.repeats)
                    best[(n, rt, b)] = min(best.get((n, rt, b), float("inf")), t)
    rows = []
    for n in sn.names:
        row = {"subnet": n, **sn.plan(n).spec.to_dict(), "runtime": engines["packed"].runtime[n]}
        for b in BATCHES:
            row[f"torch_b{b}_ms"] = round(best[(n, "torch", b)], 4)
            row[f"packed_b{b}_ms"] = round(best[(n, "packed", b)], 4)
        rows.append(row)
    meta = run_meta(__file__, argv, t0, seeds=[0], threads=1, supernet=a.supernet)
    cols = " | ".join(f"torch b{b} | packed b{b}" for b in BATCHES)
    head = f"| sub-net | bits w/a | engine | {cols} |"
    lines = [
        "# Serving runtime: packed vs torch, per sub-net (ms, fastest of "
        f"{a.rounds}x{a.repeats} runs, one thread, single run on a shared machine)",
        "",
        head,
        "|" + "---|" * (3 + 2 * len(BATCHES)),
    ]
    for r in rows:
        cells = " | ".join(f"{r[f'torch_b{b}_ms']:.3f} | {r[f'packed_b{b}_ms']:.3f}" for b in BATCHES)
        lines.append(f"| {r['subnet']} | {r['w_bits']}/{r['a_bits']} | {r['runtime']} | {cells} |")
    lines += ["", f"Command: `{meta['command']}`"]
    write_results(a.out, "serve_runtime", {"meta": meta, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
